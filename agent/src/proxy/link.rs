//! The upstream connections of one client connection. Its requests go out
//! on them and they are driven by the client connection's own task
//! (`drive`): no pool checkout, no channel to another task, no task per
//! request. HTTP/1 carries one request at a time, so a client connection
//! needs one upstream connection per release process it sends to; when it
//! ends, its idle ones are left to the process's spares (`spares`).
//!
//! A switch stays atomic: each request picks its release from the routing
//! table in force, and a connection to a release the table no longer
//! routes to is only used by the request that was already on it.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::body::ClientBody;
use super::routes::RouteTable;
use super::spares::Conn;
use super::upstream::{InFlight, Upstream};

/// Upstream connections a client connection keeps open at most: one per
/// process of a scaled release, and those of the release it used before a
/// switch until they close. Beyond it the least recently used one not in
/// use goes to its process's spares.
pub(super) const MAX_OPEN: usize = 4;

/// Sends of one request at most: each on another connection.
pub(super) const MAX_ATTEMPTS: usize = 3;

pub(super) enum SendError {
    /// No response head before the request timeout.
    Timeout,
    /// No connection to the release.
    Connect(String),
    /// The exchange failed (the release's doing, or the client body's:
    /// see `body_failed`).
    Failed(hyper::Error),
}

pub(super) struct Link {
    state: Mutex<State>,
    /// Raised when reading this client's request body fails (`ClientBody`);
    /// lowered for each request.
    pub(super) body_failed: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    open: Vec<Open>,
    next_id: u64,
    /// Its request's deadline for the response head: one timer per client
    /// connection, moved forward per request (moving a registered tokio
    /// timer later is a compare-and-swap, not a new registration).
    deadline: Option<Pin<Box<Sleep>>>,
}

struct Open {
    id: u64,
    upstream: Arc<Upstream>,
    backend: usize,
    /// None while a request holds it, and after a failure (then the
    /// connection ends once hyper sees no sender left).
    sender: Option<SendRequest<ClientBody>>,
    connection: Connection<TokioIo<TcpStream>, ClientBody>,
    last_sent: Instant,
}

impl Open {
    fn idle(&self) -> bool {
        self.sender
            .as_ref()
            .is_some_and(|sender| sender.is_ready() && !sender.is_closed())
    }

    /// Leaves the connection to its process's spares when it is idle; else
    /// it closes.
    fn leave(self, now: Instant) {
        if !self.idle() {
            return;
        }
        let parts = self.connection.into_parts();
        // Bytes the release sent after its last response: nothing to
        // build on.
        if parts.read_buf.is_empty() {
            let conn = Conn {
                tcp: parts.io.into_inner(),
                last_sent: self.last_sent,
            };
            self.upstream.backend(self.backend).spares.put(conn, now);
        }
    }
}

/// A connection a request got: its sender, and whether it is new.
struct Taken {
    id: u64,
    sender: SendRequest<ClientBody>,
    /// A request went out on it before: it may have been closed since.
    reused: bool,
}

