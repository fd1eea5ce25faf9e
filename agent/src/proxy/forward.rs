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
        .body(
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    if request.uri().path() == shared.config.readiness_path {
        return Ok(readiness(&shared));
    }
    if let Some(answer) =
        levers::answer(&shared, request.uri().path(), request.headers(), peer.ip()).await
    {
        return Ok(answer);
    }
    // Count the request in flight first, then confirm its release is still
    // routed to: a switch and a drain that both finished in between would
    // otherwise send it to a release that is being stopped.
    let (upstream, guard, cookie) = loop {
        let table = shared.routes.load();
        // A table of one release (the common case) costs no hashing.
        let (picked, cookie) = match table.cohorts() {
            None => (
                table.pick(request.headers(), |n| rand::random_range(0..n)),
                None,
            ),
            Some((cohorts, serving, side)) => {
                let choice = cohorts.choose(
                    request.headers(),
                    peer.ip(),
                    &shared.config.trusted_networks,
                );
                (
                    Some(if choice.side { side } else { serving }),
                    choice.set_cookie,
                )
            }
        };
        let picked = picked.map(|route| route.upstream.clone());
        drop(table);
        let Some(upstream) = picked else {
            return Ok(text_response(
                StatusCode::BAD_GATEWAY,
                format!(
                    "no release of service {} is serving on this node\n",
                    shared.config.service
                ),
            ));
        };
        let guard = InFlight::new(upstream.clone());
        if shared.routes.load().contains(&upstream) {
            break (upstream, guard, cookie);
        }
    };
    let mut response = forward(&shared, upstream, guard, request, peer).await;
    if let Some(cookie) = cookie {
        response
            .headers_mut()
            .append(http::header::SET_COOKIE, cookie);
    }
    Ok(response)
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
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(guard.backend().authority.clone())
        .path_and_query(path)
        .build()
        .expect("scheme, authority and path form a uri");

    let result = if upgrade {
        tunnel(shared, &upstream, addr, guard, request).await
    } else {
        let body_failed = Arc::new(AtomicBool::new(false));
        let request = request.map(|inner| ClientBody {
            inner,
            failed: body_failed.clone(),
        });
        match tokio::time::timeout(shared.config.request_timeout, send(shared, request)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(error)) if body_failed.load(Ordering::Acquire) => {
                Err(Failure::ClientBody(cutover_common::error_chain(&error)))
            }
            Ok(Err(error)) => Err(Failure::Unreachable(cutover_common::error_chain(&error))),
            Ok(Ok(response)) => Ok(response.map(|inner| {
                GuardedBody {
                    inner,
                    _guard: guard,
                }
                .boxed()
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
        Err(failure) => failure_response(shared, &upstream, addr, failure, &request_id, started),
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    response
}

/// The proxy's own answer when a request could not be forwarded. Clients
/// get a short text with the request id to quote; what went wrong, and
/// where, goes to the log under that id (release ids and upstream
/// addresses are the node's business, not the client's).
fn failure_response(
    shared: &Shared,
    upstream: &Upstream,
    addr: SocketAddr,
    failure: Failure,
    request_id: &HeaderValue,
    started: Instant,
) -> Response<ProxyBody> {
    let id = request_id.to_str().unwrap_or("-");
    let (service, release) = (&shared.config.service, &upstream.release);
    let (status, text) = match failure {
        Failure::ClientBody(error) => {
            // The client's fault: counted as its 4xx, never as a failure of
            // the release.
            tracing::info!(%service, %release, request_id = %id, %error, "request body from the client is malformed or cut short");
            upstream.stats.record(400, started.elapsed());
            return text_response(
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
    text_response(status, text)
}

/// Sends a request on a pooled upstream connection. A bodiless GET, HEAD
/// or OPTIONS that fails on a reused connection (the release closed it as
/// idle just as the request went out, as servers with short keep-alive
/// timeouts do) is sent once more on a fresh one: it cannot have had an
/// effect, and the client must not see that race as a 502.
async fn send(
    shared: &Shared,
    request: Request<ClientBody>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let replayable = matches!(
        *request.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    ) && request.body().is_end_stream();
    if !replayable {
        return shared.client.request(request.map(BodyExt::boxed)).await;
    }
    let mut again = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version())
        .body(empty_body())
        .expect("parts of a valid request");
    *again.headers_mut() = request.headers().clone();
    match shared.client.request(request.map(BodyExt::boxed)).await {
        Err(error) if !error.is_connect() => {
            tracing::debug!(error = %cutover_common::error_chain(&error), "upstream connection failed, retrying once");
            shared.client.request(again).await
        }
        result => result,
    }
}

fn empty_body() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

enum Failure {
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
            GuardedBody {
                inner,
                _guard: guard,
            }
            .boxed()
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
    Ok(response.map(|_| empty_body()))
}
