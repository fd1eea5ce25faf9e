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

use crate::fsutil::write_atomic;
use crate::identity::{Identity, IdentityError, Role};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("a CA already exists at {0}: keep using it, or choose another --dir")]
    AlreadyExists(PathBuf),
    #[error("no CA at {dir}: create one with `cutover ca init --dir {dir}` or pass the right --dir ({source})")]
    NoCa {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
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
    #[error("cannot read the CA key {path}: {source}; set `ca_key` to the installation's ca.key (from `cutover ca init`)")]
    NoCaKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid certificate signing request: {0}")]
    BadRequest(String),
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

    /// Creates a CA and the coordinator's certificate in `dir`; refuses to
    /// overwrite an existing CA, since that would orphan every issued
    /// certificate.
    pub fn init_dir(dir: &Path, coordinator_sans: &[String]) -> Result<Self, PkiError> {
        let ca_cert = dir.join(CA_CERT);
        if ca_cert.exists() {
            return Err(PkiError::AlreadyExists(ca_cert));
        }
        let ca = Self::generate(&random_label(), 3650)?;
        ca.issue_server(coordinator_sans, 825)?
            .write(dir, "coordinator")?;
        // The CA key goes last: its presence marks a complete PKI dir.
        IssuedPair {
            cert_pem: ca.cert_pem.clone(),
            key_pem: ca.issuer.key().serialize_pem(),
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
        let cert_pem = read(CA_CERT)?;
        let key = KeyPair::from_pem(&read(CA_KEY)?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { issuer, cert_pem })
    }

    /// The CA from its certificate and key files (a coordinator that signs
    /// certificates for operators and joining agents).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(|source| PkiError::NoCa {
            dir: cert.to_path_buf(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(key).map_err(|source| PkiError::NoCaKey {
            path: key.to_path_buf(),
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, KeyPair::from_pem(&key_pem)?)?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
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
        params.not_before = now - Duration::minutes(5);
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
