//! One service on this node: the release it serves, how it came back
//! after an agent restart, what it reports, and how it stops. A web
//! service serves a public port through its node proxy; a worker (a queue
//! consumer, say) listens nowhere. Replacing the release is `cutover`.

mod cutover;
mod health;
mod hooks;
mod release;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_util::sync::DropGuard;

use self::health::{monitor_health, LastHealth};
use self::release::{check_target, process_spec};
use crate::checks;
use crate::proxy::{DrainReport, Proxy, Upstream};
use crate::runtime::docker::DockerEngine;
use crate::runtime::supervisor::{stop_leftover, SecretSlot, StopReport, Supervisor};
use crate::store::{ActiveRelease, AgentStore, Leftover, ServiceRecord, StoreError, HISTORY_LIMIT};

pub use self::cutover::{CutoverError, CutoverReport, Step};
pub use self::release::{WebRelease, DEFAULT_DRAIN_TIMEOUT};

/// Node-level settings of a service.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub name: String,
    /// The node's address: releases bind here, on a port from `ports`.
    pub address: IpAddr,
    pub ports: RangeInclusive<u16>,
    /// Each release logs to `<log_root>/<release id>/`.
    pub log_root: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// Runs docker releases (and finds their leftovers).
    pub docker: DockerEngine,
}

/// What a service's releases serve through.
pub enum ServiceKind {
    /// A public port, through the node proxy; each release gets a port of
    /// its own behind it.
    Web(Proxy),
    /// Nothing: no port, no proxy, nothing to drain (its stop command lets
    /// a release finish its jobs).
    Worker,
}

impl ServiceKind {
    fn proxy(&self) -> Option<&Proxy> {
        match self {
            ServiceKind::Web(proxy) => Some(proxy),
            ServiceKind::Worker => None,
        }
    }
}

#[derive(Debug)]
pub struct PreviousRelease {
    pub release_id: String,
    pub drain: DrainReport,
    pub stop: StopReport,
}

/// The release a service serves, supervised, with its health monitor.
struct Running {
    release_id: String,
    addr: SocketAddr,
    spec: WebRelease,
    supervisor: Supervisor,
    /// The last health check of the serving release.
    health: LastHealth,
    /// Ends the health monitor when this release stops serving.
    _monitor: DropGuard,
}

/// Stops what an interrupted cutover (or stop) of `service` left running.
pub async fn stop_leftovers(service: &str, leftovers: &[Leftover], engine: &DockerEngine) {
    for leftover in leftovers {
        // The record holds the name the agent itself wrote; one it cannot
        // read is reported, and the leftover killed rather than asked
        // with a signal it never chose.
        let (signal, grace) = match Signal::from_str(&leftover.stop_signal) {
            Ok(signal) => (signal, leftover.stop_grace),
            Err(_) => {
                tracing::error!(%service, release = %leftover.release_id, stop_signal = %leftover.stop_signal, "the record of a release an interrupted cutover left running names an unknown stop signal; killing the release without a graceful stop");
                (Signal::SIGKILL, Duration::ZERO)
            }
        };
        if let Some(report) = stop_leftover(
            &leftover.release_id,
            leftover.instance.clone(),
            signal,
            grace,
            engine,
        )
        .await
        {
            tracing::warn!(%service, release = %leftover.release_id, graceful = report.graceful, "stopped a release an interrupted cutover left running");
        }
    }
}

impl Running {
    /// This release as a leftover to stop should the agent die before it
    /// does (it is being drained).
    fn as_leftover(&self) -> Option<Leftover> {
        Some(Leftover {
            release_id: self.release_id.clone(),
            port: self.addr.port(),
            instance: self.supervisor.status().instance?,
            stop_signal: self.spec.stop_signal.as_str().to_string(),
            stop_grace: self.spec.stop_grace,
        })
    }
}

/// A worker's "drain": it has no proxy, its stop command lets it finish.
const NOTHING_TO_DRAIN: DrainReport = DrainReport {
    completed: true,
    cut: 0,
    waited: Duration::ZERO,
};

