//! A restore drill: the stanza's latest backup restored into a scratch
//! dir, a server started on it, its recovery awaited, its data's time
//! measured and its checks run; then, whatever happened, the server
//! stopped and the dir removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cutover_proto::v1 as pb;
use serde_json::{json, Map, Value};

use super::pgbackrest::{Backup, Stanza};
use super::scratch::{Psql, Scratch};
use super::steps::{failed, Failure, Steps};
use super::verify::{single_row, split_timestamp, timestamp_query, Check};

/// Stopping the server and removing the copy get this long of their own,
/// after the drill's deadline if need be.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Where Debian installs each PostgreSQL major version's binaries.
const DEBIAN_PG_BIN: &str = "/usr/lib/postgresql";

/// A drill as the command carries it, checked.
#[derive(Debug, Clone)]
pub(super) struct Drill {
    pub scratch_parent: PathBuf,
    /// Stop at the backup's end instead of replaying the archived WAL.
    pub immediate: bool,
    pub checks: Vec<Check>,
    /// The freshness query and its database.
    pub freshness: Option<(String, String)>,
    pub pg_bin_dir: Option<PathBuf>,
    /// The role checks connect as.
    pub db_user: String,
}

/// What a drill found: its verdict comes from the checks.
pub(super) struct Report {
    pub passed: bool,
    /// It ran out of time (before its clean-up).
    pub timed_out: bool,
    pub reason: String,
    pub facts: Map<String, Value>,
    pub checks: Vec<pb::RecoveryCheckResult>,
    pub duration: Duration,
    pub data_time_ms: i64,
    pub recovered_at_ms: i64,
}

pub(super) async fn run(steps: &mut Steps, stanza: &Stanza, drill: &Drill) -> Report {
    let started = Instant::now();
    let start_secs = cutover_common::now_ms() as f64 / 1000.0;
    let mut report = Report {
        passed: false,
        timed_out: false,
        reason: String::new(),
        facts: Map::new(),
        checks: Vec::new(),
        duration: Duration::ZERO,
        data_time_ms: 0,
        recovered_at_ms: 0,
    };
    report.facts.insert(
        "recovery_target".into(),
        json!(if drill.immediate {
            "immediate"
        } else {
            "latest"
        }),
    );
    let mut bin_dir = None;
    let mut scratch = None;
    let verdict = async {
        let info = stanza.info(steps).await?;
        let backup = info
            .newest_or_why()
            .map_err(|e| failed("pgbackrest info", e))?;
        let version = info.pg_version(backup).unwrap_or_default().to_string();
        for (key, value) in [
            ("backup_label", json!(backup.label)),
            ("backup_type", json!(backup.kind)),
            ("backup_stopped_at", json!(backup.timestamp.stop)),
            ("pg_version", json!(version)),
        ] {
            report.facts.insert(key.into(), value);
        }
        let bin = pg_bin_dir(drill.pg_bin_dir.as_deref(), &version)?;
        bin_dir = Some(bin.clone());
        let made = scratch.insert(Scratch::create(&drill.scratch_parent, &steps.user)?);
        report
            .facts
            .insert("scratch_dir".into(), json!(made.dir.display().to_string()));
        verify_copy(
            steps,
            stanza,
            drill,
            made,
            &bin,
            backup,
            start_secs,
            &mut report,
        )
        .await
    }
    .await;
    report.duration = started.elapsed();
    match verdict {
        Ok(None) => report.passed = true,
        Ok(Some(check_failed)) => report.reason = check_failed,
        Err(failure) => {
            report.timed_out = matches!(failure, Failure::TimedOut { .. });
            report.reason = failure.to_string();
        }
    }
    if let Some(scratch) = scratch {
        steps.rebound(CLEANUP_TIMEOUT);
        let cleanup = Instant::now();
        let removed = scratch.remove(steps, bin_dir.as_deref()).await;
        report.facts.insert(
            "cleanup_ms".into(),
            json!(cleanup.elapsed().as_millis() as u64),
        );
        if let Err(failure) = removed {
            report.passed = false;
            report.reason = match report.reason.as_str() {
                "" => failure.to_string(),
                first => format!("{first}; then {failure}"),
            };
        }
    }
    report
}

