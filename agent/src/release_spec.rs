//! Reading a release as the coordinator sends it (`cutover.v1.Release`):
//! the checks and defaults the agent applies before acting on it.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

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
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!(
            "release id {id:?} must be 1 to 128 characters from a-z, A-Z, 0-9, '.', '_', '-' and not start with '.'"
        )))
    }
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
            let (min, max) = match (http.status_min, http.status_max) {
                (0, 0) => (200, 399),
                (min, 0) => (min, min),
                (min, max) => (min, max),
            };
            let min = u16::try_from(min)
                .map_err(|_| ServiceError::Invalid(format!("{what}: bad status {min}")))?;
            let max = u16::try_from(max)
                .map_err(|_| ServiceError::Invalid(format!("{what}: bad status {max}")))?;
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

/// A signal as images name it: "SIGQUIT", "QUIT" or "3".
pub(crate) fn parse_signal(text: &str) -> Option<Signal> {
    let text = text.trim();
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number).ok();
    }
    let upper = text.to_ascii_uppercase();
    Signal::from_str(&upper)
        .or_else(|_| Signal::from_str(&format!("SIG{upper}")))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_stop_signals_are_read_in_every_spelling() {
        assert_eq!(parse_signal("SIGQUIT"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("15"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
