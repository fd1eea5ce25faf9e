//! The converger: a node found running another release of a service than
//! its environment's current one (it was out of reach when a rollout or
//! its rollback reached the others, or skipped as unreachable), or left
//! with a stray side release (a canary its rollout was cut off from), is
//! brought
//! to the current release by a `converge` rollout of just the nodes that
//! drifted, with every check a rollout makes. No operator needed.
//!
//! It leaves alone what an operator chose to leave mixed: the nodes of a
//! service whose newest rollout was aborted, or failed with
//! `auto_rollback = false`; and the nodes that refused the release a
//! rollback returned them to (it cannot start there), until the next deploy
//! or rollback of the service. A convergence that fails leaves the node
//! serving what it serves (nothing is rolled back) and is tried again
//! later, less and less often.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::model::{NodeState, RolloutKind, RolloutState, CONVERGER};
use super::{stopping, RolloutError, Rollouts, Started, Target};
use crate::registry::NodeView;
use crate::spec::selects;
use crate::store::{NodeStatus, ReleaseRecord, ReleaseState, ServiceOutcome, StoreError};

/// How often the fleet is compared with the current releases.
const CONVERGE_EVERY: Duration = Duration::from_secs(2);
/// Before a node whose convergence did not take is tried again; doubles
/// up to `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(600);

/// (env, service, node id) -> when it may be tried again, and the wait
/// after that.
type Backoff = HashMap<(String, String, String), (Instant, Duration)>;

/// What the nodes of a service are to run: its current release, or nothing
/// (a stopped or removed service, `stopping`).
struct Want<'a> {
    env: &'a str,
    service: &'a str,
    /// Empty: nothing.
    release: &'a str,
    selector: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a ReleaseRecord> for Want<'a> {
    fn from(current: &'a ReleaseRecord) -> Self {
        Want {
            env: &current.env,
            service: &current.service,
            release: current.release.id(),
            selector: &current.selector,
        }
    }
}

