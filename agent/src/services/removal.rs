//! The commands that take a service off the node: a stop (its release
//! drains and stops, its port is freed; its record stays, so a restart
//! finds nothing to bring back but what a cut-short stop left), a removal
//! (the record goes too, and with it the reason to keep its release dirs;
//! its release logs are deleted), and the undoing of a first release that
//! failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{NodeServices, ServiceError};
use crate::notify;
use crate::service::Service;

/// How long a heartbeat or a retirer may hold a service being closed.
const HELD_FOR_AT_MOST: Duration = Duration::from_secs(5);

impl NodeServices {
    /// The `stop_service` command. A service this node does not run is
    /// stopped already (after a restart a stopped service is not brought
    /// back): it succeeds, and with `remove` its record goes.
    pub async fn stop_service(&self, name: &str, remove: bool) -> Result<(), ServiceError> {
        let running = self.services.lock().await.get(name).cloned();
        if let Some(shared) = running {
            let mut service = shared.lock().await;
            if let Some(stopped) = service.stop().await {
                tracing::info!(service = %name, release = %stopped.release_id, drain_completed = stopped.drain.completed, "stopped the service");
            }
            drop(service);
            self.close_service(name, shared).await;
        }
        if remove {
            self.store.remove_service(name)?;
            let logs = self.release_logs().join(name);
            if let Err(error) = std::fs::remove_dir_all(&logs) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(service = %name, path = %logs.display(), %error, "cannot remove the service's release logs");
                }
            }
            tracing::info!(service = %name, "removed the service");
            // Its releases are no one's now.
            self.prune().await;
        }
        Ok(())
    }

    /// Forgets a service whose first release failed: as before the command,
    /// the public port is free and the service unknown.
    pub(super) async fn forget_service(&self, name: &str, service: Arc<Mutex<Service>>) {
        self.close_service(name, service).await;
        if let Err(error) = self.store.remove_service(name) {
            tracing::error!(service = %name, %error, "cannot forget the service");
        }
    }

    /// Takes a service that serves nothing out of the node's services and
    /// closes its proxy: its port is free once this returns.
    async fn close_service(&self, name: &str, service: Arc<Mutex<Service>>) {
        self.services.lock().await.remove(name);
        let sole = sole(service).await;
        // Once no heartbeat holds it: one that did would remember it again.
        self.snapshots.lock().expect("snapshots lock").remove(name);
        self.levers.lock().expect("levers lock").remove(name);
        match sole {
            Ok(service) => {
                if let Some(proxy) = service.release().await {
                    for listen in proxy.listens() {
                        notify::forget_listener(listen);
                    }
                    proxy.close().await;
                }
            }
            // Its proxy closes with the agent's shutdown.
            Err(_) => {
                tracing::warn!(service = %name, "a task still holds the service; its port stays open until it lets go")
            }
        }
    }
}

/// The service once nothing else holds it (a retirer or a heartbeat may,
/// for a moment), or still shared after `HELD_FOR_AT_MOST`.
pub(super) async fn sole(service: Arc<Mutex<Service>>) -> Result<Service, Arc<Mutex<Service>>> {
    let deadline = Instant::now() + HELD_FOR_AT_MOST;
    while Arc::strong_count(&service) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Arc::try_unwrap(service).map(Mutex::into_inner)
}
