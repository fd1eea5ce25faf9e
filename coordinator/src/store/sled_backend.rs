//! The embedded backend on sled 0.34: one tree per table and log, values
//! as the repositories encode them. The layout is the one earlier versions
//! wrote, so an existing data dir opens as it is.
//!
//! sled reads no two trees at one instant, so a snapshot is cut with a
//! barrier instead: every write holds it shared for its in-memory part,
//! the snapshot holds it alone while it reads every tree. Writes wait that
//! long (a read of the whole store, milliseconds for a typical one); the
//! flushes after them do not hold it.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::RwLock;

use super::backend::{
    Backend, Durability, Entry, Log, LogFilter, LogRecord, Revision, Snapshot, Swap, Table,
};
use super::{Page, StoreError};

/// Key in sled's default tree (no table uses it) of what a restore added
/// to sled's id generator, which cannot be set: every log sequence number
/// is `generate_id() + 1 + offset`. Absent (0) in a store never restored,
/// which keeps the numbers earlier versions handed out.
const SEQ_OFFSET: &[u8] = b"seq_offset";

pub struct SledBackend {
    db: sled::Db,
    tables: Vec<(Table, sled::Tree)>,
    logs: Vec<(Log, sled::Tree)>,
    /// Writes share it, a snapshot or a restore holds it alone.
    barrier: Arc<RwLock<()>>,
    seq_offset: AtomicU64,
}

fn backend(error: sled::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// sled keeps no version per key: a digest of the value stands in, and the
/// conditional write compares the value itself, so a stale digest never
/// overwrites a newer value.
fn revision(value: &[u8]) -> Revision {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    Revision(hasher.finish())
}

fn entry(key: &[u8], value: &[u8]) -> Entry {
    Entry {
        key: key.to_vec(),
        value: value.to_vec(),
        revision: revision(value),
    }
}

/// Runs a flush (an fsync) off the async runtime's threads.
async fn flush_tree(tree: &sled::Tree) -> Result<(), StoreError> {
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || tree.flush().map(drop))
        .await
        .map_err(|e| StoreError::Backend(format!("flush task failed: {e}")))?
        .map_err(backend)
}

