//! Charts as inline SVG, drawn here: a canary's planned weights by step,
//! and each analysis metric's samples against its threshold. No script,
//! no library; they change with the page.

use cutover_proto::v1 as pb;
use maud::{html, Markup};

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 120.0;
const PAD: f64 = 24.0;

/// The weight a canary step sets ("set_weight 20%"), if it sets one.
fn step_weight(step: &str) -> Option<f64> {
    let rest = step.strip_prefix("set_weight")?.trim();
    rest.trim_end_matches('%').trim().parse().ok()
}

/// The weight the canary has at each step, the current one marked.
pub fn canary_steps(c: &pb::CanaryStatus) -> Markup {
    let mut weight = 0.0;
    let weights: Vec<(String, f64)> = c
        .steps
        .iter()
        .map(|s| {
            if let Some(w) = step_weight(s) {
                weight = w;
            }
            (s.clone(), weight)
        })
        .collect();
    if weights.is_empty() {
        return html! {};
    }
    let step_width = (WIDTH - 2.0 * PAD) / weights.len() as f64;
    let y = |w: f64| HEIGHT - PAD - (HEIGHT - 2.0 * PAD) * w / 100.0;
    html! {
        svg.chart viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-label=(format!("canary weight by step; now step {} at {}%", c.step, c.weight)) {
            line.axis x1=(PAD) y1=(y(0.0)) x2=(WIDTH - PAD) y2=(y(0.0)) {}
            text.label x="2" y=(y(100.0) + 4.0) { "100%" }
            text.label x="2" y=(y(0.0) + 4.0) { "0" }
            @for (i, (step, w)) in weights.iter().enumerate() {
                @let x = PAD + i as f64 * step_width;
                @let current = c.step as usize == i + 1;
                rect class=(if current { "bar current" } else if (i + 1) < c.step as usize { "bar past" } else { "bar" })
                    x=(x + 2.0) y=(y(*w)) width=(step_width - 4.0) height=((y(0.0) - y(*w)).max(1.0)) {
                    title { "step " (i + 1) ": " (step) " (" (w) "%)" }
                }
            }
        }
    }
}

/// The value a sample's condition reads: the key the condition names, or
/// `result`, or the first.
fn sample_value(metric: &pb::AnalysisMetric, sample: &pb::AnalysisSample) -> Option<f64> {
    let mut keys: Vec<&String> = sample.values.keys().collect();
    keys.sort();
    keys.iter()
        .find(|k| metric.condition.contains(k.as_str()))
        .or_else(|| keys.iter().find(|k| k.as_str() == "result"))
        .or(keys.first())
        .and_then(|k| sample.values.get(*k).copied())
}

/// The number a condition compares with ("result >= 0.95" → 0.95).
fn threshold(condition: &str) -> Option<f64> {
    let after = condition.rsplit(['<', '>', '=']).next()?;
    after.trim().parse().ok()
}

pub fn analysis(runs: &[pb::AnalysisRun]) -> Markup {
    html! {
        section.analysis {
            h2 { "Analysis" }
            @for run in runs {
                div.run data-analysis=(run.name) data-state=(run.state) {
                    h3 {
                        (run.name)
                        @if run.step > 0 { " (step " (run.step) ")" } @else { " (background)" }
                        " " (super::pages::state_badge(&run.state))
                    }
                    @if !run.summary.is_empty() { p.muted { (run.summary) } }
                    @for metric in &run.metrics { (metric_chart(metric)) }
                }
            }
        }
    }
}

