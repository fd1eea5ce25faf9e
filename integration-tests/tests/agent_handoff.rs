//! The real `cutover-agent` binary handing its node over to a new process
//! (SIGHUP: a planned restart or an upgrade) under load, and restarted
//! after a SIGKILL with its listening sockets kept by the service manager
//! (systemd's side played by `systemd::FakeSystemd`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cutover_integration_tests::load::Load;
use cutover_integration_tests::systemd::FakeSystemd;
use cutover_integration_tests::{
    activate, app_archive, bin, body, find, http_get, ready, release_pids, running,
    start_on_moved_state_dir, web_release, AgentProcess, Cluster, Tuning,
};
use cutover_proto::v1 as pb;

async fn wait_ready(cluster: &Cluster) {
    cluster
        .wait_for_nodes(Duration::from_secs(20), |n| {
            find(n, "node-1").is_some_and(ready)
        })
        .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves `version` of the test app on node-1's `port`.
async fn serve(cluster: &Cluster, version: &str, port: u16, artifact: &(String, String)) {
    let (result, _) = cluster
        .run_command(
            "node-1",
            activate(version, web_release(version, port, artifact, &[])),
        )
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        result.message
    );
}

/// Node-1's agent (`binary`, with `env`) serving v1 of the test app on a
/// port of its own.
struct Node {
    agent: AgentProcess,
    config: PathBuf,
    state_dir: PathBuf,
    port: u16,
    public: SocketAddr,
    artifact: (String, String),
    v1: Vec<u32>,
}

async fn node_serving_v1(
    cluster: &Cluster,
    dir: &Path,
    binary: &Path,
    env: Vec<(String, String)>,
) -> Node {
    let (config, state_dir) = cluster.agent_config_file("node-1", None);
    let mut command = std::process::Command::new(binary);
    command.arg("--config").arg(&config).envs(env);
    let agent = cluster.start_agent_process("node-1", &mut command, state_dir.clone());
    wait_ready(cluster).await;
    let artifact = app_archive(dir);
    let port = free_port();
    let public = format!("127.0.0.11:{port}").parse().unwrap();
    serve(cluster, "v1", port, &artifact).await;
    let v1 = release_pids(&state_dir);
    Node {
        agent,
        config,
        state_dir,
        port,
        public,
        artifact,
        v1,
    }
}

