//! The `proxy` provider: the node proxies count every response of each
//! release (by status class, with a latency histogram) and report the
//! totals in every heartbeat. A sample is the difference between two
//! reports of the canary nodes, the canary (their side release) against
//! the stable release (the one they serve) in the same window, on the same
//! machines, under the same traffic mix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::Traffic;

/// The names a proxy condition may use.
pub const VALUES: [&str; 12] = [
    "canary_requests",
    "stable_requests",
    "canary_success_rate",
    "stable_success_rate",
    "canary_error_rate",
    "stable_error_rate",
    "canary_p50",
    "stable_p50",
    "canary_p90",
    "stable_p90",
    "canary_p99",
    "stable_p99",
];

/// What one canary node's proxy counted so far, per release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounts {
    pub canary: Traffic,
    pub stable: Traffic,
}

/// The counts of a window, summed over the nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    pub canary: Traffic,
    pub stable: Traffic,
}

/// The window from `baseline` to `now`, node by node. A node missing from
/// either is left out (its totals would hold traffic from before the
/// window); a total lower than before means the agent restarted and counts
/// from zero: all of it is in the window.
pub fn window(
    baseline: &BTreeMap<String, NodeCounts>,
    now: &BTreeMap<String, NodeCounts>,
) -> Window {
    let mut out = Window::default();
    for (node, counts) in now {
        let Some(before) = baseline.get(node) else {
            continue;
        };
        add(&mut out.canary, &since(&counts.canary, &before.canary));
        add(&mut out.stable, &since(&counts.stable, &before.stable));
    }
    out
}

/// `now` minus `before`, or all of `now` after a restart (any count went
/// down: a restarted agent counts from zero, and on a busy node may have
/// passed the old total already) or when the histogram's buckets changed
/// (an agent upgrade).
fn since(now: &Traffic, before: &Traffic) -> Traffic {
    let down = |a: &[u64], b: &[u64]| a.iter().zip(b).any(|(x, y)| x < y) || a.len() < b.len();
    let restarted = now.requests < before.requests
        || down(&now.by_class, &before.by_class)
        || down(&now.latency_cumulative, &before.latency_cumulative)
        || now.latency_bounds_ms != before.latency_bounds_ms
        || now.release_id != before.release_id;
    if restarted {
        return now.clone();
    }
    let minus = |a: &[u64], b: &[u64]| -> Vec<u64> {
        a.iter()
            .enumerate()
            .map(|(i, v)| v.saturating_sub(b.get(i).copied().unwrap_or(0)))
            .collect()
    };
    Traffic {
        release_id: now.release_id.clone(),
        requests: now.requests - before.requests,
        by_class: minus(&now.by_class, &before.by_class),
        upstream_failures: now
            .upstream_failures
            .saturating_sub(before.upstream_failures),
        latency_bounds_ms: now.latency_bounds_ms.clone(),
        latency_cumulative: minus(&now.latency_cumulative, &before.latency_cumulative),
        latency_sum_us: now.latency_sum_us.saturating_sub(before.latency_sum_us),
    }
}

/// Adds `part` into `sum`; latency only where the buckets are the same
/// (agents of different versions may count in different ones).
fn add(sum: &mut Traffic, part: &Traffic) {
    let plus = |a: &mut Vec<u64>, b: &[u64]| {
        if a.len() < b.len() {
            a.resize(b.len(), 0);
        }
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    };
    sum.requests += part.requests;
    plus(&mut sum.by_class, &part.by_class);
    sum.upstream_failures += part.upstream_failures;
    if sum.latency_bounds_ms.is_empty() {
        sum.latency_bounds_ms = part.latency_bounds_ms.clone();
    }
    if sum.latency_bounds_ms == part.latency_bounds_ms {
        plus(&mut sum.latency_cumulative, &part.latency_cumulative);
        sum.latency_sum_us += part.latency_sum_us;
    }
}

impl Window {
    /// The values a condition reads. Rates and quantiles of a release
    /// without requests in the window are absent (a condition on them has
    /// no verdict).
    pub fn values(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (who, t) in [("canary", &self.canary), ("stable", &self.stable)] {
            out.insert(format!("{who}_requests"), t.requests as f64);
            if t.requests == 0 {
                continue;
            }
            let errors = t.by_class.get(4).copied().unwrap_or(0) as f64;
            let error_rate = errors / t.requests as f64;
            out.insert(format!("{who}_error_rate"), error_rate);
            out.insert(format!("{who}_success_rate"), 1.0 - error_rate);
            for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
                if let Some(ms) = quantile_ms(t, q) {
                    out.insert(format!("{who}_{name}"), ms as f64);
                }
            }
        }
        out
    }
}

