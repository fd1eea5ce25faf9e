//! Write-behind for what the registry and the rollouts change while holding
//! a lock that must not wait for the disk: node records and events. Writes
//! are queued in the order they were made and one task applies them, so
//! the store never sees an older state after a newer one, then flushes once
//! the queue is empty: a burst costs one flush, and what was queued is on
//! disk moments later rather than within the store's flush interval.
//! `pending` (a gauge on /metrics) counts what is queued and not yet
//! flushed. `close` writes everything queued so far and lets go of the
//! store (the shutdown does, before its final flush, so a restart in the
//! same process can open the store again).

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};

use crate::store::{NewEvent, NodeRecord, Store};

/// One change to the store.
enum Change {
    Node(Box<NodeRecord>),
    DeleteNode(String),
    Event(NewEvent),
}

enum Write {
    Apply(Change),
    Close(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Journal {
    queue: mpsc::UnboundedSender<Write>,
    pending: Gauge,
}

impl Journal {
    /// Starts the writer; it ends on `close`, or when the last `Journal`
    /// clone is dropped, after writing what was queued.
    pub fn start(store: Store, pending: Gauge) -> Self {
        let (queue, mut writes) = mpsc::unbounded_channel();
        let written = pending.clone();
        tokio::spawn(async move {
            while let Some(first) = writes.recv().await {
                let mut next = Some(first);
                let mut applied = 0;
                while let Some(write) = next.take() {
                    match write {
                        Write::Apply(change) => apply(&store, change).await,
                        Write::Close(done) => {
                            flush(&store, applied, &written).await;
                            drop(store);
                            let _ = done.send(());
                            return;
                        }
                    }
                    applied += 1;
                    next = writes.try_recv().ok();
                }
                flush(&store, applied, &written).await;
            }
        });
        Self { queue, pending }
    }

    pub fn put_node(&self, record: NodeRecord) {
        self.send(Change::Node(Box::new(record)));
    }

    pub fn delete_node(&self, id: String) {
        self.send(Change::DeleteNode(id));
    }

    pub fn event(&self, event: NewEvent) {
        self.send(Change::Event(event));
    }

    /// Writes everything queued before this call, then stops the writer:
    /// later writes are dropped (with a warning).
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Write::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }

    fn send(&self, change: Change) {
        // Counted before it is queued: the writer may flush it at once.
        self.pending.inc();
        // The writer lives until `close`, which comes last at shutdown.
        if self.queue.send(Write::Apply(change)).is_err() {
            self.pending.dec();
            tracing::warn!("the journal is closed; a write was dropped");
        }
    }
}

async fn apply(store: &Store, change: Change) {
    match change {
        Change::Node(record) => {
            if let Err(error) = store.nodes.put(&record).await {
                tracing::error!(%error, node = %record.name, "cannot persist node");
            }
        }
        Change::DeleteNode(id) => {
            if let Err(error) = store.nodes.delete(&id).await {
                tracing::error!(%error, node_id = %id, "cannot delete node");
            }
        }
        Change::Event(event) => {
            let kind = event.kind;
            if let Err(error) = store.events.append(event).await {
                tracing::error!(%error, event = kind, "cannot record event");
            }
        }
    }
}

/// Makes `applied` writes durable and counts them off `pending`.
async fn flush(store: &Store, applied: i64, pending: &Gauge) {
    if applied == 0 {
        return;
    }
    if let Err(error) = store.flush().await {
        tracing::error!(%error, "cannot flush the journal's writes");
    }
    pending.dec_by(applied);
}
