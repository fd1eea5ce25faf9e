//! Config-only releases through the real `cutover` binary: `config set`
//! rolls the running artifact out again with variables set, removed or
//! reset, under load without a failed request; the change stays in force
//! across a deploy of the spec, a rollback brings back the values before
//! it, `config show` says where each value comes from and never shows a
//! secret's value, and bad input changes nothing.

use cutover_integration_tests::cli::{cluster_of, two_builds, Cli};
use cutover_integration_tests::load::Load;
use cutover_integration_tests::{http_get, sha256_hex};
use serde_json::Value;

const SECRET_VALUE: &str = "s3cret-token-value";

/// What both nodes' releases see of variable `name`: its value's digest,
/// or "unset".
fn seen(port: u16, name: &str) -> Vec<String> {
    ["127.0.0.11", "127.0.0.12"]
        .iter()
        .map(|ip| {
            let response = http_get(&format!("{ip}:{port}"), &format!("/env-sha256/{name}"));
            cutover_integration_tests::body(&response)
                .trim()
                .to_string()
        })
        .collect()
}

fn entry<'a>(config: &'a Value, key: &str) -> &'a Value {
    config["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == key)
        .unwrap_or_else(|| panic!("no {key}: {config}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_rolls_out_under_load_and_stays_across_deploys() {
    let cluster = cluster_of(&[("node-1", "production"), ("node-2", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pete = cli.operator(&admin, "pete", "production");
    let (ok, text) = cli.run_with_input(
        &admin,
        &["secret", "set", "--env", "production", "API_TOKEN"],
        SECRET_VALUE,
    );
    assert!(ok, "{text}");
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
secrets = ["API_TOKEN"]
env = {{ CHECKOUT_V2 = "on", GREETING = "hello" }}
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
        ),
    )
    .unwrap();
    let spec = spec.display().to_string();
    let deploy = |by: &std::path::Path, version: &str, artifact: &str| {
        let (ok, text) = cli.deploy(by, &spec, "production", version, artifact, &["--wait"]);
        assert!(ok, "{text}");
    };
    let config_set = |args: &[&str]| {
        let mut all = vec!["config", "set", "web", "--env", "production"];
        all.extend_from_slice(args);
        cli.run(&pete, &all)
    };
    let show = || cli.json(&pete, &["config", "show", "web", "--env", "production"]);
    let (on, off, hello) = (sha256_hex("on"), sha256_hex("off"), sha256_hex("hello"));

    // The first deploy pins the environment's nodes: an admin's.
    deploy(&admin, "v1", &v1);
    assert_eq!(seen(port, "CHECKOUT_V2"), [on.as_str(), on.as_str()]);
    let targets = ["127.0.0.11", "127.0.0.12"]
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let load = Load::start(targets, "/", 6);
    let mut sent = load.wait_for_sent(0, 200, "on v1").await;

    // A flag turned off: one command, rolled out node by node.
    let (ok, text) = config_set(&["CHECKOUT_V2=off", "NEW_FLAG=1", "--wait"]);
    assert!(ok, "{text}");
    assert_eq!(seen(port, "CHECKOUT_V2"), [off.as_str(), off.as_str()]);
    assert_eq!(seen(port, "NEW_FLAG"), [sha256_hex("1"), sha256_hex("1")]);
    sent = load.wait_for_sent(sent, 200, "after config set").await;
    let config = show();
    let checkout = entry(&config, "CHECKOUT_V2");
    assert_eq!(checkout["source"], "override", "{config}");
    assert_eq!(checkout["value"], "off");
    assert_eq!(checkout["spec_value"], "on");
    assert!(
        checkout["by"].as_str().unwrap().contains("pete"),
        "{config}"
    );
    assert_eq!(entry(&config, "NEW_FLAG")["spec_value"], Value::Null);
    assert_eq!(entry(&config, "GREETING")["source"], "spec");
    let token = entry(&config, "API_TOKEN");
    assert_eq!(token["source"], "secret");
    assert_eq!(token["secret_version"], 1);
    let (ok, table) = cli.run(&pete, &["config", "show", "web", "--env", "production"]);
    assert!(ok && table.contains("(secret, version 1)"), "{table}");
    assert!(
        !table.contains(SECRET_VALUE) && !config.to_string().contains(SECRET_VALUE),
        "a secret's value is never shown"
    );

    // The next deploy of the spec keeps the override, and says so.
    deploy(&pete, "v2", &v2);
    assert_eq!(
        seen(port, "CHECKOUT_V2"),
        [off.as_str(), off.as_str()],
        "the flag stays off"
    );
    let rollouts = cli.json(&pete, &["rollout", "list", "--env", "production"]);
    let status = cli.json(
        &pete,
        &["rollout", "status", rollouts[0]["id"].as_str().unwrap()],
    );
    let kept = status["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "config")
        .unwrap_or_else(|| panic!("a config entry: {status}"));
    assert!(
        kept["message"]
            .as_str()
            .unwrap()
            .contains("keeps the environment `cutover config set` gave web: CHECKOUT_V2, NEW_FLAG"),
        "{kept}"
    );

    // Removed, then back to the spec's value.
    let (ok, text) = config_set(&["--unset", "GREETING", "--wait"]);
    assert!(ok, "{text}");
    assert_eq!(seen(port, "GREETING"), ["unset", "unset"]);
    assert_eq!(entry(&show(), "GREETING")["source"], "removed");
    let (ok, text) = config_set(&["--reset", "CHECKOUT_V2", "--reset", "GREETING", "--wait"]);
    assert!(ok, "{text}");
    assert_eq!(seen(port, "CHECKOUT_V2"), [on.as_str(), on.as_str()]);
    assert_eq!(seen(port, "GREETING"), [hello.as_str(), hello.as_str()]);
    assert_eq!(entry(&show(), "CHECKOUT_V2")["source"], "spec");
    load.wait_for_sent(sent, 200, "after the reset").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    assert!(report.sent > 600, "too little load: {}", report.sent);

    // A rollback returns the values before the change, overrides and all.
    let (ok, text) = cli.run(&pete, &["rollback", "web", "--env", "production", "--wait"]);
    assert!(ok, "{text}");
    assert_eq!(seen(port, "CHECKOUT_V2"), [off.as_str(), off.as_str()]);
    assert_eq!(seen(port, "GREETING"), ["unset", "unset"]);
    assert_eq!(entry(&show(), "GREETING")["source"], "removed");

    // A spec that changes only an overridden key rolls nothing out, but
    // its new value is what a reset goes back to.
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace("CHECKOUT_V2 = \"on\"", "CHECKOUT_V2 = \"maybe\""),
    )
    .unwrap();
    deploy(&pete, "v2", &v2);
    assert_eq!(seen(port, "CHECKOUT_V2"), [off.as_str(), off.as_str()]);
    assert_eq!(entry(&show(), "CHECKOUT_V2")["spec_value"], "maybe");
    let (ok, text) = config_set(&["--reset", "CHECKOUT_V2", "--wait"]);
    assert!(ok, "{text}");
    let maybe = sha256_hex("maybe");
    assert_eq!(seen(port, "CHECKOUT_V2"), [maybe.as_str(), maybe.as_str()]);
    // Set to the value in force: nothing to roll out, the override kept.
    let (ok, text) = config_set(&["NEW_FLAG=1"]);
    assert!(ok && text.contains("nothing to roll out"), "{text}");

    // Bad input: a clear error, and nothing changes.
    let releases = cli.json(&pete, &["releases", "web", "--env", "production"]);
    for (args, says) in [
        (
            vec!["API_TOKEN=x"],
            "API_TOKEN is a secret of web in production",
        ),
        (vec!["1BAD=x"], "1BAD"),
        (vec!["GREETING"], "is not KEY=VALUE"),
        (
            vec!["--reset", "NOPE"],
            "NOPE has no override in production to reset",
        ),
        (vec!["A=1", "--unset", "A"], "A is named twice"),
        (vec!["A=1", "A=2"], "A is set twice"),
        (vec![], "nothing to change"),
    ] {
        let (ok, text) = config_set(&args);
        assert!(!ok && text.contains(says), "{args:?}: {text}");
    }
    let (ok, text) = cli.run(&admin, &["config", "set", "web", "--env", "staging", "A=1"]);
    assert!(
        !ok && text.contains("web has no current release in staging"),
        "{text}"
    );
    assert_eq!(
        cli.json(&pete, &["releases", "web", "--env", "production"]),
        releases,
        "refusals change nothing"
    );
    // Rotating the secret rolls out what names it, and its age and
    // schedule reach the metrics.
    let (ok, text) = cli.run_with_input(
        &admin,
        &[
            "secret",
            "set",
            "--env",
            "production",
            "API_TOKEN",
            "--rotate-every",
            "90d",
        ],
        SECRET_VALUE,
    );
    assert!(ok, "{text}");
    let (ok, table) = cli.run(&admin, &["secret", "list", "--env", "production"]);
    assert!(ok && table.contains("90d"), "{table}");
    let http = cluster.coordinator.as_ref().unwrap().http_addr.to_string();
    let metrics = cutover_integration_tests::body(&http_get(&http, "/metrics")).to_string();
    assert!(
        metrics.contains(
            "cutover_secret_rotate_every_seconds{env=\"production\",name=\"API_TOKEN\"} 7776000"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("cutover_secret_age_seconds{env=\"production\",name=\"API_TOKEN\"}"),
        "{metrics}"
    );
    let rotated = "r0tated-token-value";
    let (ok, text) = cli.run_with_input(
        &admin,
        &[
            "secret",
            "rotate",
            "--env",
            "production",
            "API_TOKEN",
            "--wait",
        ],
        rotated,
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("secret API_TOKEN in production is now at version 3"),
        "{text}"
    );
    let digest = sha256_hex(rotated);
    assert_eq!(seen(port, "API_TOKEN"), [digest.as_str(), digest.as_str()]);
    assert!(
        !text.contains(rotated),
        "the value is never printed: {text}"
    );
    let config = show();
    assert_eq!(entry(&config, "API_TOKEN")["secret_version"], 3);
    assert_eq!(
        entry(&config, "CHECKOUT_V2")["value"],
        "maybe",
        "the config stays"
    );
    let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
    let status = cli.json(
        &admin,
        &["rollout", "status", rollouts[0]["id"].as_str().unwrap()],
    );
    assert!(
        status["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "config"
                && t["message"]
                    .as_str()
                    .unwrap()
                    .contains("rotated secret API_TOKEN")),
        "{status}"
    );
    // A deployer cannot rotate; a secret nothing names rolls nothing out.
    let (ok, text) = cli.run_with_input(
        &pete,
        &["secret", "rotate", "--env", "production", "API_TOKEN"],
        "x",
    );
    assert!(!ok && text.contains("admin"), "{text}");
    let (ok, text) = cli.run_with_input(
        &admin,
        &["secret", "rotate", "--env", "production", "UNUSED"],
        "x",
    );
    assert!(ok && text.contains("nothing to roll out"), "{text}");

    let audit = cli.json(&admin, &["audit", "--limit", "50"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "set_config"
                && a["outcome"] == "ok"
                && a["arguments"]["set"] == serde_json::json!(["CHECKOUT_V2", "NEW_FLAG"])),
        "{audit}"
    );
}
