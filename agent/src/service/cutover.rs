//! Zero-downtime cutover of one service on one node, as a pipeline of
//! steps:
//!
//! 1. start B beside A on a free port (each of its processes on one);
//! 2. health-check B until it passes `healthy_threshold` times in a row,
//!    within `healthy_deadline`;
//! 3. run the smoke checks against B;
//! 4. switch the node proxy to B, atomically;
//! 5. drain A: requests in flight to A finish, up to B's `drain_timeout`;
//! 6. stop A.
//!
//! If anything fails before 4, B is stopped and A keeps serving, untouched:
//! the proxy never pointed anywhere but at a release that passed its checks.
//! One place does that (`Candidate::abandon`), whichever step failed.
//!
//! Steps 1 to 3 (with the hooks around them) are `launch`, which staging a
//! side release (`side`) shares: a side release passes the same checks, it
//! just is not switched to.
//!
//! With `keep_previous`, A is not drained and stopped in 5 and 6 but kept
//! running as the side release at weight 0, until the agent retires it.
//!
//! A worker (a service without a port, like a queue consumer) has no proxy:
//! B starts, must pass its exec check (if it has one) and stay up for its
//! `min_healthy_time`, then A is asked to stop with its stop command and
//! given `stop_timeout` to finish its jobs and exit by itself.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::health::stays_up;
use super::hooks::{self, HookFailure};
use super::release::{check_target, process_spec};
use super::side::{side_record, Side};
use super::{
    drain, upstream_of, KeepPrevious, PreviousRelease, Running, Service, ServiceKind, WebRelease,
};
use crate::checks::{self, Healthy, Outcome, Target, Unhealthy};
use crate::proxy::cohort::Cohorts;
use crate::runtime::supervisor::{ProcessError, Supervisor};
use crate::store::{ActiveRelease, InstanceRecord, Instances, Leftover, SideRecord, StoreError};
use cutover_common::net::allocate_port;
use cutover_common::release::HookPoint;

/// The steps of a cutover, reported as each starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Starting,
    HealthChecking,
    SmokeTesting,
    Switching,
    Draining,
    StoppingOld,
    PreActivate,
    PostActivate,
}

impl Step {
    /// The name progress reports carry (the coordinator reads them).
    pub fn name(self) -> &'static str {
        match self {
            Step::Starting => "starting",
            Step::HealthChecking => "health_checking",
            Step::SmokeTesting => "smoke_testing",
            Step::Switching => "switching",
            Step::Draining => "draining",
            Step::StoppingOld => "stopping_old",
            Step::PreActivate => "pre_activate",
            Step::PostActivate => "post_activate",
        }
    }
}

