//! Role checks on every gRPC call, from the identity the CA signed into the
//! peer's certificate (see `cutover_common::identity`).

use std::sync::Arc;

use cutover_common::identity::{Identity, Role};

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
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let identity = peer_identity(&request)?;
        let issuer = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.issuer.clone())
            .unwrap_or_default();
        if !pki.trusts(&issuer) {
            tracing::warn!(peer = %identity, ca = %issuer, "refused: certificate of a retired ca");
            return Err(Status::unauthenticated(format!(
                "the certificate of {identity} comes from {issuer}, which a CA rotation retired; get a new one (`cutover operator renew` before a rotation finishes, or new credentials from an admin)"
            )));
        }
        if identity.role != role {
            tracing::warn!(peer = %identity, required = %role, "refused: wrong role");
            return Err(Status::permission_denied(format!(
                "certificate of {identity} cannot call the {role} api; use a certificate issued with `cutover ca issue {role}`"
            )));
        }
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

fn peer_identity<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|peer| peer.identity.clone())
        .ok_or_else(|| {
            Status::unauthenticated(
                "client certificate carries no cutover identity; issue one with `cutover ca issue`",
            )
        })
}
