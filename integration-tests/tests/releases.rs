//! Releases driven through the control plane: the coordinator sends
//! prepare/activate/admission commands down an agent's stream and the agent
//! runs a real app behind its node proxy.

use std::time::Duration;

use cutover_integration_tests::{
    activate, app_archive, body, find, http_get, web_release as release, Cluster, Tuning,
};
use cutover_proto::v1::{self as pb, command, command_result};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_activates_releases_on_an_agent_and_sees_what_runs() {
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let public = format!("127.0.0.11:{port}");

    let (result, steps) = cluster
        .run_command(
            "node-1",
            activate("c1", release("v1", port, &artifact, &[])),
        )
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        result.message
    );
    let Some(command_result::Output::Activated(activated)) = &result.output else {
        panic!("no activation report: {result:?}");
    };
    assert_eq!(activated.release_id, "web-v1");
    assert!(
        activated.upstream.starts_with("127.0.0.11:"),
        "{activated:?}"
    );
    assert_eq!(
        steps,
        [
            "fetching",
            "unpacking",
            "starting",
            "health_checking",
            "smoke_testing",
            "switching"
        ]
    );
    assert_eq!(body(&http_get(&public, "/")), "v1");

    // The node list shows what runs, from the agent's heartbeats.
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(5), |n| {
            n[0].services
                .iter()
                .any(|s| s.release_id == "web-v1" && s.running && s.healthy)
        })
        .await;
    assert_eq!(nodes[0].services[0].listen, public);
    // The proxy's counts for the serving release come with the heartbeats.
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(5), |n| {
            n[0].services[0]
                .traffic
                .as_ref()
                .is_some_and(|t| t.requests >= 1)
        })
        .await;
    let traffic = nodes[0].services[0].traffic.clone().unwrap();
    assert_eq!(traffic.release_id, "web-v1");
    assert_eq!(traffic.by_class[1], traffic.requests, "{traffic:?}");
    assert_eq!(traffic.upstream_failures, 0);

    // A release that never turns healthy is refused; v1 keeps serving.
    let (failed, _) = cluster
        .run_command(
            "node-1",
            activate("c2", release("v2", port, &artifact, &[("HEALTH", "fail")])),
        )
        .await;
    assert_eq!(failed.status, pb::CommandStatus::Failed as i32);
    assert!(
        failed.message.contains("database unreachable")
            && failed.message.contains("web-v1 keeps serving"),
        "{}",
        failed.message
    );
    assert_eq!(body(&http_get(&public, "/")), "v1");

    // A digest that does not match: refused before anything starts.
    let mut tampered = release("v3", port, &artifact, &[]);
    tampered.artifact.as_mut().unwrap().digest = format!("sha256:{}", "0".repeat(64));
    let (mismatch, _) = cluster
        .run_command("node-1", activate("c3", tampered))
        .await;
    assert!(
        mismatch.message.contains("digest mismatch"),
        "{}",
        mismatch.message
    );

    // A cutover to v4 under the same command id twice runs once.
    let (v4, _) = cluster
        .run_command(
            "node-1",
            activate("c4", release("v4", port, &artifact, &[])),
        )
        .await;
    assert_eq!(
        v4.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        v4.message
    );
    let (again, steps) = cluster
        .run_command(
            "node-1",
            activate("c4", release("v4", port, &artifact, &[])),
        )
        .await;
    assert!(again.replayed && steps.is_empty(), "{again:?} {steps:?}");
    assert_eq!(body(&http_get(&public, "/")), "v4");

    // Drain: the readiness path turns 503, traffic is still served.
    let drain = pb::Command {
        command_id: "c5".into(),
        kind: Some(command::Kind::SetAdmission(pb::SetAdmission {
            service: String::new(),
            admitted: false,
        })),
    };
    let (drained, _) = cluster.run_command("node-1", drain).await;
    assert_eq!(
        drained.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        drained.message
    );
    assert!(http_get(&public, "/_cutover/ready").starts_with("HTTP/1.1 503"));
    assert_eq!(body(&http_get(&public, "/")), "v4");
    cluster
        .wait_for_nodes(Duration::from_secs(5), |n| {
            n[0].services.iter().any(|s| !s.admitted)
        })
        .await;

    let (state, _) = cluster
        .run_command(
            "node-1",
            pb::Command {
                command_id: "c6".into(),
                kind: Some(command::Kind::ReportState(pb::ReportState {})),
            },
        )
        .await;
    let Some(command_result::Output::NodeState(state)) = state.output else {
        panic!("no state");
    };
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        (
            state.services[0].release_id.as_str(),
            state.services[0].admitted
        ),
        ("web-v4", false)
    );

    let stop = pb::Command {
        command_id: "c7".into(),
        kind: Some(command::Kind::StopService(pb::StopService {
            service: "web".into(),
            remove: false,
        })),
    };
    let (stopped, _) = cluster.run_command("node-1", stop).await;
    assert_eq!(
        stopped.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        stopped.message
    );
    // Its port is free: clients are refused, the port can be bound.
    let refused = std::net::TcpStream::connect(&public);
    assert!(refused.is_err(), "{refused:?}");
    std::net::TcpListener::bind(&public).expect("a stopped service's port is free");
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    assert!(find(&nodes, "node-1").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_or_a_missing_command_is_refused_and_changes_nothing() {
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());

    // Something else already listens on the service's public port.
    let squatter = std::net::TcpListener::bind("127.0.0.11:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let (result, _) = cluster
        .run_command(
            "node-1",
            activate("a1", release("v1", taken, &artifact, &[])),
        )
        .await;
    assert_eq!(result.status, pb::CommandStatus::Failed as i32);
    assert!(
        result
            .message
            .contains("another process listens there; `ss -ltnp")
            && result.message.contains(&taken.to_string()),
        "{}",
        result.message
    );

    // A command that is not in the release (nor on PATH).
    let port = std::net::TcpListener::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut missing = release("v2", port, &artifact, &[]);
    missing.command = vec!["./bin/server".into()];
    let (result, _) = cluster.run_command("node-1", activate("a2", missing)).await;
    assert_eq!(result.status, pb::CommandStatus::Failed as i32);
    assert!(
        result.message.contains("./bin/server")
            && result.message.contains("is neither in the release")
            && result.message.contains("check `command` in the spec"),
        "{}",
        result.message
    );
    // A first release that fails leaves nothing behind: the port is free
    // and the node reports no service.
    std::net::TcpListener::bind(("127.0.0.11", port)).expect("the public port was released");
    // What the node reports after the failure, not after a pause: the
    // second heartbeat received from now on (the first may have been
    // built before the command ended).
    let mut after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes = cluster
            .wait_for_nodes(Duration::from_secs(20), |n| {
                n.first().is_some_and(|n| n.last_seen_ms > after)
            })
            .await;
        after = nodes[0].last_seen_ms;
    }
    assert!(nodes[0].services.is_empty(), "{:?}", nodes[0].services);
}

