//! `cutover logs` as operators meet it, through the real binaries: what a
//! service's releases wrote on each node, each line prefixed with its node
//! and release (stderr lines on stderr), `--since` leaving older lines out,
//! `--follow` showing lines written after it started (a new release's
//! too), and a viewer refused (logs may hold customer data).

use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cutover_integration_tests::{bin, dev_spec, http_get, text, DevCluster};
use serde_json::Value;

/// Each test's web port: tests run at once, and dev clusters share the
/// nodes' loopback addresses.
const LINES_PORT: u16 = 18_520;
const FOLLOW_PORT: u16 = 18_521;

/// Deploys `version` of the test app to both nodes; returns its release id.
fn deploy(cluster: &DevCluster, port: u16, version: &str) -> String {
    let spec = dev_spec(port, version, "batch = 2\nmin_healthy_time = \"200ms\"", "");
    let deployed = cluster.deploy_spec(&spec, version, &["--wait"]);
    assert!(
        deployed.status.success(),
        "{}{}",
        text(&deployed.stderr),
        cluster.log_tails()
    );
    let releases = cluster.cutover(&["releases", "web", "--env", "local", "-o", "json"]);
    let releases: Value = serde_json::from_slice(&releases.stdout).unwrap();
    releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .and_then(|r| r["release"]["id"].as_str())
        .expect("a current release")
        .to_string()
}

/// `cutover logs web --env local ARGS`: (stdout, stderr), checked to
/// have succeeded.
fn logs(cluster: &DevCluster, args: &[&str]) -> (String, String) {
    let mut all = vec!["logs", "web", "--env", "local"];
    all.extend_from_slice(args);
    let out = cluster.cutover(&all);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "cutover {all:?}: {stdout}{stderr}");
    (stdout, stderr)
}

#[test]
fn logs_show_each_nodes_lines_with_node_and_release_and_since_leaves_old_ones_out() {
    let cluster = DevCluster::up(2);
    let release = deploy(&cluster, LINES_PORT, "v1");

    // The app prints where it listens on stdout and logs each request on
    // stderr.
    let (stdout, stderr) = logs(&cluster, &[]);
    for node in ["node-1", "node-2"] {
        let started = format!("{node} {release} | v1 listening on");
        assert!(stdout.contains(&started), "{started:?} in:\n{stdout}");
        let health = format!("{node} {release} | v1 \"GET /health HTTP/1.1\" 200");
        assert!(stderr.contains(&health), "{health:?} in:\n{stderr}");
    }
    let (stdout, stderr) = logs(&cluster, &["--node", "node-2", "--release", &release]);
    assert!(stdout.contains("node-2 "), "{stdout}");
    assert!(
        !stdout.contains("node-1 ") && !stderr.contains("node-1 "),
        "only node-2's: {stdout}{stderr}"
    );

    // A request now, another 8 s later: the first is older than the last
    // 4 s by then (a line's time is when its agent first saw it, within
    // about 2 s). The sleep is the time that has to pass, not a wait for
    // something to happen.
    let node_1 = format!("127.0.0.11:{LINES_PORT}");
    http_get(&node_1, "/marker-old");
    std::thread::sleep(Duration::from_secs(8));
    http_get(&node_1, "/marker-new");
    let (_, recent) = logs(&cluster, &["--since", "4s"]);
    assert!(recent.contains("/marker-new"), "{recent}");
    assert!(!recent.contains("/marker-old"), "left out: {recent}");
    let (_, hour) = logs(&cluster, &["--since", "1h"]);
    assert!(hour.contains("/marker-old") && hour.contains("/marker-new"));

    // JSON: one object a line, both streams.
    let (json, _) = logs(&cluster, &["--since", "4s", "-o", "json"]);
    let marker: Value = json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["text"].as_str().unwrap().contains("/marker-new"))
        .expect("the new marker in JSON");
    assert_eq!(marker["node"], "node-1");
    assert_eq!(marker["release"], release.as_str());
    assert_eq!(marker["stream"], "stderr");
    assert!(marker["time_ms"].as_i64().unwrap() > 0);

    // Mistakes are named, with what to do.
    for (args, expect) in [
        (
            vec!["logs", "web", "--env", "staging"],
            "web has no release in staging",
        ),
        (
            vec!["logs", "web", "--env", "local", "--node", "node-9"],
            "node node-9 does not run web in local",
        ),
        (
            vec!["logs", "web", "--env", "local", "--release", "web-nope"],
            "no kept release \"web-nope\"",
        ),
        (
            vec!["logs", "web", "--env", "local", "--since", "soon"],
            "soon",
        ),
    ] {
        let out = cluster.cutover(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out.stderr).contains(expect),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }

    // A viewer reads the fleet's state, not what the releases wrote.
    let dir = cluster.path("vera");
    let created = cluster.cutover(&[
        "operator",
        "create",
        "vera",
        "--role",
        "viewer",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let refused = std::process::Command::new(bin("cutover"))
        .args(["--cli-config", dir.join("cli.toml").to_str().unwrap()])
        .args(["logs", "web", "--env", "local"])
        .envs(cluster.env())
        .env_remove("CUTOVER_CERT")
        .env_remove("CUTOVER_KEY")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains(
            "operator vera is a viewer; read_logs needs the deployer role for environment local, or admin"
        ),
        "{}",
        text(&refused.stderr)
    );
    assert!(refused.stdout.is_empty(), "no line reached the viewer");

    // Who read which logs is audited, the refusal too.
    let audit = cluster.cutover(&["audit", "-o", "json"]);
    let audit: Value = serde_json::from_slice(&audit.stdout).unwrap();
    let reads: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "read_logs")
        .collect();
    assert!(reads.iter().any(|e| e["outcome"] == "ok"));
    assert!(reads
        .iter()
        .any(|e| e["who"] == "operator/vera"
            && e["outcome"].as_str().unwrap().starts_with("refused")));
}

