//! Backups and restore drills of a real PostgreSQL with real pgBackRest,
//! scheduled and run by cutover through the real binaries: a backup job
//! every few seconds (full, then incremental) with its facts and
//! `cutover_backup_age_seconds`; rows written, backed up, more rows
//! archived, and a drill whose restored copy has them all; a drill whose
//! check fails; `cutover recovery status`; and the backup gate of a
//! migration (refused when stale, passing after `--backup-now`, skipped
//! by an admin with a reason, audited).

use std::time::{Duration, Instant};

use cutover_integration_tests::pgbackrest::{PgBackRestCluster, SUPERUSER};
use cutover_integration_tests::{dev_spec, text, DevCluster};
use serde_json::Value;

const PORT: u16 = 18_625;

fn pgbackrest_table(db: &PgBackRestCluster, extra: &str) -> String {
    format!(
        "stanza = {:?}\nconfig = {:?}\nuser = {:?}\ndb_user = {SUPERUSER:?}\n{extra}",
        db.stanza(),
        db.config_path().display().to_string(),
        db.os_user(),
    )
}

fn spec(db: &PgBackRestCluster, version: &str, migrate: &str) -> String {
    let scratch = format!(
        "scratch_dir = {:?}\n",
        db.scratch_parent().display().to_string()
    );
    let tail = format!(
        r#"
[jobs.db-backup]
kind = "backup"
dataset = "shop-db"
rpo = "15m"
every = "4s"
timeout = "2m"
[jobs.db-backup.pgbackrest]
{backup}
[jobs.drill]
kind = "restore_test"
dataset = "shop-db"
rto = "10m"
schedule = "0 4 * * *"
timeout = "3m"
[jobs.drill.pgbackrest]
{drill}freshness_sql = "SELECT max(created_at) FROM orders"
[[jobs.drill.verify]]
name = "every order, with the archived WAL"
sql = "SELECT count(*) FROM orders"
equals = "150"
[[jobs.drill.verify]]
name = "fresh"
sql = "SELECT max(created_at) FROM orders"
max_age = "1h"

[jobs.bad-drill]
kind = "restore_test"
dataset = "shop-db"
schedule = "0 5 * * *"
timeout = "3m"
[jobs.bad-drill.pgbackrest]
{drill}
[[jobs.bad-drill.verify]]
name = "a million orders"
sql = "SELECT count(*) FROM orders"
at_least = 1000000
{migrate}"#,
        backup = pgbackrest_table(db, "type = \"incr\"\n"),
        drill = pgbackrest_table(db, &scratch),
    );
    dev_spec(
        PORT,
        version,
        "batch = 2\nmin_healthy_time = \"200ms\"",
        &tail,
    )
}

fn cutover_ok(cluster: &DevCluster, args: &[&str]) -> String {
    let out = cluster.cutover(args);
    assert!(
        out.status.success(),
        "cutover {args:?}: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        cluster.log_tails()
    );
    text(&out.stdout)
}

