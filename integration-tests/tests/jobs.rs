//! Scheduled jobs through the real binaries: `cutover jobs apply` from the
//! spec, ticks that run exactly once on one node of three (a row per run in
//! a real PostgreSQL, the run id its primary key, proves it), also with the
//! node that ran them killed; overlapping runs skipped; a coordinator
//! down for several ticks runs one on its return; a run whose agent
//! restarted mid-run ends `lost`; facts and the backup metrics.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cutover_integration_tests::pg::TestDb;
use cutover_integration_tests::{dev_spec, sigkill, text, DevCluster};
use serde_json::Value;

/// Each test's web port (only `service_jobs` deploys): dev clusters share
/// the nodes' loopback addresses.
const ONCE_PORT: u16 = 18_620;
const FORBID_PORT: u16 = 18_621;
const OUTAGE_PORT: u16 = 18_622;
const SERVICE_PORT: u16 = 18_623;
const BAD_PORT: u16 = 18_624;
const RESTART_PORT: u16 = 18_626;
const OVERLAP_PORT: u16 = 18_627;

/// A job that inserts a row keyed by its run id: a tick run twice fails
/// its second insert.
fn insert_job(name: &str, db: &TestDb, every: &str) -> String {
    format!(
        r#"
[jobs.{name}]
command = ["sh", "-c", "psql -X -q -v ON_ERROR_STOP=1 -c \"INSERT INTO ticks (run, node) VALUES ('$CUTOVER_JOB_RUN', '$CUTOVER_NODE')\" && echo '{{\"inserted\": 1}}'"]
every = "{every}"
run_on = "one"
timeout = "30s"
[jobs.{name}.env]
{}"#,
        db.spec_env()
    )
}

fn ticks_table(db: &TestDb) {
    db.query("CREATE TABLE ticks (run text PRIMARY KEY, node text NOT NULL, at timestamptz NOT NULL DEFAULT now())");
}

/// `cutover jobs apply` of `spec` to environment local; panics on failure.
fn apply(cluster: &DevCluster, spec: &str) -> String {
    let out = try_apply(cluster, spec);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stderr),
        cluster.log_tails()
    );
    text(&out.stdout)
}

fn try_apply(cluster: &DevCluster, spec: &str) -> std::process::Output {
    let file = cluster.path("jobs.toml");
    std::fs::write(&file, spec).unwrap();
    cluster.cutover(&[
        "jobs",
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--env",
        "local",
    ])
}

