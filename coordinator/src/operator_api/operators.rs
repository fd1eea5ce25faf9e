//! Operators: creating them (their certificate signed here), listing,
//! revoking, and an operator renewing its own certificate.

use std::time::Duration;

use cutover_common::identity::{Identity, Role};
use cutover_common::tls::PeerInfo;
use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::store::{OperatorRecord, OperatorRole, ReplacedCertificate};

/// Operators' certificates live a year unless the request says.
const OPERATOR_CERT_DAYS: u64 = 365;

fn operator_to_pb(record: &OperatorRecord) -> pb::Operator {
    pb::Operator {
        name: record.name.clone(),
        role: record.role.as_str().to_string(),
        envs: record.envs.clone(),
        created_by: record.created_by.clone(),
        created_at_ms: record.created_at_ms,
        revoked_at_ms: record.revoked_at_ms.unwrap_or(0),
    }
}

impl OperatorApi {
    pub(super) async fn handle_create_operator(
        &self,
        request: Request<pb::CreateOperatorRequest>,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        let r = request.get_ref();
        let args = json!({
            "name": r.name,
            "role": r.role,
            "envs": r.envs,
            "validity_days": r.validity_days,
        });
        self.audited(
            request,
            Need::Admin,
            "create_operator",
            args,
            |caller, r| async move { self.create_operator_as(&caller.who(), r).await },
        )
        .await
    }

