//! End-to-end tests that drive the real `cutover` and `cutover-agent`
//! binaries, as an operator would.

use std::process::Command;
use std::time::{Duration, Instant};

use cutover_integration_tests::{bin, field, http_get, running, sigkill, DevCluster};

/// The dev cluster's heartbeat TTL (see `cutover dev up`).
const DEV_TTL: Duration = Duration::from_secs(5);

#[test]
fn dev_up_gives_ready_nodes_with_figures_metrics_and_a_command_path() {
    let cluster = DevCluster::up(3);
    let nodes = cluster.nodes_json();
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(field(node, "name"), format!("node-{}", i + 1));
        assert_eq!(field(node, "status"), "ready");
        assert_eq!(field(node, "address"), format!("127.0.0.{}", 11 + i));
        assert_eq!(node["labels"]["env"], "local");
        assert_eq!(node["labels"]["role"], "web");
        assert!(uuid_like(field(node, "id")), "{node}");
        assert!(field(node, "last_seen").ends_with('Z'));
        assert!(node["figures"]["memory_total_bytes"].as_u64().unwrap() > 0);
        assert!(node["figures"]["disk_free_bytes"].as_u64().unwrap() > 0);
        assert!(node["figures"]["cpu_percent"].is_number());
    }

    // The coordinator's store is its own, whatever umask it started with.
    let data = cluster.path("coordinator");
    assert_private_tree(&data);

    // Logs written to files are plain text: no colour codes.
    let logs: Vec<_> = std::fs::read_dir(cluster.path("logs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 4, "{logs:?}");
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains(" INFO "), "{}: {text}", log.display());
        assert!(!text.contains('\x1b'), "{}: {text}", log.display());
    }

    let ping = cluster.cutover(&["nodes", "ping", "node-3", "--output", "json"]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    let pong: serde_json::Value = serde_json::from_slice(&ping.stdout).unwrap();
    assert!(pong["round_trip_us"].as_u64().unwrap() > 0);

    let table = cluster.cutover(&["nodes"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(" ready ")).count(),
        3,
        "{table}"
    );

    let metrics_url = std::fs::read_to_string(cluster.path("env")).unwrap();
    let addr = metrics_url
        .lines()
        .find_map(|l| l.strip_prefix("export CUTOVER_METRICS_URL=http://"))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .expect("metrics url in env")
        .to_string();
    let metrics = http_get(&addr, "/metrics");
    assert!(
        metrics.contains("cutover_nodes{status=\"ready\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("cutover_agents_connected 3"), "{metrics}");
    assert!(
        metrics.contains("cutover_node_memory_total_bytes{node=\"node-1\""),
        "{metrics}"
    );
    assert!(metrics.contains("cutover_build_info{version="), "{metrics}");
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));

    // A second `dev up` in the same dir refuses instead of doubling the cluster.
    let again = Command::new(bin("cutover"))
        .args(["dev", "up", "--nodes", "1", "--dir"])
        .arg(cluster.dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // `dev down` stops every process within its bounded drain.
    let pids: Vec<i32> = [
        "coordinator.pid",
        "agent-1.pid",
        "agent-2.pid",
        "agent-3.pid",
    ]
    .iter()
    .map(|f| cluster.pid(f))
    .collect();
    let started = Instant::now();
    let down = Command::new(bin("cutover"))
        .args(["dev", "down", "--dir"])
        .arg(cluster.dir.path())
        .output()
        .unwrap();
    assert!(down.status.success());
    // Each process stopped on its SIGTERM (the SIGKILL after 10 s was not
    // needed): its log ends with its own "stopped" line.
    for (log, line) in [
        ("coordinator.log", "coordinator stopped"),
        ("agent-1.log", "agent stopped"),
        ("agent-2.log", "agent stopped"),
        ("agent-3.log", "agent stopped"),
    ] {
        let text = std::fs::read_to_string(cluster.path("logs").join(log)).unwrap();
        assert!(
            text.contains(line),
            "{log} has no {line:?}: {}",
            cluster.log_tails()
        );
    }
    // Bounded: 10 s of grace per process before its SIGKILL, four
    // processes. This only rules out a `dev down` that waits without end.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "dev down took {:?}",
        started.elapsed()
    );
    for pid in pids {
        assert!(!running(pid), "process {pid} still running");
    }
}

