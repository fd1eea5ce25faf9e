//! The canary strategy's cutover: the canary nodes start the release
//! beside the stable one (weight 0), then the plan's steps run one after
//! the other (`set_weight` on every canary node, `pause` for a while or
//! until promoted), then the promotion: the canary nodes switch to the
//! release in their proxy alone (batch 1), the others follow in the
//! promotion's batches, as rolling's (`rolling.rs`).

use super::analysis;
use super::commands::dispatch;
use super::steps::Cutover;
use super::{fail, in_flight, note, pause, Send};
use crate::analysis::run::Verdict;
use crate::rollout::model::{
    CanaryPhase, NodeState, Phase, RollingPhase, Rollout, RolloutError, RolloutNode, RolloutState,
};
use crate::strategy::canary::{Canary, CanaryStep};

impl Cutover for Canary {
    fn start(&self, r: &mut Rollout, now: i64) {
        let targets = r
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Prepared)
            .count();
        // Only a node that serves a release can split its traffic with the
        // canary; one that serves nothing yet joins at the promotion.
        let want = self.canary_nodes.nodes(targets);
        let chosen: Vec<usize> = (0..r.nodes.len())
            .filter(|&i| {
                r.nodes[i].state == NodeState::Prepared && !r.nodes[i].from_release.is_empty()
            })
            .take(want)
            .collect();
        if chosen.is_empty() {
            note(
                r,
                now,
                "canary_skipped",
                "",
                "no node serves a stable release to split traffic with: rolling out in batches"
                    .into(),
            );
            self.promotion.start(r, now);
            return;
        }
        for &i in &chosen {
            r.nodes[i].canary = true;
            r.nodes[i].batch = Some(0);
        }
        let rest = targets - chosen.len();
        r.batches = 1 + (rest as u32).div_ceil(r.batch_size.max(1));
        // Behind a load balancer the weights shift the fleet's requests to
        // the canary nodes when other nodes serve the stable release; with
        // the canary on every serving node their proxies split on their
        // own.
        r.balancer_split = r.load_balancer.is_some()
            && r.nodes
                .iter()
                .any(|n| n.state == NodeState::Prepared && !n.canary && !n.from_release.is_empty());
        let names: Vec<&str> = chosen.iter().map(|&i| r.nodes[i].name.as_str()).collect();
        let message = format!(
            "canary {} on {} of {targets} nodes ({}); the stable release keeps serving beside it",
            r.release.id(),
            names.len(),
            names.join(", ")
        );
        r.phase = Phase::Canary(CanaryPhase::Staging);
        note(r, now, "canary_started", "", message);
    }

    fn run(&self, r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
        match r.phase {
            Phase::Canary(CanaryPhase::Staging) => self.stage(r, now, sends),
            Phase::Canary(CanaryPhase::Step { index, since_ms }) => {
                analysis::background(r, now, index);
                if r.error.is_some() {
                    return;
                }
                if r.promote_full {
                    if in_flight(r) == 0 {
                        promote(r, now, "every remaining step skipped on request");
                    }
                    return;
                }
                match since_ms {
                    None => self.begin(r, now, index),
                    Some(since) => self.step(r, now, index, since, sends),
                }
            }
            Phase::Rolling(_) => self.promotion.run(r, now, sends),
            _ => {}
        }
    }
}

impl Canary {
    /// The canary nodes start the release beside the stable one, all at
    /// once, taking no traffic yet.
    fn stage(&self, r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
        for i in 0..r.nodes.len() {
            if r.nodes[i].canary && r.nodes[i].state == NodeState::Prepared {
                dispatch(r, now, i, NodeState::Staging, sends);
            }
        }
        if canaries(r).all(|n| n.state == NodeState::Canary) {
            r.phase = Phase::Canary(CanaryPhase::Step {
                index: 0,
                since_ms: None,
            });
        }
    }

    /// Step `index` begins, unless a pause was asked for: between two
    /// steps is the canary's safe point.
    fn begin(&self, r: &mut Rollout, now: i64, index: u32) {
        let Some(step) = self.steps.get(index as usize) else {
            promote(r, now, "its last step is done");
            return;
        };
        if r.pause_requested {
            pause(r, now);
            return;
        }
        r.phase = Phase::Canary(CanaryPhase::Step {
            index,
            since_ms: Some(now),
        });
        let message = format!("step {} of {}: {step}", index + 1, self.steps.len());
        note(r, now, "canary_step", "", message);
        if let CanaryStep::Analysis(name) = step {
            analysis::begin(r, now, index, name);
        }
    }

