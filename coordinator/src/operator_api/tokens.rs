//! Join tokens: what a node enrolls with.

use std::time::Duration;

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::enroll::token_to_pb;

impl OperatorApi {
    pub(super) async fn handle_create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let r = request.get_ref();
        let args = json!({"labels": r.labels, "ttl_ms": r.ttl_ms, "uses": r.uses});
        self.audited(request, Need::Admin, "create_token", args, |caller, r| async move {
            let ttl = Duration::from_millis(r.ttl_ms);
            if ttl.is_zero() || ttl > crate::enroll::MAX_TOKEN_TTL {
                return Err(Status::invalid_argument(
                    "a token lives more than 0 and at most 30 days (--ttl)",
                ));
            }
            for (key, value) in &r.labels {
                cutover_common::rules::label(key, value)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            self.pki.signer().map_err(|_| {
                Status::failed_precondition(
                    "this coordinator cannot sign certificates, so nodes could not join: set `ca_key` in its config",
                )
            })?;
            let (token, record) = crate::enroll::new_token(
                r.labels.into_iter().collect(),
                ttl,
                r.uses,
                &caller.who(),
            );
            self.registry.store().access.put_token(&record).await?;
            Ok(pb::CreateTokenResponse {
                token,
                info: Some(token_to_pb(&record)),
                ca_fingerprint: self.pki.server_ca_fingerprint()?,
            })
        })
        .await
    }

    pub(super) async fn handle_list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_tokens",
                &serde_json::Value::Null,
            )
            .await?;
        let tokens = self
            .registry
            .store()
            .access
            .tokens()
            .await?
            .iter()
            .map(token_to_pb)
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    pub(super) async fn handle_revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let args = json!({"id": request.get_ref().id});
        self.audited(
            request,
            Need::Admin,
            "revoke_token",
            args,
            |_, r| async move {
                let token = self
                    .registry
                    .store()
                    .access
                    .update_token(&r.id, |current| {
                        let mut token = current.ok_or_else(|| {
                            Status::not_found(format!(
                                "no join token {:?}; `cutover token list` shows them",
                                r.id
                            ))
                        })?;
                        token.revoked_at_ms.get_or_insert(cutover_common::now_ms());
                        Ok::<_, Status>(Some(token))
                    })
                    .await?
                    .expect("a revocation leaves the token");
                Ok(token_to_pb(&token))
            },
        )
        .await
    }
}
