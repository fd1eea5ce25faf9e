//! Per-release request counters and a latency histogram, kept lock-free on
//! the request path. Canary analysis judges releases by these.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in milliseconds (Prometheus-style
/// cumulative buckets are derived in the snapshot). Above 4 ms neighbours
/// are at most a third apart, so a quantile read as its bucket's bound
/// overstates it by less than a third, and a release twice as slow as
/// another reads at least 1.5 times as slow (what a canary's latency
/// condition, e.g. `canary_p99 <= 1.2 * stable_p99`, needs).
pub const LATENCY_BUCKETS_MS: [u64; 38] = [
    1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400,
    500, 600, 800, 1000, 1200, 1500, 2000, 2500, 3000, 4000, 5000, 6000, 8000, 10000,
];

#[derive(Debug)]
pub struct ReleaseStats {
    /// Index 1..=5 holds responses of status class 1xx..5xx.
    by_class: [AtomicU64; 6],
    /// Responses the proxy produced itself because the release failed to
    /// answer (502) or answered too late (504); also counted in 5xx.
    upstream_failures: AtomicU64,
    /// One counter per bucket plus the overflow bucket, not cumulative.
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
}

// Arrays over 32 long have no derived Default.
impl Default for ReleaseStats {
    fn default() -> Self {
        ReleaseStats {
            by_class: Default::default(),
            upstream_failures: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
        }
    }
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    /// Responses by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub by_class: [u64; 5],
    pub upstream_failures: u64,
    /// Cumulative counts for `LATENCY_BUCKETS_MS`, then +Inf.
    pub latency_cumulative: Vec<u64>,
    pub latency_sum_us: u64,
}

impl ReleaseStats {
    /// Records one response and the time to its headers.
    pub fn record(&self, status: u16, latency: Duration) {
        let class = usize::from(status / 100).clamp(1, 5);
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|bound| us <= bound * 1000)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn record_upstream_failure(&self, status: u16, latency: Duration) {
        self.upstream_failures.fetch_add(1, Ordering::Relaxed);
        self.record(status, latency);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let by_class: [u64; 5] =
            std::array::from_fn(|i| self.by_class[i + 1].load(Ordering::Relaxed));
        let mut running = 0;
        let latency_cumulative = self
            .latency
            .iter()
            .map(|bucket| {
                running += bucket.load(Ordering::Relaxed);
                running
            })
            .collect();
        StatsSnapshot {
            requests: by_class.iter().sum(),
            by_class,
            upstream_failures: self.upstream_failures.load(Ordering::Relaxed),
            latency_cumulative,
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_cumulative_buckets() {
        let stats = ReleaseStats::default();
        stats.record(200, Duration::from_micros(500));
        stats.record(204, Duration::from_millis(30));
        stats.record(404, Duration::from_millis(3));
        stats.record_upstream_failure(502, Duration::from_secs(20));
        let snap = stats.snapshot();
        assert_eq!(snap.requests, 4);
        assert_eq!(snap.by_class, [0, 2, 0, 1, 1]);
        assert_eq!(snap.upstream_failures, 1);
        // <=1ms: 1, <=3ms: 2, <=30ms: 3, +Inf: 4.
        let at = |ms| LATENCY_BUCKETS_MS.iter().position(|b| *b == ms).unwrap();
        assert_eq!(snap.latency_cumulative[at(1)], 1);
        assert_eq!(snap.latency_cumulative[at(2)], 1);
        assert_eq!(snap.latency_cumulative[at(3)], 2);
        assert_eq!(snap.latency_cumulative[at(25)], 2);
        assert_eq!(snap.latency_cumulative[at(30)], 3);
        assert_eq!(*snap.latency_cumulative.last().unwrap(), 4);
        assert_eq!(snap.latency_cumulative.len(), LATENCY_BUCKETS_MS.len() + 1);
    }
}
