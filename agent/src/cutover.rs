//! Zero-downtime cutover of one web service on one node.
//!
//! 1. start B beside A on a free port;
//! 2. health-check B until it passes `healthy_threshold` times in a row,
//!    within `healthy_deadline`;
//! 3. run the smoke checks against B;
//! 4. switch the node proxy to B, atomically;
//! 5. drain A: requests in flight to A finish, up to B's `drain_timeout`;
//! 6. stop A.
//!
//! If 2 or 3 fails, B is stopped and A keeps serving, untouched: the proxy
//! never pointed anywhere but at a release that passed its checks.
//!
//! A worker (a service without a port, like a queue consumer) has no proxy:
//! B starts, must pass its exec check (if it has one) and stay up for its
//! `min_healthy_time`, then A is asked to stop with its stop command and
//! given `stop_timeout` to finish its jobs and exit by itself.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::checks::{Check, HealthGate, Healthy, Outcome, Target, Unhealthy};
use crate::proxy::{DrainReport, Proxy, Upstream};
use crate::runtime::docker::{ContainerSpec, DockerEngine};
use crate::runtime::process::{
    stop_leftover, ContainerLaunch, ProcessError, ProcessSpec, SecretSlot, StopReport, Supervisor,
};
use crate::store::{ActiveRelease, AgentStore, Leftover, ServiceRecord, StoreError, HISTORY_LIMIT};
use cutover_common::net::allocate_port;

/// A release of a web service, unpacked and ready to start.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WebRelease {
    pub release_id: String,
    pub command: Vec<String>,
    /// The unpacked release dir; the command runs there.
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Web services always have one; a worker may not.
    pub health: Option<Check>,
    pub gate: HealthGate,
    pub smoke: Vec<Check>,
    #[serde(with = "signal_name")]
    pub stop_signal: Signal,
    pub stop_grace: Duration,
    /// A new release must stay up this long without a crash before it
    /// counts as healthy (workers).
    #[serde(default)]
    pub min_healthy_time: Duration,
    #[serde(default)]
    pub stop_command: Vec<String>,
    #[serde(default)]
    pub stop_timeout: Duration,
    /// How long requests in flight to the release this one replaces may
    /// finish (and, once this one is replaced or stopped, requests to it).
    /// Each release carries its own: the operator's choice for the release
    /// being deployed governs its cutover.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// Set for a docker release: run as a container of this image.
    #[serde(default)]
    pub container: Option<ContainerSpec>,
    /// The names of the secrets the release gets (stored), and their values
    /// (in memory only: never serialized, never printed; pending in a
    /// release read back from the store until the coordinator sends them
    /// again).
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(skip)]
    pub secret_values: SecretSlot,
}

/// A web release's drain timeout when its spec names none; also that of
/// releases recorded before releases carried their own.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}

/// Signals by name ("SIGTERM") in stored records.
mod signal_name {
    use std::str::FromStr;

    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(signal.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(d)?;
        Signal::from_str(&name)
            .map_err(|_| serde::de::Error::custom(format!("unknown signal {name:?}")))
    }
}

/// Node-level settings of a web service.
#[derive(Debug, Clone)]
pub struct WebServiceSettings {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Starting,
    HealthChecking,
    SmokeTesting,
    Switching,
    Draining,
    StoppingOld,
}

#[derive(Debug)]
pub struct CutoverReport {
    pub release_id: String,
    pub addr: SocketAddr,
    pub healthy: Healthy,
    /// None when no release served before.
    pub previous: Option<PreviousRelease>,
    pub took: Duration,
}

#[derive(Debug)]
pub struct PreviousRelease {
    pub release_id: String,
    pub drain: DrainReport,
    pub stop: StopReport,
}

#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("no free port for release {release_id} in {first}-{last} on {address}")]
    NoPort {
        release_id: String,
        address: IpAddr,
        first: u16,
        last: u16,
    },
    #[error(transparent)]
    Start(#[from] ProcessError),
    #[error("cannot record the cutover of service {service}: {error}")]
    Store { service: String, error: StoreError },
    #[error("release {release_id} is not healthy, {} keeps serving: {failure}{}", describe_serving(.serving), describe_crash(.crashed))]
    Unhealthy {
        release_id: String,
        serving: Option<String>,
        failure: Unhealthy,
        /// How the process last exited, when it crashed during the checks.
        crashed: Option<String>,
    },
    #[error("release {release_id} did not stay up for {}, {} keeps serving: {exit}", humantime::format_duration(*.min_healthy_time), describe_serving(.serving))]
    NotStable {
        release_id: String,
        serving: Option<String>,
        min_healthy_time: Duration,
        exit: String,
    },
    #[error("release {release_id} failed smoke check {check}, {} keeps serving: {}", describe_serving(.serving), .outcome.detail)]
    SmokeFailed {
        release_id: String,
        serving: Option<String>,
        check: String,
        outcome: Outcome,
    },
}

