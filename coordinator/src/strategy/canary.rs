//! The canary strategy: the new release starts beside the stable one on
//! `canary_nodes`, whose proxies give it a growing share of the requests
//! step by step (`set_weight`, `pause`), then it is promoted: the canary
//! nodes switch to it in their proxy alone, the other nodes follow in
//! batches, and the stable release stays warm for `scale_down_delay`.

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{ms, BatchSize, Rolling, StrategySpec};
use crate::analysis::Analysis;

/// The cookie the node proxies keep a client's cohort in.
pub const DEFAULT_COOKIE: &str = "cutover_cohort";
/// The header testers send (`always` or `never`) to pick a version.
pub const DEFAULT_OVERRIDE_HEADER: &str = "X-Cutover-Canary";

/// A canary rollout's settings, as stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// Where the canary runs beside the stable release.
    pub canary_nodes: BatchSize,
    pub steps: Vec<CanaryStep>,
    pub sticky: Sticky,
    /// The cookie (sticky = cookie) or header (sticky = header) that names
    /// a client's cohort.
    pub sticky_name: String,
    /// Requests with this header set to `always` go to the canary, `never`
    /// to the stable release.
    pub override_header: String,
    /// How long the stable release stays running, without traffic, after a
    /// node switched to the canary for good.
    pub scale_down_delay_ms: u64,
    /// How long a canary stays running, without traffic, after an abort or
    /// a rollback (for debugging).
    pub abort_scale_down_delay_ms: u64,
    /// How the nodes without the canary follow once it is promoted; also
    /// the whole strategy of a service that has no traffic to split (a
    /// worker) or no stable release to split it with (a first deploy).
    pub promotion: Rolling,
    /// The analysis templates its steps run, by name.
    #[serde(default)]
    pub analyses: BTreeMap<String, Analysis>,
    /// An analysis that runs beside the steps from one of them on until
    /// the promotion, again and again: a failure aborts the canary.
    #[serde(default)]
    pub background: Option<Background>,
    /// Blue/green's `keep_warm = 1`: a promoted node keeps the release it
    /// replaced running (not serving) until the next deploy, not for
    /// `scale_down_delay`.
    #[serde(default)]
    pub keep_warm: bool,
}

/// `background_analysis`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Background {
    /// The template (`[analysis.NAME]`) it runs.
    pub analysis: String,
    /// The index of the step it starts with (`from_step` - 1).
    pub from_index: u32,
}

/// `background_analysis = { analysis = "NAME", from_step = N }` as
/// written (`from_step` 1-based, default 1).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackgroundSpec {
    analysis: String,
    #[serde(default)]
    from_step: Option<i64>,
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryStep {
    /// Percent of each canary node's requests for the canary.
    SetWeight(u32),
    /// Wait this long (ms), or, with `None`, for `cutover rollout promote`.
    Pause(Option<u64>),
    /// Measure the canary with the analysis template of this name; go on
    /// when it succeeds.
    Analysis(String),
}

impl std::fmt::Display for CanaryStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CanaryStep::SetWeight(weight) => write!(f, "set_weight {weight}%"),
            CanaryStep::Pause(Some(ms)) => write!(
                f,
                "pause {}",
                humantime::format_duration(Duration::from_millis(*ms))
            ),
            CanaryStep::Pause(None) => write!(f, "pause until promoted"),
            CanaryStep::Analysis(name) => write!(f, "analysis {name}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    Cookie,
    Header,
    ClientIp,
}

impl Canary {
    /// What the canary nodes' proxies apply at `weight`.
    pub fn split(&self, weight: u32) -> pb::TrafficSplit {
        let sticky = match self.sticky {
            Sticky::Cookie => pb::traffic_split::Sticky::Cookie,
            Sticky::Header => pb::traffic_split::Sticky::Header,
            Sticky::ClientIp => pb::traffic_split::Sticky::ClientIp,
        };
        pb::TrafficSplit {
            weight,
            sticky: sticky.into(),
            sticky_name: self.sticky_name.clone(),
            override_header: self.override_header.clone(),
        }
    }
}

