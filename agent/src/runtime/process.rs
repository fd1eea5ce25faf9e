//! The process runtime: a release runs as a process group of its own, so a
//! stop or a crash never leaves a child or grandchild behind (the whole
//! group is signalled, and always ends with SIGKILL to the group).
//!
//! A release does not depend on the agent process: it logs to files, not to
//! the agent's pipes, and an agent that stops (or dies) leaves it running. A
//! restarted agent adopts it again by pid and start time, the pair that
//! identifies a process even after its pid is reused. A job run to
//! completion is the exception: its output comes back through pipes, and it
//! is the agent's to kill at its deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

use super::job::{Completion, Ended, Job, JobError, Tail};
use super::logs::{open_append, STDERR, STDOUT};
use super::supervisor::{ProcessError, ProcessSpec};
use super::{release_command, BoxFuture, Instance, InstanceId, Runtime};

/// How often an adopted process is checked for liveness.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// How long a job's output may still come once the job is over: its group
/// is gone by then, so only a process that left the group holds the pipes.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// A process as the kernel knows it: the pid and its start time (clock
/// ticks since boot), which together survive pid reuse as an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    pub(crate) fn of(pid: u32) -> Option<Self> {
        let start_time = stat_field(pid, 22)?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    /// Still the same process, and not a zombie.
    pub fn is_alive(&self) -> bool {
        stat_field(self.pid, 3).is_some_and(|state| state != "Z")
            && stat_field(self.pid, 22).and_then(|t| t.parse().ok()) == Some(self.start_time)
    }
}

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat.
pub(crate) fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are
    // separated cleanly.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace()
        .nth(n.checked_sub(3)?)
        .map(str::to_string)
}

pub(super) fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        // ESRCH (group already gone) is the expected case after an exit.
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Runs releases as process groups.
pub struct ProcessRuntime;

/// A release's process group: our child, or one adopted from an earlier
/// agent, which can only be watched, not waited on.
pub(super) enum ProcessGroup {
    Child(Child, ProcessId),
    Adopted(ProcessId),
}

impl ProcessGroup {
    /// The recorded process, if it still runs.
    pub(super) fn adopt(process: ProcessId) -> Option<Self> {
        process.is_alive().then_some(ProcessGroup::Adopted(process))
    }

    fn process(&self) -> ProcessId {
        match self {
            ProcessGroup::Child(_, id) | ProcessGroup::Adopted(id) => *id,
        }
    }
}

impl Runtime for ProcessRuntime {
    fn start<'a>(
        &'a self,
        spec: &'a ProcessSpec,
        env: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, ProcessError>> {
        Box::pin(async move {
            let group: Box<dyn Instance> = Box::new(start(spec, env)?);
            Ok(group)
        })
    }

    fn run_to_completion<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Completion, JobError>> {
        Box::pin(run_to_completion(job))
    }
}

fn start(spec: &ProcessSpec, env: &[(String, String)]) -> Result<ProcessGroup, ProcessError> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| ProcessError::EmptyCommand {
            name: spec.name.clone(),
        })?;
    let open_log = |file: &str| {
        let path = spec.log_dir.join(file);
        open_append(&path).map_err(|source| ProcessError::Log {
            name: spec.name.clone(),
            path,
            source,
        })
    };
    let stdout = open_log(STDOUT)?;
    let stderr = open_log(STDERR)?;
    let child = release_command(program, args, &spec.workdir, env)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| ProcessError::Spawn {
            name: spec.name.clone(),
            program: program.clone(),
            workdir: spec.workdir.clone(),
            reason: spawn_failure(&e),
        })?;
    let pid = child.id().expect("a just-spawned child has a pid");
    let id = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 });
    tracing::info!(release = %spec.name, pid, "process started");
    Ok(ProcessGroup::Child(child, id))
}

/// Why a command did not start, with the likely fix for the usual case.
/// Why a command did not start, and what to change.
fn spawn_failure(error: &std::io::Error) -> String {
    // ENOEXEC: no kind of its own in std.
    const NOT_EXECUTABLE_FORMAT: i32 = 8;
    match error.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{error}: the program is neither in the release (a path relative to the archive's top, e.g. \"./bin/app\") nor on the node's PATH; check `command` in the spec"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "{error}: the agent's user may not run it; make it executable (chmod +x) before packing the release, and check the agent's state dir is not mounted noexec"
        ),
        _ if error.raw_os_error() == Some(NOT_EXECUTABLE_FORMAT) => format!(
            "{error}: not a program for this machine; build it for the node's architecture, or start a script with a #! line"
        ),
        _ => error.to_string(),
    }
}

