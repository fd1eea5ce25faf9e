//! Deterministic simulation of the rollout engine against a model fleet:
//! seeded schedules of failing health checks, lost connections, dropped
//! results, coordinator crashes (the rollout reloaded from its stored form,
//! nothing else kept) and operator pauses and aborts. Each seed must end in
//! a state an operator chose: every node on one release, recorded as such.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use cutover_proto::v1::{self as pb, command};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::engine::{handle, Input, Observation, Outcome, Send, ServiceObservation};
use super::model::*;
use crate::spec::{BatchSize, Strategy};

const OLD: &str = "web-v1-00000000";
const NEW: &str = "web-v2-11111111";

struct SimNode {
    id: String,
    release: String,
    connected: bool,
    /// The agent runs one cutover of a service at a time.
    busy_until: i64,
    /// Command ids this agent ran, with their outcome (its journal).
    journal: HashMap<String, Outcome>,
    running: HashSet<String>,
    /// The new release fails its health check here.
    rejects_new: bool,
    /// The new release turns unhealthy this long after switching.
    sickens_after: Option<i64>,
    switched_at: i64,
    last_heartbeat: i64,
}

enum Event {
    /// A command reaches its agent.
    Deliver(String, pb::Command),
    /// An agent finished a command; the result travels back.
    Finish(String, pb::Command),
    /// A result reaches the coordinator.
    Result(String, Outcome),
    Tick,
    Heartbeats,
    CrashCoordinator,
    Disconnect(String),
    Reconnect(String),
    Operator(Input),
}

struct Sim {
    rng: StdRng,
    now: i64,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    nodes: BTreeMap<String, SimNode>,
    rollout: Rollout,
    /// Commands the driver has out: resent until answered or dropped.
    outstanding: HashMap<String, Send>,
    executions: HashMap<String, u32>,
    first: Option<Input>,
}

fn release(id: &str) -> StoredRelease {
    StoredRelease(pb::Release {
        release_id: id.into(),
        service: "web".into(),
        version: id.split('-').nth(1).unwrap_or_default().into(),
        artifact: Some(pb::Artifact {
            url: "coordinator:".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
        }),
        command: vec!["app".into()],
        env: Default::default(),
        kind: Some(pb::release::Kind::Web(pb::WebService {
            listen: ":8080".into(),
            health: None,
            health_interval_ms: 1000,
            healthy_threshold: 2,
            healthy_deadline_ms: 10_000,
            smoke: vec![],
            drain_timeout_ms: 2_000,
        })),
        stop_signal: String::new(),
        stop_grace_ms: 1_000,
        ..Default::default()
    })
}

/// A plain rolling strategy: one node at a time, rolled back on failure.
pub fn strategy() -> Strategy {
    Strategy {
        progress_deadline_ms: 1000,
        prepare_parallelism: 1,
        ..Strategy::rolling(BatchSize::Count(1), 0, 0)
    }
}

