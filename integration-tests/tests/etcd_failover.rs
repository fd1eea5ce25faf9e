//! Three `cutover server` processes on one etcd prefix: one leads, the
//! others follow (they answer their status and the reads they keep, and
//! refuse the rest, naming the leader). The leader is SIGKILLed in the
//! middle of a rolling rollout under load: a follower takes the lead once
//! the dead one's lease runs out, the agents (which list all three)
//! reconnect to it, the rollout ends succeeded with every node on the new
//! release and its timeline whole, no request fails, and the CLI (which
//! lists all three too) reaches whichever leads.

use std::path::Path;
use std::time::{Duration, Instant};

use cutover_common::identity::Role;
use cutover_integration_tests::browser::Dashboard;
use cutover_integration_tests::cli::{two_builds, Cli};
use cutover_integration_tests::coordinators::{wait_until, ServerProcess};
use cutover_integration_tests::load::Load;
use cutover_integration_tests::{spawn_agent, Cluster, Tuning};

const NODES: [&str; 3] = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];

/// The shop's spec: one web service on every node, a batch of one, each
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

/// Waits until every agent is connected and ready, as the CLI sees them.
fn wait_for_agents(cli: &Cli, config: &Path) {
    wait_until("every agent connects", Duration::from_secs(30), || {
        let (ok, text) = cli.run(config, &["nodes", "-o", "json"]);
        ok && serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|nodes| {
            nodes.as_array().is_some_and(|n| {
                n.len() == NODES.len()
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

/// Every node serves the service on one release, the same on all, of
/// `version`.
fn all_on(cli: &Cli, config: &Path, version: &str) {
    let nodes = cli.json(config, &["nodes"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), NODES.len(), "{nodes:#?}");
    let mut releases = std::collections::BTreeSet::new();
    for node in nodes {
        let services = node["services"].as_array().unwrap();
        assert_eq!(services.len(), 1, "{node}");
        let release = services[0]["release"].as_str().unwrap_or_default();
        assert!(release.starts_with(&format!("web-{version}-")), "{node}");
        releases.insert(release.to_string());
    }
    assert_eq!(releases.len(), 1, "{releases:?}");
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

/// v1 out on every node, load through all, and v2 rolling out, its first
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
    // coordinator steps aside for the three processes.
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
    let third = ServerProcess::start(&cluster, dir.path(), "third", &etcd, None);
    let (a, b, c) = (first.url(), second.url(), third.url());
    let all = format!("{a},{b},{c}");

    // node-2 and node-3 list a follower first: refused with the leader's
    // address, they go there.
    agents(
        &mut cluster,
        &[all.clone(), format!("{b},{a},{c}"), format!("{c},{b},{a}")],
        None,
    )
    .await;
    let cli = Cli {
        coordinator: all.clone(),
        dir: dir.path().to_path_buf(),
    };
    let root = cluster.pki.client_files(Role::Operator, "root");
    let admin = cli.config_file("root.toml", &root);
    // An operator who lists only a follower reaches the leader it names.
    let via_follower = Cli {
        coordinator: second.url(),
        dir: dir.path().to_path_buf(),
    }
    .config_file("via-follower.toml", &root);
    wait_for_agents(&cli, &admin);
    assert!(
        !second.leads() && !third.leads(),
        "two coordinators serve at once"
    );
    // All answer Prometheus: who acts, and the token of the term.
    let leading = |page: &str| metric(page, "cutover_leading");
    let token = |page: &str| metric(page, "cutover_leader_token").unwrap_or(0);
    wait_until(
        "the followers' pages answer",
        Duration::from_secs(20),
        || second.answers() && third.answers(),
    );
    let first_metrics = first.page("/metrics");
    assert_eq!(leading(&first_metrics), Some(1), "{first_metrics}");
    let first_token = token(&first_metrics);
    assert!(first_token > 0);
    for follower in [&second, &third] {
        let page = follower.page("/metrics");
        assert_eq!(leading(&page), Some(0), "{page}");
        assert_eq!(token(&page), first_token, "{page}");
        let healthz = follower.page("/healthz");
        assert!(
            healthz.contains(&format!("following the leader at {a}")),
            "{healthz}"
        );
    }
    // A follower refuses what only a leader does, naming it.
    let mut at_second = cutover_integration_tests::operator_client(&b, &root)
        .await
        .unwrap();
    let refused = at_second
        .list_nodes(cutover_proto::v1::ListNodesRequest {})
        .await
        .unwrap_err();
    refused_for(&refused, &a);
    let nodes = cli.json(&via_follower, &["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(NODES.len()), "{nodes}");
    // Who leads, since when, the token, and the etcd members, from any.
    let status = cli.json(&admin, &["server", "status"]);
    let coordinators = &status["coordinators"];
    assert_eq!(coordinators[0]["role"], "leading", "{status:#}");
    assert_eq!(coordinators[0]["leader_token"], first_token, "{status:#}");
    assert!(coordinators[0]["since"].is_string(), "{status:#}");
    for follower in [&coordinators[1], &coordinators[2]] {
        assert_eq!(follower["role"], "following", "{status:#}");
        assert_eq!(follower["leader"], a.as_str(), "{status:#}");
        assert_eq!(follower["leader_token"], first_token, "{status:#}");
    }
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
    // A follower reads the rollout the leader drives, as stored.
    let read = at_second
        .get_rollout(cutover_proto::v1::GetRolloutRequest {
            id: rollout.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.id, rollout);
    assert!(
        read.timeline.iter().any(|t| t.kind == "batch_switched"),
        "{read:#?}"
    );
    // The admin's dashboard, dialled to the leader about to die.
    let dashboard = Dashboard::start(&admin);
    first.kill();
    let took_over = wait_until(
        "another coordinator takes the lead",
        Duration::from_secs(30),
        || second.leads() || third.leads(),
    );
    println!("leader SIGKILLed; another serves after {took_over:?}");
    assert!(
        took_over < Duration::from_secs(20),
        "took over after {took_over:?}"
    );
    let (leader, follower) = match second.leads() {
        true => (&second, &third),
        false => (&third, &second),
    };
    assert!(!follower.leads(), "two coordinators serve at once");

    let status = rollout_end(&cli, &admin, &rollout, &leader.log).await;
    assert_eq!(status["state"], "succeeded", "{status:#}");
    // The dashboard dialled the new leader by itself: its fleet page
    // shows every node on the release the new leader finished.
    let v2 = format!(
        "data-release=\"{}\"",
        status["release"]["id"].as_str().unwrap()
    );
    let authority = dashboard
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let fleet = format!("/{}/", dashboard.base.splitn(4, '/').nth(3).unwrap());
    let headers = [
        format!("Host: {authority}"),
        format!(
            "Cookie: cutover_ui_{}={}",
            authority.rsplit(':').next().unwrap(),
            dashboard.token()
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, page) = dashboard.request("GET", &fleet, &headers);
        if code == 200
            && page.matches(&v2).count() == NODES.len()
            && !page.contains("does not answer")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard follows the new leader: {page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(dashboard.stop().success());
    // The dead one is reported, another leads; exit 0 while one leads.
    let (ok, text) = cli.run(&admin, &["server", "status"]);
    println!("{text}");
    assert!(ok, "{text}");
    let rows: Vec<&str> = text.lines().collect();
    assert!(
        rows[1].starts_with(&a) && rows[1].contains("unreachable"),
        "{text}"
    );
    let row = |url: &str| {
        rows.iter()
            .find(|r| r.starts_with(url))
            .unwrap()
            .to_string()
    };
    assert!(row(&leader.url()).contains("leading"), "{text}");
    assert!(row(&follower.url()).contains("following"), "{text}");
    let now = leader.page("/metrics");
    assert_eq!(leading(&now), Some(1), "{now}");
    assert!(token(&now) > first_token, "{now}");
    all_on(&cli, &admin, "v2");

    // The remaining follower answers reads from what the new leader wrote
    // (the same rollout, ended), and refuses a write, naming the new one.
    wait_until(
        "the follower follows the new leader",
        Duration::from_secs(20),
        || follower.follows(&leader.url()),
    );
    let mut at_follower = cutover_integration_tests::operator_client(&follower.url(), &root)
        .await
        .unwrap();
    let read = at_follower
        .get_rollout(cutover_proto::v1::GetRolloutRequest {
            id: rollout.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.state(), cutover_proto::v1::RolloutState::Succeeded);
    assert_eq!(
        read.timeline.len(),
        status["timeline"].as_array().unwrap().len()
    );
    timeline_whole(&read);
    let listed = at_follower
        .list_rollouts(cutover_proto::v1::ListRolloutsRequest {
            env: "production".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rollouts.len(), 2, "{listed:#?}");
    let events = at_follower
        .list_events(cutover_proto::v1::ListEventsRequest {
            limit: 10,
            newest: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!events.events.is_empty());
    let refused = at_follower
        .control_rollout(cutover_proto::v1::ControlRolloutRequest {
            id: rollout.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused_for(&refused, &leader.url());
    // What the follower answered is what the leader answers.
    let releases = cli.json(&admin, &["releases", "web", "--env", "production"]);
    let from_follower = at_follower
        .list_releases(cutover_proto::v1::ListReleasesRequest {
            env: "production".into(),
            service: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        releases.as_array().map(Vec::len),
        Some(from_follower.releases.len()),
        "{releases:#}"
    );

    load.wait_for_sent(sent, 100, "after the failover").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
}

/// A follower's refusal: UNAVAILABLE, saying it follows, `leader`'s address
/// in `LEADER_METADATA`.
fn refused_for(refused: &tonic::Status, leader: &str) {
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused
            .metadata()
            .get(cutover_common::LEADER_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some(leader),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("this coordinator follows"),
        "{refused:?}"
    );
}

/// A rolling rollout of one node per batch whose timeline survived the
/// failover whole: it started, the new leader recovered it, every batch
/// started and switched once, every node switched exactly once (no command
/// repeated across the two leaders), in time order.
fn timeline_whole(rollout: &cutover_proto::v1::Rollout) {
    let timeline = &rollout.timeline;
    let kinds: Vec<&str> = timeline.iter().map(|t| t.kind.as_str()).collect();
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(count("recovered"), 1, "{kinds:?}");
    assert_eq!(count("batch_started"), NODES.len(), "{kinds:?}");
    assert_eq!(count("batch_switched"), NODES.len(), "{kinds:?}");
    for i in 1..=NODES.len() {
        let node = format!("node-{i}");
        let switched = timeline
            .iter()
            .filter(|t| t.kind == "node_switched" && t.node == node)
            .count();
        assert_eq!(switched, 1, "{node}: {timeline:#?}");
    }
    assert!(
        timeline.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "{timeline:#?}"
    );
}

/// A leader frozen in the middle of a rollout (SIGSTOP: a stalled VM, a
/// long pause) past its lease: the follower leads and carries the rollout
/// on. Woken (SIGCONT) while the rollout still runs, the old leader acts on
/// what it knew: its driver's next write is fenced by etcd, a command it
/// sends is refused by agents that saw the newer token, and its lease
/// check finds the lease gone; whichever comes first, it stops acting and
/// follows. The rollout ends succeeded with each node switched exactly
/// once, one release everywhere, and no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_wakes_deposed_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("frozen{}/", dir.path().display());
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    cluster.stop_coordinator().await;
    let etcd = cutover_integration_tests::etcd::settings(&prefix);
    let first = ServerProcess::start(&cluster, dir.path(), "first", &etcd, None);
    wait_until(
        "the first coordinator leads",
        Duration::from_secs(20),
        || first.leads(),
    );
    let second = ServerProcess::start(&cluster, dir.path(), "second", &etcd, None);
    let (a, b) = (first.url(), second.url());
    agents(
        &mut cluster,
        &[format!("{a},{b}"), format!("{b},{a}"), format!("{a},{b}")],
        None,
    )
    .await;
    // The follower listed first: while the leader is frozen, a call to it
    // would wait for the CLI's probe to time out.
    let cli = Cli {
        coordinator: format!("{b},{a}"),
        dir: dir.path().to_path_buf(),
    };
    let root = cluster.pki.client_files(Role::Operator, "root");
    let admin = cli.config_file("root.toml", &root);
    wait_for_agents(&cli, &admin);
    let Underway {
        load,
        sent,
        rollout,
        ..
    } = v2_underway(&cli, &admin, dir.path()).await;
    let old_token = metric(&first.page("/metrics"), "cutover_leader_token").unwrap();

    first.pause();
    let took_over = wait_until(
        "the follower takes the lead",
        Duration::from_secs(30),
        || second.leads(),
    );
    println!("leader frozen; the follower leads after {took_over:?}");
    first.resume();
    wait_until("the woken leader follows", Duration::from_secs(30), || {
        first.follows(&b)
    });
    assert!(!first.leads(), "two coordinators serve at once");
    // It noticed, and what it went on to write on waking (a node gone, an
    // event) was refused: by etcd's fence when the write came before the
    // lease check, at once after it.
    let woke = std::fs::read_to_string(&first.log).unwrap();
    let count = |needle: &str| woke.lines().filter(|l| l.contains(needle)).count();
    let stopped = count("no longer leading");
    let fenced = count(&format!(
        "its leadership began at etcd revision {old_token},"
    ));
    let refused = count(&format!(
        "its leadership began at etcd revision {old_token})"
    ));
    println!(
        "the woken leader: stopped leading ({stopped} lines); late writes refused by etcd {fenced}, at once {refused}"
    );
    assert!(stopped > 0, "{woke}");
    assert!(fenced + refused > 0, "{woke}");

    let status = rollout_end(&cli, &admin, &rollout, &second.log).await;
    assert_eq!(status["state"], "succeeded", "{status:#}");
    let read = cutover_integration_tests::operator_client(&b, &root)
        .await
        .unwrap()
        .get_rollout(cutover_proto::v1::GetRolloutRequest { id: rollout })
        .await
        .unwrap()
        .into_inner();
    timeline_whole(&read);
    all_on(&cli, &admin, "v2");
    let new_token = metric(&second.page("/metrics"), "cutover_leader_token").unwrap();
    assert!(new_token > old_token, "{new_token} after {old_token}");
    load.wait_for_sent(sent, 100, "after the leader woke").await;
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
    agents(
        &mut cluster,
        &[all.clone(), all.clone(), all.clone()],
        Some("localhost"),
    )
    .await;
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
    // Its operators still reach it. What is forced on it now, a write and
    // a command to a node, it refuses: it no longer leads, and says so.
    let paged = wait_until(
        "the cut-off coordinator answers as a follower",
        Duration::from_secs(30),
        || cut_off.answers(),
    );
    println!(
        "the cut-off coordinator answers again {:?} after the cut",
        cut.elapsed()
    );
    let _ = paged;
    let mut at_cut_off = cutover_integration_tests::operator_client_expecting(
        &cut_off.url(),
        &root,
        Some("localhost"),
    )
    .await
    .unwrap();
    let late_write = at_cut_off
        .control_rollout(cutover_proto::v1::ControlRolloutRequest {
            id: rollout.clone(),
            action: cutover_proto::v1::RolloutAction::Pause.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let late_command = at_cut_off
        .ping_node(cutover_proto::v1::PingNodeRequest {
            node: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    for refused in [&late_write, &late_command] {
        println!("forced on the cut-off coordinator: {refused:?}");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("this coordinator follows"),
            "{refused:?}"
        );
    }

    let status = rollout_end(&cli, &admin, &rollout, &leader.log).await;
    assert_eq!(status["state"], "succeeded", "{status:#}");
    // The forced pause never landed.
    assert!(
        !status["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "pause_requested"),
        "{status:#}"
    );
    all_on(&cli, &admin, "v2");
    let new_token = metric(&leader.page("/metrics"), "cutover_leader_token").unwrap();
    assert!(new_token > old_token, "{new_token} after {old_token}");
    let sent = load.wait_for_sent(sent, 100, "after the failover").await;

    // Healed, the old leader follows the new one.
    host.heal();
    wait_until("the old leader follows", Duration::from_secs(30), || {
        cut_off.follows(&leader.url())
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
    // None names a leader any more: whoever led last cannot have renewed
    // its lease for a TTL, so none sends callers to it.
    wait_until(
        "every coordinator follows nobody",
        Duration::from_secs(40),
        || cut_off.follows_nobody() && others.iter().all(ServerProcess::follows_nobody),
    );
    let (ok, text) = cli.run(&admin, &["server", "status"]);
    println!("{text}");
    assert!(!ok, "{text}");
    assert!(text.contains("no listed coordinator leads"), "{text}");
    assert!(!text.contains(" leading "), "{text}");
    // A write is refused, saying why; nothing needs retrying by hand but
    // the call itself once a coordinator leads.
    let (ok, text) = cli.run_with_input(
        &admin,
        &["secret", "set", "--env", "production", "TOKEN"],
        "x",
    );
    println!("a write without a quorum: {text}");
    assert!(!ok, "a write went through without a quorum: {text}");
    assert!(text.contains("no coordinator leads"), "{text}");
    let (_, text) = cli.run(&admin, &["rollout", "list"]);
    println!("a read without a quorum: {text}");
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
    // The old term's store as a leader has it that never learns it lost
    // the lead (its lost signal detached): only etcd's fence stops it.
    let mut old = old;
    let noticed = std::mem::replace(&mut old.lost, CancellationToken::new());
    let old_store = Store::new(Arc::new(EtcdBackend::fenced(&settings, &old)));
    old.lost = noticed;
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
    // Refused by etcd's fence, or, once an earlier write of its was, at
    // once.
    assert!(
        text.contains("no longer the leader") || text.contains("no longer leads"),
        "{text}"
    );
    deposed.stop().await.unwrap();
    new.resign().await;
}
