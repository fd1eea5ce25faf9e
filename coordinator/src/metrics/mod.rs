//! Prometheus metrics. Per-node gauges are rebuilt from the registry at each
//! scrape, so a node that was removed disappears from the output instead of
//! lingering with its last value.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

mod jobs;
mod leadership;
mod levers;
mod locks;
mod queues;
mod secrets;

pub use jobs::{data_time_s, drill_data_age_s, JobMetrics};
pub use leadership::LeadershipMetrics;
pub use levers::LeverMetrics;
pub use locks::LockMetrics;
pub use queues::QueueMetrics;
pub use secrets::SecretMetrics;

use crate::registry::NodeView;
use crate::store::NodeStatus;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub heartbeats: Counter,
    pub sessions_opened: Counter,
    /// Passes of the converger; a stuck converger stops counting.
    pub converger_passes: Counter,
    /// Ticks taken in by running rollouts' drivers (each looks at deadlines
    /// and heartbeats); stuck drivers stop counting.
    pub rollout_ticks: Counter,
    nodes: Family<Labels, Gauge>,
    agents_connected: Gauge,
    heartbeat_age: Family<Labels, FloatGauge>,
    cpu_percent: Family<Labels, FloatGauge>,
    load_1: Family<Labels, FloatGauge>,
    memory_used: Family<Labels, Gauge>,
    memory_total: Family<Labels, Gauge>,
    disk_free: Family<Labels, Gauge>,
    release_disk: Family<Labels, Gauge>,
    release_responses: Family<Labels, Gauge>,
    release_upstream_failures: Family<Labels, Gauge>,
    node_release: Family<Labels, Gauge>,
    service_instances: Family<Labels, Gauge>,
    service_instances_up: Family<Labels, Gauge>,
    rollouts: Family<Labels, Counter>,
    cert_expiry: Family<Labels, Gauge>,
    /// 0: no CA rotation in progress, 1: reissuing, 2: retiring.
    pub ca_rotation_phase: Gauge,
    /// Nodes a CA rotation still waits for.
    pub ca_rotation_waiting: Gauge,
    /// Nodes found running another release than their environment's
    /// current one, at the converger's last pass.
    pub nodes_drifted: Gauge,
    rollout_duration: Family<Labels, Histogram>,
    /// Webhooks by event and outcome (see `notify`).
    notify_deliveries: Family<Labels, Counter>,
    pub rollouts_in_progress: Gauge,
    /// Node records and events queued for the store and not yet on disk
    /// (see `Journal`).
    pub journal_pending: Gauge,
    /// Job runs, backups and restore drills.
    pub jobs: JobMetrics,
    pub secrets: SecretMetrics,
    pub levers: LeverMetrics,
    pub locks: LockMetrics,
    pub queues: QueueMetrics,
    pub leadership: LeadershipMetrics,
    /// Scrapes rebuild shared families; one at a time keeps them consistent.
    render_lock: Mutex<()>,
}

