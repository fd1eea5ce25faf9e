//! The steps of a rollout (`model::Step`), one after the other: each
//! step's run sends what may go now and calls `step_done` once it is
//! through. Between two steps is a safe point for a requested pause. The
//! cutover step is the strategy's (`Cutover`): rolling is one
//! implementation, canary another (`canary.rs`), not branches here.

use super::commands::dispatch;
use super::{finish, note, pause, Send};
use super::{hooks, migrate};
use crate::rollout::model::{NodeState, Phase, Rollout, RolloutState, Step};
use crate::strategy::StrategyKind;

/// How a strategy moves the nodes to the release once each has it. It
/// owns its phases (a variant of `Phase`) and the timeline entries of its
/// progress.
pub(super) trait Cutover {
    /// Enters the cutover: its first phase.
    fn start(&self, r: &mut Rollout, now: i64);
    /// Sends what may go now and moves between its phases; calls
    /// `step_done` when every node serves the release.
    fn run(&self, r: &mut Rollout, now: i64, sends: &mut Vec<Send>);
}

fn cutover(kind: &StrategyKind) -> &dyn Cutover {
    match kind {
        StrategyKind::Rolling(rolling) => rolling,
        StrategyKind::Canary(canary) | StrategyKind::BlueGreen(canary) => canary,
    }
}

/// Runs the step the rollout is in.
pub(super) fn run(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
    match r.phase.step() {
        Some(Step::Prepare) => prepare(r, now, sends),
        Some(Step::Migrate) => migrate::run(r, now, sends),
        Some(Step::Cutover) => {
            let strategy = r.strategy.kind.clone();
            cutover(&strategy).run(r, now, sends)
        }
        Some(Step::Hooks(at)) => hooks::run(r, at, now, sends),
        Some(Step::Return) => super::fast::run(r, now, sends),
        Some(Step::Stop) => super::stop::run(r, now, sends),
        None => {}
    }
}

/// The current step is through (`done`: what the timeline says of it):
/// the next one starts, unless a pause was asked for, or the rollout
/// succeeded.
pub(super) fn step_done(r: &mut Rollout, now: i64, done: Option<(&str, String)>) {
    let next = r
        .phase
        .step()
        .and_then(|current| r.steps.iter().position(|s| *s == current))
        .and_then(|i| r.steps.get(i + 1))
        .copied();
    let Some(next) = next else {
        let message = format!("every node serves {}", r.release.id());
        finish(r, now, RolloutState::Succeeded, message);
        return;
    };
    if r.pause_requested {
        pause(r, now);
        return;
    }
    if let Some((kind, message)) = done {
        note(r, now, kind, "", message);
    }
    match next {
        Step::Prepare => r.phase = Phase::Prepare,
        Step::Migrate => migrate::start(r, now),
        Step::Cutover => {
            let strategy = r.strategy.kind.clone();
            cutover(&strategy).start(r, now)
        }
        Step::Hooks(at) => hooks::start_step(r, at, now),
        Step::Return | Step::Stop => {
            unreachable!(
                "a fast rollback's or a stop's plan is this one step, entered when it is made"
            )
        }
    }
}

/// Every node fetches the release, `prepare_parallelism` at a time.
fn prepare(r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
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
        let done = ("prepared", "every node has the release".to_string());
        step_done(r, now, Some(done));
    }
}
