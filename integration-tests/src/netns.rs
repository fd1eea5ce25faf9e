//! Hosts of their own for fault tests across real network boundaries: one
//! network namespace per node, joined to the test's namespace (where the
//! coordinator runs) by a veth pair in a private /24 of its own. A node's
//! link to the coordinator is cut with iptables DROP inside its namespace,
//! for the coordinator's port only, so its services stay reachable from the
//! test while its control connection is gone.
//!
//! Needs root (CI runs as root). Everything is removed on drop, also when
//! the test fails.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

/// A namespace with its veth link.
pub struct NetHost {
    pub ns: String,
    host_if: String,
    /// The test side of the link: the address the node dials.
    pub gateway: Ipv4Addr,
    /// The node's own address: its services and proxy bind here.
    pub address: Ipv4Addr,
}

pub struct NetLab {
    hosts: Vec<NetHost>,
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e}; the netns tests need iproute2 and iptables")
        });
    assert!(
        output.status.success(),
        "{program} {} failed: {}; the netns tests need root, iproute2 and iptables",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A second octet for 10.X.0.0/16 that no route of this machine uses yet,
/// so labs of tests running at once do not overlap.
fn free_octet() -> u8 {
    let routes = Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let start = (std::process::id() % 200) as u8 + 20;
    (0..200u8)
        .map(|i| 20 + (start - 20 + i) % 200)
        .find(|octet| !routes.contains(&format!("10.{octet}.")))
        .expect("a free 10.X.0.0/16 range")
}

impl NetLab {
    /// `count` hosts, numbered from 0.
    pub fn new(count: usize) -> Self {
        let octet = free_octet();
        let mut lab = Self { hosts: Vec::new() };
        for i in 0..count {
            // Interface names are at most 15 bytes.
            let tag = format!("ct{octet}x{i}");
            let host = NetHost {
                ns: format!("cutover-{tag}"),
                host_if: format!("{tag}h"),
                gateway: Ipv4Addr::new(10, octet, i as u8 + 1, 1),
                address: Ipv4Addr::new(10, octet, i as u8 + 1, 2),
            };
            let node_if = format!("{tag}n");
            // Registered first: a failure half-way is cleaned up too.
            lab.hosts.push(host);
            let host = lab.hosts.last().expect("just pushed");
            run("ip", &["netns", "add", &host.ns]);
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &host.host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &node_if,
                ],
            );
            run("ip", &["link", "set", &node_if, "netns", &host.ns]);
            run(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", host.gateway),
                    "dev",
                    &host.host_if,
                ],
            );
            run("ip", &["link", "set", &host.host_if, "up"]);
            let in_ns = |args: &[&str]| {
                let mut full = vec!["netns", "exec", host.ns.as_str(), "ip"];
                full.extend_from_slice(args);
                run("ip", &full);
            };
            in_ns(&[
                "addr",
                "add",
                &format!("{}/24", host.address),
                "dev",
                &node_if,
            ]);
            in_ns(&["link", "set", &node_if, "up"]);
            in_ns(&["link", "set", "lo", "up"]);
        }
        lab
    }

    pub fn host(&self, i: usize) -> &NetHost {
        &self.hosts[i]
    }
}

impl NetHost {
    /// `program` run inside this host's namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).arg(program);
        command
    }

    fn iptables(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", self.ns.as_str(), "iptables", "-w"];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// Drops every packet between this host and the coordinator's `port`,
    /// both ways: established connections hang as on a real partition.
    pub fn cut(&self, port: u16) {
        let gateway = self.gateway.to_string();
        let port = port.to_string();
        self.iptables(&[
            "-A", "OUTPUT", "-p", "tcp", "-d", &gateway, "--dport", &port, "-j", "DROP",
        ]);
        self.iptables(&[
            "-A", "INPUT", "-p", "tcp", "-s", &gateway, "--sport", &port, "-j", "DROP",
        ]);
    }

    pub fn heal(&self) {
        self.iptables(&["-F"]);
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Whatever still runs in the namespace (a release an agent left)
            // goes with it.
            if let Ok(output) = Command::new("ip")
                .args(["netns", "pids", &host.ns])
                .output()
            {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["link", "del", &host.host_if])
                .output();
            let _ = Command::new("ip").args(["netns", "del", &host.ns]).output();
        }
    }
}