/// A registry of cutover's metrics with the build's version in it: the
/// start of every coordinator's /metrics, a follower's too.
pub fn registry_with_build_info() -> Registry {
    let mut registry = Registry::with_prefix("cutover");
    registry.register(
        "build",
        "Build information of this coordinator",
        Info::new(vec![(
            "version".to_string(),
            cutover_common::VERSION.to_string(),
        )]),
    );
    registry
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = registry_with_build_info();
        let metrics = Self {
            heartbeats: Counter::default(),
            sessions_opened: Counter::default(),
            converger_passes: Counter::default(),
            rollout_ticks: Counter::default(),
            nodes: Family::default(),
            agents_connected: Gauge::default(),
            heartbeat_age: Family::default(),
            cpu_percent: Family::default(),
            load_1: Family::default(),
            memory_used: Family::default(),
            memory_total: Family::default(),
            disk_free: Family::default(),
            release_disk: Family::default(),
            release_responses: Family::default(),
            release_upstream_failures: Family::default(),
            node_release: Family::default(),
            service_instances: Family::default(),
            service_instances_up: Family::default(),
            rollouts: Family::default(),
            cert_expiry: Family::default(),
            ca_rotation_phase: Gauge::default(),
            ca_rotation_waiting: Gauge::default(),
            nodes_drifted: Gauge::default(),
            rollout_duration: Family::new_with_constructor(|| {
                Histogram::new([5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0])
            }),
            notify_deliveries: Family::default(),
            rollouts_in_progress: Gauge::default(),
            journal_pending: Gauge::default(),
            jobs: JobMetrics::default(),
            secrets: SecretMetrics::default(),
            levers: LeverMetrics::default(),
            locks: LockMetrics::default(),
            queues: QueueMetrics::default(),
            leadership: LeadershipMetrics::default(),
            render_lock: Mutex::new(()),
            registry,
        };
        let mut registry = metrics.registry;
        registry.register(
            "heartbeats",
            "Agent heartbeats received",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "converger_passes",
            "Passes of the converger over every service's nodes (one every 2 s)",
            metrics.converger_passes.clone(),
        );
        registry.register(
            "rollout_ticks",
            "Ticks (deadlines and heartbeats looked at) taken in by running rollouts",
            metrics.rollout_ticks.clone(),
        );
        registry.register(
            "agent_sessions",
            "Agent sessions opened",
            metrics.sessions_opened.clone(),
        );
        registry.register("nodes", "Known nodes by status", metrics.nodes.clone());
        registry.register(
            "agents_connected",
            "Agents with an open session",
            metrics.agents_connected.clone(),
        );
        registry.register(
            "node_heartbeat_age_seconds",
            "Seconds since each node's last heartbeat",
            metrics.heartbeat_age.clone(),
        );
        registry.register(
            "node_cpu_percent",
            "CPU use of each node, 0 to 100",
            metrics.cpu_percent.clone(),
        );
        registry.register(
            "node_load1",
            "One-minute load average of each node",
            metrics.load_1.clone(),
        );
        registry.register(
            "node_memory_used_bytes",
            "Memory in use on each node",
            metrics.memory_used.clone(),
        );
        registry.register(
            "node_memory_total_bytes",
            "Memory of each node",
            metrics.memory_total.clone(),
        );
        registry.register(
            "node_disk_free_bytes",
            "Free disk space of each agent's state dir",
            metrics.disk_free.clone(),
        );
        registry.register(
            "node_release_disk_bytes",
            "Disk the kept release dirs and cached artifacts take on each node",
            metrics.release_disk.clone(),
        );
        registry.register(
            "release_responses",
            "Responses the node proxy forwarded for the serving release, by status class (a count since the release became active)",
            metrics.release_responses.clone(),
        );
        registry.register(
            "release_upstream_failures",
            "Requests the serving release failed to answer (502) or answered too late (504)",
            metrics.release_upstream_failures.clone(),
        );
        registry.register(
            "node_release",
            "The release each node serves, per service (always 1)",
            metrics.node_release.clone(),
        );
        registry.register(
            "service_instances",
            "Processes of its serving release each node runs per service (`cutover scale`), as its agent last reported",
            metrics.service_instances.clone(),
        );
        registry.register(
            "service_instances_up",
            "Of those, the processes that run and pass their health check: the ones its node proxy sends requests to",
            metrics.service_instances_up.clone(),
        );
        registry.register(
            "rollouts",
            "Rollouts that ended, by environment, service, kind and outcome",
            metrics.rollouts.clone(),
        );
        registry.register(
            "rollout_duration_seconds",
            "How long rollouts took from creation to their end",
            metrics.rollout_duration.clone(),
        );
        registry.register(
            "notify_deliveries",
            "Webhooks ([[notify]]) by event and outcome: delivered, failed (after its attempts, also in the event log) or dropped (queue full, or the coordinator stopping)",
            metrics.notify_deliveries.clone(),
        );
        registry.register(
            "rollouts_in_progress",
            "Rollouts running or paused",
            metrics.rollouts_in_progress.clone(),
        );
        registry.register(
            "journal_pending",
            "Node records and events queued for the store and not yet flushed to disk; above zero for long, the store is slow or failing",
            metrics.journal_pending.clone(),
        );
        registry.register(
            "node_cert_expiry_timestamp_seconds",
            "When the certificate each node last connected with expires, by its CA; agents renew at two thirds of its life, so one close to now means renewals fail",
            metrics.cert_expiry.clone(),
        );
        registry.register(
            "ca_rotation_phase",
            "The CA rotation in progress: 0 none, 1 reissuing (both CAs trusted), 2 retiring (the old CA no longer trusted)",
            metrics.ca_rotation_phase.clone(),
        );
        registry.register(
            "ca_rotation_nodes_waiting",
            "Nodes the CA rotation in progress still waits for",
            metrics.ca_rotation_waiting.clone(),
        );
        registry.register(
            "nodes_drifted",
            "Nodes the converger found running another release of a service than their environment's current one at its last pass (services mid-rollout, or left mixed by an aborted rollout or one without auto_rollback, are not counted)",
            metrics.nodes_drifted.clone(),
        );
        metrics.jobs.register(&mut registry);
        metrics.secrets.register(&mut registry);
        metrics.leadership.register(&mut registry);
        metrics.levers.register(&mut registry);
        metrics.locks.register(&mut registry);
        metrics.queues.register(&mut registry);
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts a rollout that reached its end.
    pub fn rollout_finished(&self, rollout: &crate::rollout::model::Rollout, seconds: f64) {
        let labels: Labels = vec![
            ("env".to_string(), rollout.env.clone()),
            ("service".to_string(), rollout.service.clone()),
            ("kind".to_string(), rollout.kind.as_str().to_string()),
        ];
        self.rollout_duration
            .get_or_create(&labels)
            .observe(seconds);
        let mut labels = labels;
        labels.push(("outcome".to_string(), rollout.state.as_str().to_string()));
        self.rollouts.get_or_create(&labels).inc();
    }

    /// Counts a webhook that was delivered, failed or dropped.
    pub fn notify_delivery(&self, event: &str, outcome: &str) {
        self.notify_deliveries
            .get_or_create(&vec![
                ("event".to_string(), event.to_string()),
                ("outcome".to_string(), outcome.to_string()),
            ])
            .inc();
    }

    /// The Prometheus text exposition for the current fleet.
    pub fn render(&self, nodes: &[NodeView]) -> String {
        let _guard = self.render_lock.lock().expect("metrics lock");
        for family in [&self.heartbeat_age, &self.cpu_percent, &self.load_1] {
            family.clear();
        }
        for family in [
            &self.memory_used,
            &self.memory_total,
            &self.disk_free,
            &self.release_disk,
            &self.release_responses,
            &self.release_upstream_failures,
            &self.node_release,
            &self.service_instances,
            &self.service_instances_up,
            &self.cert_expiry,
        ] {
            family.clear();
        }
        let mut ready = 0;
        let mut unreachable = 0;
        let mut revoked = 0;
        let mut connected = 0;
        for view in nodes {
            let record = &view.record;
            connected += i64::from(view.connected);
            // Cut off on purpose: counted, but without the heartbeat age
            // and certificate expiry that would page someone for it.
            if view.revoked {
                revoked += 1;
                continue;
            }
            match record.status {
                NodeStatus::Ready => ready += 1,
                NodeStatus::Unreachable => unreachable += 1,
            }
            let labels: Labels = vec![
                ("node".to_string(), record.name.clone()),
                ("node_id".to_string(), record.id.clone()),
            ];
            self.heartbeat_age
                .get_or_create(&labels)
                .set(view.heartbeat_age.as_secs_f64());
            if record.cert_expires_at_ms > 0 {
                let mut labels = labels.clone();
                labels.push(("ca".to_string(), record.cert_ca.clone()));
                self.cert_expiry
                    .get_or_create(&labels)
                    .set(record.cert_expires_at_ms / 1000);
            }
            for service in record.services.iter().filter(|s| !s.release_id.is_empty()) {
                self.node_release
                    .get_or_create(&vec![
                        ("node".to_string(), record.name.clone()),
                        ("service".to_string(), service.service.clone()),
                        ("release".to_string(), service.release_id.clone()),
                    ])
                    .set(1);
                // 0: an agent from before `cutover scale`, which says nothing.
                if service.instances > 0 {
                    let labels: Labels = vec![
                        ("node".to_string(), record.name.clone()),
                        ("service".to_string(), service.service.clone()),
                    ];
                    self.service_instances
                        .get_or_create(&labels)
                        .set(i64::from(service.instances));
                    self.service_instances_up
                        .get_or_create(&labels)
                        .set(i64::from(service.instances_up));
                }
            }
            for (service, traffic) in record
                .services
                .iter()
                .filter_map(|s| s.traffic.as_ref().map(|t| (s, t)))
            {
                let release: Labels = vec![
                    ("node".to_string(), record.name.clone()),
                    ("service".to_string(), service.service.clone()),
                    ("release".to_string(), traffic.release_id.clone()),
                ];
                for (i, count) in traffic.by_class.iter().enumerate() {
                    let mut labels = release.clone();
                    labels.push(("class".to_string(), format!("{}xx", i + 1)));
                    self.release_responses
                        .get_or_create(&labels)
                        .set(clamp(*count));
                }
                self.release_upstream_failures
                    .get_or_create(&release)
                    .set(clamp(traffic.upstream_failures));
            }
            if let Some(f) = &record.figures {
                self.cpu_percent.get_or_create(&labels).set(f.cpu_percent);
                self.load_1.get_or_create(&labels).set(f.load_1);
                self.memory_used
                    .get_or_create(&labels)
                    .set(clamp(f.memory_used_bytes));
                self.memory_total
                    .get_or_create(&labels)
                    .set(clamp(f.memory_total_bytes));
                self.disk_free
                    .get_or_create(&labels)
                    .set(clamp(f.disk_free_bytes));
                self.release_disk
                    .get_or_create(&labels)
                    .set(clamp(f.release_disk_bytes));
            }
        }
        for (status, count) in [
            (NodeStatus::Ready.as_str(), ready),
            (NodeStatus::Unreachable.as_str(), unreachable),
            ("revoked", revoked),
        ] {
            self.nodes
                .get_or_create(&vec![("status".to_string(), status.to_string())])
                .set(count);
        }
        self.agents_connected.set(connected);
        let now_s = cutover_common::now_ms() as f64 / 1000.0;
        self.jobs.render(now_s);
        self.secrets.render(now_s);
        self.locks.render(now_s);
        self.levers.render(nodes);
        self.queues.render();
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a string cannot fail");
        out
    }
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
