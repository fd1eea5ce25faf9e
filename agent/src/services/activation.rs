//! The commands that start releases of a service: activate (a cutover, or
//! a switch to what already runs) and stage (a side release), and the
//! split between the two.

use cutover_common::release::{Kind, ReleaseSpec};
use cutover_proto::v1 as pb;
use std::collections::HashMap;

use super::{secret_env, NodeServices, ServiceError};
use crate::proxy::cohort::Cohorts;
use crate::proxy::Proxy;
use crate::service::{CutoverError, CutoverReport, KeepPrevious, WebRelease};

impl NodeServices {
    /// Prepares `release` and cuts its service over to it, with the values
    /// of its secrets in its environment. With `drain_first` the node
    /// leaves the external load balancer for the cutover and returns to it
    /// afterwards, whatever the outcome (unless an operator had drained it).
    /// The release it replaces is kept as the side release at weight 0 as
    /// `keep_previous` says. The serving and the side
    /// release are activated without a cutover (`activate_running`).
    pub async fn activate(
        &self,
        release: &ReleaseSpec,
        drain_first: bool,
        secret_values: &HashMap<String, String>,
        hook_env: &HashMap<String, String>,
        keep_previous: KeepPrevious,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<pb::Activated, ServiceError> {
        if let Some(activated) = self
            .activate_running(release, keep_previous, progress)
            .await?
        {
            return Ok(activated);
        }
        let web_release = self
            .ready_release(release, secret_values, hook_env, progress)
            .await?;
        let listens = self.listens_of(release);
        let (shared, created) = {
            let mut services = self.services.lock().await;
            match services.get(&release.service) {
                Some(existing) => (existing.clone(), false),
                None => {
                    let service = self.bind(&release.service, &listens).await?;
                    let service = crate::service::shared(service, self.shutdown.clone());
                    services.insert(release.service.clone(), service.clone());
                    (service, true)
                }
            }
        };
        let mut service = shared.lock().await;
        // Addresses the release adds serve before the switch can send
        // anything there; those it drops close once the old one drained.
        let before = service.proxy().map(Proxy::listens).unwrap_or_default();
        self.open_listeners(&service, release, &listens).await?;
        let drain = drain_first && !created && service.proxy().is_some_and(|p| p.admitted());
        if drain {
            service.set_admitted(false)?;
        }
        let result = service
            .replace(web_release, keep_previous, |step| progress(step.name()))
            .await;
        if drain {
            if let Err(error) = service.set_admitted(true) {
                tracing::error!(service = %release.service, %error, "cannot re-admit the node after its cutover");
            }
        }
        match &result {
            Ok(_) => self.close_listeners_but(&service, &listens).await,
            // The old release serves on: so do its addresses, alone.
            Err(_) if !created => self.close_listeners_but(&service, &before).await,
            Err(_) => {}
        }
        self.remember(&service);
        drop(service);
        if result.is_err() && created {
            // A first release that fails leaves no trace: the public port is
            // free again and the service unknown, as before the command.
            self.forget_service(&release.service, shared).await;
        }
        let report = result?;
        // Recorded active first (by the cutover), then no longer waiting:
        // a prune in between keeps it either way.
        if let Err(error) = self.store.note_activated(&report.release_id) {
            tracing::error!(release = %report.release_id, %error, "cannot record the activation; the release dir may be pruned late");
        }
        self.prune().await;
        Ok(activated(&report))
    }

    /// Activates what already runs: the serving release changes nothing (a
    /// coordinator that lost track must not start a second copy), but takes
    /// all traffic back from a side release; the side release is switched
    /// to in the proxy alone. `None`: anything else, for a cutover.
    async fn activate_running(
        &self,
        release: &ReleaseSpec,
        keep_previous: KeepPrevious,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Option<pb::Activated>, ServiceError> {
        let Some(shared) = self.services.lock().await.get(&release.service).cloned() else {
            return Ok(None);
        };
        let mut service = shared.lock().await;
        let state = service.state();
        let listens = self.listens_of(release);
        let runs = state.release_id == release.release_id && state.running;
        let beside = service
            .side()
            .is_some_and(|(id, _)| id == release.release_id);
        if runs || beside {
            // A return to a release kept warm after a move to another port:
            // its addresses serve again before it takes the requests.
            self.open_listeners(&service, release, &listens).await?;
        }
        let activated = if runs {
            let retired = service.take_back(keep_previous).await?;
            pb::Activated {
                release_id: state.release_id,
                upstream: state.upstream,
                previous_release_id: String::new(),
                drain_completed: retired.as_ref().is_none_or(|r| r.drain.completed),
                drain_cut: retired.map_or(0, |r| r.drain.cut as u32),
                took_ms: 0,
            }
        } else if beside {
            let report = service
                .promote(&release.release_id, keep_previous, |step| {
                    progress(step.name())
                })
                .await?;
            activated(&report)
        } else {
            return Ok(None);
        };
        // A promoted side release opened its addresses when it was staged.
        self.close_listeners_but(&service, &listens).await;
        self.remember(&service);
        drop(service);
        self.store.note_activated(&release.release_id)?;
        self.prune().await;
        Ok(Some(activated))
    }

    /// Prepares `release` and starts it beside the release serving its web
    /// service, as its side release with `split` (see `Service::stage`).
    pub async fn stage(
        &self,
        release: &ReleaseSpec,
        secret_values: &HashMap<String, String>,
        hook_env: &HashMap<String, String>,
        split: Cohorts,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<(), ServiceError> {
        let (service, release_id) = (release.service.clone(), release.release_id.clone());
        if let Kind::Worker(_) = &release.kind {
            return Err(CutoverError::WorkerSide {
                service,
                release_id,
            }
            .into());
        }
        let Some(shared) = self.services.lock().await.get(&service).cloned() else {
            return Err(CutoverError::NothingServes {
                service,
                release_id,
            }
            .into());
        };
        let web_release = self
            .ready_release(release, secret_values, hook_env, progress)
            .await?;
        let mut service = shared.lock().await;
        // Its addresses serve (the stable release) before any request is
        // split to it; those of the stable release alone close when one of
        // the two is activated.
        self.open_listeners(&service, release, &self.listens_of(release))
            .await?;
        let result = service
            .stage(web_release, split, |step| progress(step.name()))
            .await;
        self.remember(&service);
        result?;
        Ok(())
    }

    /// Divides the traffic of `service` with its side release
    /// `side_release_id` by `split` from now on.
    pub async fn set_traffic(
        &self,
        service: &str,
        side_release_id: &str,
        split: Cohorts,
    ) -> Result<(), ServiceError> {
        let shared = self.service(service).await?;
        let mut service = shared.lock().await;
        let result = service.set_traffic(side_release_id, split);
        self.remember(&service);
        result.map_err(ServiceError::Cutover)
    }

    /// Prepares `release` for a start with the secret values and hook
    /// environment its command brought.
    async fn ready_release(
        &self,
        release: &ReleaseSpec,
        secret_values: &HashMap<String, String>,
        hook_env: &HashMap<String, String>,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<WebRelease, ServiceError> {
        let mut web_release = self.make_ready(release, progress).await?;
        web_release.hook_env = hook_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        web_release.hook_env.sort();
        let values = secret_env(&web_release.secrets, secret_values)?;
        web_release.secret_values = crate::runtime::supervisor::SecretSlot::ready(values);
        Ok(web_release)
    }
}

/// What an activation reports.
fn activated(report: &CutoverReport) -> pb::Activated {
    let previous = report.previous.as_ref();
    pb::Activated {
        release_id: report.release_id.clone(),
        upstream: report.addr.to_string(),
        previous_release_id: previous
            .map(|p| p.release_id.clone())
            .or_else(|| report.kept.clone())
            .unwrap_or_default(),
        drain_completed: previous.is_none_or(|p| p.drain.completed),
        drain_cut: previous.map_or(0, |p| p.drain.cut as u32),
        took_ms: report.took.as_millis() as u64,
    }
}
