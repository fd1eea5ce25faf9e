//! The `cutover` binary when something is in the way, one family at a
//! time: an operator's lock on a service, a role that does not allow the
//! call, a request over the coordinator's size limit, a node or a
//! coordinator out of reach. Each error names the input, the cause and the
//! next step, and changes nothing.

use std::path::Path;
use std::time::Duration;

use cutover_integration_tests::cli::{cluster_of, cluster_tuned, two_builds, Cli};
use cutover_integration_tests::Tuning;

/// The test app's spec for `web` in production on a free port, written to
/// `dir`; with `padding` bytes of comment after it.
fn spec(dir: &Path, padding: usize) -> String {
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let path = dir.join(format!("cutover-{padding}.toml"));
    let mut text = format!(
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
nodes = {{ env = "production" }}
"#
    );
    if padding > 0 {
        text.push_str("# ");
        text.push_str(&"x".repeat(padding));
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The id of the release of `web` in production now.
fn current(cli: &Cli, config: &Path) -> String {
    let releases = cli.json(config, &["releases", "web", "--env", "production"]);
    releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .map(|r| r["release"]["id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no current release: {releases:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_service_refuses_changes_saying_who_and_why_until_unlocked() {
    let mut cluster = cluster_of(&[("node-1", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let (v1, v2) = two_builds(dir.path());
    let spec = spec(dir.path(), 0);
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "{text}");
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v2", &v2, &["--wait"]);
    assert!(ok, "{text}");
    let before = current(&cli, &admin);

    let dana = cli.operator(&admin, "dana", "production");
    let staging = cli.operator(&admin, "sam", "staging");
    let lock = [
        "lock",
        "web",
        "--env",
        "production",
        "--reason",
        "reindexing orders",
    ];
    // A deployer of another environment may not.
    let (ok, text) = cli.run(&staging, &lock);
    assert!(!ok, "{text}");
    assert!(
        text.contains("lock_service needs the deployer role for environment production, or admin: ask an admin"),
        "{text}"
    );
    assert!(cli.json(&admin, &["locks"]).as_array().unwrap().is_empty());
    // Nor without a reason, nor on a service that never ran there.
    let (ok, text) = cli.run(
        &dana,
        &["lock", "web", "--env", "production", "--reason", " "],
    );
    assert!(!ok && text.contains("needs a reason"), "{text}");
    let (ok, text) = cli.run(
        &dana,
        &["lock", "wbe", "--env", "production", "--reason", "x"],
    );
    assert!(
        !ok && text.contains("wbe has no release in environment"),
        "{text}"
    );

    let (ok, text) = cli.run(&dana, &lock);
    assert!(ok, "{text}");
    let (ok, text) = cli.run(&admin, &lock);
    assert!(!ok, "{text}");
    assert!(text.contains("locked already, by dana"), "{text}");
    let locks = cli.json(&admin, &["locks", "--env", "production"]);
    assert_eq!(locks.as_array().unwrap().len(), 1, "{locks:#}");
    assert_eq!(locks[0]["by"], "dana");
    assert_eq!(locks[0]["reason"], "reindexing orders");
    // Its age is a metric (a forgotten lock alerts), also after a restart
    // of the coordinator, which reads the locks back from its store.
    let series = "cutover_service_lock_age_seconds{env=\"production\",service=\"web\"}";
    assert!(cluster.metrics().contains(series), "{}", cluster.metrics());
    cluster.restart_coordinator().await;
    assert!(cluster.metrics().contains(series), "{}", cluster.metrics());

    // Every change of it is refused with who, why and the ways on.
    let refusals = [
        cli.deploy(&admin, &spec, "production", "v3", &v1, &["--wait"]),
        cli.run(&dana, &["rollback", "web", "--env", "production"]),
        cli.run(
            &admin,
            &["scale", "web", "--env", "production", "--instances", "2"],
        ),
    ];
    for (ok, text) in refusals {
        assert!(!ok, "{text}");
        assert!(
            text.contains("web in production is locked by dana since ")
                && text.contains("\"reindexing orders\"; `cutover unlock web --env production` once that is done, or an admin goes ahead with --break-glass"),
            "{text}"
        );
    }
    assert_eq!(current(&cli, &admin), before, "nothing changed");

    let (ok, text) = cli.run(&admin, &["unlock", "web", "--env", "production"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("unlocked web in production (locked by dana"),
        "{text}"
    );
    assert!(!cluster.metrics().contains(series), "unlocked: no age");
    let (ok, text) = cli.run(&admin, &["unlock", "web", "--env", "production"]);
    assert!(
        ok && text.contains("was not locked; nothing changed"),
        "{text}"
    );
    let (ok, text) = cli.run(&dana, &["rollback", "web", "--env", "production", "--wait"]);
    assert!(ok, "{text}");
    assert_ne!(current(&cli, &admin), before, "rolled back once unlocked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_limit_or_what_is_out_of_reach_and_what_to_do() {
    // A coordinator whose operator lowered its message limit to 256 KiB.
    let tuning = Tuning {
        max_message_bytes: 256 << 10,
        ..Tuning::default()
    };
    let mut cluster = cluster_tuned(&[("node-1", "production")], tuning).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let (v1, _) = two_builds(dir.path());

    // A spec the CLI takes (under its 1 MiB) but over that limit: the error
    // names the limit and the key to change.
    let big = spec(dir.path(), 300 << 10);
    let (ok, text) = cli.deploy(&admin, &big, "production", "v1", &v1, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("the coordinator refused the request as too large")
            && text.contains("`limits.max_message_bytes` of its coordinator.toml"),
        "{text}"
    );
    assert!(cli
        .json(&admin, &["rollout", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    // The node is offline, not the coordinator.
    cluster.agents.remove(0).stop().await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| n.iter().all(|n| !n.connected))
        .await;
    let (ok, text) = cli.run(&admin, &["nodes", "ping", "node-1"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("node node-1 is not connected to the coordinator (the node is offline, not the coordinator)")
            && text.contains("systemctl status cutover-agent"),
        "{text}"
    );

    // No coordinator where the CLI dials.
    let closed = Cli {
        coordinator: format!("https://127.0.0.1:{}", closed_port()),
        dir: dir.path().to_path_buf(),
    };
    let files = cluster
        .pki
        .existing_or_new(cutover_common::identity::Role::Operator, "root");
    let config = closed.config_file("closed.toml", &files);
    let (ok, text) = closed.run(&config, &["nodes"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&closed.coordinator)
            && text.contains("check that the coordinator runs there"),
        "{text}"
    );
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
