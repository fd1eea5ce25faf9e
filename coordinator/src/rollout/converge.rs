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
use crate::registry::NodeView;
use crate::spec::selects;
use crate::store::{NodeStatus, ReleaseRecord, ReleaseState};

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
            let (drifted, due) = decide(&current, &history, &views, backoff, now);
            drifted_total += drifted;
            if due.is_empty() {
                continue;
            }
            let _creating = self.create.lock().await;
            // A deploy or rollback may have come and gone while this pass
            // looked: converge only to what is still current.
            let still_current = self
                .current_release(&env, &service)?
                .is_some_and(|r| r.id() == current.release.id());
            if !still_current {
                continue;
            }
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
                    release = %current.release.id(),
                    nodes = ?rollout.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
                    "nodes run another release than their environment's current one; converging them"
                );
            }
        }
        self.metrics.nodes_drifted.set(drifted_total);
        Ok(())
    }
}

/// The converger's decision for one service, given its current release,
/// its release history and the fleet: how many nodes drifted, and which of
/// them to converge now (connected, ready, and not waiting out a backoff).
/// Records the attempt in `backoff`; forgets nodes no longer drifted.
fn decide(
    current: &ReleaseRecord,
    history: &[ReleaseRecord],
    views: &[NodeView],
    backoff: &mut Backoff,
    now: Instant,
) -> (i64, Vec<String>) {
    let newest = history.iter().max_by_key(|r| r.deployed_at_ms);
    if newest.is_some_and(|r| {
        r.state == ReleaseState::Aborted
            || (r.state == ReleaseState::Failed && !r.strategy.auto_rollback)
    }) {
        return (0, Vec::new());
    }
    let target = current.release.id();
    let mut drifted_count = 0;
    let mut due = Vec::new();
    for view in views {
        let key = (
            current.env.clone(),
            current.service.clone(),
            view.record.id.clone(),
        );
        let drifted = selects(&current.selector, &view.record.labels)
            && view.record.services.iter().any(|s| {
                s.service == current.service && !s.release_id.is_empty() && s.release_id != target
            });
        if !drifted {
            backoff.remove(&key);
            continue;
        }
        drifted_count += 1;
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
    (drifted_count, due)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::model::StoredRelease;
    use crate::spec::{BatchSize, Strategy};
    use crate::store::{NodeRecord, ServiceStatus};
    use cutover_proto::v1 as pb;

    fn release(id: &str, state: ReleaseState, current: bool, at: i64) -> ReleaseRecord {
        ReleaseRecord {
            app: "shop".into(),
            env: "production".into(),
            service: "web".into(),
            release: StoredRelease(pb::Release {
                release_id: id.into(),
                service: "web".into(),
                ..Default::default()
            }),
            state,
            current,
            deployed_by: "operator/root".into(),
            deployed_at_ms: at,
            rollout_id: format!("web-{at}"),
            selector: [("env".to_string(), "production".to_string())].into(),
            strategy: Strategy {
                batch: BatchSize::Count(1),
                max_unavailable: 0,
                min_healthy_time_ms: 0,
                progress_deadline_ms: 600_000,
                auto_rollback: true,
                prepare_parallelism: 1,
            },
        }
    }

    fn node(id: &str, env: &str, runs: &str, connected: bool) -> NodeView {
        NodeView {
            record: NodeRecord {
                id: id.into(),
                name: id.into(),
                address: "10.0.0.1".into(),
                labels: [("env".to_string(), env.to_string())].into(),
                agent_version: String::new(),
                capabilities: Vec::new(),
                status: NodeStatus::Ready,
                registered_at_ms: 0,
                last_seen_ms: 0,
                figures: None,
                services: (!runs.is_empty())
                    .then(|| ServiceStatus {
                        service: "web".into(),
                        release_id: runs.into(),
                        running: true,
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                services_at_ms: 0,
                cert_serial: String::new(),
                cert_expires_at_ms: 0,
                cert_ca: String::new(),
                trust_bundle: String::new(),
            },
            connected,
            heartbeat_age: Duration::ZERO,
        }
    }

    #[test]
    fn only_connected_nodes_of_the_environment_on_another_release_are_converged() {
        let v1 = release("web-v1", ReleaseState::Stable, true, 1);
        let history = [
            v1.clone(),
            release("web-v2", ReleaseState::Failed, false, 2),
        ];
        let fleet = [
            node("on-v1", "production", "web-v1", true),
            node("on-v2", "production", "web-v2", true),
            node("on-v2-gone", "production", "web-v2", false),
            node("staging-on-v2", "staging", "web-v2", true),
            node("never-ran-web", "production", "", true),
        ];
        let mut backoff = Backoff::new();
        let now = Instant::now();
        let (drifted, due) = decide(&v1, &history, &fleet, &mut backoff, now);
        assert_eq!(drifted, 2);
        assert_eq!(due, ["on-v2"]);

        // Tried again only after the backoff, then after twice as long.
        let soon = now + FIRST_RETRY - Duration::from_secs(1);
        assert!(decide(&v1, &history, &fleet, &mut backoff, soon)
            .1
            .is_empty());
        let later = now + FIRST_RETRY;
        assert_eq!(
            decide(&v1, &history, &fleet, &mut backoff, later).1,
            ["on-v2"]
        );
        let after_one_wait = later + FIRST_RETRY;
        assert!(
            decide(&v1, &history, &fleet, &mut backoff, after_one_wait)
                .1
                .is_empty(),
            "the second wait is twice as long"
        );
        let after_two = later + FIRST_RETRY * 2;
        assert_eq!(
            decide(&v1, &history, &fleet, &mut backoff, after_two).1,
            ["on-v2"]
        );

        // Once converged, its backoff is forgotten.
        let fleet = [node("on-v2", "production", "web-v1", true)];
        assert_eq!(decide(&v1, &history, &fleet, &mut backoff, after_two).0, 0);
        assert!(backoff.is_empty());
    }

    #[test]
    fn fleets_an_operator_left_mixed_are_left_alone() {
        let v1 = release("web-v1", ReleaseState::Stable, true, 1);
        let fleet = [node("on-v2", "production", "web-v2", true)];
        let aborted = [
            v1.clone(),
            release("web-v2", ReleaseState::Aborted, false, 2),
        ];
        let mut manual = release("web-v2", ReleaseState::Failed, false, 2);
        manual.strategy.auto_rollback = false;
        let no_auto_rollback = [v1.clone(), manual];
        for history in [&aborted[..], &no_auto_rollback[..]] {
            let (drifted, due) = decide(&v1, history, &fleet, &mut Backoff::new(), Instant::now());
            assert_eq!((drifted, due.len()), (0, 0), "{history:?}");
        }
        // An older abort does not hold back a later stable release.
        let later = [
            release("web-v2", ReleaseState::Aborted, false, 1),
            release("web-v3", ReleaseState::Stable, true, 2),
        ];
        let (_, due) = decide(
            &later[1],
            &later,
            &fleet,
            &mut Backoff::new(),
            Instant::now(),
        );
        assert_eq!(due, ["on-v2"]);
    }
}
