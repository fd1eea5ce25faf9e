//! Which of two releases a request goes to when a service runs a side
//! release beside the serving one (a canary, a warm standby; see
//! `TrafficSplit` in the proto).
//!
//! Each request gets a bucket from 0 to 9999 from its cohort key: the
//! proxy's cookie (whose value is the bucket itself), a header, or the
//! client's address. Buckets below `weight` * 100 go to the side release.
//! The hash is fixed: FNV-1a 64 over the key's bytes, then the murmur3
//! `fmix64` finalizer (FNV alone leaves keys that differ in their last byte,
//! like neighbouring addresses, in neighbouring buckets), modulo 10,000.
//! Every node and every agent restart puts a client in the same bucket, so
//! a client keeps its release while the weight stays, and a rising weight
//! only moves clients to the side release, never back.

use std::net::IpAddr;

use http::header::COOKIE;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::headers::{client_address, Network};

/// Buckets per split: a weight step of 1% is 100 buckets.
pub const BUCKETS: u16 = 10_000;

/// The proxy's cookie when a split names none.
pub const DEFAULT_COOKIE: &str = "cutover_cohort";

/// How long a client keeps its cookie (and so its release) without
/// coming back.
const COOKIE_MAX_AGE_SECS: u64 = 7 * 24 * 3600;

/// What a request's bucket comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// The proxy's cookie; a request without it gets its address's bucket,
    /// and the cookie with the response.
    #[default]
    Cookie,
    /// A hash of a header (a user id, say); its address without it.
    Header,
    /// A hash of the client's address.
    ClientIp,
}

/// How requests are divided between the serving release and the side
/// release, as the coordinator sets it (and the agent records it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Percent of the requests for the side release, 0 to 100.
    pub weight: u32,
    pub sticky: Sticky,
    /// The cookie or the header; empty: `DEFAULT_COOKIE` (a header must be
    /// named).
    pub sticky_name: String,
    /// A request whose header of this name is "always" goes to the side
    /// release, "never" to the serving one; empty: no override.
    pub override_header: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("traffic split weight {0} is not a percentage; give 0 to 100")]
    Weight(u32),
    #[error("traffic split sticky_name {0:?} is not a valid {1} name; use letters, digits, '-', '_' or '.'")]
    Name(String, &'static str),
    #[error("a traffic split sticky by header needs sticky_name, the header that holds the cohort key (a user id, say)")]
    NoHeader,
    #[error("traffic split override_header {0:?} is not a valid header name; use letters, digits and '-'")]
    Override(String),
}

/// A split ready for the request path: its names parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct Cohorts {
    split: Split,
    key: Key,
    override_header: Option<HeaderName>,
    /// Buckets below this go to the side release.
    threshold: u16,
}

#[derive(Debug, Clone, PartialEq)]
enum Key {
    Cookie(String),
    Header(HeaderName),
    ClientIp,
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub side: bool,
    /// The cookie to give the client with the response (it came without a
    /// valid one).
    pub set_cookie: Option<HeaderValue>,
}

