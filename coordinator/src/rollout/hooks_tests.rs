//! Direct tests of the engine's run-once hooks: their place among the
//! steps, what a failure at each point does, `on_failure` after a
//! rollback, and a restart mid-hook.

use super::engine::{handle, Input, Observation, Outcome, Send, ServiceObservation};
use super::migrate_tests::{
    activate_all, answer, exited, is_activation, planned, prepared, switched, task,
};
use super::model::*;
use crate::hooks::{Hook, HookAt};
use crate::migration::{Migration, MigrationPhase, When};

fn hook(at: HookAt, command: &str) -> Hook {
    Hook {
        at,
        command: vec![command.into()],
        timeout_ms: 30_000,
    }
}

fn migration() -> Migration {
    Migration {
        commands: vec![vec!["migrate".into()]],
        when: When::Before,
        phase: MigrationPhase::Expand,
        timeout_ms: 60_000,
        node: None,
        schema_command: None,
    }
}

/// Answers each run-once command with exit 0 until node commands come.
fn pass_tasks(r: &mut Rollout, mut sends: Vec<Send>, now: i64) -> (Vec<String>, Vec<Send>) {
    let mut ran = Vec::new();
    while sends.len() == 1 && !is_activation(&sends[0]) {
        ran.push(task(&sends[0]).command.join(" "));
        sends = answer(r, now, &sends[0], exited(0));
    }
    (ran, sends)
}

#[test]
fn pre_deploy_hooks_run_in_order_before_the_migration_and_post_deploy_after_the_last_node() {
    let hooks = vec![
        hook(HookAt::PostDeploy, "announce"),
        hook(HookAt::PreDeploy, "maintenance-check"),
        hook(HookAt::PreDeploy, "warm-cache"),
    ];
    let mut r = planned(2, Some(migration()), hooks);
    assert_eq!(
        r.steps,
        [
            Step::Prepare,
            Step::Hooks(HookAt::PreDeploy),
            Step::Migrate,
            Step::Cutover,
            Step::Hooks(HookAt::PostDeploy)
        ]
    );
    let sends = prepared(&mut r);
    let env = &task(&sends[0]).env;
    assert_eq!(env["CUTOVER_APP"], "shop");
    assert_eq!(env["CUTOVER_ENV"], "test");
    assert_eq!(
        env["CUTOVER_PREVIOUS_RELEASE"],
        r.previous.as_ref().unwrap().id()
    );
    let (ran, batch) = pass_tasks(&mut r, sends, 20);
    assert_eq!(ran, ["maintenance-check", "warm-cache", "migrate"]);

    let (post, now) = activate_all(&mut r, batch, 30);
    assert_eq!(
        r.phase,
        Phase::Hooks(HookAt::PostDeploy),
        "{:#?}",
        r.timeline
    );
    assert!(r.nodes.iter().all(|n| n.state == NodeState::Switched));
    assert_eq!(task(&post[0]).command, ["announce"]);
    answer(&mut r, now, &post[0], exited(0));
    assert_eq!(r.state, RolloutState::Succeeded, "{:#?}", r.timeline);
}

#[test]
fn a_failing_pre_deploy_hook_stops_the_deploy_before_the_migration() {
    let mut r = planned(2, Some(migration()), vec![hook(HookAt::PreDeploy, "guard")]);
    let sends = prepared(&mut r);
    let after = answer(&mut r, 20, &sends[0], exited(3));
    assert!(after.is_empty(), "no migration, no node: {after:?}");
    assert_eq!(r.state, RolloutState::RolledBack, "{:#?}", r.timeline);
    let error = r.error.clone().unwrap();
    assert_eq!(error.step, "pre_deploy");
    assert!(
        error.message.contains("exit status: 3"),
        "{}",
        error.message
    );
    assert!(!r.migration.as_ref().unwrap().sent);
    assert!(r
        .nodes
        .iter()
        .all(|n| n.release == r.previous.as_ref().unwrap().id()));
}

#[test]
fn failing_post_deploy_hooks_are_reported_and_the_rest_still_run() {
    let hooks = vec![
        hook(HookAt::PostDeploy, "notify-slack"),
        hook(HookAt::PostDeploy, "purge-cdn"),
    ];
    let mut r = planned(2, None, hooks);
    let (first, now) = switched(&mut r);
    let second = answer(&mut r, now, &first[0], exited(1));
    assert_eq!(task(&second[0]).command, ["purge-cdn"]);
    answer(&mut r, now + 10, &second[0], exited(0));
    assert_eq!(r.state, RolloutState::Succeeded, "{:#?}", r.timeline);
    let failed = r.timeline.iter().find(|t| t.kind == "hook_failed").unwrap();
    assert!(
        failed.message.contains("notify-slack"),
        "{}",
        failed.message
    );
}

