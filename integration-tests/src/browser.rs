//! A real browser for the dashboard's tests: Debian's chromium, headless,
//! driven over WebDriver by chromedriver (packages chromium and
//! chromium-driver, which scripts/test.sh installs), and the `cutover ui`
//! binary it looks at.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::bin;

/// Where each test's screenshots are kept: `target/ui-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver and the chromium it starts, in a process group of their
/// own: dropped, both are killed, whatever the test did.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        crate::require_tool("chromium", "chromium");
        crate::require_tool("chromedriver", "chromium-driver");
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let profile = tempfile::tempdir().unwrap();
        // chromium's own temporary dirs go with the profile, even when it
        // is killed.
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("TMPDIR", profile.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        // Without the background-networking flags chromium keeps trying
        // hosts this machine cannot reach.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            &format!(
                "--user-data-dir={}",
                profile.path().join("profile").display()
            ),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": "/usr/bin/chromium", "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no chromium session through chromedriver: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Saves what the page shows as `NAME.png` among the artifacts.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// The text of the first element `css` selects, once there is one.
    pub async fn text(&self, css: &str) -> String {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Clicks the first element `css` selects, once there is one.
    pub async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// What `script` (a function body) returns, as JSON.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits until `script` returns `true`, checked every 100 ms.
    pub async fn wait_until(&self, what: &str, within: Duration, script: &str) {
        let deadline = Instant::now() + within;
        loop {
            if self.eval(script).await == json!(true) {
                return;
            }
            if Instant::now() >= deadline {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let text = self.eval("return document.body.innerText;").await;
                panic!(
                    "{what} within {within:?}; the page at {url:?} shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        self.kill();
    }

    fn kill(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.driver.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `cutover ui` as the operator whose CLI config is `config`: the
/// address it printed (with its token), and the process, killed when
/// dropped.
pub struct Dashboard {
    pub url: String,
    /// `http://127.0.0.1:PORT`, without the token.
    pub base: String,
    process: Child,
}

impl Dashboard {
    /// Blocks for the first line it prints (in place, on a test's
    /// multi-thread runtime, whose other tasks go on).
    pub fn start(config: &Path) -> Dashboard {
        tokio::task::block_in_place(|| Self::start_blocking(config))
    }

    fn start_blocking(config: &Path) -> Dashboard {
        let mut process = Command::new(bin("cutover"))
            .arg("--cli-config")
            .arg(config)
            .args(["ui", "--listen", "127.0.0.1:0"])
            .env_remove("CUTOVER_CLI_CONFIG")
            .env("HOME", "/nonexistent")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cutover ui starts");
        let mut first = String::new();
        let mut out = BufReader::new(process.stdout.take().unwrap());
        out.read_line(&mut first).unwrap();
        // The rest is read too: a closed pipe would fail its next print.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let url = first
            .trim()
            .strip_prefix("cutover ui: open ")
            .unwrap_or_else(|| panic!("cutover ui printed {first:?}"))
            .to_string();
        let base = url.split("/?").next().unwrap().to_string();
        Dashboard { url, base, process }
    }

    /// The token the printed address carries.
    pub fn token(&self) -> &str {
        self.url.rsplit("token=").next().unwrap()
    }

    /// A raw HTTP/1.1 request to the dashboard with `headers` (each
    /// "Name: value"): its status and head, as a client outside the
    /// browser sees them.
    pub fn request(&self, method: &str, path: &str, headers: &[String]) -> (u16, String) {
        use std::io::{Read, Write};
        let authority = self
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap();
        let mut stream = std::net::TcpStream::connect(authority).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
        for header in headers {
            request.push_str(&format!("{header}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("an HTTP answer: {response:?}"));
        (status, response)
    }

    /// `cutover ui` ends on SIGTERM, within its bound.
    pub fn stop(self) -> std::process::ExitStatus {
        tokio::task::block_in_place(|| self.stop_blocking())
    }

    fn stop_blocking(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.process.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "cutover ui ended on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
