//! Rollbacks on the fast path, on real binaries (`cutover dev up`, 5
//! nodes, under load): `cutover rollback` returns every node at once to a
//! release that ran there, each health-gated, without the target's
//! batches of one or its 10 s watches; `--careful` keeps them; a node
//! that cannot start the release stays on the newer one, named, and the
//! converger leaves it; a deploy failing in its third batch returns its
//! switched nodes in one pass. (Times for 3 and 50 nodes:
//! integration-tests/bench/rollback.sh.)

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use cutover_integration_tests::canary::{analysed_spec, newest_id, succeeded, Fixture, Shoppers};
use cutover_integration_tests::{text, versions};

/// Batches of one, each watched for 10 s: what a rollback to a release
/// deployed so skips.
const BATCHED: &str = "batch = 1\nmin_healthy_time = \"10s\"";
const QUICK: &str = "batch = \"100%\"\nmin_healthy_time = \"500ms\"";

fn deploy(
    f: &Fixture,
    version: &str,
    env: &str,
    strategy: &str,
    args: &[&str],
) -> std::process::Output {
    let spec = analysed_spec(f.port, version, env, strategy, "");
    f.cluster.deploy_spec(&spec, version, args)
}

fn rollback(f: &Fixture, args: &[&str]) -> std::process::Output {
    let mut all = vec!["rollback", "web", "--env", "local"];
    all.extend_from_slice(args);
    f.cluster.cutover(&all)
}

fn entries<'a>(rollout: &'a Value, kind: &str) -> Vec<&'a Value> {
    rollout["timeline"]
        .as_array()
        .expect("a timeline")
        .iter()
        .filter(|t| t["kind"] == kind)
        .collect()
}

fn at(entry: &Value) -> SystemTime {
    humantime::parse_rfc3339(entry["at"].as_str().expect("a time")).expect("an RFC 3339 time")
}

/// Answers that were not the app's: refused, reset, a proxy's 502.
fn lost(answers: &[(u16, String)]) -> Vec<&(u16, String)> {
    answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect()
}

/// Removes what node `node` keeps of a release whose id starts with
/// `prefix` (its unpacked dir) and every cached artifact: the node has to
/// fetch it again to run it.
fn prune(f: &Fixture, node: usize, prefix: &str) {
    let state = f.cluster.path("agents").join(format!("node-{node}"));
    for entry in std::fs::read_dir(state.join("releases")).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            std::fs::remove_dir_all(entry.path()).unwrap();
        }
    }
    remove_files(&state.join("artifacts"));
}

fn remove_files(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::remove_file(entry.path()).unwrap();
    }
}

