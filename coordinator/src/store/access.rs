//! Who may do what: operators, join tokens, the labels nodes enrolled
//! with, revoked node certificates, and the audit log of every mutating
//! call.

use std::collections::BTreeMap;

use super::backend::{Durability, Log, Table};
use super::kv::{Change, Kv};
use super::{AuditRecord, OperatorRecord, Page, Revocation, StoreError, TokenRecord};

#[derive(Clone)]
pub struct AccessRepo {
    kv: Kv,
}

impl AccessRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    pub async fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        self.kv.get(Table::Operators, name.as_bytes()).await
    }

    pub async fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.kv.list(Table::Operators, b"").await
    }

    pub async fn put_operator(&self, operator: &OperatorRecord) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Operators,
                operator.name.as_bytes(),
                operator,
                Durability::Durable,
            )
            .await
    }

    /// Changes one operator's record as stored now, retried if another
    /// writer changed it in between: `change` gets `None` for a name with
    /// no record. Returns the record as left.
    pub async fn update_operator<E: From<StoreError>>(
        &self,
        name: &str,
        change: impl FnMut(Option<OperatorRecord>) -> Result<Option<OperatorRecord>, E> + Send,
    ) -> Result<Option<OperatorRecord>, E> {
        self.kv
            .update(Table::Operators, name.as_bytes(), put_or_keep(change))
            .await
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.kv.get(Table::Tokens, id.as_bytes()).await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.kv.list(Table::Tokens, b"").await
    }

    pub async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Tokens,
                token.id.as_bytes(),
                token,
                Durability::Durable,
            )
            .await
    }

    /// Changes one join token as stored now (a use, a revocation), retried
    /// if another writer changed it in between.
    pub async fn update_token<E: From<StoreError>>(
        &self,
        id: &str,
        change: impl FnMut(Option<TokenRecord>) -> Result<Option<TokenRecord>, E> + Send,
    ) -> Result<Option<TokenRecord>, E> {
        self.kv
            .update(Table::Tokens, id.as_bytes(), put_or_keep(change))
            .await
    }

    /// The labels a node joined with (a join token's), by node name.
    pub async fn put_enrollment(
        &self,
        node: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Enrollments,
                node.as_bytes(),
                labels,
                Durability::Durable,
            )
            .await
    }

    pub async fn enrollment(
        &self,
        node: &str,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        self.kv.get(Table::Enrollments, node.as_bytes()).await
    }

    pub async fn put_revocation(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let key = format!("{}\0{}", revocation.node, revocation.serial);
        self.kv
            .put(
                Table::Revocations,
                key.as_bytes(),
                revocation,
                Durability::Durable,
            )
            .await
    }

    pub async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.kv.list(Table::Revocations, b"").await
    }

    /// Appends to the audit log, durably.
    pub async fn append_audit(&self, entry: AuditRecord) -> Result<AuditRecord, StoreError> {
        self.kv
            .append(Log::Audit, entry, |e, seq| e.seq = seq, Durability::Durable)
            .await
    }

    /// One page of the entries at or after `since_ms` with
    /// `seq > page.after_seq`, oldest first.
    pub async fn audit(&self, since_ms: i64, page: Page) -> Result<Vec<AuditRecord>, StoreError> {
        self.kv
            .log_page(Log::Audit, page, move |entry: &AuditRecord| {
                entry.at_ms >= since_ms
            })
            .await
    }

    /// Deletes the oldest audit entries so that at most `keep` remain;
    /// returns how many went.
    pub async fn prune_audit(&self, keep: usize) -> Result<usize, StoreError> {
        self.kv.prune_log(Log::Audit, keep).await
    }
}

/// A change that writes what it returns, or nothing for `None`: records of
/// access are never deleted.
fn put_or_keep<T, E>(
    mut change: impl FnMut(Option<T>) -> Result<Option<T>, E> + Send,
) -> impl FnMut(Option<T>) -> Result<Change<T>, E> + Send {
    move |current| Ok(change(current)?.map_or(Change::Keep, Change::Put))
}
