//! How a rollout moves a service's nodes to a new release: the spec's
//! `[strategy]` table as written, and the checked `Strategy` a rollout (and
//! each release, for a rollback to it) stores. Settings every strategy has
//! sit beside a tagged `kind` that holds the kind's own; the engine runs
//! each kind as one implementation over its common core (see
//! `rollout::engine`): rolling here, canary in `canary`, and blue/green
//! (`blue_green`) as a canary plan on every node.

mod blue_green;
pub mod canary;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::Analysis;

/// `[strategy]` as written: flat keys, `kind` choosing which apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySpec {
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `None` when not written: blue/green refuses it.
    #[serde(default)]
    pub batch: Option<BatchSize>,
    #[serde(default)]
    pub max_unavailable: u32,
    #[serde(default = "default_min_healthy_time", with = "humantime_serde")]
    pub min_healthy_time: Duration,
    #[serde(default = "default_progress_deadline", with = "humantime_serde")]
    pub progress_deadline: Duration,
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Nodes fetching the release at once before the first batch.
    #[serde(default = "default_prepare_parallelism")]
    pub prepare_parallelism: u32,
    /// How a rollback (the operator's, or a failed rollout's own) returns
    /// the nodes: all at once, or in the strategy's batches.
    #[serde(default)]
    pub rollback: RollbackPace,
    /// Nodes returning at once on the fast path; `None`: all of them.
    #[serde(default)]
    pub rollback_parallelism: Option<u32>,
    // The canary's own keys (see `canary`); `None` when not written, so a
    // rolling strategy can refuse them.
    #[serde(default)]
    pub canary_nodes: Option<BatchSize>,
    #[serde(default)]
    pub steps: Option<Vec<canary::StepSpec>>,
    #[serde(default)]
    pub sticky: Option<String>,
    #[serde(default)]
    pub sticky_name: Option<String>,
    #[serde(default)]
    pub override_header: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub scale_down_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub abort_scale_down_delay: Option<Duration>,
    #[serde(default)]
    pub background_analysis: Option<canary::BackgroundSpec>,
    // Blue/green's own keys (see `blue_green`).
    #[serde(default)]
    pub pre_promotion_analysis: Option<String>,
    #[serde(default)]
    pub post_promotion_analysis: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub auto_promote_after: Option<Duration>,
    #[serde(default)]
    pub keep_warm: Option<u32>,
}

impl Default for StrategySpec {
    fn default() -> Self {
        toml::from_str("").expect("every strategy key has a default")
    }
}

impl StrategySpec {
    /// The checked strategy, its analysis steps drawn from `analyses` (the
    /// spec's checked `[analysis]` templates); an error names the key
    /// (under `strategy.`) and what is wrong with it.
    pub fn resolve(
        &self,
        analyses: &BTreeMap<String, Analysis>,
    ) -> Result<Strategy, (String, String)> {
        let rolling = Rolling {
            batch: self.batch.unwrap_or(BatchSize::Percent(25)),
            max_unavailable: self.max_unavailable,
            min_healthy_time_ms: ms(self.min_healthy_time),
        };
        let kind = match self.kind.as_str() {
            "rolling" => {
                if let Some(key) = self.canary_key().or(self.blue_green_key()) {
                    return Err((
                        key.into(),
                        "is a canary or blue/green setting: it needs kind = \"canary\" or \"blue_green\"".into(),
                    ));
                }
                StrategyKind::Rolling(rolling)
            }
            "canary" => {
                if let Some(key) = self.blue_green_key() {
                    return Err((
                        key.into(),
                        "is a blue/green setting: it needs kind = \"blue_green\"".into(),
                    ));
                }
                StrategyKind::Canary(canary::resolve(self, rolling, analyses)?)
            }
            "blue_green" => StrategyKind::BlueGreen(blue_green::resolve(
                self,
                rolling.min_healthy_time_ms,
                analyses,
            )?),
            other => {
                return Err((
                    "kind".into(),
                    format!("{other:?} is not a strategy kind this version runs; use \"rolling\", \"canary\" or \"blue_green\""),
                ))
            }
        };
        if self.progress_deadline.is_zero() {
            return Err((
                "progress_deadline".into(),
                "must be above zero, e.g. \"10m\"".into(),
            ));
        }
        if self.prepare_parallelism == 0 {
            return Err(("prepare_parallelism".into(), "must be at least 1".into()));
        }
        if self.rollback_parallelism == Some(0) {
            return Err((
                "rollback_parallelism".into(),
                "must be at least 1; leave it out to return every node at once".into(),
            ));
        }
        Ok(Strategy {
            progress_deadline_ms: ms(self.progress_deadline),
            auto_rollback: self.auto_rollback,
            prepare_parallelism: self.prepare_parallelism,
            rollback: self.rollback,
            rollback_parallelism: self.rollback_parallelism,
            kind,
        })
    }
}

