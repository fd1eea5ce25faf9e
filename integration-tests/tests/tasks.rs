//! `cutover run` as an operator uses it, through the real binaries: a
//! command once on one node with the environment's current release, its
//! output streamed, its exit code as the CLI's own, and what it ran in the
//! audit log.

use cutover_integration_tests::{app_archive, DevCluster};
use serde_json::Value;

const PORT: u16 = 18_490;

fn spec() -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{PORT}"
[services.web.env]
GREETING = "hello"
[services.web.health]
path = "/health"
interval = "100ms"

[strategy]
batch = 2
min_healthy_time = "200ms"

[environments.local]
nodes = {{ env = "local" }}
"#
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn cutover_run_streams_a_commands_output_and_exits_with_its_code() {
    let cluster = DevCluster::up(2);
    let file = cluster.path("cutover.toml");
    std::fs::write(&file, spec()).unwrap();
    let (url, _) = app_archive(cluster.dir.path());
    let archive = url.trim_start_matches("file://").to_string();
    let deployed = cluster.cutover(&[
        "deploy",
        "-f",
        file.to_str().unwrap(),
        "--env",
        "local",
        "--version",
        "v1",
        "--artifact",
        &archive,
        "--wait",
    ]);
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
