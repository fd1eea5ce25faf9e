//! The app spec (`cutover.toml`): what an operator keeps in the app's
//! repository, parsed strictly and validated in full before anything is
//! created, so a typo fails the deploy instead of half of it. docs/spec.md
//! documents every key.
//!
//! Split by section: `service` the `[services.NAME]` tables and their
//! checks, `release` what a deploy of one service in one environment
//! resolves to (the release and its id).

mod release;
mod service;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use cutover_common::rules;
use cutover_proto::v1 as pb;
use serde::Deserialize;

use crate::hooks::{Hook, HookSpec};
use crate::migration::{MigrateSpec, Migration};
use crate::notify::spec::{NotifySpec, NotifyTarget};
pub use crate::strategy::{BatchSize, Strategy, StrategySpec};
pub use release::release_id;
use service::validate_service;
pub use service::{HealthSpec, ServiceSpec, SmokeSpec, StatusRange};

/// A spec that cannot be used, with the file, the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{message}", if key.is_empty() { String::new() } else { format!("key `{key}`: ") })]
pub struct SpecError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// The most a release (its environment, command, checks) may weigh,
/// encoded.
pub const MAX_RELEASE_BYTES: usize = 256 * 1024;
/// The most a spec file may weigh (several services and environments).
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub app: String,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    #[serde(default)]
    pub strategy: StrategySpec,
    #[serde(default)]
    pub environments: BTreeMap<String, EnvironmentSpec>,
    /// The order in which a deploy of several services rolls them out, one
    /// after the other. Default: web services (with `listen`) first, then
    /// workers, each by name; services not named come after, in that order.
    #[serde(default)]
    pub order: Vec<String>,
    /// The database migration a deploy of one service runs once, on one
    /// node, before (or after) its cutover.
    #[serde(default)]
    pub migrate: Option<MigrateSpec>,
    /// Commands a deploy runs at fixed points (see `hooks`).
    #[serde(default)]
    pub hooks: Vec<HookSpec>,
    /// Webhooks for rollout events (`[[notify]]`).
    #[serde(default)]
    pub notify: Vec<NotifySpec>,
    /// Commands the agents run on a schedule (`[jobs.NAME]`), set in an
    /// environment by `cutover jobs apply`.
    #[serde(default)]
    pub jobs: BTreeMap<String, crate::jobs::spec::JobSpec>,
    /// Analysis templates a canary's `{ analysis = "NAME" }` steps run
    /// (`[analysis.NAME]`).
    #[serde(default)]
    pub analysis: BTreeMap<String, crate::analysis::AnalysisSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSpec {
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A fresh backup every deploy to this environment needs.
    #[serde(default)]
    pub require_backup: Option<crate::jobs::recovery::RequireBackup>,
    /// Replaces the app's `[strategy]` in this environment (a canary for
    /// production, say).
    #[serde(default)]
    pub strategy: Option<StrategySpec>,
    /// The HAProxy in front of its nodes (see `lb`).
    #[serde(default)]
    pub load_balancer: Option<crate::lb::LoadBalancerSpec>,
    /// Only what has been stable in another environment for long enough
    /// deploys here (see `policy`).
    #[serde(default)]
    pub promotion: Option<crate::policy::PromotionSpec>,
    /// When no deploy or promotion goes here ("Fri 16:00 - Mon 08:00",
    /// "2026-12-20 - 2027-01-02"), in `timezone`.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// The zone of the freeze windows; default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// How many operators other than the requester approve a deploy,
    /// promotion or rollback here before it starts (see `policy`).
    #[serde(default)]
    pub approvals: u32,
    /// The same for a rollback; default `approvals` (0: an incident does
    /// not wait).
    #[serde(default)]
    pub approvals_for_rollback: Option<u32>,
    /// How long a request waits for its approvals; default 1h.
    #[serde(default, with = "humantime_serde")]
    pub approval_timeout: Option<std::time::Duration>,
    /// The environment this one mirrors: a deploy here warns of every
    /// difference from it but the variables either declares in `env` (see
    /// `env_diff`).
    #[serde(default)]
    pub mirror: Option<String>,
}

/// Everything a deploy of one service in one environment needs from the
/// spec: which nodes, with which strategy, and the release minus its
/// artifact and version.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub app: String,
    pub env: String,
    pub service: String,
    /// The environment's selector ANDed with the service's.
    pub selector: BTreeMap<String, String>,
    pub strategy: Strategy,
    pub release: pb::Release,
    /// Set for the service whose deploy runs the spec's migration.
    pub migration: Option<Migration>,
    /// The run-once hooks a deploy of this service runs.
    pub hooks: Vec<Hook>,
    pub notify: Vec<NotifyTarget>,
    /// The fresh backups a deploy of it requires: the environment's, and
    /// the migration's when it runs it (kept with the rollout, so a retry
    /// checks them again).
    pub backup_gates: Vec<crate::jobs::recovery::RequireBackup>,
    /// The HAProxy backend of the service in the environment, if any.
    pub load_balancer: Option<crate::lb::LoadBalancer>,
    /// The `cutover config set` overrides the deploy keeps (empty from
    /// the spec; see `rollout::config`).
    pub config: BTreeMap<String, crate::store::ConfigOverride>,
}

