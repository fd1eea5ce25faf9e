//! The plain path of a client connection: HTTP/1.1 requests passed through
//! as they came, but for the headers the proxy owns. Each head is parsed
//! in place (httparse, no header map) and written on with hop-by-hop
//! headers left out and the forwarding headers and request id set; bodies
//! go through as they are, framed by their Content-Length or chunked
//! coding (or, for a response, by the release closing the connection).
//! Most requests cost two reads and two writes and no allocation.
//!
//! What this path does not take (an upgrade, HTTP/1.0, a chunked,
//! expecting or large request body, a request for the proxy itself, any
//! request while an incident lever is set, a head it cannot parse), it leaves
//! unread: the connection goes on under hyper (`accept`) from that
//! request.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::chunked::Malformed;
use super::forward::{failure_answer, no_release_text, pick, Failure, Picked, RequestHeaders};
use super::headers::{is_trusted, list_items, put_forwarded_for, request_id_from};
use super::heads::{
    parse_response, put_date, put_header, put_status_line, Framing, Parsed, Reply, RequestFacts,
    ResponseHead, MAX_HEADERS,
};
use super::link::{MAX_ATTEMPTS, MAX_OPEN};
use super::spares::{self, Conn};
use super::upstream::{InFlight, Upstream};
use super::Shared;

/// Heads larger than this are left to hyper, which refuses them (431).
const MAX_HEAD: usize = 64 << 10;

/// Room made in a buffer before each read.
const READ_SIZE: usize = 8 << 10;

/// Response bytes gathered at most before they are written to the client.
const WRITE_SIZE: usize = 64 << 10;

/// Request bodies larger than this are left to hyper. This path sends a
/// body whole before it reads the response, which a release that answers
/// while it reads (streaming the upload back) could block on; hyper moves
/// both at once.
const MAX_BODY: u64 = 64 << 10;

/// How the plain path ended.
pub(super) enum End {
    /// Done: either side closed, the proxy shut down, or a message could
    /// not be completed.
    Closed,
    /// A request this path does not take is at the start of `buf`.
    Handover,
}

/// What comes of reading a whole request head.
enum Step {
    Handover,
    /// A request no release takes; its head is `head_len` bytes.
    NoRelease {
        head_len: usize,
        body: u64,
        close: bool,
        head: bool,
    },
    Forward(Request),
}

struct Request {
    head_len: usize,
    body: u64,
    /// A bodiless GET, HEAD or OPTIONS: sent once more if a reused
    /// connection fails under it (it cannot have had an effect).
    replayable: bool,
    /// A HEAD request: its response has no body whatever it says.
    head: bool,
    /// The client asked to close after this exchange.
    close: bool,
    picked: Picked,
    request_id: HeaderValue,
    started: Instant,
}

/// An upstream connection this client connection holds (idle between
/// its requests).
struct Held {
    upstream: Arc<Upstream>,
    backend: usize,
    tcp: TcpStream,
    last_sent: Instant,
    /// A request is on it: if that request is given up (its deadline),
    /// the connection is closed, not used again.
    busy: bool,
}

