//! The rollback's fast path (`engine/fast.rs`) and the automatic
//! rollback's pace, decision by decision.

use super::canary_tests::answer;
use super::engine::{handle, Input, Outcome, Send};
use super::engine_tests::{activates, healthy_tick, ids, kinds, succeed};
use super::model::*;
use super::sim::{rollout, NEW, OLD};
use crate::spec::{BatchSize, Strategy};
use crate::strategy::RollbackPace;

/// Batches of one, each watched for 10 s: what the fast path skips.
fn batched_strategy() -> Strategy {
    Strategy {
        prepare_parallelism: 2,
        ..Strategy::rolling(BatchSize::Count(1), 0, 10_000)
    }
}

/// A rollback of `nodes` nodes on the fast path, started.
fn fast_rollback(nodes: usize, strategy: Strategy) -> (Rollout, Vec<Send>) {
    let mut r = rollout(nodes, strategy);
    r.kind = RolloutKind::Rollback;
    r.return_at_once();
    let sends = handle(&mut r, 0, Input::Start);
    (r, sends)
}

#[test]
fn every_node_returns_at_once_without_a_prepare_or_a_watch() {
    let (mut r, sends) = fast_rollback(5, batched_strategy());
    assert_eq!(sends.len(), 5, "every node at once");
    assert!(sends.iter().all(|s| activates(s) == NEW), "{sends:?}");
    let started = &r.timeline[0];
    assert!(
        started.message.contains("all at once"),
        "{}",
        started.message
    );
    let returning: Vec<&TimelineEntry> = r
        .timeline
        .iter()
        .filter(|t| t.kind == "returning")
        .collect();
    assert_eq!(returning.len(), 1);
    assert!(
        returning[0]
            .message
            .contains("node-0, node-1, node-2, node-3, node-4"),
        "{}",
        returning[0].message
    );
    let rest = succeed(&mut r, 100, &sends);
    assert!(rest.is_empty());
    assert_eq!(
        r.state,
        RolloutState::Succeeded,
        "no min_healthy_time watch"
    );
    assert!(!kinds(&r).contains(&"batch_started"), "{:?}", kinds(&r));
    assert!(!kinds(&r).contains(&"prepared"), "{:?}", kinds(&r));
}

#[test]
fn rollback_parallelism_and_max_unavailable_bound_the_nodes_out_at_once() {
    let (mut r, sends) = fast_rollback(
        5,
        Strategy {
            rollback_parallelism: Some(2),
            ..batched_strategy()
        },
    );
    assert_eq!(sends.len(), 2);
    assert!(
        r.timeline[0].message.contains("2 at a time"),
        "{:?}",
        r.timeline[0]
    );
    let next = succeed(&mut r, 10, &sends[..1]);
    assert_eq!(next.len(), 1, "a node back makes room for the next");
    assert_eq!(activates(&next[0]), NEW);

    // Nodes that leave the load balancer for their cutover: the fleet's
    // capacity bounds an incident's rollback too.
    let (_, sends) = fast_rollback(
        5,
        Strategy {
            prepare_parallelism: 2,
            ..Strategy::rolling(BatchSize::Count(5), 1, 10_000)
        },
    );
    assert_eq!(sends.len(), 1);
}

#[test]
fn a_node_that_refuses_the_release_keeps_serving_and_the_others_go_on() {
    let (mut r, sends) = fast_rollback(3, batched_strategy());
    let none = answer(
        &mut r,
        10,
        &sends[1..=1],
        Outcome::Failed("cannot fetch the artifact: 404".into()),
    );
    assert!(none.is_empty(), "nothing turns back: {none:?}");
    assert_eq!(r.state, RolloutState::Running, "the others go on");
    // Another is cut off mid-command: what it serves is not known.
    succeed(&mut r, 20, &sends[..1]);
    for now in [5_000, 15_000] {
        let mut tick = healthy_tick(&r, now);
        if let Input::Tick { nodes } = &mut tick {
            nodes[2].connected = false;
        }
        let none = handle(&mut r, now, tick);
        assert!(none.is_empty(), "{none:?}");
    }
    assert_eq!(r.state, RolloutState::Failed);
    assert!(r.error.is_none(), "no failure of the rollout as a whole");
    assert!(r.nodes[1].refused && !r.nodes[1].uncertain);
    assert_eq!(r.nodes[1].release, OLD, "it serves what it served");
    assert!(!r.nodes[2].refused && r.nodes[2].uncertain);
    assert_eq!(r.nodes[0].state, NodeState::Switched);
    let end = &r.timeline.last().unwrap().message;
    assert!(
        end.contains("2 nodes did not return")
            && end.contains("node node-1")
            && end.contains("404")
            && end.contains("node node-2"),
        "{end}"
    );
    let refusal = r
        .timeline
        .iter()
        .find(|t| t.kind == "node_rollback_failed" && t.node == "node-1")
        .unwrap();
    assert!(
        refusal.message.contains(&format!("it serves {OLD} still")),
        "{}",
        refusal.message
    );
}

