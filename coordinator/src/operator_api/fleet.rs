//! The fleet as the coordinator means it to run, and who the caller is:
//! what `cutover ui` draws its pages from.

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::locks::lock_to_pb;
use super::rollouts::release_info;
use super::OperatorApi;
use crate::access::Need;
use crate::environments::show_selector;
use crate::spec::selects;
use crate::store::ReleaseRecord;

impl OperatorApi {
    pub(super) async fn handle_who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::Operator>, Status> {
        let caller = self
            .access
            .check(&request, Need::Read, "who_am_i", &serde_json::Value::Null)
            .await?;
        Ok(Response::new(pb::Operator {
            name: caller.identity.name.clone(),
            role: caller.role.as_str().to_string(),
            envs: caller.envs,
            ..Default::default()
        }))
    }

    pub(super) async fn handle_get_fleet(
        &self,
        request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        self.access
            .check(&request, Need::Read, "get_fleet", &serde_json::Value::Null)
            .await?;
        let store = self.registry.store();
        let records = store.releases.all().await?;
        let outcomes = store.releases.outcomes().await?;
        let mut locks = store.rollouts.manual_locks("").await?;
        let running = self.rollouts.running();
        let views = self.registry.list();
        // Each service's newest record: its current release, or after a
        // removal the last one that was (whose selector still says where
        // it ran).
        let mut newest: BTreeMap<(String, String), &ReleaseRecord> = BTreeMap::new();
        for record in &records {
            let key = (record.env.clone(), record.service.clone());
            let newer = newest.get(&key).is_none_or(|n| {
                (record.current, record.deployed_at_ms) > (n.current, n.deployed_at_ms)
            });
            if newer {
                newest.insert(key, record);
            }
        }
        let mut services = Vec::with_capacity(newest.len());
        for ((env, service), record) in newest {
            let pinned = store.releases.environment(&env).await?;
            // As the converger counts them (`converge::movable`): a node
            // another environment's current release of the service also
            // selects belongs to neither.
            let contested = |labels: &BTreeMap<String, String>| {
                records.iter().any(|other| {
                    other.current
                        && other.service == service
                        && other.env != env
                        && selects(&other.selector, labels)
                })
            };
            let node_ids = views
                .iter()
                .filter(|v| {
                    !v.revoked
                        && selects(&record.selector, &v.record.labels)
                        && pinned.as_ref().is_none_or(|p| selects(p, &v.record.labels))
                        && !contested(&v.record.labels)
                })
                .map(|v| v.record.id.clone())
                .collect();
            let stop = outcomes
                .iter()
                .find(|o| o.env == env && o.service == service)
                .and_then(|o| o.stopped.clone());
            let lock = locks
                .iter()
                .position(|l| l.env == env && l.service == service)
                .map(|i| lock_to_pb(locks.swap_remove(i)));
            let rollout_id = running
                .iter()
                .find(|r| r.env == env && r.service == service)
                .map(|r| r.id.clone())
                .unwrap_or_default();
            services.push(pb::FleetService {
                app: record.app.clone(),
                release: record.current.then(|| release_info(&record.release)),
                node_ids,
                selector: show_selector(&record.selector),
                stopped: stop.is_some(),
                removed: stop.is_some_and(|s| s.removed),
                lock,
                rollout_id,
                env,
                service,
            });
        }
        Ok(Response::new(pb::Fleet { services }))
    }
}
