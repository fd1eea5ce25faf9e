//! A rollout's side of the external load balancer (`crate::lb`): a node
//! whose command takes it out of the balancer (an activation with
//! `drain_first`) leaves it before the command goes, and returns once its
//! agent answered, whatever the answer; a rollout that ended makes the
//! server of every node still admitted ready, so a command cut short (a
//! timeout, a coordinator restart) leaves no server drained.

use cutover_proto::v1 as pb;

use super::model::Rollout;
use crate::lb::LoadBalancer;
use crate::registry::Registry;
use crate::store::NewEvent;

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

/// At the end of `rollout`: every node of it that its agent reports
/// admitted takes requests from the balancer again (one an operator
/// drained stays drained).
pub(super) async fn all_back(lb: &LoadBalancer, registry: &Registry, rollout: &Rollout) {
    let views = registry.list();
    for node in &rollout.nodes {
        let Some(view) = views.iter().find(|v| v.record.id == node.id) else {
            continue;
        };
        let admitted = view
            .record
            .services
            .iter()
            .find(|s| s.service == rollout.service)
            .is_none_or(|s| s.admitted);
        if !admitted {
            continue;
        }
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
