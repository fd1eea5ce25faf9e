//! What only a node can add to a release checked by
//! `cutover_common::release::ReleaseSpec`: its container as the docker
//! runtime runs it, and its stop signal as this system numbers it (or, when
//! the release names none, as its image's `STOPSIGNAL` names it).

use std::str::FromStr;

use cutover_common::release::{Container, ReleaseError};
use cutover_common::rules;
use nix::sys::signal::Signal;

use crate::runtime::docker::ContainerSpec;
use crate::services::ServiceError;

impl From<ReleaseError> for ServiceError {
    fn from(error: ReleaseError) -> Self {
        ServiceError::Invalid(error.to_string())
    }
}

/// A checked container, as the docker runtime runs it for `service`.
pub(crate) fn container_spec(container: &Container, service: &str) -> ContainerSpec {
    ContainerSpec {
        image: container.image.clone(),
        host_network: container.host_network,
        memory_bytes: container.memory_bytes,
        cpus: container.cpus,
        init: container.init,
        service: service.to_string(),
    }
}

/// The signal a release stops with: `text` as the coordinator sent it or
/// as an image's `STOPSIGNAL` names it (`source` says which). An unknown
/// signal is refused, naming it: never replaced by another.
pub(crate) fn stop_signal(text: &str, source: &str) -> Result<Signal, ServiceError> {
    let name =
        rules::stop_signal(text).map_err(|e| ServiceError::Invalid(format!("{source}: {e}")))?;
    Signal::from_str(name).map_err(|_| {
        ServiceError::Invalid(format!(
            "{source}: {name} is not a signal on this system; set another stop_signal in the service's spec"
        ))
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