fn uuid_like(text: &str) -> bool {
    text.len() == 36 && text.chars().filter(|c| *c == '-').count() == 4
}

#[test]
fn an_agent_killed_with_sigkill_is_unreachable_within_ttl_and_ready_again_after_restart() {
    let cluster = DevCluster::up(2);
    let before = cluster.nodes_json();
    let id = field(&before[0], "id").to_string();

    sigkill(cluster.pid("agent-1.pid"));
    let killed_at = Instant::now();
    let nodes = cluster.wait_for_nodes(DEV_TTL + Duration::from_secs(5), |nodes| {
        nodes
            .iter()
            .any(|n| field(n, "name") == "node-1" && field(n, "status") == "unreachable")
    });
    eprintln!("node-1 unreachable {:?} after SIGKILL", killed_at.elapsed());
    let node2 = nodes.iter().find(|n| field(n, "name") == "node-2").unwrap();
    assert_eq!(field(node2, "status"), "ready");

    let config = cluster.path("agent-1.toml").display().to_string();
    cluster.restart(
        "cutover-agent",
        &["--config", &config],
        "agent-1.pid",
        "agent-1.log",
    );
    let nodes = cluster.wait_for_nodes(Duration::from_secs(15), |nodes| {
        nodes
            .iter()
            .any(|n| field(n, "name") == "node-1" && field(n, "status") == "ready")
    });
    assert_eq!(nodes.len(), 2);
    let node1 = nodes.iter().find(|n| field(n, "name") == "node-1").unwrap();
    assert_eq!(
        field(node1, "id"),
        id,
        "the node keeps its id across restarts"
    );

    let events = cluster.cutover(&["events", "--output", "json"]);
    let events: serde_json::Value = serde_json::from_slice(&events.stdout).unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["node"] == "node-1")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "node_registered",
            "node_disconnected",
            "node_unreachable",
            "node_connected"
        ],
        "{events:#}"
    );
}

