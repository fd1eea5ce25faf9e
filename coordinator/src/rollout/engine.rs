//! The rollout engine: a pure state machine. `handle(rollout, now, input)`
//! changes the rollout and returns the commands to send; it does no I/O and
//! reads no clock, so the driver owns the store, the agents and time, and
//! tests replay thousands of seeded fault schedules deterministically.
//!
//! The driver persists the rollout after every `handle` and before it sends
//! the returned commands: a command is never out without its node's state
//! saying so, and after a restart `Input::Recover` resends exactly the
//! commands in flight, with their original ids, which agents run once.

use cutover_proto::v1::{self as pb, command};

use super::model::{
    NodeState, Phase, Rollout, RolloutError, RolloutNode, RolloutState, StoredRelease,
    TimelineEntry,
};

/// Margin on top of a release's own deadlines before an activation without
/// an answer counts as lost: process start, smoke checks, stop.
const ACTIVATION_MARGIN_MS: i64 = 60_000;
/// After a coordinator restart, how long agents have to reconnect before a
/// switched node counts as lost.
const RECONNECT_GRACE_MS: i64 = 60_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Start,
    /// The coordinator restarted: resend what was in flight.
    Recover,
    Result {
        command_id: String,
        outcome: Outcome,
    },
    Progress {
        command_id: String,
        step: String,
    },
    /// Periodic: deadlines, and what the nodes report in their heartbeats.
    Tick {
        nodes: Vec<Observation>,
    },
    Pause {
        by: String,
    },
    Resume {
        by: String,
    },
    Abort {
        by: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed(String),
}

/// What the registry knows of one node right now.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub node_id: String,
    pub connected: bool,
    /// When its last heartbeat (its service report) arrived, coordinator
    /// clock.
    pub last_seen_ms: i64,
    /// The rollout's service as the node reported it; `None` when it runs
    /// nothing of it.
    pub service: Option<ServiceObservation>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceObservation {
    pub release_id: String,
    pub running: bool,
    pub healthy: bool,
    pub crashes: u32,
    pub detail: String,
}

/// A command for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    pub node_id: String,
    pub node_name: String,
    pub command: pb::Command,
}

