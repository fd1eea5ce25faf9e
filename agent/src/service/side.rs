//! The side release of a web service: one release running beside the
//! serving one, which the proxy gives a share of the requests by a split
//! (a canary), or none at weight 0 (a warm standby, or the release an
//! activation replaced, kept for a while to go back to at once).
//!
//! Staging one runs the same `launch` as a cutover (hooks, start, health
//! gate, smoke checks) without the switch. Activating it is a switch in the
//! proxy alone. A side release with a retire time is drained and stopped by
//! the agent itself when the time comes (`spawn_retirer`).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cutover_proto::v1 as pb;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use super::cutover::{CutoverError, CutoverReport, Step};
use super::{
    drain, upstream_of, KeepPrevious, PreviousRelease, Running, Service, ServiceKind, WebRelease,
};
use crate::checks::Healthy;
use crate::proxy::cohort::{Cohorts, Split, SplitError, Sticky};
use crate::store::{ActiveRelease, Leftover, SideRecord, StoreError};

/// The side release, and how the proxy divides requests with it.
pub(super) struct Side {
    pub(super) running: Running,
    pub(super) cohorts: Cohorts,
    /// When the agent retires it (ms since the Unix epoch); 0: never.
    pub(super) retire_at_ms: i64,
}

impl Side {
    /// A side release read back from the store; a recorded split the agent
    /// cannot use (it never writes one) gives it no traffic.
    pub(super) fn recovered(
        service: &str,
        running: Running,
        split: Split,
        retire_at_ms: i64,
    ) -> Self {
        let cohorts = Cohorts::new(split).unwrap_or_else(|error| {
            tracing::error!(%service, release = %running.release_id, %error, "the recorded traffic split is invalid; the side release gets no traffic until a new one is set");
            Cohorts::standby()
        });
        Self {
            running,
            cohorts,
            retire_at_ms,
        }
    }
}

/// The record of `running` as the side release.
pub(super) fn side_record(running: &Running, split: &Split, retire_at_ms: i64) -> SideRecord {
    SideRecord {
        release: running.spec.clone(),
        instances: running.record(),
        split: split.clone(),
        retire_at_ms,
    }
}

/// A split off the wire, checked.
pub fn split_from_proto(split: Option<&pb::TrafficSplit>) -> Result<Cohorts, SplitError> {
    let Some(split) = split else {
        return Ok(Cohorts::standby());
    };
    use pb::traffic_split::Sticky as Wire;
    let sticky = match Wire::try_from(split.sticky).unwrap_or(Wire::Unspecified) {
        Wire::Unspecified | Wire::Cookie => Sticky::Cookie,
        Wire::Header => Sticky::Header,
        Wire::ClientIp => Sticky::ClientIp,
    };
    Cohorts::new(Split {
        weight: split.weight,
        sticky,
        sticky_name: split.sticky_name.clone(),
        override_header: split.override_header.clone(),
    })
}

fn split_to_proto(split: &Split) -> pb::TrafficSplit {
    use pb::traffic_split::Sticky as Wire;
    let sticky = match split.sticky {
        Sticky::Cookie => Wire::Cookie,
        Sticky::Header => Wire::Header,
        Sticky::ClientIp => Wire::ClientIp,
    };
    pb::TrafficSplit {
        weight: split.weight,
        sticky: sticky as i32,
        sticky_name: split.sticky_name.clone(),
        override_header: split.override_header.clone(),
    }
}

impl Service {
    /// The side release and where it listens.
    pub fn side(&self) -> Option<(&str, std::net::SocketAddr)> {
        self.side
            .as_ref()
            .map(|side| (side.running.release_id.as_str(), side.running.addr()))
    }

    /// When the side release is due to be retired (0: never), as it changes.
    pub fn retirements(&self) -> watch::Receiver<i64> {
        self.retire.subscribe()
    }

    /// Starts `release` beside the serving one, vetted as a cutover vets
    /// it, and gives it its share by `cohorts`. Another side release is
    /// drained and stopped first; staging the side release again only sets
    /// the split (and cancels its retirement: it is wanted again).
    pub async fn stage(
        &mut self,
        release: WebRelease,
        cohorts: Cohorts,
        progress: impl Fn(Step),
    ) -> Result<Healthy, CutoverError> {
        let (service, release_id) = (self.settings.name.clone(), release.release_id.clone());
        if matches!(self.kind, ServiceKind::Worker) {
            return Err(CutoverError::WorkerSide {
                service,
                release_id,
            });
        }
        let Some(active) = &self.active else {
            return Err(CutoverError::NothingServes {
                service,
                release_id,
            });
        };
        if active.release_id == release_id {
            return Err(CutoverError::AlreadyServes {
                service,
                release_id,
            });
        }
        // The side release staged again (a retried canary, a standby kept
        // from an abort) is reused only as sound as a fresh one: one that
        // crashed or failed its check since starts over, vetted again.
        let sound = self
            .side
            .as_ref()
            .is_some_and(|side| side.running.release_id == release_id && side.running.sound());
        if sound {
            self.resplit(cohorts, 0).map_err(|e| *e)?;
            return Ok(Healthy {
                attempts: 0,
                took: Duration::ZERO,
            });
        }
        let started = Instant::now();
        self.retire_side().await;
        let (candidate, healthy) = self.launch(release, &progress).await?;
        // Recorded before the proxy sends it anything: a restarted agent
        // adopts it instead of stopping it as the stage's leftover.
        let record = SideRecord {
            release: candidate.release.clone(),
            instances: candidate.record(),
            split: cohorts.split().clone(),
            retire_at_ms: 0,
        };
        if let Err(error) = self.write_side(Some(record), Vec::new()) {
            candidate.abandon(self).await;
            return Err(self.store_error(error));
        }
        let (release, processes) = candidate.into_parts();
        let weight = cohorts.split().weight;
        self.side = Some(Side {
            running: self.running(release, processes),
            cohorts,
            retire_at_ms: 0,
        });
        self.reroute();
        tracing::info!(%service, release = %release_id, weight, took_ms = started.elapsed().as_millis() as u64, "side release staged");
        Ok(healthy)
    }

