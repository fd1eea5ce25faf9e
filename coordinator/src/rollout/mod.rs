//! Rollouts: creating them from a spec (or a rollback), and the driver that
//! runs each one: it feeds the pure engine with command results, heartbeats,
//! operator requests and the clock, persists every change before the
//! commands it implies go out, and picks running rollouts up again after a
//! restart.

mod admission;
#[cfg(test)]
mod analysis_tests;
#[cfg(test)]
mod approval_tests;
mod balancer;
#[cfg(test)]
mod blue_green_tests;
#[cfg(test)]
mod canary_tests;
pub mod capacity;
mod config;
mod converge;
pub mod deployment;
mod driver;
pub mod engine;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod fast_tests;
mod history;
#[cfg(test)]
mod hooks_tests;
mod locks;
#[cfg(test)]
mod migrate_tests;
pub mod model;
mod node_fit;
mod pins;
mod planner;
#[cfg(test)]
mod policy_tests;
mod retry;
mod rollback;
mod scale;
#[cfg(test)]
pub(crate) mod sim;
mod states;
mod stopping;
#[cfg(test)]
mod stopping_tests;
mod variant;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::images::ImageResolver;
use crate::metrics::Metrics;
use crate::notify::deliver::Sender;
use crate::notify::Notifier;
use crate::registry::Registry;
use crate::secrets::{SecretError, Secrets};
use crate::spec::SpecError;
use crate::store::{ReleaseRecord, Store, StoreError};
pub use config::ConfigChange;
use driver::Handle;
use engine::Input;
use model::Rollout;
use planner::Target;
pub use planner::{DeployRequest, Deployed};
pub use rollback::RollbackRequest;
pub use scale::ScaleChange;
pub use stopping::{StartRequest, StopRequest};

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no node matches {selector} for service {service} in environment {env}; `cutover nodes` shows each node's labels")]
    NoNodes {
        env: String,
        service: String,
        selector: String,
    },
    #[error("nodes {nodes} of service {service} are unreachable; bring them back, or pass --allow-unreachable to roll out without them")]
    Unreachable { service: String, nodes: String },
    /// A stop finds no node to stop the service on.
    #[error("every node of {service} in {env} is unreachable ({nodes}), so nothing can be stopped now; bring one back and run it again (a node that comes back after the stop is stopped then)")]
    NoneReachable {
        env: String,
        service: String,
        nodes: String,
    },
    #[error("the agents of nodes {nodes} cannot run {what}; upgrade them (see `cutover nodes`), or {instead}")]
    AgentsTooOld {
        nodes: String,
        what: String,
        instead: &'static str,
    },
    #[error("a blue/green deploy runs the new release beside the serving one on every node until the switch, and {}; free memory there, or deploy with kind = \"rolling\" or \"canary\"", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NoRoom(Vec<capacity::Shortfall>),
    #[error("rollout {id} ({state}) is already in progress for {service} in {env}; wait for it, or stop it with `cutover rollout abort {id}`")]
    Locked {
        id: String,
        state: &'static str,
        env: String,
        service: String,
    },
    #[error("deployment {deployment} will roll out {service} in {env} after the services before it; wait for it, or abort its running rollout (`cutover rollout list` shows it)")]
    Claimed {
        deployment: String,
        env: String,
        service: String,
    },
    #[error("node {node} is not a target node of {service} in {env}; --migrate-node names one of: {targets}")]
    MigrateNode {
        node: String,
        service: String,
        env: String,
        targets: String,
    },
    #[error("no rollout {0:?}; `cutover rollout list` shows them")]
    NotFound(String),
    #[error("rollout {id} did not take the {action} in: the coordinator is shutting down; try again once it is back")]
    Interrupted { id: String, action: &'static str },
    #[error("rollout {id} already ended ({state}); nothing to {action}")]
    Finished {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("{0}")]
    NoRollbackTarget(String),
    #[error("{0}")]
    NotRetryable(String),
    #[error("artifact {0} is not in the coordinator's artifact store; push it with `cutover artifact push FILE`")]
    ArtifactMissing(String),
    #[error(transparent)]
    Image(#[from] cutover_common::registry::RegistryError),
    #[error("{0}")]
    NoVersion(String),
    #[error("{0}")]
    EnvironmentPinned(String),
    #[error("{0}; or an admin deploys without it: --skip-backup-gate --reason TEXT")]
    BackupGate(String),
    #[error("{0}")]
    Frozen(String),
    /// An operator locked the service (`cutover lock`).
    #[error("{0}")]
    ManuallyLocked(String),
    #[error("{0}")]
    NotPromoted(String),
    /// A `cutover config set` that cannot be made.
    #[error("{0}")]
    BadConfig(String),
    /// A `cutover scale` to a count no node runs.
    #[error("{0}")]
    BadScale(String),
    #[error("{0}")]
    NoCurrent(String),
    /// The service is stopped or removed (`cutover service stop|remove`).
    #[error("{0}")]
    Stopped(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rollout that runs now, and what it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub id: String,
    pub env: String,
    pub service: String,
}

/// What a deploy started, per service: a rollout, or nothing because the
/// release already runs everywhere.
pub enum Started {
    Rollout(Box<Rollout>),
    NoOp {
        service: String,
        release_id: String,
        message: String,
    },
}

pub struct Rollouts {
    store: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    artifacts: Arc<crate::artifacts::ArtifactStore>,
    images: Arc<ImageResolver>,
    secrets: Arc<Secrets>,
    running: Mutex<HashMap<String, Handle>>,
    /// Orders this coordinator's check-then-create sequences (the
    /// converger's second look, a deploy's checks of several services).
    /// What makes a service exclusive, also across coordinators, is the
    /// deploy lock in the store (`locks.rs`).
    create: tokio::sync::Mutex<()>,
    /// Webhooks of the rollouts' events (`[[notify]]`).
    notifier: Notifier,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Rollouts {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        artifacts: Arc<crate::artifacts::ArtifactStore>,
        images: Arc<ImageResolver>,
        secrets: Arc<Secrets>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let tasks = TaskTracker::new();
        let notifier = Notifier::start(
            Sender::new(secrets.clone(), registry.journal().clone(), metrics.clone()),
            shutdown.clone(),
            &tasks,
        );
        Arc::new(Self {
            store,
            registry,
            metrics,
            artifacts,
            images,
            secrets,
            running: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
            notifier,
            shutdown,
            tasks,
        })
    }

    /// Where webhooks go out (levers send theirs there too).
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// Picks up every rollout and deployment a previous run left
    /// unfinished; returns how many.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        self.reconcile_locks().await?;
        let unfinished: Vec<Rollout> = self
            .store
            .rollouts
            .list()
            .await?
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .collect();
        let count = unfinished.len();
        for rollout in unfinished {
            tracing::info!(rollout = %rollout.id, state = rollout.state.as_str(), "resuming rollout after restart");
            self.spawn(rollout, Input::Recover);
        }
        Ok(count + self.recover_deployments().await?)
    }

    /// Waits for the rollout tasks to stop after shutdown, within `grace`.
    pub async fn drain(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("rollout tasks did not stop in time");
        }
    }

    /// What one service started, or the deployment of several.
    /// A rollout, live when it runs, else as stored.
    pub async fn get(&self, id: &str) -> Result<Rollout, RolloutError> {
        if let Some(handle) = self.running.lock().expect("rollouts lock").get(id) {
            return Ok((**handle.watch.borrow()).clone());
        }
        self.store
            .rollouts
            .get(id)
            .await?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// Every rollout, newest first, live ones as they are now.
    pub async fn list(&self) -> Result<Vec<Rollout>, RolloutError> {
        let mut all = self.store.rollouts.list().await?;
        let running = self.running.lock().expect("rollouts lock");
        for rollout in &mut all {
            if let Some(handle) = running.get(&rollout.id) {
                *rollout = (**handle.watch.borrow()).clone();
            }
        }
        all.reverse();
        Ok(all)
    }

    /// The rollouts this coordinator runs now, by id.
    pub fn running(&self) -> Vec<Running> {
        let mut running: Vec<Running> = self
            .running
            .lock()
            .expect("rollouts lock")
            .iter()
            .map(|(id, handle)| {
                let rollout = handle.watch.borrow();
                Running {
                    id: id.clone(),
                    env: rollout.env.clone(),
                    service: rollout.service.clone(),
                }
            })
            .collect();
        running.sort_by(|a, b| a.id.cmp(&b.id));
        running
    }

    /// Changes of a running rollout; `None` when it no longer runs.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Arc<Rollout>>> {
        self.running
            .lock()
            .expect("rollouts lock")
            .get(id)
            .map(|h| h.watch.clone())
    }

    pub async fn release_history(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Vec<ReleaseRecord>, RolloutError> {
        Ok(self.store.releases.history(env, service).await?)
    }
}
