//! Nodes: the fleet as the registry sees it, pinging one, revoking one,
//! upgrading their agents.

use std::time::{Duration, Instant};

use cutover_proto::v1::{self as pb, command, command_result};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::agent_upgrade::{Plan, DEFAULT_DEADLINE};
use crate::registry::{CommandWaitError, NodeView};
use crate::store::{Figures, NodeStatus, ServiceStatus};
use crate::strategy::BatchSize;

/// How long an operator call waits for a command result unless it says.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

fn node_to_pb(view: NodeView) -> pb::Node {
    let record = view.record;
    pb::Node {
        id: record.id,
        name: record.name,
        address: record.address,
        labels: record.labels.into_iter().collect(),
        status: match record.status {
            _ if view.revoked => pb::NodeStatus::Revoked,
            NodeStatus::Ready => pb::NodeStatus::Ready,
            NodeStatus::Unreachable => pb::NodeStatus::Unreachable,
        } as i32,
        last_seen_ms: record.last_seen_ms,
        connected: view.connected,
        agent_version: record.agent_version,
        capabilities: record.capabilities,
        figures: record.figures.map(figures_to_pb),
        services: record.services.into_iter().map(service_to_pb).collect(),
        registered_at_ms: record.registered_at_ms,
        cert_serial: record.cert_serial,
        cert_expires_at_ms: record.cert_expires_at_ms,
        agent_build: record.agent_build,
    }
}

fn service_to_pb(s: ServiceStatus) -> pb::ServiceState {
    pb::ServiceState {
        service: s.service,
        release_id: s.release_id,
        upstream: s.upstream,
        listen: s.listen,
        admitted: s.admitted,
        crashes: s.crashes,
        last_exit: s.last_exit,
        running: s.running,
        healthy: s.healthy,
        health_detail: s.health_detail,
        traffic: s.traffic.map(Into::into),
        side: s.side.map(Into::into),
        memory_bytes: s.memory_bytes,
        levers: s.levers.as_ref().map(|levers| {
            let mut levers = pb::TrafficLevers::from(levers);
            // Whoever may read the fleet is not meant to pass
            // maintenance: the secret is answered once, to who set it.
            if let Some(m) = levers
                .maintenance
                .as_mut()
                .filter(|m| !m.bypass_secret.is_empty())
            {
                m.bypass_secret = "(set)".into();
            }
            levers
        }),
        lever_counts: s.lever_counts.map(Into::into),
        queues: s.queues.as_ref().map(Into::into),
        instances: s.instances,
        instances_up: s.instances_up,
    }
}

fn figures_to_pb(f: Figures) -> pb::SystemFigures {
    pb::SystemFigures {
        cpu_percent: f.cpu_percent,
        load_1: f.load_1,
        load_5: f.load_5,
        load_15: f.load_15,
        memory_used_bytes: f.memory_used_bytes,
        memory_total_bytes: f.memory_total_bytes,
        disk_free_bytes: f.disk_free_bytes,
        disk_total_bytes: f.disk_total_bytes,
        uptime_seconds: f.uptime_seconds,
        release_disk_bytes: f.release_disk_bytes,
        os: f.os,
        cpus: f.cpus,
    }
}

