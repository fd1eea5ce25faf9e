//! Runs commands from the coordinator, exactly once per command id.
//!
//! Each command runs in its own task so a long cutover never stalls the
//! session (heartbeats keep flowing). Its progress and result go to whatever
//! session is open when they are ready; the result is journaled first, so a
//! coordinator that missed it (reconnect) gets it again by resending the id.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_common::release::ReleaseSpec;
use cutover_proto::v1::{
    self as pb, agent_message, command, command_result, AgentMessage, Command, CommandProgress,
    CommandResult, CommandStatus, NodeState, Pong,
};
use tokio::sync::mpsc;

use crate::fleet_upgrade::{binary_output, Upgrades};
use crate::renewal::Renewer;
use crate::service::{split_from_proto, KeepPrevious};
use crate::services::{NodeServices, ServiceError};
use crate::state::Journal;
use crate::tasks::Task;

/// What this agent can do; the coordinator sends only commands it announced.
pub const CAPABILITIES: &[&str] = &[
    "command.ping",
    "command.prepare",
    "command.activate",
    "command.set_admission",
    "command.stop_service",
    "command.report_state",
    "command.renew_certificate",
    "command.run_task",
    "command.run_plain_task",
    "command.read_logs",
    "command.run_recovery",
    "command.stage_release",
    "command.set_traffic",
    "command.upgrade_agent",
    "command.set_levers",
    "runtime.process",
    "proxy.http",
    // Runs `Release.instances` processes of a release.
    "release.instances",
];

/// The sender of the session open right now, if any.
pub type Outbox = Arc<Mutex<Option<mpsc::Sender<AgentMessage>>>>;

pub struct Executor {
    journal: Mutex<Journal>,
    running: Mutex<HashSet<String>>,
    services: Arc<NodeServices>,
    outbox: Outbox,
    renewer: Arc<Renewer>,
    upgrades: Arc<Upgrades>,
}

impl Executor {
    pub fn new(
        journal: Journal,
        services: Arc<NodeServices>,
        outbox: Outbox,
        renewer: Arc<Renewer>,
        upgrades: Arc<Upgrades>,
    ) -> Self {
        Self {
            journal: Mutex::new(journal),
            running: Mutex::new(HashSet::new()),
            services,
            outbox,
            renewer,
            upgrades,
        }
    }