/// One service on this node and the release it serves.
pub struct Service {
    settings: ServiceSettings,
    kind: ServiceKind,
    store: Arc<AgentStore>,
    active: Option<Running>,
}

impl Service {
    /// A service with nothing running yet, or what the store says ran before
    /// the agent restarted: the recorded process is adopted if it still
    /// runs, started again (and health-gated) if not, and the proxy serves it.
    pub async fn recover(
        settings: ServiceSettings,
        kind: ServiceKind,
        store: Arc<AgentStore>,
    ) -> Result<Self, CutoverError> {
        let mut service = Self {
            kind,
            store,
            active: None,
            settings,
        };
        let record = service
            .store
            .service(&service.settings.name)
            .map_err(|error| CutoverError::Store {
                service: service.settings.name.clone(),
                error,
            })?;
        let Some(record) = record else {
            return Ok(service);
        };
        if let Some(proxy) = service.kind.proxy() {
            proxy.set_admitted(record.admitted);
        }
        if !record.leftovers.is_empty() {
            stop_leftovers(
                &service.settings.name,
                &record.leftovers,
                &service.settings.docker,
            )
            .await;
            service.forget_leftovers();
        }
        let Some(active) = record.active else {
            return Ok(service);
        };
        let spec = process_spec(&service.settings, &active.release, active.port);
        let adopted = match active.instance.clone() {
            Some(instance) => Supervisor::adopt(spec.clone(), instance).await,
            None => None,
        };
        let supervisor = match adopted {
            Some(adopted) => adopted,
            None => {
                tracing::warn!(service = %service.settings.name, release = %active.release.release_id, "recorded process is gone, starting the release again");
                let waits_for_secrets = spec.secrets.is_pending();
                let started =
                    Supervisor::restart(spec, "it ended while the agent was down".into()).await;
                let target = check_target(&service.settings, &active.release, active.port);
                // Nothing else can serve: an unhealthy start still gets the
                // traffic (and keeps being restarted), but it is logged. One
                // that waits for its secrets starts once the session to the
                // coordinator brings them; nothing to check before.
                if waits_for_secrets {
                    tracing::warn!(service = %service.settings.name, release = %active.release.release_id, "the release starts once the coordinator sends its secrets again");
                } else if let Some(check) = &active.release.health {
                    if let Err(failure) = checks::wait(&active.release.gate, check, &target).await {
                        tracing::error!(service = %service.settings.name, %failure, "recovered release is not healthy");
                    }
                }
                started
            }
        };
        service.track(&active.release.release_id, active.port, &supervisor);
        service.serve(active.release, active.port, supervisor);
        Ok(service)
    }

    /// Makes `release` (running under `supervisor` on `port`) the one that
    /// serves: the proxy switches to it, its process identity is kept
    /// recorded, its health keeps being checked. Returns the release it
    /// replaced and that release's upstream, to drain and stop.
    fn serve(
        &mut self,
        release: WebRelease,
        port: u16,
        supervisor: Supervisor,
    ) -> (Option<Running>, Option<Arc<Upstream>>) {
        let addr = SocketAddr::new(self.settings.address, port);
        let target = check_target(&self.settings, &release, port);
        let (health, monitor) = monitor_health(&self.settings.name, &release, target);
        let upstream = self
            .kind
            .proxy()
            .and_then(|proxy| proxy.switch(Some((&release.release_id, addr))));
        let old = self.active.replace(Running {
            release_id: release.release_id.clone(),
            addr,
            spec: release,
            supervisor,
            health,
            _monitor: monitor,
        });
        (old, upstream)
    }

