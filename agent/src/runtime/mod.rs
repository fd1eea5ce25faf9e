//! Runtimes that run releases: a process group (`process`) or a container
//! of a pinned image (`container`, through the engine in `docker`), behind
//! one trait. A runtime runs a release supervised (`supervisor`: started,
//! restarted, adopted, stopped) or a command to completion (`job`: to its
//! exit or deadline, for migrations, hooks and scheduled jobs).

pub mod container;
pub mod docker;
pub mod job;
pub mod log_index;
pub mod logs;
pub mod memory;
pub mod ownership;
pub mod process;
pub mod supervisor;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use nix::sys::signal::Signal;

use self::docker::short;
use self::job::{Completion, Job, JobError};
use self::process::ProcessId;
use self::supervisor::{ProcessError, ProcessSpec};

/// The futures of the runtime traits, boxed so a supervisor can hold any
/// runtime's instance.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What runs releases.
pub trait Runtime: Send + Sync {
    /// Starts one run of a release, for a supervisor to drive; `env` is its
    /// whole environment (secrets included).
    fn start<'a>(
        &'a self,
        spec: &'a ProcessSpec,
        env: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, ProcessError>>;

    /// Runs `job` to its exit, or kills it (and all it started) at its
    /// deadline.
    fn run_to_completion<'a>(&'a self, job: &'a Job)
        -> BoxFuture<'a, Result<Completion, JobError>>;
}

/// One run of a release (a process group, or a container) as a supervisor
/// drives it.
pub trait Instance: Send {
    /// What the store records to find it again after an agent restart.
    fn id(&self) -> InstanceId;

    /// Sends `signal` to all of it: the whole group, or the container.
    fn signal(&self, signal: Signal) -> BoxFuture<'_, ()>;

    /// Leaves nothing of this run behind: SIGKILL to the group (the leader
    /// may be gone while its children are not), or the container removed.
    fn clear(&mut self) -> BoxFuture<'_, ()>;

    /// Waits for it to end and says how it ended.
    fn exited(&mut self) -> BoxFuture<'_, String>;

    /// Runs the release's stop command beside it (a worker's "finish your
    /// jobs"), with the release's environment, up to `spec.stop_timeout`.
    fn run_stop_command<'a>(&'a self, spec: &'a ProcessSpec) -> BoxFuture<'a, ()>;
}

/// A command as a release runs it: in `workdir`, in a process group of its
/// own (so everything it starts can be signalled together), with only
/// `PATH` and `env`, never the agent's own environment, and no stdin.
/// Exec checks run this way too, so they see what the release sees.
pub fn release_command(
    program: &str,
    args: &[String],
    workdir: &Path,
    env: &[(String, String)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(workdir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .process_group(0);
    command
}

/// A running release as the agent records it: a process group, or a
/// container. Untagged, so records written before containers existed (a bare
/// process id) still read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum InstanceId {
    Process(ProcessId),
    Container { container: String },
}

impl InstanceId {
    pub fn process(&self) -> Option<ProcessId> {
        match self {
            InstanceId::Process(p) => Some(*p),
            InstanceId::Container { .. } => None,
        }
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstanceId::Process(p) => write!(f, "pid {}", p.pid),
            InstanceId::Container { container } => write!(f, "container {}", short(container)),
        }
    }
}