/// Applies one input; returns the commands to send once the rollout is
/// persisted.
pub fn handle(r: &mut Rollout, now: i64, input: Input) -> Vec<Send> {
    let mut sends = Vec::new();
    // A rollout stored but never started (a crash right after its
    // creation) starts on recovery.
    let input = match input {
        Input::Recover if r.state == RolloutState::Pending => Input::Start,
        other => other,
    };
    match input {
        Input::Start => {
            if r.state == RolloutState::Pending {
                r.state = RolloutState::Running;
                r.deadline_ms = now + r.strategy.progress_deadline_ms as i64;
                let targets = r
                    .nodes
                    .iter()
                    .filter(|n| n.state == NodeState::Pending)
                    .count();
                note(
                    r,
                    now,
                    "started",
                    "",
                    format!(
                        "{} {} to {} on {targets} nodes in {} batches of {}",
                        r.kind.as_str(),
                        r.service,
                        r.release.id(),
                        r.batches,
                        r.batch_size
                    ),
                );
            }
        }
        Input::Recover => {
            if !r.state.is_terminal() {
                note(
                    r,
                    now,
                    "recovered",
                    "",
                    "coordinator restarted; resending the commands in flight".into(),
                );
                // Time down does not count against the deadline, and agents
                // get a while to reconnect before a node counts as lost.
                if r.state == RolloutState::Running {
                    r.deadline_ms += (now - r.updated_at_ms).max(0);
                }
                r.lost_grace_until_ms = now + RECONNECT_GRACE_MS;
                for node in &mut r.nodes {
                    node.lost_since_ms = None;
                }
                for i in 0..r.nodes.len() {
                    if r.nodes[i].state.in_flight() {
                        let timeout = timeout_for(r, r.nodes[i].state);
                        r.nodes[i].command_deadline_ms = now + timeout;
                        sends.push(send_for(r, i));
                    }
                }
            }
        }
        Input::Result {
            command_id,
            outcome,
        } => {
            if let Some(i) = r
                .nodes
                .iter()
                .position(|n| n.command_id.as_deref() == Some(&command_id))
            {
                on_result(r, now, i, outcome);
            }
        }
        Input::Progress { command_id, step } => {
            if let Some(i) = r
                .nodes
                .iter()
                .position(|n| n.command_id.as_deref() == Some(&command_id))
            {
                on_progress(r, now, i, step);
            }
        }
        Input::Tick { nodes } => on_tick(r, now, &nodes),
        Input::Pause { by } => {
            if matches!(r.state, RolloutState::Running | RolloutState::Pending)
                && !r.pause_requested
            {
                r.pause_requested = true;
                note(
                    r,
                    now,
                    "pause_requested",
                    "",
                    format!("{by} asked to pause; it takes effect at the next safe point"),
                );
            }
        }
        Input::Resume { by } => {
            if r.state == RolloutState::Paused {
                r.state = RolloutState::Running;
                r.pause_requested = false;
                if let Some(at) = r.paused_at_ms.take() {
                    // Time spent paused does not count against the deadline.
                    r.deadline_ms += now - at;
                }
                note(r, now, "resumed", "", format!("{by} resumed the rollout"));
            } else if r.pause_requested {
                r.pause_requested = false;
                note(
                    r,
                    now,
                    "resumed",
                    "",
                    format!("{by} withdrew the pause before it took effect"),
                );
            }
        }
        Input::Abort { by } => {
            if !r.state.is_terminal() && r.state != RolloutState::RollingBack && !r.abort_requested
            {
                r.abort_requested = true;
                note(
                    r,
                    now,
                    "abort_requested",
                    "",
                    format!("{by} asked to abort; nodes mid-cutover finish first"),
                );
            }
        }
    }
    advance(r, now, &mut sends);
    sends
}

fn note(r: &mut Rollout, now: i64, kind: &str, node: &str, message: String) {
    r.updated_at_ms = now;
    r.timeline.push(TimelineEntry {
        at_ms: now,
        kind: kind.to_string(),
        node: node.to_string(),
        message,
    });
}

/// How long a switched node may be lost or unhealthy: the release's
/// healthy_deadline.
fn healthy_deadline(r: &Rollout) -> i64 {
    let release = &r.release.0;
    let ms = match &release.kind {
        Some(pb::release::Kind::Web(web)) => web.healthy_deadline_ms,
        Some(pb::release::Kind::Worker(worker)) => worker.healthy_deadline_ms,
        None => 30_000,
    };
    ms as i64
}

fn timeout_for(r: &Rollout, state: NodeState) -> i64 {
    let release = match state {
        NodeState::RollingBack => r.previous.as_ref().map_or(&r.release.0, |p| &p.0),
        _ => &r.release.0,
    };
    match state {
        NodeState::Preparing => r.strategy.progress_deadline_ms as i64,
        _ => {
            let start = match &release.kind {
                Some(pb::release::Kind::Web(web)) => {
                    let smoke: u64 = web.smoke.iter().map(|c| c.timeout_ms).sum();
                    web.healthy_deadline_ms + smoke + web.drain_timeout_ms
                }
                Some(pb::release::Kind::Worker(worker)) => {
                    worker.healthy_deadline_ms + worker.min_healthy_time_ms
                }
                None => 0,
            };
            let stop = release.stop_grace_ms
                + if release.stop_command.is_empty() {
                    0
                } else {
                    release.stop_timeout_ms
                };
            (start + stop) as i64 + ACTIVATION_MARGIN_MS
        }
    }
}

