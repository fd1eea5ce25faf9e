//! The supervisor: keeps a release running on its runtime (a process group
//! or a container, see `Runtime`), restarts it with backoff when it
//! crashes, stops it (stop command, stop signal, grace, then nothing left),
//! and lets it run on when the agent stops, for the next agent to adopt.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_common::backoff::Backoff;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::container::{Container, ContainerRuntime};
use super::docker::{ContainerSpec, DockerEngine, DockerError};
use super::logs::keep_rotated;
use super::process::{ProcessGroup, ProcessRuntime};
use super::{Instance, InstanceId, Runtime};

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
    /// Asks the process to finish its work and exit (a queue worker's
    /// `horizon:terminate`); run before the stop signal, which follows only
    /// if the process has not exited within `stop_timeout`.
    pub stop_command: Vec<String>,
    pub stop_timeout: Duration,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    pub restart_min: Duration,
    pub restart_max: Duration,
    /// Set for a docker release: it runs as a container of this image
    /// (`command`, when not empty, overrides the image's; `workdir` is
    /// unused) and its logs stay with the engine, rotated by it.
    pub container: Option<ContainerLaunch>,
    /// Secret values added to `env` at every (re)start.
    pub secrets: SecretSlot,
}

impl ProcessSpec {
    /// `env` and the secret values: what the release (and its stop
    /// command) runs with.
    pub(super) fn environment(&self) -> Result<Vec<(String, String)>, ProcessError> {
        let secrets = self
            .secrets
            .values()
            .ok_or_else(|| ProcessError::SecretsPending {
                name: self.name.clone(),
            })?;
        Ok(self.env.iter().cloned().chain(secrets).collect())
    }
}

/// Secret values of a release, shared by its supervisor and the agent: in
/// memory only, and `None` while unknown (an agent that restarted has to
/// ask the coordinator for them again; until then the release cannot be
/// (re)started). `Debug` shows names only.
#[derive(Clone, Default)]
pub struct SecretSlot(Arc<Mutex<Option<EnvVars>>>);

/// Environment variables, name and value.
type EnvVars = Vec<(String, String)>;

impl SecretSlot {
    pub fn ready(values: EnvVars) -> Self {
        Self(Arc::new(Mutex::new(Some(values))))
    }

    pub fn pending() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }

    pub fn fill(&self, values: EnvVars) {
        *self.0.lock().expect("secret slot lock") = Some(values);
    }

    pub fn values(&self) -> Option<EnvVars> {
        self.0.lock().expect("secret slot lock").clone()
    }

    pub fn is_pending(&self) -> bool {
        self.0.lock().expect("secret slot lock").is_none()
    }
}

