//! Role checks on every gRPC call, from the identity the CA signed into the
//! peer's certificate (see `cutover_common::identity`).

use cutover_common::identity::{Identity, Role};
use cutover_common::tls::PeerInfo;
use tonic::{Request, Status};

/// An interceptor that admits only peers whose certificate carries `role`.
/// The identity is left in the request extensions for the handler.
pub fn require(role: Role) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let identity = peer_identity(&request)?;
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