/// `steps = [...]` as written: each entry a table of exactly one key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    #[serde(default)]
    set_weight: Option<i64>,
    #[serde(default)]
    pause: Option<PauseSpec>,
    #[serde(default)]
    analysis: Option<String>,
}

/// `pause = "5m"`, or `pause = {}`: until promoted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PauseSpec {
    For(String),
    UntilPromoted(Empty),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

type KeyError = (String, String);

/// The canary settings of `spec` (kind = "canary"); an error names the
/// key (under `strategy.`) and what is wrong with it.
pub(super) fn resolve(
    spec: &StrategySpec,
    promotion: Rolling,
    analyses: &BTreeMap<String, Analysis>,
) -> Result<Canary, KeyError> {
    let steps = steps(spec.steps.as_deref().unwrap_or_default(), analyses)?;
    let background = match &spec.background_analysis {
        Some(b) => Some(background(b, &steps, analyses)?),
        None => None,
    };
    let used: BTreeMap<String, Analysis> = steps
        .iter()
        .filter_map(|s| match s {
            CanaryStep::Analysis(name) => Some(name),
            _ => None,
        })
        .chain(background.as_ref().map(|b| &b.analysis))
        .map(|name| (name.clone(), analyses[name].clone()))
        .collect();
    let sticky = match spec.sticky.as_deref().unwrap_or("cookie") {
        "cookie" => Sticky::Cookie,
        "header" => Sticky::Header,
        "client_ip" => Sticky::ClientIp,
        other => {
            return Err((
                "sticky".into(),
                format!("{other:?} is not a way to keep clients on one version; use \"cookie\", \"header\" or \"client_ip\""),
            ))
        }
    };
    let sticky_name = match (sticky, spec.sticky_name.as_deref()) {
        (Sticky::Header, None) => {
            return Err((
                "sticky_name".into(),
                "sticky = \"header\" needs the header that names a client, e.g. sticky_name = \"X-User-Id\"".into(),
            ))
        }
        (Sticky::ClientIp, Some(_)) => {
            return Err((
                "sticky_name".into(),
                "is for sticky = \"cookie\" or \"header\"; client_ip needs no name".into(),
            ))
        }
        (Sticky::Cookie, None) => DEFAULT_COOKIE.to_string(),
        (Sticky::ClientIp, None) => String::new(),
        (_, Some(name)) => {
            token(name).map_err(|m| ("sticky_name".to_string(), m))?;
            name.to_string()
        }
    };
    let override_header = override_header(spec)?;
    Ok(Canary {
        canary_nodes: spec.canary_nodes.unwrap_or(BatchSize::Percent(100)),
        steps,
        sticky,
        sticky_name,
        override_header,
        scale_down_delay_ms: ms(spec.scale_down_delay.unwrap_or(Duration::from_secs(30))),
        abort_scale_down_delay_ms: ms(spec
            .abort_scale_down_delay
            .unwrap_or(Duration::from_secs(30))),
        promotion,
        analyses: used,
        keep_warm: false,
        background,
    })
}

