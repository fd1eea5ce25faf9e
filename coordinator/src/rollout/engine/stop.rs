//! A stop or removal of a service (`Step::Stop`, `cutover service stop` and
//! `remove`): every node gets its stop at once (the rollout's batch is its
//! whole fleet); each agent drains the release, stops it and closes the
//! service's port, and with a removal forgets the service.
//!
//! A node whose agent refuses, or whose answer never comes, keeps what it
//! may serve; the others go on. The rollout then ends failed, naming those
//! nodes; the converger stops them once they answer (a refusing one at the
//! next stop). A stop never turns back: nothing is started again.

use super::commands::{dispatch, settle};
use super::hooks::end_failed;
use super::rollback::{count_nodes, where_nodes_are};
use super::{describe, finish, in_flight, note, pause, Outcome, Send};
use crate::rollout::model::{NodeState, Rollout, RolloutError, RolloutKind, RolloutState};

pub(super) fn run(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    let waiting = |r: &Rollout| r.nodes.iter().any(|n| n.state == NodeState::Pending);
    if r.pause_requested && waiting(r) {
        if in_flight(r) == 0 {
            pause(r, now);
        }
        return;
    }
    let mut room = (r.batch_size as usize).saturating_sub(in_flight(r));
    for i in 0..r.nodes.len() {
        if room == 0 {
            break;
        }
        if r.nodes[i].state == NodeState::Pending {
            dispatch(r, now, i, NodeState::Stopping, sends);
            room -= 1;
        }
    }
    if waiting(r) || in_flight(r) > 0 {
        return;
    }
    let what = r.kind.as_str();
    if r.rollback_failures.is_empty() {
        let message = match r.kind {
            RolloutKind::Remove => format!(
                "{} removed from every node; a deploy brings it back",
                r.service
            ),
            _ => format!(
                "{} stopped on every node; `cutover service start {} --env {}` (or a deploy) starts it again",
                r.service, r.service, r.env
            ),
        };
        finish(r, now, RolloutState::Succeeded, message);
        return;
    }
    let message = format!(
        "{}; {}; the converger {what}s them once they answer, or run `cutover service {what} {} --env {}` again",
        failures(&r.rollback_failures),
        where_nodes_are(r),
        r.service,
        r.env,
    );
    end_failed(r, now, RolloutState::Failed, message);
}

/// The answer of node `i` to its stop.
pub(super) fn on_result(r: &mut Rollout, now: i64, i: usize, outcome: Outcome, refused: bool) {
    let name = r.nodes[i].name.clone();
    match outcome {
        Outcome::Succeeded => {
            let node = &mut r.nodes[i];
            node.release.clear();
            node.uncertain = false;
            settle(node, NodeState::Stopped);
            let what = match r.kind {
                RolloutKind::Remove => "removed",
                _ => "stopped",
            };
            note(
                r,
                now,
                "node_stopped",
                &name,
                format!("{name} {what} {}", r.service),
            );
        }
        Outcome::Failed(message) => {
            let node = &mut r.nodes[i];
            node.refused = refused;
            settle(node, NodeState::Failed);
            let stays = match refused {
                true => format!("it serves {} still", describe(&node.release)),
                false => "whether it stopped is not known until it answers".to_string(),
            };
            note(
                r,
                now,
                "node_stop_failed",
                &name,
                format!("{name}: {message}; {stays}"),
            );
            r.rollback_failures.push(RolloutError {
                node: name,
                step: NodeState::Stopping.as_str().to_string(),
                message,
            });
        }
        other => unreachable!("a stop's answer is plain: {other:?}"),
    }
}

/// A failure of the stop as a whole (its progress deadline): the nodes stay
/// where they are, the rollout ends once nothing is in flight.
pub(super) fn on_error(r: &mut Rollout, now: i64) {
    if in_flight(r) > 0 {
        return;
    }
    let error = r.error.clone().expect("called on an error");
    let mut message = format!("{error}; a {} does not turn back", r.kind.as_str());
    if !r.rollback_failures.is_empty() {
        message = format!("{message}; {}", failures(&r.rollback_failures));
    }
    message = format!(
        "{message}; {}; run `cutover service {} {} --env {}` again",
        where_nodes_are(r),
        r.kind.as_str(),
        r.service,
        r.env,
    );
    end_failed(r, now, RolloutState::Failed, message);
}

fn failures(failures: &[RolloutError]) -> String {
    let named: Vec<String> = failures.iter().map(ToString::to_string).collect();
    format!(
        "{} did not stop: {}",
        count_nodes(failures.len()),
        named.join("; ")
    )
}
