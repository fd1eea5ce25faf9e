//! A release a service runs, as its processes: each supervised, health
//! checked, and a backend of the release's upstream in the proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::DropGuard;

use super::health::{monitor_health, LastHealth};
use super::release::check_target;
use super::{Service, WebRelease};
use crate::checks;
use crate::proxy::{BackendSpec, RouteSpec};
use crate::runtime::supervisor::{StopReport, Supervisor};
use crate::store::{InstanceRecord, Instances, Leftover};

/// A release a service runs (the serving one, or the side one): its
/// processes (`WebRelease::instances`, never none) and its queue probe.
pub(super) struct Running {
    pub(super) release_id: String,
    pub(super) spec: WebRelease,
    pub(super) instances: Vec<Instance>,
    /// The last pass of its queue probe, if it has one.
    pub(super) queues: crate::queues::LastQueues,
    _queue_monitor: DropGuard,
}

/// One process of a running release, supervised, with its health monitor.
pub(super) struct Instance {
    pub(super) addr: SocketAddr,
    pub(super) supervisor: Supervisor,
    /// The last health check of the process.
    pub(super) health: LastHealth,
    /// Whether the proxy may send it requests (see `monitor_health`).
    pub(super) up: Arc<AtomicBool>,
    /// Ends the health monitor when this process stops.
    _monitor: DropGuard,
}

/// A running release's processes summed up, for reports.
pub(super) struct Summary {
    /// Processes that run.
    pub(super) running: u32,
    /// Of those, the ones the proxy may send requests to (see
    /// `monitor_health`).
    pub(super) up: u32,
    pub(super) crashes: u32,
    pub(super) last_exit: Option<String>,
    /// The first failed health check, else the first one.
    pub(super) health: Option<checks::Outcome>,
    pub(super) memory_bytes: u64,
}

impl Running {
    /// What the proxy routes to: the release's processes.
    pub(super) fn route(&self) -> RouteSpec {
        let backends = self
            .instances
            .iter()
            .map(|i| BackendSpec {
                addr: i.addr,
                up: Some(i.up.clone()),
            })
            .collect();
        RouteSpec::to(&self.release_id, backends)
    }

    /// Where its first process listens: what reports name.
    pub(super) fn addr(&self) -> SocketAddr {
        self.instances[0].addr
    }

    /// Its processes as the store records them.
    pub(super) fn record(&self) -> Instances {
        Instances(
            self.instances
                .iter()
                .map(|i| InstanceRecord {
                    port: i.addr.port(),
                    instance: i.supervisor.status().instance,
                })
                .collect(),
        )
    }

    /// This release's processes as leftovers to stop should the agent die
    /// before it does (it is being drained).
    pub(super) fn as_leftovers(&self) -> Vec<Leftover> {
        self.record().leftovers(&self.spec)
    }

    pub(super) fn summary(&self) -> Summary {
        let mut summary = Summary {
            running: 0,
            up: 0,
            crashes: 0,
            last_exit: None,
            health: None,
            memory_bytes: 0,
        };
        for instance in &self.instances {
            let status = instance.supervisor.status();
            let health = instance.health.lock().expect("health lock").clone();
            let healthy = health.as_ref().is_none_or(|o| o.passed);
            if let Some(id) = &status.instance {
                summary.running += 1;
                summary.up += u32::from(instance.up.load(Ordering::Relaxed));
                summary.memory_bytes += crate::runtime::memory::resident_bytes(id).unwrap_or(0);
            }
            summary.crashes += status.crashes;
            summary.last_exit = status.last_exit.or(summary.last_exit);
            let first_failure = summary.health.as_ref().is_none_or(|o| o.passed) && !healthy;
            if summary.health.is_none() || first_failure {
                summary.health = health;
            }
        }
        summary
    }

    /// Whether every process runs, never crashed and passes its check: a
    /// side release fit to be reused as it is.
    pub(super) fn sound(&self) -> bool {
        let summary = self.summary();
        let all = self.instances.len() as u32;
        summary.running == all && summary.up == all && summary.crashes == 0
    }

    /// Stops its processes, all at once.
    pub(super) async fn stop(self) -> StopReport {
        let started = std::time::Instant::now();
        let stops = self.instances.into_iter().map(|i| i.supervisor.stop());
        let reports = futures_util::future::join_all(stops).await;
        StopReport {
            graceful: reports.iter().all(|r| r.graceful),
            took: started.elapsed(),
        }
    }
}

impl Service {
    /// `release`, its processes running under their supervisors on their
    /// ports, each with its health monitor. The queue probe runs once per
    /// release; the first process's status is the worker's.
    pub(super) fn running(
        &self,
        release: WebRelease,
        processes: Vec<(u16, Supervisor)>,
    ) -> Running {
        let first = processes.first().map_or(0, |(port, _)| *port);
        let (queues, queue_monitor) = crate::queues::monitor_queues(
            &self.settings.name,
            release.queues.as_ref(),
            check_target(&self.settings, &release, first),
            release.secret_values.clone(),
            processes
                .first()
                .map(|(_, supervisor)| supervisor.watch())
                .expect("a release runs at least one process"),
        );
        let instances = processes
            .into_iter()
            .map(|(port, supervisor)| {
                let target = check_target(&self.settings, &release, port);
                let up = Arc::new(AtomicBool::new(supervisor.status().instance.is_some()));
                let (health, monitor) = monitor_health(
                    &self.settings.name,
                    &release,
                    target,
                    up.clone(),
                    supervisor.watch(),
                );
                Instance {
                    addr: SocketAddr::new(self.settings.address, port),
                    supervisor,
                    health,
                    up,
                    _monitor: monitor,
                }
            })
            .collect();
        Running {
            release_id: release.release_id.clone(),
            spec: release,
            instances,
            queues,
            _queue_monitor: queue_monitor,
        }
    }
}