pub(super) struct Plain {
    shared: Arc<Shared>,
    peer: SocketAddr,
    client: TcpStream,
    /// Bytes from the client not forwarded yet.
    buf: BytesMut,
    /// Bytes from the release not forwarded yet.
    ubuf: BytesMut,
    /// The head (and body bytes) to write next: kept until a response
    /// comes, for a request sent again.
    out: Vec<u8>,
    held: Vec<Held>,
    /// An informational response head is being written to the client:
    /// if the exchange fails before that is done, the connection can
    /// only close.
    informational_torn: bool,
    /// The deadline in force: for the next request head, or for a
    /// response head. One timer per connection, moved per phase (out of
    /// its place while a request is sent under it).
    deadline: Option<Pin<Box<Sleep>>>,
    shutdown: CancellationToken,
    ending: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Plain {
    pub(super) fn new(
        client: TcpStream,
        peer: SocketAddr,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> Self {
        let deadline = Box::pin(tokio::time::sleep(shared.config.header_timeout));
        Self {
            shared,
            peer,
            client,
            buf: BytesMut::new(),
            ubuf: BytesMut::new(),
            out: Vec::new(),
            held: Vec::new(),
            informational_torn: false,
            deadline: Some(deadline),
            ending: Box::pin(shutdown.clone().cancelled_owned()),
            shutdown,
        }
    }

    /// The client connection and what was read of it but not handled.
    pub(super) fn into_client(mut self) -> (TcpStream, BytesMut) {
        self.leave_held();
        (self.client, self.buf)
    }

    /// Serves requests until the connection ends or one is to be left to
    /// hyper.
    pub(super) async fn run(&mut self) -> End {
        loop {
            let keep_open = match self.next_request().await {
                None => return End::Closed,
                Some(Step::Handover) => return End::Handover,
                Some(Step::NoRelease {
                    head_len,
                    body,
                    close,
                    head,
                }) => {
                    self.buf.advance(head_len);
                    let buffered = body <= self.buf.len() as u64;
                    if buffered {
                        self.buf.advance(body as usize);
                    }
                    let text = no_release_text(&self.shared);
                    let reply = Reply {
                        head,
                        request_id: None,
                        cookie: None,
                        close: close || !buffered,
                    };
                    self.answer(StatusCode::BAD_GATEWAY, &text, &reply).await
                }
                Some(Step::Forward(request)) => self.exchange(request).await,
            };
            if !keep_open {
                return End::Closed;
            }
        }
    }

    /// Reads until a whole request head is in `buf`, within the header
    /// timeout; `None` when the connection is to end.
    async fn next_request(&mut self) -> Option<Step> {
        let mut waiting = false;
        loop {
            // A shutdown waits for the request in flight, not for the
            // next one already sent.
            if self.shutdown.is_cancelled() {
                return None;
            }
            if let Some(step) = self.prepare() {
                return Some(step);
            }
            if self.buf.len() >= MAX_HEAD {
                return Some(Step::Handover);
            }
            if !waiting {
                waiting = true;
                let at = tokio::time::Instant::now() + self.shared.config.header_timeout;
                self.deadline().reset(at);
            }
            self.buf.reserve(READ_SIZE);
            let Self {
                client,
                buf,
                deadline: Some(deadline),
                ending,
                ..
            } = self
            else {
                unreachable!("the deadline is in place between requests");
            };
            let read = tokio::select! {
                biased;
                read = client.read_buf(buf) => read,
                _ = ending.as_mut() => return None,
                _ = deadline.as_mut() => return None,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return None;
            }
        }
    }

    /// Parses the request head at the start of `buf` (`None` while it is
    /// not whole); for one this path takes, picks its release and writes
    /// the head it goes on with to `out`.
    fn prepare(&mut self) -> Option<Step> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(Step::Handover),
        };
        let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
        else {
            return Some(Step::Handover);
        };
        let path = target.split('?').next().unwrap_or(target);
        if !target.starts_with('/')
            || path == self.shared.config.readiness_path
            || !self.shared.levers.load().is_empty()
        {
            return Some(Step::Handover);
        }
        let trusted = is_trusted(self.peer.ip(), &self.shared.config.trusted_networks);
        let mut facts = RequestFacts::default();
        for header in request.headers.iter() {
            if !facts.read(header, trusted) {
                return Some(Step::Handover);
            }
        }
        let close = facts.close;
        let body = facts.length.unwrap_or(0);
        if body > MAX_BODY {
            return Some(Step::Handover);
        }
        let replayable = matches!(method, "GET" | "HEAD" | "OPTIONS") && body == 0;
        let started = Instant::now();
        let mut route_by = RequestHeaders::Raw(&*request.headers, None);
        let Some(picked) = pick(&self.shared, &mut route_by, self.peer) else {
            return Some(Step::NoRelease {
                head_len,
                body,
                close,
                head: method == "HEAD",
            });
        };
        let request_id = request_id_from(facts.request_id);
        let out = &mut self.out;
        out.clear();
        for part in [method, " ", target, " HTTP/1.1\r\n"] {
            out.extend_from_slice(part.as_bytes());
        }
        for header in request.headers.iter() {
            if facts.passes(header.name, trusted) {
                put_header(out, header.name.as_bytes(), header.value);
            }
        }
        if facts.host.is_none() {
            put_header(out, b"host", picked.guard.backend().host.as_bytes());
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        let hops = request
            .headers
            .iter()
            .filter(|h| trusted && h.name.eq_ignore_ascii_case("x-forwarded-for"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(list_items);
        put_forwarded_for(out, hops, self.peer.ip());
        out.extend_from_slice(b"\r\n");
        if !(trusted && facts.forwarded_proto) {
            put_header(out, b"x-forwarded-proto", b"http");
        }
        if let (false, Some(host)) = (trusted && facts.forwarded_host, facts.host) {
            put_header(out, b"x-forwarded-host", host);
        }
        put_header(out, b"x-request-id", request_id.as_bytes());
        out.extend_from_slice(b"\r\n");
        Some(Step::Forward(Request {
            head_len,
            body,
            replayable,
            head: method == "HEAD",
            close,
            picked,
            request_id,
            started,
        }))
    }

    /// Forwards one request and passes its response back; whether the
    /// client connection stays open.
    async fn exchange(&mut self, request: Request) -> bool {
        let Request {
            head_len,
            body,
            replayable,
            head,
            close,
            picked:
                Picked {
                    upstream,
                    guard,
                    cookie,
                },
            request_id,
            started,
        } = request;
        self.buf.advance(head_len);
        let buffered = body.min(self.buf.len() as u64) as usize;
        self.out.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        let mut body_left = body - buffered as u64;
        let at = tokio::time::Instant::from_std(started + self.shared.config.request_timeout);
        self.deadline().reset(at);
        let mut reply = Reply {
            head,
            request_id: Some(&request_id),
            cookie: cookie.as_ref(),
            close: close || self.closing(),
        };
        let mut deadline = self.deadline.take().expect("the deadline is in place");
        let sent = {
            let sending = pin!(self.send(&guard, replayable, &mut body_left, &reply));
            until(deadline.as_mut(), sending).await
        };
        self.deadline = Some(deadline);
        if sent.is_err() {
            self.held.retain(|held| !held.busy);
            // A response head cut off by the deadline is not the next
            // one's start.
            self.ubuf.clear();
        }
        let (index, response) = match sent.and_then(|sent| sent) {
            Ok(sent) => sent,
            Err(failure) => {
                let addr = guard.backend().addr;
                let (status, text) =
                    failure_answer(&self.shared, &upstream, addr, failure, &request_id, started);
                drop(guard);
                // An informational head cut off mid-write leaves nothing a
                // client could read an answer after.
                if self.informational_torn {
                    return false;
                }
                reply.close |= body_left > 0 || status == StatusCode::BAD_REQUEST;
                return self.answer(status, &text, &reply).await;
            }
        };
        upstream.stats.record(response.status, started.elapsed());
        let close = response.close;
        let passed = self.pass_body(index, response.framing).await;
        drop(guard);
        if passed.is_ok() && response.reusable && self.ubuf.is_empty() {
            let held = &mut self.held[index];
            held.last_sent = started;
            held.busy = false;
        } else {
            self.held.swap_remove(index);
        }
        self.ubuf.clear();
        passed.is_ok() && !close
    }

    fn deadline(&mut self) -> Pin<&mut Sleep> {
        self.deadline
            .as_mut()
            .expect("the deadline is in place between requests")
            .as_mut()
    }

    /// Whether responses from now on close their connection: the proxy
    /// hands off to another agent, or shuts down.
    fn closing(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire) || self.shutdown.is_cancelled()
    }

    /// Sends the request in `out` (the rest of its body, `body_left`
    /// bytes, still to come from the client) and reads the response head;
    /// returns the connection it came on. On a connection the release
    /// closed under it, a request is sent again on a new one when nothing
    /// of it went out, or when it is replayable.
    async fn send(
        &mut self,
        guard: &InFlight,
        replayable: bool,
        body_left: &mut u64,
        reply: &Reply<'_>,
    ) -> Result<(usize, ResponseHead), Failure> {
        let mut fresh_only = false;
        let mut last_error = String::new();
        for _ in 0..MAX_ATTEMPTS {
            let taken = if fresh_only { None } else { self.take(guard) };
            let (index, reused) = match taken {
                Some(index) => (index, true),
                None => {
                    let addr = guard.backend().addr;
                    let connect_timeout = self.shared.config.connect_timeout;
                    let tcp = spares::connect(addr, connect_timeout)
                        .await
                        .map_err(Failure::Unreachable)?;
                    (self.hold(guard, tcp, Instant::now()), false)
                }
            };
            fresh_only = true;
            self.held[index].busy = true;
            let tcp = &mut self.held[index].tcp;
            let mut written = 0;
            let mut failed = None;
            while written < self.out.len() {
                match tcp.write(&self.out[written..]).await {
                    Ok(0) => failed = Some("the connection was closed".to_string()),
                    Ok(n) => written += n,
                    Err(error) => failed = Some(error.to_string()),
                }
                if failed.is_some() {
                    break;
                }
            }
            if let Some(error) = failed {
                self.held.swap_remove(index);
                if reused && (written == 0 || replayable) {
                    last_error = error;
                    continue;
                }
                return Err(Failure::Unreachable(error));
            }
            if *body_left > 0 {
                if let Err(failure) = self.pass_request_body(index, body_left).await {
                    self.held.swap_remove(index);
                    return Err(failure);
                }
            }
            match self.read_response_head(index, reply).await {
                Ok(head) => return Ok((index, head)),
                Err(HeadError { error, received }) => {
                    self.held.swap_remove(index);
                    self.ubuf.clear();
                    if reused && replayable && !received {
                        tracing::debug!(release = %guard.upstream().release, %error, "upstream connection failed under an idempotent request, sending it again");
                        last_error = error;
                        continue;
                    }
                    return Err(Failure::Unreachable(error));
                }
            }
        }
        Err(Failure::Unreachable(last_error))
    }

    /// An idle connection to the process `guard` picked: one this client
    /// connection holds, else a spare.
    fn take(&mut self, guard: &InFlight) -> Option<usize> {
        let same = |held: &Held| {
            Arc::ptr_eq(&held.upstream, guard.upstream()) && held.backend == guard.index()
        };
        while let Some(index) = self.held.iter().position(same) {
            if spares::still_open(&self.held[index].tcp) {
                return Some(index);
            }
            self.held.swap_remove(index);
        }
        let spare = guard.backend().spares.take(Instant::now())?;
        Some(self.hold(guard, spare.tcp, spare.last_sent))
    }

    /// Holds `tcp` to the process `guard` picked (when enough are held,
    /// the least recently used goes to its process's spares); its index.
    fn hold(&mut self, guard: &InFlight, tcp: TcpStream, last_sent: Instant) -> usize {
        if self.held.len() >= MAX_OPEN {
            let oldest = (0..self.held.len())
                .min_by_key(|&i| self.held[i].last_sent)
                .expect("held connections");
            let evicted = self.held.swap_remove(oldest);
            if self.shared.routes.load().contains(&evicted.upstream) {
                leave(evicted, Instant::now());
            }
        }
        self.held.push(Held {
            upstream: guard.upstream().clone(),
            backend: guard.index(),
            tcp,
            last_sent,
            busy: false,
        });
        self.held.len() - 1
    }

    /// The rest of the client's request body, from the client to the
    /// release.
    async fn pass_request_body(&mut self, index: usize, left: &mut u64) -> Result<(), Failure> {
        let tcp = &mut self.held[index].tcp;
        while *left > 0 {
            self.buf.reserve(READ_SIZE);
            match self.client.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(Failure::ClientBody(
                        "the client closed the connection before the end of its body".into(),
                    ))
                }
                Err(error) => return Err(Failure::ClientBody(error.to_string())),
                Ok(_) => {}
            }
            let take = (*left).min(self.buf.len() as u64) as usize;
            tcp.write_all(&self.buf[..take])
                .await
                .map_err(|e| Failure::Unreachable(e.to_string()))?;
            self.buf.advance(take);
            *left -= take as u64;
        }
        Ok(())
    }

