//! Secrets end to end on a real local cluster (`cutover dev up`, real
//! binaries, logs on disk): a secret set to a unique marker reaches the
//! release's environment, a new version rolls out as a new release, a
//! master key rotation keeps every version readable, and the marker appears
//! in no log file, no store file, no CLI output and not in the audit log.

use std::time::{Duration, Instant};

use cutover_integration_tests::{
    app_archive, body, files_containing, http_get, release_pids, sha256_hex, sigkill, DevCluster,
};
use serde_json::Value;

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A CLI run: success, stdout, stdout and stderr.
type Ran = (bool, String, String);

/// The body of GET `path`, or `None` while the node cannot answer (its
/// agent and proxy restarting, its release not started yet).
fn try_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .starts_with("HTTP/1.1 200")
        .then(|| body(&response).to_string())
}

fn spec(port: u16, secrets: &str) -> String {
    format!(
        r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
secrets = [{secrets}]
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "10s"
[strategy]
batch = 1
min_healthy_time = "300ms"
[environments.local]
nodes = {{ env = "local" }}
"#
    )
}

#[test]
fn a_secret_reaches_its_release_and_nothing_else() {
    let cluster = DevCluster::up(2);
    let marker = format!("cutover-marker-{:016x}", rand::random::<u64>());
    let marker2 = format!("cutover-marker-{:016x}", rand::random::<u64>());
    let mut outputs = String::new();
    let mut run = |args: &[&str], input: &str| -> Ran {
        let output = cluster.cutover_with_input(args, input);
        let all = text(&output);
        outputs.push_str(&all);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            all,
        )
    };

    let (ok, _, out) = run(
        &["secret", "set", "--env", "local", "DB_PASSWORD"],
        &format!("{marker}\n"),
    );
    assert!(ok, "{out}");
    assert!(out.contains("version 1"), "{out}");
    // Names that could not be environment variables are refused.
    let (ok, _, out) = run(&["secret", "set", "--env", "local", "DB-PASSWORD"], "x");
    assert!(!ok && out.contains("DB-PASSWORD"), "{out}");

    let app = tempfile::tempdir().unwrap();
    let (artifact, _) = app_archive(app.path());
    let artifact = artifact.trim_start_matches("file://").to_string();
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let spec_file = app.path().join("cutover.toml");
    let deploy = |run: &mut dyn FnMut(&[&str], &str) -> Ran, secrets: &str, version: &str| {
        std::fs::write(&spec_file, spec(port, secrets)).unwrap();
        run(
            &[
                "--output",
                "json",
                "deploy",
                "-f",
                spec_file.to_str().unwrap(),
                "--env",
                "local",
                "--version",
                version,
                "--artifact",
                &artifact,
                "--wait",
            ],
            "",
        )
    };
    let seen = |node: usize| {
        body(&http_get(
            &format!("127.0.0.{}:{port}", 11 + node),
            "/env-sha256/DB_PASSWORD",
        ))
        .to_string()
    };

    // A release that names a secret nobody set is refused before anything.
    let (ok, _, out) = deploy(&mut run, "\"DB_PASSWORD\", \"API_TOKEN\"", "v1");
    assert!(!ok);
    assert!(
        out.contains("no secret API_TOKEN in environment local"),
        "{out}"
    );

    let (ok, stdout, out) = deploy(&mut run, "\"DB_PASSWORD\"", "v1");
    assert!(ok, "{out}");
    let first: Value = serde_json::from_str(&stdout).unwrap();
    let first_release = first["release"]["id"].as_str().unwrap().to_string();
    assert_eq!(seen(0), sha256_hex(&marker));
    assert_eq!(seen(1), sha256_hex(&marker));

    // A new version takes effect through a normal rollout of the same
    // artifact and version label: it is another release.
    let (ok, _, out) = run(
        &["secret", "set", "--env", "local", "DB_PASSWORD"],
        &marker2,
    );
    assert!(ok && out.contains("version 2"), "{out}");
    assert_eq!(
        seen(0),
        sha256_hex(&marker),
        "running releases are not edited"
    );
    let (ok, stdout, out) = deploy(&mut run, "\"DB_PASSWORD\"", "v1");
    assert!(ok, "{out}");
    let second: Value = serde_json::from_str(&stdout).unwrap();
    assert_ne!(second["release"]["id"], first["release"]["id"]);
    assert_eq!(seen(0), sha256_hex(&marker2));

    // Rotating the master key re-seals both versions; a rollback to the
    // first release still gets version 1.
    let (ok, stdout, out) = run(&["--output", "json", "secret", "rotate-master-key"], "");
    assert!(ok, "{out}");
    let rotated: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(rotated["reencrypted"], 2);
    let (ok, _, out) = run(
        &[
            "rollback",
            "web",
            "--env",
            "local",
            "--to",
            &first_release,
            "--wait",
        ],
        "",
    );
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen(1) != sha256_hex(&marker) {
        assert!(Instant::now() < deadline, "node 2 never got version 1 back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen(0), sha256_hex(&marker));

    // kill -9 of an agent and of its release: the restarted agent has no
    // values (they were in memory only), asks the coordinator again, and
    // starts the release with them.
    sigkill(cluster.pid("agent-1.pid"));
    for pid in release_pids(&cluster.path("agents/node-1")) {
        sigkill(pid as i32);
    }
    let config = cluster.path("agent-1.toml").display().to_string();
    cluster.restart(
        "cutover-agent",
        &["--config", &config],
        "agent-1.pid",
        "agent-1.log",
    );
    let public = format!("127.0.0.11:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if try_get(&public, "/env-sha256/DB_PASSWORD").as_deref()
            == Some(sha256_hex(&marker).as_str())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 did not come back with its secret: {}",
            cluster.log_tails()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let (ok, stdout, out) = run(
        &["--output", "json", "secret", "list", "--env", "local"],
        "",
    );
    assert!(ok, "{out}");
    let listed: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(listed[0]["name"], "DB_PASSWORD");
    assert_eq!(listed[0]["versions"].as_array().unwrap().len(), 2);
    let (ok, _, out) = run(&["--output", "json", "audit"], "");
    assert!(ok, "{out}");
    assert!(
        out.contains("set_secret") && out.contains("rotate_master_key"),
        "{out}"
    );
    let (ok, _, out) = run(&["events", "--limit", "1000"], "");
    assert!(ok, "{out}");

    // Nowhere: not in any file of the cluster (coordinator store, agent
    // stores and state, every log), not in any CLI output.
    for needle in [&marker, &marker2] {
        let found = files_containing(cluster.dir.path(), needle.as_bytes());
        assert!(found.is_empty(), "{needle} found in {found:?}");
        assert!(!outputs.contains(needle.as_str()), "{needle} in CLI output");
    }
    // The search can find things: the release's own files are there.
    assert!(!files_containing(cluster.dir.path(), b"ThreadingHTTPServer").is_empty());
}
