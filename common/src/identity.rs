//! Who is on the other end of a connection.
//!
//! Identities live in the certificate's URI SAN as
//! `spiffe://cutover/<role>/<name>`, so authorization is decided from what the
//! CA signed, never from anything the peer says about itself.

use std::fmt;

pub const TRUST_DOMAIN: &str = "cutover";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    Coordinator,
    Agent,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "coordinator" => Some(Role::Coordinator),
            "agent" => Some(Role::Agent),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("invalid name {0:?}: use 1 to {max} characters from a-z, A-Z, 0-9, '.', '_' and '-', starting with a letter or digit", max = crate::rules::NAME_MAX)]
    InvalidName(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate carries no cutover identity (no spiffe://{TRUST_DOMAIN}/<role>/<name> URI SAN)")]
    Missing,
}

impl Identity {
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self { role, name })
    }

    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}/{}", self.role, self.name)
    }

    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(&format!("spiffe://{TRUST_DOMAIN}/"))?;
        let (role, name) = rest.split_once('/')?;
        let role = Role::parse(role)?;
        validate_name(name).ok()?;
        Some(Self {
            role,
            name: name.to_string(),
        })
    }

    /// Reads the identity from a DER certificate (the leaf a peer presented).
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        certificate_facts(der).and_then(|facts| facts.identity.ok_or(IdentityError::Missing))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Node, operator and service names: safe in file names, URIs and labels
/// (the rule is [`crate::rules::is_name`]).
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    if crate::rules::is_name(name) {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_string()))
    }
}

/// What the coordinator needs to know about a presented certificate.
#[derive(Debug, Clone)]
pub struct CertificateFacts {
    pub identity: Option<Identity>,
    /// Hex serial number: the handle for revocation.
    pub serial: String,
    /// Validity, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// Common name of the issuing CA ("cutover CA <label>"): which CA a
    /// node's certificate comes from, during a CA rotation.
    pub issuer: String,
    /// Its own common name (a CA's name, for CA certificates).
    pub subject: String,
    /// DNS names and IP addresses it is valid for (server certificates).
    pub names: Vec<String>,
}

pub fn certificate_facts(der: &[u8]) -> Result<CertificateFacts, IdentityError> {
    use x509_parser::prelude::*;

    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let mut identity = None;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) if identity.is_none() => {
                    identity = Identity::from_uri(uri);
                }
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    let common_name = |name: &X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    Ok(CertificateFacts {
        identity,
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer: common_name(cert.issuer()),
        subject: common_name(cert.subject()),
        names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = Identity::new(Role::Agent, "web-1.prod").unwrap();
        assert_eq!(id.uri(), "spiffe://cutover/agent/web-1.prod");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(Identity::from_uri("spiffe://other/agent/web-1"), None);
        assert_eq!(Identity::from_uri("spiffe://cutover/root/web-1"), None);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("web-01").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-web").is_err());
        assert!(validate_name("web/1").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
    }
}