impl PartialEq for SecretSlot {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl std::fmt::Debug for SecretSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0.lock().expect("secret slot lock") {
            None => f.write_str("SecretSlot(pending)"),
            Some(values) => f
                .debug_list()
                .entries(values.iter().map(|(name, _)| format!("{name}=<redacted>")))
                .finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContainerLaunch {
    pub engine: DockerEngine,
    pub spec: ContainerSpec,
    /// Where the container's port is published (bridge network).
    pub address: IpAddr,
    /// 0: a worker, nothing published.
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("release {name}: waiting for its secrets from the coordinator")]
    SecretsPending { name: String },
    #[error("release {name}: {source}")]
    Container {
        name: String,
        source: Box<DockerError>,
    },
    #[error("release {name}: empty command; give the service a `command` in the spec (or the image one)")]
    EmptyCommand { name: String },
    #[error("release {name}: cannot start {program:?} in {workdir}: {reason}")]
    Spawn {
        name: String,
        program: String,
        workdir: PathBuf,
        reason: String,
    },
    #[error("release {name}: cannot open its log: {}", cutover_common::fsutil::explain_io(.path, .source))]
    Log {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the supervisor knows right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessStatus {
    /// The running process (and group leader) or container, if one runs.
    pub instance: Option<InstanceId>,
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
    /// Ends supervision and leaves the process running (agent shutdown).
    release: CancellationToken,
    status: watch::Receiver<ProcessStatus>,
    task: JoinHandle<Option<StopReport>>,
}

impl Supervisor {
    /// Starts the process; errors that show at once (missing command, bad
    /// dir) are returned here, later crashes are restarted and counted.
    pub async fn start(spec: ProcessSpec) -> Result<Self, ProcessError> {
        let tracked = spawn(&spec).await?;
        Ok(Self::supervise(
            spec,
            Some(tracked),
            ProcessStatus::default(),
        ))
    }

    /// Starts a release that was found dead (its process or container ended
    /// while no agent watched it): counted as a crash, with `how`, so the
    /// node's state shows it. If it cannot start yet (its secrets are not
    /// back from the coordinator, say) it is retried like a crashed one.
    pub async fn restart(spec: ProcessSpec, how: String) -> Self {
        let (tracked, how) = match spawn(&spec).await {
            Ok(tracked) => (Some(tracked), how),
            Err(error) => {
                tracing::warn!(release = %spec.name, %error, "cannot start the release yet; retrying");
                (None, format!("{how}; {error}"))
            }
        };
        let history = ProcessStatus {
            crashes: 1,
            last_exit: Some(how),
            ..ProcessStatus::default()
        };
        Self::supervise(spec, tracked, history)
    }

    /// Takes over a process or container an earlier agent started, if it
    /// still runs; `None` means it is gone and the caller should start it
    /// anew.
    pub async fn adopt(spec: ProcessSpec, instance: InstanceId) -> Option<Self> {
        let tracked = alive(instance, spec.container.as_ref().map(|c| &c.engine)).await?;
        tracing::info!(release = %spec.name, instance = %tracked.id(), "adopted running release");
        Some(Self::supervise(
            spec,
            Some(tracked),
            ProcessStatus::default(),
        ))
    }

    fn supervise(
        spec: ProcessSpec,
        tracked: Option<Box<dyn Instance>>,
        history: ProcessStatus,
    ) -> Self {
        let (status_tx, status) = watch::channel(ProcessStatus {
            instance: tracked.as_ref().map(|t| t.id()),
            ..history
        });
        let stop = CancellationToken::new();
        let release = CancellationToken::new();
        let task = tokio::spawn(supervise(
            spec,
            tracked,
            status_tx,
            stop.clone(),
            release.clone(),
        ));
        Self {
            stop,
            release,
            status,
            task,
        }
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
    pub async fn stop(mut self) -> StopReport {
        self.stop.cancel();
        (&mut self.task)
            .await
            .expect("supervisor task panicked")
            .expect("a stop always reports")
    }

    /// Stops supervising and leaves the process running, for the next agent
    /// to adopt: what an agent shutdown does (fail static). Dropping a
    /// supervisor does the same, without waiting.
    pub async fn release(mut self) {
        self.release.cancel();
        let _ = (&mut self.task).await;
    }
}

/// The runtime that runs `spec`'s release.
fn runtime(spec: &ProcessSpec) -> Box<dyn Runtime> {
    match &spec.container {
        Some(launch) => Box::new(ContainerRuntime::new(launch.clone())),
        None => Box::new(ProcessRuntime),
    }
}

/// `instance` as something to supervise, if it still runs. A container
/// needs the engine; without one (a release recorded by a docker-enabled
/// agent, read by one without) it counts as gone.
async fn alive(instance: InstanceId, engine: Option<&DockerEngine>) -> Option<Box<dyn Instance>> {
    match instance {
        InstanceId::Process(process) => {
            ProcessGroup::adopt(process).map(|group| Box::new(group) as Box<dyn Instance>)
        }
        InstanceId::Container { container } => {
            let container = Container::adopt(engine?, container).await?;
            Some(Box::new(container))
        }
    }
}

async fn spawn(spec: &ProcessSpec) -> Result<Box<dyn Instance>, ProcessError> {
    let env = spec.environment()?;
    runtime(spec).start(spec, &env).await
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // After stop() or release() this is a no-op; otherwise the owner is
        // gone (a cutover cut short) and the process is left as is.
        self.release.cancel();
    }
}

async fn supervise(
    spec: ProcessSpec,
    tracked: Option<Box<dyn Instance>>,
    status: watch::Sender<ProcessStatus>,
    stop: CancellationToken,
    release: CancellationToken,
) -> Option<StopReport> {
    let rotation = CancellationToken::new();
    if spec.container.is_none() {
        tokio::spawn(keep_rotated(
            spec.log_dir.clone(),
            spec.log_max_bytes,
            spec.log_keep,
            rotation.clone(),
        ));
    }
    let _rotation = rotation.drop_guard();
    let mut backoff = Backoff::new(spec.restart_min, spec.restart_max);
    let mut tracked = match tracked {
        Some(tracked) => tracked,
        None => match respawn(&spec, &status, &stop, &release, spec.restart_min).await {
            Ok(tracked) => tracked,
            Err(ended) => return ended,
        },
    };
    loop {
        let started = Instant::now();
        let id = tracked.id();
        let exit = tokio::select! {
            exit = tracked.exited() => exit,
            _ = stop.cancelled() => {
                let started = Instant::now();
                if ask_to_stop(&spec, tracked.as_mut()).await {
                    return Some(StopReport { graceful: true, took: started.elapsed() });
                }
                return Some(stop_process(&spec.name, spec.stop_signal, spec.stop_grace, tracked).await);
            }
                        _ = release.cancelled() => {
                tracing::info!(release = %spec.name, instance = %id, "leaving the release running");
                return None;
            }
        };
        // Whatever the leader left behind in its group goes with it; a
        // container is removed, its successor is a fresh one.
        tracked.clear().await;
        if started.elapsed() >= STABLE_RUN {
            backoff.reset();
        }
        // Jitter may draw near zero; a crash loop still gets a breather.
        let delay = backoff.next_delay().max(spec.restart_min / 2);
        tracing::warn!(release = %spec.name, instance = %id, %exit, restart_in_ms = delay.as_millis() as u64, "release exited unexpectedly");
        status.send_modify(|s| {
            s.instance = None;
            s.crashes += 1;
            s.last_exit = Some(exit.clone());
        });
        tracked = match respawn(&spec, &status, &stop, &release, delay).await {
            Ok(tracked) => tracked,
            Err(ended) => return ended,
        };
    }
}

/// Starts the release again every `delay` until it starts or supervision is
/// told to stop (`Err` with what `supervise` returns then).
async fn respawn(
    spec: &ProcessSpec,
    status: &watch::Sender<ProcessStatus>,
    stop: &CancellationToken,
    release: &CancellationToken,
    delay: Duration,
) -> Result<Box<dyn Instance>, Option<StopReport>> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Err(Some(StopReport { graceful: true, took: Duration::ZERO })),
            _ = release.cancelled() => return Err(None),
            _ = tokio::time::sleep(delay) => {}
        }
        match spawn(spec).await {
            Ok(tracked) => {
                status.send_modify(|s| s.instance = Some(tracked.id()));
                return Ok(tracked);
            }
            Err(error) => {
                tracing::error!(release = %spec.name, %error, "restart failed");
                status.send_modify(|s| s.last_exit = Some(error.to_string()));
            }
        }
    }
}

