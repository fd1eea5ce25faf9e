//! The coordinator killed with SIGKILL during a rollout's pre-pull, in the
//! middle of a batch and during an automatic rollback, then restarted: each
//! rollout ends consistently, every node on one release, its events
//! complete. Real binaries (`cutover dev up`), driven through the CLI.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use cutover_integration_tests::{app_archive, body, http_get, DevCluster};
use serde_json::Value;

fn spec(port: u16, fail_host: &str) -> String {
    format!(
        r#"app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
drain_timeout = "2s"
stop_grace = "2s"
[services.web.env]
FAIL_HOST = "{fail_host}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_threshold = 2
healthy_deadline = "3s"
[strategy]
batch = 1
min_healthy_time = "1s"
prepare_parallelism = 1
[environments.local]
nodes = {{ env = "local" }}
"#
    )
}

struct Fixture {
    cluster: DevCluster,
    port: u16,
    artifact: (String, String),
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let cluster = DevCluster::up(3);
        let dir = tempfile::tempdir().unwrap();
        let artifact = app_archive(dir.path());
        let port = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[])
            .unwrap();
        Self {
            cluster,
            port,
            artifact,
            _dir: dir,
        }
    }

    fn cli(&self, args: &[&str]) -> Value {
        let output = self.cluster.cutover(args);
        assert!(
            output.status.success(),
            "cutover {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.cluster.log_tails()
        );
        serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
    }

    /// Starts a deploy without waiting; returns the rollout id. Without a
    /// digest the CLI hashes the artifact itself.
    fn deploy(
        &self,
        version: &str,
        (url, digest): (&str, Option<&str>),
        fail_host: &str,
    ) -> String {
        let spec_path = self.cluster.path(&format!("cutover-{version}.toml"));
        std::fs::write(&spec_path, spec(self.port, fail_host)).unwrap();
        let spec_path = spec_path.display().to_string();
        // The version lands in the environment through the spec's env
        // table, so each version is another release.
        let text = std::fs::read_to_string(&spec_path).unwrap().replace(
            "[services.web.env]\n",
            &format!("[services.web.env]\nVERSION = \"{version}\"\n"),
        );
        std::fs::write(&spec_path, text).unwrap();
        let mut args = vec![
            "--output",
            "json",
            "deploy",
            "-f",
            &spec_path,
            "--env",
            "local",
            "--version",
            version,
            "--artifact",
            url,
        ];
        if let Some(digest) = digest {
            args.extend(["--digest", digest]);
        }
        let out = self.cli(&args);
        out["id"].as_str().expect("a rollout id").to_string()
    }

    fn status(&self, id: &str) -> Option<Value> {
        let output = self
            .cluster
            .cutover(&["--output", "json", "rollout", "status", id]);
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).unwrap())
    }

    fn wait(&self, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rollout) = self.status(id) {
                if done(&rollout) {
                    return rollout;
                }
                assert!(
                    Instant::now() < deadline,
                    "not as expected in {timeout:?}: {rollout:#}\n{}",
                    self.cluster.log_tails()
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "no status within {timeout:?}\n{}",
                    self.cluster.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(40));
        }
    }

    fn finish(&self, id: &str) -> Value {
        self.wait(id, Duration::from_secs(90), |r| {
            matches!(
                r["state"].as_str(),
                Some("succeeded" | "failed" | "rolled_back" | "aborted")
            )
        })
    }

    fn versions(&self) -> Vec<String> {
        (11..=13)
            .map(|i| body(&http_get(&format!("127.0.0.{i}:{}", self.port), "/")).to_string())
            .collect()
    }
}