impl Instance for ProcessGroup {
    fn id(&self) -> InstanceId {
        InstanceId::Process(self.process())
    }

    fn signal(&self, signal: Signal) -> BoxFuture<'_, ()> {
        signal_group(self.process().pid, signal);
        Box::pin(std::future::ready(()))
    }

    fn clear(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            signal_group(self.process().pid, Signal::SIGKILL);
            if let ProcessGroup::Child(child, _) = self {
                let _ = child.wait().await;
            }
        })
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            match self {
                ProcessGroup::Child(child, _) => child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
                ProcessGroup::Adopted(id) => {
                    while id.is_alive() {
                        tokio::time::sleep(ADOPTED_POLL).await;
                    }
                    "exited (status unknown: it was adopted after an agent restart)".to_string()
                }
            }
        })
    }

    fn run_stop_command<'a>(&'a self, spec: &'a ProcessSpec) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some((program, args)) = spec.stop_command.split_first() else {
                return;
            };
            // Beside the release's own output, in its log files.
            let output = |file: &str| open_append(&spec.log_dir.join(file));
            // Not labelled as a release: it runs beside one, and a
            // restarted agent must not take it for an orphan.
            let mut env = spec.environment().unwrap_or_else(|_| spec.env.clone());
            env.retain(|(key, _)| !super::ownership::Owner::is_label(key));
            let command = match (output(STDOUT), output(STDERR)) {
                (Ok(stdout), Ok(stderr)) => release_command(program, args, &spec.workdir, &env)
                    .stdout(stdout)
                    .stderr(stderr)
                    .spawn(),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            let mut child = match command {
                Ok(child) => child,
                Err(error) => {
                    tracing::warn!(release = %spec.name, %error, "cannot run the stop command");
                    return;
                }
            };
            match tokio::time::timeout(spec.stop_timeout, child.wait()).await {
                Ok(Ok(status)) if !status.success() => {
                    tracing::warn!(release = %spec.name, %status, "stop command failed")
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(release = %spec.name, "stop command still running at the stop timeout");
                    if let Some(id) = child.id() {
                        signal_group(id, Signal::SIGKILL);
                    }
                }
            }
        })
    }
}

/// Kills a process group when dropped: a command run for the agent (an
/// exec check, a job) leaves no orphans, even when the future waiting on it
/// is dropped at a timeout.
pub struct GroupGuard(pub u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

/// Runs `job` in a process group of its own to its exit or its deadline;
/// either way nothing it started survives it.
async fn run_to_completion(job: &Job) -> Result<Completion, JobError> {
    let started = Instant::now();
    let (program, args) = job
        .command
        .split_first()
        .ok_or_else(|| JobError::EmptyCommand {
            name: job.name.clone(),
        })?;
    let mut child = release_command(program, args, &job.workdir, &job.env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| JobError::Spawn {
            name: job.name.clone(),
            program: program.clone(),
            workdir: job.workdir.clone(),
            reason: spawn_failure(&e),
        })?;
    let group = GroupGuard(child.id().expect("a just-spawned child has a pid"));
    let tail = Arc::new(Mutex::new(Tail::new(job.tail_bytes)));
    let readers = [
        child
            .stdout
            .take()
            .map(|out| keep_tail(out, tail.clone(), job.output.clone())),
        child
            .stderr
            .take()
            .map(|err| keep_tail(err, tail.clone(), job.output.clone())),
    ];
    let ended = match tokio::time::timeout(job.deadline, child.wait()).await {
        Ok(status) => {
            let status = status.map_err(|e| JobError::Spawn {
                name: job.name.clone(),
                program: program.clone(),
                workdir: job.workdir.clone(),
                reason: format!("waiting for it: {e}"),
            })?;
            Ended::Exited {
                code: status.code(),
                detail: status.to_string(),
            }
        }
        Err(_) => {
            tracing::warn!(job = %job.name, deadline = %humantime::format_duration(job.deadline), "job still running at its deadline, killing it");
            Ended::DeadlineExceeded
        }
    };
    // What it left running in its group goes now (it closes the pipes too).
    drop(group);
    let _ = child.wait().await;
    for reader in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(OUTPUT_GRACE, reader).await;
    }
    let output = tail.lock().expect("tail lock").text();
    Ok(Completion {
        ended,
        output,
        took: started.elapsed(),
    })
}