pub fn rollout(nodes: usize, strategy: Strategy) -> Rollout {
    Rollout::new(NewRollout {
        id: "web-1".into(),
        app: "shop".into(),
        env: "test".into(),
        service: "web".into(),
        kind: RolloutKind::Deploy,
        release: release(NEW),
        previous: Some(release(OLD)),
        strategy,
        nodes: (0..nodes)
            .map(|i| RolloutNode::new(format!("id-{i}"), format!("node-{i}"), OLD.into(), false))
            .collect(),
        skipped: vec![],
        command_prefix: "web-1.sim".into(),
        node_lost_after_ms: 0,
        created_by: "sim".into(),
        created_at_ms: 0,
        deployment: String::new(),
        migration: None,
    })
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = rng.random_range(1..=7);
        let batch = if rng.random_bool(0.5) {
            BatchSize::Count(rng.random_range(1..=3))
        } else {
            BatchSize::Percent(rng.random_range(1..=100))
        };
        let max_unavailable = if rng.random_bool(0.3) {
            rng.random_range(1..=2)
        } else {
            0
        };
        let min_healthy_time_ms = rng.random_range(0..=3) * 1000;
        let strategy = Strategy {
            progress_deadline_ms: 120_000,
            auto_rollback: rng.random_bool(0.8),
            prepare_parallelism: rng.random_range(1..=4),
            ..Strategy::rolling(batch, max_unavailable, min_healthy_time_ms)
        };
        let mut nodes = BTreeMap::new();
        for i in 0..count {
            let id = format!("id-{i}");
            nodes.insert(
                id.clone(),
                SimNode {
                    id,
                    release: OLD.into(),
                    connected: true,
                    busy_until: 0,
                    journal: HashMap::new(),
                    running: HashSet::new(),
                    rejects_new: rng.random_bool(0.1),
                    sickens_after: rng.random_bool(0.08).then(|| rng.random_range(0..4000)),
                    switched_at: 0,
                    last_heartbeat: 0,
                },
            );
        }
        let mut rollout = rollout(count, strategy);
        // Some nodes already run the new release (an earlier attempt that
        // was aborted): the rollout leaves them, a rollback must not.
        for node in &mut rollout.nodes {
            if rng.random_bool(0.1) {
                node.state = NodeState::Unchanged;
                node.release = NEW.into();
                node.from_release = NEW.into();
                nodes.get_mut(&node.id).expect("same ids").release = NEW.into();
            }
        }
        // Sometimes the coordinator died right after storing the rollout:
        // the first thing it sees is its own restart.
        let first = if rng.random_bool(0.1) {
            Input::Recover
        } else {
            Input::Start
        };
        let mut sim = Sim {
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            nodes,
            rollout,
            outstanding: HashMap::new(),
            executions: HashMap::new(),
            first: Some(first),
        };
        sim.at(250, Event::Tick);
        sim.at(1000, Event::Heartbeats);
        for _ in 0..sim.rng.random_range(0..3) {
            let t = sim.rng.random_range(0..30_000);
            sim.at(t, Event::CrashCoordinator);
        }
        for _ in 0..sim.rng.random_range(0..3) {
            let node = format!("id-{}", sim.rng.random_range(0..count));
            let t = sim.rng.random_range(0..30_000);
            // Some partitions outlast a command's deadline.
            let back = t + if sim.rng.random_bool(0.2) {
                sim.rng.random_range(60_000..200_000)
            } else {
                sim.rng.random_range(100..20_000)
            };
            sim.at(t, Event::Disconnect(node.clone()));
            sim.at(back, Event::Reconnect(node));
        }
        if sim.rng.random_bool(0.2) {
            let t = sim.rng.random_range(0..20_000);
            sim.at(t, Event::Operator(Input::Pause { by: "op".into() }));
            let back = t + sim.rng.random_range(0..10_000);
            sim.at(back, Event::Operator(Input::Resume { by: "op".into() }));
        }
        if sim.rng.random_bool(0.1) {
            let t = sim.rng.random_range(0..30_000);
            sim.at(t, Event::Operator(Input::Abort { by: "op".into() }));
        }
        sim
    }

    fn at(&mut self, t: i64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, event);
    }

    fn latency(&mut self) -> i64 {
        self.rng.random_range(1..50)
    }

    fn apply(&mut self, input: Input) {
        let sends = handle(&mut self.rollout, self.now, input);
        // What the driver does: forget commands no longer in flight, send new.
        let live: HashSet<String> = self
            .rollout
            .nodes
            .iter()
            .filter_map(|n| n.command_id.clone())
            .collect();
        self.outstanding.retain(|id, _| live.contains(id));
        for send in sends {
            let t = self.now + self.latency();
            self.at(
                t,
                Event::Deliver(send.node_id.clone(), send.command.clone()),
            );
            self.outstanding
                .insert(send.command.command_id.clone(), send);
        }
    }

    fn run(&mut self) {
        let first = self.first.take().expect("run once");
        self.apply(first);
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            if self.rollout.state.is_terminal() || t > 400_000 {
                break;
            }
            self.now = t;
            let Some(event) = self.events.remove(&seq) else {
                continue; // lost in a coordinator crash
            };
            match event {
                Event::Deliver(node, command) => {
                    let id = command.command_id.clone();
                    let n = self.nodes.get_mut(&node).unwrap();
                    if !n.connected || !self.outstanding.contains_key(&id) {
                        continue; // lost on the way; the driver resends
                    }
                    if let Some(outcome) = n.journal.get(&id).cloned() {
                        let t = self.now + self.latency();
                        self.at(t, Event::Result(id, outcome));
                    } else if n.running.insert(id) {
                        let t = self.now.max(n.busy_until) + self.rng.random_range(10..3000);
                        n.busy_until = t;
                        self.at(t, Event::Finish(node, command));
                    }
                }
                Event::Finish(node, command) => {
                    let id = command.command_id.clone();
                    *self.executions.entry(id.clone()).or_default() += 1;
                    let n = self.nodes.get_mut(&node).unwrap();
                    n.running.remove(&id);
                    let outcome = match command.kind.unwrap() {
                        command::Kind::Prepare(_) => Outcome::Succeeded,
                        command::Kind::Activate(a) => {
                            let target = a.release.unwrap().release_id;
                            if target == NEW && n.rejects_new {
                                Outcome::Failed("health check failed".into())
                            } else {
                                if n.release != target {
                                    n.switched_at = self.now;
                                }
                                n.release = target;
                                Outcome::Succeeded
                            }
                        }
                        command::Kind::StopService(_) => {
                            n.release.clear();
                            Outcome::Succeeded
                        }
                        other => panic!("unexpected command {other:?}"),
                    };
                    n.journal.insert(id.clone(), outcome.clone());
                    if n.connected {
                        let t = self.now + self.latency();
                        self.at(t, Event::Result(id, outcome));
                    }
                }
                Event::Result(id, outcome) => {
                    if self.outstanding.contains_key(&id) {
                        self.apply(Input::Result {
                            command_id: id,
                            outcome,
                        });
                    }
                }
                Event::Tick => {
                    // The driver resends what is out to connected nodes.
                    let resend: Vec<Send> = self.outstanding.values().cloned().collect();
                    for send in resend {
                        if self.rng.random_bool(0.1) {
                            let t = self.now + self.latency();
                            self.at(t, Event::Deliver(send.node_id, send.command));
                        }
                    }
                    let observations = self.observe();
                    self.apply(Input::Tick {
                        nodes: observations,
                    });
                    self.at(self.now + 250, Event::Tick);
                }
                Event::Heartbeats => {
                    for n in self.nodes.values_mut() {
                        if n.connected {
                            n.last_heartbeat = self.now;
                        }
                    }
                    self.at(self.now + 1000, Event::Heartbeats);
                }
                Event::CrashCoordinator => {
                    // Only the stored form survives; every message in flight
                    // to the coordinator is lost with it.
                    let stored = serde_json::to_string(&self.rollout).unwrap();
                    self.rollout = serde_json::from_str(&stored).unwrap();
                    self.outstanding.clear();
                    self.events.retain(|_, e| !matches!(e, Event::Result(..)));
                    self.apply(Input::Recover);
                }
                Event::Disconnect(node) => self.nodes.get_mut(&node).unwrap().connected = false,
                Event::Reconnect(node) => {
                    self.nodes.get_mut(&node).unwrap().connected = true;
                    // Resend what is out to it, as the driver does.
                    let resend: Vec<Send> = self
                        .outstanding
                        .values()
                        .filter(|s| s.node_id == node)
                        .cloned()
                        .collect();
                    for send in resend {
                        let t = self.now + self.latency();
                        self.at(t, Event::Deliver(send.node_id, send.command));
                    }
                }
                Event::Operator(input) => self.apply(input),
            }
        }
    }

    fn observe(&self) -> Vec<Observation> {
        self.nodes
            .values()
            .map(|n| {
                let sick = n.release == NEW
                    && n.sickens_after
                        .is_some_and(|after| self.now >= n.switched_at + after);
                Observation {
                    node_id: n.id.clone(),
                    connected: n.connected,
                    last_seen_ms: n.last_heartbeat,
                    service: (!n.release.is_empty()).then(|| ServiceObservation {
                        release_id: n.release.clone(),
                        running: true,
                        healthy: !sick,
                        crashes: 0,
                        detail: if sick {
                            "503 from /health".into()
                        } else {
                            String::new()
                        },
                    }),
                }
            })
            .collect()
    }
}