/// `cutover ARGS` (the real binary) as operator "tester" of this cluster.
fn cutover_cli(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    let files = cluster
        .pki
        .client_files(cutover_common::identity::Role::Operator, "tester");
    std::process::Command::new(cutover_integration_tests::bin("cutover"))
        .args(args)
        .env("CUTOVER_COORDINATOR", cluster.url())
        .env("CUTOVER_CA_CERT", &files.ca_cert)
        .env("CUTOVER_CERT", &files.cert)
        .env("CUTOVER_KEY", &files.key)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_pushed_to_the_coordinator_is_fetched_by_the_agent() {
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (file_url, digest) = app_archive(dir.path());
    let file = file_url.strip_prefix("file://").unwrap().to_string();

    let pushed = cutover_cli(&cluster, &["artifact", "push", &file, "--output", "json"]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let pushed: serde_json::Value = serde_json::from_slice(&pushed.stdout).unwrap();
    assert_eq!(pushed["digest"], digest.as_str());
    assert_eq!(pushed["already_present"], false);
    let again = cutover_cli(&cluster, &["artifact", "push", &file, "--output", "json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["already_present"], true);

    // A wrong expected digest is refused and stores nothing new.
    let wrong = format!("sha256:{}", "1".repeat(64));
    let refused = cutover_cli(&cluster, &["artifact", "push", &file, "--digest", &wrong]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("digest mismatch"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The original file is gone: the agent can only get it from the coordinator.
    std::fs::remove_file(&file).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let from_store = ("coordinator:".to_string(), digest.clone());
    let (result, steps) = cluster
        .run_command(
            "node-1",
            activate("p1", release("v1", port, &from_store, &[])),
        )
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        result.message
    );
    assert!(steps.contains(&"fetching".to_string()));
    assert_eq!(body(&http_get(&format!("127.0.0.11:{port}"), "/")), "v1");

    // A digest the store does not hold: a clear error naming the fix.
    let missing = (
        "coordinator:".to_string(),
        format!("sha256:{}", "2".repeat(64)),
    );
    let (result, _) = cluster
        .run_command("node-1", activate("p2", release("v2", port, &missing, &[])))
        .await;
    assert!(
        result.message.contains("cutover artifact push"),
        "{}",
        result.message
    );
    assert_eq!(body(&http_get(&format!("127.0.0.11:{port}"), "/")), "v1");
}
