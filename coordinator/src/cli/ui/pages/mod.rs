//! The dashboard's pages: each renders its main part from the feed's view
//! (and the calls only it needs); the same function serves a page load and
//! its live stream, so both always show the same thing.

mod fleet;
mod nodes;
mod recovery;
mod releases;
mod rollouts;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::feed::Snapshot;
use super::Ui;

pub use releases::ReleasesQuery;

/// A page, as its address names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    Fleet,
    Node(String),
    Rollouts,
    Rollout(String),
    Releases(ReleasesQuery),
    Recovery,
}

impl Page {
    /// The page at `address` (a path and query), if there is one.
    pub fn parse(address: &str) -> Option<Page> {
        let (path, query) = address.split_once('?').unwrap_or((address, ""));
        let segment = |s: &str| (!s.is_empty() && !s.contains('/')).then(|| decode(s));
        match path {
            "/" => Some(Page::Fleet),
            "/rollouts" => Some(Page::Rollouts),
            "/releases" => Some(Page::Releases(ReleasesQuery::parse(query))),
            "/recovery" => Some(Page::Recovery),
            _ => {
                if let Some(name) = path.strip_prefix("/nodes/") {
                    return segment(name).map(Page::Node);
                }
                path.strip_prefix("/rollouts/")
                    .and_then(segment)
                    .map(Page::Rollout)
            }
        }
    }

    /// Its address, what its live stream is asked for.
    fn address(&self) -> String {
        match self {
            Page::Fleet => "/".into(),
            Page::Node(name) => format!("/nodes/{}", encode(name)),
            Page::Rollouts => "/rollouts".into(),
            Page::Rollout(id) => format!("/rollouts/{}", encode(id)),
            Page::Releases(q) => q.address(),
            Page::Recovery => "/recovery".into(),
        }
    }

    fn title(&self) -> String {
        match self {
            Page::Fleet => "Fleet".into(),
            Page::Node(name) => format!("Node {name}"),
            Page::Rollouts => "Rollouts".into(),
            Page::Rollout(id) => format!("Rollout {id}"),
            Page::Releases(q) => q.title(),
            Page::Recovery => "Recovery and queues".into(),
        }
    }

    /// The navigation entry it belongs to.
    fn section(&self) -> &'static str {
        match self {
            Page::Fleet | Page::Node(_) => "/",
            Page::Rollouts | Page::Rollout(_) => "/rollouts",
            Page::Releases(_) => "/releases",
            Page::Recovery => "/recovery",
        }
    }
}

/// Why a page cannot be shown: said on the page, with its HTTP status.
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub message: String,
}

impl PageError {
    pub fn not_found(message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message,
        }
    }

    /// A coordinator's refusal or failure, in its words.
    pub fn from_status(status: tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self {
            status: code,
            message: super::super::client::explain(status).to_string(),
        }
    }
}

/// The main part of `page`, or what stops it, in the page's words.
pub async fn render_main(ui: &Ui, page: &Page, snapshot: &Snapshot) -> Markup {
    main_of(snapshot, render(ui, page, snapshot).await).0
}

async fn render(ui: &Ui, page: &Page, snapshot: &Snapshot) -> Result<Markup, PageError> {
    match page {
        Page::Fleet => Ok(fleet::render(ui, snapshot)),
        Page::Node(name) => nodes::render(snapshot, name),
        Page::Rollouts => Ok(rollouts::list(snapshot)),
        Page::Rollout(id) => rollouts::render(ui, snapshot, id).await,
        Page::Releases(q) => releases::render(ui, snapshot, q).await,
        Page::Recovery => recovery::render(ui, snapshot).await,
    }
}

/// What a page shows, and its status: an unknown node or rollout answers
/// 404, not a page that says so with 200.
fn main_of(snapshot: &Snapshot, rendered: Result<Markup, PageError>) -> (Markup, StatusCode) {
    let (body, status) = match rendered {
        Ok(body) => (body, StatusCode::OK),
        Err(e) => (error_box(&e), e.status),
    };
    let main = html! {
        @if let Some(error) = &snapshot.error {
            p.banner.stale { "The coordinator does not answer (" (error) "); this is the last view it gave." }
        }
        (body)
    };
    (main, status)
}

fn error_box(e: &PageError) -> Markup {
    html! {
        section.error-page data-status=(e.status.as_u16()) {
            h1 { (e.status.canonical_reason().unwrap_or("Error")) }
            p { (e.message) }
            p { a href="./" { "Back to the fleet" } }
        }
    }
}

/// A whole page: the frame around its main part.
async fn page(ui: &Ui, page: Page) -> Response {
    let snapshot = ui.feed.current().await;
    let (main, status) = main_of(&snapshot, render(ui, &page, &snapshot).await);
    (status, Html(frame(ui, &page, main).into_string())).into_response()
}

