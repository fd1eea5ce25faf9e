//! The spec's run-once hooks, in the spec's order, on one node that has
//! the release (`once.rs`): `pre_deploy` is a step before the migration
//! and the first batch (a failure fails the rollout before anything
//! changed; an unknown outcome holds it); `post_deploy` is the last step
//! (failures are reported and the next hook runs: the release is out);
//! `on_failure` runs when a failed rollout ends, after its rollback, and
//! reports likewise.

use super::once::{self, Ended, Task};
use super::steps::step_done;
use super::{fail, finish, note, Outcome, Send};
use crate::hooks::HookAt;
use crate::rollout::model::{NodeState, Phase, Rollout, RolloutError, RolloutState};

/// Enters the hooks at `at`: picks their node. Returns false when no node
/// can run them (a `pre_deploy` failure; the others are skipped, said so).
fn start(r: &mut Rollout, at: HookAt, now: i64) -> bool {
    r.phase = Phase::Hooks(at);
    let has_release = |state: NodeState| match at {
        HookAt::PreDeploy => matches!(state, NodeState::Unchanged | NodeState::Prepared),
        HookAt::PostDeploy => matches!(state, NodeState::Unchanged | NodeState::Switched),
        // Any node the agent answers on: it prepares the release first
        // if it lacks it. A node that failed comes last.
        _ => state != NodeState::Failed,
    };
    let node = once::pick_node(r, has_release, None)
        .or_else(|| (at == HookAt::OnFailure && !r.nodes.is_empty()).then_some(0));
    let Some(node) = node else {
        let message = format!(
            "no node has the release to run the {} hooks on",
            at.as_str()
        );
        if at == HookAt::PreDeploy {
            let error = RolloutError {
                node: String::new(),
                step: at.as_str().into(),
                message,
            };
            fail(r, now, error);
        } else {
            note(r, now, "hook_skipped", "", message);
        }
        return false;
    };
    let count = r.hook_run(at).map_or(0, |h| h.hooks.len());
    if at != HookAt::OnFailure {
        // The hooks' own timeouts bound them, not the progress deadline.
        let timeouts = r.hook_run(at).map(|h| h.hooks.iter().map(|h| h.timeout_ms));
        r.deadline_ms += timeouts.map_or(0, once::budget);
    }
    let name = r.nodes[node].name.clone();
    let what = match count {
        1 => format!("the {} hook on {name}", at.as_str()),
        n => format!("{n} {} hooks on {name}, in order", at.as_str()),
    };
    once::start(r, Task::Hooks(at), node, now, what);
    true
}

/// Enters a `pre_deploy` or `post_deploy` step.
pub(super) fn start_step(r: &mut Rollout, at: HookAt, now: i64) {
    if !start(r, at, now) && at == HookAt::PostDeploy {
        step_done(r, now, None);
    }
}

/// Ends a failed rollout in `state`: its `on_failure` hooks first, if the
/// spec has any.
pub(super) fn end_failed(r: &mut Rollout, now: i64, state: RolloutState, message: String) {
    let pending = r
        .hook_run(HookAt::OnFailure)
        .is_some_and(|h| h.run.node_name.is_empty());
    if pending {
        r.ending = Some((state, message.clone()));
        if start(r, HookAt::OnFailure, now) {
            return;
        }
        r.ending = None;
    }
    finish(r, now, state, message);
}

/// Sends the next hook, or ends the point once the last one ended.
pub(super) fn run(r: &mut Rollout, at: HookAt, now: i64, sends: &mut Vec<Send>) {
    if at == HookAt::PreDeploy && r.error.is_some() {
        return;
    }
    if let once::Next::Waiting = once::run(r, Task::Hooks(at), now, sends) {
        return;
    }
    let name = at.as_str();
    if at == HookAt::OnFailure {
        let (state, message) = r.ending.take().expect("a failed rollout's end");
        finish(r, now, state, message);
        return;
    }
    step_done(
        r,
        now,
        Some(("hooks_done", format!("the {name} hooks ran"))),
    );
}

pub(super) fn on_result(r: &mut Rollout, at: HookAt, now: i64, outcome: Outcome) {
    let task = Task::Hooks(at);
    let run = task.run(r);
    let (index, node) = (run.next, run.node_name.clone());
    let argv = task
        .command(r, index)
        .map(|c| c.argv.join(" "))
        .unwrap_or_default();
    let what = format!("{} hook {} ({argv})", at.as_str(), index + 1);
    match (once::on_result(r, task, outcome, &what), at) {
        (Ended::Passed, _) => note(r, now, "hook_passed", &node, format!("{what} passed")),
        (Ended::Failed(message), HookAt::PreDeploy) => fail(
            r,
            now,
            RolloutError {
                node,
                step: at.as_str().into(),
                message,
            },
        ),
        (Ended::Unknown(message), HookAt::PreDeploy) => once::hold(r, now, message),
        // After the release is out, or after the failure: reported, and
        // the next hook runs.
        (Ended::Failed(message) | Ended::Unknown(message), _) => {
            let run = task.run_mut(r);
            run.unknown = false;
            run.next = index + 1;
            note(r, now, "hook_failed", &node, message);
        }
    }
}
