//! What a deploy must pass before anything is created: the backup gates,
//! the environment's pinned nodes and its policy (freeze windows, the
//! promotion rule), operators' locks on its services, with an admin's
//! break of glass past the policy and the locks.
//! Nothing here writes until every check has passed, so a refused deploy
//! changes nothing.

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;

use super::planner::DeployRequest;
use super::{RolloutError, Rollouts};
use crate::policy::{ApprovalRule, EnvironmentPolicy};
use crate::spec::{AppSpec, EnvironmentSpec};
use crate::store::Store;

impl Rollouts {
    /// The fresh backups the environment (every deploy) and the migration
    /// (a deploy that runs it) require, unless an admin skips them.
    pub(super) async fn check_backup_gates(
        &self,
        spec: &AppSpec,
        services: &[String],
        environment: &EnvironmentSpec,
        request: &DeployRequest,
    ) -> Result<(), RolloutError> {
        if request.skip_backup_gate {
            return Ok(());
        }
        let migration = spec
            .migrate
            .as_ref()
            .filter(|m| !request.skip_migrate && services.contains(&m.service))
            .and_then(|m| m.require_backup.as_ref());
        for gate in environment.require_backup.iter().chain(migration) {
            let now_ms = self.registry.now_ms();
            let refusal = crate::jobs::recovery::check_gate(
                &self.store,
                &spec.app,
                &request.env,
                gate,
                now_ms,
            )
            .await?;
            if let Some(refusal) = refusal {
                return Err(RolloutError::BackupGate(refusal));
            }
        }
        Ok(())
    }

    /// Which nodes an environment covers is the coordinator's to keep (see
    /// `environments::pin`).
    pub(super) async fn pin_environment(
        &self,
        request: &DeployRequest,
        selector: &BTreeMap<String, String>,
    ) -> Result<(), RolloutError> {
        crate::environments::pin(
            &self.store,
            &request.env,
            selector,
            request.may_pin_environments,
            &request.by,
        )
        .await?
        .map_err(RolloutError::EnvironmentPinned)
    }

    /// The environment's policy for this deploy: pinned (or changed by an
    /// admin) and its freeze windows checked now; each release goes
    /// through `PolicyGate::check_release`.
    pub(super) async fn policy_gate<'a>(
        &self,
        request: &'a DeployRequest,
        environment: &EnvironmentSpec,
    ) -> Result<PolicyGate<'a>, RolloutError> {
        let policy = EnvironmentPolicy::of(environment);
        let new_policy =
            crate::policy::check_pin(&self.store, &request.env, &policy, request.may_set_policy)
                .await?
                .map_err(RolloutError::EnvironmentPinned)?;
        let mut gate = PolicyGate {
            request,
            now_ms: self.registry.now_ms(),
            policy,
            new_policy,
            in_the_way: Vec::new(),
        };
        let frozen = crate::policy::frozen(&request.env, &gate.policy, gate.now_ms);
        gate.refused(frozen, RolloutError::Frozen)?;
        Ok(gate)
    }
}

impl Rollouts {
    /// A deploy to an environment that mirrors another: a warning for
    /// each difference from what the other runs (`env_diff::mirrored`),
    /// said first in the rollouts' timelines.
    pub(super) async fn mirror_warnings(
        &self,
        spec: &AppSpec,
        env: &str,
        resolved: &[crate::spec::Resolved],
    ) -> Result<Vec<(String, String)>, RolloutError> {
        let Some(other) = spec.environments.get(env).and_then(|e| e.mirror.clone()) else {
            return Ok(Vec::new());
        };
        let declared: std::collections::BTreeSet<String> = [env, other.as_str()]
            .iter()
            .filter_map(|e| spec.environments.get(*e))
            .flat_map(|e| e.env.keys().cloned())
            .collect();
        let nodes = self.registry.list();
        let figures = |selector: &BTreeMap<String, String>| {
            nodes
                .iter()
                .filter(|n| crate::spec::selects(selector, &n.record.labels))
                .map(|n| n.record.figures.as_ref())
                .collect::<Vec<_>>()
        };
        let mut warnings = Vec::new();
        for service in resolved {
            let name = &service.service;
            let Some(theirs) = self.store.releases.current(&other, name).await? else {
                warnings.push(format!(
                    "{env} mirrors {other}, which runs no {name} yet: nothing to compare"
                ));
                continue;
            };
            let ours = crate::env_diff::Side {
                release: &service.release,
                strategy: &service.strategy,
                nodes: figures(&service.selector),
            };
            let other_side = crate::env_diff::Side {
                release: &theirs.release.0,
                strategy: &theirs.strategy,
                nodes: figures(&theirs.selector),
            };
            let rows =
                crate::env_diff::mirrored(crate::env_diff::compare(&ours, &other_side), &declared);
            let shown = rows.len().min(MIRROR_WARNINGS);
            for row in &rows[..shown] {
                warnings.push(format!(
                    "{env} differs from {other}, which it mirrors: {name} {} {}: {} here, {} there",
                    row.aspect,
                    row.key,
                    quoted(&row.a),
                    quoted(&row.b)
                ));
            }
            if rows.len() > shown {
                warnings.push(format!(
                    "{env} differs from {other} in {} more ways: `cutover diff {name} --env {env} --env {other}`",
                    rows.len() - shown
                ));
            }
        }
        Ok(warnings
            .into_iter()
            .map(|w| ("warning".to_string(), w))
            .collect())
    }
}

