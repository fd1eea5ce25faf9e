//! A follower: a coordinator that campaigns while another leads. It answers
//! `/healthz` (alive, following whom), `/metrics` (`cutover_leading 0`), its
//! gRPC status, and the operator reads in `FOLLOWER_READS` from the records
//! the leader writes, through a read-only view of the store. Every other call
//! (a write, a command to a node, a view only the leader keeps current) is
//! refused with the leader's address: only the leader writes or commands.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use cutover_common::identity::Role;
use cutover_common::tls::accept_mtls;
use cutover_proto::v1::operator_service_server::OperatorServiceServer;
use cutover_proto::v1::server_service_server::ServerServiceServer;

use crate::auth::require;
use crate::config::{CoordinatorConfig, EtcdSettings};
use crate::metrics::{registry_with_build_info, LeadershipMetrics};
use crate::server::{bind_listener, ServerError};
use crate::server_status::{Standing, StatusApi};
use crate::services::Services;
use crate::store::{Campaign, EtcdBackend, Leader, ReadOnly, Store};

/// How long a follower's page may take to let go of its listener.
const PAGE_STOP: Duration = Duration::from_secs(2);

/// How soon a follower that could not read the store (etcd without a
/// quorum) tries again.
const REOPEN_AFTER: Duration = Duration::from_secs(2);

/// The `OperatorService` calls a follower answers itself. Each is answered
/// from stored records alone; what needs a node's live session (nodes,
/// queues, levers applied, logs, tasks) or a rollout's live watch is the
/// leader's, like every write.
const FOLLOWER_READS: &[&str] = &[
    "ListRollouts",
    "GetRollout",
    "GetDeployment",
    "ListReleases",
    "ListEvents",
    "ListAudit",
    "GetConfig",
    "GetEnvironmentPolicy",
    "ListJobs",
    "ListJobRuns",
    "GetJobRun",
    "GetRecoveryStatus",
    "ListSecrets",
    "ListOperators",
    "ListTokens",
    "ListServiceLocks",
];

fn is_follower_read(path: &str) -> bool {
    path.strip_prefix("/cutover.v1.OperatorService/")
        .is_some_and(|method| FOLLOWER_READS.contains(&method))
}

/// The operator API a follower answers its reads with.
type Reads = BoxCloneSyncService<axum::extract::Request, axum::response::Response, Infallible>;

/// A follower's listeners, until `stop`.
pub(crate) struct FollowerPage {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FollowerPage {
    /// Lets go of the listeners (the leader's coordinator binds them next),
    /// bounded: a graceful shutdown can hang on a half-open connection.
    pub(crate) async fn stop(self) {
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
/// `ServerService.Status` and the reads answered (once the store could be
/// read), every other call refused with the leader's address
/// (`LEADER_METADATA`), so an agent or an operator that reached a follower
/// learns where to go instead of timing out.
pub(crate) async fn follower_page(
    config: &CoordinatorConfig,
    etcd: &EtcdSettings,
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
    let reads: Arc<OnceLock<Reads>> = Arc::default();
    let opening = tokio::spawn(open_reads(
        config.clone(),
        etcd.clone(),
        reads.clone(),
        stop.clone(),
    ));
    let answer = {
        let observed = observed.clone();
        tower::service_fn(move |request: axum::extract::Request| {
            let answered = match reads.get() {
                Some(read) if is_follower_read(request.uri().path()) => Ok(read.clone()),
                _ => Err(refusal(
                    observed.borrow().as_ref().map(|(leader, _)| leader),
                )),
            };
            async move {
                match answered {
                    Ok(read) => read.oneshot(request).await,
                    Err(refused) => Ok(refused),
                }
            }
        })
    };
    let router = std::mem::take(routes.axum_router_mut()).fallback_service(answer);
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
        tasks: vec![grpc_task, http_task, opening],
    })
}

/// Opens the operator API over a read-only view of the store into `reads`,
/// again every `REOPEN_AFTER` while the store cannot be read (a follower
/// started while etcd has no quorum answers its reads once it has one),
/// until `stop`.
async fn open_reads(
    config: CoordinatorConfig,
    etcd: EtcdSettings,
    reads: Arc<OnceLock<Reads>>,
    stop: CancellationToken,
) {
    // A follower signs nothing, and a CA rotation's staged files are the
    // leader's to finish.
    let config = CoordinatorConfig {
        ca_key: None,
        ..config
    };
    let backend = match EtcdBackend::new(&etcd) {
        Ok(backend) => backend,
        Err(error) => {
            tracing::warn!(%error, "the follower cannot open the store: it refuses reads too");
            return;
        }
    };
    let store = Store::new(Arc::new(ReadOnly(Arc::new(backend))));
    let max_message = config.limits.max_message_bytes;
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = Services::open(&config, store.clone(), &stop) => opened,
        };
        match opened {
            Ok(services) => {
                let api = OperatorServiceServer::new(services.operator_api(&stop))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message);
                let checked = InterceptedService::new(
                    api,
                    require(
                        Role::Operator,
                        services.pki.clone(),
                        services.access.clone(),
                    ),
                );
                let read = ServiceExt::<axum::extract::Request>::map_response(
                    checked,
                    IntoResponse::into_response,
                );
                let _ = reads.set(BoxCloneSyncService::new(read));
                return;
            }
            Err(error) => tracing::warn!(
                %error,
                "the follower cannot read the store yet: it refuses reads meanwhile and tries again"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REOPEN_AFTER) => {}
        }
    }
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
