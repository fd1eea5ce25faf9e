//! The agent's limits, seen from the coordinator: what it refuses to read,
//! and what it reports of its disk.

use std::time::Duration;

use cutover_agent::artifacts::Digest;
use cutover_integration_tests::{
    activate, app_archive, find, web_release as release, Cluster, Tuning,
};
use cutover_proto::v1 as pb;

fn free_port() -> u16 {
    cutover_common::net::allocate_port([127, 0, 0, 11].into(), &(40000..=44999), &[]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_artifact_outside_the_allowed_dirs_is_refused_naming_the_setting() {
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    // Any file the agent can read, outside the dirs its config allows
    // (the test harness allows the temp dir only, where a checkout may live
    // too), with its right digest.
    let secret = std::path::Path::new("/etc/passwd");
    assert!(!secret.starts_with(std::env::temp_dir()));
    let artifact = (
        format!("file://{}", secret.display()),
        Digest::of_file(secret).unwrap().to_string(),
    );
    let (result, _) = cluster
        .run_command(
            "node-1",
            activate("c1", release("v1", free_port(), &artifact, &[])),
        )
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Failed as i32,
        "{result:?}"
    );
    assert!(
        result.message.contains(&secret.display().to_string())
            && result.message.contains("file_artifact_dirs"),
        "{}",
        result.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_releases_take_reaches_the_node_list() {
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let archive_bytes = std::fs::metadata(artifact.0.trim_start_matches("file://"))
        .unwrap()
        .len();
    let (result, _) = cluster
        .run_command(
            "node-1",
            activate("c1", release("v1", free_port(), &artifact, &[])),
        )
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        result.message
    );
    // The cached archive and the release dir unpacked from it, at least.
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            find(n, "node-1")
                .and_then(|node| node.figures.as_ref())
                .is_some_and(|f| f.release_disk_bytes > 2 * archive_bytes)
        })
        .await;
    let node = find(&nodes, "node-1").unwrap();
    assert!(node.figures.as_ref().unwrap().disk_total_bytes > 0);
}
