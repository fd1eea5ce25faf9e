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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_common::levers::LeverSettings;
use cutover_proto::v1 as pb;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
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
}

pub struct Levers {
    store: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// (node id, service) → levers sent and when: the reconciler does not
    /// send them again while the answer may still come.
    sent: Mutex<HashMap<(String, String), (LeverSettings, Instant)>>,
    /// Wakes the reconciler early (a change, a node that came back).
    wake: Notify,
    shutdown: CancellationToken,
}

impl Levers {
    pub async fn new(
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
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
            wake: Notify::new(),
            shutdown,
        }))
    }

    /// Stores the change and sends every node it touches its levers now,
    /// waiting for their answers (at most `ANSWER_TIMEOUT`).
    pub async fn change(&self, change: LeverChange) -> Result<LeverReport, LeverError> {
        if let Some(set) = &change.set {
            set.check()?;
        }
        let (current, nodes) = self.nodes_of(&change.env, &change.service).await?;
        if !change.node.is_empty() && !nodes.iter().any(|v| v.record.name == change.node) {
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
        let records = self
            .store
            .levers
            .of_service(&current.env, &current.service)
            .await?;
        let touched = nodes
            .into_iter()
            .filter(|v| change.node.is_empty() || v.record.name == change.node);
        let mut answers = Vec::new();
        for view in touched {
            let levers = effective(&records, &view.record.name);
            answers.push(self.send(view, &change.service, levers));
        }
        let nodes = futures_util::future::join_all(answers).await;
        self.wake.notify_one();
        Ok(LeverReport { changed, nodes })
    }

    /// Writes the change; whether anything changed.
    async fn record(&self, change: &LeverChange) -> Result<bool, StoreError> {
        let levers = &self.store.levers;
        let Some(set) = &change.set else {
            let mut lifted = false;
            for record in levers.of_service(&change.env, &change.service).await? {
                let ours = record.kind == change.kind
                    && (change.node.is_empty() || record.node == change.node);
                if ours {
                    lifted |= levers
                        .delete(&record.env, &record.service, record.kind, &record.node)
                        .await?;
                    self.metrics.levers.set(&record, false);
                    self.note(&record, "lifted", &change.by);
                }
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
        self.note(&record, "set", &change.by);
        Ok(true)
    }

    /// An entry in `cutover events`.
    fn note(&self, record: &LeverRecord, what: &str, by: &str) {
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
            message,
        });
    }

    /// The current release of `service` in `env` and the connected and
    /// known nodes that serve it there through a proxy.
    async fn nodes_of(
        &self,
        env: &str,
        service: &str,
    ) -> Result<(ReleaseRecord, Vec<NodeView>), LeverError> {
        let Some(current) = self.store.releases.current(env, service).await? else {
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
        let nodes = self
            .registry
            .list()
            .into_iter()
            .filter(|v| {
                selects(&current.selector, &v.record.labels)
                    && v.record.services.iter().any(|s| s.service == service)
            })
            .collect();
        Ok((current, nodes))
    }

    /// Sends `levers` to the node's proxy of `service` and waits for the
    /// answer.
    async fn send(
        &self,
        view: NodeView,
        service: &str,
        levers: LeverSettings,
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
        self.sent
            .lock()
            .expect("levers lock")
            .insert(key.clone(), (levers.clone(), Instant::now()));
        let command = pb::Command {
            command_id: format!("levers-{}", uuid::Uuid::new_v4()),
            kind: Some(pb::command::Kind::SetLevers(pb::SetLevers {
                service: service.to_string(),
                levers: Some((&levers).into()),
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
        if outcome != NodeOutcome::Applied {
            // Sent again by the reconciler's next pass.
            self.sent.lock().expect("levers lock").remove(&key);
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
                Ok((_, nodes)) => nodes,
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
                let wanted = effective(std::slice::from_ref(record), name);
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
