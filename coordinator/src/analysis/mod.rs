//! Canary analysis: `[analysis.NAME]` templates of metrics that a canary's
//! `{ analysis = "NAME" }` step measures every `interval`, `count` times,
//! each sample judged by the metric's condition; the step then goes on
//! (successful), returns every node to stable (failed: more failed samples
//! than `failure_limit`) or waits for a person (inconclusive: more samples
//! without a verdict than `inconclusive_limit`, e.g. too little traffic).
//!
//! Providers: `proxy` (the default), measured by cutover's own node
//! proxies, the canary against the stable release on the same nodes in the
//! same window (`proxy.rs`); `prometheus`, a PromQL query; `web`, an HTTP
//! GET and a JSON path (`query.rs`). The run, its samples and verdicts are
//! kept with the rollout (`run.rs`).

pub mod condition;
pub mod proxy;
pub mod query;
pub mod run;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::notify::spec::check_url;
use condition::Condition;

/// `[analysis.NAME]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    pub metrics: Vec<MetricSpec>,
}

/// One `[[analysis.NAME.metrics]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub name: String,
    #[serde(default = "default_provider")]
    pub provider: String,
    pub condition: String,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default)]
    pub failure_limit: u32,
    #[serde(default)]
    pub inconclusive_limit: u32,
    /// proxy: a sample whose canary served fewer requests has no verdict.
    #[serde(default)]
    pub min_requests: Option<u64>,
    /// prometheus: the server, e.g. "http://prometheus:9090".
    #[serde(default)]
    pub address: Option<String>,
    /// prometheus: a PromQL query with one value (a scalar, or a vector of
    /// one series).
    #[serde(default)]
    pub query: Option<String>,
    /// web: the URL to GET.
    #[serde(default)]
    pub url: Option<String>,
    /// web: where the number is in the JSON answer, e.g. "$.data.errors";
    /// absent: the whole body is the number.
    #[serde(default)]
    pub json_path: Option<String>,
    /// web: request headers, each a value or `{ secret = "NAME" }`.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, HeaderValue>>,
    /// prometheus and web: how long one measurement may take.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

fn default_provider() -> String {
    "proxy".into()
}
fn default_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_count() -> u32 {
    5
}
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// A checked template, as a canary stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub name: String,
    pub metrics: Vec<Metric>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub provider: Provider,
    /// As written; parsed when the spec was.
    pub condition: String,
    pub interval_ms: u64,
    pub count: u32,
    pub failure_limit: u32,
    pub inconclusive_limit: u32,
    pub min_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case")]
pub enum Provider {
    Proxy,
    Prometheus {
        address: String,
        query: String,
        timeout_ms: u64,
    },
    Web {
        url: String,
        json_path: String,
        headers: BTreeMap<String, HeaderValue>,
        timeout_ms: u64,
    },
}

impl Provider {
    /// The names a condition may use with this provider.
    pub fn values(&self) -> &'static [&'static str] {
        match self {
            Provider::Proxy => &proxy::VALUES,
            Provider::Prometheus { .. } | Provider::Web { .. } => &["result"],
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Provider::Proxy => "proxy",
            Provider::Prometheus { .. } => "prometheus",
            Provider::Web { .. } => "web",
        }
    }
}

impl Metric {
    /// The condition, parsed from its text (checked with the spec; a
    /// rollout stored by another version may name values this one does
    /// not measure: its samples then have no verdict).
    pub fn condition(&self) -> Result<Condition, String> {
        Condition::parse(&self.condition, self.provider.values())
    }
}

/// A web metric's header value: as written, or the value of a secret of
/// the rollout's environment, read for each measurement and never stored
/// with the rollout or shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValue {
    Plain(String),
    Secret { secret: String },
}

impl HeaderValue {
    pub fn secret(&self) -> Option<&str> {
        match self {
            HeaderValue::Secret { secret } => Some(secret),
            HeaderValue::Plain(_) => None,
        }
    }
}

/// Headers that carry credentials: written in a spec (and so in every
/// rollout that stores it) they would leak; they must name a secret.
fn carries_credentials(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["authorization", "proxy-authorization", "cookie"].contains(&name.as_str())
        || ["token", "key", "secret", "password"]
            .iter()
            .any(|word| name.contains(word))
}

impl Analysis {
    /// Its first metric measured by the node proxies, if any: one that
    /// needs requests on the new release to judge anything.
    pub fn proxy_metric(&self) -> Option<&Metric> {
        self.metrics
            .iter()
            .find(|m| matches!(m.provider, Provider::Proxy))
    }

    /// Its first proxy metric whose condition reads the stable release,
    /// with the value it reads: nothing to read once every request goes
    /// to the new release.
    pub fn reads_stable(&self) -> Option<(&Metric, String)> {
        self.metrics
            .iter()
            .filter(|m| matches!(m.provider, Provider::Proxy))
            .find_map(|m| {
                let condition = m.condition().ok()?;
                let stable = condition
                    .names()
                    .into_iter()
                    .find(|n| n.starts_with("stable_"))?;
                Some((m, stable.to_string()))
            })
    }
}

