//! Sees one run to its end: sends its command to its node (again after a
//! reconnect or a coordinator restart: the agent runs an id once and
//! answers it again), waits for the answer, and stores how it ended. A
//! node that stays away past its heartbeat TTL, an agent that restarted
//! mid-run (it answers UNKNOWN) or no answer within the run's timeout and
//! a margin: the run is `lost`, and nothing runs it again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1 as pb;

use super::{Jobs, Running};
use crate::registry::CommandWaitError;
use crate::store::{JobDef, JobRun, NodeStatus, RunState};

/// How long past its timeout a run's answer may take before it counts as
/// lost: preparing a service's release (as `cutover run` allows, 5
/// minutes) and a drill's clean-up after its timeout (2 minutes), with a
/// minute to spare.
const ANSWER_MARGIN: Duration = Duration::from_secs(8 * 60);
/// How often a run whose node is away looks for it again.
const RECONNECT_POLL: Duration = Duration::from_millis(500);
/// How soon the agent answers for a run that ended while the coordinator
/// was down (from its journal); beyond it the run is taken to still go.
const RECOVERED_ANSWER: Duration = Duration::from_secs(2);
/// Output a run record keeps: its end.
const TAIL_KEPT: usize = 4096;
/// The largest last line read as the run's facts.
const MAX_FACTS_LINE: usize = 4096;

/// How a run ended, before it is stored.
struct Ending {
    state: RunState,
    exit_code: Option<i32>,
    detail: String,
    output_tail: String,
    /// What the agent reported as facts; `None`: read the output's last
    /// line.
    facts: Option<BTreeMap<String, serde_json::Value>>,
}

impl Ending {
    fn lost(detail: String) -> Self {
        Self::failed(RunState::Lost, detail)
    }

    fn failed(state: RunState, detail: String) -> Self {
        Self {
            state,
            exit_code: None,
            detail,
            output_tail: String::new(),
            facts: None,
        }
    }
}

impl Jobs {
    /// Sees `run` to its end in a task of its own; `recovered`: a run a
    /// previous coordinator left running.
    pub(super) fn supervise(self: &Arc<Self>, run: JobRun, recovered: bool) {
        self.running.lock().expect("jobs lock").push(Running {
            env: run.env.clone(),
            job: run.job.clone(),
            id: run.id.clone(),
            app: run.app.clone(),
            kind: run.kind,
            dataset: run.dataset.clone(),
            recovered,
        });
        let jobs = self.clone();
        self.tasks.spawn(async move {
            let (env, id) = (run.env.clone(), run.id.clone());
            tokio::select! {
                // Shutdown leaves the run `running` in the store; the next
                // start asks its node again.
                _ = jobs.shutdown.cancelled() => {}
                ending = jobs.follow(&run) => jobs.end(run, ending).await,
            }
            jobs.running
                .lock()
                .expect("jobs lock")
                .retain(|r| !(r.env == env && r.id == id));
        });
    }

