//! The coordinator's PKI at run time: the CA that signs, the trust bundle,
//! the TLS configuration every new handshake uses, and CA rotation.
//!
//! A rotation moves the installation to a new CA without a restart and
//! without dropping a connection, in the order that keeps every peer able to
//! verify every other at each moment:
//! 1. reissuing: the new CA signs from now on and joins the trust bundle
//!    (`tls.ca_cert`); the coordinator still presents its certificate of the
//!    old CA. Every node is told to renew: it gets a certificate of the new
//!    CA and the bundle of both, and confirms what it installed.
//! 2. retiring: once every node has, the coordinator presents a certificate
//!    of the new CA and trusts the new CA only; every node is told to renew
//!    again and so takes the bundle without the old CA.
//! 3. finished: every node confirmed that bundle.
//!
//! Revoked nodes do not count; an unreachable node holds the rotation until
//! it comes back or is revoked. Files change in an order that leaves a
//! usable set after a crash at any point, and the driver picks up where the
//! stored rotation says.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cutover_common::fsutil::write_atomic;
use cutover_common::identity::certificate_facts;
use cutover_common::pki::{split_certs, CertificateAuthority, PkiError};
use cutover_common::tls::{fingerprint, load_certs, server_config, TlsError, TlsFiles};
use cutover_proto::v1 as pb;
use rustls::ServerConfig;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{CaRotation, NewEvent, Store, StoreError};

/// Lifetime of the coordinator's server certificate, as `ca init` gives it.
const SERVER_CERT_DAYS: i64 = 825;
/// How long a node has to answer a renewal command.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);
/// Before a node whose renewal failed is asked again.
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// The driver's pace: a rotation is a matter of seconds, not milliseconds.
const DRIVE_EVERY: Duration = Duration::from_secs(1);
const RENEW_CAPABILITY: &str = "command.renew_certificate";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this coordinator cannot sign certificates: set `ca_key` in its config to the installation's ca.key (from `cutover ca init`)")]
    NoSigner,
    #[error("cannot {action} {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    File {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Pki {
    files: TlsFiles,
    ca_key: Option<PathBuf>,
    store: Store,
    /// Where its events go, in order with the registry's.
    journal: Journal,
    signer: RwLock<Option<Arc<CertificateAuthority>>>,
    /// The trust bundle the server config was built from: what is handed
    /// out is always what is in force.
    bundle: RwLock<Bundle>,
    server: watch::Sender<Arc<ServerConfig>>,
    /// Serializes the steps of a rotation (start, each drive step).
    changes: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Bundle {
    pem: String,
    /// Common names of its CAs.
    names: Vec<String>,
}

impl Bundle {
    fn load(path: &Path) -> Result<Self, CaError> {
        let pem = read(path)?;
        let names = cutover_common::tls::parse_bundle(&pem)?
            .into_iter()
            .map(|f| f.subject)
            .collect();
        Ok(Self { pem, names })
    }
}

