//! Deploys and rollbacks, the rollouts and deployments they start (listing,
//! watching, pausing, resuming, aborting), and each service's releases.

use cutover_common::digest::Digest;
use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::{Caller, Need};
use crate::rollout::deployment::Deployment;
use crate::rollout::engine::Input;
use crate::rollout::model::{
    self, CanaryPhase, Phase, RollingPhase, Rollout, RolloutState, StoredRelease,
};
use crate::rollout::{DeployRequest, Deployed, RollbackRequest, Started};
use crate::strategy::canary::CanaryStep;

/// What `WatchRollout` answers with: the rollout as it changes.
pub(super) type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::Rollout, Status>> + Send + 'static>,
>;

pub(super) fn release_info(release: &StoredRelease) -> pb::ReleaseInfo {
    pb::ReleaseInfo {
        id: release.id().to_string(),
        version: release.version().to_string(),
        digest: release.digest().to_string(),
        image: release.image().to_string(),
        instances: release.0.instances.max(1),
    }
}

fn error_to_pb(e: &model::RolloutError) -> pb::RolloutError {
    pb::RolloutError {
        node: e.node.clone(),
        step: e.step.clone(),
        message: e.message.clone(),
    }
}

fn rollout_to_pb(r: &Rollout) -> pb::Rollout {
    let (phase, batch) = match r.phase {
        Phase::Prepare => ("prepare", 0),
        Phase::Migrate => ("migrate", 0),
        Phase::Hooks(at) => (at.as_str(), 0),
        Phase::Rolling(RollingPhase::Batch(b)) => ("batch", b + 1),
        Phase::Rolling(RollingPhase::Watch { batch, .. }) => ("watch", batch + 1),
        Phase::Canary(_) => ("canary", 0),
        Phase::Return => ("return", 0),
        Phase::Stop => ("stop", 0),
        Phase::RollingBack => ("rolling_back", 0),
        Phase::Done => ("done", 0),
    };
    pb::Rollout {
        id: r.id.clone(),
        app: r.app.clone(),
        env: r.env.clone(),
        service: r.service.clone(),
        kind: r.kind.as_str().into(),
        state: pb::RolloutState::from(r.state).into(),
        release: Some(release_info(&r.release)),
        previous_release: r.previous.as_ref().map(release_info),
        nodes: r
            .nodes
            .iter()
            .map(|n| pb::RolloutNode {
                name: n.name.clone(),
                id: n.id.clone(),
                state: pb::RolloutNodeState::from(n.state).into(),
                release: n.release.clone(),
                from_release: n.from_release.clone(),
                batch: n.batch.map_or(0, |b| b + 1),
                step: n.step.clone(),
                canary: n.canary,
                weight: n.weight,
                refused: n.refused,
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
        canary: canary_status(r),
        analysis: super::analysis::analysis_to_pb(r),
        approval: r.approval.as_ref().map(|a| {
            let decision = |d: &model::Decision| pb::ApprovalDecision {
                by: d.by.clone(),
                comment: d.comment.clone(),
                at_ms: d.at_ms,
            };
            pb::ApprovalStatus {
                required: a.required,
                approvals: a.approvals.iter().map(decision).collect(),
                rejected: a.rejected.as_ref().map(decision),
                expires_at_ms: a.expires_at_ms,
            }
        }),
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

/// Whether `by`'s approval or rejection is recorded on `rollout`.
fn decided(rollout: &Rollout, by: &str) -> bool {
    rollout.approval.as_ref().is_some_and(|a| {
        a.approvals.iter().any(|d| d.by == by) || a.rejected.as_ref().is_some_and(|d| d.by == by)
    })
}

/// Where a canary rollout is in its steps.
fn canary_status(r: &Rollout) -> Option<pb::CanaryStatus> {
    let canary = r.strategy.canary()?;
    let canary_nodes: Vec<&model::RolloutNode> = r.nodes.iter().filter(|n| n.canary).collect();
    let weight = canary_nodes.iter().map(|n| n.weight).max().unwrap_or(0);
    let steps = canary.steps.len() as u32;
    let (step, since) = match r.phase {
        Phase::Canary(CanaryPhase::Staging) => (0, None),
        Phase::Canary(CanaryPhase::Step { index, since_ms }) => (index + 1, since_ms),
        // Promoted (or ended) once it left its steps with canary nodes.
        _ if !canary_nodes.is_empty() => (steps + 1, None),
        _ => (0, None),
    };
    let current = canary
        .steps
        .get(step.saturating_sub(1) as usize)
        .filter(|_| step >= 1);
    let pause_until_ms = match (current, since) {
        (Some(CanaryStep::Pause(Some(ms))), Some(since)) => since + *ms as i64,
        _ => 0,
    };
    Some(pb::CanaryStatus {
        steps: canary.steps.iter().map(ToString::to_string).collect(),
        step,
        weight,
        fleet_weight: crate::rollout::engine::fleet_weight(r, weight),
        canary_nodes: canary_nodes.iter().map(|n| n.name.clone()).collect(),
        awaiting_promotion: crate::rollout::engine::awaiting_promotion(r),
        pause_until_ms,
        promoted: step > steps,
    })
}

fn deployment_to_pb(d: &Deployment) -> pb::Deployment {
    pb::Deployment {
        id: d.id.clone(),
        app: d.app.clone(),
        env: d.env.clone(),
        state: pb::DeploymentState::from(d.state).into(),
        steps: d
            .steps
            .iter()
            .map(|s| pb::DeploymentStep {
                service: s.service.clone(),
                release_id: s.release.id().to_string(),
                state: pb::DeploymentStepState::from(s.state).into(),
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

pub(super) fn started_to_pb(started: Vec<Started>) -> pb::DeployResponse {
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

impl OperatorApi {
    pub(super) async fn handle_deploy(
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
            "skip_migrate": r.skip_migrate,
            "migrate_node": r.migrate_node,
            "skip_backup_gate": r.skip_backup_gate,
            "break_glass": r.break_glass,
            "reason": r.reason,
        });
        let env = r.env.clone();
        // Deploying without the backups the spec requires, or past a freeze
        // or a promotion rule, is an admin's call, with a reason.
        let need = if r.skip_backup_gate || r.break_glass {
            Need::Admin
        } else {
            Need::Deploy(&env)
        };
        self.audited(request, need, "deploy", args, |caller, r| async move {
            if r.skip_backup_gate && r.reason.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "--skip-backup-gate needs --reason TEXT: why deploying without a fresh backup is safe",
                ));
            }
            self.deploy_as(caller, r, None).await
        })
        .await
    }

    /// A deploy by `caller`, once allowed; `promoted_from` names the
    /// release a promotion took it from.
    pub(super) async fn deploy_as(
        &self,
        caller: Caller,
        r: pb::DeployRequest,
        promoted_from: Option<String>,
    ) -> Result<pb::DeployResponse, Status> {
        if r.break_glass && r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "--break-glass needs --reason TEXT: why this deploy cannot wait for the freeze window's end or the promotion rule",
            ));
        }
        // A switch while an agent upgrade waits for a node to serve what it
        // served would fail that node's upgrade. A rollback is never held.
        if let Some(upgrade) = self.agent_upgrades.running() {
            return Err(Status::failed_precondition(format!(
                "agent upgrade {upgrade} is running; deploy once it ended (`cutover events`)"
            )));
        }
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
                skip_migrate: r.skip_migrate,
                skip_backup_gate: r.skip_backup_gate,
                migrate_node: Some(r.migrate_node).filter(|n| !n.is_empty()),
                may_pin_environments: caller.may_pin_environments(),
                may_set_policy: caller.is_admin(),
                break_glass: r.break_glass.then_some(r.reason),
                promoted_from,
                by: caller.identity.name,
            })
            .await?;
        Ok(match deployed {
            Deployed::Alone(started) => started_to_pb(started),
            Deployed::Together(deployment) => pb::DeployResponse {
                deployment: Some(deployment_to_pb(&deployment)),
                ..Default::default()
            },
        })
    }

    pub(super) async fn handle_rollback(
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
            "ignore_schema": r.ignore_schema,
            "reason": r.reason,
            "careful": r.careful,
            "break_glass": r.break_glass,
        });
        let env = r.env.clone();
        // Past a contract migration, or without the approvals, is an
        // admin's call, with a reason.
        let need = if r.ignore_schema || r.break_glass {
            Need::Admin
        } else {
            Need::Deploy(&env)
        };
        self.audited(
            request,
            need,
            "rollback",
            args,
            |caller, r| async move {
                if r.ignore_schema && r.reason.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "--ignore-schema needs --reason TEXT: why the old code is safe with the new schema",
                    ));
                }
                if r.break_glass && r.reason.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "--break-glass needs --reason TEXT: why this rollback cannot wait for an approval",
                    ));
                }
                let started = self
                    .rollouts
                    .rollback(RollbackRequest {
                        to: Some(r.to_release).filter(|t| !t.is_empty()),
                        env: r.env,
                        service: r.service,
                        allow_unreachable: r.allow_unreachable,
                        force: r.force,
                        ignore_schema: r.ignore_schema.then(|| r.reason.clone()),
                        by: caller.identity.name,
                        deployment: String::new(),
                        careful: r.careful,
                        break_glass: r.break_glass.then(|| r.reason.clone()),
                    })
                    .await?;
                Ok(started_to_pb(vec![started]))
            },
        )
        .await
    }

    pub(super) async fn handle_list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_rollouts",
                &serde_json::Value::Null,
            )
            .await?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 50,
            n => n as usize,
        };
        let rollouts = self
            .rollouts
            .list()
            .await?
            .iter()
            .filter(|x| r.env.is_empty() || x.env == r.env)
            .filter(|x| r.service.is_empty() || x.service == r.service)
            .take(limit)
            .map(rollout_to_pb)
            .collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    pub(super) async fn handle_get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "get_deployment",
                &serde_json::Value::Null,
            )
            .await?;
        let deployment = self.rollouts.deployment(&request.get_ref().id).await?;
        Ok(Response::new(deployment_to_pb(&deployment)))
    }

    pub(super) async fn handle_get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "get_rollout",
                &serde_json::Value::Null,
            )
            .await?;
        let rollout = self.rollouts.get(&request.into_inner().id).await?;
        Ok(Response::new(rollout_to_pb(&rollout)))
    }

    pub(super) async fn handle_watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "watch_rollout",
                &serde_json::Value::Null,
            )
            .await?;
        let id = request.into_inner().id;
        let Some(mut changes) = self.rollouts.subscribe(&id) else {
            let rollout = self.rollouts.get(&id).await?;
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
                    if let Ok(last) = rollouts.get(&id).await {
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

    /// Checked and audited by hand, not through `audited`: the rollout's
    /// environment (what the role is checked against) is looked up first,
    /// and an unknown action is refused after the check without an audit
    /// entry, as nothing was attempted.
    pub(super) async fn handle_control_rollout(
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
        let args = json!({"id": r.id, "action": action, "comment": r.comment});
        let env = self.rollouts.get(&r.id).await?.env;
        let caller = self
            .access
            .check(&request, Need::Deploy(&env), "control_rollout", &args)
            .await?;
        let by = caller.identity.name.clone();
        let r = request.into_inner();
        let input = match pb::RolloutAction::try_from(r.action) {
            Ok(pb::RolloutAction::Pause) => Input::Pause { by },
            Ok(pb::RolloutAction::Resume) => Input::Resume { by },
            Ok(pb::RolloutAction::Abort) => Input::Abort { by },
            Ok(pb::RolloutAction::Retry) => Input::Retry { by },
            Ok(pb::RolloutAction::Promote) => Input::Promote { by, full: false },
            Ok(pb::RolloutAction::PromoteFull) => Input::Promote { by, full: true },
            Ok(pb::RolloutAction::Approve) => Input::Approve {
                by,
                comment: r.comment.clone(),
            },
            Ok(pb::RolloutAction::Reject) => Input::Reject {
                by,
                comment: r.comment.clone(),
            },
            _ => {
                return Err(Status::invalid_argument(
                    "action must be pause, resume, abort, retry, promote, promote_full, approve or reject",
                ))
            }
        };
        // Retry runs a held rollout's command again, or an ended deploy's
        // release as a new rollout; only retry (or abort) moves a held one.
        let rollout = self.rollouts.get(&r.id).await?;
        let state = rollout.state;
        let held = state == RolloutState::Held;
        if let (Input::Retry { by }, true) = (&input, state.is_terminal()) {
            let result = match self.rollouts.retry_ended(&r.id, by).await {
                Ok(Started::Rollout(rollout)) => Ok(Response::new(rollout_to_pb(&rollout))),
                Ok(Started::NoOp { message, .. }) => Err(Status::failed_precondition(message)),
                Err(error) => Err(Status::from(error)),
            };
            self.access
                .audit(&caller, "control_rollout", &args, &result)
                .await;
            return result;
        }
        let refusal = match &input {
            Input::Promote { full, .. } => crate::rollout::engine::promote_refusal(&rollout, *full),
            Input::Approve { by, .. } => crate::rollout::engine::approve_refusal(&rollout, by),
            Input::Reject { .. } => crate::rollout::engine::reject_refusal(&rollout),
            Input::Pause { .. } | Input::Resume { .. }
                if state == RolloutState::AwaitingApproval =>
            {
                Some(format!(
                    "rollout {} awaits approval and has not started: approve, reject or abort it",
                    r.id
                ))
            }
            Input::Retry { .. } if !held => Some(format!(
                "rollout {} is {}, not held or ended: retry runs again a held rollout's migration or hook, or an ended deploy from its first step",
                r.id,
                state.as_str()
            )),
            Input::Resume { .. } | Input::Pause { .. } if held => Some(format!(
                "rollout {} is held: a command's outcome is not known (see `cutover rollout status {}`); retry or abort it",
                r.id, r.id
            )),
            _ => None,
        };
        if let Some(message) = refusal {
            let result = Err(Status::failed_precondition(message));
            self.access
                .audit(&caller, "control_rollout", &args, &result)
                .await;
            return result;
        }
        let decision = match &input {
            Input::Approve { by, .. } | Input::Reject { by, .. } => Some(by.clone()),
            _ => None,
        };
        let result = match self.rollouts.control(&r.id, input).await {
            Ok(rollout) => match decision.filter(|by| !decided(&rollout, by)) {
                // Checked above, yet not taken: another operator's decision
                // or the request's expiry came first.
                Some(by) => Err(Status::failed_precondition(
                    crate::rollout::engine::approve_refusal(&rollout, &by).unwrap_or_else(|| {
                        format!("rollout {} did not take the decision in; try again", r.id)
                    }),
                )),
                None => Ok(Response::new(rollout_to_pb(&rollout))),
            },
            Err(error) => Err(Status::from(error)),
        };
        self.access
            .audit(&caller, "control_rollout", &args, &result)
            .await;
        result
    }

    pub(super) async fn handle_list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_releases",
                &serde_json::Value::Null,
            )
            .await?;
        let r = request.into_inner();
        let releases = self
            .rollouts
            .release_history(&r.env, &r.service)
            .await?
            .into_iter()
            .map(|record| pb::ReleaseEntry {
                release: Some(release_info(&record.release)),
                state: pb::ReleaseState::from(record.state).into(),
                current: record.current,
                deployed_by: record.deployed_by,
                deployed_at_ms: record.deployed_at_ms,
                rollout_id: record.rollout_id,
                note: record.note,
                migration_phase: record
                    .migration
                    .as_ref()
                    .map(|m| m.phase.as_str().to_string())
                    .unwrap_or_default(),
                migrated_at_ms: record.migration.as_ref().map_or(0, |m| m.ran_at_ms),
                migration_duration_ms: record.migration.as_ref().map_or(0, |m| m.duration_ms),
                migration_output: record
                    .migration
                    .as_ref()
                    .map(|m| m.output.clone())
                    .unwrap_or_default(),
                schema: record
                    .migration
                    .as_ref()
                    .and_then(|m| m.schema.clone())
                    .unwrap_or_default(),
                promoted_from: record.promoted_from,
            })
            .collect();
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }
}
