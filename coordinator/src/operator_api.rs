//! `OperatorService`: what the CLI calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proto::v1::operator_service_server::OperatorService;
use cutover_proto::v1::{self as pb, command, command_result};
use tonic::{Request, Response, Status};

use crate::artifacts::ArtifactStore;
use crate::registry::{CommandWaitError, NodeView, Registry};
use crate::rollout::engine::Input;
use crate::rollout::model::{self, Phase, Rollout, StoredRelease};
use crate::rollout::{DeployRequest, Rollouts, Started};
use crate::store::{EventRecord, Figures, NewEvent, NodeStatus, ServiceStatus};
use cutover_common::digest::Digest;

/// How long an operator call waits for a command result unless it says.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct OperatorApi {
    pub registry: Arc<Registry>,
    pub artifacts: Arc<ArtifactStore>,
    pub rollouts: Arc<Rollouts>,
}

/// The operator's name from their certificate, for the record.
fn caller<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<cutover_common::identity::Identity>()
        .map(|i| i.name.clone())
        .unwrap_or_else(|| "unknown".into())
}

fn release_info(release: &StoredRelease) -> pb::ReleaseInfo {
    pb::ReleaseInfo {
        id: release.id().to_string(),
        version: release.version().to_string(),
        digest: release.digest().to_string(),
        image: release.image().to_string(),
    }
}

fn error_to_pb(e: &model::RolloutError) -> pb::RolloutError {
    pb::RolloutError {
        node: e.node.clone(),
        step: e.step.clone(),
        message: e.message.clone(),
    }
}

