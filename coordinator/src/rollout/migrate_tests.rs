//! Direct tests of the engine's migration step: it runs once, on one node,
//! between the prepare and the cutover, its checks first; a failure ends
//! the rollout before any node switched, an unknown outcome holds it for
//! the operator; a restart resends the same command id. The helpers serve
//! the hooks' tests too (`hooks_tests.rs`).

use super::engine::{handle, Input, Outcome, Send, TaskEnd};
use super::model::*;
use crate::hooks::Hook;
use crate::migration::{Migration, MigrationPhase, When};
use cutover_proto::v1 as pb;

fn with_migration(nodes: usize, when: When) -> Rollout {
    migrating(nodes, when, MigrationPhase::Expand)
}

fn migrating(nodes: usize, when: When, phase: MigrationPhase) -> Rollout {
    let migration = Migration {
        commands: vec![vec!["check".into()], vec!["migrate".into()]],
        when,
        phase,
        timeout_ms: 60_000,
        node: None,
        schema_command: None,
    };
    planned(nodes, Some(migration), vec![])
}

/// A rollout of `nodes` nodes with a migration and run-once hooks.
pub(super) fn planned(nodes: usize, migration: Option<Migration>, hooks: Vec<Hook>) -> Rollout {
    let template = super::sim::rollout(nodes, super::sim::strategy());
    Rollout::new(NewRollout {
        id: template.id.clone(),
        app: template.app.clone(),
        env: template.env.clone(),
        service: template.service.clone(),
        kind: RolloutKind::Deploy,
        release: template.release.clone(),
        previous: template.previous.clone(),
        strategy: template.strategy.clone(),
        nodes: template.nodes.clone(),
        skipped: vec![],
        command_prefix: template.command_prefix.clone(),
        node_lost_after_ms: 0,
        created_by: "alice".into(),
        created_at_ms: 0,
        deployment: String::new(),
        migration,
        hooks,
        notify: Vec::new(),
    })
}

pub(super) fn answer(r: &mut Rollout, now: i64, send: &Send, outcome: Outcome) -> Vec<Send> {
    handle(
        r,
        now,
        Input::Result {
            command_id: send.command.command_id.clone(),
            outcome,
        },
    )
}

pub(super) fn exited(code: i32) -> Outcome {
    Outcome::Task(TaskEnd {
        exit_code: code,
        timed_out: false,
        detail: format!("exit status: {code}"),
        duration_ms: 5,
    })
}

pub(super) fn task(send: &Send) -> &pb::RunTask {
    match &send.command.kind {
        Some(pb::command::Kind::RunTask(task)) => task,
        other => panic!("not a task: {other:?}"),
    }
}

pub(super) fn is_activation(send: &Send) -> bool {
    matches!(send.command.kind, Some(pb::command::Kind::Activate(_)))
}

pub(super) fn is_prepare(send: &Send) -> bool {
    matches!(send.command.kind, Some(pb::command::Kind::Prepare(_)))
}

/// Prepares every node (one at a time); returns what comes next.
pub(super) fn prepared(r: &mut Rollout) -> Vec<Send> {
    let mut sends = handle(r, 0, Input::Start);
    while !sends.is_empty() && sends.iter().all(is_prepare) {
        sends = sends
            .iter()
            .flat_map(|p| answer(r, 10, p, Outcome::Succeeded))
            .collect();
    }
    sends
}

#[test]
fn checks_then_the_migration_run_once_before_any_node_switches() {
    let mut r = with_migration(3, When::Before);
    assert_eq!(r.steps, [Step::Prepare, Step::Migrate, Step::Cutover]);
    let sends = prepared(&mut r);
    assert_eq!(sends.len(), 1, "one command, on one node: {sends:?}");
    assert_eq!(task(&sends[0]).command, ["check"]);
    assert_eq!(r.phase, Phase::Migrate);
    let env = &task(&sends[0]).env;
    assert_eq!(env["CUTOVER_ROLLOUT"], "web-1");
    assert_eq!(env["CUTOVER_OPERATOR"], "alice");

    let next = answer(&mut r, 20, &sends[0], exited(0));
    assert_eq!(next.len(), 1);
    assert_eq!(task(&next[0]).command, ["migrate"]);
    assert_eq!(next[0].node_id, sends[0].node_id, "the same node");
    handle(
        &mut r,
        25,
        Input::Progress {
            command_id: next[0].command.command_id.clone(),
            step: "output".into(),
            message: "Migrating: add_orders_total\nMigrated\n".into(),
        },
    );
    let activations = answer(&mut r, 30, &next[0], exited(0));
    assert!(!activations.is_empty() && activations.iter().all(is_activation));
    let kinds: Vec<&str> = r.timeline.iter().map(|t| t.kind.as_str()).collect();
    let at = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap();
    assert!(at("prepared") < at("migration_started"));
    assert!(at("migration_started") < at("migrated"));
    assert!(at("migrated") < at("batch_started"));
    assert_eq!(
        kinds.iter().filter(|k| **k == "migration_output").count(),
        2,
        "{kinds:?}"
    );
}