fn metric_chart(metric: &pb::AnalysisMetric) -> Markup {
    let points: Vec<(usize, f64, &str)> = metric
        .samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| sample_value(metric, s).map(|v| (i, v, s.outcome.as_str())))
        .collect();
    let limit = threshold(&metric.condition);
    let high = points
        .iter()
        .map(|p| p.1)
        .chain(limit)
        .fold(f64::MIN, f64::max);
    let low = points
        .iter()
        .map(|p| p.1)
        .chain(limit)
        .fold(f64::MAX, f64::min)
        .min(0.0);
    let span = if high > low { high - low } else { 1.0 };
    let slots = metric.count.max(points.len() as u32).max(1) as f64;
    let x = |i: usize| PAD + (WIDTH - 2.0 * PAD) * (i as f64 + 0.5) / slots;
    let y = |v: f64| HEIGHT - PAD - (HEIGHT - 2.0 * PAD) * (v - low) / span;
    html! {
        figure.metric data-metric=(metric.name) {
            figcaption {
                b { (metric.name) } " (" (metric.provider) "): " code { (metric.condition) } " "
                (super::pages::state_badge(&metric.state))
            }
            svg.chart viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
                aria-label=(format!("{} samples of {}", points.len(), metric.name)) {
                line.axis x1=(PAD) y1=(HEIGHT - PAD) x2=(WIDTH - PAD) y2=(HEIGHT - PAD) {}
                text.label x="2" y=(PAD) { (format!("{high:.3}")) }
                text.label x="2" y=(HEIGHT - PAD) { (format!("{low:.3}")) }
                @if let Some(limit) = limit {
                    line.threshold x1=(PAD) y1=(y(limit)) x2=(WIDTH - PAD) y2=(y(limit)) {
                        title { "threshold " (limit) }
                    }
                }
                @for (i, v, outcome) in &points {
                    circle class=(format!("sample {outcome}")) cx=(x(*i)) cy=(y(*v)) r="4" {
                        title { (outcome) ": " (v) }
                    }
                }
            }
        }
    }
}

/// A queue's depth over the probes the dashboard saw (oldest first),
/// against its limit when it has one.
pub fn depth_history<'a>(samples: impl Iterator<Item = &'a (i64, u64)>, limit: u64) -> Markup {
    let samples: Vec<u64> = samples.map(|(_, depth)| *depth).collect();
    let (w, h) = (160.0, 32.0);
    let top = samples.iter().copied().chain([limit, 1]).max().unwrap_or(1) as f64;
    let y = |v: u64| h - 2.0 - (h - 4.0) * v as f64 / top;
    let step = w / (samples.len().max(2) - 1) as f64;
    let points: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, y(*v)))
        .collect();
    let over = limit > 0 && samples.last().is_some_and(|d| *d > limit);
    html! {
        svg.depth viewBox=(format!("0 0 {w} {h}")) preserveAspectRatio="none" role="img"
            aria-label=(format!("{} probes of the queue's depth", samples.len())) data-samples=(samples.len()) {
            @if limit > 0 {
                line.threshold x1="0" y1=(y(limit)) x2=(w) y2=(y(limit)) { title { "limit " (limit) } }
            }
            polyline class=(if over { "line over" } else { "line" }) points=(points.join(" ")) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_and_steps_read_their_numbers() {
        assert_eq!(threshold("result >= 0.95"), Some(0.95));
        assert_eq!(threshold("p99 < 250"), Some(250.0));
        assert_eq!(threshold("result[0] == 'ok'"), None);
        assert_eq!(step_weight("set_weight 20%"), Some(20.0));
        assert_eq!(step_weight("pause 5m"), None);
    }

    #[test]
    fn a_canary_chart_marks_its_current_step() {
        let status = pb::CanaryStatus {
            steps: vec![
                "set_weight 20%".into(),
                "pause 1m".into(),
                "set_weight 50%".into(),
            ],
            step: 2,
            ..Default::default()
        };
        let svg = canary_steps(&status).into_string();
        assert_eq!(svg.matches("<rect").count(), 3, "{svg}");
        assert!(
            svg.contains("bar current") && svg.contains("step 2: pause 1m (20%)"),
            "{svg}"
        );
    }

    #[test]
    fn an_analysis_chart_plots_each_sample_against_the_threshold() {
        let sample = |outcome: &str, rate: f64| pb::AnalysisSample {
            outcome: outcome.into(),
            values: [("success_rate".to_string(), rate), ("p99".to_string(), 9.0)].into(),
            ..Default::default()
        };
        let run = pb::AnalysisRun {
            name: "errors".into(),
            state: "failed".into(),
            metrics: vec![pb::AnalysisMetric {
                name: "success".into(),
                provider: "proxy".into(),
                condition: "success_rate >= 0.95".into(),
                state: "failed".into(),
                count: 3,
                samples: vec![sample("passed", 0.99), sample("failed", 0.5)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let svg = analysis(&[run]).into_string();
        assert!(
            svg.contains("sample passed") && svg.contains("sample failed"),
            "{svg}"
        );
        // The value the condition names, not the other one.
        assert!(
            svg.contains("passed: 0.99") && svg.contains("failed: 0.5"),
            "{svg}"
        );
        assert!(svg.contains("threshold 0.95"), "{svg}");
    }
}