    /// Divides the traffic with the side release `side_release_id` by
    /// `cohorts` from now on (one table swap), recorded.
    pub fn set_traffic(
        &mut self,
        side_release_id: &str,
        cohorts: Cohorts,
    ) -> Result<(), Box<CutoverError>> {
        let side = self.side().map(|(id, _)| id.to_string());
        if side.as_deref() != Some(side_release_id) {
            return Err(Box::new(CutoverError::NotSide {
                service: self.settings.name.clone(),
                release_id: side_release_id.to_string(),
                side,
            }));
        }
        let retire_at_ms = self.side.as_ref().map_or(0, |s| s.retire_at_ms);
        self.resplit(cohorts, retire_at_ms)
    }

    /// Gives the side release `cohorts` and `retire_at_ms`, recorded first.
    fn resplit(&mut self, cohorts: Cohorts, retire_at_ms: i64) -> Result<(), Box<CutoverError>> {
        let Some(side) = self.side.as_mut() else {
            return Ok(());
        };
        let record = side_record(&side.running, cohorts.split(), retire_at_ms);
        let leftovers = self.leftovers_now();
        self.write_side(Some(record), leftovers)
            .map_err(|error| Box::new(self.store_error(error)))?;
        let side = self.side.as_mut().expect("checked above");
        side.cohorts = cohorts;
        side.retire_at_ms = retire_at_ms;
        tracing::info!(service = %self.settings.name, release = %side.running.release_id, weight = side.cohorts.split().weight, retire_at_ms, "traffic split set");
        self.reroute();
        Ok(())
    }

    /// Makes the side release `release_id` the one that serves: a switch
    /// in the proxy alone (it passed its checks when staged). The release it
    /// replaces stays as the side release at weight 0 as `keep_previous`
    /// says (testers' override no longer reaches it), or is drained and
    /// stopped at once.
    pub async fn promote(
        &mut self,
        release_id: &str,
        keep_previous: KeepPrevious,
        progress: impl Fn(Step),
    ) -> Result<CutoverReport, CutoverError> {
        let started = Instant::now();
        let side_id = self.side().map(|(id, _)| id.to_string());
        let (Some(active), true) = (&self.active, side_id.as_deref() == Some(release_id)) else {
            return Err(CutoverError::NotSide {
                service: self.settings.name.clone(),
                release_id: release_id.to_string(),
                side: side_id,
            });
        };
        let side = self.side.take().expect("checked above");
        progress(Step::Switching);
        let retire_at = keep_previous.retire_at_ms();
        let (keep, retire_at_ms) = (retire_at.is_some(), retire_at.unwrap_or(0));
        let standby = Cohorts::standby();
        let promoted = ActiveRelease {
            release: side.running.spec.clone(),
            instances: side.running.record(),
        };
        let kept = keep.then(|| side_record(active, standby.split(), retire_at_ms));
        let retiring: Vec<Leftover> = match keep {
            true => Vec::new(),
            false => active.as_leftovers(),
        };
        let previous_id = active.release_id.clone();
        let written = self.store.update_service(&self.settings.name, |current| {
            let mut record =
                self.record(current.as_ref(), Some(promoted), Some(previous_id.clone()));
            record.side = kept;
            record.leftovers = retiring;
            Some(record)
        });
        if let Err(error) = written {
            self.side = Some(side);
            return Err(self.store_error(error));
        }
        let release_id = side.running.release_id.clone();
        let addr = side.running.addr();
        let old = self.active.replace(side.running).expect("checked above");
        let (mut previous, mut kept) = (None, None);
        if keep {
            kept = Some(old.release_id.clone());
            self.side = Some(Side {
                running: old,
                cohorts: standby,
                retire_at_ms,
            });
            self.reroute();
        } else {
            let upstream = upstream_of(self.reroute(), &old);
            progress(Step::Draining);
            let drained = drain(upstream, old.spec.drain_timeout).await;
            progress(Step::StoppingOld);
            previous = Some(self.stop_old(old, drained).await);
        }
        tracing::info!(service = %self.settings.name, release = %release_id, kept = ?kept, "side release promoted");
        Ok(CutoverReport {
            release_id,
            addr,
            healthy: Healthy {
                attempts: 0,
                took: Duration::ZERO,
            },
            previous,
            kept,
            took: started.elapsed(),
        })
    }

