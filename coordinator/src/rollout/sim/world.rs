//! One seed's run: the agents on the real registry, the coordinator's
//! lives (each a `Rollouts` over the shared in-memory store, with faults,
//! crashed and recovered at seeded moments), the operator's deploys, the
//! converger, and the checks once the fleet settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::agent::{self, Agent, Running};
use super::operator::{deploy, operate, review, OperatorPlan};
use super::scenario::{Scenario, Verdict, FIRST, LOST_AFTER, SECOND, SERVICES, TTL};
use crate::clock::Clock;
use crate::images::ImageResolver;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rollout::model::{NodeState, Rollout, RolloutKind, RolloutState, StoredRelease};
use crate::rollout::Rollouts;
use crate::secrets::Secrets;
use crate::store::memory::{Faults, MemoryBackend};
use crate::store::{ReleaseState, Store};

mod stops;

/// The first release must be out by then; the faulty phase starts there.
const FIRST_PHASE: Duration = Duration::from_secs(300);
/// Faults (outages, crashes) all begin within this of the faulty phase;
/// the coordinator restarts once more without faults at its end.
const FAULTS_FOR: Duration = Duration::from_secs(60);
/// Everything must have ended and settled this long after the faulty phase
/// began: a seed that takes longer hangs.
const SETTLE_WITHIN: Duration = Duration::from_secs(40 * 60);
const EPOCH_MS: i64 = 1_700_000_000_000;
/// How long a deposed leader may go on acting without writing (as one cut
/// off from etcd does until its lease runs out): `LEASE_TTL` on etcd.
const STALE_FOR: Duration = Duration::from_secs(10);

/// One seed's outcome.
pub(super) struct Run {
    /// The second deploys as they ended.
    pub rollouts: Vec<Rollout>,
    /// Deposed leaders stopped by the fence (a write refused), and those
    /// that wrote nothing before their time ran out.
    pub deposed_fenced: usize,
    pub deposed_idle: usize,
}

/// Runs one seed.
pub(super) fn check(seed: u64) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a test runtime");
    runtime.block_on(async {
        let world = World::new(seed).await;
        world.run().await
    })
}

/// One coordinator process: dropped by cancelling `shutdown` (a crash: its
/// store handle refuses every write from then on).
struct Life {
    rollouts: Arc<Rollouts>,
    shutdown: CancellationToken,
    converger: JoinHandle<()>,
}

impl Life {
    async fn stop(self) {
        self.shutdown.cancel();
        self.rollouts.drain(Duration::from_secs(10)).await;
        let _ = self.converger.await;
    }
}

struct World {
    seed: u64,
    scenario: Scenario,
    backend: MemoryBackend,
    /// Fault-free, for the checks.
    store: Store,
    registry: Arc<Registry>,
    nodes: Vec<Arc<Mutex<agent::Node>>>,
    metrics: Arc<Metrics>,
    artifacts: Arc<crate::artifacts::ArtifactStore>,
    images: Arc<ImageResolver>,
    secrets: Arc<Secrets>,
    _artifacts_dir: tempfile::TempDir,
    faulty_lives: usize,
}

impl World {
    async fn new(seed: u64) -> Self {
        let scenario = Scenario::draw(seed);
        let backend = MemoryBackend::new();
        let store = Store::new(Arc::new(backend.reopen(None)));
        let journal = Journal::start(store.clone(), Default::default());
        let registry = Registry::load(store.clone(), journal, TTL)
            .await
            .expect("an empty store loads")
            .with_clock(Clock::virtual_at(EPOCH_MS));
        let dir = tempfile::tempdir().expect("a temp dir");
        Self {
            seed,
            backend,
            registry: Arc::new(registry),
            nodes: scenario.nodes.iter().map(|_| Arc::default()).collect(),
            metrics: Arc::new(Metrics::new()),
            artifacts: Arc::new(
                crate::artifacts::ArtifactStore::open(dir.path().to_path_buf(), 1 << 20)
                    .expect("an artifact store"),
            ),
            images: Arc::new(ImageResolver::new(None, vec![]).expect("an image resolver")),
            secrets: Arc::new(Secrets::new(store.clone(), None)),
            store,
            scenario,
            _artifacts_dir: dir,
            faulty_lives: 0,
        }
    }

