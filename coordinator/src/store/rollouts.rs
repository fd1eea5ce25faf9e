//! Rollouts, deployments, their numbering, and the deploy lock: which
//! rollout or deployment holds each service of an environment. The lock is
//! a record taken with a conditional write, so two coordinators sharing a
//! backend can never both hold it.

use serde::{Deserialize, Serialize};

use super::backend::{Durability, Revision, Swap, Table};
use super::kv::Kv;
use super::StoreError;
use crate::rollout::deployment::Deployment;
use crate::rollout::model::Rollout;

#[derive(Clone)]
pub struct RolloutRepo {
    kv: Kv,
}

/// What holds a service: one rollout, or a deployment of several services
/// (for all of them, from its start until it ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum LockHolder {
    Rollout(String),
    Deployment(String),
}

/// The deploy lock of one service in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLock {
    pub env: String,
    pub service: String,
    pub holder: LockHolder,
    pub at_ms: i64,
}

/// An operator's lock on a service of an environment (`cutover lock`):
/// no rollout of it starts until they unlock it (see `policy::lock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualLock {
    pub env: String,
    pub service: String,
    pub reason: String,
    pub by: String,
    pub at_ms: i64,
}

fn lock_key(env: &str, service: &str) -> Vec<u8> {
    format!("{env}\0{service}").into_bytes()
}

