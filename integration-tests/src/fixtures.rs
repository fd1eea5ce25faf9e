//! Small helpers the tests share: processes, HTTP on loopback, the test
//! app and its archives, specs, deploy requests and waiting for rollouts.

use super::*;

pub fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

/// Whether `pid` is still running; a zombie has stopped, whoever reaps it.
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub fn field<'a>(node: &'a serde_json::Value, key: &str) -> &'a str {
    node[key].as_str().unwrap_or_default()
}

/// GETs `/` until the node's proxy answers 200 and returns that answer: it
/// is down while its agent is, and answers 502 until a release the agent
/// restarts serves again.
pub async fn get_when_up(public: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no connection");
    loop {
        if let Ok(stream) = std::net::TcpStream::connect(public) {
            drop(stream);
            last = http_get(public, "/");
            if last.starts_with("HTTP/1.1 200") {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the proxy on {public} did not serve again; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long `http_get` waits to connect, and then for the whole answer: a
/// proxy or app that hangs fails the test instead of holding it forever.
const HTTP_GET_DEADLINE: Duration = Duration::from_secs(30);

/// One plain HTTP/1.1 GET (blocking, `Connection: close`); the raw answer.
/// Panics, naming the address, when it cannot connect or answer within
/// `HTTP_GET_DEADLINE`.
pub fn http_get(addr: &str, path: &str) -> String {
    http_get_with(addr, path, &[])
}

/// `http_get` with extra request `headers` (a cookie, a forwarded address).
pub fn http_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let socket: std::net::SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("http_get: {addr:?} is not an address: {e}"));
    let mut stream = std::net::TcpStream::connect_timeout(&socket, HTTP_GET_DEADLINE)
        .unwrap_or_else(|e| panic!("http_get: cannot connect to {addr}: {e}"));
    stream.set_read_timeout(Some(HTTP_GET_DEADLINE)).unwrap();
    stream.set_write_timeout(Some(HTTP_GET_DEADLINE)).unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    // One write: a request in several small segments waits out the peer's
    // delayed ACK (40 ms) behind Nagle's algorithm.
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("http_get: cannot send to {addr}: {e}"));
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap_or_else(|e| {
        panic!("http_get {addr}{path}: no whole answer within {HTTP_GET_DEADLINE:?}: {e}")
    });
    response
}

/// The test web app (see agent/tests/fixtures/app.py).
pub const APP: &str = include_str!("../../agent/tests/fixtures/app.py");
/// The test queue worker (see agent/tests/fixtures/worker.py).
pub const WORKER: &str = include_str!("../../agent/tests/fixtures/worker.py");

/// Packs the test app and worker as a release artifact; returns its file
/// URL and digest.
pub fn app_archive(dir: &Path) -> (String, String) {
    let path = archive(dir, "app.tar.gz", &[("app.py", APP), ("worker.py", WORKER)]);
    let digest = Digest::of_file(&path).unwrap().to_string();
    (format!("file://{}", path.display()), digest)
}

/// Writes `files` as `dir/name`, a .tar.gz; returns its path.
pub fn archive(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

/// A release of the test app as the coordinator sends it: health on
/// /health, a smoke check that the body names the version.
pub fn web_release(
    version: &str,
    listen_port: u16,
    artifact: &(String, String),
    env: &[(&str, &str)],
) -> pb::Release {
    let mut vars: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.insert("VERSION".into(), version.into());
    pb::Release {
        release_id: format!("web-{version}"),
        service: "web".into(),
        version: version.into(),
        artifact: Some(pb::Artifact {
            url: artifact.0.clone(),
            digest: artifact.1.clone(),
        }),
        command: vec!["python3".into(), "app.py".into()],
        env: vars,
        kind: Some(pb::release::Kind::Web(pb::WebService {
            listen: format!(":{listen_port}"),
            also_listen: Vec::new(),
            health: Some(pb::Check {
                probe: Some(pb::check::Probe::Http(pb::HttpProbe {
                    path: "/health".into(),
                    ..Default::default()
                })),
                timeout_ms: 1000,
            }),
            health_interval_ms: 100,
            healthy_threshold: 2,
            healthy_deadline_ms: 2000,
            smoke: vec![pb::Check {
                probe: Some(pb::check::Probe::Http(pb::HttpProbe {
                    path: "/".into(),
                    status_min: 200,
                    status_max: 200,
                    body_contains: version.into(),
                })),
                timeout_ms: 1000,
            }],
            drain_timeout_ms: 5000,
        })),
        stop_signal: String::new(),
        stop_grace_ms: 5000,
        ..Default::default()
    }
}

pub fn activate(id: &str, release: pb::Release) -> pb::Command {
    pb::Command {
        command_id: id.into(),
        kind: Some(command::Kind::Activate(pb::ActivateRelease {
            release: Some(release),
            drain_first: false,
            secret_values: Default::default(),
            hook_env: Default::default(),
            keep_previous_ms: 0,
            keep_previous_warm: false,
        })),
    }
}

/// The body of a raw HTTP response.
pub fn body(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or_default()
}

/// `command`'s output, run with `input` on its stdin.
pub fn output_with_input(mut command: std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the command");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("the command's output")
}

/// What the test app answers at `/env-sha256/NAME` for a variable whose
/// value is `value`: its SHA-256, in hex.
pub fn sha256_hex(value: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The app spec the rollout tests deploy: the test app (`app_archive`) as
/// service `web` on `port` of every node labelled env=test, in environment
/// `test`. `extra_env` lands in the release's environment (`KEY = "value"`
/// lines), `strategy` is the strategy table's body.
pub fn web_spec(port: u16, extra_env: &str, strategy: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
drain_timeout = "2s"
stop_grace = "2s"
[services.web.env]
{extra_env}
[services.web.health]
path = "/health"
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "3s"
[[services.web.smoke]]
path = "/"
expect_status = 200

[strategy]
{strategy}

[environments.test]
nodes = {{ env = "test" }}
"#
    )
}

/// The app spec the real-binary tests deploy on a `DevCluster`: the test
/// app (`app_archive`) as service `web` on `port` of every node of
/// environment `local`, serving `version`; `strategy` is the strategy
/// table's body and `tail` is appended (hooks, a migration, webhooks).
pub fn dev_spec(port: u16, version: &str, strategy: &str, tail: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.env]
GREETING = "hello"
VERSION = "{version}"
[services.web.health]
path = "/health"
interval = "100ms"

[strategy]
{strategy}

[environments.local]
nodes = {{ env = "local" }}
{tail}
"#
    )
}

