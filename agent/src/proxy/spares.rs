//! Idle upstream connections of one release process that no client
//! connection holds: a client connection that ends leaves its idle ones
//! here, and a new client connection takes one before connecting, so
//! clients that open a connection per request do not cost an upstream
//! connect each. Last in, first out: the newest is the least likely to
//! have been closed by the release's keep-alive timeout.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::workers;

/// An idle upstream connection, between two exchanges: either path of a
/// client connection (plain or hyper's) can take it.
pub(super) struct Conn {
    pub(super) tcp: TcpStream,
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

/// Per proxy runtime (`workers`): a connection is registered with the
/// reactor of the runtime that opened it, which alone sees its events
/// (a close by the release among them) and wakes whoever polls it. Taken
/// on another runtime, a close may not be seen before a request goes out
/// on it, and every event would cross threads. In each stack the newest
/// is at the back: taken from there.
pub(super) struct Spares {
    stacks: Box<[Mutex<VecDeque<Conn>>]>,
}

impl Default for Spares {
    fn default() -> Self {
        Self {
            stacks: (0..workers::handles().len())
                .map(|_| Mutex::default())
                .collect(),
        }
    }
}

impl Spares {
    fn stack(&self) -> MutexGuard<'_, VecDeque<Conn>> {
        let index = workers::current().min(self.stacks.len() - 1);
        self.stacks[index].lock().expect("spares lock")
    }

    /// Keeps `conn` for the next client connection on this runtime,
    /// unless it is too old to be used or enough are kept. Those kept too
    /// long are closed on the way: a release that closed them as idle
    /// would otherwise wait on their sockets until a switch drops them.
    pub(super) fn put(&self, conn: Conn, now: Instant) {
        let mut stack = self.stack();
        stack.retain(|kept| !stale(kept, now));
        if !stale(&conn, now) && stack.len() < MAX_SPARES {
            stack.push_back(conn);
        }
    }

    /// The most recently kept spare of this runtime that is fresh enough;
    /// stale ones met on the way are closed.
    pub(super) fn take(&self, now: Instant) -> Option<Conn> {
        let mut stack = self.stack();
        while let Some(conn) = stack.pop_back() {
            if !stale(&conn, now) && still_open(&conn.tcp) {
                return Some(conn);
            }
        }
        None
    }
}

/// Whether an idle upstream connection may still be used: the release has
/// not closed it (nor sent anything unasked). Costs no system call unless
/// the reactor saw it readable.
pub(super) fn still_open(tcp: &TcpStream) -> bool {
    matches!(tcp.try_read(&mut [0; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A new connection to a release process, within `timeout`.
pub(super) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

fn stale(conn: &Conn, now: Instant) -> bool {
    now.saturating_duration_since(conn.last_sent) >= MAX_SPARE_IDLE
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn(last_sent: Instant) -> Conn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        Conn { tcp, last_sent }
    }

    #[tokio::test]
    async fn the_newest_fresh_spare_is_taken_and_stale_ones_are_closed() {
        let spares = Spares::default();
        let start = Instant::now();
        let now = start + MAX_SPARE_IDLE + Duration::from_secs(10);
        spares.put(conn(start).await, start);
        spares.put(conn(start).await, start);
        assert_eq!(spares.stack().len(), 2);
        // Too old to keep; and a put closes the stale ones kept before.
        spares.put(conn(start).await, now);
        assert!(spares.stack().is_empty());
        spares.put(conn(now - Duration::from_secs(2)).await, now);
        spares.put(conn(now).await, now);
        assert_eq!(spares.take(now).unwrap().last_sent, now);
        // Kept fresh, stale by the time it is wanted.
        assert!(spares.take(now + MAX_SPARE_IDLE).is_none());
        assert!(spares.stack().is_empty());
    }
}
