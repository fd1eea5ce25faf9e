//! Incident levers at the node proxies: maintenance, throttle and pause
//! (see `cutover_common::levers`), set by an operator for a service of an
//! environment, on every node of it or on one. The store holds what the
//! operators chose (one record per lever and scope); each node is sent the
//! levers that apply to it (a node's own lever of a kind wins over the
//! environment-wide one) at once, and the reconciler (`reconcile`) sends
//! them again to any node whose heartbeat reports otherwise: one that was
//! away, restarted from an old record, or joined later. Agents keep them
//! across restarts, so a node cut off from the coordinator keeps its levers
//! (fail static).

mod reconcile;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_common::levers::LeverSettings;
use cutover_proto::v1 as pb;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::notify::events::ServiceEvent;
use crate::notify::spec::EventKind;
use crate::notify::Notifier;
use crate::registry::{NodeView, Registry};
use crate::spec::selects;
use crate::store::{LeverKind, LeverRecord, NewEvent, ReleaseRecord, Store, StoreError};

/// What agents announce when they take `SetLevers`.
pub const CAPABILITY: &str = "command.set_levers";
/// How long a change waits for each node's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LeverError {
    #[error("{service} has no current release in {env}: no node serves it there; deploy it first")]
    NotDeployed { env: String, service: String },
    #[error("{service} is a worker: it serves no requests through a node proxy, so no lever applies to it")]
    Worker { service: String },
    #[error("node {node} does not serve {service} in {env}; its nodes there: {nodes}")]
    NotANode {
        env: String,
        service: String,
        node: String,
        nodes: String,
    },
    #[error("{0}; nothing was changed")]
    Invalid(#[from] cutover_common::levers::LeverError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One operator's change of one lever.
#[derive(Debug, Clone)]
pub struct LeverChange {
    pub env: String,
    pub service: String,
    /// A node's name; empty: every node of the service.
    pub node: String,
    pub kind: LeverKind,
    /// The lever to set (only its `kind` part); `None` lifts it: without
    /// a node, everywhere (the environment-wide lever and every node's
    /// own); with one, that node's own.
    pub set: Option<LeverSettings>,
    pub by: String,
}

/// How a node took a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeOutcome {
    Applied,
    /// Not connected (or no answer in time): the reconciler sends it when
    /// the node is back.
    Pending(String),
    Failed(String),
}

pub struct LeverReport {
    /// Whether the store changed (lifting a lever that was not set does
    /// not).
    pub changed: bool,
    pub nodes: Vec<(String, NodeOutcome)>,
    /// What the operator should know besides: an environment-wide lever
    /// that still applies to the node whose own was lifted.
    pub note: String,
}

/// A lever sent to a node and not yet seen in its heartbeats.
struct Sent {
    levers: LeverSettings,
    at: Instant,
    /// The node refused it: sent again less often.
    refused: bool,
}

pub struct Levers {
    store: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// (node id, service) → levers sent and when: the reconciler does not
    /// send them again while the answer may still come.
    sent: Mutex<HashMap<(String, String), Sent>>,
    /// The last generation handed out (see `generation`).
    generation: AtomicU64,
    /// Wakes the reconciler early (a change, a node that came back).
    wake: Notify,
    /// The webhooks of levers set and lifted.
    notifier: Notifier,
    shutdown: CancellationToken,
}

impl Levers {
    pub async fn new(
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        notifier: Notifier,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        for record in store.levers.list(None).await? {
            metrics.levers.set(&record, true);
        }
        Ok(Arc::new(Self {
            store,
            registry,
            metrics,
            sent: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            wake: Notify::new(),
            notifier,
            shutdown,
        }))
    }

