//! A follower's view of the shared store: every read of the backend it
//! wraps, no write. A follower serves reads from the records the leader
//! wrote; that it never writes is not left to each caller's care: a write
//! that reached the store anyway (a handler that records something on the
//! side, a refusal's audit entry) is refused here, before etcd sees it.

use async_trait::async_trait;
use std::sync::Arc;

use super::backend::{Backend, Durability, Entry, Log, LogFilter, LogRecord, Swap, Table};
use super::{Page, Revision, Snapshot, StoreError};

pub struct ReadOnly(pub Arc<dyn Backend>);

#[async_trait]
impl Backend for ReadOnly {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.0.get(table, key).await
    }

    async fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.0.scan(table, prefix).await
    }

    async fn put(&self, _: Table, _: &[u8], _: Vec<u8>, _: Durability) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn delete(&self, _: Table, _: &[u8], _: Durability) -> Result<bool, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn compare_and_put(
        &self,
        _: Table,
        _: &[u8],
        _: Option<Revision>,
        _: Option<Vec<u8>>,
    ) -> Result<Swap, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn append(&self, _: Log, _: LogRecord, _: Durability) -> Result<u64, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn log_page(
        &self,
        log: Log,
        page: Page,
        keep: LogFilter<'_>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.0.log_page(log, page, keep).await
    }

    async fn prune_log(&self, _: Log, _: usize) -> Result<usize, StoreError> {
        Err(StoreError::ReadOnly)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Nothing was written through this view: nothing to make durable.
        Ok(())
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.0.snapshot().await
    }

    fn cluster_health(&self) -> Option<super::EtcdHealth> {
        self.0.cluster_health()
    }

    async fn restore(&self, _: Snapshot) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{memory::MemoryBackend, NewEvent, Store};

    fn event(message: &str) -> NewEvent {
        NewEvent {
            kind: "test",
            node_id: String::new(),
            node_name: String::new(),
            message: message.into(),
        }
    }

    #[tokio::test]
    async fn reads_pass_and_every_write_is_refused_without_a_trace() {
        let shared: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let leader = Store::new(shared.clone());
        let view = ReadOnly(shared.clone());
        let follower = Store::new(Arc::new(ReadOnly(shared.clone())));
        leader
            .events
            .append(event("written by the leader"))
            .await
            .unwrap();
        assert_eq!(
            follower
                .events
                .page(Page::oldest(0, 10))
                .await
                .unwrap()
                .len(),
            1
        );

        let table = Table::Nodes;
        let refused = |result: Result<(), StoreError>| matches!(result, Err(StoreError::ReadOnly));
        assert!(refused(
            view.put(table, b"k", vec![1], Durability::Durable).await
        ));
        assert!(refused(
            view.delete(table, b"k", Durability::Durable)
                .await
                .map(drop)
        ));
        assert!(refused(
            view.compare_and_put(table, b"k", None, Some(vec![1]))
                .await
                .map(drop)
        ));
        assert!(refused(view.prune_log(Log::Events, 0).await.map(drop)));
        assert!(refused(view.restore(Snapshot::default()).await));
        assert!(matches!(
            follower.events.append(event("late")).await,
            Err(StoreError::ReadOnly)
        ));
        assert!(shared.get(table, b"k").await.unwrap().is_none());
        assert_eq!(
            leader.events.page(Page::oldest(0, 10)).await.unwrap().len(),
            1
        );
    }
}
