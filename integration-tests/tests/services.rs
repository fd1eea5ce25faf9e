//! `cutover service stop|start|remove` through the real binaries, two
//! `cutover-agent` processes and a deployer's CLI: a stopped service frees
//! its port on every node and stays stopped across an agent restart and
//! the converger's passes; a node that was away during the stop is stopped
//! when it comes back; what would start it by the way (a rollback, a scale)
//! is refused; `start` brings back its current release, a deploy a new one;
//! a removal leaves no current release and nothing on the nodes. Bad input
//! changes nothing.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use cutover_integration_tests::cli::{two_builds, Cli};
use cutover_integration_tests::{find, get_when_up, ready, Cluster, Tuning};
use serde_json::Value;

const NODES: [&str; 2] = ["127.0.0.11", "127.0.0.12"];

/// Whether `addr` is free: nothing accepts there, and it can be bound.
fn free(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_err()
        && TcpListener::bind(addr).is_ok()
}

/// `addr` answers 200 (once it is up).
async fn serves(addr: &str) {
    let response = get_when_up(addr).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{addr}: {response}");
}

async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_connected(cluster: &Cluster) {
    cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            ["node-1", "node-2"]
                .iter()
                .all(|name| find(n, name).is_some_and(ready))
        })
        .await;
}

/// The current release of web in production, if any.
fn current(cli: &Cli, config: &std::path::Path) -> Option<String> {
    let releases = cli.json(config, &["releases", "web", "--env", "production"]);
    releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .map(|r| r["release"]["id"].as_str().unwrap().to_string())
}

