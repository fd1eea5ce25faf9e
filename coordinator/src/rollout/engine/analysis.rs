//! A canary's analysis steps (see `crate::analysis`): the run begins with
//! its step; proxy samples are taken on ticks from the canary nodes'
//! heartbeats (their side release against the release they serve), the
//! others arrive measured by the driver (`Input::Measured`). The canary's
//! step then goes on, fails the rollout (every node back to stable) or,
//! inconclusive, waits for `promote` or `abort`.
//!
//! The background analysis (`background_analysis`) runs beside the steps
//! from its step on until the promotion, one run after the other (run
//! `BACKGROUND`): a failed run fails the rollout, a successful or
//! inconclusive one is followed by the next (it gates nothing itself).

use std::collections::{BTreeMap, HashMap};

use super::{fail, note, Observation};
use crate::analysis::proxy::{self, NodeCounts};
use crate::analysis::run::{AnalysisRun, Measured, Verdict};
use crate::analysis::{Analysis, Provider};
use crate::rollout::model::{CanaryPhase, NodeState, Phase, Rollout, RolloutError};

/// The step index of the background analysis's runs.
pub const BACKGROUND: u32 = u32::MAX;
use crate::store::Traffic;

/// A measurement the driver is to take: sample `sample` of metric
/// `metric` of the analysis of canary step `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub step: u32,
    pub metric: usize,
    pub sample: usize,
    pub provider: Provider,
}

/// The analysis of step `index` begins, named `name` (once).
pub(super) fn begin(r: &mut Rollout, now: i64, index: u32, name: &str) {
    if r.analysis.iter().any(|a| a.step == index) {
        return;
    }
    if let Some(template) = template(r, name) {
        let run = AnalysisRun::new(index, &template, now);
        r.analysis.push(run);
    }
}

fn template(r: &Rollout, name: &str) -> Option<Analysis> {
    r.strategy.canary()?.analyses.get(name).cloned()
}

/// The runs measuring now, with their templates: the analysis of the
/// canary step running (once begun), and the background analysis's
/// undecided run from its step on.
fn active(r: &Rollout) -> Vec<(usize, Analysis)> {
    let Phase::Canary(CanaryPhase::Step { index, since_ms }) = r.phase else {
        return Vec::new();
    };
    let step = since_ms.and_then(|_| r.analysis.iter().position(|a| a.step == index));
    let background = r
        .strategy
        .canary()
        .and_then(|c| c.background.as_ref())
        .filter(|b| index >= b.from_index)
        .and_then(|_| {
            r.analysis
                .iter()
                .rposition(|a| a.step == BACKGROUND && a.verdict.is_none())
        });
    step.into_iter()
        .chain(background)
        .filter_map(|i| Some((i, template(r, &r.analysis[i].name)?)))
        .collect()
}

/// The background analysis at step `index` (see the module): its first
/// run from its step on, the next after one ended, or the rollout's
/// failure after a failed one.
pub(super) fn background(r: &mut Rollout, now: i64, index: u32) {
    let Some(spec) = r.strategy.canary().and_then(|c| c.background.clone()) else {
        return;
    };
    if index < spec.from_index || r.error.is_some() {
        return;
    }
    let last = r.analysis.iter().rposition(|a| a.step == BACKGROUND);
    let ended = match last.map(|i| (i, r.analysis[i].verdict)) {
        Some((_, None)) => return,
        Some((_, Some(Verdict::Failed))) => {
            let summary = r.analysis[last.expect("matched")].summary.clone();
            let error = RolloutError {
                node: String::new(),
                step: "analysis".into(),
                message: format!("background analysis {} failed: {summary}", spec.analysis),
            };
            return fail(r, now, error);
        }
        Some((i, Some(verdict))) => {
            let message = format!(
                "background analysis {} {}: {}; measuring again",
                spec.analysis,
                verdict.as_str(),
                r.analysis[i].summary
            );
            note(r, now, "background_analysis", "", message);
            Some(i)
        }
        None => None,
    };
    // One ended run is kept to show, beside the one running.
    if let Some(ended) = ended {
        let mut i = 0;
        r.analysis.retain(|run| {
            let keep = run.step != BACKGROUND || i == ended;
            i += 1;
            keep
        });
    }
    if let Some(template) = template(r, &spec.analysis) {
        let mut run = AnalysisRun::new(BACKGROUND, &template, now);
        // Its windows go on from where the last run's ended.
        if let Some(ended) = r.analysis.iter().rfind(|a| a.step == BACKGROUND) {
            for (metric, before) in run.metrics.iter_mut().zip(&ended.metrics) {
                metric.baseline = before.baseline.clone();
            }
        }
        r.analysis.push(run);
    }
}

/// The verdict of step `index`'s analysis, with what decided it.
pub(super) fn verdict(r: &Rollout, index: u32) -> Option<(Verdict, String)> {
    let run = r.analysis.iter().find(|a| a.step == index)?;
    Some((run.verdict?, run.summary.clone()))
}

