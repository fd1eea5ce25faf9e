//! The accept loop of a node proxy: connections in, served by `handle`,
//! and at its end drained (at once, or after a handoff's linger).

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::plain::{End, Plain};
use super::{handle, Link, ProxyBody, Shared};

/// What starts and ends an accept loop and its connections.
pub(super) struct Gates {
    pub(super) accepting: CancellationToken,
    pub(super) shutdown: CancellationToken,
    pub(super) connections: CancellationToken,
}

/// Accepts on `listener` (this runtime's registration of `socket`, kept
/// alive with it so the agent can pass it on) until the shutdown.
pub(super) async fn accept_loop(
    listener: TcpListener,
    socket: Arc<std::net::TcpListener>,
    shared: Arc<Shared>,
    gates: Gates,
) {
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
        connections.spawn(serve(tcp, peer, shared.clone(), stop_connections.clone()));
    }
    // The port is free for a successor at once (unless another agent's
    // copy holds it); open connections drain, at once unless handing off.
    drop(listener);
    drop(socket);
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

/// Serves one client connection: on the plain path while its requests
/// allow, then under hyper.
async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut plain = Plain::new(tcp, peer, shared.clone(), shutdown.clone());
    let end = plain.run().await;
    let (tcp, read) = plain.into_client();
    if let End::Handover = end {
        let client = Rewind {
            read: read.freeze(),
            tcp,
        };
        serve_hyper(client, peer, shared, shutdown).await;
    }
}

/// Serves a client connection under hyper, and drives its upstream
/// connections (`Link`) in the same task: each wake-up polls them, then
/// the client connection (whose requests may start or use one), then them
/// again so a request just handed over is written at once.
async fn serve_hyper(
    client: Rewind,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let link = Arc::new(Link::new());
    let service = {
        let (shared, link) = (shared.clone(), link.clone());
        service_fn(move |request| {
            closing_if_handing_off(shared.clone(), link.clone(), request, peer)
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(client), service)
        .with_upgrades();
    let mut connection = pin!(connection);
    let mut served = false;
    let drive = |cx: &mut Context<'_>, connection: Pin<&mut _>| {
        link.drive(cx);
        let polled = Future::poll(connection, cx);
        link.drive(cx);
        polled.map(|_| ())
    };
    tokio::select! {
        _ = poll_fn(|cx| drive(cx, connection.as_mut())) => served = true,
        _ = shutdown.cancelled() => {}
    }
    if !served {
        connection.as_mut().graceful_shutdown();
        poll_fn(|cx| drive(cx, connection.as_mut())).await;
    }
    link.close(&shared.routes.load());
}

/// `handle`, with `Connection: close` on every answer while the proxy hands
/// off (not on a protocol switch, whose connection becomes the tunnel).
async fn closing_if_handing_off(
    shared: Arc<Shared>,
    link: Arc<Link>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut response = handle(shared.clone(), link, request, peer).await?;
    if shared.closing.load(Ordering::Acquire)
        && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// A client connection whose first bytes were read already (by the plain
/// path): they are read again first.
struct Rewind {
    read: Bytes,
    tcp: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.tcp).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
