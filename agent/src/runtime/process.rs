//! The process runtime: a release runs as a supervised process group.
//!
//! Each release gets its own process group, so a stop or a crash never
//! leaves a child or grandchild behind (the whole group is signalled, and
//! always ends with SIGKILL to the group), and a crashed process is restarted
//! with backoff until it is stopped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cutover_common::backoff::Backoff;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::logs::{pump, RotatingLog};

/// A run that lasted this long was healthy: the next crash restarts quickly.
const STABLE_RUN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The release id, for logs and messages.
    pub name: String,
    pub command: Vec<String>,
    pub workdir: PathBuf,
    /// The release environment (PORT included). The process sees only this
    /// and PATH: nothing of the agent's own environment leaks into it.
    pub env: Vec<(String, String)>,
    pub stop_signal: Signal,
    pub stop_grace: Duration,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    pub restart_min: Duration,
    pub restart_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("release {name}: empty command")]
    EmptyCommand { name: String },
    #[error("release {name}: cannot start {program:?} in {workdir}: {reason}")]
    Spawn {
        name: String,
        program: String,
        workdir: PathBuf,
        reason: String,
    },
    #[error("release {name}: cannot open log {path}: {source}")]
    Log {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the supervisor knows right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessStatus {
    /// The running process (and group leader), if one runs.
    pub pid: Option<u32>,
    /// Unexpected exits so far.
    pub crashes: u32,
    /// How the last unexpected exit went, e.g. "exit status: 1".
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// The process exited within the grace period after the stop signal.
    pub graceful: bool,
    pub took: Duration,
}

pub struct Supervisor {
    stop: CancellationToken,
    status: watch::Receiver<ProcessStatus>,
    task: JoinHandle<StopReport>,
}

impl Supervisor {
    /// Starts the process; errors that show at once (missing command, bad
    /// dir) are returned here, later crashes are restarted and counted.
    pub async fn start(spec: ProcessSpec) -> Result<Self, ProcessError> {
        let child = spawn(&spec).await?;
        let (status_tx, status) = watch::channel(ProcessStatus {
            pid: child.id(),
            ..ProcessStatus::default()
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(spec, child, status_tx, stop.clone()));
        Ok(Self { stop, status, task })
    }

    pub fn status(&self) -> ProcessStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (crashes, restarts).
    pub fn watch(&self) -> watch::Receiver<ProcessStatus> {
        self.status.clone()
    }

    /// Stops the process group: the stop signal, up to the grace period,
    /// then SIGKILL to the whole group.
    pub async fn stop(self) -> StopReport {
        self.stop.cancel();
        self.task.await.expect("supervisor task panicked")
    }
}

async fn spawn(spec: &ProcessSpec) -> Result<Child, ProcessError> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| ProcessError::EmptyCommand {
            name: spec.name.clone(),
        })?;
    let open_log = |file: &str| {
        let path = spec.log_dir.join(file);
        let name = spec.name.clone();
        async move {
            RotatingLog::open(path.clone(), spec.log_max_bytes, spec.log_keep)
                .await
                .map_err(|source| ProcessError::Log { name, path, source })
        }
    };
    let stdout_log = open_log("stdout.log").await?;
    let stderr_log = open_log("stderr.log").await?;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&spec.workdir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().map_err(|e| ProcessError::Spawn {
        name: spec.name.clone(),
        program: program.clone(),
        workdir: spec.workdir.clone(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("{e}: is the command in the release or on PATH?")
            }
            _ => e.to_string(),
        },
    })?;
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(pump(stdout, stdout_log));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(pump(stderr, stderr_log));
    }
    tracing::info!(release = %spec.name, pid = child.id(), "process started");
    Ok(child)
}

fn signal_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH (group already gone) is the expected case after an exit.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

async fn supervise(
    spec: ProcessSpec,
    mut child: Child,
    status: watch::Sender<ProcessStatus>,
    stop: CancellationToken,
) -> StopReport {
    let mut backoff = Backoff::new(spec.restart_min, spec.restart_max);
    loop {
        let started = Instant::now();
        let pid = child.id();
        let exit = tokio::select! {
            exit = child.wait() => exit,
            _ = stop.cancelled() => return stop_child(&spec, child).await,
        };
        // Whatever the leader left behind in its group goes with it.
        signal_group(pid, Signal::SIGKILL);
        let exit = exit
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        if started.elapsed() >= STABLE_RUN {
            backoff.reset();
        }
        // Jitter may draw near zero; a crash loop still gets a breather.
        let delay = backoff.next_delay().max(spec.restart_min / 2);
        tracing::warn!(release = %spec.name, ?pid, %exit, restart_in_ms = delay.as_millis() as u64, "process exited unexpectedly");
        status.send_modify(|s| {
            s.pid = None;
            s.crashes += 1;
            s.last_exit = Some(exit.clone());
        });
        // Respawn until it starts again or we are told to stop.
        child = loop {
            tokio::select! {
                _ = stop.cancelled() => return StopReport { graceful: true, took: Duration::ZERO },
                _ = tokio::time::sleep(delay) => {}
            }
            match spawn(&spec).await {
                Ok(child) => break child,
                Err(error) => {
                    tracing::error!(release = %spec.name, %error, "restart failed");
                    status.send_modify(|s| s.last_exit = Some(error.to_string()));
                }
            }
        };
        status.send_modify(|s| s.pid = child.id());
    }
}

