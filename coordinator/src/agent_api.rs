//! `AgentService.Session`: one long-lived stream per connected agent.

use std::sync::Arc;

use cutover_common::identity::Identity;
use cutover_common::tls::PeerInfo;
use cutover_common::OLDEST_AGENT_PROTOCOL;
use cutover_proto::v1::agent_service_server::AgentService;
use cutover_proto::v1::{
    self as pb, agent_message, coordinator_message, AgentMessage, CoordinatorMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Access;
use crate::artifacts::ArtifactStore;
use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::registry::{Attached, Registry};
use crate::secrets::Secrets;
use crate::store::{Figures, ServiceStatus, Traffic};

pub struct AgentApi {
    pub registry: Arc<Registry>,
    pub artifacts: Arc<ArtifactStore>,
    pub secrets: Arc<Secrets>,
    pub access: Arc<Access>,
    /// Signs renewed agent certificates; `None` without `ca_key`.
    pub pki: Arc<crate::ca::Pki>,
    pub config: Arc<CoordinatorConfig>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

const MAX_LABELS: usize = 64;
const MAX_CAPABILITIES: usize = 64;
const MAX_RECENT_COMMANDS: usize = 1024;

/// The identity the CA signed into the caller's certificate.
fn peer_identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no peer identity"))
}

impl AgentApi {
    /// Refuses a revoked certificate, on every agent call (`action`), and
    /// audits the attempt.
    async fn admit<T>(&self, request: &Request<T>, action: &str) -> Result<(), Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| Status::unauthenticated("no peer info"))?;
        match self.registry.refusal(peer) {
            Some(reason) => {
                let who = peer
                    .identity
                    .as_ref()
                    .map_or_else(|| "unknown".to_string(), crate::access::who);
                let address = crate::refusals::source_address(peer.remote_addr);
                self.access
                    .refused(
                        &format!("{who}@{address}"),
                        &who,
                        action,
                        &serde_json::json!({
                            "from": address,
                            "serial": peer.serial.clone().unwrap_or_default(),
                        }),
                        &reason,
                    )
                    .await;
                Err(Status::permission_denied(reason))
            }
            None => Ok(()),
        }
    }

    /// The values of a release's secrets, if `node` may have them: the
    /// release was rolled out to an environment whose selector matches it.
    async fn secrets_for(
        &self,
        node: &str,
        request: &pb::FetchSecretsRequest,
    ) -> Result<std::collections::HashMap<String, String>, Status> {
        let labels = self
            .registry
            .list()
            .into_iter()
            .find(|n| n.record.name == node)
            .map(|n| n.record.labels)
            .ok_or_else(|| Status::permission_denied(format!("node {node} is not registered")))?;
        let record = self
            .registry
            .store()
            .releases
            .all()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .find(|r| {
                r.service == request.service
                    && r.release.id() == request.release_id
                    && crate::spec::selects(&r.selector, &labels)
            })
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "node {node} runs no release {} of service {} that was rolled out to it",
                    request.release_id, request.service
                ))
            })?;
        Ok(self
            .secrets
            .values_for(&record.env, &record.release.0.secrets)
            .await?)
    }
}

fn validate_hello(hello: &pb::Hello, identity: &Identity) -> Result<(), Status> {
    if hello.name != identity.name {
        return Err(Status::permission_denied(format!(
            "certificate is for node {:?} but the agent calls itself {:?}; set the agent's name to match or issue it a certificate with `cutover ca issue agent --name {}`",
            identity.name, hello.name, hello.name
        )));
    }
    check_protocol(
        &hello.name,
        &hello.agent_version,
        hello.protocol_version,
        OLDEST_AGENT_PROTOCOL,
    )?;
    if uuid::Uuid::parse_str(&hello.node_id).is_err() {
        return Err(Status::invalid_argument(format!(
            "node id {:?} is not a uuid; the agent's state dir holds a damaged node id: move its `node-id` file away and the node registers anew",
            hello.node_id
        )));
    }
    if hello.address.parse::<std::net::IpAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "node address {:?} is not an ip address; set `address` in the agent's config to one of the node's addresses",
            hello.address
        )));
    }
    // Everything in a hello is stored; bound it so a misbehaving agent cannot
    // grow the store.
    if hello.labels.len() > MAX_LABELS
        || hello.capabilities.len() > MAX_CAPABILITIES
        || hello.capabilities.iter().any(|c| c.len() > 64)
        || hello.agent_version.len() > 64
        || hello.agent_build.len() > 80
        || hello.recent_command_ids.len() > MAX_RECENT_COMMANDS
    {
        return Err(Status::invalid_argument(format!(
            "hello exceeds limits: at most {MAX_LABELS} labels, {MAX_CAPABILITIES} capabilities of 64 bytes, a 64-byte version, an 80-byte build, {MAX_RECENT_COMMANDS} recent command ids"
        )));
    }
    for (key, value) in &hello.labels {
        cutover_common::rules::label(key, value)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    Ok(())
}

