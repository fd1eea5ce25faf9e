//! `cutover config set` (a config-only release, see `rollout::config`) and
//! `cutover config show` (a service's effective environment; secrets by
//! name and version only).

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::rollouts::started_to_pb;
use super::OperatorApi;
use crate::access::Need;
use crate::rollout::ConfigChange;

impl OperatorApi {
    pub(super) async fn handle_set_config(
        &self,
        request: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.get_ref();
        // Keys only: a value typed for a key that turns out to be a secret
        // (refused) must not land in the audit log; `config show` has the
        // values in force.
        let args = json!({
            "env": r.env,
            "service": r.service,
            "set": r.set.keys().collect::<std::collections::BTreeSet<_>>(),
            "unset": r.unset,
            "reset": r.reset,
            "allow_unreachable": r.allow_unreachable,
            "break_glass": r.break_glass,
            "reason": r.reason,
        });
        let env = r.env.clone();
        let need = if r.break_glass {
            Need::Admin
        } else {
            Need::Deploy(&env)
        };
        self.audited(request, need, "set_config", args, |caller, r| async move {
            self.variant_ok(
                &r.env,
                &r.service,
                r.break_glass,
                &r.reason,
                "change the config",
            )?;
            let started = self
                .rollouts
                .set_config(ConfigChange {
                    env: r.env,
                    service: r.service,
                    set: r.set.into_iter().collect(),
                    unset: r.unset,
                    reset: r.reset,
                    by: caller.identity.name,
                    allow_unreachable: r.allow_unreachable,
                    break_glass: r.break_glass.then_some(r.reason),
                })
                .await?;
            Ok(started_to_pb(vec![started]))
        })
        .await
    }

    pub(super) async fn handle_get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ServiceConfig>, Status> {
        self.access
            .check(&request, Need::Read, "get_config", &serde_json::Value::Null)
            .await?;
        let r = request.into_inner();
        names_ok(&r.env, &r.service)?;
        let Some(current) = self
            .access
            .store()
            .releases
            .current(&r.env, &r.service)
            .await?
        else {
            return Err(Status::not_found(format!(
                "{} has no current release in {}: nothing runs there to have a config; deploy it first",
                r.service, r.env
            )));
        };
        let release = &current.release.0;
        let mut entries: BTreeMap<&str, pb::ConfigEntry> = release
            .env
            .iter()
            .map(|(key, value)| {
                let entry = pb::ConfigEntry {
                    key: key.clone(),
                    value: value.clone(),
                    source: "spec".into(),
                    ..Default::default()
                };
                (key.as_str(), entry)
            })
            .collect();
        for (key, o) in &current.config {
            let entry = entries.entry(key.as_str()).or_default();
            entry.key = key.clone();
            entry.source = match o.value {
                Some(_) => "override",
                None => "removed",
            }
            .into();
            entry.spec_value = o.spec_value.clone().unwrap_or_default();
            entry.in_spec = o.spec_value.is_some();
            entry.by = o.by.clone();
            entry.at_ms = o.at_ms;
        }
        for secret in &release.secrets {
            entries.insert(
                secret.name.as_str(),
                pb::ConfigEntry {
                    key: secret.name.clone(),
                    source: "secret".into(),
                    secret_version: u64::from(secret.version),
                    ..Default::default()
                },
            );
        }
        Ok(Response::new(pb::ServiceConfig {
            env: r.env,
            service: r.service,
            release_id: current.release.id().to_string(),
            entries: entries.into_values().collect(),
        }))
    }
}

/// An environment and a service name as names are written.
impl OperatorApi {
    /// What a change to the current release (config, scale) needs before
    /// it can be rolled out: good names, a reason for a break of glass, and
    /// no agent upgrade under way (`to` says what waits for it).
    pub(super) fn variant_ok(
        &self,
        env: &str,
        service: &str,
        break_glass: bool,
        reason: &str,
        to: &str,
    ) -> Result<(), Status> {
        names_ok(env, service)?;
        if break_glass && reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "--break-glass needs --reason TEXT: why this change cannot wait for the freeze window's end or an approval",
            ));
        }
        if let Some(upgrade) = self.agent_upgrades.running() {
            return Err(Status::failed_precondition(format!(
                "agent upgrade {upgrade} is running; {to} once it ended (`cutover events`)"
            )));
        }
        Ok(())
    }
}

fn names_ok(env: &str, service: &str) -> Result<(), Status> {
    for (what, name) in [("environment", env), ("service", service)] {
        crate::spec::name_ok(name)
            .map_err(|m| Status::invalid_argument(format!("{what} {name:?}: {m}")))?;
    }
    Ok(())
}
