//! The gRPC code each domain error answers with, decided here once rather
//! than at each call, so the domains stay free of transport and a code
//! cannot differ between two calls that fail alike. The agent and
//! enrollment services answer with the same impls (trait impls hold crate
//! wide).
//!
//! A client's mistake gets a code it can act on (invalid argument, not
//! found, failed precondition, ...); only what the coordinator itself got
//! wrong (its store, its files) is internal.

use cutover_common::registry::RegistryError as ImageRegistryError;
use tonic::Status;

use crate::ca::CaError;
use crate::jobs::JobError;
use crate::registry::RegistryError;
use crate::rollout::RolloutError;
use crate::secrets::SecretError;
use crate::store::StoreError;

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            // Retryable: the call changed nothing the caller must know of.
            StoreError::Unavailable(_)
            | StoreError::Fenced { .. }
            | StoreError::NotLeading { .. }
            | StoreError::ReadOnly => Status::unavailable(error.to_string()),
            _ => Status::internal(error.to_string()),
        }
    }
}

impl From<RolloutError> for Status {
    fn from(error: RolloutError) -> Self {
        let message = error.to_string();
        match error {
            RolloutError::Spec(_)
            | RolloutError::NoVersion(_)
            | RolloutError::MigrateNode { .. }
            | RolloutError::BadConfig(_)
            | RolloutError::BadScale(_)
            | RolloutError::Image(ImageRegistryError::Invalid { .. }) => {
                Status::invalid_argument(message)
            }
            RolloutError::NotFound(_) => Status::not_found(message),
            RolloutError::Store(
                StoreError::Unavailable(_)
                | StoreError::Fenced { .. }
                | StoreError::NotLeading { .. }
                | StoreError::ReadOnly,
            ) => Status::unavailable(message),
            RolloutError::Store(_) => Status::internal(message),
            RolloutError::Locked { .. } | RolloutError::Claimed { .. } => Status::aborted(message),
            RolloutError::EnvironmentPinned(_) => Status::permission_denied(message),
            RolloutError::Interrupted { .. } => Status::unavailable(message),
            _ => Status::failed_precondition(message),
        }
    }
}

impl From<SecretError> for Status {
    fn from(error: SecretError) -> Self {
        let message = error.to_string();
        match error {
            SecretError::BadName(_)
            | SecretError::BadEnv(_)
            | SecretError::TooLarge(..)
            | SecretError::BadRotation(..)
            | SecretError::Nul(_) => Status::invalid_argument(message),
            SecretError::Missing { .. } => Status::not_found(message),
            SecretError::Store(_) | SecretError::Corrupt { .. } => Status::internal(message),
            _ => Status::failed_precondition(message),
        }
    }
}

impl From<CaError> for Status {
    fn from(error: CaError) -> Self {
        match error {
            CaError::NoSigner => Status::failed_precondition(error.to_string()),
            other => Status::internal(other.to_string()),
        }
    }
}

impl From<RegistryError> for Status {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::NameTaken { .. } => Status::already_exists(message),
            RegistryError::IdTaken { .. } => Status::failed_precondition(message),
            RegistryError::UnknownNode(_) => Status::not_found(message),
            RegistryError::NotConnected(_) => Status::unavailable(message),
            RegistryError::QueueFull(_) => Status::resource_exhausted(message),
            RegistryError::LabelsDiffer { .. } => Status::permission_denied(message),
            RegistryError::Store(_) => Status::internal(message),
        }
    }
}

impl From<JobError> for Status {
    fn from(error: JobError) -> Self {
        let message = error.to_string();
        match error {
            JobError::Spec(_) => Status::invalid_argument(message),
            JobError::NotFound { .. } | JobError::RunNotFound { .. } => Status::not_found(message),
            JobError::OtherApp { .. } | JobError::CannotRun { .. } => {
                Status::failed_precondition(message)
            }
            JobError::Busy { .. } => Status::aborted(message),
            JobError::EnvironmentPinned(_) => Status::permission_denied(message),
            JobError::Store(_) => Status::internal(message),
        }
    }
}
