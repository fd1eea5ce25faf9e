//! What a coordinator answers calls with, over one store, before anything
//! acts: the leader (or the single coordinator) recovers its rollouts and
//! job runs and starts its loops on these; a follower answers reads with
//! them over a read-only view of the same store. One constructor serves
//! both, so a follower's read is the leader's read.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::artifacts::ArtifactStore;
use crate::config::CoordinatorConfig;
use crate::images::ImageResolver;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::operator_api::OperatorApi;
use crate::registry::Registry;
use crate::rollout::Rollouts;
use crate::secrets::{MasterKeys, Secrets};
use crate::server::ServerError;
use crate::store::Store;

pub(crate) struct Services {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub artifacts: Arc<ArtifactStore>,
    pub pki: Arc<crate::ca::Pki>,
    pub access: Arc<Access>,
    pub secrets: Arc<Secrets>,
    pub rollouts: Arc<Rollouts>,
    pub jobs: Arc<crate::jobs::Jobs>,
    pub levers: Arc<crate::levers::Levers>,
}

impl Services {
    /// Opens every part on `store`; nothing runs yet (no rollout resumed,
    /// no loop started). `shutdown` ends what the parts start later.
    pub async fn open(
        config: &CoordinatorConfig,
        store: Store,
        shutdown: &CancellationToken,
    ) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::new());
        let journal = Journal::start(store.clone(), metrics.journal_pending.clone());
        let registry =
            Arc::new(Registry::load(store.clone(), journal, config.heartbeat_ttl).await?);
        let artifacts = Arc::new(
            ArtifactStore::open(
                config.data_dir.join("artifacts"),
                config.limits.max_artifact_bytes as u64,
            )
            .map_err(|source| ServerError::DataDir {
                path: config.data_dir.join("artifacts"),
                source,
            })?,
        );
        let credentials = cutover_common::registry::load_credentials(&config.registries)
            .map_err(ServerError::Registries)?;
        let images = Arc::new(
            ImageResolver::new(config.registry_ca.as_deref(), credentials)
                .map_err(|e| ServerError::Registries(e.to_string()))?,
        );
        let pki = Arc::new(
            crate::ca::Pki::open(
                config.tls.clone(),
                config.ca_key.clone(),
                store.clone(),
                registry.journal().clone(),
            )
            .await?,
        );
        let access = Arc::new(Access::new(store.clone()));
        let master_keys = match &config.master_key_file {
            Some(path) => Some(MasterKeys::load(path).map_err(ServerError::Secrets)?),
            None => None,
        };
        let secrets = Arc::new(
            Secrets::new(store.clone(), master_keys)
                .with_metrics(metrics.clone())
                .await
                .map_err(ServerError::Secrets)?,
        );
        let rollouts = Rollouts::new(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            artifacts.clone(),
            images,
            secrets.clone(),
            shutdown.clone(),
        );
        let jobs = crate::jobs::Jobs::new(
            store.clone(),
            registry.clone(),
            secrets.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        for lock in store.rollouts.manual_locks("").await? {
            metrics
                .locks
                .set(&lock.env, &lock.service, Some(lock.at_ms));
        }
        let levers = crate::levers::Levers::new(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            rollouts.notifier(),
            shutdown.clone(),
        )
        .await?;
        Ok(Self {
            metrics,
            registry,
            artifacts,
            pki,
            access,
            secrets,
            rollouts,
            jobs,
            levers,
        })
    }

    /// The operator API on these parts.
    pub fn operator_api(&self, shutdown: &CancellationToken) -> OperatorApi {
        OperatorApi {
            metrics: self.metrics.clone(),
            jobs: self.jobs.clone(),
            agent_upgrades: crate::agent_upgrade::AgentUpgrades::new(self.registry.clone()),
            registry: self.registry.clone(),
            artifacts: self.artifacts.clone(),
            rollouts: self.rollouts.clone(),
            access: self.access.clone(),
            pki: self.pki.clone(),
            secrets: self.secrets.clone(),
            levers: self.levers.clone(),
            shutdown: shutdown.clone(),
        }
    }
}
