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
                    also_listen: Vec::new(),
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

#[cfg(test)]
mod tests {
    use cutover_common::levers::MaintenanceSettings;

    use super::*;

    fn maintenance(message: &str) -> LeverSettings {
        LeverSettings {
            maintenance: Some(MaintenanceSettings {
                message: message.into(),
                retry_after_s: 60,
                allow: Vec::new(),
                bypass_secret: "s3cret-s3cret-s3cret".into(),
            }),
            ..Default::default()
        }
    }

    fn message(node: &NodeServices) -> Option<String> {
        let handle = node.levers.lock().unwrap().get("web").cloned().unwrap();
        handle.settings().maintenance.map(|m| m.message)
    }

    #[tokio::test]
    async fn older_sets_are_ignored_and_a_restart_applies_the_newest_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::test_support::node_services(dir.path()).await;
        let unknown = node.set_levers("web", maintenance("a"), 1).await;
        assert_eq!(
            unknown.unwrap_err().to_string(),
            "no service web on this node: it never ran here, or was stopped or removed; `cutover nodes` shows what runs where"
        );
        // A web service whose first release is still to come: a proxy, no
        // record yet.
        let service = node
            .bind("web", &["127.0.0.1:0".parse().unwrap()])
            .await
            .unwrap();
        let shared = crate::service::shared(service, node.shutdown.clone());
        node.services.lock().await.insert("web".into(), shared);
        node.set_levers("web", maintenance("newer"), 10)
            .await
            .unwrap();
        // A resend overtaken by the change above.
        node.set_levers("web", maintenance("older"), 5)
            .await
            .unwrap();
        assert_eq!(message(&node).as_deref(), Some("newer"));
        let record = node.store.service("web").unwrap().unwrap();
        assert_eq!(record.levers_generation, 10);
        // Heartbeats carry a fingerprint, never the secret.
        let states = node.state();
        let reported = states[0]
            .levers
            .as_ref()
            .unwrap()
            .maintenance
            .as_ref()
            .unwrap();
        assert!(
            reported.bypass_secret.starts_with("sha256:"),
            "{reported:?}"
        );
        // Bad settings change nothing.
        let mut bad = maintenance("bad");
        bad.maintenance.as_mut().unwrap().allow = vec!["10.0.0.0".into()];
        assert!(node.set_levers("web", bad, 11).await.is_err());
        assert_eq!(message(&node).as_deref(), Some("newer"));
        // A restarted agent applies what is recorded when it binds the
        // service's proxy again (at start for a service that serves; here,
        // with nothing serving yet, at its first activation), before it
        // accepts.
        for proxy in node.shut_down(false).await {
            proxy.close().await;
        }
        drop(node);
        let node = crate::test_support::node_services(dir.path()).await;
        let listen = node.store.service("web").unwrap().unwrap().listen;
        let service = node.bind("web", &Vec::from_iter(listen)).await.unwrap();
        let shared = crate::service::shared(service, node.shutdown.clone());
        node.services.lock().await.insert("web".into(), shared);
        assert_eq!(message(&node).as_deref(), Some("newer"));
        // 0 always applies (a coordinator without generations).
        node.set_levers("web", LeverSettings::default(), 0)
            .await
            .unwrap();
        assert_eq!(message(&node), None);
    }
}
