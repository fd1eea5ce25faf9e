//! Direct tests of single engine decisions, beside the seeded simulation.

use super::engine::{handle, Input, Observation, Outcome, Send, ServiceObservation};
use prost::Message as _;

use super::model::*;
use crate::spec::{BatchSize, Strategy};

fn strategy(min_healthy_time_ms: u64) -> Strategy {
    Strategy {
        prepare_parallelism: 4,
        ..Strategy::rolling(BatchSize::Count(1), 0, min_healthy_time_ms)
    }
}

pub(super) fn kinds(r: &Rollout) -> Vec<&str> {
    r.timeline.iter().map(|t| t.kind.as_str()).collect()
}

pub(super) fn succeed(r: &mut Rollout, now: i64, sends: &[Send]) -> Vec<Send> {
    sends
        .iter()
        .flat_map(|send| {
            handle(
                r,
                now,
                Input::Result {
                    command_id: send.command.command_id.clone(),
                    outcome: Outcome::Succeeded,
                },
            )
        })
        .collect()
}

/// Every node reports the new release running and healthy.
pub(super) fn healthy_tick(r: &Rollout, now: i64) -> Input {
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
                    side: None,
                }),
            })
            .collect(),
    }
}

#[test]
fn a_pause_between_batches_announces_no_batch_and_the_next_starts_on_resume() {
    let mut r = super::sim::rollout(2, strategy(1_000));
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    assert_eq!(activations.len(), 1, "batch 1 of 2");
    let none = succeed(&mut r, 20, &activations);
    assert!(none.is_empty());
    handle(&mut r, 30, Input::Pause { by: "alice".into() });
    // The watch of batch 1 passes: the pause takes effect there.
    let tick = healthy_tick(&r, 1_500);
    let sends = handle(&mut r, 1_500, tick);
    assert!(sends.is_empty(), "nothing may start while pausing");
    assert_eq!(r.state, RolloutState::Paused);
    let batches = kinds(&r).iter().filter(|k| **k == "batch_started").count();
    assert_eq!(batches, 1, "batch 2 was announced: {:?}", kinds(&r));
    assert_eq!(kinds(&r).last(), Some(&"paused"));
    assert_eq!(r.nodes[1].state, NodeState::Prepared);

    let sends = handle(&mut r, 2_000, Input::Resume { by: "alice".into() });
    assert_eq!(sends.len(), 1, "batch 2 starts on resume");
    assert_eq!(r.nodes[1].batch, Some(1));
    let last = r.timeline.last().unwrap();
    assert_eq!(last.kind, "batch_started");
    assert!(last.message.starts_with("batch 2 of 2"), "{}", last.message);
}

#[test]
fn a_pause_requested_while_preparing_holds_before_the_first_batch() {
    let mut r = super::sim::rollout(2, strategy(0));
    let prepares = handle(&mut r, 0, Input::Start);
    handle(&mut r, 5, Input::Pause { by: "bob".into() });
    let sends = succeed(&mut r, 10, &prepares);
    assert!(sends.is_empty());
    assert_eq!(r.state, RolloutState::Paused);
    assert!(!kinds(&r).contains(&"batch_started"), "{:?}", kinds(&r));
    let sends = handle(&mut r, 20, Input::Resume { by: "bob".into() });
    assert_eq!(sends.len(), 1);
    assert_eq!(
        kinds(&r).iter().filter(|k| **k == "prepared").count(),
        1,
        "{:?}",
        kinds(&r)
    );
}

#[test]
fn the_switch_is_recorded_when_the_agent_reports_it_not_when_the_old_release_stopped() {
    let mut r = super::sim::rollout(1, strategy(0));
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    let id = activations[0].command.command_id.clone();
    let progress = |r: &mut Rollout, now, step: &str| {
        handle(
            r,
            now,
            Input::Progress {
                command_id: id.clone(),
                step: step.into(),
                message: String::new(),
            },
        )
    };
    progress(&mut r, 20, "switching");
    assert_eq!(r.nodes[0].release, r.previous.as_ref().unwrap().id());
    progress(&mut r, 30, "draining");
    // Live views show the release the proxy now sends to.
    assert_eq!(r.nodes[0].release, r.release.id());
    assert_eq!(r.nodes[0].state, NodeState::Activating);
    progress(&mut r, 3_030, "stopping_old");
    succeed(&mut r, 4_000, &activations);
    let at = |kind: &str| {
        let found: Vec<i64> = r
            .timeline
            .iter()
            .filter(|t| t.kind == kind)
            .map(|t| t.at_ms)
            .collect();
        assert_eq!(found.len(), 1, "{kind}: {:?}", kinds(&r));
        found[0]
    };
    assert_eq!(at("node_switched"), 30);
    assert_eq!(at("node_drained"), 3_030);
    assert_eq!(at("node_old_stopped"), 4_000);
    assert_eq!(r.state, RolloutState::Succeeded);
}

#[test]
fn an_agent_that_reports_no_progress_switches_when_it_answers() {
    let mut r = super::sim::rollout(1, strategy(0));
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    succeed(&mut r, 50, &activations);
    let switched: Vec<i64> = r
        .timeline
        .iter()
        .filter(|t| t.kind == "node_switched")
        .map(|t| t.at_ms)
        .collect();
    assert_eq!(switched, [50]);
    assert!(!kinds(&r).contains(&"node_old_stopped"));
}

