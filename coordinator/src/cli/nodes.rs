//! `cutover nodes`: the fleet as a table or as the stable JSON contract.

use std::time::{Duration, UNIX_EPOCH};

use cutover_coordinator::store::latency_quantile_ms;
use cutover_proto::v1::{self as pb, NodeStatus};
use serde_json::{json, Value};

pub(super) fn status_text(status: i32) -> &'static str {
    match NodeStatus::try_from(status) {
        Ok(NodeStatus::Ready) => "ready",
        Ok(NodeStatus::Unreachable) => "unreachable",
        Ok(NodeStatus::Revoked) => "revoked",
        _ => "unknown",
    }
}

pub fn rfc3339(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// The JSON contract of `cutover nodes --output json`: one object per node
/// with at least id, name, address, status, labels and last_seen.
pub fn to_json(nodes: &[pb::Node]) -> Value {
    Value::Array(
        nodes
            .iter()
            .map(|n| {
                let figures = n.figures.as_ref().map(|f| {
                    json!({
                        "cpu_percent": f.cpu_percent,
                        "load_1": f.load_1,
                        "load_5": f.load_5,
                        "load_15": f.load_15,
                        "memory_used_bytes": f.memory_used_bytes,
                        "memory_total_bytes": f.memory_total_bytes,
                        "disk_free_bytes": f.disk_free_bytes,
                        "disk_total_bytes": f.disk_total_bytes,
                        "uptime_seconds": f.uptime_seconds,
                        "release_disk_bytes": f.release_disk_bytes,
                        "os": f.os,
                        "cpus": f.cpus,
                    })
                });
                let labels: serde_json::Map<String, Value> = n
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                let services: Vec<Value> = n
                    .services
                    .iter()
                    .map(|s| {
                        json!({
                            "service": s.service,
                            "release": s.release_id,
                            "upstream": s.upstream,
                            "listen": s.listen,
                            "admitted": s.admitted,
                            "running": s.running,
                            "instances": s.instances.max(1),
                            "instances_up": s.instances_up,
                            "crashes": s.crashes,
                            "last_exit": s.last_exit,
                            "healthy": s.healthy,
                            "health_detail": s.health_detail,
                            "traffic": s.traffic.as_ref().map(traffic_json),
                            "side": s.side.as_ref().map(side_json),
                            "levers": s.levers.as_ref().map(levers_json),
                            "lever_counts": s.lever_counts.as_ref().map(|c| json!({
                                "maintenance_answered": c.maintenance_answered,
                                "maintenance_bypassed": c.maintenance_bypassed,
                                "throttled": c.throttled,
                                "held": c.held,
                                "hold_expired": c.hold_expired,
                                "holding": c.holding,
                            })),
                        })
                    })
                    .collect();
                json!({
                    "id": n.id,
                    "name": n.name,
                    "address": n.address,
                    "status": status_text(n.status),
                    "connected": n.connected,
                    "labels": labels,
                    "last_seen": rfc3339(n.last_seen_ms),
                    "last_seen_ms": n.last_seen_ms,
                    "registered_at": rfc3339(n.registered_at_ms),
                    "agent_version": n.agent_version,
                    "agent_build": n.agent_build,
                    "capabilities": n.capabilities,
                    "figures": figures,
                    "services": services,
                    "cert_serial": n.cert_serial,
                    "cert_expires_at": (n.cert_expires_at_ms != 0).then(|| rfc3339(n.cert_expires_at_ms)),
                })
            })
            .collect(),
    )
}

/// The levers a node proxy applies (a bypass secret shows as "(set)").
fn levers_json(l: &pb::TrafficLevers) -> Value {
    json!({
        "maintenance": l.maintenance.as_ref().map(|m| json!({
            "message": m.message,
            "retry_after_s": m.retry_after_s,
            "allow": m.allow,
            "bypass": !m.bypass_secret.is_empty(),
        })),
        "throttle": l.throttle.as_ref().map(|t| json!({
            "rps": t.rps,
            "burst": t.burst,
            "per": t.per,
            "path_prefix": t.path_prefix,
        })),
        "pause": l.pause.as_ref().map(|p| json!({
            "max_pause_ms": p.max_pause_ms,
            "since": rfc3339(p.since_ms),
        })),
    })
}

/// The release a node runs beside the serving one (a canary, or the
/// previous release kept warm) and its share of the requests.
fn side_json(side: &pb::SideRelease) -> Value {
    json!({
        "release": side.release_id,
        "weight": side.split.as_ref().map_or(0, |s| s.weight),
        "running": side.running,
        "healthy": side.healthy,
        "health_detail": side.health_detail,
        "crashes": side.crashes,
        "last_exit": side.last_exit,
        "traffic": side.traffic.as_ref().map(traffic_json),
        "retire_at": (side.retire_at_ms > 0).then(|| rfc3339(side.retire_at_ms)),
        "kept_warm": side.retire_at_ms < 0,
    })
}

fn traffic_json(t: &pb::ReleaseTraffic) -> Value {
    let quantile = |q| latency_quantile_ms(&t.latency_bounds_ms, &t.latency_cumulative, q);
    let by_class: serde_json::Map<String, Value> = t
        .by_class
        .iter()
        .enumerate()
        .map(|(i, count)| (format!("{}xx", i + 1), Value::from(*count)))
        .collect();
    json!({
        "release": t.release_id,
        "requests": t.requests,
        "by_class": by_class,
        "upstream_failures": t.upstream_failures,
        "p50_ms_at_most": quantile(0.5),
        "p99_ms_at_most": quantile(0.99),
    })
}

pub fn bytes(value: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = value as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

fn ago(ms: i64) -> String {
    let age = cutover_common::now_ms().saturating_sub(ms).max(0) as u64;
    format!("{}s ago", age / 1000)
}

pub fn to_table(nodes: &[pb::Node]) -> String {
    let mut rows = vec![[
        "NAME",
        "ID",
        "ADDRESS",
        "STATUS",
        "LAST SEEN",
        "CPU",
        "MEMORY",
        "DISK FREE",
        "RELEASES",
        "VERSION",
        "CERT EXPIRES",
        "LABELS",
        "SERVICES",
    ]
    .map(String::from)
    .to_vec()];
    for n in nodes {
        let (cpu, memory, disk, releases) = match &n.figures {
            Some(f) => (
                format!("{:.1}%", f.cpu_percent),
                format!(
                    "{}/{}",
                    bytes(f.memory_used_bytes),
                    bytes(f.memory_total_bytes)
                ),
                bytes(f.disk_free_bytes),
                bytes(f.release_disk_bytes),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let mut labels: Vec<_> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        rows.push(vec![
            n.name.clone(),
            n.id.chars().take(8).collect(),
            n.address.clone(),
            status_text(n.status).to_string(),
            ago(n.last_seen_ms),
            cpu,
            memory,
            disk,
            releases,
            cutover_coordinator::registry::agent_label(&n.agent_version, &n.agent_build),
            cert_expiry(n.cert_expires_at_ms),
            labels.join(","),
            services_cell(&n.services),
        ]);
    }
    render_table(&rows)
}

/// "in 6d 23h" (or "expired 2h ago"): how long the node's certificate has.
pub(super) fn cert_expiry(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let left = ms - cutover_common::now_ms();
    let span = |ms: i64| {
        let secs = (ms.unsigned_abs() / 1000) / 60 * 60;
        humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
    };
    if left >= 0 {
        format!("in {}", span(left))
    } else {
        format!("expired {} ago", span(left))
    }
}

/// "web=web-v2" per service, flagged when it is not serving normally.
fn services_cell(services: &[pb::ServiceState]) -> String {
    let cells: Vec<String> = services
        .iter()
        .map(|s| {
            let release = if s.release_id.is_empty() {
                "-"
            } else {
                &s.release_id
            };
            let mut cell = format!("{}={release}", s.service);
            if s.instances > 1 {
                cell.push_str(&format!(" x{}", s.instances));
                if s.running && s.instances_up < s.instances {
                    cell.push_str(&format!(" ({}/{} up)", s.instances_up, s.instances));
                }
            }
            if !s.release_id.is_empty() && !s.running {
                cell.push_str(" (down)");
            }
            if !s.release_id.is_empty() && s.running && !s.healthy {
                cell.push_str(" (unhealthy)");
            }
            if s.crashes > 0 {
                cell.push_str(&format!(" ({} crashes)", s.crashes));
            }
            if !s.admitted {
                cell.push_str(" (drained)");
            }
            if let Some(side) = &s.side {
                cell.push_str(&side_cell(side));
            }
            if let Some(levers) = &s.levers {
                cell.push_str(&levers_cell(levers));
            }
            cell
        })
        .collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(",")
    }
}

/// " (maintenance, throttle 100/s, paused)": the incident levers the
/// node's proxy applies.
pub(super) fn levers_cell(levers: &pb::TrafficLevers) -> String {
    let mut on = Vec::new();
    if levers.maintenance.is_some() {
        on.push("maintenance".to_string());
    }
    if let Some(t) = &levers.throttle {
        on.push(format!("throttle {}/s", t.rps));
    }
    if levers.pause.is_some() {
        on.push("paused".to_string());
    }
    match on.is_empty() {
        true => String::new(),
        false => format!(" ({})", on.join(", ")),
    }
}

/// " +web-v3 20%" for a canary taking a share, " +web-v1 (warm)" for a
/// release kept ready, flagged like the serving one.
fn side_cell(side: &pb::SideRelease) -> String {
    let weight = side.split.as_ref().map_or(0, |s| s.weight);
    let mut cell = match weight {
        0 => format!(" +{} (warm)", side.release_id),
        w => format!(" +{} {w}%", side.release_id),
    };
    if !side.running {
        cell.push_str(" (down)");
    } else if !side.healthy {
        cell.push_str(" (unhealthy)");
    }
    cell
}

pub fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_releases_take_shows_in_table_and_json() {
        let node = pb::Node {
            name: "web-1".into(),
            figures: Some(pb::SystemFigures {
                release_disk_bytes: 3 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = to_json(std::slice::from_ref(&node));
        assert_eq!(json[0]["figures"]["release_disk_bytes"], 3 << 20);
        let table = to_table(&[node]);
        let (head, row) = table.split_once('\n').unwrap();
        let column = head.find("RELEASES").expect(&table);
        assert!(row[column..].starts_with("3.0MiB"), "{table}");
    }

    #[test]
    fn a_scaled_service_shows_its_processes_and_those_up() {
        let service = |instances, instances_up| pb::ServiceState {
            service: "web".into(),
            release_id: "web-v2".into(),
            running: true,
            healthy: true,
            admitted: true,
            instances,
            instances_up,
            ..Default::default()
        };
        assert_eq!(services_cell(&[service(0, 1)]), "web=web-v2");
        assert_eq!(services_cell(&[service(3, 3)]), "web=web-v2 x3");
        assert_eq!(services_cell(&[service(3, 2)]), "web=web-v2 x3 (2/3 up)");
        let json = to_json(&[pb::Node {
            services: vec![service(0, 1)],
            ..Default::default()
        }]);
        assert_eq!(json[0]["services"][0]["instances"], 1);
    }

    #[test]
    fn a_side_release_shows_with_its_share_or_as_warm() {
        let service = |weight, healthy| pb::ServiceState {
            service: "web".into(),
            release_id: "web-v2".into(),
            running: true,
            healthy: true,
            admitted: true,
            side: Some(pb::SideRelease {
                release_id: "web-v3".into(),
                split: Some(pb::TrafficSplit {
                    weight,
                    ..Default::default()
                }),
                running: true,
                healthy,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            services_cell(&[service(20, true)]),
            "web=web-v2 +web-v3 20%"
        );
        assert_eq!(
            services_cell(&[service(0, false)]),
            "web=web-v2 +web-v3 (warm) (unhealthy)"
        );
        let node = pb::Node {
            services: vec![service(20, true)],
            ..Default::default()
        };
        let json = to_json(&[node]);
        assert_eq!(json[0]["services"][0]["side"]["release"], "web-v3");
        assert_eq!(json[0]["services"][0]["side"]["weight"], 20);
    }
}
