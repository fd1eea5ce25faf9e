//! Rollouts: creating them from a spec (or a rollback), and the driver that
//! runs each one: it feeds the pure engine with command results, heartbeats,
//! operator requests and the clock, persists every change before the
//! commands it implies go out, and picks running rollouts up again after a
//! restart.

mod converge;
pub mod deployment;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod model;
mod rollback;
#[cfg(test)]
pub(crate) mod sim;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_common::now_ms;
use cutover_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::images::{ImageResolver, PinnedImage};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::secrets::{SecretError, Secrets};
use crate::spec::{selects, AppSpec, SpecError, Strategy};
use crate::store::{
    NewEvent, NodeStatus, ReleaseRecord, ReleaseState, ServiceOutcome, Store, StoreError,
};
use deployment::{Deployment, DeploymentState, DeploymentStep, StepState};
use engine::{Input, Observation, Outcome, ServiceObservation};
use model::{NodeState, Phase, Rollout, RolloutKind, RolloutNode, RolloutState, StoredRelease};
pub use rollback::RollbackRequest;

/// How often a running rollout looks at heartbeats and deadlines.
const TICK: Duration = Duration::from_millis(250);
/// Pause before resending a command to a node that was not connected.
const RESEND_DELAY: Duration = Duration::from_millis(500);
/// A command without an answer this long is sent again (same id).
const RESEND_EVERY: Duration = Duration::from_secs(15);
/// Releases kept per service and environment (the current one always).
const RELEASES_KEPT: usize = 10;
/// Finished converge rollouts kept (besides `FINISHED_ROLLOUTS_KEPT`).
const CONVERGE_ROLLOUTS_KEPT: usize = 100;
/// How long an operator's deploy waits for a convergence it aborted.
const CONVERGE_YIELD: Duration = Duration::from_secs(60);
/// Inputs taken in at most before the rollout is written (see `run`).
const GROUP_INPUTS: usize = 512;
/// Finished rollouts kept, with their timelines; older ones are deleted.
const FINISHED_ROLLOUTS_KEPT: usize = 1000;

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
    #[error("no rollout {0:?}; `cutover rollout list` shows them")]
    NotFound(String),
    #[error("rollout {id} already ended ({state}); nothing to {action}")]
    Finished {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("{0}")]
    NoRollbackTarget(String),
    #[error("artifact {0} is not in the coordinator's artifact store; push it with `cutover artifact push FILE`")]
    ArtifactMissing(String),
    #[error(transparent)]
    Image(#[from] cutover_common::registry::RegistryError),
    #[error("{0}")]
    NoVersion(String),
    #[error("{0}")]
    EnvironmentPinned(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A deploy as the operator asked for it.
pub struct DeployRequest {
    pub spec_text: String,
    pub spec_file: String,
    pub env: String,
    pub service: Option<String>,
    /// Empty: the tag of the image deployed.
    pub version: String,
    /// For services that run as processes.
    pub artifact: Option<pb::Artifact>,
    /// For services that run as containers, over the spec's `image`.
    pub image: Option<String>,
    pub allow_unreachable: bool,
    pub by: String,
    /// May set or change which nodes an environment selects (an admin, or
    /// a deployer not limited to environments).
    pub may_pin_environments: bool,
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

/// What a rollout of one service is to do, before the nodes are picked.
struct Target {
    app: String,
    env: String,
    service: String,
    kind: RolloutKind,
    release: pb::Release,
    previous: Option<StoredRelease>,
    selector: BTreeMap<String, String>,
    strategy: Strategy,
    /// The deployment it is a step of, or empty.
    deployment: String,
    /// Said first in its timeline (a forced rollback's).
    warning: Option<String>,
}

/// Everything needed to launch a rollout of one service.
struct Plan {
    target: Target,
    nodes: Vec<RolloutNode>,
    skipped: Vec<String>,
}

/// What a deploy started.
pub enum Deployed {
    /// One service: its rollout, or nothing to do.
    Alone(Vec<Started>),
    /// Several services, rolled out one after another.
    Together(Box<Deployment>),
}

/// An operator's request to a running rollout, answered with the rollout
/// once taken in.
type Control = (Input, oneshot::Sender<Rollout>);

struct Handle {
    control: mpsc::UnboundedSender<Control>,
    watch: watch::Receiver<Arc<Rollout>>,
}

pub struct Rollouts {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    artifacts: Arc<crate::artifacts::ArtifactStore>,
    images: Arc<ImageResolver>,
    secrets: Arc<Secrets>,
    running: Mutex<HashMap<String, Handle>>,
    /// Held while checking the deploy lock and creating, so two deploys of
    /// one service cannot both pass the check.
    create: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Rollouts {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        artifacts: Arc<crate::artifacts::ArtifactStore>,
        images: Arc<ImageResolver>,
        secrets: Arc<Secrets>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            registry,
            metrics,
            artifacts,
            images,
            secrets,
            running: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    /// Picks up every rollout and deployment a previous run left
    /// unfinished; returns how many.
    pub fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let unfinished: Vec<Rollout> = self
            .store
            .rollouts()?
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .collect();
        let count = unfinished.len();
        for rollout in unfinished {
            tracing::info!(rollout = %rollout.id, state = rollout.state.as_str(), "resuming rollout after restart");
            self.spawn(rollout, Input::Recover);
        }
        Ok(count + self.recover_deployments()?)
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
    pub async fn deploy(
        self: &Arc<Self>,
        request: DeployRequest,
    ) -> Result<Deployed, RolloutError> {
        let file = request.spec_file.as_str();
        let spec = AppSpec::parse(&request.spec_text, file)?;
        let services = spec.services_for(request.service.as_deref(), file)?;
        let environment = spec.environment(file, &request.env)?;
        // Which nodes an environment covers is the coordinator's to keep,
        // not each spec's: a deployer limited to staging must not point
        // "staging" at production's nodes. The first deploy pins it (only
        // someone allowed to: an admin or an unlimited deployer), later
        // specs must select the same nodes unless such a caller changes it.
        let pinned = self.store.environment(&request.env)?;
        if pinned.as_ref() != Some(&environment.nodes) {
            if !request.may_pin_environments {
                return Err(RolloutError::EnvironmentPinned(match pinned {
                    Some(pinned) => format!(
                        "environment {} selects {} on this coordinator, but the spec says {}; only an admin (or a deployer of every environment) can change that",
                        request.env,
                        show_selector(&pinned),
                        show_selector(&environment.nodes)
                    ),
                    None => format!(
                        "environment {} has never been deployed: an admin (or a deployer of every environment) deploys it first, which pins the nodes it selects",
                        request.env
                    ),
                }));
            }
            self.store
                .put_environment(&request.env, &environment.nodes)?;
            tracing::info!(env = %request.env, selector = %show_selector(&environment.nodes), by = %request.by, "environment pinned");
        }
        // Each image is pinned once, before anything is created: every
        // service (and node) of this deploy runs the same digest.
        let mut pinned: BTreeMap<String, PinnedImage> = BTreeMap::new();
        let mut images: BTreeMap<&str, String> = BTreeMap::new();
        for service in &services {
            let spec_image = spec.services[service].image.clone();
            if spec.services[service].runtime != "docker" {
                continue;
            }
            let Some(reference) = request.image.clone().or(spec_image) else {
                continue; // resolve() says what is missing
            };
            if !pinned.contains_key(&reference) {
                let image = self.images.pin(&reference).await?;
                pinned.insert(reference.clone(), image);
            }
            images.insert(service, pinned[&reference].image.clone());
        }
        // After what is wrong with the request itself: a missing artifact is
        // the last thing to complain about.
        if let Some(artifact) = request
            .artifact
            .as_ref()
            .filter(|a| a.url == "coordinator:" && !self.artifacts.contains(&a.digest))
        {
            return Err(RolloutError::ArtifactMissing(artifact.digest.clone()));
        }
        let version = if request.version.is_empty() {
            let tags: std::collections::BTreeSet<_> =
                pinned.values().filter_map(|p| p.tag.clone()).collect();
            match (tags.len(), pinned.values().all(|p| p.tag.is_some())) {
                (1, true) => tags.into_iter().next().expect("one tag"),
                _ => {
                    return Err(RolloutError::NoVersion(
                        "give the release a version label with --version (it defaults to the image's tag only when every image of the deploy has the same one)".into(),
                    ))
                }
            }
        } else {
            request.version.clone()
        };
        // Every service resolves before anything is created.
        let resolved = services
            .iter()
            .map(|service| {
                spec.resolve(
                    file,
                    &request.env,
                    service,
                    &version,
                    request.artifact.as_ref(),
                    images.get(service.as_str()).map(String::as_str),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Secrets are pinned to their current versions, which the release
        // id covers: a new version is a new release, rolled out like one.
        let mut resolved = resolved;
        for service in &mut resolved {
            let release = &mut service.release;
            for secret in &mut release.secrets {
                secret.version = self.secrets.current(&service.env, &secret.name)?;
            }
            if !release.secrets.is_empty() {
                release.release_id = crate::spec::release_id(release);
            }
        }
        let _creating = self.create.lock().await;
        if resolved.len() > 1 {
            return Ok(Deployed::Together(Box::new(
                self.deploy_together(resolved, &request).await?,
            )));
        }
        let mut started = Vec::new();
        for resolved in resolved {
            self.make_way(&resolved.env, &resolved.service, &request.by)
                .await;
            let previous = self.current_release(&resolved.env, &resolved.service)?;
            let plan = self.plan(
                Target {
                    app: resolved.app,
                    env: resolved.env,
                    service: resolved.service,
                    kind: RolloutKind::Deploy,
                    release: resolved.release,
                    previous,
                    selector: resolved.selector,
                    strategy: resolved.strategy,
                    deployment: String::new(),
                    warning: None,
                },
                request.allow_unreachable,
            )?;
            started.push(self.launch(plan, &request.by)?);
        }
        Ok(Deployed::Alone(started))
    }

    /// Several services: one deployment, checked whole before it starts
    /// (no service of it may be locked), whose driver rolls them out in
    /// order, starting with the first at once.
    async fn deploy_together(
        self: &Arc<Self>,
        resolved: Vec<crate::spec::Resolved>,
        request: &DeployRequest,
    ) -> Result<Deployment, RolloutError> {
        for (i, service) in resolved.iter().enumerate() {
            // A convergence of a later service is stopped when its turn
            // comes (meanwhile the deployment's claim keeps new ones out):
            // stopped now, it would count as the operator's choice if the
            // deployment never got there.
            if i == 0 {
                self.make_way(&service.env, &service.service, &request.by)
                    .await;
            }
            // The same checks the driver meets at each step, now, so a
            // deploy that cannot start is refused whole.
            let checked = self.plan(
                Target {
                    app: service.app.clone(),
                    env: service.env.clone(),
                    service: service.service.clone(),
                    kind: RolloutKind::Deploy,
                    release: service.release.clone(),
                    previous: None,
                    selector: service.selector.clone(),
                    strategy: service.strategy.clone(),
                    deployment: String::new(),
                    warning: None,
                },
                request.allow_unreachable,
            );
            match checked {
                Ok(_) => {}
                Err(RolloutError::Locked { id, .. })
                    if i > 0 && self.get(&id).is_ok_and(|r| r.kind == RolloutKind::Converge) => {}
                Err(error) => return Err(error),
            }
        }
        let first = &resolved[0];
        let now = now_ms();
        let deployment = Deployment {
            id: format!("{}-d{}", first.app, self.store.next_rollout_number()?),
            app: first.app.clone(),
            env: first.env.clone(),
            state: DeploymentState::Running,
            steps: resolved
                .into_iter()
                .map(|service| DeploymentStep {
                    service: service.service,
                    release: StoredRelease(service.release),
                    selector: service.selector,
                    strategy: service.strategy,
                    state: StepState::Waiting,
                    rollout_id: String::new(),
                    previous: None,
                    rollback_rollout_id: String::new(),
                })
                .collect(),
            allow_unreachable: request.allow_unreachable,
            created_by: request.by.clone(),
            created_at_ms: now,
            finished_at_ms: None,
            error: String::new(),
        };
        self.start_deployment(deployment.clone())?;
        Ok(deployment)
    }

    /// An operator's deploy or rollback goes before a convergence: a
    /// converge rollout of the service is aborted and waited for (nodes in
    /// the middle of their cutover finish it), within `CONVERGE_YIELD`;
    /// after that the deploy meets the usual lock.
    async fn make_way(&self, env: &str, service: &str, by: &str) {
        let converging = self
            .running
            .lock()
            .expect("rollouts lock")
            .iter()
            .find(|(_, h)| {
                let r = h.watch.borrow();
                r.env == env && r.service == service && r.kind == RolloutKind::Converge
            })
            .map(|(id, h)| (id.clone(), h.watch.clone()));
        let Some((id, mut watch)) = converging else {
            return;
        };
        tracing::info!(rollout = %id, %env, %service, %by, "aborting a convergence for an operator's rollout");
        let _ = self
            .control(
                &id,
                Input::Abort {
                    by: format!("{by}, deploying"),
                },
            )
            .await;
        let _ = tokio::time::timeout(CONVERGE_YIELD, async {
            while !watch.borrow_and_update().state.is_terminal() {
                if watch.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn current_release(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<StoredRelease>, StoreError> {
        Ok(self
            .store
            .releases(env, service)?
            .into_iter()
            .find(|r| r.current)
            .map(|r| r.release))
    }

    /// Whether anything but `deployment` holds `service` of `env`: a
    /// running rollout of it, or a deployment that has yet to roll it out.
    fn check_free(&self, env: &str, service: &str, deployment: &str) -> Result<(), RolloutError> {
        if let Some(running) = self
            .store
            .rollouts()?
            .into_iter()
            .find(|r| !r.state.is_terminal() && r.env == env && r.service == service)
        {
            return Err(RolloutError::Locked {
                id: running.id,
                state: running.state.as_str(),
                env: env.to_string(),
                service: service.to_string(),
            });
        }
        if let Some(claimed) = self
            .store
            .deployments()?
            .into_iter()
            .find(|d| d.id != deployment && d.claims(env, service))
        {
            return Err(RolloutError::Claimed {
                deployment: claimed.id,
                env: env.to_string(),
                service: service.to_string(),
            });
        }
        Ok(())
    }

    /// Picks the nodes of `target`, once nothing else holds its service.
    fn plan(&self, target: Target, allow_unreachable: bool) -> Result<Plan, RolloutError> {
        self.check_free(&target.env, &target.service, &target.deployment)?;
        let (env, service, selector, release) = (
            target.env.clone(),
            target.service.clone(),
            &target.selector,
            &target.release,
        );
        let views: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|v| selects(selector, &v.record.labels))
            .collect();
        if views.is_empty() {
            let selector = selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            return Err(RolloutError::NoNodes {
                env,
                service,
                selector,
            });
        }
        let (reachable, unreachable): (Vec<_>, Vec<_>) = views
            .into_iter()
            .partition(|v| v.connected && v.record.status == NodeStatus::Ready);
        let skipped: Vec<String> = unreachable.iter().map(|v| v.record.name.clone()).collect();
        if !skipped.is_empty() && (!allow_unreachable || reachable.is_empty()) {
            return Err(RolloutError::Unreachable {
                service,
                nodes: skipped.join(", "),
            });
        }
        let nodes = reachable
            .into_iter()
            .map(|v| {
                let running = v.record.services.iter().find(|s| s.service == service);
                let from_release = running.map(|s| s.release_id.clone()).unwrap_or_default();
                let unchanged =
                    running.is_some_and(|s| s.release_id == release.release_id && s.running);
                RolloutNode {
                    id: v.record.id.clone(),
                    name: v.record.name.clone(),
                    state: if unchanged {
                        NodeState::Unchanged
                    } else {
                        NodeState::Pending
                    },
                    release: from_release.clone(),
                    from_release,
                    batch: None,
                    command_id: None,
                    command_deadline_ms: 0,
                    step: String::new(),
                    detail: String::new(),
                    switched_at_ms: 0,
                    seen_healthy: false,
                    lost_since_ms: None,
                    uncertain: false,
                }
            })
            .collect();
        Ok(Plan {
            target,
            nodes,
            skipped,
        })
    }

    fn launch(self: &Arc<Self>, plan: Plan, by: &str) -> Result<Started, RolloutError> {
        let Plan {
            target: plan_target,
            nodes,
            skipped,
        } = plan;
        let release_id = plan_target.release.release_id.clone();
        let targets = nodes
            .iter()
            .filter(|n| n.state == NodeState::Pending)
            .count();
        if targets == 0 {
            return Ok(Started::NoOp {
                message: format!(
                    "{release_id} already runs on all {} nodes of {} in {}; nothing to do",
                    nodes.len(),
                    plan_target.service,
                    plan_target.env
                ),
                service: plan_target.service,
                release_id,
            });
        }
        let number = self.store.next_rollout_number()?;
        let id = format!("{}-{number}", plan_target.service);
        let nonce: u32 = rand::random();
        let batch_size = plan_target.strategy.batch.nodes(targets) as u32;
        let now = now_ms();
        let mut rollout = Rollout {
            command_prefix: format!("{id}.{nonce:08x}"),
            id: id.clone(),
            app: plan_target.app.clone(),
            env: plan_target.env.clone(),
            service: plan_target.service.clone(),
            kind: plan_target.kind,
            state: RolloutState::Pending,
            phase: Phase::Prepare,
            release: StoredRelease(plan_target.release),
            previous: plan_target.previous,
            strategy: plan_target.strategy.clone(),
            nodes,
            skipped: skipped.clone(),
            batch_size,
            batches: (targets as u32).div_ceil(batch_size),
            deadline_ms: 0,
            paused_at_ms: None,
            lost_grace_until_ms: 0,
            node_lost_after_ms: self.registry.ttl().as_millis() as u64 * 2,
            pause_requested: false,
            abort_requested: false,
            error: None,
            rollback_failures: Vec::new(),
            created_by: by.to_string(),
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            next_command: 1,
            timeline: Vec::new(),
            deployment: plan_target.deployment,
        };
        if let Some(warning) = plan_target.warning {
            rollout.timeline.push(model::TimelineEntry {
                at_ms: now,
                kind: "warning".into(),
                node: String::new(),
                message: warning,
            });
        }
        if !skipped.is_empty() {
            rollout.timeline.push(model::TimelineEntry {
                at_ms: now,
                kind: "nodes_skipped".into(),
                node: String::new(),
                message: format!(
                    "unreachable at the start, skipped on request: {}",
                    skipped.join(", ")
                ),
            });
        }
        if plan_target.kind == RolloutKind::Deploy {
            // Deploying the current release again (to repair a node) keeps
            // it current and stable whatever this rollout's outcome.
            let current = self
                .store
                .releases(&plan_target.env, &plan_target.service)?
                .into_iter()
                .any(|r| r.current && r.release.id() == release_id);
            self.store.put_release(&ReleaseRecord {
                app: plan_target.app,
                env: plan_target.env,
                service: plan_target.service,
                release: rollout.release.clone(),
                state: if current {
                    ReleaseState::Stable
                } else {
                    ReleaseState::Deploying
                },
                current,
                deployed_by: by.to_string(),
                deployed_at_ms: now,
                rollout_id: id.clone(),
                selector: plan_target.selector,
                strategy: plan_target.strategy,
                note: String::new(),
            })?;
        }
        self.store.put_rollout(&rollout)?;
        self.record(
            &rollout,
            "rollout_created",
            "",
            format!(
                "{by} started {} of {release_id} ({id})",
                rollout.kind.as_str()
            ),
        );
        self.spawn(rollout.clone(), Input::Start);
        Ok(Started::Rollout(Box::new(rollout)))
    }

    fn record(&self, rollout: &Rollout, kind: &str, node: &str, message: String) {
        tracing::info!(rollout = %rollout.id, event = kind, node, "{message}");
        let event = NewEvent {
            kind: "rollout",
            node_id: String::new(),
            node_name: node.to_string(),
            message: format!("{} {kind}: {message}", rollout.id),
        };
        if let Err(error) = self.store.append_event(event) {
            tracing::error!(%error, "cannot record a rollout event");
        }
    }

    fn spawn(self: &Arc<Self>, rollout: Rollout, first: Input) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (watch_tx, watch) = watch::channel(Arc::new(rollout.clone()));
        self.running
            .lock()
            .expect("rollouts lock")
            .insert(rollout.id.clone(), Handle { control, watch });
        self.metrics.rollouts_in_progress.inc();
        let this = self.clone();
        self.tasks.spawn(async move {
            let id = rollout.id.clone();
            this.run(rollout, first, control_rx, watch_tx).await;
            this.running.lock().expect("rollouts lock").remove(&id);
            this.metrics.rollouts_in_progress.dec();
        });
    }

    /// A rollout, live when it runs, else as stored.
    pub fn get(&self, id: &str) -> Result<Rollout, RolloutError> {
        if let Some(handle) = self.running.lock().expect("rollouts lock").get(id) {
            return Ok((**handle.watch.borrow()).clone());
        }
        self.store
            .rollout(id)?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// Every rollout, newest first, live ones as they are now.
    pub fn list(&self) -> Result<Vec<Rollout>, RolloutError> {
        let mut all = self.store.rollouts()?;
        let running = self.running.lock().expect("rollouts lock");
        for rollout in &mut all {
            if let Some(handle) = running.get(&rollout.id) {
                *rollout = (**handle.watch.borrow()).clone();
            }
        }
        all.reverse();
        Ok(all)
    }

    /// Changes of a running rollout; `None` when it no longer runs.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Arc<Rollout>>> {
        self.running
            .lock()
            .expect("rollouts lock")
            .get(id)
            .map(|h| h.watch.clone())
    }

    pub fn release_history(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Vec<ReleaseRecord>, RolloutError> {
        Ok(self.store.releases(env, service)?)
    }

    /// Asks a running rollout to pause, resume or abort.
    pub async fn control(&self, id: &str, input: Input) -> Result<Rollout, RolloutError> {
        let action = match &input {
            Input::Pause { .. } => "pause",
            Input::Resume { .. } => "resume",
            _ => "abort",
        };
        let (reply, answer) = oneshot::channel();
        let sent = {
            let running = self.running.lock().expect("rollouts lock");
            running
                .get(id)
                .is_some_and(|handle| handle.control.send((input, reply)).is_ok())
        };
        // The answer is the rollout once the request is taken in.
        match (sent, answer.await) {
            (true, Ok(rollout)) => Ok(rollout),
            _ => {
                let rollout = self.get(id)?;
                Err(RolloutError::Finished {
                    id: id.to_string(),
                    state: rollout.state.as_str(),
                    action,
                })
            }
        }
    }

    async fn run(
        self: &Arc<Self>,
        mut rollout: Rollout,
        first: Input,
        mut control: mpsc::UnboundedReceiver<Control>,
        watch: watch::Sender<Arc<Rollout>>,
    ) {
        let mut reply: Option<oneshot::Sender<Rollout>> = None;
        let (results_tx, mut results) = mpsc::unbounded_channel::<Input>();
        let mut commands: HashMap<String, AbortHandle> = HashMap::new();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut input = first;
        loop {
            let before = rollout.clone();
            let mut sends = engine::handle(&mut rollout, now_ms(), input);
            // Answers that arrived meanwhile are taken in before the one
            // write below: a batch of a hundred nodes answering costs a few
            // writes, not one per node. The engine is pure, so this is the
            // same as handling them one by one.
            for _ in 0..GROUP_INPUTS {
                if rollout.state.is_terminal() {
                    break;
                }
                match results.try_recv() {
                    Ok(next) => sends.extend(engine::handle(&mut rollout, now_ms(), next)),
                    Err(_) => break,
                }
            }
            if rollout.state.is_terminal() && !before.state.is_terminal() {
                // The history first: once the terminal state is stored the
                // deploy lock is free, and the next deploy must find the
                // release this one made current. A crash in between only
                // redoes the end after the restart.
                self.finished(&rollout);
            }
            if rollout != before {
                // Durable before anything it implies is sent.
                while let Err(error) = self.store.put_rollout(&rollout) {
                    tracing::error!(rollout = %rollout.id, %error, "cannot persist the rollout; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return abort_all(commands),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                for entry in &rollout.timeline[before.timeline.len().min(rollout.timeline.len())..]
                {
                    self.record(&rollout, &entry.kind, &entry.node, entry.message.clone());
                }
                watch.send_replace(Arc::new(rollout.clone()));
            }
            if let Some(reply) = reply.take() {
                let _ = reply.send(rollout.clone());
            }
            let live: HashSet<&str> = rollout
                .nodes
                .iter()
                .filter_map(|n| n.command_id.as_deref())
                .collect();
            commands.retain(|id, handle| {
                let keep = live.contains(id.as_str());
                if !keep {
                    handle.abort();
                }
                keep
            });
            for send in sends {
                let id = send.command.command_id.clone();
                let task = tokio::spawn(deliver(
                    self.registry.clone(),
                    self.secrets.clone(),
                    rollout.env.clone(),
                    send,
                    results_tx.clone(),
                ));
                commands.insert(id, task.abort_handle());
            }
            if rollout.state.is_terminal() {
                break;
            }
            input = tokio::select! {
                Some(next) = results.recv() => next,
                                Some((next, answer)) = control.recv() => {
                    reply = Some(answer);
                    next
                }
                _ = ticker.tick() => Input::Tick { nodes: self.observe(&rollout) },
                _ = self.shutdown.cancelled() => break,
            };
        }
        abort_all(commands);
    }

    fn observe(&self, rollout: &Rollout) -> Vec<Observation> {
        let wanted: HashSet<&str> = rollout.nodes.iter().map(|n| n.id.as_str()).collect();
        self.registry
            .list()
            .into_iter()
            .filter(|v| wanted.contains(v.record.id.as_str()))
            .map(|v| Observation {
                service: v
                    .record
                    .services
                    .iter()
                    .find(|s| s.service == rollout.service)
                    .map(|s| ServiceObservation {
                        release_id: s.release_id.clone(),
                        running: s.running,
                        healthy: s.healthy,
                        crashes: s.crashes,
                        detail: match s.last_exit.as_str() {
                            "" => s.health_detail.clone(),
                            exit => format!("{} (last exit: {exit})", s.health_detail),
                        },
                    }),
                node_id: v.record.id,
                // A node whose heartbeats stopped is as lost as a closed
                // connection (a partition can keep one open for a while).
                connected: v.connected && v.record.status == NodeStatus::Ready,
                last_seen_ms: v.record.services_at_ms,
            })
            .collect()
    }

    /// Settles the release history and metrics of a rollout that ended.
    fn finished(&self, rollout: &Rollout) {
        let seconds = (rollout.finished_at_ms.unwrap_or(rollout.updated_at_ms)
            - rollout.created_at_ms) as f64
            / 1000.0;
        self.metrics.rollout_finished(rollout, seconds);
        let outcome = ServiceOutcome {
            env: rollout.env.clone(),
            service: rollout.service.clone(),
            rollout_id: rollout.id.clone(),
            kind: rollout.kind,
            state: rollout.state,
            auto_rollback: rollout.strategy.auto_rollback,
            at_ms: rollout.finished_at_ms.unwrap_or(rollout.updated_at_ms),
        };
        if let Err(error) = self.store.put_outcome(&outcome) {
            tracing::error!(rollout = %rollout.id, %error, "cannot record how the rollout ended");
        }
        if let Err(error) = self.settle_history(rollout) {
            tracing::error!(rollout = %rollout.id, %error, "cannot update the release history");
        }
        if let Err(error) = self.prune_rollouts() {
            tracing::error!(%error, "cannot prune old rollouts");
        }
    }

    /// Keeps the newest finished rollouts; convergences, which a node that
    /// cannot converge repeats, have a smaller share of their own so they
    /// never push operators' rollouts out.
    fn prune_rollouts(&self) -> Result<(), StoreError> {
        // A deployment that runs still reads the rollouts of its steps.
        let running_deployments: HashSet<String> = self
            .store
            .deployments()?
            .into_iter()
            .filter(|d| !d.state.is_terminal())
            .map(|d| d.id)
            .collect();
        let (converges, others): (Vec<Rollout>, Vec<Rollout>) = self
            .store
            .rollouts()?
            .into_iter()
            .filter(|r| r.state.is_terminal() && !running_deployments.contains(&r.deployment))
            .partition(|r| r.kind == RolloutKind::Converge);
        for (finished, kept) in [
            (converges, CONVERGE_ROLLOUTS_KEPT),
            (others, FINISHED_ROLLOUTS_KEPT),
        ] {
            let excess = finished.len().saturating_sub(kept);
            for old in &finished[..excess] {
                self.store.delete_rollout(&old.id)?;
            }
        }
        Ok(())
    }

    fn settle_history(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let mut history = self.store.releases(&rollout.env, &rollout.service)?;
        let target = rollout.release.id();
        let from = rollout.previous.as_ref().map(|p| p.id().to_string());
        let succeeded = rollout.state == RolloutState::Succeeded;
        for record in &mut history {
            let before = record.clone();
            let is_target = record.release.id() == target;
            if succeeded {
                record.current = is_target;
                if is_target {
                    record.state = ReleaseState::Stable;
                } else if rollout.kind == RolloutKind::Rollback
                    && Some(record.release.id()) == from.as_deref()
                {
                    // Not a failure of its own: it is kept apart from
                    // releases that failed their rollout.
                    record.state = ReleaseState::Reverted;
                    record.note = format!(
                        "{} rolled back to {target} ({})",
                        rollout.created_by, rollout.id
                    );
                }
            } else if is_target && rollout.kind == RolloutKind::Deploy && !record.current {
                record.state = match rollout.state {
                    RolloutState::RolledBack => ReleaseState::RolledBack,
                    RolloutState::Aborted => ReleaseState::Aborted,
                    _ => ReleaseState::Failed,
                };
                record.note = match &rollout.error {
                    Some(error) => error.to_string(),
                    None => format!("{} ({})", rollout.state.as_str(), rollout.id),
                };
            }
            if *record != before {
                self.store.put_release(record)?;
            }
        }
        // Keep the newest few, and always the current one.
        let mut kept = 0;
        for record in &history {
            kept += 1;
            if kept > RELEASES_KEPT && !record.current {
                self.store
                    .delete_release(&record.env, &record.service, record.release.id())?;
            }
        }
        Ok(())
    }
}

fn show_selector(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "every node".into();
    }
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Fills an activation's `secret_values` from the secret store.
fn add_secret_values(
    secrets: &Secrets,
    env: &str,
    command: &mut pb::Command,
) -> Result<(), SecretError> {
    let Some(pb::command::Kind::Activate(activate)) = command.kind.as_mut() else {
        return Ok(());
    };
    let refs = activate
        .release
        .as_ref()
        .map(|r| r.secrets.clone())
        .unwrap_or_default();
    for secret in refs {
        let value = secrets.value(env, &secret.name, secret.version)?;
        activate.secret_values.insert(secret.name, value);
    }
    Ok(())
}

fn abort_all(commands: HashMap<String, AbortHandle>) {
    for handle in commands.values() {
        handle.abort();
    }
}

/// Sends one command to its node and reports the result, resending the same
/// id whenever the node was not connected or dropped before answering. The
/// engine decides when to give up (the command's deadline) and the driver
/// then aborts this task.
async fn deliver(
    registry: Arc<Registry>,
    secrets: Arc<Secrets>,
    env: String,
    mut send: engine::Send,
    results: mpsc::UnboundedSender<Input>,
) {
    let command_id = send.command.command_id.clone();
    // Secret values join the command here, on its way out: the rollout
    // record (and anything else stored) holds only names and versions.
    if let Err(error) = add_secret_values(&secrets, &env, &mut send.command) {
        let _ = results.send(Input::Result {
            command_id,
            outcome: Outcome::Failed(error.to_string()),
        });
        return;
    }
    loop {
        match registry.send_command(&send.node_id, send.command.clone()) {
            Ok(pending) => {
                let progress = results.clone();
                let id = command_id.clone();
                // Resent now and then while waiting: a result the agent
                // could not send (its queue full) is replayed from its
                // journal; a command still running is not run twice.
                let waited = pending
                    .wait(RESEND_EVERY, |step| {
                        let _ = progress.send(Input::Progress {
                            command_id: id.clone(),
                            step: step.step,
                        });
                    })
                    .await;
                if let Ok(result) = waited {
                    let outcome = match pb::CommandStatus::try_from(result.status) {
                        Ok(pb::CommandStatus::Succeeded) => Outcome::Succeeded,
                        _ => Outcome::Failed(result.message),
                    };
                    let _ = results.send(Input::Result {
                        command_id,
                        outcome,
                    });
                    return;
                }
            }
            Err(RegistryError::UnknownNode(_)) => {
                let _ = results.send(Input::Result {
                    command_id,
                    outcome: Outcome::Failed(format!(
                        "node {} is no longer registered",
                        send.node_name
                    )),
                });
                return;
            }
            Err(error) => {
                tracing::debug!(node = %send.node_name, %error, "command not delivered yet; will resend");
            }
        }
        tokio::time::sleep(RESEND_DELAY).await;
    }
}
