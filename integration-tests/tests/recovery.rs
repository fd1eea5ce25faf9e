//! Backups and restore drills on a node, as the coordinator sends them
//! (RunRecovery through a real coordinator to a real agent), against a
//! real PostgreSQL with WAL archived by a real pgBackRest: each test has
//! a cluster and a repository of its own (`PgBackRestCluster`).

use std::path::Path;
use std::time::Duration;

use cutover_integration_tests::pgbackrest::{listening, PgBackRestCluster};
use cutover_integration_tests::{Cluster, Tuning};
use cutover_proto::v1::{self as pb, recovery_check::Expect, run_recovery};
use serde_json::Value;

const SHOP: &str = "shop";

/// A cluster with a `shop` database whose `orders` table has `rows` rows.
fn shop(rows: u32) -> PgBackRestCluster {
    let pg = PgBackRestCluster::start();
    pg.psql("postgres", "create database shop");
    pg.psql(
        SHOP,
        "create table orders (id serial primary key, created_at timestamptz not null default now())",
    );
    add_orders(&pg, rows);
    pg
}

fn add_orders(pg: &PgBackRestCluster, rows: u32) {
    pg.psql(
        SHOP,
        &format!("insert into orders (created_at) select now() from generate_series(1, {rows})"),
    );
}

fn backup(id: &str, pg: &PgBackRestCluster, kind: pb::recovery_backup::Type) -> pb::Command {
    pb::Command {
        command_id: id.into(),
        kind: Some(pb::command::Kind::RunRecovery(pb::RunRecovery {
            timeout_ms: 120_000,
            target: Some(pg.target()),
            action: Some(run_recovery::Action::Backup(pb::RecoveryBackup {
                r#type: kind as i32,
            })),
        })),
    }
}

fn drill(
    id: &str,
    pg: &PgBackRestCluster,
    drill: pb::RestoreDrill,
    timeout_ms: u64,
) -> pb::Command {
    pb::Command {
        command_id: id.into(),
        kind: Some(pb::command::Kind::RunRecovery(pb::RunRecovery {
            timeout_ms,
            target: Some(pg.target()),
            action: Some(run_recovery::Action::RestoreDrill(pb::RestoreDrill {
                scratch_parent: pg.scratch_parent().display().to_string(),
                ..drill
            })),
        })),
    }
}

fn check(name: &str, sql: &str, expect: Expect) -> pb::RecoveryCheck {
    pb::RecoveryCheck {
        name: name.into(),
        sql: sql.into(),
        database: SHOP.into(),
        expect: Some(expect),
    }
}

fn orders_are(count: u32) -> pb::RecoveryCheck {
    check(
        "orders",
        "select count(*) from orders",
        Expect::Equals(count.to_string()),
    )
}

/// Runs `command` on node-1 and returns its RecoveryResult and the
/// progress steps that came before it.
async fn recovery(cluster: &Cluster, command: pb::Command) -> (pb::RecoveryResult, Vec<String>) {
    let (result, steps) = cluster.run_command("node-1", command).await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{result:?}"
    );
    match result.output {
        Some(pb::command_result::Output::Recovery(recovery)) => (recovery, steps),
        other => panic!("expected a recovery result, got {other:?}"),
    }
}

fn facts(result: &pb::RecoveryResult) -> Value {
    serde_json::from_str(&result.facts_json).expect("facts are a JSON object")
}

fn now_s() -> i64 {
    cutover_common::now_ms() / 1000
}