/// Runs the release's stop command, if it has one, and waits up to
/// `stop_timeout` for the release to exit by itself; true if it did (what
/// it left behind is then cleared).
async fn ask_to_stop(spec: &ProcessSpec, tracked: &mut dyn Instance) -> bool {
    if spec.stop_command.is_empty() {
        return false;
    }
    tracing::info!(release = %spec.name, instance = %tracked.id(), command = ?spec.stop_command, "asking the release to stop");
    let deadline = Instant::now() + spec.stop_timeout;
    tracked.run_stop_command(spec).await;
    exits_by(spec, tracked, deadline).await
}

/// Waits until `deadline` for the release to exit after its stop command;
/// true if it did (what it left behind is then cleared).
async fn exits_by(spec: &ProcessSpec, tracked: &mut dyn Instance, deadline: Instant) -> bool {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let exited = tokio::time::timeout(remaining, tracked.exited())
        .await
        .is_ok();
    let id = tracked.id();
    if exited {
        tracked.clear().await;
        tracing::info!(release = %spec.name, instance = %id, "release finished its work and exited");
    } else {
        tracing::warn!(release = %spec.name, instance = %id, timeout_ms = spec.stop_timeout.as_millis() as u64, "release still running after its stop timeout; sending the stop signal");
    }
    exited
}

