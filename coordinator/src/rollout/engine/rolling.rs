//! The rolling strategy's cutover: batches of nodes, each switched and then
//! watched for `min_healthy_time` before the next starts.

use super::commands::dispatch;
use super::steps::{step_done, Cutover};
use super::{in_flight, note, pause, Send};
use crate::rollout::model::{NodeState, Phase, RollingPhase, Rollout};
use crate::strategy::Rolling;

impl Cutover for Rolling {
    fn start(&self, r: &mut Rollout, now: i64) {
        // In the cutover from here on, even with no node left to switch.
        r.phase = Phase::Rolling(RollingPhase::Batch(0));
        next_batch(r, now, 0);
    }

    fn run(&self, r: &mut Rollout, now: i64, sends: &mut Vec<Send>) {
        match r.phase {
            Phase::Rolling(RollingPhase::Batch(batch)) => self.switch(r, now, batch, sends),
            Phase::Rolling(RollingPhase::Watch { batch, until_ms }) => {
                let members_seen = r
                    .nodes
                    .iter()
                    .filter(|n| n.batch == Some(batch))
                    .all(|n| n.seen_healthy || self.min_healthy_time_ms == 0);
                if now >= until_ms && members_seen {
                    start_batch_or_pause(r, now, batch + 1);
                }
            }
            _ => {}
        }
    }
}

impl Rolling {
    /// Switches batch `batch`'s nodes; once all did, watches them.
    fn switch(&self, r: &mut Rollout, now: i64, batch: u32, sends: &mut Vec<Send>) {
        let members: Vec<usize> = (0..r.nodes.len())
            .filter(|&i| r.nodes[i].batch == Some(batch))
            .collect();
        if members
            .iter()
            .all(|&i| r.nodes[i].state == NodeState::Switched)
        {
            let until_ms = now + self.min_healthy_time_ms as i64;
            r.phase = Phase::Rolling(RollingPhase::Watch { batch, until_ms });
            note(
                r,
                now,
                "batch_switched",
                "",
                format!(
                    "batch {} of {} switched; watching it for {}s (min_healthy_time)",
                    batch + 1,
                    r.batches,
                    self.min_healthy_time_ms / 1000
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
        let limit = match self.max_unavailable {
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
            // A canary node (a canary's promotion) switches as well: in its
            // proxy alone, the release already runs there.
            if matches!(r.nodes[i].state, NodeState::Prepared | NodeState::Canary) {
                dispatch(r, now, i, NodeState::Activating, sends);
                room -= 1;
            }
        }
    }
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
        step_done(r, now, None);
        return;
    }
    let members: Vec<usize> = waiting.into_iter().take(r.batch_size as usize).collect();
    let names: Vec<String> = members.iter().map(|&i| r.nodes[i].name.clone()).collect();
    for &i in &members {
        r.nodes[i].batch = Some(batch);
    }
    r.phase = Phase::Rolling(RollingPhase::Batch(batch));
    note(
        r,
        now,
        "batch_started",
        "",
        format!("batch {} of {}: {}", batch + 1, r.batches, names.join(", ")),
    );
}
