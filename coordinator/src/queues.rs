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
use crate::notify::events::ServiceEvent;
use crate::notify::Notifier;
use crate::queue_alerts::{Alert, QueueAlerts};
use crate::registry::Registry;
use crate::spec::selects;
use crate::store::{NewEvent, Store, StoreError};

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

/// Refreshes the queue metrics, and raises and resolves the queue alerts
/// (`queue_alerts`), until shutdown.
pub async fn watch_loop(
    store: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    shutdown: CancellationToken,
) {
    let mut alerts = QueueAlerts::default();
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match collect(&store, &registry, None).await {
            Ok(view) => {
                for alert in alerts.observe(&view, registry.now_ms()) {
                    send(&store, &registry, &notifier, alert).await;
                }
                metrics.queues.update(view);
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the queues of the current releases; retrying")
            }
        }
    }
}

/// Journals an alert (`cutover events`) and sends its webhooks.
async fn send(store: &Store, registry: &Registry, notifier: &Notifier, alert: Alert) {
    match alert.raised() {
        true => {
            tracing::warn!(env = %alert.env, service = %alert.service, event = alert.kind.as_str(), "{}", alert.message)
        }
        false => {
            tracing::info!(env = %alert.env, service = %alert.service, event = alert.kind.as_str(), "{}", alert.message)
        }
    }
    registry.journal().event(NewEvent {
        kind: "queue_alert",
        node_id: String::new(),
        node_name: String::new(),
        message: alert.message.clone(),
    });
    let targets = match crate::notify::service_targets(store, &alert.env, &alert.service).await {
        Ok(found) => found.map(|(_, targets)| targets).unwrap_or_default(),
        Err(error) => {
            tracing::error!(%error, "cannot read the webhooks of the service; the alert's webhooks are not sent");
            return;
        }
    };
    notifier.service_event(
        &targets,
        &ServiceEvent {
            kind: alert.kind,
            state: if alert.raised() {
                "alerting"
            } else {
                "resolved"
            },
            app: alert.app,
            env: alert.env,
            service: alert.service,
            node: String::new(),
            operator: "coordinator".into(),
            message: alert.message,
            at_ms: registry.now_ms(),
        },
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use prometheus_client::metrics::gauge::Gauge;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::journal::Journal;
    use crate::notify::deliver::Sender;
    use crate::notify::spec::{EventKind, NotifyTarget};
    use crate::notify::test_receiver;
    use crate::rollout::model::StoredRelease;
    use crate::store::memory::MemoryBackend;
    use crate::store::{Page, ReleaseRecord, ReleaseState};

    #[tokio::test]
    async fn an_alert_is_journalled_and_sent_to_the_services_webhooks() {
        let (url, got) = test_receiver::receiver(&[200]).await;
        let store = Store::new(Arc::new(MemoryBackend::new()));
        let mut rollout = crate::rollout::sim::rollout(1, crate::rollout::sim::strategy());
        rollout.notify = vec![NotifyTarget {
            url,
            events: Some(vec![EventKind::WorkersDown]),
            secret: None,
            timeout_ms: 5_000,
            format: Default::default(),
        }];
        store.rollouts.put(&rollout).await.unwrap();
        store
            .releases
            .put(&ReleaseRecord {
                app: "shop".into(),
                env: "production".into(),
                service: "horizon".into(),
                release: StoredRelease(rollout.release.0.clone()),
                state: ReleaseState::Stable,
                current: true,
                deployed_by: "dana".into(),
                deployed_at_ms: 1,
                rollout_id: rollout.id.clone(),
                selector: Default::default(),
                strategy: crate::rollout::sim::strategy(),
                note: String::new(),
                migration: None,
                current_since_ms: 1,
                current_until_ms: 0,
                promoted_from: String::new(),
                config: Default::default(),
            })
            .await
            .unwrap();
        let journal = Journal::start(store.clone(), Gauge::default());
        let registry = Registry::load(store.clone(), journal.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let sender = Sender::new(
            Arc::new(crate::secrets::Secrets::new(store.clone(), None)),
            journal.clone(),
            metrics,
        );
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let notifier = Notifier::start(sender, shutdown.clone(), &tasks);
        let alert = |kind| Alert {
            kind,
            app: "shop".into(),
            env: "production".into(),
            service: "horizon".into(),
            message: format!("{} of horizon", kind.as_str()),
        };
        // The webhook wants only workers_down; both are journalled.
        send(&store, &registry, &notifier, alert(EventKind::QueueBacklog)).await;
        send(&store, &registry, &notifier, alert(EventKind::WorkersDown)).await;
        let deadline = Instant::now() + Duration::from_secs(3);
        while got.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the webhook did not arrive");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "only the event the webhook wants");
        assert_eq!(got[0].0["x-cutover-event"], "workers_down");
        let body: serde_json::Value = serde_json::from_slice(&got[0].1).unwrap();
        assert_eq!(body["state"], "alerting");
        assert_eq!(body["operator"], "coordinator");
        assert_eq!(body["service"], "horizon");
        assert_eq!(body["message"], "workers_down of horizon");
        journal.close().await;
        let events = store
            .events
            .page(Page {
                after_seq: 0,
                limit: 10,
                newest: true,
            })
            .await
            .unwrap();
        let alerts: Vec<&str> = events
            .iter()
            .filter(|e| e.kind == "queue_alert")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(
            alerts,
            ["queue_backlog of horizon", "workers_down of horizon"]
        );
        shutdown.cancel();
    }
}
