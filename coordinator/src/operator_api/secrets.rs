//! Secrets: setting, listing (names and versions, never values), removing,
//! and rotating the master key they are sealed with.

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::secrets::SecretInfo;

fn secret_to_pb(env: &str, info: SecretInfo) -> pb::SecretEntry {
    pb::SecretEntry {
        env: env.to_string(),
        name: info.name,
        versions: info
            .versions
            .into_iter()
            .map(
                |(version, created_at_ms, created_by)| pb::SecretVersionInfo {
                    version,
                    created_at_ms,
                    created_by,
                },
            )
            .collect(),
        rotate_every_ms: info.rotate_every_ms,
    }
}

impl OperatorApi {
    pub(super) async fn handle_set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretEntry>, Status> {
        // Never the value: not here, not in the log, not in an error.
        let args = json!({
            "env": request.get_ref().env,
            "name": request.get_ref().name,
            "rotate_every_ms": request.get_ref().rotate_every_ms,
        });
        self.audited(
            request,
            Need::Admin,
            "set_secret",
            args,
            |caller, r| async move {
                self.secrets
                    .set(&r.env, &r.name, &r.value, &caller.who(), r.rotate_every_ms)
                    .await?;
                self.secrets
                    .list(&r.env)
                    .await?
                    .into_iter()
                    .find(|s| s.name == r.name)
                    .map(|info| secret_to_pb(&r.env, info))
                    .ok_or_else(|| Status::internal("the secret vanished after it was set"))
            },
        )
        .await
    }

    pub(super) async fn handle_rotate_secret(
        &self,
        request: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<pb::RotateSecretResponse>, Status> {
        // Never the value.
        let args = {
            let r = request.get_ref();
            json!({
                "env": r.env,
                "name": r.name,
                "allow_unreachable": r.allow_unreachable,
                "break_glass": r.break_glass,
                "reason": r.reason,
            })
        };
        self.audited(
            request,
            Need::Admin,
            "rotate_secret",
            args,
            |caller, r| async move {
                if r.break_glass && r.reason.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "--break-glass needs --reason TEXT: why the rollouts cannot wait for the freeze window's end or an approval",
                    ));
                }
                let by = caller.who();
                self.secrets
                    .set(&r.env, &r.name, &r.value, &by, None)
                    .await?;
                let secret = self
                    .secrets
                    .list(&r.env)
                    .await?
                    .into_iter()
                    .find(|s| s.name == r.name)
                    .map(|info| secret_to_pb(&r.env, info));
                let break_glass = r.break_glass.then_some(r.reason.as_str());
                let results = self
                    .rollouts
                    .roll_out_secret(&r.env, &r.name, &by, r.allow_unreachable, break_glass)
                    .await?;
                let mut started = Vec::new();
                let mut refused = Vec::new();
                for (service, result) in results {
                    match result {
                        Ok(s) => started.push(s),
                        Err(error) => refused.push(pb::ServiceRefusal {
                            service,
                            message: error.to_string(),
                        }),
                    }
                }
                Ok(pb::RotateSecretResponse {
                    secret,
                    deploy: Some(super::rollouts::started_to_pb(started)),
                    refused,
                })
            },
        )
        .await
    }

    pub(super) async fn handle_list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_secrets",
                &serde_json::Value::Null,
            )
            .await?;
        let env = request.into_inner().env;
        let secrets = self
            .secrets
            .list(&env)
            .await?
            .into_iter()
            .map(|info| secret_to_pb(&env, info))
            .collect();
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    pub(super) async fn handle_remove_secret(
        &self,
        request: Request<pb::RemoveSecretRequest>,
    ) -> Result<Response<pb::RemoveSecretResponse>, Status> {
        let args = json!({"env": request.get_ref().env, "name": request.get_ref().name});
        self.audited(
            request,
            Need::Admin,
            "remove_secret",
            args,
            |_, r| async move {
                let removed = self.secrets.remove(&r.env, &r.name).await?;
                Ok(pb::RemoveSecretResponse { removed })
            },
        )
        .await
    }

    pub(super) async fn handle_rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let args = serde_json::Value::Null;
        self.audited(
            request,
            Need::Admin,
            "rotate_master_key",
            args,
            |_, _| async move {
                let (key_id, reencrypted) = self.secrets.rotate_master_key().await?;
                Ok(pb::RotateMasterKeyResponse {
                    key_id,
                    reencrypted: reencrypted as u64,
                })
            },
        )
        .await
    }
}