    fn step(&self, r: &mut Rollout, now: i64, index: u32, since: i64, sends: &mut Vec<Send>) {
        match &self.steps[index as usize] {
            &CanaryStep::SetWeight(weight) => {
                for i in 0..r.nodes.len() {
                    let node = &r.nodes[i];
                    if node.canary && node.state == NodeState::Canary && node.weight != weight {
                        dispatch(r, now, i, NodeState::Weighting, sends);
                    }
                }
                if canaries(r).all(|n| n.state == NodeState::Canary && n.weight == weight) {
                    let fleet = fleet_weight(r, weight);
                    let message = match r.balancer_split {
                        true => format!(
                            "the canary gets {weight}% of the fleet's requests: the load balancer's weights send that share to the canary nodes, which send it all to the canary"
                        ),
                        false => format!(
                            "the canary gets {weight}% of the canary nodes' requests ({fleet:.1}% of the fleet's)"
                        ),
                    };
                    note(r, now, "canary_weight", "", message);
                    next(r, index);
                }
            }
            CanaryStep::Pause(Some(ms)) if now >= since + *ms as i64 => {
                end_pause(r, now, since);
                next(r, index);
            }
            CanaryStep::Pause(_) => {}
            CanaryStep::Analysis(name) => match analysis::verdict(r, index) {
                Some((Verdict::Successful, summary)) => {
                    end_pause(r, now, since);
                    note(
                        r,
                        now,
                        "analysis_successful",
                        "",
                        format!("analysis {name} successful: {summary}"),
                    );
                    next(r, index);
                }
                Some((Verdict::Failed, summary)) => fail(
                    r,
                    now,
                    RolloutError {
                        node: String::new(),
                        step: "analysis".into(),
                        message: format!("analysis {name} failed: {summary}"),
                    },
                ),
                // Inconclusive: a person decides (promote or abort).
                Some((Verdict::Inconclusive, _)) | None => {}
            },
        }
    }
}

/// `cutover rollout promote`: the pause the canary waits at ends now (or,
/// `full`, every remaining step is skipped). Callers check first
/// (`promote_refusal`); anything else is ignored.
pub(super) fn on_promote(r: &mut Rollout, now: i64, by: &str, full: bool) {
    let Phase::Canary(CanaryPhase::Step { index, since_ms }) = r.phase else {
        return;
    };
    let Some(canary) = r.strategy.canary() else {
        return;
    };
    if full {
        if let Some(since) = since_ms.filter(|_| at_pause(r)) {
            end_pause(r, now, since);
        }
        r.promote_full = true;
        note(
            r,
            now,
            "promote_requested",
            "",
            format!("{by} promoted the canary fully: the remaining steps are skipped"),
        );
        return;
    }
    let step = canary.steps.get(index as usize);
    if let (Some(since), Some(CanaryStep::Pause(_) | CanaryStep::Analysis(_))) = (since_ms, step) {
        end_pause(r, now, since);
        note(
            r,
            now,
            "promoted",
            "",
            format!("{by} promoted the canary past step {}", index + 1),
        );
        next(r, index);
    }
}

/// Why `promote` (`full`) cannot act on `r` now; `None` when it can.
pub fn promote_refusal(r: &Rollout, full: bool) -> Option<String> {
    let Some(canary) = r.strategy.canary() else {
        return Some(format!(
            "rollout {} is not a canary: there is nothing to promote",
            r.id
        ));
    };
    let Phase::Canary(phase) = r.phase else {
        return Some(format!(
            "rollout {} is {} and not at a canary step: there is nothing to promote",
            r.id,
            r.state.as_str()
        ));
    };
    // The engine takes a promotion only while the rollout runs.
    if r.state == RolloutState::Paused {
        return Some(format!(
            "rollout {} is paused: `cutover rollout resume {}` first, then promote",
            r.id, r.id
        ));
    }
    if r.state != RolloutState::Running {
        return Some(format!(
            "rollout {} is {}: there is nothing to promote",
            r.id,
            r.state.as_str()
        ));
    }
    if r.abort_requested {
        return Some(format!("rollout {} is being aborted", r.id));
    }
    let running = |n: &&RolloutNode| matches!(n.state, NodeState::Canary | NodeState::Weighting);
    if let Some(node) = canaries(r).find(|n| running(n) && !n.seen_healthy) {
        return Some(format!(
            "the canary on node {} has not been reported healthy yet: look at `cutover rollout status {}`, then promote again or abort",
            node.name, r.id
        ));
    }
    if let Some(node) =
        canaries(r).find(|n| n.state != NodeState::Canary && n.state != NodeState::Weighting)
    {
        return Some(format!(
            "node {} is {} in this canary: promote once every canary node runs the canary",
            node.name,
            node.state.as_str()
        ));
    }
    if full {
        return None;
    }
    match (begun_step(r), phase) {
        (Some((_, CanaryStep::Pause(_))), _) => None,
        (Some((index, step @ CanaryStep::Analysis(_))), _) => match analysis::verdict(r, index) {
            Some((Verdict::Inconclusive, _)) => None,
            _ => Some(format!(
                "rollout {} runs its analysis at step {} ({step}): it goes on by itself when the analysis succeeds; `--full` skips every remaining step",
                r.id,
                index + 1,
            )),
        },
        (_, CanaryPhase::Step { index, .. }) if (index as usize) < canary.steps.len() => Some(format!(
            "rollout {} is at step {} ({}), not at a pause: promote ends a pause; `--full` skips every remaining step",
            r.id,
            index + 1,
            canary.steps[index as usize]
        )),
        _ => Some(format!("rollout {} is starting its canary: promote once it waits at a pause, or use `--full`", r.id)),
    }
}

