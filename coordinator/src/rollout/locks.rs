//! The deploy lock: one holder per service of an environment, a rollout or
//! a deployment, kept in the store (`RolloutRepo::take_lock`) so that no
//! two coordinators sharing a store can both roll a service out. A holder
//! frees its services when it ends; a lock whose holder ended without
//! freeing it (a crash in between) is taken over by the next taker, with
//! the conditional write naming the revision it replaces. A convergence
//! (the coordinator's own repair) gives way to a deployment that includes
//! its service: the deployment takes the lock at once and stops the
//! convergence when that service's turn comes.

use crate::store::{LockHolder, ServiceLock, StoreError};

use super::{RolloutError, Rollouts};

/// The lock name of an app's migrations in an environment: one at a time,
/// whatever the service or operator. Not a service name (those have no
/// spaces), so it shares the lock table without meeting one.
pub(super) fn migration_lock(app: &str) -> String {
    format!("{app} migrations")
}

impl Rollouts {
    /// Takes `service` of `env` for `holder`: when free, already its own,
    /// or held by a rollout or deployment that ended.
    pub(super) async fn take_service(
        &self,
        env: &str,
        service: &str,
        holder: LockHolder,
    ) -> Result<(), RolloutError> {
        let lock = ServiceLock {
            env: env.to_string(),
            service: service.to_string(),
            holder,
            at_ms: self.registry.now_ms(),
        };
        loop {
            let held = self.store.rollouts.lock(env, service).await?;
            let replacing = match held {
                None => None,
                Some((current, _)) if current.holder == lock.holder => return Ok(()),
                Some((current, revision)) => {
                    let yields = matches!(lock.holder, LockHolder::Deployment(_))
                        && self.is_convergence(&current.holder).await?;
                    if !yields && !self.has_ended(&current.holder, false).await? {
                        return Err(self.held_by(current).await);
                    }
                    Some(revision)
                }
            };
            if self.store.rollouts.take_lock(&lock, replacing).await? {
                return Ok(());
            }
            // Someone wrote the lock since it was read: look again.
        }
    }

    /// Frees `service` of `env` if `holder` holds it.
    pub(super) async fn free_service(&self, env: &str, service: &str, holder: &LockHolder) {
        if let Err(error) = self.store.rollouts.release_lock(env, service, holder).await {
            // Harmless but for a while: the next taker sees the holder
            // ended and takes over.
            tracing::error!(%env, %service, ?holder, %error, "cannot free the deploy lock");
        }
    }

    /// Refuses when anything but `deployment` (empty: anything) holds
    /// `service` of `env`: a running rollout, or a deployment that has yet
    /// to end.
    pub(super) async fn check_free(
        &self,
        env: &str,
        service: &str,
        deployment: &str,
    ) -> Result<(), RolloutError> {
        let Some((lock, _)) = self.store.rollouts.lock(env, service).await? else {
            return Ok(());
        };
        let own = matches!(&lock.holder, LockHolder::Deployment(id) if id == deployment);
        if own || self.has_ended(&lock.holder, false).await? {
            return Ok(());
        }
        Err(self.held_by(lock).await)
    }

    /// Whether a lock's holder ended. A holder with no record at all is
    /// live unless `gone_is_ended`: a rollout takes its lock a moment
    /// before it is stored, and only a restart (nothing is being created)
    /// may take a missing record as a crash's leftover.
    async fn has_ended(
        &self,
        holder: &LockHolder,
        gone_is_ended: bool,
    ) -> Result<bool, StoreError> {
        Ok(match holder {
            LockHolder::Rollout(id) => match self.store.rollouts.get(id).await? {
                Some(rollout) => rollout.state.is_terminal(),
                None => gone_is_ended,
            },
            LockHolder::Deployment(id) => match self.store.rollouts.deployment(id).await? {
                Some(deployment) => deployment.state.is_terminal(),
                None => gone_is_ended,
            },
        })
    }

    async fn is_convergence(&self, holder: &LockHolder) -> Result<bool, StoreError> {
        Ok(match holder {
            LockHolder::Rollout(id) => self
                .store
                .rollouts
                .get(id)
                .await?
                .is_some_and(|r| r.by_converger()),
            LockHolder::Deployment(_) => false,
        })
    }

    async fn held_by(&self, lock: ServiceLock) -> RolloutError {
        match lock.holder {
            LockHolder::Rollout(id) => {
                let state = match self.get(&id).await {
                    Ok(rollout) => rollout.state.as_str(),
                    Err(_) => "starting",
                };
                RolloutError::Locked {
                    id,
                    state,
                    env: lock.env,
                    service: lock.service,
                }
            }
            LockHolder::Deployment(deployment) => RolloutError::Claimed {
                deployment,
                env: lock.env,
                service: lock.service,
            },
        }
    }

    /// After a restart, before anything runs: frees the locks of holders
    /// that ended or are gone, and takes the services of unfinished
    /// rollouts and deployments that hold none (stored by a version before
    /// the lock was a record).
    pub(super) async fn reconcile_locks(&self) -> Result<(), StoreError> {
        for lock in self.store.rollouts.locks().await? {
            if self.has_ended(&lock.holder, true).await? {
                tracing::info!(env = %lock.env, service = %lock.service, holder = ?lock.holder, "freeing the deploy lock of a holder that ended");
                self.free_service(&lock.env, &lock.service, &lock.holder)
                    .await;
            }
        }
        let mut wanted = Vec::new();
        for deployment in self.store.rollouts.deployments().await? {
            if !deployment.state.is_terminal() {
                for step in &deployment.steps {
                    wanted.push((
                        deployment.env.clone(),
                        step.service.clone(),
                        LockHolder::Deployment(deployment.id.clone()),
                    ));
                }
            }
        }
        for rollout in self.store.rollouts.list().await? {
            if !rollout.state.is_terminal() && rollout.deployment.is_empty() {
                wanted.push((
                    rollout.env,
                    rollout.service,
                    LockHolder::Rollout(rollout.id),
                ));
            }
        }
        for (env, service, holder) in wanted {
            if let Err(error) = self.take_service(&env, &service, holder.clone()).await {
                tracing::error!(%env, %service, ?holder, %error, "an unfinished rollout cannot take its deploy lock");
            }
        }
        Ok(())
    }
}
