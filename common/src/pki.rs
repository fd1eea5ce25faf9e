//! The cutover PKI: one CA per installation that signs the coordinator's server
//! certificate and a client certificate per agent and per operator.
//!
//! Layout of a PKI dir: `ca.crt`, `ca.key` (0600), `coordinator.crt`,
//! `coordinator.key`, and issued pairs named `<role>-<name>.crt/.key`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::fsutil::{explain_io, write_atomic};
use crate::identity::{Identity, IdentityError, Role};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Issued certificates start this long in the past, for clocks a little
/// behind ours; a certificate's span is its lifetime plus this.
pub const BACKDATE_SECS: i64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("a CA already exists at {0}: keep using it, or choose another --dir")]
    AlreadyExists(PathBuf),
    #[error("{}", no_ca(.dir, .source))]
    NoCa {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {}", .path.display(), explain_io(.path, .source))]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("invalid subject alternative name {0:?}")]
    BadSan(String),
    #[error("cannot read the CA key {}: {}", .path.display(), no_ca_key(.source, .path))]
    NoCaKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid certificate signing request: {0}")]
    BadRequest(String),
    #[error("no certificate in {cert} is the CA of the key {key}; check `tls.ca_cert` and `ca_key` name the same installation's files")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

fn no_ca(dir: &Path, source: &std::io::Error) -> String {
    match source.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no CA at {}: create one with `cutover ca init --dir {}` or pass the right --dir ({source})",
            dir.display(),
            dir.display()
        ),
        _ => format!(
            "cannot read the CA at {}: {}",
            dir.display(),
            explain_io(dir, source)
        ),
    }
}

fn no_ca_key(source: &std::io::Error, path: &Path) -> String {
    match source.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{source}; set `ca_key` to the installation's ca.key (from `cutover ca init`)")
        }
        _ => explain_io(path, source),
    }
}