#[test]
fn a_failing_migration_ends_the_rollout_before_any_switch_with_its_last_output() {
    let mut r = with_migration(2, When::Before);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    handle(
        &mut r,
        25,
        Input::Progress {
            command_id: migrate[0].command.command_id.clone(),
            step: "output".into(),
            message: "SQLSTATE[42P07]: relation \"orders\" already exists\n".into(),
        },
    );
    let after = answer(&mut r, 30, &migrate[0], exited(1));
    assert!(after.iter().all(|s| !is_activation(s)), "{after:?}");
    assert_eq!(r.state, RolloutState::RolledBack, "{:#?}", r.timeline);
    let error = r.error.clone().unwrap();
    assert_eq!(error.step, "migrate");
    assert!(error.message.contains("exit status: 1"), "{error}");
    assert!(error.message.contains("already exists"), "{error}");
    assert!(r.nodes.iter().all(|n| n.state == NodeState::Prepared));
}

#[test]
fn a_failed_check_stops_the_migration_from_running() {
    let mut r = with_migration(2, When::Before);
    let check = prepared(&mut r);
    let after = answer(&mut r, 20, &check[0], exited(2));
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(r.state, RolloutState::RolledBack);
    assert_eq!(r.error.clone().unwrap().step, "migrate_check");
}

#[test]
fn an_unknown_outcome_holds_the_rollout_until_the_operator_retries_or_aborts() {
    let mut r = with_migration(2, When::Before);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    let unknown = || Outcome::Unknown("the agent stopped while the task ran".into());
    let after = answer(&mut r, 30, &migrate[0], unknown());
    assert!(after.is_empty(), "nothing resent: {after:?}");
    assert_eq!(r.state, RolloutState::Held);
    let held = r.timeline.last().unwrap();
    assert_eq!(held.kind, "held");
    assert!(held.message.contains("not known"), "{}", held.message);
    // Neither time nor a restart (from the stored form) sends it again.
    let mut r: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(r.state, RolloutState::Held);
    assert!(handle(&mut r, 10_000_000, Input::Tick { nodes: vec![] }).is_empty());
    assert!(handle(&mut r, 10_000_001, Input::Recover).is_empty());
    assert!(handle(&mut r, 10_000_002, Input::Resume { by: "bob".into() }).is_empty());
    assert_eq!(r.state, RolloutState::Held);

    // Retry: the same command under a new id, and the rollout goes on.
    let again = handle(&mut r, 10_000_010, Input::Retry { by: "bob".into() });
    assert_eq!(r.state, RolloutState::Running);
    assert_eq!(again.len(), 1);
    assert_eq!(task(&again[0]).command, ["migrate"]);
    assert_ne!(again[0].command.command_id, migrate[0].command.command_id);
    let deadline = r.deadline_ms;
    assert!(
        deadline > 10_000_010,
        "time held does not count: {deadline}"
    );
    let batch = answer(&mut r, 10_000_020, &again[0], exited(0));
    assert!(batch.iter().all(is_activation) && !batch.is_empty());

    // Abort: it ends where it is, nothing sent.
    let mut r = with_migration(2, When::Before);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    answer(&mut r, 30, &migrate[0], unknown());
    assert!(handle(&mut r, 40, Input::Abort { by: "bob".into() }).is_empty());
    assert_eq!(r.state, RolloutState::Aborted, "{:#?}", r.timeline);
    assert!(r.nodes.iter().all(|n| n.state == NodeState::Prepared));
}

#[test]
fn the_schema_command_runs_after_the_migration_and_only_reports() {
    let schema = |r: &mut Rollout| {
        r.migration.as_mut().unwrap().plan.schema_command = Some(vec!["status".into()]);
    };
    let mut r = with_migration(2, When::Before);
    schema(&mut r);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    handle(
        &mut r,
        25,
        Input::Progress {
            command_id: migrate[0].command.command_id.clone(),
            step: "output".into(),
            message: "Migrated: add_note\n".into(),
        },
    );
    let status = answer(&mut r, 30, &migrate[0], exited(0));
    assert_eq!(task(&status[0]).command, ["status"]);
    handle(
        &mut r,
        35,
        Input::Progress {
            command_id: status[0].command.command_id.clone(),
            step: "output".into(),
            message: "Yes add_note\n".into(),
        },
    );
    let batch = answer(&mut r, 40, &status[0], exited(0));
    assert!(batch.iter().all(is_activation) && !batch.is_empty());
    let m = r.migration.as_ref().unwrap();
    assert_eq!(m.summary, "Migrated: add_note\n");
    assert_eq!(m.schema.as_deref(), Some("Yes add_note\n"));
    assert_eq!(m.duration_ms, 5);

    // A failing schema command is reported; the deploy goes on.
    let mut r = with_migration(2, When::Before);
    schema(&mut r);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    let status = answer(&mut r, 30, &migrate[0], exited(0));
    let batch = answer(&mut r, 40, &status[0], exited(2));
    assert!(batch.iter().all(is_activation) && !batch.is_empty());
    assert!(r.timeline.iter().any(|t| t.kind == "schema_failed"));
    assert!(r.error.is_none());
}

