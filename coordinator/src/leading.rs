//! `cutover server`: on the embedded store, one coordinator; on etcd, a
//! coordinator per term. A process campaigns for the lead (`Campaign`),
//! serves while it leads, with a store whose every write is fenced by its
//! token, and campaigns again once the term ends. A follower answers
//! `/healthz` (alive, following whom), `/metrics` (`cutover_leading 0`) and
//! its gRPC status, and refuses every other call with the leader's address:
//! only the leader sends commands or writes.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use cutover_common::tls::accept_mtls;
use cutover_proto::v1::server_service_server::ServerServiceServer;
use tonic::service::Routes;

use crate::config::{CoordinatorConfig, StoreKind};
use crate::metrics::{registry_with_build_info, LeadershipMetrics};
use crate::server::{bind_listener, Coordinator, ServerError};
use crate::server_status::{Standing, StatusApi};
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
    let identity = crate::server_status::identity(&config);
    loop {
        let campaign = Campaign::new(&etcd, &identity)?;
        let page = follower_page(&config, &campaign).await?;
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

/// A follower's listeners, until `stop`.
struct FollowerPage {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FollowerPage {
    /// Lets go of the listeners (the leader's coordinator binds them next),
    /// bounded: a graceful shutdown can hang on a half-open connection.
    async fn stop(self) {
        self.stop.cancel();
        for mut task in self.tasks {
            if tokio::time::timeout(PAGE_STOP, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

/// A follower's HTTP listener (`/healthz`, `/metrics`) and gRPC listener:
/// `ServerService.Status` answered, every other call refused with the
/// leader's address (`LEADER_METADATA`), so an agent or an operator that
/// reached a follower learns where to go instead of timing out.
async fn follower_page(
    config: &CoordinatorConfig,
    campaign: &Campaign,
) -> Result<FollowerPage, ServerError> {
    let http = bind_listener("http", config.http_listen).await?;
    let grpc = bind_listener("grpc", config.listen).await?;
    let tls = cutover_common::tls::server_config(&config.tls)?;
    let observed = campaign.observed();
    let stop = CancellationToken::new();

    let status = StatusApi::new(
        config,
        Standing::Following(observed.clone()),
        Some(campaign.health()),
    );
    let mut routes = Routes::new(ServerServiceServer::new(status));
    let refuse = {
        let observed = observed.clone();
        move || {
            let refusal = refusal(observed.borrow().as_ref().map(|(leader, _)| leader));
            async move { refusal }
        }
    };
    let router = std::mem::take(routes.axum_router_mut()).fallback(refuse);
    // The TLS settings never change while following: the sender lives as
    // long as the listener.
    let (tls_sender, tls_config) = watch::channel(tls);
    let grpc_server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(
            accept_mtls(grpc, tls_config, stop.clone()),
            stop.clone().cancelled_owned(),
        );
    let grpc_task = tokio::spawn(async move {
        let _tls_sender = tls_sender;
        if let Err(error) = grpc_server.await {
            tracing::warn!(%error, "the follower's grpc listener failed");
        }
    });

    let healthz = {
        let observed = observed.clone();
        move || {
            let text = match observed.borrow().as_ref() {
                Some((leader, _)) => format!(
                    "ok: following the leader at {} (token {})\n",
                    leader.identity, leader.token
                ),
                None => "ok: following; no leader yet\n".to_string(),
            };
            async move { text }
        }
    };
    let metrics = move || {
        let token = observed.borrow().as_ref().map_or(0, |(l, _)| l.token);
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
    let http_task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let served = axum::serve(http, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the follower's http listener failed");
            }
        }
    });
    Ok(FollowerPage {
        stop,
        tasks: vec![grpc_task, http_task],
    })
}

/// What a follower answers every call but its status: UNAVAILABLE, with
/// the leader's address in the message and in `LEADER_METADATA`.
fn refusal(leader: Option<&Leader>) -> axum::response::Response {
    let status = match leader {
        Some(leader) => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            if let Ok(value) = leader.identity.parse() {
                metadata.insert(cutover_common::LEADER_METADATA, value);
            }
            tonic::Status::with_metadata(
                tonic::Code::Unavailable,
                format!(
                    "this coordinator follows; the leader is {} (token {}): call it, or list every coordinator (comma-separated) in --coordinator or the coordinator setting",
                    leader.identity, leader.token
                ),
                metadata,
            )
        }
        None => tonic::Status::unavailable(
            "this coordinator follows and no coordinator leads yet (an election is under way, or etcd has no quorum): try again in a few seconds; `cutover server status` shows the etcd members",
        ),
    };
    status.into_http::<axum::body::Body>()
}