    /// Reads the release's response head (passing informational ones
    /// on) and writes the head the client gets to `out`.
    async fn read_response_head(
        &mut self,
        index: usize,
        reply: &Reply<'_>,
    ) -> Result<ResponseHead, HeadError> {
        let mut received = false;
        loop {
            // A handoff or shutdown that began while the request was out
            // closes the connection after this response.
            let reply = Reply {
                close: reply.close || self.closing(),
                ..*reply
            };
            match parse_response(&self.ubuf, &reply, &mut self.out) {
                Ok(Parsed::Final(head_len, head)) => {
                    self.ubuf.advance(head_len);
                    return Ok(head);
                }
                Ok(Parsed::Informational(head_len)) => {
                    let informational = self.ubuf.split_to(head_len);
                    // The client may be gone; the final response tells.
                    self.informational_torn = true;
                    if self.client.write_all(&informational).await.is_ok() {
                        self.informational_torn = false;
                    }
                    continue;
                }
                Ok(Parsed::Partial) if self.ubuf.len() < MAX_HEAD => {}
                Ok(Parsed::Partial) => {
                    return Err(HeadError::received("the response head is too large"))
                }
                Err(error) => return Err(HeadError::received(error)),
            }
            self.ubuf.reserve(READ_SIZE);
            match self.held[index].tcp.read_buf(&mut self.ubuf).await {
                Ok(0) => {
                    return Err(HeadError {
                        error: "the connection was closed before a response".into(),
                        received,
                    })
                }
                Ok(_) => received = true,
                Err(error) => {
                    return Err(HeadError {
                        error: error.to_string(),
                        received,
                    })
                }
            }
        }
    }