fn current_version(f: &Fixture) -> String {
    let out = f
        .cluster
        .cutover(&["releases", "web", "--env", "local", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let releases: Value = serde_json::from_slice(&out.stdout).unwrap();
    releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .map(|r| r["release"]["version"].as_str().unwrap().to_string())
        .expect("a current release")
}

#[test]
fn a_rollback_returns_every_node_at_once_and_careful_keeps_the_batches() {
    let f = Fixture::with_nodes(5);
    let nodes: Vec<String> = (0..5).map(|i| f.node(i)).collect();
    succeeded(&deploy(&f, "v1", "", BATCHED, &["--wait"]));
    succeeded(&deploy(&f, "v2", "", QUICK, &["--wait"]));
    // node-2 lost v1 to a prune: it fetches it again on the way back.
    prune(&f, 2, "web-v1-");

    let shoppers = Shoppers::at(&nodes);
    let asked = Instant::now();
    succeeded(&rollback(&f, &["--wait"]));
    let returned_in = asked.elapsed();
    assert_eq!(versions(f.port, 5), vec!["v1"; 5]);
    let back = f.rollout(&newest_id(&f));
    assert_eq!(
        (back["kind"].as_str(), back["state"].as_str()),
        (Some("rollback"), Some("succeeded")),
        "{back:#}"
    );
    // One pass sent every node its activation; no batch, no watch.
    let returning = entries(&back, "returning");
    assert_eq!(returning.len(), 1, "{back:#}");
    let message = returning[0]["message"].as_str().unwrap();
    assert!(
        message.contains("node-1, node-2, node-3, node-4, node-5"),
        "{message}"
    );
    assert!(entries(&back, "batch_started").is_empty(), "{back:#}");
    let started = at(entries(&back, "started")[0]);
    let switched = entries(&back, "node_switched");
    assert_eq!(switched.len(), 5, "{back:#}");
    let last_switch = switched.iter().map(|e| at(e)).max().unwrap();
    let to_last_switch = last_switch.duration_since(started).unwrap();
    eprintln!("fast rollback of 5 nodes: last switch {to_last_switch:?} after the start, `--wait` returned after {returned_in:?}");
    // The target's strategy watches each of 5 batches for 10 s: a single
    // watch would take longer than this.
    assert!(
        to_last_switch < Duration::from_secs(10),
        "{to_last_switch:?}: {back:#}"
    );
    let cache = f.cluster.path("agents/node-2/artifacts");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "node-2 fetched v1 again"
    );

    // --careful: the same return in v1's batches of one, each watched.
    succeeded(&deploy(&f, "v3", "", QUICK, &["--wait"]));
    succeeded(&rollback(&f, &["--careful"]));
    let careful = newest_id(&f);
    let watched = f.wait_rollout(&careful, Duration::from_secs(60), |r| {
        entries(r, "batch_started").len() >= 2
    });
    assert!(entries(&watched, "returning").is_empty(), "{watched:#}");
    let first_watch = entries(&watched, "batch_switched")[0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        first_watch.contains("batch 1 of 5") && first_watch.contains("watching it for 10s"),
        "{first_watch}"
    );
    succeeded(&f.cluster.cutover(&["rollout", "abort", &careful]));
    f.wait_rollout(&careful, Duration::from_secs(60), |r| {
        r["state"] == "aborted"
    });

    // node-3 can no longer start v4: no cache, no unpacked dir, and the
    // artifact is gone from the coordinator's store, where it came from.
    // It stays on v5, named; the others return.
    succeeded(&deploy(&f, "v4", "", QUICK, &["--wait"]));
    succeeded(&deploy(&f, "v5", "", QUICK, &["--wait"]));
    prune(&f, 3, "web-v4-");
    remove_files(&f.cluster.path("coordinator/artifacts"));
    let out = rollback(&f, &["--wait"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let failed = f.rollout(&newest_id(&f));
    assert_eq!(failed["state"], "failed", "{failed:#}");
    let end = entries(&failed, "failed").last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        end.contains("1 node did not return") && end.contains("node node-3"),
        "{end}"
    );
    let refused: Vec<&str> = failed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["refused"] == true)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["node-3"], "{failed:#}");
    let refusal = entries(&failed, "node_rollback_failed");
    assert_eq!(refusal.len(), 1, "{failed:#}");
    let why = refusal[0]["message"].as_str().unwrap();
    assert!(
        why.contains("cannot fetch") && why.contains("it serves web-v5-"),
        "{why}"
    );
    assert_eq!(versions(f.port, 5), ["v4", "v4", "v5", "v4", "v4"]);
    // The operator's choice stands: v4 is current, and the converger
    // leaves node-3 on v5 (it would fail the same way).
    assert_eq!(current_version(&f), "v4");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(versions(f.port, 5), ["v4", "v4", "v5", "v4", "v4"]);
    let converges = f.cluster.cutover(&["rollout", "list", "-o", "json"]);
    let list: Value = serde_json::from_slice(&converges.stdout).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|r| r["kind"] != "converge"),
        "{list:#}"
    );
    assert_eq!(f.cluster.metric("cutover_nodes_drifted"), Some(1.0));

    let answers = shoppers.finish();
    assert!(answers.len() > 500, "too little load: {}", answers.len());
    assert!(lost(&answers).is_empty(), "{:?}", lost(&answers));
}

/// A deploy failing its health check in its third batch of one: the two
/// nodes that switched return in one pass, not one batch at a time.
#[test]
fn an_automatic_rollback_returns_the_switched_nodes_at_once() {
    let f = Fixture::with_nodes(5);
    let nodes: Vec<String> = (0..5).map(|i| f.node(i)).collect();
    succeeded(&deploy(&f, "v1", "", QUICK, &["--wait"]));
    let shoppers = Shoppers::at(&nodes);
    let out = deploy(
        &f,
        "v2",
        "FAIL_HOST = \"127.0.0.13\"",
        "batch = 1\nmin_healthy_time = \"3s\"",
        &["--wait"],
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let answers = shoppers.finish();
    let rollout = f.rollout(&newest_id(&f));
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert_eq!(rollout["error"]["node"], "node-3", "{rollout:#}");
    let returning = entries(&rollout, "returning");
    assert_eq!(returning.len(), 1, "{rollout:#}");
    let message = returning[0]["message"].as_str().unwrap();
    assert!(message.ends_with("node-1, node-2"), "{message}");
    assert_eq!(versions(f.port, 5), vec!["v1"; 5]);
    assert!(lost(&answers).is_empty(), "{:?}", lost(&answers));
}