fn describe_serving(release: &Option<String>) -> String {
    match release {
        Some(release) => format!("release {release}"),
        None => "nothing".to_string(),
    }
}

fn describe_crash(crashed: &Option<String>) -> String {
    crashed
        .as_ref()
        .map(|exit| format!(" (the process crashed: {exit})"))
        .unwrap_or_default()
}

struct Running {
    release_id: String,
    addr: SocketAddr,
    spec: WebRelease,
    supervisor: Supervisor,
    /// The last health check of the serving release.
    health: Arc<std::sync::Mutex<Option<Outcome>>>,
    /// Ends the health monitor when this release stops serving.
    _monitor: DropGuard,
}

/// Stops what an interrupted cutover (or stop) of `service` left running.
pub async fn stop_leftovers(service: &str, leftovers: &[Leftover], engine: &DockerEngine) {
    for leftover in leftovers {
        let signal = Signal::from_str(&leftover.stop_signal).unwrap_or(Signal::SIGTERM);
        if let Some(report) = stop_leftover(
            &leftover.release_id,
            leftover.instance.clone(),
            signal,
            leftover.stop_grace,
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

/// Waits `time` while the release's process stays up without a crash;
/// the error says how it went down.
async fn stays_up(supervisor: &Supervisor, time: Duration) -> Result<(), String> {
    if time.is_zero() {
        return Ok(());
    }
    let mut status = supervisor.watch();
    let end = tokio::time::sleep(time);
    tokio::pin!(end);
    loop {
        {
            let now = status.borrow_and_update();
            if now.crashes > 0 || now.instance.is_none() {
                return Err(now.last_exit.clone().unwrap_or_else(|| "it exited".into()));
            }
        }
        tokio::select! {
            _ = &mut end => return Ok(()),
            changed = status.changed() => if changed.is_err() {
                return Err("its supervision ended".into());
            }
        }
    }
}

/// Keeps checking a serving release with its health check, every gate
/// interval (at least a second): a release that turns unhealthy after its
/// cutover shows in heartbeats and `cutover nodes`.
fn monitor_health(
    service: &str,
    release: &WebRelease,
    target: Target,
) -> (Arc<std::sync::Mutex<Option<Outcome>>>, DropGuard) {
    let health = Arc::new(std::sync::Mutex::new(None));
    let stop = CancellationToken::new();
    let Some(check) = release.health.clone() else {
        // A worker without a check: its process status is its health.
        return (health, stop.drop_guard());
    };
    let every = release.gate.interval.max(Duration::from_secs(1));
    let (service, release_id, last) = (
        service.to_string(),
        release.release_id.clone(),
        health.clone(),
    );
    let token = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let outcome = check.run(&target).await;
            let was = last
                .lock()
                .expect("health lock")
                .as_ref()
                .map(|o: &Outcome| o.passed);
            match (was, outcome.passed) {
                (Some(true) | None, false) => {
                    tracing::warn!(%service, release = %release_id, detail = %outcome.detail, "serving release is unhealthy")
                }
                (Some(false), true) => {
                    tracing::info!(%service, release = %release_id, "serving release is healthy again")
                }
                _ => {}
            }
            *last.lock().expect("health lock") = Some(outcome);
        }
    });
    (health, stop.drop_guard())
}

/// One service on this node: the release it serves and, for a web
/// service, its proxy (workers have none).
pub struct WebService {
    settings: WebServiceSettings,
    proxy: Option<Proxy>,
    store: Arc<AgentStore>,
    active: Option<Running>,
}

