//! Zero-downtime cutover of one web service on one node.
//!
//! 1. start B beside A on a free port;
//! 2. health-check B until it passes `healthy_threshold` times in a row,
//!    within `healthy_deadline`;
//! 3. run the smoke checks against B;
//! 4. switch the node proxy to B, atomically;
//! 5. drain A: requests in flight to A finish, up to `drain_timeout`;
//! 6. stop A.
//!
//! If 2 or 3 fails, B is stopped and A keeps serving, untouched: the proxy
//! never pointed anywhere but at a release that passed its checks.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::checks::{Check, HealthGate, Healthy, Outcome, Target, Unhealthy};
use crate::proxy::{DrainReport, Proxy};
use crate::runtime::allocate_port;
use crate::runtime::process::{ProcessError, ProcessSpec, StopReport, Supervisor};

/// A release of a web service, unpacked and ready to start.
#[derive(Debug, Clone)]
pub struct WebRelease {
    pub release_id: String,
    pub command: Vec<String>,
    /// The unpacked release dir; the command runs there.
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub health: Check,
    pub gate: HealthGate,
    pub smoke: Vec<Check>,
    pub stop_signal: Signal,
    pub stop_grace: Duration,
}

/// Node-level settings of a web service.
#[derive(Debug, Clone)]
pub struct WebServiceSettings {
    pub name: String,
    /// The node's address: releases bind here, on a port from `ports`.
    pub address: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub drain_timeout: Duration,
    /// Each release logs to `<log_root>/<release id>/`.
    pub log_root: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
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
    #[error("release {release_id} is not healthy, {} keeps serving: {failure}{}", describe_serving(.serving), describe_crash(.crashed))]
    Unhealthy {
        release_id: String,
        serving: Option<String>,
        failure: Unhealthy,
        /// How the process last exited, when it crashed during the checks.
        crashed: Option<String>,
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
    supervisor: Supervisor,
}

/// One web service on this node: its proxy and the release it serves.
pub struct WebService {
    settings: WebServiceSettings,
    proxy: Proxy,
    active: Option<Running>,
}

impl WebService {
    pub fn new(settings: WebServiceSettings, proxy: Proxy) -> Self {
        Self {
            settings,
            proxy,
            active: None,
        }
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
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
        let taken: Vec<u16> = self.active.iter().map(|r| r.addr.port()).collect();
        let port = allocate_port(settings.address, &settings.ports, &taken).ok_or_else(|| {
            CutoverError::NoPort {
                release_id: release.release_id.clone(),
                address: settings.address,
                first: *settings.ports.start(),
                last: *settings.ports.end(),
            }
        })?;
        let addr = SocketAddr::new(settings.address, port);
        let mut env = release.env.clone();
        env.push(("HOST".into(), settings.address.to_string()));
        env.push(("PORT".into(), port.to_string()));
        let supervisor = Supervisor::start(ProcessSpec {
            name: release.release_id.clone(),
            command: release.command.clone(),
            workdir: release.workdir.clone(),
            env: env.clone(),
            stop_signal: release.stop_signal,
            stop_grace: release.stop_grace,
            log_dir: settings.log_root.join(&release.release_id),
            log_max_bytes: settings.log_max_bytes,
            log_keep: settings.log_keep,
            restart_min: Duration::from_secs(1),
            restart_max: Duration::from_secs(30),
        })
        .await?;
        let target = Target {
            addr,
            workdir: release.workdir.clone(),
            env,
        };
        let serving = self.active.as_ref().map(|r| r.release_id.clone());

        progress(Step::HealthChecking);
        let healthy = match release.gate.wait(&release.health, &target).await {
            Ok(healthy) => healthy,
            Err(failure) => {
                let crashed = supervisor.status().last_exit;
                supervisor.stop().await;
                return Err(CutoverError::Unhealthy {
                    release_id: release.release_id,
                    serving,
                    failure,
                    crashed,
                });
            }
        };

        progress(Step::SmokeTesting);
        for check in &release.smoke {
            let outcome = check.run(&target).await;
            if !outcome.passed {
                supervisor.stop().await;
                return Err(CutoverError::SmokeFailed {
                    release_id: release.release_id,
                    serving,
                    check: check.describe(),
                    outcome,
                });
            }
        }

        progress(Step::Switching);
        let old_upstream = self.proxy.switch(Some((&release.release_id, addr)));
        let old = self.active.replace(Running {
            release_id: release.release_id.clone(),
            addr,
            supervisor,
        });
        let previous = match (old, old_upstream) {
            (Some(old), Some(upstream)) => {
                progress(Step::Draining);
                let drain = upstream.drain(self.settings.drain_timeout).await;
                progress(Step::StoppingOld);
                let stop = old.supervisor.stop().await;
                Some(PreviousRelease {
                    release_id: old.release_id,
                    drain,
                    stop,
                })
            }
            _ => None,
        };
        tracing::info!(service = %self.settings.name, release = %release.release_id, %addr, took_ms = started.elapsed().as_millis() as u64, "cutover done");
        Ok(CutoverReport {
            release_id: release.release_id,
            addr,
            healthy,
            previous,
            took: started.elapsed(),
        })
    }

    /// Stops serving: the proxy answers 502 from now on, in-flight requests
    /// drain, the release stops.
    pub async fn stop(&mut self) -> Option<PreviousRelease> {
        let upstream = self.proxy.switch(None)?;
        let running = self.active.take()?;
        let drain = upstream.drain(self.settings.drain_timeout).await;
        let stop = running.supervisor.stop().await;
        Some(PreviousRelease {
            release_id: running.release_id,
            drain,
            stop,
        })
    }
}