    /// Passes the response body after its head (in `out`) to the client.
    /// An error when either side failed before its end.
    async fn pass_body(&mut self, index: usize, mut framing: Framing) -> Result<(), ()> {
        loop {
            let (take, done) = match &mut framing {
                Framing::None => (0, true),
                Framing::Length(left) => {
                    let take = (*left).min(self.ubuf.len() as u64);
                    *left -= take;
                    (take as usize, *left == 0)
                }
                Framing::Chunked(chunked) => match chunked.scan(&self.ubuf) {
                    Ok(Some(end)) => (end, true),
                    Ok(None) => (self.ubuf.len(), false),
                    // What was valid goes out (the head at least, as hyper
                    // would have sent it); the connection closes.
                    Err(Malformed) => {
                        tracing::debug!("release sent a malformed chunked body");
                        let _ = self.client.write_all(&self.out).await;
                        return Err(());
                    }
                },
                Framing::Close => (self.ubuf.len(), false),
            };
            self.out.extend_from_slice(&self.ubuf[..take]);
            self.ubuf.advance(take);
            if done {
                break;
            }
            // Streamed: what came is written before waiting for more.
            if !self.out.is_empty() {
                self.client.write_all(&self.out).await.map_err(|_| ())?;
                self.out.clear();
            }
            self.ubuf.reserve(READ_SIZE.max(WRITE_SIZE / 4));
            match self.held[index].tcp.read_buf(&mut self.ubuf).await {
                Ok(0) if matches!(framing, Framing::Close) => break,
                Ok(0) | Err(_) => {
                    tracing::debug!(
                        "release closed the connection in the middle of a response body"
                    );
                    return Err(());
                }
                Ok(_) => {}
            }
        }
        let written = self.client.write_all(&self.out).await;
        self.out.clear();
        written.map_err(|_| ())
    }