impl Cohorts {
    pub fn new(split: Split) -> Result<Self, SplitError> {
        if split.weight > 100 {
            return Err(SplitError::Weight(split.weight));
        }
        let key = match split.sticky {
            Sticky::Cookie if split.sticky_name.is_empty() => Key::Cookie(DEFAULT_COOKIE.into()),
            Sticky::Cookie => {
                let valid = split
                    .sticky_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !valid {
                    return Err(SplitError::Name(split.sticky_name.clone(), "cookie"));
                }
                Key::Cookie(split.sticky_name.clone())
            }
            Sticky::Header if split.sticky_name.is_empty() => return Err(SplitError::NoHeader),
            Sticky::Header => Key::Header(
                HeaderName::from_bytes(split.sticky_name.as_bytes())
                    .map_err(|_| SplitError::Name(split.sticky_name.clone(), "header"))?,
            ),
            Sticky::ClientIp => Key::ClientIp,
        };
        let override_header = match split.override_header.as_str() {
            "" => None,
            name => Some(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| SplitError::Override(name.to_string()))?,
            ),
        };
        Ok(Self {
            threshold: (split.weight * 100) as u16,
            split,
            key,
            override_header,
        })
    }

    /// A warm standby: weight 0, the default cookie, no override.
    pub fn standby() -> Self {
        Self::new(Split::default()).expect("the default split is valid")
    }

    pub fn split(&self) -> &Split {
        &self.split
    }

    /// The same split at another weight (at most 100).
    pub fn with_weight(&self, weight: u32) -> Self {
        let weight = weight.min(100);
        Self {
            split: Split {
                weight,
                ..self.split.clone()
            },
            threshold: (weight * 100) as u16,
            ..self.clone()
        }
    }

    /// Where a request with `headers` from `peer` goes. At weight 0 nothing
    /// is hashed and no cookie set: everything but an override goes to the
    /// serving release.
    pub fn choose(&self, headers: &HeaderMap, peer: IpAddr, trusted: &[Network]) -> Choice {
        let forced = self.forced(headers);
        if self.threshold == 0 {
            return Choice {
                side: forced == Some(true),
                set_cookie: None,
            };
        }
        let by_address = || address_bucket(client_address(headers, peer, trusted));
        let (bucket, set_cookie) = match &self.key {
            Key::Cookie(name) => match cookie_bucket(headers, name) {
                Some(bucket) => (bucket, None),
                None => {
                    let bucket = by_address();
                    (bucket, Some(cookie(name, bucket)))
                }
            },
            Key::Header(name) => match headers.get(name).filter(|v| !v.is_empty()) {
                Some(value) => (bucket_of(value.as_bytes()), None),
                None => (by_address(), None),
            },
            Key::ClientIp => (by_address(), None),
        };
        Choice {
            side: forced.unwrap_or(bucket < self.threshold),
            set_cookie,
        }
    }

    /// The override header's verdict, if the request carries one.
    fn forced(&self, headers: &HeaderMap) -> Option<bool> {
        let value = headers.get(self.override_header.as_ref()?)?.as_bytes();
        let value = value.trim_ascii();
        if value.eq_ignore_ascii_case(b"always") {
            Some(true)
        } else if value.eq_ignore_ascii_case(b"never") {
            Some(false)
        } else {
            None
        }
    }
}

/// The bucket of a cohort key (see the module docs for the hash).
pub fn bucket_of(key: &[u8]) -> u16 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    // murmur3 fmix64.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash % u64::from(BUCKETS)) as u16
}

/// The bucket of a client address: of its octets, an IPv4-mapped IPv6
/// address as the IPv4 one (a dual-stack listener sees those).
fn address_bucket(address: IpAddr) -> u16 {
    match address {
        IpAddr::V4(v4) => bucket_of(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => bucket_of(&v4.octets()),
            None => bucket_of(&v6.octets()),
        },
    }
}

/// The bucket a request's cookie `name` holds, if it holds a valid one.
fn cookie_bucket(headers: &HeaderMap, name: &str) -> Option<u16> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse::<u16>().ok())
        .filter(|bucket| *bucket < BUCKETS)
}

