//! Incident levers of a service's node proxies (maintenance, throttle,
//! pause): the settings the coordinator stores and sends, the agent
//! records and applies, and both check alike; their wire form; and what
//! the agent counts of them.

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::net::Network;

/// The path prefix of a maintenance bypass link: `/_cutover/bypass/<secret>`.
pub const BYPASS_PATH: &str = "/_cutover/bypass/";
/// The cookie the bypass link sets.
pub const BYPASS_COOKIE: &str = "cutover_bypass";
/// Bounds of a maintenance message (bytes) and its Retry-After (seconds).
pub const MAX_MESSAGE: usize = 1024;
pub const MAX_RETRY_AFTER_S: u32 = 86_400;
/// Networks one maintenance may allow.
pub const MAX_ALLOW: usize = 64;
/// The longest a pause may hold a request.
pub const MAX_PAUSE_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeverSettings {
    #[serde(default)]
    pub maintenance: Option<MaintenanceSettings>,
    #[serde(default)]
    pub throttle: Option<ThrottleSettings>,
    #[serde(default)]
    pub pause: Option<PauseSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceSettings {
    pub message: String,
    /// Seconds; 0: no Retry-After.
    pub retry_after_s: u32,
    /// Client networks (CIDR) that still reach the app.
    pub allow: Vec<String>,
    /// Empty: no bypass cookie.
    pub bypass_secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleSettings {
    pub rps: u32,
    pub burst: u32,
    /// "client-ip", "header:NAME" or "all".
    pub per: String,
    /// Empty: every path.
    pub path_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseSettings {
    pub max_pause_ms: u64,
    /// When the operator paused (ms since the Unix epoch).
    pub since_ms: i64,
}

/// What a throttle keeps one bucket per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThrottleKey {
    All,
    ClientIp,
    /// A request header (lowercase); requests without it share a bucket.
    Header(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeverError {
    #[error("maintenance allow: {0}")]
    Allow(String),
    #[error("maintenance allows at most {MAX_ALLOW} networks")]
    TooManyNetworks,
    #[error("maintenance message is over {MAX_MESSAGE} bytes")]
    Message,
    #[error("maintenance retry-after is over {MAX_RETRY_AFTER_S} seconds (a day)")]
    RetryAfter,
    #[error("maintenance bypass secret must be 16 to 128 letters, digits, '-' or '_'")]
    BypassSecret,
    #[error("throttle rps and burst must be at least 1 (got rps {rps}, burst {burst})")]
    Rate { rps: u32, burst: u32 },
    #[error("throttle per {0:?} is none of client-ip, header:NAME or all")]
    Per(String),
    #[error("throttle path prefix {0:?} does not start with '/'")]
    PathPrefix(String),
    #[error("max pause must be between 1ms and 10m")]
    MaxPause,
}

impl LeverSettings {
    pub fn is_empty(&self) -> bool {
        self.maintenance.is_none() && self.throttle.is_none() && self.pause.is_none()
    }

    /// As an agent reports them: a bypass secret as its fingerprint
    /// ("sha256:" and 16 hex digits), so heartbeats and the node records
    /// made of them never hold the secret, and the coordinator still tells
    /// whether a node has the one it set.
    pub fn reported(&self) -> LeverSettings {
        let mut reported = self.clone();
        if let Some(m) = reported.maintenance.as_mut() {
            if !m.bypass_secret.is_empty() {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(m.bypass_secret.as_bytes());
                let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
                m.bypass_secret = format!("sha256:{hex}");
            }
        }
        reported
    }

    /// Whether a proxy takes these settings; the error names the lever and
    /// what is wrong.
    pub fn check(&self) -> Result<(), LeverError> {
        if let Some(maintenance) = &self.maintenance {
            maintenance.check()?;
        }
        if let Some(throttle) = &self.throttle {
            throttle.key()?;
        }
        if let Some(pause) = &self.pause {
            if !(1..=MAX_PAUSE_MS).contains(&pause.max_pause_ms) {
                return Err(LeverError::MaxPause);
            }
        }
        Ok(())
    }
}

impl MaintenanceSettings {
    /// The allowed networks, parsed.
    pub fn networks(&self) -> Result<Vec<Network>, LeverError> {
        if self.allow.len() > MAX_ALLOW {
            return Err(LeverError::TooManyNetworks);
        }
        self.allow
            .iter()
            .map(|n| n.parse::<Network>().map_err(LeverError::Allow))
            .collect()
    }

    fn check(&self) -> Result<(), LeverError> {
        self.networks()?;
        if self.message.len() > MAX_MESSAGE {
            return Err(LeverError::Message);
        }
        if self.retry_after_s > MAX_RETRY_AFTER_S {
            return Err(LeverError::RetryAfter);
        }
        let secret = &self.bypass_secret;
        let secret_ok = (16..=128).contains(&secret.len())
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !secret.is_empty() && !secret_ok {
            return Err(LeverError::BypassSecret);
        }
        Ok(())
    }
}

impl ThrottleSettings {
    /// What it keeps a bucket per, checking the rest of it too.
    pub fn key(&self) -> Result<ThrottleKey, LeverError> {
        if self.rps == 0 || self.burst == 0 {
            return Err(LeverError::Rate {
                rps: self.rps,
                burst: self.burst,
            });
        }
        if !self.path_prefix.is_empty() && !self.path_prefix.starts_with('/') {
            return Err(LeverError::PathPrefix(self.path_prefix.clone()));
        }
        match self.per.as_str() {
            "all" => Ok(ThrottleKey::All),
            "client-ip" => Ok(ThrottleKey::ClientIp),
            other => match other.strip_prefix("header:") {
                // A header name is a token (RFC 9110 5.1), matched
                // case-insensitively.
                Some(name)
                    if !name.is_empty()
                        && name.len() <= 64
                        && name.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
                        }) =>
                {
                    Ok(ThrottleKey::Header(name.to_ascii_lowercase()))
                }
                _ => Err(LeverError::Per(other.to_string())),
            },
        }
    }
}

/// What the levers of one proxy did since its agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeverCounts {
    pub maintenance_answered: u64,
    pub maintenance_bypassed: u64,
    pub throttled: u64,
    pub held: u64,
    /// Held requests answered 503 at their max pause (or at once, when too
    /// many were held).
    pub hold_expired: u64,
    /// Held now.
    pub holding: u64,
}

impl From<Option<&pb::TrafficLevers>> for LeverSettings {
    fn from(levers: Option<&pb::TrafficLevers>) -> Self {
        let Some(levers) = levers else {
            return Self::default();
        };
        Self {
            maintenance: levers.maintenance.as_ref().map(|m| MaintenanceSettings {
                message: m.message.clone(),
                retry_after_s: m.retry_after_s,
                allow: m.allow.clone(),
                bypass_secret: m.bypass_secret.clone(),
            }),
            throttle: levers.throttle.as_ref().map(|t| ThrottleSettings {
                rps: t.rps,
                burst: t.burst,
                per: t.per.clone(),
                path_prefix: t.path_prefix.clone(),
            }),
            pause: levers.pause.as_ref().map(|p| PauseSettings {
                max_pause_ms: p.max_pause_ms,
                since_ms: p.since_ms,
            }),
        }
    }
}

impl From<&LeverSettings> for pb::TrafficLevers {
    fn from(levers: &LeverSettings) -> Self {
        Self {
            maintenance: levers.maintenance.as_ref().map(|m| pb::Maintenance {
                message: m.message.clone(),
                retry_after_s: m.retry_after_s,
                allow: m.allow.clone(),
                bypass_secret: m.bypass_secret.clone(),
            }),
            throttle: levers.throttle.as_ref().map(|t| pb::Throttle {
                rps: t.rps,
                burst: t.burst,
                per: t.per.clone(),
                path_prefix: t.path_prefix.clone(),
            }),
            pause: levers.pause.as_ref().map(|p| pb::PauseTraffic {
                max_pause_ms: p.max_pause_ms,
                since_ms: p.since_ms,
            }),
        }
    }
}

impl From<&pb::LeverCounts> for LeverCounts {
    fn from(c: &pb::LeverCounts) -> Self {
        Self {
            maintenance_answered: c.maintenance_answered,
            maintenance_bypassed: c.maintenance_bypassed,
            throttled: c.throttled,
            held: c.held,
            hold_expired: c.hold_expired,
            holding: c.holding,
        }
    }
}

impl From<LeverCounts> for pb::LeverCounts {
    fn from(c: LeverCounts) -> Self {
        Self {
            maintenance_answered: c.maintenance_answered,
            maintenance_bypassed: c.maintenance_bypassed,
            throttled: c.throttled,
            held: c.held,
            hold_expired: c.hold_expired,
            holding: c.holding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(rps: u32, per: &str, prefix: &str) -> ThrottleSettings {
        ThrottleSettings {
            rps,
            burst: 1,
            per: per.into(),
            path_prefix: prefix.into(),
        }
    }

    #[test]
    fn settings_go_through_the_wire_unchanged() {
        let settings = LeverSettings {
            maintenance: Some(MaintenanceSettings {
                message: "back at 4".into(),
                retry_after_s: 120,
                allow: vec!["10.0.0.0/8".into()],
                bypass_secret: "s".repeat(20),
            }),
            throttle: Some(throttle(100, "header:x-key", "/checkout")),
            pause: Some(PauseSettings {
                max_pause_ms: 30_000,
                since_ms: 7,
            }),
        };
        let wire = pb::TrafficLevers::from(&settings);
        assert_eq!(LeverSettings::from(Some(&wire)), settings);
        assert_eq!(LeverSettings::from(None), LeverSettings::default());
    }

    #[test]
    fn a_reported_bypass_secret_is_a_fingerprint() {
        let settings = LeverSettings {
            maintenance: Some(MaintenanceSettings {
                message: "m".into(),
                retry_after_s: 0,
                allow: Vec::new(),
                bypass_secret: "0123456789abcdef0123".into(),
            }),
            ..Default::default()
        };
        let reported = settings.reported();
        let shown = &reported.maintenance.as_ref().unwrap().bypass_secret;
        assert!(shown.starts_with("sha256:") && shown.len() == 23, "{shown}");
        assert!(!shown.contains("0123456789abcdef0123"));
        assert_eq!(
            reported,
            settings.reported(),
            "the same secret, the same print"
        );
        assert_eq!(
            LeverSettings::default().reported(),
            LeverSettings::default()
        );
    }

    #[test]
    fn bad_settings_are_refused_with_their_cause() {
        let with_throttle = |t| LeverSettings {
            throttle: Some(t),
            ..Default::default()
        };
        let check = |s: LeverSettings| s.check().err();
        assert_eq!(
            check(with_throttle(throttle(0, "all", ""))),
            Some(LeverError::Rate { rps: 0, burst: 1 })
        );
        for per in ["cookie", "header:", "header:a b"] {
            assert_eq!(
                check(with_throttle(throttle(1, per, ""))),
                Some(LeverError::Per(per.into()))
            );
        }
        assert_eq!(
            throttle(1, "header:X-Api-Key", "").key(),
            Ok(ThrottleKey::Header("x-api-key".into()))
        );
        assert_eq!(
            check(with_throttle(throttle(1, "all", "checkout"))),
            Some(LeverError::PathPrefix("checkout".into()))
        );
        let maintenance = |allow: &str, secret: &str| LeverSettings {
            maintenance: Some(MaintenanceSettings {
                message: String::new(),
                retry_after_s: 0,
                allow: vec![allow.into()],
                bypass_secret: secret.into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            check(maintenance("10.0.0.0/8", "short")),
            Some(LeverError::BypassSecret)
        );
        assert!(matches!(
            check(maintenance("10.0.0.0", "")),
            Some(LeverError::Allow(_))
        ));
        let pause = |ms| LeverSettings {
            pause: Some(PauseSettings {
                max_pause_ms: ms,
                since_ms: 0,
            }),
            ..Default::default()
        };
        assert_eq!(check(pause(0)), Some(LeverError::MaxPause));
        assert_eq!(check(pause(MAX_PAUSE_MS + 1)), Some(LeverError::MaxPause));
        assert_eq!(check(pause(MAX_PAUSE_MS)), None);
    }
}
