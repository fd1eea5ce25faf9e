//! Reading a release as the coordinator sends it (`cutover.v1.Release`):
//! the checks and defaults the agent applies before acting on it.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use cutover_common::rules;
use cutover_proto::v1 as pb;
use nix::sys::signal::Signal;

use crate::checks::{Check, Probe};
use crate::runtime::docker::ContainerSpec;
use crate::services::ServiceError;

/// A release's container settings, checked: the image must be pinned by
/// digest, so every node runs the same bytes whatever a tag says now.
pub(crate) fn container_spec(
    container: &pb::Container,
    service: &str,
) -> Result<ContainerSpec, ServiceError> {
    let pinned = container
        .image
        .split_once("@sha256:")
        .is_some_and(|(repo, hex)| {
            !repo.is_empty() && hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
    if !pinned {
        return Err(ServiceError::Invalid(format!(
            "image {:?} is not pinned: expected REPO@sha256:<64 hex digits>",
            container.image
        )));
    }
    let host_network = match container.network.as_str() {
        "" | "bridge" => false,
        "host" => true,
        other => {
            return Err(ServiceError::Invalid(format!(
                "container network {other:?}: expected \"bridge\" or \"host\""
            )))
        }
    };
    if !(container.cpus >= 0.0 && container.cpus.is_finite()) {
        return Err(ServiceError::Invalid(format!(
            "container cpus {}: expected a positive number",
            container.cpus
        )));
    }
    Ok(ContainerSpec {
        image: container.image.clone(),
        host_network,
        memory_bytes: container.memory_bytes,
        cpus: container.cpus,
        init: container.init,
        service: service.to_string(),
    })
}

/// Release ids name directories: keep them to safe file names.
pub(crate) fn validate_release_id(id: &str) -> Result<(), ServiceError> {
    rules::release_id(id).map_err(invalid)
}

/// A rule's refusal as a refused release.
fn invalid(error: rules::RuleError) -> ServiceError {
    ServiceError::Invalid(error.message)
}

pub(crate) fn millis(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

pub(crate) fn check_from(check: &pb::Check, what: &str) -> Result<Check, ServiceError> {
    let probe = match &check.probe {
        Some(pb::check::Probe::Http(http)) => {
            if !http.path.starts_with('/') {
                return Err(ServiceError::Invalid(format!(
                    "{what}: http path {:?} must start with /",
                    http.path
                )));
            }
            let (min, max) = rules::status_range(
                http.status_min,
                http.status_max,
                rules::DEFAULT_HEALTH_STATUS,
            )
            .map_err(|e| ServiceError::Invalid(format!("{what}: {e}")))?;
            Probe::Http {
                path: http.path.clone(),
                expect_status: min..=max,
                body_contains: Some(http.body_contains.clone()).filter(|b| !b.is_empty()),
            }
        }
        Some(pb::check::Probe::Tcp(_)) => Probe::Tcp,
        Some(pb::check::Probe::Exec(exec)) if !exec.command.is_empty() => Probe::Exec {
            command: exec.command.clone(),
        },
        Some(pb::check::Probe::Exec(_)) => {
            return Err(ServiceError::Invalid(format!(
                "{what}: exec check without a command"
            )))
        }
        None => return Err(ServiceError::Invalid(format!("{what}: no probe"))),
    };
    Ok(Check {
        probe,
        timeout: millis(check.timeout_ms, Duration::from_secs(2)),
    })
}

/// Where the proxy of a service listens: ":8080" means the node's address.
pub(crate) fn listen_addr(listen: &str, address: IpAddr) -> Result<SocketAddr, ServiceError> {
    if let Some(port) = listen.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| ServiceError::Invalid(format!("listen {listen:?}: bad port")))?;
        return Ok(SocketAddr::new(address, port));
    }
    listen.parse().map_err(|_| {
        ServiceError::Invalid(format!(
            "listen {listen:?}: expected \":PORT\" or \"IP:PORT\""
        ))
    })
}

/// What a release runs as: exactly one of a web service or a worker.
pub(crate) enum ReleaseKind<'a> {
    Web(&'a pb::WebService),
    Worker(&'a pb::Worker),
}

impl<'a> ReleaseKind<'a> {
    pub(crate) fn of(release: &'a pb::Release) -> Result<Self, ServiceError> {
        match (&release.web, &release.worker) {
            (Some(web), None) => Ok(ReleaseKind::Web(web)),
            (None, Some(worker)) => Ok(ReleaseKind::Worker(worker)),
            _ => Err(ServiceError::Invalid(
                "a release is either `web` or `worker`, exactly one".into(),
            )),
        }
    }
}

/// The signal a release stops with, as the coordinator sent it (empty:
/// none chosen) or, failing that, as its image's `STOPSIGNAL` names it.
/// An unknown signal is refused, naming it: never replaced by another.
pub(crate) fn stop_signal(text: &str, source: &str) -> Result<Signal, ServiceError> {
    let name =
        rules::stop_signal(text).map_err(|e| ServiceError::Invalid(format!("{source}: {e}")))?;
    Signal::from_str(name).map_err(|_| {
        ServiceError::Invalid(format!(
            "{source}: {name} is not a signal on this system; set another stop_signal in the service's spec"
        ))
    })
}

/// Exec checks run on the node: a release in a container cannot have one.
pub(crate) fn exec_checks_allowed<'a>(
    in_container: bool,
    mut checks: impl Iterator<Item = &'a Check>,
) -> Result<(), ServiceError> {
    if checks.any(|check| matches!(check.probe, Probe::Exec { .. })) {
        rules::exec_check(in_container).map_err(invalid)?;
    }
    Ok(())
}

/// Secrets become the release's environment variables of the same name.
pub(crate) fn validate_secret_names<'a>(
    mut names: impl Iterator<Item = &'a String>,
) -> Result<(), ServiceError> {
    names.try_for_each(|name| {
        rules::env_var_name(name).map_err(|e| ServiceError::Invalid(format!("secret {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_stop_signals_are_read_in_every_spelling() {
        let image = "image STOPSIGNAL";
        assert_eq!(stop_signal("SIGQUIT", image).ok(), Some(Signal::SIGQUIT));
        assert_eq!(stop_signal("quit", image).ok(), Some(Signal::SIGQUIT));
        assert_eq!(stop_signal("15", image).ok(), Some(Signal::SIGTERM));
        let Err(ServiceError::Invalid(message)) = stop_signal("SIGNOPE", image) else {
            panic!("an unknown signal is refused");
        };
        assert!(message.contains("\"SIGNOPE\""), "{message}");
    }
}
