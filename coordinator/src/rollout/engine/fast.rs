//! A rollback's fast path (`Step::Return`). The release it returns to is a
//! kept one that was stable here, so nothing is prepared ahead and nothing
//! is watched: every node gets its activation at once (up to
//! `Strategy::returning_at_once`), and each agent takes the release from
//! its cache (fetching it only where it was pruned), starts it,
//! health-gates and smoke-tests it before its proxy switches; where it
//! still runs (a warm standby), the switch is the proxy's alone.
//!
//! A node whose agent refuses it (the release cannot start there) keeps
//! serving what it served; the others go on. The rollout then ends failed,
//! naming those nodes and why. A fast rollback never turns back: the
//! release it left is the one the operator rolled back from.

use super::commands::dispatch;
use super::hooks::end_failed;
use super::rollback::{count_nodes, note_returning, where_nodes_are};
use super::steps::step_done;
use super::{in_flight, pause, Send};
use crate::rollout::model::{NodeState, Rollout, RolloutError, RolloutState};

pub(super) fn run(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    let waiting = |r: &Rollout| r.nodes.iter().any(|n| n.state == NodeState::Pending);
    if r.pause_requested && waiting(r) {
        // Only a rollback returning fewer nodes at once than it has can
        // stop between them.
        if in_flight(r) == 0 {
            pause(r, now);
        }
        return;
    }
    let mut room = (r.batch_size as usize).saturating_sub(in_flight(r));
    let mut started = Vec::new();
    for i in 0..r.nodes.len() {
        if room == 0 {
            break;
        }
        if r.nodes[i].state == NodeState::Pending {
            dispatch(r, now, i, NodeState::Activating, sends);
            started.push(r.nodes[i].name.clone());
            room -= 1;
        }
    }
    let to = r.release.id().to_string();
    note_returning(r, now, &started, &to);
    if waiting(r) || in_flight(r) > 0 {
        return;
    }
    if r.rollback_failures.is_empty() {
        step_done(r, now, None);
        return;
    }
    let message = format!(
        "{}; {}; fix what stops {to} there, then run `cutover rollback {} --env {} --to {to}` again (nodes on it stay as they are)",
        failures(&r.rollback_failures),
        where_nodes_are(r),
        r.service,
        r.env,
    );
    end_failed(r, now, RolloutState::Failed, message);
}

/// A failure of the fast path as a whole (its deadline, or a returned node
/// that crashed while others still returned): the nodes stay where they
/// are, the rollout ends once nothing is in flight.
pub(super) fn on_error(r: &mut Rollout, now: i64) {
    if in_flight(r) > 0 {
        return;
    }
    let error = r.error.clone().expect("called on an error");
    let mut message = format!("{error}; a rollback does not turn back");
    if !r.rollback_failures.is_empty() {
        message = format!("{message}; {}", failures(&r.rollback_failures));
    }
    message = format!(
        "{message}; {}; roll back again (`cutover rollback {} --env {} --to {}`) or deploy",
        where_nodes_are(r),
        r.service,
        r.env,
        r.release.id()
    );
    end_failed(r, now, RolloutState::Failed, message);
}

fn failures(failures: &[RolloutError]) -> String {
    let named: Vec<String> = failures.iter().map(ToString::to_string).collect();
    format!(
        "{} did not return: {}",
        count_nodes(failures.len()),
        named.join("; ")
    )
}
