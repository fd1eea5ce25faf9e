//! A stop or removal of a service (`engine/stop.rs`), decision by decision:
//! every node at once, the others going on past one that refuses or is cut
//! off, nothing ever started again, the commands in flight resent after a
//! restart under their ids.

use cutover_proto::v1::command;

use super::canary_tests::answer;
use super::engine::{handle, Input, Outcome, Send};
use super::engine_tests::{healthy_tick, ids, kinds, succeed};
use super::model::*;
use super::sim::{rollout, strategy, NEW};
use crate::spec::Strategy;

/// A stop (or removal) of `nodes` nodes that all run the release, started.
fn stop(nodes: usize, kind: RolloutKind) -> (Rollout, Vec<Send>) {
    let mut r = rollout(
        nodes,
        Strategy {
            progress_deadline_ms: 600_000,
            ..strategy()
        },
    );
    r.kind = kind;
    r.previous = None;
    for node in &mut r.nodes {
        node.release = NEW.into();
        node.from_release = NEW.into();
    }
    r.stop_at_once();
    let sends = handle(&mut r, 0, Input::Start);
    (r, sends)
}

/// The service and `remove` of a stop command; anything else fails.
fn stops(send: &Send) -> (&str, bool) {
    match &send.command.kind {
        Some(command::Kind::StopService(stop)) => (&stop.service, stop.remove),
        other => panic!("not a stop: {other:?}"),
    }
}

#[test]
fn every_node_stops_at_once_and_the_rollout_says_how_to_start_it_again() {
    let (mut r, sends) = stop(4, RolloutKind::Stop);
    assert_eq!(sends.len(), 4, "no batches: {sends:?}");
    assert!(sends.iter().all(|s| stops(s) == ("web", false)));
    assert!(
        r.timeline[0].message.contains("on 4 nodes at once"),
        "{:?}",
        r.timeline[0]
    );
    let rest = succeed(&mut r, 100, &sends);
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(r.state, RolloutState::Succeeded);
    assert!(r
        .nodes
        .iter()
        .all(|n| n.state == NodeState::Stopped && n.release.is_empty()));
    assert!(!kinds(&r).contains(&"prepared"), "nothing is fetched");
    let end = r.timeline.last().unwrap();
    assert!(
        end.message
            .contains("`cutover service start web --env test` (or a deploy) starts it again"),
        "{}",
        end.message
    );
}

#[test]
fn a_removal_asks_each_agent_to_forget_the_service() {
    let (mut r, sends) = stop(2, RolloutKind::Remove);
    assert!(sends.iter().all(|s| stops(s) == ("web", true)));
    succeed(&mut r, 100, &sends);
    assert_eq!(r.state, RolloutState::Succeeded);
    let end = r.timeline.last().unwrap();
    assert!(
        end.message
            .contains("removed from every node; a deploy brings it back"),
        "{}",
        end.message
    );
}

#[test]
fn a_node_that_refuses_or_is_cut_off_does_not_hold_the_others_and_nothing_starts_again() {
    let (mut r, sends) = stop(3, RolloutKind::Stop);
    let none = answer(
        &mut r,
        10,
        &sends[1..=1],
        Outcome::Failed("cannot stop web: the state dir is read-only".into()),
    );
    assert!(none.is_empty(), "nothing turns back: {none:?}");
    assert_eq!(r.state, RolloutState::Running, "the others go on");
    succeed(&mut r, 20, &sends[..1]);
    // The third is cut off mid-command: whether it stopped is not known.
    let mut now = 5_000;
    while !r.state.is_terminal() {
        let mut tick = healthy_tick(&r, now);
        if let Input::Tick { nodes } = &mut tick {
            nodes[2].connected = false;
        }
        let sent = handle(&mut r, now, tick);
        assert!(sent.is_empty(), "no other command: {sent:?}");
        now += 5_000;
        assert!(now < 600_000, "it ends");
    }
    assert_eq!(r.state, RolloutState::Failed);
    assert_eq!(r.nodes[0].state, NodeState::Stopped);
    assert!(r.nodes[1].refused && !r.nodes[1].uncertain);
    assert_eq!(r.nodes[1].release, NEW, "it serves what it served");
    assert!(!r.nodes[2].refused && r.nodes[2].uncertain);
    let end = r.timeline.last().unwrap();
    assert!(
        end.message
            .starts_with("2 nodes did not stop: node node-1, step stopping: cannot stop web"),
        "{}",
        end.message
    );
    assert!(
        end.message
            .contains("the converger stops them once they answer, or run `cutover service stop web --env test` again"),
        "{}",
        end.message
    );
    assert_eq!(r.rollback_failures.len(), 2);
}

