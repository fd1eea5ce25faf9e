//! Direct tests of the canary strategy's engine decisions: its steps,
//! promote and abort, its health watch and its pause across a restart.

use cutover_proto::v1::{self as pb, command};

use super::engine::{
    handle, promote_refusal, Input, Observation, Outcome, Send, ServiceObservation, SideObservation,
};
use super::model::*;
use crate::strategy::canary::{Canary, CanaryStep, Sticky};
use crate::strategy::{BatchSize, Rolling, Strategy, StrategyKind};

pub(super) fn canary(canary_nodes: BatchSize, steps: Vec<CanaryStep>) -> Strategy {
    Strategy {
        progress_deadline_ms: 60_000,
        auto_rollback: true,
        prepare_parallelism: 8,
        rollback: Default::default(),
        rollback_parallelism: None,
        kind: StrategyKind::Canary(Canary {
            canary_nodes,
            steps,
            sticky: Sticky::Cookie,
            sticky_name: "cutover_cohort".into(),
            override_header: "X-Cutover-Canary".into(),
            scale_down_delay_ms: 30_000,
            abort_scale_down_delay_ms: 10_000,
            promotion: Rolling {
                batch: BatchSize::Count(1),
                max_unavailable: 0,
                min_healthy_time_ms: 0,
            },
            analyses: Default::default(),
            keep_warm: false,
            background: None,
        }),
    }
}

pub(super) fn answer(r: &mut Rollout, now: i64, sends: &[Send], outcome: Outcome) -> Vec<Send> {
    sends
        .iter()
        .flat_map(|send| {
            handle(
                r,
                now,
                Input::Result {
                    command_id: send.command.command_id.clone(),
                    outcome: outcome.clone(),
                },
            )
        })
        .collect()
}

pub(super) fn succeed(r: &mut Rollout, now: i64, sends: &[Send]) -> Vec<Send> {
    answer(r, now, sends, Outcome::Succeeded)
}

/// Every node reports what the rollout thinks it runs: canary nodes the
/// canary beside the stable release, healthy unless `sick`.
pub(super) fn tick(r: &Rollout, now: i64, sick: Option<&str>) -> Input {
    Input::Tick {
        nodes: r
            .nodes
            .iter()
            .map(|n| Observation {
                node_id: n.id.clone(),
                connected: true,
                last_seen_ms: now,
                service: Some(ServiceObservation {
                    release_id: n.release.clone(),
                    running: true,
                    healthy: true,
                    crashes: 0,
                    detail: String::new(),
                    traffic: None,
                    side: matches!(n.state, NodeState::Canary | NodeState::Weighting).then(|| {
                        SideObservation {
                            release_id: r.release.id().to_string(),
                            running: true,
                            healthy: sick != Some(n.name.as_str()),
                            crashes: 0,
                            detail: "503 from /health".into(),
                            traffic: None,
                        }
                    }),
                }),
            })
            .collect(),
    }
}

pub(super) fn kinds(r: &Rollout) -> Vec<&str> {
    r.timeline.iter().map(|t| t.kind.as_str()).collect()
}

pub(super) fn promote(r: &mut Rollout, now: i64, full: bool) -> Vec<Send> {
    handle(
        r,
        now,
        Input::Promote {
            by: "alice".into(),
            full,
        },
    )
}

/// The rollout up to its canary nodes running the canary at weight 0.
pub(super) fn staged(
    nodes: usize,
    canary_nodes: BatchSize,
    steps: Vec<CanaryStep>,
) -> (Rollout, Vec<Send>) {
    staged_with(nodes, canary(canary_nodes, steps))
}

