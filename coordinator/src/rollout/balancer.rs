//! A rollout's side of the external load balancer (`crate::lb`): a node
//! whose command takes it out of the balancer (an activation with
//! `drain_first`) leaves it before the command goes, and returns once its
//! agent answered, whatever the answer; a rollout that ended makes the
//! server of every node of it ready, so a command cut short (a timeout, a
//! coordinator restart) leaves no server drained.
//!
//! A canary on some of the nodes (`balancer_split`) gets its share of the
//! fleet's requests from the balancer's weights: they follow the rollout
//! (`desired`), raised before a weight change goes to the canary nodes'
//! proxies, and back to the configured ones only once every canary node
//! settled (returned, or promoted), never while a proxy still sends all to
//! the canary.

use cutover_proto::v1 as pb;

use super::model::{NodeState, Rollout, RolloutNode};
use crate::lb::LoadBalancer;
use crate::registry::Registry;
use crate::store::NewEvent;

/// Whether `command` raises a canary node's share (a weight change: a
/// canary's weights only grow): under a balancer split it waits for the
/// balancer's weights.
pub(super) fn raises_share(command: &pb::Command) -> bool {
    matches!(&command.kind, Some(pb::command::Kind::SetTraffic(set)) if set.split.as_ref().is_some_and(|s| s.weight > 0))
}

/// Whether `command` takes its node out of the load balancer.
pub(super) fn drains(command: &pb::Command) -> bool {
    matches!(&command.kind, Some(pb::command::Kind::Activate(a)) if a.drain_first)
}

/// The server of node `node_id` in `lb`'s backend.
fn server_of(lb: &LoadBalancer, registry: &Registry, node_id: &str, node_name: &str) -> String {
    let labels = registry
        .list()
        .into_iter()
        .find(|v| v.record.id == node_id)
        .map(|v| v.record.labels)
        .unwrap_or_default();
    lb.server(node_name, &labels).to_string()
}

fn note(registry: &Registry, node_id: &str, node_name: &str, message: String) {
    tracing::info!(node = %node_name, "{message}");
    registry.journal().event(NewEvent {
        kind: "load_balancer",
        node_id: node_id.to_string(),
        node_name: node_name.to_string(),
        message,
    });
}

/// Drains the node's server and waits for its sessions to end (at most
/// the balancer's drain_timeout): the server to return afterwards. A
/// balancer that cannot be reached is noted and the command goes anyway:
/// the node's readiness path still takes it out.
pub(super) async fn leave(
    lb: &LoadBalancer,
    registry: &Registry,
    node_id: &str,
    node_name: &str,
) -> String {
    let server = server_of(lb, registry, node_id, node_name);
    let message = match lb.drain(&server).await {
        Ok(0) => format!("{}/{server} drained in HAProxy", lb.backend),
        Ok(left) => format!(
            "{}/{server} drained in HAProxy; {left} sessions still open after {} ms, the cutover goes ahead",
            lb.backend, lb.drain_timeout_ms
        ),
        Err(error) => format!(
            "cannot drain {}/{server} in HAProxy ({error}); the node's readiness path takes it out instead",
            lb.backend
        ),
    };
    note(registry, node_id, node_name, message);
    server
}

/// Makes `server` take requests again.
pub(super) async fn come_back(
    lb: &LoadBalancer,
    registry: &Registry,
    node_id: &str,
    node_name: &str,
    server: &str,
) {
    let message = match lb.ready(server).await {
        Ok(()) => format!("{}/{server} ready in HAProxy", lb.backend),
        Err(error) => format!(
            "cannot make {}/{server} ready in HAProxy ({error}); the rollout's end tries again",
            lb.backend
        ),
    };
    note(registry, node_id, node_name, message);
}

/// What a rollout that ended leaves behind in the balancer: every node's
/// server ready, and the weights, if it split there, as configured.
pub(super) async fn restore(lb: &LoadBalancer, registry: &Registry, rollout: &Rollout) {
    all_back(lb, registry, rollout).await;
    if desired(rollout).is_some() {
        if let Err(error) = apply_weights(lb, registry, rollout, Weights::Configured).await {
            let message = format!(
                "cannot set the {} weights back at the end of rollout {} ({error}); set them in HAProxy (`set server {}/SERVER weight 100%`)",
                lb.backend, rollout.id, lb.backend
            );
            note(registry, "", "", message);
        }
    }
}