    /// Starts a coordinator over the store, faulty or not, and recovers
    /// what the previous one left; a start that fails is started again.
    async fn start(&mut self, faulty: bool) -> Life {
        loop {
            let shutdown = CancellationToken::new();
            let plan = &self.scenario.coordinator;
            let (fails, crash_in) = if faulty {
                let life = self.faulty_lives;
                self.faulty_lives += 1;
                let crash_in = plan
                    .crash_writes
                    .filter(|(l, _)| *l == life)
                    .map(|(_, n)| n);
                (plan.store_fails, crash_in)
            } else {
                (0.0, None)
            };
            let faults = Faults::new(
                self.seed ^ ((self.faulty_lives as u64) << 40),
                fails,
                shutdown.clone(),
                crash_in,
            );
            let rollouts = Rollouts::new(
                Store::new(Arc::new(self.backend.reopen(Some(faults)))),
                self.registry.clone(),
                self.metrics.clone(),
                self.artifacts.clone(),
                self.images.clone(),
                self.secrets.clone(),
                shutdown.clone(),
            );
            match rollouts.recover().await {
                Ok(_) => {
                    let converger = tokio::spawn(rollouts.clone().converge_loop());
                    return Life {
                        rollouts,
                        shutdown,
                        converger,
                    };
                }
                Err(_) => {
                    shutdown.cancel();
                    rollouts.drain(Duration::from_secs(10)).await;
                }
            }
        }
    }

    async fn run(mut self) -> Run {
        let started = Instant::now();
        let faults_from = started + FIRST_PHASE;
        let done = CancellationToken::new();
        for (i, node) in self.scenario.nodes.iter().enumerate() {
            let agent = Agent {
                index: i,
                labels: node.labels.clone(),
                faults: node.faults.clone(),
                node: self.nodes[i].clone(),
            };
            let seed = self.seed.wrapping_mul(31).wrapping_add(i as u64);
            tokio::spawn(agent::run(
                agent,
                self.registry.clone(),
                seed,
                faults_from,
                done.clone(),
            ));
        }
        // The first release, without faults: what the second replaces,
        // once every agent said hello.
        sleep(Duration::from_secs(2)).await;
        let mut life = self.start(false).await;
        let (current, operator_view) = watch::channel(life.rollouts.clone());
        let mut firsts = Vec::new();
        for service in SERVICES {
            let id = deploy(&operator_view, &self.scenario.spec, service, FIRST, false).await;
            if self.scenario.operator.approvals.is_some() {
                review(&operator_view, &id, Verdict::Approve(Duration::ZERO)).await;
            }
            firsts.push(id);
        }
        let firsts = self.ended(&firsts, faults_from).await;
        for rollout in &firsts {
            assert_eq!(
                rollout.state,
                RolloutState::Succeeded,
                "seed {}: {}",
                self.seed,
                show(rollout)
            );
        }
        sleep_until(faults_from).await;

        // The second, under faults and crashes.
        life.stop().await;
        life = self.start(true).await;
        current.send_replace(life.rollouts.clone());
        let operator: Vec<JoinHandle<String>> = (0..SERVICES.len())
            .map(|i| {
                tokio::spawn(operate(
                    self.scenario_operator(i),
                    operator_view.clone(),
                    faults_from,
                ))
            })
            .collect();
        let mut crashes = self
            .scenario
            .coordinator
            .crashes_at
            .clone()
            .into_iter()
            .peekable();
        let mut changes = self
            .scenario
            .coordinator
            .leader_changes
            .clone()
            .into_iter()
            .peekable();
        let mut deposed = Vec::new();
        let faults_end = faults_from + FAULTS_FOR;
        loop {
            let next = crashes.peek().map(|at| faults_from + *at);
            let change = changes.peek().map(|at| faults_from + *at);
            tokio::select! {
                biased;
                _ = life.shutdown.cancelled() => {}
                _ = sleep_until(next.unwrap_or(faults_end)), if next.is_some() => {
                    crashes.next();
                }
                _ = sleep_until(change.unwrap_or(faults_end)), if change.is_some() => {
                    changes.next();
                    // The new leader starts (and recovers) while the
                    // deposed one still acts, until the fence stops it.
                    let stale = std::mem::replace(&mut life, self.start(true).await);
                    current.send_replace(life.rollouts.clone());
                    deposed.push(tokio::spawn(async move {
                        let fenced = tokio::select! {
                            _ = stale.shutdown.cancelled() => true,
                            _ = sleep(STALE_FOR) => false,
                        };
                        stale.stop().await;
                        fenced
                    }));
                    continue;
                }
                _ = sleep_until(faults_end) => break,
            }
            life.stop().await;
            life = self.start(true).await;
            current.send_replace(life.rollouts.clone());
        }
        let (mut deposed_fenced, mut deposed_idle) = (0, 0);
        for stale in deposed {
            match stale.await.expect("a deposed leader stops") {
                true => deposed_fenced += 1,
                false => deposed_idle += 1,
            }
        }
        life.stop().await;
        life = self.start(false).await;
        current.send_replace(life.rollouts.clone());

        let deadline = faults_from + SETTLE_WITHIN;
        let mut seconds = Vec::new();
        for task in operator {
            let id = timeout_at(deadline, task)
                .await
                .unwrap_or_else(|_| {
                    panic!("seed {}: the operator's deploy never started", self.seed)
                })
                .expect("the operator task");
            seconds.push(id);
        }
        let seconds = self.ended(&seconds, deadline).await;
        for rollout in &seconds {
            // A rollout that ended awaiting approval never sent a command.
            if rollout.approval.as_ref().is_some_and(|a| !a.granted()) {
                assert!(
                    rollout.sent_nothing() && rollout.state == RolloutState::Aborted,
                    "seed {}: {}",
                    self.seed,
                    show(rollout)
                );
            }
        }
        self.settled(&seconds, deadline).await;
        self.check_records(&seconds).await;
        self.drift(&seconds, deadline).await;
        self.sides_retired().await;
        done.cancel();
        life.stop().await;
        Run {
            rollouts: seconds,
            deposed_fenced,
            deposed_idle,
        }
    }

