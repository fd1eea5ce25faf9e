//! The migration step: the app's checks, then its migration, each run once
//! to exit 0 on one node that has the release, one after the other. Its
//! commands are tasks (`RunTask`) under ids the rollout stores before they
//! go out, so a coordinator restarted mid-run resends the same id and the
//! agent runs it once; an agent restarted mid-run answers that how it
//! ended is not known, and the step fails saying so rather than run it
//! again.

use cutover_proto::v1 as pb;

use super::steps::step_done;
use super::{fail, note, Outcome, Send, TaskEnd};
use crate::migration::{MigrationPhase, When};
use crate::rollout::model::{NodeState, Phase, Rollout, RolloutError};

/// Past its timeout, how long a command may take to answer (preparing the
/// release first, the agent stopping it) before its outcome counts as
/// unknown.
const ANSWER_MARGIN_MS: i64 = 300_000;
/// What the step keeps of the output, and how many lines go to the
/// timeline.
const OUTPUT_TAIL: usize = 8 * 1024;
const TIMELINE_LINES: u32 = 200;
/// Lines of output a failure quotes.
const CAUSE_LINES: usize = 10;

/// Enters the step: picks the node it runs on, the first that has the
/// release (prepared before the cutover, serving it after).
pub(super) fn start(r: &mut Rollout, now: i64) {
    r.phase = Phase::Migrate;
    let after = r
        .migration
        .as_ref()
        .is_some_and(|m| m.plan.when == When::After);
    let has_release = |state: NodeState| match state {
        NodeState::Unchanged => true,
        NodeState::Switched => after,
        NodeState::Prepared => !after,
        _ => false,
    };
    let chosen = r.migration.as_ref().and_then(|m| m.plan.node.clone());
    let Some(node) = r
        .nodes
        .iter()
        .find(|n| has_release(n.state) && chosen.as_ref().is_none_or(|c| *c == n.name))
    else {
        fail(
            r,
            now,
            RolloutError {
                node: String::new(),
                step: "migrate".into(),
                message: match &chosen {
                    Some(name) => {
                        format!("node {name} does not have the release to run the migration")
                    }
                    None => "no node has the release to run the migration on".into(),
                },
            },
        );
        return;
    };
    let (id, name) = (node.id.clone(), node.name.clone());
    let migration = r
        .migration
        .as_mut()
        .expect("a migrate step has a migration");
    // The migration's own timeout is its bound, not the rollout's
    // progress deadline.
    r.deadline_ms += migration.plan.timeout_ms as i64;
    migration.node_id = id;
    migration.node_name = name.clone();
    let what = match migration.plan.commands.len() {
        1 => "the migration".to_string(),
        n => format!("{} checks, then the migration", n - 1),
    };
    let phase = migration.plan.phase.as_str();
    note(
        r,
        now,
        "migration_started",
        &name,
        format!("{what} ({phase}) on {name}"),
    );
}

/// Sends the next command, or ends the step once the last exited 0.
pub(super) fn run(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    let Some(migration) = r.migration.as_ref() else {
        return;
    };
    if migration.command_id.is_some() || r.error.is_some() {
        return;
    }
    if migration.next >= migration.plan.commands.len() {
        let done = (
            "migrated",
            format!("the migration ran on {}", migration.node_name),
        );
        step_done(r, now, Some(done));
        return;
    }
    let id = format!("{}.{}", r.command_prefix, r.next_command);
    r.next_command += 1;
    r.updated_at_ms = now;
    let migration = r.migration.as_mut().expect("checked above");
    migration.sent |= migration.next + 1 == migration.plan.commands.len();
    migration.command_id = Some(id);
    migration.deadline_ms = now + migration.plan.timeout_ms as i64 + ANSWER_MARGIN_MS;
    sends.push(send(r));
}

