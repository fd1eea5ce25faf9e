//! The request path of a node proxy: its own readiness answer and the
//! incident levers first, then the route's release: the request forwarded
//! (replayed once on a connection the release closed under it, when that
//! is safe), its response streamed back under the release's in-flight
//! guard, or an upgraded connection tunnelled.

use super::*;

pub(crate) fn text_response(status: StatusCode, text: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(ProxyBody::own(Bytes::from(text)))
        .expect("static response parts are valid")
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    link: Arc<Link>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    if request.uri().path() == shared.config.readiness_path {
        return Ok(readiness(&shared));
    }
    // Levers are rare, and a paused request's wait is a large future:
    // boxed, it does not make every request's future larger to move.
    if !shared.levers.load().is_empty() {
        let answer = levers::answer(&shared, request.uri().path(), request.headers(), peer.ip());
        if let Some(answer) = Box::pin(answer).await {
            return Ok(answer);
        }
    }
    let Some(Picked {
        upstream,
        guard,
        cookie,
    }) = pick(&shared, &mut RequestHeaders::Map(request.headers()), peer)
    else {
        return Ok(no_release(&shared));
    };
    let mut response = forward(&shared, &link, upstream, guard, request, peer).await;
    if let Some(cookie) = cookie {
        response
            .headers_mut()
            .append(http::header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// The release a request goes to, counted in flight there.
pub(super) struct Picked {
    pub(super) upstream: Arc<Upstream>,
    pub(super) guard: InFlight,
    /// The cohort cookie to set on the response, when the client was
    /// assigned one.
    pub(super) cookie: Option<HeaderValue>,
}

/// A request's headers, for routing: a table of one release reads none,
/// so the plain path builds a map of them only for a table that does.
pub(super) enum RequestHeaders<'a> {
    Map(&'a http::HeaderMap),
    Raw(&'a [httparse::Header<'a>], Option<http::HeaderMap>),
}

impl RequestHeaders<'_> {
    fn map(&mut self) -> &http::HeaderMap {
        match self {
            Self::Map(map) => map,
            Self::Raw(raw, built) => built.get_or_insert_with(|| {
                let mut map = http::HeaderMap::with_capacity(raw.len());
                for header in raw.iter() {
                    if let (Ok(name), Ok(value)) = (
                        http::HeaderName::from_bytes(header.name.as_bytes()),
                        HeaderValue::from_bytes(header.value),
                    ) {
                        map.append(name, value);
                    }
                }
                map
            }),
        }
    }
}

/// Picks the release for a request from the routing table in force;
/// `None` when no release serves.
pub(super) fn pick(
    shared: &Shared,
    headers: &mut RequestHeaders<'_>,
    peer: SocketAddr,
) -> Option<Picked> {
    // Count the request in flight first, then confirm its release is still
    // routed to: a switch and a drain that both finished in between would
    // otherwise send it to a release that is being stopped.
    loop {
        let table = shared.routes.load();
        // A table of one release (the common case) costs no hashing.
        let (picked, cookie) = match table.cohorts() {
            None => {
                let no_headers = http::HeaderMap::new();
                let headers = if table.has_rules() {
                    headers.map()
                } else {
                    &no_headers
                };
                (table.pick(headers, |n| rand::random_range(0..n)), None)
            }
            Some((cohorts, serving, side)) => {
                let choice =
                    cohorts.choose(headers.map(), peer.ip(), &shared.config.trusted_networks);
                (
                    Some(if choice.side { side } else { serving }),
                    choice.set_cookie,
                )
            }
        };
        let upstream = picked?.upstream.clone();
        drop(table);
        let guard = InFlight::new(upstream.clone());
        if shared.routes.load().contains(&upstream) {
            return Some(Picked {
                upstream,
                guard,
                cookie,
            });
        }
    }
}

/// The text a request gets when no release serves.
pub(super) fn no_release_text(shared: &Shared) -> String {
    format!(
        "no release of service {} is serving on this node\n",
        shared.config.service
    )
}

fn no_release(shared: &Shared) -> Response<ProxyBody> {
    text_response(StatusCode::BAD_GATEWAY, no_release_text(shared))
}

fn readiness(shared: &Shared) -> Response<ProxyBody> {
    let table = shared.routes.load();
    match (table.is_empty(), shared.admitted.load(Ordering::Acquire)) {
        (false, true) => {
            let releases: Vec<&str> = table
                .routes()
                .iter()
                .map(|r| r.upstream.release())
                .collect();
            text_response(StatusCode::OK, format!("ready: {}\n", releases.join(", ")))
        }
        (false, false) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: this node is out of rotation\n".into(),
        ),
        (true, _) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no release is serving\n".into(),
        ),
    }
}

