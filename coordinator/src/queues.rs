//! Queue depth and worker health across the fleet: each current release
//! with a queue probe (`[services.NAME.queues]`), the depth of its queues
//! as the freshest node's probe read them, and on each of its nodes
//! whether the worker runs. What `cutover queues` shows, and what the
//! metrics (`cutover_queue_*`, `cutover_worker_up`) export, refreshed by
//! `watch_loop`.

use std::sync::Arc;
use std::time::Duration;

use cutover_common::queues::QueueReport;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::spec::selects;
use crate::store::{Store, StoreError};

/// How often the metrics are refreshed.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRow {
    pub app: String,
    pub env: String,
    pub service: String,
    pub queue: String,
    pub waiting: u64,
    pub delayed: u64,
    pub reserved: u64,
    /// -1: nothing waits, or no push time.
    pub oldest_age_ms: i64,
    /// The node whose probe read it, and when.
    pub node: String,
    pub probed_at_ms: i64,
    /// From the spec; `None`: no threshold.
    pub max_depth: Option<u64>,
    pub max_wait_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub app: String,
    pub env: String,
    pub service: String,
    pub node: String,
    /// Connected, probed lately, and the status says running.
    pub up: bool,
    /// 0 running, 1 paused, else inactive; -1 unknown.
    pub status: i32,
    pub detail: String,
    /// Why the node's probe could not read Redis; empty: it could.
    pub probe_error: String,
    pub probed_at_ms: i64,
    /// Its last probe is recent and read Redis.
    pub probe_ok: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueView {
    pub queues: Vec<QueueRow>,
    pub workers: Vec<WorkerRow>,
}

/// The queues and workers of every current release with a queue probe
/// (of `env`, or of every environment).
pub async fn collect(
    store: &Store,
    registry: &Registry,
    env: Option<&str>,
) -> Result<QueueView, StoreError> {
    let now_ms = registry.now_ms();
    let views = registry.list();
    let mut view = QueueView::default();
    let currents = store.releases.all().await?.into_iter().filter(|r| {
        r.current && env.is_none_or(|env| r.env == env) && r.release.0.queues.is_some()
    });
    for current in currents {
        let probe = current.release.0.queues.clone().unwrap_or_default();
        // A report older than three intervals (and half a minute) is stale.
        let stale_ms = 3 * probe.interval_ms as i64 + 30_000;
        let mut reports: Vec<(&str, &QueueReport)> = Vec::new();
        for node in views
            .iter()
            .filter(|v| selects(&current.selector, &v.record.labels))
        {
            let Some(status) = node
                .record
                .services
                .iter()
                .find(|s| s.service == current.service && !s.release_id.is_empty())
            else {
                continue;
            };
            let report = status.queues.as_ref();
            let fresh = report.is_some_and(|r| now_ms - r.probed_at_ms <= stale_ms);
            let status_code = report.map_or(-1, |r| r.worker_status);
            view.workers.push(WorkerRow {
                app: current.app.clone(),
                env: current.env.clone(),
                service: current.service.clone(),
                node: node.record.name.clone(),
                up: node.connected && fresh && status_code == 0,
                probe_ok: node.connected && fresh && report.is_some_and(|r| r.error.is_empty()),
                status: status_code,
                detail: report.map(|r| r.worker_detail.clone()).unwrap_or_default(),
                probe_error: report.map(|r| r.error.clone()).unwrap_or_default(),
                probed_at_ms: report.map_or(0, |r| r.probed_at_ms),
            });
            // Figures of a node that stopped reporting, or could not read
            // Redis, are no figures: the queue's series go, and the probe
            // alert says why.
            if let Some(report) = report.filter(|r| fresh && node.connected && r.error.is_empty()) {
                reports.push((&node.record.name, report));
            }
        }
        // The freshest read of the queues wins.
        reports.sort_by_key(|(_, r)| std::cmp::Reverse(r.probed_at_ms));
        if let Some((node, report)) = reports.first() {
            for depth in &report.queues {
                view.queues.push(QueueRow {
                    app: current.app.clone(),
                    env: current.env.clone(),
                    service: current.service.clone(),
                    queue: depth.name.clone(),
                    waiting: depth.waiting,
                    delayed: depth.delayed,
                    reserved: depth.reserved,
                    oldest_age_ms: depth.oldest_age_ms,
                    node: node.to_string(),
                    probed_at_ms: report.probed_at_ms,
                    max_depth: (probe.max_depth > 0).then_some(probe.max_depth),
                    max_wait_ms: (probe.max_wait_ms > 0).then_some(probe.max_wait_ms),
                });
            }
        }
    }
    Ok(view)
}

/// Refreshes the queue metrics until shutdown.
pub async fn watch_loop(
    store: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match collect(&store, &registry, None).await {
            Ok(view) => metrics.queues.update(view),
            Err(error) => {
                tracing::error!(%error, "cannot read the queues of the current releases; retrying")
            }
        }
    }
}
