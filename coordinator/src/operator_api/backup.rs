//! Backing up the coordinator's own store: one snapshot, streamed as the
//! backup file's bytes (see `crate::backup`).

use cutover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;

pub(super) type BackupStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

/// Bytes per message: well under the smallest `max_message_bytes` worth
/// configuring.
const CHUNK_BYTES: usize = 1 << 20;

impl OperatorApi {
    pub(super) async fn handle_backup_store(
        &self,
        request: Request<pb::BackupStoreRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let args = serde_json::Value::Null;
        let file = self
            .audited(request, Need::Admin, "backup_store", args, |_, _| async {
                let snapshot = self.access.store().snapshot().await?;
                let file = crate::backup::encode(&snapshot, cutover_common::now_ms());
                let records: usize = snapshot.tables.iter().map(|(_, rows)| rows.len()).sum();
                let log_records: usize = snapshot.logs.iter().map(|(_, r)| r.len()).sum();
                tracing::info!(
                    bytes = file.len(),
                    records,
                    log_records,
                    "store snapshot taken for a backup"
                );
                Ok(file)
            })
            .await?
            .into_inner();
        let chunks: Vec<Result<pb::BackupChunk, Status>> = file
            .chunks(CHUNK_BYTES)
            .map(|data| {
                Ok(pb::BackupChunk {
                    data: data.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}
