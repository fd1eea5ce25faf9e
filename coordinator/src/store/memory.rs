//! An in-memory backend for the rollout simulation: every table and log in
//! one shared map, so a "reopen" (a coordinator restart) finds what was
//! written, and seeded faults: a write fails now and then, and a crash
//! point fails one write and ends the coordinator that made it (a crash
//! between any two writes, e.g. after a rollout's history and before the
//! rollout itself). Every life is a leader's term, as on etcd: a handle
//! opened for a later term fences off the earlier ones, whose writes are
//! refused from then on (`StoreError::Fenced`) and end their life.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::backend::{
    Backend, Durability, Entry, Log, LogFilter, LogRecord, Revision, Snapshot, Swap, Table,
};
use super::{Page, StoreError};

/// A table's keys with their value and the revision of its last write.
type Rows = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

/// What a coordinator's life shares with the next: the data.
#[derive(Default)]
struct Data {
    tables: HashMap<Table, Rows>,
    logs: HashMap<Log, BTreeMap<u64, Vec<u8>>>,
    /// Revisions and log sequence numbers, both only growing.
    last_revision: u64,
    last_seq: u64,
    /// The token of the latest term (`reopen`): only its writes go through.
    leader: i64,
}

/// Seeded write faults of one backend handle (one coordinator's life).
pub(crate) struct Faults {
    rng: StdRng,
    /// Chance that a write fails with a backend error.
    fail: f64,
    /// The coordinator using the handle: once it is cancelled (it
    /// crashed) no write goes through.
    crash: CancellationToken,
    /// The write this many writes from now fails and cancels `crash`.
    crash_in: Option<u64>,
}

impl Faults {
    pub(crate) fn new(
        seed: u64,
        fail: f64,
        crash: CancellationToken,
        crash_in: Option<u64>,
    ) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            fail,
            crash,
            crash_in,
        }
    }
}

pub(crate) struct MemoryBackend {
    data: Arc<Mutex<Data>>,
    faults: Mutex<Option<Faults>>,
    /// This handle's term (0: the checks' handle, never fenced).
    term: i64,
}

impl MemoryBackend {
    pub(crate) fn new() -> Self {
        Self {
            data: Arc::default(),
            faults: Mutex::new(None),
            term: 0,
        }
    }

    /// Another handle on the same data, as a restarted coordinator opens
    /// it, with faults of its own; with faults, a new leader's term (the
    /// one before, if it still runs, is fenced off), without, a handle for
    /// reading and for the checks.
    pub(crate) fn reopen(&self, faults: Option<Faults>) -> Self {
        let term = match faults {
            Some(_) => {
                let mut data = self.data();
                data.leader += 1;
                data.leader
            }
            None => 0,
        };
        Self {
            data: self.data.clone(),
            faults: Mutex::new(faults),
            term,
        }
    }

    /// Whether the next write goes through (see `Faults`).
    fn write(&self) -> Result<(), StoreError> {
        let mut faults = self.faults.lock().expect("faults lock");
        let Some(faults) = faults.as_mut() else {
            return Ok(());
        };
        if faults.crash_in == Some(0) {
            faults.crash.cancel();
        }
        if faults.crash.is_cancelled() {
            return Err(StoreError::Backend("the coordinator crashed".into()));
        }
        let now = self.data().leader;
        if self.term < now {
            // A deposed leader's write: refused, and its life ends there.
            faults.crash.cancel();
            return Err(StoreError::Fenced {
                token: self.term,
                now,
            });
        }
        if let Some(left) = &mut faults.crash_in {
            *left -= 1;
        }
        if faults.rng.random_bool(faults.fail) {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        Ok(())
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().expect("memory store lock")
    }
}

impl Data {
    fn table(&mut self, table: Table) -> &mut Rows {
        self.tables.entry(table).or_default()
    }

