//! Tasks as operators meet them, through the real binaries: `cutover run`
//! (a command once on one node with the environment's current release, its
//! output streamed, its exit code as the CLI's own, what it ran in the
//! audit log), and a deploy's `[migrate]` step (once, on one node, before
//! any node switched; a failing one leaves every node on the old release).

use std::time::{Duration, Instant};

use cutover_integration_tests::{dev_spec, running, sigkill, text, versions, DevCluster};
use serde_json::Value;

/// Each test's web port: tests run at once, and dev clusters share the
/// nodes' loopback addresses.
const RUN_PORT: u16 = 18_490;
const MIGRATE_PORT: u16 = 18_491;
const ROLLBACK_PORT: u16 = 18_492;
const CRASH_PORT: u16 = 18_493;

fn spec(port: u16, version: &str) -> String {
    dev_spec(port, version, "batch = 2\nmin_healthy_time = \"200ms\"", "")
}

/// The same app with a migration that appends a line to `runs` (a row
/// per run proves it ran once) and prints `say`, then exits `code`.
fn spec_with_migration(
    port: u16,
    version: &str,
    runs: &std::path::Path,
    say: &str,
    code: u8,
) -> String {
    format!(
        r#"{}
[migrate]
service = "web"
command = ["sh", "-c", "echo ran >> {runs}; echo {say}; exit {code}"]
checks = [["test", "-f", "app.py"]]
timeout = "1m"
"#,
        spec(port, version),
        runs = runs.display()
    )
}

fn deploy(cluster: &DevCluster, text: &str, version: &str) -> std::process::Output {
    deploy_with(cluster, text, version, &["--wait"])
}

fn deploy_with(
    cluster: &DevCluster,
    text: &str,
    version: &str,
    extra: &[&str],
) -> std::process::Output {
    cluster.deploy_spec(text, version, extra)
}