    /// The commands running now.
    pub fn in_flight(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .running
            .lock()
            .expect("running lock")
            .iter()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    pub fn recent_ids(&self, limit: usize) -> Vec<String> {
        self.journal.lock().expect("journal lock").recent_ids(limit)
    }

    pub fn services(&self) -> &Arc<NodeServices> {
        &self.services
    }

    /// Takes a command off the stream: ignores a repeat of a command still
    /// running (its result will come), replays a journaled result, or
    /// starts it. Running is asked first: a task is journaled as started
    /// (UNKNOWN) while it runs.
    pub fn submit(self: &Arc<Self>, command: Command) {
        if self
            .running
            .lock()
            .expect("running lock")
            .contains(&command.command_id)
        {
            tracing::info!(command_id = %command.command_id, "command already running");
            return;
        }
        let previous = self
            .journal
            .lock()
            .expect("journal lock")
            .get(&command.command_id)
            .cloned();
        if let Some(previous) = previous {
            tracing::info!(command_id = %command.command_id, "command already ran, replaying its result");
            self.send(result_message(CommandResult {
                replayed: true,
                ..previous
            }));
            return;
        }
        self.running
            .lock()
            .expect("running lock")
            .insert(command.command_id.clone());
        let executor = self.clone();
        tokio::spawn(async move {
            let command_id = command.command_id.clone();
            let result = executor.execute(command).await;
            executor
                .running
                .lock()
                .expect("running lock")
                .remove(&command_id);
            executor.send(result_message(result));
        });
    }

    /// Runs one command to its result, journaling it (unless rejected, or
    /// a read of logs).
    pub async fn execute(&self, command: Command) -> CommandResult {
        let command_id = command.command_id.clone();
        let progress = |step: &str| {
            tracing::info!(command_id = %command_id, step, "command progress");
            self.send(AgentMessage {
                kind: Some(agent_message::Kind::CommandProgress(CommandProgress {
                    command_id: command_id.clone(),
                    step: step.to_string(),
                    message: String::new(),
                })),
            });
        };
        let outcome: Result<Option<command_result::Output>, String> = match command.kind {
            Some(command::Kind::Ping(ping)) => Ok(Some(command_result::Output::Pong(Pong {
                payload: ping.payload,
                agent_time_ms: cutover_common::now_ms(),
            }))),
            Some(command::Kind::Prepare(prepare)) => {
                match checked(prepare.release.as_ref(), "prepare") {
                    Ok(release) => self
                        .services
                        .prepare(&release, &progress)
                        .await
                        .map(|_| None)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                }
            }
            Some(command::Kind::Activate(activate)) => {
                match checked(activate.release.as_ref(), "activate") {
                    Ok(release) => self
                        .services
                        .activate(
                            &release,
                            activate.drain_first,
                            &activate.secret_values,
                            &activate.hook_env,
                            KeepPrevious::from_wire(
                                activate.keep_previous_ms,
                                activate.keep_previous_warm,
                            ),
                            &progress,
                        )
                        .await
                        .map(|a| Some(command_result::Output::Activated(a)))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                }
            }
            Some(command::Kind::StageRelease(stage)) => {
                match checked(stage.release.as_ref(), "stage_release").and_then(|release| {
                    let split =
                        split_from_proto(stage.split.as_ref()).map_err(|e| e.to_string())?;
                    Ok((release, split))
                }) {
                    Ok((release, split)) => self
                        .services
                        .stage(
                            &release,
                            &stage.secret_values,
                            &stage.hook_env,
                            split,
                            &progress,
                        )
                        .await
                        .map(|()| None)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                }
            }
            Some(command::Kind::SetTraffic(set)) => match split_from_proto(set.split.as_ref()) {
                Ok(split) => self
                    .services
                    .set_traffic(&set.service, &set.side_release_id, split)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Some(command::Kind::SetAdmission(admission)) => self
                .services
                .set_admission(&admission.service, admission.admitted)
                .await
                .map(|_| None)
                .map_err(|e| e.to_string()),
            Some(command::Kind::SetLevers(set)) => self
                .services
                .set_levers(&set.service, set.levers.as_ref().into(), set.generation)
                .await
                .map(|()| None)
                .map_err(|e| e.to_string()),
            Some(command::Kind::StopService(stop)) => self
                .services
                .stop_service(&stop.service, stop.remove)
                .await
                .map(|_| None)
                .map_err(|e| e.to_string()),
            Some(command::Kind::RenewCertificate(_)) => match self.services.coordinator() {
                Some(channel) => self
                    .renewer
                    .renew_now(channel)
                    .await
                    .map(|r| Some(command_result::Output::Renewed(r)))
                    .map_err(|e| e.to_string()),
                None => Err("no connection to the coordinator to renew over".into()),
            },
            // Without a release: a plain command on the node (a job).
            Some(command::Kind::RunTask(run)) => match run.release.as_ref() {
                None => self.run_task(&command_id, None, &run, &progress).await,
                Some(release) => match checked(Some(release), "run_task") {
                    Ok(release) => {
                        self.run_task(&command_id, Some(&release), &run, &progress)
                            .await
                    }
                    Err(e) => Err(e),
                },
            },
            Some(command::Kind::ReadLogs(read)) => return self.read_logs(command_id, read).await,
            Some(command::Kind::RunRecovery(run)) => self.run_recovery(&command_id, &run).await,
            Some(command::Kind::PrepareAgent(prepare)) => match prepare.artifact.as_ref() {
                Some(artifact) => self
                    .upgrades
                    .prepare(&self.services, artifact, &progress)
                    .await
                    .map(|installed| Some(binary_output(&installed))),
                None => Err("prepare_agent names no artifact".into()),
            },
            Some(command::Kind::UpgradeAgent(upgrade)) => {
                // The handoff it asks for waits for the commands in flight:
                // not for this one, which waits for the handoff.
                self.running
                    .lock()
                    .expect("running lock")
                    .remove(&command_id);
                self.upgrades
                    .upgrade(&upgrade.digest, Duration::from_millis(upgrade.probation_ms))
                    .await
                    .map(|_| None)
            }
            Some(command::Kind::CommitAgent(commit)) => self
                .upgrades
                .commit(&commit.digest)
                .map(|installed| Some(binary_output(&installed))),
            Some(command::Kind::ReportState(_)) => {
                Ok(Some(command_result::Output::NodeState(NodeState {
                    services: self.services.state(),
                })))
            }
            // Not journaled: after an upgrade the same id may be retried.
            None => {
                return CommandResult {
                    command_id,
                    status: CommandStatus::Rejected as i32,
                    message: format!(
                        "agent {} does not know this command; upgrade the agent",
                        cutover_common::VERSION
                    ),
                    replayed: false,
                    output: None,
                }
            }
        };
        let result = match outcome {
            Ok(output) => CommandResult {
                command_id,
                status: CommandStatus::Succeeded as i32,
                message: String::new(),
                replayed: false,
                output,
            },
            Err(message) => {
                tracing::warn!(command_id = %command_id, %message, "command failed");
                CommandResult {
                    command_id,
                    status: CommandStatus::Failed as i32,
                    message,
                    replayed: false,
                    output: None,
                }
            }
        };
        if let Err(error) = self.journal_result(result.clone()) {
            tracing::error!(%error, command_id = %result.command_id, "cannot journal command result");
        }
        result
    }

    /// Runs a task once: journaled as started before it starts, so an
    /// agent that stops while it runs answers the id with UNKNOWN after
    /// its restart instead of running it a second time.
    async fn run_task(
        &self,
        command_id: &str,
        release: Option<&ReleaseSpec>,
        run: &pb::RunTask,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<command_result::Output>, String> {
        self.journal_started(
            command_id,
            "the agent stopped while the task ran; whether it finished is not known",
        )?;
        let (output, chunks) = mpsc::unbounded_channel();
        let run_it = async {
            let ran = self
                .services
                .run_task(Task::new(release, run), output, progress)
                .await;
            ran.map(|task| Some(command_result::Output::Task(task)))
                .map_err(|e| e.to_string())
        };
        // The output is forwarded until the task's sender is dropped.
        let (ran, ()) = tokio::join!(run_it, self.forward_output(command_id, chunks));
        ran
    }

    /// Runs a backup or a restore drill once, journaled as started before
    /// it starts (as a task is). Its output is forwarded as it comes.
    async fn run_recovery(
        &self,
        command_id: &str,
        run: &pb::RunRecovery,
    ) -> Result<Option<command_result::Output>, String> {
        let request = crate::recovery::Request::try_from(run).map_err(|e| e.to_string())?;
        self.journal_started(
            command_id,
            "the agent stopped while the backup or drill ran; whether it finished is not known",
        )?;
        let (output, chunks) = mpsc::unbounded_channel();
        let run_it = crate::recovery::run(&request, output);
        let (result, ()) = tokio::join!(run_it, self.forward_output(command_id, chunks));
        Ok(Some(command_result::Output::Recovery(result)))
    }

    /// Journals `command_id` as UNKNOWN before it starts: an agent that
    /// stops while it runs answers with that after its restart instead of
    /// running it a second time.
    fn journal_started(&self, command_id: &str, message: &str) -> Result<(), String> {
        self.journal_result(CommandResult {
            command_id: command_id.to_string(),
            status: CommandStatus::Unknown as i32,
            message: message.into(),
            replayed: false,
            output: None,
        })
        .map_err(|e| format!("cannot journal the command before it starts: {e}"))
    }

    /// Sends what a command prints as progress ("output") until its sender
    /// is dropped.
    async fn forward_output(&self, command_id: &str, mut chunks: mpsc::UnboundedReceiver<String>) {
        while let Some(chunk) = chunks.recv().await {
            self.send(AgentMessage {
                kind: Some(agent_message::Kind::CommandProgress(CommandProgress {
                    command_id: command_id.to_string(),
                    step: "output".into(),
                    message: chunk,
                })),
            });
        }
    }

    /// Reads release logs. Not journaled: it changes nothing, a repeated
    /// id reads again, and an answer can be large.
    async fn read_logs(&self, command_id: String, read: pb::ReadLogs) -> CommandResult {
        let logs = self.services.release_logs();
        let now_ms = cutover_common::now_ms();
        let outcome =
            tokio::task::spawn_blocking(move || crate::release_logs::read(&logs, &read, now_ms))
                .await;
        let (status, message, output) = match outcome {
            Ok(Ok(chunk)) => (
                CommandStatus::Succeeded,
                String::new(),
                Some(command_result::Output::Logs(chunk)),
            ),
            Ok(Err(error)) => (CommandStatus::Failed, error.to_string(), None),
            Err(error) => (
                CommandStatus::Failed,
                format!("reading the logs failed: {error}"),
                None,
            ),
        };
        if status == CommandStatus::Failed {
            tracing::warn!(command_id = %command_id, %message, "cannot read release logs");
        }
        CommandResult {
            command_id,
            status: status as i32,
            message,
            replayed: false,
            output,
        }
    }

    fn journal_result(&self, result: CommandResult) -> Result<(), crate::state::StateError> {
        cutover_common::blocking(|| self.journal.lock().expect("journal lock").record(result))
    }

    /// Hands a message to the open session; without one it is dropped (a
    /// result stays in the journal for the coordinator to ask again).
    fn send(&self, message: AgentMessage) {
        let sender = self.outbox.lock().expect("outbox lock").clone();
        if let Some(sender) = sender {
            if sender.try_send(message).is_err() {
                tracing::warn!("session queue full or closed, message dropped");
            }
        }
    }
}

/// Every release off the wire is checked here, once: the services act on
/// the checked value only.
fn checked(release: Option<&pb::Release>, command: &str) -> Result<ReleaseSpec, String> {
    let release = release.ok_or_else(|| format!("{command} without a release"))?;
    ReleaseSpec::try_from(release).map_err(|e| ServiceError::from(e).to_string())
}

fn result_message(result: CommandResult) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::CommandResult(result)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proto::v1::Ping;

    async fn executor(dir: &std::path::Path) -> Executor {
        let services = crate::test_support::node_services(dir).await;
        // Never called here: no test command renews.
        let renewer = Renewer::new(
            cutover_common::tls::TlsFiles::in_dir(dir, "agent"),
            cutover_common::identity::Identity::new(cutover_common::identity::Role::Agent, "test")
                .unwrap(),
        );
        Executor::new(
            Journal::open(dir).unwrap(),
            Arc::new(services),
            Arc::new(Mutex::new(None)),
            Arc::new(renewer),
            crate::fleet_upgrade::Upgrades::new(
                dir.join("state"),
                None,
                &crate::binaries::Start::Plain {
                    build: String::new(),
                },
            ),
        )
    }

    fn ping(id: &str) -> Command {
        Command {
            command_id: id.into(),
            kind: Some(command::Kind::Ping(Ping {
                payload: "p".into(),
            })),
        }
    }

    #[tokio::test]
    async fn a_repeated_id_is_replayed_not_rerun_even_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = executor(dir.path()).await.execute(ping("c1")).await;
        assert_eq!(first.status, CommandStatus::Succeeded as i32);
        assert!(!first.replayed);

        // A restarted agent (same state dir) answers from the journal: the
        // submitted repeat is answered on the session, not run again.
        let restarted = Arc::new(executor(dir.path()).await);
        let (tx, mut rx) = mpsc::channel(4);
        *restarted.outbox.lock().unwrap() = Some(tx);
        restarted.submit(ping("c1"));
        let Some(agent_message::Kind::CommandResult(again)) = rx.recv().await.unwrap().kind else {
            panic!("expected a result");
        };
        assert!(again.replayed);
        assert_eq!(
            again.output, first.output,
            "the stored result, not a new run"
        );

        let unknown = restarted
            .execute(Command {
                command_id: "c2".into(),
                kind: None,
            })
            .await;
        assert_eq!(unknown.status, CommandStatus::Rejected as i32);
        assert!(restarted.journal.lock().unwrap().get("c2").is_none());
    }

    #[tokio::test]
    async fn side_release_commands_are_known_and_refused_with_their_cause() {
        assert!(CAPABILITIES.contains(&"command.stage_release"));
        assert!(CAPABILITIES.contains(&"command.set_traffic"));
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path()).await;
        let set = |id: &str, weight| Command {
            command_id: id.into(),
            kind: Some(command::Kind::SetTraffic(pb::SetTraffic {
                service: "web".into(),
                side_release_id: "web-v2".into(),
                split: Some(pb::TrafficSplit {
                    weight,
                    ..Default::default()
                }),
            })),
        };
        let invalid = executor.execute(set("t1", 101)).await;
        assert_eq!(invalid.status, CommandStatus::Failed as i32);
        assert!(
            invalid.message.contains("weight 101"),
            "{}",
            invalid.message
        );
        let unknown = executor.execute(set("t2", 10)).await;
        assert_eq!(unknown.status, CommandStatus::Failed as i32);
        assert!(
            unknown.message.starts_with("no service web on this node: "),
            "{}",
            unknown.message
        );
        assert!(
            executor.journal.lock().unwrap().get("t2").is_some(),
            "journaled by id"
        );
        let stage = executor
            .execute(Command {
                command_id: "s1".into(),
                kind: Some(command::Kind::StageRelease(pb::StageRelease::default())),
            })
            .await;
        assert_eq!(stage.status, CommandStatus::Failed as i32);
        assert_eq!(stage.message, "stage_release without a release");
    }

