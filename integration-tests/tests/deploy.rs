//! The files under deploy/ are what operators install: they must stay valid.

use std::path::{Path, PathBuf};
use std::process::Command;

use cutover_agent::config::AgentConfig;
use cutover_coordinator::config::CoordinatorConfig;
use cutover_integration_tests::{bin, require_tool};
use cutover_proto::v1 as pb;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn example_configs_load_with_the_real_loaders() {
    let config = CoordinatorConfig::load(&repo().join("deploy/config/coordinator.toml")).unwrap();
    assert_eq!(config.listen.port(), 7443);
    assert_eq!(config.limits.max_message_bytes, 4 << 20);
    let agent = AgentConfig::load(&repo().join("deploy/config/agent.toml")).unwrap();
    assert_eq!(agent.labels.get("role").map(String::as_str), Some("web"));
}

/// The example app specs parse and resolve as documented.
#[test]
fn example_app_specs_resolve() {
    use cutover_coordinator::spec::AppSpec;
    let artifact = cutover_proto::v1::Artifact {
        url: "coordinator:".into(),
        digest: format!("sha256:{}", "0".repeat(64)),
    };
    for (file, env, service) in [
        ("deploy/examples/shop/cutover.toml", "production", "web"),
        ("deploy/examples/shop/cutover.toml", "staging", "web"),
        ("examples/demo/cutover.toml", "local", "web"),
        ("examples/demo/cutover-db.toml", "local", "web"),
    ] {
        let path = repo().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = AppSpec::parse(&text, file).unwrap_or_else(|e| panic!("{e}"));
        let resolved = spec
            .resolve(file, env, service, "v1", Some(&artifact), None)
            .unwrap();
        assert_eq!(
            resolved.selector.get("env").map(String::as_str),
            Some(env),
            "{file}"
        );
    }
    // The demo's canary step appends examples/demo/canary.toml to its spec.
    let canary = std::fs::read_to_string(repo().join("examples/demo/canary.toml")).unwrap();
    for file in [
        "examples/demo/cutover.toml",
        "examples/demo/cutover-db.toml",
        "examples/demo/cutover-docker.toml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap() + &canary;
        let spec = AppSpec::parse(&text, file).unwrap_or_else(|e| panic!("{e}"));
        let image = file.contains("docker").then_some("registry.local/demo/web@sha256:0000000000000000000000000000000000000000000000000000000000000000");
        let artifact = image.is_none().then_some(&artifact);
        let resolved = spec
            .resolve(file, "local", "web", "v4", artifact, image)
            .unwrap_or_else(|e| panic!("{e}"));
        let canary = resolved.strategy.canary().expect("the demo's canary step");
        assert_eq!(canary.analyses["errors"].metrics.len(), 2, "{file}");
    }
    let shop = AppSpec::parse(
        &std::fs::read_to_string(repo().join("deploy/examples/shop/cutover.toml")).unwrap(),
        "shop",
    )
    .unwrap();
    let horizon = shop
        .resolve("shop", "production", "horizon", "v1", Some(&artifact), None)
        .unwrap();
    let Some(pb::release::Kind::Worker(worker)) = horizon.release.kind else {
        panic!("Horizon is a worker")
    };
    assert_eq!(worker.min_healthy_time_ms, 15_000);
    assert_eq!(
        horizon.release.stop_command,
        ["php", "artisan", "horizon:terminate"]
    );
    // The migration goes with web's deploys only, its checks first.
    assert!(horizon.migration.is_none());
    let web = shop
        .resolve("shop", "production", "web", "v1", Some(&artifact), None)
        .unwrap();
    // Production is a canary judged by the checkout analysis; staging rolls.
    let canary = web.strategy.canary().expect("production runs a canary");
    assert_eq!(canary.analyses["checkout"].metrics.len(), 3);
    let staging = shop
        .resolve("shop", "staging", "web", "v1", Some(&artifact), None)
        .unwrap();
    assert!(staging.strategy.canary().is_none());
    // Production waits for a second operator, its rollbacks do not.
    let policy = cutover_coordinator::policy::EnvironmentPolicy::of(
        shop.environment("shop", "production").unwrap(),
    );
    let approval = policy.deploy_approval().expect("production asks");
    assert_eq!((approval.required, approval.timeout_ms), (1, 1_800_000));
    assert_eq!(policy.rollback_approval(), None);
    let migration = web.migration.expect("web runs the migration");
    assert_eq!(
        migration.commands,
        [
            vec!["php", "artisan", "migrate:status"],
            vec!["php", "artisan", "migrate", "--force", "--no-interaction"]
        ]
    );
}

