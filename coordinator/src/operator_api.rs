//! `OperatorService`: what the CLI calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proto::v1::operator_service_server::OperatorService;
use cutover_proto::v1::{self as pb, command, command_result};
use tonic::{Request, Response, Status};

use crate::access::{Access, Caller, Need};
use crate::artifacts::ArtifactStore;
use crate::registry::{CommandWaitError, NodeView, Registry};
use crate::rollout::deployment::Deployment;
use crate::rollout::engine::Input;
use crate::rollout::model::{self, Phase, Rollout, StoredRelease};
use crate::rollout::{DeployRequest, Deployed, RollbackRequest, Rollouts, Started};
use crate::secrets::{SecretInfo, Secrets};
use crate::store::{
    EventRecord, Figures, NewEvent, NodeStatus, OperatorRecord, OperatorRole, Page, ServiceStatus,
};
use cutover_common::digest::Digest;
use cutover_common::identity::{Identity, Role};
use cutover_common::tls::PeerInfo;
use serde_json::json;

/// How long an operator call waits for a command result unless it says.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct OperatorApi {
    pub registry: Arc<Registry>,
    pub artifacts: Arc<ArtifactStore>,
    pub rollouts: Arc<Rollouts>,
    pub access: Arc<Access>,
    /// Signs operator certificates; `None` when `ca_key` is not configured.
    pub pki: Arc<crate::ca::Pki>,
    pub secrets: Arc<Secrets>,
    /// Shared with the enrollment service (see `EnrollApi`).
    pub token_writes: Arc<tokio::sync::Mutex<()>>,
}

fn secret_to_pb(env: &str, info: SecretInfo) -> pb::SecretEntry {
    pb::SecretEntry {
        env: env.to_string(),
        name: info.name,
        versions: info
            .versions
            .into_iter()
            .map(
                |(version, created_at_ms, created_by)| pb::SecretVersionInfo {
                    version,
                    created_at_ms,
                    created_by,
                },
            )
            .collect(),
    }
}

/// Operators' certificates live a year unless the request says.
const OPERATOR_CERT_DAYS: u64 = 365;

