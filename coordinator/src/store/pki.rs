//! What the coordinator's CA did: the newest rotation and the serials it
//! signed per node.

use super::backend::{Durability, Table};
use super::kv::Kv;
use super::{CaRotation, StoreError};

#[derive(Clone)]
pub struct PkiRepo {
    kv: Kv,
}

const CA_ROTATION: &[u8] = b"ca_rotation";

/// `node NUL`: the prefix of one node's issued serials.
fn issued_prefix(node: &str) -> Vec<u8> {
    format!("{node}\0").into_bytes()
}

impl PkiRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    pub async fn put_ca_rotation(&self, rotation: &CaRotation) -> Result<(), StoreError> {
        self.kv
            .put(Table::Meta, CA_ROTATION, rotation, Durability::Durable)
            .await
    }

    pub async fn ca_rotation(&self) -> Result<Option<CaRotation>, StoreError> {
        self.kv.get(Table::Meta, CA_ROTATION).await
    }

    /// Records a certificate the coordinator signed for a node (a join or
    /// a renewal): revoking the node refuses every one of them.
    pub async fn add_issued(&self, node: &str, serial: &str) -> Result<(), StoreError> {
        let mut key = issued_prefix(node);
        key.extend_from_slice(serial.as_bytes());
        // The value is empty: the key is the record (the layout earlier
        // versions wrote).
        self.kv
            .put_raw(Table::Issued, &key, Vec::new(), Durability::Durable)
            .await
    }

    pub async fn issued(&self, node: &str) -> Result<Vec<String>, StoreError> {
        let prefix = issued_prefix(node);
        Ok(self
            .kv
            .keys(Table::Issued, &prefix)
            .await?
            .into_iter()
            .map(|key| String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            .collect())
    }
}