fn cookie(name: &str, bucket: u16) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={bucket}; Path=/; Max-Age={COOKIE_MAX_AGE_SECS}; HttpOnly; SameSite=Lax"
    ))
    .expect("a validated cookie name and a number form a header")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::default_trusted_networks;

    fn cohorts(weight: u32, sticky: Sticky, name: &str) -> Cohorts {
        Cohorts::new(Split {
            weight,
            sticky,
            sticky_name: name.into(),
            override_header: "x-canary".into(),
        })
        .unwrap()
    }

    fn address(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn side(cohorts: &Cohorts, headers: &HeaderMap, peer: IpAddr) -> bool {
        cohorts.choose(headers, peer, &[]).side
    }

    #[test]
    fn the_hash_is_fixed() {
        // Pinned: a changed hash would move every client of a running
        // canary on the agent's upgrade.
        // Values from an independent implementation of FNV-1a 64 + fmix64.
        assert_eq!(bucket_of(b""), 4_342);
        assert_eq!(bucket_of(b"user-42"), 1_453);
        assert_eq!(address_bucket(address(7)), 3_315, "10.0.0.7");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(address_bucket(mapped), 3_315);
    }

    #[test]
    fn a_weight_of_twenty_takes_a_fifth_of_ten_thousand_clients() {
        let split = cohorts(20, Sticky::ClientIp, "");
        let none = HeaderMap::new();
        let by_address = (0..10_000)
            .filter(|i| side(&split, &none, address(i * 7919)))
            .count();
        assert!((1_900..=2_100).contains(&by_address), "{by_address}");

        let split = cohorts(20, Sticky::Header, "x-user");
        let by_header = (0..10_000)
            .filter(|i| {
                let mut headers = HeaderMap::new();
                // Spread like random ids, but the same on every run.
                let user = format!("{:016x}", (*i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                headers.insert("x-user", HeaderValue::from_str(&user).unwrap());
                side(&split, &headers, address(1))
            })
            .count();
        assert!((1_900..=2_100).contains(&by_header), "{by_header}");
    }

    #[test]
    fn a_client_stays_and_a_rising_weight_never_moves_one_back() {
        let none = HeaderMap::new();
        let mut on_side = vec![false; 2_000];
        for weight in [0, 1, 5, 20, 50, 80, 100] {
            let split = cohorts(weight, Sticky::ClientIp, "");
            for (i, was) in on_side.iter_mut().enumerate() {
                let now = side(&split, &none, address(i as u32));
                assert_eq!(now, side(&split, &none, address(i as u32)), "sticky");
                assert!(now || !*was, "client {i} moved back at weight {weight}");
                *was = now;
            }
        }
        assert!(on_side.iter().all(|s| *s), "weight 100 takes everyone");
    }

    #[test]
    fn the_override_header_wins_at_any_weight() {
        for weight in [0, 30, 100] {
            let split = cohorts(weight, Sticky::ClientIp, "");
            let mut headers = HeaderMap::new();
            headers.insert("x-canary", HeaderValue::from_static("always"));
            assert!(side(&split, &headers, address(1)), "{weight}");
            headers.insert("x-canary", HeaderValue::from_static("Never"));
            assert!(!side(&split, &headers, address(1)), "{weight}");
        }
        let split = cohorts(100, Sticky::ClientIp, "");
        let mut headers = HeaderMap::new();
        headers.insert("x-canary", HeaderValue::from_static("maybe"));
        assert!(
            side(&split, &headers, address(1)),
            "other values are no override"
        );
    }

    #[test]
    fn the_cookie_holds_the_bucket_and_is_given_to_clients_without_one() {
        let split = cohorts(20, Sticky::Cookie, "");
        let peer = address(3);
        let first = split.choose(&HeaderMap::new(), peer, &[]);
        let bucket = address_bucket(peer);
        let expected =
            format!("cutover_cohort={bucket}; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax");
        assert_eq!(first.set_cookie.unwrap(), expected.as_str());
        assert_eq!(first.side, bucket < 2_000);

        let with = |cookie: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(COOKIE, HeaderValue::from_str(cookie).unwrap());
            split.choose(&headers, peer, &[])
        };
        let kept = with("theme=dark; cutover_cohort=1999; lang=en");
        assert_eq!((kept.side, kept.set_cookie), (true, None));
        assert!(!with("cutover_cohort=2000").side);
        for invalid in ["cutover_cohort=10000", "cutover_cohort=abc", "other=5"] {
            let choice = with(invalid);
            assert_eq!(choice.side, bucket < 2_000, "{invalid}");
            assert!(choice.set_cookie.is_some(), "{invalid}: a new cookie");
        }
        assert_eq!(cookie_bucket(&HeaderMap::new(), DEFAULT_COOKIE), None);
    }

    #[test]
    fn the_client_address_of_a_trusted_peer_is_its_forwarded_hop() {
        let split = cohorts(50, Sticky::ClientIp, "");
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let client = (0..100).map(address).find(|a| address_bucket(*a) < 5_000);
        let client = client.expect("some address below half");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_str(&client.to_string()).unwrap(),
        );
        let trusted = default_trusted_networks();
        assert!(split.choose(&headers, loopback, &trusted).side);
        assert_eq!(
            split.choose(&headers, loopback, &[]).side,
            address_bucket(loopback) < 5_000,
            "an untrusted peer's header is ignored"
        );
    }

    #[test]
    fn invalid_splits_are_refused_with_what_to_give() {
        let split = |weight, sticky, name: &str, header: &str| {
            Cohorts::new(Split {
                weight,
                sticky,
                sticky_name: name.into(),
                override_header: header.into(),
            })
        };
        assert_eq!(
            split(101, Sticky::Cookie, "", "").unwrap_err(),
            SplitError::Weight(101)
        );
        assert!(split(5, Sticky::Cookie, "a b", "").is_err());
        assert_eq!(
            split(5, Sticky::Header, "", "").unwrap_err(),
            SplitError::NoHeader
        );
        assert!(split(5, Sticky::ClientIp, "", "bad header").is_err());
        let standby = Cohorts::standby();
        assert_eq!(standby.split().weight, 0);
        assert_eq!(standby.with_weight(30).threshold, 3_000);
    }
}
