//! Rollbacks: returning a service to a kept release.
//!
//! "Previous" is the newest stable release deployed before the current
//! one. Releases whose rollout failed, and releases an operator (or a
//! failed deployment) rolled back from, are skipped: `cutover rollback`
//! run twice walks further back, never forward again. Any kept release can
//! be named with `--to`; one that never passed its own rollout needs
//! `--force`.
//!
//! A rollback to a release that was stable here takes the fast path
//! (`Step::Return`): every node at once, each health-gated, no batches or
//! watches. `--careful`, `[strategy] rollback = "batched"` (the target's)
//! or a forced target (it never proved itself) run it as a deploy runs.

use std::sync::Arc;

use super::model::RolloutKind;
use super::{RolloutError, Rollouts, Started, Target};
use crate::lb::LoadBalancer;
use crate::migration::MigrationPhase;
use crate::notify::spec::NotifyTarget;
use crate::store::{ReleaseRecord, ReleaseState, StoreError};
use crate::strategy::RollbackPace;

/// A rollback as the operator (or a deployment) asked for it.
pub struct RollbackRequest {
    pub env: String,
    pub service: String,
    /// A kept release id; `None`: the previous release.
    pub to: Option<String>,
    pub allow_unreachable: bool,
    /// Allows a target that failed (or never finished) its own rollout.
    pub force: bool,
    /// Rolls back past a contract migration, for this reason (an admin's
    /// call, checked by the caller).
    pub ignore_schema: Option<String>,
    pub by: String,
    /// The deployment rolling back its services, or empty.
    pub deployment: String,
    /// Returns in the strategy's batches, as a deploy, even to a release
    /// that qualifies for the fast path (`cutover rollback --careful`).
    pub careful: bool,
    /// An admin's reason not to wait for the environment's approvals.
    pub break_glass: Option<String>,
}

/// The release a rollback without `--to` returns to: the newest stable one
/// deployed before the current one (`history` is newest first).
pub fn previous(history: &[ReleaseRecord]) -> Option<&ReleaseRecord> {
    let current = history.iter().find(|r| r.current);
    history.iter().find(|r| {
        !r.current
            && r.state == ReleaseState::Stable
            && current.is_none_or(|c| r.deployed_at_ms < c.deployed_at_ms)
    })
}