#[test]
fn on_failure_hooks_run_once_the_rollback_is_done_and_the_rollout_ends_after_them() {
    let hooks = vec![hook(HookAt::OnFailure, "page-oncall")];
    let mut r = planned(2, None, hooks);
    assert_eq!(r.steps, [Step::Prepare, Step::Cutover], "not a step");
    let first = prepared(&mut r);
    let failed = answer(
        &mut r,
        20,
        &first[0],
        Outcome::Failed("health check failed".into()),
    );
    // The rollback comes first (this node failed before it switched:
    // nothing to return), then the hook.
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(task(&failed[0]).command, ["page-oncall"]);
    assert_eq!(r.phase, Phase::Hooks(HookAt::OnFailure));
    assert!(!r.state.is_terminal());
    answer(&mut r, 30, &failed[0], exited(0));
    assert_eq!(r.state, RolloutState::RolledBack, "{:#?}", r.timeline);
    let last = r.timeline.last().unwrap();
    assert!(
        last.message.contains("health check failed"),
        "{}",
        last.message
    );

    // Its own failure only reports.
    let mut r = planned(2, None, vec![hook(HookAt::OnFailure, "page-oncall")]);
    let first = prepared(&mut r);
    let hook_out = answer(&mut r, 20, &first[0], Outcome::Failed("broken".into()));
    answer(&mut r, 30, &hook_out[0], exited(1));
    assert_eq!(r.state, RolloutState::RolledBack);
    assert!(r.timeline.iter().any(|t| t.kind == "hook_failed"));
}

#[test]
fn a_restart_mid_hook_resends_it_and_an_unknown_pre_deploy_outcome_holds() {
    let mut r = planned(2, None, vec![hook(HookAt::PreDeploy, "guard")]);
    let sends = prepared(&mut r);
    let stored: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    let mut r = stored;
    let resent = handle(&mut r, 40, Input::Recover);
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].command.command_id, sends[0].command.command_id);
    answer(
        &mut r,
        50,
        &resent[0],
        Outcome::Unknown("the agent restarted".into()),
    );
    assert_eq!(r.state, RolloutState::Held);
    let again = handle(&mut r, 60, Input::Retry { by: "carol".into() });
    assert_eq!(task(&again[0]).command, ["guard"]);
    let batch = answer(&mut r, 70, &again[0], exited(0));
    assert!(!batch.is_empty() && batch.iter().all(is_activation));
}

#[test]
fn a_rollout_failing_while_paused_still_runs_its_on_failure_hooks_and_ends() {
    let mut r = planned(2, None, vec![hook(HookAt::OnFailure, "page-oncall")]);
    r.strategy.auto_rollback = false;
    let first = prepared(&mut r);
    handle(&mut r, 15, Input::Pause { by: "dora".into() });
    answer(&mut r, 20, &first[0], Outcome::Succeeded);
    handle(&mut r, 30, Input::Tick { nodes: vec![] });
    assert_eq!(r.state, RolloutState::Paused, "{:#?}", r.timeline);
    // The switched node turns unhealthy while the rollout is paused.
    let node = &r.nodes[0];
    let sick = Observation {
        node_id: node.id.clone(),
        connected: true,
        last_seen_ms: 40,
        service: Some(ServiceObservation {
            release_id: r.release.id().to_string(),
            running: true,
            healthy: false,
            crashes: 0,
            detail: "health check failed".into(),
            traffic: None,
            side: None,
        }),
    };
    let out = handle(&mut r, 40, Input::Tick { nodes: vec![sick] });
    assert!(r.error.is_some(), "{:#?}", r.timeline);
    assert_eq!(
        r.phase,
        Phase::Hooks(HookAt::OnFailure),
        "{:#?}",
        r.timeline
    );
    assert_eq!(task(&out[0]).command, ["page-oncall"]);
    answer(&mut r, 50, &out[0], exited(0));
    assert_eq!(r.state, RolloutState::Failed, "{:#?}", r.timeline);
}
