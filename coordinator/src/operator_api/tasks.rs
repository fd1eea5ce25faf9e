//! `RunTask` (`cutover run`): a command run once on one node with a
//! release of a service, its output streamed back as it comes.

use std::time::Duration;

use cutover_common::rules;
use cutover_proto::v1 as pb;
use serde_json::json;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::spec::selects;
use crate::store::{NodeStatus, ReleaseRecord};

pub(super) type TaskStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RunTaskEvent, Status>> + Send>>;

/// A task without a timeout of its own.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long past its timeout the answer may take (preparing the release,
/// the agent stopping it) before the node counts as lost.
const ANSWER_MARGIN: Duration = Duration::from_secs(300);
/// Output forwarded to the caller at most; the rest is left out (the end
/// of it comes with the result).
const MAX_FORWARDED: usize = 64 * 1024 * 1024;

fn event(kind: pb::run_task_event::Kind) -> Result<pb::RunTaskEvent, Status> {
    Ok(pb::RunTaskEvent { kind: Some(kind) })
}

impl OperatorApi {
    /// Checked and audited by hand, not through `audited`: the answer is a
    /// stream, and what is audited is that the task was sent (with its
    /// command), never its output.
    pub(super) async fn handle_run_task(
        &self,
        request: Request<pb::RunTaskRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        let r = request.get_ref();
        let args = json!({
            "env": r.env, "service": r.service, "node": r.node,
            "release": r.release_id, "command": r.command,
        });
        let env = r.env.clone();
        let caller = self
            .access
            .check(&request, Need::Deploy(&env), "run_task", &args)
            .await?;
        let started = self.start_task(request.into_inner(), &caller.who()).await;
        let outcome = started.as_ref().map(|_| ()).map_err(Clone::clone);
        self.access
            .audit(&caller, "run_task", &args, &outcome)
            .await;
        started.map(Response::new)
    }

