//! Queue depth and worker health: what a release asks its nodes to probe
//! (Laravel's Redis queues and the worker's status command), checked alike
//! by the coordinator and the agent, and what a probe reports.

use std::time::Duration;

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::rules;

/// Queues one probe may read.
pub const MAX_QUEUES: usize = 32;
/// The shortest probe interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProbeSpec {
    /// "HOST:PORT".
    pub redis: String,
    pub db: u32,
    /// A secret of the release holding the Redis password.
    pub password_secret: Option<String>,
    pub prefix: String,
    pub names: Vec<String>,
    /// Empty: the worker is up while its process runs.
    pub status_command: Vec<String>,
    pub interval: Duration,
    pub max_depth: Option<u64>,
    pub max_wait: Option<Duration>,
    /// A new release must not let the waiting jobs grow over this long
    /// before the old one stops (see `QueueProbe.gate_ms`).
    #[serde(default)]
    pub gate: Option<Duration>,
}

/// The longest consumption gate.
pub const MAX_GATE: Duration = Duration::from_secs(600);

/// Why a queue probe is refused: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queues.{key}: {message}")]
pub struct QueueProbeError {
    pub key: &'static str,
    pub message: String,
}

fn refuse(key: &'static str, message: impl Into<String>) -> QueueProbeError {
    QueueProbeError {
        key,
        message: message.into(),
    }
}

