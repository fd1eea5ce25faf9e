//! Queue depth and worker health (see `crate::queues`): the view the
//! watcher last collected, exported at each scrape.

use std::sync::Mutex;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{clamp, FloatGauge, Labels};
use crate::queues::QueueView;

#[derive(Default)]
pub struct QueueMetrics {
    depth: Family<Labels, Gauge>,
    delayed: Family<Labels, Gauge>,
    reserved: Family<Labels, Gauge>,
    oldest_age: Family<Labels, FloatGauge>,
    depth_limit: Family<Labels, Gauge>,
    wait_limit: Family<Labels, FloatGauge>,
    worker_up: Family<Labels, Gauge>,
    probe_ok: Family<Labels, Gauge>,
    view: Mutex<QueueView>,
}

impl QueueMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "queue_depth",
            "Jobs waiting in each queue (its list's length), as the freshest probe read it",
            self.depth.clone(),
        );
        registry.register(
            "queue_delayed",
            "Delayed jobs of each queue",
            self.delayed.clone(),
        );
        registry.register(
            "queue_reserved",
            "Jobs of each queue a worker holds now",
            self.reserved.clone(),
        );
        registry.register(
            "queue_oldest_job_age_seconds",
            "How long the oldest waiting job of each queue has waited (0 when none waits; absent when its payload carries no push time)",
            self.oldest_age.clone(),
        );
        registry.register(
            "queue_depth_limit",
            "The spec's queues.max_depth: more waiting jobs than this, for a while, is an alert",
            self.depth_limit.clone(),
        );
        registry.register(
            "queue_wait_limit_seconds",
            "The spec's queues.max_wait: an oldest job older than this is an alert",
            self.wait_limit.clone(),
        );
        registry.register(
            "worker_up",
            "1 while the node's worker runs (its status command says running, or without one its process runs) and the node reports; 0 otherwise",
            self.worker_up.clone(),
        );
        registry.register(
            "queue_probe_ok",
            "1 while the node's queue probe reads Redis and reports; 0 when it cannot (its error is in cutover queues) or the node stopped reporting",
            self.probe_ok.clone(),
        );
    }

    pub fn update(&self, view: QueueView) {
        *self.view.lock().expect("queue metrics lock") = view;
    }

    pub(super) fn render(&self) {
        for family in [
            &self.depth,
            &self.delayed,
            &self.reserved,
            &self.depth_limit,
            &self.worker_up,
            &self.probe_ok,
        ] {
            family.clear();
        }
        self.oldest_age.clear();
        self.wait_limit.clear();
        let view = self.view.lock().expect("queue metrics lock");
        for q in &view.queues {
            let labels: Labels = vec![
                ("app".to_string(), q.app.clone()),
                ("env".to_string(), q.env.clone()),
                ("service".to_string(), q.service.clone()),
                ("queue".to_string(), q.queue.clone()),
            ];
            self.depth.get_or_create(&labels).set(clamp(q.waiting));
            self.delayed.get_or_create(&labels).set(clamp(q.delayed));
            self.reserved.get_or_create(&labels).set(clamp(q.reserved));
            match (q.waiting, q.oldest_age_ms) {
                (0, _) => {
                    self.oldest_age.get_or_create(&labels).set(0.0);
                }
                (_, age) if age >= 0 => {
                    self.oldest_age
                        .get_or_create(&labels)
                        .set(age as f64 / 1000.0);
                }
                _ => {}
            }
            if let Some(limit) = q.max_depth {
                self.depth_limit.get_or_create(&labels).set(clamp(limit));
            }
            if let Some(limit) = q.max_wait_ms {
                self.wait_limit
                    .get_or_create(&labels)
                    .set(limit as f64 / 1000.0);
            }
        }
        for w in &view.workers {
            let labels: Labels = vec![
                ("app".to_string(), w.app.clone()),
                ("env".to_string(), w.env.clone()),
                ("service".to_string(), w.service.clone()),
                ("node".to_string(), w.node.clone()),
            ];
            self.worker_up.get_or_create(&labels).set(i64::from(w.up));
            self.probe_ok
                .get_or_create(&labels)
                .set(i64::from(w.probe_ok));
        }
    }
}