impl Link {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::default(),
            body_failed: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("link lock")
    }

    /// Polls every upstream connection (they read and write only when
    /// polled, all within the client connection's task); those that ended
    /// are dropped.
    pub(super) fn drive(&self, cx: &mut Context<'_>) {
        self.lock().open.retain_mut(|open| {
            match Pin::new(&mut open.connection).poll(cx) {
                Poll::Pending => true,
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(error)) => {
                    tracing::debug!(release = %open.upstream.release, %error, "upstream connection ended");
                    false
                }
            }
        })
    }

    /// Sends `request` to the process `guard` picked and waits for the
    /// response head, at most `timeout` from `started`.
    pub(super) async fn send(
        &self,
        guard: &InFlight,
        mut request: Request<ClientBody>,
        connect_timeout: Duration,
        timeout: Duration,
        started: Instant,
    ) -> Result<Response<Incoming>, SendError> {
        self.set_deadline(started + timeout);
        // A bodiless GET, HEAD or OPTIONS that fails after going out on a
        // reused connection may have crossed the release closing it (its
        // keep-alive timeout, a worker recycled after so many requests):
        // it is sent once more, from a copy made before sending, as it
        // cannot have had an effect. A request hyper hands back unsent
        // (the close was seen first) goes again whatever it is.
        let replayable = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        ) && http_body::Body::is_end_stream(request.body());
        let mut copied = false;
        // After a failed send, the next goes on a new connection: the
        // spares may all have been closed by a release that restarted.
        let mut fresh_only = false;
        let mut last_error = None;
        for _ in 0..MAX_ATTEMPTS {
            let spare = || guard.backend().spares.take(started);
            let taken = match (!fresh_only).then(|| self.take(guard)).flatten() {
                Some(taken) => taken,
                // Boxed: connecting, and even setting a spare up, is rare
                // on kept connections, and its future would make every
                // request's larger to move.
                None => {
                    let conn = (!fresh_only).then(spare).flatten();
                    self.until_deadline(Box::pin(self.connect(guard, conn, connect_timeout)))
                        .await??
                }
            };
            let Taken {
                id,
                mut sender,
                reused,
            } = taken;
            // A reused connection that is not ready yet is still finishing
            // its previous exchange (or closing): wait for it or drop it.
            if reused
                && !sender.is_ready()
                && (sender.is_closed() || self.until_deadline(sender.ready()).await?.is_err())
            {
                self.discard(id);
                fresh_only = true;
                continue;
            }
            let copy = (replayable && !copied && reused).then(|| self.copy_of(&request));
            let sending = sender.try_send_request(request);
            self.mark_sent(id, started);
            // On failure the sender is dropped: the connection is not used
            // again and ends.
            let mut error = match self.until_deadline(sending).await? {
                Ok(response) => {
                    self.put_back(id, sender);
                    return Ok(response);
                }
                Err(error) => error,
            };
            fresh_only = true;
            request = match (error.take_message(), copy) {
                (Some(unsent), _) => unsent,
                (None, Some(copy)) => {
                    tracing::debug!(release = %guard.upstream().release, error = %cutover_common::error_chain(error.error()), "upstream connection failed under an idempotent request, sending it again");
                    copied = true;
                    copy
                }
                (None, None) => return Err(SendError::Failed(error.into_error())),
            };
            last_error = Some(error.into_error());
        }
        Err(last_error.map_or_else(
            || SendError::Connect("no upstream connection became ready".into()),
            SendError::Failed,
        ))
    }

    /// A bodiless request like `request`, to send again.
    fn copy_of(&self, request: &Request<ClientBody>) -> Request<ClientBody> {
        let mut again = Request::new(ClientBody::empty(self.body_failed.clone()));
        *again.method_mut() = request.method().clone();
        *again.uri_mut() = request.uri().clone();
        *again.version_mut() = request.version();
        *again.headers_mut() = request.headers().clone();
        again
    }

    /// An idle connection of this client connection to the process.
    fn take(&self, guard: &InFlight) -> Option<Taken> {
        let mut state = self.lock();
        let found = state.open.iter_mut().find(|open| {
            Arc::ptr_eq(&open.upstream, guard.upstream())
                && open.backend == guard.index()
                && open
                    .sender
                    .as_ref()
                    .is_some_and(|sender| !sender.is_closed())
        });
        let open = found?;
        let sender = open.sender.take().expect("found with a sender");
        Some(Taken {
            id: open.id,
            sender,
            reused: true,
        })
    }

    /// A connection to the process: `spare` when given, else a new one.
    async fn connect(
        &self,
        guard: &InFlight,
        spare: Option<Conn>,
        connect_timeout: Duration,
    ) -> Result<Taken, SendError> {
        let reused = spare.is_some();
        let (tcp, last_sent) = match spare {
            Some(Conn { tcp, last_sent }) => (tcp, last_sent),
            None => (
                super::spares::connect(guard.backend().addr, connect_timeout)
                    .await
                    .map_err(SendError::Connect)?,
                Instant::now(),
            ),
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(SendError::Failed)?;
        let id = self.lock().insert(guard, connection, last_sent);
        Ok(Taken { id, sender, reused })
    }

    fn mark_sent(&self, id: u64, at: Instant) {
        if let Some(open) = self.lock().open.iter_mut().find(|o| o.id == id) {
            open.last_sent = at;
        }
    }

    fn put_back(&self, id: u64, sender: SendRequest<ClientBody>) {
        if let Some(open) = self.lock().open.iter_mut().find(|o| o.id == id) {
            open.sender = Some(sender);
        }
    }

    fn discard(&self, id: u64) {
        self.lock().open.retain(|o| o.id != id);
    }

    fn set_deadline(&self, at: Instant) {
        let at = tokio::time::Instant::from_std(at);
        let mut state = self.lock();
        match state.deadline.as_mut() {
            Some(sleep) => sleep.as_mut().reset(at),
            None => state.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// `future`, or a timeout at the request's deadline.
    async fn until_deadline<F: Future>(&self, future: F) -> Result<F::Output, SendError> {
        let mut future = pin!(future);
        poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            let mut state = self.lock();
            match state
                .deadline
                .as_mut()
                .map(|deadline| deadline.as_mut().poll(cx))
            {
                Some(Poll::Ready(())) => Poll::Ready(Err(SendError::Timeout)),
                _ => Poll::Pending,
            }
        })
        .await
    }

    /// The client connection ended: its idle connections to releases
    /// still routed to become their processes' spares; the rest close.
    pub(super) fn close(&self, routes: &RouteTable) {
        let open = std::mem::take(&mut self.lock().open);
        let now = Instant::now();
        for open in open {
            if routes.contains(&open.upstream) {
                open.leave(now);
            }
        }
    }
}

impl State {
    /// Adds `connection` to the open ones (when there are enough, the least
    /// recently used one not in use goes to its process's spares: a
    /// release scaled beyond `MAX_OPEN` processes does not cost a connect
    /// per request); returns its id. Its sender stays with the caller
    /// until its request is sent.
    fn insert(
        &mut self,
        guard: &InFlight,
        connection: Connection<TokioIo<TcpStream>, ClientBody>,
        last_sent: Instant,
    ) -> u64 {
        let now = Instant::now();
        if self.open.len() >= MAX_OPEN {
            let oldest = self
                .open
                .iter()
                .enumerate()
                .filter(|(_, open)| open.sender.is_some())
                .min_by_key(|(_, open)| open.last_sent)
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                self.open.swap_remove(i).leave(now);
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        self.open.push(Open {
            id,
            upstream: guard.upstream().clone(),
            backend: guard.index(),
            sender: None,
            connection,
            last_sent,
        });
        id
    }
}
