//! A canary's analysis runs as the operator API shows them.

use cutover_proto::v1 as pb;

use crate::analysis::run::{Outcome, Sample, Verdict};
use crate::rollout::model::{CanaryPhase, Phase, Rollout};

/// Every analysis run of `r`, in order.
pub(super) fn analysis_to_pb(r: &Rollout) -> Vec<pb::AnalysisRun> {
    let templates = r.strategy.canary().map(|c| &c.analyses);
    r.analysis
        .iter()
        .map(|run| {
            // Undecided, it runs while the rollout is at its step; a
            // metric also stops when another one decided the run.
            let background = run.step == crate::rollout::engine::BACKGROUND;
            let running = run.verdict.is_none()
                && !r.state.is_terminal()
                && matches!(r.phase, Phase::Canary(CanaryPhase::Step { index, .. }) if index == run.step || background);
            let state = |verdict: Option<Verdict>| match verdict {
                Some(v) => v.as_str(),
                None if running => "running",
                None => "stopped",
            };
            let template = templates.and_then(|t| t.get(&run.name));
            pb::AnalysisRun {
                // 0: the background analysis (steps count from 1).
                step: if background { 0 } else { run.step + 1 },
                name: run.name.clone(),
                started_at_ms: run.started_at_ms,
                state: state(run.verdict).into(),
                summary: run.summary.clone(),
                metrics: run
                    .metrics
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let spec = template.and_then(|t| t.metrics.get(i));
                        pb::AnalysisMetric {
                            name: m.name.clone(),
                            provider: spec.map_or("", |s| s.provider.as_str()).into(),
                            condition: spec.map(|s| s.condition.clone()).unwrap_or_default(),
                            state: state(m.verdict).into(),
                            count: spec.map_or(0, |s| s.count),
                            failure_limit: spec.map_or(0, |s| s.failure_limit),
                            inconclusive_limit: spec.map_or(0, |s| s.inconclusive_limit),
                            samples: m.samples.iter().map(sample_to_pb).collect(),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

fn sample_to_pb(s: &Sample) -> pb::AnalysisSample {
    pb::AnalysisSample {
        at_ms: s.at_ms,
        outcome: match s.outcome {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Inconclusive => "inconclusive",
        }
        .into(),
        values: s.values.clone().into_iter().collect(),
        note: s.note.clone(),
    }
}