fn kinds(rollout: &Value) -> Vec<String> {
    rollout["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap().to_string())
        .collect()
}

fn count(kinds: &[String], kind: &str) -> usize {
    kinds.iter().filter(|k| *k == kind).count()
}

/// The test app packed with one more file: same app, another digest.
fn other_archive(dir: &Path) -> (std::path::PathBuf, String) {
    let path = cutover_integration_tests::archive(
        dir,
        "other.tar.gz",
        &[
            ("app.py", cutover_integration_tests::APP),
            ("NOTE", "a second build"),
        ],
    );
    let digest = cutover_common::digest::Digest::of_file(&path)
        .unwrap()
        .to_string();
    (path, digest)
}

/// Serves one file over HTTP slowly (about `seconds` per download), so a
/// pre-pull lasts long enough to be interrupted.
fn slow_server(path: &Path, seconds: f64) -> String {
    let bytes = std::fs::read(path).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                let pieces = 20;
                let step = bytes.len().div_ceil(pieces);
                for chunk in bytes.chunks(step) {
                    if stream.write_all(chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs_f64(seconds / pieces as f64));
                }
            });
        }
    });
    format!("http://{addr}/app.tar.gz")
}

#[test]
fn coordinator_sigkill_during_prepull_mid_batch_and_rollback_ends_consistent() {
    let f = Fixture::new();
    let file = (f.artifact.0.as_str(), Some(f.artifact.1.as_str()));
    let v1 = f.deploy("v1", file, "");
    assert_eq!(f.finish(&v1)["state"], "succeeded");
    assert_eq!(f.versions(), vec!["v1"; 3]);

    // 1. During pre-pull: each node's download takes ~1.5 s, one at a time
    // (another archive, so no agent has it cached).
    let (archive, digest) = other_archive(f._dir.path());
    let slow_url = slow_server(&archive, 1.5);
    // No --digest: the CLI downloads it once and pins the release to it.
    let v2 = f.deploy("v2", (&slow_url, None), "");
    f.wait(&v2, Duration::from_secs(20), |r| {
        r["phase"] == "prepare"
            && r["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["state"] == "preparing")
    });
    f.cluster.kill_and_restart_coordinator();
    let done = f.finish(&v2);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(done["release"]["digest"], digest.as_str());
    assert_eq!(f.versions(), vec!["v2"; 3]);
    let k = kinds(&done);
    assert!(k.contains(&"recovered".to_string()), "{k:?}");
    assert_eq!(count(&k, "node_prepared"), 3, "{k:?}");
    assert_eq!(count(&k, "node_switched"), 3, "{k:?}");

    // 2. Mid-batch: after the first node switched.
    let v3 = f.deploy("v3", file, "");
    f.wait(&v3, Duration::from_secs(30), |r| {
        r["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["state"] == "switched")
    });
    f.cluster.kill_and_restart_coordinator();
    let done = f.finish(&v3);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(f.versions(), vec!["v3"; 3]);
    let k = kinds(&done);
    assert_eq!(
        count(&k, "node_switched"),
        3,
        "no node switched twice or skipped: {k:?}"
    );

    // 3. During the automatic rollback: v4 fails health on node-3 after
    // node-1 and node-2 switched.
    let v4 = f.deploy("v4", file, "127.0.0.13");
    f.wait(&v4, Duration::from_secs(60), |r| {
        r["state"] == "rolling_back"
    });
    f.cluster.kill_and_restart_coordinator();
    let done = f.finish(&v4);
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    assert_eq!(done["error"]["node"], "node-3");
    assert_eq!(f.versions(), vec!["v3"; 3]);
    let k = kinds(&done);
    assert_eq!(count(&k, "node_rolled_back"), 2, "{k:?}");
    assert_eq!(k.last().map(String::as_str), Some("rolled_back"));
    let releases = f.cli(&["--output", "json", "releases", "web", "--env", "local"]);
    let current: Vec<&Value> = releases
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["current"] == true)
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["release"]["version"], "v3");

    // `dev down` takes the apps down with the agents: nothing is left.
    let agents = f.cluster.path("agents");
    let releases = |node: &str| cutover_integration_tests::release_pids(&agents.join(node));
    assert!(!releases("node-1").is_empty(), "node-1 runs its release");
    let down = f.cluster.cutover(&[
        "dev",
        "down",
        "--dir",
        &f.cluster.dir.path().display().to_string(),
    ]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for node in ["node-1", "node-2", "node-3"] {
        assert!(
            releases(node).is_empty(),
            "{node} left its release running: {:?}",
            releases(node)
        );
    }
}

/// The coordinator killed with SIGKILL at 10 moments drawn by a seeded
/// generator, across rollouts that succeed and rollouts that roll back,
/// restarted each time. Every rollout ends, with every node on the release
/// its outcome names, and its timeline complete. The seed is printed;
/// `CUTOVER_CRASH_SEED=N` replays a run.
#[test]
fn coordinator_sigkilled_at_ten_seeded_moments_leaves_every_rollout_consistent() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("CUTOVER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("CUTOVER_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = Fixture::new();
    let file = (f.artifact.0.as_str(), Some(f.artifact.1.as_str()));
    let v1 = f.deploy("v1", file, "");
    assert_eq!(f.finish(&v1)["state"], "succeeded");

    let mut rollouts = Vec::new();
    let mut current: Option<String> = None;
    for kill in 0..10 {
        let running = current
            .as_ref()
            .and_then(|id| f.status(id))
            .is_some_and(|r| {
                !matches!(
                    r["state"].as_str(),
                    Some("succeeded" | "failed" | "rolled_back" | "aborted")
                )
            });
        if !running {
            // One in three fails its health check on node-3: a rollback.
            let version = format!("v{}", kill + 2);
            let fail_host = if rng.random_range(0..3) == 0 {
                "127.0.0.13"
            } else {
                ""
            };
            // Nodes that have not reconnected since the last restart make
            // the deploy refuse, rightly: wait for them.
            let deadline = Instant::now() + Duration::from_secs(30);
            while f
                .cluster
                .nodes_json()
                .iter()
                .any(|n| n["connected"] != true || n["status"] != "ready")
            {
                assert!(Instant::now() < deadline, "nodes did not come back");
                std::thread::sleep(Duration::from_millis(100));
            }
            let id = f.deploy(&version, file, fail_host);
            rollouts.push((id.clone(), version, fail_host.to_string()));
            current = Some(id);
        }
        let after = Duration::from_millis(rng.random_range(0..2500));
        std::thread::sleep(after);
        println!(
            "kill {kill}: {after:?} into {}",
            current.as_deref().unwrap_or("-")
        );
        f.cluster.kill_and_restart_coordinator();
        // Back up before the next move.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f.cluster.cutover(&["nodes"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "the coordinator did not come back"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let mut serving: Option<String> = None;
    for (id, version, fail_host) in &rollouts {
        let done = f.finish(id);
        let state = done["state"].as_str().unwrap().to_string();
        let k = kinds(&done);
        assert_eq!(
            k.first().map(String::as_str),
            Some("started"),
            "seed {seed}, {id}: {k:?}"
        );
        assert_eq!(
            k.last().map(String::as_str),
            Some(state.as_str()),
            "seed {seed}, {id}: {k:?}"
        );
        let expected = match (state.as_str(), fail_host.is_empty()) {
            ("succeeded", true) => done["release"]["id"].clone(),
            ("rolled_back", false) => done["previous_release"]["id"].clone(),
            other => panic!("seed {seed}, {id} ({version}): ended {other:?}: {done:#}"),
        };
        for node in done["nodes"].as_array().unwrap() {
            assert_eq!(node["release"], expected, "seed {seed}, {id}: {done:#}");
        }
        if state == "succeeded" {
            assert_eq!(count(&k, "node_switched"), 3, "seed {seed}, {id}: {k:?}");
            serving = Some(version.clone());
        }
    }
    // What the nodes serve is the last release that succeeded.
    let last = serving.unwrap_or_else(|| "v1".into());
    assert_eq!(f.versions(), vec![last; 3], "seed {seed}");
}