    /// Activating the release that serves while a side release runs: all
    /// the traffic goes back to it at once; the side release stays at
    /// weight 0 as `keep_previous` says (testers' override still reaches
    /// it, for debugging), or is drained and stopped now.
    pub async fn take_back(
        &mut self,
        keep_previous: KeepPrevious,
    ) -> Result<Option<PreviousRelease>, CutoverError> {
        let Some(side) = &self.side else {
            return Ok(None);
        };
        let Some(retire_at_ms) = keep_previous.retire_at_ms() else {
            return Ok(self.retire_side().await);
        };
        let standby = side.cohorts.with_weight(0);
        self.resplit(standby, retire_at_ms).map_err(|e| *e)?;
        Ok(None)
    }

    /// Drains and stops the side release, if any: recorded as a leftover
    /// until it is stopped.
    pub(super) async fn retire_side(&mut self) -> Option<PreviousRelease> {
        let side = self.side.take()?;
        let running = side.running;
        let leftovers = running.as_leftovers();
        if let Err(error) = self.write_side(None, leftovers) {
            tracing::error!(service = %self.settings.name, %error, "cannot record the side release's retirement");
        }
        let upstream = upstream_of(self.reroute(), &running);
        let drained = drain(upstream, running.spec.drain_timeout).await;
        let stopped = self.stop_old(running, drained).await;
        tracing::info!(service = %self.settings.name, release = %stopped.release_id, graceful = stopped.stop.graceful, "side release retired");
        Some(stopped)
    }

    /// Retires the side release if its time has come.
    pub async fn retire_if_due(&mut self) -> Option<PreviousRelease> {
        let due = self.side.as_ref().is_some_and(|side| {
            side.retire_at_ms > 0 && side.retire_at_ms <= cutover_common::now_ms()
        });
        if !due {
            return None;
        }
        self.retire_side().await
    }

    /// The recorded leftovers now (a split change leaves them alone).
    fn leftovers_now(&self) -> Vec<Leftover> {
        match self.store.service(&self.settings.name) {
            Ok(Some(record)) => record.leftovers,
            _ => Vec::new(),
        }
    }

    /// Records the side release (or none) and the leftovers to stop.
    fn write_side(
        &self,
        side: Option<SideRecord>,
        leftovers: Vec<Leftover>,
    ) -> Result<(), StoreError> {
        self.store.update_service(&self.settings.name, |current| {
            let mut record = current.unwrap_or_else(|| self.record(None, None, None));
            record.side = side;
            record.leftovers = leftovers;
            Some(record)
        })
    }

    /// The side release, for heartbeats.
    pub(super) fn side_state(&self) -> Option<pb::SideRelease> {
        let side = self.side.as_ref()?;
        let running = &side.running;
        let summary = running.summary();
        let health = summary.health;
        Some(pb::SideRelease {
            release_id: running.release_id.clone(),
            split: Some(split_to_proto(side.cohorts.split())),
            running: summary.running > 0,
            healthy: health.as_ref().is_none_or(|o| o.passed),
            health_detail: health.map(|o| o.detail).unwrap_or_default(),
            crashes: summary.crashes,
            last_exit: summary.last_exit.unwrap_or_default(),
            traffic: self.traffic(&running.release_id),
            retire_at_ms: side.retire_at_ms,
            memory_bytes: summary.memory_bytes,
        })
    }
}

/// Retires the side release of `service` when it is due (see
/// `ActivateRelease.keep_previous_ms`), until `shutdown` or until the
/// service goes (it is held weakly: a forgotten or shut down service ends
/// this). `retirements` is the service's own.
fn spawn_retirer(
    service: Weak<Mutex<Service>>,
    mut retirements: watch::Receiver<i64>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let at = *retirements.borrow_and_update();
            let due = async {
                if at <= 0 {
                    std::future::pending::<()>().await;
                }
                let wait = at.saturating_sub(cutover_common::now_ms()).max(0);
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = retirements.changed() => if changed.is_err() {
                    return;
                },
                () = due => {
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    // Not due after all (a change came first): the loop
                    // waits for the time it says now.
                    service.lock().await.retire_if_due().await;
                }
            }
        }
    });
}

/// A service wrapped to be shared, with its retirer running: the side
/// release is retired at its time, also when no command comes.
pub fn shared(service: Service, shutdown: CancellationToken) -> Arc<Mutex<Service>> {
    let retirements = service.retirements();
    let shared = Arc::new(Mutex::new(service));
    spawn_retirer(Arc::downgrade(&shared), retirements, shutdown);
    shared
}
