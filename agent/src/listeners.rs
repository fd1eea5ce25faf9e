//! Listening sockets an agent is given at start instead of binding them:
//! by systemd from its file descriptor store after a crash (the sockets
//! stayed open, connections waited in their backlog), or by the agent this
//! one takes over from. Both use systemd's protocol: `LISTEN_FDS` sockets
//! from fd 3 on, `LISTEN_PID` naming the process they are for (a handoff
//! cannot know its successor's pid before it runs, and leaves it out).
//!
//! The proxies take them by address; what no service claims is closed
//! once the agent is up, and forgotten by systemd.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

use crate::notify;

/// The environment of the protocol, read once and removed: releases and
/// tasks the agent starts must not see it.
const PROTOCOL_ENV: [&str; 4] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_FDS_FIRST_FD",
];

#[derive(Debug, Default)]
pub struct Inherited {
    by_address: Mutex<HashMap<SocketAddr, TcpListener>>,
}

impl Inherited {
    /// Takes the listening TCP sockets the environment passes. Anything
    /// else passed (not a socket, not listening TCP) is logged and closed.
    /// Must run before other threads start: it edits the environment.
    pub fn from_env() -> Self {
        let mut fds = listenfd::ListenFd::from_env();
        for name in PROTOCOL_ENV {
            std::env::remove_var(name);
        }
        let mut by_address = HashMap::new();
        for index in 0..fds.len() {
            let listener = match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => listener,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(fd = index + 3, %error, "closing an inherited file descriptor that is not a listening TCP socket");
                    close_other_socket(&mut fds, index);
                    continue;
                }
            };
            match listener.local_addr() {
                Ok(address) => {
                    by_address.insert(address, listener);
                }
                Err(error) => {
                    tracing::warn!(fd = index + 3, %error, "ignoring an inherited socket without an address")
                }
            }
        }
        if !by_address.is_empty() {
            let mut addresses: Vec<String> = by_address.keys().map(|a| a.to_string()).collect();
            addresses.sort();
            tracing::info!(listeners = %addresses.join(","), "took over listening sockets");
        }
        Self {
            by_address: Mutex::new(by_address),
        }
    }

    /// The inherited socket listening on `address`, if any; once.
    pub fn take(&self, address: SocketAddr) -> Option<TcpListener> {
        self.by_address
            .lock()
            .expect("inherited lock")
            .remove(&address)
    }

    /// Closes what no service took (a service removed while the agent was
    /// away), and has systemd forget it, so its port is free again.
    pub fn close_unclaimed(&self) {
        for (address, listener) in self.by_address.lock().expect("inherited lock").drain() {
            tracing::info!(%address, "closing an inherited listening socket no service uses");
            notify::forget_listener(address);
            drop(listener);
        }
    }
}

/// Takes (and so closes, with close-on-exec set meanwhile) a passed socket
/// of another kind, which releases must not inherit. Anything else (not a
/// socket) stays open: it cannot be taken without unsafe code.
fn close_other_socket(fds: &mut listenfd::ListenFd, index: usize) {
    let closed = matches!(fds.take_unix_listener(index), Ok(Some(_)))
        || matches!(fds.take_udp_socket(index), Ok(Some(_)))
        || matches!(fds.take_unix_datagram(index), Ok(Some(_)));
    if !closed {
        tracing::warn!(
            fd = index + 3,
            "an inherited file descriptor that is not a socket stays open"
        );
    }
}
