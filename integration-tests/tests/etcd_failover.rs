//! Two `cutover server` processes on one etcd prefix: one leads, the other
//! follows (it answers its status and refuses the rest, naming the leader). The leader is SIGKILLed in the middle of a
//! rolling rollout under load: the follower takes the lead once the dead
//! one's lease runs out, the agents (which list both) reconnect to it, the
//! rollout ends succeeded with every node on the new release, no request
//! fails, and the CLI (which lists both too) reaches whichever leads.

use std::path::Path;
use std::time::{Duration, Instant};

use cutover_common::identity::Role;
use cutover_integration_tests::cli::{two_builds, Cli};
use cutover_integration_tests::coordinators::{wait_until, ServerProcess};
use cutover_integration_tests::load::Load;
use cutover_integration_tests::{spawn_agent, Cluster, Tuning};

const NODES: [&str; 2] = ["127.0.0.11", "127.0.0.12"];

/// The shop's spec: one web service on both nodes, a batch of one, each
/// node watched 3 s (a rollout long enough to fail over in); its path and
/// the service's port.
fn shop_spec(dir: &Path) -> (String, u16) {
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let spec = dir.join("cutover.toml");
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
min_healthy_time = "3s"
[environments.production]
nodes = {{ env = "production" }}
"#
        ),
    )
    .unwrap();
    (spec.display().to_string(), port)
}

/// Agents on `NODES`, labelled env=production, each listing `coordinators`
/// (expecting `server_name` in their certificate when set).
async fn agents(cluster: &mut Cluster, coordinators: &[String], server_name: Option<&str>) {
    for (i, list) in coordinators.iter().enumerate() {
        let mut config = cluster.agent_config(&format!("node-{}", i + 1));
        config.labels = [("env".to_string(), "production".to_string())].into();
        config.coordinator = list.clone();
        config.server_name = server_name.map(str::to_string);
        cluster.agents.push(spawn_agent(config).await);
    }
}

/// Waits until both agents are connected and ready, as the CLI sees them.
fn wait_for_agents(cli: &Cli, config: &Path) {
    wait_until("both agents connect", Duration::from_secs(30), || {
        let (ok, text) = cli.run(config, &["nodes", "-o", "json"]);
        ok && serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|nodes| {
            nodes.as_array().is_some_and(|n| {
                n.len() == 2
                    && n.iter()
                        .all(|n| n["connected"] == true && n["status"] == "ready")
            })
        })
    });
}

