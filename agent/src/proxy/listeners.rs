//! The listening sockets of a node proxy: one per address the service
//! listens on (`listen` and `also_listen`), each with its accept loop, all
//! serving the same routes. An address is added before a cutover that
//! needs it and removed after one that drops it, so a service moves to a
//! new port with both open in between.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::accept::{accept_loop, Gates};
use super::Shared;

/// One listening socket and its accept loop.
pub(super) struct Listener {
    /// The address asked for (`local_addr` differs for port 0).
    pub(super) listen: SocketAddr,
    pub(super) local_addr: SocketAddr,
    /// Held by the accept loop alone (it ends with it, freeing the port):
    /// a copy of it is what a successor agent accepts on.
    socket: Weak<TcpListener>,
    /// A child of the proxy's: ends this accept loop alone.
    shutdown: CancellationToken,
    task: JoinHandle<()>,
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
            Some(listener) => {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            None => TcpListener::bind(listen).await?,
        };
        let socket = Arc::new(socket);
        let local_addr = socket.local_addr()?;
        let weak = Arc::downgrade(&socket);
        let shutdown = parents.shutdown.child_token();
        let task = tokio::spawn(accept_loop(
            socket,
            shared,
            Gates {
                accepting: parents.accepting.clone(),
                shutdown: shutdown.clone(),
                connections: parents.connections.child_token(),
            },
        ));
        Ok(Self {
            listen,
            local_addr,
            socket: weak,
            shutdown,
            task,
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
        let _ = self.task.await;
    }
}
