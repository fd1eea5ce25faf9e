//! A release the proxy forwards to, and the guards that count what is in
//! flight to it so a drain knows when it is done.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::stats::ReleaseStats;

/// A release the proxy can forward to.
pub struct Upstream {
    pub(super) release: String,
    pub(super) addr: SocketAddr,
    /// `addr` as a URI authority, built once instead of per request.
    pub(super) authority: Authority,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Fired at the drain deadline: closes the tunnels still open.
    pub(super) cut: CancellationToken,
    pub(super) stats: Arc<ReleaseStats>,
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Every request finished before the deadline.
    pub completed: bool,
    /// Requests and tunnels still open at the deadline, now cut.
    pub cut: usize,
    pub waited: Duration,
}

impl Upstream {
    pub(super) fn new(release: &str, addr: SocketAddr, stats: Arc<ReleaseStats>) -> Self {
        Self {
            release: release.to_string(),
            addr,
            authority: Authority::try_from(addr.to_string())
                .expect("a socket address is an authority"),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: CancellationToken::new(),
            stats,
        }
    }

    pub fn release(&self) -> &str {
        &self.release
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight to this release, at most `timeout`;
    /// then closes whatever is still open. Call after switching away from it.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a guard dropping in between
            // cannot be missed.
            idle.as_mut().enable();
            if self.in_flight() == 0 {
                return DrainReport {
                    completed: true,
                    cut: 0,
                    waited: started.elapsed(),
                };
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                let cut = self.in_flight();
                self.cut.cancel();
                return DrainReport {
                    completed: cut == 0,
                    cut,
                    waited: started.elapsed(),
                };
            }
        }
    }
}

/// Held by every request (and upgraded tunnel) to a release until it is done.
pub(super) struct InFlight(Arc<Upstream>);

impl InFlight {
    pub(super) fn new(upstream: Arc<Upstream>) -> Self {
        upstream.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(upstream)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A response body that keeps its request counted in flight until the last
/// byte went out, so a drain waits for streamed responses too.
pub(super) struct GuardedBody {
    pub(super) inner: Incoming,
    pub(super) _guard: InFlight,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
