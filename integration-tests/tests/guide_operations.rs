//! The operator guide's day-to-day chapters, run as written: the `sh`
//! blocks of "Operator access", "Staging to production", "Changing a
//! service's environment", "Scaling a service", "Rolling back", "Stopping
//! and removing a service" and "Webhooks" in docs/operator-guide.md, taken
//! from the markdown and run by `sh -e` in the operator's working dir (its
//! `cutover.toml`, the release archives and files they name), with the
//! `cutover` binary on PATH and the CLI config of the operator the guide
//! has create (`alice`, a deployer; the admin for what needs one). A
//! command that fails, or a flag that drifted from the CLI, fails the test.
//! Each chapter's effect is then checked through the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cutover_integration_tests::cli::Cli;
use cutover_integration_tests::{archive, bin, find, ready, Cluster, Tuning, APP, WORKER};
use serde_json::Value;

/// The `sh` blocks of the guide's chapter `heading` (up to the next
/// heading of any level), in order.
fn blocks(guide: &str, heading: &str) -> Vec<String> {
    let start = guide
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the guide has no chapter {heading:?}"));
    let chapter = &guide[start + heading.len() + 2..];
    let end = chapter
        .match_indices("\n#")
        .find(|(i, _)| !in_block(&chapter[..*i]))
        .map_or(chapter.len(), |(i, _)| i);
    chapter[..end]
        .split("```sh\n")
        .skip(1)
        .map(|rest| rest[..rest.find("```").expect("a closed block")].to_string())
        .collect()
}

/// Whether `text` ends inside a code block (a `#` comment line there is
/// no heading).
fn in_block(text: &str) -> bool {
    text.matches("\n```").count() % 2 == 1
}

/// Runs `script` as the guide's operator whose CLI config is `config`, in
/// `dir`: its output, or a panic naming the chapter.
fn run(chapter: &str, script: &str, dir: &Path, config: &Path) -> String {
    let path = format!(
        "{}:{}",
        bin("cutover").parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("sh")
        .args(["-e", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("CUTOVER_CLI_CONFIG", config)
        .env("HOME", "/nonexistent")
        .output()
        .expect("sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the guide's {chapter:?} failed as written ({}):\n{script}\n{text}",
        output.status
    );
    text
}

/// The shop the guide's examples run: web, its queue workers (horizon) and
/// a service to retire (legacy-api), in staging and production.
fn spec(web: u16, legacy: u16) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{web}"
env = {{ CHECKOUT_V2 = "on", DEBUGBAR_ENABLED = "true" }}
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"

[services.horizon]
command = ["python3", "worker.py"]
min_healthy_time = "300ms"

[services.legacy-api]
command = ["python3", "app.py"]
listen = ":{legacy}"
[services.legacy-api.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"

[strategy]
batch = 1
min_healthy_time = "200ms"

[environments.staging]
nodes = {{ env = "staging" }}

[environments.production]
nodes = {{ env = "production" }}
"#
    )
}

fn current(cli: &Cli, config: &Path, service: &str) -> Option<Value> {
    cli.json(config, &["releases", service, "--env", "production"])
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_day_to_day_chapters_work_as_written() {
    let guide = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-guide.md"),
    )
    .unwrap();
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    for (name, env) in [("node-1", "production"), ("node-2", "staging")] {
        let mut config = cluster.agent_config(name);
        config.labels = [("env".to_string(), env.to_string())].into();
        let agent = cutover_integration_tests::spawn_agent(config).await;
        cluster.agents.push(agent);
    }
    cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            ["node-1", "node-2"]
                .iter()
                .all(|name| find(n, name).is_some_and(ready))
        })
        .await;
    let scratch = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, scratch.path());
    // The operator's working dir: the spec and the builds the guide names.
    let dir: PathBuf = scratch.path().join("shop");
    std::fs::create_dir(&dir).unwrap();
    let range = 40000..=44999;
    let web = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &range, &[]).unwrap();
    let legacy = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &range, &[web]).unwrap();
    std::fs::write(dir.join("cutover.toml"), spec(web, legacy)).unwrap();
    for (name, comment) in [("shop-v41.tar.gz", "v41"), ("shop-v42.tar.gz", "v42")] {
        archive(
            &dir,
            name,
            &[
                ("app.py", &format!("{APP}\n# {comment}\n")),
                ("worker.py", WORKER),
            ],
        );
    }
    std::fs::write(dir.join("hook-key.txt"), "a-shared-webhook-key").unwrap();

    // "Operator access": the admin creates a deployer and a viewer.
    let chapter = "## Operator access";
    let access = blocks(&guide, chapter);
    run(chapter, &access[1], &dir, &admin);
    let alice = dir.join("alice/cli.toml");
    assert!(alice.exists() && dir.join("vera/cli.toml").exists());

    // What ran before the guide's examples: v41 everywhere, first
    // deployed by the admin (a first deploy pins the environment's nodes).
    for env in ["staging", "production"] {
        let script = format!(
            "cutover deploy -f cutover.toml --env {env} --version v41 --artifact shop-v41.tar.gz --wait"
        );
        run("(setup)", &script, &dir, &admin);
    }

    // "Staging to production": v42 in staging, then promoted.
    let chapter = "### Staging to production";
    let promotion = blocks(&guide, chapter);
    let text = run(chapter, &promotion[0], &dir, &alice);
    assert!(text.contains("staging/web-v42-"), "{text}");
    let v42 = current(&cli, &admin, "web").expect("v42 is current");
    let id = v42["release"]["id"].as_str().unwrap();
    assert!(id.starts_with("web-v42-"), "{v42:#}");

    // "Changing a service's environment".
    let chapter = "### Changing a service's environment";
    let text = run(chapter, &blocks(&guide, chapter)[0], &dir, &alice);
    assert!(text.contains("CHECKOUT_V2"), "{text}");

    // "Scaling a service".
    let chapter = "### Scaling a service";
    let text = run(chapter, &blocks(&guide, chapter)[0], &dir, &alice);
    assert!(text.contains("x4"), "{text}");

    // "Rolling back": all at once, then in batches.
    let chapter = "### Rolling back";
    let before = current(&cli, &admin, "web").expect("a current release");
    run(chapter, &blocks(&guide, chapter)[0], &dir, &alice);
    let after = current(&cli, &admin, "web").expect("a current release");
    assert_ne!(before["release"]["id"], after["release"]["id"]);

    // "Stopping and removing a service".
    let chapter = "### Stopping and removing a service";
    run(chapter, &blocks(&guide, chapter)[0], &dir, &alice);
    assert!(current(&cli, &admin, "web").is_some(), "web runs again");
    assert!(current(&cli, &admin, "legacy-api").is_none(), "removed");

    // "Webhooks": the admin sets the key the webhooks sign with.
    let chapter = "### Webhooks";
    run(chapter, &blocks(&guide, chapter)[0], &dir, &admin);
    let (ok, text) = cli.run(&admin, &["secret", "list", "--env", "production"]);
    assert!(ok && text.contains("HOOK_KEY"), "{text}");
}