    pub(super) async fn handle_list_operators(
        &self,
        request: Request<pb::ListOperatorsRequest>,
    ) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_operators",
                &serde_json::Value::Null,
            )
            .await?;
        let operators = self
            .registry
            .store()
            .access
            .operators()
            .await?
            .iter()
            .map(operator_to_pb)
            .collect();
        Ok(Response::new(pb::ListOperatorsResponse { operators }))
    }

    pub(super) async fn handle_revoke_operator(
        &self,
        request: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::Operator>, Status> {
        let args =
            json!({"name": request.get_ref().name, "never_seen": request.get_ref().never_seen});
        self.audited(
            request,
            Need::Admin,
            "revoke_operator",
            args,
            |caller, r| async move {
                self.revoke_operator_as(&caller.who(), &r.name, r.never_seen)
                    .await
            },
        )
        .await
    }

    pub(super) async fn handle_renew_operator_certificate(
        &self,
        request: Request<pb::RenewOperatorCertificateRequest>,
    ) -> Result<Response<pb::RenewOperatorCertificateResponse>, Status> {
        let peer_info = request.extensions().get::<PeerInfo>().cloned();
        // The new certificate lives as long as the one it replaces was
        // made to (an operator chose it at creation), within the bounds
        // `operator create` allows.
        let lifetime = peer_info
            .clone()
            .and_then(|p| Some(p.not_after? - p.not_before? - cutover_common::pki::BACKDATE_SECS))
            .map_or(OPERATOR_CERT_DAYS * 86_400, |s| {
                (s.max(3600) as u64).min(3650 * 86_400)
            });
        let args = json!({"lifetime": humantime::format_duration(Duration::from_secs(lifetime)).to_string()});
        self.audited(
            request,
            Need::Own,
            "renew_operator_certificate",
            args,
            |caller, r| async move {
                let cert_pem = self
                    .pki
                    .signer()?
                    .sign_request(&caller.identity, &r.csr_pem, Duration::from_secs(lifetime))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                // The certificate renewed is refused once the new one is used:
                // recorded before the new one is handed out.
                if let Some(peer) = &peer_info {
                    self.replace_operator_certificate(&caller.identity.name, peer, &cert_pem)
                        .await?;
                }
                Ok(pb::RenewOperatorCertificateResponse {
                    cert_pem,
                    ca_bundle_pem: self.pki.bundle_pem(),
                })
            },
        )
        .await
    }

    /// Records a new operator and signs its certificate, once allowed.
    async fn create_operator_as(
        &self,
        by: &str,
        r: pb::CreateOperatorRequest,
    ) -> Result<pb::CreateOperatorResponse, Status> {
        let ca = self.pki.signer()?;
        let identity = Identity::new(Role::Operator, &r.name)
            .map_err(|e| Status::invalid_argument(format!("operator name: {e}")))?;
        let role = OperatorRole::parse(&r.role).ok_or_else(|| {
            Status::invalid_argument(format!("role {:?}: use viewer, deployer or admin", r.role))
        })?;
        for env in &r.envs {
            cutover_common::identity::validate_name(env)
                .map_err(|e| Status::invalid_argument(format!("environment {env:?}: {e}")))?;
        }
        if !r.envs.is_empty() && role != OperatorRole::Deployer {
            return Err(Status::invalid_argument(
                "only a deployer is limited to environments: a viewer reads everything, an admin changes everything",
            ));
        }
        let days = match r.validity_days {
            0 => OPERATOR_CERT_DAYS,
            d => u64::from(d.min(3650)),
        };
        let record = OperatorRecord {
            name: r.name.clone(),
            role,
            envs: r.envs.clone(),
            created_by: by.to_string(),
            created_at_ms: cutover_common::now_ms(),
            revoked_at_ms: None,
            replaced: Vec::new(),
        };
        let cert_pem = ca
            .sign_request(&identity, &r.csr_pem, Duration::from_secs(days * 86_400))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Created only where no record is: a name is never handed out twice,
        // even by two coordinators at once. Signed first: a request that
        // cannot be signed leaves no record.
        let mut exists = false;
        self.registry
            .store()
            .access
            .update_operator(&r.name, |current| {
                exists = current.is_some();
                Ok::<_, Status>((!exists).then(|| record.clone()))
            })
            .await?;
        if exists {
            return Err(Status::already_exists(format!(
                "operator {} exists (names are never reused, even revoked ones); choose another name",
                r.name
            )));
        }

        tracing::info!(operator = %record.name, role = record.role.as_str(), %by, "operator created");
        Ok(pb::CreateOperatorResponse {
            operator: Some(operator_to_pb(&record)),
            cert_pem,
            ca_cert_pem: self.pki.bundle_pem(),
        })
    }

    /// Marks an operator revoked, once allowed: every certificate of the
    /// name is refused from then on. A name without a record is refused
    /// unless `never_seen` (a certificate issued offline that never
    /// connected: it gets a revoked record, so it is refused too).
    async fn revoke_operator_as(
        &self,
        by: &str,
        name: &str,
        never_seen: bool,
    ) -> Result<pb::Operator, Status> {
        cutover_common::identity::validate_name(name)
            .map_err(|e| Status::invalid_argument(format!("operator name: {e}")))?;
        let record = {
            let _alone = self.access.operators_alone().await;
            let store = self.registry.store();
            let operators = store.access.operators().await?;
            let mut record = match operators.iter().find(|o| o.name == name) {
                Some(record) => record.clone(),
                None if never_seen => OperatorRecord::issued_offline(name),
                None => {
                    return Err(Status::not_found(format!(
                        "no operator {name}; `cutover operator list` shows them (a certificate issued offline that never connected: add --never-seen)"
                    )))
                }
            };
            if record.revoked_at_ms.is_some() {
                return Ok(operator_to_pb(&record));
            }
            let admins_left = operators
                .iter()
                .filter(|o| {
                    o.name != name && o.role == OperatorRole::Admin && o.revoked_at_ms.is_none()
                })
                .count();
            if record.role == OperatorRole::Admin && admins_left == 0 {
                return Err(Status::failed_precondition(format!(
                    "operator {name} is the last admin; create another admin first (`cutover operator create NAME --role admin`)"
                )));
            }
            record.revoked_at_ms = Some(cutover_common::now_ms());
            store.access.put_operator(&record).await?;
            tracing::warn!(operator = %name, %by, "operator revoked");
            record
        };
        Ok(operator_to_pb(&record))
    }

    /// Records that `peer`'s certificate of operator `name` was renewed
    /// into `renewed_pem`: the old one is refused once the new one is used
    /// (see `Access::check`); certificates already expired leave the record.
    async fn replace_operator_certificate(
        &self,
        name: &str,
        peer: &PeerInfo,
        renewed_pem: &str,
    ) -> Result<(), Status> {
        let (Some(serial), Some(not_after)) = (&peer.serial, peer.not_after) else {
            return Err(Status::unauthenticated(
                "the connection's certificate has no serial or expiry; cannot renew it",
            ));
        };
        let renewed = rustls_pemfile::certs(&mut renewed_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .and_then(|der| cutover_common::identity::certificate_facts(&der).ok())
            .ok_or_else(|| Status::internal("cannot read the renewed certificate"))?;
        self.registry
            .store()
            .access
            .update_operator(name, |current| {
                let mut record = current.unwrap_or_else(|| OperatorRecord::issued_offline(name));
                let now = cutover_common::now_ms();
                record.replaced.retain(|c| c.expires_at_ms > now);
                record.replaced.push(ReplacedCertificate {
                    serial: serial.clone(),
                    expires_at_ms: not_after * 1000,
                    by: renewed.serial.clone(),
                    retired: false,
                });
                Ok::<_, Status>(Some(record))
            })
            .await?;
        Ok(())
    }
}
