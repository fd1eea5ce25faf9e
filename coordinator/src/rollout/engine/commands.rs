//! The commands a node gets: which one its state calls for, under which
//! id, and how long it may take before it counts as lost.

use cutover_proto::v1::{self as pb, command};

use super::Send;
use crate::rollout::model::{NodeState, Rollout, RolloutKind, RolloutNode, StoredRelease};

/// Margin on top of a release's own deadlines before an activation without
/// an answer counts as lost: process start, smoke checks, stop.
const ACTIVATION_MARGIN_MS: i64 = 60_000;

/// How long a switched node may be lost or unhealthy: the release's
/// healthy_deadline.
pub(super) fn healthy_deadline(r: &Rollout) -> i64 {
    let release = &r.release.0;
    let ms = match &release.kind {
        Some(pb::release::Kind::Web(web)) => web.healthy_deadline_ms,
        Some(pb::release::Kind::Worker(worker)) => worker.healthy_deadline_ms,
        None => 30_000,
    };
    ms as i64
}

pub(super) fn timeout_for(r: &Rollout, state: NodeState) -> i64 {
    let release = match state {
        NodeState::RollingBack => r.previous.as_ref().map_or(&r.release.0, |p| &p.0),
        _ => &r.release.0,
    };
    match state {
        NodeState::Preparing => r.strategy.progress_deadline_ms as i64,
        // A proxy table swap.
        NodeState::Weighting => ACTIVATION_MARGIN_MS,
        _ => {
            let start = match &release.kind {
                Some(pb::release::Kind::Web(web)) => {
                    let smoke: u64 = web.smoke.iter().map(|c| c.timeout_ms).sum();
                    web.healthy_deadline_ms + smoke + web.drain_timeout_ms
                }
                Some(pb::release::Kind::Worker(worker)) => {
                    worker.healthy_deadline_ms + worker.min_healthy_time_ms
                }
                None => 0,
            };
            let stop = release.stop_grace_ms
                + if release.stop_command.is_empty() {
                    0
                } else {
                    release.stop_timeout_ms
                };
            // The release's pre/post_activate hooks run within the node's
            // cutover.
            let hooks: u64 = release.hooks.iter().map(|h| h.timeout_ms).sum();
            // So does its queue gate: the window and two reads of Redis
            // (5 s each at most).
            let gate = release
                .queues
                .as_ref()
                .filter(|q| q.gate_ms > 0)
                .map_or(0, |q| q.gate_ms + 10_000);
            // A node leaving the load balancer first waits for its
            // sessions there before the command goes (`rollout::balancer`).
            let drain = match r.strategy.drains_first() {
                true => r.load_balancer.as_ref().map_or(0, |lb| lb.drain_timeout_ms),
                false => 0,
            };
            // On a rollback's fast path nothing was prepared: a node whose
            // cache was pruned fetches first, bounded as a prepare is.
            let fetch = match state == NodeState::Activating && r.returns_at_once() {
                true => r.strategy.progress_deadline_ms,
                false => 0,
            };
            (start + stop + hooks + gate + drain + fetch) as i64 + ACTIVATION_MARGIN_MS
        }
    }
}

