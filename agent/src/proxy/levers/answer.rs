//! The levers on the request path: what a request is answered with
//! (maintenance, throttle, a pause that ran out), or that it goes on once a
//! pause is lifted; and the handle the agent sets them with.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cutover_common::levers::{LeverCounts, LeverError, LeverSettings, BYPASS_COOKIE};
use http::header::{ACCEPT, CONNECTION, CONTENT_TYPE, COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::{LeverCounters, Levers, Verdict, MAX_HELD};
use crate::proxy::headers::{client_address, is_trusted};
use crate::proxy::{text_response, ProxyBody, Shared};

/// The levers' answer to a request, or `None` to route it. A paused
/// request waits until the pause is lifted and is then checked again
/// against the levers in force (maintenance may have come on meanwhile),
/// or is answered 503 at its max pause or when the proxy stops.
pub(in crate::proxy) async fn answer(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Option<Response<ProxyBody>> {
    let counts = &shared.lever_counts;
    let arrived = Instant::now();
    let mut place: Option<Held> = None;
    loop {
        let levers = shared.levers.load_full();
        if levers.is_empty() {
            return None;
        }
        let trusted = &shared.config.trusted_networks;
        let client = client_address(headers, peer, trusted);
        let https = is_trusted(peer, trusted)
            && headers
                .get("x-forwarded-proto")
                .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
        match levers.check(path, headers, client, https, counts) {
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
        if place.is_none() {
            place = Held::take(counts);
            if place.is_none() {
                counts.hold_expired.fetch_add(1, Ordering::Relaxed);
                return Some(paused_response());
            }
        }
        let left = max_pause.saturating_sub(arrived.elapsed());
        let mut paused = shared.paused.subscribe();
        tokio::select! {
            lifted = tokio::time::timeout(left, paused.wait_for(|paused| !*paused)) => {
                if lifted.is_err() {
                    counts.hold_expired.fetch_add(1, Ordering::Relaxed);
                    return Some(paused_response());
                }
            }
            _ = shared.connections_ending.cancelled() => {
                counts.hold_expired.fetch_add(1, Ordering::Relaxed);
                let mut response = paused_response();
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                return Some(response);
            }
        }
    }
}

/// A held request's place, given back however the request ends (also when
/// its client goes away and the request is dropped mid-wait).
struct Held<'a>(&'a LeverCounters);

impl<'a> Held<'a> {
    fn take(counts: &'a LeverCounters) -> Option<Self> {
        if counts.holding.fetch_add(1, Ordering::AcqRel) >= MAX_HELD {
            counts.holding.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        counts.held.fetch_add(1, Ordering::Relaxed);
        Some(Self(counts))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::AcqRel);
    }
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

/// Takes the bypass cookie out of a request on its way to the app: it is
/// the proxy's, and has no business in the app's logs.
pub(in crate::proxy) fn strip_bypass_cookie(headers: &mut HeaderMap) {
    if !headers
        .get_all(COOKIE)
        .iter()
        .any(|v| carries_bypass_cookie(v.as_bytes()))
    {
        return;
    }
    let marker = format!("{BYPASS_COOKIE}=");
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && !pair.starts_with(&marker))
        .map(str::to_string)
        .collect();
    headers.remove(COOKIE);
    if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            headers.insert(COOKIE, value);
        }
    }
}

/// Whether a Cookie header value may carry the bypass cookie.
pub(in crate::proxy) fn carries_bypass_cookie(value: &[u8]) -> bool {
    let marker = BYPASS_COOKIE.as_bytes();
    value
        .windows(marker.len() + 1)
        .any(|w| w[..marker.len()] == *marker && w[marker.len()] == b'=')
}

/// A proxy's incident levers.
#[derive(Clone)]
pub struct LeverHandle {
    pub(in crate::proxy) shared: Arc<Shared>,
    pub(in crate::proxy) local_addr: SocketAddr,
}

impl LeverHandle {
    /// Puts `settings` in force for every request from now on (a lever
    /// left out is lifted; lifting a pause sends the held requests on).
    /// Bad settings change nothing. Callers serialize their sets (the
    /// levers and the pause flag change one after the other).
    pub fn set(&self, settings: LeverSettings) -> Result<(), LeverError> {
        let shared = &self.shared;
        let current = shared.levers.load_full();
        let levers = Levers::compile(settings, &current)?;
        let paused = levers.pause().is_some();
        // Which levers, not their settings: a bypass secret stays out of
        // the log.
        let s = levers.settings();
        tracing::info!(
            service = %shared.config.service,
            maintenance = s.maintenance.is_some(),
            throttle_rps = s.throttle.as_ref().map(|t| t.rps),
            paused,
            "proxy levers set"
        );
        shared.levers.store(Arc::new(levers));
        shared.paused.send_replace(paused);
        Ok(())
    }

    /// The levers in force.
    pub fn settings(&self) -> LeverSettings {
        self.shared.levers.load().settings().clone()
    }

    pub fn counts(&self) -> LeverCounts {
        self.shared.lever_counts.snapshot()
    }

    /// The proxy's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bypass_cookie_does_not_reach_the_app_and_other_cookies_do() {
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            HeaderValue::from_static("a=1; cutover_bypass=s3cret"),
        );
        headers.append(COOKIE, HeaderValue::from_static("b=2"));
        strip_bypass_cookie(&mut headers);
        let all: Vec<_> = headers.get_all(COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2"]);
        let mut only = HeaderMap::new();
        only.insert(COOKIE, HeaderValue::from_static("cutover_bypass=s3cret"));
        strip_bypass_cookie(&mut only);
        assert!(only.get(COOKIE).is_none());
        let mut none = HeaderMap::new();
        none.insert(COOKIE, HeaderValue::from_static("a=1;b=2"));
        strip_bypass_cookie(&mut none);
        assert_eq!(none[COOKIE], "a=1;b=2", "untouched without the cookie");
    }
}
