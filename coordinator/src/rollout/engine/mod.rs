//! The rollout engine: a pure state machine. `handle(rollout, now, input)`
//! changes the rollout and returns the commands to send; it does no I/O and
//! reads no clock, so the driver owns the store, the agents and time, and
//! tests replay thousands of seeded fault schedules deterministically.
//!
//! The driver persists the rollout after every `handle` and before it sends
//! the returned commands: a command is never out without its node's state
//! saying so, and after a restart `Input::Recover` resends exactly the
//! commands in flight, with their original ids, which agents run once.
//!
//! A rollout is a list of steps (`steps.rs`: prepare, then the strategy's
//! cutover, `rolling.rs` for rolling); the rest here is what every step
//! shares: command results and progress, operator requests, failure,
//! ticks (`ticks.rs`) and the rollback (`rollback.rs`). A rollback's fast
//! path is a plan of one step of its own (`fast.rs`).

mod analysis;
mod approval;
mod canary;
mod commands;
mod fast;
mod hooks;
mod migrate;
mod once;
mod rollback;
mod rolling;
mod steps;
mod stop;
mod ticks;

use cutover_proto::v1 as pb;

use super::model::{
    NodeState, Phase, Rollout, RolloutError, RolloutState, StoredRelease, TimelineEntry,
};
use crate::hooks::HookAt;
use crate::migration::MigrationPhase;
use crate::store::Traffic;
use commands::{send_for, settle, timeout_for};
use rollback::{needs_revert, roll_back, where_nodes_are};
use ticks::on_tick;

