//! A release the proxy forwards to, and the guards that count what is in
//! flight to it so a drain knows when it is done.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::spares::Spares;
use super::stats::ReleaseStats;

/// A release the proxy can forward to: its processes (one unless the
/// release is scaled), each taking the next request while it has the
/// fewest in flight.
pub struct Upstream {
    pub(super) release: String,
    backends: Vec<Backend>,
    /// Where the next pick starts looking, so equally loaded processes
    /// take turns instead of the first taking every request of a lull.
    next: AtomicUsize,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Fired at the drain deadline: closes the tunnels still open.
    pub(super) cut: CancellationToken,
    pub(super) stats: Arc<ReleaseStats>,
}

/// One process of a release, as a route names it: where it listens, and
/// whether it may take new requests (its owner lowers the flag while the
/// process is down or fails its health check; none: always).
#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub up: Option<Arc<AtomicBool>>,
}

impl BackendSpec {
    /// A process that always takes requests.
    pub fn at(addr: SocketAddr) -> Self {
        Self { addr, up: None }
    }
}

/// One process of an upstream.
pub(super) struct Backend {
    pub(super) addr: SocketAddr,
    /// `addr` as a Host header, for requests that came without one,
    /// built once instead of per request.
    pub(super) host: HeaderValue,
    up: Option<Arc<AtomicBool>>,
    in_flight: AtomicUsize,
    /// Its idle connections no client connection holds.
    pub(super) spares: Spares,
}

impl Backend {
    fn is_up(&self) -> bool {
        self.up.as_ref().is_none_or(|up| up.load(Ordering::Relaxed))
    }
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
    pub(super) fn new(release: &str, backends: &[BackendSpec], stats: Arc<ReleaseStats>) -> Self {
        Self {
            release: release.to_string(),
            backends: backends
                .iter()
                .map(|b| Backend {
                    addr: b.addr,
                    host: HeaderValue::try_from(b.addr.to_string())
                        .expect("a socket address is a header value"),
                    up: b.up.clone(),
                    in_flight: AtomicUsize::new(0),
                    spares: Spares::default(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: CancellationToken::new(),
            stats,
        }
    }

    pub fn release(&self) -> &str {
        &self.release
    }

    /// Where its processes listen.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.backends.iter().map(|b| b.addr)
    }

    /// Whether it forwards to exactly `backends` (the same addresses, the
    /// same flags), so a new route to them can keep it.
    pub(super) fn serves(&self, backends: &[BackendSpec]) -> bool {
        self.backends.len() == backends.len()
            && self.backends.iter().zip(backends).all(|(have, want)| {
                let same_flag = match (&have.up, &want.up) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                have.addr == want.addr && same_flag
            })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The process the next request goes to: of those up, the one with the
    /// fewest requests in flight, taking turns among equals; when none is
    /// up, the same among all (a failed request is no worse than a 502
    /// the proxy makes itself, and the flags may lag).
    pub(super) fn pick(&self) -> usize {
        let count = self.backends.len();
        if count == 1 {
            return 0;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let least = |only_up: bool| {
            (0..count)
                .map(|i| (start + i) % count)
                .filter(|&i| !only_up || self.backends[i].is_up())
                .min_by_key(|&i| self.backends[i].in_flight.load(Ordering::Relaxed))
        };
        least(true).or_else(|| least(false)).unwrap_or(0)
    }

    pub(super) fn backend(&self, index: usize) -> &Backend {
        &self.backends[index]
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

/// Held by every request (and upgraded tunnel) to a release until it is
/// done: counted for the release (its drain) and for the process it went
/// to (the next pick).
pub(super) struct InFlight {
    upstream: Arc<Upstream>,
    backend: usize,
}

impl InFlight {
    /// A request to `upstream`, sent to the process its pick chose.
    pub(super) fn new(upstream: Arc<Upstream>) -> Self {
        let backend = upstream.pick();
        upstream.in_flight.fetch_add(1, Ordering::SeqCst);
        upstream.backends[backend]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Self { upstream, backend }
    }

    /// The process the request goes to.
    pub(super) fn backend(&self) -> &Backend {
        self.upstream.backend(self.backend)
    }

    /// Its index among the release's processes.
    pub(super) fn index(&self) -> usize {
        self.backend
    }

    /// The release the request goes to.
    pub(super) fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.backends[self.backend]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if self.upstream.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.upstream.idle.notify_waiters();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(ups: &[bool]) -> (Arc<Upstream>, Vec<Arc<AtomicBool>>) {
        let flags: Vec<_> = ups
            .iter()
            .map(|up| Arc::new(AtomicBool::new(*up)))
            .collect();
        let backends: Vec<_> = flags
            .iter()
            .enumerate()
            .map(|(i, up)| BackendSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                up: Some(up.clone()),
            })
            .collect();
        let upstream = Upstream::new("web-v1", &backends, Arc::default());
        (Arc::new(upstream), flags)
    }

    fn picks(upstream: &Arc<Upstream>, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| InFlight::new(upstream.clone()).backend().addr.port() - 9000)
            .collect()
    }

    #[test]
    fn idle_processes_take_turns() {
        let (upstream, _) = upstream(&[true, true, true]);
        let mut seen = picks(&upstream, 6);
        seen.sort_unstable();
        assert_eq!(seen, [0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn the_process_with_the_fewest_requests_in_flight_takes_the_next() {
        let (upstream, _) = upstream(&[true, true, true]);
        // Three requests held open: one on each process.
        let mut held: Vec<_> = (0..3).map(|_| InFlight::new(upstream.clone())).collect();
        let busy = held[0].backend().addr.port() - 9000;
        drop(held.split_off(1));
        // The two others are idle again: they take the next two.
        let next = picks(&upstream, 1)[0];
        assert_ne!(next, busy);
        let guards: Vec<_> = (0..2).map(|_| InFlight::new(upstream.clone())).collect();
        assert!(guards
            .iter()
            .all(|g| g.backend().addr.port() - 9000 != busy));
        assert_eq!(upstream.in_flight(), 3);
    }

    #[test]
    fn a_process_down_gets_nothing_until_it_is_up_again() {
        let (upstream, flags) = upstream(&[true, false, true]);
        assert!(!picks(&upstream, 10).contains(&1));
        flags[1].store(true, Ordering::Relaxed);
        assert!(picks(&upstream, 10).contains(&1));
    }

    #[test]
    fn with_every_process_down_requests_still_go_somewhere() {
        let (upstream, _) = upstream(&[false, false]);
        let mut seen = picks(&upstream, 4);
        seen.sort_unstable();
        assert_eq!(seen, [0, 0, 1, 1]);
    }
}