/// Stops a release that no supervisor owns any more (left behind by an
/// agent that died mid-cutover), the same way a supervised one is stopped.
pub async fn stop_leftover(
    name: &str,
    instance: InstanceId,
    signal: Signal,
    grace: Duration,
    engine: &DockerEngine,
) -> Option<StopReport> {
    let tracked = alive(instance, Some(engine)).await?;
    Some(stop_process(name, signal, grace, tracked).await)
}

async fn stop_process(
    name: &str,
    signal: Signal,
    grace: Duration,
    mut tracked: Box<dyn Instance>,
) -> StopReport {
    let started = Instant::now();
    let id = tracked.id();
    tracked.signal(signal).await;
    let graceful = tokio::time::timeout(grace, tracked.exited()).await.is_ok();
    if !graceful {
        tracing::warn!(release = %name, instance = %id, grace_ms = grace.as_millis() as u64, "release ignored the stop signal, killing it");
    }
    // Always: the leader may be gone while its children are not.
    tracked.clear().await;
    tracing::info!(release = %name, instance = %id, graceful, "release stopped");
    StopReport {
        graceful,
        took: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::process::{signal_group, ProcessId};
    use crate::test_support::processes_mentioning;

    fn spec(dir: &std::path::Path, script: &str) -> ProcessSpec {
        ProcessSpec {
            name: "web-v1".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            workdir: dir.to_path_buf(),
            env: vec![("GREETING".into(), "hello".into())],
            stop_signal: Signal::SIGTERM,
            stop_grace: Duration::from_millis(500),
            stop_command: Vec::new(),
            stop_timeout: Duration::ZERO,
            log_dir: dir.join("logs"),
            log_max_bytes: 1 << 20,
            log_keep: 2,
            restart_min: Duration::from_millis(100),
            restart_max: Duration::from_millis(400),
            container: None,
            secrets: SecretSlot::ready(Vec::new()),
        }
    }

    #[tokio::test]
    async fn a_worker_asked_by_its_stop_command_finishes_and_exits_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        // Ignores SIGTERM: only the stop command ends it, after its "job".
        let mut worker = spec(
            dir.path(),
            "trap '' TERM; while [ ! -f stop ]; do sleep 0.05; done; sleep 0.2; echo finished > done",
        );
        worker.stop_command = vec!["sh".into(), "-c".into(), "touch stop".into()];
        worker.stop_timeout = Duration::from_secs(5);
        let supervisor = Supervisor::start(worker.clone()).await.unwrap();
        let report = supervisor.stop().await;
        // Graceful is the event: it exited by itself within the stop
        // timeout, before any signal (it ignores SIGTERM anyway).
        assert!(report.graceful, "{report:?}");
        assert!(report.took < worker.stop_timeout, "{report:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("done"))
                .unwrap()
                .trim(),
            "finished"
        );

        // One that does not finish in time gets the signal, then SIGKILL.
        std::fs::remove_file(dir.path().join("stop")).unwrap();
        worker.stop_command = vec!["true".into()];
        worker.stop_timeout = Duration::from_millis(300);
        let supervisor = Supervisor::start(worker).await.unwrap();
        let pid = supervisor
            .status()
            .instance
            .and_then(|i| i.process())
            .unwrap();
        let report = supervisor.stop().await;
        assert!(!report.graceful, "{report:?}");
        assert!(!pid.is_alive());
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        // Generous: only a failure waits this long.
        let deadline = Instant::now() + Duration::from_secs(20);
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
            "trap 'echo bye; exit 0' TERM; echo $GREETING from $PWD; echo oops >&2; [ -z \"$HOME\" ] && echo clean env; while true; do sleep 0.05; done",
        ))
        .await
        .unwrap();
        assert!(supervisor.status().instance.is_some());
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
        // The leader's command line names the marker too: two processes mean
        // the grandchild started, so the leader's trap is already set.
        wait_for("the grandchild", || {
            processes_mentioning(&marker).len() >= 2
        })
        .await;
        let report = supervisor.stop().await;
        assert!(!report.graceful, "{report:?}");
        // Not before the grace (500 ms); the upper bound only rules out
        // waiting on the group instead of killing it (the grandchild would
        // run 60 s, the leader for ever).
        assert!(
            report.took >= Duration::from_millis(450) && report.took < Duration::from_secs(30),
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
        // Stopped by its signal (or between runs), not killed after the grace.
        assert!(report.graceful, "{report:?}");
        let runs = std::fs::read_to_string(dir.path().join("runs.txt")).unwrap();
        assert!(runs.lines().count() >= 3, "{runs}");
    }

    #[tokio::test]
    async fn a_released_process_keeps_running_and_is_adopted_by_the_next_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("cutover-adopt-test-{}", std::process::id());
        let script = format!("trap 'echo stopped; exit 0' TERM; while true; do echo tick; sleep 0.05; done; : {marker}");
        let first = Supervisor::start(spec(dir.path(), &script)).await.unwrap();
        let process = first.status().instance.and_then(|i| i.process()).unwrap();
        // The agent goes away: the process must not notice.
        first.release().await;
        // Positive evidence instead of a pause: once release() returned, the
        // process keeps logging (a tick written after it), then is alive.
        let log = dir.path().join("logs/stdout.log");
        let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let before = size();
        wait_for("it keeps logging without the agent", || size() > before).await;
        assert!(process.is_alive());

        // A pid with another start time is not ours.
        let impostor = ProcessId {
            start_time: process.start_time + 1,
            ..process
        };
        assert!(
            Supervisor::adopt(spec(dir.path(), &script), InstanceId::Process(impostor))
                .await
                .is_none()
        );

        let adopted = Supervisor::adopt(spec(dir.path(), &script), InstanceId::Process(process))
            .await
            .expect("still running");
        assert_eq!(
            adopted.status().instance,
            Some(InstanceId::Process(process))
        );
        let report = adopted.stop().await;
        assert!(report.graceful, "{report:?}");
        assert!(!process.is_alive());
        assert!(std::fs::read_to_string(&log).unwrap().contains("stopped"));
        assert!(processes_mentioning(&marker).is_empty());
    }

    #[tokio::test]
    async fn an_adopted_process_that_dies_is_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let first = Supervisor::start(spec(dir.path(), "echo run >> runs.txt; exec sleep 60"))
            .await
            .unwrap();
        let process = first.status().instance.and_then(|i| i.process()).unwrap();
        first.release().await;
        let adopted = Supervisor::adopt(
            spec(dir.path(), "echo run >> runs.txt; exec sleep 60"),
            InstanceId::Process(process),
        )
        .await
        .unwrap();
        let runs = dir.path().join("runs.txt");
        wait_for("the first run", || {
            std::fs::read_to_string(&runs)
                .unwrap_or_default()
                .lines()
                .count()
                == 1
        })
        .await;
        signal_group(process.pid, Signal::SIGKILL);
        let mut status = adopted.watch();
        wait_for("a restart", || {
            let s = status.borrow_and_update();
            s.crashes == 1
                && s.instance
                    .as_ref()
                    .is_some_and(|p| *p != InstanceId::Process(process))
        })
        .await;
        assert!(adopted.status().last_exit.unwrap().contains("adopted"));
        wait_for("the second run", || {
            std::fs::read_to_string(&runs)
                .unwrap_or_default()
                .lines()
                .count()
                == 2
        })
        .await;
        adopted.stop().await;
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
