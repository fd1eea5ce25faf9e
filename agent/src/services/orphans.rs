//! What runs on the node that no record names: containers and release
//! processes an agent killed between starting them and recording them
//! left behind.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::NodeServices;
use crate::runtime::docker::DockerError;

/// How long a release process no record names gets to stop on SIGTERM
/// before it is killed: its own stop grace is not known.
const ORPHAN_STOP_GRACE: Duration = Duration::from_secs(10);

impl NodeServices {
    /// Removes containers labelled as this node's that no service record
    /// names: an agent killed between creating a container and recording it
    /// left them, and nothing else would ever stop them.
    pub(super) async fn remove_orphan_containers(&self) {
        let containers = match self.settings.docker.node_containers().await {
            Ok(containers) => containers,
            Err(DockerError::Unreachable { .. }) => return, // no docker here
            Err(error) => {
                tracing::warn!(%error, "cannot list this node's containers");
                return;
            }
        };
        let mut known = std::collections::HashSet::new();
        for name in self.store.service_names().unwrap_or_default() {
            if let Ok(Some(record)) = self.store.service(&name) {
                known.extend(record.instance_ids());
            }
        }
        for (id, release) in containers {
            let instance = crate::runtime::InstanceId::Container {
                container: id.clone(),
            };
            if !known.contains(&instance) {
                tracing::warn!(%release, container = %crate::runtime::docker::short(&id), "removing a container no service records");
                self.settings.docker.remove(&id).await;
            }
        }
    }

    /// Stops release processes labelled as this node's that no service
    /// names: an agent killed between starting a release and recording it
    /// left them running unsupervised, holding a port the store does not
    /// know is taken. What the services run (recorded or just restarted),
    /// their leftovers, and groups a release started of its own (its
    /// children) are left alone.
    pub(super) async fn stop_orphan_processes(&self) {
        let mut known: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for name in self.store.service_names().unwrap_or_default() {
            if let Ok(Some(record)) = self.store.service(&name) {
                let instances = record.instance_ids();
                known.extend(instances.iter().filter_map(|i| i.process()).map(|p| p.pid));
            }
        }
        let services: Vec<_> = self.services.lock().await.values().cloned().collect();
        for service in services {
            let instances = service.lock().await.instances();
            known.extend(instances.iter().filter_map(|i| i.process()).map(|p| p.pid));
        }
        let groups: Vec<_> = crate::runtime::ownership::labelled_groups()
            .into_iter()
            .filter(|group| group.owner.node_id == self.settings.owner.node_id)
            .collect();
        let leaders: std::collections::HashSet<u32> =
            groups.iter().map(|g| g.process.pid).collect();
        for group in groups {
            if known.contains(&group.process.pid) || leaders.contains(&group.parent) {
                continue;
            }
            tracing::warn!(
                pid = group.process.pid,
                "stopping a release process no service records"
            );
            crate::runtime::supervisor::stop_leftover(
                "unrecorded release",
                crate::runtime::InstanceId::Process(group.process),
                Signal::SIGTERM,
                ORPHAN_STOP_GRACE,
                &self.settings.docker,
            )
            .await;
        }
    }
}