    fn next_revision(&mut self) -> u64 {
        self.last_revision += 1;
        self.last_revision
    }
}

fn entry(key: &[u8], (value, revision): &(Vec<u8>, u64)) -> Entry {
    Entry {
        key: key.to_vec(),
        value: value.clone(),
        revision: Revision(*revision),
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn leader_token(&self) -> i64 {
        self.term
    }

    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        Ok(self.data().table(table).get(key).map(|v| entry(key, v)))
    }

    async fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .data()
            .table(table)
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, v)| entry(key, v))
            .collect())
    }

    async fn put(
        &self,
        table: Table,
        key: &[u8],
        value: Vec<u8>,
        _: Durability,
    ) -> Result<(), StoreError> {
        self.write()?;
        let mut data = self.data();
        let revision = data.next_revision();
        data.table(table).insert(key.to_vec(), (value, revision));
        Ok(())
    }

    async fn delete(&self, table: Table, key: &[u8], _: Durability) -> Result<bool, StoreError> {
        self.write()?;
        Ok(self.data().table(table).remove(key).is_some())
    }

    async fn compare_and_put(
        &self,
        table: Table,
        key: &[u8],
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
    ) -> Result<Swap, StoreError> {
        self.write()?;
        let mut data = self.data();
        let current = data.table(table).get(key).map(|(_, r)| Revision(*r));
        if current != expected {
            return Ok(Swap::Conflict);
        }
        match value {
            Some(value) => {
                let revision = data.next_revision();
                data.table(table).insert(key.to_vec(), (value, revision));
            }
            None => {
                data.table(table).remove(key);
            }
        }
        Ok(Swap::Done)
    }

    async fn append(&self, log: Log, record: LogRecord, _: Durability) -> Result<u64, StoreError> {
        self.write()?;
        let mut data = self.data();
        data.last_seq += 1;
        let seq = data.last_seq;
        data.logs.entry(log).or_default().insert(seq, record(seq));
        Ok(seq)
    }

    async fn log_page(
        &self,
        log: Log,
        page: Page,
        keep: LogFilter<'_>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut data = self.data();
        let records = data.logs.entry(log).or_default();
        let range = records
            .range(page.after_seq.saturating_add(1)..)
            .map(|(_, value)| value)
            .filter(|value| keep(value))
            .map(|value| Ok(value.clone()));
        page.pick(range)
    }

    async fn prune_log(&self, log: Log, keep: usize) -> Result<usize, StoreError> {
        let mut data = self.data();
        let records = data.logs.entry(log).or_default();
        let excess = records.len().saturating_sub(keep);
        let oldest: Vec<u64> = records.keys().take(excess).copied().collect();
        for seq in oldest {
            records.remove(&seq);
        }
        Ok(excess)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    // One lock over every table and log: a snapshot under it is a cut.
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut data = self.data();
        let tables = Table::ALL
            .iter()
            .map(|table| {
                let rows = data.table(*table).iter();
                (
                    *table,
                    rows.map(|(k, (v, _))| (k.clone(), v.clone())).collect(),
                )
            })
            .collect();
        let logs = Log::ALL
            .iter()
            .map(|log| {
                let records = data.logs.entry(*log).or_default().iter();
                (*log, records.map(|(seq, v)| (*seq, v.clone())).collect())
            })
            .collect();
        Ok(Snapshot {
            tables,
            logs,
            last_seq: data.last_seq,
        })
    }

    async fn restore(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.write()?;
        let mut data = self.data();
        if let Some((table, _)) = data.tables.iter().find(|(_, rows)| !rows.is_empty()) {
            return Err(StoreError::NotEmpty {
                what: format!("table {}", table.name()),
            });
        }
        if let Some((log, _)) = data.logs.iter().find(|(_, records)| !records.is_empty()) {
            return Err(StoreError::NotEmpty {
                what: format!("log {}", log.name()),
            });
        }
        for (table, rows) in snapshot.tables {
            for (key, value) in rows {
                let revision = data.next_revision();
                data.table(table).insert(key, (value, revision));
            }
        }
        for (log, records) in snapshot.logs {
            data.logs.entry(log).or_default().extend(records);
        }
        data.last_seq = data.last_seq.max(snapshot.last_seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::store::conformance::{self, Opener};

    /// One memory store per dir, kept after every handle is dropped, so
    /// the suite's reopens find their data.
    struct Memory;

    static STORES: Mutex<BTreeMap<PathBuf, Arc<MemoryBackend>>> = Mutex::new(BTreeMap::new());

    impl Opener for Memory {
        fn open(&self, dir: &Path) -> Arc<dyn Backend> {
            let mut stores = STORES.lock().expect("stores lock");
            let first = stores
                .entry(dir.to_path_buf())
                .or_insert_with(|| Arc::new(MemoryBackend::new()));
            Arc::new(first.reopen(None))
        }
    }

    // Without the SIGKILL case: nothing in memory outlives its process.
    conformance::suite!(in_process Memory);

    #[tokio::test]
    async fn a_crash_point_fails_that_write_and_every_later_one() {
        let crash = CancellationToken::new();
        let backend =
            MemoryBackend::new().reopen(Some(Faults::new(1, 0.0, crash.clone(), Some(1))));
        let put = |key: &'static [u8]| backend.put(Table::Meta, key, vec![1], Durability::Durable);
        put(b"a").await.expect("the first write goes through");
        assert!(put(b"b").await.is_err());
        assert!(crash.is_cancelled());
        assert!(
            put(b"c").await.is_err(),
            "a crashed coordinator writes nothing"
        );
        let reopened = backend.reopen(None);
        assert!(reopened.get(Table::Meta, b"a").await.unwrap().is_some());
        assert!(reopened.get(Table::Meta, b"b").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_later_term_fences_off_the_earlier_one_and_ends_it() {
        let store = MemoryBackend::new();
        let (old_life, new_life) = (CancellationToken::new(), CancellationToken::new());
        let old = store.reopen(Some(Faults::new(1, 0.0, old_life.clone(), None)));
        old.put(Table::Meta, b"k", b"old".to_vec(), Durability::Durable)
            .await
            .expect("the only term writes");
        let new = store.reopen(Some(Faults::new(2, 0.0, new_life.clone(), None)));
        assert!(new.leader_token() > old.leader_token());
        let refused = old
            .put(Table::Meta, b"k", b"late".to_vec(), Durability::Durable)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::Fenced { token, now } if token == old.leader_token() && now == new.leader_token()),
            "{refused}"
        );
        assert!(old_life.is_cancelled(), "a fenced-off leader stops acting");
        new.put(Table::Meta, b"k", b"new".to_vec(), Durability::Durable)
            .await
            .expect("the new term writes");
        assert!(!new_life.is_cancelled());
        let read = store.reopen(None).get(Table::Meta, b"k").await.unwrap();
        assert_eq!(read.unwrap().value, b"new");
    }
}
