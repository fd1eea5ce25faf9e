//! Renewing the agent's certificate before it expires, over the connection
//! the agent has: a new key made here (it never leaves the node), a signing
//! request to the coordinator, the new pair written in place of the old.
//! The open session goes on with the old certificate; the next connection
//! uses the new one. No restart, no command lost.

use std::path::PathBuf;

use cutover_common::fsutil::explain_io;

use cutover_common::fsutil::write_atomic;
use cutover_common::identity::{certificate_facts, Identity};
use cutover_common::pki::{finish_pair_swap, IssuedPair};
use cutover_common::tls::{load_certs, parse_bundle, TlsFiles};
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::{RenewCertificateRequest, Renewed};
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("cannot read the certificate {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the coordinator refused to renew the certificate: {0}")]
    Refused(String),
    #[error("the renewed certificate is for {got:?}, not {want}; it was not written (is the coordinator's CA the one this node joined?)")]
    WrongIdentity { want: String, got: Option<String> },
    #[error("cannot write {path}: {reason}; the certificate in use stays until the next renewal succeeds")]
    Write { path: PathBuf, reason: String },
}

/// Finishes (or undoes) a renewal a crash interrupted, before the pair is
/// loaded.
pub fn complete_interrupted(files: &TlsFiles) {
    finish_pair_swap(&files.cert, &files.key);
}

/// Seconds since the epoch at which the certificate is due for renewal:
/// two thirds into its life.
fn renewal_due(files: &TlsFiles) -> Result<i64, RenewalError> {
    let certs = load_certs(&files.cert, "certificate").map_err(|e| RenewalError::Read {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;
    let facts = certificate_facts(&certs[0]).map_err(|e| RenewalError::Read {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;
    Ok(facts.not_before + (facts.not_after - facts.not_before) * 2 / 3)
}

/// Renews the node's certificate: when due (the periodic check) or at once
/// (a command, during a CA rotation). One renewal at a time.
pub struct Renewer {
    files: TlsFiles,
    identity: Identity,
    running: tokio::sync::Mutex<()>,
}

impl Renewer {
    pub fn new(files: TlsFiles, identity: Identity) -> Self {
        Self {
            files,
            identity,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Renews if the certificate is due; what was installed, if it did.
    pub async fn renew_if_due(&self, channel: Channel) -> Result<Option<Renewed>, RenewalError> {
        let _running = self.running.lock().await;
        if cutover_common::now_ms() / 1000 < renewal_due(&self.files)? {
            return Ok(None);
        }
        self.renew_locked(channel).await.map(Some)
    }

    /// Renews now, whatever the certificate's age.
    pub async fn renew_now(&self, channel: Channel) -> Result<Renewed, RenewalError> {
        let _running = self.running.lock().await;
        self.renew_locked(channel).await
    }

    async fn renew_locked(&self, channel: Channel) -> Result<Renewed, RenewalError> {
        let identity = &self.identity;
        let (csr_pem, key_pem) = cutover_common::pki::certificate_request(identity)
            .map_err(|e| RenewalError::Refused(e.to_string()))?;
        let answer = AgentServiceClient::new(channel)
            .renew_certificate(RenewCertificateRequest { csr_pem })
            .await
            .map_err(|status| RenewalError::Refused(status.message().to_string()))?
            .into_inner();
        let der = rustls_pemfile::certs(&mut answer.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| RenewalError::Refused("the answer holds no certificate".into()))?;
        let facts = certificate_facts(&der).ok();
        let got = facts.as_ref().and_then(|f| f.identity.clone());
        if got.as_ref() != Some(identity) {
            return Err(RenewalError::WrongIdentity {
                want: identity.to_string(),
                got: got.map(|i| i.to_string()),
            });
        }
        let facts = facts.expect("parsed above");
        if !answer.ca_bundle_pem.is_empty() {
            // A bundle this node could not load, or without the CA of its
            // new certificate, would lock it out: refused, nothing written.
            let bundle = parse_bundle(&answer.ca_bundle_pem)
                .map_err(|e| RenewalError::Refused(e.to_string()))?;
            if !bundle.iter().any(|ca| ca.subject == facts.issuer) {
                return Err(RenewalError::Refused(format!(
                    "the trust bundle sent does not hold {}, the CA of the new certificate",
                    facts.issuer
                )));
            }
            // Trust first: the bundle always holds the CA the coordinator
            // presents now and the one it will present, so writing it before
            // the pair is safe whatever happens next.
            write_atomic(&self.files.ca_cert, answer.ca_bundle_pem.as_bytes(), 0o644).map_err(
                |e| RenewalError::Write {
                    path: self.files.ca_cert.clone(),
                    reason: explain_io(&self.files.ca_cert, &e),
                },
            )?;
        }
        IssuedPair {
            cert_pem: answer.cert_pem,
            key_pem,
        }
        .replace(&self.files.cert, &self.files.key)
        .map_err(|e| RenewalError::Write {
            path: self.files.cert.clone(),
            reason: e.to_string(),
        })?;
        let trusted =
            std::fs::read_to_string(&self.files.ca_cert).map_err(|e| RenewalError::Read {
                path: self.files.ca_cert.clone(),
                reason: explain_io(&self.files.ca_cert, &e),
            })?;
        tracing::info!(
            serial = %facts.serial,
            issuer = %facts.issuer,
            next_due = renewal_due(&self.files)?,
            "certificate renewed"
        );
        Ok(Renewed {
            serial: facts.serial,
            issuer: facts.issuer,
            ca_bundle_sha256: sha256_hex(trusted.as_bytes()),
        })
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    cutover_common::tls::fingerprint(bytes)
        .trim_start_matches("sha256:")
        .to_string()
}
