//! The node proxy: serves a service's public port and forwards every request
//! to a release of its routing table (`routes`): the release serving, or it
//! and a side release (a canary, a warm standby) divided per client by a
//! split (`cohort`).
//!
//! Switching is one atomic pointer swap of the whole table: requests that
//! started before it finish on the release they were sent to (each holds an in-flight guard until its response
//! body, or its upgraded tunnel, is done), requests after it go to the new
//! one. Draining the old release is waiting for its guards to drop, bounded by
//! the drain timeout, after which its remaining tunnels are closed.

mod accept;
mod body;
mod chunked;
pub mod cohort;
mod forward;
pub mod headers;
mod heads;
pub mod levers;
mod link;
mod listeners;
mod plain;
pub mod routes;
mod spares;
pub mod stats;
mod upstream;
pub mod workers;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use self::body::ClientBody;
pub use self::body::ProxyBody;
use self::cohort::Cohorts;
use self::forward::handle;
pub(crate) use self::forward::text_response;
use self::headers::{
    add_forwarding, default_trusted_networks, is_upgrade, strip_hop_by_hop, Network, X_REQUEST_ID,
};
pub use self::levers::LeverHandle;
use self::levers::{LeverCounters, Levers};
use self::link::{Link, SendError};
use self::listeners::{Listener, Parents};
use self::routes::{HeaderRule, Route, RouteTable, ALL_TRAFFIC};
use self::stats::{ReleaseStats, StatsSnapshot};
pub use self::upstream::{BackendSpec, DrainReport, Upstream};
use self::upstream::{GuardedBody, InFlight};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The service this proxy fronts, for messages.
    pub service: String,
    pub listen: SocketAddr,
    /// Time from forwarding a request to the release's response headers;
    /// beyond it the client gets a 504.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Answered by the proxy itself for an external load balancer: 200 while
    /// a release serves and the node is admitted, 503 otherwise.
    pub readiness_path: String,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// How long open client connections get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-*` headers are kept (load balancers in
    /// front); from other peers they are replaced.
    pub trusted_networks: Vec<Network>,
}

impl ProxyConfig {
    pub fn new(service: &str, listen: SocketAddr) -> Self {
        Self {
            service: service.to_string(),
            listen,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            readiness_path: "/_cutover/ready".to_string(),
            header_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            trusted_networks: default_trusted_networks(),
        }
    }
}

/// A route to put in the table: which release, its processes, and what
/// it gets.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub release: String,
    pub backends: Vec<BackendSpec>,
    pub weight: u32,
    pub rules: Vec<HeaderRule>,
}

impl RouteSpec {
    /// A release of one process that takes every request.
    pub fn all(release: &str, addr: SocketAddr) -> Self {
        Self::to(release, vec![BackendSpec::at(addr)])
    }

    /// A release of `backends` that takes every request.
    pub fn to(release: &str, backends: Vec<BackendSpec>) -> Self {
        Self {
            release: release.to_string(),
            backends,
            weight: ALL_TRAFFIC,
            rules: Vec::new(),
        }
    }
}

struct Shared {
    config: ProxyConfig,
    routes: ArcSwap<RouteTable>,
    admitted: AtomicBool,
    /// Stats by release, kept across switches so a release switched back to
    /// continues its counts.
    stats: Mutex<HashMap<String, Arc<ReleaseStats>>>,
    /// Handing over to another agent: every response closes its
    /// connection, so each client's next request opens one to the
    /// successor, which accepts on the same socket.
    closing: AtomicBool,
    /// The incident levers in force (`levers`).
    levers: ArcSwap<Levers>,
    lever_counts: LeverCounters,
    /// True while a pause lever is set: held requests wait for false.
    paused: tokio::sync::watch::Sender<bool>,
    /// Cancelled when open connections are to end (shutdown, or a
    /// handoff's linger over): held requests are answered then.
    connections_ending: CancellationToken,
}

pub struct Proxy {
    shared: Arc<Shared>,
    /// One per address it listens on, the first where it was bound.
    listeners: Mutex<Vec<Listener>>,
    /// A child of the caller's shutdown token: `close` ends this proxy
    /// alone; each listener's is a child of it.
    shutdown: CancellationToken,
    /// Ends the open client connections (gracefully): when the accept loops
    /// end, or, handing off, once they had time to go on their own.
    connections: CancellationToken,
    /// Opened by `start_accepting`: until then connections wait in the
    /// sockets' backlogs (a restarted agent puts its routes back first).
    accepting: CancellationToken,
}

impl Proxy {
    /// Binds the public port and starts serving (502 until a release is
    /// switched in). Stops accepting when `shutdown` fires.
    pub async fn bind(config: ProxyConfig, shutdown: CancellationToken) -> std::io::Result<Self> {
        let proxy = Self::bind_or_inherit(config, shutdown, None).await?;
        proxy.start_accepting();
        Ok(proxy)
    }

