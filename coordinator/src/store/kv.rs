//! Records over the backend's bytes: JSON encoding, decoding errors that
//! name the key, read-modify-write retried on conflict, counters and logs.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::backend::{Backend, Durability, Log, Revision, Swap, Table};
use super::{Page, StoreError};

#[derive(Clone)]
pub(super) struct Kv {
    backend: Arc<dyn Backend>,
}

/// What a read-modify-write leaves under its key.
pub(super) enum Change<T> {
    Put(T),
    /// Nothing to write: the record already says what the caller wants.
    Keep,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records serialize")
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl Kv {
    pub(super) fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    pub(super) async fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        Ok(self
            .get_versioned(table, key)
            .await?
            .map(|(value, _)| value))
    }

    pub(super) async fn get_versioned<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<(T, Revision)>, StoreError> {
        match self.backend.get(table, key).await? {
            Some(entry) => Ok(Some((decode(key, &entry.value)?, entry.revision))),
            None => Ok(None),
        }
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub(super) async fn list<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<T>, StoreError> {
        self.backend
            .scan(table, prefix)
            .await?
            .iter()
            .map(|entry| decode(&entry.key, &entry.value))
            .collect()
    }

    /// The keys under `prefix`, without decoding values.
    pub(super) async fn keys(
        &self,
        table: Table,
        prefix: &[u8],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .backend
            .scan(table, prefix)
            .await?
            .into_iter()
            .map(|entry| entry.key)
            .collect())
    }

    pub(super) async fn put<T: Serialize>(
        &self,
        table: Table,
        key: &[u8],
        value: &T,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.backend
            .put(table, key, encode(value), durability)
            .await
    }

    /// Writes bytes as they are, for records that are not JSON.
    pub(super) async fn put_raw(
        &self,
        table: Table,
        key: &[u8],
        value: Vec<u8>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.backend.put(table, key, value, durability).await
    }

    pub(super) async fn delete(
        &self,
        table: Table,
        key: &[u8],
        durability: Durability,
    ) -> Result<bool, StoreError> {
        self.backend.delete(table, key, durability).await
    }

    /// Writes `value` (deletes on `None`) only if the key is still at
    /// `expected` (`None`: absent).
    pub(super) async fn swap<T: Serialize>(
        &self,
        table: Table,
        key: &[u8],
        expected: Option<Revision>,
        value: Option<&T>,
    ) -> Result<Swap, StoreError> {
        self.backend
            .compare_and_put(table, key, expected, value.map(encode))
            .await
    }

    /// Read-modify-write of one record, durable, retried when another
    /// writer got in between: `change` sees the record as stored now, every
    /// time. Returns the record as left.
    pub(super) async fn update<T, E>(
        &self,
        table: Table,
        key: &[u8],
        mut change: impl FnMut(Option<T>) -> Result<Change<T>, E> + Send,
    ) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned + Clone + Send,
        E: From<StoreError>,
    {
        loop {
            let current = self.get_versioned::<T>(table, key).await?;
            let (record, revision) = match current {
                Some((record, revision)) => (Some(record), Some(revision)),
                None => (None, None),
            };
            let new = match change(record.clone())? {
                Change::Keep => return Ok(record),
                Change::Put(new) => new,
            };
            if self.swap(table, key, revision, Some(&new)).await? == Swap::Done {
                return Ok(Some(new));
            }
        }
    }

    /// The next value of a durable counter, starting at 1: never handed out
    /// twice, across restarts and writers. Stored as 8 big-endian bytes.
    pub(super) async fn next_number(&self, counter: &str) -> Result<u64, StoreError> {
        let key = counter.as_bytes();
        loop {
            let current = self.backend.get(Table::Counters, key).await?;
            let (value, revision) = match &current {
                Some(entry) => {
                    let bytes: [u8; 8] =
                        entry
                            .value
                            .as_slice()
                            .try_into()
                            .map_err(|_| StoreError::Corrupt {
                                key: format!("counters/{counter}"),
                                reason: format!("{} bytes, expected 8", entry.value.len()),
                            })?;
                    (u64::from_be_bytes(bytes), Some(entry.revision))
                }
                None => (0, None),
            };
            let next = value + 1;
            let swapped = self
                .backend
                .compare_and_put(
                    Table::Counters,
                    key,
                    revision,
                    Some(next.to_be_bytes().to_vec()),
                )
                .await?;
            if swapped == Swap::Done {
                return Ok(next);
            }
        }
    }

    /// Appends `record` to `log` with the sequence number the backend
    /// assigns, set through `with_seq`; returns the record as stored.
    pub(super) async fn append<T>(
        &self,
        log: Log,
        record: T,
        with_seq: fn(&mut T, u64),
        durability: Durability,
    ) -> Result<T, StoreError>
    where
        T: Serialize + Clone + Send + 'static,
    {
        let mut stored = record.clone();
        let seq = self
            .backend
            .append(
                log,
                Box::new(move |seq| {
                    let mut record = record;
                    with_seq(&mut record, seq);
                    encode(&record)
                }),
                durability,
            )
            .await?;
        with_seq(&mut stored, seq);
        Ok(stored)
    }

    /// One page of `log`, decoded; `keep` filters decoded records.
    pub(super) async fn log_page<T: DeserializeOwned>(
        &self,
        log: Log,
        page: Page,
        keep: impl Fn(&T) -> bool + Send + Sync,
    ) -> Result<Vec<T>, StoreError> {
        // A record that does not decode is kept by the filter, so the
        // decoding below reports it instead of a page silently skipping it.
        let filter = |bytes: &[u8]| serde_json::from_slice::<T>(bytes).map_or(true, |r| keep(&r));
        self.backend
            .log_page(log, page, &filter)
            .await?
            .iter()
            .map(|bytes| decode(log.name().as_bytes(), bytes))
            .collect()
    }

    pub(super) async fn prune_log(&self, log: Log, keep: usize) -> Result<usize, StoreError> {
        self.backend.prune_log(log, keep).await
    }

    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush().await
    }

    /// The backend itself, for what spans every table (snapshots).
    pub(super) fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
}
