//! `coordinator.toml`: every option, its default and why. The commented
//! example is `deploy/config/coordinator.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_common::config::{self, ConfigError};
use cutover_common::telemetry::LogFormat;
use cutover_common::tls::TlsFiles;
use serde::Deserialize;

/// Environment variables with this prefix override file keys.
pub const ENV_PREFIX: &str = "CUTOVER_SERVER_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where the store lives (with `store = "etcd"`: the artifacts only).
    pub data_dir: PathBuf,
    /// Where the coordinator's state is kept: `sled`, embedded in
    /// `data_dir/store` (one coordinator), or `etcd`, on the cluster of the
    /// `[etcd]` section (coordinators that outlive their machine).
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub etcd: Option<EtcdSettings>,
    /// gRPC (mTLS) for agents and operators.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain HTTP for `/metrics` and `/healthz`; loopback by default because
    /// it carries no authentication.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    pub tls: TlsFiles,
    /// How often agents send heartbeats.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A node with no heartbeat for this long is `unreachable`.
    #[serde(default = "default_heartbeat_ttl", with = "humantime_serde")]
    pub heartbeat_ttl: Duration,
    /// How long a shutdown waits for connections to finish before it cuts them.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub limits: Limits,
    /// Logins for private registries, used to resolve image tags to digests
    /// at deploy time (agents have their own, to pull).
    #[serde(default)]
    pub registries: Vec<cutover_common::registry::RegistryLogin>,
    /// A PEM CA trusted for registries besides the public web roots.
    #[serde(default)]
    pub registry_ca: Option<PathBuf>,
    /// The CA's private key (`ca.key` from `cutover ca init`), to sign
    /// certificates for operators created with `cutover operator create`.
    /// Without it the coordinator signs nothing.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// The master key file that seals secrets at rest (`cutover ca init`
    /// creates `master.key` beside the CA). Without it secrets cannot be
    /// set or deployed.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// Lifetime of the certificates agents get when they renew theirs (at
    /// two thirds of its life, over their connection). Needs `ca_key`.
    #[serde(default = "default_agent_cert_lifetime", with = "humantime_serde")]
    pub agent_cert_lifetime: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sled,
    Etcd,
}

/// The `[etcd]` section: the cluster the store lives on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// The client URLs of the cluster's members (`https://HOST:2379`); a
    /// call goes to another member when one cannot be reached.
    pub endpoints: Vec<String>,
    /// Every key of this installation starts with it, so several can share
    /// one cluster.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// The CA of etcd's certificates and the coordinator's client
    /// certificate for etcd (`--client-cert-auth`): etcd is reached over
    /// mTLS only.
    pub tls: TlsFiles,
    /// The name checked against the members' certificates (default: each
    /// endpoint's host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// How long one call may wait for an answer: without a quorum etcd
    /// keeps a request waiting.
    #[serde(default = "default_etcd_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "default_etcd_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The URL agents and operators reach this coordinator at, recorded as
    /// the leader's address while it leads (default: its host name and
    /// `listen` port).
    #[serde(default)]
    pub advertise: Option<String>,
}

fn default_etcd_prefix() -> String {
    "cutover/".into()
}
fn default_etcd_request_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_etcd_connect_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_agent_cert_lifetime() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest gRPC message accepted or sent.
    #[serde(
        default = "default_max_message",
        deserialize_with = "config::byte_size::deserialize"
    )]
    pub max_message_bytes: usize,
    /// Commands queued per agent stream before senders are pushed back.
    #[serde(default = "default_agent_queue")]
    pub agent_queue: usize,
    /// Time an agent has after connecting to send its hello.
    #[serde(default = "default_hello_timeout", with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// HTTP/2 ping interval on every connection; dead peers are dropped after
    /// `keepalive_timeout` more without an answer.
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Events kept in the event log; older ones are deleted.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Entries kept in the audit log; older ones are deleted (a year of a
    /// busy installation's calls; refusals are rate-limited).
    #[serde(default = "default_max_audit_entries")]
    pub max_audit_entries: usize,
    /// Largest artifact `cutover artifact push` accepts.
    #[serde(
        default = "default_max_artifact",
        deserialize_with = "config::byte_size::deserialize"
    )]
    pub max_artifact_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message(),
            agent_queue: default_agent_queue(),
            hello_timeout: default_hello_timeout(),
            keepalive_interval: default_keepalive_interval(),
            keepalive_timeout: default_keepalive_timeout(),
            max_artifact_bytes: default_max_artifact(),
            max_events: default_max_events(),
            max_audit_entries: default_max_audit_entries(),
        }
    }
}

