//! The checks of a seed whose operator stopped or removed a service: no
//! node runs it once the converger stopped those that were away, the
//! records agree, and a node that starts it behind the coordinator's back
//! is stopped again.

use tokio::time::Instant;

use super::super::scenario::SERVICES;
use super::{show, Undone, World};
use crate::rollout::model::{NodeState, Rollout, RolloutKind, RolloutState};

impl World {
    /// Nodes that run `service` though `stop` stopped it: none once the
    /// converger stopped those that were away, unless an operator aborted
    /// the stop.
    pub(super) fn not_stopped(&self, service: &str, stop: &Rollout) -> Vec<String> {
        if stop.state == RolloutState::Aborted {
            return Vec::new();
        }
        let mut wrong = Vec::new();
        for (i, node) in self.scenario.nodes.iter().enumerate() {
            if !node.labels.contains_key(service) {
                continue;
            }
            let node = self.nodes[i].lock().expect("node lock");
            if let Some(running) = node.services.get(service) {
                wrong.push(format!(
                    "node-{i} runs {service} {:?} after {} {}",
                    running.release_id,
                    stop.id,
                    stop.state.as_str()
                ));
            }
            if let Some(side) = node.sides.get(service) {
                wrong.push(format!(
                    "node-{i} runs {service}'s side release {:?} after {}",
                    side.running.release_id, stop.id
                ));
            }
        }
        wrong
    }

    /// A stop's records: the release it stopped stays current (a start
    /// starts it), a removal that succeeded leaves none; each node it
    /// knows for sure it stopped runs nothing.
    pub(super) async fn check_stop_records(&self, service: &str, stop: &Rollout) {
        let ctx = || format!("seed {}: {}", self.seed, show(stop));
        let history = self
            .store
            .releases
            .history("sim", service)
            .await
            .expect("reads never fail");
        let current = history.iter().find(|r| r.current);
        match (stop.kind, stop.state) {
            (RolloutKind::Remove, RolloutState::Succeeded) => {
                assert!(current.is_none(), "{}", ctx())
            }
            _ => assert_eq!(
                current.map(|r| r.release.id()),
                Some(stop.release.id()),
                "{}",
                ctx()
            ),
        }
        for node in stop.nodes.iter().filter(|n| n.state == NodeState::Stopped) {
            let i: usize = node.id["id-".len()..].parse().expect("sim node ids");
            let runs = self.nodes[i]
                .lock()
                .expect("node lock")
                .services
                .get(service)
                .map(|r| r.release_id.clone());
            // The converger may have stopped it again since: either way, it
            // runs nothing now.
            assert_eq!(runs, None, "node {}: {}", node.name, ctx());
        }
    }

    /// A node that runs a stopped service again (started behind the
    /// coordinator's back) is stopped by the converger.
    pub(super) async fn stopped_again(
        &self,
        i: usize,
        service: &str,
        seconds: &[Rollout],
        deadline: Instant,
    ) {
        let stop = &seconds[SERVICES
            .iter()
            .position(|s| *s == service)
            .expect("a sim service")];
        if stop.state == RolloutState::Aborted
            || !self.scenario.nodes[i].labels.contains_key(service)
        {
            return;
        }
        let undone = Undone {
            node: i,
            service,
            runs: &stop.release,
            by: stop.kind,
            to: NodeState::Stopped,
            failure: "ran a stopped service again and the converger did not stop it",
        };
        self.undone_by_converger(undone, seconds, deadline).await;
    }
}