/// Restores into `scratch`, starts it and checks it: `None` when every
/// check passed, else the first failing check's reason.
#[allow(clippy::too_many_arguments)]
async fn verify_copy(
    steps: &mut Steps,
    stanza: &Stanza,
    drill: &Drill,
    scratch: &mut Scratch,
    bin_dir: &Path,
    backup: &Backup,
    start_secs: f64,
    report: &mut Report,
) -> Result<Option<String>, Failure> {
    let timed = Instant::now();
    let data = format!("--pg1-path={}", scratch.data.display());
    let tablespaces = format!(
        "--tablespace-map-all={}",
        scratch.dir.join("tablespaces").display()
    );
    let mut rest = vec![
        "--log-level-console=info",
        &data,
        "--archive-mode=off",
        &tablespaces,
    ];
    if drill.immediate {
        // Promote at the target: the default (pause) would leave the copy
        // in recovery for ever.
        rest.extend(["--type=immediate", "--target-action=promote"]);
    }
    rest.push("restore");
    steps
        .run("pgbackrest restore", "pgbackrest", &stanza.args(&rest))
        .await?;
    report.facts.insert(
        "restore_ms".into(),
        json!(timed.elapsed().as_millis() as u64),
    );

    let timed = Instant::now();
    let started = scratch.start(steps, bin_dir).await;
    report.facts.insert("port".into(), json!(scratch.port));
    started?;
    let psql = Psql {
        program: bin_dir.join("psql").display().to_string(),
        socket_dir: &scratch.dir,
        port: scratch.port.unwrap_or_default(),
        role: &drill.db_user,
    };
    scratch.wait_recovered(steps, &psql).await?;
    report.recovered_at_ms = cutover_common::now_ms();
    report
        .facts
        .insert("recovered_at".into(), json!(report.recovered_at_ms / 1000));
    report.facts.insert(
        "recovery_ms".into(),
        json!(timed.elapsed().as_millis() as u64),
    );
    steps.say("the scratch copy is up and out of recovery");

    let (data_time, source) = data_time(steps, &psql, drill, backup).await?;
    report.data_time_ms = (data_time * 1000.0) as i64;
    report
        .facts
        .insert("data_time".into(), json!(data_time as i64));
    // Negative when the data says it is from after the recovery ended (a
    // freshness query reading a time the application set).
    let age_ms = report.recovered_at_ms - report.data_time_ms;
    report
        .facts
        .insert("data_age_seconds".into(), json!(age_ms as f64 / 1000.0));
    report
        .facts
        .insert("data_time_source".into(), json!(source));

    let timed = Instant::now();
    let mut first_failure = None;
    for check in &drill.checks {
        let step = format!("check {:?}", check.name);
        let (value, verdict) = match psql
            .query(steps, &step, &check.database, &check.query())
            .await
        {
            Ok(rows) => check.judge(&rows, start_secs),
            Err(Failure::Failed { detail, .. }) => {
                (String::new(), Err(format!("the query failed: {detail}")))
            }
            Err(timed_out) => return Err(timed_out),
        };
        let passed = verdict.is_ok();
        let detail = verdict.unwrap_or_else(|e| e);
        steps.say(&format!(
            "{step}: {}: {detail}",
            if passed { "passed" } else { "FAILED" }
        ));
        if !passed && first_failure.is_none() {
            first_failure = Some(format!("{step} failed: {detail}"));
        }
        report.checks.push(pb::RecoveryCheckResult {
            name: check.name.clone(),
            value,
            passed,
            detail,
        });
    }
    report.facts.insert(
        "checks_ms".into(),
        json!(timed.elapsed().as_millis() as u64),
    );
    Ok(first_failure)
}

/// What the restored data is consistent to (unix seconds), and how that
/// was measured: the freshness query, else the last commit recovery
/// replayed, else the backup's end.
async fn data_time(
    steps: &mut Steps,
    psql: &Psql<'_>,
    drill: &Drill,
    backup: &Backup,
) -> Result<(f64, &'static str), Failure> {
    let step = "measuring the data time";
    if let Some((sql, database)) = &drill.freshness {
        let rows = psql
            .query(steps, step, database, &timestamp_query(sql))
            .await?;
        let row =
            single_row(&rows).map_err(|e| failed(step, format!("the freshness query: {e}")))?;
        return match split_timestamp(row) {
            (_, Some(epoch)) => Ok((epoch, "freshness_sql")),
            (text, None) => Err(failed(
                step,
                format!("the freshness query returned no timestamp ({:?}): make it return one, e.g. select max(created_at) from a table", text),
            )),
        };
    }
    let sql = "select extract(epoch from pg_last_xact_replay_timestamp())::float8";
    let rows = psql.query(steps, step, "postgres", sql).await?;
    Ok(match rows.trim().parse::<f64>() {
        Ok(epoch) => (epoch, "last_replayed_commit"),
        Err(_) => (backup.timestamp.stop as f64, "backup_stop"),
    })
}

/// The bin dir given, or Debian's for the backup's major version.
fn pg_bin_dir(given: Option<&Path>, version: &str) -> Result<PathBuf, Failure> {
    let step = "finding the PostgreSQL binaries";
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None if version.is_empty() => {
            return Err(failed(
                step,
                "pgbackrest info names no PostgreSQL version for the backup: give pg_bin_dir",
            ))
        }
        None => Path::new(DEBIAN_PG_BIN).join(version).join("bin"),
    };
    if !dir.join("pg_ctl").is_file() {
        return Err(failed(
            step,
            format!(
                "there is no pg_ctl in {}: install PostgreSQL {version} (Debian: postgresql-{version}), or give pg_bin_dir",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}