    #[tokio::test]
    async fn a_read_of_logs_answers_with_lines_and_leaves_the_journal_alone() {
        let dir = tempfile::tempdir().unwrap();
        let executor = executor(dir.path()).await;
        let log = executor
            .services
            .release_logs()
            .join("web/web-v1")
            .join(crate::runtime::logs::STDOUT);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "started\n").unwrap();
        let read = |id: &str| Command {
            command_id: id.into(),
            kind: Some(command::Kind::ReadLogs(pb::ReadLogs {
                service: "web".into(),
                ..Default::default()
            })),
        };
        let result = executor.execute(read("l1")).await;
        assert_eq!(result.status, CommandStatus::Succeeded as i32);
        let Some(command_result::Output::Logs(chunk)) = result.output else {
            panic!("expected logs: {result:?}");
        };
        assert_eq!(chunk.lines[0].text, "started");
        assert_eq!(chunk.lines[0].release_id, "web-v1");
        assert!(executor.journal.lock().unwrap().get("l1").is_none());
        // The same id reads again.
        std::fs::write(&log, "started\nagain\n").unwrap();
        let again = executor.execute(read("l1")).await;
        let Some(command_result::Output::Logs(chunk)) = again.output else {
            panic!("expected logs: {again:?}");
        };
        assert_eq!(chunk.lines.len(), 2);
    }
}
