//! The sample web app (tests/fixtures/app.py, run by python3) as a release
//! of a service "web", and how to find its processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_agent::artifacts::{unpack, ArtifactCache, Digest};
use cutover_agent::checks::{Check, HealthGate, Probe};
use cutover_agent::runtime::docker::DockerEngine;
use cutover_agent::service::{ServiceSettings, WebRelease};
use nix::sys::signal::Signal;

const APP: &str = include_str!("../fixtures/app.py");

/// A release dir holding the app, built the way production builds one: a
/// .tar.gz fetched by digest into the cache and unpacked.
pub async fn release_dir(root: &Path, cache: &ArtifactCache, version: &str) -> PathBuf {
    let staging = root.join(format!("build-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    let archive = staging.join("app.tar.gz");
    super::tar_gz(&archive, &[("app.py", APP)]);
    let digest = Digest::of_file(&archive).unwrap();
    let cached = cache
        .fetch(&format!("file://{}", archive.display()), &digest, None)
        .await
        .unwrap();
    let dir = root.join("releases").join(version);
    unpack(&cached, &dir).unwrap();
    dir
}

pub fn web_release(dir: &Path, version: &str, extra_env: &[(&str, &str)]) -> WebRelease {
    let mut env = vec![("VERSION".to_string(), version.to_string())];
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    WebRelease {
        release_id: format!("web-{version}"),
        // The absolute path makes every test's processes findable by name.
        command: vec!["python3".into(), dir.join("app.py").display().to_string()],
        workdir: dir.to_path_buf(),
        env,
        health: Some(Check {
            probe: Probe::Http {
                path: "/health".into(),
                expect_status: 200..=299,
                body_contains: None,
            },
            timeout: Duration::from_secs(1),
        }),
        gate: HealthGate {
            interval: Duration::from_millis(100),
            healthy_threshold: 2,
            deadline: Duration::from_secs(10),
        },
        smoke: vec![Check {
            probe: Probe::Http {
                path: "/".into(),
                expect_status: 200..=200,
                body_contains: Some(version.to_string()),
            },
            timeout: Duration::from_secs(1),
        }],
        stop_signal: Signal::SIGTERM,
        stop_grace: Duration::from_secs(5),
        min_healthy_time: Duration::ZERO,
        stop_command: Vec::new(),
        stop_timeout: Duration::ZERO,
        drain_timeout: Duration::from_secs(10),
        container: None,
        secrets: Vec::new(),
        secret_values: Default::default(),
        hooks: Vec::new(),
        hook_env: Vec::new(),
        queues: None,
        instances: 1,
    }
}

pub fn settings(root: &Path) -> ServiceSettings {
    ServiceSettings {
        name: "web".into(),
        address: "127.0.0.1".parse().unwrap(),
        ports: 20000..=29999,
        log_root: root.join("logs"),
        log_max_bytes: 1 << 20,
        log_keep: 2,
        // A node id of its own: a restarted agent stops release processes
        // labelled with its node id that it has no record of, and tests
        // run side by side.
        docker: DockerEngine::new(
            "unix:///var/run/docker.sock",
            "test",
            &root.display().to_string(),
            Vec::new(),
        ),
        owner: cutover_agent::runtime::ownership::Owner::new(
            &root.display().to_string(),
            "test",
            "sha256:test",
            root,
        ),
    }
}

/// The pids of this fixture's running (not zombie) releases, and of
/// anything they run.
pub fn app_pids(root: &Path) -> Vec<u32> {
    let needle = root.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            (String::from_utf8_lossy(&cmdline).contains(&needle) && !zombie).then_some(pid)
        })
        .collect()
}

/// The pids of the `count` release processes of this fixture once each runs
/// the app itself, sorted; panics after 10 s. `python3` may be a launcher
/// script (pyenv's) whose subshells carry the same command line until it
/// execs the interpreter in place, and a process in the middle of that
/// exec cannot be read: a count taken earlier sees too many or too few.
pub async fn running_app(root: &Path, count: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let leaders = group_leaders(root);
        let interpreters = leaders.iter().all(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.to_string_lossy().contains("python"))
        });
        if leaders.len() == count && interpreters {
            return leaders;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{count} release processes expected, running: {leaders:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Those of `app_pids` that lead their process group (the agent starts each
/// release process in a group of its own), sorted.
fn group_leaders(root: &Path) -> Vec<u32> {
    let mut leaders: Vec<u32> = app_pids(root)
        .into_iter()
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let group = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                .and_then(|g| g.parse::<u32>().ok());
            group == Some(*pid)
        })
        .collect();
    leaders.sort_unstable();
    leaders
}