/// Refuses an agent older than the oldest protocol this coordinator
/// speaks (a hello from before the field was sent says 0: protocol 1).
fn check_protocol(node: &str, version: &str, protocol: u32, oldest: u32) -> Result<(), Status> {
    let protocol = protocol.max(1);
    if protocol >= oldest {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "agent {version} on node {node} speaks agent protocol {protocol}, but this coordinator ({}) speaks {oldest} to {}; upgrade the agent on {node} (`cutover-agent upgrade --binary NEW`), or run a coordinator that still speaks {protocol}",
        cutover_common::VERSION,
        cutover_common::AGENT_PROTOCOL,
    )))
}

fn service_from(state: pb::ServiceState) -> ServiceStatus {
    ServiceStatus {
        service: state.service,
        release_id: state.release_id,
        upstream: state.upstream,
        listen: state.listen,
        admitted: state.admitted,
        crashes: state.crashes,
        last_exit: state.last_exit,
        running: state.running,
        healthy: state.healthy,
        health_detail: state.health_detail,
        traffic: state.traffic.map(Traffic::from),
        side: state.side.map(Into::into),
        memory_bytes: state.memory_bytes,
        levers: state.levers.as_ref().map(|l| Some(l).into()),
        lever_counts: state.lever_counts.as_ref().map(Into::into),
        queues: state.queues.as_ref().map(Into::into),
        instances: state.instances,
        instances_up: state.instances_up,
    }
}

