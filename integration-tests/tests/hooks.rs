//! A deploy's hooks through the real binaries: each hook appends a marker
//! line to a file, so the file is the order they ran in and what each saw
//! of its environment; failing hooks stop what they should, and the old
//! release keeps serving.

use cutover_integration_tests::{dev_spec, text, versions, DevCluster};

const ORDER_PORT: u16 = 18_560;
const FAILURE_PORT: u16 = 18_561;

/// The test app on two nodes, a batch at a time; `extra` adds the hooks.
fn spec(port: u16, version: &str, extra: &str) -> String {
    dev_spec(
        port,
        version,
        "batch = 1\nmin_healthy_time = \"100ms\"",
        extra,
    )
}

/// A hook at `at` that appends `line` (shell-expanded) to `markers` and
/// exits `code`.
fn hook(at: &str, markers: &std::path::Path, line: &str, code: u8) -> String {
    format!(
        r#"
[[hooks]]
at = "{at}"
command = ["sh", "-c", "echo \"{line}\" >> {markers}; exit {code}"]
timeout = "30s"
"#,
        markers = markers.display()
    )
}

fn deploy(cluster: &DevCluster, text: &str, version: &str) -> std::process::Output {
    cluster.deploy_spec(text, version, &["--wait"])
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn hooks_run_in_order_around_the_migration_and_each_nodes_switch_with_the_deploys_env() {
    let cluster = DevCluster::up(2);
    let markers = cluster.path("markers");
    let hooks = [
        hook(
            "post_deploy",
            &markers,
            "post_deploy $CUTOVER_VERSION after $CUTOVER_PREVIOUS_RELEASE",
            0,
        ),
        hook(
            "pre_activate",
            &markers,
            "pre_activate $HOST $CUTOVER_ROLLOUT $GREETING",
            0,
        ),
        hook(
            "post_activate",
            &markers,
            "post_activate $HOST port=$PORT",
            0,
        ),
        hook(
            "pre_deploy",
            &markers,
            "pre_deploy $CUTOVER_APP $CUTOVER_ENV $CUTOVER_OPERATOR $(test -f app.py && echo in-release-dir)",
            0,
        ),
    ]
    .concat();
    let migrate = format!(
        "[migrate]\nservice = \"web\"\ncommand = [\"sh\", \"-c\", \"echo migrate >> {}\"]\n",
        markers.display()
    );
    let deployed = deploy(
        &cluster,
        &spec(ORDER_PORT, "v1", &format!("{migrate}{hooks}")),
        "v1",
    );
    assert!(
        deployed.status.success(),
        "{}{}",
        text(&deployed.stderr),
        cluster.log_tails()
    );
    assert_eq!(versions(ORDER_PORT, 2), ["v1", "v1"]);
    let ran = lines(&markers);
    let rollout = cluster.newest_rollout();
    let id = rollout["id"].as_str().unwrap();
    let words = |line: &str| line.split_whitespace().next().unwrap().to_string();
    assert_eq!(
        ran.iter().map(|l| words(l)).collect::<Vec<_>>(),
        [
            "pre_deploy",
            "migrate",
            "pre_activate",
            "post_activate",
            "pre_activate",
            "post_activate",
            "post_deploy"
        ],
        "{ran:#?}"
    );
    assert!(
        ran[0].starts_with("pre_deploy shop local ") && ran[0].ends_with(" in-release-dir"),
        "{ran:#?}"
    );
    assert_eq!(ran[2], format!("pre_activate 127.0.0.11 {id} hello"));
    assert!(
        ran[3].starts_with("post_activate 127.0.0.11 port=") && ran[3].len() > 30,
        "the new release's own port: {ran:#?}"
    );
    assert_eq!(ran[4], format!("pre_activate 127.0.0.12 {id} hello"));
    assert_eq!(ran[6], "post_deploy v1 after ", "a first deploy: {ran:#?}");
    let kinds = rollout["timeline"].to_string();
    assert!(kinds.contains("pre_deploy_started"), "{rollout:#}");
}

#[test]
fn failing_hooks_stop_the_deploy_before_any_switch_and_on_failure_hooks_say_so() {
    let cluster = DevCluster::up(2);
    let markers = cluster.path("markers");
    let deployed = deploy(&cluster, &spec(FAILURE_PORT, "v1", ""), "v1");
    assert!(deployed.status.success(), "{}", text(&deployed.stderr));

    // A failing pre_deploy hook: nothing was touched; on_failure ran.
    let hooks = [
        hook("pre_deploy", &markers, "pre_deploy refused", 4),
        hook("pre_activate", &markers, "pre_activate", 0),
        hook("on_failure", &markers, "on_failure $CUTOVER_RELEASE", 0),
    ]
    .concat();
    let failed = deploy(&cluster, &spec(FAILURE_PORT, "v2", &hooks), "v2");
    assert!(!failed.status.success());
    assert_eq!(versions(FAILURE_PORT, 2), ["v1", "v1"]);
    let ran = lines(&markers);
    assert_eq!(ran.len(), 2, "{ran:#?}");
    assert_eq!(ran[0], "pre_deploy refused");
    assert!(ran[1].starts_with("on_failure web-v2-"), "{ran:#?}");
    let rollout = cluster.newest_rollout();
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert_eq!(rollout["error"]["step"], "pre_deploy", "{rollout:#}");
    assert!(
        rollout["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exit status: 4"),
        "{rollout:#}"
    );

    // A failing post_activate hook: that node's cutover fails before its
    // switch, so v1 keeps serving everywhere.
    std::fs::remove_file(&markers).unwrap();
    let hooks = hook("post_activate", &markers, "post_activate $HOST", 5);
    let failed = deploy(&cluster, &spec(FAILURE_PORT, "v3", &hooks), "v3");
    assert!(!failed.status.success());
    assert_eq!(versions(FAILURE_PORT, 2), ["v1", "v1"]);
    assert_eq!(lines(&markers), ["post_activate 127.0.0.11"]);
    let rollout = cluster.newest_rollout();
    let cause = rollout["error"]["message"].as_str().unwrap().to_string();
    assert!(
        cause.contains("post_activate hook") && cause.contains("exit status: 5"),
        "{cause}"
    );
    assert!(cause.contains("keeps serving"), "{cause}");
}
