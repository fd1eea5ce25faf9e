//! The coordinator's own state, backed up and restored with real binaries
//! (`cutover dev up`): a backup taken while the cluster runs, the data dir
//! lost, `cutover admin restore` into an empty one, and the restarted
//! coordinator carries on: agents reconnect on their own, release history,
//! audit log and secrets are intact, a deploy that uses the secret and a
//! rollback to a kept release work, and numbers go on above the old ones.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use cutover_integration_tests::{
    app_archive, bin, body, http_get, running, sha256_hex, DevCluster,
};
use serde_json::Value;

/// Ports of this file's releases, used by no other test.
const PORTS: std::ops::RangeInclusive<u16> = 18600..=18609;

fn spec(port: u16, version: &str) -> String {
    format!(
        r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
secrets = ["DB_PASSWORD"]
[services.web.env]
VERSION = "{version}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "10s"
[strategy]
batch = 1
[environments.local]
nodes = {{ env = "local" }}
"#
    )
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `cutover -o json ARGS`, which must succeed; its JSON.
fn json(cluster: &DevCluster, args: &[&str]) -> Value {
    let output = cluster.cutover(&[&["-o", "json"], args].concat());
    assert!(
        output.status.success(),
        "cutover {args:?}: {}\n{}",
        text(&output),
        cluster.log_tails()
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

/// What node `i` serves at `path`.
fn served(port: u16, node: u8, path: &str) -> String {
    body(&http_get(&format!("127.0.0.{}:{port}", 11 + node), path)).to_string()
}

fn deploy(cluster: &DevCluster, port: u16, version: &str) -> Value {
    let file = cluster.path(&format!("cutover-{version}.toml"));
    std::fs::write(&file, spec(port, version)).unwrap();
    let (artifact, _) = app_archive(cluster.dir.path());
    let artifact = artifact.trim_start_matches("file://").to_string();
    let file = file.to_str().unwrap();
    json(
        cluster,
        &[
            "deploy",
            "-f",
            file,
            "--env",
            "local",
            "--version",
            version,
            "--artifact",
            &artifact,
            "--wait",
        ],
    )
}

/// The number in a rollout id (`web-7`, `shop-d8`).
fn number(id: &str) -> u64 {
    let digits = id.rsplit('-').next().unwrap().trim_start_matches('d');
    digits.parse().unwrap_or_else(|_| panic!("rollout id {id}"))
}

fn rollout_numbers(cluster: &DevCluster) -> Vec<u64> {
    let list = json(cluster, &["rollout", "list"]);
    let list = list.as_array().unwrap();
    list.iter()
        .map(|r| number(r["id"].as_str().unwrap()))
        .collect()
}

/// SIGTERM to the coordinator, as `systemctl stop` sends; returns once it
/// has exited.
fn stop_coordinator(cluster: &DevCluster) {
    let pid = cluster.pid("coordinator.pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(pid) {
        assert!(Instant::now() < deadline, "the coordinator did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn restore(cluster: &DevCluster, file: &Path) -> Output {
    let config = cluster.path("coordinator.toml");
    let args = [
        "admin",
        "restore",
        file.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    cluster.cutover(&args)
}

#[test]
fn a_lost_data_dir_comes_back_from_a_backup_taken_while_the_coordinator_runs() {
    let cluster = DevCluster::up(2);
    let port = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &PORTS, &[])
        .expect("a free port in 18600-18609");
    let marker = format!("cutover-marker-{:016x}", rand::random::<u64>());
    let output =
        cluster.cutover_with_input(&["secret", "set", "--env", "local", "DB_PASSWORD"], &marker);
    assert!(output.status.success(), "{}", text(&output));
    let first = deploy(&cluster, port, "v1");
    let first_release = first["release"]["id"].as_str().unwrap().to_string();
    deploy(&cluster, port, "v2");
    for node in 0..2 {
        assert_eq!(served(port, node, "/"), "v2");
        assert_eq!(
            served(port, node, "/env-sha256/DB_PASSWORD"),
            sha256_hex(&marker)
        );
    }

    // Only an admin takes a backup; a viewer's try is refused and audited.
    let viewer = cluster.path("vera");
    let viewer_cli = viewer.join("cli.toml");
    json(
        &cluster,
        &[
            "operator",
            "create",
            "vera",
            "--role",
            "viewer",
            "--out",
            viewer.to_str().unwrap(),
        ],
    );
    let refused_file = cluster.path("by-vera.backup");
    let refused = std::process::Command::new(bin("cutover"))
        .args([
            "--cli-config",
            viewer_cli.to_str().unwrap(),
            "admin",
            "backup",
            "--out",
        ])
        .arg(&refused_file)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("backup_store needs the admin role"),
        "{}",
        text(&refused)
    );
    assert!(!refused_file.exists());

    // What the restored coordinator must show again, read before the
    // backup (the backup's own audit entry comes after its cut).
    let releases = json(&cluster, &["releases", "web", "--env", "local"]);
    let audit = json(&cluster, &["audit"]);
    let audit = audit.as_array().unwrap().clone();
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "backup_store" && e["who"] == "operator/vera"),
        "the refusal is audited: {audit:#?}"
    );
    let secrets = json(&cluster, &["secret", "list", "--env", "local"]);
    let numbers_before = rollout_numbers(&cluster);

    let file = cluster.path("coordinator.backup");
    let taken = json(
        &cluster,
        &["admin", "backup", "--out", file.to_str().unwrap()],
    );
    assert_eq!(taken["tables"]["secrets"], 1, "{taken:#}");
    assert_eq!(taken["tables"]["releases"], 2, "{taken:#}");
    assert_eq!(taken["logs"]["audit"], audit.len(), "{taken:#}");
    assert_eq!(
        cutover_common::modes::mode_of(&file).unwrap(),
        0o600,
        "the backup is private"
    );

    // The data dir is lost with the coordinator stopped.
    stop_coordinator(&cluster);
    let data_dir = cluster.path("coordinator");
    std::fs::remove_dir_all(&data_dir).unwrap();
    // A data dir with anything in it is refused, by name.
    std::fs::create_dir_all(data_dir.join("artifacts")).unwrap();
    let output = restore(&cluster, &file);
    assert!(!output.status.success());
    assert!(
        text(&output).contains(&format!("data dir {} is not empty", data_dir.display())),
        "{}",
        text(&output)
    );
    std::fs::remove_dir_all(&data_dir).unwrap();
    let output = restore(&cluster, &file);
    assert!(output.status.success(), "{}", text(&output));

    let config = cluster.path("coordinator.toml").display().to_string();
    cluster.restart(
        "cutover",
        &["server", "--config", &config],
        "coordinator.pid",
        "coordinator.log",
    );
    cluster.wait_for_nodes(Duration::from_secs(60), |nodes| {
        nodes.len() == 2
            && nodes
                .iter()
                .all(|n| n["status"] == "ready" && n["connected"] == true)
    });

    assert_eq!(
        json(&cluster, &["releases", "web", "--env", "local"]),
        releases
    );
    assert_eq!(
        json(&cluster, &["secret", "list", "--env", "local"]),
        secrets
    );
    let restored_audit = json(&cluster, &["audit"]);
    let restored_audit = restored_audit.as_array().unwrap();
    assert_eq!(&restored_audit[..audit.len()], &audit[..]);

    // A deploy that needs the secret, then a rollback to a kept release.
    deploy(&cluster, port, "v3");
    for node in 0..2 {
        assert_eq!(served(port, node, "/"), "v3");
        assert_eq!(
            served(port, node, "/env-sha256/DB_PASSWORD"),
            sha256_hex(&marker)
        );
    }
    let args = [
        "rollback",
        "web",
        "--env",
        "local",
        "--to",
        &first_release,
        "--wait",
    ];
    json(&cluster, &args);
    for node in 0..2 {
        assert_eq!(served(port, node, "/"), "v1");
        assert_eq!(
            served(port, node, "/env-sha256/DB_PASSWORD"),
            sha256_hex(&marker)
        );
    }

    // Numbers go on above every one handed out before the backup.
    let before_max = numbers_before.iter().max().copied().unwrap();
    let after = rollout_numbers(&cluster);
    let new: Vec<u64> = after
        .into_iter()
        .filter(|n| !numbers_before.contains(n))
        .collect();
    assert_eq!(new.len(), 2, "the deploy and the rollback");
    assert!(
        new.iter().all(|n| *n > before_max),
        "{new:?} after {before_max}"
    );
    let last_seq = audit
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    let restored_audit = json(&cluster, &["audit"]);
    let newest = restored_audit.as_array().unwrap().last().unwrap().clone();
    assert_eq!(newest["action"], "rollback", "{newest:#}");
    assert!(newest["seq"].as_u64().unwrap() > last_seq, "{newest:#}");
}
