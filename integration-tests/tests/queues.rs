//! Queue depth and worker health through the real `cutover` binary,
//! against a real Redis: jobs pushed in Laravel's payload format show in
//! `cutover queues` and the metrics with the age of the oldest, a real
//! worker process consumes them down to 0, and a paused worker flips
//! `cutover_worker_up` (the alert on it is promtool-tested with the other
//! rules).

use std::time::{Duration, Instant};

use cutover_integration_tests::cli::{cluster_of, Cli};
use cutover_integration_tests::redis::{TestRedis, QUEUE_WORKER};
use cutover_integration_tests::{archive, Cluster};
use serde_json::Value;

/// Waits until `check` holds of `cutover queues --env production`.
async fn wait_for_queues(
    cli: &Cli,
    by: &std::path::Path,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let queues = cli.json(by, &["queues", "--env", "production"]);
        if check(&queues) {
            return queues;
        }
        assert!(Instant::now() < deadline, "{what}: {queues:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn queue<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == name)
        .unwrap_or(&Value::Null)
}

/// The value of the first `series` line (name and labels, as written).
fn metric(cluster: &Cluster, series: &str) -> Option<f64> {
    cluster
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_for_metric(cluster: &Cluster, series: &str, check: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if metric(cluster, series).is_some_and(&check) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {:?}",
            metric(cluster, series)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes the spec of `horizon`, the test queue worker consuming queue
/// `default` of `redis`, paused while the file `pause` exists, each job
/// taking `job_seconds`; `probe` is the body of its `queues` table after
/// the connection. Returns the spec's path.
fn worker_spec(
    dir: &std::path::Path,
    name: &str,
    redis: &TestRedis,
    pause: &std::path::Path,
    job_seconds: &str,
    probe: &str,
) -> String {
    let spec = dir.join(name);
    std::fs::write(
        &spec,
        format!(
            r#"
app = "shop"
[services.horizon]
command = ["python3", "queue_worker.py"]
stop_command = ["python3", "queue_worker.py", "terminate"]
min_healthy_time = "1s"
env = {{ QUEUE_REDIS = "{address}", QUEUE_KEY = "{key}", QUEUE_PAUSE_FILE = "{pause}", JOB_SECONDS = "{job_seconds}" }}
[services.horizon.queues]
redis = "{address}"
prefix = "{prefix}"
interval = "1s"
{probe}
[environments.production]
nodes = {{ env = "production" }}
"#,
            address = redis.address,
            key = redis.queue_key("default"),
            pause = pause.display(),
            prefix = redis.prefix,
        ),
    )
    .unwrap();
    spec.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_and_wait_follow_real_jobs_and_a_paused_worker_is_down() {
    let redis = TestRedis::from_env();
    let cluster = cluster_of(&[("worker-1", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pause = dir.path().join("paused");
    // Paused from the start: the jobs pushed stay until it resumes.
    std::fs::write(&pause, "").unwrap();
    let artifact = archive(
        dir.path(),
        "worker.tar.gz",
        &[("queue_worker.py", QUEUE_WORKER)],
    );
    let spec = worker_spec(
        dir.path(),
        "cutover.toml",
        &redis,
        &pause,
        "0.02",
        r#"names = ["default", "emails"]
status_command = ["python3", "queue_worker.py", "status"]
max_depth = 5
max_wait = "1m""#,
    );
    let (ok, text) = cli.deploy(
        &admin,
        &spec,
        "production",
        "v1",
        &artifact.display().to_string(),
        &["--wait"],
    );
    assert!(ok, "{text}");
    let labels = r#"{app="shop",env="production",service="horizon""#;
    let worker_up = format!(r#"cutover_worker_up{labels},node="worker-1"}}"#);
    // Probed, and read as paused (not merely not probed yet).
    wait_for_queues(&cli, &admin, "the worker reads as paused", |v| {
        v["workers"][0]["status"] == "paused"
    })
    .await;
    wait_for_metric(&cluster, &worker_up, |v| v == 0.0).await;
    wait_for_metric(
        &cluster,
        &format!(r#"cutover_queue_probe_ok{labels},node="worker-1"}}"#),
        |v| v == 1.0,
    )
    .await;

    // Jobs pushed a minute and a half ago (Horizon's pushedAt), and two
    // without a push time (plain Laravel).
    redis.push_jobs("default", 12, Some(90.0));
    redis.push_jobs("emails", 2, None);
    let view = wait_for_queues(&cli, &admin, "the jobs pushed show", |v| {
        queue(v, "default")["waiting"] == 12 && queue(v, "emails")["waiting"] == 2
    })
    .await;
    let oldest = queue(&view, "default")["oldest_age_ms"].as_i64().unwrap();
    assert!((90_000..120_000).contains(&oldest), "{view:#}");
    assert_eq!(
        queue(&view, "emails")["oldest_age_ms"],
        Value::Null,
        "no push time, no age"
    );
    assert_eq!(queue(&view, "default")["max_depth"], 5);
    assert_eq!(view["workers"][0]["status"], "paused", "{view:#}");
    assert_eq!(view["workers"][0]["up"], false);
    let (ok, table) = cli.run(&admin, &["queues", "--env", "production"]);
    assert!(
        ok && table.contains("12 (over)") && table.contains("paused"),
        "{table}"
    );
    wait_for_metric(
        &cluster,
        &format!(r#"cutover_queue_depth{labels},queue="default"}}"#),
        |v| v == 12.0,
    )
    .await;
    let age = metric(
        &cluster,
        &format!(r#"cutover_queue_oldest_job_age_seconds{labels},queue="default"}}"#),
    )
    .unwrap();
    assert!(age >= 90.0, "{age}");
    assert_eq!(
        metric(
            &cluster,
            &format!(r#"cutover_queue_depth_limit{labels},queue="default"}}"#)
        ),
        Some(5.0)
    );

    // The worker resumes: it takes the jobs, down to none, and is up.
    std::fs::remove_file(&pause).unwrap();
    wait_for_queues(&cli, &admin, "the worker took every job", |v| {
        queue(v, "default")["waiting"] == 0
            && queue(v, "emails")["waiting"] == 2
            && v["workers"][0]["status"] == "running"
    })
    .await;
    assert_eq!(redis.cli(&["LLEN", &redis.queue_key("default")]), "0");
    wait_for_metric(&cluster, &worker_up, |v| v == 1.0).await;
    wait_for_metric(
        &cluster,
        &format!(r#"cutover_queue_oldest_job_age_seconds{labels},queue="default"}}"#),
        |v| v == 0.0,
    )
    .await;

    // Paused again: down, as the alert reads it.
    std::fs::write(&pause, "").unwrap();
    wait_for_metric(&cluster, &worker_up, |v| v == 0.0).await;
}

/// Pushes `batch` jobs on queue `name` every 100 ms until `stop`.
fn keep_pushing(
    redis: &TestRedis,
    name: &str,
    batch: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (address, prefix, name) = (
        redis.address.clone(),
        redis.prefix.clone(),
        name.to_string(),
    );
    std::thread::spawn(move || {
        let redis = TestRedis { address, prefix };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            redis.push_jobs(&name, batch, Some(0.0));
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_release_that_takes_no_jobs_fails_its_queue_gate_and_the_old_one_keeps_working() {
    let redis = TestRedis::from_env();
    let cluster = cluster_of(&[("worker-1", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let artifact = archive(
        dir.path(),
        "worker.tar.gz",
        &[("queue_worker.py", QUEUE_WORKER)],
    )
    .display()
    .to_string();
    // Each release pauses on a file of its own: v1 and v2 are stuck, v3
    // works.
    let pause = |release: &str| dir.path().join(format!("paused-{release}"));
    for stuck in ["v1", "v2"] {
        std::fs::write(pause(stuck), "").unwrap();
    }
    let deploy = |version: &str| {
        let spec = worker_spec(
            dir.path(),
            &format!("cutover-{version}.toml"),
            &redis,
            &pause(version),
            "0.005",
            "names = [\"default\"]\ngate = \"3s\"",
        );
        cli.deploy(&admin, &spec, "production", version, &artifact, &["--wait"])
    };
    let serving = || {
        let nodes = cli.json(&admin, &["nodes"]);
        nodes[0]["services"][0]["release"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Nothing waits: the first release passes its gate at its first read.
    let (ok, text) = deploy("v1");
    assert!(ok, "{text}");
    let v1 = serving();
    assert!(v1.contains("v1"), "{v1}");

    // v1 is stuck while jobs keep coming: v2, stuck too, lets them grow.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = keep_pushing(&redis, "default", 3, stop.clone());
    let (ok, text) = deploy("v2");
    assert!(!ok, "{text}");
    assert!(
        text.contains("does not seem to take jobs") || {
            let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
            rollouts.to_string().contains("does not seem to take jobs")
        },
        "{text}"
    );
    assert_eq!(serving(), v1, "the old release keeps working");

    // v3 takes them: the queue shrinks over the gate, v3 replaces v1.
    let (ok, text) = deploy("v3");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pusher.join().unwrap();
    assert!(ok, "{text}");
    assert!(serving().contains("v3"), "{}", serving());
}
