//! `cutover scale`: how many processes of a service each node runs. The
//! count is part of the release (`Release.instances`), so a scale is the
//! current release again with another count, rolled out like any deploy
//! (the environment's strategy, freeze windows and approvals): the new
//! processes pass their health checks before any request reaches them, and
//! a scale-up that fails them is rolled back like a bad deploy. No
//! migration, no hook: the code is the same.
//!
//! Every deploy (and promotion) keeps the count the service runs in its
//! environment (`keep_count`), so a scale-up made in an incident is not
//! undone by the next deploy; a rollback brings back the count of the
//! release it returns to.

use std::sync::Arc;

use cutover_common::release::MAX_INSTANCES;
use cutover_proto::v1 as pb;

use super::variant::Variant;
use super::{RolloutError, Rollouts, Started};

/// One `cutover scale`.
#[derive(Debug, Clone, Default)]
pub struct ScaleChange {
    pub env: String,
    pub service: String,
    /// Processes per node, 1 to `MAX_INSTANCES`.
    pub instances: u32,
    pub by: String,
    pub allow_unreachable: bool,
    /// An admin's reason to scale past a freeze window and the approvals.
    pub break_glass: Option<String>,
}

/// How many processes per node `release` runs.
pub fn instances_of(release: &pb::Release) -> u32 {
    release.instances.max(1)
}

/// Gives `release`, made from the spec, the count of `current`, the
/// release the service runs now, and its id again when that is more than
/// one. One is written as 0, as the spec writes it: a service never scaled
/// keeps the ids it always had.
pub(super) fn keep_count(release: &mut pb::Release, current: Option<&pb::Release>) {
    let count = current.map_or(1, instances_of);
    set_count(release, count);
}

fn set_count(release: &mut pb::Release, count: u32) {
    let wire = if count == 1 { 0 } else { count };
    if release.instances != wire {
        release.instances = wire;
        release.release_id = crate::spec::release_id(release);
    }
}

impl Rollouts {
    /// Rolls out the current release of the service with `change.instances`
    /// processes per node.
    pub async fn scale(self: &Arc<Self>, change: ScaleChange) -> Result<Started, RolloutError> {
        let ScaleChange {
            env,
            service,
            instances,
            by,
            ..
        } = &change;
        if !(1..=MAX_INSTANCES).contains(instances) {
            return Err(RolloutError::BadScale(format!(
                "--instances {instances}: a node runs 1 to {MAX_INSTANCES} processes of a service; to stop serving, use `cutover maintenance on` or `cutover pause-traffic`"
            )));
        }
        let _creating = self.create.lock().await;
        let Some(current) = self.store.releases.current(env, service).await? else {
            return Err(RolloutError::NoCurrent(format!(
                "{service} has no current release in {env}: scale changes how many processes of a running release each node runs; deploy it first with `cutover deploy`"
            )));
        };
        let was = instances_of(&current.release.0);
        if was == *instances {
            return Ok(Started::NoOp {
                service: service.clone(),
                release_id: current.release.id().to_string(),
                message: format!(
                    "{service} in {env} runs {was} process(es) per node already: nothing to roll out"
                ),
            });
        }
        let mut release = current.release.0.clone();
        set_count(&mut release, *instances);
        let variant = Variant {
            topic: "scale",
            note: format!(
                "{by} scaled {service} in {env} from {was} to {instances} process(es) per node ({})",
                current.release.id()
            ),
            config: current.config.clone(),
            current,
            release,
        };
        let break_glass = change.break_glass.as_deref();
        self.roll_out_variant(variant, by, change.allow_unreachable, break_glass)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(instances: u32) -> pb::Release {
        let mut release = pb::Release {
            service: "web".into(),
            version: "v2".into(),
            instances,
            ..Default::default()
        };
        release.release_id = crate::spec::release_id(&release);
        release
    }

    #[test]
    fn a_deploy_keeps_the_count_the_service_runs() {
        let mut scaled = release(0);
        keep_count(&mut scaled, Some(&release(4)));
        assert_eq!(scaled.instances, 4);
        assert_eq!(scaled.release_id, crate::spec::release_id(&scaled));
        assert_ne!(scaled.release_id, release(0).release_id);

        // One process is the spec's own release, the same id as ever.
        for current in [None, Some(release(0)), Some(release(1))] {
            let mut plain = release(0);
            keep_count(&mut plain, current.as_ref());
            assert_eq!(plain, release(0));
        }
        // Scaled back to one: the id of the release never scaled.
        let mut down = release(3);
        set_count(&mut down, 1);
        assert_eq!(down, release(0));
    }
}
