//! Enrollment: join tokens, and the service a node without a certificate
//! calls to get one.
//!
//! A token is `cutover-join.<id>.<secret>`; the store keeps the id, the
//! sha256 of the secret, its labels, expiry and uses. A join presents the
//! token, the node's name and a signing request made on the node, and gets a
//! certificate for that identity (the key never travels) plus the token's
//! labels. Failed joins are counted per source address; too many in a
//! minute and that address is refused for the rest of it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_common::identity::{Identity, Role};
use cutover_common::tls::PeerInfo;
use cutover_proto::v1::enroll_service_server::EnrollService;
use cutover_proto::v1::{self as pb};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};

use crate::access::Access;
use crate::registry::Registry;
use crate::store::{Store, TokenRecord};

const TOKEN_PREFIX: &str = "cutover-join";
/// Failed joins allowed per source address per window.
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Longest a token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Equal without telling, through its timing, how much of it matched.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A new token and its record; the token string is shown once.
pub fn new_token(
    labels: BTreeMap<String, String>,
    ttl: Duration,
    uses: u32,
    by: &str,
) -> (String, TokenRecord) {
    let rng = SystemRandom::new();
    let mut id = [0u8; 6];
    let mut secret = [0u8; 24];
    rng.fill(&mut id).expect("the system random source works");
    rng.fill(&mut secret)
        .expect("the system random source works");
    let (id, secret) = (hex(&id), hex(&secret));
    let now = cutover_common::now_ms();
    let record = TokenRecord {
        id: id.clone(),
        hash: hash(&secret),
        labels,
        created_by: by.to_string(),
        created_at_ms: now,
        expires_at_ms: now + ttl.as_millis() as i64,
        uses,
        used: 0,
        nodes: Vec::new(),
        revoked_at_ms: None,
    };
    (format!("{TOKEN_PREFIX}.{id}.{secret}"), record)
}

pub fn token_to_pb(t: &TokenRecord) -> pb::JoinToken {
    pb::JoinToken {
        id: t.id.clone(),
        labels: t.labels.clone().into_iter().collect(),
        created_by: t.created_by.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        uses: t.uses,
        used: t.used,
        nodes: t.nodes.clone(),
        revoked_at_ms: t.revoked_at_ms.unwrap_or(0),
    }
}

/// The id of a token in the `cutover-join.<12 hex>.<secret>` form.
fn token_id(token: &str) -> Option<&str> {
    let mut parts = token.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_PREFIX), Some(id), Some(_))
            if id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Some(id)
        }
        _ => None,
    }
}

pub struct EnrollApi {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub pki: Arc<crate::ca::Pki>,
    pub access: Arc<Access>,
    pub lifetime: Duration,
    /// Failed joins by source address: count and window start.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Joins are taken one at a time, so the failures of a burst are
    /// counted before the next attempt is checked. (A token's use is a
    /// conditional write in the store: spent once, even across
    /// coordinators.)
    one_join: tokio::sync::Mutex<()>,
}