type KeyError = (String, String);

/// The checked templates of `[analysis]`; an error names the key under
/// `analysis.` and what is wrong.
pub fn resolve(
    specs: &BTreeMap<String, AnalysisSpec>,
) -> Result<BTreeMap<String, Analysis>, KeyError> {
    specs
        .iter()
        .map(|(name, spec)| {
            crate::spec::name_ok(name).map_err(|m| (name.clone(), m))?;
            let metrics = spec
                .metrics
                .iter()
                .enumerate()
                .map(|(i, m)| metric(m).map_err(|(k, e)| (format!("{name}.metrics[{i}].{k}"), e)))
                .collect::<Result<Vec<_>, _>>()?;
            if metrics.is_empty() {
                return Err((
                    format!("{name}.metrics"),
                    "an analysis needs at least one metric, e.g. [[analysis.NAME.metrics]] with name, condition".into(),
                ));
            }
            let mut names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
            names.sort_unstable();
            if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err((
                    format!("{name}.metrics"),
                    format!("two metrics are named {:?}; give each its own name", twice[0]),
                ));
            }
            Ok((
                name.clone(),
                Analysis {
                    name: name.clone(),
                    metrics,
                },
            ))
        })
        .collect()
}

fn metric(m: &MetricSpec) -> Result<Metric, KeyError> {
    crate::spec::name_ok(&m.name).map_err(|e| ("name".to_string(), e))?;
    let timeout_ms = m.timeout.unwrap_or(DEFAULT_TIMEOUT).as_millis() as u64;
    let required = |key: &str, value: &Option<String>, example: &str| match value {
        Some(v) if !v.trim().is_empty() => Ok(v.clone()),
        _ => Err((
            key.to_string(),
            format!(
                "provider {:?} needs {key}, e.g. {key} = {example:?}",
                m.provider
            ),
        )),
    };
    let refuse = |key: &str, written: bool| match written {
        true => Err((
            key.to_string(),
            format!("is not a setting of provider {:?}", m.provider),
        )),
        false => Ok(()),
    };
    let provider = match m.provider.as_str() {
        "proxy" => {
            refuse("address", m.address.is_some())?;
            refuse("query", m.query.is_some())?;
            refuse("url", m.url.is_some())?;
            refuse("json_path", m.json_path.is_some())?;
            refuse("headers", m.headers.is_some())?;
            refuse("timeout", m.timeout.is_some())?;
            Provider::Proxy
        }
        "prometheus" => {
            refuse("min_requests", m.min_requests.is_some())?;
            refuse("url", m.url.is_some())?;
            refuse("json_path", m.json_path.is_some())?;
            refuse("headers", m.headers.is_some())?;
            let address = required("address", &m.address, "http://prometheus:9090")?;
            check_url(&address).map_err(|e| ("address".to_string(), e))?;
            Provider::Prometheus {
                address,
                query: required("query", &m.query, "sum(rate(http_errors_total[1m]))")?,
                timeout_ms,
            }
        }
        "web" => {
            refuse("min_requests", m.min_requests.is_some())?;
            refuse("address", m.address.is_some())?;
            refuse("query", m.query.is_some())?;
            let url = required("url", &m.url, "https://status.example.com/api/errors")?;
            check_url(&url).map_err(|e| ("url".to_string(), e))?;
            let json_path = m.json_path.clone().unwrap_or_default();
            query::check_json_path(&json_path).map_err(|e| ("json_path".to_string(), e))?;
            let headers = m.headers.clone().unwrap_or_default();
            for (name, value) in &headers {
                let key = || format!("headers.{name}");
                let valid = hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && match value {
                        HeaderValue::Plain(text) => {
                            hyper::header::HeaderValue::from_str(text).is_ok()
                        }
                        HeaderValue::Secret { secret } => {
                            crate::secrets::validate_name(secret)
                                .map_err(|e| (key(), e.to_string()))?;
                            true
                        }
                    };
                if !valid {
                    return Err((key(), "is not a valid HTTP header name and value".into()));
                }
                if matches!(value, HeaderValue::Plain(_)) && carries_credentials(name) {
                    return Err((
                        key(),
                        format!("carries credentials, which every rollout would store and show; write {name} = {{ secret = \"NAME\" }} with `cutover secret set` holding the value"),
                    ));
                }
            }
            Provider::Web {
                url,
                json_path,
                headers,
                timeout_ms,
            }
        }
        other => {
            return Err((
                "provider".into(),
                format!(
                "{other:?} is not an analysis provider; use \"proxy\", \"prometheus\" or \"web\""
            ),
            ))
        }
    };
    Condition::parse(&m.condition, provider.values())
        .map_err(|e| ("condition".to_string(), format!("{:?}: {e}", m.condition)))?;
    if m.interval.is_zero() {
        return Err(("interval".into(), "must be above zero, e.g. \"1m\"".into()));
    }
    if m.count == 0 {
        return Err(("count".into(), "must be at least 1".into()));
    }
    if m.interval > MAX_INTERVAL {
        return Err((
            "interval".into(),
            "is over a day; an analysis step measures within the rollout".into(),
        ));
    }
    if m.timeout.is_some_and(|t| t.is_zero()) {
        return Err(("timeout".into(), "must be above zero, e.g. \"10s\"".into()));
    }
    // A limit at or above the samples taken could never be exceeded: the
    // metric would pass with every sample failed, or with none judged.
    for (key, limit) in [
        ("failure_limit", m.failure_limit),
        ("inconclusive_limit", m.inconclusive_limit),
    ] {
        if limit >= m.count {
            return Err((
                key.into(),
                format!("{limit} is not below count ({}): no run could exceed it; lower it or raise count", m.count),
            ));
        }
    }
    Ok(Metric {
        name: m.name.clone(),
        provider,
        condition: m.condition.clone(),
        interval_ms: m.interval.as_millis() as u64,
        count: m.count,
        failure_limit: m.failure_limit,
        inconclusive_limit: m.inconclusive_limit,
        min_requests: m.min_requests.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BTreeMap<String, Analysis>, KeyError> {
        let specs: BTreeMap<String, AnalysisSpec> = toml::from_str(text).unwrap();
        resolve(&specs)
    }

    #[test]
    fn templates_resolve_with_defaults() {
        let analyses = parse(
            r#"
            [[errors.metrics]]
            name = "success"
            condition = "canary_success_rate >= 0.99"
            min_requests = 50
            [[errors.metrics]]
            name = "orders"
            provider = "prometheus"
            address = "http://127.0.0.1:9090"
            query = "sum(orders_failed_total)"
            condition = "result < 5"
            interval = "30s"
            count = 3
            "#,
        )
        .unwrap();
        let errors = &analyses["errors"];
        assert_eq!(errors.metrics[0].provider, Provider::Proxy);
        assert_eq!(errors.metrics[0].interval_ms, 60_000);
        assert_eq!(errors.metrics[0].count, 5);
        assert_eq!(errors.metrics[0].min_requests, 50);
        assert_eq!(errors.metrics[1].interval_ms, 30_000);
        assert!(matches!(
            &errors.metrics[1].provider,
            Provider::Prometheus {
                timeout_ms: 10_000,
                ..
            }
        ));
    }

    #[test]
    fn bad_templates_name_the_key() {
        for (text, key, says) in [
            (
                "[[e.metrics]]\nname = \"m\"\ncondition = \"canary_p95 < 3\"",
                "e.metrics[0].condition",
                "canary_p95 is not a value",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\ncondition = \"result <\"",
                "e.metrics[0].condition",
                "ends where a value belongs",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"prometheus\"\ncondition = \"result < 1\"",
                "e.metrics[0].address",
                "needs address",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"web\"\nurl = \"ftp://x\"\ncondition = \"result < 1\"",
                "e.metrics[0].url",
                "http",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"web\"\nurl = \"http://x/\"\nmin_requests = 3\ncondition = \"result < 1\"",
                "e.metrics[0].min_requests",
                "not a setting of provider \"web\"",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"datadog\"\ncondition = \"result < 1\"",
                "e.metrics[0].provider",
                "\"datadog\"",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\ncount = 0\ncondition = \"canary_p99 < 1\"",
                "e.metrics[0].count",
                "at least 1",
            ),
            ("e = { metrics = [] }", "e.metrics", "at least one metric"),
            (
                "[[e.metrics]]\nname = \"m\"\ncount = 2\nfailure_limit = 2\ncondition = \"canary_p99 < 1\"",
                "e.metrics[0].failure_limit",
                "2 is not below count (2)",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\ninterval = \"2d\"\ncondition = \"canary_p99 < 1\"",
                "e.metrics[0].interval",
                "over a day",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"web\"\nurl = \"http://user:pw@x/\"\ncondition = \"result < 1\"",
                "e.metrics[0].url",
                "credentials",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"web\"\nurl = \"http://x/\"\nheaders = { Authorization = \"Bearer abc\" }\ncondition = \"result < 1\"",
                "e.metrics[0].headers.Authorization",
                "Authorization = { secret = \"NAME\" }",
            ),
            (
                "[[e.metrics]]\nname = \"m\"\nprovider = \"web\"\nurl = \"http://x/\"\nheaders = { X-Api-Key = { secret = \"not a name\" } }\ncondition = \"result < 1\"",
                "e.metrics[0].headers.X-Api-Key",
                "",
            ),
        ] {
            let (k, m) = parse(text).unwrap_err();
            assert_eq!(k, key, "{text}");
            assert!(m.contains(says), "{text}: {m}");
        }
    }
}