/// The same with any canary strategy.
pub(super) fn staged_with(nodes: usize, strategy: Strategy) -> (Rollout, Vec<Send>) {
    let mut r = super::sim::rollout(nodes, strategy);
    let prepares = handle(&mut r, 0, Input::Start);
    let stages = succeed(&mut r, 10, &prepares);
    for send in &stages {
        let Some(command::Kind::StageRelease(stage)) = &send.command.kind else {
            panic!("a canary node stages the release: {:?}", send.command.kind);
        };
        assert_eq!(
            stage.split.as_ref().unwrap().weight,
            0,
            "staged without traffic"
        );
    }
    let next = succeed(&mut r, 20, &stages);
    (r, next)
}

pub(super) fn weights(sends: &[Send]) -> Vec<u32> {
    sends
        .iter()
        .map(|s| match &s.command.kind {
            Some(command::Kind::SetTraffic(set)) => set.split.as_ref().unwrap().weight,
            other => panic!("not a weight change: {other:?}"),
        })
        .collect()
}

#[test]
fn steps_set_weights_wait_at_pauses_and_promotion_switches_canary_nodes_then_the_rest() {
    let steps = vec![
        CanaryStep::SetWeight(10),
        CanaryStep::Pause(Some(5_000)),
        CanaryStep::SetWeight(50),
        CanaryStep::Pause(None),
    ];
    let (mut r, sets) = staged(4, BatchSize::Percent(50), steps);
    let canaries: Vec<&str> = r
        .nodes
        .iter()
        .filter(|n| n.canary)
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(canaries, ["node-0", "node-1"]);
    assert_eq!(r.batches, 3, "the canary nodes, then two batches of one");
    assert_eq!(weights(&sets), [10, 10]);
    assert!(succeed(&mut r, 30, &sets).is_empty(), "the pause waits");
    assert!(r.nodes.iter().filter(|n| n.canary).all(|n| n.weight == 10));
    let t = tick(&r, 4_000, None);
    assert!(handle(&mut r, 4_000, t).is_empty(), "still pausing");
    let t = tick(&r, 5_100, None);
    let sets = handle(&mut r, 5_100, t);
    assert_eq!(weights(&sets), [50, 50], "the timed pause ended by itself");
    assert!(succeed(&mut r, 5_200, &sets).is_empty());
    // Waits for promote however long it takes: the deadline does not run.
    let t = tick(&r, 600_000, None);
    assert!(handle(&mut r, 600_000, t).is_empty());
    assert_eq!(r.state, RolloutState::Running, "{:?}", kinds(&r));
    let activations = promote(&mut r, 600_100, false);
    assert_eq!(activations.len(), 2, "the canary nodes switch together");
    for send in &activations {
        let Some(command::Kind::Activate(activate)) = &send.command.kind else {
            panic!("a promotion activates");
        };
        assert_eq!(
            activate.release.as_ref().unwrap().release_id,
            r.release.id()
        );
        assert_eq!(
            activate.keep_previous_ms, 30_000,
            "the stable release stays warm"
        );
        assert!(!activate.drain_first);
    }
    assert!(kinds(&r).contains(&"canary_promoted"));
    let mut sends = succeed(&mut r, 600_200, &activations);
    let mut now = 600_300;
    // The other nodes follow one batch at a time.
    while r.state == RolloutState::Running {
        let t = tick(&r, now, None);
        sends.extend(handle(&mut r, now, t));
        sends = succeed(&mut r, now + 10, &sends);
        now += 1_000;
        assert!(now < 700_000, "{:?}", kinds(&r));
    }
    assert_eq!(r.state, RolloutState::Succeeded, "{:?}", kinds(&r));
    assert!(r.nodes.iter().all(|n| n.release == r.release.id()));
}

