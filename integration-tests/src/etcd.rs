//! etcd for the tests of the coordinator's etcd store. `scripts/etcd-env.sh`
//! starts one three-member cluster for the whole run (`settings`: a key
//! prefix per test); a test that kills members starts a cluster of its own
//! (`EtcdCluster`), with the same certificates, so the tests sharing the
//! run's cluster never see it fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cutover_common::tls::TlsFiles;
use cutover_coordinator::config::EtcdSettings;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with ./scripts/test.sh, which starts a throw-away etcd cluster (scripts/etcd-env.sh)")
    })
}

/// The coordinator's client certificate for the test clusters.
fn client_tls() -> TlsFiles {
    TlsFiles {
        ca_cert: var("CUTOVER_TEST_ETCD_CA").into(),
        cert: var("CUTOVER_TEST_ETCD_CERT").into(),
        key: var("CUTOVER_TEST_ETCD_KEY").into(),
    }
}

fn settings_for(endpoints: Vec<String>, prefix: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints,
        prefix: prefix.to_string(),
        tls: client_tls(),
        server_name: None,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        advertise: None,
    }
}

/// The run's shared cluster, with every key under `prefix`.
pub fn settings(prefix: &str) -> EtcdSettings {
    let endpoints = var("CUTOVER_TEST_ETCD_ENDPOINTS")
        .split(',')
        .map(str::to_string)
        .collect();
    settings_for(endpoints, prefix)
}

/// A three-member cluster of a test's own on loopback, stopped on drop.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

pub struct Member {
    pub name: String,
    pub client_url: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // The server certificate of the run's cluster is valid for
        // 127.0.0.1 and beside its CA.
        let tls = Path::new(&var("CUTOVER_TEST_ETCD_CA"))
            .parent()
            .expect("in a dir")
            .to_path_buf();
        let mut ports: Vec<u16> = Vec::new();
        for _ in 0..6 {
            // Above 20000 and below the kernel's ephemeral range: no
            // outgoing connection takes one between the check and etcd's
            // bind.
            let port =
                cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(20000..=31999), &ports)
                    .expect("a free port");
            ports.push(port);
        }
        let names = ["a", "b", "c"];
        let cluster = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}=https://127.0.0.1:{}", ports[i * 2 + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("cutover-{}", dir.path().display());
        let members = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let client_url = format!("https://127.0.0.1:{}", ports[i * 2]);
                let peer_url = format!("https://127.0.0.1:{}", ports[i * 2 + 1]);
                let file = |f: &str| tls.join(f).display().to_string();
                let args = vec![
                    format!("--name={name}"),
                    format!("--data-dir={}", dir.path().join(name).display()),
                    "--logger=zap".into(),
                    "--log-outputs=stderr".into(),
                    // Every interface: a coordinator on a host of its own
                    // (netns) dials the test's side of its link.
                    format!("--listen-client-urls=https://0.0.0.0:{}", ports[i * 2]),
                    format!("--advertise-client-urls={client_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster={cluster}"),
                    "--initial-cluster-state=new".into(),
                    format!("--initial-cluster-token={token}"),
                    "--client-cert-auth".into(),
                    format!("--trusted-ca-file={}", file("ca.pem")),
                    format!("--cert-file={}", file("server.pem")),
                    format!("--key-file={}", file("server.key")),
                    "--peer-client-cert-auth".into(),
                    format!("--peer-trusted-ca-file={}", file("ca.pem")),
                    format!("--peer-cert-file={}", file("server.pem")),
                    format!("--peer-key-file={}", file("server.key")),
                ];
                let mut member = Member {
                    name: name.to_string(),
                    client_url,
                    args,
                    log: dir.path().join(format!("{name}.log")),
                    child: None,
                };
                member.start();
                member
            })
            .collect();
        let cluster = Self { members, _dir: dir };
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// Settings for a coordinator on this cluster, members in order.
    pub fn settings(&self, prefix: &str) -> EtcdSettings {
        let endpoints = self.members.iter().map(|m| m.client_url.clone()).collect();
        settings_for(endpoints, prefix)
    }

    /// `settings` for a coordinator that reaches the members at `ip` (the
    /// test's side of a netns link); their certificate names localhost.
    pub fn settings_via(&self, prefix: &str, ip: std::net::Ipv4Addr) -> EtcdSettings {
        let endpoints = self
            .members
            .iter()
            .map(|m| format!("https://{ip}:{}", m.port()))
            .collect();
        EtcdSettings {
            server_name: Some("localhost".into()),
            ..settings_for(endpoints, prefix)
        }
    }

    /// Waits until every running member reports healthy through etcdctl.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let tls = client_tls();
        loop {
            let running: Vec<&Member> = self.members.iter().filter(|m| m.running()).collect();
            let endpoints = running
                .iter()
                .map(|m| m.client_url.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let healthy = Command::new("etcdctl")
                .env_remove("ETCDCTL_API")
                .args([
                    format!("--endpoints={endpoints}"),
                    format!("--cacert={}", tls.ca_cert.display()),
                    format!("--cert={}", tls.cert.display()),
                    format!("--key={}", tls.key.display()),
                    "--command-timeout=2s".into(),
                    "endpoint".into(),
                    "health".into(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test etcd cluster is not healthy within {timeout:?}:\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                format!(
                    "--- {}\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Member {
    /// Starts the member (again: its data dir holds the cluster, so it
    /// rejoins).
    pub fn start(&mut self) {
        assert!(!self.running(), "member {} runs already", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("member log");
        let mut command = Command::new("etcd");
        // etcd refuses a flag also set by an ETCD_* variable.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ETCD_")) {
            command.env_remove(name);
        }
        let child = command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("etcd starts (installed by scripts/etcd-env.sh)");
        self.child = Some(child);
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        let port = self.client_url.rsplit(':').next().expect("url has a port");
        port.parse().expect("a port")
    }

    /// SIGKILL: a member's machine dying.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
    }
}