impl SledBackend {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let config = sled::Config::new().flush_every_ms(Some(200));
        let db = cutover_common::sled_open::open(config, dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot open store at {}: {e}; is another coordinator using this data_dir?",
                dir.display()
            ))
        })?;
        let tables = Table::ALL
            .iter()
            .map(|t| Ok((*t, db.open_tree(t.name()).map_err(backend)?)))
            .collect::<Result<_, StoreError>>()?;
        let logs = Log::ALL
            .iter()
            .map(|l| Ok((*l, db.open_tree(l.name()).map_err(backend)?)))
            .collect::<Result<_, StoreError>>()?;
        let seq_offset = match db.get(SEQ_OFFSET).map_err(backend)? {
            Some(bytes) => {
                u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "seq_offset".into(),
                    reason: format!("{} bytes, expected 8", bytes.len()),
                })?)
            }
            None => 0,
        };
        Ok(Self {
            db,
            tables,
            logs,
            barrier: Arc::default(),
            seq_offset: AtomicU64::new(seq_offset),
        })
    }

    fn table(&self, table: Table) -> &sled::Tree {
        &self
            .tables
            .iter()
            .find(|(t, _)| *t == table)
            .expect("every table is opened")
            .1
    }

    fn log(&self, log: Log) -> &sled::Tree {
        &self
            .logs
            .iter()
            .find(|(l, _)| *l == log)
            .expect("every log is opened")
            .1
    }

    async fn settle(tree: &sled::Tree, durability: Durability) -> Result<(), StoreError> {
        match durability {
            Durability::Durable => flush_tree(tree).await,
            Durability::Lazy => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for SledBackend {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .table(table)
            .get(key)
            .map_err(backend)?
            .map(|value| entry(key, &value)))
    }

    async fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.table(table)
            .scan_prefix(prefix)
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                Ok(entry(&key, &value))
            })
            .collect()
    }

    async fn put(
        &self,
        table: Table,
        key: &[u8],
        value: Vec<u8>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let tree = self.table(table);
        {
            let _cut = self.barrier.read().await;
            tree.insert(key, value).map_err(backend)?;
        }
        Self::settle(tree, durability).await
    }

    async fn delete(
        &self,
        table: Table,
        key: &[u8],
        durability: Durability,
    ) -> Result<bool, StoreError> {
        let tree = self.table(table);
        let removed = {
            let _cut = self.barrier.read().await;
            tree.remove(key).map_err(backend)?.is_some()
        };
        Self::settle(tree, durability).await?;
        Ok(removed)
    }

    async fn compare_and_put(
        &self,
        table: Table,
        key: &[u8],
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
    ) -> Result<Swap, StoreError> {
        let tree = self.table(table);
        let cut = self.barrier.read().await;
        let current = tree.get(key).map_err(backend)?;
        let matches = match (&current, expected) {
            (None, None) => true,
            (Some(stored), Some(expected)) => revision(stored) == expected,
            _ => false,
        };
        if !matches {
            return Ok(Swap::Conflict);
        }
        // The swap compares the bytes just read: a writer in between makes
        // it fail rather than be overwritten.
        let swapped = tree
            .compare_and_swap(key, current, value)
            .map_err(backend)?;
        drop(cut);
        match swapped {
            Ok(()) => {
                flush_tree(tree).await?;
                Ok(Swap::Done)
            }
            Err(_) => Ok(Swap::Conflict),
        }
    }

    async fn append(
        &self,
        log: Log,
        record: LogRecord,
        durability: Durability,
    ) -> Result<u64, StoreError> {
        // generate_id is monotonic across restarts (it jumps ahead after a
        // reopen), so big-endian keys keep records in order.
        let tree = self.log(log);
        let seq = {
            let _cut = self.barrier.read().await;
            let seq = self.db.generate_id().map_err(backend)?
                + 1
                + self.seq_offset.load(Ordering::Acquire);
            tree.insert(seq.to_be_bytes(), record(seq))
                .map_err(backend)?;
            seq
        };
        Self::settle(tree, durability).await?;
        Ok(seq)
    }

    async fn log_page(
        &self,
        log: Log,
        page: Page,
        keep: LogFilter<'_>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let start = page.after_seq.saturating_add(1).to_be_bytes();
        let range = self.log(log).range(start..);
        let accepted = |item: sled::Result<(sled::IVec, sled::IVec)>| match item {
            Ok((_, value)) if !keep(&value) => None,
            Ok((_, value)) => Some(Ok(value.to_vec())),
            Err(error) => Some(Err(backend(error))),
        };
        page.pick(range.filter_map(accepted))
    }

    async fn prune_log(&self, log: Log, keep: usize) -> Result<usize, StoreError> {
        // Sequence numbers have gaps: the count comes from the tree, never
        // from the span of the keys.
        let tree = self.log(log);
        let _cut = self.barrier.read().await;
        let excess = tree.len().saturating_sub(keep);
        if excess == 0 {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        for key in tree.iter().keys().take(excess) {
            batch.remove(key.map_err(backend)?);
        }
        tree.apply_batch(batch).map_err(backend)?;
        Ok(excess)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush().map(drop))
            .await
            .map_err(|e| StoreError::Backend(format!("flush task failed: {e}")))?
            .map_err(backend)
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let cut = self.barrier.clone().write_owned().await;
        let (db, tables, logs) = (self.db.clone(), self.tables.clone(), self.logs.clone());
        let offset = self.seq_offset.load(Ordering::Acquire);
        // Reading every tree blocks: off the runtime's threads, the
        // barrier moving along.
        tokio::task::spawn_blocking(move || {
            let _cut = cut;
            let tables = tables
                .iter()
                .map(|(table, tree)| Ok((*table, read_tree(tree, |key| Ok(key.to_vec()))?)))
                .collect::<Result<_, StoreError>>()?;
            let logs = logs
                .iter()
                .map(|(log, tree)| Ok((*log, read_tree(tree, seq_of)?)))
                .collect::<Result<_, StoreError>>()?;
            // An id not handed out yet is above every one that was: taking
            // it leaves a gap, which sequence numbers may have.
            let last_seq = db.generate_id().map_err(backend)? + offset;
            Ok(Snapshot {
                tables,
                logs,
                last_seq,
            })
        })
        .await
        .map_err(|e| StoreError::Backend(format!("snapshot task failed: {e}")))?
    }

    async fn restore(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let _cut = self.barrier.write().await;
        for (table, tree) in &self.tables {
            if !tree.is_empty() {
                return Err(StoreError::NotEmpty {
                    what: format!("table {}", table.name()),
                });
            }
        }
        for (log, tree) in &self.logs {
            if !tree.is_empty() {
                return Err(StoreError::NotEmpty {
                    what: format!("log {}", log.name()),
                });
            }
        }
        for (table, entries) in snapshot.tables {
            let mut batch = sled::Batch::default();
            for (key, value) in entries {
                batch.insert(key, value);
            }
            self.table(table).apply_batch(batch).map_err(backend)?;
        }
        for (log, records) in snapshot.logs {
            let mut batch = sled::Batch::default();
            for (seq, record) in records {
                batch.insert(&seq.to_be_bytes(), record);
            }
            self.log(log).apply_batch(batch).map_err(backend)?;
        }
        let offset = snapshot
            .last_seq
            .max(self.seq_offset.load(Ordering::Acquire));
        self.db
            .insert(SEQ_OFFSET, &offset.to_be_bytes())
            .map_err(backend)?;
        self.seq_offset.store(offset, Ordering::Release);
        self.flush().await
    }
}

/// Every (key, value) of `tree` in key order, keys as `key` makes them.
fn read_tree<K>(
    tree: &sled::Tree,
    key: impl Fn(&[u8]) -> Result<K, StoreError>,
) -> Result<Vec<(K, Vec<u8>)>, StoreError> {
    tree.iter()
        .map(|item| {
            let (k, v) = item.map_err(backend)?;
            Ok((key(&k)?, v.to_vec()))
        })
        .collect()
}

/// A log record's sequence number: its key, 8 big-endian bytes.
fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("a log key of {} bytes, expected 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self, Opener};

    struct Sled;

    impl Opener for Sled {
        fn open(&self, dir: &Path) -> std::sync::Arc<dyn Backend> {
            std::sync::Arc::new(SledBackend::open(dir).expect("store opens"))
        }
    }

    conformance::suite!(Sled, "store::sled_backend::tests");
}
