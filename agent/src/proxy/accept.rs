//! The accept loop of a node proxy: connections in, served by `handle`,
//! and at its end drained (at once, or after a handoff's linger).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{handle, ProxyBody, Shared};

/// What starts and ends an accept loop and its connections.
pub(super) struct Gates {
    pub(super) accepting: CancellationToken,
    pub(super) shutdown: CancellationToken,
    pub(super) connections: CancellationToken,
}

pub(super) async fn accept_loop(listener: Arc<TcpListener>, shared: Arc<Shared>, gates: Gates) {
    let Gates {
        accepting,
        shutdown,
        connections: stop_connections,
    } = gates;
    let grace = shared.config.shutdown_grace;
    let mut connections = tokio::task::JoinSet::new();
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = accepting.cancelled() => {}
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Reap finished connections so the set stays as large as what is open.
        while connections.try_join_next().is_some() {}
        let _ = tcp.set_nodelay(true);
        let header_timeout = shared.config.header_timeout;
        let shared = shared.clone();
        let shutdown = stop_connections.clone();
        connections.spawn(async move {
            let service =
                service_fn(move |request| closing_if_handing_off(shared.clone(), request, peer));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    // The port is free for a successor at once (unless another agent's
    // copy holds it); open connections drain, at once unless handing off.
    drop(listener);
    if !shared.closing.load(Ordering::Acquire) {
        stop_connections.cancel();
    }
    // Bounded: a client that keeps a connection busy cannot hold shutdown.
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(service = %shared.config.service, open = connections.len(), "proxy connections still open after the shutdown grace, closing them");
        connections.abort_all();
    }
}

/// `handle`, with `Connection: close` on every answer while the proxy hands
/// off (not on a protocol switch, whose connection becomes the tunnel).
async fn closing_if_handing_off(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut response = handle(shared.clone(), request, peer).await?;
    if shared.closing.load(Ordering::Acquire)
        && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}