/// The upper bound of the bucket holding quantile `q`; beyond the last
/// bound, that bound (the release is at least that slow: a condition on it
/// must still be able to fail).
fn quantile_ms(t: &Traffic, q: f64) -> Option<u64> {
    let counted = t.latency_cumulative.last().is_some_and(|n| *n > 0);
    t.quantile_ms(q).or_else(|| {
        counted
            .then(|| t.latency_bounds_ms.last().copied())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [u64; 4] = [10, 20, 50, 100];

    /// Totals of `ok` 2xx answers at 8 ms and `errors` 5xx at 40 ms.
    fn traffic(release: &str, ok: u64, errors: u64) -> Traffic {
        Traffic {
            release_id: release.into(),
            requests: ok + errors,
            by_class: vec![0, ok, 0, 0, errors],
            upstream_failures: 0,
            latency_bounds_ms: BOUNDS.to_vec(),
            latency_cumulative: vec![ok, ok, ok + errors, ok + errors, ok + errors],
            latency_sum_us: 0,
        }
    }

    fn node(canary: (u64, u64), stable: (u64, u64)) -> NodeCounts {
        NodeCounts {
            canary: traffic("web-v2", canary.0, canary.1),
            stable: traffic("web-v1", stable.0, stable.1),
        }
    }

    #[test]
    fn a_window_is_the_difference_summed_over_the_nodes() {
        let baseline = BTreeMap::from([
            ("a".to_string(), node((10, 0), (90, 0))),
            ("b".to_string(), node((5, 5), (50, 0))),
        ]);
        let now = BTreeMap::from([
            ("a".to_string(), node((100, 0), (900, 0))),
            ("b".to_string(), node((5, 15), (140, 0))),
            // Not in the baseline: left out of this window.
            ("c".to_string(), node((1000, 1000), (0, 0))),
        ]);
        let w = window(&baseline, &now);
        assert_eq!(w.canary.requests, 100);
        assert_eq!(w.stable.requests, 900);
        let v = w.values();
        assert_eq!(v["canary_error_rate"], 0.1);
        assert_eq!(v["canary_success_rate"], 0.9);
        assert_eq!(v["stable_success_rate"], 1.0);
        assert_eq!(v["stable_p99"], 10.0);
        assert_eq!(v["canary_p50"], 10.0);
        assert_eq!(v["canary_p99"], 50.0, "the 5xx answers took 40 ms");
    }

    #[test]
    fn a_restart_on_a_busy_node_and_a_release_beyond_the_last_bucket_are_read_right() {
        // The agent restarted and already counted more than before, but
        // fewer 5xx: the window is all of it, never a negative count.
        let baseline = BTreeMap::from([("a".to_string(), node((10, 50), (0, 0)))]);
        let now = BTreeMap::from([("a".to_string(), node((100, 1), (0, 0)))]);
        let v = window(&baseline, &now).values();
        assert_eq!(v["canary_requests"], 101.0);
        assert_eq!(v["canary_error_rate"], 1.0 / 101.0);
        // Every answer slower than the last bound: p99 is at least it.
        let mut slow = traffic("web-v2", 10, 0);
        slow.latency_cumulative = vec![0, 0, 0, 0, 10];
        let w = Window {
            canary: slow,
            stable: traffic("web-v1", 10, 0),
        };
        assert_eq!(w.values()["canary_p99"], 100.0);
    }

    #[test]
    fn an_agent_restart_counts_from_zero_and_an_idle_release_has_no_rates() {
        let baseline = BTreeMap::from([("a".to_string(), node((500, 0), (500, 0)))]);
        let now = BTreeMap::from([("a".to_string(), node((0, 0), (30, 0)))]);
        let v = window(&baseline, &now).values();
        assert_eq!(v["stable_requests"], 30.0);
        assert_eq!(v["canary_requests"], 0.0);
        assert!(!v.contains_key("canary_success_rate"));
        assert!(!v.contains_key("canary_p99"));
    }
}