fn steps(
    specs: &[StepSpec],
    analyses: &BTreeMap<String, Analysis>,
) -> Result<Vec<CanaryStep>, KeyError> {
    if specs.is_empty() {
        return Err((
            "steps".into(),
            "a canary needs its steps, e.g. steps = [{ set_weight = 10 }, { pause = \"5m\" }, { set_weight = 50 }, { pause = {} }]".into(),
        ));
    }
    let mut steps = Vec::with_capacity(specs.len());
    let mut last_weight: Option<u32> = None;
    for (i, spec) in specs.iter().enumerate() {
        let key = |k: &str| format!("steps[{i}].{k}");
        let step = match (spec.set_weight, &spec.pause, &spec.analysis) {
            (Some(weight), None, None) => {
                let weight = u32::try_from(weight)
                    .ok()
                    .filter(|w| *w <= 100)
                    .ok_or_else(|| {
                        (
                            key("set_weight"),
                            format!("{weight} is not a weight: use a percentage from 0 to 100"),
                        )
                    })?;
                if let Some(last) = last_weight.filter(|last| weight <= *last) {
                    return Err((
                        key("set_weight"),
                        format!("{weight} does not raise the weight of the step before ({last}): each set_weight must be higher than the one before"),
                    ));
                }
                last_weight = Some(weight);
                CanaryStep::SetWeight(weight)
            }
            (None, Some(PauseSpec::For(text)), None) => {
                let duration = humantime::parse_duration(text).map_err(|e| {
                    (
                        key("pause"),
                        format!("{text:?} is not a duration ({e}); use e.g. \"5m\", or {{}} to wait for `cutover rollout promote`"),
                    )
                })?;
                if duration.is_zero() {
                    return Err((
                        key("pause"),
                        "must be above zero, e.g. \"5m\", or {} to wait for `cutover rollout promote`".into(),
                    ));
                }
                CanaryStep::Pause(Some(ms(duration)))
            }
            (None, Some(PauseSpec::UntilPromoted(Empty {})), None) => CanaryStep::Pause(None),
            (None, None, Some(name)) => {
                let template = template(analyses, &key("analysis"), name)?;
                if let (Some(metric), None | Some(0)) = (template.proxy_metric(), last_weight) {
                    return Err((
                        key("analysis"),
                        format!("{name:?} measures with the node proxies (metric {}), but no set_weight above 0 comes before it: the canary has no requests to measure; put a {{ set_weight = N }} step first, or use a prometheus or web metric", metric.name),
                    ));
                }
                CanaryStep::Analysis(name.clone())
            }
            _ => {
                return Err((
                    format!("steps[{i}]"),
                    "each step is one of { set_weight = N }, { pause = \"5m\" }, { pause = {} } or { analysis = \"NAME\" }".into(),
                ))
            }
        };
        steps.push(step);
    }
    Ok(steps)
}

/// `background_analysis` checked against the plan's `steps`.
fn background(
    spec: &BackgroundSpec,
    steps: &[CanaryStep],
    analyses: &BTreeMap<String, Analysis>,
) -> Result<Background, KeyError> {
    let template = template(analyses, "background_analysis.analysis", &spec.analysis)?;
    let from = spec.from_step.unwrap_or(1);
    if from < 1 || from > steps.len() as i64 {
        return Err((
            "background_analysis.from_step".into(),
            format!(
                "{from} is not a step of this plan; give 1 to {} (the first step is 1)",
                steps.len()
            ),
        ));
    }
    let index = (from - 1) as usize;
    // The proxies measure requests: a weight above 0 must be set by then.
    let weighted = steps[..=index]
        .iter()
        .any(|s| matches!(s, CanaryStep::SetWeight(w) if *w > 0));
    if let (Some(metric), false) = (template.proxy_metric(), weighted) {
        return Err((
            "background_analysis.from_step".into(),
            format!(
                "step {from} comes before any set_weight above 0, and {:?} measures with the node proxies (metric {}): start it at or after the first set_weight",
                spec.analysis, metric.name
            ),
        ));
    }
    Ok(Background {
        analysis: spec.analysis.clone(),
        from_index: index as u32,
    })
}

/// The analysis template `name` (written at `key`) of the spec.
pub(super) fn template(
    analyses: &BTreeMap<String, Analysis>,
    key: &str,
    name: &str,
) -> Result<Analysis, KeyError> {
    if let Some(template) = analyses.get(name) {
        return Ok(template.clone());
    }
    let known: Vec<&str> = analyses.keys().map(String::as_str).collect();
    Err((
        key.into(),
        match known.is_empty() {
            true => format!("{name:?} is not an analysis of this spec; define it as [analysis.{name}] with its metrics"),
            false => format!("{name:?} is not an analysis of this spec; it defines {}", known.join(", ")),
        },
    ))
}

/// `override_header`: the default header, none (""), or a checked name.
pub(super) fn override_header(spec: &StrategySpec) -> Result<String, KeyError> {
    match spec.override_header.as_deref() {
        None => Ok(DEFAULT_OVERRIDE_HEADER.to_string()),
        Some("") => Ok(String::new()),
        Some(name) => {
            token(name).map_err(|m| ("override_header".to_string(), m))?;
            Ok(name.to_string())
        }
    }
}