/// A `cutover logs --follow` running as a child; its output lines,
/// stdout's and stderr's, as they come.
struct Follow {
    child: std::process::Child,
    lines: mpsc::Receiver<(&'static str, String)>,
    /// Every line so far.
    seen: Vec<(&'static str, String)>,
}

impl Follow {
    fn start(cluster: &DevCluster) -> Self {
        let mut child = std::process::Command::new(bin("cutover"))
            .args(["logs", "web", "--env", "local", "--follow"])
            .envs(cluster.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (name, pipe) in [
            ("stdout", Box::new(stdout) as Box<dyn std::io::Read + Send>),
            ("stderr", Box::new(stderr)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    if tx.send((name, line)).is_err() {
                        return;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until a line on `stream` that starts with `prefix` and
    /// contains `text` came (or had come).
    fn wait_for(&mut self, stream: &str, prefix: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let matches = |(on, line): &(&str, String)| {
            *on == stream && line.starts_with(prefix) && line.contains(text)
        };
        while !self.seen.iter().any(matches) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no {stream} line {prefix:?}..{text:?} within 60 s; the last ones: {:?}",
                    &self.seen[self.seen.len().saturating_sub(20)..]
                ),
            }
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn logs_follow_shows_lines_written_after_it_started_a_new_releases_too() {
    let cluster = DevCluster::up(2);
    let v1 = deploy(&cluster, FOLLOW_PORT, "v1");
    let mut follow = Follow::start(&cluster);
    // What was there already comes first: following has begun.
    follow.wait_for("stdout", &format!("node-1 {v1} | "), "v1 listening on");

    http_get(
        &format!("127.0.0.12:{FOLLOW_PORT}"),
        "/written-while-following",
    );
    follow.wait_for(
        "stderr",
        &format!("node-2 {v1} | "),
        "\"GET /written-while-following HTTP/1.1\" 200",
    );

    // A release deployed while following: its lines come too.
    let v2 = deploy(&cluster, FOLLOW_PORT, "v2");
    assert_ne!(v1, v2);
    for node in ["node-1", "node-2"] {
        follow.wait_for("stdout", &format!("{node} {v2} | "), "v2 listening on");
    }
    assert!(
        follow.child.try_wait().unwrap().is_none(),
        "--follow runs until stopped"
    );
}
