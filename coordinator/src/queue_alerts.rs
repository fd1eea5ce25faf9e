//! The coordinator's own alerts about the queues and workers of a service
//! (`[services.NAME.queues]`), sent as webhooks (`queue_backlog`,
//! `queue_recovered`, `workers_down`, `workers_up`) and journalled: the
//! same conditions as the alert rules `CutoverQueueBacklog`,
//! `CutoverQueueWaitTooLong` and `CutoverNoWorkerRunning`, for a team
//! without Prometheus alerting, and each once per episode.
//!
//! A condition must hold for `HOLD` before it is raised, and is resolved
//! (only if it was raised) at the first look that finds it gone. The
//! tracking lives in memory: a restarted coordinator raises a condition
//! still true once more, after `HOLD` again.

use std::collections::BTreeMap;

use crate::notify::spec::EventKind;
use crate::queues::QueueView;

/// How long a condition must hold before its webhook goes out: the alert
/// rules' `for`.
pub const HOLD_MS: i64 = 120_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    Backlog,
    WorkersDown,
}

/// app, env, service.
type Service = (String, String, String);

#[derive(Debug)]
struct Watch {
    since_ms: i64,
    raised: bool,
}

/// One alert raised or resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: EventKind,
    pub app: String,
    pub env: String,
    pub service: String,
    pub message: String,
}

impl Alert {
    pub fn raised(&self) -> bool {
        matches!(self.kind, EventKind::QueueBacklog | EventKind::WorkersDown)
    }
}

/// The conditions seen, and since when.
#[derive(Debug, Default)]
pub struct QueueAlerts {
    watching: BTreeMap<(Service, Condition), Watch>,
}

impl QueueAlerts {
    /// Takes in the queues and workers as they are at `now_ms`; returns
    /// the alerts to send.
    pub fn observe(&mut self, view: &QueueView, now_ms: i64) -> Vec<Alert> {
        let found = conditions(view);
        let mut alerts = Vec::new();
        for (key, detail) in &found {
            let watch = self.watching.entry(key.clone()).or_insert(Watch {
                since_ms: now_ms,
                raised: false,
            });
            if !watch.raised && now_ms - watch.since_ms >= HOLD_MS {
                watch.raised = true;
                alerts.push(alert(key, true, raised_message(key, detail)));
            }
        }
        let gone: Vec<_> = self
            .watching
            .keys()
            .filter(|key| !found.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            let watch = self.watching.remove(&key).expect("listed above");
            if watch.raised {
                alerts.push(alert(&key, false, resolved_message(&key, view)));
            }
        }
        alerts
    }
}

/// Each condition that holds now, with what shows it.
fn conditions(view: &QueueView) -> BTreeMap<(Service, Condition), String> {
    let mut found: BTreeMap<(Service, Condition), Vec<String>> = BTreeMap::new();
    for q in &view.queues {
        let key = (q.app.clone(), q.env.clone(), q.service.clone());
        let mut over = Vec::new();
        if let Some(max) = q.max_depth.filter(|max| q.waiting > *max) {
            over.push(format!(
                "queue {} holds {} jobs (max_depth {max})",
                q.queue, q.waiting
            ));
        }
        if let Some(max) = q
            .max_wait_ms
            .filter(|max| q.oldest_age_ms >= 0 && q.oldest_age_ms as u64 > *max)
        {
            over.push(format!(
                "queue {}'s oldest job has waited {}s (max_wait {}s)",
                q.queue,
                q.oldest_age_ms / 1000,
                max / 1000
            ));
        }
        if !over.is_empty() {
            found
                .entry((key, Condition::Backlog))
                .or_default()
                .extend(over);
        }
    }
    let mut workers: BTreeMap<Service, Vec<String>> = BTreeMap::new();
    let mut any_up: BTreeMap<Service, bool> = BTreeMap::new();
    for w in &view.workers {
        let key = (w.app.clone(), w.env.clone(), w.service.clone());
        *any_up.entry(key.clone()).or_default() |= w.up;
        let state = match w.status {
            0 if !w.up => "not reporting",
            0 => "running",
            1 => "paused",
            -1 => "not reporting",
            _ => "inactive",
        };
        workers
            .entry(key)
            .or_default()
            .push(format!("{} {state}", w.node));
    }
    for (key, nodes) in workers {
        if !any_up[&key] {
            found.insert((key, Condition::WorkersDown), nodes);
        }
    }
    found
        .into_iter()
        .map(|(key, details)| (key, details.join(", ")))
        .collect()
}

fn alert(
    ((app, env, service), condition): &(Service, Condition),
    raised: bool,
    message: String,
) -> Alert {
    let kind = match (condition, raised) {
        (Condition::Backlog, true) => EventKind::QueueBacklog,
        (Condition::Backlog, false) => EventKind::QueueRecovered,
        (Condition::WorkersDown, true) => EventKind::WorkersDown,
        (Condition::WorkersDown, false) => EventKind::WorkersUp,
    };
    Alert {
        kind,
        app: app.clone(),
        env: env.clone(),
        service: service.clone(),
        message,
    }
}

fn raised_message(((_, env, service), condition): &(Service, Condition), detail: &str) -> String {
    let minutes = HOLD_MS / 60_000;
    match condition {
        Condition::Backlog => format!(
            "the queues of {service} in {env} have backed up for {minutes} minutes: {detail}; `cutover queues --env {env}`"
        ),
        Condition::WorkersDown => format!(
            "no worker of {service} has run in {env} for {minutes} minutes ({detail}): queued jobs wait; `cutover queues --env {env}`, `cutover logs {service} --env {env}`"
        ),
    }
}