/// The command a node in an in-flight state has out, under its id.
fn send_for(r: &Rollout, i: usize) -> Send {
    let node = &r.nodes[i];
    let kind = match node.state {
        NodeState::Preparing => command::Kind::Prepare(pb::PrepareRelease {
            release: Some(r.release.0.clone()),
        }),
        // With max_unavailable > 0 the agent takes the node out of the load
        // balancer for its cutover and puts it back whatever the outcome:
        // one command, so no failure or restart can leave it drained.
        NodeState::Activating => command::Kind::Activate(pb::ActivateRelease {
            release: Some(r.release.0.clone()),
            drain_first: r.strategy.max_unavailable > 0,
            // Filled by the driver on the way out, never stored.
            secret_values: Default::default(),
        }),
        NodeState::RollingBack => match &r.previous {
            Some(previous) => command::Kind::Activate(pb::ActivateRelease {
                release: Some(previous.0.clone()),
                drain_first: r.strategy.max_unavailable > 0,
                secret_values: Default::default(),
            }),
            None => command::Kind::StopService(pb::StopService {
                service: r.service.clone(),
            }),
        },
        other => unreachable!("no command for a node in state {other:?}"),
    };
    Send {
        node_id: node.id.clone(),
        node_name: node.name.clone(),
        command: pb::Command {
            command_id: node
                .command_id
                .clone()
                .expect("in-flight nodes have a command id"),
            kind: Some(kind),
        },
    }
}

/// Moves node `i` into an in-flight state with a fresh command.
fn dispatch(r: &mut Rollout, now: i64, i: usize, state: NodeState, sends: &mut Vec<Send>) {
    let id = format!("{}.{}", r.command_prefix, r.next_command);
    r.next_command += 1;
    let timeout = timeout_for(r, state);
    r.updated_at_ms = now;
    let node = &mut r.nodes[i];
    node.state = state;
    // A new command gets the whole grace, whatever the node went through.
    node.lost_since_ms = None;
    node.command_id = Some(id);
    node.command_deadline_ms = now + timeout;
    node.step.clear();
    sends.push(send_for(r, i));
}

fn settle(node: &mut RolloutNode, state: NodeState) {
    node.state = state;
    node.command_id = None;
    node.step.clear();
}

fn on_result(r: &mut Rollout, now: i64, i: usize, outcome: Outcome) {
    let name = r.nodes[i].name.clone();
    let state = r.nodes[i].state;
    let step = match r.nodes[i].step.as_str() {
        "" => state.as_str().to_string(),
        step => step.to_string(),
    };
    match (state, outcome) {
        (NodeState::Preparing, Outcome::Succeeded) => {
            settle(&mut r.nodes[i], NodeState::Prepared);
            note(
                r,
                now,
                "node_prepared",
                &name,
                format!("{name} has {}", r.release.id()),
            );
        }
        (NodeState::Activating, Outcome::Succeeded) => {
            // The switch is noted when the agent reported it; an agent whose
            // progress did not arrive (or a first release: nothing to drain
            // or stop) switched by the time it answers.
            let noted = r.nodes[i].release == r.release.id();
            if !noted {
                switched(r, now, i);
            } else if !r.nodes[i].from_release.is_empty() {
                let from = r.nodes[i].from_release.clone();
                note(
                    r,
                    now,
                    "node_old_stopped",
                    &name,
                    format!("{name} stopped {from}"),
                );
            }
            // Heartbeats count from the answer on: one sent between the
            // switch and the answer may still show the old release.
            let node = &mut r.nodes[i];
            node.switched_at_ms = now;
            node.seen_healthy = false;
            settle(node, NodeState::Switched);
        }
        (NodeState::RollingBack, Outcome::Succeeded) => {
            let back_to = r
                .previous
                .as_ref()
                .map(|p| p.id().to_string())
                .unwrap_or_default();
            let node = &mut r.nodes[i];
            node.release = back_to.clone();
            node.uncertain = false;
            settle(node, NodeState::RolledBack);
            let what = if back_to.is_empty() {
                "stopped the service".to_string()
            } else {
                format!("serves {back_to} again")
            };
            note(r, now, "node_rolled_back", &name, format!("{name} {what}"));
        }
        (NodeState::RollingBack, Outcome::Failed(message)) => {
            settle(&mut r.nodes[i], NodeState::Failed);
            note(
                r,
                now,
                "node_rollback_failed",
                &name,
                format!("{name}: {message}"),
            );
            r.rollback_failures.push(RolloutError {
                node: name,
                step: "rollback".into(),
                message,
            });
        }
        (_, Outcome::Failed(message)) => {
            settle(&mut r.nodes[i], NodeState::Failed);
            fail(
                r,
                now,
                RolloutError {
                    node: name,
                    step,
                    message,
                },
            );
        }
        (state, Outcome::Succeeded) => unreachable!("a result for a node in state {state:?}"),
    }
}

