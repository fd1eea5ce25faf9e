//! One service on this node: the release it serves (and, for a web
//! service, one running beside it: `side`), how it came back after an agent
//! restart, what it reports, and how it stops. A web service serves a
//! public port through its node proxy; a worker (a queue consumer, say)
//! listens nowhere. Replacing the release is `cutover`.

mod cutover;
mod health;
mod hooks;
mod release;
mod running;
mod side;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::watch;

use self::release::{check_target, process_spec};
use self::running::Running;
use crate::checks;
use crate::proxy::{DrainReport, Proxy, Upstream};
use crate::runtime::docker::DockerEngine;
use crate::runtime::supervisor::{stop_leftover, SecretSlot, StopReport, Supervisor};
use crate::runtime::InstanceId;
use crate::store::{
    ActiveRelease, AgentStore, Instances, Leftover, ServiceRecord, StoreError, HISTORY_LIMIT,
};

pub use self::cutover::{CutoverError, CutoverReport, Step};
pub use self::release::{WebRelease, DEFAULT_DRAIN_TIMEOUT};
use self::side::Side;
pub use self::side::{shared, split_from_proto};

/// The retire time of a side release kept warm until replaced
/// (`SideRelease.retire_at_ms` in the proto): never due, and, unlike 0
/// (a staged canary, stays until told), no stray for the coordinator.
pub const KEPT_WARM: i64 = -1;

/// What an activation does with the release it takes the traffic from
/// (`ActivateRelease.keep_previous_ms` and `keep_previous_warm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepPrevious {
    /// Drained and stopped at once.
    Stop,
    /// Kept as the side release at weight 0 this long, then retired by
    /// the agent.
    For(Duration),
    /// Kept as the side release at weight 0 until a later activation or
    /// stage replaces it: a warm standby to switch back to.
    Warm,
}

impl KeepPrevious {
    pub fn from_wire(keep_previous_ms: u64, warm: bool) -> Self {
        match (warm, keep_previous_ms) {
            (true, _) => Self::Warm,
            (false, 0) => Self::Stop,
            (false, ms) => Self::For(Duration::from_millis(ms)),
        }
    }