fn frame(ui: &Ui, page: &Page, main: Markup) -> Markup {
    let nav = [
        ("/", "Fleet"),
        ("/rollouts", "Rollouts"),
        ("/releases", "Releases"),
        ("/recovery", "Recovery"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (page.title()) " · cutover" }
                base href=(format!("{}/", ui.guard.base()));
                link rel="stylesheet" href=(rel(&assets::CSS.href()));
                script src=(rel(&assets::JS.href())) defer {}
            }
            body {
                header.top {
                    a.brand href="./" { "cutover" }
                    nav {
                        @for (href, label) in nav {
                            a href=(rel(href)) class=[(page.section() == href).then_some("here")] { (label) }
                        }
                    }
                    span.who title=(ui.coordinator) {
                        (ui.me.name) " · " (super::role_text(&ui.me))
                    }
                    span.live id="live" title="Live: the page changes as the fleet does" { "live" }
                }
                main id="main" data-live=(format!("live?page={}", encode(&page.address()))) {
                    (main)
                }
                dialog id="confirm" {
                    form method="dialog" {
                        p.question {}
                        menu {
                            button value="cancel" { "Cancel" }
                            button.danger id="confirm-ok" value="ok" { "Confirm" }
                        }
                    }
                }
            }
        }
    }
}

/// A page with only a title and a sentence, for refusals made before any
/// page is rendered.
pub fn plain_page(title: &str, text: &str) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head { meta charset="utf-8"; title { (title) " · cutover" } }
                body { h1 { (title) } p { (text) } }
            }
        }
        .into_string(),
    )
}

pub fn not_found_page(address: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        plain_page(
            "Not found",
            &format!("There is no page at {address}: the pages are under the address `cutover ui` printed."),
        ),
    )
        .into_response()
}

pub async fn fleet(State(ui): State<Arc<Ui>>) -> Response {
    page(&ui, Page::Fleet).await
}

pub async fn node(State(ui): State<Arc<Ui>>, Path(name): Path<String>) -> Response {
    page(&ui, Page::Node(name)).await
}

pub async fn rollouts(State(ui): State<Arc<Ui>>) -> Response {
    page(&ui, Page::Rollouts).await
}

pub async fn rollout(State(ui): State<Arc<Ui>>, Path(id): Path<String>) -> Response {
    page(&ui, Page::Rollout(id)).await
}

pub async fn releases(State(ui): State<Arc<Ui>>, uri: Uri) -> Response {
    page(
        &ui,
        Page::Releases(ReleasesQuery::parse(uri.query().unwrap_or_default())),
    )
    .await
}

pub async fn recovery(State(ui): State<Arc<Ui>>) -> Response {
    page(&ui, Page::Recovery).await
}

pub async fn not_found(uri: Uri) -> Response {
    not_found_page(uri.path())
}

/// A swatch and the release's version (or id).
pub fn release_label(snapshot: &Snapshot, release_id: &str) -> Markup {
    if release_id.is_empty() {
        return html! { span.muted { "none" } };
    }
    let version = snapshot.version_of(release_id).unwrap_or(release_id);
    html! {
        span.release title=(release_id) {
            i.swatch style=(format!("--hue:{}", snapshot.colors.hue(release_id))) {}
            (version)
        }
    }
}

/// "2026-12-06 07:01:02 UTC".
pub fn when(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    super::super::nodes::rfc3339(ms)
        .replace('T', " ")
        .replace('Z', " UTC")
}

pub fn state_badge(text: &str) -> Markup {
    let class = match text {
        "succeeded" | "ready" | "met" | "switched" | "healthy" | "successful" | "passed" => "ok",
        "failed" | "rolled_back" | "unreachable" | "breached" | "revoked" | "refused"
        | "unhealthy" | "down" => "bad",
        "running" | "rolling_back" | "activating" | "preparing" | "weighting" | "staging"
        | "stopping" => "busy",
        "paused" | "held" | "awaiting_approval" | "awaiting_promotion" | "at_risk"
        | "inconclusive" | "drained" => "wait",
        _ => "plain",
    };
    html! { span class=(format!("badge {class}")) { (text.replace('_', " ")) } }
}

/// `address` (from the dashboard's root, "/rollouts/ID") relative to the
/// page's `<base>`, which is the dashboard's root under its secret prefix.
pub fn rel(address: &str) -> String {
    match address.trim_start_matches('/') {
        "" => "./".to_string(),
        rest => rest.to_string(),
    }
}

/// Percent-decoding of one path segment or query value.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encoding of anything but unreserved characters.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_their_pages_and_nothing_else() {
        assert_eq!(Page::parse("/"), Some(Page::Fleet));
        assert_eq!(
            Page::parse("/rollouts/r-1"),
            Some(Page::Rollout("r-1".into()))
        );
        assert_eq!(
            Page::parse("/nodes/node%201"),
            Some(Page::Node("node 1".into()))
        );
        assert_eq!(Page::parse("/rollouts/"), None);
        assert_eq!(Page::parse("/rollouts/a/b"), None);
        assert_eq!(Page::parse("/etc/passwd"), None);
        for page in [
            Page::Fleet,
            Page::Node("node 1".into()),
            Page::Rollout("r<1>".into()),
            Page::Releases(ReleasesQuery::parse("env=production&service=web")),
            Page::Recovery,
        ] {
            assert_eq!(Page::parse(&page.address()), Some(page.clone()), "{page:?}");
        }
        assert_eq!(decode("a%2Fb%zz+c%"), "a/b%zz c%");
    }
}