/// Waits until `path` holds `lines` lines.
fn wait_for_lines(path: &std::path::Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(path).map_or(0, |t| t.lines().count()) < lines {
        assert!(
            Instant::now() < deadline,
            "{} never had {lines} lines",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cutover_run_streams_a_commands_output_and_exits_with_its_code() {
    let cluster = DevCluster::up(2);
    let deployed = deploy(&cluster, &spec(RUN_PORT, "v1"), "v1");
    assert!(
        deployed.status.success(),
        "{}{}",
        text(&deployed.stderr),
        cluster.log_tails()
    );

    let ran = cluster.cutover(&[
        "run",
        "web",
        "--env",
        "local",
        "--",
        "sh",
        "-c",
        "test -f app.py && echo \"$GREETING $CUTOVER_VERSION\"; echo oops >&2; exit 3",
    ]);
    let (stdout, stderr) = (text(&ran.stdout), text(&ran.stderr));
    assert_eq!(ran.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.contains("hello v1"), "{stdout}");
    assert!(stdout.contains("oops"), "stderr comes along: {stdout}");
    assert!(stderr.contains("running on node-"), "{stderr}");
    assert!(stderr.contains("exit status: 3"), "{stderr}");

    let ran = cluster.cutover(&[
        "run", "web", "--env", "local", "--node", "node-2", "--", "true",
    ]);
    assert_eq!(ran.status.code(), Some(0), "{}", text(&ran.stderr));
    assert!(text(&ran.stderr).contains("running on node-2"));

    let timed = cluster.cutover(&[
        "run",
        "web",
        "--env",
        "local",
        "--timeout",
        "300ms",
        "--",
        "sleep",
        "30",
    ]);
    assert_eq!(timed.status.code(), Some(124), "{}", text(&timed.stderr));
    assert!(
        text(&timed.stderr).contains("killed"),
        "{}",
        text(&timed.stderr)
    );

    // Mistakes are named and run nothing.
    for (args, expect) in [
        (
            vec!["run", "web", "--env", "staging", "--", "true"],
            "no current release",
        ),
        (
            vec![
                "run", "web", "--env", "local", "--node", "node-9", "--", "true",
            ],
            "node-9",
        ),
        (
            vec![
                "run",
                "web",
                "--env",
                "local",
                "--release",
                "web-v0",
                "--",
                "true",
            ],
            "no kept release",
        ),
    ] {
        let refused = cluster.cutover(&args);
        let stderr = text(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }

    // The command is audited (with who ran it); its output is not.
    let audit = cluster.cutover(&["audit", "-o", "json"]);
    let audit: Value = serde_json::from_slice(&audit.stdout).unwrap();
    let runs: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "run_task")
        .collect();
    assert_eq!(runs.len(), 6, "{audit:#}");
    let first = runs[0].to_string();
    assert!(first.contains("CUTOVER_VERSION"), "{first}");
    assert!(
        !audit.to_string().contains("hello v1"),
        "no output in the audit log"
    );
}

#[test]
fn a_deploys_migration_runs_once_before_any_switch_and_a_failing_one_changes_nothing() {
    let cluster = DevCluster::up(3);
    let runs = cluster.path("runs");
    let deployed = deploy(
        &cluster,
        &spec_with_migration(MIGRATE_PORT, "v1", &runs, "migrated-v1", 0),
        "v1",
    );
    assert!(
        deployed.status.success(),
        "{}{}",
        text(&deployed.stderr),
        cluster.log_tails()
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\n",
        "once, on one node"
    );
    assert_eq!(versions(MIGRATE_PORT, 3), vec!["v1"; 3]);
    let rollout = cluster.newest_rollout();
    let kinds: Vec<&str> = rollout["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    let at = |kind: &str| {
        kinds
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {kinds:?}"))
    };
    assert!(at("migration_started") < at("migrated"), "{kinds:?}");
    assert!(at("migrated") < at("batch_started"), "{kinds:?}");
    assert!(
        rollout.to_string().contains("migrated-v1"),
        "its output in the timeline"
    );
    let logs = cluster.cutover(&["rollout", "logs", rollout["id"].as_str().unwrap()]);
    let logs = text(&logs.stdout);
    assert!(
        logs.lines()
            .any(|l| l.starts_with("migration node-") && l.ends_with("| migrated-v1")),
        "{logs}"
    );

    // A migration that fails: the deploy fails before any node switched,
    // saying why with the migration's last output, and v1 keeps serving.
    let failed = deploy(
        &cluster,
        &spec_with_migration(MIGRATE_PORT, "v2", &runs, "boom-v2", 3),
        "v2",
    );
    let stderr = text(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\nran\n");
    assert_eq!(versions(MIGRATE_PORT, 3), vec!["v1"; 3]);
    let rollout = cluster.newest_rollout();
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let cause = rollout["error"].to_string();
    assert!(
        cause.contains("exit status: 3") && cause.contains("boom-v2"),
        "{cause}"
    );
    assert!(
        rollout["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] != "switched"),
        "{rollout:#}"
    );

    // Left out on request (audited), or on a node of the operator's choice.
    let skipped = deploy_with(
        &cluster,
        &spec_with_migration(MIGRATE_PORT, "v4", &runs, "skipped", 0),
        "v4",
        &["--wait", "--skip-migrate"],
    );
    assert!(skipped.status.success(), "{}", text(&skipped.stderr));
    assert_eq!(versions(MIGRATE_PORT, 3), vec!["v4"; 3]);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\nran\n",
        "skipped"
    );
    let audit: Value =
        serde_json::from_slice(&cluster.cutover(&["audit", "-o", "json"]).stdout).unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "deploy" && e["arguments"]["skip_migrate"] == true),
        "{audit:#}"
    );
    let unknown = deploy_with(
        &cluster,
        &spec_with_migration(MIGRATE_PORT, "v5", &runs, "here", 0),
        "v5",
        &["--wait", "--migrate-node", "node-9"],
    );
    let stderr = text(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("node-9"),
        "{stderr}"
    );
    let placed = deploy_with(
        &cluster,
        &spec_with_migration(MIGRATE_PORT, "v5", &runs, "here", 0),
        "v5",
        &["--wait", "--migrate-node", "node-3"],
    );
    assert!(placed.status.success(), "{}", text(&placed.stderr));
    let rollout = cluster.newest_rollout();
    let started = rollout["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "migration_started")
        .unwrap();
    assert_eq!(started["node"], "node-3", "{rollout:#}");

    // A destructive migration before the cutover is refused whole.
    let contract = spec_with_migration(MIGRATE_PORT, "v3", &runs, "x", 0)
        .replace("timeout = \"1m\"", "phase = \"contract\"");
    let refused = deploy(&cluster, &contract, "v3");
    let stderr = text(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("migrate.phase") && stderr.contains("when = \"after\""),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\nran\nran\n",
        "nothing ran"
    );
}

/// The coordinator killed with SIGKILL while the migration runs: after its
/// restart the rollout carries on and the migration has run once.
#[test]
fn a_migration_runs_once_across_a_coordinator_killed_while_it_runs() {
    let cluster = DevCluster::up(2);
    let runs = cluster.path("runs");
    let slow = spec_with_migration(CRASH_PORT, "v1", &runs, "done", 0)
        .replace("echo ran >> ", "sleep 2; echo ran >> ");
    let started = cluster.path("started");
    let slow = slow.replace(
        "command = [\"sh\", \"-c\", \"sleep 2;",
        &format!(
            "command = [\"sh\", \"-c\", \"echo go >> {}; sleep 2;",
            started.display()
        ),
    );
    let deployed = deploy_with(&cluster, &slow, "v1", &[]);
    assert!(deployed.status.success(), "{}", text(&deployed.stderr));
    wait_for_lines(&started, 1);

    let pid = cluster.pid("coordinator.pid");
    sigkill(pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = cluster.path("coordinator.toml").display().to_string();
    cluster.restart(
        "cutover",
        &["server", "--config", &config],
        "coordinator.pid",
        "coordinator.log",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let rollout = loop {
        let list = cluster.cutover(&["rollout", "list", "-o", "json"]);
        if let Ok(list) = serde_json::from_slice::<Value>(&list.stdout) {
            if list[0]["state"] == "succeeded" {
                break cluster.newest_rollout();
            }
            let state = list[0]["state"].as_str().unwrap_or_default().to_string();
            assert!(
                matches!(state.as_str(), "running" | "pending"),
                "the rollout ended {state}: {:#}{}",
                cluster.newest_rollout(),
                cluster.log_tails()
            );
        }
        assert!(Instant::now() < deadline, "{}", cluster.log_tails());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(rollout.to_string().contains("recovered"), "{rollout:#}");
    assert_eq!(
        std::fs::read_to_string(&started).unwrap(),
        "go\n",
        "started once"
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n", "ran once");
}

/// A contract migration makes the releases before it unsafe to return to:
/// a rollback past it is refused, naming it, unless an admin overrides it
/// with a reason (audited).
#[test]
fn a_rollback_past_a_contract_migration_is_refused_unless_an_admin_says_why() {
    let cluster = DevCluster::up(2);
    let runs = cluster.path("runs");
    let first = deploy(&cluster, &spec(ROLLBACK_PORT, "v1"), "v1");
    assert!(first.status.success(), "{}", text(&first.stderr));
    let contract = spec_with_migration(ROLLBACK_PORT, "v2", &runs, "dropped", 0)
        .replace("timeout = \"1m\"", "phase = \"contract\"\nwhen = \"after\"");
    let second = deploy(&cluster, &contract, "v2");
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n");
    let releases = cluster.cutover(&["releases", "web", "--env", "local", "-o", "json"]);
    let releases: Value = serde_json::from_slice(&releases.stdout).unwrap();
    assert_eq!(
        releases[0]["migration"]["phase"], "contract",
        "{releases:#}"
    );
    assert_eq!(releases[1]["migration"], Value::Null, "{releases:#}");

    let refused = cluster.cutover(&["rollback", "web", "--env", "local", "--wait"]);
    let stderr = text(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("contract migration") && stderr.contains("--ignore-schema"),
        "{stderr}"
    );
    assert_eq!(versions(ROLLBACK_PORT, 2), vec!["v2"; 2], "nothing changed");

    let reason = "v1 reads no dropped column";
    let forced = cluster.cutover(&[
        "rollback",
        "web",
        "--env",
        "local",
        "--ignore-schema",
        "--reason",
        reason,
        "--wait",
    ]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_eq!(versions(ROLLBACK_PORT, 2), vec!["v1"; 2]);
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\n",
        "a rollback runs no migration"
    );
    let audit = cluster.cutover(&["audit", "-o", "json"]);
    assert!(
        text(&audit.stdout).contains(reason),
        "the reason is audited"
    );
}
