//! Which refused calls reach the audit log. Every refusal is worth an
//! entry, but a flood of them (a script with a revoked certificate, a
//! scanner with none) must not fill the store: at most `PER_SOURCE` entries
//! a minute per source and `OVERALL` from all sources together; what is
//! left out is counted and said in one summary entry once its minute ends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

/// Entries a minute from one source.
const PER_SOURCE: u32 = 20;
/// Entries a minute from every source together.
const OVERALL: u32 = 300;
const WINDOW_MS: i64 = 60_000;
/// Sources tracked at once; past that, new ones share one window.
const MAX_SOURCES: usize = 10_000;
/// The window of every source beyond `MAX_SOURCES`.
const OTHER_SOURCES: &str = "other sources";
/// Summaries written at once, before they are summed into one.
const MAX_SUMMARIES: usize = 10;
/// The name of the overall window in summaries.
const ALL_SOURCES: &str = "all sources";

#[derive(Debug, Default)]
struct Window {
    started_ms: i64,
    written: u32,
    left_out: u32,
}

impl Window {
    fn open(now: i64) -> Self {
        Self {
            started_ms: now,
            ..Self::default()
        }
    }

    fn ended(&self, now: i64) -> bool {
        now - self.started_ms >= WINDOW_MS
    }
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<String, Window>,
    overall: Window,
    swept_ms: i64,
}

/// What to write for one refusal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Whether the refusal itself gets an entry.
    pub write: bool,
    /// Sources whose minute ended with refusals left out, and how many.
    pub summaries: Vec<(String, u32)>,
}

#[derive(Debug, Default)]
pub struct RefusalLimiter {
    state: Mutex<State>,
}

impl RefusalLimiter {
    /// Takes in one refusal from `source` at `now` (ms).
    pub fn admit(&self, source: &str, now: i64) -> Admitted {
        let mut state = self.state.lock().expect("refusal limiter lock");
        let mut summaries = Vec::new();
        // Ended windows leave the map (with their summary) at most once a
        // second, so memory follows the sources of the last minute.
        if now - state.swept_ms >= 1000 {
            state.swept_ms = now;
            state.sources.retain(|source, window| {
                if !window.ended(now) {
                    return true;
                }
                if window.left_out > 0 {
                    summaries.push((source.clone(), window.left_out));
                }
                false
            });
        }
        if state.overall.ended(now) {
            let ended = std::mem::replace(&mut state.overall, Window::open(now));
            if ended.left_out > 0 {
                summaries.push((ALL_SOURCES.to_string(), ended.left_out));
            }
        }
        let key = if state.sources.contains_key(source) || state.sources.len() < MAX_SOURCES {
            source
        } else {
            OTHER_SOURCES
        };
        let overall_full = state.overall.written >= OVERALL;
        let window = state
            .sources
            .entry(key.to_string())
            .or_insert_with(|| Window::open(now));
        if window.ended(now) {
            if window.left_out > 0 {
                summaries.push((key.to_string(), window.left_out));
            }
            *window = Window::open(now);
        }
        let write = window.written < PER_SOURCE && !overall_full;
        if write {
            window.written += 1;
            state.overall.written += 1;
        } else if overall_full {
            state.overall.left_out += 1;
        } else {
            window.left_out += 1;
        }
        // Summaries are entries too: many at once become one.
        if summaries.len() > MAX_SUMMARIES {
            let total = summaries.iter().map(|(_, n)| n).sum();
            summaries = vec![(format!("{} sources", summaries.len()), total)];
        }
        Admitted { write, summaries }
    }
}

/// A caller's address as a rate-limit source: an IPv6 caller by its /64,
/// which one machine can fill with addresses of its own.
pub fn source_address(addr: Option<SocketAddr>) -> String {
    match addr.map(|a| a.ip()) {
        Some(IpAddr::V4(ip)) => ip.to_string(),
        Some(IpAddr::V6(ip)) => {
            let s = ip.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        None => "an unknown address".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_from_one_source_is_bounded_and_summed_up_when_its_minute_ends() {
        let limiter = RefusalLimiter::default();
        let written = (0..100)
            .filter(|i| limiter.admit("agent/x@10.0.0.1", *i).write)
            .count();
        assert_eq!(written, PER_SOURCE as usize);
        // Another source still gets its entries.
        assert!(limiter.admit("anonymous@10.0.0.2", 200).write);
        // The next minute: a summary of the 80 left out, and entries again.
        let next = limiter.admit("agent/x@10.0.0.1", WINDOW_MS + 5);
        assert!(next.write);
        assert_eq!(next.summaries, [("agent/x@10.0.0.1".to_string(), 80)]);
    }

    #[test]
    fn many_sources_together_are_bounded_and_the_map_forgets_them() {
        let limiter = RefusalLimiter::default();
        let written = (0..20_000)
            .filter(|i| limiter.admit(&format!("anonymous@{i}"), 10).write)
            .count();
        assert_eq!(written, OVERALL as usize);
        assert!(limiter.state.lock().unwrap().sources.len() <= MAX_SOURCES + 1);
        let later = limiter.admit("anonymous@new", 2 * WINDOW_MS);
        assert!(later.write);
        let left_out: u32 = later.summaries.iter().map(|(_, n)| n).sum();
        assert_eq!(left_out, 20_000 - OVERALL, "{:?}", later.summaries);
        assert!(
            later.summaries.len() <= MAX_SUMMARIES,
            "{:?}",
            later.summaries
        );
        assert!(limiter.state.lock().unwrap().sources.len() <= 2);
    }

    #[test]
    fn ipv6_callers_are_one_source_per_64() {
        let a = source_address(Some("[2001:db8:1:2:aaaa::1]:5000".parse().unwrap()));
        let b = source_address(Some("[2001:db8:1:2:bbbb::9]:6000".parse().unwrap()));
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(
            source_address(Some("10.1.2.3:4".parse().unwrap())),
            "10.1.2.3"
        );
    }
}