/// Sends SIGHUP to the agent running the node and waits until another
/// process runs it and the old one is gone; the new pid.
async fn hand_over(cluster: &Cluster, agent: &AgentProcess) -> i32 {
    let old = agent.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = agent.pid();
        if now != old && !running(old) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no handoff from agent {old} within 30 s:\n{}",
            cluster.agent_log("node-1")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A copy of the agent binary in `dir`, to replace as an upgrade would.
fn own_binary(dir: &Path) -> PathBuf {
    let path = dir.join("cutover-agent");
    std::fs::copy(bin("cutover-agent"), &path).unwrap();
    path
}

/// Puts `contents` at `path` the way a package upgrade does: a new file
/// renamed over the old.
fn install(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let new = path.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_hands_the_node_over_under_load_without_a_failed_request() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let systemd = FakeSystemd::start(dir.path());
    let watchdog = systemd.env(Some(Duration::from_secs(2)));
    let Node {
        agent,
        config,
        state_dir,
        port,
        public,
        artifact,
        v1,
    } = node_serving_v1(&cluster, dir.path(), &bin("cutover-agent"), watchdog).await;
    systemd.wait_for("READY", Some("1"), Duration::from_secs(5));
    systemd.wait_for("WATCHDOG", Some("1"), Duration::from_secs(5));
    assert_eq!(v1.len(), 1, "{v1:?}");
    // The proxy's socket is in the store, for a crash.
    assert_eq!(systemd.stored(), vec![format!("proxy-127.0.0.11_{port}")]);

    let load = Load::start(vec![public], "/", 8);
    let sent = load.wait_for_sent(0, 300, "before the handoff").await;
    let first = agent.pid();
    let second = hand_over(&cluster, &agent).await;
    let sent = load
        .wait_for_sent(sent, 300, "after the first handoff")
        .await;
    // The successor hands over in turn, asked by `cutover-agent upgrade`,
    // which waits for the outcome.
    let upgrade = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin("cutover-agent"))
                .arg("--config")
                .arg(&config)
                .arg("upgrade")
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let said = String::from_utf8_lossy(&upgrade.stdout);
    assert!(
        upgrade.status.success()
            && said.contains(&format!("took over the node from agent {second}")),
        "{said}{}",
        String::from_utf8_lossy(&upgrade.stderr)
    );
    let third = agent.pid();
    load.wait_for_sent(sent, 300, "after the second handoff")
        .await;
    let report = load.stop().await;
    assert_eq!(
        report.failed, 0,
        "{} of {} requests failed across two handoffs: {:?}",
        report.failed, report.sent, report.failures
    );
    assert_eq!(
        report.by_body.keys().collect::<Vec<_>>(),
        vec!["v1"],
        "{:?}",
        report.by_body
    );
    assert!(first != second && second != third && first != third);
    assert_eq!(
        release_pids(&state_dir),
        v1,
        "the same app process, adopted"
    );

    // systemd heard of each handoff and of its new main process.
    let main_pids = systemd.values("MAINPID");
    assert_eq!(
        main_pids,
        vec![second.to_string(), third.to_string()],
        "{main_pids:?}"
    );
    assert_eq!(systemd.count("RELOADING", Some("1")), 2);

    // The node is the new agent's: it reconnects and takes commands.
    wait_ready(&cluster).await;
    serve(&cluster, "v2", port, &artifact).await;
    assert_eq!(body(&http_get(&public.to_string(), "/")), "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_cannot_take_over_leaves_the_old_agent_serving() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let binary = own_binary(dir.path());
    let Node {
        agent,
        config,
        state_dir,
        port,
        public,
        artifact,
        v1,
    } = node_serving_v1(&cluster, dir.path(), &binary, Vec::new()).await;
    let load = Load::start(vec![public], "/", 8);
    let mut sent = load.wait_for_sent(0, 200, "at first").await;
    let old = agent.pid();
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let wait_for_log = |needle: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = cluster.agent_log("node-1");
            if log.matches(needle).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} (x{count}) in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // `cutover-agent upgrade` checks a new binary before it installs it.
    let broken = dir.path().join("broken");
    install(&broken, b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    let refused = upgrade_with(&config, &broken);
    let unchanged = || {
        assert_eq!(
            std::fs::read(&binary).unwrap(),
            std::fs::read(bin("cutover-agent")).unwrap()
        );
        assert_eq!(agent.pid(), old);
    };
    said_so(
        &refused,
        2,
        &["is not a cutover-agent binary", "nothing was changed"],
    );
    unchanged();

    // One that says it is an agent but cannot take over: installed,
    // refused, and the previous binary put back for the next start.
    let liar = dir.path().join("liar");
    install(
        &liar,
        b"#!/bin/sh\n[ \"$1\" = --version ] && { echo 'cutover-agent 9.9.9'; exit 0; }\nexit 3\n",
    );
    let refused = upgrade_with(&config, &liar);
    said_so(
        &refused,
        1,
        &[
            "the handoff was refused",
            "the previous binary is back in place",
        ],
    );
    unchanged();

    // Installed by hand anyway (a package upgrade), it does not start.
    install(&binary, b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    hup();
    wait_for_log("handoff refused", 2);
    sent = load.wait_for_sent(sent, 200, "after a broken binary").await;

    // One that starts and takes the handoff, then dies once the old agent
    // let go of the node: there is no way back, and the binary that ran
    // (the old version) takes over instead.
    install(
        &binary,
        b"#!/usr/bin/env python3\nimport os, socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(os.environ['CUTOVER_HANDOFF_SOCKET'])\ns.sendall(b'prepared 99.0.0\\n')\nf = s.makefile()\nassert f.readline().startswith('released')\nsys.exit(4)\n",
    );
    hup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.pid() == old || running(old) {
        assert!(
            Instant::now() < deadline,
            "the old binary did not take over:\n{}",
            cluster.agent_log("node-1")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.wait_for_sent(sent, 200, "after the fallback").await;
    let report = load.stop().await;
    assert_eq!(
        report.failed,
        0,
        "{} of {} requests failed: {:?}\n{}",
        report.failed,
        report.sent,
        report.failures,
        cluster.agent_log("node-1")
    );
    assert_eq!(release_pids(&state_dir), v1, "the same app process");
    let log = cluster.agent_log("node-1");
    assert!(log.contains("broken build"), "{log}");
    assert!(
        log.contains("handing over to this agent's own binary"),
        "{log}"
    );
    wait_ready(&cluster).await;
    serve(&cluster, "v2", port, &artifact).await;
    assert_eq!(body(&http_get(&public.to_string(), "/")), "v2");

    // A good binary, installed over the agent's by `upgrade`, takes over.
    let v2 = release_pids(&state_dir);
    let fallback = agent.pid();
    let upgraded =
        tokio::task::spawn_blocking(move || upgrade_with(&config, &bin("cutover-agent")))
            .await
            .unwrap();
    let said = String::from_utf8_lossy(&upgraded.stdout);
    assert!(
        upgraded.status.success()
            && said.contains(&format!(
                "installed cutover-agent {}",
                env!("CARGO_PKG_VERSION")
            ))
            && said.contains(&format!("took over the node from agent {fallback}")),
        "{said}{}",
        String::from_utf8_lossy(&upgraded.stderr)
    );
    assert_eq!(
        std::fs::read(&binary).unwrap(),
        std::fs::read(bin("cutover-agent")).unwrap()
    );
    assert_ne!(agent.pid(), fallback);
    assert_eq!(release_pids(&state_dir), v2);
}

/// `out` exited `code` and its stderr says each of `says`.
fn said_so(out: &std::process::Output, code: i32, says: &[&str]) {
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(code) && says.iter().all(|s| said.contains(s)),
        "{said}"
    );
}

fn upgrade_with(config: &Path, binary: &Path) -> std::process::Output {
    std::process::Command::new(bin("cutover-agent"))
        .arg("--config")
        .arg(config)
        .arg("upgrade")
        .arg("--binary")
        .arg(binary)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_stored_sockets_keep_connections_waiting_for_the_new_agent() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let systemd = FakeSystemd::start(dir.path());
    let Node {
        agent,
        config,
        state_dir,
        public,
        v1,
        ..
    } = node_serving_v1(
        &cluster,
        dir.path(),
        &bin("cutover-agent"),
        systemd.env(None),
    )
    .await;
    let config = config.display().to_string();
    let public = public.to_string();

    agent.kill();
    // No agent runs: clients connect (the socket lives on in the store)
    // and wait for an answer instead of being refused.
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let public = public.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                (http_get(&public, "/"), started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut restart = systemd.start_with_store(&bin("cutover-agent"), &["--config", &config], None);
    let agent = cluster.start_agent_process("node-1", &mut restart, state_dir.clone());
    for client in waiting {
        let (answer, waited) = client.join().unwrap();
        assert_eq!(body(&answer), "v1", "{answer}");
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
    }
    wait_ready(&cluster).await;
    assert_eq!(release_pids(&state_dir), v1, "adopted");
    assert!(
        cluster
            .agent_log("node-1")
            .contains("took over listening sockets"),
        "{}",
        cluster.agent_log("node-1")
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_new_state_dir_refuses_while_the_old_one_runs_the_nodes_releases() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let Node {
        agent,
        config,
        state_dir,
        public,
        v1,
        ..
    } = node_serving_v1(&cluster, dir.path(), &bin("cutover-agent"), Vec::new()).await;
    let public = public.to_string();
    agent.kill();

    // The node's agent moved (a hand-run agent replaced by the unit, whose
    // state dir differs): it would not see v1, and would leave it running
    // unsupervised. It refuses, naming the old state dir, and changes
    // nothing: no node id in the new dir, v1 serves on.
    let (moved, said) = start_on_moved_state_dir(&config, &state_dir);
    assert!(
        said.contains(&format!(
            "releases of node node-1 run from state dir {}",
            state_dir.display()
        )) && said.contains(&format!(
            "start the agent on {} to adopt them",
            state_dir.display()
        )),
        "{said}"
    );
    assert!(!moved.join("node-id").exists());
    assert_eq!(release_pids(&state_dir), v1);
    assert_eq!(body(&http_get_via_release(&state_dir)), "v1");

    // Back on its state dir it adopts them.
    let mut command = std::process::Command::new(bin("cutover-agent"));
    command.arg("--config").arg(&config);
    let agent = cluster.start_agent_process("node-1", &mut command, state_dir.clone());
    wait_ready(&cluster).await;
    assert_eq!(body(&http_get(&public, "/")), "v1");
    assert_eq!(release_pids(&state_dir), v1, "adopted");
    drop(agent);
}

/// v1 answered directly on its own port (the node's proxy is down while
/// no agent runs).
fn http_get_via_release(state_dir: &Path) -> String {
    http_get(&format!("127.0.0.11:{}", release_port(state_dir)), "/")
}

/// The port the node's (one) release listens on: in its environment.
fn release_port(state_dir: &Path) -> u16 {
    let pid = release_pids(state_dir)[0];
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"PORT="))
        .and_then(|port| String::from_utf8_lossy(port).parse().ok())
        .expect("a web release has PORT")
}

/// The figures of docs/benchmarks.md ("Agent restarts"), printed, not
/// asserted: load on the node's proxy across a handoff, and across a
/// SIGKILL and a restart 200 ms later (the unit's `RestartSec`) with and
/// without the sockets kept by the service manager. Run by
/// integration-tests/bench/agent-restart.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: integration-tests/bench/agent-restart.sh"]
async fn restart_figures() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let Node {
        mut agent,
        config,
        state_dir,
        public,
        ..
    } = node_serving_v1(&cluster, dir.path(), &bin("cutover-agent"), Vec::new()).await;
    let config = config.display().to_string();
    let plain = || {
        let mut command = std::process::Command::new(bin("cutover-agent"));
        command.args(["--config", &config]);
        cluster.start_agent_process("node-1", &mut command, state_dir.clone())
    };
    // Created for the last event only: while it holds the proxy's socket,
    // a restarted agent without it could not bind.
    let mut systemd: Option<FakeSystemd> = None;

    println!("| event | requests on 8 keep-alive connections | failed | new connections (one per 10 ms) | refused or cut | longest wait of a new connection (ms) | refused for (ms) |");
    println!("|---|---|---|---|---|---|---|");
    // The peer: HAProxy in master-worker mode in front of the same
    // release, reloaded (SIGUSR2) the way `systemctl reload haproxy` does.
    let haproxy = HaproxyReload::start(release_port(&state_dir));
    for event in [
        "steady",
        "handoff",
        "sigkill",
        "sigkill-fd-store",
        "haproxy-steady",
        "haproxy-reload",
    ] {
        if event == "sigkill-fd-store" {
            // An agent under the service manager, which stores its socket.
            agent.kill();
            let manager = FakeSystemd::start(dir.path());
            let mut command = std::process::Command::new(bin("cutover-agent"));
            command.args(["--config", &config]).envs(manager.env(None));
            agent = cluster.start_agent_process("node-1", &mut command, state_dir.clone());
            wait_ready(&cluster).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while manager.stored().is_empty() {
                assert!(Instant::now() < deadline, "the agent stored no socket");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            systemd = Some(manager);
        }
        let target = if event.starts_with("haproxy") {
            haproxy.frontend
        } else {
            public
        };
        let load = Load::start(vec![target], "/", 8);
        let prober = Prober::start(target);
        let sent = load.wait_for_sent(0, 500, "before the event").await;
        match event {
            "steady" | "haproxy-steady" => {}
            "haproxy-reload" => haproxy.reload(),
            "handoff" => {
                hand_over(&cluster, &agent).await;
            }
            _ => {
                agent.kill();
                tokio::time::sleep(Duration::from_millis(200)).await;
                agent = match &systemd {
                    Some(manager) => {
                        let mut restart = manager.start_with_store(
                            &bin("cutover-agent"),
                            &["--config", &config],
                            None,
                        );
                        cluster.start_agent_process("node-1", &mut restart, state_dir.clone())
                    }
                    None => plain(),
                };
                wait_ready(&cluster).await;
            }
        }
        load.wait_for_sent(sent, 500, "after the event").await;
        let report = load.stop().await;
        let probes = prober.stop();
        let failed: Vec<&Probe> = probes.iter().filter(|p| !p.ok).collect();
        let refused_for = match (failed.first(), failed.last()) {
            (Some(first), Some(last)) => (last.at - first.at).as_millis(),
            _ => 0,
        };
        let longest = probes
            .iter()
            .filter(|p| p.ok)
            .map(|p| p.took)
            .max()
            .unwrap_or_default();
        println!(
            "| {event} | {} | {} | {} | {} | {:.1} | {refused_for} |",
            report.sent,
            report.failed,
            probes.len(),
            failed.len(),
            longest.as_secs_f64() * 1000.0,
        );
    }
    drop(agent);
}

/// HAProxy (master-worker) proxying to `127.0.0.11:port`.
struct HaproxyReload {
    master: std::process::Child,
    frontend: SocketAddr,
    _dir: tempfile::TempDir,
}

impl HaproxyReload {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let frontend: SocketAddr = format!("127.0.0.12:{}", free_port()).parse().unwrap();
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 4096\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\nfrontend web\n    bind {frontend}\n    default_backend app\nbackend app\n    server app 127.0.0.11:{port}\n"
            ),
        )
        .unwrap();
        let master = std::process::Command::new("haproxy")
            .args(["-W", "-db", "-f"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(frontend).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            master,
            frontend,
            _dir: dir,
        }
    }

    /// A reload, and the time for the new worker to take over.
    fn reload(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.master.id() as i32),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
}

impl Drop for HaproxyReload {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// One new connection's request.
struct Probe {
    at: Instant,
    took: Duration,
    ok: bool,
}

/// Opens a new connection every 10 ms and sends one request on it: what a
/// client arriving at any moment meets.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Probe>>,
}

impl Prober {
    fn start(target: SocketAddr) -> Self {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut probes = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let at = Instant::now();
                let ok = std::net::TcpStream::connect(target)
                    .and_then(|mut stream| {
                        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                        stream.write_all(
                            b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n",
                        )?;
                        let mut answer = String::new();
                        stream.read_to_string(&mut answer)?;
                        Ok(answer.starts_with("HTTP/1.1 200"))
                    })
                    .unwrap_or(false);
                probes.push(Probe {
                    at,
                    took: at.elapsed(),
                    ok,
                });
                std::thread::sleep(Duration::from_millis(10).saturating_sub(at.elapsed()));
            }
            probes
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Probe> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the prober")
    }
}