    /// When the kept release is retired (ms since the Unix epoch;
    /// `KEPT_WARM`: never), or `None` when it is not kept.
    fn retire_at_ms(self) -> Option<i64> {
        match self {
            Self::Stop => None,
            Self::For(keep) => {
                let keep = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
                Some(cutover_common::now_ms().saturating_add(keep))
            }
            Self::Warm => Some(KEPT_WARM),
        }
    }
}

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
    /// The labels of the release processes it starts.
    pub owner: crate::runtime::ownership::Owner,
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
    /// A release running beside the active one (web services only).
    side: Option<Side>,
    /// When the side release is due to be retired (ms since the Unix
    /// epoch, 0: never), for `spawn_retirer`.
    retire: watch::Sender<i64>,
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
            side: None,
            retire: watch::Sender::new(0),
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
            // Before the proxy accepts again: a restart must not lift
            // maintenance or a throttle, even for a moment.
            if let Err(error) = proxy.levers().set(record.levers.clone()) {
                tracing::error!(service = %service.settings.name, %error, "the recorded levers are invalid; serving without them until the coordinator sets them again");
            }
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
        let processes = service
            .bring_back_all(&active.release, active.instances)
            .await;
        service.serve(active.release, processes);
        if let Some(side) = record.side {
            let processes = service.bring_back_all(&side.release, side.instances).await;
            let running = service.running(side.release, processes);
            service.side = Some(Side::recovered(
                &service.settings.name,
                running,
                side.split,
                side.retire_at_ms,
            ));
        }
        service.reroute();
        Ok(service)
    }

    /// The processes of a recorded release, each as `bring_back`, their
    /// identities kept recorded.
    async fn bring_back_all(
        &self,
        release: &WebRelease,
        instances: Instances,
    ) -> Vec<(u16, Supervisor)> {
        let mut processes = Vec::new();
        for (index, recorded) in instances.0.into_iter().enumerate() {
            let port = recorded.port;
            let supervisor = self.bring_back(release, port, recorded.instance).await;
            self.track(&release.release_id, index, port, &supervisor);
            processes.push((port, supervisor));
        }
        processes
    }

    /// The process of a recorded release: adopted if it still runs,
    /// started again (and health-gated) if not.
    async fn bring_back(
        &self,
        release: &WebRelease,
        port: u16,
        instance: Option<InstanceId>,
    ) -> Supervisor {
        let spec = process_spec(&self.settings, release, port);
        let adopted = match instance {
            Some(instance) => Supervisor::adopt(spec.clone(), instance).await,
            None => None,
        };
        if let Some(adopted) = adopted {
            return adopted;
        }
        let service = &self.settings.name;
        tracing::warn!(%service, release = %release.release_id, "recorded process is gone, starting the release again");
        let waits_for_secrets = spec.secrets.is_pending();
        let started = Supervisor::restart(spec, "it ended while the agent was down".into()).await;
        let target = check_target(&self.settings, release, port);
        // Nothing else can serve: an unhealthy start still gets the
        // traffic (and keeps being restarted), but it is logged. One that
        // waits for its secrets starts once the session to the coordinator
        // brings them; nothing to check before.
        if waits_for_secrets {
            tracing::warn!(%service, release = %release.release_id, "the release starts once the coordinator sends its secrets again");
        } else if let Some(check) = &release.health {
            if let Err(failure) = checks::wait(&release.gate, check, &target).await {
                tracing::error!(%service, release = %release.release_id, %failure, "recovered release is not healthy");
            }
        }
        started
    }

    /// Makes `release` (its processes running under their supervisors on
    /// their ports) the one that serves: their identities are kept
    /// recorded, their health keeps being checked. Returns the release it
    /// replaced; the caller routes the proxy (`reroute`) and drains and
    /// stops that one.
    fn serve(&mut self, release: WebRelease, processes: Vec<(u16, Supervisor)>) -> Option<Running> {
        let running = self.running(release, processes);
        self.active.replace(running)
    }

    /// Points the proxy at what runs now: the active release alone, or it
    /// and the side release by their split (one table swap); and tells the
    /// retirer when the side release is due. Returns the upstreams no
    /// longer routed to, for the caller to drain.
    fn reroute(&self) -> Vec<Arc<Upstream>> {
        self.retire
            .send_replace(self.side.as_ref().map_or(0, |side| side.retire_at_ms));
        let Some(proxy) = self.kind.proxy() else {
            return Vec::new();
        };
        match (&self.active, &self.side) {
            (Some(active), Some(side)) => {
                proxy.split(active.route(), side.running.route(), side.cohorts.clone())
            }
            (active, _) => proxy
                .switch(active.as_ref().map(Running::route))
                .into_iter()
                .collect(),
        }
    }

    /// Keeps the recorded identity of a release's process current (as the
    /// active release, the side one, or a leftover) for as long as the record
    /// names it, writing once at the start too: a recovering agent must find
    /// the process that really runs, not one the supervisor has replaced.
    /// The process is the `index`th of its release (the processes of a
    /// worker all have port 0), on `port`.
    fn track(&self, release_id: &str, index: usize, port: u16, supervisor: &Supervisor) {
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
                    let active = record
                        .active
                        .as_mut()
                        .filter(|a| a.release.release_id == release_id)
                        .map(|a| &mut a.instances);
                    let side = record
                        .side
                        .as_mut()
                        .filter(|s| s.release.release_id == release_id)
                        .map(|s| &mut s.instances);
                    if let Some(recorded) = active
                        .into_iter()
                        .chain(side)
                        .find_map(|instances| instances.0.get_mut(index))
                    {
                        if recorded.instance == instance {
                            return None;
                        }
                        recorded.instance = instance;
                        return Some(record);
                    }
                    let mut of_release = record
                        .leftovers
                        .iter_mut()
                        .filter(|l| l.release_id == release_id);
                    // A web process by its port; a worker's (port 0) by
                    // its place: leftovers are written in process order.
                    let leftover = match port {
                        0 => of_release.nth(index),
                        _ => of_release.find(|l| l.port == port),
                    };
                    if let Some(leftover) = leftover {
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

    /// The serving and side releases that need secret values they do not
    /// have (the agent restarted): their ids, the names, and the slots to
    /// fill.
    pub fn pending_secrets(&self) -> Vec<(String, Vec<String>, SecretSlot)> {
        let side = self.side.as_ref().map(|side| &side.running);
        self.active
            .iter()
            .chain(side)
            .map(|running| &running.spec)
            .filter(|release| !release.secrets.is_empty() && release.secret_values.is_pending())
            .map(|release| {
                (
                    release.release_id.clone(),
                    release.secrets.clone(),
                    release.secret_values.clone(),
                )
            })
            .collect()
    }

    /// What its supervisors run now (the active and the side release),
    /// also before the store records it.
    pub fn instances(&self) -> Vec<crate::runtime::InstanceId> {
        let side = self.side.as_ref().map(|side| &side.running);
        self.active
            .iter()
            .chain(side)
            .flat_map(|running| &running.instances)
            .filter_map(|i| i.supervisor.status().instance)
            .collect()
    }

    /// The service's proxy; `None` for a worker.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.kind.proxy()
    }

    /// The proxy's address; `None` for a worker.
    fn listen(&self) -> Option<SocketAddr> {
        self.kind.proxy().map(Proxy::local_addr)
    }

    /// The addresses its proxy listens on besides `listen`.
    fn also_listen(&self) -> Vec<SocketAddr> {
        self.kind
            .proxy()
            .map(|p| p.listens().into_iter().skip(1).collect())
            .unwrap_or_default()
    }

    /// Whether an external load balancer may send traffic (always for a
    /// worker, which has none).
    fn admitted(&self) -> bool {
        self.kind.proxy().is_none_or(Proxy::admitted)
    }

    /// The release serving now and where its first process listens.
    pub fn active(&self) -> Option<(&str, SocketAddr)> {
        self.active
            .as_ref()
            .map(|r| (r.release_id.as_str(), r.addr()))
    }

    /// The service's record with `active` serving: its history and side
    /// release come from `current`, the stored record (the history gains the
    /// active release), everything else is this service's state now.
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
            also_listen: self.also_listen(),
            admitted: self.admitted(),
            active,
            previous,
            leftovers: Vec::new(),
            history,
            side: current.and_then(|c| c.side.clone()),
            // Set by `NodeServices::set_levers` alone, which does not
            // wait for a cutover to end.
            levers: current.map(|c| c.levers.clone()).unwrap_or_default(),
            levers_generation: current.map_or(0, |c| c.levers_generation),
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

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Records the addresses its proxy listens on now, for a restarted
    /// agent to listen on; a failed write is logged (a restart would open
    /// an address the release no longer has, until its next cutover).
    pub fn record_listens(&self) {
        let written = self.store.update_service(&self.settings.name, |current| {
            let mut record = current.unwrap_or_else(|| self.record(None, None, None));
            record.listen = self.listen();
            record.also_listen = self.also_listen();
            Some(record)
        });
        if let Err(error) = written {
            tracing::error!(service = %self.settings.name, %error, "cannot record the addresses the proxy listens on");
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
        let summary = self.active.as_ref().map(Running::summary);
        let health = summary.as_ref().and_then(|s| s.health.clone());
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
                .filter(|r| r.addr().port() != 0)
                .map(|r| r.addr().to_string())
                .unwrap_or_default(),
            listen: self
                .listen()
                .into_iter()
                .chain(self.also_listen())
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            admitted: self.admitted(),
            crashes: summary.as_ref().map_or(0, |s| s.crashes),
            last_exit: summary
                .as_ref()
                .and_then(|s| s.last_exit.clone())
                .unwrap_or_default(),
            healthy: health.as_ref().is_none_or(|o| o.passed),
            health_detail: health.map(|o| o.detail).unwrap_or_default(),
            traffic: self
                .active
                .as_ref()
                .and_then(|r| self.traffic(&r.release_id)),
            running: summary.as_ref().is_some_and(|s| s.running > 0),
            side: self.side_state(),
            memory_bytes: summary.as_ref().map_or(0, |s| s.memory_bytes),
            // Filled in fresh by `NodeServices::state`.
            levers: None,
            lever_counts: None,
            queues: self.active.as_ref().and_then(|r| {
                r.queues
                    .lock()
                    .expect("queues lock")
                    .as_ref()
                    .map(Into::into)
            }),
            instances: self.active.as_ref().map_or(0, |r| r.instances.len() as u32),
            instances_up: summary.as_ref().map_or(0, |s| s.up),
        }
    }

    /// The proxy's counts of `release_id`, if it routed to it.
    fn traffic(&self, release_id: &str) -> Option<cutover_proto::v1::ReleaseTraffic> {
        let stats = self.kind.proxy()?.release_stats(release_id)?;
        Some(cutover_proto::v1::ReleaseTraffic {
            release_id: release_id.to_string(),
            requests: stats.requests,
            by_class: stats.by_class.to_vec(),
            upstream_failures: stats.upstream_failures,
            latency_bounds_ms: crate::proxy::stats::LATENCY_BUCKETS_MS.to_vec(),
            latency_cumulative: stats.latency_cumulative,
            latency_sum_us: stats.latency_sum_us,
        })
    }

    /// Leaves the release running and stops supervising it, for the next
    /// agent to adopt: an agent shutdown keeps the node serving. Returns
    /// the proxy, still accepting, for the caller to close or hand off.
    #[must_use = "the proxy listens until it is closed or handed off"]
    pub async fn release(self) -> Option<Proxy> {
        let side = self.side.map(|side| side.running);
        for instance in self
            .active
            .into_iter()
            .chain(side)
            .flat_map(|r| r.instances)
        {
            instance.supervisor.release().await;
        }
        match self.kind {
            ServiceKind::Web(proxy) => Some(proxy),
            ServiceKind::Worker => None,
        }
    }

    /// Stops serving: the side release (if any) drains and stops, the
    /// proxy answers 502 from now on, in-flight requests drain, the release
    /// stops.
    pub async fn stop(&mut self) -> Option<PreviousRelease> {
        self.retire_side().await;
        let Some(running) = self.active.take() else {
            self.reroute();
            return None;
        };
        // Until it is stopped, a restart must stop it too.
        let retiring = running.as_leftovers();
        let written = self.store.update_service(&self.settings.name, |current| {
            let mut record = self.record(current.as_ref(), None, Some(running.release_id.clone()));
            record.leftovers = retiring;
            Some(record)
        });
        if let Err(error) = written {
            tracing::error!(service = %self.settings.name, %error, "cannot record the stop");
        }
        let upstream = upstream_of(self.reroute(), &running);
        let drain = drain(upstream, running.spec.drain_timeout).await;
        Some(self.stop_old(running, drain).await)
    }

    /// Stops a release that serves no more (drained) and forgets it as a
    /// leftover.
    async fn stop_old(&self, old: Running, drain: DrainReport) -> PreviousRelease {
        let release_id = old.release_id.clone();
        let stop = old.stop().await;
        self.forget_leftovers();
        PreviousRelease {
            release_id,
            drain,
            stop,
        }
    }
}

/// The upstream of `running` among those a route change retired.
fn upstream_of(retired: Vec<Arc<Upstream>>, running: &Running) -> Option<Arc<Upstream>> {
    retired.into_iter().find(|u| {
        u.release() == running.release_id && u.addrs().eq(running.instances.iter().map(|i| i.addr))
    })
}

/// Waits for the requests in flight to a release switched away from, up to
/// `timeout`; a worker's release has nothing to wait for.
async fn drain(upstream: Option<Arc<Upstream>>, timeout: Duration) -> DrainReport {
    match upstream {
        Some(upstream) => upstream.drain(timeout).await,
        None => NOTHING_TO_DRAIN,
    }
}
