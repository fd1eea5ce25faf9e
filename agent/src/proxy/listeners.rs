//! The listening sockets of a node proxy: one per address the service
//! listens on (`listen` and `also_listen`), each with its accept loop, all
//! serving the same routes. An address is added before a cutover that
//! needs it and removed after one that drops it, so a service moves to a
//! new port with both open in between.
//!
//! Each proxy runtime (`workers`) accepts on the one socket of an address:
//! whichever is idle first takes the next connection. One socket per
//! address, not one per runtime with `SO_REUSEPORT`: a connection waiting
//! in the queue of a reuse-port socket is reset when that socket closes,
//! and a handoff or a crash kept by systemd passes the socket on.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::accept::{accept_loop, Gates};
use super::{workers, Shared};

/// Connections a listening socket queues before they are accepted (what
/// tokio's `TcpListener::bind` asks for).
const BACKLOG: u32 = 1024;

/// One listening socket and its accept loop.
pub(super) struct Listener {
    /// The address asked for (`local_addr` differs for port 0).
    pub(super) listen: SocketAddr,
    pub(super) local_addr: SocketAddr,
    /// Held by the accept loops alone (the port is free when they end): a
    /// copy of it is what a successor agent accepts on.
    socket: Weak<std::net::TcpListener>,
    /// A child of the proxy's: ends these accept loops alone.
    shutdown: CancellationToken,
    /// One accept loop per proxy runtime.
    tasks: Vec<JoinHandle<()>>,
}

/// What every listener of one proxy shares: when to start accepting, when
/// to stop, and when its connections are to end.
pub(super) struct Parents<'a> {
    pub(super) accepting: &'a CancellationToken,
    pub(super) shutdown: &'a CancellationToken,
    pub(super) connections: &'a CancellationToken,
}

impl Listener {
    /// Listens on `listen` (on `inherited` when given: a socket of that
    /// address an agent before this one bound) and starts its accept loop,
    /// which accepts once the proxy does.
    pub(super) async fn open(
        listen: SocketAddr,
        inherited: Option<std::net::TcpListener>,
        shared: Arc<Shared>,
        parents: Parents<'_>,
    ) -> std::io::Result<Self> {
        let socket = match inherited {
            Some(listener) => listener,
            None => {
                let socket = match listen {
                    SocketAddr::V4(_) => TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => TcpSocket::new_v6()?,
                };
                socket.set_reuseaddr(true)?;
                socket.bind(listen)?;
                socket.listen(BACKLOG)?.into_std()?
            }
        };
        socket.set_nonblocking(true)?;
        let local_addr = socket.local_addr()?;
        let socket = Arc::new(socket);
        let shutdown = parents.shutdown.child_token();
        let connections = parents.connections.child_token();
        // Every copy first: a failure leaves no accept loop behind.
        let copies = workers::handles()
            .iter()
            .map(|_| socket.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        let tasks = workers::handles()
            .iter()
            .zip(copies)
            .map(|(runtime, copy)| {
                let (socket, shared) = (socket.clone(), shared.clone());
                let gates = Gates {
                    accepting: parents.accepting.clone(),
                    shutdown: shutdown.clone(),
                    connections: connections.clone(),
                };
                runtime.spawn(async move {
                    // Registered with this runtime's reactor: made here.
                    match TcpListener::from_std(copy) {
                        Ok(listener) => accept_loop(listener, socket, shared, gates).await,
                        Err(error) => tracing::error!(%error, "proxy runtime cannot accept on the listening socket"),
                    }
                })
            })
            .collect();
        Ok(Self {
            listen,
            local_addr,
            socket: Arc::downgrade(&socket),
            shutdown,
            tasks,
        })
    }

    /// A copy of the listening socket.
    pub(super) fn fd(&self, service: &str) -> std::io::Result<OwnedFd> {
        let socket = self.socket.upgrade().ok_or_else(|| {
            std::io::Error::other(format!(
                "the proxy of {service} no longer listens on {}",
                self.listen
            ))
        })?;
        socket.as_fd().try_clone_to_owned()
    }

    /// Stops accepting (the port is free at once) and waits for its
    /// connections to end, within the proxy's shutdown grace.
    pub(super) async fn close(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
