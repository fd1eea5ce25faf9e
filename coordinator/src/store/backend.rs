//! The contract a storage backend implements: ordered key-value tables with
//! a conditional write, and append-only logs. Everything domain-shaped
//! lives in the repositories above it, so a backend (sled embedded, etcd for
//! HA) is a few hundred lines and one conformance suite proves it.

use async_trait::async_trait;

use super::{Page, StoreError};

/// The tables of the store. Their names are the on-disk tree names of the
/// embedded backend (and key prefixes on a shared one): renaming one loses
/// its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Nodes,
    Rollouts,
    Deployments,
    /// Which rollout or deployment holds each service of an environment.
    Locks,
    Releases,
    Outcomes,
    Environments,
    Counters,
    Operators,
    Tokens,
    Enrollments,
    Revocations,
    Issued,
    Secrets,
    /// Single records (the CA rotation).
    Meta,
    /// Scheduled jobs of each environment.
    Jobs,
    /// Their runs.
    JobRuns,
    /// Each environment's promotion rule and freeze windows, as pinned.
    Policies,
    /// Incident levers set on services' node proxies.
    Levers,
    /// Operators' locks on services (`cutover lock`).
    ManualLocks,
}

impl Table {
    pub const ALL: [Table; 20] = [
        Table::Nodes,
        Table::Rollouts,
        Table::Deployments,
        Table::Locks,
        Table::Releases,
        Table::Outcomes,
        Table::Environments,
        Table::Counters,
        Table::Operators,
        Table::Tokens,
        Table::Enrollments,
        Table::Revocations,
        Table::Issued,
        Table::Secrets,
        Table::Meta,
        Table::Jobs,
        Table::JobRuns,
        Table::Policies,
        Table::Levers,
        Table::ManualLocks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Nodes => "nodes",
            Table::Rollouts => "rollouts",
            Table::Deployments => "deployments",
            Table::Locks => "locks",
            Table::Releases => "releases",
            Table::Outcomes => "outcomes",
            Table::Environments => "environments",
            Table::Counters => "counters",
            Table::Operators => "operators",
            Table::Tokens => "tokens",
            Table::Enrollments => "enrollments",
            Table::Revocations => "revocations",
            Table::Issued => "issued",
            Table::Secrets => "secrets",
            Table::Meta => "meta",
            Table::Jobs => "jobs",
            Table::JobRuns => "job_runs",
            Table::Policies => "policies",
            Table::Levers => "levers",
            Table::ManualLocks => "manual_locks",
        }
    }
}

/// Append-only logs, keyed by a sequence number the backend assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Log {
    Events,
    Audit,
}

impl Log {
    pub const ALL: [Log; 2] = [Log::Events, Log::Audit];

    pub fn name(self) -> &'static str {
        match self {
            Log::Events => "events",
            Log::Audit => "audit",
        }
    }
}

/// Which version of a key a read saw, for a conditional write. Opaque:
/// etcd's mod revision, a digest of the value on sled. A backend may accept
/// a revision again once the value went back to the very same bytes, which
/// is harmless: the caller's read is then exactly what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Revision(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub revision: Revision,
}

/// Whether a write must survive a crash the moment the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (or on a quorum) before the call returns.
    Durable,
    /// Kept unless the process dies within the backend's flush interval:
    /// for records rewritten often whose loss costs nothing (heartbeats,
    /// events).
    Lazy,
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    Done,
    /// The key was no longer at the expected revision; nothing changed.
    Conflict,
}

/// Filters the records of a log page by their encoded bytes.
pub type LogFilter<'a> = &'a (dyn Fn(&[u8]) -> bool + Send + Sync);

/// Builds a log record once its sequence number is known.
pub type LogRecord = Box<dyn FnOnce(u64) -> Vec<u8> + Send>;

/// A table's (key, value) pairs in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// A log's (sequence number, record) pairs, oldest first.
pub type Records = Vec<(u64, Vec<u8>)>;

/// Every table and log of a backend as of one instant (see
/// `Backend::snapshot`): what a backup of the coordinator holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every table of `Table::ALL` with its rows.
    pub tables: Vec<(Table, Rows)>,
    /// Every log of `Log::ALL` with its records.
    pub logs: Vec<(Log, Records)>,
    /// At least every sequence number handed out before the cut, also of
    /// records pruned since: a restored backend hands out greater ones.
    pub last_seq: u64,
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError>;

    /// Every entry whose key starts with `prefix`, in key order.
    async fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;

    async fn put(
        &self,
        table: Table,
        key: &[u8],
        value: Vec<u8>,
        durability: Durability,
    ) -> Result<(), StoreError>;

    /// Whether there was a value to delete.
    async fn delete(
        &self,
        table: Table,
        key: &[u8],
        durability: Durability,
    ) -> Result<bool, StoreError>;

    /// Writes `value` (deletes on `None`) only if the key is still at
    /// `expected` (`None`: absent). Durable when it returns `Done`. Two
    /// writers with the same expectation never both succeed, also across
    /// processes sharing one backend.
    async fn compare_and_put(
        &self,
        table: Table,
        key: &[u8],
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
    ) -> Result<Swap, StoreError>;

    /// Appends a record under a sequence number greater than every one
    /// handed out before, across restarts; numbers may have gaps.
    async fn append(
        &self,
        log: Log,
        record: LogRecord,
        durability: Durability,
    ) -> Result<u64, StoreError>;

    /// One page of a log's records with a sequence number above
    /// `page.after_seq` that `keep` accepts, oldest first.
    async fn log_page(
        &self,
        log: Log,
        page: Page,
        keep: LogFilter<'_>,
    ) -> Result<Vec<Vec<u8>>, StoreError>;

    /// Deletes a log's oldest records so that at most `keep` remain;
    /// returns how many went.
    async fn prune_log(&self, log: Log, keep: usize) -> Result<usize, StoreError>;

    /// Makes every write so far durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Every table and log as of one instant while writes go on: each
    /// write is in it whole or not at all, and one it holds comes with
    /// every write that returned before that one started. The store is
    /// crash-consistent between any two writes, so such a cut is a state
    /// the coordinator starts from like after a crash. (etcd: every range
    /// read at one revision.)
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// The fencing token this backend's writes carry (a leader's on etcd),
    /// 0 for a single coordinator's store.
    fn leader_token(&self) -> i64 {
        0
    }

    /// The members of a replicated store, for `cutover server status`
    /// (`None`: the embedded store, nothing to ask).
    fn cluster_health(&self) -> Option<super::EtcdHealth> {
        None
    }

    /// Loads `snapshot` into this backend, which must hold no record
    /// (`StoreError::NotEmpty` otherwise); appends after it get sequence
    /// numbers above `snapshot.last_seq`. Durable when it returns.
    async fn restore(&self, snapshot: Snapshot) -> Result<(), StoreError>;
}
