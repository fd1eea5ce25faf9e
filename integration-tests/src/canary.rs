//! Helpers of the canary and analysis tests on real binaries: a 2-node
//! `cutover dev up` cluster with the test app on a free port, clients with
//! addresses (and cookies) of their own, load from 200 clients, and the
//! CLI's answers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{body, dev_spec, field, http_get_with, text, DevCluster};

/// Exit code of `deploy --wait` and `rollout watch` at a canary waiting
/// for `cutover rollout promote`.
pub const AWAITING_PROMOTION: i32 = 3;

/// Panics with its output unless the command exited 0.
pub fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Panics with its output unless `deploy --wait` or `rollout watch` stopped
/// at a canary waiting for promotion.
pub fn awaits_promotion(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(AWAITING_PROMOTION),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Requests each client sends in `Fixture::traffic`.
pub const REQUESTS_PER_CLIENT: usize = 10;

/// A 2-node `cutover dev up` cluster and the free port its test app
/// listens on.
pub struct Fixture {
    pub cluster: DevCluster,
    pub port: u16,
}

impl Fixture {
    pub fn up() -> Self {
        Self::with_nodes(2)
    }

    pub fn with_nodes(nodes: u8) -> Self {
        let cluster = DevCluster::up(nodes);
        let port = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[])
            .unwrap();
        Self { cluster, port }
    }

    pub fn deploy(&self, version: &str, strategy: &str) -> std::process::Output {
        let spec = dev_spec(self.port, version, strategy, "");
        self.cluster.deploy_spec(&spec, version, &["--wait"])
    }

    pub fn node(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", 11 + i, self.port)
    }

    /// One GET of `/` on node `i` as client `client` (its address in
    /// X-Forwarded-For, which the proxy trusts from loopback): the version
    /// that answered and the cookie it was given.
    pub fn get(
        &self,
        i: usize,
        client: &Client,
        extra: &[(&str, &str)],
    ) -> (String, Option<String>) {
        let address = client.address();
        let mut headers = vec![("X-Forwarded-For", address.as_str())];
        let cookie;
        if let Some(value) = &client.cookie {
            cookie = format!("cutover_cohort={value}");
            headers.push(("Cookie", cookie.as_str()));
        }
        headers.extend_from_slice(extra);
        let answer = http_get_with(&self.node(i), "/", &headers);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let set_cookie = answer
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(": "))
            .find(|(name, value)| {
                name.eq_ignore_ascii_case("set-cookie") && value.starts_with("cutover_cohort=")
            })
            .map(|(_, value)| {
                let pair = value.split(';').next().unwrap_or_default();
                pair.trim_start_matches("cutover_cohort=").to_string()
            });
        (body(&answer).to_string(), set_cookie)
    }

    /// `REQUESTS_PER_CLIENT` requests of each of `clients`, alternating
    /// between the nodes (every proxy must put a client in the same
    /// cohort), from 8 threads: the versions each client saw.
    pub fn traffic(&self, clients: &mut [Client]) -> Vec<BTreeMap<String, usize>> {
        let chunk = clients.len().div_ceil(8);
        std::thread::scope(|scope| {
            let workers: Vec<_> = clients
                .chunks_mut(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter_mut()
                            .map(|client| {
                                let mut seen = BTreeMap::new();
                                for r in 0..REQUESTS_PER_CLIENT {
                                    let (version, cookie) = self.get(r % 2, client, &[]);
                                    if client.keeps_cookies && cookie.is_some() {
                                        client.cookie = cookie;
                                    }
                                    *seen.entry(version).or_insert(0) += 1;
                                }
                                seen
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a traffic thread"))
                .collect()
        })
    }

    pub fn rollout(&self, id: &str) -> Value {
        let out = self
            .cluster
            .cutover(&["rollout", "status", id, "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("rollout status is JSON")
    }

    /// Polls rollout `id` until `done` holds; a coordinator that does not
    /// answer yet (restarting) counts as not done.
    pub fn wait_rollout(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .cluster
                .cutover(&["rollout", "status", id, "-o", "json"]);
            if out.status.success() {
                let rollout: Value = serde_json::from_slice(&out.stdout).unwrap();
                if done(&rollout) {
                    return rollout;
                }
                assert!(
                    Instant::now() < deadline,
                    "rollout {id} not as expected within {timeout:?}: {rollout:#}\n{}",
                    self.cluster.log_tails()
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "no rollout status within {timeout:?}: {}\n{}",
                    text(&out.stderr),
                    self.cluster.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The side release of service web on each node as `cutover nodes`
    /// shows it.
    pub fn sides(&self) -> Vec<Value> {
        let mut nodes = self.cluster.nodes_json();
        nodes.sort_by(|a, b| field(a, "name").cmp(field(b, "name")));
        nodes
            .iter()
            .map(|n| {
                n["services"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| s["service"] == "web"))
                    .map(|s| s["side"].clone())
                    .unwrap_or(Value::Null)
            })
            .collect()
    }
}

impl Fixture {
    /// Waits until node `i`'s proxy answers again (after its agent's
    /// restart).
    pub fn wait_until_serving(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.node(i)).is_err() {
            assert!(Instant::now() < deadline, "node {i}'s proxy is not back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `done` holds for the side release of web on both
    /// nodes, as `cutover nodes` shows it (the agents report within a
    /// heartbeat).
    pub fn wait_sides(&self, what: &str, done: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sides = self.sides();
            if sides.iter().all(&done) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within 30 s: {sides:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Fixture {
    /// The release processes of the cluster's nodes by release id.
    pub fn release_processes(&self) -> BTreeMap<String, Vec<u32>> {
        crate::release_processes(self.cluster.dir.path())
    }
}

/// A client of the shop: its own address, and a browser that keeps the
/// proxy's cookie or a script that does not.
#[derive(Clone)]
pub struct Client {
    pub index: usize,
    pub keeps_cookies: bool,
    pub cookie: Option<String>,
}

impl Client {
    pub fn many(n: usize) -> Vec<Client> {
        (0..n)
            .map(|index| Client {
                index,
                keeps_cookies: index % 2 == 0,
                cookie: None,
            })
            .collect()
    }

    pub fn address(&self) -> String {
        format!(
            "10.{}.{}.{}",
            self.index / 65536,
            self.index / 256 % 256,
            self.index % 256
        )
    }
}

/// The one version each client saw; panics naming a client that saw two.
pub fn one_version_each(seen: &[BTreeMap<String, usize>]) -> Vec<String> {
    seen.iter()
        .enumerate()
        .map(|(i, versions)| {
            assert_eq!(
                versions.len(),
                1,
                "client {i} saw two versions: {versions:?}"
            );
            versions.keys().next().unwrap().clone()
        })
        .collect()
}

pub fn share_of(version: &str, of: &[String]) -> f64 {
    of.iter().filter(|v| *v == version).count() as f64 / of.len() as f64
}

/// The newest rollout's id (the deploy just made).
pub fn newest_id(f: &Fixture) -> String {
    f.cluster.newest_rollout()["id"]
        .as_str()
        .expect("a rollout id")
        .to_string()
}

/// The app spec of the analysis tests: `dev_spec` with release
/// environment lines `env` (LATENCY_MS, FAIL_PERCENT) and `tail` after it
/// (the `[analysis]` tables).
pub fn analysed_spec(port: u16, version: &str, env: &str, strategy: &str, tail: &str) -> String {
    dev_spec(port, version, strategy, tail).replace(
        "[services.web.env]\n",
        &format!("[services.web.env]\n{env}\n"),
    )
}

/// `[analysis.errors]` with the proxies' success metric: 99 % of the
/// canary's answers without a 5xx, in 2 windows of 2 s of at least 20
/// requests.
pub const ERRORS_ANALYSIS: &str = r#"
[[analysis.errors.metrics]]
name = "success"
condition = "canary_success_rate >= 0.99"
interval = "2s"
count = 2
min_requests = 20
"#;

/// Clients from 200 addresses (half of them in the canary's cohort) sending
/// requests on 4 connections until stopped: the status and version of each
/// answer.
pub struct Shoppers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(u16, String)>>>,
}

impl Shoppers {
    /// Shoppers alternating between the cluster's first two nodes.
    pub fn start(f: &Fixture) -> Self {
        Self::at(&[f.node(0), f.node(1)])
    }

    /// Shoppers sending to `targets` (a node's proxy, a load balancer),
    /// one thread each in turn, at least 4 threads and one per target.
    pub fn at(targets: &[String]) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..targets.len().max(4))
            .map(|t| {
                let stop = stop.clone();
                let node = targets[t % targets.len()].clone();
                std::thread::spawn(move || {
                    let mut answers = Vec::new();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let address = Client {
                            index: i % 200,
                            keeps_cookies: false,
                            cookie: None,
                        }
                        .address();
                        let answer = http_get_with(&node, "/", &[("X-Forwarded-For", &address)]);
                        let status = answer
                            .split_whitespace()
                            .nth(1)
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        answers.push((status, body(&answer).to_string()));
                        i += 4;
                    }
                    answers
                })
            })
            .collect();
        Shoppers { stop, threads }
    }

    pub fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("a shopper thread"))
            .collect()
    }
}
