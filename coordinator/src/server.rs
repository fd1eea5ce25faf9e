//! `cutover server`: wires the store, the registry, the gRPC services and the
//! HTTP listener together, and drains them on shutdown within a bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cutover_common::identity::Role;
use cutover_common::tls::{accept_mtls, TlsError};
use cutover_proto::v1::agent_service_server::AgentServiceServer;
use cutover_proto::v1::operator_service_server::OperatorServiceServer;
use cutover_proto::v1::server_service_server::ServerServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent_api::AgentApi;
use crate::auth::require;
use crate::config::{CoordinatorConfig, Limits, StoreKind};
use crate::enroll::EnrollApi;
use crate::registry::Registry;
use crate::server_status::{Standing, StatusApi};
use crate::services::Services;
use crate::store::{Store, StoreError};
use cutover_proto::v1::enroll_service_server::EnrollServiceServer;

/// Checkpoint cadence for heartbeat-only changes (last seen, figures).
const CHECKPOINT_EVERY: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registries: {0}")]
    Registries(String),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Secrets(crate::secrets::SecretError),
    #[error("cannot create data dir {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind the {what} listener on {addr}: {source}; {}", bind_hint(.what, .addr, .source))]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("grpc server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("http server failed: {0}")]
    Http(std::io::Error),
}

/// A running coordinator. Tests start it on pre-bound listeners; the binary
/// binds the configured addresses.
pub struct Coordinator {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub registry: Arc<Registry>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Coordinator {
    /// Binds the configured addresses; `store`: one opened already (a
    /// leader's fenced store), or the config's.
    pub async fn bind(
        config: CoordinatorConfig,
        store: Option<Store>,
        shutdown: CancellationToken,
    ) -> Result<Self, ServerError> {
        let grpc = bind_listener("grpc", config.listen).await?;
        let http = bind_listener("http", config.http_listen).await?;
        Self::start_with(config, store, grpc, http, shutdown).await
    }