/// A key pair made where it will be used and a request for a certificate
/// of `identity` on it: the private key never leaves this process's files.
pub fn certificate_request(identity: &Identity) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.to_string());
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct IssuedPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl IssuedPair {
    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` (0600) and returns
    /// their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_atomic(&key, self.key_pem.as_bytes(), 0o600).map_err(|source| PkiError::Write {
            path: key.clone(),
            source,
        })?;
        write_atomic(&cert, self.cert_pem.as_bytes(), 0o644).map_err(|source| PkiError::Write {
            path: cert.clone(),
            source,
        })?;
        Ok((cert, key))
    }

    /// Puts this pair in place of the one at `cert` and `key` so that a crash
    /// at any moment leaves a matching pair once `finish_pair_swap` ran: the
    /// new pair is staged beside the old one, then the key is swapped in
    /// first.
    pub fn replace(&self, cert: &Path, key: &Path) -> Result<(), PkiError> {
        let (cert_new, key_new) = (staged(cert), staged(key));
        let write = |path: &Path, text: &str, mode: u32| {
            write_atomic(path, text.as_bytes(), mode).map_err(|source| PkiError::Write {
                path: path.to_path_buf(),
                source,
            })
        };
        let rename = |from: &Path, to: &Path| {
            std::fs::rename(from, to).map_err(|source| PkiError::Write {
                path: to.to_path_buf(),
                source,
            })
        };
        // The staged key first: a staged certificate alone then always
        // means the key was already swapped in (see `finish_pair_swap`).
        write(&key_new, &self.key_pem, 0o600)?;
        write(&cert_new, &self.cert_pem, 0o644)?;
        rename(&key_new, key)?;
        rename(&cert_new, cert)
    }
}

/// `<path>.new`: where a pair is staged before it replaces the old one.
fn staged(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Finishes (or undoes) a `IssuedPair::replace` a crash interrupted, before
/// the pair is loaded: a staged certificate whose key is already in place
/// completes the swap; a staged pair means nothing was swapped yet and is
/// dropped.
pub fn finish_pair_swap(cert: &Path, key: &Path) {
    let (cert_new, key_new) = (staged(cert), staged(key));
    match (cert_new.exists(), key_new.exists()) {
        (true, false) => match std::fs::rename(&cert_new, cert) {
            Ok(()) => {
                tracing::warn!(cert = %cert.display(), "completed a certificate swap an earlier run left halfway")
            }
            Err(error) => {
                tracing::error!(%error, cert = %cert.display(), "cannot complete an interrupted certificate swap")
            }
        },
        (true, true) | (false, true) => {
            let _ = std::fs::remove_file(&cert_new);
            let _ = std::fs::remove_file(&key_new);
        }
        (false, false) => {}
    }
}

/// Each certificate of a PEM bundle, as its own PEM block.
pub fn split_certs(bundle: &str) -> Vec<String> {
    rustls_pemfile::certs(&mut bundle.as_bytes())
        .filter_map(Result::ok)
        .map(|der| der_to_pem(&der))
        .collect()
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// Creates a new CA in memory. `name` goes into its common name.
    pub fn generate(name: &str, validity_days: i64) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cutover CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(validity_days);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A new CA with a random label, valid ten years: what `ca init` and a
    /// CA rotation make.
    pub fn generate_fresh() -> Result<Self, PkiError> {
        Self::generate(&random_label(), 3650)
    }

    /// Creates a CA and the coordinator's certificate in `dir`; refuses to
    /// overwrite an existing CA, since that would orphan every issued
    /// certificate.
    pub fn init_dir(dir: &Path, coordinator_sans: &[String]) -> Result<Self, PkiError> {
        let ca_cert = dir.join(CA_CERT);
        if ca_cert.exists() {
            return Err(PkiError::AlreadyExists(ca_cert));
        }
        let ca = Self::generate_fresh()?;
        ca.issue_server(coordinator_sans, 825)?
            .write(dir, "coordinator")?;
        // The CA key goes last: its presence marks a complete PKI dir.
        IssuedPair {
            cert_pem: ca.cert_pem.clone(),
            key_pem: ca.key_pem(),
        }
        .write(dir, "ca")?;
        Ok(ca)
    }

    pub fn load_dir(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|source| PkiError::NoCa {
                dir: dir.to_path_buf(),
                source,
            })
        };
        Self::from_bundle(&read(CA_CERT)?, &read(CA_KEY)?)?.ok_or(PkiError::KeyMismatch {
            cert: dir.join(CA_CERT),
            key: dir.join(CA_KEY),
        })
    }

    /// The CA from its certificate and key files (a coordinator that signs
    /// certificates for operators and joining agents). During a CA rotation
    /// the certificate file is a bundle of the old and the new CA; the one
    /// whose public key is the key's is the signer.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(|source| PkiError::NoCa {
            dir: cert.to_path_buf(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(key).map_err(|source| PkiError::NoCaKey {
            path: key.to_path_buf(),
            source,
        })?;
        Self::from_bundle(&cert_pem, &key_pem)?.ok_or(PkiError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// The CA of `key_pem` among the certificates of `bundle`, if there.
    pub fn from_bundle(bundle: &str, key_pem: &str) -> Result<Option<Self>, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let public = key.subject_public_key_info();
        let found = rustls_pemfile::certs(&mut bundle.as_bytes())
            .filter_map(Result::ok)
            .find(|der| {
                x509_parser::parse_x509_certificate(der)
                    .is_ok_and(|(_, cert)| cert.public_key().raw == public.as_slice())
            });
        let Some(der) = found else {
            return Ok(None);
        };
        let cert_pem = der_to_pem(&der);
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Some(Self { issuer, cert_pem }))
    }

    /// The PEM of this CA's certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The PEM of the private key; only for writing it to its file.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Its common name, "cutover CA <label>": how certificates name their
    /// issuer.
    pub fn name(&self) -> String {
        self.facts().map(|f| f.subject).unwrap_or_default()
    }

    /// `sha256:<hex>` of its certificate: what join tokens pin.
    pub fn fingerprint(&self) -> String {
        crate::tls::fingerprint(&self.der())
    }

    fn der(&self) -> Vec<u8> {
        rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .map(|der| der.to_vec())
            .unwrap_or_default()
    }

    fn facts(&self) -> Option<crate::identity::CertificateFacts> {
        crate::identity::certificate_facts(&self.der()).ok()
    }

    /// The coordinator's server certificate. It always covers `localhost`,
    /// 127.0.0.1 and ::1 so local clusters work; `sans` adds the DNS names and
    /// IPs agents will dial.
    pub fn issue_server(
        &self,
        sans: &[String],
        validity_days: i64,
    ) -> Result<IssuedPair, PkiError> {
        let identity = Identity::new(Role::Coordinator, "coordinator")?;
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        names.extend(sans.iter().cloned());
        names.sort();
        names.dedup();
        let mut extra = Vec::new();
        for name in names {
            extra.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.as_str()
                        .try_into()
                        .map_err(|_| PkiError::BadSan(name.clone()))?,
                ),
            });
        }
        self.issue_with(&identity, extra, true, days(validity_days))
    }

    /// A client certificate for an agent or an operator.
    pub fn issue_client(
        &self,
        identity: &Identity,
        validity_days: i64,
    ) -> Result<IssuedPair, PkiError> {
        self.issue_client_for(identity, days(validity_days))
    }

    /// A client certificate that lives `lifetime` (tests of renewal use
    /// seconds, not days).
    pub fn issue_client_for(
        &self,
        identity: &Identity,
        lifetime: std::time::Duration,
    ) -> Result<IssuedPair, PkiError> {
        self.issue_with(identity, Vec::new(), false, lifetime)
    }

    /// A client certificate for `identity` on the public key of a signing
    /// request; the request's own subject and extensions are ignored, the
    /// identity is the caller's to decide.
    pub fn sign_request(
        &self,
        identity: &Identity,
        csr_pem: &str,
        lifetime: std::time::Duration,
    ) -> Result<String, PkiError> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadRequest(e.to_string()))?;
        self.sign(identity, &request.public_key, Vec::new(), false, lifetime)
    }

    fn issue_with(
        &self,
        identity: &Identity,
        sans: Vec<SanType>,
        server: bool,
        lifetime: std::time::Duration,
    ) -> Result<IssuedPair, PkiError> {
        let key = KeyPair::generate()?;
        Ok(IssuedPair {
            cert_pem: self.sign(identity, &key, sans, server, lifetime)?,
            key_pem: key.serialize_pem(),
        })
    }

    fn sign(
        &self,
        identity: &Identity,
        public_key: &impl PublicKeyData,
        mut sans: Vec<SanType>,
        server: bool,
        lifetime: std::time::Duration,
    ) -> Result<String, PkiError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_string());
        sans.push(SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|_| PkiError::BadSan(identity.uri()))?,
        ));
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::seconds(BACKDATE_SECS);
        params.not_after = now + lifetime;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }
}

fn days(count: i64) -> std::time::Duration {
    std::time::Duration::from_secs(count.max(0) as u64 * 86_400)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn random_label() -> String {
    let bytes: [u8; 4] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certificate_facts;

    #[test]
    fn a_pair_swap_cut_short_is_completed_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        std::fs::write(&cert, "old cert").unwrap();
        std::fs::write(&key, "old key").unwrap();

        // Cut before any swap: the staged pair goes, the old pair stays.
        std::fs::write(staged(&cert), "new cert").unwrap();
        std::fs::write(staged(&key), "new key").unwrap();
        finish_pair_swap(&cert, &key);
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "old cert");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "old key");
        assert!(!staged(&cert).exists() && !staged(&key).exists());

        // Cut between the swaps: the key is new, so the certificate follows.
        std::fs::write(&key, "new key").unwrap();
        std::fs::write(staged(&cert), "new cert").unwrap();
        finish_pair_swap(&cert, &key);
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), "new cert");
        assert!(!staged(&cert).exists());

        // A whole replace leaves no staged file.
        IssuedPair {
            cert_pem: "third cert".into(),
            key_pem: "third key".into(),
        }
        .replace(&cert, &key)
        .unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "third key");
        assert!(!staged(&cert).exists() && !staged(&key).exists());
    }

    #[test]
    fn the_signer_is_found_in_a_bundle() {
        let old = CertificateAuthority::generate_fresh().unwrap();
        let new = CertificateAuthority::generate_fresh().unwrap();
        let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
        let found = CertificateAuthority::from_bundle(&bundle, &new.key_pem())
            .unwrap()
            .unwrap();
        assert_eq!(found.name(), new.name());
        assert_ne!(found.name(), old.name());
        assert_eq!(split_certs(&bundle).len(), 2);
        let other = CertificateAuthority::generate_fresh().unwrap();
        assert!(CertificateAuthority::from_bundle(&bundle, &other.key_pem())
            .unwrap()
            .is_none());
    }

    #[test]
    fn init_issue_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::init_dir(dir.path(), &["coord.example".into()]).unwrap();
        assert!(matches!(
            CertificateAuthority::init_dir(dir.path(), &[]),
            Err(PkiError::AlreadyExists(_))
        ));
        let reloaded = CertificateAuthority::load_dir(dir.path()).unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());

        let agent = Identity::new(Role::Agent, "web-1").unwrap();
        let pair = reloaded.issue_client(&agent, 30).unwrap();
        let der = rustls_pemfile::certs(&mut pair.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let facts = certificate_facts(&der).unwrap();
        assert_eq!(facts.identity, Some(agent));
        assert!(!facts.serial.is_empty());

        // A request made elsewhere: the certificate carries the identity the
        // CA chose, on the request's key.
        let (csr, key_pem) =
            certificate_request(&Identity::new(Role::Operator, "mallory").unwrap()).unwrap();
        let alice = Identity::new(Role::Operator, "alice").unwrap();
        let cert_pem = reloaded
            .sign_request(&alice, &csr, std::time::Duration::from_secs(86_400))
            .unwrap();
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(certificate_facts(&der).unwrap().identity, Some(alice));
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let x509 = x509_parser::parse_x509_certificate(&der).unwrap().1;
        assert_eq!(
            x509.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert!(matches!(
            reloaded.sign_request(
                &Identity::new(Role::Operator, "bob").unwrap(),
                "not a request",
                std::time::Duration::from_secs(60)
            ),
            Err(PkiError::BadRequest(_))
        ));

        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