    async fn start_task(&self, r: pb::RunTaskRequest, by: &str) -> Result<TaskStream, Status> {
        for (what, name) in [("environment", &r.env), ("service", &r.service)] {
            rules::name(name)
                .map_err(|e| Status::invalid_argument(format!("{what} {name:?}: {}", e.message)))?;
        }
        if r.command.is_empty() || r.command[0].is_empty() {
            return Err(Status::invalid_argument(
                "no command to run; give it after `--`, e.g. `cutover run web --env prod -- php artisan migrate:status`",
            ));
        }
        let record = self.task_release(&r).await?;
        let node = self.task_node(&r, &record)?;
        let release = record.release.0;
        let secret_values = self.secrets.values_for(&r.env, &release.secrets).await?;
        let timeout = match r.timeout_ms {
            0 => DEFAULT_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let task_id = format!("task.{}", uuid::Uuid::new_v4());
        let command = pb::Command {
            command_id: task_id.clone(),
            kind: Some(pb::command::Kind::RunTask(pb::RunTask {
                release: Some(release.clone()),
                command: r.command.clone(),
                timeout_ms: timeout.as_millis() as u64,
                secret_values,
                env: [
                    ("CUTOVER_ENV".to_string(), r.env.clone()),
                    ("CUTOVER_RELEASE".to_string(), release.release_id.clone()),
                    ("CUTOVER_VERSION".to_string(), release.version.clone()),
                    ("CUTOVER_OPERATOR".to_string(), by.to_string()),
                ]
                .into(),
            })),
        };
        tracing::info!(task = %task_id, node = %node, release = %release.release_id, %by, "running a task");
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(event(pb::run_task_event::Kind::Started(pb::TaskStarted {
            node: node.clone(),
            release_id: release.release_id.clone(),
            task_id,
        })));
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let pending = match registry.send_command(&node, command) {
                Ok(pending) => pending,
                Err(error) => {
                    let _ = tx.send(Err(Status::unavailable(format!(
                        "node {node} cannot take the task: {error}"
                    ))));
                    return;
                }
            };
            let mut forwarded = 0;
            let waited = pending
                .wait(timeout + ANSWER_MARGIN, |progress| {
                    if progress.step != "output" || forwarded >= MAX_FORWARDED {
                        return;
                    }
                    forwarded += progress.message.len();
                    let _ = tx.send(event(pb::run_task_event::Kind::Output(progress.message)));
                })
                .await;
            let _ = tx.send(task_ended(&node, waited));
        });
        Ok(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ))
    }

    /// The release the task runs with: the one named, or the environment's
    /// current one.
    async fn task_release(&self, r: &pb::RunTaskRequest) -> Result<ReleaseRecord, Status> {
        let history = self.rollouts.release_history(&r.env, &r.service).await?;
        let found = match r.release_id.as_str() {
            "" => history.into_iter().find(|h| h.current),
            id => history.into_iter().find(|h| h.release.id() == id),
        };
        found.ok_or_else(|| {
            Status::not_found(match r.release_id.as_str() {
                "" => format!(
                    "{} has no current release in {}; deploy it first, or name a kept release with --release (`cutover releases {} --env {}`)",
                    r.service, r.env, r.service, r.env
                ),
                id => format!(
                    "{} in {} has no kept release {id:?}; `cutover releases {} --env {}` lists them",
                    r.service, r.env, r.service, r.env
                ),
            })
        })
    }

    /// The node the task runs on: the one named, if it is in the service's
    /// environment and ready; else a ready one, preferring a node that
    /// serves the release already (it has the files).
    fn task_node(&self, r: &pb::RunTaskRequest, record: &ReleaseRecord) -> Result<String, Status> {
        let candidates: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|v| selects(&record.selector, &v.record.labels))
            .collect();
        let ready =
            |v: &&crate::registry::NodeView| v.connected && v.record.status == NodeStatus::Ready;
        if !r.node.is_empty() {
            let named = candidates
                .iter()
                .find(|v| v.record.name == r.node)
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "node {} does not run {} in {}; `cutover nodes` shows each node's labels",
                        r.node, r.service, r.env
                    ))
                })?;
            if !ready(&named) {
                return Err(Status::failed_precondition(format!(
                    "node {} is not connected and ready; pick another with --node, or leave it out",
                    r.node
                )));
            }
            return Ok(named.record.name.clone());
        }
        let serving = |v: &&crate::registry::NodeView| {
            v.record
                .services
                .iter()
                .any(|s| s.service == r.service && s.release_id == record.release.id())
        };
        candidates
            .iter()
            .filter(ready)
            .find(serving)
            .or_else(|| candidates.iter().find(ready))
            .map(|v| v.record.name.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no node of {} in {} is connected and ready; `cutover nodes` shows them",
                    r.service, r.env
                ))
            })
    }
}

/// The last event of a task: how it ended, or why that is not known.
fn task_ended(
    node: &str,
    waited: Result<pb::CommandResult, crate::registry::CommandWaitError>,
) -> Result<pb::RunTaskEvent, Status> {
    let result = match waited {
        Ok(result) => result,
        Err(error) => {
            return event(pb::run_task_event::Kind::Ended(pb::TaskEnded {
                exit_code: -1,
                unknown: true,
                detail: format!(
                    "lost node {node}: {error}; whether the task finished is not known"
                ),
                ..Default::default()
            }))
        }
    };
    match (pb::CommandStatus::try_from(result.status), result.output) {
        (Ok(pb::CommandStatus::Succeeded), Some(pb::command_result::Output::Task(task))) => {
            event(pb::run_task_event::Kind::Ended(pb::TaskEnded {
                exit_code: task.exit_code,
                timed_out: task.timed_out,
                detail: task.detail,
                duration_ms: task.duration_ms,
                unknown: false,
            }))
        }
        (Ok(pb::CommandStatus::Unknown), _) => {
            event(pb::run_task_event::Kind::Ended(pb::TaskEnded {
                exit_code: -1,
                unknown: true,
                detail: result.message,
                ..Default::default()
            }))
        }
        (Ok(pb::CommandStatus::Rejected), _) => Err(Status::failed_precondition(format!(
            "node {node} cannot run tasks: {}",
            result.message
        ))),
        _ => Err(Status::failed_precondition(format!(
            "node {node} could not run the task: {}",
            result.message
        ))),
    }
}
