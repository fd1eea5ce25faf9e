//! A deploy's `[migrate]` step against a real PostgreSQL, through the real
//! binaries: the demo app's runner (`examples/demo/migrate.sh`, SQL files
//! through psql) leaves a row in `migration_runs` per run, so the database
//! itself says how often, and when, a migration ran; the app's health
//! check reads the schema, so code that needs a column is healthy only
//! once its migration ran. Each test has a database of its own on the one
//! server scripts/test.sh starts (`cutover_integration_tests::pg`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cutover_integration_tests::load::Load;
use cutover_integration_tests::pg::{db_app_archive, TestDb};
use cutover_integration_tests::{body, http_get, running, sigkill, DevCluster};
use serde_json::Value;

/// Each test's web ports: tests run at once (in other files too), and dev
/// clusters share the nodes' loopback addresses.
const ONCE_PORT: u16 = 18_500;
const WEB_PORT: u16 = 18_501;
const API_PORT: u16 = 18_502;
const COORDINATOR_CRASH_PORT: u16 = 18_503;
const AGENT_CRASH_PORT: u16 = 18_504;
const ROLLBACK_PORT: u16 = 18_505;

const CREATE: (&str, &str) = (
    "001_create_greetings.sql",
    "CREATE TABLE greetings (id serial PRIMARY KEY, text text NOT NULL);\n\
     INSERT INTO greetings (text) VALUES ('hello');\n",
);
const ADD_LANGUAGE: (&str, &str) = (
    "002_add_greetings_language.sql",
    "ALTER TABLE greetings ADD COLUMN language text NOT NULL DEFAULT 'en';\n",
);
/// What v1's code reads, and v2's: the column 002 adds.
const READS_TEXT: &str = "SELECT text FROM greetings ORDER BY id LIMIT 1";
const READS_LANGUAGE: &str =
    "SELECT text || ' (' || language || ')' FROM greetings ORDER BY id LIMIT 1";

/// The demo app as `service` of app shop on `port`, connected to `db`,
/// with a `[migrate]` of its own (`migrate` adds keys to it).
fn spec(service: &str, port: u16, db: &TestDb, migrate: &str) -> String {
    format!(
        r#"
app = "shop"

[services.{service}]
command = ["python3", "app.py"]
listen = ":{port}"
drain_timeout = "2s"
stop_grace = "2s"
[services.{service}.env]
{env}
[services.{service}.health]
path = "/health"
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "5s"

[[services.{service}.smoke]]
path = "/"
expect_status = 200

[strategy]
batch = 1
min_healthy_time = "200ms"

[environments.local]
nodes = {{ env = "local" }}

[migrate]
service = "{service}"
command = ["sh", "migrate.sh"]
timeout = "1m"
{migrate}
"#,
        env = db.spec_env()
    )
}