/// The measurements of other providers due now, for the driver.
pub fn external_due(r: &Rollout, now: i64) -> Vec<Due> {
    active(r)
        .into_iter()
        .flat_map(|(i, template)| {
            let run = &r.analysis[i];
            run.due(&template, now)
                .filter(|(m, _)| template.metrics[*m].provider != Provider::Proxy)
                .map(|(metric, sample)| Due {
                    step: run.step,
                    metric,
                    sample,
                    provider: template.metrics[metric].provider.clone(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A measurement the driver took: recorded if it is still the one due.
pub(super) fn on_measured(
    r: &mut Rollout,
    now: i64,
    step: u32,
    metric: usize,
    sample: usize,
    result: Result<f64, String>,
) {
    let Some((i, template)) = active(r)
        .into_iter()
        .find(|(i, _)| r.analysis[*i].step == step)
    else {
        return;
    };
    let measured = match result {
        Ok(value) => Measured::Values(BTreeMap::from([("result".to_string(), value)])),
        Err(why) => Measured::Failed(why),
    };
    if r.analysis[i].record(&template, metric, sample, now, measured) {
        noted(r, now, i);
    }
}

/// On a tick: the proxy samples due, each the window since the one before
/// (a node's first window starts at the first tick that sees it).
pub(super) fn on_tick(r: &mut Rollout, now: i64, seen: &HashMap<&str, &Observation>) {
    for (i, template) in active(r) {
        sample_proxies(r, now, seen, i, &template);
    }
}

/// The proxy samples of run `i` due now.
fn sample_proxies(
    r: &mut Rollout,
    now: i64,
    seen: &HashMap<&str, &Observation>,
    i: usize,
    template: &Analysis,
) {
    let counts = proxy_counts(r, seen);
    for (m, metric) in template.metrics.iter().enumerate() {
        if metric.provider != Provider::Proxy {
            continue;
        }
        let run = &mut r.analysis[i];
        // The run's first tick only starts its windows: one that came late
        // (the run is due already) would judge an empty window.
        let first = run.metrics[m].baseline.is_none();
        // A node's window starts when it is first seen with the canary
        // (heartbeats show it a beat after the canary started, or after
        // its agent reconnected).
        let baseline = run.metrics[m].baseline.get_or_insert_with(BTreeMap::new);
        for (node, count) in &counts {
            baseline
                .entry(node.clone())
                .or_insert_with(|| count.clone());
        }
        let baseline = baseline.clone();
        if first {
            continue;
        }
        let Some((_, sample)) = run.due(template, now).find(|(due, _)| *due == m) else {
            continue;
        };
        let values = proxy::window(&baseline, &counts).values();
        if run.record(template, m, sample, now, Measured::Values(values)) {
            // The next window starts here for the nodes seen now; a node
            // not seen this tick keeps its start (its counts since then
            // go into the next window it is seen in).
            let baseline = run.metrics[m].baseline.get_or_insert_with(BTreeMap::new);
            for (node, count) in &counts {
                baseline.insert(node.clone(), count.clone());
            }
            noted(r, now, i);
        }
    }
}

/// What each canary node's proxy counted so far: the canary (its side
/// release) and the release it serves. A release that served nothing yet
/// counts as zero. Under a balancer split the canary nodes send all to
/// the canary: the stable release is counted on the other nodes.
fn proxy_counts(r: &Rollout, seen: &HashMap<&str, &Observation>) -> BTreeMap<String, NodeCounts> {
    let canary = r.release.id();
    let counted = |traffic: Option<&Traffic>, release: &str| {
        traffic
            .cloned()
            .filter(|t| t.release_id == release)
            .unwrap_or_else(|| Traffic {
                release_id: release.to_string(),
                ..Default::default()
            })
    };
    r.nodes
        .iter()
        .filter_map(|n| {
            let seen = seen.get(n.id.as_str()).filter(|o| o.connected)?;
            let service = seen.service.as_ref()?;
            let stable = counted(service.traffic.as_ref(), &service.release_id);
            let counts = match n.canary {
                true if matches!(n.state, NodeState::Canary | NodeState::Weighting) => {
                    let side = service.side.as_ref().filter(|s| s.release_id == canary)?;
                    NodeCounts {
                        canary: counted(side.traffic.as_ref(), canary),
                        stable,
                    }
                }
                false
                    if r.balancer_split
                        && n.state == NodeState::Prepared
                        && !n.from_release.is_empty()
                        && service.release_id == n.from_release =>
                {
                    NodeCounts {
                        canary: counted(None, canary),
                        stable,
                    }
                }
                _ => return None,
            };
            Some((n.name.clone(), counts))
        })
        .collect()
}

/// Notes a sample that decided a step's run inconclusive: the step waits
/// for a person (successful and failed runs are the canary step's to act
/// on, background runs `background`'s).
fn noted(r: &mut Rollout, now: i64, i: usize) {
    let run = &r.analysis[i];
    if run.verdict == Some(Verdict::Inconclusive) && run.step != BACKGROUND {
        let message = format!(
            "analysis {} inconclusive: {}; `cutover rollout promote {}` goes on, `cutover rollout abort {}` returns every node to stable",
            run.name, run.summary, r.id, r.id
        );
        note(r, now, "analysis_inconclusive", "", message);
    }
}