/// `systemd-analyze verify` on both units, with ExecStart pointed at the
/// built binaries (verify checks that they exist), plus the offline security
/// score so hardening cannot quietly regress. Never skipped: without
/// systemd-analyze it fails (scripts/test.sh installs it).
#[test]
fn systemd_units_verify_and_stay_hardened() {
    require_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    // Exposure in tenths, as --threshold takes it: 20 is systemd's "2.0 OK".
    for (unit, binary, max_exposure) in [
        ("cutover.service", "cutover", 20),
        ("cutover-agent.service", "cutover-agent", 50),
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        let installed = format!("/usr/local/bin/{binary} ");
        assert!(text.contains(&installed), "{unit} must start {installed}");
        let path = dir.path().join(unit);
        std::fs::write(
            &path,
            text.replace(&installed, &format!("{} ", bin(binary).display())),
        )
        .unwrap();

        let verify = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&verify.stderr);
        // verify exits 0 on unknown keys and only warns: any output is a finding.
        assert!(
            verify.status.success() && stderr.trim().is_empty(),
            "{unit}: {stderr}"
        );
        for directive in [
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "StateDirectory=",
            "Restart=",
        ] {
            assert!(text.contains(directive), "{unit} lacks {directive}");
        }
        // What the agent's handoff and crash restarts rely on (see
        // agent_handoff.rs, which plays systemd's side of them).
        if unit == "cutover-agent.service" {
            for directive in [
                "Type=notify",
                "WatchdogSec=",
                "FileDescriptorStoreMax=",
                "ExecReload=/usr/local/bin/cutover-agent --config /etc/cutover/agent.toml upgrade",
                "TimeoutStartSec=",
                "KillMode=process",
            ] {
                assert!(text.contains(directive), "{unit} lacks {directive}");
            }
        }

        let security = Command::new("systemd-analyze")
            .args([
                "security",
                "--offline=true",
                &format!("--threshold={max_exposure}"),
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            security.status.success(),
            "{unit} exposure above {max_exposure} tenths: {}",
            String::from_utf8_lossy(&security.stdout)
        );
    }
}