#[test]
fn promote_is_refused_off_a_pause_and_while_a_canary_is_unhealthy() {
    let steps = vec![CanaryStep::SetWeight(20), CanaryStep::Pause(None)];
    let (mut r, sets) = staged(2, BatchSize::Count(1), steps);
    let refusal = promote_refusal(&r, false).unwrap();
    assert!(refusal.contains("not been reported healthy"), "{refusal}");
    let t = tick(&r, 25, None);
    handle(&mut r, 25, t);
    let refusal = promote_refusal(&r, false).unwrap();
    assert!(refusal.contains("not at a pause"), "{refusal}");
    assert!(promote_refusal(&r, true).is_none(), "--full skips the step");
    succeed(&mut r, 30, &sets);
    assert!(promote_refusal(&r, false).is_none());
    // A canary that turns unhealthy fails the rollout; until the tick that
    // sees it, its last report was healthy.
    let t = tick(&r, 40, Some("node-0"));
    let sends = handle(&mut r, 40, t);
    assert_eq!(r.state, RolloutState::RollingBack, "{:?}", kinds(&r));
    let error = r.error.clone().unwrap();
    assert_eq!(
        (error.node.as_str(), error.step.as_str()),
        ("node-0", "health")
    );
    assert!(
        error.message.contains("503 from /health"),
        "{}",
        error.message
    );
    assert_eq!(
        sends.len(),
        1,
        "the canary node returns to the stable release"
    );
    let Some(command::Kind::Activate(activate)) = &sends[0].command.kind else {
        panic!("a rollback activates the stable release");
    };
    assert_eq!(
        activate.release.as_ref().unwrap().release_id,
        r.previous.as_ref().unwrap().id()
    );
    assert_eq!(
        activate.keep_previous_ms, 10_000,
        "the canary stays for debugging"
    );
    succeed(&mut r, 50, &sends);
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", kinds(&r));
    assert!(r
        .nodes
        .iter()
        .all(|n| n.release == r.previous.as_ref().unwrap().id()));
}

#[test]
fn abort_returns_every_canary_node_at_once_and_ends_aborted() {
    let steps = vec![CanaryStep::SetWeight(50), CanaryStep::Pause(None)];
    let (mut r, sets) = staged(3, BatchSize::Percent(100), steps);
    succeed(&mut r, 30, &sets);
    let returns = handle(&mut r, 40, Input::Abort { by: "bob".into() });
    assert_eq!(
        returns.len(),
        3,
        "every canary node at once, not in batches"
    );
    assert_eq!(r.state, RolloutState::RollingBack);
    succeed(&mut r, 50, &returns);
    assert_eq!(r.state, RolloutState::Aborted, "{:?}", kinds(&r));
    let last = r.timeline.last().unwrap();
    assert!(
        last.message.contains("every node serves web-v1"),
        "{}",
        last.message
    );
    assert!(r
        .nodes
        .iter()
        .all(|n| n.weight == 0 && n.state == NodeState::RolledBack));
}

#[test]
fn a_weight_change_in_flight_is_resent_with_its_weight_after_a_restart() {
    let steps = vec![
        CanaryStep::SetWeight(5),
        CanaryStep::Pause(Some(60_000)),
        CanaryStep::SetWeight(25),
    ];
    let (r, sets) = staged(1, BatchSize::Count(1), steps);
    // The coordinator dies with the weight change out; its store has it.
    let stored: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(stored, r);
    let mut r = stored;
    let resent = handle(&mut r, 1_000, Input::Recover);
    assert_eq!(resent.len(), 1);
    assert_eq!(
        resent[0].command.command_id, sets[0].command.command_id,
        "the same id"
    );
    assert_eq!(weights(&resent), [5]);
    succeed(&mut r, 1_100, &resent);
    // A restart during the pause keeps the step and its end.
    let Phase::Canary(CanaryPhase::Step {
        index: 1,
        since_ms: Some(since),
    }) = r.phase
    else {
        panic!("at the pause: {:?}", r.phase);
    };
    let mut r: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert!(
        handle(&mut r, 2_000, Input::Recover).is_empty(),
        "nothing to resend, no step twice"
    );
    let t = tick(&r, since + 60_000, None);
    let sets = handle(&mut r, since + 60_000, t);
    assert_eq!(weights(&sets), [25]);
    let steps_noted = kinds(&r).iter().filter(|k| **k == "canary_step").count();
    assert_eq!(steps_noted, 3, "each step began once: {:?}", kinds(&r));
}

