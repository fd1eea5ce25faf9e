//! The cutover agent: keeps one session with the coordinator, reports
//! heartbeats and runs commands.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod binaries;
pub mod checks;
pub mod commands;
pub mod config;
pub mod enroll;
pub mod figures;
pub mod fleet_upgrade;
pub mod handoff;
pub mod listeners;
pub mod notify;
pub mod proxy;
pub mod queues;
pub mod recovery;
pub mod release_logs;
pub mod release_spec;
mod reload;
pub mod renewal;
pub mod retention;
pub mod runtime;
pub mod service;
pub mod services;
pub mod state;
pub mod store;
pub mod tasks;
#[cfg(test)]
mod test_support;
pub mod upgrade;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_common::backoff::Backoff;
use cutover_common::identity::Role;
use cutover_common::tls::{self, ChannelOptions, CoordinatorUrl, TlsError};
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::{self as pb, agent_message, coordinator_message, AgentMessage};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::commands::{Executor, Outbox, CAPABILITIES};
use crate::config::AgentConfig;
use crate::figures::Sampler;
use crate::fleet_upgrade::Upgrades;
use crate::handoff::{HandoffError, Predecessor, Request};
use crate::listeners::Inherited;
use crate::reload::refused;
use crate::runtime::docker::DockerEngine;
use crate::runtime::ownership::{self, Owner};
use crate::services::{NodeServices, NodeSettings};
use crate::state::{Journal, StateError};