/// What each of the first `nodes` dev nodes serves on `port` at `/` (the
/// test app's VERSION).
pub fn versions(port: u16, nodes: u8) -> Vec<String> {
    (0..nodes)
        .map(|i| body(&http_get(&format!("127.0.0.{}:{port}", 11 + i), "/")).to_string())
        .collect()
}

/// A process's output as text, for messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A deploy of `spec` to environment test with the artifact `(url, digest)`.
pub fn deploy_request(
    spec: String,
    version: &str,
    artifact: &(String, String),
) -> pb::DeployRequest {
    pb::DeployRequest {
        spec,
        spec_file: "cutover.toml".into(),
        env: "test".into(),
        service: String::new(),
        version: version.into(),
        artifact: Some(pb::Artifact {
            url: artifact.0.clone(),
            digest: artifact.1.clone(),
        }),
        image: String::new(),
        ..Default::default()
    }
}

/// Whether a rollout has ended.
pub fn ended(rollout: &pb::Rollout) -> bool {
    use pb::RolloutState as R;
    matches!(
        rollout.state(),
        R::Succeeded | R::Failed | R::RolledBack | R::Aborted
    )
}

/// Polls rollout `id` until `done` holds; panics with the rollout after
/// `timeout`.
pub async fn wait_for_rollout(
    client: &mut OperatorServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    done: impl Fn(&pb::Rollout) -> bool,
) -> pb::Rollout {
    let deadline = Instant::now() + timeout;
    loop {
        let rollout = client
            .get_rollout(pb::GetRolloutRequest { id: id.into() })
            .await
            .expect("get rollout")
            .into_inner();
        if done(&rollout) {
            return rollout;
        }
        assert!(
            Instant::now() < deadline,
            "rollout not as expected within {timeout:?}: {rollout:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}