#[test]
fn a_restart_mid_migration_resends_the_same_command() {
    let mut r = with_migration(2, When::Before);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    // The stored form is all that survives.
    let stored: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    let mut r = stored;
    let resent = handle(&mut r, 40, Input::Recover);
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].command.command_id, migrate[0].command.command_id);
    assert_eq!(task(&resent[0]).command, ["migrate"]);
}

/// Activates every node, watching each batch (min_healthy_time 0); returns
/// what comes after the cutover (the first migration command, say).
pub(super) fn switched(r: &mut Rollout) -> (Vec<Send>, i64) {
    let sends = prepared(r);
    activate_all(r, sends, 20)
}

/// Answers `sends`, activations, and every batch's after them.
pub(super) fn activate_all(
    r: &mut Rollout,
    mut sends: Vec<Send>,
    mut now: i64,
) -> (Vec<Send>, i64) {
    while sends.iter().all(is_activation) && !sends.is_empty() {
        sends = sends
            .iter()
            .flat_map(|s| answer(r, now, s, Outcome::Succeeded))
            .collect();
        now += 10;
        if sends.is_empty() {
            sends = handle(r, now, Input::Tick { nodes: vec![] });
        }
    }
    (sends, now)
}

#[test]
fn a_failed_contract_migration_rolls_no_code_back_and_an_expand_one_says_the_schema_stays() {
    let mut r = migrating(2, When::After, MigrationPhase::Contract);
    let (check, now) = switched(&mut r);
    let migrate = answer(&mut r, now, &check[0], exited(0));
    let after = answer(&mut r, now + 10, &migrate[0], exited(1));
    assert!(after.is_empty(), "nothing sent back: {after:?}");
    assert_eq!(r.state, RolloutState::Failed, "{:#?}", r.timeline);
    assert!(r.nodes.iter().all(|n| n.state == NodeState::Switched));
    let last = &r.timeline.last().unwrap().message;
    assert!(last.contains("fix forward"), "{last}");

    // A failing check ran nothing: the old code is still safe to return to.
    let mut r = migrating(2, When::After, MigrationPhase::Contract);
    let (check, now) = switched(&mut r);
    answer(&mut r, now, &check[0], exited(1));
    assert_eq!(r.state, RolloutState::RollingBack, "{:#?}", r.timeline);

    let mut r = migrating(2, When::After, MigrationPhase::Expand);
    let (check, now) = switched(&mut r);
    let migrate = answer(&mut r, now, &check[0], exited(0));
    answer(&mut r, now + 10, &migrate[0], exited(1));
    assert_eq!(r.state, RolloutState::RollingBack, "{:#?}", r.timeline);
    let rolling = r
        .timeline
        .iter()
        .find(|t| t.kind == "rolling_back")
        .unwrap();
    assert!(
        rolling.message.contains("schema stays"),
        "{}",
        rolling.message
    );
}

#[test]
fn after_the_cutover_the_migration_runs_on_a_node_that_serves_the_release() {
    let mut r = with_migration(2, When::After);
    assert_eq!(r.steps, [Step::Prepare, Step::Cutover, Step::Migrate]);
    let (sends, now) = switched(&mut r);
    assert_eq!(r.phase, Phase::Migrate, "{:#?}", r.timeline);
    assert!(r.nodes.iter().all(|n| n.state == NodeState::Switched));
    assert_eq!(task(&sends[0]).command, ["check"]);
    let migrate = answer(&mut r, now, &sends[0], exited(0));
    answer(&mut r, now + 10, &migrate[0], exited(0));
    assert_eq!(r.state, RolloutState::Succeeded, "{:#?}", r.timeline);
}

#[test]
fn the_progress_deadline_waits_for_a_migration_within_its_own_bounds() {
    // progress_deadline is 1 s; each command may take its timeout (60 s)
    // plus the answer margin before its outcome counts as unknown.
    let mut r = with_migration(2, When::Before);
    let check = prepared(&mut r);
    let migrate = answer(&mut r, 20, &check[0], exited(0));
    let late = 20 + 60_000 + 200_000;
    assert!(handle(&mut r, late, Input::Tick { nodes: vec![] }).is_empty());
    assert!(r.error.is_none(), "{:#?}", r.timeline);
    let batch = answer(&mut r, late + 10, &migrate[0], exited(0));
    assert!(!batch.is_empty() && batch.iter().all(is_activation));
}
