//! The converger: a node found running another release of a service than
//! its environment's current one (it was out of reach when a rollout or
//! its rollback reached the others, or skipped as unreachable) is brought
//! to the current release by a `converge` rollout of just the nodes that
//! drifted, with every check a rollout makes. No operator needed.
//!
//! It leaves alone what an operator chose to leave mixed: the nodes of a
//! service whose newest rollout was aborted, or failed with
//! `auto_rollback = false`. A convergence that fails leaves the node
//! serving what it serves (nothing is rolled back) and is tried again
//! later, less and less often.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::model::RolloutKind;
use super::{RolloutError, Rollouts, Started};
use crate::spec::selects;
use crate::store::{NodeStatus, ReleaseState};

/// How often the fleet is compared with the current releases.
const CONVERGE_EVERY: Duration = Duration::from_secs(2);
/// Before a node whose convergence did not take is tried again; doubles
/// up to `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(600);
/// Who the rollouts it starts are by, in events and the audit of history.
pub const CONVERGER: &str = "converger";

/// (env, service, node id) -> when it may be tried again, and the wait
/// after that.
type Backoff = HashMap<(String, String, String), (Instant, Duration)>;

impl Rollouts {
    /// Runs until shutdown.
    pub async fn converge_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new();
        let mut tick = tokio::time::interval(CONVERGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.converge_once(&mut backoff).await {
                tracing::error!(%error, "convergence check failed; retrying");
            }
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
        let now = Instant::now();
        let mut drifted_total = 0;
        for current in self.store.all_releases()?.into_iter().filter(|r| r.current) {
            let (env, service) = (current.env.clone(), current.service.clone());
            if busy.contains(&(env.clone(), service.clone())) {
                continue;
            }
            let history = self.store.releases(&env, &service)?;
            let newest = history.iter().max_by_key(|r| r.deployed_at_ms);
            if newest.is_some_and(|r| {
                r.state == ReleaseState::Aborted
                    || (r.state == ReleaseState::Failed && !r.strategy.auto_rollback)
            }) {
                continue;
            }
            let target = current.release.id().to_string();
            let mut due = Vec::new();
            for view in &views {
                let key = (env.clone(), service.clone(), view.record.id.clone());
                let drifted = selects(&current.selector, &view.record.labels)
                    && view.record.services.iter().any(|s| {
                        s.service == service && !s.release_id.is_empty() && s.release_id != target
                    });
                if !drifted {
                    backoff.remove(&key);
                    continue;
                }
                drifted_total += 1;
                if !view.connected || view.record.status != NodeStatus::Ready {
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
            if due.is_empty() {
                continue;
            }
            let _creating = self.create.lock().await;
            let mut strategy = current.strategy.clone();
            strategy.auto_rollback = false;
            let mut plan = match self.plan(
                current.app.clone(),
                env.clone(),
                service.clone(),
                RolloutKind::Converge,
                current.release.0.clone(),
                None,
                current.selector.clone(),
                strategy,
                true,
            ) {
                Ok(plan) => plan,
                // A deploy got in first: it decides now.
                Err(RolloutError::Locked { .. }) => continue,
                Err(error) => return Err(error),
            };
            plan.nodes.retain(|n| due.contains(&n.id));
            plan.skipped.clear();
            if let Started::Rollout(rollout) = self.launch(plan, CONVERGER)? {
                tracing::warn!(
                    rollout = %rollout.id,
                    %env,
                    %service,
                    release = %target,
                    nodes = ?rollout.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
                    "nodes run another release than their environment's current one; converging them"
                );
            }
        }
        self.metrics.nodes_drifted.set(drifted_total);
        Ok(())
    }
}