impl AppSpec {
    /// Parses and validates a spec; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, SpecError> {
        let error = |key: String, message: String| SpecError {
            file: file.to_string(),
            key,
            message,
        };
        if text.len() > MAX_SPEC_BYTES {
            return Err(error(
                String::new(),
                format!(
                    "the spec is {} KiB, over the {} KiB limit; ship large data in the artifact or image",
                    text.len() / 1024,
                    MAX_SPEC_BYTES / 1024
                ),
            ));
        }
        let deserializer = toml::Deserializer::parse(text).map_err(|e| {
            error(
                String::new(),
                format!("not valid TOML: {}", e.to_string().trim()),
            )
        })?;
        let spec: AppSpec = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().message().trim().to_string();
            error(if key == "." { String::new() } else { key }, message)
        })?;
        spec.validate()
            .map_err(|(key, message)| error(key, message))?;
        Ok(spec)
    }

    /// The checked `[analysis]` templates; an error names the key.
    fn analyses(&self) -> Result<BTreeMap<String, crate::analysis::Analysis>, (String, String)> {
        crate::analysis::resolve(&self.analysis).map_err(|(k, m)| (format!("analysis.{k}"), m))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        name_ok(&self.app).map_err(|m| ("app".to_string(), m))?;
        if self.services.is_empty() {
            return Err((
                "services".into(),
                "the spec defines no service; add a [services.NAME] table".into(),
            ));
        }
        if self.environments.is_empty() {
            return Err((
                "environments".into(),
                "the spec defines no environment; add an [environments.NAME] table".into(),
            ));
        }
        let analyses = self.analyses()?;
        self.strategy
            .resolve(&analyses)
            .map_err(|(k, m)| (format!("strategy.{k}"), m))?;
        for (name, environment) in &self.environments {
            if let Some(strategy) = &environment.strategy {
                strategy
                    .resolve(&analyses)
                    .map_err(|(k, m)| (format!("environments.{name}.strategy.{k}"), m))?;
            }
        }
        if let Some(migrate) = &self.migrate {
            let services: Vec<&String> = self.services.keys().collect();
            migrate
                .check(&services)
                .map_err(|(k, m)| (format!("migrate.{k}"), m))?;
        }
        let services: Vec<&String> = self.services.keys().collect();
        for (i, hook) in self.hooks.iter().enumerate() {
            hook.check(&services)
                .map_err(|(k, m)| (format!("hooks[{i}].{k}"), m))?;
        }
        self.commands_run_as_processes()?;
        for (name, env) in &self.environments {
            let key = format!("environments.{name}");
            name_ok(name).map_err(|m| (key.clone(), m))?;
            crate::spec_checks::env_vars(&env.env)
                .map_err(|(k, m)| (format!("{key}.env.{k}"), m))?;
            self.check_policy(name, env)
                .map_err(|(k, m)| (format!("{key}.{k}"), m))?;
        }
        for (name, service) in &self.services {
            let key = format!("services.{name}");
            name_ok(name).map_err(|m| (key.clone(), m))?;
            validate_service(service).map_err(|(k, m)| (format!("{key}.{k}"), m))?;
        }
        crate::notify::spec::check(&self.notify)?;
        crate::jobs::spec::check_all(self)?;
        let services: Vec<&str> = self.services.keys().map(String::as_str).collect();
        for (name, environment) in &self.environments {
            if let Some(lb) = &environment.load_balancer {
                lb.check(&services)
                    .map_err(|(k, m)| (format!("environments.{name}.load_balancer.{k}"), m))?;
            }
            if let Some(gate) = &environment.require_backup {
                crate::jobs::spec::check_gate(self, gate, Some(name))
                    .map_err(|(k, m)| (format!("environments.{name}.require_backup.{k}"), m))?;
            }
        }
        if let Some(gate) = self
            .migrate
            .as_ref()
            .and_then(|m| m.require_backup.as_ref())
        {
            crate::jobs::spec::check_gate(self, gate, None)
                .map_err(|(k, m)| (format!("migrate.require_backup.{k}"), m))?;
        }
        let mut ordered = std::collections::BTreeSet::new();
        for name in &self.order {
            if !self.services.contains_key(name) {
                return Err((
                    "order".into(),
                    format!(
                        "names {name:?}, which is not a service; the spec defines {}",
                        self.services.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if !ordered.insert(name) {
                return Err(("order".into(), format!("names {name:?} twice")));
            }
        }
        Ok(())
    }

    /// An environment's promotion rule names another environment of the
    /// spec, as does its mirror; its freeze windows parse and do not
    /// overlap; its approvals can be met.
    fn check_policy(&self, name: &str, env: &EnvironmentSpec) -> Result<(), (String, String)> {
        if let Some(promotion) = &env.promotion {
            let from = &promotion.from;
            if from == name {
                return Err((
                    "promotion.from".into(),
                    format!("environment {name} cannot take its releases from itself; name the environment they soak in first, such as staging"),
                ));
            }
            if !self.environments.contains_key(from) {
                return Err((
                    "promotion.from".into(),
                    format!(
                        "names {from:?}, which is not an environment of the spec; it defines {}",
                        self.environments
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if let Some(mirror) = &env.mirror {
            if mirror == name || !self.environments.contains_key(mirror) {
                return Err((
                    "mirror".into(),
                    format!(
                        "names {mirror:?}; it must be another environment of the spec: {}",
                        self.environments
                            .keys()
                            .filter(|e| *e != name)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        crate::policy::freeze::Freeze::parse(&env.freeze, env.timezone.as_deref())?;
        crate::policy::check_approvals(env)
    }

    /// The migration and the hooks run as processes in a release's dir;
    /// docker services have no such dir on the node yet, so a spec that
    /// gives them either is refused here rather than at the deploy.
    fn commands_run_as_processes(&self) -> Result<(), (String, String)> {
        let docker = |service: &str| {
            self.services
                .get(service)
                .is_some_and(|s| s.runtime == "docker")
        };
        let refusal = |what: &str, service: &str| {
            format!("{what} run as processes in the release's dir, and service {service} runs as a docker container; run it with a process service, or leave it out")
        };
        if let Some(migrate) = self.migrate.as_ref().filter(|m| docker(&m.service)) {
            return Err((
                "migrate.service".into(),
                refusal("migrations", &migrate.service),
            ));
        }
        let order = self.services_for(None, "").unwrap_or_default();
        let once_service = self.once_service();
        for (i, hook) in self.hooks.iter().enumerate() {
            if let Some(service) = order
                .iter()
                .find(|s| docker(s) && hook.runs_for(s, &once_service))
            {
                let key = match hook.service {
                    Some(_) => format!("hooks[{i}].service"),
                    None => format!("hooks[{i}]"),
                };
                return Err((key, refusal("hooks", service)));
            }
        }
        Ok(())
    }

    /// The service names a deploy covers, in the order it rolls them out:
    /// `only`, or all of them (see `order`).
    pub fn services_for(&self, only: Option<&str>, file: &str) -> Result<Vec<String>, SpecError> {
        match only {
            Some(name) if self.services.contains_key(name) => Ok(vec![name.to_string()]),
            Some(name) => Err(SpecError {
                file: file.into(),
                key: "services".into(),
                message: format!(
                    "no service {name:?}; the spec defines {}",
                    self.services.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            }),
            None => {
                let mut rest: Vec<&String> = self
                    .services
                    .keys()
                    .filter(|name| !self.order.contains(name))
                    .collect();
                rest.sort_by_key(|name| (self.services[*name].listen.is_none(), *name));
                Ok(self.order.iter().chain(rest).cloned().collect())
            }
        }
    }

    /// The service run-once hooks naming none run with: the migration's,
    /// else the first in the deploy order.
    fn once_service(&self) -> String {
        match &self.migrate {
            Some(migrate) => migrate.service.clone(),
            None => self
                .services_for(None, "")
                .ok()
                .and_then(|order| order.into_iter().next())
                .unwrap_or_default(),
        }
    }

    /// The run-once hooks a deploy of `service` runs: those naming it, and
    /// those naming no service when it is the migration's service (else
    /// the first in the deploy order).
    fn once_hooks(&self, service: &str) -> Vec<Hook> {
        let once_service = self.once_service();
        self.hooks
            .iter()
            .filter(|h| !h.at.on_every_node() && h.runs_for(service, &once_service))
            .map(HookSpec::plan)
            .collect()
    }

    /// The environment `env`, or an error naming the ones the spec has.
    pub fn environment(&self, file: &str, env: &str) -> Result<&EnvironmentSpec, SpecError> {
        self.environments.get(env).ok_or_else(|| SpecError {
            file: file.to_string(),
            key: "environments".into(),
            message: format!(
                "no environment {env:?}; the spec defines {}",
                self.environments
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}

pub(crate) fn name_ok(name: &str) -> Result<(), String> {
    rules::name(name).map_err(|e| e.message)
}
/// Whether a node's labels satisfy a selector (every key equal).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