/// The command out, as it is (re)sent.
pub(super) fn send(r: &Rollout) -> Send {
    let migration = r.migration.as_ref().expect("a migration");
    let release = r.release.0.clone();
    let env = [
        ("CUTOVER_APP", r.app.as_str()),
        ("CUTOVER_ENV", r.env.as_str()),
        ("CUTOVER_RELEASE", release.release_id.as_str()),
        ("CUTOVER_VERSION", release.version.as_str()),
        (
            "CUTOVER_PREVIOUS_RELEASE",
            r.previous.as_ref().map_or("", |p| p.id()),
        ),
        ("CUTOVER_ROLLOUT", r.id.as_str()),
        ("CUTOVER_OPERATOR", r.created_by.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Send {
        node_id: migration.node_id.clone(),
        node_name: migration.node_name.clone(),
        command: pb::Command {
            command_id: migration.command_id.clone().expect("a command out"),
            kind: Some(pb::command::Kind::RunTask(pb::RunTask {
                command: migration.plan.commands[migration.next].clone(),
                timeout_ms: migration.plan.timeout_ms,
                release: Some(release),
                // Filled by the driver on the way out, never stored.
                secret_values: Default::default(),
                env,
            })),
        },
    }
}

/// Whether the migration went out with `phase`: the schema may have
/// changed that way.
pub(super) fn sent(r: &Rollout, phase: MigrationPhase) -> bool {
    r.migration
        .as_ref()
        .is_some_and(|m| m.sent && m.plan.phase == phase)
}

/// Whether `command_id` is the migration's command out.
pub(super) fn owns(r: &Rollout, command_id: &str) -> bool {
    r.migration
        .as_ref()
        .is_some_and(|m| m.command_id.as_deref() == Some(command_id))
}

pub(super) fn in_flight(r: &Rollout) -> bool {
    r.migration.as_ref().is_some_and(|m| m.command_id.is_some())
}

pub(super) fn on_output(r: &mut Rollout, now: i64, text: &str) {
    let migration = r.migration.as_mut().expect("a migration");
    migration.output.push_str(text);
    if migration.output.len() > OUTPUT_TAIL {
        let cut = migration.output.len() - OUTPUT_TAIL;
        let cut = (cut..migration.output.len())
            .find(|i| migration.output.is_char_boundary(*i))
            .unwrap_or(migration.output.len());
        migration.output.drain(..cut);
    }
    let node = migration.node_name.clone();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let migration = r.migration.as_mut().expect("a migration");
        migration.lines_noted += 1;
        match migration.lines_noted {
            n if n < TIMELINE_LINES => {
                note(r, now, "migration_output", &node, line.to_string());
            }
            TIMELINE_LINES => note(
                r,
                now,
                "migration_output",
                &node,
                format!("(more output left out of the timeline; the last {} KiB are kept with the rollout)", OUTPUT_TAIL / 1024),
            ),
            _ => {}
        }
    }
}

pub(super) fn on_result(r: &mut Rollout, now: i64, outcome: Outcome) {
    let migration = r.migration.as_mut().expect("a migration");
    migration.command_id = None;
    let node = migration.node_name.clone();
    let checks = migration.plan.commands.len() - 1;
    let what = if migration.next < checks {
        format!(
            "check {} ({})",
            migration.next + 1,
            migration.plan.commands[migration.next].join(" ")
        )
    } else {
        "the migration".to_string()
    };
    let step = if migration.next < checks {
        "migrate_check"
    } else {
        "migrate"
    };
    let message = match outcome {
        Outcome::Task(TaskEnd {
            exit_code: 0,
            timed_out: false,
            ..
        }) => {
            migration.next += 1;
            if migration.next < migration.plan.commands.len() {
                note(r, now, "migration_check_passed", &node, format!("{what} passed"));
            }
            return;
        }
        Outcome::Task(task) => {
            let tail = last_lines(&migration.output);
            format!("{what} ended with {}{tail}", task.detail)
        }
        Outcome::Unknown(why) => format!(
            "whether {what} finished is not known ({why}); check the schema before deploying again"
        ),
        Outcome::Failed(why) => format!("{what} could not run: {why}"),
        Outcome::Succeeded => format!("{what}: the node answered without a task result; is the agent older than the coordinator?"),
    };
    fail(
        r,
        now,
        RolloutError {
            node,
            step: step.into(),
            message,
        },
    );
}

/// Past the deadline without an answer: how it ended is not known.
pub(super) fn on_tick(r: &mut Rollout, now: i64) {
    let Some(migration) = r.migration.as_ref() else {
        return;
    };
    if migration.command_id.is_some() && now >= migration.deadline_ms {
        let why = format!("no answer from {} past its timeout", migration.node_name);
        on_result(r, now, Outcome::Unknown(why));
    }
}

/// The end of the output, to quote in a failure.
fn last_lines(output: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "; last output: {}",
        lines[lines.len().saturating_sub(CAUSE_LINES)..].join(" | ")
    )
}
