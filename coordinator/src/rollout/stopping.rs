//! `cutover service stop`, `start` and `remove`.
//!
//! A stop is a rollout of one step (`engine/stop.rs`): every node of the
//! environment that runs the service drains it, stops it and frees its
//! port. The service keeps its current release, which a start rolls out
//! again as a deploy of it. A removal also stops it, on every node of the
//! environment, and each agent forgets the service; once it succeeded the
//! service has no current release (its history stays).
//!
//! The newest rollout of the service says that it is stopped (its outcome
//! is a stop's or a removal's): the converger then stops it on a node that
//! comes back running it, a deploy starts it as a first deploy would (its
//! failure stops it again rather than start what the operator stopped),
//! and rollbacks and config changes, which would start it, are refused.

use std::sync::Arc;

use super::model::{NodeState, Rollout, RolloutKind, RolloutState};
use super::{RolloutError, Rollouts, Started, Target};
use crate::store::{ReleaseRecord, ServiceOutcome, StoppedBy, StoreError};

pub struct StopRequest {
    pub env: String,
    pub service: String,
    pub by: String,
    /// Forget the service too (`cutover service remove`).
    pub remove: bool,
    pub reason: String,
    /// An admin's reason to step past a `cutover lock`.
    pub break_glass: Option<String>,
}

pub struct StartRequest {
    pub env: String,
    pub service: String,
    pub by: String,
    pub reason: String,
    pub break_glass: Option<String>,
    pub allow_unreachable: bool,
}

/// Whether `outcome`, a service's newest, leaves it stopped: a stop or
/// removal that sent something, whatever became of it (what it could not
/// stop, the converger stops), and every rollout after it that did not
/// take (see `stopped_after`).
pub(super) fn stops(outcome: &ServiceOutcome) -> bool {
    outcome.stopped.is_some()
}

/// The kind of rollout that stops the service again where it runs: a
/// stop, or a removal.
pub(super) fn stop_kind(outcome: &ServiceOutcome) -> RolloutKind {
    match &outcome.stopped {
        Some(stop) if stop.removed => RolloutKind::Remove,
        _ => RolloutKind::Stop,
    }
}

/// The stop a service is under once `rollout` ended, `before` its outcome
/// before: one that sent nothing changed nothing; a stop or removal is
/// the stop; a rollout that took (a start, a deploy) ends it; one that did
/// not (a start that failed and stopped its nodes again) leaves it.
pub(super) fn stopped_after(
    rollout: &Rollout,
    before: Option<&ServiceOutcome>,
) -> Option<StoppedBy> {
    let carried = || before.and_then(|o| o.stopped.clone());
    if rollout.sent_nothing() {
        return carried();
    }
    if rollout.kind.stops() {
        return Some(StoppedBy {
            rollout_id: rollout.id.clone(),
            removed: rollout.kind == RolloutKind::Remove,
        });
    }
    match rollout.took() {
        true => None,
        false => carried(),
    }
}