/// The steps an agent reports after its proxy switched: the new release
/// serves from then on, whatever the drain and stop of the old one take.
const AFTER_SWITCH: [&str; 2] = ["draining", "stopping_old"];

fn on_progress(r: &mut Rollout, now: i64, i: usize, step: String) {
    let after_switch = AFTER_SWITCH.contains(&step.as_str());
    let was_switched = r.nodes[i].release == r.release.id();
    let drained = step == "stopping_old" && r.nodes[i].step == "draining";
    r.nodes[i].step = step;
    if r.nodes[i].state != NodeState::Activating || !after_switch {
        return;
    }
    if !was_switched {
        switched(r, now, i);
    }
    if drained {
        let name = r.nodes[i].name.clone();
        let from = r.nodes[i].from_release.clone();
        note(
            r,
            now,
            "node_drained",
            &name,
            format!("{name} drained {from}"),
        );
    }
}

/// Node `i` serves the rollout's release from `now` on.
fn switched(r: &mut Rollout, now: i64, i: usize) {
    let release = r.release.id().to_string();
    let node = &mut r.nodes[i];
    node.release = release.clone();
    let name = node.name.clone();
    note(
        r,
        now,
        "node_switched",
        &name,
        format!("{name} serves {release}"),
    );
}

/// Records the rollout's first failure; `advance` acts on it once nothing
/// is in flight.
fn fail(r: &mut Rollout, now: i64, error: RolloutError) {
    if r.error.is_none() {
        note(r, now, "failed", &error.node, error.to_string());
        r.error = Some(error);
    }
}