impl OperatorApi {
    pub(super) async fn handle_list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.access
            .check(&request, Need::Read, "list_nodes", &serde_json::Value::Null)
            .await?;
        let nodes = self.registry.list().into_iter().map(node_to_pb).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    pub(super) async fn handle_ping_node(
        &self,
        request: Request<pb::PingNodeRequest>,
    ) -> Result<Response<pb::PingNodeResponse>, Status> {
        self.access
            .check(&request, Need::Read, "ping_node", &serde_json::Value::Null)
            .await?;
        let request = request.into_inner();
        let timeout = match request.timeout_ms {
            0 => DEFAULT_COMMAND_TIMEOUT,
            ms => Duration::from_millis(ms).min(Duration::from_secs(300)),
        };
        let command_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let waiter = self.registry.send_command(
            &request.node,
            pb::Command {
                command_id: command_id.clone(),
                kind: Some(command::Kind::Ping(pb::Ping {
                    payload: command_id.clone(),
                })),
            },
        )?;
        let result = waiter
            .wait(timeout, |_| {})
            .await
            .map_err(|error| match error {
                CommandWaitError::Disconnected => Status::unavailable(format!(
                    "node {} disconnected before answering; run the command again once it is back",
                    request.node
                )),
                CommandWaitError::TimedOut(_) => {
                    Status::deadline_exceeded(format!("node {}: {error}", request.node))
                }
            })?;
        let round_trip = started.elapsed();
        match (pb::CommandStatus::try_from(result.status), result.output) {
            (Ok(pb::CommandStatus::Succeeded), Some(command_result::Output::Pong(pong)))
                if pong.payload == command_id =>
            {
                Ok(Response::new(pb::PingNodeResponse {
                    command_id,
                    round_trip_us: round_trip.as_micros() as u64,
                    agent_time_ms: pong.agent_time_ms,
                }))
            }
            _ => Err(Status::internal(format!(
                "node {} answered the ping wrongly: {}",
                request.node, result.message
            ))),
        }
    }

    pub(super) async fn handle_revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let args = json!({"node": request.get_ref().node});
        self.audited(
            request,
            Need::Admin,
            "revoke_node",
            args,
            |caller, r| async move {
                cutover_common::identity::validate_name(&r.node)
                    .map_err(|e| Status::invalid_argument(format!("node name: {e}")))?;
                let revocation = self.registry.revoke(&r.node, &caller.who()).await?;
                Ok(pb::RevokeNodeResponse {
                    node: revocation.node,
                    serial: revocation.serial,
                })
            },
        )
        .await
    }

    /// Checked and audited by hand, as `run_task`: the answer is a stream;
    /// what is audited is that the upgrade started.
    pub(super) async fn handle_upgrade_agents(
        &self,
        request: Request<pb::UpgradeAgentsRequest>,
    ) -> Result<Response<UpgradeStream>, Status> {
        let r = request.get_ref();
        let args = json!({"digest": r.digest, "batch": r.batch, "deadline_ms": r.deadline_ms});
        let caller = self
            .access
            .check(&request, Need::Admin, "upgrade_agents", &args)
            .await?;
        let started = self.start_upgrade(request.into_inner());
        let outcome = started.as_ref().map(|_| ()).map_err(Clone::clone);
        self.access
            .audit(&caller, "upgrade_agents", &args, &outcome)
            .await;
        started.map(Response::new)
    }

    fn start_upgrade(&self, r: pb::UpgradeAgentsRequest) -> Result<UpgradeStream, Status> {
        cutover_common::digest::Digest::parse(&r.digest).map_err(|e| {
            Status::invalid_argument(format!("agent artifact digest {:?}: {e}", r.digest))
        })?;
        if !self.artifacts.contains(&r.digest) {
            return Err(Status::not_found(format!(
                "the coordinator holds no artifact {}; push it first (`cutover artifact push FILE`, or `cutover agents upgrade --artifact FILE`)",
                r.digest
            )));
        }
        let batch = match r.batch.as_str() {
            "" => BatchSize::Count(1),
            text => text
                .parse()
                .map_err(|e: String| Status::invalid_argument(format!("batch: {e}")))?,
        };
        let deadline = match r.deadline_ms {
            0 => DEFAULT_DEADLINE,
            ms => Duration::from_millis(ms),
        };
        let plan = Plan {
            digest: r.digest,
            batch,
            deadline,
        };
        let events = self
            .agent_upgrades
            .start(plan, &self.rollouts.running())
            .map_err(Status::failed_precondition)?;
        Ok(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(events).map(Ok),
        ))
    }
}

pub(super) type UpgradeStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::AgentUpgradeEvent, Status>> + Send>,
>;