impl StrategySpec {
    /// The first canary key written, if any.
    fn canary_key(&self) -> Option<&'static str> {
        [
            ("canary_nodes", self.canary_nodes.is_some()),
            ("steps", self.steps.is_some()),
            ("sticky", self.sticky.is_some()),
            ("sticky_name", self.sticky_name.is_some()),
            ("override_header", self.override_header.is_some()),
            ("scale_down_delay", self.scale_down_delay.is_some()),
            (
                "abort_scale_down_delay",
                self.abort_scale_down_delay.is_some(),
            ),
            ("background_analysis", self.background_analysis.is_some()),
        ]
        .into_iter()
        .find_map(|(key, written)| written.then_some(key))
    }

    /// The first blue/green key written, if any.
    fn blue_green_key(&self) -> Option<&'static str> {
        [
            (
                "pre_promotion_analysis",
                self.pre_promotion_analysis.is_some(),
            ),
            (
                "post_promotion_analysis",
                self.post_promotion_analysis.is_some(),
            ),
            ("auto_promote_after", self.auto_promote_after.is_some()),
            ("keep_warm", self.keep_warm.is_some()),
        ]
        .into_iter()
        .find_map(|(key, written)| written.then_some(key))
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The strategy a rollout runs with, as stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Strategy {
    pub progress_deadline_ms: u64,
    pub auto_rollback: bool,
    /// Nodes fetching the release at once before the cutover.
    pub prepare_parallelism: u32,
    /// Stored before rollbacks had a fast path: `Fast`, all at once.
    #[serde(default)]
    pub rollback: RollbackPace,
    #[serde(default)]
    pub rollback_parallelism: Option<u32>,
    #[serde(flatten)]
    pub kind: StrategyKind,
}

/// How nodes return to a release that ran on them (see
/// `Strategy::returning_at_once`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackPace {
    /// Every node at once (up to `rollback_parallelism`), each health-gated
    /// and smoke-tested, without batches or watches: the release returned
    /// to already ran there.
    #[default]
    Fast,
    /// In the strategy's batches, each watched for `min_healthy_time`, as
    /// a deploy.
    Batched,
}

/// What each kind of strategy adds, tagged `kind` in the stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StrategyKind {
    /// Batches of nodes, each switched and watched before the next.
    Rolling(Rolling),
    /// The release beside the stable one on some nodes, with a growing
    /// share of their traffic, then promoted.
    Canary(canary::Canary),
    /// The release beside the old one on every node, all switched at once:
    /// a canary plan with no partial weight (see `blue_green`).
    BlueGreen(canary::Canary),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rolling {
    pub batch: BatchSize,
    /// 0: a batch's nodes all switch at once, each running both releases
    /// for its cutover; otherwise at most this many are out of the load
    /// balancer at a time.
    pub max_unavailable: u32,
    /// How long a switched batch must stay healthy before the next starts.
    pub min_healthy_time_ms: u64,
}

/// The same shape, derived: what `StrategyKind` decodes once a record
/// without a `kind` (written before there was more than one) got one.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum TaggedKind {
    Rolling(Rolling),
    Canary(canary::Canary),
    BlueGreen(canary::Canary),
}

impl<'de> Deserialize<'de> for StrategyKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut fields = serde_json::Map::deserialize(deserializer)?;
        fields
            .entry("kind")
            .or_insert_with(|| serde_json::Value::String("rolling".into()));
        let tagged: TaggedKind = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(serde::de::Error::custom)?;
        Ok(match tagged {
            TaggedKind::Rolling(rolling) => StrategyKind::Rolling(rolling),
            TaggedKind::Canary(canary) => StrategyKind::Canary(canary),
            TaggedKind::BlueGreen(plan) => StrategyKind::BlueGreen(plan),
        })
    }
}

