//! `cutover-agent join`: a node without a certificate gets one with a join
//! token. The key is made here and never leaves the node; the coordinator's
//! CA is pinned by the fingerprint the operator passed, on first contact.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cutover_common::fsutil::write_atomic;
use cutover_common::identity::{certificate_facts, Identity, Role};
use cutover_common::tls::{self, ChannelOptions, CoordinatorUrl};
use cutover_proto::v1::enroll_service_client::EnrollServiceClient;
use cutover_proto::v1::JoinRequest;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot reach the coordinator at {url}: {reason}; {hint}")]
    Connect {
        url: String,
        reason: String,
        hint: &'static str,
    },
    #[error("the coordinator refused the join: {0}")]
    Refused(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

impl JoinError {
    fn connect(url: &str, reason: String) -> Self {
        // rustls: "certificate not valid for name ...".
        let hint = if reason.contains("not valid for name") {
            "the coordinator's certificate does not name the host of --coordinator: pass --server-name with a name it does hold (the coordinator's `server_sans`, or localhost)"
        } else {
            "check --coordinator, and that --ca-fingerprint is the one `cutover token create` printed"
        };
        JoinError::Connect {
            url: url.to_string(),
            reason,
            hint,
        }
    }
}

/// What a join wrote.
#[derive(Debug)]
pub struct Joined {
    pub config: PathBuf,
    pub labels: BTreeMap<String, String>,
}

/// Where a node joins and what its config says beyond the token's labels.
#[derive(Debug, Default)]
pub struct JoinTarget<'a> {
    /// https://host:port of the coordinator.
    pub coordinator: &'a str,
    /// The name to check the coordinator's certificate against when it is
    /// not the URL's host (written to agent.toml as `server_name`).
    pub server_name: Option<&'a str>,
    /// The address the node's services bind and the coordinator is told
    /// (written as `address`); default: the agent's own pick at start.
    pub address: Option<std::net::IpAddr>,
}

/// Joins node `name` with `token`, writing into `out`: `pki/ca.crt`,
/// `pki/agent-NAME.crt`, `pki/agent-NAME.key` (0600) and `agent.toml`
/// (the state dir, the token's labels, every path absolute, so the config
/// means the same whatever directory the agent starts in).
pub async fn join(
    target: &JoinTarget<'_>,
    token: &str,
    ca_fingerprint: &str,
    name: &str,
    out: &Path,
    state_dir: &Path,
) -> Result<Joined, JoinError> {
    let coordinator = target.coordinator;
    let absolute = |path: &Path, flag: &str| {
        std::path::absolute(path)
            .map_err(|e| JoinError::Invalid(format!("{flag} {}: {e}", path.display())))
    };
    let out = &absolute(out, "--out")?;
    let state_dir = &absolute(state_dir, "--state-dir")?;
    let identity = Identity::new(Role::Agent, name)
        .map_err(|e| JoinError::Invalid(format!("node name {name:?}: {e}")))?;
    let fingerprint_ok = ca_fingerprint
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !fingerprint_ok {
        return Err(JoinError::Invalid(format!(
            "--ca-fingerprint {ca_fingerprint:?}: expected sha256:<64 hex digits>, as `cutover token create` prints it"
        )));
    }
    let config_path = out.join("agent.toml");
    if config_path.exists() {
        return Err(JoinError::Invalid(format!(
            "{} exists already: this node joined before; choose another --out",
            config_path.display()
        )));
    }
    let url = CoordinatorUrl::parse(coordinator).map_err(|e| JoinError::Invalid(e.to_string()))?;
    let (csr_pem, key_pem) = cutover_common::pki::certificate_request(&identity)
        .map_err(|e| JoinError::Invalid(e.to_string()))?;
    let channel = tls::connect(
        &url,
        target.server_name,
        tls::pinned_client_config(ca_fingerprint),
        &ChannelOptions::default(),
    )
    .await
    .map_err(|e| JoinError::connect(coordinator, e.to_string()))?;
    let joined = EnrollServiceClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            name: name.to_string(),
            csr_pem,
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                JoinError::connect(coordinator, tls::root_cause(&status))
            }
            _ => JoinError::Refused(status.message().to_string()),
        })?
        .into_inner();
    let der = |pem: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| JoinError::Refused("the answer holds no certificate".into()))
    };
    if tls::fingerprint(&der(&joined.ca_cert_pem)?) != ca_fingerprint.to_ascii_lowercase() {
        return Err(JoinError::Refused(
            "the coordinator sent a CA other than the pinned one".into(),
        ));
    }
    let got = certificate_facts(&der(&joined.cert_pem)?)
        .ok()
        .and_then(|f| f.identity);
    if got.as_ref() != Some(&identity) {
        return Err(JoinError::Refused(format!(
            "the certificate is for {got:?}, not {identity}"
        )));
    }

    let pki = out.join("pki");
    let stem = format!("agent-{name}");
    let (ca, cert, key) = (
        pki.join("ca.crt"),
        pki.join(format!("{stem}.crt")),
        pki.join(format!("{stem}.key")),
    );
    let labels: BTreeMap<String, String> = joined.labels.into_iter().collect();
    let mut text = format!(
        "# written by `cutover-agent join`; deploy/config/agent.toml documents every key\n\
         coordinator = {coordinator:?}\n\
         name = {name:?}\n\
         state_dir = {:?}\n\
         [labels]\n",
        state_dir.display().to_string()
    );
    // Top-level keys, before the first table.
    let at = text.find("[labels]").expect("written above");
    let mut top = String::new();
    if let Some(server_name) = target.server_name {
        let _ = writeln!(top, "server_name = {server_name:?}");
    }
    if let Some(address) = target.address {
        let _ = writeln!(top, "address = \"{address}\"");
    }
    text.insert_str(at, &top);
    for (k, v) in &labels {
        let _ = writeln!(text, "{k:?} = {v:?}");
    }
    let _ = write!(
        text,
        "[tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n",
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    );
    let write = |path: &Path, text: &str, mode: u32| {
        std::fs::create_dir_all(path.parent().expect("files live in a dir"))
            .and_then(|()| write_atomic(path, text.as_bytes(), mode))
            .map_err(|e| JoinError::Write {
                path: path.to_path_buf(),
                reason: cutover_common::fsutil::explain_io(path, &e),
            })
    };
    write(&key, &key_pem, 0o600)?;
    write(&cert, &joined.cert_pem, 0o644)?;
    write(&ca, &joined.ca_cert_pem, 0o644)?;
    write(&config_path, &text, 0o644)?;
    Ok(Joined {
        config: config_path,
        labels,
    })
}
