//! `cutover service stop|start|remove` (see `rollout::stopping`).

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::rollouts::started_to_pb;
use super::{OperatorApi, MAX_REASON};
use crate::access::Need;
use crate::rollout::{StartRequest, StopRequest};

/// A reason that is required (with `--break-glass`) or too long is the
/// caller's mistake, refused before anything changes.
fn check_reason(reason: &str, break_glass: bool, what: &str) -> Result<(), Status> {
    if break_glass && reason.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "--break-glass needs --reason TEXT: why this {what} cannot wait for the lock's holder"
        )));
    }
    if reason.chars().count() > MAX_REASON {
        return Err(Status::invalid_argument(format!(
            "the reason is over {MAX_REASON} characters; say it in a sentence and link the rest"
        )));
    }
    Ok(())
}

impl OperatorApi {
    pub(super) async fn handle_stop_service(
        &self,
        request: Request<pb::StopServiceRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.get_ref();
        let args = json!({
            "env": r.env,
            "service": r.service,
            "remove": r.remove,
            "reason": r.reason,
            "break_glass": r.break_glass,
        });
        let env = r.env.clone();
        let need = match r.break_glass {
            true => Need::Admin,
            false => Need::Deploy(&env),
        };
        let action = match r.remove {
            true => "remove_service",
            false => "stop_service",
        };
        self.audited(request, need, action, args, |caller, r| async move {
            let what = if r.remove { "removal" } else { "stop" };
            check_reason(&r.reason, r.break_glass, what)?;
            let started = self
                .rollouts
                .stop_service(StopRequest {
                    break_glass: r.break_glass.then(|| r.reason.clone()),
                    env: r.env,
                    service: r.service,
                    by: caller.identity.name,
                    remove: r.remove,
                    reason: r.reason,
                })
                .await?;
            Ok(started_to_pb(vec![started]))
        })
        .await
    }

    pub(super) async fn handle_start_service(
        &self,
        request: Request<pb::StartServiceRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.get_ref();
        let args = json!({
            "env": r.env,
            "service": r.service,
            "reason": r.reason,
            "break_glass": r.break_glass,
            "allow_unreachable": r.allow_unreachable,
        });
        let env = r.env.clone();
        let need = match r.break_glass {
            true => Need::Admin,
            false => Need::Deploy(&env),
        };
        self.audited(
            request,
            need,
            "start_service",
            args,
            |caller, r| async move {
                check_reason(&r.reason, r.break_glass, "start")?;
                let started = self
                    .rollouts
                    .start_service(StartRequest {
                        break_glass: r.break_glass.then(|| r.reason.clone()),
                        env: r.env,
                        service: r.service,
                        by: caller.identity.name,
                        reason: r.reason,
                        allow_unreachable: r.allow_unreachable,
                    })
                    .await?;
                Ok(started_to_pb(vec![started]))
            },
        )
        .await
    }
}