/// A session that lived this long counts as healthy: the next failure starts
/// the backoff from its shortest delay again.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Messages queued towards the coordinator before heartbeats are skipped.
const OUTBOUND_QUEUE: usize = 64;
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a handoff waits for the commands in flight to end; beyond it
/// the handoff is refused and this agent carries on.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the start waits for the docker engine's list of containers.
const DOCKER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a handed-off proxy keeps idle keep-alive connections open:
/// busy ones close after their next answer.
const HANDOFF_LINGER: Duration = Duration::from_secs(2);
/// The agent's pid, in its state dir: what `cutover-agent upgrade`
/// signals, and how one tells which process runs the node after a handoff.
pub const PID_FILE: &str = "agent.pid";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Identity(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Services(#[from] services::ServiceError),
    #[error("cannot take over from the running agent: {0}")]
    Handoff(#[from] HandoffError),
}

/// What an agent takes from the process that started it.
pub struct Startup {
    /// Listening sockets from systemd's store or the agent before.
    pub inherited: Arc<Inherited>,
    /// The running agent's handoff socket, when this one takes over.
    pub predecessor: Option<PathBuf>,
    /// Requests to hand over: SIGHUP's (to the binary at this agent's
    /// path at start-up, where a package upgrade puts the new one) from
    /// before start-up on (a reload right after a start waits for it), and
    /// fleet upgrades'. `None`: no handoffs (an agent inside another
    /// program, as in tests).
    pub handoffs: Option<(mpsc::Sender<Request>, mpsc::Receiver<Request>)>,
    /// What this process is to a fleet upgrade (see `binaries`).
    pub start: binaries::Start,
}

impl Default for Startup {
    fn default() -> Self {
        Self {
            inherited: Default::default(),
            predecessor: None,
            handoffs: None,
            start: binaries::Start::Plain {
                build: String::new(),
            },
        }
    }
}

impl Startup {
    /// From the environment (removing what releases must not see), for the
    /// `cutover-agent` binary. Must run before other threads start.
    pub fn from_env(start: binaries::Start) -> Self {
        binaries::clear_env();
        Self {
            inherited: Arc::new(Inherited::from_env()),
            predecessor: Predecessor::from_env(),
            handoffs: None,
            start,
        }
    }

    /// Handles SIGHUP from now on (in a tokio runtime).
    pub fn handle_reloads(&mut self) {
        match handoff::binary_path("self") {
            Ok(binary) => {
                let (requests, received) = mpsc::channel(4);
                handoff::on_reload_signal(binary, requests.clone());
                self.handoffs = Some((requests, received));
            }
            Err(error) => {
                tracing::error!(%error, "cannot tell where this agent's binary is; SIGHUP will not hand over")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] TlsError),
    #[error("coordinator refused the session: {}", .0.message())]
    Refused(tonic::Status),
    #[error("stream failed: {}", .0.message())]
    Stream(tonic::Status),
    #[error("{0}")]
    Protocol(String),
    #[error("the coordinator is of an older term (its token {token}, this node has seen {highest}): a leader that lost the lead; moving on to the next coordinator")]
    Stale { token: i64, highest: i64 },
    #[error("cannot record the coordinator's token: {0}")]
    Token(String),
}

async fn keep_certificate_fresh(
    renewer: Arc<renewal::Renewer>,
    channel: tonic::transport::Channel,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        if let Err(error) = renewer.renew_if_due(channel.clone()).await {
            tracing::error!(%error, "certificate renewal failed; retrying later");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

pub struct Agent {
    config: AgentConfig,
    /// Every coordinator the config lists; sessions go to `urls[next_url]`.
    urls: Vec<CoordinatorUrl>,
    /// Which one the next session dials: the one after, once a session
    /// ends (only the leader of several listens).
    next_url: usize,
    name: String,
    node_id: String,
    /// Rebuilt for every connection: a renewed certificate is used from the
    /// next one on.
    tls: Arc<rustls::ClientConfig>,
    renewer: Arc<renewal::Renewer>,
    /// The address services bind and the hello reports.
    address: IpAddr,
    executor: Arc<Executor>,
    outbox: Outbox,
    sampler: Sampler,
    shutdown: CancellationToken,
    handoffs: Option<mpsc::Receiver<Request>>,
    upgrades: Arc<Upgrades>,
}

impl Agent {
    /// Checks everything that can be wrong locally (certificates, name, state
    /// dir) before the first connection, so a misconfigured agent fails at
    /// start with a clear message instead of retrying forever; then brings
    /// back the services the agent ran before (adopting their processes).
    /// `shutdown` ends the session loop and closes the service proxies.
    /// Taking over from a running agent (`startup.predecessor`), the node's
    /// state is opened only once that agent let go of it, and it is told
    /// why when this one cannot run.
    pub async fn new(
        config: AgentConfig,
        shutdown: CancellationToken,
        startup: Startup,
    ) -> Result<Self, AgentError> {
        let mut predecessor = match &startup.predecessor {
            Some(path) => Some(Predecessor::connect(path).await?),
            None => None,
        };
        let started = Self::start(config, shutdown, startup, predecessor.as_mut()).await;
        match (started, predecessor) {
            (Ok(agent), Some(predecessor)) => {
                predecessor.serving().await?;
                Ok(agent)
            }
            (Ok(agent), None) => {
                notify::ready();
                Ok(agent)
            }
            (Err(error), Some(predecessor)) => {
                predecessor
                    .failed(&cutover_common::error_chain(&error))
                    .await;
                Err(error)
            }
            (Err(error), None) => Err(error),
        }
    }

    async fn start(
        config: AgentConfig,
        shutdown: CancellationToken,
        startup: Startup,
        predecessor: Option<&mut Predecessor>,
    ) -> Result<Self, AgentError> {
        let urls = CoordinatorUrl::parse_list(&config.coordinator)?;
        // A predecessor may be renewing right now: what it left half done
        // is completed once it let go (below).
        if predecessor.is_none() {
            renewal::complete_interrupted(&config.tls);
        }
        let tls = tls::client_config(&config.tls)?;
        let identity = config.tls.identity()?.ok_or_else(|| {
            AgentError::Identity(format!(
                "certificate {} carries no cutover identity; issue one with `cutover ca issue agent --name NODE`",
                config.tls.cert.display()
            ))
        })?;
        if identity.role != Role::Agent {
            return Err(AgentError::Identity(format!(
                "certificate {} is for {identity}, not an agent; issue one with `cutover ca issue agent --name NODE`",
                config.tls.cert.display()
            )));
        }
        let name = config.name.clone().unwrap_or_else(|| {
            sysinfo::System::host_name().unwrap_or_else(|| identity.name.clone())
        });
        if name != identity.name {
            return Err(AgentError::Identity(format!(
                "certificate {} is for node {:?} but this agent's name is {name:?}; set `name = \"{}\"` or issue a certificate with `cutover ca issue agent --name {name}`",
                config.tls.cert.display(),
                identity.name,
                identity.name
            )));
        }
        // Everything that can be checked without the node's state is
        // checked before a predecessor lets go of it: past that, a
        // successor that fails has no way back.
        let fingerprint = tls::ca_fingerprint(&config.tls.ca_cert)?;
        let address = config.address.unwrap_or_else(|| route_address(&urls[0]));
        let registries = cutover_common::registry::load_credentials(&config.registries)
            .map_err(AgentError::Config)?;
        // The engine without a node id yet: it only lists here.
        let engine = DockerEngine::new(&config.docker_host, &name, "", Vec::new());
        refuse_releases_left_elsewhere(&name, &fingerprint, &config.state_dir, &engine).await?;
        if let Some(predecessor) = predecessor {
            predecessor.prepared().await?;
            renewal::complete_interrupted(&config.tls);
        }
        let node_id = state::node_id(&config.state_dir)?;
        let owner = Owner::new(&node_id, &name, &fingerprint, &config.state_dir);
        let journal = Journal::open(&config.state_dir)?;
        let services = NodeServices::open(
            NodeSettings {
                docker: DockerEngine::new(&config.docker_host, &name, &node_id, registries)
                    .with_owner(&owner),
                address,
                ports: config.port_range.clone(),
                state_dir: config.state_dir.clone(),
                artifact_ca: config.artifact_ca.clone(),
                file_artifact_dirs: config.file_artifact_dirs.clone(),
                log_max_bytes: config.release_log_max_bytes as u64,
                log_keep: config.release_log_files,
                releases_keep: config.releases_keep,
                trusted_networks: config.proxy_trusted_networks.clone(),
                inherited: startup.inherited,
                owner,
            },
            shutdown.clone(),
        )
        .await?;
        let pid_file = config.state_dir.join(PID_FILE);
        cutover_common::fsutil::write_atomic(
            &pid_file,
            format!("{}\n", std::process::id()).as_bytes(),
            cutover_common::modes::PRIVATE_FILE,
        )
        .map_err(|e| AgentError::Config(format!("cannot write {}: {e}", pid_file.display())))?;
        let outbox: Outbox = Arc::new(std::sync::Mutex::new(None));
        let renewer = Arc::new(renewal::Renewer::new(config.tls.clone(), identity));
        let (requests, handoffs) = startup.handoffs.unzip();
        let upgrades = Upgrades::new(config.state_dir.clone(), requests, &startup.start);
        let executor = Arc::new(Executor::new(
            journal,
            Arc::new(services),
            outbox.clone(),
            renewer.clone(),
            upgrades.clone(),
        ));
        let sampler = Sampler::new(config.state_dir.clone());
        Ok(Self {
            urls,
            next_url: 0,
            name,
            node_id,
            tls,
            renewer,
            address,
            executor,
            outbox,
            sampler,
            shutdown,
            handoffs,
            upgrades,
            config,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Keeps a session open until `shutdown` fires, reconnecting forever with
    /// jittered backoff, and hands the node over to a new agent process on
    /// SIGHUP (see `handoff`). Whatever the node runs keeps running while the
    /// coordinator is away (fail static). An error: a handoff failed past
    /// the point of return, and the process should exit for its service
    /// manager to start an agent again.
    pub async fn run(mut self) -> Result<(), HandoffError> {
        let shutdown = self.shutdown.clone();
        tracing::info!(node = %self.name, node_id = %self.node_id, coordinator = %self.config.coordinator, "agent starting");
        // Its own token: after a handoff the successor pings, not this one.
        let pings = shutdown.child_token();
        tokio::spawn(notify::watchdog(pings.clone()));
        tokio::spawn(self.upgrades.clone().watch_probation(shutdown.clone()));
        let mut handoffs = self.handoffs.take();
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        while let Some((successor, reason)) = self
            .serve_until_reload(&shutdown, &mut backoff, handoffs.as_mut())
            .await
        {
            // The session ended once no command ran; one that came in at
            // its very end is waited for too.
            let busy = self.settle().await;
            let changed = self.listeners_changed(&successor).await;
            let refusal = match (busy.is_empty(), changed) {
                (true, None) => return self.hand_over(successor, pings).await,
                (false, _) => HandoffError::Refused(format!(
                    "commands {} still ran after {}",
                    busy.join(", "),
                    humantime::format_duration(SETTLE_TIMEOUT)
                )),
                (true, Some(changed)) => HandoffError::ServicesChanged(changed),
            };
            let error = successor.abort(refusal).await;
            refused(&self.config.state_dir, &error, reason, handoffs.as_mut());
        }
        // Fail static: what the node runs keeps running for the next agent,
        // unless this agent is configured to take it down with it.
        notify::stopping();
        let proxies = self
            .executor
            .services()
            .shut_down(self.config.stop_services_on_shutdown)
            .await;
        let mut closing = tokio::task::JoinSet::new();
        for proxy in proxies {
            closing.spawn(proxy.close());
        }
        closing.join_all().await;
        tracing::info!("agent stopped");
        Ok(())
    }

    /// One session, then the backoff's wait before the next.
    async fn session_round(&mut self, shutdown: &CancellationToken, backoff: &mut Backoff) {
        let started = Instant::now();
        let mut leader = None;
        match self.session(shutdown).await {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => tracing::info!("coordinator closed the session"),
            Err(error) => {
                tracing::warn!(%error, "session ended");
                if let SessionError::Refused(status) = &error {
                    leader = self.listed(status.metadata().get(cutover_common::LEADER_METADATA));
                }
            }
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        // A follower named the leader: that one next, if listed. Otherwise
        // the coordinator that ended it, or never answered, may have lost
        // the lead to another one.
        self.next_url = leader.unwrap_or((self.next_url + 1) % self.urls.len());
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::time::sleep(delay).await;
    }

    /// The index of the listed coordinator a follower's refusal names.
    fn listed(
        &self,
        leader: Option<&tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    ) -> Option<usize> {
        let leader = CoordinatorUrl::parse(leader?.to_str().ok()?).ok()?;
        self.urls
            .iter()
            .position(|url| url.host == leader.host && url.port == leader.port)
    }

    /// Accepts what a coordinator of the highest term seen (or a single
    /// coordinator) sends; refuses one of an older term.
    fn fence(&self, token: i64) -> Result<(), SessionError> {
        match self.executor.services().observe_leader_token(token) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(highest)) => Err(SessionError::Stale { token, highest }),
            Err(error) => Err(SessionError::Token(error.to_string())),
        }
    }

    fn hello(&self) -> pb::Hello {
        pb::Hello {
            node_id: self.node_id.clone(),
            name: self.name.clone(),
            address: self.address.to_string(),
            labels: self.config.labels.clone().into_iter().collect(),
            agent_version: cutover_common::VERSION.to_string(),
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            recent_command_ids: self.executor.recent_ids(256),
            protocol_version: cutover_common::AGENT_PROTOCOL,
            agent_build: self.upgrades.build().to_string(),
            trust_bundle_sha256: std::fs::read(&self.config.tls.ca_cert)
                .map(|pem| renewal::sha256_hex(&pem))
                .unwrap_or_default(),
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), SessionError> {
        let options = ChannelOptions {
            keepalive_interval: self.config.keepalive_interval,
            keepalive_timeout: self.config.keepalive_timeout,
            ..ChannelOptions::default()
        };
        self.tls = tls::client_config(&self.config.tls)?;
        let url = self.urls[self.next_url % self.urls.len()].clone();
        let connection = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connection = tls::connect(&url, self.config.server_name.as_deref(), self.tls.clone(), &options) => connection?,
        };
        let mut client = AgentServiceClient::new(connection.clone())
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);

        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let hello = self.hello();
        outbound
            .try_send(message(agent_message::Kind::Hello(hello)))
            .expect("fresh channel has room");
        // The whole opening (response headers, then the welcome) is bounded
        // and gives way to shutdown.
        let opening = async {
            let mut inbound = client
                .session(ReceiverStream::new(outbound_rx))
                .await
                .map_err(SessionError::Refused)?
                .into_inner();
            match inbound.message().await.map_err(SessionError::Refused)? {
                Some(pb::CoordinatorMessage {
                    kind: Some(coordinator_message::Kind::Welcome(welcome)),
                    leader_token,
                }) => Ok((inbound, welcome, leader_token)),
                _ => Err(SessionError::Protocol(
                    "the coordinator did not start with welcome".into(),
                )),
            }
        };
        let (mut inbound, welcome, token) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            opened = tokio::time::timeout(WELCOME_TIMEOUT, opening) => opened
                .map_err(|_| SessionError::Protocol("no welcome from the coordinator".into()))??,
        };
        self.fence(token)?;
        let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
        tracing::info!(
            coordinator_version = %welcome.coordinator_version,
            heartbeat_ms = welcome.heartbeat_interval_ms,
            "session open"
        );

        // Command tasks report (and fetch artifacts) through this session
        // until it ends.
        *self.outbox.lock().expect("outbox lock") = Some(outbound.clone());
        self.executor
            .services()
            .set_coordinator(Some(connection.clone()));
        // Releases that restarted without their secrets get them back now.
        let services = self.executor.services().clone();
        tokio::spawn(async move { services.fetch_pending_secrets().await });
        // The certificate is renewed over this session when it is due; the
        // checks end with the session.
        let renewals = CancellationToken::new();
        let _renewals = renewals.clone().drop_guard();
        tokio::spawn(keep_certificate_fresh(
            self.renewer.clone(),
            connection.clone(),
            self.config.certificate_check_interval,
            renewals,
        ));
        let _closed = SessionGuard {
            outbox: self.outbox.clone(),
            services: self.executor.services().clone(),
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Dropping `outbound` ends our half of the stream cleanly.
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticker.tick() => {
                    let services = self.executor.services();
                    let heartbeat = pb::Heartbeat {
                        sent_at_ms: cutover_common::now_ms(),
                        figures: Some(self.sampler.sample(services.release_disk_bytes())),
                        services: services.state(),
                    };
                    // A full queue means the connection is stuck; the next
                    // heartbeat will do, and keepalive will end a dead one.
                    if outbound.try_send(message(agent_message::Kind::Heartbeat(heartbeat))).is_err() {
                        tracing::warn!("outbound queue full, heartbeat skipped");
                    }
                }
                received = inbound.message() => match received.map_err(SessionError::Stream)? {
                    None => return Ok(()),
                    Some(pb::CoordinatorMessage { kind: Some(coordinator_message::Kind::Command(command)), leader_token }) => {
                        // Checked per command too: a newer leader may have
                        // reached this node meanwhile (an agent restarted).
                        self.fence(leader_token)?;
                        tracing::info!(command_id = %command.command_id, "command received");
                        self.executor.submit(command);
                    }
                    Some(other) => tracing::debug!(?other, "ignoring unexpected message"),
                },
            }
        }
    }
}

/// Refuses to start while releases of this node (processes, or
/// containers of `docker`) run from another state dir with no agent there
/// (the agent moved, e.g. from a hand-run one to the unit): this one would
/// not see them, and would leave them running unsupervised. Checked before
/// a new state dir gets a node id.
async fn refuse_releases_left_elsewhere(
    name: &str,
    ca_fingerprint: &str,
    state_dir: &std::path::Path,
    docker: &DockerEngine,
) -> Result<(), AgentError> {
    let identity = ownership::identity(name, ca_fingerprint);
    let mut left: Vec<(String, String)> = ownership::left_elsewhere(&identity, state_dir)
        .iter()
        .map(|g| {
            (
                g.owner.state_dir.display().to_string(),
                format!("pid {}", g.process.pid),
            )
        })
        .collect();
    match tokio::time::timeout(DOCKER_CHECK_TIMEOUT, docker.running_of(&identity)).await {
        Ok(Ok(containers)) => left.extend(
            containers
                .into_iter()
                .filter(|(_, dir)| ownership::elsewhere_without_agent(dir.as_ref(), state_dir))
                .map(|(id, dir)| (dir, format!("container {}", &id[..id.len().min(12)]))),
        ),
        // No engine: no container can be left.
        Ok(Err(error)) => tracing::debug!(%error, "no docker engine to look for containers"),
        Err(_) => tracing::warn!(
            timeout_s = DOCKER_CHECK_TIMEOUT.as_secs(),
            "the docker engine did not answer; containers left by an agent on another state dir were not looked for"
        ),
    }
    let Some((elsewhere, _)) = left.first().cloned() else {
        return Ok(());
    };
    let what: Vec<&str> = left.iter().map(|(_, what)| what.as_str()).collect();
    Err(AgentError::Identity(format!(
        "releases of node {name} run from state dir {elsewhere} ({}) with no agent there, not from this agent's state dir {}; start the agent on {elsewhere} to adopt them (`state_dir` in its config, or CUTOVER_AGENT_STATE_DIR, which the unit sets), or stop them first",
        what.join(", "),
        state_dir.display(),
    )))
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

/// Detaches command tasks from a session when it ends, however it ends.
struct SessionGuard {
    outbox: Outbox,
    services: Arc<NodeServices>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        *self.outbox.lock().expect("outbox lock") = None;
        self.services.set_coordinator(None);
    }
}

/// The local address on the route to the coordinator: the node's address
/// unless the config names one. A connected UDP socket sends nothing; it
/// only asks the kernel which source address it would use.
fn route_address(url: &CoordinatorUrl) -> IpAddr {
    use std::net::ToSocketAddrs;
    let found = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .and_then(|target| {
            let local: std::net::SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0".parse().ok()?
            } else {
                "[::]:0".parse().ok()?
            };
            let socket = std::net::UdpSocket::bind(local).ok()?;
            socket.connect(target).ok()?;
            socket.local_addr().ok().map(|a| a.ip())
        });
    found.unwrap_or_else(|| {
        tracing::warn!(coordinator = %url.url, "cannot tell this node's address; using 127.0.0.1 (set `address` in the agent config)");
        IpAddr::from([127, 0, 0, 1])
    })
}
