//! The cutover agent: keeps one session with the coordinator, reports
//! heartbeats and runs commands.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod checks;
pub mod commands;
pub mod config;
pub mod enroll;
pub mod figures;
pub mod proxy;
pub mod recovery;
pub mod release_logs;
pub mod release_spec;
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

use std::net::IpAddr;
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
use crate::runtime::docker::DockerEngine;
use crate::services::{NodeServices, NodeSettings};
use crate::state::{Journal, StateError};

/// A session that lived this long counts as healthy: the next failure starts
/// the backoff from its shortest delay again.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Messages queued towards the coordinator before heartbeats are skipped.
const OUTBOUND_QUEUE: usize = 64;
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

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
    url: CoordinatorUrl,
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
}

impl Agent {
    /// Checks everything that can be wrong locally (certificates, name, state
    /// dir) before the first connection, so a misconfigured agent fails at
    /// start with a clear message instead of retrying forever; then brings
    /// back the services the agent ran before (adopting their processes).
    /// `shutdown` ends the session loop and closes the service proxies.
    pub async fn new(config: AgentConfig, shutdown: CancellationToken) -> Result<Self, AgentError> {
        let url = CoordinatorUrl::parse(&config.coordinator)?;
        renewal::complete_interrupted(&config.tls);
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
        let node_id = state::node_id(&config.state_dir)?;
        let journal = Journal::open(&config.state_dir)?;
        let address = config.address.unwrap_or_else(|| route_address(&url));
        let registries = cutover_common::registry::load_credentials(&config.registries)
            .map_err(AgentError::Config)?;
        let services = NodeServices::open(
            NodeSettings {
                docker: DockerEngine::new(&config.docker_host, &name, &node_id, registries),
                address,
                ports: config.port_range.clone(),
                state_dir: config.state_dir.clone(),
                artifact_ca: config.artifact_ca.clone(),
                file_artifact_dirs: config.file_artifact_dirs.clone(),
                log_max_bytes: config.release_log_max_bytes as u64,
                log_keep: config.release_log_files,
                releases_keep: config.releases_keep,
                trusted_networks: config.proxy_trusted_networks.clone(),
            },
            shutdown.clone(),
        )
        .await?;
        let outbox: Outbox = Arc::new(std::sync::Mutex::new(None));
        let renewer = Arc::new(renewal::Renewer::new(config.tls.clone(), identity));
        let executor = Arc::new(Executor::new(
            journal,
            Arc::new(services),
            outbox.clone(),
            renewer.clone(),
        ));
        let sampler = Sampler::new(config.state_dir.clone());
        Ok(Self {
            url,
            name,
            node_id,
            tls,
            renewer,
            address,
            executor,
            outbox,
            sampler,
            shutdown,
            config,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Keeps a session open until `shutdown` fires, reconnecting forever with
    /// jittered backoff. Whatever the node runs keeps running while the
    /// coordinator is away (fail static).
    pub async fn run(mut self) {
        let shutdown = self.shutdown.clone();
        tracing::info!(node = %self.name, node_id = %self.node_id, coordinator = %self.url.url, "agent starting");
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        loop {
            let started = Instant::now();
            match self.session(&shutdown).await {
                Ok(()) if shutdown.is_cancelled() => break,
                Ok(()) => tracing::info!("coordinator closed the session"),
                Err(error) => tracing::warn!(%error, "session ended"),
            }
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        // Fail static: what the node runs keeps running for the next agent,
        // unless this agent is configured to take it down with it.
        self.executor
            .services()
            .shut_down(self.config.stop_services_on_shutdown)
            .await;
        tracing::info!("agent stopped");
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
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), SessionError> {
        let options = ChannelOptions {
            keepalive_interval: self.config.keepalive_interval,
            keepalive_timeout: self.config.keepalive_timeout,
            ..ChannelOptions::default()
        };
        self.tls = tls::client_config(&self.config.tls)?;
        let connection = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connection = tls::connect(&self.url, self.config.server_name.as_deref(), self.tls.clone(), &options) => connection?,
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
            match inbound
                .message()
                .await
                .map_err(SessionError::Refused)?
                .and_then(|m| m.kind)
            {
                Some(coordinator_message::Kind::Welcome(welcome)) => Ok((inbound, welcome)),
                _ => Err(SessionError::Protocol(
                    "the coordinator did not start with welcome".into(),
                )),
            }
        };
        let (mut inbound, welcome) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            opened = tokio::time::timeout(WELCOME_TIMEOUT, opening) => opened
                .map_err(|_| SessionError::Protocol("no welcome from the coordinator".into()))??,
        };
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
                    Some(pb::CoordinatorMessage { kind: Some(coordinator_message::Kind::Command(command)) }) => {
                        tracing::info!(command_id = %command.command_id, "command received");
                        self.executor.submit(command);
                    }
                    Some(other) => tracing::debug!(?other, "ignoring unexpected message"),
                },
            }
        }
    }
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