/// Polls `rollout` until it ends; its status.
async fn rollout_end(cli: &Cli, config: &Path, rollout: &str, log: &Path) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (ok, text) = cli.run(config, &["rollout", "status", rollout, "-o", "json"]);
        if ok {
            let status: serde_json::Value = serde_json::from_str(&text).unwrap();
            let state = status["state"].as_str().unwrap_or_default().to_string();
            if !matches!(state.as_str(), "pending" | "running" | "paused") {
                return status;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the rollout did not end after the failover:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every node serves the service's release of `version`.
fn all_on(cli: &Cli, config: &Path, version: &str) {
    let nodes = cli.json(config, &["nodes"]);
    for node in nodes.as_array().unwrap() {
        let release = node["services"][0]["release"].as_str().unwrap_or_default();
        assert!(release.starts_with(&format!("web-{version}-")), "{node}");
    }
}

/// The rollout in production, once its first batch switched (its watch
/// running).
fn mid_batch(cli: &Cli, config: &Path) -> String {
    let rollout = cli.json(config, &["rollout", "list", "--env", "production"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("the first batch switches", Duration::from_secs(30), || {
        let (ok, text) = cli.run(config, &["rollout", "status", &rollout, "-o", "json"]);
        ok && text.contains("batch_switched")
    });
    rollout
}

/// v1 out on both nodes, load through both, and v2 rolling out, its first
/// batch switched.
struct Underway {
    load: Load,
    /// Requests sent when v2 started.
    sent: u64,
    rollout: String,
    spec: String,
    /// v1's artifact.
    v1: String,
}

async fn v2_underway(cli: &Cli, admin: &Path, dir: &Path) -> Underway {
    let (v1, v2) = two_builds(dir);
    let (spec, port) = shop_spec(dir);
    let (ok, text) = cli.deploy(admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "{text}");
    let targets = NODES
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let load = Load::start(targets, "/", 4);
    let sent = load.wait_for_sent(0, 100, "on v1").await;
    let (ok, text) = cli.deploy(admin, &spec, "production", "v2", &v2, &[]);
    assert!(ok, "{text}");
    let rollout = mid_batch(cli, admin);
    Underway {
        load,
        sent,
        rollout,
        spec,
        v1,
    }
}

fn metric(page: &str, name: &str) -> Option<i64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_leader_is_replaced_mid_rollout_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("failover{}/", dir.path().display());
    // The PKI and the agents' settings of an in-process cluster whose own
    // coordinator steps aside for the two processes.
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    cluster.stop_coordinator().await;
    let etcd = cutover_integration_tests::etcd::settings(&prefix);
    let mut first = ServerProcess::start(&cluster, dir.path(), "first", &etcd, None);
    wait_until(
        "the first coordinator leads",
        Duration::from_secs(20),
        || first.leads(),
    );
    let second = ServerProcess::start(&cluster, dir.path(), "second", &etcd, None);
    let both = format!("{},{}", first.url(), second.url());

    // node-2 lists the follower first: refused with the leader's address,
    // it goes there.
    let follower_first = format!("{},{}", second.url(), first.url());
    agents(&mut cluster, &[both.clone(), follower_first], None).await;
    let cli = Cli {
        coordinator: both.clone(),
        dir: dir.path().to_path_buf(),
    };
    let root = cluster.pki.client_files(Role::Operator, "root");
    let admin = cli.config_file("root.toml", &root);
    // An operator who lists only the follower reaches the leader it names.
    let via_follower = Cli {
        coordinator: second.url(),
        dir: dir.path().to_path_buf(),
    }
    .config_file("via-follower.toml", &root);
    wait_for_agents(&cli, &admin);
    assert!(!second.leads(), "two coordinators serve at once");
    // Both answer Prometheus: who acts, and the token of the term.
    let leading = |page: &str| metric(page, "cutover_leading");
    let token = |page: &str| metric(page, "cutover_leader_token").unwrap_or(0);
    wait_until(
        "the follower's page answers",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", second.http)).is_ok(),
    );
    let (first_metrics, second_metrics) = (first.page("/metrics"), second.page("/metrics"));
    assert_eq!(leading(&first_metrics), Some(1), "{first_metrics}");
    assert_eq!(leading(&second_metrics), Some(0), "{second_metrics}");
    let first_token = token(&first_metrics);
    assert!(first_token > 0);
    assert_eq!(token(&second_metrics), first_token, "{second_metrics}");
    let healthz = second.page("/healthz");
    assert!(
        healthz.contains(&format!("following the leader at {}", first.url())),
        "{healthz}"
    );
    // The follower refuses what only a leader does, naming it.
    let refused = cutover_integration_tests::operator_client(&second.url(), &root)
        .await
        .unwrap()
        .list_nodes(cutover_proto::v1::ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused
            .metadata()
            .get(cutover_common::LEADER_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some(first.url().as_str()),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("this coordinator follows"),
        "{refused:?}"
    );
    let nodes = cli.json(&via_follower, &["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(2), "{nodes}");
    // Who leads, since when, the token, and the etcd members, from either.
    let status = cli.json(&admin, &["server", "status"]);
    let coordinators = &status["coordinators"];
    assert_eq!(coordinators[0]["role"], "leading", "{status:#}");
    assert_eq!(coordinators[0]["leader_token"], first_token, "{status:#}");
    assert!(coordinators[0]["since"].is_string(), "{status:#}");
    assert_eq!(coordinators[1]["role"], "following", "{status:#}");
    assert_eq!(
        coordinators[1]["leader"],
        first.url().as_str(),
        "{status:#}"
    );
    assert_eq!(coordinators[1]["leader_token"], first_token, "{status:#}");
    let members = status["store_members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{status:#}");
    assert!(
        members.iter().all(|m| m["healthy"] == true)
            && members.iter().filter(|m| m["raft_leader"] == true).count() == 1,
        "{status:#}"
    );

    let Underway {
        load,
        sent,
        rollout,
        ..
    } = v2_underway(&cli, &admin, dir.path()).await;
    first.kill();
    let took_over = wait_until(
        "the second coordinator takes the lead",
        Duration::from_secs(30),
        || second.leads(),
    );
    println!("leader SIGKILLed; the follower serves after {took_over:?}");
    assert!(
        took_over < Duration::from_secs(20),
        "took over after {took_over:?}"
    );

    let status = rollout_end(&cli, &admin, &rollout, &second.log).await;
    assert_eq!(status["state"], "succeeded", "{status:#}");
    // The dead one is reported, the other leads; exit 0 while one leads.
    let (ok, text) = cli.run(&admin, &["server", "status"]);
    println!("{text}");
    assert!(ok, "{text}");
    let rows: Vec<&str> = text.lines().collect();
    assert!(
        rows[1].starts_with(&first.url()) && rows[1].contains("unreachable"),
        "{text}"
    );
    assert!(
        rows[2].starts_with(&second.url()) && rows[2].contains("leading"),
        "{text}"
    );
    let now = second.page("/metrics");
    assert_eq!(leading(&now), Some(1), "{now}");
    assert!(token(&now) > first_token, "{now}");
    all_on(&cli, &admin, "v2");
    load.wait_for_sent(sent, 100, "after the failover").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
}

/// Three coordinators; the leader runs on a host of its own (a network
/// namespace) and is cut off from every etcd member by iptables in the
/// middle of a rollout under load, its agents and operators still reaching
/// it. It cannot renew its lease and stops acting before another one can
/// be elected; one of the other two leads, the rollout ends succeeded with
/// no failed request, and once the link heals the old leader follows. Then
/// etcd loses its quorum: nobody leads, the nodes serve on, and once the
/// quorum is back a coordinator leads and deploys again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_before_another_leads() {
    use cutover_integration_tests::etcd::EtcdCluster;
    use cutover_integration_tests::netns::NetLab;

    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("partition{}/", dir.path().display());
    let etcd = EtcdCluster::start();
    let net = NetLab::new(1);
    let host = net.host(0);
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    cluster.stop_coordinator().await;
    let cut_off = ServerProcess::start(
        &cluster,
        dir.path(),
        "a",
        &etcd.settings_via(&prefix, host.gateway),
        Some(host),
    );
    wait_until(
        "the coordinator on its own host leads",
        Duration::from_secs(30),
        || cut_off.leads(),
    );
    let others = [
        ServerProcess::start(&cluster, dir.path(), "b", &etcd.settings(&prefix), None),
        ServerProcess::start(&cluster, dir.path(), "c", &etcd.settings(&prefix), None),
    ];
    let all = format!("{},{},{}", cut_off.url(), others[0].url(), others[1].url());
    // The coordinators' certificate names localhost, not the host's address.
    agents(&mut cluster, &[all.clone(), all.clone()], Some("localhost")).await;
    let cli = Cli {
        coordinator: all.clone(),
        dir: dir.path().to_path_buf(),
    };
    let root = cluster.pki.client_files(Role::Operator, "root");
    let admin = cli.config_file_expecting("root.toml", &root, Some("localhost"));
    wait_for_agents(&cli, &admin);
    let old_token = metric(&cut_off.page("/metrics"), "cutover_leader_token").unwrap();

    let Underway {
        load,
        sent,
        rollout,
        spec,
        v1,
    } = v2_underway(&cli, &admin, dir.path()).await;

    for member in &etcd.members {
        host.cut(member.port());
    }
    let cut = Instant::now();
    // Who acts, every 50 ms: the cut-off leader must have stopped before
    // either other one leads.
    let (mut stopped, mut elected) = (None, None);
    while elected.is_none() {
        if stopped.is_none() && !cut_off.leads() {
            stopped = Some(cut.elapsed());
        }
        if others.iter().any(ServerProcess::leads) {
            elected = Some(cut.elapsed());
        }
        assert!(
            cut.elapsed() < Duration::from_secs(40),
            "no other coordinator leads 40 s after the cut:\n{}",
            std::fs::read_to_string(&cut_off.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (stopped, elected) = (stopped, elected.unwrap());
    println!(
        "cut off from etcd: stopped leading after {stopped:?}, another leads after {elected:?}"
    );
    let stopped = stopped.expect("the cut-off leader still led when another one was elected");
    assert!(
        stopped < elected,
        "stopped {stopped:?}, elected {elected:?}"
    );
    assert!(
        stopped < Duration::from_secs(10),
        "stopped after {stopped:?}"
    );
    let log = std::fs::read_to_string(&cut_off.log).unwrap();
    assert!(
        log.contains("could not be renewed in time") || log.contains("no longer leading"),
        "{log}"
    );
    let leader = others.iter().find(|o| o.leads()).unwrap();

    let status = rollout_end(&cli, &admin, &rollout, &leader.log).await;
    assert_eq!(status["state"], "succeeded", "{status:#}");
    all_on(&cli, &admin, "v2");
    let new_token = metric(&leader.page("/metrics"), "cutover_leader_token").unwrap();
    assert!(new_token > old_token, "{new_token} after {old_token}");
    let sent = load.wait_for_sent(sent, 100, "after the failover").await;

    // Healed, the old leader follows the new one.
    host.heal();
    wait_until("the old leader follows", Duration::from_secs(30), || {
        cut_off.answers()
            && cut_off
                .page("/healthz")
                .contains(&format!("following the leader at {}", leader.url()))
    });
    assert!(!cut_off.leads());

    // etcd loses its quorum: no coordinator can prove a lease, so none
    // leads (`server status` says so and exits 1), and the nodes serve on.
    let mut etcd = etcd;
    etcd.members[1].kill();
    etcd.members[2].kill();
    wait_until(
        "every coordinator stops leading",
        Duration::from_secs(30),
        || !leader.leads(),
    );
    let (ok, text) = cli.run(&admin, &["server", "status"]);
    println!("{text}");
    assert!(!ok, "{text}");
    assert!(text.contains("no listed coordinator leads"), "{text}");
    assert!(!text.contains(" leading "), "{text}");
    let sent = load.wait_for_sent(sent, 100, "without a quorum").await;
    // The quorum back, a coordinator leads again and deploys.
    etcd.members[1].start();
    etcd.members[2].start();
    wait_until("a coordinator leads again", Duration::from_secs(60), || {
        cut_off.leads() || others.iter().any(ServerProcess::leads)
    });
    wait_for_agents(&cli, &admin);
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "after the quorum came back: {text}");
    all_on(&cli, &admin, "v1");
    load.wait_for_sent(sent, 100, "after the quorum came back")
        .await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
}

/// A leader deposed without noticing (its lease gone while it was cut off,
/// say) is forced here: the coordinator of the older term keeps running
/// with its fenced store beside the new leader. The agent, which saw the
/// new leader's token, refuses every session the old one offers, and every
/// write the old one tries is refused by etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_reaches_no_agent_and_writes_nothing() {
    use std::sync::Arc;

    use cutover_coordinator::store::{Campaign, EtcdBackend, Store};
    use cutover_coordinator::Coordinator;
    use tokio_util::sync::CancellationToken;

    let dir = tempfile::tempdir().unwrap();
    let settings =
        cutover_integration_tests::etcd::settings(&format!("deposed{}/", dir.path().display()));
    let never = CancellationToken::new();
    let old = Campaign::new(&settings, "https://old:7443")
        .unwrap()
        .win(&never)
        .await
        .unwrap();
    let old_store = Store::new(Arc::new(EtcdBackend::fenced(&settings, &old)));
    let old_token = old.token;
    old.resign().await;
    let new = Campaign::new(&settings, "https://new:7443")
        .unwrap()
        .win(&never)
        .await
        .unwrap();
    assert!(new.token > old_token);
    let new_store = Store::new(Arc::new(EtcdBackend::fenced(&settings, &new)));

    let mut cluster = Cluster::start(0, Tuning::default()).await;
    cluster.stop_coordinator().await;
    let start = |store: Store, data: &str| {
        let config = cutover_integration_tests::coordinator_config(
            cluster.pki.coordinator_files(),
            &dir.path().join(data),
            &Tuning::default(),
        );
        async move {
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            Coordinator::start_with(config, Some(store), grpc, http, CancellationToken::new())
                .await
                .unwrap()
        }
    };
    let leader = start(new_store, "new").await;
    let deposed = start(old_store, "old").await;
    let url = |c: &Coordinator| format!("https://127.0.0.1:{}", c.grpc_addr.port());
    let (leader_url, deposed_url) = (url(&leader), url(&deposed));

    let mut config = cluster.agent_config("node-1");
    config.labels = [("env".to_string(), "production".to_string())].into();
    config.coordinator = format!("{leader_url},{deposed_url}");
    cluster.agents.push(spawn_agent(config).await);
    let root = cluster.pki.client_files(Role::Operator, "root");
    let cli = Cli {
        coordinator: deposed_url.clone(),
        dir: dir.path().to_path_buf(),
    };
    let config_for = |url: &str, name: &str| {
        Cli {
            coordinator: url.to_string(),
            dir: dir.path().to_path_buf(),
        }
        .config_file(name, &root)
    };
    let (via_leader, admin) = (
        config_for(&leader_url, "leader.toml"),
        config_for(&deposed_url, "deposed.toml"),
    );
    let ping = |config: &Path| cli.run(config, &["nodes", "ping", "node-1", "--timeout", "2s"]);
    wait_until(
        "the agent answers the leader",
        Duration::from_secs(20),
        || ping(&via_leader).0,
    );

    // The leader goes away; the agent turns to the other coordinator it
    // lists, of the older term, and refuses it: its sessions end at the
    // welcome, and a command sent on one is never run.
    leader.stop().await.unwrap();
    let watched = Instant::now();
    let mut tries = 0;
    while watched.elapsed() < Duration::from_secs(5) {
        let (ok, text) = ping(&admin);
        assert!(
            !ok,
            "a coordinator of an older term reached the agent: {text}"
        );
        tries += 1;
    }
    assert!(tries >= 2, "{tries} pings");

    let (ok, text) = cli.run_with_input(
        &admin,
        &["secret", "set", "--env", "production", "TOKEN"],
        "x",
    );
    assert!(!ok, "a write of a deposed leader went through: {text}");
    assert!(text.contains("no longer the leader"), "{text}");
    deposed.stop().await.unwrap();
    new.resign().await;
}
