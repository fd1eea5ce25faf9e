//! Who may use the dashboard: requests that carry the session cookie set by
//! the address `cutover ui` printed (a token only the operator has), and
//! name this server as their Host (no DNS rebinding) and, when a browser
//! says where a request comes from, as their Origin (no cross-site
//! request). A change must say its Origin.
//!
//! Browsers send a host's cookies to every port of it, so a page another
//! local user serves on 127.0.0.1 could collect the cookie if the operator
//! opened it. The dashboard therefore lives under a random path prefix, and
//! its cookie is sent only there: a server that does not know the prefix
//! never gets it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::pages::plain_page;
use super::Ui;

pub struct Guard {
    /// Host header values this server answers to: its address, and
    /// `localhost` on loopback.
    hosts: Vec<String>,
    token: String,
    /// Per port: browsers share cookies between ports of one host.
    cookie: String,
    /// "/u/<random>": where every page is, and the cookie's path.
    prefix: String,
    local: SocketAddr,
}

/// Why a request is turned away.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Host,
    Origin,
    NoSession,
}

impl Guard {
    pub fn new(local: SocketAddr) -> Self {
        let mut names = vec![local.ip().to_string()];
        if let std::net::IpAddr::V6(ip) = local.ip() {
            names = vec![format!("[{ip}]")];
        }
        if local.ip().is_loopback() {
            names.push("localhost".into());
        }
        let mut hosts: Vec<String> = names
            .iter()
            .map(|name| format!("{name}:{}", local.port()))
            .collect();
        // Browsers leave the default port out of Host and Origin.
        if local.port() == 80 {
            hosts.extend(names);
        }
        let random = |bytes: usize| -> String {
            (0..bytes)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect()
        };
        Self {
            hosts,
            token: random(32),
            cookie: format!("cutover_ui_{}", local.port()),
            prefix: format!("/u/{}", random(12)),
            local,
        }
    }

    /// Where the pages are: "/u/<random>".
    pub fn base(&self) -> &str {
        &self.prefix
    }

    /// The address to open: it carries the token, which the first visit
    /// trades for a cookie.
    pub fn entry_url(&self) -> String {
        format!("http://{}{}/?token={}", self.local, self.prefix, self.token)
    }

    /// The session cookie `Set-Cookie` sets for a valid token.
    fn session_cookie(&self) -> String {
        format!(
            "{}={}; Path={}/; HttpOnly; SameSite=Strict",
            self.cookie, self.token, self.prefix
        )
    }

    fn is_token(&self, given: &str) -> bool {
        // Compared as digests: the time taken says nothing of the token.
        Sha256::digest(given.as_bytes()) == Sha256::digest(self.token.as_bytes())
    }

    fn query_token<'a>(&self, query: &'a str) -> Option<&'a str> {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
    }

    fn has_session(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .any(|(name, value)| name == self.cookie && self.is_token(value))
    }

    /// The Host and Origin checks, which hold whatever the session.
    fn check_origin(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(Refusal::Host);
        }
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let changes = !matches!(*method, Method::GET | Method::HEAD);
        match origin {
            Some(origin) if !origin.eq_ignore_ascii_case(&format!("http://{host}")) => {
                return Err(Refusal::Origin)
            }
            None if changes => return Err(Refusal::Origin),
            _ => {}
        }
        // What the browser itself says of where the request comes from.
        let site = headers
            .get("sec-fetch-site")
            .and_then(|s| s.to_str().ok())
            .unwrap_or("same-origin");
        if changes && site != "same-origin" {
            return Err(Refusal::Origin);
        }
        Ok(())
    }
}