    fn scenario_operator(&self, service: usize) -> OperatorPlan {
        let op = &self.scenario.operator;
        OperatorPlan {
            spec: self.scenario.spec.clone(),
            service: SERVICES[service],
            allow_unreachable: op.allow_unreachable,
            deploy_at: op.deploy_at[service],
            pause: op
                .pause
                .filter(|(s, ..)| *s == service)
                .map(|(_, a, b)| (a, b)),
            abort: op.abort.filter(|(s, _)| *s == service).map(|(_, a)| a),
            promote: op.promote,
            approval: op.approvals.map(|a| (a.verdicts[service], a.for_rollback)),
            rollback: op
                .rollback
                .filter(|(s, ..)| *s == service)
                .map(|(_, after, careful)| (after, careful)),
            stop: op
                .stop
                .filter(|(s, ..)| *s == service)
                .map(|(_, after, remove)| (after, remove)),
        }
    }

    /// The rollouts once they ended, as stored.
    async fn ended(&self, ids: &[String], deadline: Instant) -> Vec<Rollout> {
        let mut ended = Vec::new();
        for id in ids {
            loop {
                let stored = self.store.rollouts.get(id).await.expect("reads never fail");
                if let Some(rollout) = stored.filter(|r| r.state.is_terminal()) {
                    ended.push(rollout);
                    break;
                }
                if Instant::now() >= deadline {
                    let stored = self.store.rollouts.get(id).await.ok().flatten();
                    panic!(
                        "seed {}: rollout {id} never ended: {}",
                        self.seed,
                        stored.as_ref().map_or("gone".into(), show)
                    );
                }
                sleep(Duration::from_secs(1)).await;
            }
        }
        ended
    }

