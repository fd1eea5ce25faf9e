//! A release as a service runs it, and what the runtime and the checks are
//! given to run and reach it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::ServiceSettings;
use crate::checks::{Check, HealthGate, Target};
use crate::runtime::docker::ContainerSpec;
use crate::runtime::supervisor::{ContainerLaunch, ProcessSpec, SecretSlot};
use cutover_common::release::ActivateHook;

/// A release of a service (web or worker), unpacked and ready to start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WebRelease {
    pub release_id: String,
    pub command: Vec<String>,
    /// The unpacked release dir; the command runs there.
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Web services always have one; a worker may not.
    pub health: Option<Check>,
    pub gate: HealthGate,
    pub smoke: Vec<Check>,
    #[serde(with = "signal_name")]
    pub stop_signal: Signal,
    pub stop_grace: Duration,
    /// A new release must stay up this long without a crash before it
    /// counts as healthy (workers).
    #[serde(default)]
    pub min_healthy_time: Duration,
    #[serde(default)]
    pub stop_command: Vec<String>,
    #[serde(default)]
    pub stop_timeout: Duration,
    /// How long requests in flight to the release this one replaces may
    /// finish (and, once this one is replaced or stopped, requests to it).
    /// Each release carries its own: the operator's choice for the release
    /// being deployed governs its cutover.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// Set for a docker release: run as a container of this image.
    #[serde(default)]
    pub container: Option<ContainerSpec>,
    /// The names of the secrets the release gets (stored), and their values
    /// (in memory only: never serialized, never printed; pending in a
    /// release read back from the store until the coordinator sends them
    /// again).
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(skip)]
    pub secret_values: SecretSlot,
    /// Run around its start (`service::hooks`).
    #[serde(default)]
    pub hooks: Vec<ActivateHook>,
    /// The CUTOVER_* variables its hooks get from the command that
    /// activates it.
    #[serde(default)]
    pub hook_env: Vec<(String, String)>,
    /// Queue depth and worker health to probe while it serves.
    #[serde(default)]
    pub queues: Option<cutover_common::queues::QueueProbeSpec>,
    /// How many processes of it run (`cutover scale`), each on a port of
    /// its own; releases recorded before had one.
    #[serde(default = "one_instance")]
    pub instances: u32,
}

fn one_instance() -> u32 {
    1
}

/// Also the drain timeout of releases recorded before releases carried
/// their own.
pub use cutover_common::release::DEFAULT_DRAIN_TIMEOUT;

fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}

/// Signals by name ("SIGTERM") in stored records.
mod signal_name {
    use std::str::FromStr;

    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(signal.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(d)?;
        Signal::from_str(&name)
            .map_err(|_| serde::de::Error::custom(format!("unknown signal {name:?}")))
    }
}

pub(super) fn process_spec(
    settings: &ServiceSettings,
    release: &WebRelease,
    port: u16,
) -> ProcessSpec {
    let mut env = release_env(settings, release, port);
    // A process on this host, which a restarted agent must find (a
    // container is found by its labels instead).
    if release.container.is_none() {
        env.extend(settings.owner.labels());
    }
    ProcessSpec {
        name: release.release_id.clone(),
        command: release.command.clone(),
        workdir: release.workdir.clone(),
        env,
        stop_signal: release.stop_signal,
        stop_grace: release.stop_grace,
        stop_command: release.stop_command.clone(),
        stop_timeout: release.stop_timeout,
        log_dir: settings.log_root.join(&release.release_id),
        log_max_bytes: settings.log_max_bytes,
        log_keep: settings.log_keep,
        restart_min: Duration::from_secs(1),
        restart_max: Duration::from_secs(30),
        container: release.container.clone().map(|spec| ContainerLaunch {
            engine: settings.docker.clone(),
            spec,
            address: settings.address,
            port,
        }),
        secrets: if release.secrets.is_empty() {
            SecretSlot::ready(Vec::new())
        } else {
            release.secret_values.clone()
        },
    }
}

/// Where checks reach a release, and the environment exec checks run with
/// (the release's, its secrets included once known).
pub(super) fn check_target(settings: &ServiceSettings, release: &WebRelease, port: u16) -> Target {
    let mut env = release_env(settings, release, port);
    env.extend(release.secret_values.values().unwrap_or_default());
    Target {
        addr: SocketAddr::new(settings.address, port),
        workdir: release.workdir.clone(),
        env,
    }
}

/// The release environment plus where to listen (port 0: a worker, which
/// listens nowhere).
fn release_env(
    settings: &ServiceSettings,
    release: &WebRelease,
    port: u16,
) -> Vec<(String, String)> {
    let mut env = release.env.clone();
    env.push(("HOST".into(), settings.address.to_string()));
    if port != 0 {
        env.push(("PORT".into(), port.to_string()));
    }
    env
}
