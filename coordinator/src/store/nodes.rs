//! Nodes as last seen, and the event log of what happened to them (and to
//! rollouts).

use super::backend::{Durability, Log, Table};
use super::kv::Kv;
use super::{EventRecord, NewEvent, NodeRecord, Page, StoreError};

#[derive(Clone)]
pub struct NodeRepo {
    kv: Kv,
}

impl NodeRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    /// Lazily durable: the registry rewrites a node on every meaningful
    /// change and checkpoints the rest, so a crash loses at most the last
    /// flush interval of liveness, which the next heartbeat restores.
    pub async fn put(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.kv
            .put(Table::Nodes, node.id.as_bytes(), node, Durability::Lazy)
            .await
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.kv
            .delete(Table::Nodes, id.as_bytes(), Durability::Lazy)
            .await
            .map(drop)
    }

    pub async fn list(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.kv.list(Table::Nodes, b"").await
    }
}

#[derive(Clone)]
pub struct EventLog {
    kv: Kv,
}

impl EventLog {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    /// Appends an event under a sequence number greater than any before.
    pub async fn append(&self, event: NewEvent) -> Result<EventRecord, StoreError> {
        let record = EventRecord {
            seq: 0,
            at_ms: cutover_common::now_ms(),
            kind: event.kind.to_string(),
            node_id: event.node_id,
            node_name: event.node_name,
            message: event.message,
        };
        self.kv
            .append(Log::Events, record, |r, seq| r.seq = seq, Durability::Lazy)
            .await
    }

    /// One page of events with `seq > page.after_seq`, oldest first.
    pub async fn page(&self, page: Page) -> Result<Vec<EventRecord>, StoreError> {
        self.kv
            .log_page(Log::Events, page, |_: &EventRecord| true)
            .await
    }

    /// Deletes the oldest events so that at most `keep` remain; returns how
    /// many went.
    pub async fn prune(&self, keep: usize) -> Result<usize, StoreError> {
        self.kv.prune_log(Log::Events, keep).await
    }
}