/// An HTTP header (or cookie) name: a token of letters, digits and
/// `-_.!#$%&'*+^`|~`.
fn token(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a header or cookie name: use letters, digits and dashes, e.g. \"X-User-Id\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{Strategy, StrategyKind};

    fn resolve(toml_text: &str) -> Result<Strategy, KeyError> {
        let spec: StrategySpec = toml::from_str(toml_text).expect("valid toml");
        spec.resolve(&BTreeMap::new())
    }

    fn canary(toml_text: &str) -> Canary {
        match resolve(toml_text).unwrap().kind {
            StrategyKind::Canary(canary) => canary,
            other => panic!("not a canary: {other:?}"),
        }
    }

    #[test]
    fn the_documented_shape_resolves() {
        let c = canary(
            r#"kind = "canary"
            canary_nodes = "25%"
            steps = [{ set_weight = 5 }, { pause = "5m" }, { set_weight = 25 }, { pause = {} }, { set_weight = 100 }]
            sticky = "cookie"
            scale_down_delay = "30s"
            batch = 2"#,
        );
        assert_eq!(c.canary_nodes, BatchSize::Percent(25));
        assert_eq!(
            c.steps,
            [
                CanaryStep::SetWeight(5),
                CanaryStep::Pause(Some(300_000)),
                CanaryStep::SetWeight(25),
                CanaryStep::Pause(None),
                CanaryStep::SetWeight(100),
            ]
        );
        assert_eq!(c.sticky_name, DEFAULT_COOKIE);
        assert_eq!(c.override_header, DEFAULT_OVERRIDE_HEADER);
        assert_eq!(c.scale_down_delay_ms, 30_000);
        assert_eq!(c.promotion.batch, BatchSize::Count(2));
        let split = c.split(5);
        assert_eq!(split.weight, 5);
        assert_eq!(split.sticky(), pb::traffic_split::Sticky::Cookie);
        // Stored and read back as is.
        let strategy = resolve("kind = \"canary\"\nsteps = [{ set_weight = 10 }]").unwrap();
        let json = serde_json::to_value(&strategy).unwrap();
        assert_eq!(json["kind"], "canary");
        assert_eq!(serde_json::from_value::<Strategy>(json).unwrap(), strategy);
    }

    #[test]
    fn analysis_steps_name_a_template_of_the_spec_and_carry_it() {
        let analyses: BTreeMap<String, crate::analysis::AnalysisSpec> = toml::from_str(
            "[[errors.metrics]]\nname = \"success\"\ncondition = \"canary_success_rate >= 0.99\"",
        )
        .unwrap();
        let analyses = crate::analysis::resolve(&analyses).unwrap();
        let spec: StrategySpec = toml::from_str(
            "kind = \"canary\"\nsteps = [{ set_weight = 10 }, { analysis = \"errors\" }]",
        )
        .unwrap();
        let StrategyKind::Canary(c) = spec.resolve(&analyses).unwrap().kind else {
            panic!("a canary")
        };
        assert_eq!(c.steps[1], CanaryStep::Analysis("errors".into()));
        assert_eq!(c.analyses["errors"].metrics[0].name, "success");
        // The proxies measure nothing before the canary takes requests.
        let early: StrategySpec = toml::from_str(
            "kind = \"canary\"\nsteps = [{ set_weight = 0 }, { analysis = \"errors\" }]",
        )
        .unwrap();
        let (key, message) = early.resolve(&analyses).unwrap_err();
        assert_eq!(key, "steps[1].analysis");
        assert!(
            message.contains("no set_weight above 0 comes before it"),
            "{message}"
        );
        let typo: StrategySpec =
            toml::from_str("kind = \"canary\"\nsteps = [{ analysis = \"erors\" }]").unwrap();
        let (key, message) = typo.resolve(&analyses).unwrap_err();
        assert_eq!(key, "steps[0].analysis");
        assert!(message.contains("it defines errors"), "{message}");
    }

    #[test]
    fn a_background_analysis_starts_at_a_step_with_traffic_to_measure() {
        let analyses: BTreeMap<String, crate::analysis::AnalysisSpec> = toml::from_str(
            "[[errors.metrics]]\nname = \"success\"\ncondition = \"canary_success_rate >= 0.99\"",
        )
        .unwrap();
        let analyses = crate::analysis::resolve(&analyses).unwrap();
        let resolve = |background: &str| {
            let spec: StrategySpec = toml::from_str(&format!(
                "kind = \"canary\"\nsteps = [{{ pause = \"1m\" }}, {{ set_weight = 10 }}, {{ pause = {{}} }}]\nbackground_analysis = {background}"
            ))
            .unwrap();
            spec.resolve(&analyses)
        };
        let StrategyKind::Canary(c) = resolve("{ analysis = \"errors\", from_step = 2 }")
            .unwrap()
            .kind
        else {
            panic!("a canary")
        };
        assert_eq!(
            c.background,
            Some(Background {
                analysis: "errors".into(),
                from_index: 1
            })
        );
        assert!(c.analyses.contains_key("errors"), "carried with it");
        for (background, says) in [
            (
                "{ analysis = \"errors\" }",
                "step 1 comes before any set_weight above 0",
            ),
            (
                "{ analysis = \"errors\", from_step = 4 }",
                "4 is not a step of this plan; give 1 to 3",
            ),
            (
                "{ analysis = \"errors\", from_step = 0 }",
                "0 is not a step",
            ),
            (
                "{ analysis = \"erors\", from_step = 2 }",
                "it defines errors",
            ),
        ] {
            let (key, message) = resolve(background).unwrap_err();
            assert!(
                key.starts_with("background_analysis."),
                "{background}: {key}"
            );
            assert!(message.contains(says), "{background}: {message}");
        }
    }

    #[test]
    fn bad_steps_name_the_step_and_the_value() {
        let cases = [
            ("steps = []", "steps", "needs its steps"),
            (
                "steps = [{ set_weight = 101 }]",
                "steps[0].set_weight",
                "101 is not a weight",
            ),
            (
                "steps = [{ set_weight = -1 }]",
                "steps[0].set_weight",
                "-1 is not a weight",
            ),
            (
                "steps = [{ set_weight = 20 }, { pause = \"1m\" }, { set_weight = 10 }]",
                "steps[2].set_weight",
                "does not raise",
            ),
            (
                "steps = [{ pause = \"soon\" }]",
                "steps[0].pause",
                "\"soon\" is not a duration",
            ),
            (
                "steps = [{ pause = \"0s\" }]",
                "steps[0].pause",
                "above zero",
            ),
            (
                "steps = [{ set_weight = 5, pause = \"1m\" }]",
                "steps[0]",
                "each step is one of",
            ),
            (
                "steps = [{ analysis = \"errors\" }]",
                "steps[0].analysis",
                "\"errors\" is not an analysis of this spec; define it as [analysis.errors]",
            ),
            (
                "steps = [{ set_weight = 5 }]\nsticky = \"sometimes\"",
                "sticky",
                "\"sometimes\"",
            ),
            (
                "steps = [{ set_weight = 5 }]\nsticky = \"header\"",
                "sticky_name",
                "X-User-Id",
            ),
            (
                "steps = [{ set_weight = 5 }]\noverride_header = \"a b\"",
                "override_header",
                "\"a b\" is not a header",
            ),
        ];
        for (text, key, message) in cases {
            let (k, m) = resolve(&format!("kind = \"canary\"\n{text}")).unwrap_err();
            assert_eq!(k, key, "{text}: {m}");
            assert!(m.contains(message), "{text}: {m}");
        }
    }

    #[test]
    fn canary_keys_are_refused_for_rolling() {
        let (key, message) = resolve("steps = [{ set_weight = 5 }]").unwrap_err();
        assert_eq!(key, "steps");
        assert!(message.contains("kind = \"canary\""), "{message}");
    }
}
