//! The live view of the fleet: every known node, its agent session (if
//! connected), heartbeat deadlines and commands awaiting a result.
//!
//! Node records go to the store when they change meaningfully (registration,
//! status transitions) and in a periodic checkpoint; heartbeats themselves only
//! touch memory, so thousands of agents do not turn into thousands of writes
//! per interval.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use cutover_common::tls::PeerInfo;
use cutover_proto::v1::{self as pb, coordinator_message, CoordinatorMessage};
use tokio::sync::{mpsc, oneshot};
// Tokio's instant: a TTL follows the runtime's clock, which the rollout
// simulation pauses and advances.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::clock::Clock;
use crate::journal::Journal;
use crate::store::{
    EventRecord, Figures, NewEvent, NodeRecord, NodeStatus, Page, Revocation, ServiceStatus, Store,
    StoreError,
};

pub type AgentSender = mpsc::Sender<Result<CoordinatorMessage, Status>>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("node name {name} is already connected with node id {existing}; stop the other agent or give this one another name")]
    NameTaken { name: String, existing: String },
    #[error("node id {id} belongs to node {owner}, not {name}; if this machine was cloned from {owner}, delete the node-id file in the agent's state dir and restart it")]
    IdTaken {
        id: String,
        owner: String,
        name: String,
    },
    #[error("no node named or with id {0:?}; `cutover nodes` lists them")]
    UnknownNode(String),
    #[error("node {0} is not connected to the coordinator (the node is offline, not the coordinator): `cutover nodes` shows when it was last seen; on the node, `systemctl status cutover-agent` says why")]
    NotConnected(String),
    #[error("node {0} has too many commands queued; try again")]
    QueueFull(String),
    #[error("node {name} enrolled with labels {enrolled} but now says {claimed}; the labels a node joined with are the ones it keeps (join again under another name to change them)")]
    LabelsDiffer {
        name: String,
        enrolled: String,
        claimed: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Session {
    generation: u64,
    sender: AgentSender,
    cancel: CancellationToken,
    remote: Option<SocketAddr>,
    /// The CA of the certificate the session was opened with.
    issuer: String,
}

struct NodeEntry {
    record: NodeRecord,
    /// The node stays `ready` until this instant unless a heartbeat pushes it.
    ready_until: Instant,
    session: Option<Session>,
    /// Changed in memory since the last checkpoint.
    dirty: bool,
}

#[derive(Default)]
struct Inner {
    nodes: HashMap<String, NodeEntry>,
    next_generation: u64,
    /// Command id to (node id, waiter). A node's entries are dropped when its
    /// session ends, so waiters learn at once that no answer will come; in
    /// key order, so they wake in the same order on every run (a
    /// simulation seed replays).
    pending: BTreeMap<String, Waiter>,
}

/// Someone waiting for a command's result (and hearing its progress).
struct Waiter {
    node_id: String,
    result: oneshot::Sender<pb::CommandResult>,
    progress: mpsc::Sender<pb::CommandProgress>,
}

/// What the operator API and metrics see of a node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub record: NodeRecord,
    pub connected: bool,
    pub heartbeat_age: Duration,
    /// The certificate it last connected with was revoked: an operator cut
    /// it off, so its silence is no outage and no rollout waits for it.
    pub revoked: bool,
}

/// A command on its way; dropping it (the caller gave up or went away)
/// forgets the command, so abandoned waiters do not pile up.
pub struct PendingCommand<'a> {
    registry: &'a Registry,
    command_id: String,
    result: oneshot::Receiver<pb::CommandResult>,
    progress: mpsc::Receiver<pb::CommandProgress>,
}