fn process_spec(settings: &WebServiceSettings, release: &WebRelease, port: u16) -> ProcessSpec {
    ProcessSpec {
        name: release.release_id.clone(),
        command: release.command.clone(),
        workdir: release.workdir.clone(),
        env: release_env(settings, release, port),
        stop_signal: release.stop_signal,
        stop_grace: release.stop_grace,
        stop_command: release.stop_command.clone(),
        stop_timeout: release.stop_timeout,
        log_dir: settings.log_root.join(&release.release_id),
        log_max_bytes: settings.log_max_bytes,
        log_keep: settings.log_keep,
        restart_min: Duration::from_secs(1),
        restart_max: Duration::from_secs(30),
        container: release.container.clone().map(|spec| ContainerLaunch {
            engine: settings.docker.clone(),
            spec,
            address: settings.address,
            port,
        }),
        secrets: if release.secrets.is_empty() {
            SecretSlot::ready(Vec::new())
        } else {
            release.secret_values.clone()
        },
    }
}

/// Where checks reach a release, and the environment exec checks run with
/// (the release's, its secrets included once known).
fn check_target(settings: &WebServiceSettings, release: &WebRelease, port: u16) -> Target {
    let mut env = release_env(settings, release, port);
    env.extend(release.secret_values.values().unwrap_or_default());
    Target {
        addr: SocketAddr::new(settings.address, port),
        workdir: release.workdir.clone(),
        env,
    }
}

/// The release environment plus where to listen (port 0: a worker, which
/// listens nowhere).
fn release_env(
    settings: &WebServiceSettings,
    release: &WebRelease,
    port: u16,
) -> Vec<(String, String)> {
    let mut env = release.env.clone();
    env.push(("HOST".into(), settings.address.to_string()));
    if port != 0 {
        env.push(("PORT".into(), port.to_string()));
    }
    env
}

