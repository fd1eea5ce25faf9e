//! The periodic tick: commands past their deadline or to nodes out of
//! reach, the progress deadline, and switched nodes that must stay up and
//! healthy on the new release.

use super::commands::{healthy_deadline, timeout_for};
use super::{fail, on_result, Observation, Outcome, ServiceObservation};
use crate::rollout::model::{NodeState, Rollout, RolloutError, RolloutState};

pub(super) fn on_tick(r: &mut Rollout, now: i64, observations: &[Observation]) {
    if r.state.is_terminal() {
        return;
    }
    if let Some((task, why)) = super::once::overdue(r, now) {
        super::task_result(r, now, task, Outcome::Unknown(why));
    }
    let healthy_deadline = healthy_deadline(r);
    let lost_after = healthy_deadline.max(r.node_lost_after_ms as i64);
    let in_grace = now < r.lost_grace_until_ms;
    let seen: std::collections::HashMap<&str, &Observation> = observations
        .iter()
        .map(|o| (o.node_id.as_str(), o))
        .collect();
    // Commands without an answer in time, or to a node out of reach for
    // `lost_after`: a partitioned node must not hold the rollout (or its
    // rollback) for the whole command timeout. It counts as possibly
    // switched; once it is back, the converger brings it to its
    // environment's current release (a first deploy has none: the rollout
    // names the node and the operator decides).
    for i in 0..r.nodes.len() {
        let node = &r.nodes[i];
        if !node.state.in_flight() {
            continue;
        }
        let reachable = in_grace || seen.get(node.id.as_str()).is_some_and(|o| o.connected);
        let lost_for = if reachable {
            r.nodes[i].lost_since_ms = None;
            0
        } else {
            now - *r.nodes[i].lost_since_ms.get_or_insert(now)
        };
        let node = &r.nodes[i];
        let message = if now >= node.command_deadline_ms {
            format!(
                "no answer from node {} within {}s; it may be partitioned or down",
                node.name,
                timeout_for(r, node.state) / 1000
            )
        } else if lost_for >= lost_after {
            format!(
                "node {} has been unreachable for {}s; it may be partitioned or down",
                node.name,
                lost_for / 1000
            )
        } else {
            continue;
        };
        // A command that changes what runs may or may not have.
        let outcome = match node.state {
            NodeState::Activating
            | NodeState::RollingBack
            | NodeState::Staging
            | NodeState::Weighting
            | NodeState::Stopping => Outcome::Unknown(message),
            _ => Outcome::Failed(message),
        };
        r.nodes[i].lost_since_ms = None;
        on_result(r, now, i, outcome);
    }
    // Time at a canary's pause is the operator's to take.
    if r.state == RolloutState::Running
        && now >= r.deadline_ms
        && r.error.is_none()
        && !super::canary::at_pause(r)
    {
        fail(
            r,
            now,
            RolloutError {
                node: String::new(),
                step: "progress_deadline".into(),
                message: format!(
                    "the rollout did not finish within {}s (progress_deadline)",
                    r.strategy.progress_deadline_ms / 1000
                ),
            },
        );
    }
    if !matches!(r.state, RolloutState::Running | RolloutState::Paused) || r.error.is_some() {
        return;
    }
    // Switched nodes must stay up and healthy on the new release, canary
    // nodes with the release beside the stable one.
    let release = r.release.id().to_string();
    for i in 0..r.nodes.len() {
        if !matches!(
            r.nodes[i].state,
            NodeState::Switched | NodeState::Canary | NodeState::Weighting
        ) {
            continue;
        }
        // A node gone from the registry (replaced under another id) is as
        // lost as a disconnected one.
        let seen = seen.get(r.nodes[i].id.as_str()).copied();
        let node = &mut r.nodes[i];
        let name = node.name.clone();
        let Some(seen) = seen.filter(|s| s.connected) else {
            if in_grace {
                continue;
            }
            let since = *node.lost_since_ms.get_or_insert(now);
            if now - since >= healthy_deadline {
                fail(
                    r,
                    now,
                    RolloutError {
                        node: name,
                        step: "unreachable".into(),
                        message: format!(
                            "lost for {}s (healthy_deadline) while serving the new release",
                            (now - since) / 1000
                        ),
                    },
                );
            }
            continue;
        };
        node.lost_since_ms = None;
        if seen.last_seen_ms <= node.switched_at_ms {
            continue; // a heartbeat from before the switch says nothing
        }
        let failure = match &seen.service {
            Some(s) if node.state != NodeState::Switched => canary_failure(s, &release),
            None => Some((
                "release",
                "the node reports no release of the service".to_string(),
            )),
            Some(s) if s.release_id != release => Some((
                "release",
                format!(
                    "the node reports release {} instead of {release}",
                    s.release_id
                ),
            )),
            Some(s) if s.crashes > 0 => Some((
                "crash",
                format!("the release crashed {} times: {}", s.crashes, s.detail),
            )),
            Some(s) if !s.running || !s.healthy => Some((
                "health",
                format!("the release turned unhealthy: {}", s.detail),
            )),
            Some(_) => None,
        };
        match failure {
            Some((step, message)) => fail(
                r,
                now,
                RolloutError {
                    node: name,
                    step: step.into(),
                    message,
                },
            ),
            None => node.seen_healthy = true,
        }
    }
    // A canary's analysis samples what the proxies counted meanwhile.
    if r.error.is_none() {
        super::analysis::on_tick(r, now, &seen);
    }
}

/// What is wrong with a canary node's canary, as its heartbeat shows it.
fn canary_failure(seen: &ServiceObservation, release: &str) -> Option<(&'static str, String)> {
    match &seen.side {
        Some(side) if side.release_id == release && side.crashes > 0 => Some((
            "crash",
            format!("the canary crashed {} times: {}", side.crashes, side.detail),
        )),
        Some(side) if side.release_id == release && (!side.running || !side.healthy) => Some((
            "health",
            format!("the canary turned unhealthy: {}", side.detail),
        )),
        Some(side) if side.release_id == release => None,
        _ => Some((
            "canary",
            format!(
                "the canary {release} no longer runs beside release {}",
                seen.release_id
            ),
        )),
    }
}
