//! Sealed secrets per environment (see `crate::secrets` for the sealing).

use super::backend::{Durability, Table};
use super::kv::{Change, Kv};
use super::{SecretRecord, StoreError};

#[derive(Clone)]
pub struct SecretRepo {
    kv: Kv,
}

fn key(env: &str, name: &str) -> Vec<u8> {
    format!("{env}\0{name}").into_bytes()
}

impl SecretRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    pub async fn get(&self, env: &str, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        self.kv.get(Table::Secrets, &key(env, name)).await
    }

    /// An environment's secrets, by name.
    pub async fn list(&self, env: &str) -> Result<Vec<SecretRecord>, StoreError> {
        self.kv
            .list(Table::Secrets, format!("{env}\0").as_bytes())
            .await
    }

    pub async fn all(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.kv.list(Table::Secrets, b"").await
    }

    /// Changes one secret's versions as stored now, retried if another
    /// writer changed them in between; `change` gets `None` for a new
    /// secret. Returns the record as left.
    pub async fn update<E: From<StoreError>>(
        &self,
        env: &str,
        name: &str,
        mut change: impl FnMut(Option<SecretRecord>) -> Result<SecretRecord, E> + Send,
    ) -> Result<SecretRecord, E> {
        let left = self
            .kv
            .update(Table::Secrets, &key(env, name), |current| {
                change(current).map(Change::Put)
            })
            .await?;
        Ok(left.expect("an update that puts leaves a record"))
    }

    /// Whether there was one to delete.
    pub async fn delete(&self, env: &str, name: &str) -> Result<bool, StoreError> {
        self.kv
            .delete(Table::Secrets, &key(env, name), Durability::Durable)
            .await
    }
}
