//! Turning an operator's deploy into rollouts: the spec resolved into
//! releases (environment, images, version and secrets pinned once, before
//! anything is created), the lock checked, the nodes picked, the rollout
//! created and stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1 as pb;

use super::admission::Admitted;
use super::deployment::{Deployment, DeploymentState, DeploymentStep, StepState};
use super::engine::Input;
use super::locks::migration_lock;
use super::model::{self, NewRollout, NodeState, Rollout, RolloutKind, RolloutNode, StoredRelease};
use super::pins::version_label;
use super::{node_fit, RolloutError, Rollouts, Started};
use crate::hooks::Hook;
use crate::lb::LoadBalancer;
use crate::migration::Migration;
use crate::notify::spec::NotifyTarget;
use crate::policy::ApprovalRule;
use crate::spec::{selects, AppSpec, Resolved, Strategy};
use crate::store::{
    ConfigOverride, LockHolder, NodeStatus, ReleaseRecord, ReleaseState, StoreError,
};

/// How long an operator's deploy waits for a convergence it aborted.
const CONVERGE_YIELD: Duration = Duration::from_secs(60);

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
    /// Leaves the spec's migration out.
    pub skip_migrate: bool,
    /// Deploys without the fresh backups the spec requires (an admin's
    /// call, with a reason, audited).
    pub skip_backup_gate: bool,
    /// The node the migration runs on; `None`: the first that has the
    /// release.
    pub migrate_node: Option<String>,
    pub by: String,
    /// May set or change which nodes an environment selects (an admin, or
    /// a deployer not limited to environments).
    pub may_pin_environments: bool,
    /// May set or change an environment's policy (an admin).
    pub may_set_policy: bool,
    /// An admin's reason to deploy past the environment's freeze window
    /// and promotion rule.
    pub break_glass: Option<String>,
    /// "ENV/RELEASE_ID" of the release `cutover promote` took this one's
    /// artifact and version from.
    pub promoted_from: Option<String>,
}

/// What a rollout of one service is to do, before the nodes are picked.
pub(super) struct Target {
    pub(super) app: String,
    pub(super) env: String,
    pub(super) service: String,
    pub(super) kind: RolloutKind,
    pub(super) release: pb::Release,
    pub(super) previous: Option<StoredRelease>,
    pub(super) selector: BTreeMap<String, String>,
    pub(super) strategy: Strategy,
    /// The deployment it is a step of, or empty.
    pub(super) deployment: String,
    /// Said first in its timeline, as (kind, message): a forced
    /// rollback's warning, a break of glass, a promotion.
    pub(super) notes: Vec<(String, String)>,
    /// For its release record: "ENV/RELEASE_ID" it was promoted from.
    pub(super) promoted_from: String,
    /// The app's migration, run by a deploy of the service that owns it.
    pub(super) migration: Option<Migration>,
    /// The spec's run-once hooks for this service.
    pub(super) hooks: Vec<Hook>,
    /// The webhooks of its events.
    pub(super) notify: Vec<NotifyTarget>,
    /// The fresh backups a deploy requires, kept for a retry.
    pub(super) backup_gates: Vec<crate::jobs::recovery::RequireBackup>,
    /// The external load balancer its drained nodes leave.
    pub(super) load_balancer: Option<LoadBalancer>,
    /// A rollback on the fast path (`Rollout::return_at_once`).
    pub(super) fast_return: bool,
    /// The approvals it waits for before it starts.
    pub(super) approval: Option<ApprovalRule>,
    /// For its release record: the `cutover config set` overrides its
    /// release carries.
    pub(super) config: BTreeMap<String, ConfigOverride>,
}

impl Target {
    /// The strategy its rollout runs: a canary splits a node's traffic
    /// between a stable release and the new one, so only a deploy of a web
    /// service that has one runs it; the others roll out in the canary's
    /// promotion batches (`Strategy::runnable`).
    pub(super) fn strategy_to_run(&self) -> Strategy {
        let splits = self.kind == RolloutKind::Deploy
            && matches!(self.release.kind, Some(pb::release::Kind::Web(_)))
            && self.previous.is_some();
        self.strategy.clone().runnable(splits)
    }
}

/// Everything needed to launch a rollout of one service.
pub(super) struct Plan {
    pub(super) target: Target,
    pub(super) nodes: Vec<RolloutNode>,
    pub(super) skipped: Vec<String>,
}

