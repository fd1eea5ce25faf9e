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

/// Panics with its output unless the command exited 0.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Panics with its output unless `deploy --wait` or `rollout watch` stopped
/// at a canary waiting for promotion.
fn awaits_promotion(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(AWAITING_PROMOTION),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

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
    succeeded(&out);

    let out = f.deploy("v2", CANARY_20);
    awaits_promotion(&out);
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
    succeeded(&out);
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
    succeeded(&out);
    let half = r#"kind = "canary"
steps = [{ set_weight = 50 }, { pause = {} }]
abort_scale_down_delay = "2s""#;
    let out = f.deploy("v2", half);
    awaits_promotion(&out);
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
    awaits_promotion(&out);
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

/// The app spec of the analysis tests: `dev_spec` with release
/// environment lines `env` (LATENCY_MS, FAIL_PERCENT) and `tail` after it
/// (the `[analysis]` tables).
fn analysed_spec(port: u16, version: &str, env: &str, strategy: &str, tail: &str) -> String {
    dev_spec(port, version, strategy, tail).replace(
        "[services.web.env]\n",
        &format!("[services.web.env]\n{env}\n"),
    )
}

/// A canary at 50 % measured by the proxies for a few seconds, then a
/// pause for promotion.
const ANALYSED: &str = r#"kind = "canary"
steps = [{ set_weight = 50 }, { analysis = "errors" }, { pause = {} }]
min_healthy_time = "1s"
abort_scale_down_delay = "1s""#;

const ERRORS_AND_LATENCY: &str = r#"
[[analysis.errors.metrics]]
name = "success"
condition = "canary_success_rate >= 0.99"
interval = "2s"
count = 2
min_requests = 20

[[analysis.errors.metrics]]
name = "latency"
condition = "canary_p99 <= 1.2 * stable_p99"
interval = "2s"
count = 2
min_requests = 20
"#;

/// Clients from 200 addresses (half of them in the canary's cohort) sending
/// requests on 4 connections until stopped: the status and version of each
/// answer.
struct Shoppers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<(u16, String)>>>,
}

impl Shoppers {
    fn start(f: &Fixture) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|t| {
                let stop = stop.clone();
                let node = f.node(t % 2);
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

    fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("a shopper thread"))
            .collect()
    }
}