/// The step the canary is at, with its index, once that step has begun.
fn begun_step(r: &Rollout) -> Option<(u32, &CanaryStep)> {
    let (
        Phase::Canary(CanaryPhase::Step {
            index,
            since_ms: Some(_),
        }),
        Some(canary),
    ) = (r.phase, r.strategy.canary())
    else {
        return None;
    };
    Some((index, canary.steps.get(index as usize)?))
}

/// Whether the canary waits at a pause, or measures at an analysis step,
/// that has begun: time there is planned, and does not count against the
/// progress deadline.
pub(super) fn at_pause(r: &Rollout) -> bool {
    matches!(
        begun_step(r),
        Some((_, CanaryStep::Pause(_) | CanaryStep::Analysis(_)))
    )
}

/// Whether the canary waits for `cutover rollout promote` (at a pause
/// without a duration, or after an inconclusive analysis) and would take
/// it: every canary node reported its canary healthy since it started. A
/// CI job that sees this (exit code 3) may promote at once.
pub fn awaiting_promotion(r: &Rollout) -> bool {
    let waits = match begun_step(r) {
        Some((_, CanaryStep::Pause(None))) => true,
        Some((index, CanaryStep::Analysis(_))) => {
            matches!(
                analysis::verdict(r, index),
                Some((Verdict::Inconclusive, _))
            )
        }
        _ => false,
    };
    !r.state.is_terminal() && waits && promote_refusal(r, false).is_none()
}

/// The weight the canary nodes are to have in the step running: what a
/// weight change sends (and resends after a restart).
pub fn target_weight(r: &Rollout) -> u32 {
    let (Phase::Canary(CanaryPhase::Step { index, .. }), Some(canary)) =
        (r.phase, r.strategy.canary())
    else {
        return 0;
    };
    match canary.steps.get(index as usize) {
        Some(CanaryStep::SetWeight(weight)) => *weight,
        _ => 0,
    }
}

/// What the canary nodes' proxies send to the canary at step weight
/// `weight`: all of it when the load balancer's weights give the canary
/// its share (`balancer_split`).
pub(super) fn proxy_weight(r: &Rollout, weight: u32) -> u32 {
    match r.balancer_split && weight > 0 {
        true => 100,
        false => weight,
    }
}

/// The canary's share of the whole fleet's requests at `weight` on its
/// nodes (a load balancer spreading requests evenly, or weighted by
/// cutover: `balancer_split`), in percent.
pub fn fleet_weight(r: &Rollout, weight: u32) -> f64 {
    if r.balancer_split {
        return f64::from(weight);
    }
    let targets = r
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Unchanged)
        .count();
    let canaries = canaries(r).count();
    if targets == 0 {
        return 0.0;
    }
    f64::from(weight) * canaries as f64 / targets as f64
}

fn canaries(r: &Rollout) -> impl Iterator<Item = &RolloutNode> {
    r.nodes.iter().filter(|n| n.canary)
}

/// Time at a pause does not count against the progress deadline.
fn end_pause(r: &mut Rollout, now: i64, since: i64) {
    r.deadline_ms += (now - since).max(0);
}

fn next(r: &mut Rollout, index: u32) {
    r.phase = Phase::Canary(CanaryPhase::Step {
        index: index + 1,
        since_ms: None,
    });
}

/// The canary is promoted: its nodes switch to it (batch 1), the others
/// follow in the promotion's batches.
fn promote(r: &mut Rollout, now: i64, why: &str) {
    r.promote_full = false;
    let others = r
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Prepared)
        .count();
    r.phase = Phase::Rolling(RollingPhase::Batch(0));
    let message = format!(
        "canary promoted ({why}): the canary nodes switch to {}, then {others} other nodes in batches",
        r.release.id()
    );
    note(r, now, "canary_promoted", "", message);
}
