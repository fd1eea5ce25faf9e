//! Incident levers of a node proxy, set by the operator through the
//! coordinator and checked before a request is routed, in this order:
//! maintenance (the proxy answers 503 itself, but for allowed clients),
//! throttle (a token bucket per key, 429 beyond it) and pause (requests are
//! held until the pause is lifted, each up to a limit, then 503).
//!
//! With no lever set a request pays one pointer load. The settings are what
//! the agent stores and reports; `Levers` is their compiled form with the
//! throttle's buckets.

mod answer;
mod throttle;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use cutover_common::levers::{
    LeverCounts, LeverError, LeverSettings, MaintenanceSettings, PauseSettings, ThrottleKey,
    ThrottleSettings, BYPASS_COOKIE, BYPASS_PATH,
};
use http::{HeaderMap, HeaderValue};

pub use self::answer::LeverHandle;
pub(super) use self::answer::{answer, carries_bypass_cookie, strip_bypass_cookie};
use self::throttle::Throttle;
use super::headers::Network;

/// Requests held at once by a pause; more are answered 503 at once.
pub const MAX_HELD: u64 = 10_000;

/// What a request is answered with by a lever, or `Pass` to route it.
pub enum Verdict {
    Pass,
    /// 503 with the message and Retry-After (seconds).
    Maintenance {
        message: String,
        retry_after_s: u32,
    },
    /// A bypass link: set the cookie and send the client to `/`.
    SetBypassCookie(HeaderValue),
    /// 429 with `Retry-After: 1`: at 1 rps or more the next token is
    /// never further away.
    Throttled,
}

/// The levers in force, compiled.
#[derive(Default)]
pub struct Levers {
    settings: LeverSettings,
    maintenance: Option<Maintenance>,
    throttle: Option<Arc<Throttle>>,
}

struct Maintenance {
    message: String,
    retry_after_s: u32,
    allow: Vec<Network>,
    bypass_secret: Option<String>,
}

impl Levers {
    /// Compiles `settings`, keeping the buckets of `current`'s throttle
    /// when it is the same (the coordinator re-sending what is in force
    /// must not refill every bucket).
    pub fn compile(settings: LeverSettings, current: &Levers) -> Result<Self, LeverError> {
        settings.check()?;
        let maintenance = settings
            .maintenance
            .as_ref()
            .map(|m| {
                Ok(Maintenance {
                    message: m.message.clone(),
                    retry_after_s: m.retry_after_s,
                    allow: m.networks()?,
                    bypass_secret: (!m.bypass_secret.is_empty()).then(|| m.bypass_secret.clone()),
                })
            })
            .transpose()?;
        let throttle = match (&settings.throttle, &current.throttle) {
            (Some(wanted), Some(kept)) if *wanted == kept.settings => Some(kept.clone()),
            (Some(wanted), _) => Some(Arc::new(Throttle::new(wanted.clone())?)),
            (None, _) => None,
        };
        Ok(Self {
            settings,
            maintenance,
            throttle,
        })
    }

    pub fn settings(&self) -> &LeverSettings {
        &self.settings
    }

    pub fn is_empty(&self) -> bool {
        self.settings.is_empty()
    }

    /// The max pause of a pause in force.
    pub fn pause(&self) -> Option<Duration> {
        self.settings
            .pause
            .as_ref()
            .map(|p| Duration::from_millis(p.max_pause_ms))
    }

    /// Maintenance and throttle's answer to a request from `client` (see
    /// `headers::client_address`; `https`: it came in over https, as a
    /// trusted load balancer says); a pause is the caller's to wait out.
    pub fn check(
        &self,
        path: &str,
        headers: &HeaderMap,
        client: IpAddr,
        https: bool,
        counts: &LeverCounters,
    ) -> Verdict {
        if let Some(maintenance) = &self.maintenance {
            if let Some(cookie) = maintenance.bypass_link(path, https) {
                return Verdict::SetBypassCookie(cookie);
            }
            if maintenance.lets_through(headers, client) {
                counts.maintenance_bypassed.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.maintenance_answered.fetch_add(1, Ordering::Relaxed);
                return Verdict::Maintenance {
                    message: maintenance.message.clone(),
                    retry_after_s: maintenance.retry_after_s,
                };
            }
        }
        if let Some(throttle) = &self.throttle {
            if !throttle.admit(path, headers, client, Instant::now()) {
                counts.throttled.fetch_add(1, Ordering::Relaxed);
                return Verdict::Throttled;
            }
        }
        Verdict::Pass
    }
}