/// The rollouts of web, newest first.
fn rollouts(cli: &Cli, config: &std::path::Path) -> Vec<Value> {
    cli.json(config, &["rollout", "list", "--service", "web"])
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_stops_everywhere_starts_again_and_is_removed() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let mut node_1 = cluster.spawn_agent_binary("node-1");
    let mut node_2 = cluster.spawn_agent_binary("node-2");
    wait_connected(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let dana = cli.operator(&admin, "dana", "production");
    let sam = cli.operator(&admin, "sam", "staging");
    let (v1, v2) = two_builds(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let public: Vec<String> = NODES.iter().map(|ip| format!("{ip}:{port}")).collect();
    let spec = dir.path().join("cutover.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"
[strategy]
batch = 1
min_healthy_time = "200ms"
[environments.production]
nodes = {{ env = "test" }}
"#
        ),
    )
    .unwrap();
    let spec = spec.display().to_string();
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "{text}");
    let release = current(&cli, &admin).expect("v1 is current");
    for addr in &public {
        serves(addr).await;
    }

    // Bad input changes nothing: a service that never ran there, a role
    // for another environment, a removal not confirmed, a break of glass
    // without a reason.
    let refusals = [
        (
            cli.run(&dana, &["service", "stop", "wbe", "--env", "production"]),
            "wbe has no release in environment production, so there is nothing to stop",
        ),
        (
            cli.run(&sam, &["service", "stop", "web", "--env", "production"]),
            "stop_service needs the deployer role for environment production, or admin: ask an admin",
        ),
        (
            cli.run(&dana, &["service", "remove", "web", "--env", "production"]),
            "run it again with --yes",
        ),
        (
            cli.run(&dana, &["service", "start", "web", "--env", "production"]),
            "web in production is not stopped: it runs",
        ),
    ];
    for ((ok, text), says) in refusals {
        assert!(!ok && text.contains(says), "{says}: {text}");
    }
    for addr in &public {
        serves(addr).await;
    }

    // node-2 is away (its agent killed, its release running on) when
    // dana stops the service: node-1 stops, node-2 is skipped.
    let state_2 = node_2.state_dir.clone();
    node_2.kill();
    cluster
        .wait_for_nodes(Duration::from_secs(30), |n| {
            find(n, "node-2").is_some_and(|n| !n.connected)
        })
        .await;
    let (ok, text) = cli.run(
        &dana,
        &[
            "service",
            "stop",
            "web",
            "--env",
            "production",
            "--reason",
            "card processor outage",
            "--wait",
        ],
    );
    assert!(ok, "{text}");
    let stop = &rollouts(&cli, &admin)[0];
    assert_eq!(stop["kind"], "stop", "{stop:#}");
    assert_eq!(stop["state"], "succeeded", "{stop:#}");
    let timeline = stop["timeline"].to_string();
    assert!(
        timeline.contains("dana asked to stop web: card processor outage")
            && timeline.contains("unreachable at the start: node-2; the converger stops the service there once it is back"),
        "{timeline}"
    );
    assert!(free(&public[0]), "node-1's port is free");
    assert!(node_1.release_pids().is_empty(), "nothing runs on node-1");
    assert_eq!(
        current(&cli, &admin).as_deref(),
        Some(release.as_str()),
        "a stopped service keeps its current release"
    );

    // Back, node-2's agent adopts the release it left running, and the
    // converger stops it there.
    assert!(!cutover_integration_tests::release_pids(&state_2).is_empty());
    node_2 = cluster.spawn_agent_binary("node-2");
    wait_until(
        "the converger stops web on node-2",
        Duration::from_secs(60),
        || free(&public[1]) && node_2.release_pids().is_empty(),
    )
    .await;
    let by_converger = rollouts(&cli, &admin)
        .into_iter()
        .find(|r| r["kind"] == "stop" && r["created_by"] == "converger")
        .expect("the converger's stop");
    let nodes = by_converger["nodes"].to_string();
    assert!(
        nodes.contains("node-2") && !nodes.contains("node-1"),
        "{nodes}"
    );

    // What would start it by the way is refused, saying how to start it.
    let refusals = [
        cli.run(&dana, &["rollback", "web", "--env", "production"]),
        cli.run(
            &dana,
            &["scale", "web", "--env", "production", "--instances", "2"],
        ),
    ];
    for (ok, text) in refusals {
        assert!(!ok, "{text}");
        assert!(
            text.contains("web in production is stopped (rollout ")
                && text.contains("`cutover service start web --env production` starts its current release, or deploy a new one"),
            "{text}"
        );
    }

    // Stopped across an agent restart and the converger's passes.
    node_1.kill();
    node_1 = cluster.spawn_agent_binary("node-1");
    wait_connected(&cluster).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(free(&public[0]) && free(&public[1]), "still stopped");
    assert!(node_1.release_pids().is_empty() && node_2.release_pids().is_empty());
    let (ok, text) = cli.run(&dana, &["service", "stop", "web", "--env", "production"]);
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "web in production is stopped already and runs on none of its 2 nodes; nothing to do"
        ),
        "{text}"
    );

    // Started again: its current release, on both nodes.
    let (ok, text) = cli.run(
        &dana,
        &["service", "start", "web", "--env", "production", "--wait"],
    );
    assert!(ok, "{text}");
    for addr in &public {
        serves(addr).await;
    }
    assert_eq!(current(&cli, &admin).as_deref(), Some(release.as_str()));
    let start = &rollouts(&cli, &admin)[0];
    assert_eq!(start["kind"], "deploy");
    assert!(
        start["timeline"].to_string().contains(&format!(
            "dana starts web again with its current release {release}"
        )),
        "{start:#}"
    );

    // Stopped, then a deploy of a new release starts it.
    let (ok, text) = cli.run(
        &dana,
        &["service", "stop", "web", "--env", "production", "--wait"],
    );
    assert!(ok, "{text}");
    let (ok, text) = cli.deploy(&dana, &spec, "production", "v2", &v2, &["--wait"]);
    assert!(ok, "{text}");
    for addr in &public {
        serves(addr).await;
    }
    let v2_release = current(&cli, &admin).expect("v2 is current");
    assert_ne!(v2_release, release);

    // Removed: stopped everywhere, forgotten by the agents, no current
    // release; only a deploy brings it back.
    let (ok, text) = cli.run(
        &dana,
        &[
            "service",
            "remove",
            "web",
            "--env",
            "production",
            "--yes",
            "--wait",
        ],
    );
    assert!(ok, "{text}");
    assert!(free(&public[0]) && free(&public[1]));
    assert_eq!(current(&cli, &admin), None);
    // Their next heartbeats name no service.
    wait_until("no node reports web", Duration::from_secs(30), || {
        let nodes = cli.json(&admin, &["nodes"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|node| node["services"].as_array().is_some_and(Vec::is_empty))
    })
    .await;
    // Their release dirs are pruned, their release logs deleted.
    for state_dir in [&node_1.state_dir, &node_2.state_dir] {
        wait_until(
            "the release dirs are pruned",
            Duration::from_secs(10),
            || {
                std::fs::read_dir(state_dir.join("releases"))
                    .unwrap()
                    .next()
                    .is_none()
            },
        )
        .await;
        assert!(!state_dir.join("logs/web").exists());
    }
    for (ok, text, says) in [
        {
            let (ok, text) = cli.run(&dana, &["service", "start", "web", "--env", "production"]);
            (ok, text, "web has no current release in environment production (never deployed, or removed), so there is nothing to start; deploy it")
        },
        {
            let (ok, text) = cli.run(&dana, &["service", "stop", "web", "--env", "production"]);
            (ok, text, "web in production was removed already (rollout ")
        },
    ] {
        assert!(!ok && text.contains(says), "{says}: {text}");
    }
    let (ok, text) = cli.deploy(&dana, &spec, "production", "v3", &v1, &["--wait"]);
    assert!(ok, "{text}");
    for addr in &public {
        serves(addr).await;
    }
    drop((node_1, node_2));
}