fn check(seed: u64) -> RolloutState {
    let mut sim = Sim::new(seed);
    sim.run();
    let r = &sim.rollout;
    let ctx = || {
        format!(
            "seed {seed}: state {:?}, strategy {:?}\nnodes: {:?}\ntimeline:\n{}",
            r.state,
            r.strategy,
            sim.nodes
                .values()
                .map(|n| (&n.id, &n.release, n.connected, n.rejects_new))
                .collect::<Vec<_>>(),
            r.timeline
                .iter()
                .map(|e| format!("  {} {} {} {}", e.at_ms, e.kind, e.node, e.message))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    assert!(r.state.is_terminal(), "{}", ctx());
    assert_eq!(
        r.timeline.last().map(|e| e.kind.as_str()),
        Some(r.state.as_str()),
        "{}",
        ctx()
    );
    // Every command ran at most once on its agent.
    assert!(sim.executions.values().all(|n| *n == 1), "{}", ctx());
    let releases: HashSet<&str> = sim.nodes.values().map(|n| n.release.as_str()).collect();
    match r.state {
        RolloutState::Succeeded => {
            assert_eq!(releases, HashSet::from([NEW]), "{}", ctx());
            assert!(r.error.is_none());
        }
        RolloutState::RolledBack => {
            assert_eq!(releases, HashSet::from([OLD]), "{}", ctx());
            assert!(r.error.is_some());
        }
        RolloutState::Failed => {
            assert!(r.error.is_some(), "{}", ctx());
            // With auto_rollback only a failed return ends here.
            assert!(
                !r.strategy.auto_rollback || !r.rollback_failures.is_empty(),
                "{}",
                ctx()
            );
        }
        RolloutState::Aborted => {}
        other => panic!("not terminal: {other:?}"),
    }
    let state = r.state;
    // What the rollout says each node runs is the truth, unless the node
    // was out of reach when its command's fate was decided.
    for node in &r.nodes {
        let truth = &sim.nodes[&node.id].release;
        if !node.uncertain && node.state != NodeState::Failed {
            assert_eq!(&node.release, truth, "node {}: {}", node.name, ctx());
        }
    }
    state
}

#[test]
fn seeded_fault_schedules_end_consistent() {
    let seeds: u64 = std::env::var("CUTOVER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    for seed in 0..seeds {
        *outcomes.entry(check(seed).as_str()).or_default() += 1;
    }
    eprintln!("outcomes over {seeds} seeds: {outcomes:?}");
    // The schedules must exercise every ending, or they prove little.
    for state in ["succeeded", "rolled_back", "failed", "aborted"] {
        assert!(
            outcomes.get(state).copied().unwrap_or(0) > seeds / 100,
            "too few {state}: {outcomes:?}"
        );
    }
}
