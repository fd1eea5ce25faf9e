//! Canary rollouts on real binaries (`cutover dev up`), driven through the
//! CLI: the node proxies split the traffic by weight with sticky cohorts,
//! a CI job's `deploy --wait` stops at a pause with exit code 3, the split
//! survives a coordinator and an agent SIGKILL, `promote` finishes the
//! rollout, `abort` returns every request to stable, and a canary that
//! turns sick is rolled back by itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cutover_integration_tests::{
    body, dev_spec, field, http_get_with, running, sigkill, text, versions, DevCluster,
};
use serde_json::Value;

/// Exit code of `deploy --wait` and `rollout watch` at a canary waiting
/// for `cutover rollout promote`.
const AWAITING_PROMOTION: i32 = 3;

const CLIENTS: usize = 1000;
const REQUESTS_PER_CLIENT: usize = 10;

struct Fixture {
    cluster: DevCluster,
    port: u16,
}

impl Fixture {
    fn new() -> Self {
        let cluster = DevCluster::up(2);
        let port = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[])
            .unwrap();
        Self { cluster, port }
    }

    fn deploy(&self, version: &str, strategy: &str) -> std::process::Output {
        let spec = dev_spec(self.port, version, strategy, "");
        self.cluster.deploy_spec(&spec, version, &["--wait"])
    }

    fn node(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", 11 + i, self.port)
    }

    /// One GET of `/` on node `i` as client `client` (its address in
    /// X-Forwarded-For, which the proxy trusts from loopback): the version
    /// that answered and the cookie it was given.
    fn get(&self, i: usize, client: &Client, extra: &[(&str, &str)]) -> (String, Option<String>) {
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
    fn traffic(&self, clients: &mut [Client]) -> Vec<BTreeMap<String, usize>> {
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

    fn rollout(&self, id: &str) -> Value {
        let out = self
            .cluster
            .cutover(&["rollout", "status", id, "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("rollout status is JSON")
    }

    /// Polls rollout `id` until `done` holds; a coordinator that does not
    /// answer yet (restarting) counts as not done.
    fn wait_rollout(&self, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
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
    fn sides(&self) -> Vec<Value> {
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
    fn wait_until_serving(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.node(i)).is_err() {
            assert!(Instant::now() < deadline, "node {i}'s proxy is not back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `done` holds for the side release of web on both
    /// nodes, as `cutover nodes` shows it (the agents report within a
    /// heartbeat).
    fn wait_sides(&self, what: &str, done: impl Fn(&Value) -> bool) {
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

/// A client of the shop: its own address, and a browser that keeps the
/// proxy's cookie or a script that does not.
#[derive(Clone)]
struct Client {
    index: usize,
    keeps_cookies: bool,
    cookie: Option<String>,
}

impl Client {
    fn many(n: usize) -> Vec<Client> {
        (0..n)
            .map(|index| Client {
                index,
                keeps_cookies: index % 2 == 0,
                cookie: None,
            })
            .collect()
    }

    fn address(&self) -> String {
        format!(
            "10.{}.{}.{}",
            self.index / 65536,
            self.index / 256 % 256,
            self.index % 256
        )
    }
}

/// The one version each client saw; panics naming a client that saw two.
fn one_version_each(seen: &[BTreeMap<String, usize>]) -> Vec<String> {
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

fn share_of(version: &str, of: &[String]) -> f64 {
    of.iter().filter(|v| *v == version).count() as f64 / of.len() as f64
}

/// The newest rollout's id (the deploy just made).
fn newest_id(f: &Fixture) -> String {
    f.cluster.newest_rollout()["id"]
        .as_str()
        .expect("a rollout id")
        .to_string()
}

const CANARY_20: &str = r#"kind = "canary"
steps = [{ set_weight = 20 }, { pause = {} }, { set_weight = 50 }]
min_healthy_time = "1s"
scale_down_delay = "15s""#;

#[test]
fn a_canary_splits_by_sticky_cohort_survives_restarts_and_promotes() {
    let f = Fixture::new();
    let out = f.deploy("v1", "batch = 2");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = f.deploy("v2", CANARY_20);
    assert_eq!(
        out.status.code(),
        Some(AWAITING_PROMOTION),
        "deploy --wait stops at the pause: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let id = newest_id(&f);
    let rollout = f.rollout(&id);
    assert_eq!(rollout["state"], "running", "{rollout:#}");
    assert_eq!(rollout["canary"]["weight"], 20, "{rollout:#}");
    assert_eq!(rollout["canary"]["awaiting_promotion"], true, "{rollout:#}");
    assert_eq!(
        rollout["canary"]["canary_nodes"].as_array().unwrap().len(),
        2
    );
    f.wait_sides("v2 healthy at weight 20 on both nodes", |s| {
        s["weight"] == 20 && s["healthy"] == true
    });

    // 10,000 requests of 1,000 clients, half of them keeping the cookie.
    let mut clients = Client::many(CLIENTS);
    let seen = f.traffic(&mut clients);
    let chosen = one_version_each(&seen);
    let share = share_of("v2", &chosen);
    eprintln!(
        "canary share at weight 20: {:.1}% of {CLIENTS} clients",
        share * 100.0
    );
    assert!((0.18..=0.22).contains(&share), "canary share {share}");
    let cookieless: Vec<String> = chosen.iter().skip(1).step_by(2).cloned().collect();
    let share = share_of("v2", &cookieless);
    assert!((0.15..=0.25).contains(&share), "cookieless share {share}");

    // Testers pick a version whatever their cohort.
    let stable_client = &clients[chosen.iter().position(|v| v == "v1").unwrap()];
    let canary_client = &clients[chosen.iter().position(|v| v == "v2").unwrap()];
    let always = [("X-Cutover-Canary", "always")];
    let never = [("X-Cutover-Canary", "never")];
    assert_eq!(f.get(0, stable_client, &always).0, "v2");
    assert_eq!(f.get(1, canary_client, &never).0, "v1");

    // The coordinator killed during the pause: the rollout stays at the
    // same step with the same weight, the proxies keep splitting.
    f.cluster.kill_and_restart_coordinator();
    let rollout = f.wait_rollout(&id, Duration::from_secs(30), |r| {
        r["canary"]["awaiting_promotion"] == true
    });
    assert_eq!(rollout["canary"]["step"], 2, "at the pause: {rollout:#}");
    assert_eq!(rollout["canary"]["weight"], 20, "{rollout:#}");
    // An agent killed and restarted: its proxy comes back with the same
    // split, every client in its cohort.
    let agent = f.cluster.pid("agent-1.pid");
    sigkill(agent);
    while running(agent) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let config = f.cluster.path("agent-1.toml").display().to_string();
    f.cluster.restart(
        "cutover-agent",
        &["--config", &config],
        "agent-1.pid",
        "agent-1.log",
    );
    f.cluster.wait_for_nodes(Duration::from_secs(30), |nodes| {
        nodes.len() == 2 && nodes.iter().all(|n| field(n, "status") == "ready")
    });
    f.wait_until_serving(0);
    let mut again: Vec<Client> = clients.iter().take(200).cloned().collect();
    let seen = f.traffic(&mut again);
    assert_eq!(
        one_version_each(&seen),
        chosen[..200],
        "clients changed cohorts across the restarts"
    );
    let rollout = f.rollout(&id);
    assert_eq!(rollout["state"], "running", "{rollout:#}");
    assert_eq!(rollout["canary"]["weight"], 20, "{rollout:#}");

    // Promote: weight 50, then the canary nodes' batch; the stable release
    // stays warm for scale_down_delay, then stops.
    let out = f.cluster.cutover(&["rollout", "promote", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = f.cluster.cutover(&["rollout", "watch", &id]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(f.rollout(&id)["state"], "succeeded");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
    f.wait_sides("v1 kept warm, out of the traffic, until retired", |s| {
        s["weight"] == 0 && s["retire_at"].is_string()
    });
    f.wait_sides("v1 retired", Value::is_null);
    // Everyone is on v2 now, whatever their cohort was.
    let mut sample: Vec<Client> = clients.iter().take(50).cloned().collect();
    let seen = f.traffic(&mut sample);
    assert!(one_version_each(&seen).iter().all(|v| v == "v2"));
}

#[test]
fn an_abort_returns_every_request_to_stable_and_a_sick_canary_rolls_back() {
    let f = Fixture::new();
    let out = f.deploy("v1", "batch = 2");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let half = r#"kind = "canary"
steps = [{ set_weight = 50 }, { pause = {} }]
abort_scale_down_delay = "2s""#;
    let out = f.deploy("v2", half);
    assert_eq!(
        out.status.code(),
        Some(AWAITING_PROMOTION),
        "{}",
        text(&out.stderr)
    );
    let id = newest_id(&f);

    // Cookieless clients from 200 addresses, half of them on the canary,
    // until the first pass after the abort in which all got stable.
    let clients = Client::many(200);
    let pass = |f: &Fixture, canary: &str| -> usize {
        clients
            .iter()
            .enumerate()
            .filter(|(i, c)| f.get(i % 2, c, &[]).0 == canary)
            .count()
    };
    let before = pass(&f, "v2");
    assert!(
        (60..=140).contains(&before),
        "{before} of 200 on the canary"
    );
    let asked = Instant::now();
    let out = f.cluster.cutover(&["rollout", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut passes = 0;
    while pass(&f, "v2") > 0 {
        passes += 1;
        assert!(
            passes < 100,
            "requests still reach the canary after the abort"
        );
    }
    eprintln!(
        "abort at 50%: every request on stable {:?} after the abort was asked ({passes} mixed passes)",
        asked.elapsed()
    );
    let rollout = f.wait_rollout(&id, Duration::from_secs(30), |r| r["state"] == "aborted");
    assert_eq!(rollout["canary"]["weight"], 0, "{rollout:#}");
    // The canary stays up for abort_scale_down_delay (for debugging), out
    // of the traffic, then stops.
    f.wait_sides("the canary out of the traffic", |s| {
        s.is_null() || s["weight"] == 0
    });
    f.wait_sides("the canary retired", Value::is_null);
    assert_eq!(versions(f.port, 2), ["v1", "v1"]);

    // Retried, the aborted deploy starts again from its first step as a
    // new rollout; promoted in full, it ends on v2.
    let out = f.cluster.cutover(&["rollout", "retry", &id, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let retry: Value = serde_json::from_slice(&out.stdout).unwrap();
    let retry_id = retry["id"].as_str().unwrap().to_string();
    assert_ne!(retry_id, id);
    let rollout = f.wait_rollout(&retry_id, Duration::from_secs(60), |r| {
        r["canary"]["awaiting_promotion"] == true
    });
    assert_eq!(rollout["canary"]["weight"], 50, "{rollout:#}");
    let out = f
        .cluster
        .cutover(&["rollout", "promote", &retry_id, "--full"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rollout = f.wait_rollout(&retry_id, Duration::from_secs(60), |r| {
        r["state"] != "running"
    });
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);

    // A canary that turns sick while it takes traffic is rolled back by
    // itself; its clients return to v2.
    let out = f.deploy("v3", half);
    assert_eq!(
        out.status.code(),
        Some(AWAITING_PROMOTION),
        "{}",
        text(&out.stderr)
    );
    let id = newest_id(&f);
    for i in 0..2 {
        let answer = http_get_with(&f.node(i), "/sick", &[("X-Cutover-Canary", "always")]);
        assert_eq!(body(&answer), "now sick");
    }
    let rollout = f.wait_rollout(&id, Duration::from_secs(60), |r| {
        matches!(
            r["state"].as_str(),
            Some("rolled_back" | "failed" | "succeeded" | "aborted")
        )
    });
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert!(
        rollout["error"].to_string().contains("health"),
        "the cause names the health check: {rollout:#}"
    );
    assert_eq!(pass(&f, "v3"), 0, "every client back on v2");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
}