#[test]
fn a_coordinator_killed_with_sigkill_restarts_with_its_nodes_and_agents_reconnect() {
    let cluster = DevCluster::up(2);
    let before = cluster.nodes_json();
    // Registrations and their events on disk before the kill.
    cluster.wait_for_journal_flushed();
    let events_before = cluster.cutover(&["events", "--limit", "10000", "-o", "json"]);
    let events_before: serde_json::Value = serde_json::from_slice(&events_before.stdout).unwrap();
    let events_before = events_before.as_array().unwrap().clone();
    assert!(!events_before.is_empty());
    // Left wider by an older version or by hand: narrowed at the next start.
    use std::os::unix::fs::PermissionsExt;
    let data = cluster.path("coordinator");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("store/conf"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = cluster.path("coordinator.toml").display().to_string();
    let log = cluster.path("logs").join("coordinator.log");
    let starts = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("event log pruned at start-up")
            .count()
    };
    // Twice: sled's sequence numbers jump after each reopen, and the second
    // start's pruning pass sees the gap between the first run's events and
    // the second's.
    for restart in 1..=2 {
        let pid = cluster.pid("coordinator.pid");
        sigkill(pid);
        // SIGKILL is asynchronous: the port is free once the process is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let before_start = starts();
        cluster.restart(
            "cutover",
            &["server", "--config", &config],
            "coordinator.pid",
            "coordinator.log",
        );
        let after = cluster.wait_for_nodes(Duration::from_secs(20), |nodes| {
            nodes.len() == 2
                && nodes
                    .iter()
                    .all(|n| field(n, "status") == "ready" && n["connected"] == true)
        });
        for (old, new) in before.iter().zip(&after) {
            assert_eq!(field(old, "id"), field(new, "id"));
            assert_eq!(field(old, "registered_at"), field(new, "registered_at"));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while starts() == before_start {
            assert!(
                Instant::now() < deadline,
                "restart {restart}: {}",
                cluster.log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The reconnections' events, flushed before the next kill.
        cluster.wait_for_journal_flushed();
    }
    // The event log survives the restarts and the pruning passes after them.
    let events_after = cluster.cutover(&["events", "--limit", "10000", "-o", "json"]);
    let events_after: serde_json::Value = serde_json::from_slice(&events_after.stdout).unwrap();
    let seqs: Vec<u64> = events_after
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    for event in &events_before {
        assert!(
            seqs.contains(&event["seq"].as_u64().unwrap()),
            "{event} is gone after the restarts: {seqs:?}"
        );
    }
    assert!(
        seqs.len() > events_before.len(),
        "new events after the restarts"
    );
    assert_private_tree(&data);
}

/// Every dir under `root` is 0700 and every file 0600.
fn assert_private_tree(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(root).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_dir() {
        assert_eq!(mode, 0o700, "{}", root.display());
        for entry in std::fs::read_dir(root).unwrap() {
            assert_private_tree(&entry.unwrap().path());
        }
    } else if meta.is_file() {
        assert_eq!(mode, 0o600, "{}", root.display());
    }
}

/// Runs a binary with a config file and checks it refuses to start, names the
/// key and the file, and creates nothing.
fn assert_refused(
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
    expect: &[&str],
    untouched: &std::path::Path,
) {
    let output = Command::new(bin(binary))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{binary} {args:?}: {stderr}");
    for needle in expect {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    assert!(!untouched.exists(), "{} was created", untouched.display());
}

#[test]
fn bad_config_files_fail_with_the_key_and_the_file_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = dir.path().join("state");
    let server = dir.path().join("coordinator.toml");
    let agent = dir.path().join("agent.toml");
    let base_server = format!(
        "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[tls]\nca_cert = \"/x/ca.crt\"\ncert = \"/x/c.crt\"\nkey = \"/x/c.key\"\n",
        data.display().to_string()
    );
    let server_arg = server.display().to_string();
    let server_args = ["server", "--config", server_arg.as_str()];

    std::fs::write(&server, format!("listn = \"0.0.0.0:1\"\n{base_server}")).unwrap();
    assert_refused(
        "cutover",
        &server_args,
        &[],
        &["`listn`", &server_arg],
        &data,
    );

    std::fs::write(&server, format!("heartbeat_ttl = \"soon\"\n{base_server}")).unwrap();
    assert_refused(
        "cutover",
        &server_args,
        &[],
        &["`heartbeat_ttl`", &server_arg],
        &data,
    );

    std::fs::write(&server, format!("heartbeat_ttl = \"1s\"\n{base_server}")).unwrap();
    assert_refused(
        "cutover",
        &server_args,
        &[],
        &["`heartbeat_ttl`", "twice"],
        &data,
    );

    std::fs::write(&server, &base_server).unwrap();
    assert_refused(
        "cutover",
        &server_args,
        &[("CUTOVER_SERVER_HEARTBEAT_INTERVAL", "often")],
        &["CUTOVER_SERVER_HEARTBEAT_INTERVAL", "`heartbeat_interval`"],
        &data,
    );

    let agent_arg = agent.display().to_string();
    let agent_args = ["--config", agent_arg.as_str()];
    let base_agent = format!(
        "coordinator = \"https://127.0.0.1:1\"\nstate_dir = {:?}\n[tls]\nca_cert = \"/x/ca.crt\"\ncert = \"/x/c.crt\"\nkey = \"/x/c.key\"\n",
        state.display().to_string()
    );
    std::fs::write(&agent, format!("{base_agent}cert_file = \"/x\"\n")).unwrap();
    assert_refused(
        "cutover-agent",
        &agent_args,
        &[],
        &["`tls.cert_file`", &agent_arg],
        &state,
    );

    std::fs::write(
        &agent,
        base_agent.replace("https://127.0.0.1:1", "127.0.0.1:1"),
    )
    .unwrap();
    assert_refused(
        "cutover-agent",
        &agent_args,
        &[],
        &["`coordinator`", "https://"],
        &state,
    );

    std::fs::write(&agent, format!("reconnect_min = 5\n{base_agent}")).unwrap();
    assert_refused(
        "cutover-agent",
        &agent_args,
        &[],
        &["`reconnect_min`"],
        &state,
    );

    // Valid config, missing certificate files: refused before any state.
    std::fs::write(&agent, &base_agent).unwrap();
    assert_refused("cutover-agent", &agent_args, &[], &["/x/ca.crt"], &state);
    std::fs::write(&server, &base_server).unwrap();
    let output = Command::new(bin("cutover"))
        .args(server_args)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/x/ca.crt"));
    assert!(!data.exists());

    assert_refused(
        "cutover-agent",
        &["--config", "/nonexistent/agent.toml"],
        &[],
        &["/nonexistent/agent.toml"],
        &state,
    );
}

/// `token create` prints the commands to run on the node; run as printed
/// (the token pasted at the prompt), they join it, and the secret is on
/// no command line.
#[test]
fn the_printed_join_commands_work_and_keep_the_token_off_the_command_line() {
    let cluster = DevCluster::up(1);
    let created = cluster.cutover(&[
        "token",
        "create",
        "--labels",
        "env=local,role=web",
        "--ttl",
        "10m",
    ]);
    let text = String::from_utf8_lossy(&created.stdout).into_owned();
    assert!(
        created.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let mut lines = text.lines().map(str::trim);
    let token = lines
        .find(|l| l.starts_with("cutover-join."))
        .expect("the token is printed once")
        .to_string();
    let commands: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("on the node"))
        .skip(1)
        .map(str::trim)
        .collect();
    assert_eq!(commands.len(), 2, "{text}");
    assert!(commands.iter().all(|c| !c.contains(&token)), "{text}");
    let out = cluster.path("joined");
    let script = format!(
        "set -e\n{}\n{} --name node-9",
        commands[0],
        commands[1].replace("/etc/cutover", out.to_str().unwrap())
    );
    let bin_dir = bin("cutover-agent").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .env("PATH", path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    let joined = child.wait_with_output().unwrap();
    assert!(
        joined.status.success(),
        "{}{}",
        String::from_utf8_lossy(&joined.stdout),
        String::from_utf8_lossy(&joined.stderr)
    );
    let config = std::fs::read_to_string(out.join("agent.toml")).unwrap();
    assert!(
        config.contains("node-9") || config.contains("env"),
        "{config}"
    );
}

/// `events --follow` and `audit --follow` print the newest entries, then
/// each new one as it is written (JSON: one object a line).
#[test]
fn events_and_audit_follow_prints_new_entries_as_they_come() {
    use std::io::BufRead;
    let cluster = DevCluster::up(1);
    let follow = |what: &str| {
        let mut child = Command::new(bin("cutover"))
            .args([what, "--follow", "--limit", "5", "-o", "json"])
            .envs(cluster.env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        (child, received)
    };
    let (mut events, event_lines) = follow("events");
    let (mut audit, audit_lines) = follow("audit");
    // Something for both logs: a pushed artifact is an event and an audited call.
    let dir = tempfile::tempdir().unwrap();
    let (url, _) = cutover_integration_tests::app_archive(dir.path());
    let pushed = cluster.cutover(&["artifact", "push", url.trim_start_matches("file://")]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let wait_for =
        |lines: &std::sync::mpsc::Receiver<String>, what: &str, key: &str, value: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = lines
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("no {what} line with {key} = {value}"));
                let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("{what} --follow printed a line that is not JSON ({e}): {line}")
                });
                if entry[key].as_str().is_some_and(|v| v.contains(value)) {
                    return;
                }
            }
        };
    wait_for(&audit_lines, "audit", "action", "push_artifact");
    wait_for(&event_lines, "events", "message", "app.tar.gz");
    for child in [&mut events, &mut audit] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The first steps of an install, as the guide gives them: `ca init` says
/// what the CA's fingerprint is and what to run next; `ca issue operator`
/// writes the first admin's whole credentials where the CLI looks, and a
/// coordinator on that PKI dir answers that CLI with no other setting.
#[test]
fn ca_init_and_issue_operator_give_a_working_first_admin() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let run = |args: &[&str]| {
        let mut command = Command::new(bin("cutover"));
        command.args(args).env("HOME", &home);
        for var in [
            "CUTOVER_CLI_CONFIG",
            "CUTOVER_COORDINATOR",
            "CUTOVER_CA_CERT",
            "CUTOVER_CERT",
            "CUTOVER_KEY",
            "CUTOVER_PKI_DIR",
            "CUTOVER_TLS_SERVER_NAME",
        ] {
            command.env_remove(var);
        }
        let output = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    let pki_arg = pki.display().to_string();

    let (ok, text) = run(&["ca", "init", "--dir", &pki_arg]);
    assert!(ok, "{text}");
    let fingerprint = cutover_common::tls::ca_fingerprint(&pki.join("ca.crt")).unwrap();
    assert!(
        text.contains(&format!("CA fingerprint: {fingerprint}")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "cutover ca issue operator --name root --dir {pki_arg}"
        )),
        "{text}"
    );

    let port = |taken: &[u16]| {
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), taken).unwrap()
    };
    let grpc = port(&[]);
    let http = port(&[grpc]);
    let url = format!("https://localhost:{grpc}");
    let (ok, text) = run(&[
        "ca",
        "issue",
        "operator",
        "--name",
        "root",
        "--dir",
        &pki_arg,
        "--coordinator",
        &url,
    ]);
    assert!(ok, "{text}");
    let credentials = home.join(".config/cutover");
    let cli_toml = std::fs::read_to_string(credentials.join("cli.toml")).unwrap();
    assert!(
        cli_toml.contains(&format!("coordinator = {url:?}")),
        "{cli_toml}"
    );
    for (file, mode) in [
        ("cli.toml", 0o600),
        ("operator-root.key", 0o600),
        ("operator-root.crt", 0o644),
        ("ca.crt", 0o644),
    ] {
        let meta = std::fs::metadata(credentials.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    assert!(text.contains("try `cutover nodes`"), "{text}");
    // A second issue into the same place overwrites nothing.
    let key_before = std::fs::read(credentials.join("operator-root.key")).unwrap();
    let (ok, text) = run(&[
        "ca", "issue", "operator", "--name", "root", "--dir", &pki_arg,
    ]);
    assert!(!ok, "{text}");
    assert!(text.contains("already holds credentials"), "{text}");
    assert_eq!(
        std::fs::read(credentials.join("operator-root.key")).unwrap(),
        key_before
    );

    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
data_dir = "{data}"
listen = "127.0.0.1:{grpc}"
http_listen = "127.0.0.1:{http}"
ca_key = "{pki_arg}/ca.key"
master_key_file = "{pki_arg}/master.key"
[tls]
ca_cert = "{pki_arg}/ca.crt"
cert = "{pki_arg}/coordinator.crt"
key = "{pki_arg}/coordinator.key"
"#,
            data = dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    let server = Command::new(bin("cutover"))
        .args(["server", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _server = KillOnDrop(server);
    let started = Instant::now();
    loop {
        let (ok, text) = run(&["nodes"]);
        if ok {
            assert!(text.starts_with("NAME"), "{text}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{text}\n{}",
            std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, text) = run(&["operator", "list", "-o", "json"]);
    assert!(ok, "{text}");
    let operators: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        operators
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["name"] == "root" && o["role"] == "admin"),
        "{operators:#}"
    );
}

/// A child process killed (SIGKILL) when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Completion scripts and man pages come from the CLI's definition: every
/// command is in them, and the tools that read them accept them.
#[test]
fn completion_scripts_and_man_pages_cover_every_command() {
    let run = |args: &[&str]| {
        let output = Command::new(bin("cutover")).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completion", shell]);
        for command in ["rollout", "rollback", "recovery", "completion"] {
            assert!(script.contains(command), "{shell}: {command} missing");
        }
    }
    let bash = run(&["completion", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cutover.bash");
    std::fs::write(&script, &bash).unwrap();
    let checked = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let out = dir.path().join("man1");
    let said = run(&["man", "--out", &out.display().to_string()]);
    let pages: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        said.contains(&format!("wrote {} man pages", pages.len())),
        "{said}"
    );
    for page in [
        "cutover.1",
        "cutover-rollout-status.1",
        "cutover-ca-issue.1",
    ] {
        assert!(pages.iter().any(|p| p == page), "{page} missing: {pages:?}");
    }
    // groff renders them without a warning.
    let rendered = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(out.join("cutover-rollout-status.1"))
        .output()
        .unwrap();
    assert!(
        rendered.status.success() && rendered.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let page = std::fs::read_to_string(out.join("cutover-rollout-status.1")).unwrap();
    assert!(page.contains(".TH cutover-rollout-status 1"), "{page}");
    assert!(page.contains(env!("CARGO_PKG_VERSION")), "{page}");
}