/// Reads `pipe` to its end into `tail`, and into `output` as it comes.
fn keep_tail(
    mut pipe: impl AsyncRead + Unpin + Send + 'static,
    tail: Arc<Mutex<Tail>>,
    output: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        while let Ok(read @ 1..) = pipe.read(&mut chunk).await {
            tail.lock().expect("tail lock").push(&chunk[..read]);
            if let Some(output) = &output {
                let _ = output.send(String::from_utf8_lossy(&chunk[..read]).into_owned());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::test_support::processes_mentioning;

    fn job(dir: &Path, script: &str, deadline: Duration) -> Job {
        Job {
            name: "web-v1 migrate".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            workdir: dir.to_path_buf(),
            env: vec![("GREETING".into(), "hello".into())],
            deadline,
            tail_bytes: 64,
            output: None,
        }
    }

    async fn run(job: &Job) -> Completion {
        ProcessRuntime.run_to_completion(job).await.unwrap()
    }

    /// A command that cannot start says why and what to change: missing,
    /// not executable, not a program for this machine.
    #[tokio::test]
    async fn a_command_that_cannot_start_names_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let not_executable = dir.path().join("app.sh");
        std::fs::write(&not_executable, "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
        let garbage = dir.path().join("app.bin");
        std::fs::write(&garbage, [0x7f, b'E', b'L', b'F', 0, 1, 2, 3]).unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cases = [
            ("./no-such-app", "check `command` in the spec"),
            (
                "./app.sh",
                "make it executable (chmod +x) before packing the release",
            ),
            ("./app.bin", "build it for the node's architecture"),
        ];
        for (program, fix) in cases {
            let mut job = job(dir.path(), "", Duration::from_secs(5));
            job.command = vec![program.into()];
            let error = ProcessRuntime.run_to_completion(&job).await.unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(program) && message.contains(fix),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn a_job_that_exits_0_succeeded_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let done = run(&job(
            dir.path(),
            "echo \"$GREETING\"; echo warning >&2; touch ran",
            Duration::from_secs(10),
        ))
        .await;
        assert!(done.succeeded(), "{done:?}");
        assert!(
            done.output.contains("hello") && done.output.contains("warning"),
            "{done:?}"
        );
        assert!(dir.path().join("ran").exists(), "it ran in its workdir");
    }

    #[tokio::test]
    async fn a_failing_job_reports_its_status_and_the_tail_of_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let script = "i=0; while [ $i -lt 500 ]; do echo line $i; i=$((i+1)); done; echo migration failed >&2; exit 3";
        let done = run(&job(dir.path(), script, Duration::from_secs(10))).await;
        assert!(!done.succeeded());
        assert!(
            matches!(&done.ended, Ended::Exited { code: Some(3), detail } if detail.contains('3')),
            "{done:?}"
        );
        assert!(done.output.len() <= 64, "the tail is bounded: {done:?}");
        assert!(done.output.ends_with("migration failed\n"), "{done:?}");
    }

    #[tokio::test]
    async fn a_job_past_its_deadline_is_killed_with_its_process_group() {
        let dir = tempfile::tempdir().unwrap();
        // A background grandchild too: it must not outlive the job.
        let script = "sleep 987651 & echo started; sleep 987652";
        let done = run(&job(dir.path(), script, Duration::from_millis(300))).await;
        // The Ended variant is the proof the deadline cut it short (the
        // sleeps would run for eleven days); no bound on `took` needed.
        assert_eq!(done.ended, Ended::DeadlineExceeded, "{done:?}");
        assert!(!done.succeeded());
        assert_eq!(done.output, "started\n");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !processes_mentioning("98765").is_empty() {
            assert!(
                Instant::now() < deadline,
                "left running: {:?}",
                processes_mentioning("98765")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_job_without_a_command_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut empty = job(dir.path(), "", Duration::from_secs(1));
        empty.command.clear();
        let error = ProcessRuntime.run_to_completion(&empty).await.unwrap_err();
        assert!(error.to_string().contains("empty command"), "{error}");
    }
}