impl Strategy {
    /// Rolling with these settings, the others as the spec's defaults.
    #[cfg(test)]
    pub fn rolling(batch: BatchSize, max_unavailable: u32, min_healthy_time_ms: u64) -> Self {
        Strategy {
            progress_deadline_ms: 600_000,
            auto_rollback: true,
            prepare_parallelism: 8,
            rollback: RollbackPace::Fast,
            rollback_parallelism: None,
            kind: StrategyKind::Rolling(Rolling {
                batch,
                max_unavailable,
                min_healthy_time_ms,
            }),
        }
    }

    /// Whether the agent takes a node out of the load balancer for its
    /// cutover (and puts it back whatever the outcome).
    pub fn drains_first(&self) -> bool {
        self.batches().max_unavailable > 0
    }

    /// How many of `targets` nodes return at once on the fast path: all,
    /// or `rollback_parallelism`, and never more than `max_unavailable`
    /// when nodes leave the load balancer for their cutover (that bound is
    /// the fleet's capacity, an incident does not lift it).
    pub fn returning_at_once(&self, targets: usize) -> usize {
        let mut n = self
            .rollback_parallelism
            .map_or(targets, |p| p as usize)
            .min(targets);
        if self.drains_first() {
            n = n.min(self.batches().max_unavailable as usize);
        }
        n.max(1)
    }

    /// How the strategy switches nodes in batches: rolling's own settings,
    /// or a canary's promotion of the nodes without the canary.
    pub fn batches(&self) -> &Rolling {
        match &self.kind {
            StrategyKind::Rolling(rolling) => rolling,
            StrategyKind::Canary(canary) | StrategyKind::BlueGreen(canary) => &canary.promotion,
        }
    }

    /// The canary plan the strategy runs: a canary's, or blue/green's.
    pub fn canary(&self) -> Option<&canary::Canary> {
        match &self.kind {
            StrategyKind::Canary(canary) | StrategyKind::BlueGreen(canary) => Some(canary),
            StrategyKind::Rolling(_) => None,
        }
    }

    /// What the kind is called in specs and views.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            StrategyKind::Rolling(_) => "rolling",
            StrategyKind::Canary(_) => "canary",
            StrategyKind::BlueGreen(_) => "blue_green",
        }
    }

    /// The strategy a rollout can run: a canary splits a node proxy's
    /// traffic between a stable release and the new one, so a rollout that
    /// cannot (`splits` false: a worker has no proxy, a first deploy no
    /// stable release, a rollback returns to a release that ran) rolls out
    /// in the canary's promotion batches instead.
    pub fn runnable(self, splits: bool) -> Strategy {
        match self.kind {
            StrategyKind::Canary(canary) | StrategyKind::BlueGreen(canary) if !splits => Strategy {
                kind: StrategyKind::Rolling(canary.promotion),
                ..self
            },
            _ => self,
        }
    }
}

/// Nodes per batch: a count, or a percentage of the target nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BatchText", into = "BatchText")]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum BatchText {
    Count(i64),
    Text(String),
}

impl TryFrom<BatchText> for BatchSize {
    type Error = String;
    fn try_from(raw: BatchText) -> Result<Self, String> {
        let bad = |v: String| {
            format!("{v} is not a batch size: use a node count of at least 1, or a percentage from 1% to 100%")
        };
        match raw {
            BatchText::Count(n) if n >= 1 && n <= u32::MAX as i64 => Ok(BatchSize::Count(n as u32)),
            BatchText::Count(n) => Err(bad(n.to_string())),
            BatchText::Text(text) => match text.trim().strip_suffix('%') {
                Some(p) => match p.trim().parse::<u32>() {
                    Ok(p) if (1..=100).contains(&p) => Ok(BatchSize::Percent(p)),
                    _ => Err(bad(format!("{text:?}"))),
                },
                None => match text.trim().parse::<i64>() {
                    Ok(n) => BatchSize::try_from(BatchText::Count(n)),
                    Err(_) => Err(bad(format!("{text:?}"))),
                },
            },
        }
    }
}

