//! Renewing the agent's certificate before it expires, over the connection
//! the agent has: a new key made here (it never leaves the node), a signing
//! request to the coordinator, the new pair written in place of the old.
//! The open session goes on with the old certificate; the next connection
//! uses the new one. No restart, no command lost.

use std::path::{Path, PathBuf};

use cutover_common::fsutil::write_atomic;
use cutover_common::identity::{certificate_facts, Identity};
use cutover_common::tls::{load_certs, TlsFiles};
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::RenewCertificateRequest;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    #[error("cannot read the certificate {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the coordinator refused to renew the certificate: {0}")]
    Refused(String),
    #[error("the renewed certificate is for {got:?}, not {want}")]
    WrongIdentity { want: String, got: Option<String> },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// `<path>.new`: where a pair is written before it replaces the old one.
fn staged(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Finishes (or undoes) a renewal a crash interrupted, before the pair is
/// loaded: the key is swapped in first, so a staged certificate whose key is
/// already in place completes the swap, and a staged pair means nothing was
/// swapped yet and is dropped.
pub fn complete_interrupted(files: &TlsFiles) {
    let (cert_new, key_new) = (staged(&files.cert), staged(&files.key));
    match (cert_new.exists(), key_new.exists()) {
        (true, false) => {
            if let Err(error) = std::fs::rename(&cert_new, &files.cert) {
                tracing::error!(%error, "cannot complete an interrupted certificate renewal");
            } else {
                tracing::warn!("completed a certificate renewal an earlier run left halfway");
            }
        }
        (true, true) | (false, true) => {
            let _ = std::fs::remove_file(&cert_new);
            let _ = std::fs::remove_file(&key_new);
        }
        (false, false) => {}
    }
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

/// Renews the certificate if it is due; true if it did.
pub async fn renew_if_due(
    files: &TlsFiles,
    identity: &Identity,
    channel: Channel,
) -> Result<bool, RenewalError> {
    let due = renewal_due(files)?;
    if cutover_common::now_ms() / 1000 < due {
        return Ok(false);
    }
    let (csr_pem, key_pem) = cutover_common::pki::certificate_request(identity)
        .map_err(|e| RenewalError::Refused(e.to_string()))?;
    let cert_pem = AgentServiceClient::new(channel)
        .renew_certificate(RenewCertificateRequest { csr_pem })
        .await
        .map_err(|status| RenewalError::Refused(status.message().to_string()))?
        .into_inner()
        .cert_pem;
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| RenewalError::Refused("the answer holds no certificate".into()))?;
    let got = certificate_facts(&der).ok().and_then(|f| f.identity);
    if got.as_ref() != Some(identity) {
        return Err(RenewalError::WrongIdentity {
            want: identity.to_string(),
            got: got.map(|i| i.to_string()),
        });
    }
    let write = |path: &Path, text: &str, mode: u32| {
        write_atomic(path, text.as_bytes(), mode).map_err(|e| RenewalError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    };
    let (cert_new, key_new) = (staged(&files.cert), staged(&files.key));
    // The staged key first: a staged certificate alone then always means
    // the key was already swapped in (see `complete_interrupted`).
    write(&key_new, &key_pem, 0o600)?;
    write(&cert_new, &cert_pem, 0o644)?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| RenewalError::Write {
            path: to.to_path_buf(),
            reason: e.to_string(),
        })
    };
    // Key first: see `complete_interrupted`.
    rename(&key_new, &files.key)?;
    rename(&cert_new, &files.cert)?;
    tracing::info!(next_due = renewal_due(files)?, "certificate renewed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca_cert: dir.join("ca.crt"),
            cert: dir.join("agent.crt"),
            key: dir.join("agent.key"),
        }
    }

    #[test]
    fn a_renewal_cut_short_is_completed_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::fs::write(&f.cert, "old cert").unwrap();
        std::fs::write(&f.key, "old key").unwrap();

        // Cut before any swap: the staged pair goes, the old pair stays.
        std::fs::write(staged(&f.cert), "new cert").unwrap();
        std::fs::write(staged(&f.key), "new key").unwrap();
        complete_interrupted(&f);
        assert_eq!(std::fs::read_to_string(&f.cert).unwrap(), "old cert");
        assert_eq!(std::fs::read_to_string(&f.key).unwrap(), "old key");
        assert!(!staged(&f.cert).exists() && !staged(&f.key).exists());

        // Cut between the swaps: the key is new, so the certificate follows.
        std::fs::write(&f.key, "new key").unwrap();
        std::fs::write(staged(&f.cert), "new cert").unwrap();
        complete_interrupted(&f);
        assert_eq!(std::fs::read_to_string(&f.cert).unwrap(), "new cert");
        assert!(!staged(&f.cert).exists());
    }
}