    /// Keeps the recorded identity of a release's process current (as the
    /// active release, or as a cutover's leftover) for as long as the record
    /// names it, writing once at the start too: a recovering agent must find
    /// the process that really runs, not one the supervisor has replaced.
    fn track(&self, release_id: &str, port: u16, supervisor: &Supervisor) {
        let mut status = supervisor.watch();
        let store = self.store.clone();
        let name = self.settings.name.clone();
        let release_id = release_id.to_string();
        tokio::spawn(async move {
            loop {
                let instance = status.borrow_and_update().instance.clone();
                let mut named = true;
                let written = store.update_service(&name, |current| {
                    let mut record = current?;
                    let ours = |id: &str, at: u16| id == release_id && at == port;
                    if let Some(active) = record
                        .active
                        .as_mut()
                        .filter(|a| ours(&a.release.release_id, a.port))
                    {
                        if active.instance == instance {
                            return None;
                        }
                        active.instance = instance;
                        return Some(record);
                    }
                    if let Some(leftover) = record
                        .leftovers
                        .iter_mut()
                        .find(|l| ours(&l.release_id, l.port))
                    {
                        // Between a crash and its restart the last known
                        // process stays recorded.
                        let instance = instance.filter(|i| *i != leftover.instance)?;
                        leftover.instance = instance;
                        return Some(record);
                    }
                    named = false;
                    None
                });
                if let Err(error) = written {
                    tracing::error!(service = %name, %error, "cannot record the release's process");
                }
                if !named || status.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// The serving release, if it needs secret values it does not have (the
    /// agent restarted): its id, the names, and the slot to fill.
    pub fn pending_secrets(&self) -> Option<(String, Vec<String>, SecretSlot)> {
        let running = self.active.as_ref()?;
        let release = &running.spec;
        (!release.secrets.is_empty() && release.secret_values.is_pending()).then(|| {
            (
                release.release_id.clone(),
                release.secrets.clone(),
                release.secret_values.clone(),
            )
        })
    }

    /// The service's proxy; `None` for a worker.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.kind.proxy()
    }

    /// The proxy's address; `None` for a worker.
    fn listen(&self) -> Option<SocketAddr> {
        self.kind.proxy().map(Proxy::local_addr)
    }

    /// Whether an external load balancer may send traffic (always for a
    /// worker, which has none).
    fn admitted(&self) -> bool {
        self.kind.proxy().is_none_or(Proxy::admitted)
    }

    /// The release serving now and where it listens.
    pub fn active(&self) -> Option<(&str, SocketAddr)> {
        self.active
            .as_ref()
            .map(|r| (r.release_id.as_str(), r.addr))
    }

    /// The service's record with `active` serving: its history (from
    /// `current`, the stored record) gains the active release, everything
    /// else is this service's state now.
    fn record(
        &self,
        current: Option<&ServiceRecord>,
        active: Option<ActiveRelease>,
        previous: Option<String>,
    ) -> ServiceRecord {
        let mut history = current.map(|c| c.history.clone()).unwrap_or_default();
        if let Some(active) = &active {
            history.retain(|id| *id != active.release.release_id);
            history.push(active.release.release_id.clone());
            let excess = history.len().saturating_sub(HISTORY_LIMIT);
            history.drain(..excess);
        }
        ServiceRecord {
            listen: self.listen(),
            admitted: self.admitted(),
            active,
            previous,
            leftovers: Vec::new(),
            history,
        }
    }

    /// Records which processes besides the active release this cutover owns
    /// right now (see `ServiceRecord::leftovers`).
    fn note_leftovers(&self, leftovers: Vec<Leftover>) -> Result<(), StoreError> {
        self.store.update_service(&self.settings.name, |current| {
            let mut record = current.unwrap_or_else(|| self.record(None, None, None));
            record.leftovers = leftovers;
            Some(record)
        })
    }

    /// Clears the leftover list once those processes are stopped; a failed
    /// write only means a restart checks them again and finds them gone.
    fn forget_leftovers(&self) {
        if let Err(error) = self.note_leftovers(Vec::new()) {
            tracing::error!(service = %self.settings.name, %error, "cannot clear the cutover's leftovers");
        }
    }

    /// Takes the node out of (or back into) rotation for this service, and
    /// records it so a restarted agent keeps it that way.
    pub fn set_admitted(&self, admitted: bool) -> Result<(), StoreError> {
        let Some(proxy) = self.kind.proxy() else {
            return Ok(()); // a worker is in no load balancer
        };
        proxy.set_admitted(admitted);
        self.store.update_service(&self.settings.name, |current| {
            let mut record = current.unwrap_or_else(|| self.record(None, None, None));
            record.admitted = admitted;
            Some(record)
        })
    }

    /// What runs, for heartbeats and `report_state`.
    pub fn state(&self) -> cutover_proto::v1::ServiceState {
        let health = self
            .active
            .as_ref()
            .and_then(|r| r.health.lock().expect("health lock").clone());
        let status = self
            .active
            .as_ref()
            .map(|r| r.supervisor.status())
            .unwrap_or_default();
        cutover_proto::v1::ServiceState {
            service: self.settings.name.clone(),
            release_id: self
                .active
                .as_ref()
                .map(|r| r.release_id.clone())
                .unwrap_or_default(),
            upstream: self
                .active
                .as_ref()
                .filter(|r| r.addr.port() != 0)
                .map(|r| r.addr.to_string())
                .unwrap_or_default(),
            listen: self.listen().map(|a| a.to_string()).unwrap_or_default(),
            admitted: self.admitted(),
            crashes: status.crashes,
            last_exit: status.last_exit.unwrap_or_default(),
            healthy: health.as_ref().is_none_or(|o| o.passed),
            health_detail: health.map(|o| o.detail).unwrap_or_default(),
            traffic: self.active.as_ref().and_then(|r| {
                let stats = self.kind.proxy()?.release_stats(&r.release_id)?;
                Some(cutover_proto::v1::ReleaseTraffic {
                    release_id: r.release_id.clone(),
                    requests: stats.requests,
                    by_class: stats.by_class.to_vec(),
                    upstream_failures: stats.upstream_failures,
                    latency_bounds_ms: crate::proxy::stats::LATENCY_BUCKETS_MS.to_vec(),
                    latency_cumulative: stats.latency_cumulative,
                    latency_sum_us: stats.latency_sum_us,
                })
            }),
            running: status.instance.is_some(),
            side: None,
        }
    }

    /// Leaves the release running and stops supervising it, for the next
    /// agent to adopt: an agent shutdown keeps the node serving.
    pub async fn release(self) {
        if let Some(running) = self.active {
            running.supervisor.release().await;
        }
        if let ServiceKind::Web(proxy) = self.kind {
            proxy.close().await;
        }
    }

    /// Stops serving: the proxy answers 502 from now on, in-flight requests
    /// drain, the release stops.
    pub async fn stop(&mut self) -> Option<PreviousRelease> {
        let upstream = self.kind.proxy().and_then(|proxy| proxy.switch(None));
        let running = self.active.take()?;
        // Until it is stopped, a restart must stop it too.
        let retiring: Vec<Leftover> = running.as_leftover().into_iter().collect();
        let written = self.store.update_service(&self.settings.name, |current| {
            let mut record = self.record(current.as_ref(), None, Some(running.release_id.clone()));
            record.leftovers = retiring;
            Some(record)
        });
        if let Err(error) = written {
            tracing::error!(service = %self.settings.name, %error, "cannot record the stop");
        }
        let drain = drain(upstream, running.spec.drain_timeout).await;
        Some(self.stop_old(running, drain).await)
    }

    /// Stops a release that serves no more (drained) and forgets it as a
    /// leftover.
    async fn stop_old(&self, old: Running, drain: DrainReport) -> PreviousRelease {
        let stop = old.supervisor.stop().await;
        self.forget_leftovers();
        PreviousRelease {
            release_id: old.release_id,
            drain,
            stop,
        }
    }
}

/// Waits for the requests in flight to a release switched away from, up to
/// `timeout`; a worker's release has nothing to wait for.
async fn drain(upstream: Option<Arc<Upstream>>, timeout: Duration) -> DrainReport {
    match upstream {
        Some(upstream) => upstream.drain(timeout).await,
        None => NOTHING_TO_DRAIN,
    }
}