/// The metric names of a live coordinator's exposition, as samples carry
/// them (a counter `x` is sampled as `x_total`, a histogram as `x_bucket`,
/// `x_sum` and `x_count`), once a node serves a release that took a
/// request, so that every family has a sample.
async fn exposed_metric_names() -> std::collections::BTreeSet<String> {
    use cutover_integration_tests::{
        app_archive, body, deploy_request, ended, http_get, wait_for_rollout, web_spec, Cluster,
        Tuning,
    };
    use std::time::Duration;
    let cluster = Cluster::start(1, Tuning::default()).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| n.len() == 1 && n[0].connected)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 11].into(), &(40000..=44999), &[]).unwrap();
    let mut client = cluster.operator().await;
    // A worker that probes its queues (in the test Redis): the queue and
    // worker families have series only with such a release.
    let redis = cutover_integration_tests::redis::TestRedis::from_env();
    let spec = format!(
        "{}\n{}",
        web_spec(port, "VERSION = \"v1\"", "min_healthy_time = \"0s\""),
        format_args!(
            r#"
[services.worker]
command = ["python3", "worker.py"]
stop_command = ["python3", "worker.py", "terminate"]
min_healthy_time = "1s"
[services.worker.queues]
redis = "{}"
prefix = "{}"
names = ["default"]
interval = "1s"
max_depth = 100
max_wait = "5m"
"#,
            redis.address, redis.prefix
        )
    );
    for service in ["web", "worker"] {
        let mut request = deploy_request(spec.clone(), "v1", &artifact);
        request.service = service.into();
        let id = client.deploy(request).await.unwrap().into_inner().rollouts[0]
            .id
            .clone();
        let done = wait_for_rollout(&mut client, &id, Duration::from_secs(60), ended).await;
        assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    }
    assert_eq!(body(&http_get(&format!("127.0.0.11:{port}"), "/")), "v1");
    // A backup and a drill of a data set, run once each: the job and
    // recovery families have series only once such runs ended.
    let jobs = format!(
        "{spec}\n{}",
        r#"
[jobs.backup]
kind = "backup"
dataset = "db"
rpo = "15m"
command = ["sh", "-c", "echo '{\"data_time\": 1}'"]
schedule = "@daily"
[jobs.drill]
kind = "restore_test"
dataset = "db"
rto = "1h"
command = ["sh", "-c", "echo '{\"data_time\": 1}'"]
schedule = "@daily"
"#
    );
    client
        .apply_jobs(pb::ApplyJobsRequest {
            spec: jobs,
            spec_file: "cutover.toml".into(),
            env: "test".into(),
        })
        .await
        .unwrap();
    for job in ["backup", "drill"] {
        let mut run = client
            .run_job(pb::RunJobRequest {
                env: "test".into(),
                job: job.into(),
                node: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .runs
            .remove(0);
        while run.state() == pb::JobRunState::Running {
            tokio::time::sleep(Duration::from_millis(50)).await;
            run = client
                .get_job_run(pb::GetJobRunRequest {
                    env: "test".into(),
                    job: job.into(),
                    run_id: run.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
        }
        assert_eq!(run.state(), pb::JobRunState::Succeeded, "{run:#?}");
    }
    // A lever set: the lever families.
    client
        .set_lever(pb::SetLeverRequest {
            env: "test".into(),
            service: "web".into(),
            lever: "throttle".into(),
            set: Some(pb::TrafficLevers {
                throttle: Some(pb::Throttle {
                    rps: 10_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // A secret with a rotation schedule: the rotation families.
    client
        .set_secret(pb::SetSecretRequest {
            env: "test".into(),
            name: "DB_PASSWORD".into(),
            value: b"hunter2".to_vec(),
            rotate_every_ms: Some(90 * 86_400_000),
        })
        .await
        .unwrap();
    // A service an operator locked: the lock family.
    client
        .lock_service(pb::LockServiceRequest {
            env: "test".into(),
            service: "web".into(),
            reason: "the metrics test".into(),
        })
        .await
        .unwrap();
    // The next heartbeat carries the proxy's counts: wait until the
    // request above shows in them (not for a heartbeat's worth of time).
    let http = cluster.coordinator.as_ref().unwrap().http_addr.to_string();
    let counted = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("cutover_release_responses{")
                && l.contains("class=\"2xx\"")
                && !l.ends_with(" 0")
        }) && text.contains("cutover_queue_depth{")
            && text.contains("cutover_worker_up{")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = body(&http_get(&http, "/metrics")).to_string();
        if counted(&text) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat brought the proxy's counts and the worker's queues: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

/// Every `cutover_*` metric name in `text`.
fn metric_names(text: &str, into: &mut std::collections::BTreeSet<String>) {
    let mut rest = text;
    while let Some(at) = rest.find("cutover_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        into.insert(name);
    }
}

/// The alert rules and the Grafana dashboard name only metrics the
/// coordinator exposes; the rules pass `promtool check rules` and fire as
/// their unit tests say (`deploy/prometheus/cutover-alerts.test.yml`); the
/// dashboard's queries parse (checked as recording rules). Never skipped:
/// without promtool it fails (scripts/test.sh installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_name_real_metrics_and_fire_as_tested() {
    let dir = repo().join("deploy/prometheus");
    let exposed = exposed_metric_names().await;
    let mut named = std::collections::BTreeSet::new();
    for file in ["cutover-alerts.yml", "cutover-alerts.test.yml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("expr:") || l.contains("series:"))
        {
            metric_names(line, &mut named);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/cutover.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("a query").to_string())
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    for query in &queries {
        metric_names(query, &mut named);
    }
    assert!(named.len() >= 12, "{named:?}");
    let unknown: Vec<_> = named.difference(&exposed).collect();
    assert!(
        unknown.is_empty(),
        "the rules name metrics the coordinator does not expose: {unknown:?}; it exposes {exposed:?}"
    );

    require_tool("promtool", "prometheus");
    let scratch = tempfile::tempdir().unwrap();
    let as_rules = scratch.path().join("dashboard-queries.yml");
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"record": format!("dashboard_query_{i}"), "expr": q}))
        .collect();
    // JSON is YAML: promtool reads it as a rules file.
    std::fs::write(
        &as_rules,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let dashboard_rules = as_rules.display().to_string();
    for args in [
        ["check", "rules", "cutover-alerts.yml"],
        ["test", "rules", "cutover-alerts.test.yml"],
        ["check", "rules", dashboard_rules.as_str()],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