/// `<path>.next`: the new CA's files before it is installed.
fn next(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::File {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    write_atomic(path, text.as_bytes(), mode).map_err(|source| CaError::File {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// sha256 hex of a trust bundle: what nodes confirm they installed.
pub fn bundle_sha256(pem: &str) -> String {
    fingerprint(pem.as_bytes())
        .trim_start_matches("sha256:")
        .to_string()
}

impl Pki {
    /// Loads the PKI files, first completing the start of a rotation a
    /// crash cut short (the server's certificate swap is completed by the
    /// caller, before it checks the files).
    pub async fn open(
        files: TlsFiles,
        ca_key: Option<PathBuf>,
        store: Store,
        journal: Journal,
    ) -> Result<Self, CaError> {
        if let Some(key) = &ca_key {
            let rotation = store.pki.ca_rotation().await?;
            recover_staged_ca(&files.ca_cert, key, rotation.as_ref())?;
        }
        let signer = match &ca_key {
            Some(key) => Some(Arc::new(CertificateAuthority::load(&files.ca_cert, key)?)),
            None => None,
        };
        let (server, _) = watch::channel(server_config(&files)?);
        Ok(Self {
            bundle: RwLock::new(Bundle::load(&files.ca_cert)?),
            files,
            ca_key,
            store,
            journal,
            signer: RwLock::new(signer),
            server,
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// The CA that signs certificates now.
    pub fn signer(&self) -> Result<Arc<CertificateAuthority>, CaError> {
        self.signer
            .read()
            .expect("signer lock")
            .clone()
            .ok_or(CaError::NoSigner)
    }

    /// The TLS configuration, updated in place when a rotation changes it.
    pub fn server_configs(&self) -> watch::Receiver<Arc<ServerConfig>> {
        self.server.subscribe()
    }

    /// The CAs every peer must trust now (PEM).
    pub fn bundle_pem(&self) -> String {
        self.bundle.read().expect("bundle lock").pem.clone()
    }

    /// Whether certificates of the CA named `issuer` are accepted now.
    pub fn trusts(&self, issuer: &str) -> bool {
        self.bundle
            .read()
            .expect("bundle lock")
            .names
            .iter()
            .any(|name| name == issuer)
    }

    /// The fingerprint of the CA that signed the certificate the coordinator
    /// presents: what a joining node must pin.
    pub fn server_ca_fingerprint(&self) -> Result<String, CaError> {
        let issuer = self.server_facts()?.issuer;
        let bundle = load_certs(&self.files.ca_cert, "CA certificate")?;
        let ca = bundle
            .iter()
            .find(|der| certificate_facts(der).is_ok_and(|f| f.subject == issuer))
            .unwrap_or(&bundle[0]);
        Ok(fingerprint(ca))
    }

    fn server_facts(&self) -> Result<cutover_common::identity::CertificateFacts, CaError> {
        let der = load_certs(&self.files.cert, "certificate")?;
        certificate_facts(&der[0]).map_err(|e| {
            CaError::Pki(PkiError::BadRequest(format!(
                "{}: {e}",
                self.files.cert.display()
            )))
        })
    }

    pub async fn rotation(&self) -> Result<Option<CaRotation>, CaError> {
        Ok(self.store.pki.ca_rotation().await?)
    }

    /// Starts a rotation, or returns the one in progress.
    pub async fn start_rotation(&self, by: &str) -> Result<CaRotation, CaError> {
        let _change = self.changes.lock().await;
        let key = self.ca_key.as_deref().ok_or(CaError::NoSigner)?;
        if let Some(rotation) = self.store.pki.ca_rotation().await? {
            if rotation.finished_at_ms.is_none() {
                // Whatever of its start failed before is done again.
                recover_staged_ca(&self.files.ca_cert, key, Some(&rotation))?;
                self.reload()?;
                return Ok(rotation);
            }
        }
        let old = self.signer()?;
        let new = CertificateAuthority::generate_fresh()?;
        // Staged complete (key, then certificate) before the rotation is
        // recorded, so a recorded rotation always finds its CA.
        write(&next(key), &new.key_pem(), 0o600)?;
        write(&next(&self.files.ca_cert), new.cert_pem(), 0o644)?;
        let rotation = CaRotation {
            started_at_ms: cutover_common::now_ms(),
            started_by: by.to_string(),
            old_ca: old.name(),
            new_ca: new.name(),
            retired_at_ms: None,
            finished_at_ms: None,
        };
        self.store.pki.put_ca_rotation(&rotation).await?;
        install_staged_ca(&self.files.ca_cert, key)?;
        self.reload()?;
        self.event(format!(
            "{by} started a CA rotation from {} to {}; nodes are renewing",
            rotation.old_ca, rotation.new_ca
        ));
        Ok(rotation)
    }

    /// Moves the coordinator's certificate to the signing CA and trusts
    /// that CA only, then ends the sessions opened with certificates of the
    /// old one (their agents reconnect at once with the new ones).
    /// Repeating it changes nothing more. Called under `changes`.
    async fn retire(&self, mut rotation: CaRotation, registry: &Registry) -> Result<(), CaError> {
        let signer = self.signer()?;
        let current = self.server_facts()?;
        if current.issuer != signer.name() {
            signer
                .issue_server(&current.names, SERVER_CERT_DAYS)?
                .replace(&self.files.cert, &self.files.key)?;
        }
        write(&self.files.ca_cert, signer.cert_pem(), 0o644)?;
        self.reload()?;
        rotation.retired_at_ms = Some(cutover_common::now_ms());
        self.store.pki.put_ca_rotation(&rotation).await?;
        let ended = registry.end_sessions_not_trusted(|issuer| self.trusts(issuer));
        tracing::info!(ended, "sessions of the retired ca ended");
        self.event(format!(
            "every node holds a certificate of {}: the coordinator presents one too and no longer trusts {}",
            rotation.new_ca, rotation.old_ca
        ));
        Ok(())
    }

    /// Called under `changes`.
    async fn finish(&self, mut rotation: CaRotation) -> Result<(), CaError> {
        rotation.finished_at_ms = Some(cutover_common::now_ms());
        self.store.pki.put_ca_rotation(&rotation).await?;
        self.event(format!(
            "CA rotation to {} finished: every node trusts it alone",
            rotation.new_ca
        ));
        Ok(())
    }

    /// Loads the files again; nothing changes in memory unless all load.
    fn reload(&self) -> Result<(), CaError> {
        let signer = match &self.ca_key {
            Some(key) => Some(Arc::new(CertificateAuthority::load(
                &self.files.ca_cert,
                key,
            )?)),
            None => None,
        };
        let bundle = Bundle::load(&self.files.ca_cert)?;
        let config = server_config(&self.files)?;
        *self.signer.write().expect("signer lock") = signer;
        *self.bundle.write().expect("bundle lock") = bundle;
        self.server.send_replace(config);
        Ok(())
    }

    fn event(&self, message: String) {
        tracing::info!(event = "ca_rotation", "{message}");
        self.journal.event(NewEvent {
            kind: "ca_rotation",
            node_id: String::new(),
            node_name: String::new(),
            message,
        });
    }

    /// What `cutover ca status` shows.
    pub async fn status(&self, registry: &Registry) -> Result<pb::CaStatus, CaError> {
        let bundle_pem = self.bundle_pem();
        let bundle = bundle_sha256(&bundle_pem);
        let signing = self.signer().map(|s| s.name()).ok();
        let mut cas: Vec<pb::CaInfo> = rustls_pemfile::certs(&mut bundle_pem.as_bytes())
            .filter_map(Result::ok)
            .filter_map(|der| {
                let facts = certificate_facts(&der).ok()?;
                Some(pb::CaInfo {
                    signing: signing.as_deref() == Some(facts.subject.as_str()),
                    name: facts.subject,
                    fingerprint: fingerprint(&der),
                    not_after_ms: facts.not_after * 1000,
                })
            })
            .collect();
        cas.sort_by_key(|ca| !ca.signing);
        let rotation = self.rotation().await?;
        let active = rotation.as_ref().filter(|r| r.finished_at_ms.is_none());
        let target = active
            .map(|r| r.new_ca.clone())
            .or(signing)
            .unwrap_or_default();
        let nodes = registry
            .list()
            .into_iter()
            .map(|view| {
                let record = view.record;
                let current_bundle = record.trust_bundle == bundle;
                let revoked = view.revoked;
                let moved = record.cert_ca == target && (active.is_none() || current_bundle);
                let waiting_because = if active.is_none() || moved || revoked {
                    ""
                } else if !view.connected {
                    "offline: it renews when it is back, or revoke it"
                } else if !record.capabilities.iter().any(|c| c == RENEW_CAPABILITY) {
                    "its agent cannot renew on command: upgrade it"
                } else {
                    ""
                };
                pb::CaNode {
                    revoked,
                    moved,
                    waiting_because: waiting_because.to_string(),
                    name: record.name,
                    connected: view.connected,
                    cert_ca: record.cert_ca,
                    current_bundle,
                }
            })
            .collect();
        let phase = match &rotation {
            None => "none",
            Some(r) if r.finished_at_ms.is_some() => "finished",
            Some(r) if r.retired_at_ms.is_some() => "retiring",
            Some(_) => "reissuing",
        };
        let rotation = rotation.unwrap_or(CaRotation {
            started_at_ms: 0,
            started_by: String::new(),
            old_ca: String::new(),
            new_ca: String::new(),
            retired_at_ms: None,
            finished_at_ms: None,
        });
        Ok(pb::CaStatus {
            phase: phase.to_string(),
            cas,
            started_at_ms: rotation.started_at_ms,
            started_by: rotation.started_by,
            retired_at_ms: rotation.retired_at_ms.unwrap_or(0),
            finished_at_ms: rotation.finished_at_ms.unwrap_or(0),
            nodes,
            new_ca: rotation.new_ca,
        })
    }
}

/// Adds the staged CA to the bundle, then makes its key the signing key.
/// Each step is atomic and repeatable: a crash between them leaves the old
/// key signing with both CAs trusted, which `recover_staged_ca` completes.
fn install_staged_ca(ca_cert: &Path, key: &Path) -> Result<(), CaError> {
    let new_pem = read(&next(ca_cert))?;
    let bundle = read(ca_cert)?;
    let present = split_certs(&bundle);
    if !split_certs(&new_pem).iter().all(|c| present.contains(c)) {
        let mut joined = bundle;
        if !joined.ends_with('\n') {
            joined.push('\n');
        }
        joined.push_str(&new_pem);
        write(ca_cert, &joined, 0o644)?;
    }
    std::fs::rename(next(key), key).map_err(|source| CaError::File {
        action: "install",
        path: key.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(next(ca_cert));
    Ok(())
}

/// Completes a staged CA whose rotation was recorded; drops one that was
/// not (the rotation never started).
fn recover_staged_ca(
    ca_cert: &Path,
    key: &Path,
    rotation: Option<&CaRotation>,
) -> Result<(), CaError> {
    if !next(key).exists() {
        let _ = std::fs::remove_file(next(ca_cert));
        return Ok(());
    }
    let staged_name = load_certs(&next(ca_cert), "CA certificate")
        .ok()
        .and_then(|der| certificate_facts(&der[0]).ok())
        .map(|f| f.subject);
    let recorded = rotation
        .filter(|r| r.finished_at_ms.is_none())
        .is_some_and(|r| Some(&r.new_ca) == staged_name.as_ref());
    if recorded {
        tracing::warn!("completing the start of a CA rotation an earlier run left halfway");
        install_staged_ca(ca_cert, key)
    } else {
        let _ = std::fs::remove_file(next(key));
        let _ = std::fs::remove_file(next(ca_cert));
        Ok(())
    }
}

/// Drives the rotation in progress: tells each connected node that lacks
/// the new CA's certificate or the current bundle to renew, retires the old
/// CA once all have, and finishes once all hold the trimmed bundle.
pub async fn drive_rotation(
    pki: Arc<Pki>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // Node id -> when it may be asked again (a renewal in flight or failed).
    let busy: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(DRIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = drive_step(&pki, &registry, &metrics, &busy).await {
            tracing::error!(%error, "ca rotation step failed; retrying");
        }
    }
}

async fn drive_step(
    pki: &Pki,
    registry: &Arc<Registry>,
    metrics: &Metrics,
    busy: &Arc<Mutex<HashMap<String, Instant>>>,
) -> Result<(), CaError> {
    // One step at a time, and none beside a start: the nodes counted are
    // the nodes when the phase changes.
    let _change = pki.changes.lock().await;
    let rotation = pki.rotation().await?.filter(|r| r.finished_at_ms.is_none());
    let Some(rotation) = rotation else {
        metrics.ca_rotation_phase.set(0);
        metrics.ca_rotation_waiting.set(0);
        return Ok(());
    };
    metrics
        .ca_rotation_phase
        .set(if rotation.retired_at_ms.is_some() {
            2
        } else {
            1
        });
    let bundle = bundle_sha256(&pki.bundle_pem());
    let mut waiting = 0;
    for view in registry.list() {
        let node = view.record;
        if registry.is_revoked(&node.name, &node.cert_serial)
            || (node.cert_ca == rotation.new_ca && node.trust_bundle == bundle)
        {
            continue;
        }
        waiting += 1;
        if !view.connected || !node.capabilities.iter().any(|c| c == RENEW_CAPABILITY) {
            continue;
        }
        let now = Instant::now();
        {
            let mut busy = busy.lock().expect("busy lock");
            if busy.get(&node.id).is_some_and(|until| *until > now) {
                continue;
            }
            busy.insert(node.id.clone(), now + RENEW_TIMEOUT + RENEW_RETRY);
        }
        tokio::spawn(renew_node(
            registry.clone(),
            busy.clone(),
            node.id,
            node.name,
        ));
    }
    metrics.ca_rotation_waiting.set(waiting);
    if waiting == 0 {
        if rotation.retired_at_ms.is_none() {
            pki.retire(rotation, registry).await?;
        } else {
            pki.finish(rotation).await?;
        }
    }
    Ok(())
}

/// Asks one node to renew and records what it confirms installing.
async fn renew_node(
    registry: Arc<Registry>,
    busy: Arc<Mutex<HashMap<String, Instant>>>,
    node_id: String,
    name: String,
) {
    let command = pb::Command {
        command_id: format!("renew-{node_id}-{}", cutover_common::now_ms()),
        kind: Some(pb::command::Kind::RenewCertificate(
            pb::RenewCertificateNow {},
        )),
    };
    let outcome = match registry.send_command(&node_id, command) {
        Ok(pending) => pending
            .wait(RENEW_TIMEOUT, |_| {})
            .await
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let renewed = outcome.and_then(|result| match result.output {
        Some(pb::command_result::Output::Renewed(renewed))
            if result.status == pb::CommandStatus::Succeeded as i32 =>
        {
            Ok(renewed)
        }
        _ => Err(result.message),
    });
    let retry_at = match renewed {
        Ok(renewed) => {
            tracing::info!(node = %name, ca = %renewed.issuer, serial = %renewed.serial, "node renewed for the ca rotation");
            registry.set_credentials(&node_id, &renewed.issuer, &renewed.ca_bundle_sha256);
            Instant::now()
        }
        Err(error) => {
            tracing::warn!(node = %name, %error, "node could not renew for the ca rotation; asking again");
            Instant::now() + RENEW_RETRY
        }
    };
    busy.lock().expect("busy lock").insert(node_id, retry_at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(new_ca: &str) -> CaRotation {
        CaRotation {
            started_at_ms: 1,
            started_by: "operator/root".into(),
            old_ca: "old".into(),
            new_ca: new_ca.into(),
            retired_at_ms: None,
            finished_at_ms: None,
        }
    }

    #[test]
    fn a_staged_ca_is_installed_only_when_its_rotation_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let old = CertificateAuthority::init_dir(dir.path(), &[]).unwrap();
        let (ca_cert, key) = (
            dir.path().join(cutover_common::pki::CA_CERT),
            dir.path().join(cutover_common::pki::CA_KEY),
        );
        let new = CertificateAuthority::generate_fresh().unwrap();
        let stage = || {
            write(&next(&key), &new.key_pem(), 0o600).unwrap();
            write(&next(&ca_cert), new.cert_pem(), 0o644).unwrap();
        };

        // Staged, then a crash before the rotation was recorded: dropped.
        stage();
        recover_staged_ca(&ca_cert, &key, None).unwrap();
        assert!(!next(&key).exists() && !next(&ca_cert).exists());
        assert_eq!(
            CertificateAuthority::load(&ca_cert, &key).unwrap().name(),
            old.name()
        );

        // Recorded, then a crash before (or after) the bundle was written:
        // completed, both trusted, the new one signing.
        stage();
        recover_staged_ca(&ca_cert, &key, Some(&rotation(&new.name()))).unwrap();
        assert!(!next(&key).exists() && !next(&ca_cert).exists());
        let signer = CertificateAuthority::load(&ca_cert, &key).unwrap();
        assert_eq!(signer.name(), new.name());
        assert_eq!(split_certs(&read(&ca_cert).unwrap()).len(), 2);

        // Installing twice adds nothing twice.
        write(&next(&key), &new.key_pem(), 0o600).unwrap();
        write(&next(&ca_cert), new.cert_pem(), 0o644).unwrap();
        install_staged_ca(&ca_cert, &key).unwrap();
        assert_eq!(split_certs(&read(&ca_cert).unwrap()).len(), 2);
    }
}