pub fn rollout_to_pb(r: &Rollout) -> pb::Rollout {
    let (phase, batch) = match r.phase {
        Phase::Prepare => ("prepare", 0),
        Phase::Batch(b) => ("batch", b + 1),
        Phase::Watch { batch, .. } => ("watch", batch + 1),
        Phase::RollingBack => ("rolling_back", 0),
        Phase::Done => ("done", 0),
    };
    pb::Rollout {
        id: r.id.clone(),
        app: r.app.clone(),
        env: r.env.clone(),
        service: r.service.clone(),
        kind: r.kind.as_str().into(),
        state: r.state.as_str().into(),
        release: Some(release_info(&r.release)),
        previous_release: r.previous.as_ref().map(release_info),
        nodes: r
            .nodes
            .iter()
            .map(|n| pb::RolloutNode {
                name: n.name.clone(),
                id: n.id.clone(),
                state: n.state.as_str().into(),
                release: n.release.clone(),
                from_release: n.from_release.clone(),
                batch: n.batch.map_or(0, |b| b + 1),
                step: n.step.clone(),
            })
            .collect(),
        error: r.error.as_ref().map(error_to_pb),
        rollback_failures: r.rollback_failures.iter().map(error_to_pb).collect(),
        batch,
        batches: r.batches,
        batch_size: r.batch_size,
        phase: phase.into(),
        skipped_nodes: r.skipped.clone(),
        pause_requested: r.pause_requested,
        abort_requested: r.abort_requested,
        created_by: r.created_by.clone(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        finished_at_ms: r.finished_at_ms.unwrap_or(0),
        timeline: r
            .timeline
            .iter()
            .map(|t| pb::TimelineEntry {
                at_ms: t.at_ms,
                kind: t.kind.clone(),
                node: t.node.clone(),
                message: t.message.clone(),
            })
            .collect(),
    }
}

fn started_to_pb(started: Vec<Started>) -> pb::DeployResponse {
    let mut response = pb::DeployResponse::default();
    for s in started {
        match s {
            Started::Rollout(rollout) => response.rollouts.push(rollout_to_pb(&rollout)),
            Started::NoOp {
                service,
                release_id,
                message,
            } => response.unchanged.push(pb::Unchanged {
                service,
                release_id,
                message,
            }),
        }
    }
    response
}

fn node_to_pb(view: NodeView) -> pb::Node {
    let record = view.record;
    pb::Node {
        id: record.id,
        name: record.name,
        address: record.address,
        labels: record.labels.into_iter().collect(),
        status: match record.status {
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
        traffic: s.traffic.map(|t| pb::ReleaseTraffic {
            release_id: t.release_id,
            requests: t.requests,
            by_class: t.by_class,
            upstream_failures: t.upstream_failures,
            latency_bounds_ms: t.latency_bounds_ms,
            latency_cumulative: t.latency_cumulative,
            latency_sum_us: t.latency_sum_us,
        }),
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
    }
}

fn event_to_pb(e: EventRecord) -> pb::Event {
    pb::Event {
        seq: e.seq,
        at_ms: e.at_ms,
        kind: e.kind,
        node_id: e.node_id,
        node_name: e.node_name,
        message: e.message,
    }
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn push_artifact(
        &self,
        request: Request<tonic::Streaming<pb::PushArtifactRequest>>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
        let who = request
            .extensions()
            .get::<cutover_common::identity::Identity>()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(pb::push_artifact_request::Part::Header(header)) => header,
            _ => return Err(Status::invalid_argument("a push starts with its header")),
        };
        let expect = match header.expect_digest.as_str() {
            "" => None,
            text => Some(Digest::parse(text).map_err(|e| Status::invalid_argument(e.to_string()))?),
        };
        let mut upload = self.artifacts.begin().await?;
        loop {
            match parts.message().await {
                Ok(Some(pb::PushArtifactRequest {
                    part: Some(pb::push_artifact_request::Part::Data(data)),
                })) => {
                    upload.write(&data).await?;
                }
                Ok(Some(_)) => {
                    upload.abandon();
                    return Err(Status::invalid_argument("only data may follow the header"));
                }
                Ok(None) => break,
                Err(status) => {
                    upload.abandon();
                    return Err(status);
                }
            }
        }
        let (digest, size, already_present) = self.artifacts.commit(upload, expect).await?;
        if !already_present {
            let event = NewEvent {
                kind: "artifact_pushed",
                node_id: String::new(),
                node_name: String::new(),
                message: format!("{who} pushed {} ({size} bytes) as {digest}", header.name),
            };
            if let Err(error) = self.registry.store().append_event(event) {
                tracing::error!(%error, "cannot record the artifact push");
            }
        }
        tracing::info!(%digest, size, already_present, operator = %who, "artifact pushed");
        Ok(Response::new(pb::PushArtifactResponse {
            digest: digest.to_string(),
            size,
            already_present,
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.registry.list().into_iter().map(node_to_pb).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn ping_node(
        &self,
        request: Request<pb::PingNodeRequest>,
    ) -> Result<Response<pb::PingNodeResponse>, Status> {
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

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let request = request.into_inner();
        let limit = match request.limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let events = self
            .registry
            .events(request.after_seq, limit)
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(event_to_pb)
            .collect();
        Ok(Response::new(pb::ListEventsResponse { events }))
    }

    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let by = caller(&request);
        let r = request.into_inner();
        if let Some(artifact) = &r.artifact {
            Digest::parse(&artifact.digest)
                .map_err(|e| Status::invalid_argument(format!("artifact digest: {e}")))?;
        }
        let started = self
            .rollouts
            .deploy(DeployRequest {
                spec_text: r.spec,
                spec_file: if r.spec_file.is_empty() {
                    "cutover.toml".into()
                } else {
                    r.spec_file
                },
                env: r.env,
                service: Some(r.service).filter(|s| !s.is_empty()),
                version: r.version,
                artifact: r.artifact,
                image: Some(r.image).filter(|i| !i.is_empty()),
                allow_unreachable: r.allow_unreachable,
                by,
            })
            .await?;
        Ok(Response::new(started_to_pb(started)))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let by = caller(&request);
        let r = request.into_inner();
        let to = Some(r.to_release.as_str()).filter(|t| !t.is_empty());
        let started = self
            .rollouts
            .rollback(&r.env, &r.service, to, r.allow_unreachable, &by)
            .await?;
        Ok(Response::new(started_to_pb(vec![started])))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 50,
            n => n as usize,
        };
        let rollouts = self
            .rollouts
            .list()?
            .iter()
            .filter(|x| r.env.is_empty() || x.env == r.env)
            .filter(|x| r.service.is_empty() || x.service == r.service)
            .take(limit)
            .map(rollout_to_pb)
            .collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let rollout = self.rollouts.get(&request.into_inner().id)?;
        Ok(Response::new(rollout_to_pb(&rollout)))
    }

    type WatchRolloutStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::Rollout, Status>> + Send + 'static>,
    >;

    async fn watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let id = request.into_inner().id;
        let Some(mut changes) = self.rollouts.subscribe(&id) else {
            let rollout = self.rollouts.get(&id)?;
            let once = tokio_stream::once(Ok(rollout_to_pb(&rollout)));
            return Ok(Response::new(Box::pin(once)));
        };
        let rollouts = self.rollouts.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let current = changes.borrow_and_update().clone();
                if tx.send(Ok(rollout_to_pb(&current))).await.is_err() {
                    return;
                }
                if current.state.is_terminal() {
                    return;
                }
                if changes.changed().await.is_err() {
                    // The run ended (or the coordinator stops): the last
                    // word is the stored rollout.
                    if let Ok(last) = rollouts.get(&id) {
                        if last != *current {
                            let _ = tx.send(Ok(rollout_to_pb(&last))).await;
                        }
                    }
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn control_rollout(
        &self,
        request: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let by = caller(&request);
        let r = request.into_inner();
        let input = match pb::RolloutAction::try_from(r.action) {
            Ok(pb::RolloutAction::Pause) => Input::Pause { by },
            Ok(pb::RolloutAction::Resume) => Input::Resume { by },
            Ok(pb::RolloutAction::Abort) => Input::Abort { by },
            _ => {
                return Err(Status::invalid_argument(
                    "action must be pause, resume or abort",
                ))
            }
        };
        let rollout = self.rollouts.control(&r.id, input).await?;
        Ok(Response::new(rollout_to_pb(&rollout)))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let r = request.into_inner();
        let releases = self
            .rollouts
            .release_history(&r.env, &r.service)?
            .into_iter()
            .map(|record| pb::ReleaseEntry {
                release: Some(release_info(&record.release)),
                state: record.state.as_str().into(),
                current: record.current,
                deployed_by: record.deployed_by,
                deployed_at_ms: record.deployed_at_ms,
                rollout_id: record.rollout_id,
            })
            .collect();
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }
}
