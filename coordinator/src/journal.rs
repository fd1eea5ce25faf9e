//! Write-behind for what the registry and the rollouts change while holding
//! a lock that must not wait for the disk: node records and events. Writes
//! are queued in the order they were made and one task applies them, so
//! the store never sees an older state after a newer one. Both kinds are
//! lazily durable anyway; `close` writes everything queued so far and lets
//! go of the store (the shutdown does, before its final flush, so a
//! restart in the same process can open the store again).

use tokio::sync::{mpsc, oneshot};

use crate::store::{NewEvent, NodeRecord, Store};

enum Write {
    Node(NodeRecord),
    DeleteNode(String),
    Event(NewEvent),
    Close(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Journal {
    queue: mpsc::UnboundedSender<Write>,
}

impl Journal {
    /// Starts the writer; it ends on `close`, or when the last `Journal`
    /// clone is dropped, after writing what was queued.
    pub fn start(store: Store) -> Self {
        let (queue, mut writes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(write) = writes.recv().await {
                match write {
                    Write::Node(record) => {
                        if let Err(error) = store.nodes.put(&record).await {
                            tracing::error!(%error, node = %record.name, "cannot persist node");
                        }
                    }
                    Write::DeleteNode(id) => {
                        if let Err(error) = store.nodes.delete(&id).await {
                            tracing::error!(%error, node_id = %id, "cannot delete node");
                        }
                    }
                    Write::Event(event) => {
                        let kind = event.kind;
                        if let Err(error) = store.events.append(event).await {
                            tracing::error!(%error, event = kind, "cannot record event");
                        }
                    }
                    Write::Close(done) => {
                        drop(store);
                        let _ = done.send(());
                        return;
                    }
                }
            }
        });
        Self { queue }
    }

    pub fn put_node(&self, record: NodeRecord) {
        self.send(Write::Node(record));
    }

    pub fn delete_node(&self, id: String) {
        self.send(Write::DeleteNode(id));
    }

    pub fn event(&self, event: NewEvent) {
        self.send(Write::Event(event));
    }

    /// Writes everything queued before this call, then stops the writer:
    /// later writes are dropped (with a warning).
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        self.send(Write::Close(done));
        let _ = closed.await;
    }

    fn send(&self, write: Write) {
        // The writer lives until `close`, which comes last at shutdown.
        if self.queue.send(write).is_err() {
            tracing::warn!("the journal is closed; a write was dropped");
        }
    }
}