#[test]
fn a_restart_resends_the_stops_in_flight_under_their_ids() {
    let (mut r, sends) = stop(3, RolloutKind::Stop);
    succeed(&mut r, 10, &sends[..1]);
    let resent = handle(&mut r, 1_000, Input::Recover);
    assert_eq!(ids(&resent), ids(&sends[1..]));
    assert!(resent.iter().all(|s| stops(s) == ("web", false)));
    succeed(&mut r, 1_100, &resent);
    assert_eq!(r.state, RolloutState::Succeeded);
}

#[test]
fn an_abort_lets_the_stops_in_flight_end_and_sends_nothing_more() {
    let mut r = rollout(3, strategy());
    r.kind = RolloutKind::Stop;
    r.previous = None;
    for node in &mut r.nodes {
        node.release = NEW.into();
        node.from_release = NEW.into();
    }
    r.stop_at_once();
    // One node at a time, as if the fleet were larger than the batch.
    r.batch_size = 1;
    let sends = handle(&mut r, 0, Input::Start);
    assert_eq!(sends.len(), 1);
    let none = handle(&mut r, 5, Input::Abort { by: "dana".into() });
    assert!(none.is_empty());
    let none = succeed(&mut r, 10, &sends);
    assert!(none.is_empty(), "no further stop: {none:?}");
    assert_eq!(r.state, RolloutState::Aborted);
    assert_eq!(r.nodes[0].state, NodeState::Stopped);
    assert_eq!(r.nodes[1].state, NodeState::Pending);
    assert!(
        r.timeline
            .last()
            .unwrap()
            .message
            .contains("nothing: node-0"),
        "{:?}",
        r.timeline.last()
    );
}

#[test]
fn a_stop_survives_its_store_round_trip() {
    let (r, _) = stop(2, RolloutKind::Remove);
    let json = serde_json::to_string(&r).unwrap();
    let read: Rollout = serde_json::from_str(&json).unwrap();
    assert_eq!(read, r);
    assert_eq!(read.phase, Phase::Stop);
    assert_eq!(read.steps, [Step::Stop]);
    assert!(read.nodes.iter().all(|n| n.state == NodeState::Stopping));
}

/// The stop a service is under outlives what did not take: a start that
/// failed (and stopped its nodes again), a request that sent nothing; a
/// start or deploy that took ends it.
#[test]
fn a_stop_holds_until_a_rollout_of_the_service_takes() {
    use super::stopping::stopped_after;
    use crate::store::{ServiceOutcome, StoppedBy};
    let (mut stopping, sends) = stop(2, RolloutKind::Stop);
    succeed(&mut stopping, 10, &sends);
    let stopped = stopped_after(&stopping, None).expect("a stop is one");
    assert_eq!(
        stopped,
        StoppedBy {
            rollout_id: stopping.id.clone(),
            removed: false
        }
    );
    let before = ServiceOutcome {
        env: stopping.env.clone(),
        service: stopping.service.clone(),
        rollout_id: stopping.id.clone(),
        kind: stopping.kind,
        state: stopping.state,
        auto_rollback: false,
        at_ms: 10,
        returned: false,
        refused: Vec::new(),
        stopped: Some(stopped.clone()),
    };
    let mut start = rollout(2, strategy());
    start.previous = None;
    start.next_command = 1;
    assert_eq!(
        stopped_after(&start, Some(&before)),
        Some(stopped.clone()),
        "a start that sent nothing changed nothing"
    );
    start.next_command = 3;
    for state in [
        RolloutState::RolledBack,
        RolloutState::Failed,
        RolloutState::Aborted,
    ] {
        start.state = state;
        assert_eq!(
            stopped_after(&start, Some(&before)),
            Some(stopped.clone()),
            "a start that ended {state:?} did not take"
        );
    }
    start.state = RolloutState::Succeeded;
    assert_eq!(stopped_after(&start, Some(&before)), None, "it took");
    let (remove, _) = stop(1, RolloutKind::Remove);
    assert!(stopped_after(&remove, Some(&before)).is_some_and(|s| s.removed));
}
