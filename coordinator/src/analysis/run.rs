//! One analysis step's run, kept with the rollout: each metric's samples
//! (when, the values, the outcome) and the verdicts. Pure: the engine
//! records samples as they come (`record`), a repeat of one already taken
//! (a measurement answered twice, a driver restarted) is ignored, and the
//! verdicts follow from the samples alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::proxy::NodeCounts;
use super::{Analysis, Metric, Provider};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRun {
    /// The canary step (its index) that runs it.
    pub step: u32,
    pub name: String,
    pub started_at_ms: i64,
    pub metrics: Vec<MetricRun>,
    /// `None` while it runs.
    pub verdict: Option<Verdict>,
    /// What decided it: the metric, its values, its condition.
    #[serde(default)]
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRun {
    pub name: String,
    pub samples: Vec<Sample>,
    /// proxy: the totals the next window starts from, by node name.
    #[serde(default)]
    pub baseline: Option<BTreeMap<String, NodeCounts>>,
    pub verdict: Option<Verdict>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at_ms: i64,
    pub outcome: Outcome,
    /// What the condition read (for proxy: every value of the window).
    pub values: BTreeMap<String, f64>,
    /// Why it has no verdict, when it has none.
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    Inconclusive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Successful,
    Failed,
    Inconclusive,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Successful => "successful",
            Verdict::Failed => "failed",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One measurement: the values the provider gave, or why it gave none.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    Values(BTreeMap<String, f64>),
    Failed(String),
}

impl AnalysisRun {
    pub fn new(step: u32, analysis: &Analysis, now: i64) -> Self {
        AnalysisRun {
            step,
            name: analysis.name.clone(),
            started_at_ms: now,
            metrics: analysis
                .metrics
                .iter()
                .map(|m| MetricRun {
                    name: m.name.clone(),
                    samples: Vec::new(),
                    baseline: None,
                    verdict: None,
                })
                .collect(),
            verdict: None,
            summary: String::new(),
        }
    }

    /// The samples due at `now`, as (metric, sample) indexes: sample k of
    /// a metric still undecided is due `k + 1` intervals after the start,
    /// and at least an interval after the sample before (samples missed
    /// while the coordinator was down are not taken in a burst of empty
    /// windows).
    pub fn due<'a>(
        &'a self,
        analysis: &'a Analysis,
        now: i64,
    ) -> impl Iterator<Item = (usize, usize)> + 'a {
        self.metrics
            .iter()
            .zip(&analysis.metrics)
            .enumerate()
            .filter(move |(_, (run, metric))| {
                let interval = metric.interval_ms as i64;
                let planned = self.started_at_ms + (run.samples.len() as i64 + 1) * interval;
                let spaced = run.samples.last().map_or(0, |s| s.at_ms + interval);
                self.verdict.is_none() && run.verdict.is_none() && now >= planned.max(spaced)
            })
            .map(|(i, (run, _))| (i, run.samples.len()))
    }

    /// Records sample `sample` of metric `m`; a sample that is not the
    /// next one, or one for a run or metric already decided, is ignored.
    /// Returns whether it was recorded.
    pub fn record(
        &mut self,
        analysis: &Analysis,
        m: usize,
        sample: usize,
        now: i64,
        measured: Measured,
    ) -> bool {
        let (Some(run), Some(metric)) = (self.metrics.get_mut(m), analysis.metrics.get(m)) else {
            return false;
        };
        if self.verdict.is_some() || run.verdict.is_some() || run.samples.len() != sample {
            return false;
        }
        run.samples.push(judge(metric, now, measured));
        run.verdict = metric_verdict(metric, &run.samples);
        self.settle(analysis);
        true
    }

    /// The run's verdict from its metrics': a failed metric fails it at
    /// once; otherwise it waits for every metric, and any inconclusive one
    /// makes it inconclusive.
    fn settle(&mut self, analysis: &Analysis) {
        let failed = self
            .metrics
            .iter()
            .zip(&analysis.metrics)
            .find(|(run, _)| run.verdict == Some(Verdict::Failed));
        if let Some((run, metric)) = failed {
            self.summary = describe(metric, run);
            self.verdict = Some(Verdict::Failed);
            return;
        }
        if self.metrics.iter().any(|m| m.verdict.is_none()) {
            return;
        }
        let inconclusive = self
            .metrics
            .iter()
            .zip(&analysis.metrics)
            .find(|(run, _)| run.verdict == Some(Verdict::Inconclusive));
        (self.verdict, self.summary) = match inconclusive {
            Some((run, metric)) => (Some(Verdict::Inconclusive), describe(metric, run)),
            None => (
                Some(Verdict::Successful),
                format!(
                    "every metric met its condition ({})",
                    self.metrics
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
    }
}

/// One sample's outcome: the condition on the values, unless there were
/// too few requests to judge or no values at all.
fn judge(metric: &Metric, now: i64, measured: Measured) -> Sample {
    let values = match measured {
        // A value that is not a number (NaN, infinite) judges nothing,
        // and the store could not keep it.
        Measured::Values(values) if values.values().all(|v| v.is_finite()) => values,
        Measured::Values(values) => {
            let bad: Vec<&String> = values
                .iter()
                .filter(|(_, v)| !v.is_finite())
                .map(|(k, _)| k)
                .collect();
            return Sample {
                at_ms: now,
                outcome: Outcome::Inconclusive,
                values: values
                    .iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                note: format!(
                    "{} measured no number",
                    bad.iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
        Measured::Failed(note) => {
            return Sample {
                at_ms: now,
                outcome: Outcome::Inconclusive,
                values: BTreeMap::new(),
                note,
            }
        }
    };
    let (outcome, note) = match values.get("canary_requests") {
        Some(n) if metric.provider == Provider::Proxy && *n < metric.min_requests as f64 => (
            Outcome::Inconclusive,
            format!(
                "the canary served {n} requests in the window, fewer than min_requests {}",
                metric.min_requests
            ),
        ),
        _ => match metric.condition().map(|c| c.holds(&values)) {
            Ok(Ok(true)) => (Outcome::Passed, String::new()),
            Ok(Ok(false)) => (Outcome::Failed, String::new()),
            Ok(Err(why)) => (Outcome::Inconclusive, why.to_string()),
            Err(why) => (
                Outcome::Inconclusive,
                format!("this version of cutover cannot evaluate the condition: {why}"),
            ),
        },
    };
    Sample {
        at_ms: now,
        outcome,
        values,
        note,
    }
}

fn metric_verdict(metric: &Metric, samples: &[Sample]) -> Option<Verdict> {
    let count = |o: Outcome| samples.iter().filter(|s| s.outcome == o).count() as u32;
    if count(Outcome::Failed) > metric.failure_limit {
        Some(Verdict::Failed)
    } else if count(Outcome::Inconclusive) > metric.inconclusive_limit {
        Some(Verdict::Inconclusive)
    } else if samples.len() as u32 >= metric.count && count(Outcome::Passed) == 0 {
        // Within every limit, but nothing ever met the condition.
        Some(Verdict::Inconclusive)
    } else if samples.len() as u32 >= metric.count {
        Some(Verdict::Successful)
    } else {
        None
    }
}

/// "metric errors (proxy): canary_success_rate >= 0.99 failed in 1 of 2
/// samples (failure_limit 0); last: canary_success_rate=0.9, ...".
fn describe(metric: &Metric, run: &MetricRun) -> String {
    let count = |o: Outcome| run.samples.iter().filter(|s| s.outcome == o).count();
    let (what, n, limit_name, limit) = match run.verdict {
        Some(Verdict::Failed) => (
            "failed",
            count(Outcome::Failed),
            "failure_limit",
            metric.failure_limit,
        ),
        _ => (
            "had no verdict",
            count(Outcome::Inconclusive),
            "inconclusive_limit",
            metric.inconclusive_limit,
        ),
    };
    let mut text = format!(
        "metric {} ({}): `{}` {what} in {n} of {} samples ({limit_name} {limit})",
        metric.name,
        metric.provider.as_str(),
        metric.condition,
        run.samples.len(),
    );
    if let Some(last) = run.samples.last() {
        let condition = metric.condition().ok();
        let names = condition.as_ref().map(|c| c.names()).unwrap_or_default();
        let shown: Vec<String> = last
            .values
            .iter()
            .filter(|(k, _)| names.contains(&k.as_str()) || k.ends_with("_requests"))
            .map(|(k, v)| format!("{k}={}", round(*v)))
            .collect();
        if !shown.is_empty() {
            text.push_str(&format!("; last sample: {}", shown.join(", ")));
        }
        if !last.note.is_empty() {
            text.push_str(&format!("; {}", last.note));
        }
    }
    text
}

/// Four significant decimals at most: what a person reads.
fn round(v: f64) -> String {
    let text = format!("{v:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analysis(failure_limit: u32, inconclusive_limit: u32, min_requests: u64) -> Analysis {
        Analysis {
            name: "errors".into(),
            metrics: vec![Metric {
                name: "success".into(),
                provider: Provider::Proxy,
                condition: "canary_success_rate >= 0.99".into(),
                interval_ms: 1000,
                count: 3,
                failure_limit,
                inconclusive_limit,
                min_requests,
            }],
        }
    }

    fn values(rate: f64, requests: f64) -> Measured {
        Measured::Values(BTreeMap::from([
            ("canary_success_rate".to_string(), rate),
            ("canary_requests".to_string(), requests),
        ]))
    }

    #[test]
    fn samples_fall_due_one_interval_apart_and_a_repeat_is_ignored() {
        let a = analysis(0, 0, 0);
        let mut run = AnalysisRun::new(2, &a, 10_000);
        assert_eq!(run.due(&a, 10_999).count(), 0);
        assert_eq!(run.due(&a, 11_000).collect::<Vec<_>>(), [(0, 0)]);
        assert!(run.record(&a, 0, 0, 11_000, values(1.0, 100.0)));
        assert!(
            !run.record(&a, 0, 0, 11_100, values(0.5, 100.0)),
            "a repeat"
        );
        assert_eq!(run.due(&a, 11_999).count(), 0);
        assert!(run.record(&a, 0, 1, 12_000, values(1.0, 100.0)));
        assert!(run.record(&a, 0, 2, 13_000, values(0.995, 100.0)));
        assert_eq!(run.verdict, Some(Verdict::Successful));
        assert_eq!(run.due(&a, 99_000).count(), 0);
    }

    #[test]
    fn a_failed_sample_beyond_the_limit_fails_the_run_naming_metric_and_values() {
        let a = analysis(0, 0, 0);
        let mut run = AnalysisRun::new(2, &a, 0);
        run.record(&a, 0, 0, 1000, values(0.9, 120.0));
        assert_eq!(run.verdict, Some(Verdict::Failed));
        assert_eq!(
            run.summary,
            "metric success (proxy): `canary_success_rate >= 0.99` failed in 1 of 1 samples (failure_limit 0); last sample: canary_requests=120, canary_success_rate=0.9"
        );
        // One failure allowed: the run goes on.
        let a = analysis(1, 0, 0);
        let mut run = AnalysisRun::new(2, &a, 0);
        run.record(&a, 0, 0, 1000, values(0.9, 120.0));
        assert_eq!(run.verdict, None);
    }

    #[test]
    fn no_number_or_no_sample_passed_is_never_a_success() {
        let mut a = analysis(1, 1, 0);
        a.metrics[0].count = 2;
        let mut run = AnalysisRun::new(0, &a, 0);
        // Prometheus said NaN: no verdict, and nothing the store cannot keep.
        run.record(&a, 0, 0, 1000, values(f64::NAN, 100.0));
        let sample = &run.metrics[0].samples[0];
        assert_eq!(sample.outcome, Outcome::Inconclusive);
        assert!(sample.values.values().all(|v| v.is_finite()));
        assert!(sample
            .note
            .contains("canary_success_rate measured no number"));
        // One failed, one without a verdict: within both limits, but
        // nothing passed.
        run.record(&a, 0, 1, 2000, values(0.5, 100.0));
        assert_eq!(run.verdict, Some(Verdict::Inconclusive));
    }

    #[test]
    fn samples_missed_while_the_coordinator_was_down_are_not_taken_in_a_burst() {
        let a = analysis(0, 0, 0);
        let mut run = AnalysisRun::new(0, &a, 0);
        // Down from 500 to 5000: one sample now, the next an interval on.
        assert_eq!(run.due(&a, 5_000).collect::<Vec<_>>(), [(0, 0)]);
        run.record(&a, 0, 0, 5_000, values(1.0, 100.0));
        assert_eq!(run.due(&a, 5_250).count(), 0);
        assert_eq!(run.due(&a, 6_000).collect::<Vec<_>>(), [(0, 1)]);
    }

    #[test]
    fn too_little_traffic_or_no_value_is_inconclusive_not_passed() {
        let a = analysis(0, 1, 50);
        let mut run = AnalysisRun::new(0, &a, 0);
        run.record(&a, 0, 0, 1000, values(1.0, 12.0));
        assert_eq!(run.metrics[0].samples[0].outcome, Outcome::Inconclusive);
        assert!(run.metrics[0].samples[0]
            .note
            .contains("fewer than min_requests 50"));
        assert_eq!(run.verdict, None, "one inconclusive sample is allowed");
        run.record(&a, 0, 1, 2000, Measured::Failed("no answer".into()));
        assert_eq!(run.verdict, Some(Verdict::Inconclusive));
        assert!(
            run.summary.contains("had no verdict in 2 of 2 samples"),
            "{}",
            run.summary
        );
        assert!(run.summary.contains("no answer"), "{}", run.summary);
        // A value the condition needs is missing: no verdict either.
        let mut run = AnalysisRun::new(0, &a, 0);
        run.record(
            &a,
            0,
            0,
            1000,
            Measured::Values(BTreeMap::from([("canary_requests".to_string(), 80.0)])),
        );
        assert_eq!(run.metrics[0].samples[0].outcome, Outcome::Inconclusive);
        assert!(run.metrics[0].samples[0]
            .note
            .contains("canary_success_rate has no value"));
    }
}
