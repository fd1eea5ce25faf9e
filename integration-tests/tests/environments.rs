//! Environments through the real `cutover` binary: a release promoted from
//! staging to production (the same digest and version, production's own
//! environment), production's promotion rule refusing what did not soak in
//! staging with the command that would promote it, an admin breaking glass
//! (in the audit log and the rollout's timeline), a policy only an admin
//! changes, and a freeze window that holds deploys and promotions but not
//! a rollback; approvals: a production deploy waits until another
//! deployer of production approves it (not its requester, not a deployer
//! of another environment), a rejection or an abort ends it with nothing
//! changed, and a rollback exempted by `approvals_for_rollback = 0` goes at
//! once. An approval's expiry is tested on the engine's clock
//! (`rollout/approval_tests.rs`, and the simulation). The freeze's clock semantics (zones, weekends, daylight
//! saving) are tested on a fixed clock in `policy/freeze.rs` and
//! `rollout/policy_tests.rs`.

use std::path::Path;
use std::time::Duration;

use cutover_integration_tests::cli::{cluster_of, two_builds, Cli};
use cutover_integration_tests::{app_archive, archive, sha256_hex, APP};

/// The spec file, in the CLI's dir, with the staging and production
/// tables' extra lines.
fn spec_file(cli: &Cli, port: u16, staging: &str, production: &str) -> String {
    let path = cli.dir.join("cutover.toml");
    std::fs::write(
        &path,
        format!(
            r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"
[strategy]
min_healthy_time = "200ms"
[environments.staging]
nodes = {{ env = "staging" }}
env = {{ APP_ENV = "staging" }}
{staging}
[environments.production]
nodes = {{ env = "production" }}
env = {{ APP_ENV = "production" }}
{production}
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// A freeze window that runs now whatever the day: yesterday to tomorrow,
/// in UTC.
fn window_around_now() -> String {
    let day = |offset: i64| {
        let at = std::time::SystemTime::now() + Duration::from_secs(86_400);
        let at = at - Duration::from_secs((86_400 * (1 - offset)) as u64);
        humantime::format_rfc3339_seconds(at).to_string()[..10].to_string()
    };
    format!("{} - {}", day(-1), day(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_promoted_from_staging_under_productions_rules() {
    let cluster = cluster_of(&[("node-1", "staging"), ("node-2", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pete = cli.operator(&admin, "pete", "production");
    let (_, v1_digest) = app_archive(dir.path());
    let v1 = dir.path().join("app.tar.gz").display().to_string();
    // Another build: the same app, another digest.
    let v2 = archive(
        dir.path(),
        "app-v2.tar.gz",
        &[("app.py", &format!("{APP}\n# v2\n"))],
    )
    .display()
    .to_string();
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let long_soak = r#"promotion = { from = "staging", min_soak = "1h" }"#;
    let short_soak = r#"promotion = { from = "staging", min_soak = "1s" }"#;
    let deploy =
        |config: &Path, spec: &str, env: &str, version: &str, artifact: &str, extra: &[&str]| {
            let mut all = vec!["--wait"];
            all.extend_from_slice(extra);
            cli.deploy(config, spec, env, version, artifact, &all)
        };

    let promote = |config: &Path, spec: &str, from: &str, extra: &[&str]| {
        let mut args = vec!["promote", "web", "-f", spec, "--from", from];
        args.extend(["--to", "production"]);
        args.extend_from_slice(extra);
        cli.run(config, &args)
    };

    // Staging takes anything.
    let spec = spec_file(&cli, port, "", long_soak);
    let (ok, text) = deploy(&admin, &spec, "staging", "v1", &v1, &[]);
    assert!(ok, "{text}");
    let staging = cli.json(&admin, &["releases", "web", "--env", "staging"]);
    let staged = staging[0]["release"]["id"].as_str().unwrap().to_string();

    // Production asks for an hour in staging: a promotion now is refused,
    // naming the release, how long it soaked, and the command for later.
    let (ok, text) = promote(&admin, &spec, "staging", &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "artifact {v1_digest} of web has been stable in staging for"
        )),
        "{text}"
    );
    assert!(
        text.contains("under the 1h environment production asks for"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "`cutover promote web --from staging --to production --release {staged}`"
        )),
        "{text}"
    );
    // A build staging never ran: refused, with the way through staging.
    let (ok, text) = deploy(&admin, &spec, "production", "v2", &v2, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("has never been stable in staging"), "{text}");
    assert!(
        text.contains(
            "deploy it to staging first, then `cutover promote web --from staging --to production`"
        ),
        "{text}"
    );
    // A deployer cannot break glass; an admin can, with a reason.
    let (ok, text) = deploy(
        &pete,
        &spec,
        "production",
        "v2",
        &v2,
        &["--break-glass", "--reason", "x"],
    );
    assert!(!ok && text.contains("admin"), "{text}");
    let (ok, text) = deploy(&admin, &spec, "production", "v2", &v2, &["--break-glass"]);
    assert!(!ok && text.contains("--reason"), "{text}");
    let (ok, text) = deploy(
        &admin,
        &spec,
        "production",
        "v2",
        &v2,
        &[
            "--break-glass",
            "--reason",
            "checkout is down, fix verified on a laptop",
        ],
    );
    assert!(ok, "{text}");
    let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
    let id = rollouts[0]["id"].as_str().unwrap().to_string();
    let status = cli.json(&admin, &["rollout", "status", &id]);
    let glass = status["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "break_glass")
        .unwrap_or_else(|| panic!("a break_glass entry: {status}"));
    let message = glass["message"].as_str().unwrap();
    assert!(
        message.contains("root broke glass: checkout is down, fix verified on a laptop")
            && message.contains("has never been stable in staging"),
        "{message}"
    );
    let audit = cli.json(&admin, &["audit", "--limit", "20"]);
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|a| {
            a["action"] == "deploy" && a["outcome"] == "ok" && a["arguments"]["break_glass"] == true
        })
        .unwrap_or_else(|| panic!("the break of glass in the audit log: {audit}"));
    assert_eq!(
        entry["arguments"]["reason"],
        "checkout is down, fix verified on a laptop"
    );

    // The policy is pinned: the deployer cannot shorten the soak...
    let spec = spec_file(&cli, port, "", short_soak);
    let (ok, text) = promote(&pete, &spec, "staging", &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("environment production has promotion from staging after 1h")
            && text.contains("the spec says promotion from staging after 1s")
            && text.contains("only an admin changes"),
        "{text}"
    );
    // ...an admin can, and the deployer promotes under it: production runs
    // staging's digest and version with its own environment.
    let (ok, text) = promote(&admin, &spec, "nowhere", &[]);
    assert!(!ok && text.contains("no environment \"nowhere\""), "{text}");
    let (ok, text) = deploy(&admin, &spec, "staging", "v1", &v1, &[]);
    assert!(ok, "{text}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (ok, text) = promote(&admin, &spec, "staging", &["--release", &staged, "--wait"]);
    assert!(ok, "{text}");
    let production = cli.json(&admin, &["releases", "web", "--env", "production"]);
    let promoted = &production[0];
    assert_eq!(promoted["current"], true, "{production}");
    assert_eq!(promoted["promoted_from"], format!("staging/{staged}"));
    assert_eq!(promoted["release"]["version"], "v1");
    assert_eq!(promoted["release"]["digest"], v1_digest.as_str());
    assert_ne!(
        promoted["release"]["id"],
        staged.as_str(),
        "production's own environment"
    );
    let app_env =
        cutover_integration_tests::http_get(&format!("127.0.0.12:{port}"), "/env-sha256/APP_ENV");
    assert!(app_env.contains(&sha256_hex("production")), "{app_env}");
    let status = cli.json(
        &admin,
        &["rollout", "status", promoted["rollout"].as_str().unwrap()],
    );
    assert!(
        status["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "promoted"
                && t["message"] == format!("promoted from staging/{staged}")),
        "{status}"
    );
    let (ok, table) = cli.run(&admin, &["releases", "web", "--env", "production"]);
    assert!(
        ok && table.contains(&format!("staging/{staged}")),
        "{table}"
    );

    // A freeze window that runs now: refused even to an admin (nothing
    // pinned), then pinned by breaking glass.
    let freeze = format!("{short_soak}\nfreeze = [{:?}]", window_around_now());
    let spec = spec_file(&cli, port, "", &freeze);
    let (ok, text) = promote(&admin, &spec, "staging", &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("environment production is frozen: window"),
        "{text}"
    );
    assert!(text.contains("(UTC) runs until"), "{text}");
    assert!(text.contains("a rollback is never frozen"), "{text}");
    let status = cli.json(&admin, &["freeze", "status", "--env", "production"]);
    assert_eq!(
        status["frozen"], false,
        "the refused deploy pinned nothing: {status}"
    );
    assert_eq!(status["promotion"]["from"], "staging");
    let (ok, text) = promote(
        &admin,
        &spec,
        "staging",
        &["--break-glass", "--reason", "freeze for the sale"],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("nothing to do"),
        "the release runs already: {text}"
    );
    let status = cli.json(&admin, &["freeze", "status", "--env", "production"]);
    assert_eq!(status["frozen"], true, "{status}");
    assert_eq!(status["frozen_by"], window_around_now());
    assert_eq!(status["timezone"], "UTC");
    let (ok, text) = cli.run(&admin, &["freeze", "status", "--env", "production"]);
    assert!(ok && text.contains("now: FROZEN by"), "{text}");
    let (ok, text) = promote(&pete, &spec, "staging", &[]);
    assert!(!ok && text.contains("is frozen"), "{text}");
    // An incident cannot wait: the rollback goes.
    let (ok, text) = cli.run(&pete, &["rollback", "web", "--env", "production", "--wait"]);
    assert!(ok, "{text}");
    let production = cli.json(&admin, &["releases", "web", "--env", "production"]);
    let current = production
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .unwrap();
    assert_eq!(current["release"]["version"], "v2", "{production}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_deploys_wait_for_another_operators_approval() {
    let cluster = cluster_of(&[("node-1", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pete = cli.operator(&admin, "pete", "production");
    let quinn = cli.operator(&admin, "quinn", "production");
    let sam = cli.operator(&admin, "sam", "staging");
    let (v1, v2) = two_builds(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let spec = spec_file(
        &cli,
        port,
        "",
        "approvals = 1\napprovals_for_rollback = 0\napproval_timeout = \"30m\"",
    );
    let deploy = |config: &Path, version: &str, artifact: &str| {
        let (ok, text) = cli.deploy(config, &spec, "production", version, artifact, &[]);
        assert!(ok, "{text}");
        let rollouts = cli.json(config, &["rollout", "list", "--env", "production"]);
        rollouts[0]["id"].as_str().unwrap().to_string()
    };
    let current = || {
        let releases = cli.json(&admin, &["releases", "web", "--env", "production"]);
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["current"] == true)
            .map(|r| r["release"]["version"].as_str().unwrap().to_string())
    };

    // The first deploy pins the policy and waits: nothing runs yet.
    let first = deploy(&admin, "v1", &v1);
    let status = cli.json(&admin, &["rollout", "status", &first]);
    assert_eq!(status["state"], "awaiting_approval", "{status}");
    assert_eq!(status["approval"]["required"], 1);
    assert_eq!(status["nodes"][0]["state"], "pending", "{status}");
    let (ok, table) = cli.run(&admin, &["rollout", "list", "--env", "production"]);
    assert!(ok && table.contains("awaiting_approval"), "{table}");
    let (ok, text) = cli.run(&admin, &["freeze", "status", "--env", "production"]);
    assert!(
        ok && text.contains("approvals: 1 for a deploy or promotion, 0 for a rollback"),
        "{text}"
    );
    // Not by the requester, nor by a deployer of another environment.
    let (ok, text) = cli.run(&admin, &["approve", &first]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "root requested rollout {first} and cannot approve it"
        )),
        "{text}"
    );
    let (ok, text) = cli.run(&sam, &["approve", &first]);
    assert!(!ok && text.contains("production"), "{text}");
    assert_eq!(current(), None, "nothing ran");
    // Another deployer of production approves: it runs.
    let (ok, text) = cli.run(&pete, &["approve", &first, "--comment", "diff reviewed"]);
    assert!(ok, "{text}");
    assert!(text.contains("approved by pete"), "{text}");
    let (ok, text) = cli.run(&admin, &["rollout", "watch", &first]);
    assert!(ok, "{text}");
    assert_eq!(current().as_deref(), Some("v1"));
    let audit = cli.json(&admin, &["audit", "--limit", "30"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "control_rollout"
                && a["who"].as_str().unwrap_or_default().contains("pete")
                && a["arguments"]["action"] == "approve"
                && a["arguments"]["comment"] == "diff reviewed"
                && a["outcome"] == "ok"),
        "{audit}"
    );

    // A rejection ends the next deploy with nothing changed.
    let second = deploy(&pete, "v2", &v2);
    let (ok, text) = cli.run(&pete, &["approve", &second]);
    assert!(!ok && text.contains("cannot approve"), "{text}");
    let (ok, text) = cli.run(
        &quinn,
        &["reject", &second, "--comment", "not during the sale"],
    );
    assert!(ok, "{text}");
    let status = cli.json(&admin, &["rollout", "status", &second]);
    assert_eq!(status["state"], "aborted", "{status}");
    assert_eq!(status["approval"]["rejected"]["by"], "quinn");
    assert_eq!(
        status["approval"]["rejected"]["comment"],
        "not during the sale"
    );
    assert_eq!(current().as_deref(), Some("v1"), "nothing changed");
    let (ok, text) = cli.run(&pete, &["approve", &second]);
    assert!(!ok && text.contains("not awaiting approval"), "{text}");

    // Approved, the next one runs; the rollback needs no approval here
    // (approvals_for_rollback = 0), and approving it is a clear error.
    let third = deploy(&pete, "v2", &v2);
    let (ok, text) = cli.run(&quinn, &["approve", &third]);
    assert!(ok, "{text}");
    let (ok, text) = cli.run(&pete, &["rollout", "watch", &third]);
    assert!(ok, "{text}");
    assert_eq!(current().as_deref(), Some("v2"));
    let (ok, text) = cli.run(&pete, &["rollback", "web", "--env", "production", "--wait"]);
    assert!(ok, "{text}");
    assert_eq!(current().as_deref(), Some("v1"));
    let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
    let rollback = rollouts[0]["id"].as_str().unwrap().to_string();
    let (ok, text) = cli.run(&quinn, &["approve", &rollback]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("rollout {rollback} needs no approval")),
        "{text}"
    );
    // The requester withdraws a request with an abort.
    let fourth = deploy(&pete, "v2", &v2);
    let (ok, text) = cli.run(&pete, &["rollout", "abort", &fourth]);
    assert!(ok, "{text}");
    let status = cli.json(&admin, &["rollout", "status", &fourth]);
    assert_eq!(status["state"], "aborted", "{status}");
    assert_eq!(current().as_deref(), Some("v1"));

    // A deploy of two services asks once, at its first rollout: here the
    // second service's, as the first runs its release already.
    let api_port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[]).unwrap();
    let both = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("app = \"shop\"", "app = \"shop\"\norder = [\"web\", \"api\"]")
        .replace(
        "[strategy]",
        &format!(
            "[services.api]\ncommand = [\"python3\", \"app.py\"]\nlisten = \":{api_port}\"\n[services.api.health]\npath = \"/health\"\ninterval = \"100ms\"\nhealthy_deadline = \"5s\"\n[strategy]"
        ),
    );
    let both_file = dir.path().join("both.toml");
    std::fs::write(&both_file, both).unwrap();
    let both_file = both_file.to_str().unwrap();
    let (ok, text) = cli.deploy(&pete, both_file, "production", "v1", &v1, &[]);
    assert!(ok, "{text}");
    let deployment = text.lines().next().unwrap().trim().to_string();
    let api = loop {
        let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
        if let Some(api) = rollouts
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == "api" && r["deployment"] == deployment.as_str())
        {
            break api.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = api["id"].as_str().unwrap().to_string();
    let status = cli.json(&admin, &["rollout", "status", &id]);
    assert_eq!(status["state"], "awaiting_approval", "{status}");
    let (ok, text) = cli.run(&quinn, &["approve", &id]);
    assert!(ok, "{text}");
    let (ok, text) = cli.run(&pete, &["rollout", "watch", &id]);
    assert!(ok, "{text}");

    // Rollbacks ask too once an admin says so; an admin breaks glass.
    let spec = spec_file(
        &cli,
        port,
        "",
        "approvals = 1\napprovals_for_rollback = 1\napproval_timeout = \"30m\"",
    );
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v1", &v1, &[]);
    assert!(ok && text.contains("nothing to do"), "{text}");
    let (ok, text) = cli.run(&admin, &["freeze", "status", "--env", "production"]);
    assert!(ok && text.contains("1 for a rollback"), "{text}");
    let fifth = deploy(&pete, "v2", &v2);
    let (ok, text) = cli.run(&quinn, &["approve", &fifth]);
    assert!(ok, "{text}");
    let (ok, text) = cli.run(&pete, &["rollout", "watch", &fifth]);
    assert!(ok, "{text}");
    let (ok, text) = cli.run(&pete, &["rollback", "web", "--env", "production"]);
    assert!(ok && text.contains("awaits 1 approval(s)"), "{text}");
    let waiting = text.lines().next().unwrap().trim().to_string();
    let (ok, text) = cli.run(&pete, &["rollout", "abort", &waiting]);
    assert!(ok, "{text}");
    let (ok, text) = cli.run(
        &pete,
        &[
            "rollback",
            "web",
            "--env",
            "production",
            "--break-glass",
            "--reason",
            "x",
        ],
    );
    assert!(!ok && text.contains("admin"), "{text}");
    let (ok, text) = cli.run(
        &admin,
        &[
            "rollback",
            "web",
            "--env",
            "production",
            "--break-glass",
            "--reason",
            "checkout is down",
            "--wait",
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(current().as_deref(), Some("v1"));
    let rollouts = cli.json(&admin, &["rollout", "list", "--env", "production"]);
    let status = cli.json(
        &admin,
        &["rollout", "status", rollouts[0]["id"].as_str().unwrap()],
    );
    assert!(
        status["timeline"].as_array().unwrap().iter().any(|t| t["kind"] == "break_glass"
            && t["message"]
                == "root broke glass: checkout is down (past: 1 approval(s) of environment production)"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_mirrors_production_and_diff_says_where_they_differ() {
    let cluster = cluster_of(&[("node-1", "staging"), ("node-2", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    app_archive(dir.path());
    let v1 = dir.path().join("app.tar.gz").display().to_string();
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let spec = spec_file(
        &cli,
        port,
        "mirror = \"production\"",
        "strategy = { min_healthy_time = \"300ms\" }",
    );
    let deploy = |env: &str| {
        let (ok, text) = cli.deploy(&admin, &spec, env, "v1", &v1, &["--wait"]);
        assert!(ok, "{text}");
        text
    };
    // Nothing in production yet: the mirror says so, the deploy goes on.
    let text = deploy("staging");
    assert!(
        text.contains("warning: staging mirrors production, which runs no web yet"),
        "{text}"
    );
    deploy("production");
    // Now it names what differs but the declared APP_ENV: the strategy,
    // and a variable `config set` gave staging alone.
    let (ok, text) = cli.run(
        &admin,
        &[
            "config", "set", "web", "--env", "staging", "DEBUG=1", "--wait",
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = cli.deploy(&admin, &spec, "staging", "v2", &v1, &["--wait"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: staging differs from production, which it mirrors: web strategy min_healthy_time_ms: \"200\" here, \"300\" there"),
        "{text}"
    );
    assert!(
        text.contains("web env DEBUG: \"1\" here, nothing there"),
        "{text}"
    );
    assert!(!text.contains("env APP_ENV"), "declared: {text}");

    let diff = cli.json(
        &admin,
        &["diff", "web", "--env", "staging", "--env", "production"],
    );
    let row = |aspect: &str, key: &str| {
        diff["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["aspect"] == aspect && r["key"] == key)
            .unwrap_or_else(|| panic!("no {aspect} {key}: {diff}"))
            .clone()
    };
    assert_eq!(row("env", "APP_ENV")["a"], "staging");
    assert_eq!(row("env", "APP_ENV")["b"], "production");
    assert_eq!(row("release", "digest")["same"], true, "one build");
    assert_eq!(row("strategy", "min_healthy_time_ms")["same"], false);
    assert_eq!(row("nodes", "count")["a"], "1");
    let os = row("nodes", "os");
    assert!(os["a"].as_str().unwrap().starts_with("1 x "), "{os}");
    assert_eq!(os["same"], true, "both nodes are this machine");
    let (ok, table) = cli.run(
        &admin,
        &["diff", "web", "--env", "staging", "--env", "production"],
    );
    assert!(ok, "{table}");
    assert!(
        table.contains("STAGING") && table.contains("PRODUCTION") && table.contains("APP_ENV"),
        "{table}"
    );
    assert!(
        !table.contains("digest"),
        "equal rows only with --all: {table}"
    );
    assert!(
        table.contains("difference(s) between web in staging and in production"),
        "{table}"
    );
    let (ok, all) = cli.run(
        &admin,
        &[
            "diff",
            "web",
            "--env",
            "staging",
            "--env",
            "production",
            "--all",
        ],
    );
    assert!(ok && all.contains("digest"), "{all}");
    // Bad input: clear errors.
    let (ok, text) = cli.run(&admin, &["diff", "web", "--env", "staging"]);
    assert!(!ok && text.contains("name two environments"), "{text}");
    let (ok, text) = cli.run(&admin, &["diff", "web", "--env", "staging", "--env", "qa"]);
    assert!(
        !ok && text.contains("web has no current release in qa"),
        "{text}"
    );
    // A spec whose policy cannot work is refused by name, before anything.
    let good = std::fs::read_to_string(&spec).unwrap();
    for (keys, says) in [
        (
            "freeze = [\"Fri 16:00 - Mon 08:00\", \"Sun 10:00 - Sun 12:00\"]",
            "environments.production.freeze[1]",
        ),
        (
            "freeze = [\"Fri 16:00 to Mon 08:00\"]",
            "environments.production.freeze[0]",
        ),
        ("approvals = 9", "environments.production.approvals"),
        ("mirror = \"production\"", "environments.production.mirror"),
    ] {
        let bad = good.replace(
            "strategy = { min_healthy_time = \"300ms\" }",
            &format!("strategy = {{ min_healthy_time = \"300ms\" }}\n{keys}"),
        );
        std::fs::write(&spec, bad).unwrap();
        let (ok, text) = cli.deploy(&admin, &spec, "production", "v9", &v1, &[]);
        assert!(!ok && text.contains(says), "{keys}: {text}");
    }
}
