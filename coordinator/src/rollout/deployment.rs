//! A deploy of several services as one deployment: the services roll out
//! one after another in the spec's order (web first by default), each only
//! once the one before succeeded. When one fails and its strategy rolls
//! back, the services of the deployment that already switched are rolled
//! back too, newest first, so the app ends on one version: the one from
//! before the deployment.
//!
//! The deployment is stored before and after every step; its driver is
//! re-entrant, so a coordinator restarted at any point picks it up where
//! the stored record and the rollouts (which name their deployment) say
//! it was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::model::{Rollout, RolloutKind, RolloutState, StoredRelease};
use super::{RollbackRequest, RolloutError, Rollouts, Started};
use crate::hooks::Hook;
use crate::migration::Migration;
use crate::notify::spec::NotifyTarget;
use crate::spec::Strategy;
use crate::store::{LockHolder, StoreError};

/// Finished deployments kept; older ones are deleted.
const FINISHED_DEPLOYMENTS_KEPT: usize = 200;
/// How often a waiting driver looks at a rollout it cannot watch live.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    Running,
    /// A service failed; the ones that switched before it return.
    RollingBack,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
}

impl DeploymentState {
    /// As operators see it: the wire enum's name (see `rollout::states`).
    pub fn as_str(self) -> &'static str {
        pb::DeploymentState::from(self).as_str()
    }

    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            DeploymentState::Running | DeploymentState::RollingBack
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Waiting,
    Running,
    Succeeded,
    /// Its release already ran everywhere.
    Unchanged,
    Failed,
    /// Returned to its release from before the deployment.
    RolledBack,
    /// Switched, and could not be returned: it serves the deployment's
    /// release (the deployment's error says why).
    RollbackFailed,
    /// An earlier service failed first.
    NotStarted,
}

impl StepState {
    /// As operators see it: the wire enum's name (see `rollout::states`).
    pub fn as_str(self) -> &'static str {
        pb::DeploymentStepState::from(self).as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStep {
    pub service: String,
    /// Resolved and pinned at the deploy: every step runs what the operator
    /// deployed, however long the steps before it take.
    pub release: StoredRelease,
    pub selector: BTreeMap<String, String>,
    pub strategy: Strategy,
    /// The app's migration, when this service runs it.
    #[serde(default)]
    pub migration: Option<Migration>,
    /// The spec's run-once hooks for this service.
    #[serde(default)]
    pub hooks: Vec<Hook>,
    pub state: StepState,
    pub rollout_id: String,
    /// What the service ran before its rollout (from the rollout): what a
    /// rollback returns it to.
    #[serde(default)]
    pub previous: Option<String>,
    pub rollback_rollout_id: String,
    /// The external load balancer of the service in the environment.
    #[serde(default)]
    pub load_balancer: Option<crate::lb::LoadBalancer>,
    /// The `cutover config set` overrides its release carries.
    #[serde(default)]
    pub config: BTreeMap<String, crate::store::ConfigOverride>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub app: String,
    pub env: String,
    pub state: DeploymentState,
    pub steps: Vec<DeploymentStep>,
    pub allow_unreachable: bool,
    /// What each of its rollouts says first, as (kind, message): an
    /// admin's break of glass.
    #[serde(default)]
    pub notes: Vec<(String, String)>,
    /// The approvals its first rollout waits for (the first step whose
    /// release does not run everywhere already): approved, the deployment
    /// goes on without asking again.
    #[serde(default)]
    pub approval: Option<crate::policy::ApprovalRule>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// Why it did not succeed.
    pub error: String,
    /// The webhooks of its rollouts' events.
    #[serde(default)]
    pub notify: Vec<NotifyTarget>,
}

impl Rollouts {
    /// Stores a new deployment and starts its driver.
    pub(super) async fn start_deployment(
        self: &Arc<Self>,
        deployment: Deployment,
    ) -> Result<(), StoreError> {
        self.store.rollouts.put_deployment(&deployment).await?;
        self.record_deployment(
            &deployment,
            format!(
                "{} started a deployment of {} in {}: {}",
                deployment.created_by,
                deployment.app,
                deployment.env,
                deployment
                    .steps
                    .iter()
                    .map(|s| format!("{} {}", s.service, s.release.id()))
                    .collect::<Vec<_>>()
                    .join(", then ")
            ),
        );
        self.spawn_deployment(deployment);
        Ok(())
    }

