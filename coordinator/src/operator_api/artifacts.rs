//! Artifacts: pushing a file into the coordinator's own store, for agents to
//! fetch by digest.

use cutover_common::digest::Digest;
use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::store::NewEvent;

impl OperatorApi {
    /// Checked and audited by hand, not through `audited`: what the audit
    /// log keeps of a push (its name and digest) is in the stream's header,
    /// which is read only once the caller is allowed to push.
    pub(super) async fn handle_push_artifact(
        &self,
        request: Request<tonic::Streaming<pb::PushArtifactRequest>>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
        let caller = self
            .access
            .check(
                &request,
                Need::DeployAnywhere,
                "push_artifact",
                &serde_json::Value::Null,
            )
            .await?;
        let who = caller.identity.name.clone();
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(pb::push_artifact_request::Part::Header(header)) => header,
            _ => return Err(Status::invalid_argument("a push starts with its header")),
        };
        let args = json!({"name": header.name, "expect_digest": header.expect_digest});
        let result = self.receive_artifact(&who, header, parts).await;
        self.access
            .audit(&caller, "push_artifact", &args, &result)
            .await;
        result
    }

    /// The rest of a push after its header: the bytes, into the store.
    async fn receive_artifact(
        &self,
        who: &str,
        header: pb::PushArtifactHeader,
        mut parts: tonic::Streaming<pb::PushArtifactRequest>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
        let expect = match header.expect_digest.as_str() {
            "" => None,
            text => Some(Digest::parse(text).map_err(|e| Status::invalid_argument(e.to_string()))?),
        };
        let mut upload = self.artifacts.begin().await?;
        loop {
            match parts.message().await {
                Ok(Some(pb::PushArtifactRequest {
                    part: Some(pb::push_artifact_request::Part::Data(data)),
                })) => {
                    upload.write(&data).await?;
                }
                Ok(Some(_)) => {
                    upload.abandon();
                    return Err(Status::invalid_argument("only data may follow the header"));
                }
                Ok(None) => break,
                Err(status) => {
                    upload.abandon();
                    return Err(status);
                }
            }
        }
        let (digest, size, already_present) = self.artifacts.commit(upload, expect).await?;
        if !already_present {
            let event = NewEvent {
                kind: "artifact_pushed",
                node_id: String::new(),
                node_name: String::new(),
                message: format!("{who} pushed {} ({size} bytes) as {digest}", header.name),
            };
            self.registry.journal().event(event);
        }
        tracing::info!(%digest, size, already_present, operator = %who, "artifact pushed");
        Ok(Response::new(pb::PushArtifactResponse {
            digest: digest.to_string(),
            size,
            already_present,
        }))
    }
}