    /// Sends the run's command until its node answers, or the run is lost.
    async fn follow(&self, run: &JobRun) -> Ending {
        let Some(job) = &run.definition else {
            return Ending::lost("the run has no job definition to send".into());
        };
        let deadline_ms =
            run.started_ms + (job.timeout_ms + ANSWER_MARGIN.as_millis() as u64) as i64;
        let mut away_since: Option<i64> = None;
        loop {
            let now_ms = self.registry.now_ms();
            if now_ms > deadline_ms {
                return Ending::lost(format!(
                    "node {} gave no answer within the job's timeout and {}; whether it finished is not known",
                    run.node,
                    humantime::format_duration(ANSWER_MARGIN)
                ));
            }
            let command = match self.command(run, job).await {
                Ok(command) => command,
                Err(detail) => return Ending::failed(RunState::Failed, detail),
            };
            let pending = match self.registry.send_command(&run.node, command) {
                Ok(pending) => pending,
                Err(error) => {
                    let since = *away_since.get_or_insert(now_ms);
                    if self.node_gone(&run.node)
                        || now_ms - since > self.registry.ttl().as_millis() as i64
                    {
                        return Ending::lost(format!(
                            "lost node {} mid-run ({error}); whether the run finished is not known, and it is not run again",
                            run.node
                        ));
                    }
                    tokio::time::sleep(RECONNECT_POLL).await;
                    continue;
                }
            };
            away_since = None;
            let left = Duration::from_millis((deadline_ms - now_ms).max(0) as u64);
            // A run left by the previous coordinator that ended long ago
            // is answered at once from the agent's journal; no answer soon
            // means it still runs, and the ticks it holds back may be
            // skipped as for any run that goes on.
            let recovered = self.is_recovered(&run.env, &run.id);
            let wait = if recovered {
                left.min(RECOVERED_ANSWER)
            } else {
                left
            };
            match pending.wait(wait, |_| {}).await {
                Ok(result) => return ended(&run.node, result),
                // Sent again once the node is back; it runs the id once.
                Err(CommandWaitError::Disconnected) => continue,
                Err(CommandWaitError::TimedOut(_)) => {
                    if recovered {
                        self.confirm_running(&run.env, &run.id);
                    }
                    continue;
                }
            }
        }
    }

    fn is_recovered(&self, env: &str, id: &str) -> bool {
        self.running
            .lock()
            .expect("jobs lock")
            .iter()
            .any(|r| r.env == env && r.id == id && r.recovered)
    }

    /// The node has the run and it still goes: known, not a guess.
    fn confirm_running(&self, env: &str, id: &str) {
        for run in self.running.lock().expect("jobs lock").iter_mut() {
            if run.env == env && run.id == id {
                run.recovered = false;
            }
        }
    }

    /// Whether the registry has given the node up (unreachable, revoked).
    fn node_gone(&self, node: &str) -> bool {
        self.registry
            .list()
            .into_iter()
            .find(|v| v.record.name == node)
            .is_none_or(|v| v.record.status != NodeStatus::Ready)
    }

    /// The agent command of a run, built afresh for each send: secret
    /// values are never stored.
    async fn command(&self, run: &JobRun, job: &JobDef) -> Result<pb::Command, String> {
        if let Some(pgbackrest) = &job.pgbackrest {
            let drill = job.kind == crate::store::JobKind::RestoreTest;
            return Ok(pb::Command {
                command_id: run.command_id.clone(),
                kind: Some(pb::command::Kind::RunRecovery(crate::pgbackrest::command(
                    pgbackrest,
                    drill,
                    &job.verify,
                    job.timeout_ms,
                ))),
            });
        }
        let (release, secret_values) = match &run.release_id {
            Some(id) => {
                let service = job.service.as_deref().unwrap_or_default();
                let history = self
                    .store
                    .releases
                    .history(&run.env, service)
                    .await
                    .map_err(|e| e.to_string())?;
                let record = history
                    .into_iter()
                    .find(|r| r.release.id() == id)
                    .ok_or_else(|| {
                        format!("release {id} of {service} is no longer kept in {}", run.env)
                    })?;
                let release = record.release.0;
                let secrets = self
                    .secrets
                    .values_for(&run.env, &release.secrets)
                    .await
                    .map_err(|e| format!("cannot read the release's secrets: {e}"))?;
                (Some(release), secrets)
            }
            None => (None, Default::default()),
        };
        Ok(pb::Command {
            command_id: run.command_id.clone(),
            kind: Some(pb::command::Kind::RunTask(pb::RunTask {
                release,
                command: job.command.clone(),
                timeout_ms: job.timeout_ms,
                secret_values,
                env: run_env(job, run),
            })),
        })
    }