#[derive(Debug)]
pub struct CutoverReport {
    pub release_id: String,
    pub addr: SocketAddr,
    pub healthy: Healthy,
    /// The release that served before, drained and stopped; none when
    /// nothing served or when it was kept.
    pub previous: Option<PreviousRelease>,
    /// The release that served before, kept running as the side release
    /// (`keep_previous`).
    pub kept: Option<String>,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("no free port for release {release_id} in {first}-{last} on {address}; widen `port_range` in the agent config, or stop what holds those ports (`ss -ltn`)")]
    NoPort {
        release_id: String,
        address: IpAddr,
        first: u16,
        last: u16,
    },
    #[error(transparent)]
    Start(#[from] ProcessError),
    #[error("cannot record the cutover of service {service}: {error}; nothing switched (is the disk of the agent's state dir full or read-only?)")]
    Store { service: String, error: StoreError },
    #[error("release {release_id}{process} is not healthy, {} keeps serving: {failure}{}", describe_serving(.serving), describe_crash(.crashed))]
    Unhealthy {
        release_id: String,
        /// Which of its processes, when it runs more than one.
        process: String,
        serving: Option<String>,
        failure: Unhealthy,
        /// How the process last exited, when it crashed during the checks.
        crashed: Option<String>,
    },
    #[error("release {release_id}{process} did not stay up for {}, {} keeps serving: {exit}", humantime::format_duration(*.min_healthy_time), describe_serving(.serving))]
    NotStable {
        release_id: String,
        process: String,
        serving: Option<String>,
        min_healthy_time: Duration,
        exit: String,
    },
    #[error("release {release_id} failed its queue gate, {} keeps working: {failure}", describe_serving(.serving))]
    NotConsuming {
        release_id: String,
        serving: Option<String>,
        failure: String,
    },
    #[error("release {release_id}'s {failure}, {} keeps serving", describe_serving(.serving))]
    HookFailed {
        release_id: String,
        serving: Option<String>,
        failure: HookFailure,
    },
    #[error("release {release_id}{process} failed smoke check {check}, {} keeps serving: {}", describe_serving(.serving), .outcome.detail)]
    SmokeFailed {
        release_id: String,
        process: String,
        serving: Option<String>,
        check: String,
        outcome: Outcome,
    },
    #[error("service {service} is a worker: it has no proxy to divide traffic in; activate release {release_id} instead")]
    WorkerSide { service: String, release_id: String },
    #[error("nothing serves service {service} on this node yet, so release {release_id} has nothing to run beside; activate a release first")]
    NothingServes { service: String, release_id: String },
    #[error(
        "release {release_id} already serves service {service}; stage another release beside it"
    )]
    AlreadyServes { service: String, release_id: String },
    #[error("release {release_id} is not the side release of service {service} ({}); stage it first", describe_side(.side))]
    NotSide {
        service: String,
        release_id: String,
        side: Option<String>,
    },
}