/// The middleware in front of every route.
pub async fn check(State(ui): State<Arc<Ui>>, request: Request, next: Next) -> Response {
    let guard = &ui.guard;
    let refused = |refusal: Refusal| {
        let (status, text) = match refusal {
            Refusal::Host => (
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "This dashboard answers only as {}: open it at the address `cutover ui` printed.",
                    guard.hosts.join(" or ")
                ),
            ),
            Refusal::Origin => (
                StatusCode::FORBIDDEN,
                "This request comes from another site; the dashboard takes changes only from its own pages.".to_string(),
            ),
            Refusal::NoSession => (
                StatusCode::UNAUTHORIZED,
                "No dashboard session: open the address `cutover ui` printed (it carries a token), or start `cutover ui` again.".to_string(),
            ),
        };
        (status, plain_page("Refused", &text)).into_response()
    };
    if let Err(refusal) = guard.check_origin(request.method(), request.headers()) {
        return refused(refusal);
    }
    let query = request.uri().query().unwrap_or_default();
    // The root without its slash: the cookie's path needs it.
    if request.uri().path() == guard.prefix {
        let to = match query {
            "" => format!("{}/", guard.prefix),
            query => format!("{}/?{query}", guard.prefix),
        };
        return (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    }
    if let Some(token) = guard.query_token(query) {
        if !guard.is_token(token) {
            return refused(Refusal::NoSession);
        }
        // Traded for a cookie, and gone from the address bar and history.
        let rest: Vec<&str> = query
            .split('&')
            .filter(|p| !p.starts_with("token="))
            .collect();
        // Never `//host/...`: the redirect stays on this server.
        let path = format!("/{}", request.uri().path().trim_start_matches(['/', '\\']));
        let to = match rest.is_empty() {
            true => path.to_string(),
            false => format!("{path}?{}", rest.join("&")),
        };
        return (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, to),
                (header::SET_COOKIE, guard.session_cookie()),
            ],
        )
            .into_response();
    }
    if !guard.has_session(request.headers()) {
        return refused(Refusal::NoSession);
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // Nothing here is framed by or shared with another site.
    for (name, value) in [
        (
            "content-security-policy",
            // Inline style attributes carry each release's hue and the bars'
            // widths; scripts come only from this server.
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'self'",
        ),
        ("x-frame-options", "DENY"),
        // Not `no-referrer`: under it a browser sends `Origin: null` with a
        // form's POST, which the Origin check must refuse.
        ("referrer-policy", "same-origin"),
        ("x-content-type-options", "nosniff"),
    ] {
        headers.insert(name, value.parse().expect("a header value"));
    }
    // Pages are never kept: each shows the fleet as it is. (The assets
    // say otherwise for themselves.)
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn only_its_own_host_and_origin_pass() {
        let guard = Guard::new("127.0.0.1:7480".parse().unwrap());
        let get = Method::GET;
        let post = Method::POST;
        let ok = |m: &Method, h: &[(&str, &str)]| guard.check_origin(m, &headers(h));
        assert_eq!(ok(&get, &[("host", "127.0.0.1:7480")]), Ok(()));
        assert_eq!(ok(&get, &[("host", "localhost:7480")]), Ok(()));
        // DNS rebinding: the attacker's name resolves to loopback.
        assert_eq!(
            ok(&get, &[("host", "evil.example:7480")]),
            Err(Refusal::Host)
        );
        assert_eq!(ok(&get, &[("host", "127.0.0.1:7481")]), Err(Refusal::Host));
        assert_eq!(ok(&get, &[]), Err(Refusal::Host));
        // A change names its origin, and it is this server.
        let same = [
            ("host", "127.0.0.1:7480"),
            ("origin", "http://127.0.0.1:7480"),
        ];
        assert_eq!(ok(&post, &same), Ok(()));
        assert_eq!(
            ok(&post, &[("host", "127.0.0.1:7480")]),
            Err(Refusal::Origin)
        );
        let cross = [
            ("host", "127.0.0.1:7480"),
            ("origin", "http://evil.example"),
        ];
        assert_eq!(ok(&post, &cross), Err(Refusal::Origin));
        assert_eq!(ok(&get, &cross), Err(Refusal::Origin));
        let mut forged = same.to_vec();
        forged.push(("sec-fetch-site", "cross-site"));
        assert_eq!(ok(&post, &forged), Err(Refusal::Origin));
    }

    #[test]
    fn the_session_is_the_token_and_nothing_else() {
        let guard = Guard::new("127.0.0.1:7480".parse().unwrap());
        let cookie = |v: &str| headers(&[("cookie", v)]);
        let token = guard.token.clone();
        assert!(guard.has_session(&cookie(&format!("a=b; cutover_ui_7480={token}"))));
        assert!(!guard.has_session(&cookie(&format!("cutover_ui_7481={token}"))));
        assert!(!guard.has_session(&cookie("cutover_ui_7480=0000")));
        assert!(!guard.has_session(&HeaderMap::new()));
        assert!(guard
            .entry_url()
            .ends_with(&format!("{}/?token={token}", guard.base())));
        assert!(guard
            .session_cookie()
            .contains(&format!("Path={}/;", guard.base())));
        assert_eq!(
            guard.query_token(&format!("x=1&token={token}")),
            Some(token.as_str())
        );
        assert!(guard.is_token(&token) && !guard.is_token(""));
    }
}