fn on_tick(r: &mut Rollout, now: i64, observations: &[Observation]) {
    if r.state.is_terminal() {
        return;
    }
    let healthy_deadline = healthy_deadline(r);
    let lost_after = healthy_deadline.max(r.node_lost_after_ms as i64);
    let in_grace = now < r.lost_grace_until_ms;
    let seen: std::collections::HashMap<&str, &Observation> = observations
        .iter()
        .map(|o| (o.node_id.as_str(), o))
        .collect();
    // Commands without an answer in time, or to a node out of reach for
    // `lost_after`: a partitioned node must not hold the rollout (or its
    // rollback) for the whole command timeout. It counts as possibly
    // switched; once it is back, the converger brings it to its
    // environment's current release (a first deploy has none: the rollout
    // names the node and the operator decides).
    for i in 0..r.nodes.len() {
        let node = &r.nodes[i];
        if !node.state.in_flight() {
            continue;
        }
        let reachable = in_grace || seen.get(node.id.as_str()).is_some_and(|o| o.connected);
        let lost_for = if reachable {
            r.nodes[i].lost_since_ms = None;
            0
        } else {
            now - *r.nodes[i].lost_since_ms.get_or_insert(now)
        };
        let node = &r.nodes[i];
        let message = if now >= node.command_deadline_ms {
            format!(
                "no answer from node {} within {}s; it may be partitioned or down",
                node.name,
                timeout_for(r, node.state) / 1000
            )
        } else if lost_for >= lost_after {
            format!(
                "node {} has been unreachable for {}s; it may be partitioned or down",
                node.name,
                lost_for / 1000
            )
        } else {
            continue;
        };
        if matches!(node.state, NodeState::Activating | NodeState::RollingBack) {
            r.nodes[i].uncertain = true;
        }
        r.nodes[i].lost_since_ms = None;
        on_result(r, now, i, Outcome::Failed(message));
    }
    if r.state == RolloutState::Running && now >= r.deadline_ms && r.error.is_none() {
        fail(
            r,
            now,
            RolloutError {
                node: String::new(),
                step: "progress_deadline".into(),
                message: format!(
                    "the rollout did not finish within {}s (progress_deadline)",
                    r.strategy.progress_deadline_ms / 1000
                ),
            },
        );
    }
    if !matches!(r.state, RolloutState::Running | RolloutState::Paused) || r.error.is_some() {
        return;
    }
    // Switched nodes must stay up and healthy on the new release.
    let release = r.release.id().to_string();
    for i in 0..r.nodes.len() {
        if r.nodes[i].state != NodeState::Switched {
            continue;
        }
        // A node gone from the registry (replaced under another id) is as
        // lost as a disconnected one.
        let seen = seen.get(r.nodes[i].id.as_str()).copied();
        let node = &mut r.nodes[i];
        let name = node.name.clone();
        let Some(seen) = seen.filter(|s| s.connected) else {
            if in_grace {
                continue;
            }
            let since = *node.lost_since_ms.get_or_insert(now);
            if now - since >= healthy_deadline {
                fail(
                    r,
                    now,
                    RolloutError {
                        node: name,
                        step: "unreachable".into(),
                        message: format!(
                            "lost for {}s (healthy_deadline) while serving the new release",
                            (now - since) / 1000
                        ),
                    },
                );
            }
            continue;
        };
        node.lost_since_ms = None;
        if seen.last_seen_ms <= node.switched_at_ms {
            continue; // a heartbeat from before the switch says nothing
        }
        let failure = match &seen.service {
            None => Some((
                "release",
                "the node reports no release of the service".to_string(),
            )),
            Some(s) if s.release_id != release => Some((
                "release",
                format!(
                    "the node reports release {} instead of {release}",
                    s.release_id
                ),
            )),
            Some(s) if s.crashes > 0 => Some((
                "crash",
                format!("the release crashed {} times: {}", s.crashes, s.detail),
            )),
            Some(s) if !s.running || !s.healthy => Some((
                "health",
                format!("the release turned unhealthy: {}", s.detail),
            )),
            Some(_) => None,
        };
        match failure {
            Some((step, message)) => fail(
                r,
                now,
                RolloutError {
                    node: name,
                    step: step.into(),
                    message,
                },
            ),
            None => node.seen_healthy = true,
        }
    }
}

fn in_flight(r: &Rollout) -> usize {
    r.nodes.iter().filter(|n| n.state.in_flight()).count()
}

fn finish(r: &mut Rollout, now: i64, state: RolloutState, message: String) {
    r.state = state;
    r.phase = Phase::Done;
    r.finished_at_ms = Some(now);
    r.pause_requested = false;
    // Nothing is sent any more: what stays of the releases is what names
    // them (the release history keeps each whole).
    r.release = r.release.summary();
    r.previous = r.previous.as_ref().map(StoredRelease::summary);
    note(r, now, state.as_str(), "", message);
}

/// Starts whatever may start now and settles the rollout's state.
fn advance(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    loop {
        let before = (r.state, r.phase);
        step(r, now, sends);
        if (r.state, r.phase) == before {
            return;
        }
    }
}

