//! Role checks on every gRPC call, from the identity the CA signed into the
//! peer's certificate (see `cutover_common::identity`).

use std::sync::Arc;

use cutover_common::identity::Role;

use crate::access::Access;
use crate::ca::Pki;
use cutover_common::tls::PeerInfo;
use tonic::{Request, Status};

/// An interceptor that admits only peers whose certificate carries `role`
/// and comes from a CA the installation still trusts: a connection opened
/// before a CA rotation retired its CA is refused from then on, even if it
/// stays open. The identity is left in the request extensions for the
/// handler.
pub fn require(
    role: Role,
    pki: Arc<Pki>,
    access: Arc<Access>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let address = crate::refusals::source_address(peer.remote_addr);
        let action = format!("{role}_api");
        // Refused calls are audited (rate-limited per source): a probe with
        // the wrong credentials is something an operator must see.
        // An interceptor cannot wait: the entry is written by a task of its
        // own (the audit log orders entries by when they are written).
        let refuse = |who: String, status: Status| {
            let (access, action, address) = (access.clone(), action.clone(), address.clone());
            let reason = status.message().to_string();
            tokio::spawn(async move {
                access
                    .refused(
                        &format!("{who}@{address}"),
                        &who,
                        &action,
                        &serde_json::json!({ "from": address }),
                        &reason,
                    )
                    .await;
            });
            status
        };
        let Some(identity) = peer.identity.clone() else {
            return Err(refuse(
                "anonymous".to_string(),
                Status::unauthenticated(
                    "client certificate carries no cutover identity; issue one with `cutover ca issue`",
                ),
            ));
        };
        let issuer = peer.issuer.clone().unwrap_or_default();
        if !pki.trusts(&issuer) {
            return Err(refuse(
                crate::access::who(&identity),
                Status::unauthenticated(format!(
                    "the certificate of {identity} comes from {issuer}, which a CA rotation retired; get a new one (`cutover operator renew` before a rotation finishes, or new credentials from an admin)"
                )),
            ));
        }
        if identity.role != role {
            return Err(refuse(
                crate::access::who(&identity),
                Status::permission_denied(format!(
                    "certificate of {identity} cannot call the {role} api; use a certificate issued with `cutover ca issue {role}`"
                )),
            ));
        }
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}