impl RolloutRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    /// Writes a rollout durably: when this returns, a crash keeps it.
    pub async fn put(&self, rollout: &Rollout) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Rollouts,
                rollout.id.as_bytes(),
                rollout,
                Durability::Durable,
            )
            .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        self.kv.get(Table::Rollouts, id.as_bytes()).await
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.kv
            .delete(Table::Rollouts, id.as_bytes(), Durability::Lazy)
            .await
            .map(drop)
    }

    /// Every stored rollout, oldest first.
    pub async fn list(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut all: Vec<Rollout> = self.kv.list(Table::Rollouts, b"").await?;
        all.sort_by_key(|r| r.created_at_ms);
        Ok(all)
    }

    /// A number never handed out before, for rollout and deployment ids.
    pub async fn next_number(&self) -> Result<u64, StoreError> {
        self.kv.next_number("rollouts").await
    }

    /// Writes a deployment durably.
    pub async fn put_deployment(&self, deployment: &Deployment) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Deployments,
                deployment.id.as_bytes(),
                deployment,
                Durability::Durable,
            )
            .await
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<Deployment>, StoreError> {
        self.kv.get(Table::Deployments, id.as_bytes()).await
    }

    /// Every stored deployment, oldest first.
    pub async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let mut all: Vec<Deployment> = self.kv.list(Table::Deployments, b"").await?;
        all.sort_by_key(|d| d.created_at_ms);
        Ok(all)
    }

    pub async fn delete_deployment(&self, id: &str) -> Result<(), StoreError> {
        self.kv
            .delete(Table::Deployments, id.as_bytes(), Durability::Lazy)
            .await
            .map(drop)
    }

    /// Who holds a service now, with the revision a takeover must name.
    pub async fn lock(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<(ServiceLock, Revision)>, StoreError> {
        self.kv
            .get_versioned(Table::Locks, &lock_key(env, service))
            .await
    }

    /// Takes a service for `lock.holder` if it is free (`replacing` is
    /// `None`) or still held as read at `replacing` (a takeover from a
    /// holder that ended). Whether it was taken: false when anyone else
    /// wrote the lock in between.
    pub async fn take_lock(
        &self,
        lock: &ServiceLock,
        replacing: Option<Revision>,
    ) -> Result<bool, StoreError> {
        let key = lock_key(&lock.env, &lock.service);
        Ok(self
            .kv
            .swap(Table::Locks, &key, replacing, Some(lock))
            .await?
            == Swap::Done)
    }

    /// Frees a service if `holder` holds it; whether it did.
    pub async fn release_lock(
        &self,
        env: &str,
        service: &str,
        holder: &LockHolder,
    ) -> Result<bool, StoreError> {
        let key = lock_key(env, service);
        loop {
            let Some((lock, revision)) = self
                .kv
                .get_versioned::<ServiceLock>(Table::Locks, &key)
                .await?
            else {
                return Ok(false);
            };
            if &lock.holder != holder {
                return Ok(false);
            }
            let freed = self
                .kv
                .swap::<ServiceLock>(Table::Locks, &key, Some(revision), None)
                .await?;
            if freed == Swap::Done {
                return Ok(true);
            }
        }
    }

    /// Every held service.
    pub async fn locks(&self) -> Result<Vec<ServiceLock>, StoreError> {
        self.kv.list(Table::Locks, b"").await
    }

    /// Locks a service for an operator unless someone did already; the
    /// lock that was in the way otherwise.
    pub async fn put_manual_lock(
        &self,
        lock: &ManualLock,
    ) -> Result<Option<ManualLock>, StoreError> {
        let key = lock_key(&lock.env, &lock.service);
        loop {
            if self
                .kv
                .swap(Table::ManualLocks, &key, None, Some(lock))
                .await?
                == Swap::Done
            {
                return Ok(None);
            }
            // Unlocked in between: try again.
            if let Some(held) = self.manual_lock(&lock.env, &lock.service).await? {
                return Ok(Some(held));
            }
        }
    }

    pub async fn manual_lock(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<ManualLock>, StoreError> {
        self.kv
            .get(Table::ManualLocks, &lock_key(env, service))
            .await
    }

    /// Removes a service's lock; the one removed.
    pub async fn remove_manual_lock(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<ManualLock>, StoreError> {
        // Only the lock read here goes: one taken again in between stays.
        let key = lock_key(env, service);
        loop {
            let Some((held, revision)) = self
                .kv
                .get_versioned::<ManualLock>(Table::ManualLocks, &key)
                .await?
            else {
                return Ok(None);
            };
            let removed = self
                .kv
                .swap::<ManualLock>(Table::ManualLocks, &key, Some(revision), None)
                .await?;
            if removed == Swap::Done {
                return Ok(Some(held));
            }
        }
    }

    /// Every lock of `env` (every environment's when empty), by
    /// environment and service.
    pub async fn manual_locks(&self, env: &str) -> Result<Vec<ManualLock>, StoreError> {
        let prefix = match env {
            "" => Vec::new(),
            env => format!("{env}\0").into_bytes(),
        };
        self.kv.list(Table::ManualLocks, &prefix).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::jobs::recovery::RequireBackup;
    use crate::store::{SledBackend, Store};

    /// What a retry re-checks (its backup gates) and where a canary stood
    /// come back from the store after a coordinator restart as they went in.
    #[tokio::test]
    async fn a_rollouts_gates_and_strategy_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        // Blue/green with keep_warm, behind a load balancer.
        let spec: crate::strategy::StrategySpec =
            toml::from_str("kind = \"blue_green\"\nkeep_warm = 1").unwrap();
        let strategy = spec.resolve(&Default::default()).unwrap();
        let mut rollout = crate::rollout::sim::rollout(2, strategy);
        rollout.load_balancer = Some(crate::lb::LoadBalancer {
            runtime_api: "10.0.0.2:9999".into(),
            backend: "shop_web".into(),
            server_label: Some("haproxy_server".into()),
            drain_timeout_ms: 30_000,
        });
        rollout.balancer_split = true;
        rollout.backup_gates = vec![RequireBackup {
            dataset: "orders".into(),
            max_age: Duration::from_secs(3_600),
            restore_tested: true,
        }];
        {
            let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
            store.rollouts.put(&rollout).await.unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
        let read = store.rollouts.get(&rollout.id).await.unwrap().unwrap();
        assert_eq!(read.backup_gates, rollout.backup_gates);
        assert_eq!(read, rollout);
    }

    /// A rollback on the fast path, mid-way, with a node that refused it:
    /// its one step, its pace and the refusal read back after a restart,
    /// and the outcome keeps the refusing node for the converger.
    #[tokio::test]
    async fn a_fast_rollback_and_its_refusals_survive_a_reopen() {
        use crate::rollout::model::{Phase, RolloutKind, RolloutState};
        use crate::store::ServiceOutcome;
        let dir = tempfile::tempdir().unwrap();
        let spec: crate::strategy::StrategySpec =
            toml::from_str("rollback = \"fast\"\nrollback_parallelism = 2").unwrap();
        let mut rollout =
            crate::rollout::sim::rollout(3, spec.resolve(&Default::default()).unwrap());
        rollout.kind = RolloutKind::Rollback;
        rollout.return_at_once();
        rollout.nodes[1].refused = true;
        let outcome = ServiceOutcome {
            env: "test".into(),
            service: "web".into(),
            rollout_id: rollout.id.clone(),
            kind: RolloutKind::Rollback,
            state: RolloutState::Failed,
            auto_rollback: true,
            at_ms: 5,
            returned: false,
            refused: vec![rollout.nodes[1].id.clone()],
            stopped: Some(crate::store::StoppedBy {
                rollout_id: "web-1".into(),
                removed: false,
            }),
        };
        {
            let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
            store.rollouts.put(&rollout).await.unwrap();
            store.releases.put_outcome(&outcome).await.unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
        let read = store.rollouts.get(&rollout.id).await.unwrap().unwrap();
        assert_eq!(read, rollout);
        assert!(read.returns_at_once() && read.phase == Phase::Return && read.batch_size == 2);
        assert_eq!(read.strategy.rollback_parallelism, Some(2));
        let kept = store.releases.outcome("test", "web").await.unwrap();
        assert_eq!(kept, Some(outcome));
    }

    /// An operator's lock outlives a coordinator restart, and the one
    /// that reopens the store still refuses a second locker.
    #[tokio::test]
    async fn a_manual_lock_survives_a_reopen_and_stays_exclusive() {
        use crate::store::ManualLock;
        let dir = tempfile::tempdir().unwrap();
        let lock = |env: &str, by: &str| ManualLock {
            env: env.into(),
            service: "web".into(),
            reason: "reindexing".into(),
            by: by.into(),
            at_ms: 7,
        };
        {
            let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
            assert_eq!(
                store
                    .rollouts
                    .put_manual_lock(&lock("production", "dana"))
                    .await
                    .unwrap(),
                None
            );
            assert_eq!(
                store
                    .rollouts
                    .put_manual_lock(&lock("staging", "erin"))
                    .await
                    .unwrap(),
                None
            );
            store.flush().await.unwrap();
        }
        let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
        assert_eq!(
            store
                .rollouts
                .put_manual_lock(&lock("production", "sam"))
                .await
                .unwrap(),
            Some(lock("production", "dana"))
        );
        assert_eq!(
            store.rollouts.manual_locks("production").await.unwrap(),
            vec![lock("production", "dana")]
        );
        assert_eq!(store.rollouts.manual_locks("").await.unwrap().len(), 2);
        // "prod" is not a prefix of "production" here.
        assert_eq!(store.rollouts.manual_locks("prod").await.unwrap(), vec![]);
        assert_eq!(
            store
                .rollouts
                .remove_manual_lock("production", "web")
                .await
                .unwrap(),
            Some(lock("production", "dana"))
        );
        assert_eq!(
            store
                .rollouts
                .remove_manual_lock("production", "web")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .rollouts
                .put_manual_lock(&lock("production", "sam"))
                .await
                .unwrap(),
            None
        );
    }
}
