//! Tasks: a command run once to its exit with a release's files,
//! environment and secrets, beside whatever the node serves (`cutover run`,
//! a rollout's migration and hooks, scheduled jobs of a service). The
//! release is prepared first if the node lacks it; nothing it serves
//! changes. A task without a release (a plain job, e.g. a backup) runs in
//! the agent's jobs dir with only PATH, HOST and the variables it brings.

use std::collections::HashMap;
use std::time::Duration;

use cutover_common::release::ReleaseSpec;
use cutover_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::runtime::job::{Ended, Job, JobError};
use crate::runtime::process::ProcessRuntime;
use crate::runtime::Runtime as _;
use crate::services::{secret_env, NodeServices, ServiceError};

/// What a task keeps of its output for its result: the end, where a
/// failure explains itself.
const TAIL_BYTES: usize = 16 * 1024;
/// A task without a timeout of its own.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A task as the command carries it, its release checked.
pub struct Task<'a> {
    pub release: Option<&'a ReleaseSpec>,
    pub command: &'a [String],
    pub timeout: Duration,
    pub secret_values: &'a HashMap<String, String>,
    pub env: &'a HashMap<String, String>,
}

impl<'a> Task<'a> {
    pub fn new(release: Option<&'a ReleaseSpec>, run: &'a pb::RunTask) -> Self {
        Self {
            release,
            command: &run.command,
            timeout: match run.timeout_ms {
                0 => DEFAULT_TIMEOUT,
                ms => Duration::from_millis(ms),
            },
            secret_values: &run.secret_values,
            env: &run.env,
        }
    }
}

impl NodeServices {
    /// Runs `task` to its exit or its timeout; its output goes to `output`
    /// as it comes.
    pub async fn run_task(
        &self,
        task: Task<'_>,
        output: mpsc::UnboundedSender<String>,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<pb::TaskResult, ServiceError> {
        let (name, workdir, mut env) = match task.release {
            Some(release) => {
                let name = format!("{} task", release.release_id);
                let ready = self.make_ready(release, progress).await?;
                if ready.container.is_some() {
                    return Err(JobError::Unsupported {
                        name,
                        runtime: "docker",
                    }
                    .into());
                }
                let mut env = ready.env.clone();
                env.extend(secret_env(&ready.secrets, task.secret_values)?);
                (name, ready.workdir.clone(), env)
            }
            None => ("plain task".to_string(), self.jobs_dir()?, Vec::new()),
        };
        env.push(("HOST".into(), self.address().to_string()));
        env.extend(task.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        progress("running");
        let job = Job {
            name,
            command: task.command.to_vec(),
            workdir,
            env,
            deadline: task.timeout,
            tail_bytes: TAIL_BYTES,
            output: Some(output),
        };
        let completion = ProcessRuntime.run_to_completion(&job).await?;
        let (exit_code, timed_out, detail) = match completion.ended {
            Ended::Exited { code, detail } => (code.unwrap_or(-1), false, detail),
            Ended::DeadlineExceeded => (
                -1,
                true,
                format!(
                    "still running after {}; killed",
                    humantime::format_duration(task.timeout)
                ),
            ),
        };
        Ok(pb::TaskResult {
            exit_code,
            timed_out,
            detail,
            output_tail: completion.output,
            duration_ms: completion.took.as_millis() as u64,
        })
    }
}
