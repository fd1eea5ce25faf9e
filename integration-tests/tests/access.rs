//! Operators and roles through the real `cutover` binary: an admin creates
//! operators (the key made on the CLI's side, the certificate signed by the
//! coordinator), each role is held to what it may do, a revoked operator is
//! refused, and the audit log records every mutating call and refusal.

use std::path::Path;
use std::time::Duration;

use cutover_common::identity::Role;
use cutover_common::tls::TlsFiles;
use cutover_integration_tests::{app_archive, bin, Cluster, Tuning};
use serde_json::Value;

struct Cli {
    coordinator: String,
}

impl Cli {
    /// Runs `cutover` with the credentials in `args` (flags or --cli-config).
    fn run(&self, args: &[&str]) -> (bool, String) {
        let output = std::process::Command::new(bin("cutover"))
            .args(args)
            .env_remove("CUTOVER_CLI_CONFIG")
            .env("HOME", "/nonexistent")
            .output()
            .expect("run cutover");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// The connection flags for the credentials in `files`.
    fn flags<'a>(&'a self, files: &'a TlsFiles) -> [&'a str; 8] {
        [
            "--coordinator",
            &self.coordinator,
            "--ca-cert",
            files.ca_cert.to_str().unwrap(),
            "--cert",
            files.cert.to_str().unwrap(),
            "--key",
            files.key.to_str().unwrap(),
        ]
    }

