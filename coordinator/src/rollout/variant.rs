//! A service's current release again with something changed that is not
//! the build: its environment (`cutover config set`, `config.rs`), a
//! secret's version (`cutover secret rotate`), its process count (`cutover
//! scale`, `scale.rs`). Rolled out like a deploy:
//! the environment's strategy, freeze windows, approvals and operators'
//! locks (an admin's break of glass steps past them), no migration and no
//! hook (the code is
//! the same); a rollback returns the release before.

use std::collections::BTreeMap;
use std::sync::Arc;

use cutover_proto::v1 as pb;

use super::model::RolloutKind;
use super::{RolloutError, Rollouts, Started, Target};
use crate::store::{ConfigOverride, ReleaseRecord};

/// The change to roll out.
pub(super) struct Variant {
    /// The service's current release, as recorded.
    pub current: ReleaseRecord,
    /// It, changed; its id given anew.
    pub release: pb::Release,
    /// The `config set` overrides the new release carries.
    pub config: BTreeMap<String, ConfigOverride>,
    /// What changed, first in its timeline, under this topic.
    pub topic: &'static str,
    pub note: String,
}

impl Rollouts {
    pub(super) async fn roll_out_variant(
        self: &Arc<Self>,
        variant: Variant,
        by: &str,
        allow_unreachable: bool,
        break_glass: Option<&str>,
    ) -> Result<Started, RolloutError> {
        let Variant {
            current,
            release,
            config,
            topic,
            note,
        } = variant;
        let (env, service) = (&current.env, &current.service);
        self.refuse_if_stopped(env, service, "roll out a change to")
            .await?;
        let policy = self.store.releases.policy(env).await?.unwrap_or_default();
        let now_ms = self.registry.now_ms();
        let mut in_the_way = Vec::new();
        if let Some(refusal) = crate::policy::frozen(env, &policy, now_ms) {
            if break_glass.is_none() {
                return Err(RolloutError::Frozen(refusal));
            }
            in_the_way.push(refusal);
        }
        if let Some(refusal) =
            crate::policy::lock::refusal(&self.store, env, service, now_ms).await?
        {
            if break_glass.is_none() {
                return Err(RolloutError::ManuallyLocked(refusal));
            }
            in_the_way.push(refusal);
        }
        let mut approval = policy.deploy_approval();
        if let (Some(rule), Some(_)) = (approval, break_glass) {
            in_the_way.push(format!(
                "{} approval(s) of environment {env}",
                rule.required
            ));
            approval = None;
        }
        let mut notes = vec![(topic.to_string(), note)];
        if let Some(reason) = break_glass {
            notes.push(crate::policy::break_glass_note(by, reason, &in_the_way));
        }
        self.make_way(env, service, by).await;
        let (notify, load_balancer) = self.inherited(Some(&current)).await?;
        let plan = self
            .plan(
                Target {
                    app: current.app.clone(),
                    env: env.clone(),
                    service: service.clone(),
                    kind: RolloutKind::Deploy,
                    release,
                    previous: Some(current.release.clone()),
                    selector: current.selector.clone(),
                    strategy: current.strategy.clone(),
                    deployment: String::new(),
                    notes,
                    // The same build, wherever it came from.
                    promoted_from: current.promoted_from.clone(),
                    // The same code: no migration, no hook.
                    migration: None,
                    hooks: Vec::new(),
                    notify,
                    backup_gates: Vec::new(),
                    load_balancer,
                    fast_return: false,
                    approval,
                    config,
                },
                allow_unreachable,
            )
            .await?;
        self.launch(plan, by).await
    }

    /// Rolls out, in `env`, every service whose current release names
    /// secret `name`, with the secret's current version (just set by `cutover
    /// secret rotate`). Each service's result, in name order.
    pub async fn roll_out_secret(
        self: &Arc<Self>,
        env: &str,
        name: &str,
        by: &str,
        allow_unreachable: bool,
        break_glass: Option<&str>,
    ) -> Result<Vec<(String, Result<Started, RolloutError>)>, RolloutError> {
        let version = self.secrets.current(env, name).await?;
        let mut users: Vec<ReleaseRecord> = self
            .store
            .releases
            .all()
            .await?
            .into_iter()
            .filter(|r| r.env == env && r.current)
            .filter(|r| r.release.0.secrets.iter().any(|s| s.name == name))
            .collect();
        users.sort_by(|a, b| a.service.cmp(&b.service));
        let mut results = Vec::new();
        for current in users {
            let service = current.service.clone();
            let result = {
                let _creating = self.create.lock().await;
                let mut release = current.release.0.clone();
                let mut was = 0;
                for secret in release.secrets.iter_mut().filter(|s| s.name == name) {
                    was = secret.version;
                    secret.version = version;
                }
                release.release_id = crate::spec::release_id(&release);
                let variant = Variant {
                    topic: "config",
                    note: format!(
                        "{by} rotated secret {name}: {} runs version {version} instead of {was}",
                        current.release.id()
                    ),
                    config: current.config.clone(),
                    current,
                    release,
                };
                match was == version {
                    true => Ok(Started::NoOp {
                        service: service.clone(),
                        release_id: variant.current.release.id().to_string(),
                        message: format!(
                            "{service} in {env} runs version {version} of {name} already"
                        ),
                    }),
                    false => {
                        self.roll_out_variant(variant, by, allow_unreachable, break_glass)
                            .await
                    }
                }
            };
            results.push((service, result));
        }
        Ok(results)
    }
}