impl WebService {
    /// A service with nothing running yet, or what the store says ran before
    /// the agent restarted: the recorded process is adopted if it still
    /// runs, started again (and health-gated) if not, and the proxy serves it.
    pub async fn recover(
        settings: WebServiceSettings,
        proxy: Option<Proxy>,
        store: Arc<AgentStore>,
    ) -> Result<Self, CutoverError> {
        let mut service = Self {
            proxy,
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
        if let Some(proxy) = &service.proxy {
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
                    if let Err(failure) = active.release.gate.wait(check, &target).await {
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
            .proxy
            .as_ref()
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
        self.proxy.as_ref()
    }

    /// The proxy's address; `None` for a worker.
    fn listen(&self) -> Option<SocketAddr> {
        self.proxy.as_ref().map(Proxy::local_addr)
    }

    /// Whether an external load balancer may send traffic (always for a
    /// worker, which has none).
    fn admitted(&self) -> bool {
        self.proxy.as_ref().is_none_or(Proxy::admitted)
    }

    /// The release serving now and where it listens.
    pub fn active(&self) -> Option<(&str, SocketAddr)> {
        self.active
            .as_ref()
            .map(|r| (r.release_id.as_str(), r.addr))
    }

    /// Replaces the active release with `release` (see the module docs).
    /// `progress` hears each step as it starts.
    pub async fn cutover(
        &mut self,
        release: WebRelease,
        progress: impl Fn(Step),
    ) -> Result<CutoverReport, CutoverError> {
        let started = Instant::now();
        let settings = &self.settings;
        progress(Step::Starting);
        let port = if self.proxy.is_some() {
            let mut taken: Vec<u16> = self.active.iter().map(|r| r.addr.port()).collect();
            // Other services' releases too, even one down waiting for its restart.
            taken.extend(self.store.ports_in_use().unwrap_or_default());
            allocate_port(settings.address, &settings.ports, &taken).ok_or_else(|| {
                CutoverError::NoPort {
                    release_id: release.release_id.clone(),
                    address: settings.address,
                    first: *settings.ports.start(),
                    last: *settings.ports.end(),
                }
            })?
        } else {
            0
        };
        let addr = SocketAddr::new(settings.address, port);
        let supervisor = Supervisor::start(process_spec(settings, &release, port)).await?;
        if let Some(instance) = supervisor.status().instance {
            let candidate = Leftover {
                release_id: release.release_id.clone(),
                port,
                instance,
                stop_signal: release.stop_signal.as_str().to_string(),
                stop_grace: release.stop_grace,
            };
            if let Err(error) = self.note_leftovers(vec![candidate]) {
                supervisor.stop().await;
                return Err(CutoverError::Store {
                    service: self.settings.name.clone(),
                    error,
                });
            }
        }
        self.track(&release.release_id, port, &supervisor);
        let target = check_target(settings, &release, port);
        let serving = self.active.as_ref().map(|r| r.release_id.clone());

        progress(Step::HealthChecking);
        let checked = match &release.health {
            Some(check) => release.gate.wait(check, &target).await,
            None => Ok(Healthy {
                attempts: 0,
                took: Duration::ZERO,
            }),
        };
        let healthy = match checked {
            Ok(healthy) => healthy,
            Err(failure) => {
                let crashed = supervisor.status().last_exit;
                supervisor.stop().await;
                self.forget_leftovers();
                return Err(CutoverError::Unhealthy {
                    release_id: release.release_id,
                    serving,
                    failure,
                    crashed,
                });
            }
        };
        if let Err(exit) = stays_up(&supervisor, release.min_healthy_time).await {
            supervisor.stop().await;
            self.forget_leftovers();
            return Err(CutoverError::NotStable {
                release_id: release.release_id,
                serving,
                min_healthy_time: release.min_healthy_time,
                exit,
            });
        }

        progress(Step::SmokeTesting);
        for check in &release.smoke {
            let outcome = check.run(&target).await;
            if !outcome.passed {
                supervisor.stop().await;
                self.forget_leftovers();
                return Err(CutoverError::SmokeFailed {
                    release_id: release.release_id,
                    serving,
                    check: check.describe(),
                    outcome,
                });
            }
        }

        progress(Step::Switching);
        // Recorded before the switch: a crash right after it must find B,
        // the release that serves, in the store, and A, drained next, as a
        // leftover to stop.
        let active = ActiveRelease {
            release: release.clone(),
            port,
            instance: supervisor.status().instance,
        };
        let retiring: Vec<Leftover> = self
            .active
            .as_ref()
            .and_then(Running::as_leftover)
            .into_iter()
            .collect();
        let written = self.store.update_service(&self.settings.name, |current| {
            let mut record = self.record(current.as_ref(), Some(active), serving.clone());
            record.leftovers = retiring;
            Some(record)
        });
        if let Err(error) = written {
            supervisor.stop().await;
            self.forget_leftovers();
            return Err(CutoverError::Store {
                service: self.settings.name.clone(),
                error,
            });
        }
        let release_id = release.release_id.clone();
        // B's own: what the operator chose for the release deployed now.
        let drain_timeout = release.drain_timeout;
        let (old, old_upstream) = self.serve(release, port, supervisor);
        let previous = match old {
            Some(old) => {
                let drain = match old_upstream {
                    Some(upstream) => {
                        progress(Step::Draining);
                        upstream.drain(drain_timeout).await
                    }
                    None => NOTHING_TO_DRAIN,
                };
                progress(Step::StoppingOld);
                let stop = old.supervisor.stop().await;
                self.forget_leftovers();
                Some(PreviousRelease {
                    release_id: old.release_id,
                    drain,
                    stop,
                })
            }
            _ => None,
        };
        tracing::info!(service = %self.settings.name, release = %release_id, %addr, took_ms = started.elapsed().as_millis() as u64, "cutover done");
        Ok(CutoverReport {
            release_id,
            addr,
            healthy,
            previous,
            took: started.elapsed(),
        })
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
        let Some(proxy) = &self.proxy else {
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
                let stats = self.proxy.as_ref()?.release_stats(&r.release_id)?;
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
        }
    }

    /// Leaves the release running and stops supervising it, for the next
    /// agent to adopt: an agent shutdown keeps the node serving.
    pub async fn release(self) {
        if let Some(running) = self.active {
            running.supervisor.release().await;
        }
        if let Some(proxy) = self.proxy {
            proxy.close().await;
        }
    }

    /// Stops serving: the proxy answers 502 from now on, in-flight requests
    /// drain, the release stops.
    pub async fn stop(&mut self) -> Option<PreviousRelease> {
        let upstream = self.proxy.as_ref().and_then(|proxy| proxy.switch(None));
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
        let drain = match upstream {
            Some(upstream) => upstream.drain(running.spec.drain_timeout).await,
            None => NOTHING_TO_DRAIN,
        };
        let stop = running.supervisor.stop().await;
        self.forget_leftovers();
        Some(PreviousRelease {
            release_id: running.release_id,
            drain,
            stop,
        })
    }
}
