//! Incident lever metrics: which levers are set (taken in as they change,
//! and from the store at start), and, per node proxy, what they did and
//! what they apply (read from the heartbeats at each scrape).

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{clamp, Labels};
use crate::registry::NodeView;
use crate::store::LeverRecord;

/// (env, service, lever, node or "") → set.
type Known = BTreeMap<(String, String, &'static str, String), ()>;

#[derive(Default)]
pub struct LeverMetrics {
    set: Family<Labels, Gauge>,
    applied: Family<Labels, Gauge>,
    responses: Family<Labels, Gauge>,
    holding: Family<Labels, Gauge>,
    known: Mutex<Known>,
}

impl LeverMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "lever_set",
            "Incident levers operators set (cutover maintenance, throttle, pause-traffic), by environment, service, lever and node (empty: every node)",
            self.set.clone(),
        );
        registry.register(
            "proxy_lever_applied",
            "Incident levers each node proxy applies now, as its agent last reported",
            self.applied.clone(),
        );
        registry.register(
            "proxy_lever_responses",
            "Requests a node proxy's levers answered itself since its agent started (maintenance, throttled, hold_expired) or let through maintenance (bypassed); a counter that restarts with the agent",
            self.responses.clone(),
        );
        registry.register(
            "proxy_requests_held",
            "Requests a node proxy holds now under a pause",
            self.holding.clone(),
        );
    }

    /// `record` is set (or lifted).
    pub fn set(&self, record: &LeverRecord, on: bool) {
        let key = (
            record.env.clone(),
            record.service.clone(),
            record.kind.as_str(),
            record.node.clone(),
        );
        let mut known = self.known.lock().expect("lever metrics lock");
        match on {
            true => known.insert(key, ()),
            false => known.remove(&key),
        };
    }

    pub(super) fn render(&self, nodes: &[NodeView]) {
        for family in [&self.set, &self.applied, &self.responses, &self.holding] {
            family.clear();
        }
        for (env, service, lever, node) in self.known.lock().expect("lever metrics lock").keys() {
            let labels: Labels = vec![
                ("env".to_string(), env.clone()),
                ("service".to_string(), service.clone()),
                ("lever".to_string(), lever.to_string()),
                ("node".to_string(), node.clone()),
            ];
            self.set.get_or_create(&labels).set(1);
        }
        for view in nodes {
            for status in &view.record.services {
                let labels: Labels = vec![
                    ("node".to_string(), view.record.name.clone()),
                    ("service".to_string(), status.service.clone()),
                ];
                let with = |key: &str, value: &str| {
                    let mut labels = labels.clone();
                    labels.push((key.to_string(), value.to_string()));
                    labels
                };
                if let Some(levers) = &status.levers {
                    let applied = [
                        ("maintenance", levers.maintenance.is_some()),
                        ("throttle", levers.throttle.is_some()),
                        ("pause", levers.pause.is_some()),
                    ];
                    for (lever, on) in applied.into_iter().filter(|(_, on)| *on) {
                        self.applied
                            .get_or_create(&with("lever", lever))
                            .set(i64::from(on));
                    }
                }
                if let Some(c) = &status.lever_counts {
                    for (outcome, count) in [
                        ("maintenance", c.maintenance_answered),
                        ("bypassed", c.maintenance_bypassed),
                        ("throttled", c.throttled),
                        ("hold_expired", c.hold_expired),
                    ] {
                        self.responses
                            .get_or_create(&with("outcome", outcome))
                            .set(clamp(count));
                    }
                    self.holding.get_or_create(&labels).set(clamp(c.holding));
                }
            }
        }
    }
}