/// `cutover deploy` of `archive` as `version` with `spec`; `extra` adds
/// flags (e.g. `--wait`).
fn deploy(
    cluster: &DevCluster,
    spec: &str,
    version: &str,
    archive: &Path,
    extra: &[&str],
) -> Output {
    let file = cluster.path(&format!("cutover-{version}.toml"));
    std::fs::write(&file, spec).unwrap();
    let mut args = vec![
        "deploy",
        "-f",
        file.to_str().unwrap(),
        "--env",
        "local",
        "--version",
        version,
        "--artifact",
        archive.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cluster.cutover(&args)
}

fn assert_ok(cluster: &DevCluster, output: &Output) {
    assert!(
        output.status.success(),
        "{}{}{}",
        text(&output.stdout),
        text(&output.stderr),
        cluster.log_tails()
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn rollout(cluster: &DevCluster, id: &str) -> Value {
    let status = cluster.cutover(&["rollout", "status", id, "-o", "json"]);
    serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|_| panic!("rollout status {id}: {}", text(&status.stderr)))
}

/// The newest rollouts, newest first (`cutover rollout list`).
fn rollouts(cluster: &DevCluster) -> Vec<Value> {
    let list = cluster.cutover(&["rollout", "list", "-o", "json"]);
    serde_json::from_slice::<Value>(&list.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn newest_rollout(cluster: &DevCluster) -> Value {
    let id = rollouts(cluster)[0]["id"].as_str().unwrap().to_string();
    rollout(cluster, &id)
}

/// Polls the newest rollout until it has ended or waits for the operator
/// (held); a coordinator restarting meanwhile counts as not yet.
fn wait_for_end(cluster: &DevCluster) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(newest) = rollouts(cluster).first() {
            let state = newest["state"].as_str().unwrap_or_default();
            if !matches!(state, "running" | "pending" | "paused") {
                return newest_rollout(cluster);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no end within 60 s{}",
            cluster.log_tails()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `sql` until it answers `expected` (an error, e.g. a table not
/// there yet, counts as not yet).
fn wait_for_query(db: &TestDb, sql: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = db.try_query(sql);
        if answer.as_deref() == Ok(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} never answered {expected:?}; last: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` on each of the first `nodes` nodes.
fn get_each(port: u16, nodes: u8, path: &str) -> Vec<String> {
    (0..nodes)
        .map(|i| body(&http_get(&format!("127.0.0.{}:{port}", 11 + i), path)).to_string())
        .collect()
}

fn timeline_at(rollout: &Value, kind: &str) -> (usize, String) {
    let timeline = rollout["timeline"].as_array().unwrap();
    let at = timeline
        .iter()
        .position(|t| t["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {rollout:#}"));
    (at, timeline[at]["at"].as_str().unwrap().to_string())
}

/// The message of the last timeline entry of `kind`.
fn timeline_message(rollout: &Value, kind: &str) -> String {
    rollout["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|t| t["kind"] == kind)
        .and_then(|t| t["message"].as_str())
        .unwrap_or_else(|| panic!("no {kind} in {rollout:#}"))
        .to_string()
}

fn archive(cluster: &DevCluster, version: &str, query: &str, m: &[(&str, &str)]) -> PathBuf {
    db_app_archive(cluster.dir.path(), version, query, m)
}

/// Three nodes: v2's migration runs once, before any node switched, while
/// load runs through the node proxies without a failed request, and v2's
/// code reads the column it added. A failing migration then fails the next
/// deploy before any switch, quoting its output, and changes nothing: its
/// file's transaction is rolled back and every node serves v2.
#[test]
fn a_migration_runs_once_before_any_switch_under_load_and_a_failing_one_changes_nothing() {
    let db = TestDb::create("once");
    let cluster = DevCluster::up(3);
    let spec = spec("web", ONCE_PORT, &db, "");
    let v1 = archive(&cluster, "v1", READS_TEXT, &[CREATE]);
    assert_ok(&cluster, &deploy(&cluster, &spec, "v1", &v1, &["--wait"]));
    assert_eq!(get_each(ONCE_PORT, 3, "/db"), vec!["hello"; 3]);

    let v2 = archive(&cluster, "v2", READS_LANGUAGE, &[CREATE, ADD_LANGUAGE]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let targets = (0..3)
        .map(|i| format!("127.0.0.{}:{ONCE_PORT}", 11 + i).parse().unwrap())
        .collect();
    let load = {
        let _inside = runtime.enter();
        Load::start(targets, "/", 6)
    };
    runtime.block_on(load.wait_for_sent(0, 200, "on v1"));
    let deployed = deploy(&cluster, &spec, "v2", &v2, &["--wait"]);
    let (sent, _) = load.progress();
    runtime.block_on(load.wait_for_sent(sent, 200, "on v2"));
    let report = runtime.block_on(load.stop());
    assert_ok(&cluster, &deployed);
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    // The figure docs/benchmarks.md records (`--no-capture`).
    eprintln!(
        "a deploy with a migration under load: {} requests in {:?}, {} failed",
        report.sent, report.elapsed, report.failed
    );
    let bodies: Vec<&str> = report.by_body.keys().map(|b| b.trim()).collect();
    assert_eq!(bodies, ["v1", "v2"], "{:?}", report.by_body);

    // Once per deploy, each to its end; each file applied once.
    assert_eq!(
        db.query("SELECT version, finished_at IS NOT NULL FROM migration_runs ORDER BY id"),
        "v1|t\nv2|t"
    );
    assert_eq!(
        db.query("SELECT name FROM schema_migrations ORDER BY name"),
        format!("{}\n{}", CREATE.0, ADD_LANGUAGE.0)
    );
    // Before the first node switched, by the timeline and by the database.
    let rollout = newest_rollout(&cluster);
    let (migrated, _) = timeline_at(&rollout, "migrated");
    let (switched, switched_at) = timeline_at(&rollout, "node_switched");
    assert!(migrated < switched, "{rollout:#}");
    assert_eq!(
        db.query(&format!(
            "SELECT finished_at < '{switched_at}'::timestamptz FROM migration_runs WHERE version = 'v2'"
        )),
        "t"
    );
    assert!(rollout
        .to_string()
        .contains("applying 002_add_greetings_language.sql"));
    // The new code uses the new column.
    assert_eq!(get_each(ONCE_PORT, 3, "/db"), vec!["hello (en)"; 3]);

    // A migration that fails halfway through its file.
    let broken = (
        "003_add_greetings_tone.sql",
        "ALTER TABLE greetings ADD COLUMN tone text;\nSELECT no_such_column FROM greetings;\n",
    );
    let v3 = archive(
        &cluster,
        "v3",
        READS_LANGUAGE,
        &[CREATE, ADD_LANGUAGE, broken],
    );
    let failed = deploy(&cluster, &spec, "v3", &v3, &["--wait"]);
    assert!(!failed.status.success(), "{}", text(&failed.stderr));
    let rollout = newest_rollout(&cluster);
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let cause = rollout["error"]["message"].as_str().unwrap();
    assert!(
        cause.contains("applying 003_add_greetings_tone.sql")
            && cause.contains("column \"no_such_column\" does not exist"),
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
    assert_eq!(get_each(ONCE_PORT, 3, "/"), vec!["v2"; 3]);
    assert_eq!(get_each(ONCE_PORT, 3, "/db"), vec!["hello (en)"; 3]);
    // It ran once, did not finish, and its file left nothing behind.
    assert_eq!(
        db.query("SELECT version, finished_at IS NOT NULL FROM migration_runs ORDER BY id"),
        "v1|t\nv2|t\nv3|f"
    );
    assert_eq!(
        db.query(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'greetings' AND column_name = 'tone'"
        ),
        "0"
    );
    assert_eq!(db.query("SELECT count(*) FROM schema_migrations"), "2");
}

/// Two services of one app deployed at once in one environment, each with
/// a migration that takes a while: one migration at a time per app and
/// environment, so one deploy is refused, naming the rollout that holds
/// the migrations; deployed again once that ended, it runs. The database's
/// record of the runs shows no overlap.
#[test]
fn two_deploys_at_once_never_run_their_migrations_together() {
    let db = TestDb::create("lock");
    let cluster = DevCluster::up(2);
    let web = spec("web", WEB_PORT, &db, "");
    let api = spec("api", API_PORT, &db, "");
    // Long enough that both deploys meet, however slowly their CLIs start;
    // an overlap, had the lock let one happen, shows in the runs' times.
    let slow = |name: &'static str| (name, "SELECT pg_sleep(2);\n");
    let web_archive = archive(&cluster, "w1", "SELECT 1", &[slow("001_web.sql")]);
    let api_archive = archive(&cluster, "a1", "SELECT 1", &[slow("001_api.sql")]);

    let (web_out, api_out) = std::thread::scope(|s| {
        let web = s.spawn(|| deploy(&cluster, &web, "w1", &web_archive, &["--wait"]));
        let api = s.spawn(|| deploy(&cluster, &api, "a1", &api_archive, &["--wait"]));
        (web.join().unwrap(), api.join().unwrap())
    });
    let (refused, again, spec, version, archive) =
        match (web_out.status.success(), api_out.status.success()) {
            (true, false) => (api_out, "api", &api, "a1", &api_archive),
            (false, true) => (web_out, "web", &web, "w1", &web_archive),
            _ => panic!(
                "one deploy runs, one is refused: web {}, api {}",
                text(&web_out.stderr),
                text(&api_out.stderr)
            ),
        };
    let first = rollouts(&cluster)[0]["id"].as_str().unwrap().to_string();
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains(&format!("rollout {first}")) && stderr.contains("shop migrations"),
        "the refusal names the rollout holding the migrations: {stderr}"
    );
    assert_eq!(db.query("SELECT count(*) FROM migration_runs"), "1");

    assert_ok(
        &cluster,
        &deploy(&cluster, spec, version, archive, &["--wait"]),
    );
    assert!(rollouts(&cluster)[0]["id"]
        .as_str()
        .unwrap()
        .starts_with(again));
    assert_eq!(
        db.query("SELECT count(*) FROM migration_runs WHERE finished_at IS NOT NULL"),
        "2"
    );
    assert_eq!(
        db.query(
            "SELECT count(*) FROM migration_runs a JOIN migration_runs b ON a.id < b.id \
             WHERE a.started_at < b.finished_at AND b.started_at < a.finished_at"
        ),
        "0",
        "overlapping runs: {}",
        db.query("SELECT * FROM migration_runs")
    );
}

/// The coordinator killed with SIGKILL while the migration runs: after its
/// restart the migration is not run again (the database has one run, to
/// its end), and the rollout carries on to succeed.
#[test]
fn a_coordinator_killed_while_the_migration_runs_does_not_run_it_twice() {
    let db = TestDb::create("coordinator_crash");
    let cluster = DevCluster::up(2);
    let spec = spec("web", COORDINATOR_CRASH_PORT, &db, "");
    let slow = ("002_slow.sql", "SELECT pg_sleep(2);\n");
    let v1 = archive(&cluster, "v1", READS_TEXT, &[CREATE, slow]);
    assert_ok(&cluster, &deploy(&cluster, &spec, "v1", &v1, &[]));
    wait_for_query(&db, "SELECT count(*) FROM migration_runs", "1");

    let pid = cluster.pid("coordinator.pid");
    sigkill(pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) {
        assert!(
            Instant::now() < deadline,
            "the coordinator outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        db.query("SELECT count(*) FROM migration_runs WHERE finished_at IS NULL"),
        "1",
        "killed while the migration ran"
    );
    let config = cluster.path("coordinator.toml").display().to_string();
    cluster.restart(
        "cutover",
        &["server", "--config", &config],
        "coordinator.pid",
        "coordinator.log",
    );
    let rollout = wait_for_end(&cluster);
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    assert_eq!(
        db.query("SELECT count(*), count(finished_at) FROM migration_runs"),
        "1|1",
        "one run, to its end"
    );
    assert_eq!(db.query("SELECT count(*) FROM schema_migrations"), "2");
    assert_eq!(get_each(COORDINATOR_CRASH_PORT, 2, "/db"), vec!["hello"; 2]);
}

/// The agent running the migration killed with SIGKILL mid-run: restarted,
/// it answers that how the migration ended is not known, and the rollout
/// is held saying so, before any node switched, without running the
/// migration again; only the operator's `cutover rollout retry` does, and
/// the deploy then goes on.
#[test]
fn an_agent_killed_while_the_migration_runs_holds_the_rollout_until_the_operator_retries() {
    let db = TestDb::create("agent_crash");
    let cluster = DevCluster::up(2);
    let spec = spec("web", AGENT_CRASH_PORT, &db, "");
    let v1 = archive(&cluster, "v1", READS_TEXT, &[CREATE]);
    assert_ok(&cluster, &deploy(&cluster, &spec, "v1", &v1, &["--wait"]));

    let slow = ("002_slow.sql", "SELECT pg_sleep(2);\n");
    let v2 = archive(&cluster, "v2", READS_TEXT, &[CREATE, slow]);
    assert_ok(
        &cluster,
        &deploy(&cluster, &spec, "v2", &v2, &["--migrate-node", "node-1"]),
    );
    wait_for_query(
        &db,
        "SELECT count(*) FROM migration_runs WHERE version = 'v2'",
        "1",
    );
    let pid = cluster.pid("agent-1.pid");
    sigkill(pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) {
        assert!(Instant::now() < deadline, "the agent outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = cluster.path("agent-1.toml").display().to_string();
    cluster.restart(
        "cutover-agent",
        &["--config", &config],
        "agent-1.pid",
        "agent-1.log",
    );

    let rollout = wait_for_end(&cluster);
    assert_eq!(rollout["state"], "held", "{rollout:#}");
    let cause = timeline_message(&rollout, "held");
    // The restarted agent's own answer, not a timeout's guess.
    assert!(
        cause.contains("is not known") && cause.contains("the agent stopped while the task ran"),
        "{cause}"
    );
    assert!(cause.contains("cutover rollout retry"), "{cause}");
    assert!(
        rollout["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] != "switched"),
        "{rollout:#}"
    );
    assert_eq!(get_each(AGENT_CRASH_PORT, 2, "/"), vec!["v1"; 2]);
    assert_eq!(
        db.query("SELECT count(*) FROM migration_runs WHERE version = 'v2'"),
        "1",
        "not run again"
    );

    // Resume is not the way out; retry is, and only for a held rollout.
    let id = rollout["id"].as_str().unwrap();
    let resumed = cluster.cutover(&["rollout", "resume", id]);
    assert!(!resumed.status.success());
    assert!(
        text(&resumed.stderr).contains("retry or abort"),
        "{}",
        text(&resumed.stderr)
    );
    let retried = cluster.cutover(&["rollout", "retry", id]);
    assert!(retried.status.success(), "{}", text(&retried.stderr));
    let rollout = wait_for_end(&cluster);
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    assert!(timeline_message(&rollout, "retried").contains("retried the migration step"));
    assert_eq!(
        db.query("SELECT count(*) FROM migration_runs WHERE version = 'v2'"),
        "2",
        "once more, on the operator's word"
    );
    assert_eq!(get_each(AGENT_CRASH_PORT, 2, "/"), vec!["v2"; 2]);
    let again = cluster.cutover(&["rollout", "retry", id]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("not held"),
        "{}",
        text(&again.stderr)
    );
}

/// A contract migration (`when = "after"`, once every node serves the
/// release) makes older releases unsafe to return to: `cutover rollback
/// --to` one is refused, naming the contract; an admin's override with a
/// reason rolls back (audited), the schema stays as the contract left it,
/// and the old code works with it.
#[test]
fn a_rollback_past_a_contract_migration_on_a_real_schema_needs_an_admins_reason() {
    let db = TestDb::create("contract");
    let cluster = DevCluster::up(2);
    let create = (
        "001_create_items.sql",
        "CREATE TABLE items (id serial PRIMARY KEY, title text NOT NULL, legacy_code text);\n\
         INSERT INTO items (title) VALUES ('tea');\n",
    );
    let drop = (
        "002_drop_items_legacy_code.sql",
        "ALTER TABLE items DROP COLUMN legacy_code;\n",
    );
    let query = "SELECT title FROM items ORDER BY id LIMIT 1";
    let v1 = archive(&cluster, "v1", query, &[create]);
    let v1_spec = spec("web", ROLLBACK_PORT, &db, "");
    assert_ok(
        &cluster,
        &deploy(&cluster, &v1_spec, "v1", &v1, &["--wait"]),
    );
    let v2 = archive(&cluster, "v2", query, &[create, drop]);
    let v2_spec = spec(
        "web",
        ROLLBACK_PORT,
        &db,
        "phase = \"contract\"\nwhen = \"after\"",
    );
    assert_ok(
        &cluster,
        &deploy(&cluster, &v2_spec, "v2", &v2, &["--wait"]),
    );
    // After every node switched.
    let rollout = newest_rollout(&cluster);
    let timeline = rollout["timeline"].as_array().unwrap();
    let (migrated, _) = timeline_at(&rollout, "migration_started");
    assert!(
        timeline[..migrated]
            .iter()
            .filter(|t| t["kind"] == "node_switched")
            .count()
            == 2,
        "{rollout:#}"
    );
    assert_eq!(
        db.query("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'legacy_code'"),
        "0"
    );

    let releases = cluster.cutover(&["releases", "web", "--env", "local", "-o", "json"]);
    let releases: Value = serde_json::from_slice(&releases.stdout).unwrap();
    let (v2_id, v1_id) = (
        releases[0]["release"]["id"].as_str().unwrap(),
        releases[1]["release"]["id"].as_str().unwrap(),
    );
    let refused = cluster.cutover(&["rollback", "web", "--env", "local", "--to", v1_id]);
    let stderr = text(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("release {v2_id} of web ran a contract migration"))
            && stderr.contains("--ignore-schema --reason"),
        "{stderr}"
    );
    assert_eq!(
        get_each(ROLLBACK_PORT, 2, "/"),
        vec!["v2"; 2],
        "nothing changed"
    );

    let reason = "v1 never reads items.legacy_code";
    let forced = cluster.cutover(&[
        "rollback",
        "web",
        "--env",
        "local",
        "--to",
        v1_id,
        "--ignore-schema",
        "--reason",
        reason,
        "--wait",
    ]);
    assert_ok(&cluster, &forced);
    assert_eq!(get_each(ROLLBACK_PORT, 2, "/"), vec!["v1"; 2]);
    assert_eq!(get_each(ROLLBACK_PORT, 2, "/db"), vec!["tea"; 2]);
    assert_eq!(
        db.query("SELECT version FROM migration_runs ORDER BY id"),
        "v1\nv2",
        "a rollback runs no migration"
    );
    let audit: Value =
        serde_json::from_slice(&cluster.cutover(&["audit", "-o", "json"]).stdout).unwrap();
    assert!(
        audit.as_array().unwrap().iter().any(|e| {
            e["action"].as_str().is_some_and(|a| a.contains("rollback"))
                && e.to_string().contains(reason)
        }),
        "{audit:#}"
    );
}
