//! What the agent tells systemd (`sd_notify`, with `Type=notify`): that it
//! is up, reloading (a handoff) or stopping; that it is alive (the
//! watchdog); which process is the service's now (after a handoff); and
//! its listening sockets, for systemd's file descriptor store to keep
//! across a crash. Without `NOTIFY_SOCKET` (not under systemd) every call
//! does nothing.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// The name a listening socket has in the file descriptor store.
/// systemd's names may not contain ':'.
pub fn listener_name(address: SocketAddr) -> String {
    format!("proxy-{address}").replace(':', "_")
}

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Start-up is done: the proxies serve and the agent runs its loop.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A handoff began (`systemctl reload` waits for `ready` or `reloaded`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A handoff ended: `successor` (if it took over) is the service's process
/// from now on; this one only drains its connections.
pub fn reloaded(successor: Option<u32>) {
    match successor {
        Some(pid) => send(&[NotifyState::MainPid(pid), NotifyState::Ready]),
        None => send(&[NotifyState::Ready]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Hands a listening socket to systemd's file descriptor store
/// (`FileDescriptorStoreMax=` in the unit), so a crash does not close it:
/// clients wait in its backlog until the restarted agent accepts. Storing
/// one systemd holds already changes nothing.
pub fn store_listener(address: SocketAddr, listener: &impl AsFd) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let name = listener_name(address);
    let states = [NotifyState::FdStore, NotifyState::FdName(&name)];
    if let Err(error) = sd_notify::notify_with_fds(&states, &[listener.as_fd()]) {
        tracing::warn!(%error, %address, "cannot keep the listening socket in systemd's store; a crash will refuse connections until the agent is back");
    }
}

/// Has systemd close its copy of a socket the agent no longer serves.
pub fn forget_listener(address: SocketAddr) {
    let name = listener_name(address);
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
}

/// Pings systemd's watchdog (`WatchdogSec=`) at half its period until
/// `shutdown`. The ping is a task on the agent's runtime: a runtime that
/// stops running tasks stops the pings, and systemd restarts the agent.
pub async fn watchdog(shutdown: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(100));
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "pinging systemd's watchdog"
    );
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}
