//! `cutover rollout retry` of a deploy that ended without rolling out
//! (aborted, rolled back or failed): the same release, strategy, nodes and
//! hooks again, from the first step, as a new rollout (a canary starts at
//! its first weight again). A held rollout's retry is the engine's
//! (`Input::Retry`): it runs one command again within the same rollout.
//!
//! The retry is refused once the service moved on (another release became
//! current, or a rollout of it runs): what the old rollout returned to is
//! no longer what a retry would start from, and a deploy says what is
//! meant. A migration that ran to its end is not run again: the schema
//! already has it, and its record stays with the release; one that did not
//! finish runs again, as a new deploy would run it, and the timeline says
//! so. The fresh backups the deploy required are checked again (a retry
//! never skips them, whoever skipped them for the deploy).

use std::sync::Arc;

use super::model::{RolloutKind, RolloutState};
use super::{RolloutError, Rollouts, Started, Target};

impl Rollouts {
    /// Starts rollout `id`'s release again as a new rollout, by `by`.
    pub async fn retry_ended(
        self: &Arc<Self>,
        id: &str,
        by: &str,
    ) -> Result<Started, RolloutError> {
        let old = self.get(id).await?;
        let refuse = |why: String| Err(RolloutError::NotRetryable(why));
        if !matches!(
            old.state,
            RolloutState::Aborted | RolloutState::RolledBack | RolloutState::Failed
        ) {
            return refuse(format!(
                "rollout {id} is {}, not held and not ended aborted, rolled_back or failed: retry runs a held rollout's migration or hook again, or an ended deploy's release from its first step",
                old.state.as_str()
            ));
        }
        if old.kind != RolloutKind::Deploy {
            return refuse(format!(
                "rollout {id} is a {}, not a deploy; run `cutover rollback` (or wait for the converger) again instead",
                old.kind.as_str()
            ));
        }
        if !old.deployment.is_empty() {
            return refuse(format!(
                "rollout {id} is a step of deployment {}; deploy the spec again with `cutover deploy`",
                old.deployment
            ));
        }
        let _creating = self.create.lock().await;
        let history = self.release_history(&old.env, &old.service).await?;
        let Some(record) = history.iter().find(|r| r.release.id() == old.release.id()) else {
            return refuse(format!(
                "release {} of rollout {id} is no longer kept for {} in {}; deploy it again with `cutover deploy`",
                old.release.id(),
                old.service,
                old.env
            ));
        };
        // A stopped service serves nothing (`stopping`), whatever is current.
        let current = self.current_release(&old.env, &old.service).await?;
        if current.as_ref().map(|r| r.id()) != old.previous.as_ref().map(|r| r.id()) {
            return refuse(format!(
                "{} in {} serves {} now, not {} as when rollout {id} started; deploy {} again with `cutover deploy`",
                old.service,
                old.env,
                current.as_ref().map_or("nothing", |r| r.id()),
                old.previous.as_ref().map_or("nothing", |r| r.id()),
                old.release.id()
            ));
        }
        for gate in &old.backup_gates {
            let now_ms = self.registry.now_ms();
            let refusal =
                crate::jobs::recovery::check_gate(&self.store, &old.app, &old.env, gate, now_ms)
                    .await?;
            if let Some(refusal) = refusal {
                return Err(RolloutError::BackupGate(refusal));
            }
        }
        // A retry is a deploy: a freeze window or an operator's lock holds
        // it too.
        let now_ms = self.registry.now_ms();
        let policy = self.store.releases.policy(&old.env).await?;
        if let Some(refusal) = policy
            .as_ref()
            .and_then(|p| crate::policy::frozen(&old.env, p, now_ms))
        {
            return Err(RolloutError::Frozen(refusal));
        }
        if let Some(refusal) =
            crate::policy::lock::refusal(&self.store, &old.env, &old.service, now_ms).await?
        {
            return Err(RolloutError::ManuallyLocked(refusal));
        }
        let migration = old
            .migration
            .as_ref()
            .filter(|m| !m.ran() && record.migration.is_none())
            .map(|m| m.plan.clone());
        let migration_note = match (&old.migration, &migration) {
            (Some(_), None) => "; its migration ran already and is not run again",
            (Some(m), Some(_)) if m.sent => {
                "; its migration did not finish last time and runs again (check the schema)"
            }
            _ => "",
        };
        // An operator's rollout goes before a convergence, once it is sure
        // to start.
        self.make_way(&old.env, &old.service, by).await;
        let plan = self
            .plan(
                Target {
                    app: old.app.clone(),
                    env: old.env.clone(),
                    service: old.service.clone(),
                    kind: RolloutKind::Deploy,
                    // The rollout keeps a summary of its release once it
                    // ended; the record keeps what the nodes need.
                    release: record.release.0.clone(),
                    previous: current,
                    selector: record.selector.clone(),
                    strategy: old.strategy.clone(),
                    deployment: String::new(),
                    notes: vec![(
                        "warning".to_string(),
                        format!(
                            "{by} retried rollout {id} (it ended {}){migration_note}",
                            old.state.as_str(),
                        ),
                    )],
                    promoted_from: record.promoted_from.clone(),
                    migration,
                    hooks: old.hooks.iter().flat_map(|h| h.hooks.clone()).collect(),
                    notify: old.notify.clone(),
                    backup_gates: old.backup_gates.clone(),
                    load_balancer: old.load_balancer.clone(),
                    fast_return: false,
                    approval: policy.as_ref().and_then(|p| p.deploy_approval()),
                    config: record.config.clone(),
                },
                // Nodes the operator left out of the first try stay out.
                !old.skipped.is_empty(),
            )
            .await?;
        self.launch(plan, by).await
    }
}
