//! The coordinator's durable state: one repository per domain over a
//! backend contract (`backend.rs`) that the embedded default (sled) and a
//! shared one (etcd, for HA) implement alike. Repositories speak records;
//! backends speak bytes, revisions and logs. Every call is async: a durable
//! write waits for the disk (or a quorum) without holding a runtime thread.

mod access;
pub mod backend;
#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod etcd;
mod jobs;
mod kv;
mod levers;
#[cfg(test)]
pub(crate) mod memory;
mod nodes;
mod pki;
mod read_only;
mod records;
mod releases;
mod rollouts;
mod secrets;
mod sled_backend;
#[cfg(test)]
pub(crate) mod snapshot_conformance;

use std::sync::Arc;

pub use access::AccessRepo;
pub use backend::{Backend, Revision, Snapshot};
pub use etcd::{Campaign, EtcdBackend, EtcdHealth, Leader, Leadership, MemberHealth};
pub use jobs::*;
pub use levers::{LeverKind, LeverRecord, LeverRepo};
pub use nodes::{EventLog, NodeRepo};
pub use pki::PkiRepo;
pub use read_only::ReadOnly;
pub use records::*;
pub use releases::ReleaseRepo;
pub use rollouts::{LockHolder, ManualLock, RolloutRepo, ServiceLock};
pub use secrets::SecretRepo;
pub use sled_backend::SledBackend;

use kv::Kv;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o failed: {0}")]
    Backend(String),
    /// The store could not be reached (etcd without a quorum, say): the
    /// same call may succeed later; nothing was decided.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A write of a coordinator that is no longer the leader (its leader
    /// key was created at revision `token`; it is now at `now`, 0: gone).
    #[error("this coordinator is no longer the leader (its leadership began at etcd revision {token}, the leader key is now at {now}): it stops acting and the current leader carries on")]
    Fenced { token: i64, now: i64 },
    /// A call of a leader whose lead is lost (its lease could not be
    /// renewed in time, or a write was fenced): refused without asking etcd.
    #[error("this coordinator no longer leads (its leadership began at etcd revision {token}): it stops acting and the current leader carries on")]
    NotLeading { token: i64 },
    /// A write through a follower's view of the store (`ReadOnly`).
    #[error("this coordinator follows: it reads the store but only the leader writes; send the call to the leader (`cutover server status` names it)")]
    ReadOnly,
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A restore found records already there (`what` names where).
    #[error("the store is not empty ({what} holds records); restore only into an empty store")]
    NotEmpty { what: String },
}

/// Which records of a log (events, audit) a read returns. Sequence numbers
/// only grow, with gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Only records after this sequence number (0: from the start).
    pub after_seq: u64,
    pub limit: usize,
    /// The newest `limit` records instead of the oldest.
    pub newest: bool,
}

impl Page {
    pub fn oldest(after_seq: u64, limit: usize) -> Self {
        Self {
            after_seq,
            limit,
            newest: false,
        }
    }

    /// This page out of a log's `records` past `after_seq` (filtered,
    /// oldest first): the first `limit`, or with `newest` the last ones,
    /// oldest first either way. What every backend's `log_page` returns.
    pub(crate) fn pick<T, E>(
        self,
        records: impl DoubleEndedIterator<Item = Result<T, E>>,
    ) -> Result<Vec<T>, E> {
        if self.newest {
            let mut newest: Vec<T> = records.rev().take(self.limit).collect::<Result<_, _>>()?;
            newest.reverse();
            Ok(newest)
        } else {
            records.take(self.limit).collect()
        }
    }
}

/// Every repository over one backend. Cheap to clone: each part shares the
/// backend.
#[derive(Clone)]
pub struct Store {
    pub nodes: NodeRepo,
    pub events: EventLog,
    pub rollouts: RolloutRepo,
    pub releases: ReleaseRepo,
    pub access: AccessRepo,
    pub pki: PkiRepo,
    pub secrets: SecretRepo,
    pub jobs: JobRepo,
    pub levers: LeverRepo,
    kv: Kv,
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let kv = Kv::new(backend);
        Self {
            nodes: NodeRepo::new(kv.clone()),
            events: EventLog::new(kv.clone()),
            rollouts: RolloutRepo::new(kv.clone()),
            releases: ReleaseRepo::new(kv.clone()),
            access: AccessRepo::new(kv.clone()),
            pki: PkiRepo::new(kv.clone()),
            secrets: SecretRepo::new(kv.clone()),
            jobs: JobRepo::new(kv.clone()),
            levers: LeverRepo::new(kv.clone()),
            kv,
        }
    }

    /// The embedded store in `dir`.
    pub fn open_sled(dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(SledBackend::open(dir)?)))
    }

    /// The store on the etcd cluster `settings` names (connected on first
    /// use).
    pub fn open_etcd(settings: &crate::config::EtcdSettings) -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(EtcdBackend::new(settings)?)))
    }

    /// The fencing token of this coordinator's term (0: not elected).
    pub fn leader_token(&self) -> i64 {
        self.kv.backend().leader_token()
    }

    /// The members of a replicated store (`None` for the embedded one).
    pub fn cluster_health(&self) -> Option<EtcdHealth> {
        self.kv.backend().cluster_health()
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush().await
    }

    /// Every table and log as of one instant, while writes go on (see
    /// `Backend::snapshot`).
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.kv.backend().snapshot().await
    }

    /// Loads a snapshot into this store, which must be empty (see
    /// `Backend::restore`).
    pub async fn restore(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.kv.backend().restore(snapshot).await
    }
}
