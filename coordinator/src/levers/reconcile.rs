//! The reconciler: every node's proxies apply the levers the store says,
//! whatever happened while the node was away (levers set or lifted, an
//! agent restarted on an old record, a node that joined later).

use std::sync::Arc;
use std::time::Duration;

use super::{effective, env_of, Levers, NodeOutcome, CAPABILITY};
use crate::store::{LeverRecord, StoreError};

/// How often heartbeats are compared with the store.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Levers sent and not yet seen in a heartbeat are sent again after this
/// (heartbeats come every few seconds).
const RESEND_AFTER: Duration = Duration::from_secs(10);
/// Levers a node refused are sent again after this.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

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
        // Before the read: what this pass sends is as old as the read.
        let generation = self.generation();
        let records = self.store.levers.list(None).await?;
        let currents = self.currents(None).await?;
        let views = self.registry.list();
        // Forget what was sent to nodes and services no longer there.
        self.sent
            .lock()
            .expect("levers lock")
            .retain(|(node, service), _| {
                views.iter().any(|v| {
                    v.record.id == *node && v.record.services.iter().any(|s| s.service == *service)
                })
            });
        for view in views {
            if !view.connected || !view.record.capabilities.iter().any(|c| c == CAPABILITY) {
                continue;
            }
            for status in &view.record.services {
                let Some(reported) = &status.levers else {
                    continue; // a worker
                };
                // No environment claims the node: no lever applies.
                let env =
                    env_of(&currents, &status.service, &view.record.labels).map(|r| r.env.as_str());
                let of_service: Vec<LeverRecord> = records
                    .iter()
                    .filter(|r| Some(r.env.as_str()) == env && r.service == status.service)
                    .cloned()
                    .collect();
                let wanted = effective(&of_service, &view.record.name);
                let key = (view.record.id.clone(), status.service.clone());
                if *reported == wanted.reported() {
                    self.sent.lock().expect("levers lock").remove(&key);
                    continue;
                }
                let in_flight = self
                    .sent
                    .lock()
                    .expect("levers lock")
                    .get(&key)
                    .is_some_and(|sent| {
                        let wait = if sent.refused {
                            RETRY_REFUSED
                        } else {
                            RESEND_AFTER
                        };
                        sent.levers == wanted && sent.at.elapsed() < wait
                    });
                if in_flight {
                    continue;
                }
                tracing::info!(node = %view.record.name, service = %status.service, "node proxy levers differ from the store; sending them");
                let this = self.clone();
                let (view, service) = (view.clone(), status.service.clone());
                tokio::spawn(async move {
                    let node = view.record.name.clone();
                    let (_, outcome) = this.send(view, &service, wanted, generation).await;
                    if let NodeOutcome::Failed(error) = outcome {
                        tracing::error!(%node, %service, %error, "node refused its levers");
                    }
                });
            }
        }
        Ok(())
    }
}
