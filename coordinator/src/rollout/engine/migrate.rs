//! The migration step: the app's checks, then its migration, each run once
//! to exit 0 on one node that has the release (`once.rs`), then its
//! `schema_command`, whose output is recorded with the release. A failed
//! check or migration fails the rollout; one whose outcome is not known
//! holds it for the operator, never runs again on its own.

use super::once::{self, Ended, Task};
use super::steps::step_done;
use super::{fail, note, Outcome, Send};
use crate::migration::{MigrationPhase, When};
use crate::rollout::model::{NodeState, Phase, Rollout, RolloutError};

/// Enters the step: picks the node it runs on, the first that has the
/// release (prepared before the cutover, serving it after).
pub(super) fn start(r: &mut Rollout, now: i64) {
    r.phase = Phase::Migrate;
    let plan = &r
        .migration
        .as_ref()
        .expect("a migrate step has a migration")
        .plan;
    let after = plan.when == When::After;
    let has_release = |state: NodeState| match state {
        NodeState::Unchanged => true,
        NodeState::Switched => after,
        NodeState::Prepared => !after,
        _ => false,
    };
    let chosen = plan.node.clone();
    let Some(node) = once::pick_node(r, has_release, chosen.as_deref()) else {
        let message = match &chosen {
            Some(name) => format!("node {name} does not have the release to run the migration"),
            None => "no node has the release to run the migration on".into(),
        };
        fail(
            r,
            now,
            RolloutError {
                node: String::new(),
                step: "migrate".into(),
                message,
            },
        );
        return;
    };
    // The migration's own timeout is its bound (each of its commands'),
    // not the rollout's progress deadline.
    let commands = plan.commands.len() + usize::from(plan.schema_command.is_some());
    r.deadline_ms += once::budget(std::iter::repeat_n(plan.timeout_ms, commands));
    let what = match plan.commands.len() {
        1 => "the migration".to_string(),
        n => format!("{} checks, then the migration", n - 1),
    };
    let phase = plan.phase.as_str();
    let name = r.nodes[node].name.clone();
    once::start(
        r,
        Task::Migration,
        node,
        now,
        format!("{what} ({phase}) on {name}"),
    );
}

/// Sends the next command, or ends the step once the last exited 0.
pub(super) fn run(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    if r.error.is_some() {
        return;
    }
    let before = sends.len();
    if let once::Next::Done = once::run(r, Task::Migration, now, sends) {
        let node = Task::Migration.run(r).node_name.clone();
        step_done(
            r,
            now,
            Some(("migrated", format!("the migration ran on {node}"))),
        );
        return;
    }
    let migration = r.migration.as_mut().expect("a migration");
    if sends.len() > before && migration.run.next + 1 == migration.plan.commands.len() {
        migration.sent = true;
    }
}

/// Whether the migration went out with `phase`: the schema may have
/// changed that way.
pub(super) fn sent(r: &Rollout, phase: MigrationPhase) -> bool {
    r.migration
        .as_ref()
        .is_some_and(|m| m.sent && m.plan.phase == phase)
}

pub(super) fn on_result(r: &mut Rollout, now: i64, outcome: Outcome) {
    let migration = r.migration.as_ref().expect("a migration");
    let (index, checks) = (migration.run.next, migration.plan.commands.len() - 1);
    let node = migration.run.node_name.clone();
    let (what, step) = match index {
        i if i < checks => (
            format!("check {} ({})", i + 1, migration.plan.commands[i].join(" ")),
            "migrate_check",
        ),
        i if i == checks => ("the migration".to_string(), "migrate"),
        _ => ("the schema command".to_string(), "schema"),
    };
    if let Outcome::Task(end) = &outcome {
        if index == checks {
            let migration = r.migration.as_mut().expect("a migration");
            migration.duration_ms = end.duration_ms;
        }
    }
    let ended = once::on_result(r, Task::Migration, outcome, &what);
    if index > checks {
        // The schema command only reports: the migration is through.
        let migration = r.migration.as_mut().expect("a migration");
        migration.schema = Some(std::mem::take(&mut migration.run.output));
        match ended {
            Ended::Passed => {}
            Ended::Failed(why) | Ended::Unknown(why) => {
                migration.run.unknown = false;
                migration.run.next = index + 1;
                note(r, now, "schema_failed", &node, why);
            }
        }
        return;
    }
    match ended {
        Ended::Passed if index < checks => {
            note(
                r,
                now,
                "migration_check_passed",
                &node,
                format!("{what} passed"),
            );
        }
        Ended::Passed => {
            // What the migration printed is its record; the schema
            // command's output is kept apart.
            let migration = r.migration.as_mut().expect("a migration");
            migration.summary = std::mem::take(&mut migration.run.output);
            // The schema command's lines get a timeline budget of their own.
            migration.run.lines_noted = 0;
        }
        Ended::Failed(message) => fail(
            r,
            now,
            RolloutError {
                node,
                step: step.into(),
                message,
            },
        ),
        Ended::Unknown(message) => once::hold(r, now, message),
    }
}