/// At the end of `rollout`: every node of it takes requests from the
/// balancer again (its agent re-admits it after each command whatever the
/// outcome; a heartbeat from the middle of its cutover may still say
/// otherwise, so that is not asked).
async fn all_back(lb: &LoadBalancer, registry: &Registry, rollout: &Rollout) {
    let views = registry.list();
    for node in &rollout.nodes {
        let Some(view) = views.iter().find(|v| v.record.id == node.id) else {
            continue;
        };
        let server = lb.server(&node.name, &view.record.labels);
        if let Err(error) = lb.ready(server).await {
            let message = format!(
                "cannot make {}/{server} ready in HAProxy at the end of rollout {} ({error}); make it ready there (`set server {}/{server} state ready`)",
                lb.backend, rollout.id, lb.backend
            );
            note(registry, &node.id, &node.name, message);
        }
    }
}

/// The weights a rollout wants its nodes' servers to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Weights {
    /// As configured.
    Configured,
    /// The canary nodes together get this percent of the requests.
    Split(u32),
}

/// The weights `r` wants now; `None`: it leaves them alone (no canary
/// split through the balancer).
pub(super) fn desired(r: &Rollout) -> Option<Weights> {
    if !r.balancer_split || r.load_balancer.is_none() {
        return None;
    }
    if r.state.is_terminal() {
        return Some(Weights::Configured);
    }
    let target = super::engine::target_weight(r);
    let share = r
        .nodes
        .iter()
        .filter(|n| n.canary)
        .filter_map(|n| match n.state {
            // What it has, or is being given: raised first.
            NodeState::Weighting => Some(n.weight.max(target)),
            // Still sending all to the canary until its answer is in.
            NodeState::Canary | NodeState::RollingBack | NodeState::Activating => Some(n.weight),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    Some(match share {
        0 => Weights::Configured,
        share => Weights::Split(share),
    })
}

/// HAProxy weights (0 to 256) that give `canaries` servers together
/// `share` percent of the requests and `stables` servers the rest:
/// (each canary server's, each stable server's).
pub(super) fn split_weights(share: u32, canaries: usize, stables: usize) -> (u32, u32) {
    if share >= 100 || stables == 0 {
        return (256, 0);
    }
    if canaries == 0 {
        return (0, 256);
    }
    // canary / stable = share / (100 - share) * stables / canaries
    let ratio = f64::from(share) / f64::from(100 - share) * stables as f64 / canaries as f64;
    if ratio <= 1.0 {
        ((256.0 * ratio).round().max(1.0) as u32, 256)
    } else {
        (256, (256.0 / ratio).round().max(1.0) as u32)
    }
}

/// The weight of a server whose node serves nothing yet.
fn weight_when_idle(weights: Weights) -> Option<u32> {
    match weights {
        Weights::Configured => None,
        Weights::Split(_) => Some(0),
    }
}

/// Sets the weights of every node's server of `r`.
pub(super) async fn apply_weights(
    lb: &LoadBalancer,
    registry: &Registry,
    r: &Rollout,
    weights: Weights,
) -> Result<(), crate::lb::haproxy::HaproxyError> {
    let views = registry.list();
    let labels = |id: &str| {
        views
            .iter()
            .find(|v| v.record.id == id)
            .map(|v| v.record.labels.clone())
            .unwrap_or_default()
    };
    // The stable servers: the others that serve the stable release; one
    // that serves nothing yet takes nothing until the split ends.
    let stable_node = |n: &&RolloutNode| !n.canary && !n.from_release.is_empty();
    let canaries = r.nodes.iter().filter(|n| n.canary).count();
    let stables = r.nodes.iter().filter(stable_node).count();
    let (canary, stable) = match weights {
        Weights::Configured => (None, None),
        Weights::Split(share) => {
            let (c, s) = split_weights(share, canaries, stables);
            (Some(c), Some(s))
        }
    };
    // Never more than the share on the canary nodes meanwhile: the stable
    // servers first into a split, the canary ones first out of it.
    let mut order: Vec<&RolloutNode> = r.nodes.iter().collect();
    order.sort_by_key(|n| n.canary == matches!(weights, Weights::Split(_)));
    for node in order {
        let labels = labels(&node.id);
        let server = lb.server(&node.name, &labels);
        let weight = match (node.canary, stable_node(&node)) {
            (true, _) => canary,
            (false, true) => stable,
            (false, false) => weight_when_idle(weights),
        };
        lb.weight(server, weight).await?;
    }
    let message = match weights {
        Weights::Configured => format!("{} weights as configured again", lb.backend),
        Weights::Split(share) => format!(
            "{} weights: {canaries} canary nodes {}, the others {}, for {share}% of the requests",
            lb.backend,
            canary.unwrap_or_default(),
            stable.unwrap_or_default()
        ),
    };
    note(registry, "", "", message);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::canary_tests::{canary, succeed};
    use crate::rollout::engine::{fleet_weight, handle, Input};
    use crate::strategy::canary::CanaryStep;
    use crate::strategy::BatchSize;
    use cutover_proto::v1::command;

    /// A canary on 1 of 4 nodes behind HAProxy: the proxy of the canary
    /// node sends it everything, the balancer's weights give it the step's
    /// share, raised before the proxy's change goes and kept until the
    /// node returned.
    #[test]
    fn the_balancer_gives_the_share_and_keeps_it_until_the_canary_node_settled() {
        let steps = vec![CanaryStep::SetWeight(10), CanaryStep::Pause(None)];
        let mut r = crate::rollout::sim::rollout(4, canary(BatchSize::Count(1), steps));
        r.load_balancer = Some(LoadBalancer {
            runtime_api: "127.0.0.1:9999".into(),
            backend: "shop_web".into(),
            server_label: None,
            drain_timeout_ms: 1_000,
        });
        let prepares = handle(&mut r, 0, Input::Start);
        let stages = succeed(&mut r, 10, &prepares);
        assert!(r.balancer_split, "the canary is on 1 of 4 nodes");
        assert_eq!(
            desired(&r),
            Some(Weights::Configured),
            "nothing to shift yet"
        );
        let sets = succeed(&mut r, 20, &stages);
        let weights: Vec<u32> = sets
            .iter()
            .map(|s| match &s.command.kind {
                Some(command::Kind::SetTraffic(set)) => set.split.as_ref().unwrap().weight,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(weights, [100], "the canary node's proxy sends it all");
        assert_eq!(desired(&r), Some(Weights::Split(10)), "set before it goes");
        succeed(&mut r, 30, &sets);
        assert_eq!(r.nodes[0].weight, 10);
        assert_eq!(fleet_weight(&r, 10), 10.0);
        let returns = handle(&mut r, 40, Input::Abort { by: "bob".into() });
        assert_eq!(returns.len(), 1);
        assert_eq!(desired(&r), Some(Weights::Split(10)), "until it returned");
        succeed(&mut r, 50, &returns);
        assert_eq!(r.state, crate::rollout::model::RolloutState::Aborted);
        assert_eq!(desired(&r), Some(Weights::Configured));
        // Without a balancer the proxies split and the weights are left
        // alone.
        let plain = crate::rollout::sim::rollout(4, canary(BatchSize::Count(1), vec![]));
        assert_eq!(desired(&plain), None);
    }

    #[test]
    fn weights_give_the_canary_nodes_the_share_and_stay_in_range() {
        assert_eq!(split_weights(10, 1, 3), (85, 256));
        let (c, s) = split_weights(10, 1, 3);
        let share = f64::from(c) / f64::from(c + 3 * s);
        assert!((share - 0.10).abs() < 0.002, "{share}");
        for (share, canaries, stables) in
            [(1, 1, 9), (50, 1, 1), (75, 1, 3), (90, 2, 8), (99, 1, 1)]
        {
            let (c, s) = split_weights(share, canaries, stables);
            assert!(
                c <= 256 && s <= 256 && c >= 1,
                "{share} {canaries} {stables}"
            );
            let got = f64::from(c) * canaries as f64
                / (f64::from(c) * canaries as f64 + f64::from(s) * stables as f64);
            assert!(
                (got - f64::from(share) / 100.0).abs() < 0.01,
                "{share}% on {canaries}+{stables}: {got}"
            );
        }
        assert_eq!(split_weights(100, 1, 3), (256, 0));
    }
}