    /// Stores how a run ended, and counts it.
    async fn end(&self, mut run: JobRun, ending: Ending) {
        run.state = ending.state;
        run.exit_code = ending.exit_code;
        run.detail = ending.detail;
        run.facts = ending.facts.unwrap_or_else(|| facts(&ending.output_tail));
        run.output_tail = tail(&ending.output_tail, TAIL_KEPT);
        run.ended_ms = Some(self.registry.now_ms());
        tracing::info!(run = %run.id, job = %run.job, env = %run.env, node = %run.node, state = run.state.as_str(), detail = %run.detail, "job run ended");
        if let Err(error) = self.store.jobs.put_run(&run).await {
            // Left `running` in the store: the next start asks the node,
            // which answers the id again.
            tracing::error!(%error, run = %run.id, "cannot store how a job run ended");
            return;
        }
        self.metrics.jobs.run_ended(&run);
    }
}

/// What a run's command sees besides the job's own variables.
fn run_env(job: &JobDef, run: &JobRun) -> std::collections::HashMap<String, String> {
    let mut env: std::collections::HashMap<String, String> = job.vars.clone().into_iter().collect();
    env.insert("CUTOVER_APP".into(), run.app.clone());
    env.insert("CUTOVER_ENV".into(), run.env.clone());
    env.insert("CUTOVER_JOB".into(), run.job.clone());
    env.insert("CUTOVER_JOB_RUN".into(), run.id.clone());
    env.insert("CUTOVER_NODE".into(), run.node.clone());
    if let Some(dataset) = &run.dataset {
        env.insert("CUTOVER_DATASET".into(), dataset.clone());
    }
    env
}

/// How the agent's answer ends the run.
fn ended(node: &str, result: pb::CommandResult) -> Ending {
    match (pb::CommandStatus::try_from(result.status), result.output) {
        (Ok(pb::CommandStatus::Succeeded), Some(pb::command_result::Output::Task(task))) => {
            let state = if task.timed_out {
                RunState::TimedOut
            } else if task.exit_code == 0 {
                RunState::Succeeded
            } else {
                RunState::Failed
            };
            Ending {
                state,
                exit_code: Some(task.exit_code),
                detail: task.detail,
                output_tail: task.output_tail,
                facts: None,
            }
        }
        (Ok(pb::CommandStatus::Succeeded), Some(pb::command_result::Output::Recovery(r))) => {
            let (state, detail) = match (r.passed, r.timed_out) {
                (true, _) => (
                    RunState::Succeeded,
                    format!(
                        "passed in {}",
                        humantime::format_duration(Duration::from_millis(r.duration_ms))
                    ),
                ),
                (false, true) => (RunState::TimedOut, r.reason),
                (false, false) => (RunState::Failed, r.reason),
            };
            Ending {
                state,
                exit_code: None,
                detail,
                output_tail: r.output_tail,
                facts: Some(serde_json::from_str(&r.facts_json).unwrap_or_default()),
            }
        }
        (Ok(pb::CommandStatus::Unknown), _) => Ending::lost(format!(
            "the agent on {node} restarted mid-run: {}; it is not run again",
            result.message
        )),
        _ => Ending::failed(
            RunState::Failed,
            format!("node {node} could not run it: {}", result.message),
        ),
    }
}

/// The fields of the JSON object a job printed as its last line: what a
/// backup reports (label, size, times). Anything else is no facts.
fn facts(output: &str) -> BTreeMap<String, serde_json::Value> {
    let last = output.lines().rev().map(str::trim).find(|l| !l.is_empty());
    match last {
        Some(line) if line.starts_with('{') && line.len() <= MAX_FACTS_LINE => {
            serde_json::from_str(line).unwrap_or_default()
        }
        _ => BTreeMap::new(),
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_as_json_object_is_the_facts() {
        let out = "backing up\n{\"label\": \"20261202-170500F\", \"size_bytes\": 1234}\n\n";
        let f = facts(out);
        assert_eq!(f["label"], "20261202-170500F");
        assert_eq!(f["size_bytes"], 1234);
        assert!(facts("done\n").is_empty());
        assert!(facts("{not json\n").is_empty());
        assert!(facts("[1, 2]\n").is_empty());
        assert!(facts("{\"a\": 1}\nbye\n").is_empty());
    }

    #[test]
    fn tails_cut_at_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