/// Nothing of a drill is left: its dir, its server's port, its processes.
fn assert_nothing_left(pg: &PgBackRestCluster, facts: &Value) {
    let scratch = facts["scratch_dir"]
        .as_str()
        .expect("the drill made a scratch dir");
    assert!(!Path::new(scratch).exists(), "{scratch} is still there");
    let leftovers: Vec<_> = std::fs::read_dir(pg.scratch_parent()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A drill cut short before its server started has no port.
    if let Some(port) = facts["port"].as_u64() {
        assert!(
            !listening(port as u16),
            "something still listens on the scratch port {port}"
        );
    }
    let processes = processes_mentioning(scratch);
    assert!(processes.is_empty(), "still running: {processes:?}");
}

/// Command lines of running processes that mention `text`.
fn processes_mentioning(text: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(text))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_backups_report_their_facts_once() {
    let pg = shop(1000);
    let cluster = Cluster::start_ready(1, Tuning::default()).await;

    let before = now_s();
    let (full, steps) =
        recovery(&cluster, backup("b1", &pg, pb::recovery_backup::Type::Full)).await;
    assert!(full.passed, "{full:?}");
    assert!(
        steps.iter().any(|s| s == "output"),
        "pgbackrest's output streams: {steps:?}"
    );
    assert!(
        full.output_tail
            .contains("backup command end: completed successfully"),
        "{}",
        full.output_tail
    );
    let f = facts(&full);
    let label = f["label"].as_str().unwrap().to_string();
    assert!(label.ends_with('F'), "{f}");
    assert_eq!(f["type"], "full");
    assert_eq!(f["prior"], Value::Null);
    assert_eq!(
        f["pg_version"],
        pg.bin_dir()
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    );
    for key in [
        "size_bytes",
        "delta_bytes",
        "repo_size_bytes",
        "repo_delta_bytes",
    ] {
        assert!(f[key].as_u64().unwrap() > 0, "{key}: {f}");
    }
    let (started, stopped) = (
        f["started_at"].as_i64().unwrap(),
        f["stopped_at"].as_i64().unwrap(),
    );
    assert!(
        before - 1 <= started && started <= stopped && stopped <= now_s(),
        "{f}"
    );
    assert_eq!(f["data_time"], f["stopped_at"]);
    assert_eq!(full.data_time_ms, stopped * 1000);
    let wal_stop = f["wal_stop"].as_str().unwrap();
    assert_eq!(wal_stop.len(), 24, "{f}");
    assert!(f["archive_max"].as_str().unwrap() >= wal_stop, "{f}");
    assert!(
        f["archive_min"].as_str().unwrap() <= f["wal_start"].as_str().unwrap(),
        "{f}"
    );

    add_orders(&pg, 500);
    let (incr, _) = recovery(&cluster, backup("b2", &pg, pb::recovery_backup::Type::Incr)).await;
    assert!(incr.passed, "{incr:?}");
    let i = facts(&incr);
    assert_eq!(i["type"], "incr");
    assert_eq!(i["prior"], label.as_str());
    let incr_label = i["label"].as_str().unwrap();
    assert!(
        incr_label.starts_with(&format!("{label}_")) && incr_label.ends_with('I'),
        "{i}"
    );
    assert!(
        i["delta_bytes"].as_u64().unwrap() < i["size_bytes"].as_u64().unwrap(),
        "{i}"
    );
    assert!(i["started_at"].as_i64().unwrap() >= stopped, "{i}");
    assert!(
        incr.data_time_ms >= full.data_time_ms && incr.data_time_ms <= cutover_common::now_ms(),
        "{incr:?}"
    );

    // The same id again: the stored result, not a third backup.
    let (again, _) = cluster
        .run_command("node-1", backup("b2", &pg, pb::recovery_backup::Type::Incr))
        .await;
    assert!(again.replayed, "{again:?}");
    let listed = pg.pgbackrest(&["info", "--output=json"]);
    let info: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(info[0]["backup"].as_array().unwrap().len(), 2, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_has_the_rows_up_to_the_archive_or_up_to_the_backup() {
    let pg = shop(1000);
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let (full, _) = recovery(&cluster, backup("b1", &pg, pb::recovery_backup::Type::Full)).await;
    assert!(full.passed, "{full:?}");
    let written = cutover_common::now_ms();
    add_orders(&pg, 500);
    pg.archive_now();

    let latest = pb::RestoreDrill {
        checks: vec![
            orders_are(1500),
            check(
                "fresh",
                "select max(created_at) from orders",
                Expect::MaxAgeMs(3_600_000),
            ),
            check(
                "no gaps",
                "select count(*) from orders where id > 1500",
                Expect::AtMost(0.0),
            ),
        ],
        freshness_sql: "select max(created_at) from orders".into(),
        freshness_database: SHOP.into(),
        ..Default::default()
    };
    let started = cutover_common::now_ms();
    let (result, _) = recovery(&cluster, drill("d1", &pg, latest, 120_000)).await;
    assert!(result.passed, "{}\n{result:?}", result.reason);
    assert_eq!(result.reason, "");
    let names: Vec<_> = result
        .checks
        .iter()
        .map(|c| (c.name.as_str(), c.passed))
        .collect();
    assert_eq!(
        names,
        [("orders", true), ("fresh", true), ("no gaps", true)]
    );
    assert_eq!(result.checks[0].value, "1500");
    // The measured recovery point: the newest order, written after the
    // backup and restored from the archived WAL.
    assert!(
        written <= result.data_time_ms && result.data_time_ms <= result.recovered_at_ms,
        "{result:?}"
    );
    assert!(started <= result.recovered_at_ms, "{result:?}");
    let f = facts(&result);
    let age = f["data_age_seconds"].as_f64().expect("a data age");
    assert!((0.0..60.0).contains(&age), "{f}");
    assert_eq!(f["data_time_source"], "freshness_sql");
    assert_eq!(f["recovery_target"], "latest");
    assert_eq!(f["backup_label"], facts(&full)["label"]);
    // The measured recovery time covers its steps.
    let steps: u64 = ["restore_ms", "recovery_ms", "checks_ms"]
        .iter()
        .map(|k| f[k].as_u64().unwrap_or_else(|| panic!("{k}: {f}")))
        .sum();
    assert!(result.duration_ms >= steps && steps > 0, "{f} {result:?}");
    assert!(result.duration_ms <= cutover_common::now_ms().saturating_sub(started) as u64);
    assert_nothing_left(&pg, &f);

    // The backup alone: the rows written after it are not there.
    let immediate = pb::RestoreDrill {
        recovery_target: pb::restore_drill::Target::Immediate as i32,
        checks: vec![orders_are(1000)],
        ..Default::default()
    };
    let (result, _) = recovery(&cluster, drill("d2", &pg, immediate, 120_000)).await;
    assert!(result.passed, "{}\n{result:?}", result.reason);
    let f = facts(&result);
    assert_eq!(f["recovery_target"], "immediate");
    assert!(result.data_time_ms < written, "{f} {result:?}");
    assert_nothing_left(&pg, &f);

    // The scratch copies never pushed WAL into the repository: the
    // cluster's own archive still ends where it archived last.
    let info: Value =
        serde_json::from_slice(&pg.pgbackrest(&["info", "--output=json"]).stdout).unwrap();
    let archived = pg.psql("postgres", "select last_archived_wal from pg_stat_archiver");
    assert_eq!(info[0]["archive"][0]["max"], archived.as_str(), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_fails_the_drill_naming_it_and_leaves_nothing_behind() {
    let pg = shop(1000);
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let (full, _) = recovery(&cluster, backup("b1", &pg, pb::recovery_backup::Type::Full)).await;
    assert!(full.passed, "{full:?}");

    let checks = pb::RestoreDrill {
        checks: vec![
            check(
                "some orders",
                "select count(*) from orders",
                Expect::AtLeast(1.0),
            ),
            check(
                "enough orders",
                "select count(*) from orders",
                Expect::AtLeast(2000.0),
            ),
            check(
                "customers",
                "select count(*) from customers",
                Expect::AtLeast(1.0),
            ),
        ],
        ..Default::default()
    };
    let (result, _) = recovery(&cluster, drill("d1", &pg, checks, 120_000)).await;
    assert!(!result.passed, "{result:?}");
    assert!(
        !result.timed_out,
        "a failed check is not a timeout: {result:?}"
    );
    assert_eq!(
        result.reason,
        "check \"enough orders\" failed: expected at least 2000, saw 1000"
    );
    let seen: Vec<_> = result
        .checks
        .iter()
        .map(|c| (c.name.as_str(), c.value.as_str(), c.passed))
        .collect();
    assert_eq!(
        seen,
        [
            ("some orders", "1000", true),
            ("enough orders", "1000", false),
            ("customers", "", false)
        ]
    );
    assert!(
        result.checks[2]
            .detail
            .contains("relation \"customers\" does not exist"),
        "{:?}",
        result.checks[2]
    );
    let f = facts(&result);
    assert_eq!(f["data_time_source"], "backup_stop", "{f}");
    assert_eq!(
        result.data_time_ms,
        facts(&full)["stopped_at"].as_i64().unwrap() * 1000
    );
    assert_nothing_left(&pg, &f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_past_its_timeout_is_killed_and_cleaned_up() {
    let pg = shop(10);
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let (full, _) = recovery(&cluster, backup("b1", &pg, pb::recovery_backup::Type::Full)).await;
    assert!(full.passed, "{full:?}");

    let hangs = pb::RestoreDrill {
        checks: vec![check(
            "slow",
            "select pg_sleep(600)",
            Expect::Equals(String::new()),
        )],
        ..Default::default()
    };
    let timeout = Duration::from_secs(20);
    let (result, _) = recovery(
        &cluster,
        drill("d1", &pg, hangs, timeout.as_millis() as u64),
    )
    .await;
    assert!(!result.passed, "{result:?}");
    assert!(result.timed_out, "{result:?}");
    assert!(
        result
            .reason
            .starts_with("still running at its timeout of 20s during "),
        "{}",
        result.reason
    );
    assert!(
        result.duration_ms >= timeout.as_millis() as u64,
        "{result:?}"
    );
    assert!(result.checks.iter().all(|c| !c.passed), "{result:?}");
    assert_nothing_left(&pg, &facts(&result));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_run_fails_and_a_stanza_without_backups_fails_the_drill() {
    let pg = PgBackRestCluster::start();
    let cluster = Cluster::start_ready(1, Tuning::default()).await;

    let mut nameless = drill("d1", &pg, pb::RestoreDrill::default(), 60_000);
    if let Some(pb::command::Kind::RunRecovery(run)) = nameless.kind.as_mut() {
        run.target.as_mut().unwrap().stanza.clear();
    }
    let (result, _) = cluster.run_command("node-1", nameless).await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Failed as i32,
        "{result:?}"
    );
    assert_eq!(
        result.message,
        "run_recovery without a stanza: name the pgBackRest stanza to back up or restore"
    );

    let (result, _) = recovery(
        &cluster,
        drill("d2", &pg, pb::RestoreDrill::default(), 60_000),
    )
    .await;
    assert!(!result.passed, "{result:?}");
    assert_eq!(
        result.reason,
        "pgbackrest info failed: the stanza \"cutover\" has no backup (pgbackrest says: no valid backups): run a backup first"
    );
    assert!(std::fs::read_dir(pg.scratch_parent())
        .unwrap()
        .next()
        .is_none());
}

/// Figures for docs/benchmarks.md (integration-tests/bench/recovery.sh):
/// a pgbench database of scale PGBENCH_SCALE (default 70, about 1 GB), a
/// full backup, an incremental one after some writes, and a drill of the
/// latest backup plus the WAL archived since while pgbench keeps writing;
/// the times and sizes as the agent measured them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of minutes: integration-tests/bench/recovery.sh"]
async fn recovery_figures() {
    use std::os::unix::process::CommandExt as _;

    let scale: u32 = std::env::var("PGBENCH_SCALE")
        .ok()
        .map(|s| s.parse().expect("PGBENCH_SCALE is a number"))
        .unwrap_or(70);
    let pg = PgBackRestCluster::start();
    pg.psql("postgres", "create database bench");
    let timed = std::time::Instant::now();
    let init = pg
        .pgbench("bench", &["-i", "-q", "-s", &scale.to_string()])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let init_s = timed.elapsed().as_secs_f64();
    let db_bytes: u64 = pg
        .psql("bench", "select pg_database_size('bench')")
        .parse()
        .unwrap();
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let within = Duration::from_secs(3600);
    let run = |id: &'static str, command: pb::Command| {
        let cluster = &cluster;
        async move {
            let (result, _) = cluster.run_command_within("node-1", command, within).await;
            let Some(pb::command_result::Output::Recovery(recovery)) = result.output else {
                panic!("{id}: {result:?}");
            };
            assert!(
                recovery.passed,
                "{id}: {}\n{}",
                recovery.reason, recovery.output_tail
            );
            recovery
        }
    };
    let full = run("full", backup("full", &pg, pb::recovery_backup::Type::Full)).await;
    let writes = pg
        .pgbench("bench", &["-c", "4", "-j", "2", "-T", "20", "-n"])
        .output()
        .unwrap();
    assert!(
        writes.status.success(),
        "{}",
        String::from_utf8_lossy(&writes.stderr)
    );
    let incr = run("incr", backup("incr", &pg, pb::recovery_backup::Type::Incr)).await;

    // Writes go on during the drill: the archive is as far behind as a
    // real one would be when the primary is lost.
    let mut load = pg
        .pgbench("bench", &["-c", "2", "-j", "1", "-T", "3600", "-n"])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let accounts = u64::from(scale) * 100_000;
    let verify = pb::RestoreDrill {
        checks: vec![
            check(
                "accounts",
                "select count(*) from pgbench_accounts",
                Expect::Equals(accounts.to_string()),
            ),
            check(
                "history fresh",
                "select max(mtime) at time zone current_setting('TimeZone') from pgbench_history",
                Expect::MaxAgeMs(15 * 60 * 1000),
            ),
        ]
        .into_iter()
        .map(|c| pb::RecoveryCheck {
            database: "bench".into(),
            ..c
        })
        .collect(),
        freshness_sql:
            "select max(mtime) at time zone current_setting('TimeZone') from pgbench_history".into(),
        freshness_database: "bench".into(),
        ..Default::default()
    };
    let drill_start = cutover_common::now_ms();
    let drilled = run(
        "drill",
        drill("drill", &pg, verify, within.as_millis() as u64),
    )
    .await;
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(load.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = load.wait();

    let (f, i, d) = (facts(&full), facts(&incr), facts(&drilled));
    let mib = |v: &Value| v.as_u64().unwrap_or_default() as f64 / 1_048_576.0;
    let secs = |ms: u64| ms as f64 / 1000.0;
    println!(
        "pgbench scale {scale}: database {:.0} MiB, pgbench -i {init_s:.1} s",
        db_bytes as f64 / 1_048_576.0
    );
    println!("| step | time | size | in the repository |");
    println!("|---|---|---|---|");
    println!(
        "| full backup | {:.1} s | {:.0} MiB | {:.0} MiB |",
        secs(full.duration_ms),
        mib(&f["size_bytes"]),
        mib(&f["repo_size_bytes"])
    );
    println!(
        "| incremental backup (after 20 s of pgbench) | {:.1} s | {:.0} MiB copied | {:.0} MiB |",
        secs(incr.duration_ms),
        mib(&i["delta_bytes"]),
        mib(&i["repo_delta_bytes"])
    );
    println!(
        "| restore drill (latest: backup + archived WAL) | {:.1} s | restore {:.1} s, start and recovery {:.1} s, checks {:.1} s | clean-up {:.1} s |",
        secs(drilled.duration_ms),
        secs(d["restore_ms"].as_u64().unwrap()),
        secs(d["recovery_ms"].as_u64().unwrap()),
        secs(d["checks_ms"].as_u64().unwrap()),
        secs(d["cleanup_ms"].as_u64().unwrap()),
    );
    println!(
        "measured RPO (recovery end - newest restored pgbench_history row): {:.1} s; the drill started {:.1} s before its recovery ended",
        (drilled.recovered_at_ms - drilled.data_time_ms) as f64 / 1000.0,
        (drilled.recovered_at_ms - drill_start) as f64 / 1000.0,
    );
    println!("drill facts: {d}");
}