    /// Stores the change and sends every node it touches its levers now,
    /// waiting for their answers (at most `ANSWER_TIMEOUT`).
    pub async fn change(&self, change: LeverChange) -> Result<LeverReport, LeverError> {
        if let Some(set) = &change.set {
            set.check()?;
        }
        let nodes = match self.nodes_of(&change.env, &change.service).await {
            Ok(nodes) => nodes,
            // A lever set before the service became a worker, or was
            // undeployed, can still be lifted.
            Err(LeverError::NotDeployed { .. } | LeverError::Worker { .. })
                if change.set.is_none() =>
            {
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        if change.set.is_some()
            && !change.node.is_empty()
            && !nodes.iter().any(|v| v.record.name == change.node)
        {
            let names: Vec<&str> = nodes.iter().map(|v| v.record.name.as_str()).collect();
            return Err(LeverError::NotANode {
                env: change.env,
                service: change.service,
                node: change.node,
                nodes: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        }
        let changed = self.record(&change).await?;
        // Taken after the write: a resend from an older read of the store
        // carries an older generation, and the agents ignore it.
        let generation = self.generation();
        let records = self
            .store
            .levers
            .of_service(&change.env, &change.service)
            .await?;
        let note = match change.set {
            None if !change.node.is_empty() => records
                .iter()
                .find(|r| r.kind == change.kind && r.node.is_empty())
                .map(|_| {
                    format!(
                        "the environment-wide {kind} still applies to {node}; `{command}` lifts it on every node",
                        kind = change.kind.as_str(),
                        node = change.node,
                        command = lift_command(change.kind, &change.service, &change.env),
                    )
                })
                .unwrap_or_default(),
            _ => String::new(),
        };
        let touched = nodes
            .into_iter()
            .filter(|v| change.node.is_empty() || v.record.name == change.node);
        let mut answers = Vec::new();
        for view in touched {
            let levers = effective(&records, &view.record.name);
            answers.push(self.send(view, &change.service, levers, generation));
        }
        let nodes = futures_util::future::join_all(answers).await;
        self.wake.notify_one();
        Ok(LeverReport {
            changed,
            nodes,
            note,
        })
    }

    /// Orders what is sent: ever growing, from the clock (so a restarted
    /// coordinator, or another one, goes on from where the last left).
    fn generation(&self) -> u64 {
        let now = u64::try_from(cutover_common::now_ms()).unwrap_or(0);
        let previous = self
            .generation
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(0);
        now.max(previous + 1)
    }

    /// Writes the change; whether anything changed.
    async fn record(&self, change: &LeverChange) -> Result<bool, StoreError> {
        let levers = &self.store.levers;
        let Some(set) = &change.set else {
            let mut lifted = false;
            for record in levers.of_service(&change.env, &change.service).await? {
                let ours = record.kind == change.kind
                    && (change.node.is_empty() || record.node == change.node);
                if ours
                    && levers
                        .delete(&record.env, &record.service, record.kind, &record.node)
                        .await?
                {
                    lifted = true;
                    self.metrics.levers.set(&record, false);
                }
            }
            if lifted {
                // One event and one webhook for the change, however many
                // records (the environment's and nodes' own) it lifted.
                let scope = LeverRecord {
                    env: change.env.clone(),
                    service: change.service.clone(),
                    node: change.node.clone(),
                    kind: change.kind,
                    settings: LeverSettings::default(),
                    by: change.by.clone(),
                    at_ms: cutover_common::now_ms(),
                };
                self.note(&scope, "lifted", &change.by).await;
            }
            return Ok(lifted);
        };
        let record = LeverRecord {
            env: change.env.clone(),
            service: change.service.clone(),
            node: change.node.clone(),
            kind: change.kind,
            settings: set.clone(),
            by: change.by.clone(),
            at_ms: cutover_common::now_ms(),
        };
        levers.put(&record).await?;
        self.metrics.levers.set(&record, true);
        self.note(&record, "set", &change.by).await;
        Ok(true)
    }

    /// An entry in `cutover events`, and the webhooks of the service's
    /// current release (its `[[notify]]`).
    async fn note(&self, record: &LeverRecord, what: &str, by: &str) {
        let scope = match record.node.as_str() {
            "" => "every node".to_string(),
            node => format!("node {node}"),
        };
        let message = format!(
            "{} {what} for {} in {} on {scope} by {by}{}",
            record.kind.as_str(),
            record.service,
            record.env,
            match what {
                "set" => format!(": {}", describe(&record.settings)),
                _ => String::new(),
            }
        );
        tracing::warn!(env = %record.env, service = %record.service, lever = record.kind.as_str(), %by, "{message}");
        self.registry.journal().event(NewEvent {
            kind: "lever",
            node_id: String::new(),
            node_name: record.node.clone(),
            message: message.clone(),
        });
        let (app, targets) = match crate::notify::service_targets(
            &self.store,
            &record.env,
            &record.service,
        )
        .await
        {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(%error, "cannot read the webhooks of the service; the lever's webhooks are not sent");
                return;
            }
        };
        let set = what == "set";
        // How the service's traffic is left, by what is still set.
        let left = match self
            .store
            .levers
            .of_service(&record.env, &record.service)
            .await
        {
            Ok(left) => left,
            Err(error) => {
                tracing::error!(%error, "cannot read the levers left; the lever's webhooks are not sent");
                return;
            }
        };
        let state = [
            (LeverKind::Maintenance, "maintenance"),
            (LeverKind::Pause, "paused"),
            (LeverKind::Throttle, "throttled"),
        ]
        .into_iter()
        .find(|(kind, _)| left.iter().any(|r| r.kind == *kind))
        .map_or("serving", |(_, state)| state);
        let kind = match (record.kind, set) {
            (LeverKind::Maintenance, true) => EventKind::MaintenanceOn,
            (LeverKind::Maintenance, false) => EventKind::MaintenanceOff,
            (LeverKind::Throttle, true) => EventKind::ThrottleOn,
            (LeverKind::Throttle, false) => EventKind::ThrottleOff,
            (LeverKind::Pause, true) => EventKind::TrafficPaused,
            (LeverKind::Pause, false) => EventKind::TrafficResumed,
        };
        self.notifier.service_event(
            &targets,
            &ServiceEvent {
                kind,
                app,
                env: record.env.clone(),
                service: record.service.clone(),
                node: record.node.clone(),
                operator: by.to_string(),
                message,
                state,
                at_ms: cutover_common::now_ms(),
            },
        );
    }

    /// The known nodes that serve `service` in `env` through a proxy: those
    /// `env_of` gives to it.
    async fn nodes_of(&self, env: &str, service: &str) -> Result<Vec<NodeView>, LeverError> {
        let currents = self.currents(Some(service)).await?;
        let Some(current) = currents.iter().find(|r| r.env == env) else {
            return Err(LeverError::NotDeployed {
                env: env.to_string(),
                service: service.to_string(),
            });
        };
        if matches!(current.release.0.kind, Some(pb::release::Kind::Worker(_))) {
            return Err(LeverError::Worker {
                service: service.to_string(),
            });
        }
        Ok(self
            .registry
            .list()
            .into_iter()
            .filter(|v| {
                v.record.services.iter().any(|s| s.service == service)
                    && env_of(&currents, service, &v.record.labels).is_some_and(|r| r.env == env)
            })
            .collect())
    }

    /// The current releases (of `service`, or of every service).
    async fn currents(&self, service: Option<&str>) -> Result<Vec<ReleaseRecord>, StoreError> {
        Ok(self
            .store
            .releases
            .all()
            .await?
            .into_iter()
            .filter(|r| r.current && service.is_none_or(|s| r.service == s))
            .collect())
    }

    /// Sends `levers` to the node's proxy of `service` and waits for the
    /// answer.
    async fn send(
        &self,
        view: NodeView,
        service: &str,
        levers: LeverSettings,
        generation: u64,
    ) -> (String, NodeOutcome) {
        let name = view.record.name.clone();
        if !view.record.capabilities.iter().any(|c| c == CAPABILITY) {
            let version = &view.record.agent_version;
            return (
                name,
                NodeOutcome::Failed(format!(
                    "agent {version} has no levers; upgrade it (`cutover nodes upgrade`)"
                )),
            );
        }
        let key = (view.record.id.clone(), service.to_string());
        let sent = Sent {
            levers: levers.clone(),
            at: Instant::now(),
            refused: false,
        };
        self.sent
            .lock()
            .expect("levers lock")
            .insert(key.clone(), sent);
        let command = pb::Command {
            command_id: format!("levers-{}", uuid::Uuid::new_v4()),
            kind: Some(pb::command::Kind::SetLevers(pb::SetLevers {
                service: service.to_string(),
                levers: Some((&levers).into()),
                generation,
            })),
        };
        let pending = match self.registry.send_command(&view.record.id, command) {
            Ok(pending) => pending,
            Err(error) => {
                return (
                    name,
                    NodeOutcome::Pending(format!("{error}; it gets the levers when it is back")),
                )
            }
        };
        let outcome = match pending.wait(ANSWER_TIMEOUT, |_| {}).await {
            Ok(result) if result.status == pb::CommandStatus::Succeeded as i32 => {
                NodeOutcome::Applied
            }
            Ok(result) => NodeOutcome::Failed(result.message),
            Err(error) => NodeOutcome::Pending(format!("{error}; sent again until it answers")),
        };
        if let NodeOutcome::Failed(_) = outcome {
            // The reconciler tries again, but less often.
            if let Some(sent) = self.sent.lock().expect("levers lock").get_mut(&key) {
                sent.refused = true;
            }
        }
        (name, outcome)
    }

    /// Every lever set (in `env`, or everywhere), with the nodes whose
    /// proxy applies it now and those that do not yet.
    pub async fn list(&self, env: Option<&str>) -> Result<Vec<LeverState>, StoreError> {
        let records = self.store.levers.list(env).await?;
        let mut states = Vec::new();
        for record in &records {
            let nodes = match self.nodes_of(&record.env, &record.service).await {
                Ok(nodes) => nodes,
                Err(LeverError::Store(error)) => return Err(error),
                // Undeployed since: no node to apply it.
                Err(_) => Vec::new(),
            };
            let (mut applied, mut pending) = (Vec::new(), Vec::new());
            for view in nodes {
                let name = &view.record.name;
                // An environment-wide lever gives way to a node's own.
                let overridden = record.node.is_empty()
                    && records.iter().any(|r| {
                        r.env == record.env
                            && r.service == record.service
                            && r.kind == record.kind
                            && r.node == *name
                    });
                if overridden || !(record.node.is_empty() || record.node == *name) {
                    continue;
                }
                let reported = view
                    .record
                    .services
                    .iter()
                    .find(|s| s.service == record.service)
                    .and_then(|s| s.levers.as_ref());
                let wanted = effective(std::slice::from_ref(record), name).reported();
                let applies = reported.is_some_and(|r| same_kind(r, &wanted, record.kind));
                match applies {
                    true => applied.push(name.clone()),
                    false => pending.push(name.clone()),
                }
            }
            states.push(LeverState {
                record: record.clone(),
                applied,
                pending,
            });
        }
        Ok(states)
    }
}

/// A lever set, and where it applies.
pub struct LeverState {
    pub record: LeverRecord,
    pub applied: Vec<String>,
    pub pending: Vec<String>,
}

/// Whether `a` and `b` agree on the lever of `kind`.
fn same_kind(a: &LeverSettings, b: &LeverSettings, kind: LeverKind) -> bool {
    match kind {
        LeverKind::Maintenance => a.maintenance == b.maintenance,
        LeverKind::Throttle => a.throttle == b.throttle,
        LeverKind::Pause => a.pause == b.pause,
    }
}

/// The current release of `service` whose environment a node with
/// `labels` belongs to: the first (by environment name) that selects it.
/// One answer for every path that sends levers, so a node two
/// environments select never flips between their levers.
pub fn env_of<'a>(
    currents: &'a [ReleaseRecord],
    service: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Option<&'a ReleaseRecord> {
    currents
        .iter()
        .filter(|r| r.service == service && selects(&r.selector, labels))
        .min_by(|a, b| a.env.cmp(&b.env))
}

/// The command that lifts a lever of `kind` on every node.
fn lift_command(kind: LeverKind, service: &str, env: &str) -> String {
    match kind {
        LeverKind::Maintenance => format!("cutover maintenance off {service} --env {env}"),
        LeverKind::Throttle => format!("cutover throttle {service} --env {env} --off"),
        LeverKind::Pause => format!("cutover resume-traffic {service} --env {env}"),
    }
}

/// The levers a node gets from a service's records: per kind, the node's
/// own lever, else the environment-wide one.
pub fn effective(records: &[LeverRecord], node: &str) -> LeverSettings {
    let pick = |kind: LeverKind| {
        records
            .iter()
            .filter(|r| r.kind == kind)
            .find(|r| r.node == node)
            .or_else(|| records.iter().find(|r| r.kind == kind && r.node.is_empty()))
            .map(|r| &r.settings)
    };
    LeverSettings {
        maintenance: pick(LeverKind::Maintenance).and_then(|s| s.maintenance.clone()),
        throttle: pick(LeverKind::Throttle).and_then(|s| s.throttle.clone()),
        pause: pick(LeverKind::Pause).and_then(|s| s.pause.clone()),
    }
}

/// One line of what a lever does, for events and listings.
pub fn describe(settings: &LeverSettings) -> String {
    let mut parts = Vec::new();
    if let Some(m) = &settings.maintenance {
        let mut text = format!("503 {:?}", m.message);
        if m.retry_after_s > 0 {
            text.push_str(&format!(", retry after {}s", m.retry_after_s));
        }
        if !m.allow.is_empty() {
            text.push_str(&format!(", allowed {}", m.allow.join(" ")));
        }
        if !m.bypass_secret.is_empty() {
            text.push_str(", bypass cookie");
        }
        parts.push(text);
    }
    if let Some(t) = &settings.throttle {
        let mut text = format!("{} rps (burst {}) per {}", t.rps, t.burst, t.per);
        if !t.path_prefix.is_empty() {
            text.push_str(&format!(" on {}*", t.path_prefix));
        }
        parts.push(text);
    }
    if let Some(p) = &settings.pause {
        parts.push(format!(
            "requests held up to {}",
            humantime::format_duration(Duration::from_millis(p.max_pause_ms))
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests;
