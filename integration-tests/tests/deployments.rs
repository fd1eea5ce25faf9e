//! A deploy of several services as one deployment: one rollout after
//! another in the spec's order; a failing service returns the ones that
//! already switched, so the app ends on one version. Driven through the
//! real `cutover` binary, as an operator saw the mixed fleet.

use std::time::{Duration, Instant};

use cutover_integration_tests::{
    app_archive, body, deploy_request, http_get, Cluster, DevCluster, Tuning,
};
use cutover_proto::v1 as pb;
use serde_json::Value;

/// The dev cluster's web port for this test.
const PORT: u16 = 18_480;

/// Web first by default, then the worker; `worker_command` lets a release
/// of the worker crash.
fn spec(version: &str, worker_command: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{PORT}"
drain_timeout = "1s"
stop_grace = "2s"
[services.web.env]
VERSION = "{version}"
[services.web.health]
path = "/health"
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "5s"

[services.horizon]
command = {worker_command}
stop_command = ["python3", "worker.py", "terminate"]
stop_timeout = "5s"
min_healthy_time = "1s"

[strategy]
batch = 3
min_healthy_time = "300ms"

[environments.local]
nodes = {{ env = "local" }}
"#
    )
}

const WORKER: &str = r#"["python3", "worker.py"]"#;
const CRASHING_WORKER: &str = r#"["python3", "-c", "import sys; sys.exit(3)"]"#;

