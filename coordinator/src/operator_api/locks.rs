//! `cutover lock`, `unlock` and `locks`: operators' locks on services (see
//! `crate::policy::lock`).

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::{OperatorApi, MAX_REASON};
use crate::access::Need;
use crate::store::ManualLock;

pub(super) fn lock_to_pb(lock: ManualLock) -> pb::ManualLock {
    pb::ManualLock {
        env: lock.env,
        service: lock.service,
        reason: lock.reason,
        by: lock.by,
        at_ms: lock.at_ms,
    }
}

impl OperatorApi {
    pub(super) async fn handle_lock_service(
        &self,
        request: Request<pb::LockServiceRequest>,
    ) -> Result<Response<pb::ManualLock>, Status> {
        let r = request.get_ref();
        let args = json!({"env": r.env, "service": r.service, "reason": r.reason});
        let env = r.env.clone();
        self.audited(
            request,
            Need::Deploy(&env),
            "lock_service",
            args,
            |caller, r| async move {
                let reason = r.reason.trim();
                if reason.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "locking {} in {} needs a reason, said to whoever is refused: --reason TEXT",
                        r.service, r.env
                    )));
                }
                if reason.chars().count() > MAX_REASON {
                    return Err(Status::invalid_argument(format!(
                        "the reason is over {MAX_REASON} characters; say it in a sentence and link the rest"
                    )));
                }
                let store = self.access.store();
                if store.releases.history(&r.env, &r.service).await?.is_empty() {
                    return Err(Status::not_found(format!(
                        "{} has no release in environment {:?}, so there is nothing to lock; check the names with `cutover releases SERVICE --env ENV`",
                        r.service, r.env
                    )));
                }
                let lock = ManualLock {
                    env: r.env,
                    service: r.service,
                    reason: reason.to_string(),
                    by: caller.identity.name,
                    at_ms: self.registry.now_ms(),
                };
                if let Some(held) = store.rollouts.put_manual_lock(&lock).await? {
                    return Err(Status::already_exists(format!(
                        "{} in {} is locked already, by {} since {}: {:?}; `cutover unlock {} --env {}` first",
                        held.service,
                        held.env,
                        held.by,
                        crate::policy::lock::utc(held.at_ms),
                        held.reason,
                        held.service,
                        held.env
                    )));
                }
                tracing::info!(env = %lock.env, service = %lock.service, by = %lock.by, reason = %lock.reason, "service locked");
                self.metrics
                    .locks
                    .set(&lock.env, &lock.service, Some(lock.at_ms));
                Ok(lock_to_pb(lock))
            },
        )
        .await
    }

    pub(super) async fn handle_unlock_service(
        &self,
        request: Request<pb::UnlockServiceRequest>,
    ) -> Result<Response<pb::UnlockServiceResponse>, Status> {
        let r = request.get_ref();
        let args = json!({"env": r.env, "service": r.service});
        let env = r.env.clone();
        self.audited(
            request,
            Need::Deploy(&env),
            "unlock_service",
            args,
            |caller, r| async move {
                let released = self
                    .access
                    .store()
                    .rollouts
                    .remove_manual_lock(&r.env, &r.service)
                    .await?;
                if let Some(lock) = &released {
                    tracing::info!(env = %lock.env, service = %lock.service, locked_by = %lock.by, by = %caller.identity.name, "service unlocked");
                    self.metrics.locks.set(&lock.env, &lock.service, None);
                }
                Ok(pb::UnlockServiceResponse {
                    released: released.map(lock_to_pb),
                })
            },
        )
        .await
    }

    pub(super) async fn handle_list_service_locks(
        &self,
        request: Request<pb::ListServiceLocksRequest>,
    ) -> Result<Response<pb::ListServiceLocksResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_service_locks",
                &serde_json::Value::Null,
            )
            .await?;
        let env = request.into_inner().env;
        let locks = self.access.store().rollouts.manual_locks(&env).await?;
        Ok(Response::new(pb::ListServiceLocksResponse {
            locks: locks.into_iter().map(lock_to_pb).collect(),
        }))
    }
}
