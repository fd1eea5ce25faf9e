//! One node: where it is, how it is (CPU, memory, disk, certificate), and
//! each service it runs, drained or not, with the levers its proxy applies.

use cutover_proto::v1 as pb;
use maud::{html, Markup};

use super::{release_label, state_badge, when, PageError};
use crate::cli::nodes::{bytes, cert_expiry, levers_cell, status_text};
use crate::cli::ui::feed::Snapshot;

pub fn render(snapshot: &Snapshot, name: &str) -> Result<Markup, PageError> {
    let Some(node) = snapshot.node(name) else {
        return Err(PageError::not_found(format!(
            "There is no node {name}. The fleet page lists every node."
        )));
    };
    let status = match (node.connected, status_text(node.status)) {
        (false, "ready") => "unreachable",
        (_, status) => status,
    };
    let mut labels: Vec<String> = node
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    labels.sort();
    Ok(html! {
        h1 { "Node " (node.name) " " (state_badge(status)) }
        dl.facts {
            dt { "Address" } dd { (node.address) }
            dt { "Labels" } dd { @if labels.is_empty() { "none" } @else { (labels.join(", ")) } }
            dt { "Agent" } dd { (cutover_coordinator::registry::agent_label(&node.agent_version, &node.agent_build)) }
            dt { "Last seen" } dd { (when(node.last_seen_ms)) }
            dt { "Certificate" } dd data-cert-expiry=(node.cert_expires_at_ms) {
                "expires " (when(node.cert_expires_at_ms)) " (" (cert_expiry(node.cert_expires_at_ms)) ")"
            }
            @if let Some(f) = &node.figures { (figures(f)) }
        }
        h2 { "Services" }
        @if node.services.is_empty() {
            p.empty { "It runs no service." }
        } @else {
            table.services {
                thead { tr { th { "Service" } th { "Release" } th { "State" } th { "Processes" } th { "Beside it" } th { "Levers" } th { "Crashes" } } }
                tbody {
                    @for s in &node.services {
                        tr data-service=(s.service) {
                            td { (s.service) }
                            td { (release_label(snapshot, &s.release_id)) }
                            td {
                                @if s.release_id.is_empty() { (state_badge("stopped")) }
                                @else if !s.running { (state_badge("down")) }
                                @else if !s.healthy { (state_badge("unhealthy")) span.muted { " " (s.health_detail) } }
                                @else { (state_badge("healthy")) }
                                @if !s.admitted { " " (state_badge("drained")) }
                            }
                            td { (s.instances_up) "/" (s.instances.max(1)) }
                            td { @if let Some(side) = &s.side { (side_text(snapshot, side)) } }
                            td.levers { @if let Some(l) = &s.levers { (levers_cell(l).trim().trim_matches(['(', ')'])) } }
                            td { (s.crashes) @if !s.last_exit.is_empty() { span.muted { " (" (s.last_exit) ")" } } }
                        }
                    }
                }
            }
        }
    })
}

fn figures(f: &pb::SystemFigures) -> Markup {
    let share = |used: u64, total: u64| (used * 100).checked_div(total).unwrap_or(0);
    let disk_used = f.disk_total_bytes.saturating_sub(f.disk_free_bytes);
    html! {
        dt { "System" } dd { (f.os) ", " (f.cpus) " CPUs, up " (humantime::format_duration(std::time::Duration::from_secs(f.uptime_seconds))) }
        dt { "CPU" } dd { (meter(f.cpu_percent.round() as u64)) (format!("{:.1}%", f.cpu_percent)) ", load " (format!("{:.2} {:.2} {:.2}", f.load_1, f.load_5, f.load_15)) }
        dt { "Memory" } dd { (meter(share(f.memory_used_bytes, f.memory_total_bytes))) (bytes(f.memory_used_bytes)) " of " (bytes(f.memory_total_bytes)) }
        dt { "Disk" } dd { (meter(share(disk_used, f.disk_total_bytes))) (bytes(f.disk_free_bytes)) " free of " (bytes(f.disk_total_bytes)) "; releases take " (bytes(f.release_disk_bytes)) }
    }
}

fn meter(percent: u64) -> Markup {
    html! { meter min="0" max="100" high="85" value=(percent.min(100)) {} " " }
}

fn side_text(snapshot: &Snapshot, side: &pb::SideRelease) -> Markup {
    let weight = side.split.as_ref().map_or(0, |s| s.weight);
    html! {
        (release_label(snapshot, &side.release_id))
        @if weight > 0 { " gets " (weight) "%" } @else { " kept warm" }
        @if !side.running { " " (state_badge("down")) } @else if !side.healthy { " " (state_badge("unhealthy")) }
    }
}