/// Differences a mirror names one by one; `cutover diff` has the rest.
const MIRROR_WARNINGS: usize = 10;

/// A value as a warning quotes it; nothing for an absent one.
fn quoted(value: &str) -> String {
    match value {
        "" => "nothing".to_string(),
        value => format!("{value:?}"),
    }
}

/// One deploy on its way past its environment's policy: what stood in the
/// way of an admin who broke glass is kept for the timeline.
pub(super) struct PolicyGate<'a> {
    request: &'a DeployRequest,
    now_ms: i64,
    policy: EnvironmentPolicy,
    /// The policy to pin once the deploy goes ahead.
    new_policy: Option<EnvironmentPolicy>,
    in_the_way: Vec<String>,
}

impl PolicyGate<'_> {
    /// Whether the environment takes this release (the promotion rule).
    pub(super) async fn check_release(
        &mut self,
        store: &Store,
        release: &pb::Release,
    ) -> Result<(), RolloutError> {
        let refusal = crate::policy::promotion::check(
            store,
            &self.request.env,
            &self.policy,
            release,
            self.now_ms,
        )
        .await?;
        self.refused(refusal, RolloutError::NotPromoted)
    }

    /// Whether an operator locked the service (`cutover lock`).
    pub(super) async fn check_lock(
        &mut self,
        store: &Store,
        service: &str,
    ) -> Result<(), RolloutError> {
        let refusal =
            crate::policy::lock::refusal(store, &self.request.env, service, self.now_ms).await?;
        self.refused(refusal, RolloutError::ManuallyLocked)
    }

    /// A refusal ends the deploy, unless an admin broke glass.
    fn refused(
        &mut self,
        refusal: Option<String>,
        error: fn(String) -> RolloutError,
    ) -> Result<(), RolloutError> {
        match refusal {
            Some(refusal) if self.request.break_glass.is_none() => Err(error(refusal)),
            Some(refusal) => {
                self.in_the_way.push(refusal);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Every check passed: pins a changed policy and returns what the
    /// rollouts say first and the approvals they wait for. A break of
    /// glass skips the approvals too (an admin's incident does not wait).
    pub(super) async fn admit(mut self, store: &Store) -> Result<Admitted, RolloutError> {
        let request = self.request;
        let mut approval = self.policy.deploy_approval();
        if let (Some(rule), Some(_)) = (approval, &request.break_glass) {
            self.in_the_way.push(format!(
                "{} approval(s) of environment {}",
                rule.required, request.env
            ));
            approval = None;
        }
        let mut notes = Vec::new();
        if let Some(reason) = &request.break_glass {
            notes.push(crate::policy::break_glass_note(
                &request.by,
                reason,
                &self.in_the_way,
            ));
        }
        if let Some(from) = &request.promoted_from {
            notes.push(("promoted".to_string(), format!("promoted from {from}")));
        }
        if let Some(policy) = &self.new_policy {
            crate::policy::pin(store, &request.env, policy, &request.by).await?;
        }
        Ok(Admitted { notes, approval })
    }
}

/// What a deploy that passed its environment's policy carries into its
/// rollouts.
pub(super) struct Admitted {
    /// Said first in their timelines, as (kind, message): a break of
    /// glass (with what it stepped past), a promotion.
    pub(super) notes: Vec<(String, String)>,
    /// The approvals the deploy waits for (a deployment: its first step).
    pub(super) approval: Option<ApprovalRule>,
}