impl QueueProbeSpec {
    /// Checks it, given the secrets the release gets.
    pub fn check(&self, secrets: &[String]) -> Result<(), QueueProbeError> {
        let (host, port) = self.redis.rsplit_once(':').ok_or_else(|| {
            refuse(
                "redis",
                format!("{:?} is not HOST:PORT, e.g. \"10.0.0.5:6379\"", self.redis),
            )
        })?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(refuse(
                "redis",
                format!("{:?} is not HOST:PORT, e.g. \"10.0.0.5:6379\"", self.redis),
            ));
        }
        if self.names.is_empty() || self.names.len() > MAX_QUEUES {
            return Err(refuse(
                "names",
                format!("name 1 to {MAX_QUEUES} queues, e.g. [\"default\"]"),
            ));
        }
        for name in &self.names {
            let sane = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !sane {
                return Err(refuse(
                    "names",
                    format!("{name:?} is not a queue name (letters, digits, - _ . :)"),
                ));
            }
        }
        if self.prefix.len() > 128 || self.prefix.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(refuse("prefix", "must be at most 128 bytes without spaces"));
        }
        if let Some(secret) = &self.password_secret {
            if !secrets.contains(secret) {
                return Err(refuse(
                    "password_secret",
                    format!("{secret:?} is not one of the service's secrets; add it to `secrets`"),
                ));
            }
        }
        if self.status_command.first().is_some_and(|p| p.is_empty()) {
            return Err(refuse(
                "status_command",
                "must name a program, e.g. [\"php\", \"artisan\", \"horizon:status\"]",
            ));
        }
        if self.interval < MIN_INTERVAL {
            return Err(refuse("interval", "must be at least 1s"));
        }
        if let Some(gate) = self.gate {
            if gate < MIN_INTERVAL || gate > MAX_GATE {
                return Err(refuse("gate", "must be between 1s and 10m, e.g. \"30s\""));
            }
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&QueueProbeSpec> for pb::QueueProbe {
    fn from(q: &QueueProbeSpec) -> Self {
        Self {
            redis: q.redis.clone(),
            db: q.db,
            password_secret: q.password_secret.clone().unwrap_or_default(),
            prefix: q.prefix.clone(),
            names: q.names.clone(),
            status_command: q.status_command.clone(),
            interval_ms: millis(q.interval),
            max_depth: q.max_depth.unwrap_or(0),
            max_wait_ms: q.max_wait.map_or(0, millis),
            gate_ms: q.gate.map_or(0, millis),
        }
    }
}

impl QueueProbeSpec {
    /// Read from the wire and checked against the release's secrets.
    pub fn from_wire(q: &pb::QueueProbe, secrets: &[String]) -> Result<Self, QueueProbeError> {
        let spec = Self {
            redis: q.redis.clone(),
            db: q.db,
            password_secret: (!q.password_secret.is_empty()).then(|| q.password_secret.clone()),
            prefix: q.prefix.clone(),
            names: q.names.clone(),
            status_command: q.status_command.clone(),
            interval: Duration::from_millis(q.interval_ms),
            max_depth: (q.max_depth > 0).then_some(q.max_depth),
            max_wait: (q.max_wait_ms > 0).then(|| Duration::from_millis(q.max_wait_ms)),
            gate: (q.gate_ms > 0).then(|| Duration::from_millis(q.gate_ms)),
        };
        if let Some(secret) = &spec.password_secret {
            rules::env_var_name(secret).map_err(|e| refuse("password_secret", e.to_string()))?;
        }
        spec.check(secrets)?;
        Ok(spec)
    }
}

/// A probe's last pass on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    pub probed_at_ms: i64,
    pub queues: Vec<QueueDepth>,
    /// Why Redis could not be read; empty when the figures are fresh.
    pub error: String,
    /// 0 running, 1 paused, else inactive; -1: the status command could
    /// not run.
    pub worker_status: i32,
    pub worker_detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDepth {
    pub name: String,
    pub waiting: u64,
    pub delayed: u64,
    pub reserved: u64,
    /// -1: none waits, or its payload carries no push time.
    pub oldest_age_ms: i64,
}

impl From<&QueueReport> for pb::QueueReport {
    fn from(r: &QueueReport) -> Self {
        Self {
            probed_at_ms: r.probed_at_ms,
            queues: r
                .queues
                .iter()
                .map(|q| pb::QueueDepth {
                    name: q.name.clone(),
                    waiting: q.waiting,
                    delayed: q.delayed,
                    reserved: q.reserved,
                    oldest_age_ms: q.oldest_age_ms,
                })
                .collect(),
            error: r.error.clone(),
            worker_status: r.worker_status,
            worker_detail: r.worker_detail.clone(),
        }
    }
}

impl From<&pb::QueueReport> for QueueReport {
    fn from(r: &pb::QueueReport) -> Self {
        Self {
            probed_at_ms: r.probed_at_ms,
            queues: r
                .queues
                .iter()
                .map(|q| QueueDepth {
                    name: q.name.clone(),
                    waiting: q.waiting,
                    delayed: q.delayed,
                    reserved: q.reserved,
                    oldest_age_ms: q.oldest_age_ms,
                })
                .collect(),
            error: r.error.clone(),
            worker_status: r.worker_status,
            worker_detail: r.worker_detail.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> QueueProbeSpec {
        QueueProbeSpec {
            redis: "10.0.0.5:6379".into(),
            db: 1,
            password_secret: Some("REDIS_PASSWORD".into()),
            prefix: "shop_database_".into(),
            names: vec!["default".into(), "emails".into()],
            status_command: vec!["php".into(), "artisan".into(), "horizon:status".into()],
            interval: Duration::from_secs(10),
            max_depth: Some(1000),
            max_wait: Some(Duration::from_secs(300)),
            gate: Some(Duration::from_secs(30)),
        }
    }

    #[test]
    fn a_probe_goes_through_the_wire_unchanged() {
        let secrets = vec!["REDIS_PASSWORD".to_string()];
        let wire = pb::QueueProbe::from(&spec());
        assert_eq!(QueueProbeSpec::from_wire(&wire, &secrets), Ok(spec()));
        let report = QueueReport {
            probed_at_ms: 5,
            queues: vec![QueueDepth {
                name: "default".into(),
                waiting: 3,
                delayed: 1,
                reserved: 2,
                oldest_age_ms: 1500,
            }],
            error: String::new(),
            worker_status: 1,
            worker_detail: "paused".into(),
        };
        assert_eq!(QueueReport::from(&pb::QueueReport::from(&report)), report);
    }

    #[test]
    fn bad_probes_name_the_key() {
        let secrets = vec!["REDIS_PASSWORD".to_string()];
        let key = |change: fn(&mut QueueProbeSpec)| {
            let mut s = spec();
            change(&mut s);
            s.check(&secrets).err().map(|e| e.key)
        };
        assert_eq!(key(|s| s.redis = "redis".into()), Some("redis"));
        assert_eq!(key(|s| s.redis = "redis:0".into()), Some("redis"));
        assert_eq!(key(|s| s.names.clear()), Some("names"));
        assert_eq!(key(|s| s.names = vec!["a b".into()]), Some("names"));
        assert_eq!(
            key(|s| s.password_secret = Some("OTHER".into())),
            Some("password_secret")
        );
        assert_eq!(
            key(|s| s.status_command = vec![String::new()]),
            Some("status_command")
        );
        assert_eq!(
            key(|s| s.interval = Duration::from_millis(10)),
            Some("interval")
        );
        assert_eq!(key(|_| {}), None);
    }
}