impl Rollouts {
    /// Rolls a service back to its previous release, or to `request.to`.
    pub async fn rollback(
        self: &Arc<Self>,
        request: RollbackRequest,
    ) -> Result<Started, RolloutError> {
        let RollbackRequest {
            env, service, by, ..
        } = &request;
        let _creating = self.create.lock().await;
        // Before a convergence is aborted for it: a refused rollback must
        // not leave the converger's work undone.
        self.refuse_if_stopped(env, service, "roll back").await?;
        self.make_way(env, service, by).await;
        // A running rollout is the answer to "why not", before any question
        // of which release to return to.
        self.check_free(env, service, &request.deployment).await?;
        // An operator's lock holds a rollback too (whoever locked the
        // service may be changing what a rollback would meet), but not a
        // deployment's return of its own steps.
        let mut locked = None;
        if request.deployment.is_empty() {
            let now_ms = self.registry.now_ms();
            locked = crate::policy::lock::refusal(&self.store, env, service, now_ms).await?;
            if let (Some(refusal), None) = (&locked, &request.break_glass) {
                return Err(RolloutError::ManuallyLocked(refusal.clone()));
            }
        }
        let history = self.store.releases.history(env, service).await?;
        if history.is_empty() {
            return Err(RolloutError::NoRollbackTarget(format!(
                "{service} has no releases in {env}; check the names with `cutover releases`"
            )));
        }
        let current = history.iter().find(|r| r.current);
        let target = match &request.to {
            Some(id) => history.iter().find(|r| r.release.id() == id).ok_or_else(|| {
                RolloutError::NoRollbackTarget(format!(
                    "{service} in {env} has no kept release {id:?}; `cutover releases {service} --env {env}` lists them"
                ))
            })?,
            None => previous(&history).ok_or_else(|| {
                RolloutError::NoRollbackTarget(format!(
                    "{service} in {env} has no stable release deployed before the current one; name one with --to (`cutover releases {service} --env {env}` lists them)"
                ))
            })?,
        };
        let proven = matches!(target.state, ReleaseState::Stable | ReleaseState::Reverted);
        if !proven && !request.force {
            return Err(RolloutError::NoRollbackTarget(format!(
                "release {} of {service} is {}{}: it never passed its own rollout; roll back to it with --force if you mean it",
                target.release.id(),
                target.state.as_str(),
                match target.note.as_str() {
                    "" => String::new(),
                    note => format!(" ({note})"),
                }
            )));
        }
        // Code older than a contract migration may not work with the
        // schema it left.
        let past_contract = history.iter().find(|r| {
            r.deployed_at_ms > target.deployed_at_ms
                && r.migration
                    .as_ref()
                    .is_some_and(|m| m.phase == MigrationPhase::Contract)
        });
        let mut warning = (!proven).then(|| {
            format!(
                "{by} forced a rollback to {}, which is {}",
                target.release.id(),
                target.state.as_str()
            )
        });
        if let Some(contract) = past_contract {
            let Some(reason) = &request.ignore_schema else {
                return Err(RolloutError::NoRollbackTarget(format!(
                    "release {} of {service} ran a contract migration ({}), and the code of {} may not work with the schema it left; roll forward instead, or (admin) pass --ignore-schema --reason TEXT",
                    contract.release.id(),
                    contract.migration.as_ref().map_or("", |m| m.rollout_id.as_str()),
                    target.release.id()
                )));
            };
            let note = format!(
                "{by} rolled back past the contract migration of {}: {reason}",
                contract.release.id()
            );
            warning = Some(match warning {
                Some(forced) => format!("{forced}; {note}"),
                None => note,
            });
        }
        let (notify, load_balancer) = self.inherited(current).await?;
        // An operator's rollback asks the environment's approvers (unless
        // `approvals_for_rollback = 0`); a deployment's rollback of its
        // steps is part of what was approved.
        let mut approval = match request.deployment.as_str() {
            "" => self
                .store
                .releases
                .policy(env)
                .await?
                .and_then(|p| p.rollback_approval()),
            _ => None,
        };
        let mut notes: Vec<(String, String)> = warning
            .map(|w| ("warning".to_string(), w))
            .into_iter()
            .collect();
        if let Some(reason) = &request.break_glass {
            let in_the_way: Vec<String> = approval
                .take()
                .map(|rule| format!("{} approval(s) of environment {env}", rule.required))
                .into_iter()
                .chain(locked)
                .collect();
            notes.push(crate::policy::break_glass_note(by, reason, &in_the_way));
        }
        let fast_return =
            proven && !request.careful && target.strategy.rollback == RollbackPace::Fast;
        let mut strategy = target.strategy.clone();
        if request.careful {
            // Careful all the way: a failure returns in batches too.
            strategy.rollback = RollbackPace::Batched;
        }
        let plan = self
            .plan(
                Target {
                    app: target.app.clone(),
                    env: env.clone(),
                    service: service.clone(),
                    kind: RolloutKind::Rollback,
                    release: target.release.0.clone(),
                    previous: current.map(|c| c.release.clone()),
                    selector: target.selector.clone(),
                    strategy,
                    deployment: request.deployment.clone(),
                    notes,
                    promoted_from: String::new(),
                    // A rollback returns code, never runs a migration.
                    migration: None,
                    hooks: Vec::new(),
                    notify,
                    // A rollback returns code and needs no fresh backup.
                    backup_gates: Vec::new(),
                    load_balancer,
                    fast_return,
                    approval,
                    config: Default::default(),
                },
                request.allow_unreachable,
            )
            .await?;
        self.launch(plan, by).await
    }

    /// What a rollout made without a spec (a rollback, a convergence)
    /// keeps of the rollout that made `current` current: it notifies where
    /// the service's last deploy did, and drains through its load
    /// balancer.
    pub(super) async fn inherited(
        &self,
        current: Option<&ReleaseRecord>,
    ) -> Result<(Vec<NotifyTarget>, Option<LoadBalancer>), StoreError> {
        let Some(current) = current else {
            return Ok((Vec::new(), None));
        };
        Ok(self
            .store
            .rollouts
            .get(&current.rollout_id)
            .await?
            .map(|r| (r.notify, r.load_balancer))
            .unwrap_or_default())
    }
}
