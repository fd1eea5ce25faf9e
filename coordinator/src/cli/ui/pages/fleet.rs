//! The fleet: every node as a tile colored by the release it serves, with
//! its health, grouped by environment and service; the nodes no service
//! selects after them.

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;
use maud::{html, Markup};

use super::{encode, rel, release_label, state_badge};
use crate::cli::nodes::levers_cell;
use crate::cli::ui::feed::Snapshot;
use crate::cli::ui::Ui;

/// Where a tile stands: a node's copy of a service (none when the node does
/// not run it), or a node in no service's group.
enum Place<'a> {
    Service {
        state: Option<&'a pb::ServiceState>,
        stopped: bool,
    },
    Ungrouped,
}

/// What a tile says, worst first.
fn health(node: &pb::Node, place: &Place) -> &'static str {
    if node.status == pb::NodeStatus::Revoked as i32 {
        return "revoked";
    }
    if !node.connected {
        return "unreachable";
    }
    let (service, stopped) = match place {
        Place::Ungrouped => return "ready",
        Place::Service { state, stopped } => (*state, *stopped),
    };
    match service {
        None if stopped => "stopped",
        None => "absent",
        Some(s) if s.release_id.is_empty() => "stopped",
        Some(s) if !s.running => "down",
        Some(s) if !s.healthy => "unhealthy",
        Some(s) if !s.admitted => "drained",
        Some(_) => "healthy",
    }
}

/// "1 node", "3 nodes".
fn count(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

pub fn render(ui: &Ui, snapshot: &Snapshot) -> Markup {
    let mut by_env: BTreeMap<&str, Vec<&pb::FleetService>> = BTreeMap::new();
    for service in &snapshot.fleet {
        by_env.entry(&service.env).or_default().push(service);
    }
    let placed: Vec<&str> = snapshot
        .fleet
        .iter()
        .flat_map(|s| s.node_ids.iter().map(String::as_str))
        .collect();
    let unplaced: Vec<&pb::Node> = snapshot
        .nodes
        .iter()
        .filter(|n| !placed.contains(&n.id.as_str()))
        .collect();
    let ready = snapshot
        .nodes
        .iter()
        .filter(|n| n.connected && n.status == pb::NodeStatus::Ready as i32)
        .count();
    html! {
        h1 { "Fleet" }
        p.summary {
            (count(snapshot.nodes.len(), "node")) ", " (ready) " ready; "
            (count(snapshot.fleet.len(), "service")) " in " (count(by_env.len(), "environment"))
        }
        @if snapshot.nodes.is_empty() {
            p.empty { "No node has joined yet: `cutover token create`, then `cutover-agent join` on the node." }
        }
        @for (env, services) in &by_env {
            section.env data-env=(env) {
                h2 { "Environment " (env) }
                @for service in services {
                    (service_group(ui, snapshot, service))
                }
            }
        }
        @if !unplaced.is_empty() {
            section.env data-env="" {
                h2 { "Nodes without a service" }
                div.tiles {
                    @for node in &unplaced {
                        (tile(snapshot, node, Place::Ungrouped, None))
                    }
                }
            }
        }
    }
}

fn service_group(ui: &Ui, snapshot: &Snapshot, service: &pb::FleetService) -> Markup {
    let rollout = (!service.rollout_id.is_empty())
        .then(|| snapshot.rollout(&service.rollout_id))
        .flatten();
    // The nodes the environment selects for the service.
    let mut nodes: Vec<&pb::Node> = service
        .node_ids
        .iter()
        .filter_map(|id| snapshot.node_by_id(id))
        .collect();
    let releases: Vec<(&pb::Node, Option<&pb::ServiceState>)> = nodes
        .drain(..)
        .map(|n| (n, n.services.iter().find(|s| s.service == service.service)))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, state) in &releases {
        if let Some(s) = state.filter(|s| !s.release_id.is_empty()) {
            *counts.entry(&s.release_id).or_default() += 1;
        }
    }
    let current = service.release.as_ref().map(|r| r.id.as_str());
    html! {
        div.service data-service=(service.service) {
            h3 {
                (service.service)
                span.muted { " (" (service.app) ", nodes " (service.selector) ")" }
                @if let Some(current) = current { " current " (release_label(snapshot, current)) }
                @if service.removed { " " (state_badge("removed")) }
                @else if service.stopped { " " (state_badge("stopped")) }
                @if let Some(lock) = &service.lock {
                    " " span.badge.wait title=(format!("{} by {}", lock.reason, lock.by)) { "locked" }
                }
                @if let Some(r) = rollout {
                    " " a.rollout-link href=(rel(&format!("/rollouts/{}", encode(&r.id)))) {
                        (r.kind) " " (r.release.as_ref().map_or("", |x| x.version.as_str())) " "
                    }
                    (state_badge(r.state().as_str()))
                    // Said where the fleet is watched, not only on the
                    // rollout's page.
                    @if r.canary.as_ref().is_some_and(|c| c.awaiting_promotion) {
                        " " (state_badge("awaiting_promotion"))
                    }
                }
                @if ui.may_deploy(&service.env) {
                    " " a.small href=(rel(&format!("/releases?env={}&service={}", encode(&service.env), encode(&service.service)))) { "releases" }
                }
            }
            div.legend {
                @for (release, count) in &counts {
                    span { (release_label(snapshot, release)) " × " (count) }
                }
            }
            div.tiles {
                @for (node, state) in &releases {
                    (tile(snapshot, node, Place::Service { state: *state, stopped: service.stopped }, rollout))
                }
                @if releases.is_empty() {
                    p.empty { "No node matches " (service.selector) "." }
                }
            }
        }
    }
}