impl Maintenance {
    /// The cookie to set when `path` is this maintenance's bypass link
    /// (only sent back over https when it came over https).
    fn bypass_link(&self, path: &str, https: bool) -> Option<HeaderValue> {
        let secret = self.bypass_secret.as_deref()?;
        let given = path.strip_prefix(BYPASS_PATH)?;
        if !same_secret(given, secret) {
            return None;
        }
        let secure = if https { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{BYPASS_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Lax{secure}"
        ))
        .ok()
    }

    fn lets_through(&self, headers: &HeaderMap, client: IpAddr) -> bool {
        if self.allow.iter().any(|network| network.contains(client)) {
            return true;
        }
        let Some(secret) = self.bypass_secret.as_deref() else {
            return false;
        };
        headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == BYPASS_COOKIE && same_secret(value, secret))
    }
}

/// Compares in time independent of where the strings differ: a client must
/// not learn the secret a byte at a time from response times.
fn same_secret(given: &str, secret: &str) -> bool {
    given.len() == secret.len()
        && given
            .bytes()
            .zip(secret.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// What the levers did (since the proxy started).
#[derive(Debug, Default)]
pub struct LeverCounters {
    pub maintenance_answered: AtomicU64,
    pub maintenance_bypassed: AtomicU64,
    pub throttled: AtomicU64,
    pub held: AtomicU64,
    pub hold_expired: AtomicU64,
    pub holding: AtomicU64,
}

impl LeverCounters {
    pub fn snapshot(&self) -> LeverCounts {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LeverCounts {
            maintenance_answered: read(&self.maintenance_answered),
            maintenance_bypassed: read(&self.maintenance_bypassed),
            throttled: read(&self.throttled),
            held: read(&self.held),
            hold_expired: read(&self.hold_expired),
            holding: read(&self.holding),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn maintenance(allow: &[&str], secret: &str) -> Levers {
        Levers::compile(
            LeverSettings {
                maintenance: Some(MaintenanceSettings {
                    message: "back soon".into(),
                    retry_after_s: 120,
                    allow: allow.iter().map(|s| s.to_string()).collect(),
                    bypass_secret: secret.into(),
                }),
                ..Default::default()
            },
            &Levers::default(),
        )
        .unwrap()
    }

    #[test]
    fn maintenance_answers_everyone_but_allowed_networks_and_the_cookie() {
        let secret = "0123456789abcdef-xyz";
        let levers = maintenance(&["10.0.0.0/31"], secret);
        let counts = LeverCounters::default();
        let h = HeaderMap::new();
        assert!(matches!(
            levers.check("/", &h, A, false, &counts),
            Verdict::Pass
        ));
        assert!(matches!(
            levers.check("/", &h, B, false, &counts),
            Verdict::Maintenance {
                retry_after_s: 120,
                ..
            }
        ));
        let mut cookie = HeaderMap::new();
        cookie.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {BYPASS_COOKIE}={secret}")).unwrap(),
        );
        assert!(matches!(
            levers.check("/", &cookie, B, false, &counts),
            Verdict::Pass
        ));
        let mut wrong = HeaderMap::new();
        wrong.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("{BYPASS_COOKIE}={secret}x")).unwrap(),
        );
        assert!(matches!(
            levers.check("/", &wrong, B, false, &counts),
            Verdict::Maintenance { .. }
        ));
        let Verdict::SetBypassCookie(set) =
            levers.check(&format!("{BYPASS_PATH}{secret}"), &h, B, true, &counts)
        else {
            panic!("the bypass link sets the cookie");
        };
        assert!(set
            .to_str()
            .unwrap()
            .starts_with(&format!("{BYPASS_COOKIE}={secret};")));
        assert!(matches!(
            levers.check(&format!("{BYPASS_PATH}guess"), &h, B, false, &counts),
            Verdict::Maintenance { .. }
        ));
        let counts = counts.snapshot();
        assert_eq!(
            (counts.maintenance_answered, counts.maintenance_bypassed),
            (3, 2)
        );
    }

    #[test]
    fn re_setting_the_same_throttle_keeps_its_buckets() {
        let settings = LeverSettings {
            throttle: Some(ThrottleSettings {
                rps: 1,
                burst: 1,
                per: "all".into(),
                path_prefix: String::new(),
            }),
            ..Default::default()
        };
        let first = Levers::compile(settings.clone(), &Levers::default()).unwrap();
        let counts = LeverCounters::default();
        let h = HeaderMap::new();
        assert!(matches!(
            first.check("/", &h, A, false, &counts),
            Verdict::Pass
        ));
        let again = Levers::compile(settings, &first).unwrap();
        assert!(matches!(
            again.check("/", &h, A, false, &counts),
            Verdict::Throttled
        ));
    }
}
