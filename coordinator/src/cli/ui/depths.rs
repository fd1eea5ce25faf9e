//! Each queue's depth over time, as its nodes' probes read it: kept by
//! the dashboard from the reads it makes while a page is open (the last
//! `KEPT` probes of each queue), for the queue charts.

use std::collections::{BTreeMap, VecDeque};

use cutover_proto::v1 as pb;

/// Probes kept per queue: at the default 5 s probe, ten minutes.
const KEPT: usize = 120;

/// (env, service, queue).
pub type QueueKey = (String, String, String);

#[derive(Debug, Clone, Default)]
pub struct QueueDepths(BTreeMap<QueueKey, VecDeque<(i64, u64)>>);

impl QueueDepths {
    pub fn key(q: &pb::QueueEntry) -> QueueKey {
        (q.env.clone(), q.service.clone(), q.queue.clone())
    }

    /// These depths and `queues`' new probes (one a probe: a queue read
    /// again with the same probe time adds nothing).
    pub fn with(&self, queues: &[pb::QueueEntry]) -> QueueDepths {
        let mut next = self.clone();
        for q in queues {
            let samples = next.0.entry(Self::key(q)).or_default();
            if samples.back().is_some_and(|(at, _)| *at >= q.probed_at_ms) {
                continue;
            }
            samples.push_back((q.probed_at_ms, q.waiting));
            if samples.len() > KEPT {
                samples.pop_front();
            }
        }
        next
    }

    /// Oldest first.
    pub fn of(&self, key: &QueueKey) -> impl Iterator<Item = &(i64, u64)> {
        self.0.get(key).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_counts_once_and_the_oldest_go() {
        let probe = |at: i64, waiting: u64| pb::QueueEntry {
            env: "production".into(),
            service: "worker".into(),
            queue: "default".into(),
            probed_at_ms: at,
            waiting,
            ..Default::default()
        };
        let mut depths = QueueDepths::default();
        for at in 0..(KEPT as i64 + 10) {
            depths = depths.with(&[probe(at, at as u64)]).with(&[probe(at, 999)]);
        }
        let kept: Vec<&(i64, u64)> = depths.of(&QueueDepths::key(&probe(0, 0))).collect();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(*kept[0], (10, 10));
        assert!(kept.iter().all(|(at, waiting)| *at as u64 == *waiting));
    }
}
