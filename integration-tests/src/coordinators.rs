//! `cutover server` processes of a test on one etcd prefix (several
//! coordinators, one leading), each on ports of its own, in the test's
//! network namespace or on a host of its own (`netns`), SIGKILLed on drop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cutover_coordinator::config::EtcdSettings;

use crate::netns::NetHost;
use crate::{bin, Cluster};

pub struct ServerProcess {
    child: Child,
    pub grpc: u16,
    pub http: u16,
    /// Where agents, the CLI and the test reach it.
    pub address: IpAddr,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl ServerProcess {
    /// A coordinator with `cluster`'s PKI on `etcd` (its endpoints as seen
    /// from where it runs), on `host` or else in the test's namespace.
    pub fn start(
        cluster: &Cluster,
        dir: &Path,
        name: &str,
        etcd: &EtcdSettings,
        host: Option<&NetHost>,
    ) -> Self {
        let port = |taken: &[u16]| {
            cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(36000..=38999), taken)
                .unwrap()
        };
        let grpc = port(&[]);
        let http = port(&[grpc]);
        let (bind, address): (IpAddr, IpAddr) = match host {
            Some(host) => ([0, 0, 0, 0].into(), host.address.into()),
            None => ([127, 0, 0, 1].into(), [127, 0, 0, 1].into()),
        };
        let files = cluster.pki.coordinator_files();
        let ca_key = files.ca_cert.with_file_name(cutover_common::pki::CA_KEY);
        let master_key = files
            .ca_cert
            .with_file_name(cutover_coordinator::secrets::MASTER_KEY);
        let endpoints = etcd
            .endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let server_name = etcd
            .server_name
            .as_ref()
            .map(|name| format!("server_name = {name:?}\n"))
            .unwrap_or_default();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\nlisten = \"{bind}:{grpc}\"\nhttp_listen = \"{bind}:{http}\"\n\
                 heartbeat_interval = \"300ms\"\nheartbeat_ttl = \"2s\"\nshutdown_grace = \"3s\"\n\
                 ca_key = {ca_key:?}\nmaster_key_file = {master_key:?}\nstore = \"etcd\"\n\
                 [tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n\
                 [etcd]\nendpoints = [{endpoints}]\nprefix = {prefix:?}\nadvertise = \"https://{address}:{grpc}\"\n\
                 {server_name}tls = {{ ca_cert = {:?}, cert = {:?}, key = {:?} }}\n",
                files.ca_cert,
                files.cert,
                files.key,
                etcd.tls.ca_cert,
                etcd.tls.cert,
                etcd.tls.key,
                prefix = etcd.prefix,
                data = dir.join(name),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut command = match host {
            Some(host) => host.command(&bin("cutover")),
            None => Command::new(bin("cutover")),
        };
        let output = std::fs::File::create(&log).unwrap();
        let child = command
            .args(["server", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        Self {
            child,
            grpc,
            http,
            address,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.address, self.grpc)
    }

    /// Whether it leads, as its /metrics says (false while it cannot
    /// answer).
    pub fn leads(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|page| page.lines().any(|line| line == "cutover_leading 1"))
    }

    /// Whether its HTTP listener answers (not while a leader that lost the
    /// lead drains, before it follows).
    pub fn answers(&self) -> bool {
        self.get("/healthz").is_some()
    }

    /// Whether it answers as a follower of the coordinator at `leader`.
    pub fn follows(&self, leader: &str) -> bool {
        self.get("/healthz")
            .is_some_and(|page| page.contains(&format!("following the leader at {leader}")))
    }

    /// Whether it answers as a follower that knows of no leader.
    pub fn follows_nobody(&self) -> bool {
        self.get("/healthz")
            .is_some_and(|page| page.contains("following; no leader yet"))
    }

    /// Its /metrics or /healthz (a follower serves both).
    pub fn page(&self, path: &str) -> String {
        self.get(path)
            .unwrap_or_else(|| panic!("coordinator {} does not answer {path}", self.url()))
    }

    /// The body of `path`, or `None` when it does not answer: its
    /// listeners change hands when it gains or loses the lead.
    fn get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::new(self.address, self.http);
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        if !response.starts_with("HTTP/1.1 200") {
            return None;
        }
        Some(crate::body(&response).to_string())
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets and its state
    /// and does nothing, as in a stalled VM or a long pause, until `resume`.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Wakes a process `pause` froze (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signalling the coordinator");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `done` every 50 ms; how long it took. Fails the test after
/// `timeout`.
pub fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}
