//! `cutover server`: on the embedded store, one coordinator; on etcd, a
//! coordinator per term. A process campaigns for the lead (`Campaign`),
//! serves while it leads, with a store whose every write is fenced by its
//! token, and campaigns again once the term ends; between terms it follows
//! (`following.rs`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{CoordinatorConfig, StoreKind};
use crate::following::follower_page;
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
    let identity = crate::server_status::identity(&config);
    loop {
        let campaign = Campaign::new(&etcd, &identity)?;
        let page = follower_page(&config, &etcd, &campaign).await?;
        let won = campaign.win(&shutdown).await;
        page.stop().await;
        let Some(leadership) = won else {
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
        let store = Store::new(Arc::new(EtcdBackend::fenced(&etcd, &leadership)));
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