    /// Picks up every deployment a previous run left unfinished (after the
    /// rollouts: the driver waits on them).
    pub(super) async fn recover_deployments(self: &Arc<Self>) -> Result<usize, StoreError> {
        let unfinished: Vec<Deployment> = self
            .store
            .rollouts
            .deployments()
            .await?
            .into_iter()
            .filter(|d| !d.state.is_terminal())
            .collect();
        let count = unfinished.len();
        for deployment in unfinished {
            tracing::info!(deployment = %deployment.id, state = deployment.state.as_str(), "resuming deployment after restart");
            self.spawn_deployment(deployment);
        }
        Ok(count)
    }

    pub async fn deployment(&self, id: &str) -> Result<Deployment, RolloutError> {
        self.store
            .rollouts
            .deployment(id)
            .await?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    fn spawn_deployment(self: &Arc<Self>, deployment: Deployment) {
        let this = self.clone();
        self.tasks
            .spawn(async move { this.drive(deployment).await });
    }

    /// Runs the deployment to its end, one step per turn, storing it after
    /// each; returns early only on shutdown.
    async fn drive(self: &Arc<Self>, mut d: Deployment) {
        while !d.state.is_terminal() {
            let turned = match d.state {
                DeploymentState::Running => self.forward(&mut d).await,
                _ => self.backward(&mut d).await,
            };
            if !turned {
                return; // shutting down; the next start resumes
            }
            while let Err(error) = self.store.rollouts.put_deployment(&d).await {
                tracing::error!(deployment = %d.id, %error, "cannot persist the deployment; retrying");
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        self.free_deployment(&d).await;
        if let Err(error) = self.prune_deployments().await {
            tracing::error!(%error, "cannot prune old deployments");
        }
    }

    /// Frees every service of a deployment that ended (or never started).
    pub(super) async fn free_deployment(&self, d: &Deployment) {
        let holder = LockHolder::Deployment(d.id.clone());
        for step in &d.steps {
            self.free_service(&d.env, &step.service, &holder).await;
        }
    }

    /// One step forward: start the next service, or take in how the
    /// running one ended. False on shutdown.
    async fn forward(self: &Arc<Self>, d: &mut Deployment) -> bool {
        let Some(i) = d
            .steps
            .iter()
            .position(|s| matches!(s.state, StepState::Waiting | StepState::Running))
        else {
            self.end(d, DeploymentState::Succeeded, String::new());
            return true;
        };
        if d.steps[i].state == StepState::Waiting {
            match self.start_step(d, i).await {
                Ok(Some(rollout)) => {
                    d.steps[i].rollout_id = rollout.id;
                    d.steps[i].previous = rollout.previous.map(|p| p.id().to_string());
                    d.steps[i].state = StepState::Running;
                }
                Ok(None) => d.steps[i].state = StepState::Unchanged,
                Err(error) => {
                    d.steps[i].state = StepState::Failed;
                    let why = format!("{} could not start: {error}", d.steps[i].service);
                    self.failed(d, i, why, d.steps[i].strategy.auto_rollback);
                }
            }
            return true;
        }
        let rollout = match self.ended(&d.steps[i].rollout_id).await {
            Some(Ok(rollout)) => rollout,
            Some(Err(error)) => {
                d.steps[i].state = StepState::Failed;
                let why = format!("{}: {error}", d.steps[i].service);
                self.failed(d, i, why, d.steps[i].strategy.auto_rollback);
                return true;
            }
            None => return false,
        };
        match rollout.state {
            RolloutState::Succeeded => d.steps[i].state = StepState::Succeeded,
            RolloutState::Aborted => {
                d.steps[i].state = StepState::Failed;
                for later in &mut d.steps[i + 1..] {
                    later.state = StepState::NotStarted;
                }
                let why = format!(
                    "rollout {} of {} was aborted; the services after it were not started",
                    rollout.id, rollout.service
                );
                self.end(d, DeploymentState::Aborted, why);
            }
            state => {
                d.steps[i].state = StepState::Failed;
                let cause = rollout
                    .error
                    .as_ref()
                    .map_or_else(|| state.as_str().to_string(), ToString::to_string);
                let why = format!(
                    "{} failed in rollout {} ({cause})",
                    rollout.service, rollout.id
                );
                self.failed(d, i, why, rollout.strategy.auto_rollback);
            }
        }
        true
    }

    /// Step `i` failed: later services never start; with `auto_rollback`
    /// the ones before it that switched return.
    fn failed(&self, d: &mut Deployment, i: usize, why: String, auto_rollback: bool) {
        for later in &mut d.steps[i + 1..] {
            later.state = StepState::NotStarted;
        }
        let switched: Vec<&str> = d.steps[..i]
            .iter()
            .filter(|s| s.state == StepState::Succeeded)
            .map(|s| s.service.as_str())
            .collect();
        if switched.is_empty() {
            self.end(d, DeploymentState::RolledBack, why);
        } else if auto_rollback {
            self.record_deployment(d, format!("{why}; rolling back {}", switched.join(", ")));
            d.error = why;
            d.state = DeploymentState::RollingBack;
        } else {
            let why = format!(
                "{why}; auto_rollback is off: {} stay on the new release",
                switched.join(", ")
            );
            self.end(d, DeploymentState::Failed, why);
        }
    }

    /// One step back: return the newest service that switched, or take in
    /// how its rollback ended. False on shutdown.
    async fn backward(self: &Arc<Self>, d: &mut Deployment) -> bool {
        let Some(j) = d
            .steps
            .iter()
            .rposition(|s| s.state == StepState::Succeeded)
        else {
            let state = if d.steps.iter().any(|s| s.state == StepState::RollbackFailed) {
                DeploymentState::Failed
            } else {
                DeploymentState::RolledBack
            };
            let why = d.error.clone();
            self.end(d, state, why);
            return true;
        };
        if d.steps[j].rollback_rollout_id.is_empty() {
            match self.start_step_rollback(d, j).await {
                Ok(Some(id)) => d.steps[j].rollback_rollout_id = id,
                Ok(None) => d.steps[j].state = StepState::RolledBack,
                Err(error) => {
                    // It stays on the deployment's release: said, and left.
                    d.error = format!(
                        "{}; {} could not be rolled back: {error}",
                        d.error, d.steps[j].service
                    );
                    d.steps[j].state = StepState::RollbackFailed;
                }
            }
            return true;
        }
        match self.ended(&d.steps[j].rollback_rollout_id).await {
            None => return false,
            Some(Ok(rollout)) if rollout.state == RolloutState::Succeeded => {
                d.steps[j].state = StepState::RolledBack;
            }
            Some(Ok(rollout)) => {
                d.error = format!(
                    "{}; rolling {} back failed in rollout {} ({})",
                    d.error,
                    rollout.service,
                    rollout.id,
                    rollout.state.as_str()
                );
                d.steps[j].state = StepState::RollbackFailed;
            }
            Some(Err(error)) => {
                d.error = format!("{}; rolling {} back: {error}", d.error, d.steps[j].service);
                d.steps[j].state = StepState::RollbackFailed;
            }
        }
        true
    }

    /// Starts step `i`'s rollout; `None` when its release already runs
    /// everywhere. A rollout an earlier run started for the step (the
    /// coordinator stopped before storing the deployment) is taken as is.
    async fn start_step(
        self: &Arc<Self>,
        d: &Deployment,
        i: usize,
    ) -> Result<Option<Rollout>, RolloutError> {
        let step = &d.steps[i];
        if let Some(rollout) = self
            .started_for(d, &step.service, RolloutKind::Deploy)
            .await?
        {
            return Ok(Some(rollout));
        }
        let _creating = self.create.lock().await;
        self.make_way(&d.env, &step.service, &d.created_by).await;
        let previous = self.current_release(&d.env, &step.service).await?;
        let plan = self
            .plan(
                super::Target {
                    app: d.app.clone(),
                    env: d.env.clone(),
                    service: step.service.clone(),
                    kind: RolloutKind::Deploy,
                    release: step.release.0.clone(),
                    previous,
                    selector: step.selector.clone(),
                    strategy: step.strategy.clone(),
                    deployment: d.id.clone(),
                    notes: d.notes.clone(),
                    promoted_from: String::new(),
                    migration: step.migration.clone(),
                    hooks: step.hooks.clone(),
                    notify: d.notify.clone(),
                    // Checked when the deployment was made; a step is not
                    // retried on its own.
                    backup_gates: Vec::new(),
                    load_balancer: step.load_balancer.clone(),
                    fast_return: false,
                    // The first step that rolls anything out asks; the
                    // rest are part of what was approved.
                    approval: d.steps[..i]
                        .iter()
                        .all(|s| s.state == StepState::Unchanged)
                        .then_some(d.approval)
                        .flatten(),
                    config: step.config.clone(),
                },
                d.allow_unreachable,
            )
            .await?;
        Ok(match self.launch(plan, &d.created_by).await? {
            Started::Rollout(rollout) => Some(*rollout),
            Started::NoOp { .. } => None,
        })
    }

    /// Starts the rollback of step `j` to what its service ran before the
    /// deployment; `None` when that already runs everywhere.
    async fn start_step_rollback(
        self: &Arc<Self>,
        d: &mut Deployment,
        j: usize,
    ) -> Result<Option<String>, RolloutError> {
        let service = d.steps[j].service.clone();
        if let Some(rollout) = self.started_for(d, &service, RolloutKind::Rollback).await? {
            return Ok(Some(rollout.id));
        }
        let Some(previous) = d.steps[j].previous.clone() else {
            return Err(RolloutError::NoRollbackTarget(format!(
                "it had no release before the deployment and keeps {}",
                d.steps[j].release.id()
            )));
        };
        let started = self
            .rollback(RollbackRequest {
                env: d.env.clone(),
                service,
                to: Some(previous),
                allow_unreachable: true,
                force: false,
                by: format!("deployment {}", d.id),
                ignore_schema: None,
                deployment: d.id.clone(),
                careful: false,
                break_glass: None,
            })
            .await?;
        Ok(match started {
            Started::Rollout(rollout) => Some(rollout.id),
            Started::NoOp { .. } => None,
        })
    }

    /// The rollout of `kind` this deployment started for `service`, if any.
    async fn started_for(
        &self,
        d: &Deployment,
        service: &str,
        kind: RolloutKind,
    ) -> Result<Option<Rollout>, StoreError> {
        Ok(self
            .store
            .rollouts
            .list()
            .await?
            .into_iter()
            .find(|r| r.deployment == d.id && r.service == service && r.kind == kind))
    }

    /// Waits for rollout `id` to end; `None` on shutdown, an error when the
    /// rollout is gone.
    async fn ended(&self, id: &str) -> Option<Result<Rollout, RolloutError>> {
        loop {
            if let Some(mut watch) = self.subscribe(id) {
                let ended = async {
                    while !watch.borrow_and_update().state.is_terminal() {
                        if watch.changed().await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return None,
                    _ = ended => {}
                }
            }
            match self.get(id).await {
                Ok(rollout) if rollout.state.is_terminal() => return Some(Ok(rollout)),
                Ok(_) => {}
                Err(error @ RolloutError::NotFound(_)) => return Some(Err(error)),
                Err(error) => {
                    tracing::error!(rollout = %id, %error, "cannot read a deployment's rollout");
                }
            }
            // Between the live view and the stored one (or not yet spawned
            // after a restart): look again shortly.
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    fn end(&self, d: &mut Deployment, state: DeploymentState, why: String) {
        d.state = state;
        d.error = why;
        d.finished_at_ms = Some(self.registry.now_ms());
        // What names each release is all a finished deployment needs (the
        // release history keeps them whole).
        for step in &mut d.steps {
            step.release = step.release.summary();
        }
        let message = match d.error.as_str() {
            "" => format!("deployment {} {}", d.id, state.as_str()),
            why => format!("deployment {} {}: {why}", d.id, state.as_str()),
        };
        self.record_deployment(d, message);
    }

    fn record_deployment(&self, d: &Deployment, message: String) {
        tracing::info!(deployment = %d.id, state = d.state.as_str(), "{message}");
        let event = crate::store::NewEvent {
            kind: "deployment",
            node_id: String::new(),
            node_name: String::new(),
            message,
        };
        self.registry.journal().event(event);
    }

    async fn prune_deployments(&self) -> Result<(), StoreError> {
        let finished: Vec<Deployment> = self
            .store
            .rollouts
            .deployments()
            .await?
            .into_iter()
            .filter(|d| d.state.is_terminal())
            .collect();
        let excess = finished.len().saturating_sub(FINISHED_DEPLOYMENTS_KEPT);
        for old in &finished[..excess] {
            self.store.rollouts.delete_deployment(&old.id).await?;
        }
        Ok(())
    }
}
