//! A throttle: one token bucket per key (every request alike, the client's
//! address, or a header's value), `rps` tokens a second, at most `burst`
//! saved.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cutover_common::levers::{LeverError, ThrottleKey, ThrottleSettings};
use http::{HeaderMap, HeaderName};

/// Keys a throttle keeps buckets for; beyond it, buckets of keys idle long
/// enough to be full again are dropped, and while none is, new keys share
/// one bucket (a flood of distinct keys cannot grow memory without bound).
const MAX_BUCKETS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    All,
    Ip(IpAddr),
    /// A keyed hash of the header's value: a bucket costs the same
    /// whatever a client sends (a value may be kilobytes long).
    Header(u64),
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

pub(super) struct Throttle {
    pub(super) settings: ThrottleSettings,
    per: Per,
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
    /// Hashes header values, keyed per throttle so clients cannot aim at
    /// one bucket with crafted values.
    hasher: RandomState,
}

struct Buckets {
    by_key: HashMap<Key, Bucket>,
    /// When full buckets were last dropped to make room.
    swept: Option<Instant>,
}

impl Throttle {
    pub(super) fn new(settings: ThrottleSettings) -> Result<Self, LeverError> {
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
            hasher: RandomState::new(),
        })
    }

    /// Takes a token of the request's bucket; false when there is none.
    pub(super) fn admit(
        &self,
        path: &str,
        headers: &HeaderMap,
        client: IpAddr,
        now: Instant,
    ) -> bool {
        if !path.starts_with(&self.settings.path_prefix) {
            return true;
        }
        let key = match &self.per {
            Per::All => Key::All,
            Per::ClientIp => Key::Ip(client),
            Per::Header(name) => Key::Header(
                self.hasher
                    .hash_one(headers.get(name).map_or(&b""[..], |v| v.as_bytes())),
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

#[cfg(test)]
mod tests {
    use http::HeaderValue;

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
}