#[test]
fn a_failure_of_the_fast_path_as_a_whole_never_turns_back() {
    let (mut r, sends) = fast_rollback(
        3,
        Strategy {
            rollback_parallelism: Some(1),
            progress_deadline_ms: 60_000,
            ..batched_strategy()
        },
    );
    let second = succeed(&mut r, 10, &sends);
    assert_eq!(r.nodes[0].state, NodeState::Switched);
    let tick = healthy_tick(&r, 60_000);
    let sends = handle(&mut r, 60_000, tick);
    assert_eq!(r.state, RolloutState::Running, "the node out finishes");
    assert!(sends.is_empty(), "{sends:?}");
    let sends = succeed(&mut r, 60_010, &second);
    assert!(sends.is_empty(), "nothing returns to {OLD}: {sends:?}");
    assert_eq!(r.state, RolloutState::Failed);
    assert_eq!(
        r.nodes[2].state,
        NodeState::Pending,
        "the rest never started"
    );
    let end = &r.timeline.last().unwrap().message;
    assert!(
        end.contains("progress_deadline") && end.contains("does not turn back"),
        "{end}"
    );
}

#[test]
fn a_fast_rollback_resumes_after_a_restart_with_the_same_commands() {
    let (mut r, sends) = fast_rollback(3, batched_strategy());
    succeed(&mut r, 10, &sends[..1]);
    let mut stored: Rollout = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
    assert!(stored.returns_at_once());
    assert_eq!(stored.phase, Phase::Return);
    let resent = handle(&mut stored, 5_000, Input::Recover);
    assert_eq!(ids(&resent), ids(&sends[1..]));
    succeed(&mut stored, 5_010, &resent);
    assert_eq!(stored.state, RolloutState::Succeeded);
}

/// A deploy failing in its third batch: the two switched nodes return in
/// one pass on the fast pace, one by one on the batched pace.
#[test]
fn the_automatic_rollback_returns_switched_nodes_at_the_strategy_s_pace() {
    for (pace, per_pass) in [(RollbackPace::Fast, 2), (RollbackPace::Batched, 1)] {
        let mut r = rollout(
            3,
            Strategy {
                rollback: pace,
                ..Strategy::rolling(BatchSize::Count(1), 0, 0)
            },
        );
        let mut sends = handle(&mut r, 0, Input::Start);
        // Prepares, then each batch of one in turn.
        while r.nodes.iter().any(|n| n.state != NodeState::Switched) {
            let next = succeed(&mut r, 10, &sends);
            if r.nodes[2].state == NodeState::Activating {
                sends = next;
                break;
            }
            sends = next;
        }
        assert_eq!(activates(&sends[0]), NEW);
        let returns = answer(
            &mut r,
            20,
            &sends[0..=0],
            Outcome::Failed("503 from /health".into()),
        );
        assert_eq!(r.state, RolloutState::RollingBack);
        assert_eq!(returns.len(), per_pass, "{pace:?}");
        assert!(returns.iter().all(|s| activates(s) == OLD));
        let first = r.timeline.iter().find(|t| t.kind == "returning").unwrap();
        match pace {
            RollbackPace::Fast => assert!(
                first.message.contains("node-0, node-1"),
                "{}",
                first.message
            ),
            RollbackPace::Batched => {
                assert!(first.message.ends_with("node-0"), "{}", first.message)
            }
        }
    }
}

/// The agent refused the previous release on its way back: the node is
/// named, serves the new release still, and is marked for the converger
/// to leave alone.
#[test]
fn an_automatic_rollback_refused_by_a_node_marks_it() {
    let mut r = rollout(1, Strategy::rolling(BatchSize::Count(1), 0, 10_000));
    let prepares = handle(&mut r, 0, Input::Start);
    let activations = succeed(&mut r, 10, &prepares);
    succeed(&mut r, 20, &activations);
    let tick = super::engine::Input::Tick {
        nodes: vec![super::engine::Observation {
            node_id: r.nodes[0].id.clone(),
            connected: true,
            last_seen_ms: 30,
            service: None,
        }],
    };
    let returns = handle(&mut r, 30, tick);
    assert_eq!(r.state, RolloutState::RollingBack);
    answer(
        &mut r,
        40,
        &returns[0..=0],
        Outcome::Failed("cannot start: exec format error".into()),
    );
    assert_eq!(r.state, RolloutState::Failed);
    assert!(r.nodes[0].refused);
    let entry = r
        .timeline
        .iter()
        .find(|t| t.kind == "node_rollback_failed")
        .unwrap();
    assert!(
        entry.message.contains(&format!("it serves {NEW} still")),
        "{}",
        entry.message
    );
}
