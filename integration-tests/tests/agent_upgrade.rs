//! Fleet-wide agent upgrades on real binaries (`cutover dev up`, 3 nodes,
//! under load): `cutover agents upgrade` hands every node to the new agent
//! binary with no failed request and the same app processes; a build whose
//! agent cannot reach the coordinator on one node is never committed
//! there, that node returns to its previous agent by itself and the
//! upgrade stops before the next node.

use std::path::{Path, PathBuf};

use serde_json::Value;

use cutover_common::digest::Digest;
use cutover_integration_tests::canary::{succeeded, Fixture, Shoppers};
use cutover_integration_tests::{bin, text};

const STRATEGY: &str = "batch = \"100%\"\nmin_healthy_time = \"500ms\"";

/// An agent artifact holding `binary` as `cutover-agent`: its path and
/// digest.
fn agent_artifact(dir: &Path, name: &str, binary: &[u8]) -> (PathBuf, String) {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(binary.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    tar.append_data(&mut header, "cutover-agent", binary)
        .unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let digest = Digest::of_file(&path).unwrap().to_string();
    (path, digest)
}

fn upgrade(f: &Fixture, artifact: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "agents",
        "upgrade",
        "--artifact",
        artifact.to_str().unwrap(),
        "--wait",
    ];
    all.extend_from_slice(args);
    f.cluster.cutover(&all)
}