fn resolved_message(
    ((_, env, service), condition): &(Service, Condition),
    view: &QueueView,
) -> String {
    match condition {
        Condition::Backlog => {
            format!("the queues of {service} in {env} are within their limits again")
        }
        Condition::WorkersDown => {
            let up: Vec<&str> = view
                .workers
                .iter()
                .filter(|w| &w.env == env && &w.service == service && w.up)
                .map(|w| w.node.as_str())
                .collect();
            match up.is_empty() {
                true => format!("{service} in {env} is no longer probed"),
                false => format!(
                    "a worker of {service} runs again in {env} ({})",
                    up.join(", ")
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queues::{QueueRow, WorkerRow};

    fn queue(waiting: u64, oldest_age_ms: i64) -> QueueRow {
        QueueRow {
            app: "shop".into(),
            env: "production".into(),
            service: "horizon".into(),
            queue: "default".into(),
            waiting,
            delayed: 0,
            reserved: 0,
            oldest_age_ms,
            node: "worker-1".into(),
            probed_at_ms: 0,
            max_depth: Some(1000),
            max_wait_ms: Some(60_000),
        }
    }

    fn worker(node: &str, status: i32, up: bool) -> WorkerRow {
        WorkerRow {
            app: "shop".into(),
            env: "production".into(),
            service: "horizon".into(),
            node: node.into(),
            up,
            status,
            detail: String::new(),
            probe_error: String::new(),
            probed_at_ms: 0,
            probe_ok: true,
        }
    }

    fn view(queues: Vec<QueueRow>, workers: Vec<WorkerRow>) -> QueueView {
        QueueView { queues, workers }
    }

    fn kinds(alerts: &[Alert]) -> Vec<&'static str> {
        alerts.iter().map(|a| a.kind.as_str()).collect()
    }

    #[test]
    fn a_backlog_is_raised_once_after_the_hold_and_resolved_once() {
        let mut alerts = QueueAlerts::default();
        let workers = vec![worker("worker-1", 0, true)];
        let backed_up = view(vec![queue(1500, 90_000)], workers.clone());
        assert!(alerts.observe(&backed_up, 0).is_empty());
        assert!(
            alerts.observe(&backed_up, HOLD_MS - 1).is_empty(),
            "not before the hold"
        );
        let raised = alerts.observe(&backed_up, HOLD_MS);
        assert_eq!(kinds(&raised), ["queue_backlog"]);
        assert!(raised[0].raised());
        assert_eq!(
            raised[0].message,
            "the queues of horizon in production have backed up for 2 minutes: queue default holds 1500 jobs (max_depth 1000), queue default's oldest job has waited 90s (max_wait 60s); `cutover queues --env production`"
        );
        assert!(
            alerts.observe(&backed_up, HOLD_MS * 5).is_empty(),
            "once per episode"
        );
        let drained = view(vec![queue(10, 2_000)], workers.clone());
        let resolved = alerts.observe(&drained, HOLD_MS * 6);
        assert_eq!(kinds(&resolved), ["queue_recovered"]);
        assert!(!resolved[0].raised());
        assert!(alerts.observe(&drained, HOLD_MS * 7).is_empty());
    }

    #[test]
    fn a_blip_shorter_than_the_hold_sends_nothing() {
        let mut alerts = QueueAlerts::default();
        let workers = vec![worker("worker-1", 0, true)];
        assert!(alerts
            .observe(&view(vec![queue(1500, -1)], workers.clone()), 0)
            .is_empty());
        assert!(alerts
            .observe(&view(vec![queue(5, -1)], workers.clone()), 60_000)
            .is_empty());
        // A new episode starts its hold afresh.
        assert!(alerts
            .observe(&view(vec![queue(1500, -1)], workers.clone()), 90_000)
            .is_empty());
        assert!(alerts
            .observe(&view(vec![queue(1500, -1)], workers), 90_000 + HOLD_MS - 1)
            .is_empty());
    }

    #[test]
    fn no_worker_running_is_raised_and_a_worker_back_resolves_it() {
        let mut alerts = QueueAlerts::default();
        let down = view(
            Vec::new(),
            vec![worker("worker-1", 1, false), worker("worker-2", -1, false)],
        );
        assert!(alerts.observe(&down, 0).is_empty());
        let raised = alerts.observe(&down, HOLD_MS);
        assert_eq!(kinds(&raised), ["workers_down"]);
        assert!(
            raised[0]
                .message
                .contains("(worker-1 paused, worker-2 not reporting)"),
            "{}",
            raised[0].message
        );
        // One worker is enough.
        let back = view(
            Vec::new(),
            vec![worker("worker-1", 0, true), worker("worker-2", -1, false)],
        );
        let resolved = alerts.observe(&back, HOLD_MS + 2_000);
        assert_eq!(kinds(&resolved), ["workers_up"]);
        assert_eq!(
            resolved[0].message,
            "a worker of horizon runs again in production (worker-1)"
        );
        // A queue without thresholds, or a worker up, raises nothing.
        let mut quiet = queue(1_000_000, 10_000_000);
        quiet.max_depth = None;
        quiet.max_wait_ms = None;
        assert!(alerts
            .observe(&view(vec![quiet], back.workers.clone()), HOLD_MS * 9)
            .is_empty());
    }
}
