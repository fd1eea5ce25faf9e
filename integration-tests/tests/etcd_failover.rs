//! Two `cutover server` processes on one etcd prefix: one leads, the other
//! follows (it answers its status and refuses the rest, naming the leader). The leader is SIGKILLed in the middle of a
//! rolling rollout under load: the follower takes the lead once the dead
//! one's lease runs out, the agents (which list both) reconnect to it, the
//! rollout ends succeeded with every node on the new release, no request
//! fails, and the CLI (which lists both too) reaches whichever leads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cutover_common::identity::Role;
use cutover_integration_tests::cli::{two_builds, Cli};
use cutover_integration_tests::load::Load;
use cutover_integration_tests::{bin, spawn_agent, Cluster, Tuning};

const NODES: [&str; 2] = ["127.0.0.11", "127.0.0.12"];

/// A `cutover server` process of the test, SIGKILLed when dropped.
struct Server {
    child: Child,
    grpc: u16,
    http: u16,
    log: PathBuf,
}

impl Server {
    fn start(cluster: &Cluster, dir: &Path, name: &str, prefix: &str) -> Self {
        let port = |taken: &[u16]| {
            cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(36000..=38999), taken)
                .unwrap()
        };
        let grpc = port(&[]);
        let http = port(&[grpc]);
        let files = cluster.pki.coordinator_files();
        let ca_key = files.ca_cert.with_file_name(cutover_common::pki::CA_KEY);
        let master_key = files
            .ca_cert
            .with_file_name(cutover_coordinator::secrets::MASTER_KEY);
        let etcd = cutover_integration_tests::etcd::settings(prefix);
        let endpoints = etcd
            .endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\nlisten = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n\
                 heartbeat_interval = \"300ms\"\nheartbeat_ttl = \"2s\"\nshutdown_grace = \"3s\"\n\
                 ca_key = {ca_key:?}\nmaster_key_file = {master_key:?}\nstore = \"etcd\"\n\
                 [tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n\
                 [etcd]\nendpoints = [{endpoints}]\nprefix = {prefix:?}\nadvertise = \"https://127.0.0.1:{grpc}\"\n\
                 tls = {{ ca_cert = {:?}, cert = {:?}, key = {:?} }}\n",
                files.ca_cert,
                files.cert,
                files.key,
                etcd.tls.ca_cert,
                etcd.tls.cert,
                etcd.tls.key,
                data = dir.join(name),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin("cutover"))
            .args(["server", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            grpc,
            http,
            log,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc)
    }

    /// Whether it leads, as its /metrics says (false while it cannot
    /// answer).
    fn leads(&self) -> bool {
        let addr = format!("127.0.0.1:{}", self.http);
        std::net::TcpStream::connect(&addr).is_ok()
            && cutover_integration_tests::body(&cutover_integration_tests::http_get(
                &addr, "/metrics",
            ))
            .lines()
            .any(|line| line == "cutover_leading 1")
    }

    /// Its /metrics and /healthz (a follower serves both).
    fn page(&self, path: &str) -> String {
        cutover_integration_tests::body(&cutover_integration_tests::http_get(
            &format!("127.0.0.1:{}", self.http),
            path,
        ))
        .to_string()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_leader_is_replaced_mid_rollout_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("failover{}/", dir.path().display());
    // The PKI and the agents' settings of an in-process cluster whose own
    // coordinator steps aside for the two processes.
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    cluster.stop_coordinator().await;
    let mut first = Server::start(&cluster, dir.path(), "first", &prefix);
    wait_until(
        "the first coordinator leads",
        Duration::from_secs(20),
        || first.leads(),
    );
    let second = Server::start(&cluster, dir.path(), "second", &prefix);
    let both = format!("{},{}", first.url(), second.url());

    // node-2 lists the follower first: refused with the leader's address,
    // it goes there.
    let follower_first = format!("{},{}", second.url(), first.url());
    for (name, coordinators) in [("node-1", &both), ("node-2", &follower_first)] {
        let mut config = cluster.agent_config(name);
        config.labels = [("env".to_string(), "production".to_string())].into();
        config.coordinator = coordinators.clone();
        cluster.agents.push(spawn_agent(config).await);
    }
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
    wait_until("both agents connect", Duration::from_secs(20), || {
        let (ok, text) = cli.run(&admin, &["nodes", "-o", "json"]);
        ok && serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|nodes| {
            nodes.as_array().is_some_and(|n| {
                n.len() == 2
                    && n.iter()
                        .all(|n| n["connected"] == true && n["status"] == "ready")
            })
        })
    });
    assert!(!second.leads(), "two coordinators serve at once");
    // Both answer Prometheus: who acts, and the token of the term.
    let leading = |page: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix("cutover_leading "))
            .map(str::to_string)
    };
    let token = |page: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix("cutover_leader_token "))
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    wait_until(
        "the follower's page answers",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", second.http)).is_ok(),
    );
    let (first_metrics, second_metrics) = (first.page("/metrics"), second.page("/metrics"));
    assert_eq!(
        leading(&first_metrics).as_deref(),
        Some("1"),
        "{first_metrics}"
    );
    assert_eq!(
        leading(&second_metrics).as_deref(),
        Some("0"),
        "{second_metrics}"
    );
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

    let (v1, v2) = two_builds(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
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
min_healthy_time = "3s"
[environments.production]
nodes = {{ env = "production" }}
"#
        ),
    )
    .unwrap();
    let spec = spec.display().to_string();
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "{text}");

    let targets = NODES
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let load = Load::start(targets, "/", 4);
    let sent = load.wait_for_sent(0, 100, "on v1").await;

    let (ok, text) = cli.deploy(&admin, &spec, "production", "v2", &v2, &[]);
    assert!(ok, "{text}");
    let rollout = cli.json(&admin, &["rollout", "list", "--env", "production"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Mid-batch: the first node switched, its watch running.
    wait_until("the first batch switches", Duration::from_secs(30), || {
        let (ok, text) = cli.run(&admin, &["rollout", "status", &rollout, "-o", "json"]);
        ok && text.contains("batch_switched")
    });
    first.kill();
    let killed = Instant::now();
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

    let status = loop {
        let (ok, text) = cli.run(&admin, &["rollout", "status", &rollout, "-o", "json"]);
        if ok {
            let status: serde_json::Value = serde_json::from_str(&text).unwrap();
            let state = status["state"].as_str().unwrap_or_default().to_string();
            if !matches!(state.as_str(), "pending" | "running" | "paused") {
                break status;
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(90),
            "the rollout did not end after the failover:\n{}",
            std::fs::read_to_string(&second.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["state"], "succeeded", "{status:#}");
    // The dead one is reported, the other leads; exit 0 while one leads.
    let (ok, text) = cli.run(&admin, &["server", "status"]);
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
    assert_eq!(leading(&now).as_deref(), Some("1"), "{now}");
    assert!(token(&now) > first_token, "{now}");
    let nodes = cli.json(&admin, &["nodes"]);
    for node in nodes.as_array().unwrap() {
        let release = node["services"][0]["release"].as_str().unwrap_or_default();
        assert!(release.starts_with("web-v2-"), "{node}");
    }
    load.wait_for_sent(sent, 100, "after the failover").await;
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