    pub async fn start(
        config: CoordinatorConfig,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, ServerError> {
        Self::start_with(config, None, grpc, http, shutdown).await
    }

    /// `start` on a store opened already (a leader's fenced one), or the
    /// config's.
    pub async fn start_with(
        config: CoordinatorConfig,
        store: Option<Store>,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Self, ServerError> {
        // Everything that can fail on bad input fails before anything is
        // created or serves. A certificate swap a crash cut short (a CA
        // rotation moving the coordinator's own certificate) is completed
        // first.
        cutover_common::pki::finish_pair_swap(&config.tls.cert, &config.tls.key);
        cutover_common::tls::server_config(&config.tls)?;
        // The store and the artifacts are the coordinator's alone: private
        // whatever the umask, also when an older run left them wider. Only
        // what it made is narrowed, never whatever else shares the dir.
        let private = |dir: &std::path::Path| {
            cutover_common::modes::private_dir(dir)
                .and_then(|()| cutover_common::modes::restrict_tree(dir))
                .map_err(|source| ServerError::DataDir {
                    path: dir.to_path_buf(),
                    source,
                })
        };
        cutover_common::modes::private_dir(&config.data_dir).map_err(|source| {
            ServerError::DataDir {
                path: config.data_dir.clone(),
                source,
            }
        })?;
        private(&config.data_dir.join("artifacts"))?;
        let store = match (store, config.store) {
            (Some(store), _) => store,
            (None, StoreKind::Etcd) => {
                let etcd = config.etcd.as_ref().ok_or_else(|| {
                    StoreError::Backend(
                        "store = \"etcd\" but coordinator.toml has no [etcd] section".into(),
                    )
                })?;
                Store::open_etcd(etcd)?
            }
            (None, StoreKind::Sled) => {
                private(&config.data_dir.join("store"))?;
                Store::open_sled(&config.data_dir.join("store"))?
            }
        };
        let services = Services::open(&config, store.clone(), &shutdown).await?;
        let operator_api = services.operator_api(&shutdown);
        let Services {
            metrics,
            registry,
            artifacts,
            pki,
            access,
            secrets,
            rollouts,
            jobs,
            levers,
            ..
        } = services;
        let since_ms = cutover_common::now_ms();
        metrics.leadership.leading(store.leader_token(), since_ms);
        let standing = match store.leader_token() {
            0 => Standing::Single { since_ms },
            token => Standing::Leading { token, since_ms },
        };
        let status_api = StatusApi::new(&config, standing, store.cluster_health());
        let grpc_addr = grpc.local_addr().map_err(ServerError::Http)?;
        let http_addr = http.local_addr().map_err(ServerError::Http)?;
        let config = Arc::new(config);

        let max_message = config.limits.max_message_bytes;
        let agent_api = AgentServiceServer::new(AgentApi {
            registry: registry.clone(),
            artifacts: artifacts.clone(),
            secrets: secrets.clone(),
            access: access.clone(),
            pki: pki.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let resumed = rollouts.recover().await?;
        let converger = tokio::spawn(rollouts.clone().converge_loop());
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished rollouts");
        }
        let open_runs = jobs.recover().await?;
        if open_runs > 0 {
            tracing::info!(
                open_runs,
                "following job runs a previous start left running"
            );
        }
        let scheduler = tokio::spawn(jobs.clone().schedule_loop());
        let lever_reconciler = tokio::spawn(levers.clone().reconcile_loop());
        let queue_watcher = tokio::spawn(crate::queues::watch_loop(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            rollouts.notifier(),
            shutdown.clone(),
        ));
        let operator_api = OperatorServiceServer::new(operator_api)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);

        let grpc_server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.limits.keepalive_interval))
            .http2_keepalive_timeout(Some(config.limits.keepalive_timeout))
            .tcp_nodelay(true)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                agent_api,
                require(Role::Agent, pki.clone(), access.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                operator_api,
                require(Role::Operator, pki.clone(), access.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                ServerServiceServer::new(status_api),
                require(Role::Operator, pki.clone(), access.clone()),
            ))
            // No interceptor: a node without a certificate calls it, with a
            // join token.
            .add_service(
                EnrollServiceServer::new(EnrollApi::new(
                    store.clone(),
                    registry.clone(),
                    pki.clone(),
                    access.clone(),
                    config.agent_cert_lifetime,
                ))
                .max_decoding_message_size(64 * 1024),
            )
            .serve_with_incoming_shutdown(
                accept_mtls(grpc, pki.server_configs(), shutdown.clone()),
                shutdown.clone().cancelled_owned(),
            );
        let http_server = axum::serve(http, crate::http::router(registry.clone(), metrics.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());

        let sweeper = tokio::spawn(sweep_loop(
            registry.clone(),
            config.limits.clone(),
            shutdown.clone(),
        ));
        let rotation = tokio::spawn(crate::ca::drive_rotation(
            pki.clone(),
            registry.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let grace = config.shutdown_grace;
        let task_shutdown = shutdown.clone();
        let task_registry = registry.clone();
        let task = tokio::spawn(async move {
            let mut grpc_task = tokio::spawn(grpc_server);
            let mut http_task =
                tokio::spawn(async move { http_server.await.map_err(ServerError::Http) });
            // A server that ends by itself (an error) ends the other too;
            // its handle is spent then and must not be awaited again.
            let (mut grpc_done, mut http_done) = (false, false);
            tokio::select! {
                _ = task_shutdown.cancelled() => {}
                result = &mut grpc_task => {
                    grpc_done = true;
                    task_shutdown.cancel();
                    result.expect("grpc task")?;
                }
                result = &mut http_task => {
                    http_done = true;
                    task_shutdown.cancel();
                    result.expect("http task")?;
                }
            }
            // Bounded drain: a stuck connection must not keep the process up
            // (graceful shutdown can hang on a half-open HTTP/2 stream).
            let drained = tokio::time::timeout(grace, async {
                if !grpc_done {
                    let _ = (&mut grpc_task).await;
                }
                if !http_done {
                    let _ = (&mut http_task).await;
                }
            })
            .await;
            if drained.is_err() {
                tracing::warn!(grace = %humantime::format_duration(grace), "drain timed out, closing remaining connections");
                grpc_task.abort();
                http_task.abort();
            }
            let _ = sweeper.await;
            let _ = rotation.await;
            let _ = converger.await;
            let _ = scheduler.await;
            let _ = lever_reconciler.await;
            let _ = queue_watcher.await;
            rollouts.drain(grace).await;
            jobs.drain(grace).await;
            task_registry.sweep(true);
            task_registry.journal().close().await;
            task_registry.store().flush().await?;
            tracing::info!("coordinator stopped");
            Ok(())
        });
        tracing::info!(%grpc_addr, %http_addr, data_dir = %config.data_dir.display(), "coordinator listening");
        Ok(Self {
            grpc_addr,
            http_addr,
            registry,
            shutdown,
            task,
        })
    }

    /// Asks for shutdown and waits for the drain to finish.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }

    pub async fn wait(self) -> Result<(), ServerError> {
        self.task.await.expect("coordinator task panicked")
    }
}

/// What to do about a listener that cannot bind, naming the config key.
fn bind_hint(what: &str, addr: &SocketAddr, source: &std::io::Error) -> String {
    let key = match what {
        "http" => "http_listen",
        _ => "listen",
    };
    cutover_common::net::explain_bind(addr, source, &format!("set `{key}` in coordinator.toml"))
}

/// Binds `addr`, waiting a little while it is in use: a coordinator
/// restarted right after a crash (systemd, an operator) may find the dying
/// process's sockets still there for a moment.
pub(crate) async fn bind_listener(
    what: &'static str,
    addr: SocketAddr,
) -> Result<TcpListener, ServerError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(what, %addr, "address in use; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(source) => return Err(ServerError::Bind { what, addr, source }),
        }
    }
}

async fn sweep_loop(registry: Arc<Registry>, limits: Limits, shutdown: CancellationToken) {
    let max_events = limits.max_events;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut count: u32 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        count = count.wrapping_add(1);
        let checkpoint = count.is_multiple_of(CHECKPOINT_EVERY);
        registry.sweep(checkpoint);
        // Right after start-up too: what a restart does to the event log
        // shows at once, not half a minute later.
        if count % CHECKPOINT_EVERY == 1 {
            match registry.store().events.prune(max_events).await {
                Ok(pruned) if count == 1 => {
                    tracing::info!(pruned, max_events, "event log pruned at start-up")
                }
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, max_events, "pruned old events"),
                Err(error) => tracing::error!(%error, "cannot prune events"),
            }
            match registry
                .store()
                .access
                .prune_audit(limits.max_audit_entries)
                .await
            {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(
                    pruned,
                    max = limits.max_audit_entries,
                    "pruned old audit entries"
                ),
                Err(error) => tracing::error!(%error, "cannot prune the audit log"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ServerError;

    #[test]
    fn a_listener_that_cannot_bind_names_the_key_to_change() {
        let error = |what, kind| ServerError::Bind {
            what,
            addr: "0.0.0.0:443".parse().unwrap(),
            source: std::io::Error::from(kind),
        };
        let taken = error("grpc", std::io::ErrorKind::AddrInUse).to_string();
        assert!(
            taken.starts_with("cannot bind the grpc listener on 0.0.0.0:443: ")
                && taken.contains("`ss -ltnp 'sport = :443'`")
                && taken.contains("set `listen` in coordinator.toml"),
            "{taken}"
        );
        let low = error("http", std::io::ErrorKind::PermissionDenied).to_string();
        assert!(
            low.contains("CAP_NET_BIND_SERVICE") && low.contains("set `http_listen`"),
            "{low}"
        );
    }
}