fn series(name: &str) -> String {
    format!(r#"{name}{{app="shop",env="local",dataset="shop-db"}}"#)
}

#[test]
fn backups_drills_recovery_status_and_the_backup_gate_on_real_pgbackrest() {
    let db = PgBackRestCluster::start();
    db.psql("postgres", "CREATE TABLE orders (id serial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())");
    db.psql(
        "postgres",
        "INSERT INTO orders SELECT FROM generate_series(1, 100)",
    );
    let cluster = DevCluster::up(2);
    let file = cluster.path("cutover.toml");
    std::fs::write(&file, spec(&db, "v1", "")).unwrap();
    cutover_ok(
        &cluster,
        &[
            "jobs",
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--env",
            "local",
        ],
    );

    // Scheduled backups: the first is full, the next incremental, each tick
    // on one node, with pgBackRest's facts.
    let deadline = Instant::now() + Duration::from_secs(120);
    let runs = loop {
        let runs = cluster.job_history("db-backup");
        if runs.iter().filter(|r| r["state"] == "succeeded").count() >= 2 {
            break runs;
        }
        assert!(runs.iter().all(|r| r["state"] != "failed"), "{runs:#?}");
        assert!(
            Instant::now() < deadline,
            "two backups did not succeed within 120 s: {runs:#?}\n{}",
            cluster.log_tails()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    cutover_ok(&cluster, &["jobs", "pause", "db-backup", "--env", "local"]);
    let mut done: Vec<&Value> = runs.iter().filter(|r| r["state"] == "succeeded").collect();
    done.reverse();
    assert_eq!(done[0]["facts"]["type"], "full", "{:#}", done[0]);
    assert_eq!(done[1]["facts"]["type"], "incr", "{:#}", done[1]);
    assert!(
        done[0]["facts"]["size_bytes"].as_u64().unwrap() > 1_000_000,
        "{:#}",
        done[0]
    );
    let dues: std::collections::BTreeSet<&str> =
        runs.iter().map(|r| r["due"].as_str().unwrap()).collect();
    assert_eq!(dues.len(), runs.len(), "one run per tick: {runs:#?}");
    // The backup's age follows real time between backups.
    let age = cluster
        .metric(&series("cutover_backup_age_seconds"))
        .expect("a backup age");
    std::thread::sleep(Duration::from_secs(2));
    let later = cluster
        .metric(&series("cutover_backup_age_seconds"))
        .unwrap();
    assert!(later >= age + 1.5, "{age} then {later}");
    assert_eq!(
        cluster.metric(&series("cutover_rpo_target_seconds")),
        Some(900.0)
    );

    // Rows after the backup, archived: the drill's copy has them.
    db.psql(
        "postgres",
        "INSERT INTO orders SELECT FROM generate_series(1, 50)",
    );
    db.archive_now();
    let bad = cluster.cutover(&[
        "jobs",
        "run",
        "bad-drill",
        "--env",
        "local",
        "--wait",
        "-o",
        "json",
    ]);
    assert!(!bad.status.success());
    let bad: Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(bad["state"], "failed");
    let reason = bad["detail"].as_str().unwrap();
    assert!(
        reason.contains("check \"a million orders\" failed: expected at least 1000000, saw 150"),
        "{reason}"
    );
    let status = cluster.cutover(&["recovery", "status", "--env", "local"]);
    assert!(
        !status.status.success(),
        "a failed newest drill is a breach"
    );
    assert!(
        text(&status.stdout).contains("breached"),
        "{}",
        text(&status.stdout)
    );

    let drill = cutover_ok(
        &cluster,
        &[
            "jobs", "run", "drill", "--env", "local", "--wait", "-o", "json",
        ],
    );
    let drill: Value = serde_json::from_str(&drill).unwrap();
    assert_eq!(drill["state"], "succeeded", "{drill:#}");
    let age = drill["facts"]["data_age_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "{drill:#}");
    let status: Value = serde_json::from_str(&cutover_ok(
        &cluster,
        &["recovery", "status", "--env", "local", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(status[0]["dataset"], "shop-db");
    assert_eq!(status[0]["verdict"], "met", "{status:#}");
    let took = cluster
        .metric(&series("cutover_restore_test_duration_seconds"))
        .expect("a drill duration");
    assert!(took > 0.5 && took < 600.0, "{took}");
    assert_eq!(
        cluster.metric(&series("cutover_rto_target_seconds")),
        Some(600.0)
    );

    // The gate: a migration that needs a backup at most 3 s old and tested.
    let gated = "[migrate]\nservice = \"web\"\ncommand = [\"true\"]\nrequire_backup = { dataset = \"shop-db\", max_age = \"3s\", restore_tested = true }\n";
    std::thread::sleep(Duration::from_secs(3));
    let refused = cluster.deploy_spec(&spec(&db, "v1", gated), "v1", &["--wait"]);
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("requires a backup of shop-db at most 3s old")
            && message.contains("--backup-now"),
        "{message}"
    );
    assert!(
        cluster
            .cutover(&["rollout", "list", "-o", "json"])
            .stdout
            .starts_with(b"[]"),
        "nothing was created"
    );

    let passed = cluster.deploy_spec(&spec(&db, "v1", gated), "v1", &["--wait", "--backup-now"]);
    assert!(
        passed.status.success(),
        "{}{}",
        text(&passed.stderr),
        cluster.log_tails()
    );
    assert!(
        text(&passed.stderr).contains("backing up shop-db"),
        "{}",
        text(&passed.stderr)
    );

    std::thread::sleep(Duration::from_secs(4));
    let skipped = cluster.deploy_spec(
        &spec(&db, "v2", gated),
        "v2",
        &[
            "--wait",
            "--skip-backup-gate",
            "--reason",
            "restore drill passed an hour ago",
        ],
    );
    assert!(skipped.status.success(), "{}", text(&skipped.stderr));
    let audit: Value =
        serde_json::from_slice(&cluster.cutover(&["audit", "-o", "json"]).stdout).unwrap();
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "deploy" && e["arguments"]["skip_backup_gate"] == true)
        .expect("the skipped gate is audited");
    assert_eq!(
        entry["arguments"]["reason"], "restore drill passed an hour ago",
        "{entry:#}"
    );
}
