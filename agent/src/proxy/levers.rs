//! Incident levers of a node proxy, set by the operator through the
//! coordinator and checked before a request is routed, in this order:
//! maintenance (the proxy answers 503 itself, but for allowed clients),
//! throttle (a token bucket per key, 429 beyond it) and pause (requests are
//! held until the pause is lifted, each up to a limit, then 503).
//!
//! With no lever set a request pays one pointer load. The settings are what
//! the agent stores and reports; `Levers` is their compiled form with the
//! throttle's buckets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use cutover_common::levers::{
    LeverCounts, LeverError, LeverSettings, MaintenanceSettings, PauseSettings, ThrottleKey,
    ThrottleSettings, BYPASS_COOKIE, BYPASS_PATH,
};
use http::header::{ACCEPT, CONTENT_TYPE, LOCATION, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::headers::{client_address, Network};
use super::{text_response, ProxyBody, Shared};

/// Keys a throttle keeps buckets for; beyond it, buckets of keys idle long
/// enough to be full again are dropped, and while none is, new keys share
/// one bucket (a flood of distinct keys cannot grow memory without bound).
const MAX_BUCKETS: usize = 100_000;
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
    /// `headers::client_address`); a pause is the caller's to wait out.
    pub fn check(
        &self,
        path: &str,
        headers: &HeaderMap,
        client: IpAddr,
        counts: &LeverCounters,
    ) -> Verdict {
        if let Some(maintenance) = &self.maintenance {
            if let Some(cookie) = maintenance.bypass_link(path) {
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
    /// The cookie to set when `path` is this maintenance's bypass link.
    fn bypass_link(&self, path: &str) -> Option<HeaderValue> {
        let secret = self.bypass_secret.as_deref()?;
        let given = path.strip_prefix(BYPASS_PATH)?;
        if !same_secret(given, secret) {
            return None;
        }
        HeaderValue::from_str(&format!(
            "{BYPASS_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Lax"
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    All,
    Ip(IpAddr),
    Header(Vec<u8>),
    /// Keys beyond `MAX_BUCKETS` share this one.
    Overflow,
}

enum Per {
    All,
    ClientIp,
    Header(HeaderName),
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Throttle {
    settings: ThrottleSettings,
    per: Per,
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_key: HashMap<Key, Bucket>,
    /// When full buckets were last dropped to make room.
    swept: Option<Instant>,
}

impl Throttle {
    fn new(settings: ThrottleSettings) -> Result<Self, LeverError> {
        let per = match settings.key()? {
            ThrottleKey::All => Per::All,
            ThrottleKey::ClientIp => Per::ClientIp,
            ThrottleKey::Header(name) => Per::Header(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| LeverError::Per(settings.per.clone()))?,
            ),
        };
        Ok(Self {
            rate: f64::from(settings.rps),
            burst: f64::from(settings.burst),
            per,
            settings,
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                swept: None,
            }),
        })
    }

    /// Takes a token of the request's bucket; false when there is none.
    fn admit(&self, path: &str, headers: &HeaderMap, client: IpAddr, now: Instant) -> bool {
        if !path.starts_with(&self.settings.path_prefix) {
            return true;
        }
        let key = match &self.per {
            Per::All => Key::All,
            Per::ClientIp => Key::Ip(client),
            Per::Header(name) => Key::Header(
                headers
                    .get(name)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default(),
            ),
        };
        let mut buckets = self.buckets.lock().expect("throttle lock");
        let key = self.room_for(&mut buckets, key, now);
        let bucket = buckets.by_key.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        true
    }

    /// `key`, or the shared overflow key when the table is full and no
    /// bucket could be dropped (at most one sweep a second).
    fn room_for(&self, buckets: &mut Buckets, key: Key, now: Instant) -> Key {
        if buckets.by_key.len() < MAX_BUCKETS || buckets.by_key.contains_key(&key) {
            return key;
        }
        let sweep_due = buckets
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if sweep_due {
            let (rate, burst) = (self.rate, self.burst);
            buckets.by_key.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            buckets.swept = Some(now);
        }
        if buckets.by_key.len() < MAX_BUCKETS {
            key
        } else {
            Key::Overflow
        }
    }
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

/// The levers' answer to a request, or `None` to route it, once a pause
/// (if any) is lifted.
pub(super) async fn answer(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Option<Response<ProxyBody>> {
    let levers = shared.levers.load_full();
    if levers.is_empty() {
        return None;
    }
    let client = client_address(headers, peer, &shared.config.trusted_networks);
    let counts = &shared.lever_counts;
    match levers.check(path, headers, client, counts) {
        Verdict::Pass => {}
        Verdict::Maintenance {
            message,
            retry_after_s,
        } => return Some(maintenance_page(headers, &message, retry_after_s)),
        Verdict::SetBypassCookie(cookie) => {
            let mut response =
                text_response(StatusCode::FOUND, "maintenance bypass cookie set\n".into());
            response.headers_mut().insert(SET_COOKIE, cookie);
            response
                .headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/"));
            return Some(response);
        }
        Verdict::Throttled => {
            let mut response = text_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests: slow down and retry\n".into(),
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return Some(response);
        }
    }
    let max_pause = levers.pause()?;
    drop(levers);
    if counts.holding.fetch_add(1, Ordering::AcqRel) >= MAX_HELD {
        counts.holding.fetch_sub(1, Ordering::AcqRel);
        counts.hold_expired.fetch_add(1, Ordering::Relaxed);
        return Some(paused_response());
    }
    counts.held.fetch_add(1, Ordering::Relaxed);
    let mut paused = shared.paused.subscribe();
    let lifted = tokio::time::timeout(max_pause, paused.wait_for(|paused| !*paused))
        .await
        .is_ok();
    counts.holding.fetch_sub(1, Ordering::AcqRel);
    if lifted {
        return None;
    }
    counts.hold_expired.fetch_add(1, Ordering::Relaxed);
    Some(paused_response())
}

fn paused_response() -> Response<ProxyBody> {
    let mut response = text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "service paused: retry shortly\n".into(),
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// The operator's message, as a page to browsers and as text to the rest.
fn maintenance_page(headers: &HeaderMap, message: &str, retry_after_s: u32) -> Response<ProxyBody> {
    let html = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"));
    let mut response = if html {
        let page = format!(
            "<!doctype html>\n<meta charset=\"utf-8\">\n<title>Down for maintenance</title>\n<p>{}</p>\n",
            escape_html(message)
        );
        let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, page);
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        response
    } else {
        text_response(StatusCode::SERVICE_UNAVAILABLE, format!("{message}\n"))
    };
    if retry_after_s > 0 {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
    }
    response
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(rps: u32, burst: u32, per: &str, prefix: &str) -> Throttle {
        Throttle::new(ThrottleSettings {
            rps,
            burst,
            per: per.into(),
            path_prefix: prefix.into(),
        })
        .unwrap()
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_bucket_lets_its_burst_through_then_its_rate() {
        let t = throttle(10, 5, "all", "");
        let start = Instant::now();
        let headers = HeaderMap::new();
        for _ in 0..5 {
            assert!(t.admit("/", &headers, A, start));
        }
        assert!(!t.admit("/", &headers, A, start));
        // A tenth of a second brings one token.
        let later = start + Duration::from_millis(100);
        assert!(t.admit("/", &headers, B, later));
        assert!(!t.admit("/", &headers, B, later));
        // Over 10 s at most 100 more pass: the rate, not the request count.
        let mut passed = 0;
        for ms in 0..10_000 {
            let now = later + Duration::from_millis(ms + 1);
            passed += u32::from(t.admit("/", &headers, A, now));
            passed += u32::from(t.admit("/", &headers, A, now));
        }
        assert!((99..=101).contains(&passed), "{passed}");
    }

    #[test]
    fn keys_have_buckets_of_their_own_and_other_paths_pass() {
        let t = throttle(1, 1, "client-ip", "/checkout");
        let now = Instant::now();
        let h = HeaderMap::new();
        assert!(t.admit("/checkout/pay", &h, A, now));
        assert!(!t.admit("/checkout/pay", &h, A, now));
        assert!(t.admit("/checkout/pay", &h, B, now));
        for _ in 0..10 {
            assert!(t.admit("/cart", &h, A, now));
        }
        let t = throttle(1, 1, "header:x-api-key", "");
        let mut one = HeaderMap::new();
        one.insert("x-api-key", HeaderValue::from_static("one"));
        let mut two = HeaderMap::new();
        two.insert("x-api-key", HeaderValue::from_static("two"));
        assert!(t.admit("/", &one, A, now));
        assert!(!t.admit("/", &one, B, now));
        assert!(t.admit("/", &two, A, now));
        // Without the header: one shared bucket.
        assert!(t.admit("/", &h, A, now));
        assert!(!t.admit("/", &h, B, now));
    }

    #[test]
    fn a_flood_of_keys_shares_one_bucket_beyond_the_table_and_idle_ones_are_swept() {
        let t = throttle(1, 1, "header:k", "");
        let now = Instant::now();
        let with = |k: usize| {
            let mut h = HeaderMap::new();
            h.insert("k", HeaderValue::from_str(&k.to_string()).unwrap());
            h
        };
        for k in 0..MAX_BUCKETS {
            assert!(t.admit("/", &with(k), A, now));
        }
        // Full, and none refilled yet: new keys share the overflow bucket.
        assert!(t.admit("/", &with(MAX_BUCKETS), A, now));
        assert!(!t.admit("/", &with(MAX_BUCKETS + 1), A, now));
        assert_eq!(t.buckets.lock().unwrap().by_key.len(), MAX_BUCKETS + 1);
        // Two seconds on, every bucket is full again and can go.
        let later = now + Duration::from_secs(2);
        assert!(t.admit("/", &with(MAX_BUCKETS + 2), A, later));
        assert_eq!(t.buckets.lock().unwrap().by_key.len(), 1);
    }

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
        assert!(matches!(levers.check("/", &h, A, &counts), Verdict::Pass));
        assert!(matches!(
            levers.check("/", &h, B, &counts),
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
            levers.check("/", &cookie, B, &counts),
            Verdict::Pass
        ));
        let mut wrong = HeaderMap::new();
        wrong.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("{BYPASS_COOKIE}={secret}x")).unwrap(),
        );
        assert!(matches!(
            levers.check("/", &wrong, B, &counts),
            Verdict::Maintenance { .. }
        ));
        let Verdict::SetBypassCookie(set) =
            levers.check(&format!("{BYPASS_PATH}{secret}"), &h, B, &counts)
        else {
            panic!("the bypass link sets the cookie");
        };
        assert!(set
            .to_str()
            .unwrap()
            .starts_with(&format!("{BYPASS_COOKIE}={secret};")));
        assert!(matches!(
            levers.check(&format!("{BYPASS_PATH}guess"), &h, B, &counts),
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
        assert!(matches!(first.check("/", &h, A, &counts), Verdict::Pass));
        let again = Levers::compile(settings, &first).unwrap();
        assert!(matches!(
            again.check("/", &h, A, &counts),
            Verdict::Throttled
        ));
    }
}