pub use analysis::{external_due, Due, BACKGROUND};
pub use approval::{approve_refusal, reject_refusal};
pub use canary::{awaiting_promotion, fleet_weight, promote_refusal, target_weight};
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
        /// What the step carries: a task's output for step "output".
        message: String,
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
    /// Runs again the command whose outcome was not known (a held
    /// rollout).
    Retry {
        by: String,
    },
    /// A canary waiting at a pause goes on; `full`: skips its remaining
    /// steps (see `promote_refusal`).
    Promote {
        by: String,
        full: bool,
    },
    /// Sample `sample` of metric `metric` of the analysis of canary step
    /// `step`, measured by the driver (see `external_due`): the value of
    /// `result`, or why there is none.
    Measured {
        step: u32,
        metric: usize,
        sample: usize,
        result: Result<f64, String>,
    },
    /// One more approval of a rollout awaiting approval (see
    /// `approve_refusal`).
    Approve {
        by: String,
        comment: String,
    },
    /// Ends a rollout awaiting approval, aborted.
    Reject {
        by: String,
        comment: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed(String),
    /// A task ran to its end; its exit code says whether it worked.
    Task(TaskEnd),
    /// The agent stopped while the command ran: how it ended is not known.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskEnd {
    pub exit_code: i32,
    pub timed_out: bool,
    /// How it ended, e.g. "exit status: 3".
    pub detail: String,
    pub duration_ms: u64,
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
    /// What the node's proxy counted for the serving release so far.
    pub traffic: Option<Traffic>,
    /// The release running beside the serving one (a canary).
    pub side: Option<SideObservation>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SideObservation {
    pub release_id: String,
    pub running: bool,
    pub healthy: bool,
    pub crashes: u32,
    pub detail: String,
    pub traffic: Option<Traffic>,
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
            if r.state == RolloutState::Pending && !approval::awaits(r, now) {
                start(r, now);
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
                sends.extend(once::resend(r));
            }
        }
        Input::Result {
            command_id,
            outcome,
        } if once::owner(r, &command_id).is_some() => {
            let task = once::owner(r, &command_id).expect("checked in the guard");
            task_result(r, now, task, outcome);
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
        Input::Progress {
            command_id,
            step,
            message,
        } if once::owner(r, &command_id).is_some() => {
            let task = once::owner(r, &command_id).expect("checked in the guard");
            if step == "output" {
                once::on_output(r, task, now, &message);
            }
        }
        Input::Progress {
            command_id, step, ..
        } => {
            if let Some(i) = r
                .nodes
                .iter()
                .position(|n| n.command_id.as_deref() == Some(&command_id))
            {
                on_progress(r, now, i, step);
            }
        }
        Input::Tick { nodes } => {
            approval::expire(r, now);
            on_tick(r, now, &nodes)
        }
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
        Input::Retry { by } => {
            if r.state == RolloutState::Held {
                once::retry(r, now, &by);
            }
        }
        Input::Measured {
            step,
            metric,
            sample,
            result,
        } => {
            if r.state == RolloutState::Running {
                analysis::on_measured(r, now, step, metric, sample, result);
            }
        }
        Input::Promote { by, full } => {
            if r.state == RolloutState::Running && promote_refusal(r, full).is_none() {
                canary::on_promote(r, now, &by, full);
            }
        }
        Input::Approve { by, comment } => {
            // An approval that comes after the request expired ends it.
            approval::expire(r, now);
            if approval::on_approve(r, now, by, comment) {
                start(r, now);
            }
        }
        Input::Reject { by, comment } => approval::on_reject(r, now, by, comment),
        Input::Abort { by } if r.state == RolloutState::AwaitingApproval => {
            approval::on_abort(r, now, &by)
        }
        Input::Abort { by } => {
            if !r.state.is_terminal() && r.state != RolloutState::RollingBack && !r.abort_requested
            {
                r.abort_requested = true;
                // A canary's abort returns its traffic to the stable release.
                r.returning |= r.strategy.canary().is_some();
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

/// A rollout that may start (approved, or needing no approval) starts.
fn start(r: &mut Rollout, now: i64) {
    r.state = RolloutState::Running;
    r.deadline_ms = now + r.strategy.progress_deadline_ms as i64;
    let targets = r
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Pending)
        .count();
    let how = match r.returns_at_once() {
        true if r.batch_size as usize >= targets => {
            "all at once (the fast path: no batches, no watches)".to_string()
        }
        true => format!(
            "{} at a time (the fast path: no batches, no watches)",
            r.batch_size
        ),
        false => format!("in {} batches of {}", r.batches, r.batch_size),
    };
    let message = match r.kind.stops() {
        true => format!(
            "{} {} ({}) on {targets} nodes at once",
            r.kind.as_str(),
            r.service,
            r.release.id()
        ),
        false => format!(
            "{} {} to {} on {targets} nodes {how}",
            r.kind.as_str(),
            r.service,
            r.release.id(),
        ),
    };
    note(r, now, "started", "", message);
}

/// The answer to a run-once step's command, to the step it belongs to.
fn task_result(r: &mut Rollout, now: i64, task: once::Task, outcome: Outcome) {
    match task {
        once::Task::Migration => migrate::on_result(r, now, outcome),
        once::Task::Hooks(at) => hooks::on_result(r, at, now, outcome),
    }
}

pub(super) fn note(r: &mut Rollout, now: i64, kind: &str, node: &str, message: String) {
    r.updated_at_ms = now;
    r.timeline.push(TimelineEntry {
        at_ms: now,
        kind: kind.to_string(),
        node: node.to_string(),
        message,
    });
}

pub(super) fn on_result(r: &mut Rollout, now: i64, i: usize, outcome: Outcome) {
    // The agent's own "no": it ran the command and kept what it served.
    let refused = matches!(outcome, Outcome::Failed(_));
    // Nodes run no tasks: anything but a plain answer is a failure (and
    // one whose effect is not known leaves the node uncertain).
    let outcome = match outcome {
        Outcome::Task(task) => {
            Outcome::Failed(format!("an unexpected task result: {}", task.detail))
        }
        Outcome::Unknown(why) => {
            r.nodes[i].uncertain = true;
            Outcome::Failed(why)
        }
        plain => plain,
    };
    let name = r.nodes[i].name.clone();
    let state = r.nodes[i].state;
    let step = match r.nodes[i].step.as_str() {
        "" => state.as_str().to_string(),
        step => step.to_string(),
    };
    match (state, outcome) {
        (NodeState::Stopping, outcome) => stop::on_result(r, now, i, outcome, refused),
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
        (NodeState::Staging, Outcome::Succeeded) => {
            let node = &mut r.nodes[i];
            // Heartbeats count from the answer on, as after a switch.
            node.switched_at_ms = now;
            node.seen_healthy = false;
            node.weight = 0;
            settle(node, NodeState::Canary);
            let stable = node.from_release.clone();
            note(
                r,
                now,
                "node_canary",
                &name,
                format!("{name} runs {} beside {stable}", r.release.id()),
            );
        }
        (NodeState::Weighting, Outcome::Succeeded) => {
            let weight = canary::target_weight(r);
            let node = &mut r.nodes[i];
            node.weight = weight;
            settle(node, NodeState::Canary);
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
            node.weight = 0;
            settle(node, NodeState::RolledBack);
            let what = if back_to.is_empty() {
                "stopped the service".to_string()
            } else {
                format!("serves {back_to} again")
            };
            note(r, now, "node_rolled_back", &name, format!("{name} {what}"));
        }
        (NodeState::RollingBack, Outcome::Failed(message)) => {
            returned_not(r, now, i, "rollback".into(), message, refused);
        }
        // On a rollback's fast path the other nodes go on.
        (NodeState::Activating, Outcome::Failed(message)) if r.returns_at_once() => {
            returned_not(r, now, i, step, message, refused);
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
        (state, _) => unreachable!("a result for a node in state {state:?}"),
    }
}

/// Node `i` did not return to the release before: it serves what it served
/// where its agent `refused` the release, else it may serve either.
fn returned_not(r: &mut Rollout, now: i64, i: usize, step: String, message: String, refused: bool) {
    let node = &mut r.nodes[i];
    node.refused = refused;
    settle(node, NodeState::Failed);
    let name = node.name.clone();
    let stays = match refused {
        true => format!("it serves {} still", describe(&node.release)),
        false => "what it serves is not known; the converger brings it to its environment's current release once it answers".into(),
    };
    note(
        r,
        now,
        "node_rollback_failed",
        &name,
        format!("{name}: {message}; {stays}"),
    );
    r.rollback_failures.push(RolloutError {
        node: name,
        step,
        message,
    });
}

/// A release a node serves, as the timeline names it.
pub(super) fn describe(release: &str) -> &str {
    match release {
        "" => "nothing",
        release => release,
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
pub(super) fn fail(r: &mut Rollout, now: i64, error: RolloutError) {
    if r.error.is_none() {
        note(r, now, "failed", &error.node, error.to_string());
        r.error = Some(error);
    }
}

pub(super) fn in_flight(r: &Rollout) -> usize {
    r.nodes.iter().filter(|n| n.state.in_flight()).count() + once::in_flight(r)
}

pub(super) fn finish(r: &mut Rollout, now: i64, state: RolloutState, message: String) {
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

pub(super) fn pause(r: &mut Rollout, now: i64) {
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

/// Starts whatever may start now and settles the rollout's state.
fn advance(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    loop {
        // A step that failed the rollout changes neither: its way back
        // starts in the same pass.
        let before = (r.state, r.phase, r.error.is_some());
        step(r, now, sends);
        if (r.state, r.phase, r.error.is_some()) == before {
            return;
        }
    }
}

fn step(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    // A failed rollout's end waits for its on_failure hooks.
    if r.phase == Phase::Hooks(HookAt::OnFailure) {
        hooks::run(r, HookAt::OnFailure, now, sends);
        return;
    }
    match r.state {
        RolloutState::Running | RolloutState::Paused
            if r.error.is_some() && r.returns_at_once() =>
        {
            fast::on_error(r, now)
        }
        RolloutState::Running | RolloutState::Paused if r.error.is_some() && r.kind.stops() => {
            stop::on_error(r, now)
        }
        RolloutState::Running | RolloutState::Paused if r.error.is_some() => {
            if in_flight(r) > 0 {
                return;
            }
            let revert = r.nodes.iter().filter(|n| needs_revert(n)).count();
            // Code from before a contract migration may not work with the
            // schema it left (or half left): no automatic way back.
            let contracted = migrate::sent(r, MigrationPhase::Contract);
            // A canary that failed before its promotion always returns its
            // traffic to the stable release: that is what a canary is for
            // (auto_rollback is about nodes that switched).
            let canary_failed = matches!(r.phase, Phase::Canary(_));
            if (r.strategy.auto_rollback || canary_failed) && !contracted {
                // With nothing switched yet this ends at once, rolled back:
                // the fleet is on the previous release.
                r.state = RolloutState::RollingBack;
                r.phase = Phase::RollingBack;
                r.returning = true;
                let to = r
                    .previous
                    .as_ref()
                    .map_or("no release (first deploy)".to_string(), |p| {
                        p.id().to_string()
                    });
                let schema = if migrate::sent(r, MigrationPhase::Expand) {
                    "; the expand migration's schema stays, by design: the code returns, the schema does not"
                } else {
                    ""
                };
                note(
                    r,
                    now,
                    "rolling_back",
                    "",
                    format!("returning {revert} nodes to {to}{schema}"),
                );
            } else if !contracted && r.nodes.iter().any(|n| n.state == NodeState::Canary) {
                // Without auto_rollback the switched nodes stay, but a node
                // never keeps splitting its traffic: its canary goes.
                r.state = RolloutState::RollingBack;
                r.phase = Phase::RollingBack;
                r.keep_switched = true;
                note(
                    r,
                    now,
                    "rolling_back",
                    "",
                    "auto_rollback is off: switched nodes stay; the canary nodes return to the stable release".into(),
                );
            } else {
                let why = match revert {
                    _ if contracted => format!("the contract migration ran (or may have): the code from before it may not work with the schema, so nothing rolls back; {revert} nodes serve the new release; fix forward with a new deploy"),
                    0 => "no node had switched; each serves what it served before".to_string(),
                    n => format!("auto_rollback is off: {n} nodes serve the new release, the rest the old; roll back or deploy again"),
                };
                hooks::end_failed(r, now, RolloutState::Failed, why);
            }
        }
        // A canary's abort returns its traffic to the stable release.
        RolloutState::Running | RolloutState::Paused | RolloutState::Held
            if r.abort_requested
                && in_flight(r) == 0
                && r.strategy.canary().is_some()
                && r.nodes.iter().any(needs_revert) =>
        {
            let revert = r.nodes.iter().filter(|n| needs_revert(n)).count();
            r.state = RolloutState::RollingBack;
            r.phase = Phase::RollingBack;
            let to = r.previous.as_ref().map_or("", |p| p.id()).to_string();
            note(
                r,
                now,
                "rolling_back",
                "",
                format!("aborting: returning {revert} nodes to {to}"),
            );
        }
        RolloutState::Running if r.abort_requested && in_flight(r) == 0 => {
            let summary = where_nodes_are(r);
            finish(r, now, RolloutState::Aborted, format!("aborted; {summary}"));
        }
        RolloutState::Running if r.abort_requested => {}
        RolloutState::Running => steps::run(r, now, sends),
        RolloutState::Pending if r.abort_requested => {
            finish(
                r,
                now,
                RolloutState::Aborted,
                "aborted before it started; nothing changed".into(),
            );
        }
        RolloutState::Paused | RolloutState::Held if r.abort_requested => {
            let summary = where_nodes_are(r);
            let how = if r.state == RolloutState::Held {
                "held"
            } else {
                "paused"
            };
            finish(
                r,
                now,
                RolloutState::Aborted,
                format!("aborted while {how}; {summary}"),
            );
        }
        RolloutState::RollingBack => roll_back(r, now, sends),
        _ => {}
    }
}