/// The command a node in an in-flight state has out, under its id.
pub(super) fn send_for(r: &Rollout, i: usize) -> Send {
    let node = &r.nodes[i];
    let canary = r.strategy.canary();
    let kind = match node.state {
        NodeState::Preparing => command::Kind::Prepare(pb::PrepareRelease {
            release: Some(r.release.0.clone()),
        }),
        // With max_unavailable > 0 the agent takes the node out of the load
        // balancer for its cutover and puts it back whatever the outcome:
        // one command, so no failure or restart can leave it drained. A
        // canary node's switch is its proxy's alone: nothing to drain for.
        // A canary keeps the stable release warm for its scale_down_delay.
        NodeState::Activating => command::Kind::Activate(pb::ActivateRelease {
            release: Some(r.release.0.clone()),
            drain_first: r.strategy.drains_first() && !node.canary,
            // Filled by the driver on the way out, never stored.
            secret_values: Default::default(),
            hook_env: hook_env(r, &r.release, r.previous.as_ref()),
            keep_previous_ms: canary.map_or(0, |c| c.scale_down_delay_ms),
            keep_previous_warm: canary.is_some_and(|c| c.keep_warm),
        }),
        // The canary starts beside the stable release, taking nothing yet.
        NodeState::Staging => command::Kind::StageRelease(pb::StageRelease {
            release: Some(r.release.0.clone()),
            secret_values: Default::default(),
            hook_env: hook_env(r, &r.release, r.previous.as_ref()),
            split: canary.map(|c| c.split(0)),
        }),
        NodeState::Weighting => command::Kind::SetTraffic(pb::SetTraffic {
            service: r.service.clone(),
            side_release_id: r.release.id().to_string(),
            split: canary.map(|c| {
                c.split(super::canary::proxy_weight(
                    r,
                    super::canary::target_weight(r),
                ))
            }),
        }),
        // Where the previous release still runs (a canary node, or one
        // within its scale_down_delay) this is a switch in the proxy; a
        // canary's release stays for abort_scale_down_delay, for debugging.
        NodeState::RollingBack => match &r.previous {
            Some(previous) => command::Kind::Activate(pb::ActivateRelease {
                release: Some(previous.0.clone()),
                drain_first: r.strategy.drains_first() && !node.canary,
                secret_values: Default::default(),
                hook_env: hook_env(r, previous, Some(&r.release)),
                keep_previous_ms: canary.map_or(0, |c| c.abort_scale_down_delay_ms),
                keep_previous_warm: false,
            }),
            None => command::Kind::StopService(pb::StopService {
                service: r.service.clone(),
                remove: false,
            }),
        },
        NodeState::Stopping => command::Kind::StopService(pb::StopService {
            service: r.service.clone(),
            remove: r.kind == RolloutKind::Remove,
        }),
        other => unreachable!("no command for a node in state {other:?}"),
    };
    Send {
        node_id: node.id.clone(),
        node_name: node.name.clone(),
        command: pb::Command {
            command_id: node
                .command_id
                .clone()
                .expect("in-flight nodes have a command id"),
            kind: Some(kind),
        },
    }
}

/// Moves node `i` into an in-flight state with a fresh command.
pub(super) fn dispatch(
    r: &mut Rollout,
    now: i64,
    i: usize,
    state: NodeState,
    sends: &mut Vec<Send>,
) {
    let id = format!("{}.{}", r.command_prefix, r.next_command);
    r.next_command += 1;
    let timeout = timeout_for(r, state);
    r.updated_at_ms = now;
    let node = &mut r.nodes[i];
    node.state = state;
    // A new command gets the whole grace, whatever the node went through.
    node.lost_since_ms = None;
    node.command_id = Some(id);
    node.command_deadline_ms = now + timeout;
    node.step.clear();
    sends.push(send_for(r, i));
}

pub(super) fn settle(node: &mut RolloutNode, state: NodeState) {
    node.state = state;
    node.command_id = None;
    node.step.clear();
}

/// What a hook learns of the deploy that runs it: `release` is the one it
/// runs with, `replacing` the one that served before.
pub(super) fn hook_env(
    r: &Rollout,
    release: &StoredRelease,
    replacing: Option<&StoredRelease>,
) -> std::collections::HashMap<String, String> {
    [
        ("CUTOVER_APP", r.app.as_str()),
        ("CUTOVER_ENV", r.env.as_str()),
        ("CUTOVER_RELEASE", release.id()),
        ("CUTOVER_VERSION", release.0.version.as_str()),
        ("CUTOVER_PREVIOUS_RELEASE", replacing.map_or("", |p| p.id())),
        ("CUTOVER_ROLLOUT", r.id.as_str()),
        ("CUTOVER_OPERATOR", r.created_by.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cutover_is_given_its_queue_gate_on_top() {
        let mut r = crate::rollout::sim::rollout(1, crate::rollout::sim::strategy());
        let without = timeout_for(&r, NodeState::Activating);
        r.release.0.queues = Some(pb::QueueProbe {
            gate_ms: 300_000,
            ..Default::default()
        });
        assert_eq!(
            timeout_for(&r, NodeState::Activating),
            without + 310_000,
            "the window and two reads of Redis"
        );
    }
}