impl Rollouts {
    /// The newest rollout of the service, when it left it stopped.
    pub(super) async fn stopped(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<ServiceOutcome>, StoreError> {
        Ok(self
            .store
            .releases
            .outcome(env, service)
            .await?
            .filter(stops))
    }

    /// Refuses what would start a stopped service as a side effect (a
    /// rollback, a config change, a scale): `doing` names it.
    pub(super) async fn refuse_if_stopped(
        &self,
        env: &str,
        service: &str,
        doing: &str,
    ) -> Result<(), RolloutError> {
        let Some(stop) = self.stopped(env, service).await? else {
            return Ok(());
        };
        let how = match stop_kind(&stop) {
            RolloutKind::Remove => "deploy it to bring it back".to_string(),
            _ => format!(
                "`cutover service start {service} --env {env}` starts its current release, or deploy a new one"
            ),
        };
        Err(RolloutError::Stopped(format!(
            "{service} in {env} is {}, so there is nothing to {doing}; {how}",
            describe(&stop),
        )))
    }

    /// Stops (or removes) a service on every node of its environment.
    pub async fn stop_service(
        self: &Arc<Self>,
        request: StopRequest,
    ) -> Result<Started, RolloutError> {
        let StopRequest {
            env, service, by, ..
        } = &request;
        let kind = match request.remove {
            true => RolloutKind::Remove,
            false => RolloutKind::Stop,
        };
        let _creating = self.create.lock().await;
        let in_the_way = self.check_lock(env, service, &request.break_glass).await?;
        let last = self.store.releases.outcome(env, service).await?;
        let current = match self.store.releases.current(env, service).await? {
            Some(current) => current,
            // A removal that succeeded left no current release: what a
            // node that was away still runs, the converger removes.
            None => {
                let removed = last
                    .as_ref()
                    .and_then(|o| o.stopped.as_ref())
                    .filter(|s| s.removed);
                let why = match removed {
                    Some(removed) => format!(
                        "{service} in {env} was removed already (rollout {}); nothing to {}",
                        removed.rollout_id,
                        kind.as_str()
                    ),
                    None => format!(
                        "{service} has no release in environment {env}, so there is nothing to {}; check the names with `cutover releases SERVICE --env ENV`",
                        kind.as_str()
                    ),
                };
                return Err(RolloutError::NoCurrent(why));
            }
        };
        // Past what refuses it: a convergence gives way to it alone.
        self.make_way(env, service, by).await;
        self.check_free(env, service, "").await?;
        let mut notes = vec![(
            kind.as_str().to_string(),
            match request.reason.trim() {
                "" => format!("{by} asked to {} {service}", kind.as_str()),
                reason => format!("{by} asked to {} {service}: {reason}", kind.as_str()),
            },
        )];
        if let Some(reason) = &request.break_glass {
            notes.push(crate::policy::break_glass_note(by, reason, &in_the_way));
        }
        let (notify, load_balancer) = self.inherited(Some(&current)).await?;
        let target = self.target_of(&current, kind, notes, notify, load_balancer);
        // Nodes away now are stopped by the converger once they are back.
        let mut plan = match self.plan(target, true).await {
            Err(RolloutError::Unreachable { nodes, .. }) => {
                return Err(RolloutError::NoneReachable {
                    env: env.clone(),
                    service: service.clone(),
                    nodes,
                })
            }
            planned => planned?,
        };
        // A node that runs nothing of it has nothing to stop; a removal
        // reaches every node, as one that stopped it earlier still knows it.
        for node in &mut plan.nodes {
            node.state = match kind == RolloutKind::Stop && node.from_release.is_empty() {
                true => NodeState::Unchanged,
                false => NodeState::Pending,
            };
        }
        let nothing_runs = plan.nodes.iter().all(|n| n.state == NodeState::Unchanged);
        let same = last
            .as_ref()
            .is_some_and(|l| stops(l) && stop_kind(l) == kind);
        if nothing_runs && same {
            return Ok(Started::NoOp {
                message: format!(
                    "{service} in {env} is {} already and runs on none of its {} nodes; nothing to do",
                    match kind {
                        RolloutKind::Remove => "removed",
                        _ => "stopped",
                    },
                    plan.nodes.len()
                ),
                service: service.clone(),
                release_id: current.release.id().to_string(),
            });
        }
        self.launch(plan, by).await
    }

    /// Starts a stopped service again with its current release.
    pub async fn start_service(
        self: &Arc<Self>,
        request: StartRequest,
    ) -> Result<Started, RolloutError> {
        let StartRequest {
            env, service, by, ..
        } = &request;
        let _creating = self.create.lock().await;
        let in_the_way = self.check_lock(env, service, &request.break_glass).await?;
        let Some(current) = self.store.releases.current(env, service).await? else {
            return Err(RolloutError::NoCurrent(format!(
                "{service} has no current release in environment {env} (never deployed, or removed), so there is nothing to start; deploy it"
            )));
        };
        if self.stopped(env, service).await?.is_none() {
            return Err(RolloutError::NoCurrent(format!(
                "{service} in {env} is not stopped: it runs {}; `cutover nodes` shows its nodes",
                current.release.id()
            )));
        }
        self.make_way(env, service, by).await;
        self.check_free(env, service, "").await?;
        let mut notes = vec![(
            "start".to_string(),
            match request.reason.trim() {
                "" => format!(
                    "{by} starts {service} again with its current release {}",
                    current.release.id()
                ),
                reason => format!(
                    "{by} starts {service} again with its current release {}: {reason}",
                    current.release.id()
                ),
            },
        )];
        if let Some(reason) = &request.break_glass {
            notes.push(crate::policy::break_glass_note(by, reason, &in_the_way));
        }
        let (notify, load_balancer) = self.inherited(Some(&current)).await?;
        let target = self.target_of(&current, RolloutKind::Deploy, notes, notify, load_balancer);
        let plan = self.plan(target, request.allow_unreachable).await?;
        self.launch(plan, by).await
    }

    /// An operator's `cutover lock` holds a stop and a start as any change:
    /// refused, unless an admin breaks glass (then it is what was in the
    /// way, for the timeline).
    async fn check_lock(
        &self,
        env: &str,
        service: &str,
        break_glass: &Option<String>,
    ) -> Result<Vec<String>, RolloutError> {
        let now_ms = self.registry.now_ms();
        match crate::policy::lock::refusal(&self.store, env, service, now_ms).await? {
            Some(refusal) if break_glass.is_none() => Err(RolloutError::ManuallyLocked(refusal)),
            locked => Ok(locked.into_iter().collect()),
        }
    }

    /// A rollout of the service's current release as it was deployed (no
    /// migration, no hook, no backup gate): its stop, or its start.
    pub(super) fn target_of(
        &self,
        current: &ReleaseRecord,
        kind: RolloutKind,
        notes: Vec<(String, String)>,
        notify: Vec<crate::notify::spec::NotifyTarget>,
        load_balancer: Option<crate::lb::LoadBalancer>,
    ) -> Target {
        Target {
            app: current.app.clone(),
            env: current.env.clone(),
            service: current.service.clone(),
            kind,
            release: current.release.0.clone(),
            previous: None,
            selector: current.selector.clone(),
            strategy: current.strategy.clone(),
            deployment: String::new(),
            notes,
            promoted_from: String::new(),
            migration: None,
            hooks: Vec::new(),
            notify,
            backup_gates: Vec::new(),
            load_balancer,
            fast_return: false,
            approval: None,
            config: current.config.clone(),
        }
    }
}

/// How a stopped service came to be so: "stopped (rollout web-7)",
/// "partly stopped (rollout web-7 was aborted)", "stopped (rollout web-7;
/// web-8 since did not take)".
fn describe(outcome: &ServiceOutcome) -> String {
    let Some(stop) = &outcome.stopped else {
        return "running".to_string();
    };
    let (what, id) = (
        if stop.removed { "removed" } else { "stopped" },
        &stop.rollout_id,
    );
    if outcome.rollout_id != *id {
        return format!(
            "{what} (rollout {id}; {} since did not take)",
            outcome.rollout_id
        );
    }
    match outcome.state {
        RolloutState::Succeeded => format!("{what} (rollout {id})"),
        RolloutState::Aborted => format!("partly {what} (rollout {id} was aborted)"),
        _ => format!("{what}, but not on every node yet (rollout {id})"),
    }
}
