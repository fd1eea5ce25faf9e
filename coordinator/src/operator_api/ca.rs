//! The installation's CA: its state, and rotating it.

use cutover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;

impl OperatorApi {
    pub(super) async fn handle_rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        let args = serde_json::Value::Null;
        self.audited(
            request,
            Need::Admin,
            "rotate_ca",
            args,
            |caller, _| async move {
                self.pki.start_rotation(&caller.who()).await?;
                Ok(self.pki.status(&self.registry).await?)
            },
        )
        .await
    }

    pub(super) async fn handle_get_ca_status(
        &self,
        request: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "get_ca_status",
                &serde_json::Value::Null,
            )
            .await?;
        Ok(Response::new(self.pki.status(&self.registry).await?))
    }
}