/// What a deploy started.
pub enum Deployed {
    /// One service: its rollout, or nothing to do.
    Alone(Vec<Started>),
    /// Several services, rolled out one after another.
    Together(Box<Deployment>),
}

impl Rollouts {
    /// What one service started, or the deployment of several.
    pub async fn deploy(
        self: &Arc<Self>,
        request: DeployRequest,
    ) -> Result<Deployed, RolloutError> {
        let (resolved, admitted) = self.resolve(&request).await?;
        let _creating = self.create.lock().await;
        if resolved.len() > 1 {
            return Ok(Deployed::Together(Box::new(
                self.deploy_together(resolved, admitted, &request).await?,
            )));
        }
        let mut started = Vec::new();
        for resolved in resolved {
            self.make_way(&resolved.env, &resolved.service, &request.by)
                .await;
            let previous = self
                .current_release(&resolved.env, &resolved.service)
                .await?;
            let plan = self
                .plan(
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
                        notes: admitted.notes.clone(),
                        promoted_from: request.promoted_from.clone().unwrap_or_default(),
                        migration: resolved.migration,
                        hooks: resolved.hooks,
                        notify: resolved.notify,
                        backup_gates: resolved.backup_gates,
                        load_balancer: resolved.load_balancer,
                        fast_return: false,
                        approval: admitted.approval,
                        config: resolved.config,
                    },
                    request.allow_unreachable,
                )
                .await?;
            started.push(self.launch(plan, &request.by).await?);
        }
        Ok(Deployed::Alone(started))
    }

    /// The deploy's releases, one per service in rollout order, with
    /// everything pinned once before anything is created: the environment's
    /// nodes and policy, each image's digest, the version label, each
    /// secret's version. With them, what the environment's policy adds to
    /// their rollouts.
    async fn resolve(
        &self,
        request: &DeployRequest,
    ) -> Result<(Vec<Resolved>, Admitted), RolloutError> {
        let file = request.spec_file.as_str();
        let spec = AppSpec::parse(&request.spec_text, file)?;
        let services = spec.services_for(request.service.as_deref(), file)?;
        let environment = spec.environment(file, &request.env)?;
        self.check_backup_gates(&spec, &services, environment, request)
            .await?;
        self.pin_environment(request, &environment.nodes).await?;
        let mut gate = self.policy_gate(request, environment).await?;
        let (pinned, images) = self.pin_images(&spec, &services, request).await?;
        // After what is wrong with the request itself: a missing artifact is
        // the last thing to complain about.
        if let Some(artifact) = request
            .artifact
            .as_ref()
            .filter(|a| a.url == "coordinator:" && !self.artifacts.contains(&a.digest))
        {
            return Err(RolloutError::ArtifactMissing(artifact.digest.clone()));
        }
        let version = version_label(request, &pinned)?;
        let mut resolved = services
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
        for service in &mut resolved {
            let current = self
                .store
                .releases
                .current(&request.env, &service.service)
                .await?;
            super::scale::keep_count(&mut service.release, current.as_ref().map(|c| &c.release.0));
            let in_force = current.map(|c| c.config).unwrap_or_default();
            service.config = super::config::apply(&mut service.release, &in_force);
            self.pin_secrets(service).await?;
            if request.skip_migrate {
                service.migration = None;
            }
            if let Some(migration) = &mut service.migration {
                migration.node = request.migrate_node.clone();
            }
            gate.check_lock(&self.store, &service.service).await?;
            gate.check_release(&self.store, &service.release).await?;
        }
        let mut admitted = gate.admit(&self.store).await?;
        let mirror = self.mirror_warnings(&spec, &request.env, &resolved).await?;
        admitted.notes.extend(mirror);
        Ok((resolved, admitted))
    }

    /// Several services: one deployment, checked whole before it starts
    /// (no service of it may be locked), whose driver rolls them out in
    /// order, starting with the first at once.
    async fn deploy_together(
        self: &Arc<Self>,
        resolved: Vec<Resolved>,
        admitted: Admitted,
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
            let checked = self
                .plan(
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
                        notes: Vec::new(),
                        promoted_from: String::new(),
                        migration: None,
                        hooks: Vec::new(),
                        notify: Vec::new(),
                        backup_gates: Vec::new(),
                        load_balancer: service.load_balancer.clone(),
                        fast_return: false,
                        approval: None,
                        config: Default::default(),
                    },
                    request.allow_unreachable,
                )
                .await;
            match checked {
                Ok(_) => {}
                Err(RolloutError::Locked { id, .. })
                    if i > 0 && self.get(&id).await.is_ok_and(|r| r.by_converger()) => {}
                Err(error) => return Err(error),
            }
        }
        let first = &resolved[0];
        let now = self.registry.now_ms();
        let id = format!(
            "{}-d{}",
            first.app,
            self.store.rollouts.next_number().await?
        );
        // Every service is the deployment's until it ends; if one cannot be
        // taken (a deploy got in since the checks), none stays taken.
        let holder = LockHolder::Deployment(id.clone());
        for (i, service) in resolved.iter().enumerate() {
            if let Err(error) = self
                .take_service(&service.env, &service.service, holder.clone())
                .await
            {
                for taken in &resolved[..i] {
                    self.free_service(&taken.env, &taken.service, &holder).await;
                }
                return Err(error);
            }
        }
        let deployment = Deployment {
            id,
            app: first.app.clone(),
            env: first.env.clone(),
            state: DeploymentState::Running,
            notify: first.notify.clone(),
            steps: resolved
                .into_iter()
                .map(|service| DeploymentStep {
                    service: service.service,
                    release: StoredRelease(service.release),
                    selector: service.selector,
                    strategy: service.strategy,
                    migration: service.migration,
                    hooks: service.hooks,
                    state: StepState::Waiting,
                    rollout_id: String::new(),
                    previous: None,
                    rollback_rollout_id: String::new(),
                    load_balancer: service.load_balancer,
                    config: service.config,
                })
                .collect(),
            allow_unreachable: request.allow_unreachable,
            notes: admitted.notes,
            approval: admitted.approval,
            created_by: request.by.clone(),
            created_at_ms: now,
            finished_at_ms: None,
            error: String::new(),
        };
        if let Err(error) = self.start_deployment(deployment.clone()).await {
            self.free_deployment(&deployment).await;
            return Err(error.into());
        }
        Ok(deployment)
    }

    /// An operator's deploy or rollback goes before a convergence: a
    /// converge rollout of the service is aborted and waited for (nodes in
    /// the middle of their cutover finish it), within `CONVERGE_YIELD`;
    /// after that the deploy meets the usual lock.
    pub(super) async fn make_way(&self, env: &str, service: &str, by: &str) {
        let converging = self
            .running
            .lock()
            .expect("rollouts lock")
            .iter()
            .find(|(_, h)| {
                let r = h.watch.borrow();
                r.env == env && r.service == service && r.by_converger()
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

    pub(super) async fn current_release(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<StoredRelease>, StoreError> {
        // A stopped service serves nothing: a deploy starts it as a first
        // deploy does, and its failure stops it again rather than start the
        // release the operator stopped (see `stopping`).
        if self.stopped(env, service).await?.is_some() {
            return Ok(None);
        }
        Ok(self
            .store
            .releases
            .current(env, service)
            .await?
            .map(|r| r.release))
    }

    /// Picks the nodes of `target`, once nothing else holds its service.
    pub(super) async fn plan(
        &self,
        target: Target,
        allow_unreachable: bool,
    ) -> Result<Plan, RolloutError> {
        self.check_free(&target.env, &target.service, &target.deployment)
            .await?;
        let (env, service, selector, release) = (
            target.env.clone(),
            target.service.clone(),
            &target.selector,
            &target.release,
        );
        // A revoked node was cut off on purpose: not a target, and no
        // reason to refuse the deploy as unreachable.
        let views: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|v| !v.revoked && selects(selector, &v.record.labels))
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
        node_fit::check(&target, &service, &reachable)?;
        // A heartbeat sent before the service's newest rollout ended may
        // show what that rollout changed since (a rollback right after a
        // deploy would find every node "already" on the old release): for
        // such a node, what that rollout knows it left there counts.
        let last = self.store.releases.outcome(&env, &service).await?;
        let ended_at = last.as_ref().map_or(0, |o| o.at_ms);
        let last = match last {
            Some(outcome) => self.store.rollouts.get(&outcome.rollout_id).await?,
            None => None,
        };
        let nodes = reachable
            .into_iter()
            .map(|v| {
                let running = v.record.services.iter().find(|s| s.service == service);
                let left = last
                    .as_ref()
                    .and_then(|r| r.nodes.iter().find(|n| n.id == v.record.id))
                    .filter(|n| !n.uncertain);
                let (serves, unchanged) = match (v.record.services_at_ms > ended_at, left) {
                    (false, Some(left)) => {
                        (left.release.clone(), left.release == release.release_id)
                    }
                    // Not sure: the command goes, and changes nothing where
                    // the release serves already.
                    (false, None) => (
                        running.map(|s| s.release_id.clone()).unwrap_or_default(),
                        false,
                    ),
                    // A node with a stray side release (a canary left by an
                    // interrupted rollout) needs the activation that takes
                    // its traffic back and stops it.
                    (true, _) => (
                        running.map(|s| s.release_id.clone()).unwrap_or_default(),
                        running.is_some_and(|s| {
                            s.release_id == release.release_id && s.running && !s.stray_side()
                        }),
                    ),
                };
                RolloutNode::new(
                    v.record.id.clone(),
                    v.record.name.clone(),
                    serves,
                    unchanged,
                )
            })
            .collect();
        Ok(Plan {
            target,
            nodes,
            skipped,
        })
    }

    /// Creates and starts the rollout of a plan, with the deploy lock of
    /// its service: its own, or its deployment's.
    pub(super) async fn launch(
        self: &Arc<Self>,
        plan: Plan,
        by: &str,
    ) -> Result<Started, RolloutError> {
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
        // A stop with nothing to stop still runs (at once): its outcome is
        // what says the service is stopped.
        if targets == 0 && !plan_target.kind.stops() {
            if plan_target.kind == RolloutKind::Deploy {
                let (env, service) = (&plan_target.env, &plan_target.service);
                self.keep_config(env, service, &release_id, &plan_target.config)
                    .await?;
            }
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
        if let Some(name) = plan_target.migration.as_ref().and_then(|m| m.node.as_ref()) {
            if !nodes.iter().any(|n| &n.name == name) {
                return Err(RolloutError::MigrateNode {
                    node: name.clone(),
                    service: plan_target.service,
                    env: plan_target.env,
                    targets: nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let number = self.store.rollouts.next_number().await?;
        let id = format!("{}-{number}", plan_target.service);
        let holder = match plan_target.deployment.as_str() {
            "" => LockHolder::Rollout(id.clone()),
            deployment => LockHolder::Deployment(deployment.to_string()),
        };
        let (env, service) = (plan_target.env.clone(), plan_target.service.clone());
        self.take_service(&env, &service, holder.clone()).await?;
        // One migration at a time per app and environment, held by the
        // rollout that runs it until it ends.
        let migrations = plan_target
            .migration
            .is_some()
            .then(|| migration_lock(&plan_target.app));
        let own = LockHolder::Rollout(id.clone());
        let taken = match &migrations {
            Some(name) => self.take_service(&env, name, own.clone()).await,
            None => Ok(()),
        };
        let created = match taken {
            Ok(()) => self
                .create_rollout(id, plan_target, nodes, skipped, by)
                .await
                .map_err(RolloutError::from),
            Err(error) => Err(error),
        };
        if created.is_err() {
            if matches!(holder, LockHolder::Rollout(_)) {
                self.free_service(&env, &service, &holder).await;
            }
            if let Some(name) = &migrations {
                self.free_service(&env, name, &own).await;
            }
        }
        Ok(Started::Rollout(Box::new(created?)))
    }

    /// Stores a new rollout (and its release record) and starts its
    /// driver, its service's lock taken.
    async fn create_rollout(
        self: &Arc<Self>,
        id: String,
        plan_target: Target,
        nodes: Vec<RolloutNode>,
        skipped: Vec<String>,
        by: &str,
    ) -> Result<Rollout, StoreError> {
        let release_id = plan_target.release.release_id.clone();
        let nonce: u32 = rand::random();
        let now = self.registry.now_ms();
        let strategy = plan_target.strategy_to_run();
        // A fast rollback runs no strategy's batches: nothing to say.
        let changed = (strategy != plan_target.strategy
            && !plan_target.fast_return
            && !plan_target.kind.stops())
        .then(|| {
            format!(
                "the strategy is canary, but this {} has no stable release to split a node's traffic with: it rolls out in the canary's promotion batches",
                match plan_target.kind {
                    RolloutKind::Deploy if plan_target.previous.is_none() => {
                        "deploy (a first one, or of a stopped service)"
                    }
                    RolloutKind::Deploy => "service (a worker)",
                    other => other.as_str(),
                }
            )
        });
        let mut rollout = Rollout::new(NewRollout {
            command_prefix: format!("{id}.{nonce:08x}"),
            id: id.clone(),
            app: plan_target.app.clone(),
            env: plan_target.env.clone(),
            service: plan_target.service.clone(),
            kind: plan_target.kind,
            release: StoredRelease(plan_target.release),
            previous: plan_target.previous,
            strategy,
            nodes,
            skipped: skipped.clone(),
            node_lost_after_ms: self.registry.ttl().as_millis() as u64 * 2,
            created_by: by.to_string(),
            created_at_ms: now,
            deployment: plan_target.deployment,
            migration: plan_target.migration,
            hooks: plan_target.hooks,
            notify: plan_target.notify,
        });
        rollout.backup_gates = plan_target.backup_gates;
        rollout.approval = plan_target.approval.map(|rule| model::Approval {
            required: rule.required,
            expires_at_ms: now + rule.timeout_ms as i64,
            approvals: Vec::new(),
            rejected: None,
        });
        rollout.load_balancer = plan_target.load_balancer;
        if plan_target.fast_return {
            rollout.return_at_once();
        }
        if plan_target.kind.stops() {
            rollout.stop_at_once();
        }
        if let Some(why) = changed {
            rollout.timeline.push(model::TimelineEntry {
                at_ms: now,
                kind: "strategy".into(),
                node: String::new(),
                message: why,
            });
        }
        // A deploy that keeps `cutover config set` overrides says so (a
        // config change says what it changed instead).
        let says_config = plan_target.notes.iter().any(|(kind, _)| kind == "config");
        if plan_target.kind == RolloutKind::Deploy && !plan_target.config.is_empty() && !says_config
        {
            let keys: Vec<&str> = plan_target.config.keys().map(String::as_str).collect();
            rollout.timeline.push(model::TimelineEntry {
                at_ms: now,
                kind: "config".into(),
                node: String::new(),
                message: format!(
                    "keeps the environment `cutover config set` gave {}: {} (`cutover config show {} --env {}`)",
                    plan_target.service,
                    keys.join(", "),
                    plan_target.service,
                    plan_target.env
                ),
            });
        }
        for (kind, message) in plan_target.notes {
            rollout.timeline.push(model::TimelineEntry {
                at_ms: now,
                kind,
                node: String::new(),
                message,
            });
        }
        if !skipped.is_empty() {
            rollout.timeline.push(model::TimelineEntry {
                at_ms: now,
                kind: "nodes_skipped".into(),
                node: String::new(),
                message: match rollout.kind.stops() {
                    true => format!(
                        "unreachable at the start: {}; the converger {}s the service there once it is back",
                        skipped.join(", "),
                        rollout.kind.as_str()
                    ),
                    false => format!(
                        "unreachable at the start, skipped on request: {}",
                        skipped.join(", ")
                    ),
                },
            });
        }
        if plan_target.kind == RolloutKind::Deploy {
            // Deploying the current release again (to repair a node) keeps
            // it current and stable whatever this rollout's outcome, with
            // its history: since when, its migration, where it came from.
            let kept = self
                .store
                .releases
                .current(&plan_target.env, &plan_target.service)
                .await?
                .filter(|r| r.release.id() == release_id);
            let current = kept.is_some();
            let promoted_from = match plan_target.promoted_from.as_str() {
                "" => kept
                    .as_ref()
                    .map(|r| r.promoted_from.clone())
                    .unwrap_or_default(),
                from => from.to_string(),
            };
            self.store
                .releases
                .put(&ReleaseRecord {
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
                    migration: kept.as_ref().and_then(|r| r.migration.clone()),
                    current_since_ms: kept.as_ref().map_or(0, |r| r.current_since_ms),
                    current_until_ms: 0,
                    promoted_from,
                    config: plan_target.config,
                })
                .await?;
        }
        self.store.rollouts.put(&rollout).await?;
        self.record(
            &rollout,
            "rollout_created",
            "",
            format!(
                "{by} started {} of {release_id} ({id})",
                rollout.kind.as_str()
            ),
        );
        // What it was created saying is told like what it says later (a
        // break of glass is a webhook's business).
        for entry in &rollout.timeline {
            self.record(&rollout, &entry.kind, &entry.node, entry.message.clone());
        }
        let unsaid = Rollout {
            timeline: Vec::new(),
            ..rollout.clone()
        };
        self.notifier.rollout_changed(&unsaid, &rollout);
        self.spawn(rollout.clone(), Input::Start);
        Ok(rollout)
    }
}