/// Polls the history until `done` holds; a coordinator that does not
/// answer yet (restarting) counts as not done.
fn wait_for_history(
    cluster: &DevCluster,
    job: &str,
    timeout: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let runs = cluster.try_job_history(job);
        if let Ok(runs) = &runs {
            if done(runs) {
                return runs.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "history of {job} not as expected within {timeout:?}: {runs:#?}\n{}",
            cluster.log_tails()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn state(run: &Value) -> &str {
    run["state"].as_str().unwrap()
}

fn rows(db: &TestDb) -> Vec<(String, String)> {
    db.rows("SELECT run, node FROM ticks ORDER BY run")
        .into_iter()
        .filter(|r| r.len() == 2)
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

#[test]
fn each_tick_runs_exactly_once_on_one_node_also_when_that_node_is_killed() {
    let db = TestDb::create("jobs_once");
    ticks_table(&db);
    let cluster = DevCluster::up(3);
    let spec = dev_spec(ONCE_PORT, "v1", "", &insert_job("tick", &db, "2s"));
    assert!(apply(&cluster, &spec).contains("added: tick"));
    // Applying the same spec again changes nothing.
    assert!(apply(&cluster, &spec).contains("unchanged: tick"));

    while rows(&db).len() < 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let first = rows(&db);
    let busy = first.last().unwrap().1.clone();
    assert!(
        first.iter().all(|(_, node)| *node == busy),
        "one node takes every tick while it is ready: {first:?}"
    );
    let index: u8 = busy.trim_start_matches("node-").parse().unwrap();
    sigkill(cluster.pid(&format!("agent-{index}.pid")));
    let killed = rows(&db).len();
    while rows(&db).len() < killed + 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let paused = cluster.cutover(&["jobs", "pause", "tick", "--env", "local"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    let runs = wait_for_history(&cluster, "tick", Duration::from_secs(60), |runs| {
        runs.iter().all(|r| state(r) != "running")
    });

    let rows = rows(&db);
    let after: Vec<&(String, String)> = rows.iter().skip(killed).collect();
    assert!(
        after.iter().all(|(_, node)| *node != busy),
        "ticks after the kill ran elsewhere: {rows:?}"
    );
    // Every run that succeeded wrote its row once (the primary key refuses a
    // second), every row is a run, and nothing failed: a tick never ran twice.
    let succeeded: BTreeSet<&str> = runs
        .iter()
        .filter(|r| state(r) == "succeeded")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let written: BTreeSet<&str> = rows.iter().map(|(run, _)| run.as_str()).collect();
    assert!(
        succeeded.is_subset(&written),
        "{succeeded:?} vs {written:?}"
    );
    assert!(
        runs.iter()
            .all(|r| matches!(state(r), "succeeded" | "lost")),
        "{runs:#?}"
    );
    for run in &runs {
        if state(run) == "succeeded" {
            assert_eq!(run["facts"]["inserted"], 1, "{run}");
        }
    }
    // Ticks are two seconds apart: distinct due times, none run twice.
    let dues: BTreeSet<&str> = runs.iter().map(|r| r["due"].as_str().unwrap()).collect();
    assert_eq!(dues.len(), runs.len());
    let total = cluster
        .metric(r#"cutover_job_runs_total{app="shop",env="local",job="tick",kind="job",outcome="succeeded"}"#);
    assert_eq!(total, Some(succeeded.len() as f64));
}

#[test]
fn a_run_still_going_makes_the_next_tick_skip_and_a_manual_run_wait() {
    let cluster = DevCluster::up(1);
    let spec = dev_spec(
        FORBID_PORT,
        "v1",
        "",
        r#"
[jobs.slow]
command = ["sh", "-c", "sleep 2.5; echo done"]
every = "1s"
concurrency = "forbid"
"#,
    );
    apply(&cluster, &spec);
    let runs = wait_for_history(&cluster, "slow", Duration::from_secs(30), |runs| {
        runs.iter().any(|r| state(r) == "skipped") && runs.iter().any(|r| state(r) == "running")
    });
    let skipped = runs.iter().find(|r| state(r) == "skipped").unwrap();
    assert!(
        skipped["detail"].as_str().unwrap().contains("still ran"),
        "{skipped}"
    );

    let manual = cluster.cutover(&["jobs", "run", "slow", "--env", "local"]);
    assert!(!manual.status.success());
    assert!(
        text(&manual.stderr).contains("is still running"),
        "{}",
        text(&manual.stderr)
    );

    // Paused, the job starts nothing new; the run that goes on ends.
    let paused = cluster.cutover(&["jobs", "pause", "slow", "--env", "local"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    let settled = wait_for_history(&cluster, "slow", Duration::from_secs(10), |runs| {
        runs.iter().all(|r| state(r) != "running")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cluster.job_history("slow").len(),
        settled.len(),
        "a paused job ran"
    );
    let list = cluster.cutover(&["jobs", "list", "--env", "local"]);
    assert!(
        text(&list.stdout).contains("paused"),
        "{}",
        text(&list.stdout)
    );

    // A manual run, waited for: its output and exit.
    let manual = cluster.cutover(&["jobs", "run", "slow", "--env", "local", "--wait"]);
    assert!(
        manual.status.success(),
        "{}{}",
        text(&manual.stdout),
        text(&manual.stderr)
    );
    assert!(
        text(&manual.stdout).contains("done"),
        "{}",
        text(&manual.stdout)
    );
    let runs = cluster.job_history("slow");
    assert!(runs[0]["manual_by"] == "operator/dev", "{}", runs[0]);
}

#[test]
fn ticks_missed_while_the_coordinator_was_down_run_once() {
    let db = TestDb::create("jobs_outage");
    ticks_table(&db);
    let cluster = DevCluster::up(1);
    // Each run takes half its period, so the coordinator can be killed
    // with one in flight: the restarted one learns how it ended only when
    // the agent is back, and the catch-up tick must wait for that rather
    // than be skipped as overlapping it.
    let job = insert_job("tick", &db, "1s").replace("psql -X", "sleep 0.5; psql -X");
    apply(&cluster, &dev_spec(OUTAGE_PORT, "v1", "", &job));
    while rows(&db).len() < 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_history(&cluster, "tick", Duration::from_secs(10), |runs| {
        runs.first().is_some_and(|r| state(r) == "running")
    });
    cluster.wait_for_journal_flushed();
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_secs(5));
    let before = rows(&db).len();
    cluster.start_coordinator();
    let runs = wait_for_history(&cluster, "tick", Duration::from_secs(30), |runs| {
        runs.iter().any(|r| r["missed"].as_u64() >= Some(3))
    });
    let catch_up = runs
        .iter()
        .filter(|r| r["missed"].as_u64() > Some(0))
        .count();
    assert_eq!(
        catch_up, 1,
        "one run stands for the missed ticks: {runs:#?}"
    );
    // One second later at most one more tick has run: no burst of the
    // missed ones.
    std::thread::sleep(Duration::from_millis(1500));
    let after = rows(&db).len();
    assert!(
        after - before <= 3,
        "{} rows after the restart",
        after - before
    );
    // The run standing for the missed ticks ran; the only others not run
    // are ticks due while a run still went (the catch-up starts late in
    // its period), never failed or lost ones.
    let runs = cluster.job_history("tick");
    assert!(
        runs.iter().all(|r| match state(r) {
            "succeeded" | "running" => true,
            "skipped" => r["missed"] == 0,
            _ => false,
        }),
        "{runs:#?}"
    );
}

#[test]
fn service_jobs_facts_metrics_and_a_run_lost_to_an_agent_restart() {
    let cluster = DevCluster::up(2);
    let tail = r#"
[jobs.version]
service = "web"
command = ["sh", "-c", "echo release $VERSION on $CUTOVER_NODE"]
schedule = "0 0 1 1 *"

[jobs.backup]
kind = "backup"
dataset = "shop-db"
rpo = "15m"
command = ["sh", "-c", "echo backing up; echo \"{\\\"label\\\": \\\"full-1\\\", \\\"data_time\\\": $(($(date +%s) - 60))}\""]
schedule = "@daily"

[jobs.sleeper]
command = ["sleep", "30"]
every = "1h"
"#;
    let spec = dev_spec(SERVICE_PORT, "v1", "", tail);
    // A service job before its service was ever deployed: refused, nothing run.
    apply(&cluster, &spec);
    let early = cluster.cutover(&["jobs", "run", "version", "--env", "local"]);
    assert!(!early.status.success());
    assert!(
        text(&early.stderr).contains("no current release"),
        "{}",
        text(&early.stderr)
    );
    assert!(cluster.job_history("version").is_empty());

    let deployed = cluster.deploy_spec(&spec, "v1", &["--wait"]);
    assert!(
        deployed.status.success(),
        "{}{}",
        text(&deployed.stderr),
        cluster.log_tails()
    );
    let ran = cluster.cutover(&["jobs", "run", "version", "--env", "local", "--wait"]);
    assert!(
        ran.status.success(),
        "{}{}",
        text(&ran.stdout),
        text(&ran.stderr)
    );
    assert!(
        text(&ran.stdout).contains("release v1 on node-"),
        "{}",
        text(&ran.stdout)
    );

    let backup = cluster.cutover(&[
        "jobs", "run", "backup", "--env", "local", "--wait", "-o", "json",
    ]);
    assert!(backup.status.success(), "{}", text(&backup.stderr));
    let run: Value = serde_json::from_slice(&backup.stdout).unwrap();
    assert_eq!(run["facts"]["label"], "full-1", "{run}");
    assert_eq!(run["kind"], "backup");
    let series = |name: &str| format!(r#"{name}{{app="shop",env="local",dataset="shop-db"}}"#);
    assert_eq!(
        cluster.metric(&series("cutover_rpo_target_seconds")),
        Some(900.0)
    );
    let age = cluster
        .metric(&series("cutover_backup_age_seconds"))
        .expect("a backup age");
    assert!((60.0..120.0).contains(&age), "{age}");
    std::thread::sleep(Duration::from_secs(2));
    let older = cluster
        .metric(&series("cutover_backup_age_seconds"))
        .unwrap();
    assert!(
        older >= age + 1.5,
        "the age follows real time: {age} then {older}"
    );

    // An agent restarted mid-run answers that it does not know how the run
    // ended: the run is lost, and not run again.
    let started = cluster.cutover(&[
        "jobs", "run", "sleeper", "--env", "local", "--node", "node-2",
    ]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    std::thread::sleep(Duration::from_secs(1));
    sigkill(cluster.pid("agent-2.pid"));
    let config = cluster.path("agent-2.toml").display().to_string();
    cluster.restart(
        "cutover-agent",
        &["--config", &config],
        "agent-2.pid",
        "agent-2.log",
    );
    let runs = wait_for_history(&cluster, "sleeper", Duration::from_secs(30), |runs| {
        runs.iter().all(|r| state(r) != "running")
    });
    assert_eq!(runs.len(), 1);
    assert_eq!(state(&runs[0]), "lost", "{}", runs[0]);
    assert!(
        runs[0]["detail"]
            .as_str()
            .unwrap()
            .contains("restarted mid-run"),
        "{}",
        runs[0]
    );
    assert_eq!(
        cluster.metric(
            r#"cutover_job_runs_total{app="shop",env="local",job="sleeper",kind="job",outcome="lost"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn bad_job_specs_name_file_key_and_value_and_create_nothing() {
    let cluster = DevCluster::up(1);
    for (tail, expected) in [
        (
            "[jobs.x]\ncommand = [\"true\"]\nschedule = \"61 * * * *\"\n",
            "jobs.toml: key `jobs.x.schedule`: minute \"61\": 61 is out of range 0-59",
        ),
        (
            "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nkind = \"restore_test\"\ndataset = \"db\"\nenvironments = [\"production\"]\n[environments.production]\nnodes = { env = \"production\" }\n",
            "the restore drill would run in production",
        ),
    ] {
        let out = try_apply(&cluster, &dev_spec(BAD_PORT, "v1", "", tail));
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(expected), "{}", text(&out.stderr));
    }
    let list = cluster.cutover(&["jobs", "list", "-o", "json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&list.stdout).unwrap(),
        serde_json::json!([])
    );
    let missing = cluster.cutover(&["jobs", "run", "nope", "--env", "local"]);
    assert!(
        text(&missing.stderr).contains("no job \"nope\" in local"),
        "{}",
        text(&missing.stderr)
    );

    // A changed spec takes effect at its next apply, and a paused job stays
    // paused; a job the spec no longer has goes.
    let job = |every: &str| format!("[jobs.x]\ncommand = [\"true\"]\nevery = \"{every}\"\n");
    assert!(apply(&cluster, &dev_spec(BAD_PORT, "v1", "", &job("1h"))).contains("added: x"));
    let paused = cluster.cutover(&["jobs", "pause", "x", "--env", "local"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    assert!(apply(&cluster, &dev_spec(BAD_PORT, "v1", "", &job("2h"))).contains("changed: x"));
    let list = cluster.cutover(&["jobs", "list", "--env", "local", "-o", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["schedule"], "every 2h", "{list:#}");
    assert_eq!(list[0]["paused"], true, "{list:#}");
    assert!(apply(&cluster, &dev_spec(BAD_PORT, "v1", "", "")).contains("removed: x"));
}

#[test]
fn a_run_going_when_the_coordinator_restarts_ends_as_it_ran_and_runs_once() {
    let db = TestDb::create("jobs_restart");
    ticks_table(&db);
    let cluster = DevCluster::up(1);
    let job = insert_job("slow", &db, "1h")
        .replace("sh\", \"-c\", \"psql", "sh\", \"-c\", \"sleep 3; psql");
    apply(&cluster, &dev_spec(RESTART_PORT, "v1", "", &job));
    let started = cluster.cutover(&["jobs", "run", "slow", "--env", "local"]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    cluster.wait_for_journal_flushed();
    cluster.kill_and_restart_coordinator();
    // The restarted coordinator asks the node for the run's command id
    // again: the agent, still running it, answers once it ends.
    let runs = wait_for_history(&cluster, "slow", Duration::from_secs(60), |runs| {
        runs.iter().all(|r| state(r) != "running")
    });
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(state(&runs[0]), "succeeded", "{:#}", runs[0]);
    assert_eq!(runs[0]["facts"]["inserted"], 1);
    assert_eq!(rows(&db).len(), 1, "the run ran once");
}

#[test]
fn backups_of_one_data_set_never_overlap() {
    let cluster = DevCluster::up(1);
    let backup = |name: &str, seconds: &str| {
        format!(
            r#"
[jobs.{name}]
kind = "backup"
dataset = "db"
rpo = "{rpo}"
command = ["sh", "-c", "sleep {seconds}; echo '{{\"type\": \"{name}\"}}'"]
every = "{every}"
concurrency = "allow"
"#,
            rpo = if name == "full" { "1h" } else { "15m" },
            every = "1s",
        )
    };
    let tail = format!("{}{}", backup("full", "1.5"), backup("incr", "0.3"));
    apply(&cluster, &dev_spec(OVERLAP_PORT, "v1", "", &tail));
    let skipped = |runs: &[Value]| {
        runs.iter().any(|r| {
            state(r) == "skipped"
                && r["detail"]
                    .as_str()
                    .unwrap()
                    .contains("one backup of db at a time")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    // Both are kept from overlapping: the incremental by the full, the
    // full (1.5 s every second, allowing overlap with itself) by its own
    // run still going.
    while !(skipped(&cluster.job_history("full")) && skipped(&cluster.job_history("incr"))) {
        assert!(
            Instant::now() < deadline,
            "no backup was kept from overlapping another: {:#?} {:#?}",
            cluster.job_history("full"),
            cluster.job_history("incr")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for job in ["full", "incr"] {
        let paused = cluster.cutover(&["jobs", "pause", job, "--env", "local"]);
        assert!(paused.status.success(), "{}", text(&paused.stderr));
    }
    let mut ran: Vec<(i64, i64)> = Vec::new();
    for job in ["full", "incr"] {
        let runs = wait_for_history(&cluster, job, Duration::from_secs(10), |runs| {
            runs.iter().all(|r| state(r) != "running")
        });
        let time = |r: &Value, key: &str| {
            r[key]
                .as_str()
                .unwrap()
                .parse::<humantime::Timestamp>()
                .map(|t| {
                    std::time::SystemTime::from(t)
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64
                })
        };
        ran.extend(
            runs.iter()
                .filter(|r| state(r) == "succeeded")
                .map(|r| (time(r, "started").unwrap(), time(r, "ended").unwrap())),
        );
    }
    ran.sort();
    for pair in ran.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two backups of db overlapped: {pair:?}"
        );
    }
    // The tightest RPO of the data set's backup jobs is its target.
    let rpo = cluster.metric(r#"cutover_rpo_target_seconds{app="shop",env="local",dataset="db"}"#);
    assert_eq!(rpo, Some(900.0));
}