#[test]
fn a_finished_rollout_keeps_only_what_names_its_releases() {
    let mut r = super::sim::rollout(1, strategy(0));
    r.release.0.env.insert("BLOB".into(), "x".repeat(100_000));
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    assert!(
        activations[0].command.encoded_len() > 100_000,
        "commands carry the whole release"
    );
    succeed(&mut r, 20, &activations);
    assert_eq!(r.state, RolloutState::Succeeded);
    assert!(r.release.0.env.is_empty());
    assert_eq!(r.release.id(), "web-v2-11111111");
    assert_eq!(r.release.digest(), format!("sha256:{}", "a".repeat(64)));
    let stored = serde_json::to_vec(&r).unwrap();
    assert!(stored.len() < 10_000, "{} bytes", stored.len());
}

pub(super) fn ids(sends: &[Send]) -> Vec<&str> {
    sends
        .iter()
        .map(|s| s.command.command_id.as_str())
        .collect()
}

pub(super) fn activates(send: &Send) -> &str {
    match &send.command.kind {
        Some(cutover_proto::v1::command::Kind::Activate(a)) => {
            &a.release.as_ref().expect("a release").release_id
        }
        other => panic!("not an activation: {other:?}"),
    }
}

#[test]
fn max_unavailable_limits_how_many_nodes_activate_at_once() {
    let strategy = Strategy {
        prepare_parallelism: 4,
        ..Strategy::rolling(BatchSize::Count(4), 2, 0)
    };
    let mut r = super::sim::rollout(4, strategy);
    let prepares = handle(&mut r, 0, Input::Start);
    assert_eq!(prepares.len(), 4);
    let activations = succeed(&mut r, 10, &prepares);
    assert_eq!(activations.len(), 2, "one batch of 4, two out at a time");
    let next = succeed(&mut r, 20, &activations[..1]);
    assert_eq!(next.len(), 1, "a node back makes room for one more");
    let activating = r
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Activating)
        .count();
    assert_eq!(activating, 2);
}

#[test]
fn a_failure_without_auto_rollback_ends_failed_and_sends_nothing() {
    let mut r = super::sim::rollout(
        2,
        Strategy {
            auto_rollback: false,
            ..strategy(0)
        },
    );
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    assert_eq!(activations.len(), 1);
    let sends = handle(
        &mut r,
        20,
        Input::Result {
            command_id: activations[0].command.command_id.clone(),
            outcome: Outcome::Failed("health check failed".into()),
        },
    );
    assert!(sends.is_empty(), "nothing is rolled back: {sends:?}");
    assert_eq!(r.state, RolloutState::Failed);
    assert_eq!(r.nodes[0].state, NodeState::Failed);
    assert_eq!(
        r.nodes[1].state,
        NodeState::Prepared,
        "the second never started"
    );
    assert!(r.error.is_some());
}

#[test]
fn a_command_past_its_deadline_leaves_the_node_uncertain_and_the_rollback_returns_it() {
    let mut r = super::sim::rollout(1, strategy(0));
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    let deadline = r.nodes[0].command_deadline_ms;
    let tick = healthy_tick(&r, deadline - 1);
    assert!(
        handle(&mut r, deadline - 1, tick).is_empty(),
        "not yet late"
    );
    assert!(!r.nodes[0].uncertain);
    let tick = healthy_tick(&r, deadline);
    let rollback = handle(&mut r, deadline, tick);
    assert!(r.nodes[0].uncertain, "it may or may not have switched");
    assert_eq!(r.state, RolloutState::RollingBack);
    assert_eq!(rollback.len(), 1, "the uncertain node is returned");
    assert_eq!(activates(&rollback[0]), r.previous.as_ref().unwrap().id());
    assert_ne!(ids(&rollback), ids(&activations), "a command of its own");
    succeed(&mut r, deadline + 10, &rollback);
    assert_eq!(r.state, RolloutState::RolledBack);
}

#[test]
fn the_progress_deadline_fails_the_rollout() {
    let mut r = super::sim::rollout(
        2,
        Strategy {
            auto_rollback: false,
            progress_deadline_ms: 60_000,
            ..strategy(0)
        },
    );
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    let tick = healthy_tick(&r, 59_999);
    handle(&mut r, 59_999, tick);
    assert!(r.error.is_none());
    let tick = healthy_tick(&r, 60_000);
    let sends = handle(&mut r, 60_000, tick);
    assert!(sends.is_empty(), "nothing new starts: {sends:?}");
    let error = r.error.clone().expect("the deadline failed it");
    assert_eq!(error.step, "progress_deadline");
    // The node in the middle of its cutover finishes it.
    succeed(&mut r, 60_010, &activations);
    assert_eq!(r.state, RolloutState::Failed);
    assert_eq!(r.nodes[1].state, NodeState::Prepared);
}

#[test]
fn recovery_resends_the_commands_in_flight_under_their_ids() {
    let mut r = super::sim::rollout(3, strategy(0));
    let prepares = handle(&mut r, 0, Input::Start);
    assert_eq!(prepares.len(), 3);
    // One answered before the crash; only the stored form survives it.
    succeed(&mut r, 10, &prepares[..1]);
    let mut stored: Rollout = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
    let resent = handle(&mut stored, 5_000, Input::Recover);
    assert_eq!(ids(&resent), ids(&prepares[1..]));
    assert_eq!(resent[0].command, prepares[1].command);
}