fn operator_to_pb(record: &OperatorRecord) -> pb::Operator {
    pb::Operator {
        name: record.name.clone(),
        role: record.role.as_str().to_string(),
        envs: record.envs.clone(),
        created_by: record.created_by.clone(),
        created_at_ms: record.created_at_ms,
        revoked_at_ms: record.revoked_at_ms.unwrap_or(0),
    }
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
        deployment: r.deployment.clone(),
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

pub fn deployment_to_pb(d: &Deployment) -> pb::Deployment {
    pb::Deployment {
        id: d.id.clone(),
        app: d.app.clone(),
        env: d.env.clone(),
        state: d.state.as_str().into(),
        steps: d
            .steps
            .iter()
            .map(|s| pb::DeploymentStep {
                service: s.service.clone(),
                release_id: s.release.id().to_string(),
                state: s.state.as_str().into(),
                rollout_id: s.rollout_id.clone(),
                rollback_rollout_id: s.rollback_rollout_id.clone(),
            })
            .collect(),
        created_by: d.created_by.clone(),
        created_at_ms: d.created_at_ms,
        finished_at_ms: d.finished_at_ms.unwrap_or(0),
        error: d.error.clone(),
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
        cert_serial: record.cert_serial,
        cert_expires_at_ms: record.cert_expires_at_ms,
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
        release_disk_bytes: f.release_disk_bytes,
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

impl OperatorApi {
    /// Records a new operator and signs its certificate, once allowed.
    fn create_operator_as(
        &self,
        by: &str,
        r: pb::CreateOperatorRequest,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        let ca = self.pki.signer()?;
        let identity = Identity::new(Role::Operator, &r.name)
            .map_err(|e| Status::invalid_argument(format!("operator name: {e}")))?;
        let role = OperatorRole::parse(&r.role).ok_or_else(|| {
            Status::invalid_argument(format!("role {:?}: use viewer, deployer or admin", r.role))
        })?;
        for env in &r.envs {
            cutover_common::identity::validate_name(env)
                .map_err(|e| Status::invalid_argument(format!("environment {env:?}: {e}")))?;
        }
        if !r.envs.is_empty() && role != OperatorRole::Deployer {
            return Err(Status::invalid_argument(
                "only a deployer is limited to environments: a viewer reads everything, an admin changes everything",
            ));
        }
        let days = match r.validity_days {
            0 => OPERATOR_CERT_DAYS,
            d => u64::from(d.min(3650)),
        };
        let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
        let (record, cert_pem) = self.access.change_operators(|store| {
            if store.operator(&r.name).map_err(internal)?.is_some() {
                return Err(Status::already_exists(format!(
                    "operator {} exists (names are never reused, even revoked ones); choose another name",
                    r.name
                )));
            }
            let cert_pem = ca
                .sign_request(&identity, &r.csr_pem, Duration::from_secs(days * 86_400))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let record = OperatorRecord {
                name: r.name.clone(),
                role,
                envs: r.envs.clone(),
                created_by: by.to_string(),
                created_at_ms: cutover_common::now_ms(),
                revoked_at_ms: None,
                replaced: Vec::new(),
            };
            store.put_operator(&record).map_err(internal)?;
            Ok((record, cert_pem))
        })?;
        tracing::info!(operator = %record.name, role = record.role.as_str(), %by, "operator created");
        Ok(Response::new(pb::CreateOperatorResponse {
            operator: Some(operator_to_pb(&record)),
            cert_pem,
            ca_cert_pem: self.pki.bundle_pem(),
        }))
    }

    /// Marks an operator revoked, once allowed: every certificate of the
    /// name is refused from then on. A name without a record is refused
    /// unless `never_seen` (a certificate issued offline that never
    /// connected: it gets a revoked record, so it is refused too).
    fn revoke_operator_as(
        &self,
        by: &str,
        name: &str,
        never_seen: bool,
    ) -> Result<Response<pb::Operator>, Status> {
        cutover_common::identity::validate_name(name)
            .map_err(|e| Status::invalid_argument(format!("operator name: {e}")))?;
        let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
        let record = self.access.change_operators(|store| {
            let operators = store.operators().map_err(internal)?;
            let mut record = match operators.iter().find(|o| o.name == name) {
                Some(record) => record.clone(),
                None if never_seen => OperatorRecord::issued_offline(name),
                None => {
                    return Err(Status::not_found(format!(
                        "no operator {name}; `cutover operator list` shows them (a certificate issued offline that never connected: add --never-seen)"
                    )))
                }
            };
            if record.revoked_at_ms.is_some() {
                return Ok(record);
            }
            let admins_left = operators
                .iter()
                .filter(|o| {
                    o.name != name && o.role == OperatorRole::Admin && o.revoked_at_ms.is_none()
                })
                .count();
            if record.role == OperatorRole::Admin && admins_left == 0 {
                return Err(Status::failed_precondition(format!(
                    "operator {name} is the last admin; create another admin first (`cutover operator create NAME --role admin`)"
                )));
            }
            record.revoked_at_ms = Some(cutover_common::now_ms());
            store.put_operator(&record).map_err(internal)?;
            tracing::warn!(operator = %name, %by, "operator revoked");
            Ok(record)
        })?;
        Ok(Response::new(operator_to_pb(&record)))
    }

    /// Records that `peer`'s certificate of operator `name` was renewed
    /// into `renewed_pem`: the old one is refused once the new one is used
    /// (see `Access::check`); certificates already expired leave the record.
    fn replace_operator_certificate(
        &self,
        name: &str,
        peer: &PeerInfo,
        renewed_pem: &str,
    ) -> Result<(), Status> {
        let (Some(serial), Some(not_after)) = (&peer.serial, peer.not_after) else {
            return Err(Status::unauthenticated(
                "the connection's certificate has no serial or expiry; cannot renew it",
            ));
        };
        let renewed = rustls_pemfile::certs(&mut renewed_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .and_then(|der| cutover_common::identity::certificate_facts(&der).ok())
            .ok_or_else(|| Status::internal("cannot read the renewed certificate"))?;
        let internal = |e: crate::store::StoreError| Status::internal(e.to_string());
        self.access.change_operators(|store| {
            let mut record = store
                .operator(name)
                .map_err(internal)?
                .unwrap_or_else(|| OperatorRecord::issued_offline(name));
            let now = cutover_common::now_ms();
            record.replaced.retain(|c| c.expires_at_ms > now);
            record.replaced.push(crate::store::ReplacedCertificate {
                serial: serial.clone(),
                expires_at_ms: not_after * 1000,
                by: renewed.serial,
                retired: false,
            });
            store.put_operator(&record).map_err(internal)
        })
    }

    /// A deploy by operator `by`, once allowed.
    async fn deploy_as(
        &self,
        caller: &Caller,
        r: pb::DeployRequest,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        if let Some(artifact) = &r.artifact {
            Digest::parse(&artifact.digest)
                .map_err(|e| Status::invalid_argument(format!("artifact digest: {e}")))?;
        }
        let deployed = self
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
                by: caller.identity.name.clone(),
                may_pin_environments: caller.role == OperatorRole::Admin || caller.envs.is_empty(),
            })
            .await?;
        Ok(Response::new(match deployed {
            Deployed::Alone(started) => started_to_pb(started),
            Deployed::Together(deployment) => pb::DeployResponse {
                deployment: Some(deployment_to_pb(&deployment)),
                ..Default::default()
            },
        }))
    }

    /// The rest of a push after its header: the bytes, into the store.
    async fn receive_artifact(
        &self,
        who: &str,
        header: pb::PushArtifactHeader,
        mut parts: tonic::Streaming<pb::PushArtifactRequest>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
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
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let r = request.get_ref();
        let args = json!({"labels": r.labels, "ttl_ms": r.ttl_ms, "uses": r.uses});
        let caller = self
            .access
            .check(&request, Need::Admin, "create_token", &args)?;
        let r = request.into_inner();
        let result = (|| {
            let ttl = Duration::from_millis(r.ttl_ms);
            if ttl.is_zero() || ttl > crate::enroll::MAX_TOKEN_TTL {
                return Err(Status::invalid_argument(
                    "a token lives more than 0 and at most 30 days (--ttl)",
                ));
            }
            for (key, value) in &r.labels {
                cutover_common::identity::validate_name(key)
                    .map_err(|e| Status::invalid_argument(format!("label key {key:?}: {e}")))?;
                if value.len() > 253 || value.chars().any(char::is_control) {
                    return Err(Status::invalid_argument(format!(
                        "label {key}: the value must be at most 253 printable characters"
                    )));
                }
            }
            self.pki.signer().map_err(|_| {
                Status::failed_precondition(
                    "this coordinator cannot sign certificates, so nodes could not join: set `ca_key` in its config",
                )
            })?;
            let (token, record) = crate::enroll::new_token(
                r.labels.into_iter().collect(),
                ttl,
                r.uses,
                &caller.who(),
            );
            self.registry
                .store()
                .put_token(&record)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(pb::CreateTokenResponse {
                token,
                info: Some(crate::enroll::token_to_pb(&record)),
                ca_fingerprint: self.pki.server_ca_fingerprint()?,
            }))
        })();
        self.access.audit(&caller, "create_token", &args, &result);
        result
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "list_tokens",
            &serde_json::Value::Null,
        )?;
        let tokens = self
            .registry
            .store()
            .tokens()
            .map_err(|e| Status::internal(e.to_string()))?
            .iter()
            .map(crate::enroll::token_to_pb)
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let args = json!({"id": request.get_ref().id});
        let caller = self
            .access
            .check(&request, Need::Admin, "revoke_token", &args)?;
        let id = request.into_inner().id;
        let store = self.registry.store();
        let _writing = self.token_writes.lock().await;
        let result = store
            .token(&id)
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|t| {
                t.ok_or_else(|| {
                    Status::not_found(format!(
                        "no join token {id:?}; `cutover token list` shows them"
                    ))
                })
            })
            .and_then(|mut token| {
                token.revoked_at_ms.get_or_insert(cutover_common::now_ms());
                store
                    .put_token(&token)
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok(Response::new(crate::enroll::token_to_pb(&token)))
            });
        self.access.audit(&caller, "revoke_token", &args, &result);
        result
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        let args = json!({"node": request.get_ref().node});
        let caller = self
            .access
            .check(&request, Need::Admin, "revoke_node", &args)?;
        let node = request.into_inner().node;
        let result = cutover_common::identity::validate_name(&node)
            .map_err(|e| Status::invalid_argument(format!("node name: {e}")))
            .and_then(|()| {
                self.registry
                    .revoke(&node, &caller.who())
                    .map_err(Status::from)
            })
            .map(|revocation| {
                Response::new(pb::RevokeNodeResponse {
                    node: revocation.node,
                    serial: revocation.serial,
                })
            });
        self.access.audit(&caller, "revoke_node", &args, &result);
        result
    }

    async fn set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretEntry>, Status> {
        // Never the value: not here, not in the log, not in an error.
        let args = json!({"env": request.get_ref().env, "name": request.get_ref().name});
        let caller = self
            .access
            .check(&request, Need::Admin, "set_secret", &args)?;
        let r = request.into_inner();
        let result = self
            .secrets
            .set(&r.env, &r.name, &r.value, &caller.who())
            .and_then(|_| self.secrets.list(&r.env))
            .map_err(Status::from)
            .and_then(|all| {
                all.into_iter()
                    .find(|s| s.name == r.name)
                    .map(|info| Response::new(secret_to_pb(&r.env, info)))
                    .ok_or_else(|| Status::internal("the secret vanished after it was set"))
            });
        self.access.audit(&caller, "set_secret", &args, &result);
        result
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "list_secrets",
            &serde_json::Value::Null,
        )?;
        let env = request.into_inner().env;
        let secrets = self
            .secrets
            .list(&env)?
            .into_iter()
            .map(|info| secret_to_pb(&env, info))
            .collect();
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn remove_secret(
        &self,
        request: Request<pb::RemoveSecretRequest>,
    ) -> Result<Response<pb::RemoveSecretResponse>, Status> {
        let args = json!({"env": request.get_ref().env, "name": request.get_ref().name});
        let caller = self
            .access
            .check(&request, Need::Admin, "remove_secret", &args)?;
        let r = request.into_inner();
        let result = self
            .secrets
            .remove(&r.env, &r.name)
            .map(|removed| Response::new(pb::RemoveSecretResponse { removed }))
            .map_err(Status::from);
        self.access.audit(&caller, "remove_secret", &args, &result);
        result
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let args = serde_json::Value::Null;
        let caller = self
            .access
            .check(&request, Need::Admin, "rotate_master_key", &args)?;
        let secrets = self.secrets.clone();
        let result = tokio::task::spawn_blocking(move || secrets.rotate_master_key())
            .await
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|r| r.map_err(Status::from))
            .map(|(key_id, reencrypted)| {
                Response::new(pb::RotateMasterKeyResponse {
                    key_id,
                    reencrypted: reencrypted as u64,
                })
            });
        self.access
            .audit(&caller, "rotate_master_key", &args, &result);
        result
    }

    async fn rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        let args = serde_json::Value::Null;
        let caller = self
            .access
            .check(&request, Need::Admin, "rotate_ca", &args)?;
        let result = async {
            self.pki.start_rotation(&caller.who()).await?;
            Ok(Response::new(self.pki.status(&self.registry)?))
        }
        .await
        .map_err(|e: crate::ca::CaError| Status::from(e));
        self.access.audit(&caller, "rotate_ca", &args, &result);
        result
    }

    async fn get_ca_status(
        &self,
        request: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "get_ca_status",
            &serde_json::Value::Null,
        )?;
        Ok(Response::new(self.pki.status(&self.registry)?))
    }

    async fn renew_operator_certificate(
        &self,
        request: Request<pb::RenewOperatorCertificateRequest>,
    ) -> Result<Response<pb::RenewOperatorCertificateResponse>, Status> {
        let peer_info = request.extensions().get::<PeerInfo>().cloned();
        // The new certificate lives as long as the one it replaces was
        // made to (an operator chose it at creation), within the bounds
        // `operator create` allows.
        let lifetime = peer_info
            .clone()
            .and_then(|p| Some(p.not_after? - p.not_before? - cutover_common::pki::BACKDATE_SECS))
            .map_or(OPERATOR_CERT_DAYS * 86_400, |s| {
                (s.max(3600) as u64).min(3650 * 86_400)
            });
        let args = json!({"lifetime": humantime::format_duration(Duration::from_secs(lifetime)).to_string()});
        let caller = self
            .access
            .check(&request, Need::Own, "renew_operator_certificate", &args)?;
        let result = (|| {
            let cert_pem = self
                .pki
                .signer()?
                .sign_request(
                    &caller.identity,
                    &request.get_ref().csr_pem,
                    Duration::from_secs(lifetime),
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            // The certificate renewed is refused once the new one is used:
            // recorded before the new one is handed out.
            if let Some(peer) = &peer_info {
                self.replace_operator_certificate(&caller.identity.name, peer, &cert_pem)?;
            }
            Ok(Response::new(pb::RenewOperatorCertificateResponse {
                cert_pem,
                ca_bundle_pem: self.pki.bundle_pem(),
            }))
        })();
        self.access
            .audit(&caller, "renew_operator_certificate", &args, &result);
        result
    }

    async fn create_operator(
        &self,
        request: Request<pb::CreateOperatorRequest>,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        let r = request.get_ref();
        let args = json!({
            "name": r.name,
            "role": r.role,
            "envs": r.envs,
            "validity_days": r.validity_days,
        });
        let caller = self
            .access
            .check(&request, Need::Admin, "create_operator", &args)?;
        let result = self.create_operator_as(&caller.who(), request.into_inner());
        self.access
            .audit(&caller, "create_operator", &args, &result);
        result
    }

    async fn list_operators(
        &self,
        request: Request<pb::ListOperatorsRequest>,
    ) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "list_operators",
            &serde_json::Value::Null,
        )?;
        let operators = self
            .registry
            .store()
            .operators()
            .map_err(|e| Status::internal(e.to_string()))?
            .iter()
            .map(operator_to_pb)
            .collect();
        Ok(Response::new(pb::ListOperatorsResponse { operators }))
    }

    async fn revoke_operator(
        &self,
        request: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::Operator>, Status> {
        let args =
            json!({"name": request.get_ref().name, "never_seen": request.get_ref().never_seen});
        let caller = self
            .access
            .check(&request, Need::Admin, "revoke_operator", &args)?;
        let r = request.get_ref();
        let result = self.revoke_operator_as(&caller.who(), &r.name, r.never_seen);
        self.access
            .audit(&caller, "revoke_operator", &args, &result);
        result
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.access
            .check(&request, Need::Read, "list_audit", &serde_json::Value::Null)?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n => n.min(100_000) as usize,
        };
        let entries = self
            .registry
            .store()
            .audit(
                r.since_ms,
                Page {
                    after_seq: r.after_seq,
                    limit,
                    newest: r.newest,
                },
            )
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|e| pb::AuditEntry {
                seq: e.seq,
                at_ms: e.at_ms,
                who: e.who,
                action: e.action,
                arguments: e.arguments,
                outcome: e.outcome,
            })
            .collect();
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }

    async fn push_artifact(
        &self,
        request: Request<tonic::Streaming<pb::PushArtifactRequest>>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
        let caller = self.access.check(
            &request,
            Need::DeployAnywhere,
            "push_artifact",
            &serde_json::Value::Null,
        )?;
        let who = caller.identity.name.clone();
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(pb::push_artifact_request::Part::Header(header)) => header,
            _ => return Err(Status::invalid_argument("a push starts with its header")),
        };
        let args = json!({"name": header.name, "expect_digest": header.expect_digest});
        let result = self.receive_artifact(&who, header, parts).await;
        self.access.audit(&caller, "push_artifact", &args, &result);
        result
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.access
            .check(&request, Need::Read, "list_nodes", &serde_json::Value::Null)?;
        let nodes = self.registry.list().into_iter().map(node_to_pb).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn ping_node(
        &self,
        request: Request<pb::PingNodeRequest>,
    ) -> Result<Response<pb::PingNodeResponse>, Status> {
        self.access
            .check(&request, Need::Read, "ping_node", &serde_json::Value::Null)?;
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
        self.access.check(
            &request,
            Need::Read,
            "list_events",
            &serde_json::Value::Null,
        )?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let events = self
            .registry
            .events(Page {
                after_seq: request.after_seq,
                limit,
                newest: request.newest,
            })
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
        let r = request.get_ref();
        // The spec itself is not kept (its env tables may hold what should
        // not be copied around); its hash says which one it was.
        let spec_sha256 = Digest::from_hasher(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
            r.spec.as_bytes(),
        ));
        let args = json!({
            "env": r.env,
            "service": r.service,
            "version": r.version,
            "spec_file": r.spec_file,
            "spec_sha256": spec_sha256.to_string(),
            "artifact": r.artifact.as_ref().map(|a| json!({"url": a.url, "digest": a.digest})),
            "image": r.image,
            "allow_unreachable": r.allow_unreachable,
        });
        let env = r.env.clone();
        let caller = self
            .access
            .check(&request, Need::Deploy(&env), "deploy", &args)?;
        let result = self.deploy_as(&caller, request.into_inner()).await;
        self.access.audit(&caller, "deploy", &args, &result);
        result
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.get_ref();
        let args = json!({
            "env": r.env,
            "service": r.service,
            "to_release": r.to_release,
            "allow_unreachable": r.allow_unreachable,
            "force": r.force,
        });
        let env = r.env.clone();
        let caller = self
            .access
            .check(&request, Need::Deploy(&env), "rollback", &args)?;
        let r = request.into_inner();
        let result = self
            .rollouts
            .rollback(RollbackRequest {
                to: Some(r.to_release).filter(|t| !t.is_empty()),
                env: r.env,
                service: r.service,
                allow_unreachable: r.allow_unreachable,
                force: r.force,
                by: caller.identity.name.clone(),
                deployment: String::new(),
            })
            .await
            .map(|started| Response::new(started_to_pb(vec![started])))
            .map_err(Status::from);
        self.access.audit(&caller, "rollback", &args, &result);
        result
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "list_rollouts",
            &serde_json::Value::Null,
        )?;
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

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "get_deployment",
            &serde_json::Value::Null,
        )?;
        let deployment = self.rollouts.deployment(&request.get_ref().id)?;
        Ok(Response::new(deployment_to_pb(&deployment)))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "get_rollout",
            &serde_json::Value::Null,
        )?;
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
        self.access.check(
            &request,
            Need::Read,
            "watch_rollout",
            &serde_json::Value::Null,
        )?;
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
        let r = request.get_ref();
        let action = pb::RolloutAction::try_from(r.action)
            .map(|a| {
                a.as_str_name()
                    .trim_start_matches("ROLLOUT_ACTION_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let args = json!({"id": r.id, "action": action});
        let env = self.rollouts.get(&r.id)?.env;
        let caller = self
            .access
            .check(&request, Need::Deploy(&env), "control_rollout", &args)?;
        let by = caller.identity.name.clone();
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
        let result = self
            .rollouts
            .control(&r.id, input)
            .await
            .map(|rollout| Response::new(rollout_to_pb(&rollout)))
            .map_err(Status::from);
        self.access
            .audit(&caller, "control_rollout", &args, &result);
        result
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        self.access.check(
            &request,
            Need::Read,
            "list_releases",
            &serde_json::Value::Null,
        )?;
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
                note: record.note,
            })
            .collect();
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }
}
