//! `cutover scale` through the real binaries: a service goes from one
//! process per node to three and back under load without a failed request,
//! each node's proxy spreads requests over its processes, a deploy keeps
//! the count, `cutover nodes` shows it, a scale-up whose new processes fail
//! their health check is rolled back with the old count serving, and bad
//! input changes nothing.

use std::collections::BTreeSet;

use cutover_integration_tests::cli::{cluster_of, two_builds, Cli};
use cutover_integration_tests::http_get;
use cutover_integration_tests::load::Load;

const NODES: [&str; 2] = ["127.0.0.11", "127.0.0.12"];

/// The ports of the processes that answered 30 requests on each node.
fn processes(port: u16) -> Vec<BTreeSet<String>> {
    NODES
        .iter()
        .map(|ip| {
            (0..30)
                .map(|_| {
                    let response = http_get(&format!("{ip}:{port}"), "/whoami");
                    let body = cutover_integration_tests::body(&response);
                    let mut words = body.split(' ');
                    words
                        .nth(1)
                        .unwrap_or_else(|| panic!("{response}"))
                        .to_string()
                })
                .collect()
        })
        .collect()
}

fn counts(port: u16) -> Vec<usize> {
    processes(port).iter().map(BTreeSet::len).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_under_load_fails_no_request_and_a_bad_scale_up_rolls_back() {
    let cluster = cluster_of(&[("node-1", "production"), ("node-2", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pete = cli.operator(&admin, "pete", "production");
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
    let scale = |n: &str, more: &[&str]| {
        let mut args = vec!["scale", "web", "--env", "production", "--instances", n];
        args.extend_from_slice(more);
        cli.run(&pete, &args)
    };
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "{text}");
    assert_eq!(counts(port), [1, 1]);

    let targets = NODES
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let load = Load::start(targets, "/", 6);
    let mut sent = load.wait_for_sent(0, 200, "on one process").await;

    let (ok, text) = scale("3", &["--wait"]);
    assert!(ok, "{text}");
    assert_eq!(counts(port), [3, 3], "three processes answer on each node");
    sent = load.wait_for_sent(sent, 200, "on three processes").await;
    let nodes = cli.json(&pete, &["nodes"]);
    for node in nodes.as_array().unwrap() {
        let web = &node["services"][0];
        assert_eq!(
            (web["instances"].as_u64(), web["instances_up"].as_u64()),
            (Some(3), Some(3)),
            "{node}"
        );
    }
    let (ok, table) = cli.run(&pete, &["nodes"]);
    assert!(ok && table.contains(" x3"), "{table}");
    let rollouts = cli.json(&pete, &["rollout", "list", "--env", "production"]);
    let status = cli.json(
        &pete,
        &["rollout", "status", rollouts[0]["id"].as_str().unwrap()],
    );
    assert!(
        status["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "scale"
                && t["message"]
                    .as_str()
                    .unwrap()
                    .contains("scaled web in production from 1 to 3")),
        "{status}"
    );

    // A deploy of the spec keeps the count; the same count again is
    // nothing to roll out.
    let (ok, text) = cli.deploy(&pete, &spec, "production", "v2", &v2, &["--wait"]);
    assert!(ok, "{text}");
    assert_eq!(counts(port), [3, 3], "the deploy keeps three");
    let (ok, text) = scale("3", &[]);
    assert!(ok && text.contains("nothing to roll out"), "{text}");

    let (ok, text) = scale("1", &["--wait"]);
    assert!(ok, "{text}");
    assert_eq!(counts(port), [1, 1]);
    load.wait_for_sent(sent, 200, "back on one process").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);

    // An app that cannot run twice: its second process fails its health
    // check, the scale-up is rolled back, one process serves on each node.
    let (ok, text) = cli.run(
        &pete,
        &[
            "config",
            "set",
            "web",
            "--env",
            "production",
            "SINGLE_PROCESS=1",
            "--wait",
        ],
    );
    assert!(ok, "{text}");
    let before = cli.json(&pete, &["releases", "web", "--env", "production"]);
    let (ok, text) = scale("2", &["--wait"]);
    assert!(
        !ok && text.contains("rolled_back") && text.contains("is not healthy"),
        "the scale-up must fail its health checks and roll back: {text}"
    );
    let rollouts = cli.json(&pete, &["rollout", "list", "--env", "production"]);
    assert_ne!(rollouts[0]["state"], "successful", "{rollouts:#}");
    assert_eq!(counts(port), [1, 1], "one process serves on");
    let current = |releases: &serde_json::Value| {
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["current"] == true)
            .map(|r| r["release"].clone())
    };
    let after = cli.json(&pete, &["releases", "web", "--env", "production"]);
    assert_eq!(current(&after), current(&before), "{after:#}");

    // Bad input: a clear error, nothing rolled out.
    for (n, says) in [("0", "1 to 32 processes"), ("33", "1 to 32 processes")] {
        let (ok, text) = scale(n, &[]);
        assert!(!ok && text.contains(says), "{n}: {text}");
    }
    let (ok, text) = cli.run(
        &admin,
        &["scale", "web", "--env", "staging", "--instances", "2"],
    );
    assert!(
        !ok && text.contains("web has no current release in staging"),
        "{text}"
    );
    let (ok, text) = scale("2", &["--break-glass", "--reason", "incident"]);
    assert!(
        !ok && text.contains("admin"),
        "a deployer cannot break glass: {text}"
    );
    assert_eq!(
        cli.json(&pete, &["rollout", "list", "--env", "production"])
            .as_array()
            .unwrap()
            .len(),
        rollouts.as_array().unwrap().len(),
        "refusals roll nothing out"
    );
}
