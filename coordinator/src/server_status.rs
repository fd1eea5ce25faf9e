//! `ServerService.Status`: what a coordinator says about itself (single,
//! leading, or following whom) and the health of the store under it. The
//! leader and its followers answer it alike, so `cutover server status`
//! asks every coordinator an operator lists.

use std::sync::Arc;

use cutover_common::identity::Role;
use cutover_common::tls::PeerInfo;
use cutover_proto::v1::{
    server_service_server::ServerService, ServerRole, ServerStatusRequest, ServerStatusResponse,
    StoreMember,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::config::{CoordinatorConfig, StoreKind};
use crate::store::{EtcdHealth, Leader};

/// Where this coordinator stands.
#[derive(Clone)]
pub enum Standing {
    /// The embedded store (or an unelected etcd store): it acts alone.
    Single {
        since_ms: i64,
    },
    Leading {
        token: i64,
        since_ms: i64,
    },
    /// The leader as the campaign last saw it, and since when.
    Following(watch::Receiver<Option<(Leader, i64)>>),
}

#[derive(Clone)]
pub struct StatusApi {
    inner: Arc<Inner>,
}

struct Inner {
    identity: String,
    store: StoreKind,
    standing: Standing,
    health: Option<EtcdHealth>,
}

impl StatusApi {
    pub fn new(config: &CoordinatorConfig, standing: Standing, health: Option<EtcdHealth>) -> Self {
        Self {
            inner: Arc::new(Inner {
                identity: identity(config),
                store: config.store,
                standing,
                health,
            }),
        }
    }

    /// This coordinator's address as the others and the CLI see it.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    pub async fn status(&self, store_health: bool) -> ServerStatusResponse {
        let inner = &self.inner;
        let (role, leader, leader_token, since_ms) = match &inner.standing {
            Standing::Single { since_ms } => {
                (ServerRole::Single, inner.identity.clone(), 0, *since_ms)
            }
            Standing::Leading { token, since_ms } => (
                ServerRole::Leading,
                inner.identity.clone(),
                *token,
                *since_ms,
            ),
            Standing::Following(observed) => match observed.borrow().as_ref() {
                Some((leader, since_ms)) => (
                    ServerRole::Following,
                    leader.identity.clone(),
                    leader.token,
                    *since_ms,
                ),
                None => (ServerRole::Following, String::new(), 0, 0),
            },
        };
        let store_members = match (&inner.health, store_health) {
            (Some(health), true) => health
                .members()
                .await
                .into_iter()
                .map(|member| StoreMember {
                    healthy: member.error.is_none(),
                    endpoint: member.endpoint,
                    version: member.version,
                    db_size_bytes: member.db_size_bytes,
                    raft_term: member.raft_term,
                    raft_leader: member.raft_leader,
                    error: member.error.unwrap_or_default(),
                })
                .collect(),
            _ => Vec::new(),
        };
        ServerStatusResponse {
            identity: inner.identity.clone(),
            role: role as i32,
            leader,
            leader_token: leader_token.max(0) as u64,
            since_ms: since_ms.max(0) as u64,
            store: match inner.store {
                StoreKind::Sled => "sled",
                StoreKind::Etcd => "etcd",
            }
            .to_string(),
            store_members,
            version: cutover_common::VERSION.to_string(),
        }
    }
}

#[tonic::async_trait]
impl ServerService for StatusApi {
    async fn status(
        &self,
        request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        // A follower has no access store to consult: any operator
        // certificate the installation's CA issued may ask.
        let operator = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.identity.as_ref())
            .is_some_and(|identity| identity.role == Role::Operator);
        if !operator {
            return Err(Status::permission_denied(
                "only operator certificates may ask for the server status; use one issued with `cutover ca issue operator` or `cutover operator create`",
            ));
        }
        let store_health = request.into_inner().store_health;
        Ok(Response::new(self.status(store_health).await))
    }
}

/// What the leader key says about this coordinator: `etcd.advertise`, or
/// this host's name and the gRPC port.
pub fn identity(config: &CoordinatorConfig) -> String {
    config
        .etcd
        .as_ref()
        .and_then(|etcd| etcd.advertise.clone())
        .unwrap_or_else(|| {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into());
            format!("https://{host}:{}", config.listen.port())
        })
}