#[test]
fn promote_of_a_paused_canary_is_refused_with_the_way_on() {
    let steps = vec![CanaryStep::SetWeight(20), CanaryStep::SetWeight(40)];
    let (mut r, sets) = staged(2, BatchSize::Count(1), steps);
    handle(&mut r, 25, Input::Pause { by: "alice".into() });
    let raises = succeed(&mut r, 30, &sets);
    assert!(raises.is_empty(), "paused between steps");
    assert_eq!(r.state, RolloutState::Paused, "{:?}", kinds(&r));
    let refusal = promote_refusal(&r, true).expect("refused");
    assert!(
        refusal.contains("is paused") && refusal.contains("cutover rollout resume"),
        "{refusal}"
    );
}

#[test]
fn a_pause_request_takes_effect_between_steps() {
    let steps = vec![CanaryStep::SetWeight(10), CanaryStep::SetWeight(20)];
    let (mut r, sets) = staged(1, BatchSize::Count(1), steps);
    handle(&mut r, 25, Input::Pause { by: "carol".into() });
    assert!(succeed(&mut r, 30, &sets).is_empty());
    assert_eq!(r.state, RolloutState::Paused);
    assert_eq!(r.nodes[0].weight, 10);
    let sets = handle(&mut r, 40, Input::Resume { by: "carol".into() });
    assert_eq!(weights(&sets), [20]);
}

#[test]
fn a_worker_a_first_deploy_and_a_rollback_roll_out_in_batches() {
    let strategy = canary(BatchSize::Count(1), vec![CanaryStep::SetWeight(10)]);
    assert!(matches!(
        strategy.clone().runnable(false).kind,
        StrategyKind::Rolling(_)
    ));
    assert_eq!(strategy.clone().runnable(true), strategy);
    // Nodes that serve nothing yet are no canary nodes.
    let mut r = super::sim::rollout(2, strategy);
    r.nodes[0].from_release.clear();
    r.nodes[0].release.clear();
    let prepares = handle(&mut r, 0, Input::Start);
    let stages = succeed(&mut r, 10, &prepares);
    assert_eq!(stages.len(), 1);
    assert_eq!(stages[0].node_name, "node-1");
    let _: &pb::Command = &stages[0].command;
}

#[test]
fn a_canary_node_whose_weight_change_was_refused_returns_to_stable_too() {
    let steps = vec![CanaryStep::SetWeight(20), CanaryStep::SetWeight(50)];
    let (mut r, sets) = staged(2, BatchSize::Count(2), steps);
    let raises = succeed(&mut r, 30, &sets);
    assert_eq!(weights(&raises), [50, 50]);
    // node-0 refuses its change (it keeps 20 %), node-1 takes it.
    let mut returns = answer(
        &mut r,
        40,
        &raises[..1],
        Outcome::Failed("the split is invalid".into()),
    );
    returns.extend(succeed(&mut r, 41, &raises[1..]));
    let returned = commanded_until_done(&mut r, 50, returns);
    assert_eq!(returned, ["node-0", "node-1"], "{:?}", kinds(&r));
}

/// Answers `sends` (sent at `now`) and every command after them, with a
/// healthy tick every 100 ms, until the rollout ends: the nodes that got a
/// command, each once, by name.
pub(super) fn commanded_until_done(r: &mut Rollout, mut now: i64, sends: Vec<Send>) -> Vec<String> {
    let mut commanded: Vec<String> = sends.iter().map(|s| s.node_name.clone()).collect();
    let mut sends = succeed(r, now, &sends);
    while !r.state.is_terminal() {
        now += 100;
        let t = tick(r, now, None);
        sends.extend(handle(r, now, t));
        commanded.extend(sends.iter().map(|s| s.node_name.clone()));
        sends = succeed(r, now, &sends);
        assert!(now < 10_000, "{:?}", kinds(r));
    }
    commanded.sort();
    commanded.dedup();
    commanded
}
