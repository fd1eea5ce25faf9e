//! `cutover artifact push`: streams a file into the coordinator's store.

use std::path::Path;

use anyhow::{Context, Result};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{
    push_artifact_request, PushArtifactHeader, PushArtifactRequest, PushArtifactResponse,
};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::client::explain;

/// Bytes per message, well under the gRPC message limit.
const CHUNK: usize = 1 << 20;

pub async fn push(
    client: &mut OperatorServiceClient<Channel>,
    path: &Path,
    expect_digest: Option<String>,
) -> Result<PushArtifactResponse> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().await?.len();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = PushArtifactRequest {
        part: Some(push_artifact_request::Part::Header(PushArtifactHeader {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size,
            expect_digest: expect_digest.unwrap_or_default(),
        })),
    };
    tx.send(header).await.expect("fresh channel");
    let display = path.display().to_string();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .with_context(|| format!("cannot read {display}"))?;
            if n == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            let chunk = PushArtifactRequest {
                part: Some(push_artifact_request::Part::Data(buf[..n].to_vec())),
            };
            if tx.send(chunk).await.is_err() {
                // The coordinator ended the call; its status says why.
                return Ok(());
            }
        }
    });
    let response = client
        .push_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(explain);
    reader.await.expect("reader task")?;
    Ok(response?.into_inner())
}