/// A SIGHUP while a command runs: the handoff waits, connected, for its
/// end; its result comes from the agent that ran it (not an UNKNOWN from
/// one that took over mid-run), then the new agent takes the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_waits_for_the_command_in_flight() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let Node {
        agent, artifact, ..
    } = node_serving_v1(&cluster, dir.path(), &bin("cutover-agent"), Vec::new()).await;
    let task = pb::Command {
        command_id: "slow-task".into(),
        kind: Some(pb::command::Kind::RunTask(pb::RunTask {
            release: Some(web_release("v1", free_port(), &artifact, &[])),
            command: vec!["sh".into(), "-c".into(), "sleep 2; echo finished".into()],
            timeout_ms: 30_000,
            secret_values: Default::default(),
            env: Default::default(),
        })),
    };
    let registry = &cluster.coordinator.as_ref().unwrap().registry;
    let pending = registry.send_command("node-1", task).unwrap();
    let old = agent.pid();
    let ((result, answered), (new, took_over)) = tokio::join!(
        async {
            let result = pending.wait(Duration::from_secs(30), |_| {}).await;
            (result, Instant::now())
        },
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let new = hand_over(&cluster, &agent).await;
            (new, Instant::now())
        }
    );
    let result = result.expect("the task's result");
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        result.message
    );
    assert!(!result.replayed, "answered by the agent that ran it");
    assert_ne!(new, old);
    // Answered over the old agent's session, which stayed open for it;
    // the new agent took over after.
    assert!(answered <= took_over, "{}", cluster.agent_log("node-1"));
    wait_ready(&cluster).await;
}
