//! Enrollment with join tokens through the real `cutover-agent join`: a
//! token lets one new node in with its labels (the key made on the node,
//! the CA pinned by fingerprint), and every way a join can be wrong is
//! refused: a used-up, expired or revoked token, a wrong fingerprint, a
//! taken name, and too many failures from one address.

use std::time::Duration;

use cutover_integration_tests::{bin, find, ready, Cluster, Tuning};
use cutover_proto::v1 as pb;

fn join(
    cluster: &Cluster,
    token: &str,
    fingerprint: &str,
    name: &str,
    out: &std::path::Path,
) -> (bool, String) {
    let output = std::process::Command::new(bin("cutover-agent"))
        .args(["join", "--coordinator", &cluster.url(), "--token", token])
        .args(["--ca-fingerprint", fingerprint, "--name", name, "--out"])
        .arg(out)
        .arg("--state-dir")
        .arg(out.join("state"))
        .output()
        .expect("run cutover-agent join");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Kills the agent when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_lets_one_node_in_and_every_wrong_join_is_refused() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let mut client = cluster.operator().await;
    let creator = client.clone();
    let create = |ttl_ms: u64, uses: u32| {
        let mut client = creator.clone();
        async move {
            client
                .create_token(pb::CreateTokenRequest {
                    labels: [
                        ("env".to_string(), "test".to_string()),
                        ("role".into(), "web".into()),
                    ]
                    .into(),
                    ttl_ms,
                    uses,
                })
                .await
                .expect("token created")
                .into_inner()
        }
    };
    let created = create(3_600_000, 1).await;
    let fingerprint = created.ca_fingerprint.clone();
    assert_eq!(
        fingerprint,
        cutover_common::tls::ca_fingerprint(&cluster.pki.dir().join("ca.crt")).unwrap()
    );
    let dir = tempfile::tempdir().unwrap();

    // The join: key made here (0600), the token's labels in the config.
    let out = dir.path().join("node-9");
    let (ok, text) = join(&cluster, &created.token, &fingerprint, "node-9", &out);
    assert!(ok, "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("pki/agent-node-9.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let _agent = Running(
        std::process::Command::new(bin("cutover-agent"))
            .arg("--config")
            .arg(out.join("agent.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the joined agent"),
    );
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            find(n, "node-9").is_some_and(ready)
        })
        .await;
    let node = find(&nodes, "node-9").unwrap();
    assert_eq!(node.labels.get("env").map(String::as_str), Some("test"));
    assert_eq!(node.labels.get("role").map(String::as_str), Some("web"));

    // The node cannot give itself other labels (they decide which
    // environments, and secrets, reach it): its new session is refused.
    drop(_agent);
    let config = out.join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"test\"", "\"production\"")).unwrap();
    let log = dir.path().join("node-9.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let _agent = Running(
        std::process::Command::new(bin("cutover-agent"))
            .arg("--config")
            .arg(&config)
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("restart the agent"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("enrolled with labels") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal seen: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    let node = find(&nodes, "node-9").unwrap();
    assert!(!node.connected, "{node:?}");
    assert_eq!(node.labels.get("env").map(String::as_str), Some("test"));

    // Used up: it was a single-use token.
    let (ok, text) = join(
        &cluster,
        &created.token,
        &fingerprint,
        "node-10",
        &dir.path().join("a"),
    );
    assert!(!ok && text.contains("used up"), "{text}");
    // A registered name is not taken over with a token.
    let other = create(3_600_000, 0).await;
    let (ok, text) = join(
        &cluster,
        &other.token,
        &fingerprint,
        "node-9",
        &dir.path().join("b"),
    );
    assert!(!ok && text.contains("already"), "{text}");
    // Revoked.
    client
        .revoke_token(pb::RevokeTokenRequest {
            id: other.info.as_ref().unwrap().id.clone(),
        })
        .await
        .unwrap();
    let (ok, text) = join(
        &cluster,
        &other.token,
        &fingerprint,
        "node-11",
        &dir.path().join("c"),
    );
    assert!(!ok && text.contains("revoked"), "{text}");
    // Expired.
    let short = create(500, 1).await;
    let expires_at_ms = short.info.as_ref().unwrap().expires_at_ms;
    while cutover_common::now_ms() <= expires_at_ms {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, text) = join(
        &cluster,
        &short.token,
        &fingerprint,
        "node-12",
        &dir.path().join("d"),
    );
    assert!(!ok && text.contains("expired"), "{text}");
    // The wrong CA pinned: nothing is sent to a coordinator we cannot trust.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let fresh = create(3_600_000, 1).await;
    let (ok, text) = join(
        &cluster,
        &fresh.token,
        &wrong,
        "node-13",
        &dir.path().join("e"),
    );
    assert!(!ok && text.contains("fingerprint"), "{text}");
    assert!(!dir.path().join("e/agent.toml").exists());
    // Guessing: after 5 failures from one address, it is refused outright,
    // even with a good token.
    for i in 0..3 {
        let (ok, _) = join(
            &cluster,
            &format!("cutover-join.{i}.guess"),
            &fingerprint,
            "node-14",
            &dir.path().join("f"),
        );
        assert!(!ok);
    }
    let (ok, text) = join(
        &cluster,
        &fresh.token,
        &fingerprint,
        "node-14",
        &dir.path().join("g"),
    );
    assert!(!ok && text.contains("too many failed joins"), "{text}");

    let tokens = client
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let first = tokens
        .iter()
        .find(|t| t.id == created.info.as_ref().unwrap().id)
        .unwrap();
    assert_eq!(
        (first.used, first.nodes.clone()),
        (1, vec!["node-9".to_string()])
    );
    // The token itself is nowhere but in the answer that created it.
    let secret = created.token.rsplit('.').next().unwrap();
    let listed = format!("{tokens:?}");
    assert!(!listed.contains(secret));
    let audit = client
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let joins: Vec<&str> = audit
        .iter()
        .filter(|e| e.action == "join")
        .map(|e| e.outcome.split(':').next().unwrap())
        .collect();
    assert_eq!(joins.iter().filter(|o| **o == "ok").count(), 1, "{joins:?}");
    assert!(
        joins.iter().filter(|o| **o == "refused").count() >= 6,
        "{joins:?}"
    );
    assert!(
        !format!("{audit:?}").contains(secret),
        "no token secret in the audit log"
    );
}

/// `cutover-agent join` with the flags of a node that reaches the
/// coordinator by an address its certificate does not name, run from
/// `cwd` with `args` after the token's.
fn join_with(
    cwd: &std::path::Path,
    url: &str,
    created: &pb::CreateTokenResponse,
    args: &[&str],
) -> (bool, String) {
    let output = std::process::Command::new(bin("cutover-agent"))
        .current_dir(cwd)
        .args(["join", "--coordinator", url, "--token", &created.token])
        .args([
            "--ca-fingerprint",
            &created.ca_fingerprint,
            "--name",
            "node-7",
        ])
        .args(args)
        .output()
        .expect("run cutover-agent join");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_takes_the_server_name_and_address_and_writes_absolute_paths() {
    let cluster = Cluster::start_on([0, 0, 0, 0].into(), 0, Tuning::default()).await;
    let created = cluster
        .operator()
        .await
        .create_token(pb::CreateTokenRequest {
            labels: [("env".to_string(), "test".to_string())].into(),
            ttl_ms: 3_600_000,
            uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    // 127.0.0.2 reaches the coordinator, but its certificate names
    // localhost and 127.0.0.1 only.
    let url = format!("https://127.0.0.2:{}", cluster.grpc_addr.port());
    let dir = tempfile::tempdir().unwrap();
    let relative = ["--out", "node-7", "--state-dir", "node-7/state"];
    let (ok, text) = join_with(dir.path(), &url, &created, &relative);
    assert!(!ok, "{text}");
    assert!(
        text.contains("not valid for name") && text.contains("pass --server-name"),
        "{text}"
    );
    assert!(
        !dir.path().join("node-7").exists(),
        "a refused join writes nothing"
    );

    let mut args = relative.to_vec();
    args.extend(["--server-name", "localhost", "--address", "127.0.0.3"]);
    let (ok, text) = join_with(dir.path(), &url, &created, &args);
    assert!(ok, "{text}");
    let config_path = dir.path().join("node-7/agent.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let parsed: toml::Table = config.parse().unwrap();
    assert_eq!(
        parsed["server_name"].as_str(),
        Some("localhost"),
        "{config}"
    );
    assert_eq!(parsed["address"].as_str(), Some("127.0.0.3"), "{config}");
    let base = dir.path().canonicalize().unwrap();
    let state_dir = parsed["state_dir"].as_str().unwrap();
    assert_eq!(
        state_dir,
        base.join("node-7/state").to_str().unwrap(),
        "{config}"
    );
    for key in ["ca_cert", "cert", "key"] {
        let path = std::path::Path::new(parsed["tls"][key].as_str().unwrap());
        assert!(path.is_absolute() && path.exists(), "{key}: {config}");
    }

    // Started from another directory, the agent finds everything and
    // dials the address its certificate does not name.
    let _agent = Running(
        std::process::Command::new(bin("cutover-agent"))
            .current_dir("/")
            .arg("--config")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the joined agent"),
    );
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            find(n, "node-7").is_some_and(ready)
        })
        .await;
    assert_eq!(find(&nodes, "node-7").unwrap().address, "127.0.0.3");
}