/// A spec of `web` in production listening on `listen` and `also`.
fn moving_spec(dir: &std::path::Path, name: &str, listen: u16, also: &[u16]) -> String {
    let also: Vec<String> = also.iter().map(|p| format!("\":{p}\"")).collect();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{listen}"
also_listen = [{}]
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"
[strategy]
batch = 1
min_healthy_time = "200ms"
[environments.production]
nodes = {{ env = "test" }}
"#,
            also.join(", ")
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_moves_to_another_port_with_both_served_in_between_and_no_failed_request() {
    use cutover_integration_tests::load::Load;
    let cluster = Cluster::start(0, Tuning::default()).await;
    let mut node_1 = cluster.spawn_agent_binary("node-1");
    let node_2 = cluster.spawn_agent_binary("node-2");
    wait_connected(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let (v1, v2) = two_builds(dir.path());
    let range = 40000..=44999;
    let old = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &range, &[]).unwrap();
    let new = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &range, &[old]).unwrap();
    let on = |port: u16| -> Vec<String> { NODES.iter().map(|ip| format!("{ip}:{port}")).collect() };
    let targets = |port: u16| -> Vec<std::net::SocketAddr> {
        on(port).iter().map(|a| a.parse().unwrap()).collect()
    };
    let (ok, text) = cli.deploy(
        &admin,
        &moving_spec(dir.path(), "old.toml", old, &[]),
        "production",
        "v1",
        &v1,
        &["--wait"],
    );
    assert!(ok, "{text}");

    // Bad input changes nothing: the same address twice, an extra address
    // on a worker.
    let twice = moving_spec(dir.path(), "twice.toml", old, &[old]);
    let (ok, text) = cli.deploy(&admin, &twice, "production", "v2", &v2, &["--wait"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("services.web.also_listen") && text.contains("is listed twice"),
        "{text}"
    );

    // First the new port too: served before the old one changes at all.
    let load = Load::start(targets(old), "/", 4);
    let sent = load.wait_for_sent(0, 100, "on the old port").await;
    let (ok, text) = cli.deploy(
        &admin,
        &moving_spec(dir.path(), "both.toml", old, &[new]),
        "production",
        "v2",
        &v2,
        &["--wait"],
    );
    assert!(ok, "{text}");
    load.wait_for_sent(sent, 100, "after the deploy").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    for addr in on(old).iter().chain(&on(new)) {
        serves(addr).await;
    }
    let nodes = cli.json(&admin, &["nodes"]);
    let listen = nodes[0]["services"][0]["listen"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(listen.split(',').count(), 2, "both addresses: {listen}");

    // A restarted agent listens on both again.
    node_1.kill();
    node_1 = cluster.spawn_agent_binary("node-1");
    wait_connected(&cluster).await;
    serves(&on(old)[0]).await;
    serves(&on(new)[0]).await;

    // The load balancer moved: the old port goes, after the cutover, and
    // no request on the new one fails meanwhile.
    let load = Load::start(targets(new), "/", 4);
    let sent = load.wait_for_sent(0, 100, "on the new port").await;
    let (ok, text) = cli.deploy(
        &admin,
        &moving_spec(dir.path(), "new.toml", new, &[]),
        "production",
        "v3",
        &v1,
        &["--wait"],
    );
    assert!(ok, "{text}");
    load.wait_for_sent(sent, 100, "after the second deploy")
        .await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    for addr in on(old) {
        assert!(free(&addr), "{addr} is closed and free");
    }
    for addr in on(new) {
        serves(&addr).await;
    }
    // A rollback returns the release before, and its addresses.
    let (ok, text) = cli.run(
        &admin,
        &["rollback", "web", "--env", "production", "--wait"],
    );
    assert!(ok, "{text}");
    for addr in on(old).iter().chain(&on(new)) {
        serves(addr).await;
    }
    drop((node_1, node_2));
}

/// A blue/green spec of `web` on `listen` alone, the previous release kept
/// warm.
fn blue_green_spec(dir: &std::path::Path, name: &str, listen: u16) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{listen}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"
[strategy]
kind = "blue_green"
auto_promote_after = "1s"
keep_warm = 1
[environments.production]
nodes = {{ env = "test" }}
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// A release kept warm after a move to another port takes its requests
/// back on its own address: the rollback's switch opens it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_back_to_a_release_kept_warm_opens_its_address_again() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let node_1 = cluster.spawn_agent_binary("node-1");
    let node_2 = cluster.spawn_agent_binary("node-2");
    wait_connected(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let (v1, v2) = two_builds(dir.path());
    let range = 40000..=44999;
    let old = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &range, &[]).unwrap();
    let new = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &range, &[old]).unwrap();
    let on = |port: u16| -> Vec<String> { NODES.iter().map(|ip| format!("{ip}:{port}")).collect() };
    let (ok, text) = cli.deploy(
        &admin,
        &blue_green_spec(dir.path(), "old.toml", old),
        "production",
        "v1",
        &v1,
        &["--wait"],
    );
    assert!(ok, "{text}");
    let (ok, text) = cli.deploy(
        &admin,
        &blue_green_spec(dir.path(), "new.toml", new),
        "production",
        "v2",
        &v2,
        &["--wait"],
    );
    assert!(ok, "{text}");
    for addr in on(new) {
        serves(&addr).await;
    }
    for addr in on(old) {
        assert!(free(&addr), "{addr}: v2 dropped it");
    }
    // v1 runs warm: the rollback is a switch in the proxies, and v1's
    // address serves again.
    let (ok, text) = cli.run(
        &admin,
        &["rollback", "web", "--env", "production", "--wait"],
    );
    assert!(ok, "{text}");
    for addr in on(old) {
        serves(&addr).await;
    }
    for addr in on(new) {
        assert!(free(&addr), "{addr}: v1 does not listen there");
    }
    // The nodes' next heartbeats say so.
    wait_until(
        "the nodes report the old address",
        Duration::from_secs(30),
        || {
            let nodes = cli.json(&admin, &["nodes"]);
            nodes.as_array().unwrap().iter().all(|node| {
                node["services"][0]["listen"]
                    .as_str()
                    .is_some_and(|l| l.ends_with(&format!(":{old}")))
            })
        },
    )
    .await;
    drop((node_1, node_2));
}