    /// Listens on the public port, on `inherited` when given (a listening
    /// socket of that address an agent before this one bound), without
    /// accepting until `start_accepting`.
    pub async fn bind_or_inherit(
        config: ProxyConfig,
        shutdown: CancellationToken,
        inherited: Option<std::net::TcpListener>,
    ) -> std::io::Result<Self> {
        let shutdown = shutdown.child_token();
        let connections = CancellationToken::new();
        let accepting = CancellationToken::new();
        let listen = config.listen;
        let shared = Arc::new(Shared {
            config,
            routes: ArcSwap::from_pointee(RouteTable::default()),
            admitted: AtomicBool::new(true),
            stats: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            levers: ArcSwap::from_pointee(Levers::default()),
            lever_counts: LeverCounters::default(),
            paused: tokio::sync::watch::Sender::new(false),
            connections_ending: connections.clone(),
        });
        let first = Listener::open(
            listen,
            inherited,
            shared.clone(),
            Parents {
                accepting: &accepting,
                shutdown: &shutdown,
                connections: &connections,
            },
        )
        .await?;
        Ok(Self {
            shared,
            listeners: Mutex::new(vec![first]),
            shutdown,
            connections,
            accepting,
        })
    }

    /// Listens on `listen` too (on `inherited` when given), serving the
    /// same routes; accepting there at once if the proxy accepts. Listening
    /// there already changes nothing.
    pub async fn add_listener(
        &self,
        listen: SocketAddr,
        inherited: Option<std::net::TcpListener>,
    ) -> std::io::Result<()> {
        if self.listens().contains(&listen) {
            return Ok(());
        }
        let listener = Listener::open(
            listen,
            inherited,
            self.shared.clone(),
            Parents {
                accepting: &self.accepting,
                shutdown: &self.shutdown,
                connections: &self.connections,
            },
        )
        .await?;
        self.listeners
            .lock()
            .expect("listeners lock")
            .push(listener);
        Ok(())
    }

    /// Stops listening on `listen`: its port is free at once, its open
    /// connections finish what they are doing (within the shutdown grace).
    /// Returns whether it listened there. Its last address stays (a proxy
    /// always listens somewhere until it is closed).
    pub async fn remove_listener(&self, listen: SocketAddr) -> bool {
        let removed = {
            let mut listeners = self.listeners.lock().expect("listeners lock");
            match listeners.len() {
                0 | 1 => None,
                _ => listeners
                    .iter()
                    .position(|l| l.listen == listen)
                    .map(|i| listeners.remove(i)),
            }
        };
        match removed {
            Some(listener) => {
                listener.close().await;
                true
            }
            None => false,
        }
    }

    /// Accepts connections from now on.
    pub fn start_accepting(&self) {
        self.accepting.cancel();
    }