impl From<BatchSize> for BatchText {
    fn from(size: BatchSize) -> Self {
        match size {
            BatchSize::Count(n) => BatchText::Count(n.into()),
            BatchSize::Percent(p) => BatchText::Text(format!("{p}%")),
        }
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        BatchSize::try_from(BatchText::Text(text.to_string()))
    }
}

impl BatchSize {
    /// Nodes per batch out of `targets`, at least one.
    pub fn nodes(self, targets: usize) -> usize {
        let n = match self {
            BatchSize::Count(n) => n as usize,
            BatchSize::Percent(p) => (targets * p as usize).div_ceil(100),
        };
        n.clamp(1, targets.max(1))
    }
}

fn default_kind() -> String {
    "rolling".into()
}
fn default_true() -> bool {
    true
}
fn default_min_healthy_time() -> Duration {
    Duration::from_secs(5)
}
fn default_progress_deadline() -> Duration {
    Duration::from_secs(600)
}
fn default_prepare_parallelism() -> u32 {
    8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rolling() -> Strategy {
        Strategy::rolling(BatchSize::Percent(25), 1, 5_000)
    }

    #[test]
    fn the_stored_record_is_tagged_and_reads_back() {
        let json = serde_json::to_value(rolling()).unwrap();
        assert_eq!(json["kind"], "rolling");
        assert_eq!(json["batch"], "25%");
        assert_eq!(serde_json::from_value::<Strategy>(json).unwrap(), rolling());
    }

    /// Rollouts and releases stored before strategies had kinds carry the
    /// rolling settings flat, without `kind`: they read as rolling.
    #[test]
    fn a_record_from_before_kinds_reads_as_rolling() {
        let old = r#"{"batch":"25%","max_unavailable":1,"min_healthy_time_ms":5000,
            "progress_deadline_ms":600000,"auto_rollback":true,"prepare_parallelism":8}"#;
        assert_eq!(serde_json::from_str::<Strategy>(old).unwrap(), rolling());
        let unknown = old.replace("\"batch\"", "\"kind\":\"sideways\",\"batch\"");
        assert!(serde_json::from_str::<Strategy>(&unknown).is_err());
    }

    #[test]
    fn the_spec_names_the_kind_and_checks_common_settings() {
        let spec: StrategySpec = toml::from_str("batch = \"25%\"\nmax_unavailable = 1").unwrap();
        assert_eq!(spec.resolve(&BTreeMap::new()).unwrap(), rolling());
        let sideways: StrategySpec = toml::from_str("kind = \"sideways\"").unwrap();
        let (key, message) = sideways.resolve(&BTreeMap::new()).unwrap_err();
        assert_eq!(key, "kind");
        assert!(message.contains("\"sideways\""), "{message}");
        let stuck: StrategySpec = toml::from_str("progress_deadline = \"0s\"").unwrap();
        assert_eq!(
            stuck.resolve(&BTreeMap::new()).unwrap_err().0,
            "progress_deadline"
        );
    }

    #[test]
    fn the_rollback_pace_defaults_to_fast_and_is_checked() {
        let default = StrategySpec::default().resolve(&BTreeMap::new()).unwrap();
        assert_eq!(default.rollback, RollbackPace::Fast);
        assert_eq!(default.returning_at_once(40), 40, "every node at once");
        let bounded: StrategySpec =
            toml::from_str("rollback_parallelism = 10\nmax_unavailable = 3").unwrap();
        let bounded = bounded.resolve(&BTreeMap::new()).unwrap();
        assert_eq!(
            bounded.returning_at_once(40),
            3,
            "max_unavailable bounds it"
        );
        assert_eq!(bounded.returning_at_once(2), 2);
        let batched: StrategySpec = toml::from_str("rollback = \"batched\"").unwrap();
        assert_eq!(
            batched.resolve(&BTreeMap::new()).unwrap().rollback,
            RollbackPace::Batched
        );
        let zero: StrategySpec = toml::from_str("rollback_parallelism = 0").unwrap();
        let (key, message) = zero.resolve(&BTreeMap::new()).unwrap_err();
        assert_eq!(key, "rollback_parallelism");
        assert!(message.contains("at least 1"), "{message}");
        let error = toml::from_str::<StrategySpec>("rollback = \"sideways\"").unwrap_err();
        assert!(error.to_string().contains("fast"), "{error}");
    }
}