fn default_max_events() -> usize {
    100_000
}
fn default_max_audit_entries() -> usize {
    1_000_000
}
fn default_max_artifact() -> usize {
    2 << 30
}
fn default_listen() -> SocketAddr {
    "0.0.0.0:7443".parse().expect("valid default")
}
fn default_http_listen() -> SocketAddr {
    "127.0.0.1:7480".parse().expect("valid default")
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat_ttl() -> Duration {
    Duration::from_secs(15)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_max_message() -> usize {
    4 << 20
}
fn default_agent_queue() -> usize {
    64
}
fn default_hello_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(5)
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = config::load(Some(path), ENV_PREFIX)?;
        config.validate(&format!("config file {}", path.display()))?;
        Ok(config)
    }

    /// Checks that hold between keys, which serde cannot see.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        if self.heartbeat_interval.is_zero() {
            return Err(invalid("heartbeat_interval", "must be above zero".into()));
        }
        if self.heartbeat_ttl < self.heartbeat_interval * 2 {
            return Err(invalid(
                "heartbeat_ttl",
                format!(
                    "{} is less than twice heartbeat_interval ({}): one late heartbeat would mark nodes unreachable",
                    humantime::format_duration(self.heartbeat_ttl),
                    humantime::format_duration(self.heartbeat_interval)
                ),
            ));
        }
        match (&self.store, &self.etcd) {
            (StoreKind::Etcd, None) => {
                return Err(invalid(
                    "etcd",
                    "store = \"etcd\" needs an [etcd] section with the cluster's endpoints and tls files".into(),
                ))
            }
            (StoreKind::Sled, Some(_)) => {
                return Err(invalid(
                    "store",
                    "an [etcd] section is set but store is \"sled\": set store = \"etcd\" to use it, or remove the section".into(),
                ))
            }
            _ => {}
        }
        if let Some(etcd) = &self.etcd {
            if etcd.endpoints.is_empty() {
                return Err(invalid(
                    "etcd.endpoints",
                    "lists no member: give the client URLs, e.g. [\"https://10.0.0.5:2379\"]"
                        .into(),
                ));
            }
            if let Some(bad) = etcd.endpoints.iter().find(|e| !e.starts_with("https://")) {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("{bad:?} is not https://HOST:PORT: etcd is reached over mTLS only"),
                ));
            }
            if etcd.prefix.is_empty() {
                return Err(invalid(
                    "etcd.prefix",
                    "is empty: the store would mix with every other key of the cluster; use e.g. \"cutover/\"".into(),
                ));
            }
            if etcd.request_timeout.is_zero() {
                return Err(invalid("etcd.request_timeout", "must be above zero".into()));
            }
        }
        if self.limits.agent_queue == 0 {
            return Err(invalid("limits.agent_queue", "must be at least 1".into()));
        }
        if self.limits.max_message_bytes < 64 << 10 {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be at least 64KiB".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<CoordinatorConfig, ConfigError> {
        let text = format!(
            "data_dir = \"/var/lib/cutover\"\n\
             tls = {{ ca_cert = \"ca.crt\", cert = \"c.crt\", key = \"c.key\" }}\n{extra}"
        );
        let config: CoordinatorConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                origin: "test".into(),
                key: String::new(),
                message: e.to_string(),
            })?;
        config.validate("test").map(|()| config)
    }

    const ETCD: &str = "[etcd]\n\
        endpoints = [\"https://10.0.0.5:2379\"]\n\
        tls = { ca_cert = \"e.crt\", cert = \"e.crt\", key = \"e.key\" }\n";

    #[test]
    fn the_store_is_sled_unless_etcd_is_chosen_with_its_section() {
        assert_eq!(parse("").unwrap().store, StoreKind::Sled);
        let etcd = parse(&format!("store = \"etcd\"\n{ETCD}")).unwrap();
        assert_eq!(etcd.store, StoreKind::Etcd);
        let settings = etcd.etcd.unwrap();
        assert_eq!(settings.prefix, "cutover/");
        assert_eq!(settings.request_timeout, Duration::from_secs(5));

        let refused = |extra: &str, key: &str| {
            let error = parse(extra).unwrap_err().to_string();
            assert!(error.contains(key), "{extra}: {error}");
        };
        refused("store = \"etcd\"\n", "[etcd] section");
        refused(ETCD, "set store = \"etcd\"");
        refused(
            &format!("store = \"etcd\"\n{}", ETCD.replace("https", "http")),
            "mTLS only",
        );
        refused(
            &format!("store = \"etcd\"\n{ETCD}prefix = \"\"\n"),
            "etcd.prefix",
        );
    }
}
