//! `cutover scale`: the current release with another number of processes
//! per node (see `rollout::scale`).

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::rollouts::started_to_pb;
use super::OperatorApi;
use crate::access::Need;
use crate::rollout::ScaleChange;

impl OperatorApi {
    pub(super) async fn handle_scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.get_ref();
        let args = json!({
            "env": r.env,
            "service": r.service,
            "instances": r.instances,
            "allow_unreachable": r.allow_unreachable,
            "break_glass": r.break_glass,
            "reason": r.reason,
        });
        let env = r.env.clone();
        let need = if r.break_glass {
            Need::Admin
        } else {
            Need::Deploy(&env)
        };
        self.audited(
            request,
            need,
            "scale_service",
            args,
            |caller, r| async move {
                self.variant_ok(&r.env, &r.service, r.break_glass, &r.reason, "scale")?;
                let started = self
                    .rollouts
                    .scale(ScaleChange {
                        env: r.env,
                        service: r.service,
                        instances: r.instances,
                        by: caller.identity.name,
                        allow_unreachable: r.allow_unreachable,
                        break_glass: r.break_glass.then_some(r.reason),
                    })
                    .await?;
                Ok(started_to_pb(vec![started]))
            },
        )
        .await
    }
}
