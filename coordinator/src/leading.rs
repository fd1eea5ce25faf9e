//! `cutover server`: on the embedded store, one coordinator; on etcd, a
//! coordinator per term. A process campaigns for the lead (`Campaign`),
//! serves while it leads, with a store whose every write is fenced by its
//! token, and campaigns again once the term ends. A follower binds nothing:
//! agents and operators that list every coordinator reach the leader, and
//! only the leader sends commands or writes.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{CoordinatorConfig, EtcdSettings, StoreKind};
use crate::server::{Coordinator, ServerError};
use crate::store::{Campaign, EtcdBackend, Store};

/// Runs until `shutdown`.
pub async fn serve(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let etcd = match (config.store, &config.etcd) {
        (StoreKind::Etcd, Some(etcd)) => etcd.clone(),
        _ => {
            return Coordinator::bind(config, None, shutdown)
                .await?
                .wait()
                .await
        }
    };
    let identity = identity(&config, &etcd);
    loop {
        let campaign = Campaign::new(&etcd, &identity)?;
        let Some(leadership) = campaign.win(&shutdown).await else {
            return Ok(());
        };
        let term = CancellationToken::new();
        let ends = {
            let (term, lost, shutdown) = (term.clone(), leadership.lost.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => {}
                    _ = shutdown.cancelled() => {}
                    _ = term.cancelled() => {}
                }
                term.cancel();
            })
        };
        let store = Store::new(Arc::new(EtcdBackend::fenced(&etcd, &leadership)?));
        let served = match Coordinator::bind(config.clone(), Some(store), term.clone()).await {
            Ok(coordinator) => coordinator.wait().await,
            Err(error) => Err(error),
        };
        term.cancel();
        let _ = ends.await;
        let lost = leadership.lost.is_cancelled();
        leadership.resign().await;
        if shutdown.is_cancelled() {
            return served;
        }
        match served {
            Ok(()) if lost => {
                tracing::warn!("the lead was lost: stopped acting, campaigning again");
            }
            Ok(()) => {}
            // A coordinator that cannot serve (its address taken, its
            // files unreadable) gives the lead up and says why.
            Err(error) => return Err(error),
        }
    }
}

/// What the leader key says about this coordinator.
fn identity(config: &CoordinatorConfig, etcd: &EtcdSettings) -> String {
    etcd.advertise.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        format!("https://{host}:{}", config.listen.port())
    })
}