/// One node: colored by the release it serves (grey when none), its health
/// in words, and what a rollout does to it now.
fn tile(
    snapshot: &Snapshot,
    node: &pb::Node,
    place: Place,
    rollout: Option<&pb::Rollout>,
) -> Markup {
    let state = match place {
        Place::Service { state, .. } => state,
        Place::Ungrouped => None,
    };
    let release = state.map_or("", |s| s.release_id.as_str());
    let health = health(node, &place);
    let step = rollout
        .and_then(|r| r.nodes.iter().find(|n| n.id == node.id))
        .filter(|n| !super::rollouts::at_rest(n.state()));
    let style = match release.is_empty() {
        true => String::new(),
        false => format!("--hue:{}", snapshot.colors.hue(release)),
    };
    let version = match release {
        "" => "no release".to_string(),
        id => snapshot.version_of(id).unwrap_or(id).to_string(),
    };
    let side = state.and_then(|s| s.side.as_ref());
    let mut class = format!("tile {health}");
    if step.is_some() {
        class.push_str(" changing");
    }
    if release.is_empty() {
        class.push_str(" none");
    }
    html! {
        a class=(class)
            href=(rel(&format!("/nodes/{}", encode(&node.name))))
            data-node=(node.name) data-release=(release) data-health=(health)
            style=(style)
            title=(format!("{}: {} ({health})", node.name, if release.is_empty() { "no release" } else { release })) {
            span.name { (node.name) }
            span.version { (version) }
            @if let Some(side) = side {
                @let weight = side.split.as_ref().map_or(0, |s| s.weight);
                span.side style=(format!("--hue:{}", snapshot.colors.hue(&side.release_id))) {
                    "+" (snapshot.version_of(&side.release_id).unwrap_or(&side.release_id))
                    @if weight > 0 { " " (weight) "%" } @else { " warm" }
                }
            }
            span.health { (health.replace('_', " ")) }
            // An incident lever its proxy applies (maintenance, throttle,
            // pause): seen on the grid, not only on the node's page.
            @if let Some(levers) = state.and_then(|s| s.levers.as_ref()).map(levers_cell).filter(|l| !l.is_empty()) {
                span.lever { (levers.trim().trim_matches(['(', ')'])) }
            }
            @if let Some(step) = step {
                span.step { (step.state().as_str().replace('_', " ")) }
            }
        }
    }
}
