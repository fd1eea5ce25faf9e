//! `cutover server`: on the embedded store, one coordinator; on etcd, a
//! coordinator per term. A process campaigns for the lead (`Campaign`),
//! serves while it leads, with a store whose every write is fenced by its
//! token, and campaigns again once the term ends. A follower binds only
//! its HTTP listener, for `/healthz` (alive, following whom) and `/metrics`
//! (`cutover_leading 0`): agents and operators that list every coordinator
//! reach the leader, and only the leader sends commands or writes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{CoordinatorConfig, EtcdSettings, StoreKind};
use crate::metrics::{registry_with_build_info, LeadershipMetrics};
use crate::server::{bind_listener, Coordinator, ServerError};
use crate::store::{Campaign, EtcdBackend, Leader, Store};

/// How long a follower's page may take to let go of its listener.
const PAGE_STOP: Duration = Duration::from_secs(2);

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
        let page = follower_page(config.http_listen, campaign.observed()).await?;
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

/// A follower's HTTP listener, until `stop`.
struct FollowerPage {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl FollowerPage {
    /// Lets go of the listener (the leader's coordinator binds it next),
    /// bounded: a graceful shutdown can hang on a half-open connection.
    async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(PAGE_STOP, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
}

async fn follower_page(
    addr: SocketAddr,
    observed: watch::Receiver<Option<Leader>>,
) -> Result<FollowerPage, ServerError> {
    let listener = bind_listener("http", addr).await?;
    let healthz = {
        let observed = observed.clone();
        move || {
            let text = match observed.borrow().as_ref() {
                Some(leader) => format!(
                    "ok: following the leader at {} (token {})\n",
                    leader.identity, leader.token
                ),
                None => "ok: following; no leader yet\n".to_string(),
            };
            async move { text }
        }
    };
    let metrics = move || {
        let token = observed.borrow().as_ref().map_or(0, |l| l.token);
        async move {
            let mut registry = registry_with_build_info();
            let leadership = LeadershipMetrics::default();
            leadership.register(&mut registry);
            leadership.following(token);
            let mut body = String::new();
            prometheus_client::encoding::text::encode(&mut body, &registry)
                .expect("writing to a string cannot fail");
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                body,
            )
        }
    };
    let router = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the follower's http listener failed");
            }
        }
    });
    Ok(FollowerPage { stop, task })
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