/// Each node's agent build, as `cutover nodes` shows it.
fn builds(f: &Fixture) -> Vec<(String, String)> {
    let out = f.cluster.cutover(&["nodes", "-o", "json"]);
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("nodes json");
    nodes
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["agent_build"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The binary the agent running node `i` (1-based) was started from.
fn agent_binary(f: &Fixture, i: usize) -> PathBuf {
    let pid =
        std::fs::read_to_string(f.cluster.path(&format!("agents/node-{i}/agent.pid"))).unwrap();
    std::fs::read_link(format!("/proc/{}/exe", pid.trim())).unwrap()
}

fn failed(answers: &[(u16, String)]) -> Vec<&(u16, String)> {
    answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect()
}

/// Polls `builds` until `want` (the coordinator hears the returned agent
/// a heartbeat after the upgrade's end).
fn wait_for_builds(f: &Fixture, want: &[(String, String)]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = builds(f);
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now:?}, not {want:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_fleet_upgrade_swaps_every_agent_under_load_and_a_node_that_fails_returns() {
    let f = Fixture::with_nodes(3);
    let dir = tempfile::tempdir().unwrap();
    succeeded(&f.deploy("v1", STRATEGY));
    let nodes: Vec<String> = (0..3).map(|i| f.node(i)).collect();
    let apps = f.release_processes();
    let agent = bin("cutover-agent");
    let (good, good_digest) =
        agent_artifact(dir.path(), "good.tar.gz", &std::fs::read(&agent).unwrap());

    let shoppers = Shoppers::at(&nodes);
    let out = upgrade(&f, &good, &["--batch", "2", "--deadline", "60s"]);
    let answers = shoppers.finish();
    succeeded(&out);
    assert!(
        failed(&answers).is_empty(),
        "{:?} of {}",
        failed(&answers),
        answers.len()
    );
    assert!(answers.len() > 100, "{} requests", answers.len());
    let names: Vec<String> = (1..=3).map(|i| format!("node-{i}")).collect();
    let on = |builds: [&str; 3]| -> Vec<(String, String)> {
        names
            .iter()
            .cloned()
            .zip(builds.map(String::from))
            .collect()
    };
    wait_for_builds(&f, &on([&good_digest, &good_digest, &good_digest]));
    let hex = good_digest.trim_start_matches("sha256:");
    for i in 1..=3 {
        assert_eq!(
            agent_binary(&f, i),
            f.cluster
                .path(&format!("agents/node-{i}/bin/{hex}/cutover-agent")),
            "node-{i} runs the new binary"
        );
    }
    assert_eq!(f.release_processes(), apps, "the same app processes serve");
    let stdout = text(&out.stdout);
    eprintln!("{stdout}");
    assert!(stdout.contains("3 of 3 agents upgraded"), "{stdout}");

    // A crash and a start of the unit's binary (what systemd does after
    // a reboot too): it runs the committed build, not the older file.
    let pid_file = f.cluster.path("agents/node-3/agent.pid");
    let killed: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    cutover_integration_tests::sigkill(killed);
    let log = std::fs::File::create(f.cluster.path("logs/node-3-restarted.log")).unwrap();
    let mut restarted = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&agent)
            .arg("--config")
            .arg(f.cluster.path("agent-3.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(&pid_file)
        .unwrap_or_default()
        .trim()
        == killed.to_string()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node-3's agent did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        agent_binary(&f, 3),
        f.cluster
            .path(&format!("agents/node-3/bin/{hex}/cutover-agent")),
        "the committed build runs after a restart"
    );
    wait_for_builds(&f, &on([&good_digest, &good_digest, &good_digest]));

    // A build whose agent on node-2 cannot reach the coordinator (its
    // config there points at a closed port): node-1 takes it, node-2
    // returns to the good build once its probation runs out, node-3 is
    // never asked.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = std::fs::read_to_string(f.cluster.path("agent-2.toml")).unwrap();
    let unreachable = f.cluster.path("agent-2-unreachable.toml");
    let coordinator = config
        .lines()
        .find(|l| l.starts_with("coordinator = "))
        .unwrap()
        .to_string();
    std::fs::write(
        &unreachable,
        config.replace(&coordinator, &format!("coordinator = \"https://{closed}\"")),
    )
    .unwrap();
    let wrapper = format!(
        "#!/bin/sh\ncase \"$*\" in\n  *agent-2.toml*) exec {agent} --config {bad} ;;\nesac\nexec {agent} \"$@\"\n",
        agent = agent.display(),
        bad = unreachable.display()
    );
    let (broken, broken_digest) = agent_artifact(dir.path(), "broken.tar.gz", wrapper.as_bytes());
    let shoppers = Shoppers::at(&nodes);
    let running = std::process::Command::new(bin("cutover"))
        .args(["agents", "upgrade", "--artifact"])
        .arg(&broken)
        .args(["--wait", "--batch", "1", "--deadline", "8s"])
        .envs(f.cluster.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A deploy meanwhile is refused (before the upgrade starts it is one
    // that changes nothing: v1 runs everywhere).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let spec = cutover_integration_tests::dev_spec(f.port, "v1", STRATEGY, "");
        let deploy = f.cluster.deploy_spec(&spec, "v1", &[]);
        let said = text(&deploy.stderr);
        if said.contains("agent upgrade agent-upgrade.") {
            assert!(said.contains("is running; deploy once it ended"), "{said}");
            assert!(!deploy.status.success());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a deploy was never refused: {said}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = running.wait_with_output().unwrap();
    let answers = shoppers.finish();
    let stdout = text(&out.stdout);
    eprintln!("{stdout}");
    assert!(!out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        failed(&answers).is_empty(),
        "{:?} of {}",
        failed(&answers),
        answers.len()
    );
    for part in [
        "node-1 upgraded",
        "the new agent on node-2 did not come back healthy within 8s",
        "node-2 returned: back on agent",
        "the upgrade stopped: 1 upgraded, 1 not started",
    ] {
        assert!(stdout.contains(part), "{part}: {stdout}");
    }
    wait_for_builds(&f, &on([&broken_digest, &good_digest, &good_digest]));
    assert_eq!(
        agent_binary(&f, 2),
        f.cluster
            .path(&format!("agents/node-2/bin/{hex}/cutover-agent")),
        "node-2 runs the good build again"
    );
    assert_eq!(f.release_processes(), apps, "the same app processes serve");
    // `dev down` stops the agents, the restarted one too.
    drop(f);
    restarted.wait().unwrap();
}
