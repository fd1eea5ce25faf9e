//! A real HAProxy (Debian's `haproxy`) in front of a dev cluster's node
//! proxies: round robin over them, their readiness path as its health
//! check, `option forwardfor`, and its runtime API on a loopback port, as
//! docs/operator-guide.md configures one.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// An HAProxy process, killed on drop.
pub struct Haproxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// Where clients connect.
    pub frontend: String,
    /// The runtime API, `host:port`.
    pub api: String,
}

/// The backend the node proxies are in.
pub const BACKEND: &str = "shop_web";

impl Haproxy {
    /// HAProxy with `servers` (name, `address:port`) in backend `BACKEND`.
    pub fn start(servers: &[(String, String)]) -> Self {
        let free = |taken: &[u16]| {
            cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), taken)
                .expect("a free port")
        };
        let port = free(&[]);
        let api_port = free(&[port]);
        let lines: String = servers
            .iter()
            .map(|(name, address)| format!("    server {name} {address} check\n"))
            .collect();
        let config = format!(
            r#"global
    stats socket ipv4@127.0.0.1:{api_port} level admin
    maxconn 4096
defaults
    mode http
    option forwardfor
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 0
frontend shop
    bind 127.0.0.1:{port}
    default_backend {BACKEND}
backend {BACKEND}
    balance roundrobin
    option httpchk GET /_cutover/ready
    default-server inter 300ms fall 2 rise 1
{lines}"#
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).expect("write haproxy.cfg");
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy; scripts/test.sh installs it)");
        let haproxy = Haproxy {
            child,
            _dir: dir,
            frontend: format!("127.0.0.1:{port}"),
            api: format!("127.0.0.1:{api_port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&haproxy.api).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        haproxy
    }

    /// Each server of `BACKEND` (see `servers`).
    pub fn servers(&self) -> Vec<Server> {
        servers(&self.api)
    }

    /// Waits until every server is up (its health check passed).
    pub fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let servers = self.servers();
            if !servers.is_empty() && servers.iter().all(|s| s.up) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy's servers are not all up: {servers:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A server of `BACKEND` as the runtime API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub name: String,
    /// Set to drain (by cutover, through the runtime API).
    pub drained: bool,
    /// Its health check passes.
    pub up: bool,
    /// Its weight now (1 as configured here).
    pub weight: u32,
}

/// The servers of `BACKEND` from the runtime API at `api`; none while it
/// does not answer.
pub fn servers(api: &str) -> Vec<Server> {
    let Ok(mut stream) = std::net::TcpStream::connect(api) else {
        return Vec::new();
    };
    let mut answer = String::new();
    let asked = stream.write_all(format!("show servers state {BACKEND}\n").as_bytes());
    if asked.is_err() || stream.read_to_string(&mut answer).is_err() {
        return Vec::new();
    }
    // A version line, a header, then one line per server: srv_name is the
    // 4th column, srv_op_state (2: up) the 6th, srv_admin_state the 7th
    // (0x08, 0x10: drain), srv_uweight the 8th.
    answer
        .lines()
        .skip(2)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let admin: u32 = fields.get(6)?.parse().ok()?;
            Some(Server {
                name: fields.get(3)?.to_string(),
                drained: admin & 0x18 != 0,
                up: *fields.get(5)? == "2",
                weight: fields.get(7)?.parse().ok()?,
            })
        })
        .collect()
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