/// Progress messages kept per waiting command; a slow reader loses the
/// newest steps, never the result.
const PROGRESS_QUEUE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CommandWaitError {
    #[error("the node disconnected before answering; it may have restarted: `cutover nodes` shows when it is back")]
    Disconnected,
    #[error("no answer within {}; the node may be busy or cut off: `cutover nodes ping NODE` times its command path", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

impl PendingCommand<'_> {
    pub fn command_id(&self) -> &str {
        &self.command_id
    }

    /// Waits for the result; `on_progress` hears each step the agent
    /// reports on the way.
    pub async fn wait(
        mut self,
        timeout: Duration,
        mut on_progress: impl FnMut(pb::CommandProgress),
    ) -> Result<pb::CommandResult, CommandWaitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::select! {
                biased;
                Some(step) = self.progress.recv() => on_progress(step),
                result = &mut self.result => {
                    // Steps that arrived just before the result come first.
                    while let Ok(step) = self.progress.try_recv() {
                        on_progress(step);
                    }
                    return result.map_err(|_| CommandWaitError::Disconnected);
                }
                _ = tokio::time::sleep_until(deadline) => return Err(CommandWaitError::TimedOut(timeout)),
            }
        }
    }
}

impl Drop for PendingCommand<'_> {
    fn drop(&mut self) {
        self.registry
            .inner
            .lock()
            .expect("registry lock")
            .pending
            .remove(&self.command_id);
    }
}

/// Handed to a new session: its generation and the token that ends it (on
/// shutdown, or when a newer session from the same node replaces it).
pub struct Attached {
    pub node_id: String,
    pub generation: u64,
    pub cancel: CancellationToken,
}

pub struct Registry {
    inner: Mutex<Inner>,
    store: Store,
    /// Node records and events, written behind the lock in order.
    journal: Journal,
    ttl: Duration,
    /// Stamps heartbeats; rollouts compare those stamps with it.
    clock: Clock,
    /// Refused agent certificates: (node, serial); an empty serial refuses
    /// every certificate of the node.
    revoked: Mutex<HashSet<(String, String)>>,
}

impl Registry {
    /// The fencing token every message to the agents carries.
    pub fn leader_token(&self) -> i64 {
        self.store.leader_token()
    }

    /// Loads known nodes. Nodes that were ready get one TTL of grace to
    /// reconnect before they are marked unreachable, as after a coordinator
    /// restart their heartbeats simply had nowhere to go.
    pub async fn load(store: Store, journal: Journal, ttl: Duration) -> Result<Self, StoreError> {
        let now = Instant::now();
        let mut inner = Inner::default();
        for record in store.nodes.list().await? {
            let ready_until = match record.status {
                NodeStatus::Ready => now + ttl,
                NodeStatus::Unreachable => now,
            };
            inner.nodes.insert(
                record.id.clone(),
                NodeEntry {
                    record,
                    ready_until,
                    session: None,
                    dirty: false,
                },
            );
        }
        let revoked = store
            .access
            .revocations()
            .await?
            .into_iter()
            .map(|r| (r.node, r.serial))
            .collect();
        Ok(Self {
            inner: Mutex::new(inner),
            journal,
            store,
            ttl,
            clock: Clock::Wall,
            revoked: Mutex::new(revoked),
        })
    }

    /// The same registry on another clock (the rollout simulation's).
    #[cfg(test)]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Milliseconds since the Unix epoch on the registry's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Records a certificate signed for `node` (see `PkiRepo::add_issued`).
    pub async fn record_issued(&self, node: &str, cert_pem: &str) {
        let serial = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .and_then(|der| cutover_common::identity::certificate_facts(&der).ok())
            .map(|facts| facts.serial);
        match serial {
            Some(serial) => {
                if let Err(error) = self.store.pki.add_issued(node, &serial).await {
                    tracing::error!(%node, %error, "cannot record an issued certificate");
                }
            }
            None => tracing::error!(%node, "an issued certificate does not parse"),
        }
    }

    /// Records what a node confirmed installing on a renewal: a certificate
    /// of CA `cert_ca` and the trust bundle with sha256 `trust_bundle`.
    pub fn set_credentials(&self, node_id: &str, cert_ca: &str, trust_bundle: &str) {
        let mut inner = self.inner.lock().expect("registry lock");
        let Some(entry) = inner.nodes.get_mut(node_id) else {
            return;
        };
        entry.record.cert_ca = cert_ca.to_string();
        entry.record.trust_bundle = trust_bundle.to_string();
        self.journal.put_node(entry.record.clone());
    }