    /// Waits until every node runs what its service's outcome calls for
    /// (the converger brings back those that were out of reach).
    async fn settled(&self, seconds: &[Rollout], deadline: Instant) {
        loop {
            let wrong = self.wrong_nodes(seconds).await;
            if wrong.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let all = self.store.rollouts.list().await.expect("reads never fail");
                panic!(
                    "seed {}: nodes never settled: {wrong:?}\n{}",
                    self.seed,
                    all.iter().map(show).collect::<Vec<_>>().join("\n")
                );
            }
            sleep(Duration::from_secs(1)).await;
        }
    }

    /// Nodes that run a release their service's outcome does not allow.
    async fn wrong_nodes(&self, seconds: &[Rollout]) -> Vec<String> {
        let mut wrong = Vec::new();
        for (s, second) in seconds.iter().enumerate() {
            let service = SERVICES[s];
            if second.kind.stops() {
                wrong.extend(self.not_stopped(service, second));
                continue;
            }
            let new = second.release.id();
            let old = second.previous.as_ref().expect("the first release").id();
            let allowed: BTreeSet<&str> = match expected(second) {
                Some(release) => [release].into(),
                None => [old, new].into(),
            };
            for (i, node) in self.scenario.nodes.iter().enumerate() {
                if !node.labels.contains_key(service) {
                    continue;
                }
                let runs = self.nodes[i]
                    .lock()
                    .expect("node lock")
                    .services
                    .get(service)
                    .map(|r| r.release_id.clone());
                let runs = runs.unwrap_or_default();
                // At rest a node's proxy sends every request to one
                // release: a side release keeps none.
                let side = self.nodes[i]
                    .lock()
                    .expect("node lock")
                    .sides
                    .get(service)
                    .cloned();
                if let Some(side) = side.filter(|s| s.weight > 0) {
                    wrong.push(format!(
                        "node-{i} still sends {}% of {service} to {}",
                        side.weight, side.running.release_id
                    ));
                }
                // A node that cannot run the second release may stay
                // where it is: its convergence fails, and is retried. One
                // that cannot return to the first stays on the second.
                let (first, second_id) = first_and_second(second);
                let stays = (node.faults.cannot_run(SECOND) && runs == first)
                    || (node.faults.cannot_return(FIRST) && runs == second_id);
                if !allowed.contains(runs.as_str()) && !stays {
                    wrong.push(format!(
                        "node-{i} runs {service} {runs:?}, allowed {allowed:?}"
                    ));
                }
            }
        }
        wrong
    }

    /// The store agrees with the fleet: the release history names the
    /// release the outcome made current, the rollout what each node it
    /// knows for sure runs; and only nodes out of reach for long were left
    /// uncertain.
    async fn check_records(&self, seconds: &[Rollout]) {
        for (s, second) in seconds.iter().enumerate() {
            let service = SERVICES[s];
            let ctx = || format!("seed {}: {}", self.seed, show(second));
            self.check_uncertain(second);
            if second.kind.stops() {
                self.check_stop_records(service, second).await;
                continue;
            }
            assert_eq!(
                second.timeline.last().map(|e| e.kind.as_str()),
                Some(second.state.as_str()),
                "{}",
                ctx()
            );
            let history = self
                .store
                .releases
                .history("sim", service)
                .await
                .expect("reads never fail");
            let current = history
                .iter()
                .find(|r| r.current)
                .expect("a current release");
            let old = second.previous.as_ref().expect("the first release").id();
            let returned = second.kind == RolloutKind::Rollback
                && (second.state == RolloutState::Succeeded
                    || (second.state == RolloutState::Failed && second.returned_some()));
            let made_current = match second.state {
                RolloutState::Succeeded => second.release.id(),
                _ if returned => second.release.id(),
                _ => old,
            };
            assert_eq!(current.release.id(), made_current, "{}", ctx());
            // A deploy's release ends as its rollout did; a rollback's
            // target was stable, and what it left is reverted once it took.
            let (_, second_id) = first_and_second(second);
            let record = history
                .iter()
                .find(|r| r.release.id() == second_id)
                .expect("the second release's record");
            let state = match second.state {
                _ if second.kind == RolloutKind::Rollback && returned => ReleaseState::Reverted,
                _ if second.kind == RolloutKind::Rollback => ReleaseState::Stable,
                RolloutState::Succeeded => ReleaseState::Stable,
                RolloutState::RolledBack => ReleaseState::RolledBack,
                RolloutState::Aborted => ReleaseState::Aborted,
                _ => ReleaseState::Failed,
            };
            assert_eq!(record.state, state, "{}", ctx());
            if matches!(
                second.state,
                RolloutState::Succeeded | RolloutState::RolledBack
            ) {
                for node in second.nodes.iter().filter(|n| !n.uncertain) {
                    let i: usize = node.id["id-".len()..].parse().expect("sim node ids");
                    let runs = self.nodes[i]
                        .lock()
                        .expect("node lock")
                        .services
                        .get(service)
                        .map(|r| r.release_id.clone());
                    assert_eq!(
                        Some(node.release.clone()),
                        runs,
                        "node {}: {}",
                        node.name,
                        ctx()
                    );
                }
            }
        }
    }

    /// The bound: a node is left uncertain only when its command went
    /// unanswered past its deadline (73 s) or it was out of reach for
    /// LOST_AFTER. Results are lost at most twice in a row and resent every
    /// 15 s, a crashed coordinator resends at once and gives agents a grace
    /// to reconnect, so only a node away for LOST_AFTER at a stretch can be
    /// uncertain: at most the nodes with such outages.
    fn check_uncertain(&self, rollout: &Rollout) {
        for node in rollout.nodes.iter().filter(|n| n.uncertain) {
            let i: usize = node.id["id-".len()..].parse().expect("sim node ids");
            let long = self.scenario.nodes[i].faults.longest_away() >= LOST_AFTER;
            assert!(
                long,
                "seed {}: node {} uncertain without a long outage: {}",
                self.seed,
                node.name,
                show(rollout)
            );
        }
    }

    /// Releases kept warm beside the serving one stop when their time is
    /// up (at most 30 s in these specs), and the converger stops a canary
    /// whose rollout lost the node: nothing is orphaned. Only blue/green's
    /// keep_warm stays, taking no requests, and never the serving release.
    async fn sides_retired(&self) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let left: Vec<(usize, BTreeMap<String, agent::Side>)> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    let node = node.lock().expect("node lock");
                    let mut sides = node.sides.clone();
                    sides.retain(|service, side| {
                        let serving = node.services.get(service).map(|r| &r.release_id);
                        !(side.kept_warm
                            && side.weight == 0
                            && serving != Some(&side.running.release_id))
                    });
                    (i, sides)
                })
                .filter(|(_, sides)| !sides.is_empty())
                .collect();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let all = self.store.rollouts.list().await.expect("reads never fail");
                panic!(
                    "seed {}: side releases still run: {left:?}\n{}",
                    self.seed,
                    all.iter().map(show).collect::<Vec<_>>().join("\n")
                );
            }
            sleep(Duration::from_secs(1)).await;
        }
    }

    /// A node changed behind the coordinator's back is converged back to
    /// its environment's current release.
    async fn drift(&self, seconds: &[Rollout], deadline: Instant) {
        let (i, s) = self.scenario.drift;
        let service = SERVICES[s];
        let second = &seconds[s];
        if second.kind.stops() {
            return self.stopped_again(i, service, seconds, deadline).await;
        }
        let Some(current) = expected(second) else {
            return; // left mixed by the operator: the converger leaves it
        };
        let node = &self.scenario.nodes[i];
        if !node.labels.contains_key(service)
            || node.faults.cannot_run(SECOND)
            || node.faults.cannot_return(FIRST)
        {
            return;
        }
        let old = second.previous.as_ref().expect("the first release");
        let other = if current == old.id() {
            &second.release
        } else {
            old
        };
        let undone = Undone {
            node: i,
            service,
            runs: other,
            by: RolloutKind::Converge,
            to: NodeState::Switched,
            failure: "came back without a convergence",
        };
        self.undone_by_converger(undone, seconds, deadline).await;
    }

    /// Starts `undone.runs` on a node behind the coordinator's back, lets
    /// the fleet settle, and checks that a rollout of the converger (of
    /// kind `by`) moved that node to `to`. Its rollout may fail on another
    /// node that cannot run the release (seed 2510): this node moved all
    /// the same.
    async fn undone_by_converger(
        &self,
        undone: Undone<'_>,
        seconds: &[Rollout],
        deadline: Instant,
    ) {
        let Undone {
            node: i,
            service,
            runs,
            by,
            to,
            failure,
        } = undone;
        self.nodes[i].lock().expect("node lock").services.insert(
            service.to_string(),
            Running::new(runs.id(), &runs.0.version, Instant::now()),
        );
        sleep(Duration::from_secs(5)).await;
        self.settled(
            seconds,
            deadline.max(Instant::now() + Duration::from_secs(600)),
        )
        .await;
        let theirs: Vec<String> = self
            .store
            .rollouts
            .list()
            .await
            .expect("reads never fail")
            .into_iter()
            .filter(|r| r.kind == by && r.service == service && r.by_converger())
            .map(|r| r.id)
            .collect();
        let moved = self
            .ended(&theirs, Instant::now() + Duration::from_secs(600))
            .await
            .iter()
            .any(|r| {
                r.nodes
                    .iter()
                    .any(|n| n.name == format!("node-{i}") && n.state == to)
            });
        if !moved {
            let all = self.store.rollouts.list().await.expect("reads never fail");
            panic!(
                "seed {}: node-{i} {failure}\n{}",
                self.seed,
                all.iter().map(show).collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// A node changed behind the coordinator's back: it runs `runs` of
/// `service`, which a rollout of kind `by` of the converger is to undo,
/// moving it to `to`.
struct Undone<'a> {
    node: usize,
    service: &'a str,
    runs: &'a StoredRelease,
    by: RolloutKind,
    to: NodeState,
    failure: &'static str,
}

/// The one release an outcome leaves every node on, or `None` when the
/// operator chose to leave the fleet mixed (an abort, or a failure without
/// auto_rollback). A fast rollback that returned some nodes made its
/// release current, whatever refused it.
fn expected(second: &Rollout) -> Option<&str> {
    let old = second.previous.as_ref().expect("the first release").id();
    if second.state == RolloutState::Failed && second.returned_some() {
        return Some(second.release.id());
    }
    match second.state {
        RolloutState::Succeeded => Some(second.release.id()),
        // Rejected, expired or aborted before its approvals: nothing
        // changed.
        RolloutState::Aborted if second.approval.as_ref().is_some_and(|a| !a.granted()) => {
            Some(old)
        }
        // A canary's abort returns every node to the stable release.
        RolloutState::Aborted
            if second.strategy.canary().is_some() && second.rollback_failures.is_empty() =>
        {
            Some(old)
        }
        RolloutState::Aborted => None,
        RolloutState::Failed if !second.rolls_back() => None,
        _ => Some(old),
    }
}

/// The first and the second release of an outcome: a deploy's previous
/// and own, a rollback's own and previous.
fn first_and_second(r: &Rollout) -> (&str, &str) {
    let previous = r.previous.as_ref().expect("the first release").id();
    match r.kind {
        RolloutKind::Rollback => (r.release.id(), previous),
        _ => (previous, r.release.id()),
    }
}

pub(super) fn show(r: &Rollout) -> String {
    format!(
        "{} {} ({:?}, auto_rollback {}): nodes {:?}\n{}",
        r.id,
        r.state.as_str(),
        r.strategy.kind,
        r.strategy.auto_rollback,
        r.nodes
            .iter()
            .map(|n| (&n.name, n.state, &n.release, n.uncertain))
            .collect::<Vec<_>>(),
        r.timeline
            .iter()
            .map(|e| format!(
                "  {} {} {} {}",
                e.at_ms - EPOCH_MS,
                e.kind,
                e.node,
                e.message
            ))
            .collect::<Vec<_>>()
            .join("\n")
    )
}
