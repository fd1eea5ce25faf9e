//! What stays of a rollout once it ended: the outcome, the release
//! history (which release is current, which failed or was rolled back
//! from) and the pruning of old rollouts.

use std::collections::HashSet;
use std::time::Duration;

use super::model::{Rollout, RolloutKind, RolloutState};
use super::Rollouts;
use crate::store::{MigrationRecord, ReleaseState, ServiceOutcome, StoreError};

/// Releases kept per service and environment (the current one always).
const RELEASES_KEPT: usize = 10;
/// Finished converge rollouts kept (besides `FINISHED_ROLLOUTS_KEPT`).
const CONVERGE_ROLLOUTS_KEPT: usize = 100;
/// Finished rollouts kept, with their timelines; older ones are deleted.
const FINISHED_ROLLOUTS_KEPT: usize = 1000;

impl Rollouts {
    /// Settles the release history and metrics of a rollout that ended.
    /// A store that fails is tried again: the rollout must not be stored
    /// as ended while its history says it still deploys (the simulation's
    /// seed 63 found the history left so, the error only logged). Returns
    /// false when the coordinator shuts down first; the rollout is then
    /// not stored as ended, and the restart redoes its end.
    pub(super) async fn finished(&self, rollout: &Rollout) -> bool {
        // From its start: the wait for approvals is no rollout time.
        let started_ms = rollout
            .timeline
            .iter()
            .find(|t| t.kind == "started")
            .map_or(rollout.created_at_ms, |t| t.at_ms);
        let seconds =
            (rollout.finished_at_ms.unwrap_or(rollout.updated_at_ms) - started_ms) as f64 / 1000.0;
        self.metrics.rollout_finished(rollout, seconds);
        loop {
            match self.settle(rollout).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::error!(rollout = %rollout.id, %error, "cannot record how the rollout ended; retrying");
                }
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// The outcome, the release history and the pruning, each idempotent.
    async fn settle(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let before = self
            .store
            .releases
            .outcome(&rollout.env, &rollout.service)
            .await?;
        let outcome = ServiceOutcome {
            stopped: super::stopping::stopped_after(rollout, before.as_ref()),
            env: rollout.env.clone(),
            service: rollout.service.clone(),
            rollout_id: rollout.id.clone(),
            kind: rollout.kind,
            state: rollout.state,
            auto_rollback: rollout.rolls_back(),
            at_ms: rollout.finished_at_ms.unwrap_or(rollout.updated_at_ms),
            returned: rollout.returning || rollout.sent_nothing(),
            refused: refused_after(rollout, before.as_ref()),
        };
        self.store.releases.put_outcome(&outcome).await?;
        self.settle_history(rollout).await?;
        self.prune_rollouts().await
    }

    /// Keeps the newest finished rollouts; convergences, which a node that
    /// cannot converge repeats, have a smaller share of their own so they
    /// never push operators' rollouts out.
    async fn prune_rollouts(&self) -> Result<(), StoreError> {
        // A deployment that runs still reads the rollouts of its steps.
        let running_deployments: HashSet<String> = self
            .store
            .rollouts
            .deployments()
            .await?
            .into_iter()
            .filter(|d| !d.state.is_terminal())
            .map(|d| d.id)
            .collect();
        let (converges, others): (Vec<Rollout>, Vec<Rollout>) = self
            .store
            .rollouts
            .list()
            .await?
            .into_iter()
            .filter(|r| r.state.is_terminal() && !running_deployments.contains(&r.deployment))
            .partition(|r| r.kind == RolloutKind::Converge);
        for (finished, kept) in [
            (converges, CONVERGE_ROLLOUTS_KEPT),
            (others, FINISHED_ROLLOUTS_KEPT),
        ] {
            let excess = finished.len().saturating_sub(kept);
            for old in &finished[..excess] {
                self.store.rollouts.delete(&old.id).await?;
            }
        }
        Ok(())
    }

    async fn settle_history(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let mut history = self
            .store
            .releases
            .history(&rollout.env, &rollout.service)
            .await?;
        let target = rollout.release.id();
        let from = rollout.previous.as_ref().map(|p| p.id().to_string());
        let succeeded = rollout.state == RolloutState::Succeeded;
        // A fast rollback that returned some nodes but not all still took:
        // the release the operator chose is current (the converger brings
        // back what drifts from it), the refusing nodes stay as they are.
        let took = rollout.took();
        for record in &mut history {
            let before = record.clone();
            let is_target = record.release.id() == target;
            if succeeded && rollout.kind == RolloutKind::Remove {
                // Removed: nothing is current; the history stays, the
                // releases keep their states.
                if record.current {
                    record.current = false;
                    record.current_until_ms =
                        rollout.finished_at_ms.unwrap_or(rollout.updated_at_ms);
                    record.note = format!(
                        "{} removed {} ({})",
                        rollout.created_by, rollout.service, rollout.id
                    );
                }
            } else if took && !rollout.kind.stops() {
                // How long each release was current is what a promotion
                // rule's soak reads: a release made current again starts
                // over.
                let at = rollout.finished_at_ms.unwrap_or(rollout.updated_at_ms);
                if is_target && !record.current {
                    record.current_since_ms = at;
                    record.current_until_ms = 0;
                } else if !is_target && record.current {
                    record.current_until_ms = at;
                }
                record.current = is_target;
                if is_target {
                    record.state = ReleaseState::Stable;
                } else if rollout.kind == RolloutKind::Rollback
                    && Some(record.release.id()) == from.as_deref()
                {
                    // Not a failure of its own: it is kept apart from
                    // releases that failed their rollout.
                    record.state = ReleaseState::Reverted;
                    record.note = format!(
                        "{} rolled back to {target} ({})",
                        rollout.created_by, rollout.id
                    );
                }
            }
            if is_target {
                if let Some(run) = rollout.migration.as_ref().filter(|m| m.ran()) {
                    let ran_at_ms = rollout
                        .timeline
                        .iter()
                        .find(|t| t.kind == "migrated")
                        .map_or(rollout.updated_at_ms, |t| t.at_ms);
                    record.migration = Some(MigrationRecord {
                        phase: run.plan.phase,
                        ran_at_ms,
                        node: run.run.node_name.clone(),
                        rollout_id: rollout.id.clone(),
                        duration_ms: run.duration_ms,
                        output: run.summary.clone(),
                        schema: run.schema.clone(),
                    });
                }
            }
            if !succeeded && is_target && rollout.kind == RolloutKind::Deploy && !record.current {
                record.state = match rollout.state {
                    RolloutState::RolledBack => ReleaseState::RolledBack,
                    RolloutState::Aborted => ReleaseState::Aborted,
                    _ => ReleaseState::Failed,
                };
                record.note = match &rollout.error {
                    Some(error) => error.to_string(),
                    None => format!("{} ({})", rollout.state.as_str(), rollout.id),
                };
            }
            if *record != before {
                self.store.releases.put(record).await?;
            }
        }
        // Keep the newest few, and always the current one.
        let mut kept = 0;
        for record in &history {
            kept += 1;
            if kept > RELEASES_KEPT && !record.current {
                self.store
                    .releases
                    .delete(&record.env, &record.service, record.release.id())
                    .await?;
            }
        }
        Ok(())
    }
}

/// The nodes the converger leaves after `rollout`: those that refused its
/// return, and after a convergence (which never includes them) those the
/// outcome `before` it named; a deploy or rollback starts afresh.
fn refused_after(rollout: &Rollout, before: Option<&ServiceOutcome>) -> Vec<String> {
    let mut refused: Vec<String> = match rollout.kind {
        RolloutKind::Converge => before.map(|o| o.refused.clone()).unwrap_or_default(),
        _ => Vec::new(),
    };
    for node in rollout.nodes.iter().filter(|n| n.refused) {
        if !refused.contains(&node.id) {
            refused.push(node.id.clone());
        }
    }
    refused
}