    /// Answers the client itself; whether its connection stays open.
    async fn answer(&mut self, status: StatusCode, text: &str, reply: &Reply<'_>) -> bool {
        let keep_open = !reply.close && !self.closing();
        let out = &mut self.out;
        out.clear();
        put_status_line(
            out,
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
        );
        put_header(out, b"content-type", b"text/plain; charset=utf-8");
        put_header(out, b"cache-control", b"no-store");
        put_date(out);
        put_header(out, b"content-length", text.len().to_string().as_bytes());
        if let Some(id) = reply.request_id {
            put_header(out, b"x-request-id", id.as_bytes());
        }
        if let Some(cookie) = reply.cookie {
            put_header(out, b"set-cookie", cookie.as_bytes());
        }
        if !keep_open {
            put_header(out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        // A HEAD request gets the head alone, its length that of the body
        // a GET would get.
        if !reply.head {
            out.extend_from_slice(text.as_bytes());
        }
        let written = self.client.write_all(&self.out).await;
        self.out.clear();
        written.is_ok() && keep_open
    }

    /// Leaves the held connections to their processes' spares, for
    /// releases still routed to.
    fn leave_held(&mut self) {
        let routes = self.shared.routes.load();
        let now = Instant::now();
        for held in self.held.drain(..) {
            if routes.contains(&held.upstream) {
                leave(held, now);
            }
        }
    }
}

fn leave(held: Held, now: Instant) {
    let conn = Conn {
        tcp: held.tcp,
        last_sent: held.last_sent,
    };
    held.upstream.backend(held.backend).spares.put(conn, now);
}

/// `future`, or a timeout at `deadline`.
async fn until<F: Future>(
    mut deadline: Pin<&mut Sleep>,
    mut future: Pin<&mut F>,
) -> Result<F::Output, Failure> {
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Failure::Timeout)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

struct HeadError {
    error: String,
    /// Some of a response had come: the request reached the release.
    received: bool,
}

impl HeadError {
    fn received(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            received: true,
        }
    }
}