    /// Ends every session opened with a certificate of a CA `trusted` no
    /// longer accepts; its agent reconnects with the certificate it holds
    /// now. Returns how many ended.
    pub fn end_sessions_not_trusted(&self, trusted: impl Fn(&str) -> bool) -> usize {
        let inner = self.inner.lock().expect("registry lock");
        let mut ended = 0;
        for entry in inner.nodes.values() {
            if let Some(session) = entry.session.as_ref().filter(|s| !trusted(&s.issuer)) {
                tracing::info!(node = %entry.record.name, ca = %session.issuer, "ending a session opened with a certificate of a retired ca");
                session.cancel.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// True if the certificate node `name` last connected with is refused.
    pub fn is_revoked(&self, name: &str, serial: &str) -> bool {
        revoked_in(&self.revoked.lock().expect("revocation lock"), name, serial)
    }

    /// Why an agent's certificate is refused, if it is.
    pub fn refusal(&self, peer: &PeerInfo) -> Option<String> {
        let name = &peer.identity.as_ref()?.name;
        let serial = peer.serial.clone().unwrap_or_default();
        self.is_revoked(name, &serial).then(|| {
            format!(
                "the certificate of node {name} (serial {serial}) was revoked; issue the node a new one with `cutover ca issue agent --name {name}`"
            )
        })
    }

    /// Refuses node `name`'s certificate from now on and ends its session.
    /// The certificate is the one it is connected with, or last connected
    /// with; a node never seen has all its certificates refused.
    pub async fn revoke(&self, name: &str, by: &str) -> Result<Revocation, RegistryError> {
        // Every certificate we know of for the node: the one it connected
        // with and every one this coordinator signed for it (a renewal made
        // just before the revocation must not slip through).
        let mut serials: Vec<String> = self.store.pki.issued(name).await?;
        let serial = self
            .inner
            .lock()
            .expect("registry lock")
            .nodes
            .values()
            .find(|e| e.record.name == name)
            .map(|e| e.record.cert_serial.clone())
            .unwrap_or_default();
        serials.push(serial.clone());
        serials.retain(|s| !s.is_empty());
        if serials.is_empty() {
            serials.push(String::new()); // never seen: every certificate of the name
        }
        serials.sort();
        serials.dedup();
        let at_ms = self.now_ms();
        for serial in &serials {
            let revocation = Revocation {
                node: name.to_string(),
                serial: serial.clone(),
                at_ms,
                by: by.to_string(),
            };
            self.store.access.put_revocation(&revocation).await?;
            self.revoked
                .lock()
                .expect("revocation lock")
                .insert((revocation.node.clone(), revocation.serial.clone()));
        }
        let revocation = Revocation {
            node: name.to_string(),
            serial,
            at_ms,
            by: by.to_string(),
        };
        let inner = self.inner.lock().expect("registry lock");
        if let Some(entry) = inner.nodes.values().find(|e| e.record.name == name) {
            if let Some(session) = &entry.session {
                session.cancel.cancel();
            }
            let record = entry.record.clone();
            self.record_event(
                "node_revoked",
                &record,
                format!("{by} revoked the certificate of node {name}"),
            );
        }
        Ok(revocation)
    }

    /// How long a node may go without a heartbeat before it is unreachable.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where node records and events are queued for the store.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn record_event(&self, kind: &'static str, node: &NodeRecord, message: String) {
        tracing::info!(event = kind, node = %node.name, node_id = %node.id, "{message}");
        self.journal.event(NewEvent {
            kind,
            node_id: node.id.clone(),
            node_name: node.name.clone(),
            message,
        });
    }

    /// Registers (or re-registers) the node of a validated hello and makes
    /// `sender` its command path.
    ///
    /// Store writes and events are queued under the registry lock (see
    /// `Journal`): the store never sees an older state written after a
    /// newer one.
    pub async fn attach(
        &self,
        hello: &pb::Hello,
        peer: &PeerInfo,
        sender: AgentSender,
        parent: &CancellationToken,
    ) -> Result<Attached, RegistryError> {
        // A node that enrolled with a join token keeps the token's labels:
        // they decide which environments (and secrets) reach it, so the
        // node's own config cannot change them.
        if let Some(enrolled) = self.store.access.enrollment(&hello.name).await? {
            let claimed: BTreeMap<String, String> = hello
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if claimed != enrolled {
                let show = |labels: &BTreeMap<String, String>| {
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                return Err(RegistryError::LabelsDiffer {
                    name: hello.name.clone(),
                    enrolled: show(&enrolled),
                    claimed: show(&claimed),
                });
            }
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("registry lock");

        // A node id belongs to one name: an agent presenting another node's
        // id (a cloned disk image, or a certificate holder impersonating a
        // node) must not take over that node's record.
        if let Some(existing) = inner.nodes.get(&hello.node_id) {
            if existing.record.name != hello.name {
                return Err(RegistryError::IdTaken {
                    id: hello.node_id.clone(),
                    owner: existing.record.name.clone(),
                    name: hello.name.clone(),
                });
            }
        }
        // A name belongs to one node id at a time. A reinstalled machine comes
        // back with a new id: it replaces the old record unless that one is
        // still connected.
        let replaced = inner
            .nodes
            .values()
            .find(|e| e.record.name == hello.name && e.record.id != hello.node_id)
            .map(|e| (e.record.clone(), e.session.is_some()));
        if let Some((old, true)) = &replaced {
            return Err(RegistryError::NameTaken {
                name: hello.name.clone(),
                existing: old.id.clone(),
            });
        }

        let at = self.now_ms();
        let previous = inner.nodes.get(&hello.node_id);
        let is_new = previous.is_none();
        let record = NodeRecord {
            id: hello.node_id.clone(),
            name: hello.name.clone(),
            address: hello.address.clone(),
            labels: hello
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            agent_version: hello.agent_version.clone(),
            agent_build: hello.agent_build.clone(),
            capabilities: hello.capabilities.clone(),
            status: NodeStatus::Ready,
            registered_at_ms: previous.map_or(at, |p| p.record.registered_at_ms),
            last_seen_ms: at,
            figures: previous.and_then(|p| p.record.figures.clone()),
            services: previous
                .map(|p| p.record.services.clone())
                .unwrap_or_default(),
            services_at_ms: previous.map_or(0, |p| p.record.services_at_ms),
            cert_serial: peer.serial.clone().unwrap_or_default(),
            cert_expires_at_ms: peer.not_after.map_or(0, |s| s * 1000),
            cert_ca: peer.issuer.clone().unwrap_or_default(),
            // An agent from before it said so: what it confirmed last.
            trust_bundle: match hello.trust_bundle_sha256.as_str() {
                "" => previous
                    .map(|p| p.record.trust_bundle.clone())
                    .unwrap_or_default(),
                said => said.to_string(),
            },
        };
        if let Some((old, _)) = &replaced {
            self.journal.delete_node(old.id.clone());
        }
        self.journal.put_node(record.clone());

        if let Some((old, _)) = replaced {
            inner.nodes.remove(&old.id);
            self.record_event(
                "node_replaced",
                &old,
                format!(
                    "node {} re-registered with new id {}",
                    old.name, hello.node_id
                ),
            );
        }
        if let Some(old) = inner.nodes.remove(&hello.node_id).and_then(|p| p.session) {
            // The agent reconnected before its old stream was noticed dead:
            // end that session, and fail what was sent down it, since its
            // answers can no longer arrive.
            old.cancel.cancel();
            inner
                .pending
                .retain(|_, waiter| waiter.node_id != hello.node_id);
        }
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let cancel = parent.child_token();
        let remote = peer.remote_addr;
        tracing::debug!(node = %record.name, serial = peer.serial.as_deref().unwrap_or(""), "agent certificate");
        self.record_event(
            if is_new {
                "node_registered"
            } else {
                "node_connected"
            },
            &record,
            format!(
                "node {} connected from {} (address {}, agent {})",
                record.name,
                remote.map(|r| r.to_string()).unwrap_or_default(),
                record.address,
                agent_label(&record.agent_version, &record.agent_build)
            ),
        );
        inner.nodes.insert(
            record.id.clone(),
            NodeEntry {
                record,
                ready_until: now + self.ttl,
                session: Some(Session {
                    generation,
                    sender,
                    cancel: cancel.clone(),
                    remote,
                    issuer: peer.issuer.clone().unwrap_or_default(),
                }),
                dirty: false,
            },
        );
        Ok(Attached {
            node_id: hello.node_id.clone(),
            generation,
            cancel,
        })
    }

    /// Ends a session; a no-op when a newer session already replaced it.
    pub fn detach(&self, attached: &Attached, reason: &str) {
        let mut inner = self.inner.lock().expect("registry lock");
        let Some(entry) = inner.nodes.get_mut(&attached.node_id) else {
            return;
        };
        if entry.session.as_ref().map(|s| s.generation) != Some(attached.generation) {
            return;
        }
        let session = entry.session.take().expect("checked above");
        let record = entry.record.clone();
        inner
            .pending
            .retain(|_, waiter| waiter.node_id != record.id);
        self.record_event(
            "node_disconnected",
            &record,
            format!(
                "node {} disconnected ({reason}) from {}",
                record.name,
                session.remote.map(|r| r.to_string()).unwrap_or_default()
            ),
        );
    }

    pub fn heartbeat(
        &self,
        attached: &Attached,
        figures: Option<Figures>,
        services: Vec<ServiceStatus>,
    ) {
        let mut inner = self.inner.lock().expect("registry lock");
        let Some(entry) = inner.nodes.get_mut(&attached.node_id) else {
            return;
        };
        if entry.session.as_ref().map(|s| s.generation) != Some(attached.generation) {
            return;
        }
        entry.ready_until = Instant::now() + self.ttl;
        entry.record.last_seen_ms = self.now_ms();
        if figures.is_some() {
            entry.record.figures = figures;
        }
        entry.record.services = services;
        entry.record.services_at_ms = entry.record.last_seen_ms;
        entry.dirty = true;
        if entry.record.status == NodeStatus::Unreachable {
            entry.record.status = NodeStatus::Ready;
            entry.dirty = false;
            let record = entry.record.clone();
            self.persist(&record);
            self.record_event(
                "node_ready",
                &record,
                format!("node {} is ready again", record.name),
            );
        }
    }

    fn persist(&self, record: &NodeRecord) {
        self.journal.put_node(record.clone());
    }

    /// Marks nodes whose heartbeats stopped as unreachable. With `checkpoint`,
    /// also writes every node changed in memory since the last checkpoint.
    pub fn sweep(&self, checkpoint: bool) {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("registry lock");
        for entry in inner.nodes.values_mut() {
            if entry.record.status == NodeStatus::Ready && now >= entry.ready_until {
                entry.record.status = NodeStatus::Unreachable;
                entry.dirty = false;
                self.persist(&entry.record);
                // `node_revoked` said why it went quiet.
                if self.is_revoked(&entry.record.name, &entry.record.cert_serial) {
                    continue;
                }
                let silent_for =
                    u64::try_from(self.now_ms().saturating_sub(entry.record.last_seen_ms))
                        .unwrap_or(0);
                self.record_event(
                    "node_unreachable",
                    &entry.record,
                    format!(
                        "node {} unreachable: no heartbeat for {} (ttl {})",
                        entry.record.name,
                        humantime::format_duration(Duration::from_secs(silent_for / 1000)),
                        humantime::format_duration(self.ttl)
                    ),
                );
            } else if checkpoint && entry.dirty {
                entry.dirty = false;
                self.persist(&entry.record);
            }
        }
    }

    pub fn list(&self) -> Vec<NodeView> {
        let inner = self.inner.lock().expect("registry lock");
        let revoked = self.revoked.lock().expect("revocation lock");
        let mut views: Vec<NodeView> = inner
            .nodes
            .values()
            .map(|entry| NodeView {
                record: entry.record.clone(),
                connected: entry.session.is_some(),
                heartbeat_age: Duration::from_millis(
                    u64::try_from(self.now_ms().saturating_sub(entry.record.last_seen_ms))
                        .unwrap_or(0),
                ),
                revoked: revoked_in(&revoked, &entry.record.name, &entry.record.cert_serial),
            })
            .collect();
        views.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        views
    }

    /// Queues `command` on the node's stream and returns where its result will
    /// arrive. `node` is a name or an id.
    pub fn send_command(
        &self,
        node: &str,
        command: pb::Command,
    ) -> Result<PendingCommand<'_>, RegistryError> {
        let mut inner = self.inner.lock().expect("registry lock");
        let entry = inner
            .nodes
            .values()
            .find(|e| e.record.id == node || e.record.name == node)
            .ok_or_else(|| RegistryError::UnknownNode(node.to_string()))?;
        let session = entry
            .session
            .as_ref()
            .ok_or_else(|| RegistryError::NotConnected(entry.record.name.clone()))?;
        let name = entry.record.name.clone();
        let node_id = entry.record.id.clone();
        let command_id = command.command_id.clone();
        session
            .sender
            .try_send(Ok(CoordinatorMessage {
                kind: Some(coordinator_message::Kind::Command(command)),
                leader_token: self.store.leader_token(),
            }))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => RegistryError::QueueFull(name.clone()),
                mpsc::error::TrySendError::Closed(_) => RegistryError::NotConnected(name.clone()),
            })?;
        let (result, result_rx) = oneshot::channel();
        let (progress, progress_rx) = mpsc::channel(PROGRESS_QUEUE);
        inner.pending.insert(
            command_id.clone(),
            Waiter {
                node_id,
                result,
                progress,
            },
        );
        Ok(PendingCommand {
            registry: self,
            command_id,
            result: result_rx,
            progress: progress_rx,
        })
    }

    pub fn complete_command(&self, result: pb::CommandResult) {
        let waiter = self
            .inner
            .lock()
            .expect("registry lock")
            .pending
            .remove(&result.command_id);
        match waiter {
            Some(waiter) => {
                let _ = waiter.result.send(result);
            }
            None => {
                tracing::debug!(command_id = %result.command_id, "result for a command nobody waits on")
            }
        }
    }

    /// Hands a progress report to whoever waits on its command.
    pub fn command_progress(&self, progress: pb::CommandProgress) {
        let inner = self.inner.lock().expect("registry lock");
        if let Some(waiter) = inner.pending.get(&progress.command_id) {
            let _ = waiter.progress.try_send(progress);
        }
    }

    pub async fn events(&self, page: Page) -> Result<Vec<EventRecord>, StoreError> {
        self.store.events.page(page).await
    }
}

/// An agent's version, with the build a fleet upgrade installed it from.
pub fn agent_label(version: &str, build: &str) -> String {
    match build.strip_prefix("sha256:") {
        Some(hex) => format!("{version} (build {})", &hex[..hex.len().min(12)]),
        None => version.to_string(),
    }
}

/// Whether `revoked` refuses the certificate `serial` of node `name` (an
/// empty serial there refuses every one of the name).
fn revoked_in(revoked: &HashSet<(String, String)>, name: &str, serial: &str) -> bool {
    revoked.contains(&(name.to_string(), serial.to_string()))
        || revoked.contains(&(name.to_string(), String::new()))
}
