//! A coordinator whose store is a real three-member etcd cluster (Debian's
//! etcd 3.4, mutual TLS), driven through the CLI: rollouts under load while
//! the member it talks to is killed, writes refused with a clear error
//! while the cluster has no quorum (the agents serve on), everything back
//! once it has, and a restarted coordinator that finds its state in etcd,
//! none in its data dir.

use std::time::Duration;

use cutover_integration_tests::cli::{cluster_tuned, two_builds, Cli};
use cutover_integration_tests::etcd::EtcdCluster;
use cutover_integration_tests::load::Load;
use cutover_integration_tests::Tuning;

const NODES: [&str; 2] = ["127.0.0.11", "127.0.0.12"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_on_etcd_ride_out_a_lost_member_and_wait_out_a_lost_quorum() {
    let mut etcd = EtcdCluster::start();
    let tuning = Tuning {
        etcd: Some(etcd.settings("cutover/")),
        ..Tuning::default()
    };
    let mut cluster = cluster_tuned(
        &[("node-1", "production"), ("node-2", "production")],
        tuning,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
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
healthy_deadline = "3s"
[strategy]
batch = 1
min_healthy_time = "200ms"
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
    let mut sent = load.wait_for_sent(0, 100, "on v1").await;

    // The member the coordinator talks to (the first listed) dies: the
    // next calls go to another, the rollout does not notice.
    etcd.members[0].kill();
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v2", &v2, &["--wait"]);
    assert!(ok, "a rollout with one member of three down: {text}");
    sent = load.wait_for_sent(sent, 100, "on v2").await;

    // A second one: no quorum. A write is refused with the cause and what
    // to check, within the request timeout; the nodes serve on.
    etcd.members[1].kill();
    let started = std::time::Instant::now();
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &[]);
    assert!(!ok, "a deploy without a quorum: {text}");
    assert!(
        text.contains("store is unavailable") && text.contains("majority of the etcd members"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused after {:?}",
        started.elapsed()
    );
    sent = load.wait_for_sent(sent, 100, "without a quorum").await;

    // Quorum back: the same deploy goes through.
    etcd.members[0].start();
    etcd.members[1].start();
    etcd.wait_healthy(Duration::from_secs(30));
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "a deploy once the quorum is back: {text}");

    // A new coordinator process finds every rollout in etcd; its data dir
    // has no store.
    cluster.restart_coordinator().await;
    assert!(!cluster.data_dir().join("store").exists());
    let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
    let states: Vec<&str> = rollouts
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "succeeded").count(),
        3,
        "{rollouts}"
    );
    load.wait_for_sent(sent, 100, "after the restart").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    cluster.stop_coordinator().await;
}

/// The operator guide's move to etcd, as written: the coordinator stopped,
/// `store = "etcd"` and an `[etcd]` section added to its config, `cutover
/// admin migrate-store --from sled:DIR`, the coordinator started again: it
/// serves every rollout from etcd (its old store moved away) and deploys on.
#[test]
fn a_stopped_coordinators_store_moves_to_etcd_with_the_documented_commands() {
    let cluster = cutover_integration_tests::DevCluster::up(1);
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let spec = format!(
        r#"app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "10s"
[environments.local]
nodes = {{ env = "local" }}
"#
    );
    let run = |args: &[&str]| {
        let output = cluster.cutover(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "cutover {args:?}: {text}\n{}",
            cluster.log_tails()
        );
        text
    };
    let deployed = cluster.deploy_spec(&spec, "v1", &["--wait"]);
    assert!(deployed.status.success(), "{deployed:?}");
    let before = run(&["rollout", "list", "-o", "json"]);

    // systemctl stop: SIGTERM, then wait until it is gone.
    let pid = cluster.pid("coordinator.pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cutover_integration_tests::running(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let config_path = cluster.path("coordinator.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let data_dir = config
        .lines()
        .find_map(|line| line.strip_prefix("data_dir = "))
        .map(|quoted| quoted.trim_matches('"').to_string())
        .expect("dev up writes data_dir");
    let etcd = cutover_integration_tests::etcd::settings("unused");
    let prefix = format!("migrated{}/", cluster.dir.path().display());
    let endpoints = etcd
        .endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &config_path,
        format!(
            "store = \"etcd\"\n{config}\n[etcd]\nendpoints = [{endpoints}]\nprefix = {prefix:?}\n\
             tls = {{ ca_cert = {:?}, cert = {:?}, key = {:?} }}\n",
            etcd.tls.ca_cert, etcd.tls.cert, etcd.tls.key
        ),
    )
    .unwrap();
    let store = format!("sled:{data_dir}/store");
    let config_arg = config_path.display().to_string();
    let copied = run(&[
        "admin",
        "migrate-store",
        "--from",
        &store,
        "--config",
        &config_arg,
    ]);
    assert!(copied.contains("copied the embedded store"), "{copied}");
    assert!(copied.contains("records per table"), "{copied}");
    // Proof that what serves next comes from etcd.
    std::fs::rename(
        format!("{data_dir}/store"),
        format!("{data_dir}/store.migrated"),
    )
    .unwrap();

    cluster.start_coordinator();
    cluster.wait_for_nodes(Duration::from_secs(20), |nodes| {
        nodes
            .iter()
            .all(|n| n["status"] == "ready" && n["connected"] == true)
    });
    let after = run(&["rollout", "list", "-o", "json"]);
    assert_eq!(after, before, "the same rollouts, read from etcd");
    let deployed = cluster.deploy_spec(&spec, "v2", &["--wait"]);
    assert!(
        deployed.status.success(),
        "{deployed:?}\n{}",
        cluster.log_tails()
    );
    assert!(!std::path::Path::new(&format!("{data_dir}/store")).exists());

    // Again: the prefix holds records now; refused, with what to do.
    let moved = format!("sled:{data_dir}/store.migrated");
    let again = cluster.cutover(&[
        "admin",
        "migrate-store",
        "--from",
        &moved,
        "--config",
        &config_arg,
    ]);
    let text = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        text.contains("is not empty") && text.contains("etcdctl del --prefix"),
        "{text}"
    );

    // The guide's backup of etcd itself: a snapshot from one member, which
    // holds the installation's records.
    let snapshot = cluster.dir.path().join("etcd-snapshot.db");
    let etcdctl = |args: &[&str]| {
        let output = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoints[0]))
            .arg(format!("--cacert={}", etcd.tls.ca_cert.display()))
            .arg(format!("--cert={}", etcd.tls.cert.display()))
            .arg(format!("--key={}", etcd.tls.key.display()))
            .args(args)
            .output()
            .expect("etcdctl runs (installed with etcd-server by scripts/etcd-env.sh)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "etcdctl {args:?}: {text}");
        text
    };
    etcdctl(&["snapshot", "save", snapshot.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_str(
        etcdctl(&[
            "snapshot",
            "status",
            snapshot.to_str().unwrap(),
            "-w",
            "json",
        ])
        .trim(),
    )
    .unwrap();
    assert!(status["totalKey"].as_u64().unwrap_or(0) > 10, "{status}");
    let keys = etcdctl(&["get", "--prefix", "--keys-only", &prefix]);
    assert!(
        keys.lines().filter(|l| !l.is_empty()).count() > 10,
        "{keys}"
    );
}
