//! The reconciler: every node's proxies apply the levers the store says,
//! whatever happened while the node was away (levers set or lifted, an
//! agent restarted on an old record, a node that joined later).

use std::sync::Arc;
use std::time::Duration;

use super::{effective, Levers, NodeOutcome, CAPABILITY};
use crate::spec::selects;
use crate::store::{LeverRecord, ReleaseRecord, StoreError};

/// How often heartbeats are compared with the store.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Levers sent and not yet seen in a heartbeat are sent again after this.
const RESEND_AFTER: Duration = Duration::from_secs(10);

impl Levers {
    /// Runs until shutdown.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            if let Err(error) = self.reconcile_once().await {
                tracing::error!(%error, "cannot compare the nodes' levers with the store; retrying");
            }
        }
    }

    async fn reconcile_once(self: &Arc<Self>) -> Result<(), StoreError> {
        let records = self.store.levers.list(None).await?;
        let currents: Vec<ReleaseRecord> = self
            .store
            .releases
            .all()
            .await?
            .into_iter()
            .filter(|r| r.current)
            .collect();
        for view in self.registry.list() {
            if !view.connected || !view.record.capabilities.iter().any(|c| c == CAPABILITY) {
                continue;
            }
            for status in &view.record.services {
                let Some(reported) = &status.levers else {
                    continue; // a worker
                };
                // The environment whose current release of the service
                // selects the node; none: no lever applies.
                let env = currents
                    .iter()
                    .find(|r| {
                        r.service == status.service && selects(&r.selector, &view.record.labels)
                    })
                    .map(|r| r.env.as_str());
                let of_service: Vec<LeverRecord> = records
                    .iter()
                    .filter(|r| Some(r.env.as_str()) == env && r.service == status.service)
                    .cloned()
                    .collect();
                let wanted = effective(&of_service, &view.record.name);
                let key = (view.record.id.clone(), status.service.clone());
                if *reported == wanted {
                    self.sent.lock().expect("levers lock").remove(&key);
                    continue;
                }
                let in_flight = self
                    .sent
                    .lock()
                    .expect("levers lock")
                    .get(&key)
                    .is_some_and(|(sent, at)| *sent == wanted && at.elapsed() < RESEND_AFTER);
                if in_flight {
                    continue;
                }
                tracing::info!(node = %view.record.name, service = %status.service, "node proxy levers differ from the store; sending them");
                let this = self.clone();
                let (view, service) = (view.clone(), status.service.clone());
                tokio::spawn(async move {
                    let node = view.record.name.clone();
                    let (_, outcome) = this.send(view, &service, wanted).await;
                    if let NodeOutcome::Failed(error) = outcome {
                        tracing::error!(%node, %service, %error, "node refused its levers");
                    }
                });
            }
        }
        Ok(())
    }
}