fn step(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    match r.state {
        RolloutState::Running | RolloutState::Paused if r.error.is_some() => {
            if in_flight(r) > 0 {
                return;
            }
            let revert = r.nodes.iter().filter(|n| needs_revert(n)).count();
            if r.strategy.auto_rollback {
                // With nothing switched yet this ends at once, rolled back:
                // the fleet is on the previous release.
                r.state = RolloutState::RollingBack;
                r.phase = Phase::RollingBack;
                let to = r
                    .previous
                    .as_ref()
                    .map_or("no release (first deploy)".to_string(), |p| {
                        p.id().to_string()
                    });
                note(
                    r,
                    now,
                    "rolling_back",
                    "",
                    format!("returning {revert} switched nodes to {to}"),
                );
            } else {
                let why = match revert {
                    0 => "no node had switched; each serves what it served before".to_string(),
                    n => format!("auto_rollback is off: {n} nodes serve the new release, the rest the old; roll back or deploy again"),
                };
                finish(r, now, RolloutState::Failed, why);
            }
        }
        RolloutState::Running if r.abort_requested && in_flight(r) == 0 => {
            let summary = where_nodes_are(r);
            finish(r, now, RolloutState::Aborted, format!("aborted; {summary}"));
        }
        RolloutState::Running if r.abort_requested => {}
        RolloutState::Running => run(r, now, sends),
        RolloutState::Pending if r.abort_requested => {
            finish(
                r,
                now,
                RolloutState::Aborted,
                "aborted before it started; nothing changed".into(),
            );
        }
        RolloutState::Paused if r.abort_requested => {
            let summary = where_nodes_are(r);
            finish(
                r,
                now,
                RolloutState::Aborted,
                format!("aborted while paused; {summary}"),
            );
        }
        RolloutState::RollingBack => roll_back(r, now, sends),
        _ => {}
    }
}

/// Whether a rollback must return this node: it serves the new release
/// (switched by this rollout, or already before it), or its command's fate
/// is unknown.
fn needs_revert(node: &RolloutNode) -> bool {
    matches!(node.state, NodeState::Switched | NodeState::Unchanged)
        || (node.state == NodeState::Failed && node.uncertain)
}

