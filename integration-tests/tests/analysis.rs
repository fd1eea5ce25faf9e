//! Canary analysis on real binaries (`cutover dev up`): the node proxies
//! measure the canary against the stable release (an erroring canary and a
//! slower one fail, too little traffic is inconclusive), a coordinator
//! killed mid-analysis goes on with the same samples, and a real
//! Prometheus and a JSON endpoint gate a canary.

use std::time::{Duration, Instant};

use cutover_integration_tests::canary::{
    analysed_spec, awaits_promotion, newest_id, succeeded, Fixture, Shoppers, ERRORS_ANALYSIS,
};
use cutover_integration_tests::{files_containing, http_get_with, text, versions};
use serde_json::Value;

/// A canary at 50 % measured by the proxies for a few seconds, then a
/// pause for promotion.
const ANALYSED: &str = r#"kind = "canary"
steps = [{ set_weight = 50 }, { analysis = "errors" }, { pause = {} }]
min_healthy_time = "1s"
abort_scale_down_delay = "1s""#;

/// A second metric of `[analysis.errors]` (after `ERRORS_ANALYSIS`'s).
const LATENCY_METRIC: &str = r#"
[[analysis.errors.metrics]]
name = "latency"
condition = "canary_p99 <= 1.2 * stable_p99"
interval = "2s"
count = 2
min_requests = 20
"#;

#[test]
fn the_proxies_analysis_fails_an_erroring_or_slower_canary_and_waits_on_too_little_traffic() {
    let f = Fixture::up();
    let deploy = |version: &str, env: &str| {
        let tail = format!("{ERRORS_ANALYSIS}{LATENCY_METRIC}");
        let spec = analysed_spec(f.port, version, env, ANALYSED, &tail);
        f.cluster.deploy_spec(&spec, version, &["--wait"])
    };
    // Every release takes 20 ms a request, as a real app would.
    let out = deploy("v1", "LATENCY_MS = \"20\"");
    succeeded(&out);

    // Deploys `version` under load; it must end rolled back. The rollout
    // and every answer the shoppers got.
    let rolled_back_under_load = |version: &str, env: &str| {
        let shoppers = Shoppers::start(&f);
        let out = deploy(version, env);
        let answers = shoppers.finish();
        assert!(!out.status.success(), "{}", text(&out.stdout));
        let rollout = f.cluster.newest_rollout();
        assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
        (rollout, answers)
    };

    // v2 fails one request in ten: a sample fails it, and every node
    // returns to v1; no request of a stable client failed.
    let (rollout, answers) =
        rolled_back_under_load("v2", "LATENCY_MS = \"20\"\nFAIL_PERCENT = \"10\"");
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
    let (rollout, answers) = rolled_back_under_load("v3", "LATENCY_MS = \"40\"");
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

#[test]
fn a_coordinator_killed_during_an_analysis_goes_on_with_the_same_run_and_samples() {
    let f = Fixture::up();
    let out = f.deploy("v1", "batch = 2");
    succeeded(&out);
    let three_samples = r#"
[[analysis.errors.metrics]]
name = "success"
condition = "canary_success_rate >= 0.99"
interval = "2s"
count = 3
min_requests = 20
"#;
    let spec = analysed_spec(f.port, "v2", "", ANALYSED, three_samples);
    let shoppers = Shoppers::start(&f);
    let out = f.cluster.deploy_spec(&spec, "v2", &[]);
    succeeded(&out);
    let id = newest_id(&f);
    let samples = |r: &Value| {
        r["analysis"][0]["metrics"][0]["samples"]
            .as_array()
            .map_or(0, Vec::len)
    };
    // Killed once the run has a sample, restarted at once.
    f.wait_rollout(&id, Duration::from_secs(60), |r| samples(r) >= 1);
    f.cluster.kill_and_restart_coordinator();
    let rollout = f.wait_rollout(&id, Duration::from_secs(90), |r| {
        r["canary"]["awaiting_promotion"] == true || r["state"] != "running"
    });
    let answers = shoppers.finish();
    assert_eq!(rollout["canary"]["awaiting_promotion"], true, "{rollout:#}");
    let runs = rollout["analysis"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "one run for the step: {rollout:#}");
    assert_eq!(runs[0]["state"], "successful", "{rollout:#}");
    // Three samples, each its own window, none taken twice.
    let at: Vec<&str> = runs[0]["metrics"][0]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["at"].as_str().unwrap())
        .collect();
    assert_eq!(at.len(), 3, "{rollout:#}");
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "no request failed across the restart"
    );
    let out = f.cluster.cutover(&["rollout", "abort", &id]);
    succeeded(&out);
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

/// The key the status endpoint wants in `X-Api-Key`.
const STATUS_KEY: &str = "k3y-only-in-the-secret-store";

/// A status endpoint answering `{"data": {"errors": N}}` with the number
/// in `errors` to requests carrying `STATUS_KEY` (401 otherwise), on its
/// own thread for the rest of the test process.
fn status_endpoint(errors: std::sync::Arc<std::sync::atomic::AtomicU64>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let (mut line, mut keyed) = (String::new(), false);
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                keyed |= line
                    .trim_end()
                    .eq_ignore_ascii_case(&format!("x-api-key: {STATUS_KEY}"));
                line.clear();
            }
            let (status, body) = match keyed {
                true => (
                    "200 OK",
                    format!(
                        "{{\"data\":{{\"errors\":{}}}}}",
                        errors.load(std::sync::atomic::Ordering::Relaxed)
                    ),
                ),
                false => ("401 Unauthorized", "{}".to_string()),
            };
            let _ = write!(
                &stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    address
}

#[test]
fn prometheus_and_web_analysis_gate_a_canary() {
    let f = Fixture::up();
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
headers = {{ X-Api-Key = {{ secret = "STATUS_KEY" }} }}
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

    // The endpoint's key is a secret of the environment: read for each
    // measurement, never stored with the rollout.
    let set = f.cluster.cutover_with_input(
        &["secret", "set", "--env", "local", "STATUS_KEY"],
        STATUS_KEY,
    );
    assert!(set.status.success(), "{}", text(&set.stderr));

    // Both pass: the canary goes on to its pause.
    let out = deploy("v2");
    awaits_promotion(&out);
    let rollout = f.cluster.newest_rollout();
    let run = &rollout["analysis"][0];
    assert_eq!(run["state"], "successful", "{rollout:#}");
    assert_eq!(run["metrics"][0]["samples"][0]["values"]["result"], 2.0);
    assert_eq!(run["metrics"][1]["samples"][0]["values"]["result"], 0.0);
    let id = rollout["id"].as_str().unwrap().to_string();
    let found = files_containing(f.cluster.dir.path(), STATUS_KEY.as_bytes());
    assert!(found.is_empty(), "the key is in {found:?}");
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
