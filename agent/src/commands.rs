//! Runs commands from the coordinator, exactly once per command id.

use cutover_proto::v1::{command, command_result, Command, CommandResult, CommandStatus, Pong};

use crate::state::Journal;

/// What this agent can do; the coordinator sends only commands it announced.
pub const CAPABILITIES: &[&str] = &["command.ping"];

pub struct Dispatcher {
    journal: Journal,
}

impl Dispatcher {
    pub fn new(journal: Journal) -> Self {
        Self { journal }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Runs `command`, or replays the stored result when its id already ran.
    pub fn execute(&mut self, command: Command) -> CommandResult {
        if let Some(previous) = self.journal.get(&command.command_id) {
            tracing::info!(command_id = %command.command_id, "command already ran, replaying its result");
            return CommandResult {
                replayed: true,
                ..previous.clone()
            };
        }
        let command_id = command.command_id.clone();
        let result = match command.kind {
            Some(command::Kind::Ping(ping)) => CommandResult {
                command_id,
                status: CommandStatus::Succeeded as i32,
                message: String::new(),
                replayed: false,
                output: Some(command_result::Output::Pong(Pong {
                    payload: ping.payload,
                    agent_time_ms: cutover_common::now_ms(),
                })),
            },
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
        if let Err(error) = self.journal.record(result.clone()) {
            tracing::error!(%error, command_id = %result.command_id, "cannot journal command result");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proto::v1::Ping;

    fn ping(id: &str) -> Command {
        Command {
            command_id: id.into(),
            kind: Some(command::Kind::Ping(Ping {
                payload: "p".into(),
            })),
        }
    }

    #[test]
    fn a_repeated_id_is_replayed_not_rerun_even_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut dispatcher = Dispatcher::new(Journal::open(dir.path()).unwrap());
        let first = dispatcher.execute(ping("c1"));
        assert_eq!(first.status, CommandStatus::Succeeded as i32);
        assert!(!first.replayed);

        let mut restarted = Dispatcher::new(Journal::open(dir.path()).unwrap());
        let again = restarted.execute(ping("c1"));
        assert!(again.replayed);
        assert_eq!(
            again.output, first.output,
            "the stored result, not a new run"
        );

        let unknown = restarted.execute(Command {
            command_id: "c2".into(),
            kind: None,
        });
        assert_eq!(unknown.status, CommandStatus::Rejected as i32);
        assert!(restarted.journal().get("c2").is_none());
    }
}