#[test]
fn the_proxies_analysis_fails_an_erroring_or_slower_canary_and_waits_on_too_little_traffic() {
    let f = Fixture::new();
    let deploy = |version: &str, env: &str| {
        let spec = analysed_spec(f.port, version, env, ANALYSED, ERRORS_AND_LATENCY);
        f.cluster.deploy_spec(&spec, version, &["--wait"])
    };
    // Every release takes 20 ms a request, as a real app would.
    let out = deploy("v1", "LATENCY_MS = \"20\"");
    succeeded(&out);

    // v2 fails one request in ten: the first sample fails it, and every
    // node returns to v1; no request of a stable client failed.
    let shoppers = Shoppers::start(&f);
    let out = deploy("v2", "LATENCY_MS = \"20\"\nFAIL_PERCENT = \"10\"");
    let answers = shoppers.finish();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let rollout = f.cluster.newest_rollout();
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let error = rollout["error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "analysis errors failed: metric success (proxy): `canary_success_rate >= 0.99` failed"
        ) && error.contains("last sample: canary_requests=")
            && (error.contains("canary_success_rate=0.8")
                || error.contains("canary_success_rate=0.9")),
        "the verdict names the metric, its values and the condition: {error}"
    );
    assert_eq!(rollout["analysis"][0]["state"], "failed", "{rollout:#}");
    let stable_failed = answers
        .iter()
        .filter(|(s, v)| *s != 200 && v != "failed")
        .count();
    let canary_failed = answers.iter().filter(|(_, v)| v == "failed").count();
    eprintln!(
        "erroring canary: {} requests, {canary_failed} failed by the canary, {stable_failed} others failed",
        answers.len()
    );
    assert_eq!(stable_failed, 0, "a stable client's request failed");
    assert!(canary_failed > 0, "the canary served some requests");
    assert_eq!(versions(f.port, 2), ["v1", "v1"]);

    // v3 answers every request, but twice as slowly: the latency
    // condition fails it.
    let shoppers = Shoppers::start(&f);
    let out = deploy("v3", "LATENCY_MS = \"40\"");
    let answers = shoppers.finish();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let rollout = f.cluster.newest_rollout();
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let error = rollout["error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.contains("metric latency (proxy): `canary_p99 <= 1.2 * stable_p99` failed"),
        "{error}"
    );
    assert!(answers.iter().all(|(s, _)| *s == 200), "no request failed");

    // Without traffic there is no verdict: the analysis is inconclusive
    // and the rollout waits for a person (exit code 3), not promoted.
    let out = deploy("v4", "LATENCY_MS = \"20\"");
    awaits_promotion(&out);
    let rollout = f.cluster.newest_rollout();
    assert_eq!(
        rollout["analysis"][0]["state"], "inconclusive",
        "{rollout:#}"
    );
    let note = rollout["analysis"][0]["metrics"][0]["samples"][0]["note"].to_string();
    assert!(note.contains("fewer than min_requests 20"), "{note}");
    let status = f
        .cluster
        .cutover(&["rollout", "status", rollout["id"].as_str().unwrap()]);
    assert!(
        text(&status.stdout).contains("analysis  errors (step 2) inconclusive"),
        "{}",
        text(&status.stdout)
    );
    let out = f
        .cluster
        .cutover(&["rollout", "abort", rollout["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A real Prometheus (Debian's `prometheus`) scraping the coordinator every
/// second; stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(metrics_url: &str) -> Self {
        let target = metrics_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("a host and port")
            .to_string();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: coordinator\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(50000..=54999), &[])
            .unwrap();
        let address = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus runs (Debian package prometheus; scripts/test.sh installs it)");
        let prometheus = Prometheus {
            child,
            address,
            _dir: dir,
        };
        prometheus.wait_for_ready_nodes(2);
        prometheus
    }

    /// Waits until a query sees `n` ready nodes: it scraped the
    /// coordinator at least once.
    fn wait_for_ready_nodes(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let query = "/api/v1/query?query=sum(cutover_nodes%7Bstatus%3D%22ready%22%7D)";
        loop {
            let answer = std::net::TcpStream::connect(&self.address)
                .ok()
                .map(|_| http_get_with(&self.address, query, &[]));
            if answer
                .as_deref()
                .is_some_and(|a| a.contains(&format!("\"{n}\"]")))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape the coordinator within 60 s: {answer:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A status endpoint answering `{"data": {"errors": N}}` with the number
/// in `errors`, on its own thread for the rest of the test process.
fn status_endpoint(errors: std::sync::Arc<std::sync::atomic::AtomicU64>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = format!(
                "{{\"data\":{{\"errors\":{}}}}}",
                errors.load(std::sync::atomic::Ordering::Relaxed)
            );
            let _ = write!(
                &stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    address
}

#[test]
fn prometheus_and_web_analysis_gate_a_canary() {
    let f = Fixture::new();
    let out = f.deploy("v1", "batch = 2");
    succeeded(&out);
    let metrics_url = f
        .cluster
        .env()
        .find(|(k, _)| *k == "CUTOVER_METRICS_URL")
        .map(|(_, v)| v.to_string())
        .expect("dev up exports CUTOVER_METRICS_URL");
    let prometheus = Prometheus::start(&metrics_url);
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let status = status_endpoint(errors.clone());
    let outside = format!(
        r#"
[[analysis.outside.metrics]]
name = "ready_nodes"
provider = "prometheus"
address = "http://{}"
query = 'sum(cutover_nodes{{status="ready"}})'
condition = "result >= 2"
interval = "1s"
count = 2

[[analysis.outside.metrics]]
name = "status"
provider = "web"
url = "http://{status}/api/status"
json_path = "$.data.errors"
condition = "result < 5"
interval = "1s"
count = 2
"#,
        prometheus.address
    );
    let strategy = r#"kind = "canary"
steps = [{ set_weight = 10 }, { analysis = "outside" }, { pause = {} }]
min_healthy_time = "1s""#;
    let deploy = |version: &str| {
        let spec = analysed_spec(f.port, version, "", strategy, &outside);
        f.cluster.deploy_spec(&spec, version, &["--wait"])
    };

    // Both pass: the canary goes on to its pause.
    let out = deploy("v2");
    awaits_promotion(&out);
    let rollout = f.cluster.newest_rollout();
    let run = &rollout["analysis"][0];
    assert_eq!(run["state"], "successful", "{rollout:#}");
    assert_eq!(run["metrics"][0]["samples"][0]["values"]["result"], 2.0);
    assert_eq!(run["metrics"][1]["samples"][0]["values"]["result"], 0.0);
    let id = rollout["id"].as_str().unwrap().to_string();
    let out = f.cluster.cutover(&["rollout", "promote", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = f.cluster.cutover(&["rollout", "watch", &id]);
    assert!(out.status.success(), "{}", text(&out.stdout));

    // The status endpoint reports errors: the web metric fails v3.
    errors.store(10, std::sync::atomic::Ordering::Relaxed);
    let out = deploy("v3");
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let rollout = f.cluster.newest_rollout();
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let error = rollout["error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.contains("metric status (web): `result < 5` failed") && error.contains("result=10"),
        "{error}"
    );
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
}