async fn stop_child(spec: &ProcessSpec, mut child: Child) -> StopReport {
    let started = Instant::now();
    let pid = child.id();
    signal_group(pid, spec.stop_signal);
    let graceful = tokio::time::timeout(spec.stop_grace, child.wait())
        .await
        .is_ok();
    if !graceful {
        tracing::warn!(release = %spec.name, ?pid, grace_ms = spec.stop_grace.as_millis() as u64, "process ignored the stop signal, killing its group");
    }
    // Always: the leader may be gone while its children are not.
    signal_group(pid, Signal::SIGKILL);
    let _ = child.wait().await;
    tracing::info!(release = %spec.name, ?pid, graceful, "process stopped");
    StopReport {
        graceful,
        took: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path, script: &str) -> ProcessSpec {
        ProcessSpec {
            name: "web-v1".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            workdir: dir.to_path_buf(),
            env: vec![("GREETING".into(), "hello".into())],
            stop_signal: Signal::SIGTERM,
            stop_grace: Duration::from_millis(500),
            log_dir: dir.join("logs"),
            log_max_bytes: 1 << 20,
            log_keep: 2,
            restart_min: Duration::from_millis(100),
            restart_max: Duration::from_millis(400),
        }
    }

    /// Live processes whose command line contains `needle`.
    fn processes_mentioning(needle: &str) -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .filter(|cmdline| cmdline.contains(needle))
            .collect()
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn output_is_logged_and_a_polite_process_stops_gracefully() {
        let dir = tempfile::tempdir().unwrap();
        let supervisor = Supervisor::start(spec(
            dir.path(),
            "echo $GREETING from $PWD; echo oops >&2; [ -z \"$HOME\" ] && echo clean env; trap 'echo bye; exit 0' TERM; while true; do sleep 0.05; done",
        ))
        .await
        .unwrap();
        assert!(supervisor.status().pid.is_some());
        let stdout = dir.path().join("logs/stdout.log");
        wait_for("stdout", || {
            std::fs::read_to_string(&stdout)
                .unwrap_or_default()
                .contains("clean env")
        })
        .await;
        let report = supervisor.stop().await;
        assert!(report.graceful, "{report:?}");
        let out = std::fs::read_to_string(&stdout).unwrap();
        assert!(
            out.contains(&format!("hello from {}", dir.path().display())),
            "{out}"
        );
        assert!(
            out.contains("bye"),
            "the stop signal reached the process: {out}"
        );
        assert!(std::fs::read_to_string(dir.path().join("logs/stderr.log"))
            .unwrap()
            .contains("oops"));
    }

    #[tokio::test]
    async fn a_stubborn_process_and_its_children_are_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("cutover-runtime-test-{}", std::process::id());
        let supervisor = Supervisor::start(spec(
            dir.path(),
            &format!("trap '' TERM; sh -c 'trap \"\" TERM; sleep 60; : {marker}' & while true; do sleep 0.05; done"),
        ))
        .await
        .unwrap();
        wait_for("the grandchild", || {
            !processes_mentioning(&marker).is_empty()
        })
        .await;
        let report = supervisor.stop().await;
        assert!(!report.graceful);
        assert!(
            report.took >= Duration::from_millis(450) && report.took < Duration::from_secs(3),
            "{report:?}"
        );
        wait_for("no orphans", || processes_mentioning(&marker).is_empty()).await;
    }

    #[tokio::test]
    async fn a_crashing_process_is_restarted_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let supervisor =
            Supervisor::start(spec(dir.path(), "echo run >> runs.txt; sleep 0.1; exit 3"))
                .await
                .unwrap();
        let mut status = supervisor.watch();
        wait_for("three crashes", || status.borrow_and_update().crashes >= 3).await;
        let snapshot = supervisor.status();
        assert_eq!(snapshot.last_exit.as_deref(), Some("exit status: 3"));
        let report = supervisor.stop().await;
        assert!(report.took < Duration::from_secs(2));
        let runs = std::fs::read_to_string(dir.path().join("runs.txt")).unwrap();
        assert!(runs.lines().count() >= 3, "{runs}");
    }

    #[tokio::test]
    async fn a_missing_command_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), "");
        spec.command = vec!["./no-such-binary".into()];
        let error = Supervisor::start(spec)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(
            error.contains("./no-such-binary") && error.contains("web-v1"),
            "{error}"
        );
        assert!(error.contains(&dir.path().display().to_string()), "{error}");
    }
}