fn where_nodes_are(r: &Rollout) -> String {
    let mut by_release: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for node in &r.nodes {
        let release = if node.release.is_empty() {
            "nothing"
        } else {
            node.release.as_str()
        };
        by_release.entry(release).or_default().push(&node.name);
    }
    by_release
        .iter()
        .map(|(release, nodes)| format!("{release}: {}", nodes.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn run(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    match r.phase {
        Phase::Prepare => {
            let preparing = r
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Preparing)
                .count();
            let mut room = (r.strategy.prepare_parallelism as usize).saturating_sub(preparing);
            for i in 0..r.nodes.len() {
                if room == 0 {
                    break;
                }
                if r.nodes[i].state == NodeState::Pending {
                    dispatch(r, now, i, NodeState::Preparing, sends);
                    room -= 1;
                }
            }
            if r.nodes
                .iter()
                .all(|n| !matches!(n.state, NodeState::Pending | NodeState::Preparing))
            {
                if r.pause_requested {
                    pause(r, now);
                    return;
                }
                note(r, now, "prepared", "", "every node has the release".into());
                next_batch(r, now, 0);
            }
        }
        Phase::Batch(batch) => {
            let members: Vec<usize> = (0..r.nodes.len())
                .filter(|&i| r.nodes[i].batch == Some(batch))
                .collect();
            if members
                .iter()
                .all(|&i| r.nodes[i].state == NodeState::Switched)
            {
                let until_ms = now + r.strategy.min_healthy_time_ms as i64;
                r.phase = Phase::Watch { batch, until_ms };
                note(
                    r,
                    now,
                    "batch_switched",
                    "",
                    format!(
                        "batch {} of {} switched; watching it for {}s (min_healthy_time)",
                        batch + 1,
                        r.batches,
                        r.strategy.min_healthy_time_ms / 1000
                    ),
                );
                return;
            }
            if r.pause_requested {
                if in_flight(r) == 0 {
                    pause(r, now);
                }
                return;
            }
            // max_unavailable = 0: the whole batch surges at once, each node
            // running both releases during its cutover. Otherwise at most
            // that many nodes are out of the load balancer at a time.
            let limit = match r.strategy.max_unavailable {
                0 => members.len(),
                n => n as usize,
            };
            let mut room = limit.saturating_sub(
                members
                    .iter()
                    .filter(|&&i| r.nodes[i].state.in_flight())
                    .count(),
            );
            for &i in &members {
                if room == 0 {
                    break;
                }
                if r.nodes[i].state == NodeState::Prepared {
                    dispatch(r, now, i, NodeState::Activating, sends);
                    room -= 1;
                }
            }
        }
        Phase::Watch { batch, until_ms } => {
            let members_seen = r
                .nodes
                .iter()
                .filter(|n| n.batch == Some(batch))
                .all(|n| n.seen_healthy || r.strategy.min_healthy_time_ms == 0);
            if now >= until_ms && members_seen {
                start_batch_or_pause(r, now, batch + 1);
            }
        }
        Phase::RollingBack | Phase::Done => {}
    }
}

fn pause(r: &mut Rollout, now: i64) {
    r.state = RolloutState::Paused;
    r.paused_at_ms = Some(now);
    note(
        r,
        now,
        "paused",
        "",
        format!("paused; {}", where_nodes_are(r)),
    );
}

/// Between batches is the safe point for a requested pause: a batch is only
/// announced when it starts.
fn start_batch_or_pause(r: &mut Rollout, now: i64, batch: u32) {
    if r.pause_requested && r.nodes.iter().any(|n| n.state == NodeState::Prepared) {
        pause(r, now);
    } else {
        next_batch(r, now, batch);
    }
}

fn next_batch(r: &mut Rollout, now: i64, batch: u32) {
    let waiting: Vec<usize> = (0..r.nodes.len())
        .filter(|&i| r.nodes[i].state == NodeState::Prepared)
        .collect();
    if waiting.is_empty() {
        let message = format!("every node serves {}", r.release.id());
        finish(r, now, RolloutState::Succeeded, message);
        return;
    }
    let members: Vec<usize> = waiting.into_iter().take(r.batch_size as usize).collect();
    let names: Vec<String> = members.iter().map(|&i| r.nodes[i].name.clone()).collect();
    for &i in &members {
        r.nodes[i].batch = Some(batch);
    }
    r.phase = Phase::Batch(batch);
    note(
        r,
        now,
        "batch_started",
        "",
        format!("batch {} of {}: {}", batch + 1, r.batches, names.join(", ")),
    );
}

fn roll_back(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    let limit = r.batch_size as usize;
    let mut room = limit.saturating_sub(
        r.nodes
            .iter()
            .filter(|n| n.state == NodeState::RollingBack)
            .count(),
    );
    for i in 0..r.nodes.len() {
        if room == 0 {
            break;
        }
        if needs_revert(&r.nodes[i])
            && !r
                .rollback_failures
                .iter()
                .any(|f| f.node == r.nodes[i].name)
        {
            dispatch(r, now, i, NodeState::RollingBack, sends);
            room -= 1;
        }
    }
    if in_flight(r) > 0 {
        return;
    }
    let error = r.error.clone().expect("rolling back after a failure");
    if r.rollback_failures.is_empty() {
        let to = r
            .previous
            .as_ref()
            .map_or("no release".to_string(), |p| p.id().to_string());
        finish(
            r,
            now,
            RolloutState::RolledBack,
            format!("every node serves {to}; the cause: {error}"),
        );
    } else {
        let failed: Vec<String> = r.rollback_failures.iter().map(|f| f.to_string()).collect();
        finish(
            r,
            now,
            RolloutState::Failed,
            format!(
                "rollback incomplete after: {error}; {}; the operator must act",
                failed.join("; ")
            ),
        );
    }
}