fn figures_from(pb: pb::SystemFigures) -> Figures {
    Figures {
        cpu_percent: pb.cpu_percent,
        load_1: pb.load_1,
        load_5: pb.load_5,
        load_15: pb.load_15,
        memory_used_bytes: pb.memory_used_bytes,
        memory_total_bytes: pb.memory_total_bytes,
        disk_free_bytes: pb.disk_free_bytes,
        disk_total_bytes: pb.disk_total_bytes,
        uptime_seconds: pb.uptime_seconds,
        release_disk_bytes: pb.release_disk_bytes,
        os: pb.os,
        cpus: pb.cpus,
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;
    type FetchArtifactStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.admit(&request, "fetch_artifact").await?;
        let digest = cutover_common::digest::Digest::parse(&request.get_ref().digest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let chunks = self.artifacts.open_stream(&digest).await?;
        Ok(Response::new(ReceiverStream::new(chunks)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<pb::FetchSecretsRequest>,
    ) -> Result<Response<pb::FetchSecretsResponse>, Status> {
        self.admit(&request, "fetch_secrets").await?;
        let identity = peer_identity(&request)?;
        let r = request.into_inner();
        let args = serde_json::json!({"service": r.service, "release_id": r.release_id});
        let who = format!("{}/{}", identity.role, identity.name);
        let result = self.secrets_for(&identity.name, &r).await;
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(status) => format!("refused: {}", status.message()),
        };
        self.access
            .append(&who, "fetch_secrets", &args, &outcome)
            .await;
        result.map(|values| Response::new(pb::FetchSecretsResponse { values }))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        self.admit(&request, "renew_certificate").await?;
        let identity = peer_identity(&request)?;
        let who = format!("{}/{}", identity.role, identity.name);
        let lifetime = self.config.agent_cert_lifetime;
        let result = self.pki.signer().map_err(Status::from).and_then(|ca| {
            ca.sign_request(&identity, &request.get_ref().csr_pem, lifetime)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        });
        if let Ok(cert_pem) = &result {
            self.registry.record_issued(&identity.name, cert_pem).await;
        }
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(status) => format!("failed: {}", status.message()),
        };
        let args =
            serde_json::json!({"lifetime": humantime::format_duration(lifetime).to_string()});
        self.access
            .append(&who, "renew_certificate", &args, &outcome)
            .await;
        let cert_pem = result?;
        Ok(Response::new(pb::RenewCertificateResponse {
            cert_pem,
            ca_bundle_pem: self.pki.bundle_pem(),
        }))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.admit(&request, "session").await?;
        let identity = peer_identity(&request)?;
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no peer info"))?;
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(self.config.limits.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello received in time"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(agent_message::Kind::Hello(hello)) => hello,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message on a session must be hello",
                ))
            }
            None => return Err(Status::cancelled("stream closed before hello")),
        };
        validate_hello(&hello, &identity)?;

        let (sender, receiver) = mpsc::channel(self.config.limits.agent_queue);
        let welcome = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(pb::Welcome {
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                heartbeat_ttl_ms: self.config.heartbeat_ttl.as_millis() as u64,
                coordinator_version: cutover_common::VERSION.to_string(),
            })),
            leader_token: self.registry.leader_token(),
        };
        // Queued before the registry can route commands to this stream, so the
        // welcome is always the first message the agent reads.
        sender
            .try_send(Ok(welcome))
            .expect("fresh channel has room");
        let attached = self
            .registry
            .attach(&hello, &peer, sender, &self.shutdown)
            .await?;
        self.metrics.sessions_opened.inc();

        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let reason = read_session(&mut inbound, &attached, &registry, &metrics).await;
            registry.detach(&attached, &reason);
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Reads the agent's messages until the stream ends, the session is replaced
/// or the coordinator shuts down; returns why it stopped.
async fn read_session(
    inbound: &mut Streaming<AgentMessage>,
    attached: &Attached,
    registry: &Registry,
    metrics: &Metrics,
) -> String {
    loop {
        let message = tokio::select! {
            _ = attached.cancel.cancelled() => return "session closed by coordinator".into(),
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(AgentMessage { kind: Some(kind) })) => match kind {
                agent_message::Kind::Heartbeat(heartbeat) => {
                    metrics.heartbeats.inc();
                    let services = heartbeat.services.into_iter().map(service_from).collect();
                    registry.heartbeat(attached, heartbeat.figures.map(figures_from), services);
                }
                agent_message::Kind::CommandResult(result) => registry.complete_command(result),
                agent_message::Kind::CommandProgress(progress) => {
                    registry.command_progress(progress)
                }
                agent_message::Kind::Hello(_) => {
                    tracing::warn!(node_id = %attached.node_id, "ignoring a second hello on one session");
                }
            },
            Ok(Some(AgentMessage { kind: None })) => {
                tracing::debug!(node_id = %attached.node_id, "ignoring an empty message from a newer agent");
            }
            Ok(None) => return "agent closed the stream".into(),
            Err(status) => return format!("stream error: {}", status.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_protocol;

    #[test]
    fn an_agent_older_than_the_oldest_protocol_is_refused_with_what_to_do() {
        assert!(check_protocol("node-1", "0.1.0", 2, 2).is_ok());
        assert!(check_protocol("node-1", "0.1.0", 3, 2).is_ok());
        // A hello from before the field existed speaks protocol 1.
        assert!(check_protocol("node-1", "0.0.9", 0, 1).is_ok());
        let refused = check_protocol("node-1", "0.0.9", 0, 2).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        for part in [
            "agent 0.0.9 on node node-1",
            "protocol 1",
            "cutover-agent upgrade",
        ] {
            assert!(
                refused.message().contains(part),
                "{part}: {}",
                refused.message()
            );
        }
    }
}