    /// Where its first listener is bound (the port, when it asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.lock().expect("listeners lock")[0].local_addr
    }

    /// The addresses it listens on, as the service asked for them, the
    /// first first.
    pub fn listens(&self) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .expect("listeners lock")
            .iter()
            .map(|l| l.listen)
            .collect()
    }

    /// A copy of each listening socket with its address, for an agent that
    /// takes over from this one or for systemd to keep across a crash.
    pub fn listener_fds(&self) -> std::io::Result<Vec<(SocketAddr, OwnedFd)>> {
        self.listeners
            .lock()
            .expect("listeners lock")
            .iter()
            .map(|l| Ok((l.listen, l.fd(&self.shared.config.service)?)))
            .collect()
    }

    /// Sends every new request to the release `target` names (or to
    /// nobody), at once: a table of one route of all the weight. Returns the
    /// release that was routed to, for the caller to drain. Of a table of
    /// several routes only one would come back: replace those with
    /// `set_routes`.
    pub fn switch(&self, target: Option<RouteSpec>) -> Option<Arc<Upstream>> {
        let routes = target.map(|spec| RouteSpec {
            weight: ALL_TRAFFIC,
            ..spec
        });
        self.set_routes(routes.into_iter().collect()).pop()
    }

    /// Replaces the routing table with `routes`, at once. A route to the same
    /// release at the same address keeps its upstream (its requests in
    /// flight and tunnels stay counted, a weight change drains nothing).
    /// Returns the upstreams no longer routed to, for the caller to drain.
    pub fn set_routes(&self, routes: Vec<RouteSpec>) -> Vec<Arc<Upstream>> {
        let current = self.shared.routes.load_full();
        let routes = routes
            .into_iter()
            .map(|spec| self.route(&current, spec))
            .collect();
        self.install(RouteTable::new(routes))
    }

    /// Divides new requests between the release serving (`serving`) and a
    /// side release (`side`) by `cohorts`, at once; otherwise as
    /// `set_routes`.
    pub fn split(
        &self,
        serving: RouteSpec,
        side: RouteSpec,
        cohorts: Cohorts,
    ) -> Vec<Arc<Upstream>> {
        let current = self.shared.routes.load_full();
        let serving = self.route(&current, serving);
        let side = self.route(&current, side);
        tracing::info!(service = %self.shared.config.service, side = %side.upstream.release, weight = cohorts.split().weight, sticky = ?cohorts.split().sticky, "proxy splits traffic");
        self.install(RouteTable::split(serving, side, cohorts))
    }

    /// The route `spec` asks for, keeping the upstream `current` has for it.
    fn route(&self, current: &RouteTable, spec: RouteSpec) -> Route {
        let kept = current
            .get(&spec.release)
            .filter(|route| route.upstream.serves(&spec.backends));
        let upstream = match kept {
            Some(route) => route.upstream.clone(),
            None => Arc::new(Upstream::new(
                &spec.release,
                &spec.backends,
                self.release_counts(&spec.release),
            )),
        };
        let addrs: Vec<String> = spec.backends.iter().map(|b| b.addr.to_string()).collect();
        tracing::info!(service = %self.shared.config.service, release = %spec.release, upstream = %addrs.join(","), weight = spec.weight, "proxy routes to release");
        Route {
            upstream,
            weight: spec.weight,
            rules: spec.rules,
        }
    }

    /// Swaps `table` in; returns the upstreams no longer routed to.
    fn install(&self, table: RouteTable) -> Vec<Arc<Upstream>> {
        let previous = self.shared.routes.swap(Arc::new(table));
        let table = self.shared.routes.load();
        let retired: Vec<Arc<Upstream>> = previous
            .routes()
            .iter()
            .filter(|route| !table.contains(&route.upstream))
            .map(|route| route.upstream.clone())
            .collect();
        // Counts are kept for the releases routed to and those they replaced
        // (still draining, and the baseline to compare with); older ones go.
        self.shared
            .stats
            .lock()
            .expect("stats lock")
            .retain(|release, _| {
                table.get(release).is_some() || retired.iter().any(|r| r.release == *release)
            });
        retired
    }

    /// The counts of `release`, continued if the proxy served it before.
    fn release_counts(&self, release: &str) -> Arc<ReleaseStats> {
        self.shared
            .stats
            .lock()
            .expect("stats lock")
            .entry(release.to_string())
            .or_default()
            .clone()
    }

    /// The routing table in force now.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.shared.routes.load_full()
    }

    /// Admitted nodes answer the readiness path with 200 (when a release
    /// serves); a drained node answers 503 so load balancers take it out,
    /// while requests that still arrive are served.
    pub fn set_admitted(&self, admitted: bool) {
        self.shared.admitted.store(admitted, Ordering::Release);
    }

    pub fn admitted(&self) -> bool {
        self.shared.admitted.load(Ordering::Acquire)
    }

    /// Its incident levers, to set and read while a command holds the
    /// service (a cutover must not delay maintenance).
    pub fn levers(&self) -> LeverHandle {
        LeverHandle {
            shared: self.shared.clone(),
            local_addr: self.local_addr(),
        }
    }

    /// The counts of one release, if the proxy served it.
    pub fn release_stats(&self, release: &str) -> Option<StatsSnapshot> {
        self.shared
            .stats
            .lock()
            .expect("stats lock")
            .get(release)
            .map(|s| s.snapshot())
    }

    pub fn stats(&self) -> Vec<(String, StatsSnapshot)> {
        let stats = self.shared.stats.lock().expect("stats lock");
        let mut out: Vec<_> = stats
            .iter()
            .map(|(k, v)| (k.clone(), v.snapshot()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stops this proxy: the port is released at once, open connections
    /// drain within the shutdown grace, then this returns.
    pub async fn close(self) {
        self.stop().await;
    }

    /// Stops accepting (the agent that took over accepts on the same
    /// socket) and lets open connections go on their own: each response
    /// from now on closes its connection. Those still open after `linger`
    /// (idle keep-alive ones) are closed as by `close`.
    pub async fn hand_off(self, linger: Duration) {
        self.shared.closing.store(true, Ordering::Release);
        let connections = self.connections.clone();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            connections.cancel();
        });
        self.stop().await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let listeners = std::mem::take(&mut *self.listeners.lock().expect("listeners lock"));
        for listener in listeners {
            listener.close().await;
        }
    }
}

impl Drop for Proxy {
    /// A proxy nobody holds any more stops listening (its port would stay
    /// taken otherwise); `close` is the way to also wait for that.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
