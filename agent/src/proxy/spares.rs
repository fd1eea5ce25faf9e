//! Idle upstream connections of one release process that no client
//! connection holds: a client connection that ends leaves its idle ones
//! here, and a new client connection takes one before connecting, so
//! clients that open a connection per request do not cost an upstream
//! connect each. Last in, first out: the newest is the least likely to
//! have been closed by the release's keep-alive timeout.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ClientBody;

/// An upstream connection: the side that sends requests, and the
/// connection itself, which whoever holds it must poll for it to make
/// progress.
pub(super) struct Conn {
    pub(super) sender: SendRequest<ClientBody>,
    pub(super) connection: Connection<TokioIo<TcpStream>, ClientBody>,
    /// When a request last went out on it.
    pub(super) last_sent: Instant,
}

/// Spare connections kept per process, at most: as many as the old
/// shared pool of the proxy kept idle per host, which no shop's burst of
/// new client connections outgrew.
const MAX_SPARES: usize = 256;

/// A spare idle longer than this is closed rather than used: nobody polls
/// it, so a close by the release is only seen on use, and servers'
/// keep-alive timeouts are shorter (nginx 75 s, Node.js 5 s).
const MAX_SPARE_IDLE: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct Spares {
    stack: Mutex<Vec<Conn>>,
}

impl Spares {
    /// Keeps `conn` for the next client connection, unless enough are kept.
    pub(super) fn put(&self, conn: Conn) {
        let mut stack = self.stack.lock().expect("spares lock");
        if stack.len() < MAX_SPARES {
            stack.push(conn);
        }
    }

    /// The most recently kept spare that is fresh enough; stale ones met
    /// on the way are closed.
    pub(super) fn take(&self, now: Instant) -> Option<Conn> {
        let mut stack = self.stack.lock().expect("spares lock");
        while let Some(conn) = stack.pop() {
            if now.saturating_duration_since(conn.last_sent) < MAX_SPARE_IDLE {
                return Some(conn);
            }
        }
        None
    }
}