    fn as_config(&self, config: &Path, args: &[&str]) -> (bool, String) {
        let mut all = vec!["--cli-config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run(&all)
    }
}

fn spec(port: u16) -> String {
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
[environments.test]
nodes = {{ env = "test" }}
[environments.production]
nodes = {{ env = "production" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_hold_operators_to_what_they_may_do_and_the_audit_log_says_so() {
    let cluster = Cluster::start(1, Tuning::default()).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| n.len() == 1 && n[0].connected)
        .await;
    let cli = Cli {
        coordinator: cluster.url(),
    };
    // The bootstrap admin: a certificate issued offline with the CA key.
    let root = cluster.pki.client_files(Role::Operator, "root");
    let admin_flags = cli.flags(&root);
    let dir = tempfile::tempdir().unwrap();
    let create = |name: &str, role: &str, envs: &[&str]| {
        let out = dir.path().join(name);
        let mut args: Vec<&str> = admin_flags.to_vec();
        let out_text = out.display().to_string();
        args.extend([
            "operator", "create", name, "--role", role, "--out", &out_text,
        ]);
        for env in envs {
            args.extend(["--env", env]);
        }
        let (ok, text) = cli.run(&args);
        assert!(ok, "operator create {name}: {text}");
        out.join("cli.toml")
    };
    let viewer = create("vera", "viewer", &[]);
    let test_deployer = create("dora", "deployer", &["test"]);
    let production_deployer = create("pete", "deployer", &["production"]);
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(dir.path().join("vera/operator-vera.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let app = tempfile::tempdir().unwrap();
    let (_, digest) = app_archive(app.path());
    let archive = app.path().join("app.tar.gz");
    assert!(archive.exists(), "the test app archive");
    let spec_file = app.path().join("cutover.toml");
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    std::fs::write(&spec_file, spec(port)).unwrap();
    let deploy = |config: &Path, env: &str| {
        cli.as_config(
            config,
            &[
                "deploy",
                "-f",
                spec_file.to_str().unwrap(),
                "--env",
                env,
                "--version",
                "v1",
                "--artifact",
                archive.to_str().unwrap(),
                "--wait",
            ],
        )
    };

    // A viewer reads, and is refused a deploy with the role it would need.
    let (ok, text) = cli.as_config(&viewer, &["nodes"]);
    assert!(ok, "{text}");
    let (ok, text) = deploy(&viewer, "test");
    assert!(!ok);
    assert!(text.contains("operator vera is a viewer"), "{text}");
    assert!(text.contains("deployer"), "{text}");

    // A deployer deploys in its environment, not in another one.
    let (ok, text) = deploy(&production_deployer, "test");
    assert!(!ok);
    assert!(
        text.contains("operator pete is a deployer of production")
            && text.contains("environment test"),
        "{text}"
    );
    // Which nodes an environment covers is pinned by its first deploy,
    // which a deployer limited to environments may not make.
    let (ok, text) = deploy(&test_deployer, "test");
    assert!(!ok && text.contains("has never been deployed"), "{text}");
    let admin = dir.path().join("root.toml");
    std::fs::write(
        &admin,
        format!(
            "coordinator = {:?}\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n",
            cli.coordinator,
            root.ca_cert.display().to_string(),
            root.cert.display().to_string(),
            root.key.display().to_string()
        ),
    )
    .unwrap();
    let (ok, text) = deploy(&admin, "test");
    assert!(ok, "{text}");
    let (ok, text) = deploy(&test_deployer, "test");
    assert!(ok, "{text}");
    // Its own environment pointed at other nodes: refused.
    std::fs::write(
        &spec_file,
        spec(port).replace(
            "nodes = { env = \"test\" }",
            "nodes = { env = \"production\" }",
        ),
    )
    .unwrap();
    let (ok, text) = deploy(&test_deployer, "test");
    assert!(
        !ok && text.contains("environment test selects env=test on this coordinator"),
        "{text}"
    );
    std::fs::write(&spec_file, spec(port)).unwrap();
    // With the artifact already in the store, the viewer's deploy itself is
    // what is refused.
    let (ok, text) = cli.as_config(
        &viewer,
        &[
            "deploy",
            "-f",
            spec_file.to_str().unwrap(),
            "--env",
            "test",
            "--version",
            "v2",
            "--artifact",
            &digest,
        ],
    );
    assert!(!ok);
    assert!(
        text.contains(
            "operator vera is a viewer; deploy needs the deployer role for environment test"
        ),
        "{text}"
    );

    // Only an admin manages operators.
    let (ok, text) = cli.as_config(
        &test_deployer,
        &[
            "operator",
            "create",
            "eve",
            "--role",
            "admin",
            "--out",
            dir.path().join("eve").to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(text.contains("needs the admin role"), "{text}");
    assert!(!dir.path().join("eve/cli.toml").exists());
    // A name is never reused, and bad input changes nothing.
    let (ok, text) = cli.run(
        &[
            &admin_flags[..],
            &[
                "operator",
                "create",
                "vera",
                "--role",
                "admin",
                "--out",
                dir.path().join("vera2").to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(!ok && text.contains("exists"), "{text}");
    let (ok, text) = cli.run(
        &[
            &admin_flags[..],
            &[
                "operator", "create", "../x", "--role", "viewer", "--out", "/tmp/x",
            ],
        ]
        .concat(),
    );
    assert!(!ok && text.contains("operator name"), "{text}");

    // Revoked: refused from then on, whatever it presents.
    let (ok, text) = cli.run(&[&admin_flags[..], &["operator", "revoke", "vera"]].concat());
    assert!(ok, "{text}");
    let (ok, text) = cli.as_config(&viewer, &["nodes"]);
    assert!(!ok);
    assert!(text.contains("operator vera was revoked"), "{text}");

    let (ok, text) =
        cli.run(&[&admin_flags[..], &["--output", "json", "operator", "list"]].concat());
    assert!(ok, "{text}");
    let operators: Value = serde_json::from_str(&text).unwrap();
    let roles: Vec<(String, String, bool)> = operators
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["role"].as_str().unwrap().to_string(),
                !o["revoked_at"].is_null(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        vec![
            ("dora".into(), "deployer".into(), false),
            ("pete".into(), "deployer".into(), false),
            // Issued offline, recorded when first seen.
            ("root".into(), "admin".into(), false),
            ("tester".into(), "admin".into(), false),
            ("vera".into(), "viewer".into(), true),
        ]
    );

    // The audit log: who did what and how it ended, refusals included.
    let (ok, text) = cli.as_config(
        &test_deployer,
        &["--output", "json", "audit", "--since", "1h"],
    );
    assert!(ok, "{text}");
    let entries: Value = serde_json::from_str(&text).unwrap();
    let summary: Vec<(String, String, String)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let outcome = e["outcome"].as_str().unwrap();
            (
                e["who"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                outcome.split(':').next().unwrap().to_string(),
            )
        })
        .collect();
    let expect = |who: &str, action: &str, outcome: &str| {
        assert!(
            summary.contains(&(format!("operator/{who}"), action.into(), outcome.into())),
            "no {who} {action} {outcome} in {summary:#?}"
        );
    };
    expect("root", "create_operator", "ok");
    expect("vera", "push_artifact", "refused");
    expect("vera", "deploy", "refused");
    expect("pete", "push_artifact", "ok");
    expect("pete", "deploy", "refused");
    expect("dora", "push_artifact", "ok");
    expect("dora", "deploy", "ok");
    expect("dora", "create_operator", "refused");
    expect("root", "create_operator", "failed");
    expect("root", "revoke_operator", "ok");
    // Arguments are kept, the spec itself is not (only its hash).
    let deploy_entry = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "deploy" && e["outcome"] == "ok")
        .unwrap();
    assert_eq!(deploy_entry["arguments"]["env"], "test");
    assert_eq!(
        deploy_entry["arguments"]["artifact"]["digest"],
        digest.as_str()
    );
    assert!(deploy_entry["arguments"]["spec_sha256"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(
        !text.contains("python3"),
        "the spec text is not in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_until_it_gets_a_new_certificate() {
    let mut cluster = Cluster::start(1, Tuning::default()).await;
    let connected = |want: bool| {
        move |n: &[cutover_proto::v1::Node]| {
            n.iter().any(|n| n.name == "node-1" && n.connected == want)
        }
    };
    cluster
        .wait_for_nodes(Duration::from_secs(10), connected(true))
        .await;
    let mut client = cluster.operator().await;
    let revoked = client
        .revoke_node(cutover_proto::v1::RevokeNodeRequest {
            node: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!revoked.serial.is_empty(), "the serial it connected with");
    cluster
        .wait_for_nodes(Duration::from_secs(10), connected(false))
        .await;
    // It keeps trying (every 500 ms here) and keeps being refused: the
    // audit log shows three attempts, and it never got back in meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempts = audit_entries(&mut client)
            .await
            .iter()
            .filter(|e| e.who == "agent/node-1" && e.outcome.starts_with("refused"))
            .count();
        if attempts >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{attempts} refused attempts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    assert!(nodes.iter().all(|n| !n.connected), "{nodes:?}");
    // Revoked, not unreachable: nothing pages anyone for a node cut off
    // on purpose (CutoverNodeUnreachable reads the heartbeat age).
    let revoked_status = cutover_proto::v1::NodeStatus::Revoked as i32;
    assert!(
        nodes.iter().all(|n| n.status == revoked_status),
        "{nodes:?}"
    );
    let metrics = cluster.metrics();
    assert!(
        metrics.contains("cutover_nodes{status=\"revoked\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cutover_nodes{status=\"unreachable\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("cutover_node_heartbeat_age_seconds{node=\"node-1\""),
        "{metrics}"
    );

    // A new certificate for the node is let back in.
    let agent = cluster.agents.remove(0);
    agent.stop().await;
    cluster.pki.client_files(Role::Agent, "node-1");
    let agent = cluster.start_agent("node-1").await;
    cluster.agents.push(agent);
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(10), connected(true))
        .await;
    let ready = cutover_proto::v1::NodeStatus::Ready as i32;
    assert!(nodes.iter().all(|n| n.status == ready), "{nodes:?}");
    assert!(cluster
        .metrics()
        .contains("cutover_nodes{status=\"revoked\"} 0"));

    let events = client
        .list_events(cutover_proto::v1::ListEventsRequest {
            after_seq: 0,
            limit: 1000,
            newest: false,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e.kind == "node_revoked"),
        "{events:?}"
    );
    let audit = audit_entries(&mut client).await;
    assert!(
        audit.iter().any(|e| e.action == "revoke_node"
            && e.outcome == "ok"
            && e.arguments.contains("node-1")),
        "{audit:?}"
    );
    // The revoked node's attempts are in the audit log, not only a warning.
    assert!(
        audit.iter().any(|e| e.who == "agent/node-1"
            && e.action == "session"
            && e.outcome.starts_with("refused")
            && e.arguments.contains(&revoked.serial)),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_callers_are_audited_and_operator_credentials_are_guarded() {
    let mut cluster = Cluster::start(1, Tuning::default()).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| n.len() == 1 && n[0].connected)
        .await;
    let admin = cluster.pki.client_files(Role::Operator, "root");
    let mut root = cutover_integration_tests::operator_client(&cluster.url(), &admin)
        .await
        .unwrap();
    // An agent's certificate on the operator API, again and again: each
    // refusal is audited, up to a bound per source and minute.
    let agent = cluster.pki.existing_or_new(Role::Agent, "node-1");
    let mut intruder = cutover_integration_tests::operator_client(&cluster.url(), &agent)
        .await
        .unwrap();
    for _ in 0..40 {
        let refused = intruder
            .list_nodes(cutover_proto::v1::ListNodesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
    let audit = audit_entries(&mut root).await;
    let by_agent: Vec<_> = audit
        .iter()
        .filter(|e| e.who == "agent/node-1" && e.action == "operator_api")
        .collect();
    assert!(
        (1..=20).contains(&by_agent.len()),
        "{} entries: {by_agent:#?}",
        by_agent.len()
    );
    assert!(
        by_agent[0].outcome.starts_with("refused: ")
            && by_agent[0].outcome.contains("cannot call the operator api"),
        "{by_agent:#?}"
    );

    // The offline admin was recorded when first seen: its name is not
    // handed out again, and it cannot revoke itself as the last admin.
    let cli = Cli {
        coordinator: cluster.url(),
    };
    let flags = cli.flags(&admin);
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let (ok, text) = cli.run(
        &[
            &flags[..],
            &[
                "operator",
                "create",
                "root",
                "--role",
                "viewer",
                "--out",
                &out("root"),
            ],
        ]
        .concat(),
    );
    assert!(!ok && text.contains("operator root exists"), "{text}");
    // (The harness's own admin, seen while waiting for the node.)
    let (ok, text) = cli.run(&[&flags[..], &["operator", "revoke", "tester"]].concat());
    assert!(ok, "{text}");
    let (ok, text) = cli.run(&[&flags[..], &["operator", "revoke", "root"]].concat());
    assert!(!ok && text.contains("last admin"), "{text}");
    let (ok, text) = cli.run(&[&flags[..], &["operator", "revoke", "nobody"]].concat());
    assert!(!ok && text.contains("no operator nobody"), "{text}");
    let (ok, text) = cli.run(
        &[
            &flags[..],
            &["operator", "revoke", "nobody", "--never-seen"],
        ]
        .concat(),
    );
    assert!(ok, "{text}");

    // A renewal retires the certificate it replaces.
    let (ok, text) = cli.run(
        &[
            &flags[..],
            &[
                "operator",
                "create",
                "olga",
                "--role",
                "viewer",
                "--out",
                &out("olga"),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{text}");
    let olga = dir.path().join("olga/cli.toml");
    let old_cert = dir.path().join("olga-old.crt");
    std::fs::copy(dir.path().join("olga/operator-olga.crt"), &old_cert).unwrap();
    let old_key = dir.path().join("olga-old.key");
    std::fs::copy(dir.path().join("olga/operator-olga.key"), &old_key).unwrap();
    let (ok, text) = cli.as_config(&olga, &["operator", "renew"]);
    assert!(ok, "{text}");
    let old_files = TlsFiles {
        ca_cert: dir.path().join("olga/ca.crt"),
        cert: old_cert,
        key: old_key,
    };
    let old = |cli: &Cli| cli.run(&[&cli.flags(&old_files)[..], &["nodes"]].concat());
    // Until the renewed certificate is used, the old one still works: a
    // renewal whose answer was lost locks nobody out.
    let (ok, text) = old(&cli);
    assert!(ok, "{text}");
    let (ok, text) = cli.as_config(&olga, &["nodes"]);
    assert!(ok, "the renewed certificate works: {text}");
    let (ok, text) = old(&cli);
    assert!(!ok && text.contains("replaced by a renewal"), "{text}");
    // Recorded, not remembered: still refused after a restart.
    cluster.restart_coordinator().await;
    let (ok, text) = old(&cli);
    assert!(!ok && text.contains("replaced by a renewal"), "{text}");
    let mut root = cutover_integration_tests::operator_client(&cluster.url(), &admin)
        .await
        .unwrap();

    // A revoked operator's renewal is refused, and audited.
    let (ok, text) = cli.run(&[&flags[..], &["operator", "revoke", "olga"]].concat());
    assert!(ok, "{text}");
    let (ok, text) = cli.as_config(&olga, &["operator", "renew"]);
    assert!(!ok && text.contains("was revoked"), "{text}");
    let audit = audit_entries(&mut root).await;
    assert!(
        audit.iter().any(|e| e.who == "operator/olga"
            && e.action == "renew_operator_certificate"
            && e.outcome.starts_with("refused")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|e| e.who == "operator/olga"
            && e.action == "list_nodes"
            && e.outcome.contains("replaced by a renewal")),
        "{audit:#?}"
    );
}

/// Every entry of the audit log.
async fn audit_entries(
    client: &mut cutover_proto::v1::operator_service_client::OperatorServiceClient<
        tonic::transport::Channel,
    >,
) -> Vec<cutover_proto::v1::AuditEntry> {
    client
        .list_audit(cutover_proto::v1::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The serial and expiry (seconds since the epoch) of a PEM certificate.
fn serial_and_expiry(path: &Path) -> (String, i64) {
    let certs = cutover_common::tls::load_certs(path, "certificate").unwrap();
    let facts = cutover_common::identity::certificate_facts(&certs[0]).unwrap();
    (facts.serial, facts.not_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_over_its_connection() {
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    let config = cluster.agent_config("node-1");
    // A certificate more than two thirds through its life: due at once.
    let files = cluster
        .pki
        .client_files_for(Role::Agent, "node-1", Duration::from_secs(60));
    let (old_serial, old_expiry) = serial_and_expiry(&files.cert);
    let agent = cutover_integration_tests::spawn_agent(config).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (new_serial, new_expiry) = loop {
        let now = serial_and_expiry(&files.cert);
        if now.0 != old_serial {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The coordinator's agent_cert_lifetime (7 days), not the old 60 s.
    let week = 7 * 24 * 3600;
    assert!(
        new_expiry - old_expiry > week - 600,
        "{old_expiry} -> {new_expiry}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The session went on; the next connection presents the new one, and
    // `cutover nodes` shows its serial and expiry.
    cluster.restart_coordinator().await;
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.iter().any(|n| n.name == "node-1" && n.connected)
        })
        .await;
    let node = nodes.iter().find(|n| n.name == "node-1").unwrap();
    assert_eq!(node.cert_serial, new_serial);
    assert_eq!(node.cert_expires_at_ms, new_expiry * 1000);
    let mut client = cluster.operator().await;
    let audit = audit_entries(&mut client).await;
    assert!(
        audit.iter().any(|e| e.who == "agent/node-1"
            && e.action == "renew_certificate"
            && e.outcome == "ok"),
        "{audit:?}"
    );
    let refused = |audit: &[cutover_proto::v1::AuditEntry]| {
        audit
            .iter()
            .filter(|e| e.who == "agent/node-1" && e.outcome.starts_with("refused"))
            .count()
    };
    let refused_before = refused(&audit);
    let connected_with = client
        .revoke_node(cutover_proto::v1::RevokeNodeRequest {
            node: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .serial;
    assert_eq!(connected_with, new_serial);
    // The renewed certificate is refused too: the agent stays out. Proven
    // by its retries (every 500 ms at most here) refused in the audit log,
    // not by a pause.
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.iter().any(|n| n.name == "node-1" && !n.connected)
        })
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempts = refused(&audit_entries(&mut client).await) - refused_before;
        if attempts >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{attempts} refused attempts after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    assert!(
        nodes.iter().all(|n| n.name != "node-1" || !n.connected),
        "{nodes:?}"
    );
    agent.stop().await;
}