impl Rollouts {
    /// Runs until shutdown.
    pub async fn converge_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new();
        let mut tick = tokio::time::interval(CONVERGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.converge_once(&mut backoff).await {
                tracing::error!(%error, "convergence check failed; retrying");
            }
            self.metrics.converger_passes.inc();
        }
    }

    async fn converge_once(self: &Arc<Self>, backoff: &mut Backoff) -> Result<(), RolloutError> {
        let busy: HashSet<(String, String)> = self
            .running
            .lock()
            .expect("rollouts lock")
            .values()
            .map(|h| {
                let r = h.watch.borrow();
                (r.env.clone(), r.service.clone())
            })
            .collect();
        let views = self.registry.list();
        let records = self.store.releases.all().await?;
        let stopped: Vec<ServiceOutcome> = self
            .store
            .releases
            .outcomes()
            .await?
            .into_iter()
            .filter(stopping::stops)
            .collect();
        let is_stopped =
            |env: &str, service: &str| stopped.iter().any(|o| o.env == env && o.service == service);
        let currents: Vec<ReleaseRecord> = records.iter().filter(|r| r.current).cloned().collect();
        let now = Instant::now();
        let mut drifted_total = 0;
        for current in &currents {
            let (env, service) = (&current.env, &current.service);
            if busy.contains(&(env.clone(), service.clone())) || is_stopped(env, service) {
                continue;
            }
            match self
                .converge_service(current, &currents, &views, backoff, now)
                .await
            {
                Ok(drifted) => drifted_total += drifted,
                Err(error) => {
                    tracing::error!(%env, %service, %error, "cannot converge the service's drifted nodes")
                }
            }
        }
        for stop in &stopped {
            let (env, service) = (&stop.env, &stop.service);
            if busy.contains(&(env.clone(), service.clone())) {
                continue;
            }
            // What it stopped: its current release, or after a removal the
            // last one that was.
            let Some(record) = records
                .iter()
                .filter(|r| &r.env == env && &r.service == service)
                .max_by_key(|r| (r.current, r.current_until_ms))
            else {
                continue;
            };
            match self
                .stop_drifted(stop, record, &currents, &views, backoff, now)
                .await
            {
                Ok(drifted) => drifted_total += drifted,
                Err(error) => {
                    tracing::error!(%env, %service, %error, "cannot stop the service on nodes that came back running it")
                }
            }
        }
        self.metrics.nodes_drifted.set(drifted_total);
        Ok(())
    }

    /// The nodes of the environment as it is pinned now, and selected by
    /// no other environment's current release of the service: a node two
    /// environments claim is not moved back and forth.
    async fn movable(
        &self,
        env: &str,
        service: &str,
        currents: &[ReleaseRecord],
        views: &[NodeView],
    ) -> Result<Vec<NodeView>, StoreError> {
        let pinned = self.store.releases.environment(env).await?;
        Ok(views
            .iter()
            .filter(|v| {
                pinned
                    .as_ref()
                    .is_none_or(|selector| selects(selector, &v.record.labels))
                    && !currents.iter().any(|other| {
                        other.service == service
                            && other.env != env
                            && selects(&other.selector, &v.record.labels)
                    })
            })
            .cloned()
            .collect())
    }

    /// Converges one service's drifted nodes; returns how many drifted.
    async fn converge_service(
        self: &Arc<Self>,
        current: &ReleaseRecord,
        currents: &[ReleaseRecord],
        views: &[NodeView],
        backoff: &mut Backoff,
        now: Instant,
    ) -> Result<i64, RolloutError> {
        let (env, service) = (&current.env, &current.service);
        let views = self.movable(env, service, currents, views).await?;
        let last = self.store.releases.outcome(env, service).await?;
        self.spare_bystanders(current, last.as_ref(), backoff)
            .await?;
        let history = self.store.releases.history(env, service).await?;
        let (drifted, due) = decide(
            &Want::from(current),
            last.as_ref(),
            &history,
            &views,
            backoff,
            now,
        );
        if due.is_empty() {
            return Ok(drifted);
        }
        let _creating = self.create.lock().await;
        // A deploy or rollback may have come and gone while this pass
        // looked: converge only to what is still current, and only if its
        // outcome still allows it.
        let still_current = self
            .current_release(env, service)
            .await?
            .is_some_and(|r| r.id() == current.release.id());
        if !still_current || self.store.releases.outcome(env, service).await? != last {
            return Ok(drifted);
        }
        let mut strategy = current.strategy.clone();
        strategy.auto_rollback = false;
        let (notify, load_balancer) = self.inherited(Some(current)).await?;
        let target = Target {
            app: current.app.clone(),
            env: env.clone(),
            service: service.clone(),
            kind: RolloutKind::Converge,
            release: current.release.0.clone(),
            previous: None,
            selector: current.selector.clone(),
            strategy,
            deployment: String::new(),
            notes: Vec::new(),
            promoted_from: String::new(),
            migration: None,
            hooks: Vec::new(),
            notify,
            backup_gates: Vec::new(),
            load_balancer,
            fast_return: false,
            approval: None,
            config: Default::default(),
        };
        self.launch_for(
            target,
            &due,
            "nodes run another release than their environment's current one; converging them",
        )
        .await?;
        Ok(drifted)
    }

    /// Stops a stopped (or removed) service on the nodes that came back
    /// running it; returns how many run it.
    async fn stop_drifted(
        self: &Arc<Self>,
        stop: &ServiceOutcome,
        record: &ReleaseRecord,
        currents: &[ReleaseRecord],
        views: &[NodeView],
        backoff: &mut Backoff,
        now: Instant,
    ) -> Result<i64, RolloutError> {
        let (env, service) = (&stop.env, &stop.service);
        let views = self.movable(env, service, currents, views).await?;
        let want = Want {
            release: "",
            ..Want::from(record)
        };
        let (drifted, due) = decide(&want, Some(stop), &[], &views, backoff, now);
        if due.is_empty() {
            return Ok(drifted);
        }
        let _creating = self.create.lock().await;
        // A deploy or start may have come and gone while this pass looked.
        if self.store.releases.outcome(env, service).await?.as_ref() != Some(stop) {
            return Ok(drifted);
        }
        let kind = stopping::stop_kind(stop);
        let (done, doing) = match kind {
            RolloutKind::Remove => ("removed", "removing"),
            _ => ("stopped", "stopping"),
        };
        let by = stop.stopped.as_ref().map_or("", |s| s.rollout_id.as_str());
        let notes = vec![(
            kind.as_str().to_string(),
            format!("{service} was {done} in {env} (rollout {by}), but nodes run it again: {doing} it there"),
        )];
        let (notify, load_balancer) = self.inherited(Some(record)).await?;
        let target = self.target_of(record, kind, notes, notify, load_balancer);
        self.launch_for(
            target,
            &due,
            "nodes run a service stopped on purpose; stopping it there",
        )
        .await?;
        Ok(drifted)
    }

    /// Starts the converger's rollout of `target` on the `due` nodes alone.
    async fn launch_for(
        self: &Arc<Self>,
        target: Target,
        due: &[String],
        why: &'static str,
    ) -> Result<(), RolloutError> {
        let stops = target.kind.stops();
        let mut plan = match self.plan(target, true).await {
            Ok(plan) => plan,
            // A deploy got in first: it decides now.
            Err(RolloutError::Locked { .. } | RolloutError::Claimed { .. }) => return Ok(()),
            Err(error) => return Err(error),
        };
        plan.nodes.retain(|n| due.contains(&n.id));
        if stops {
            // Each runs it, as its heartbeat showed.
            for node in &mut plan.nodes {
                node.state = NodeState::Pending;
            }
        }
        plan.skipped.clear();
        let started = match self.launch(plan, CONVERGER).await {
            Ok(started) => started,
            Err(RolloutError::Locked { .. } | RolloutError::Claimed { .. }) => return Ok(()),
            Err(error) => return Err(error),
        };
        if let Started::Rollout(rollout) = started {
            tracing::warn!(
                rollout = %rollout.id,
                env = %rollout.env,
                service = %rollout.service,
                release = %rollout.release.id(),
                nodes = ?rollout.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
                "{why}"
            );
        }
        Ok(())
    }
}