async fn forward(
    shared: &Shared,
    link: &Link,
    upstream: Arc<Upstream>,
    guard: InFlight,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let addr = guard.backend().addr;
    let upgrade = is_upgrade(request.headers());
    strip_hop_by_hop(request.headers_mut(), upgrade);
    let request_id = add_forwarding(
        request.headers_mut(),
        peer.ip(),
        &shared.config.trusted_networks,
    );
    levers::strip_bypass_cookie(request.headers_mut());
    to_origin_form(&mut request, &guard.backend().host);

    let result = if upgrade {
        // Boxed, as the levers' wait: upgrades are rare.
        Box::pin(tunnel(shared, &upstream, addr, guard, request)).await
    } else {
        link.body_failed.store(false, Ordering::Release);
        let request = request.map(|inner| ClientBody::new(inner, link.body_failed.clone()));
        let config = &shared.config;
        match link
            .send(
                &guard,
                request,
                config.connect_timeout,
                config.request_timeout,
                started,
            )
            .await
        {
            Err(SendError::Timeout) => Err(Failure::Timeout),
            Err(SendError::Connect(error)) => Err(Failure::Unreachable(error)),
            Err(SendError::Failed(error)) if link.body_failed.load(Ordering::Acquire) => {
                Err(Failure::ClientBody(cutover_common::error_chain(&error)))
            }
            Err(SendError::Failed(error)) => {
                Err(Failure::Unreachable(cutover_common::error_chain(&error)))
            }
            Ok(response) => Ok(response.map(|inner| {
                ProxyBody::release(GuardedBody {
                    inner,
                    _guard: guard,
                })
            })),
        }
    };
    let mut response = match result {
        Ok(mut response) => {
            upstream
                .stats
                .record(response.status().as_u16(), started.elapsed());
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                strip_hop_by_hop(response.headers_mut(), false);
            }
            response
        }
        Err(failure) => {
            let (status, text) =
                failure_answer(shared, &upstream, addr, failure, &request_id, started);
            text_response(status, text)
        }
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    response
}

/// The request as the release gets it: its target in origin-form
/// (`/path?query`; hyper writes a target as it is, and a client may have
/// sent absolute-form), and a Host header (an HTTP/1.0 client may have
/// sent none): the process's address then.
fn to_origin_form(request: &mut Request<Incoming>, host: &HeaderValue) {
    let uri = request.uri();
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
    }
    if !request.headers().contains_key(http::header::HOST) {
        request
            .headers_mut()
            .insert(http::header::HOST, host.clone());
    }
}

/// The proxy's own answer when a request could not be forwarded, logged
/// and counted. Clients get a short text with the request id to quote;
/// what went wrong, and where, goes to the log under that id (release ids
/// and upstream addresses are the node's business, not the client's).
pub(super) fn failure_answer(
    shared: &Shared,
    upstream: &Upstream,
    addr: SocketAddr,
    failure: Failure,
    request_id: &HeaderValue,
    started: Instant,
) -> (StatusCode, String) {
    let id = request_id.to_str().unwrap_or("-");
    let (service, release) = (&shared.config.service, &upstream.release);
    let (status, text) = match failure {
        Failure::ClientBody(error) => {
            // The client's fault: counted as its 4xx, never as a failure of
            // the release.
            tracing::info!(%service, %release, request_id = %id, %error, "request body from the client is malformed or cut short");
            upstream.stats.record(400, started.elapsed());
            return (
                StatusCode::BAD_REQUEST,
                format!("bad request: the request body is malformed (request id {id})\n"),
            );
        }
        Failure::Timeout => {
            let timeout = humantime::format_duration(shared.config.request_timeout);
            tracing::warn!(%service, %release, upstream = %addr, request_id = %id, %timeout, "release did not answer in time");
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!("gateway timeout (request id {id})\n"),
            )
        }
        Failure::Unreachable(error) => {
            tracing::warn!(%service, %release, upstream = %addr, request_id = %id, %error, "release failed the request");
            (
                StatusCode::BAD_GATEWAY,
                format!("bad gateway (request id {id})\n"),
            )
        }
    };
    upstream
        .stats
        .record_upstream_failure(status.as_u16(), started.elapsed());
    (status, text)
}

pub(super) enum Failure {
    Timeout,
    Unreachable(String),
    /// Reading the client's request body failed.
    ClientBody(String),
}

/// Forwards an upgrade request on a connection of its own and, once the
/// release agrees (101), splices the two upgraded streams together. The
/// tunnel counts as in flight until either side closes it or the release's
/// drain deadline cuts it.
async fn tunnel(
    shared: &Shared,
    upstream: &Arc<Upstream>,
    addr: SocketAddr,
    guard: InFlight,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Failure> {
    let client_upgrade = hyper::upgrade::on(&mut request);
    let timeout = shared.config.request_timeout;
    let connect = async {
        let tcp = tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Failure::Unreachable("connect timed out".into()))?
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        tokio::spawn(connection.with_upgrades());
        sender
            .send_request(request)
            .await
            .map_err(|e| Failure::Unreachable(cutover_common::error_chain(&e)))
    };
    let mut response = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| Failure::Timeout)??;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(response.map(|inner| {
            ProxyBody::release(GuardedBody {
                inner,
                _guard: guard,
            })
        }));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let cut = upstream.cut.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let (Ok(client), Ok(release)) = tokio::join!(client_upgrade, upstream_upgrade) else {
            return;
        };
        let mut client = TokioIo::new(client);
        let mut release = TokioIo::new(release);
        tokio::select! {
            _ = cut.cancelled() => {}
            _ = tokio::io::copy_bidirectional(&mut client, &mut release) => {}
        }
    });
    Ok(response.map(|_| ProxyBody::empty()))
}
