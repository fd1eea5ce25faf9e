//! `set_levers`: a service's incident levers, put in force at its proxy at
//! once (a cutover in progress does not delay them) and recorded first, so
//! a restarted agent applies them before it accepts a connection.

use cutover_proto::v1 as pb;

use super::{NodeServices, ServiceError};
use crate::proxy::levers::LeverSettings;
use crate::store::ServiceRecord;

impl NodeServices {
    pub async fn set_levers(
        &self,
        name: &str,
        settings: LeverSettings,
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
        // Bad settings change nothing, not even the record.
        settings
            .check()
            .map_err(|e| ServiceError::Levers(format!("levers of {name}: {e}")))?;
        self.store.update_service(name, |current| {
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
            });
            record.levers = settings.clone();
            Some(record)
        })?;
        handle
            .set(settings)
            .map_err(|e| ServiceError::Levers(format!("levers of {name}: {e}")))
    }

    /// The levers in force and their counts, read from the proxies now (a
    /// snapshot taken before a command held the service may be older).
    pub(super) fn fill_levers(&self, states: &mut [pb::ServiceState]) {
        let handles = self.levers.lock().expect("levers lock");
        for state in states {
            if let Some(handle) = handles.get(&state.service) {
                state.levers = Some((&handle.settings()).into());
                state.lever_counts = Some(handle.counts().into());
            }
        }
    }
}