fn json(output: &std::process::Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn deploy(cluster: &DevCluster, spec_text: &str, version: &str) -> std::process::Output {
    let file = cluster.path(&format!("cutover-{version}.toml"));
    std::fs::write(&file, spec_text).unwrap();
    let (url, _) = app_archive(cluster.dir.path());
    let archive = url.trim_start_matches("file://").to_string();
    cluster.cutover(&[
        "deploy",
        "-f",
        file.to_str().unwrap(),
        "--env",
        "local",
        "--version",
        version,
        "--artifact",
        &archive,
        "--wait",
    ])
}

fn versions() -> Vec<String> {
    (0..3)
        .map(|i| body(&http_get(&format!("127.0.0.{}:{PORT}", 11 + i), "/")).to_string())
        .collect()
}

#[test]
fn a_failing_worker_returns_the_web_tier_so_the_app_ends_on_one_version() {
    let cluster = DevCluster::up(3);
    let first = deploy(&cluster, &spec("v1", WORKER), "v1");
    assert!(
        first.status.success(),
        "{}{}",
        String::from_utf8_lossy(&first.stderr),
        cluster.log_tails()
    );
    assert_eq!(versions(), vec!["v1"; 3]);

    let second = deploy(&cluster, &spec("v2", CRASHING_WORKER), "v2");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("deployment shop-d"), "{stderr}");
    assert!(stderr.contains("rolled_back"), "{stderr}");
    assert!(stderr.contains("web, then horizon"), "{stderr}");

    // Every node serves the web release from before the deployment.
    assert_eq!(versions(), vec!["v1"; 3]);
    let releases = json(&cluster.cutover(&["releases", "web", "--env", "local", "-o", "json"]));
    let current: Vec<&Value> = releases
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["current"] == true)
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["release"]["version"], "v1", "{releases:#}");
    let v2 = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["release"]["version"] == "v2")
        .unwrap();
    assert_eq!(v2["state"], "reverted", "{v2:#}");
    assert!(
        v2["note"].as_str().unwrap().contains("deployment shop-d"),
        "{v2:#}"
    );
    let horizon = json(&cluster.cutover(&["releases", "horizon", "--env", "local", "-o", "json"]));
    let failed = horizon
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["release"]["version"] == "v2")
        .unwrap();
    assert_eq!(failed["state"], "rolled_back", "{failed:#}");
    assert!(!failed["note"].as_str().unwrap().is_empty(), "{failed:#}");
    // The nodes say so in their next heartbeats (the rollback ends on the
    // agents' answers; a heartbeat sent before may still show v2).
    cluster.wait_for_nodes(Duration::from_secs(10), |nodes| {
        nodes.iter().all(|node| {
            node["services"]
                .as_array()
                .unwrap()
                .iter()
                .all(|service| service["release"].as_str().unwrap().contains("-v1-"))
        })
    });

    // The list keeps the deployment's rollouts together, in the order
    // they ran: web's, horizon's, web's rollback.
    let list = json(&cluster.cutover(&["rollout", "list", "-o", "json"]));
    let rows: Vec<(String, String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap().to_string(),
                r["kind"].as_str().unwrap().to_string(),
                r["deployment"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let deployment = rows[0].2.clone();
    assert!(deployment.starts_with("shop-d"), "{rows:?}");
    let kinds: Vec<(&str, &str)> = rows
        .iter()
        .take_while(|r| r.2 == deployment)
        .map(|r| (r.0.as_str(), r.1.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("web", "deploy"),
            ("horizon", "deploy"),
            ("web", "rollback")
        ],
        "{rows:?}"
    );
    let shown = json(&cluster.cutover(&["rollout", "deployment", &deployment, "-o", "json"]));
    assert_eq!(shown["state"], "rolled_back", "{shown:#}");
    let steps: Vec<(&str, &str)> = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["service"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(steps, [("web", "rolled_back"), ("horizon", "failed")]);
    let table = cluster.cutover(&["rollout", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().next().unwrap().contains("DEPLOYMENT"),
        "{table}"
    );

    // The event log says so, newest last, and `--limit` returns the newest.
    let events = json(&cluster.cutover(&["events", "--limit", "3", "-o", "json"]));
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("rolled_back")),
        "{events:#?}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let all = json(&cluster.cutover(&["events", "--limit", "10000", "-o", "json"]));
    let newest = all.as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(seqs.last(), Some(&newest), "the newest events: {seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
}

/// The deployment is stored and its driver re-entrant: a coordinator
/// restarted while the first service rolls out carries on with the next.
/// Meanwhile the deployment holds its services: nobody deploys them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_holds_its_services_and_carries_on_after_a_coordinator_restart() {
    let mut cluster = Cluster::start(2, Tuning::default()).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == 2 && n.iter().all(|n| n.connected)
        })
        .await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    // Web's batches are watched for 2 s each: time to restart in.
    let text = format!(
        r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"
[services.horizon]
command = ["python3", "worker.py"]
stop_command = ["python3", "worker.py", "terminate"]
min_healthy_time = "300ms"
[strategy]
batch = 1
min_healthy_time = "2s"
[environments.test]
nodes = {{ env = "test" }}
"#
    );
    let mut client = cluster.operator().await;
    let response = client
        .deploy(deploy_request(text.clone(), "v1", &artifact))
        .await
        .unwrap()
        .into_inner();
    let deployment = response.deployment.clone().expect("a deployment").id;
    assert!(response.rollouts.is_empty(), "{response:?}");

    // Its second service is claimed before its turn.
    let mut alone = deploy_request(text.clone(), "v1", &artifact);
    alone.service = "horizon".into();
    let claimed = client.deploy(alone).await.unwrap_err();
    assert_eq!(claimed.code(), tonic::Code::Aborted, "{claimed:?}");
    assert!(
        claimed.message().contains(&deployment),
        "{}",
        claimed.message()
    );

    // Web's rollout runs: restart the coordinator under it.
    let get = |mut client: cutover_proto::v1::operator_service_client::OperatorServiceClient<
        tonic::transport::Channel,
    >,
               id: String| async move {
        client
            .get_deployment(pb::GetDeploymentRequest { id })
            .await
            .map(|d| d.into_inner())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = get(client.clone(), deployment.clone()).await.unwrap();
        if d.steps[0].state().as_str() == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "{d:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restart_coordinator().await;
    let mut client = cluster.operator().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        if let Ok(d) = get(client.clone(), deployment.clone()).await {
            if d.state().as_str() != "running" {
                break d;
            }
        }
        assert!(Instant::now() < deadline, "the deployment did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    let states: Vec<&str> = done.steps.iter().map(|s| s.state().as_str()).collect();
    assert_eq!(states, ["succeeded", "succeeded"], "{done:#?}");
    let nodes = client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    for node in &nodes {
        let mut services: Vec<(&str, &str)> = node
            .services
            .iter()
            .map(|s| (s.service.as_str(), s.release_id.as_str()))
            .collect();
        services.sort();
        assert_eq!(services.len(), 2, "{node:#?}");
        assert!(
            services.iter().all(|(_, r)| r.contains("-v1-")),
            "{node:#?}"
        );
    }
    // Once it ended, its services are free again.
    let mut alone = deploy_request(text, "v2", &artifact);
    alone.service = "horizon".into();
    client.deploy(alone).await.unwrap();
}