impl EnrollApi {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        pki: Arc<crate::ca::Pki>,
        access: Arc<Access>,
        lifetime: Duration,
    ) -> Self {
        Self {
            store,
            registry,
            pki,
            access,
            lifetime,
            failures: Mutex::new(HashMap::new()),
            one_join: tokio::sync::Mutex::new(()),
        }
    }

    fn limited(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else { return false };
        let failures = self.failures.lock().expect("failures lock");
        failures.get(&ip).is_some_and(|(count, since)| {
            *count >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW
        })
    }

    fn failed(&self, ip: Option<IpAddr>) {
        let Some(ip) = ip else { return };
        let mut failures = self.failures.lock().expect("failures lock");
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        // Old entries go, so the map stays as large as recent failures.
        failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
    }

    async fn join_as(&self, request: &pb::JoinRequest) -> Result<pb::JoinResponse, Status> {
        let refused = || {
            Status::permission_denied("the join token is unknown or wrong; ask an admin for a new one (`cutover token create`)")
        };
        let ca = self.pki.signer()?;
        let id = token_id(&request.token).ok_or_else(refused)?;
        let secret = request.token.rsplit('.').next().unwrap_or_default();
        let token = self
            .store
            .access
            .token(id)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .filter(|t| same(&t.hash, &hash(secret)))
            .ok_or_else(refused)?;
        usable(&token)?;
        let identity = Identity::new(Role::Agent, &request.name)
            .map_err(|e| Status::invalid_argument(format!("node name: {e}")))?;
        // A token lets a new node in, not anyone take over a known one
        // (registered, or enrolled and not connected yet).
        let enrolled = self
            .store
            .access
            .enrollment(&request.name)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .is_some();
        if enrolled
            || self
                .registry
                .list()
                .iter()
                .any(|n| n.record.name == request.name)
        {
            return Err(Status::already_exists(format!(
                "a node named {} is registered (or enrolled) already; join under another name, or have an admin issue this one a certificate",
                request.name
            )));
        }
        let cert_pem = ca
            .sign_request(&identity, &request.csr_pem, self.lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The use is counted on the token as stored now, checked again: two
        // joins on two coordinators cannot both take a token's last use.
        let token = self
            .store
            .access
            .update_token(id, |current| {
                let mut token = current.ok_or_else(refused)?;
                usable(&token)?;
                token.used += 1;
                token.nodes.push(request.name.clone());
                Ok::<_, Status>(Some(token))
            })
            .await?
            .expect("a counted use leaves the token");
        self.store
            .access
            .put_enrollment(&request.name, &token.labels)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        self.registry.record_issued(&request.name, &cert_pem).await;
        Ok(pb::JoinResponse {
            cert_pem,
            ca_cert_pem: self.pki.bundle_pem(),
            labels: token.labels.into_iter().collect(),
        })
    }
}

/// Refuses a token that was revoked, expired or is used up.
fn usable(token: &TokenRecord) -> Result<(), Status> {
    let id = &token.id;
    if token.revoked_at_ms.is_some() {
        return Err(Status::permission_denied(format!(
            "join token {id} was revoked; ask an admin for a new one"
        )));
    }
    if cutover_common::now_ms() >= token.expires_at_ms {
        return Err(Status::permission_denied(format!(
            "join token {id} expired; ask an admin for a new one"
        )));
    }
    if token.uses != 0 && token.used >= token.uses {
        return Err(Status::permission_denied(format!(
            "join token {id} is used up ({} of {} uses); ask an admin for a new one",
            token.used, token.uses
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl EnrollService for EnrollApi {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let ip = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.remote_addr)
            .map(|a| a.ip());
        let who = format!(
            "anonymous@{}",
            ip.map_or("unknown".into(), |ip| ip.to_string())
        );
        let r = request.into_inner();
        // Only an id in the token's own form is logged: a token pasted
        // without its prefix must not put its secret in the audit log.
        let token_id = token_id(&r.token).unwrap_or_default().to_string();
        let args = serde_json::json!({"token_id": token_id, "name": r.name});
        if self.limited(ip) {
            let message = "too many failed joins from this address; wait a minute";
            self.access
                .append(&who, "join", &args, &format!("refused: {message}"))
                .await;
            return Err(Status::resource_exhausted(message));
        }
        let result = {
            let _one = self.one_join.lock().await;
            // Counted again under the lock: a burst sent at once must not
            // all pass the check above before any failure is counted.
            if self.limited(ip) {
                Err(Status::resource_exhausted(
                    "too many failed joins from this address; wait a minute",
                ))
            } else {
                self.join_as(&r).await
            }
        };
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(status) => {
                self.failed(ip);
                format!("refused: {}", status.message())
            }
        };
        self.access.append(&who, "join", &args, &outcome).await;
        result.map(Response::new)
    }
}