fn describe_side(side: &Option<String>) -> String {
    match side {
        Some(side) => format!("its side release is {side}"),
        None => "it has none".to_string(),
    }
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

/// The release a cutover started, until it serves. Whatever fails before
/// the switch ends in `abandon`, the one place that stops it and forgets it
/// as a leftover. (Not a drop guard: stopping is async, and a cutover cut
/// short by an agent shutdown must leave it recorded for the next agent to
/// stop, as any process the agent leaves behind.)
pub(super) struct Candidate {
    pub(super) release: WebRelease,
    /// Its processes (`WebRelease::instances` of them), each on a port of
    /// its own (a worker's: 0).
    pub(super) processes: Vec<Process>,
    /// The release serving while this one is checked, for messages.
    serving: Option<String>,
}

/// One process of a candidate release.
pub(super) struct Process {
    pub(super) port: u16,
    pub(super) supervisor: Supervisor,
    /// Where the checks reach it.
    target: Target,
}

impl Candidate {
    pub(super) async fn abandon(self, service: &Service) {
        stop_all(self.processes).await;
        service.forget_leftovers();
    }

    /// Its processes as a release that serves (or runs beside) takes them.
    pub(super) fn into_parts(self) -> (WebRelease, Vec<(u16, Supervisor)>) {
        let processes = self
            .processes
            .into_iter()
            .map(|p| (p.port, p.supervisor))
            .collect();
        (self.release, processes)
    }

    /// Which of its processes the `index`th is, for a message: nothing when
    /// it has one, " (process 2 of 3 on port 41234)" (a worker's: no port)
    /// when it has more, so the operator knows whose log to read.
    fn describe_process(&self, index: usize) -> String {
        let count = self.processes.len();
        if count <= 1 {
            return String::new();
        }
        let port = self.processes.get(index).map_or(0, |p| p.port);
        let on = match port {
            0 => String::new(),
            port => format!(" on port {port}"),
        };
        format!(" (process {} of {count}{on})", index + 1)
    }

    /// Its processes as the store records them.
    pub(super) fn record(&self) -> Instances {
        Instances(
            self.processes
                .iter()
                .map(|p| InstanceRecord {
                    port: p.port,
                    instance: p.supervisor.status().instance,
                })
                .collect(),
        )
    }
}

async fn stop_all(processes: Vec<Process>) {
    futures_util::future::join_all(processes.into_iter().map(|p| p.supervisor.stop())).await;
}

impl Service {
    /// Replaces the active release with `release` (see the module docs).
    /// `progress` hears each step as it starts.
    pub async fn cutover(
        &mut self,
        release: WebRelease,
        progress: impl Fn(Step),
    ) -> Result<CutoverReport, CutoverError> {
        self.replace(release, KeepPrevious::Stop, progress).await
    }

    /// A cutover to `release` that, as `keep_previous` says (a web service
    /// that served), keeps the release it replaces running as the side
    /// release at weight 0 (for a while, or warm) instead of stopping it. A
    /// side release running before is drained and stopped first.
    pub async fn replace(
        &mut self,
        release: WebRelease,
        keep_previous: KeepPrevious,
        progress: impl Fn(Step),
    ) -> Result<CutoverReport, CutoverError> {
        let started = Instant::now();
        self.retire_side().await;
        let (candidate, healthy) = self.launch(release, &progress).await?;
        progress(Step::Switching);
        let keep_until = keep_previous
            .retire_at_ms()
            .filter(|_| self.kind.proxy().is_some());
        let kept = match (&self.active, keep_until) {
            (Some(old), Some(at)) => Some(side_record(old, Cohorts::standby().split(), at)),
            _ => None,
        };
        if let Err(error) = self.record_switch(&candidate, kept) {
            candidate.abandon(self).await;
            return Err(self.store_error(error));
        }
        let (release, processes) = candidate.into_parts();
        let release_id = release.release_id.clone();
        let addr = SocketAddr::new(self.settings.address, processes[0].0);
        // B's own: what the operator chose for the release deployed now.
        let drain_timeout = release.drain_timeout;
        let old = self.serve(release, processes);
        let (mut previous, mut kept) = (None, None);
        match (old, keep_until) {
            (Some(old), Some(retire_at_ms)) => {
                kept = Some(old.release_id.clone());
                self.side = Some(Side {
                    running: old,
                    cohorts: Cohorts::standby(),
                    retire_at_ms,
                });
                self.reroute();
            }
            (Some(old), None) => {
                let upstream = upstream_of(self.reroute(), &old);
                if upstream.is_some() {
                    progress(Step::Draining);
                }
                let drained = drain(upstream, drain_timeout).await;
                progress(Step::StoppingOld);
                previous = Some(self.stop_old(old, drained).await);
            }
            (None, _) => {
                self.reroute();
            }
        }
        tracing::info!(service = %self.settings.name, release = %release_id, %addr, kept = ?kept, took_ms = started.elapsed().as_millis() as u64, "cutover done");
        Ok(CutoverReport {
            release_id,
            addr,
            healthy,
            previous,
            kept,
            took: started.elapsed(),
        })
    }

    /// Runs `release`'s pre_activate hook, starts it beside what serves and
    /// vets it (health gate, smoke checks, post_activate hook): what a
    /// cutover and a stage share. Whatever fails leaves nothing running.
    pub(super) async fn launch(
        &self,
        release: WebRelease,
        progress: &impl Fn(Step),
    ) -> Result<(Candidate, Healthy), CutoverError> {
        if hooks::has(&release, HookPoint::PreActivate) {
            progress(Step::PreActivate);
            hooks::run(
                &release,
                HookPoint::PreActivate,
                self.settings.address,
                None,
            )
            .await
            .map_err(|failure| CutoverError::HookFailed {
                release_id: release.release_id.clone(),
                serving: self.active.as_ref().map(|a| a.release_id.clone()),
                failure,
            })?;
        }
        progress(Step::Starting);
        let candidate = self.start(release).await?;
        match self.vet(&candidate, progress).await {
            Ok(healthy) => Ok((candidate, healthy)),
            Err(error) => {
                candidate.abandon(self).await;
                Err(error)
            }
        }
    }

    /// The steps between starting B and serving it: each error leaves B to
    /// be abandoned.
    async fn vet(
        &self,
        candidate: &Candidate,
        progress: &impl Fn(Step),
    ) -> Result<Healthy, CutoverError> {
        progress(Step::HealthChecking);
        let healthy = health_gate(candidate).await?;
        let release = &candidate.release;
        if let Some((probe, window)) = release
            .queues
            .as_ref()
            .and_then(|probe| probe.gate.map(|window| (probe, window)))
        {
            crate::queues::consuming(probe, &release.secret_values, window)
                .await
                .map_err(|failure| CutoverError::NotConsuming {
                    release_id: release.release_id.clone(),
                    serving: candidate.serving.clone(),
                    failure,
                })?;
        }
        progress(Step::SmokeTesting);
        smoke(candidate).await?;
        if hooks::has(&candidate.release, HookPoint::PostActivate) {
            progress(Step::PostActivate);
            // The hook talks to the release once, through its first process.
            let port = Some(candidate.processes[0].port).filter(|p| *p != 0);
            hooks::run(
                &candidate.release,
                HookPoint::PostActivate,
                self.settings.address,
                port,
            )
            .await
            .map_err(|failure| CutoverError::HookFailed {
                release_id: candidate.release.release_id.clone(),
                serving: candidate.serving.clone(),
                failure,
            })?;
        }
        Ok(healthy)
    }

    /// Starts B's processes beside A, each on a port of its own (a
    /// worker's listen nowhere), recorded as leftovers until B serves. One
    /// that cannot start stops those started before it.
    async fn start(&self, release: WebRelease) -> Result<Candidate, CutoverError> {
        let mut candidate = Candidate {
            serving: self.active.as_ref().map(|r| r.release_id.clone()),
            processes: Vec::new(),
            release,
        };
        let mut taken = Vec::new();
        for _ in 0..candidate.release.instances.max(1) {
            match self.start_process(&candidate.release, &mut taken).await {
                Ok(process) => candidate.processes.push(process),
                Err(error) => {
                    candidate.abandon(self).await;
                    return Err(error);
                }
            }
        }
        let leftovers = candidate.record().leftovers(&candidate.release);
        if let Err(error) = self.note_leftovers(leftovers) {
            candidate.abandon(self).await;
            return Err(self.store_error(error));
        }
        for (index, process) in candidate.processes.iter().enumerate() {
            let release_id = &candidate.release.release_id;
            self.track(release_id, index, process.port, &process.supervisor);
        }
        Ok(candidate)
    }

    /// Starts one process of `release` on a free port, not one in `taken`
    /// (the ports its other processes took), which gains it.
    async fn start_process(
        &self,
        release: &WebRelease,
        taken: &mut Vec<u16>,
    ) -> Result<Process, CutoverError> {
        let port = match self.kind {
            ServiceKind::Web(_) => self.free_port(taken).ok_or_else(|| CutoverError::NoPort {
                release_id: release.release_id.clone(),
                address: self.settings.address,
                first: *self.settings.ports.start(),
                last: *self.settings.ports.end(),
            })?,
            ServiceKind::Worker => 0,
        };
        taken.push(port);
        let supervisor = Supervisor::start(process_spec(&self.settings, release, port)).await?;
        Ok(Process {
            port,
            supervisor,
            target: check_target(&self.settings, release, port),
        })
    }

    /// A port on the node's address that no release uses, nor `also`, if
    /// one is left.
    fn free_port(&self, also: &[u16]) -> Option<u16> {
        let settings = &self.settings;
        let side = self.side.iter().map(|s| &s.running);
        let mut taken: Vec<u16> = self
            .active
            .iter()
            .chain(side)
            .flat_map(|r| r.instances.iter().map(|i| i.addr.port()))
            .collect();
        taken.extend_from_slice(also);
        // Other services' releases too, even one down waiting for its restart.
        taken.extend(self.store.ports_in_use().unwrap_or_default());
        allocate_port(settings.address, &settings.ports, &taken)
    }

    /// Records B as the release that serves, before the switch: a crash
    /// right after it must find B in the store, and A, drained next, as a
    /// leftover to stop (or as the side release, when `kept`).
    fn record_switch(
        &self,
        candidate: &Candidate,
        kept: Option<SideRecord>,
    ) -> Result<(), StoreError> {
        let active = ActiveRelease {
            release: candidate.release.clone(),
            instances: candidate.record(),
        };
        let retiring: Vec<Leftover> = match kept {
            Some(_) => Vec::new(),
            None => self
                .active
                .as_ref()
                .map(Running::as_leftovers)
                .unwrap_or_default(),
        };
        self.store.update_service(&self.settings.name, |current| {
            let mut record = self.record(current.as_ref(), Some(active), candidate.serving.clone());
            record.leftovers = retiring;
            record.side = kept;
            Some(record)
        })
    }

    pub(super) fn store_error(&self, error: StoreError) -> CutoverError {
        CutoverError::Store {
            service: self.settings.name.clone(),
            error,
        }
    }
}

/// Each of B's processes passes its health check `healthy_threshold` times
/// in a row within the deadline (a worker without one: at once), then
/// stays up for its `min_healthy_time`; all checked at once. The figures
/// reported are the slowest process's.
async fn health_gate(candidate: &Candidate) -> Result<Healthy, CutoverError> {
    let gates = candidate
        .processes
        .iter()
        .enumerate()
        .map(|(index, process)| process_gate(candidate, index, process));
    let mut slowest = Healthy {
        attempts: 0,
        took: Duration::ZERO,
    };
    for healthy in futures_util::future::join_all(gates).await {
        let healthy = healthy?;
        if healthy.took >= slowest.took {
            slowest = healthy;
        }
    }
    Ok(slowest)
}

async fn process_gate(
    candidate: &Candidate,
    index: usize,
    process: &Process,
) -> Result<Healthy, CutoverError> {
    let release = &candidate.release;
    let checked = match &release.health {
        Some(check) => checks::wait(&release.gate, check, &process.target).await,
        None => Ok(Healthy {
            attempts: 0,
            took: Duration::ZERO,
        }),
    };
    let healthy = checked.map_err(|failure| CutoverError::Unhealthy {
        release_id: release.release_id.clone(),
        process: candidate.describe_process(index),
        serving: candidate.serving.clone(),
        failure,
        crashed: process.supervisor.status().last_exit,
    })?;
    stays_up(&process.supervisor, release.min_healthy_time)
        .await
        .map_err(|exit| CutoverError::NotStable {
            release_id: release.release_id.clone(),
            process: candidate.describe_process(index),
            serving: candidate.serving.clone(),
            min_healthy_time: release.min_healthy_time,
            exit,
        })?;
    Ok(healthy)
}

/// Each of B's processes passes every smoke check, in order; the first
/// failure ends it.
async fn smoke(candidate: &Candidate) -> Result<(), CutoverError> {
    for (index, process) in candidate.processes.iter().enumerate() {
        for check in &candidate.release.smoke {
            let outcome = checks::run(check, &process.target).await;
            if !outcome.passed {
                return Err(CutoverError::SmokeFailed {
                    release_id: candidate.release.release_id.clone(),
                    process: candidate.describe_process(index),
                    serving: candidate.serving.clone(),
                    check: check.describe(),
                    outcome,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn steps_report_the_names_the_coordinator_reads() {
        let steps = [
            Step::Starting,
            Step::HealthChecking,
            Step::SmokeTesting,
            Step::Switching,
            Step::Draining,
            Step::StoppingOld,
        ];
        let names: Vec<&str> = steps.into_iter().map(Step::name).collect();
        assert_eq!(
            names,
            [
                "starting",
                "health_checking",
                "smoke_testing",
                "switching",
                "draining",
                "stopping_old"
            ]
        );
    }
}
