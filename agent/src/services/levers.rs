//! `set_levers`: a service's incident levers, put in force at its proxy at
//! once (a cutover in progress does not delay them), then recorded, so a
//! restarted agent applies them before it accepts a connection.

use cutover_proto::v1 as pb;

use super::{NodeServices, ServiceError};
use crate::proxy::levers::LeverSettings;
use crate::store::ServiceRecord;

impl NodeServices {
    /// Applies and records `settings` for service `name`, unless
    /// `generation` is older than the one applied last (a resend overtaken
    /// by a newer change; 0 always applies).
    pub async fn set_levers(
        &self,
        name: &str,
        settings: LeverSettings,
        generation: u64,
    ) -> Result<(), ServiceError> {
        let handle = self.levers.lock().expect("levers lock").get(name).cloned();
        let Some(handle) = handle else {
            return Err(match self.services.lock().await.contains_key(name) {
                true => ServiceError::Levers(format!(
                    "service {name} is a worker: it serves no requests through a node proxy, so no lever applies to it"
                )),
                false => ServiceError::UnknownService(name.to_string()),
            });
        };
        // One set at a time: the proxy's levers, its pause flag and the
        // record must all end up as the newest set says.
        let _one_at_a_time = self.levers_write.lock().await;
        let applied = self
            .store
            .service(name)?
            .map_or(0, |record| record.levers_generation);
        if generation != 0 && generation < applied {
            tracing::info!(service = %name, generation, applied, "levers older than those in force ignored");
            return Ok(());
        }
        handle
            .set(settings.clone())
            .map_err(|e| ServiceError::Levers(format!("levers of {name}: {e}")))?;
        // In force first: a full disk (the incident, maybe) must not keep
        // maintenance off. Not recorded, a restart would lose them: said.
        self.store
            .update_service(name, |current| {
                // A service whose first release is still starting has no
                // record yet; its cutover keeps what is written here.
                let mut record = current.unwrap_or_else(|| ServiceRecord {
                    listen: Some(handle.local_addr()),
                    admitted: true,
                    active: None,
                    previous: None,
                    leftovers: Vec::new(),
                    history: Vec::new(),
                    side: None,
                    levers: LeverSettings::default(),
                    levers_generation: 0,
                });
                record.levers = settings.clone();
                record.levers_generation = generation.max(record.levers_generation);
                Some(record)
            })
            .map_err(|e| {
                ServiceError::Levers(format!(
                    "the levers of {name} are in force but not recorded ({e}): an agent restart would lose them; free the agent's state dir and set them again"
                ))
            })
    }

    /// The levers in force (bypass secret as its fingerprint) and their
    /// counts, read from the proxies now (a snapshot taken before a command
    /// held the service may be older).
    pub(super) fn fill_levers(&self, states: &mut [pb::ServiceState]) {
        let handles = self.levers.lock().expect("levers lock");
        for state in states {
            if let Some(handle) = handles.get(&state.service) {
                state.levers = Some((&handle.settings().reported()).into());
                state.lever_counts = Some(handle.counts().into());
            }
        }
    }
}