impl Rollouts {
    /// A convergence that failed on one node (its prepare or health check
    /// fails there) must not hold back the others it included: they are
    /// due again at once, while the failed ones wait out their backoff.
    /// Else a node that can never converge keeps every node drifted with
    /// it on the same backoff (the rollout simulation's seed 24).
    async fn spare_bystanders(
        &self,
        current: &ReleaseRecord,
        last: Option<&ServiceOutcome>,
        backoff: &mut Backoff,
    ) -> Result<(), StoreError> {
        let Some(last) =
            last.filter(|l| l.kind == RolloutKind::Converge && l.state == RolloutState::Failed)
        else {
            return Ok(());
        };
        let Some(rollout) = self.store.rollouts.get(&last.rollout_id).await? else {
            return Ok(());
        };
        for node in &rollout.nodes {
            if node.state != NodeState::Failed && !node.uncertain {
                backoff.remove(&(
                    current.env.clone(),
                    current.service.clone(),
                    node.id.clone(),
                ));
            }
        }
        Ok(())
    }
}

/// Whether an operator chose to leave the service's fleet as it is: its
/// newest rollout (of any kind but a convergence that failed) was aborted,
/// or failed without auto_rollback. Without a recorded outcome (a store
/// from before outcomes were kept), the newest release record says it.
fn left_mixed_by_operator(last: Option<&ServiceOutcome>, history: &[ReleaseRecord]) -> bool {
    match last {
        // What a stop could not stop is no operator's choice; an abort is.
        Some(outcome) if outcome.kind.stops() => outcome.state == RolloutState::Aborted,
        Some(outcome) => {
            (outcome.state == RolloutState::Aborted && !outcome.returned)
                || (outcome.state == RolloutState::Failed
                    && outcome.kind != RolloutKind::Converge
                    && !outcome.auto_rollback)
        }
        None => history
            .iter()
            .max_by_key(|r| r.deployed_at_ms)
            .is_some_and(|r| {
                r.state == ReleaseState::Aborted
                    || (r.state == ReleaseState::Failed && !r.strategy.auto_rollback)
            }),
    }
}

/// The converger's decision for one service, given its current release,
/// how its newest rollout ended, its release history and the nodes it may
/// move: how many drifted, and which of them to converge now (connected,
/// ready, and not waiting out a backoff). Records the attempt in
/// `backoff`; forgets nodes no longer drifted.
fn decide(
    want: &Want,
    last: Option<&ServiceOutcome>,
    history: &[ReleaseRecord],
    views: &[NodeView],
    backoff: &mut Backoff,
    now: Instant,
) -> (i64, Vec<String>) {
    let target = want.release;
    // A mix the operator chose stays, but no node of it keeps a stray side
    // release (a canary its rollout could not reach): only that goes.
    let mixed = left_mixed_by_operator(last, history);
    let mut drifted_count = 0;
    let mut due = Vec::new();
    for view in views {
        // A heartbeat sent before the service's newest rollout ended shows
        // what that rollout was still changing (a canary's side release it
        // took back a moment ago), not drift: wait for the next one. A
        // revoked node's last heartbeat is old news of a node cut off.
        if view.revoked || view.record.services_at_ms <= last.map_or(0, |o| o.at_ms) {
            continue;
        }
        let key = (
            want.env.to_string(),
            want.service.to_string(),
            view.record.id.clone(),
        );
        // Another release, or a stray side release: at rest every request
        // goes to the current release, and nothing else runs unplanned.
        let drifted = selects(want.selector, &view.record.labels)
            && view.record.services.iter().any(|s| {
                s.service == want.service
                    && !s.release_id.is_empty()
                    && match mixed {
                        true => s.release_id == target && s.stray_side(),
                        false => s.release_id != target || s.stray_side(),
                    }
            });
        if !drifted {
            backoff.remove(&key);
            continue;
        }
        drifted_count += 1;
        // Its agent refused the release it was to return to: trying again
        // would fail the same way. It stays until the next deploy or
        // rollback of the service (convergences carry the list over).
        let refused = last.is_some_and(|o| o.refused.contains(&view.record.id));
        if refused || !view.connected || view.record.status != NodeStatus::Ready {
            continue;
        }
        let wait = match backoff.get(&key) {
            Some((at, _)) if *at > now => continue,
            Some((_, wait)) => *wait,
            None => FIRST_RETRY,
        };
        backoff.insert(key, (now + wait, (wait * 2).min(LAST_RETRY)));
        due.push(view.record.id.clone());
    }
    (drifted_count, due)
}

#[cfg(test)]
#[path = "converge_tests.rs"]
mod tests;
