//! Release history per environment and service, how each service's newest
//! rollout ended, and the node selector each environment is pinned to.

use std::collections::BTreeMap;

use super::backend::{Durability, Table};
use super::kv::Kv;
use super::{ReleaseRecord, ServiceOutcome, StoreError};

#[derive(Clone)]
pub struct ReleaseRepo {
    kv: Kv,
}

/// `env NUL service NUL`: the prefix of one service's release keys, and the
/// key of its outcome.
fn service_key(env: &str, service: &str) -> Vec<u8> {
    format!("{env}\0{service}\0").into_bytes()
}

fn release_key(env: &str, service: &str, release_id: &str) -> Vec<u8> {
    let mut key = service_key(env, service);
    key.extend_from_slice(release_id.as_bytes());
    key
}

impl ReleaseRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    /// Writes a release record durably, replacing one with the same env,
    /// service and release id.
    pub async fn put(&self, record: &ReleaseRecord) -> Result<(), StoreError> {
        let key = release_key(&record.env, &record.service, record.release.id());
        self.kv
            .put(Table::Releases, &key, record, Durability::Durable)
            .await
    }

    /// A service's release history in an environment, newest first.
    pub async fn history(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Vec<ReleaseRecord>, StoreError> {
        let mut all: Vec<ReleaseRecord> = self
            .kv
            .list(Table::Releases, &service_key(env, service))
            .await?;
        all.sort_by_key(|r| std::cmp::Reverse(r.deployed_at_ms));
        Ok(all)
    }

    /// The release a service's nodes are meant to run in an environment.
    pub async fn current(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        Ok(self
            .history(env, service)
            .await?
            .into_iter()
            .find(|r| r.current))
    }

    /// Every kept release record of every environment and service.
    pub async fn all(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        self.kv.list(Table::Releases, b"").await
    }

    pub async fn delete(
        &self,
        env: &str,
        service: &str,
        release_id: &str,
    ) -> Result<(), StoreError> {
        self.kv
            .delete(
                Table::Releases,
                &release_key(env, service, release_id),
                Durability::Lazy,
            )
            .await
            .map(drop)
    }

    pub async fn put_outcome(&self, outcome: &ServiceOutcome) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Outcomes,
                &service_key(&outcome.env, &outcome.service),
                outcome,
                Durability::Durable,
            )
            .await
    }

    pub async fn outcome(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<ServiceOutcome>, StoreError> {
        self.kv
            .get(Table::Outcomes, &service_key(env, service))
            .await
    }

    /// The newest outcome of every service of every environment.
    pub async fn outcomes(&self) -> Result<Vec<ServiceOutcome>, StoreError> {
        self.kv.list(Table::Outcomes, b"").await
    }

    /// Pins an environment to a node selector (see `Rollouts::deploy`).
    pub async fn pin_environment(
        &self,
        env: &str,
        selector: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Environments,
                env.as_bytes(),
                selector,
                Durability::Durable,
            )
            .await
    }

    pub async fn environment(
        &self,
        env: &str,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        self.kv.get(Table::Environments, env.as_bytes()).await
    }

    /// Pins an environment's policy (see `policy::pin`).
    pub async fn put_policy(
        &self,
        env: &str,
        policy: &crate::policy::EnvironmentPolicy,
    ) -> Result<(), StoreError> {
        self.kv
            .put(Table::Policies, env.as_bytes(), policy, Durability::Durable)
            .await
    }

    pub async fn policy(
        &self,
        env: &str,
    ) -> Result<Option<crate::policy::EnvironmentPolicy>, StoreError> {
        self.kv.get(Table::Policies, env.as_bytes()).await
    }
}
