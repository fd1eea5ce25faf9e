//! `agent.toml`. The commented example is `deploy/config/agent.toml`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_common::config::{self, ConfigError};
use cutover_common::telemetry::LogFormat;
use cutover_common::tls::{CoordinatorUrl, TlsFiles};
use serde::Deserialize;

use crate::proxy::headers::{default_trusted_networks, Network};

/// Environment variables with this prefix override file keys.
pub const ENV_PREFIX: &str = "CUTOVER_AGENT_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `https://host:port` of the coordinator; several, comma-separated,
    /// when coordinators run on etcd (the agent moves on to the next when
    /// a session ends or cannot open).
    pub coordinator: String,
    /// Name expected in the coordinator's certificate; default the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Node id, command journal and (later) releases live here.
    pub state_dir: PathBuf,
    /// The node's name; must match the agent certificate. Default: hostname.
    #[serde(default)]
    pub name: Option<String>,
    /// The IP address services on this node bind to. Default: the local
    /// address of the connection to the coordinator.
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub tls: TlsFiles,
    /// Reconnect backoff: the first retry waits up to `reconnect_min`, each
    /// failure doubles the window up to `reconnect_max` (full jitter).
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    #[serde(
        default = "default_max_message",
        deserialize_with = "config::byte_size::deserialize"
    )]
    pub max_message_bytes: usize,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Ports releases listen on, on the node's address, e.g. "20000-29999".
    #[serde(default = "default_port_range", deserialize_with = "port_range")]
    pub port_range: RangeInclusive<u16>,
    /// A PEM CA trusted for https:// artifact URLs besides the public roots.
    #[serde(default)]
    pub artifact_ca: Option<PathBuf>,
    /// The only dirs `file://` artifacts may be read from (absolute paths;
    /// symlinks are resolved before the check). Default: none, so
    /// `file://` artifacts are refused: the agent could otherwise be made
    /// to copy any file it can read into its artifact cache.
    #[serde(default)]
    pub file_artifact_dirs: Vec<PathBuf>,
    /// Each release's stdout and stderr are rotated past this size.
    #[serde(
        default = "default_release_log_max",
        deserialize_with = "config::byte_size::deserialize"
    )]
    pub release_log_max_bytes: usize,
    /// Rotated copies kept per log file.
    #[serde(default = "default_release_log_files")]
    pub release_log_files: u32,
    /// Release dirs kept on disk per service for fast rollbacks, besides the
    /// active and the previous release and releases prepared but not yet
    /// activated, which are never pruned (the last for a week at most).
    #[serde(default = "default_releases_keep")]
    pub releases_keep: usize,
    /// Peers (CIDR networks) whose X-Forwarded-For/-Proto/-Host headers the
    /// node proxy keeps, i.e. where the load balancers are; from any other
    /// peer those headers are replaced. Default: loopback only.
    #[serde(default = "default_trusted_networks", deserialize_with = "networks")]
    pub proxy_trusted_networks: Vec<Network>,
    /// Threads (each a runtime of its own) that serve the node proxies'
    /// client connections. Default 0: one per core the agent may run on
    /// (its CPU affinity, as systemd's `CPUAffinity=` sets it).
    #[serde(default)]
    pub proxy_threads: usize,
    /// On shutdown, drain and stop every service instead of leaving them
    /// running for the next agent (fail static, the default). For
    /// development clusters, where stopping the agents should stop
    /// everything.
    #[serde(default)]
    pub stop_services_on_shutdown: bool,
    /// The Docker Engine socket for `runtime = "docker"` releases; default
    /// `DOCKER_HOST` if set, else `unix:///var/run/docker.sock`. Only used
    /// when such a release arrives: nodes without docker run process
    /// releases as before.
    #[serde(default = "default_docker_host")]
    pub docker_host: String,
    /// Credentials for private registries, presented when pulling images.
    #[serde(default)]
    pub registries: Vec<cutover_common::registry::RegistryLogin>,
    /// How often a session checks whether the certificate is due for
    /// renewal (at two thirds of its life).
    #[serde(default = "default_certificate_check", with = "humantime_serde")]
    pub certificate_check_interval: Duration,
}

fn default_certificate_check() -> Duration {
    Duration::from_secs(600)
}

pub fn default_docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Network>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn default_releases_keep() -> usize {
    5
}

fn default_port_range() -> RangeInclusive<u16> {
    20000..=29999
}
fn default_release_log_max() -> usize {
    16 << 20
}
fn default_release_log_files() -> u32 {
    3
}

fn port_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RangeInclusive<u16>, D::Error> {
    let text = String::deserialize(d)?;
    let parsed = text.split_once('-').and_then(|(low, high)| {
        let (low, high): (u16, u16) = (low.trim().parse().ok()?, high.trim().parse().ok()?);
        (low >= 1024 && low <= high).then_some(low..=high)
    });
    parsed.ok_or_else(|| {
        serde::de::Error::custom(format!(
            "invalid port range {text:?}: expected \"LOW-HIGH\" with 1024 <= LOW <= HIGH"
        ))
    })
}

fn default_reconnect_min() -> Duration {
    Duration::from_millis(200)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_message() -> usize {
    4 << 20
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = config::load(Some(path), ENV_PREFIX)?;
        config.validate(&format!("config file {}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        CoordinatorUrl::parse_list(&self.coordinator)
            .map_err(|e| invalid("coordinator", e.to_string()))?;
        if let Some(name) = &self.name {
            cutover_common::identity::validate_name(name)
                .map_err(|e| invalid("name", e.to_string()))?;
        }
        for (key, value) in &self.labels {
            cutover_common::rules::label(key, value)
                .map_err(|e| invalid(&format!("labels.{key}"), e.to_string()))?;
        }
        if let Some(dir) = self.file_artifact_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(invalid(
                "file_artifact_dirs",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return Err(invalid(
                "reconnect_max",
                "reconnect_min must be above zero and reconnect_max at least reconnect_min".into(),
            ));
        }
        Ok(())
    }
}
