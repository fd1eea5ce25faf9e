//! Rolling back after a failure: the nodes that serve the new release (or
//! may) return to the previous one, all at once (the fast path, bounded by
//! `rollback_parallelism`) or a strategy batch at a time
//! (`rollback = "batched"`).

use super::commands::dispatch;
use super::hooks::end_failed;
use super::{finish, in_flight, note, Send};
use crate::rollout::model::{NodeState, Rollout, RolloutNode, RolloutState};
use crate::strategy::RollbackPace;

/// Whether a rollback must return this node: it serves the new release
/// (switched by this rollout, or already before it), or its command's fate
/// is unknown, or it is a canary node whose command failed (a refused
/// weight change leaves the canary beside the stable release with its old
/// share; the return takes it back, and is a no-op where nothing runs).
pub(super) fn needs_revert(node: &RolloutNode) -> bool {
    matches!(
        node.state,
        NodeState::Switched | NodeState::Unchanged | NodeState::Canary
    ) || (node.state == NodeState::Failed && (node.uncertain || node.canary))
}

/// Says which nodes were just sent back to `to` (none: nothing to say).
pub(super) fn note_returning(r: &mut Rollout, now: i64, started: &[String], to: &str) {
    if started.is_empty() {
        return;
    }
    let message = format!(
        "returning {} to {to}: {}",
        count_nodes(started.len()),
        started.join(", ")
    );
    note(r, now, "returning", "", message);
}

/// "1 node", "3 nodes".
pub(super) fn count_nodes(n: usize) -> String {
    match n {
        1 => "1 node".to_string(),
        n => format!("{n} nodes"),
    }
}

pub(super) fn where_nodes_are(r: &Rollout) -> String {
    let mut by_release: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for node in &r.nodes {
        let release = if node.release.is_empty() {
            "nothing"
        } else {
            node.release.as_str()
        };
        by_release.entry(release).or_default().push(&node.name);
    }
    by_release
        .iter()
        .map(|(release, nodes)| format!("{release}: {}", nodes.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) fn roll_back(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    // A canary's nodes return at once: the stable release still runs
    // there (its canary nodes', or within its scale_down_delay). Others
    // take the strategy's rollback pace: the release they return to ran
    // there a moment ago.
    let limit = match (r.strategy.canary(), r.strategy.rollback) {
        (Some(_), _) => r.nodes.len(),
        (None, RollbackPace::Fast) => r.strategy.returning_at_once(r.nodes.len()),
        // Nodes that drain first: never more out than max_unavailable.
        (None, RollbackPace::Batched) if r.strategy.drains_first() => {
            (r.batch_size as usize).min(r.strategy.batches().max_unavailable as usize)
        }
        (None, RollbackPace::Batched) => r.batch_size as usize,
    };
    let mut room = limit.saturating_sub(
        r.nodes
            .iter()
            .filter(|n| n.state == NodeState::RollingBack)
            .count(),
    );
    let mut started = Vec::new();
    for i in 0..r.nodes.len() {
        if room == 0 {
            break;
        }
        let stays = r.keep_switched && r.nodes[i].state != NodeState::Canary;
        if needs_revert(&r.nodes[i])
            && !stays
            && !r
                .rollback_failures
                .iter()
                .any(|f| f.node == r.nodes[i].name)
        {
            dispatch(r, now, i, NodeState::RollingBack, sends);
            started.push(r.nodes[i].name.clone());
            room -= 1;
        }
    }
    let to = r
        .previous
        .as_ref()
        .map_or("no release".to_string(), |p| p.id().to_string());
    note_returning(r, now, &started, &to);
    if in_flight(r) > 0 {
        return;
    }
    // An abort (a canary's) that returned every node.
    let Some(error) = r.error.clone() else {
        let summary = match r.rollback_failures.is_empty() {
            true => format!("every node serves {to}"),
            false => {
                let failed: Vec<String> =
                    r.rollback_failures.iter().map(|f| f.to_string()).collect();
                format!("{}; the operator must act", failed.join("; "))
            }
        };
        finish(r, now, RolloutState::Aborted, format!("aborted; {summary}"));
        return;
    };
    if r.keep_switched {
        let switched = r
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Switched)
            .count();
        let failed: Vec<String> = r.rollback_failures.iter().map(|f| f.to_string()).collect();
        let canaries = match failed.is_empty() {
            true => "the canary nodes serve the stable release again".to_string(),
            false => format!("returning the canary nodes failed: {}", failed.join("; ")),
        };
        end_failed(
            r,
            now,
            RolloutState::Failed,
            format!("{error}; auto_rollback is off: {switched} nodes serve the new release; {canaries}; roll back or deploy again"),
        );
    } else if r.rollback_failures.is_empty() {
        end_failed(
            r,
            now,
            RolloutState::RolledBack,
            format!("every node serves {to}; the cause: {error}"),
        );
    } else {
        let failed: Vec<String> = r.rollback_failures.iter().map(|f| f.to_string()).collect();
        end_failed(
            r,
            now,
            RolloutState::Failed,
            format!(
                "rollback incomplete after: {error}; {}; the operator must act",
                failed.join("; ")
            ),
        );
    }
}
