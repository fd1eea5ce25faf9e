//! The app spec (`cutover.toml`): what an operator keeps in the app's
//! repository, parsed strictly and validated in full before anything is
//! created, so a typo fails the deploy instead of half of it. docs/spec.md
//! documents every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cutover_common::registry::ImageRef;
use cutover_common::release::ReleaseSpec;
use cutover_common::rules;
use cutover_proto::v1 as pb;
use prost::Message as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::hooks::{Hook, HookSpec};
use crate::migration::{MigrateSpec, Migration};
use crate::notify::spec::{NotifySpec, NotifyTarget};
pub use crate::strategy::{BatchSize, Strategy, StrategySpec};

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
pub struct ServiceSpec {
    /// "process" (an artifact unpacked and run) or "docker" (a container
    /// of a pinned image).
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Required for "process"; for "docker" it overrides the image's command.
    #[serde(default)]
    pub command: Vec<String>,
    /// Docker: the image deployed when `deploy` gives no `--image`, e.g.
    /// "registry.example.com/shop/web:1.4"; its tag is resolved to a digest
    /// once per deploy.
    #[serde(default)]
    pub image: Option<String>,
    /// Docker: "bridge" (default) or "host".
    #[serde(default)]
    pub network: Option<String>,
    /// Docker: memory limit, e.g. "512MiB".
    #[serde(default, deserialize_with = "optional_byte_size")]
    pub memory: Option<usize>,
    /// Docker: CPUs the container may use, e.g. 1.5.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Docker: an init process as PID 1 (signal forwarding, zombie reaping).
    #[serde(default)]
    pub init: Option<bool>,
    /// Secrets of the environment this service's releases get as
    /// environment variables of the same name (`cutover secret set`).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// The node proxy's public address; a service without one is a worker.
    pub listen: Option<String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Asks a release to finish its work and exit before the stop signal.
    #[serde(default)]
    pub stop_command: Vec<String>,
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Workers: a new release must stay up this long without a crash.
    #[serde(default, with = "humantime_serde")]
    pub min_healthy_time: Option<Duration>,
    pub health: Option<HealthSpec>,
    #[serde(default)]
    pub smoke: Vec<SmokeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// HTTP check of this path; or `tcp = true`; or `exec = [..]`.
    pub path: Option<String>,
    #[serde(default)]
    pub tcp: bool,
    pub exec: Option<Vec<String>>,
    /// Accepted status: a code or "200-399" (the default).
    pub expect_status: Option<StatusRange>,
    pub expect_body: Option<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "default_healthy_deadline", with = "humantime_serde")]
    pub healthy_deadline: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeSpec {
    pub path: String,
    pub expect_status: Option<StatusRange>,
    pub expect_body: Option<String>,
    #[serde(default = "default_smoke_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// An HTTP status or an inclusive range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange(pub u16, pub u16);

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(i64),
            Text(String),
        }
        let (min, max) = match Raw::deserialize(d)? {
            Raw::Code(n) => rules::status_code(n).map(|c| (c, c)),
            Raw::Text(text) => rules::parse_status(&text),
        }
        .map_err(serde::de::Error::custom)?;
        Ok(StatusRange(min, max))
    }
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
}

fn default_runtime() -> String {
    "process".into()
}

fn optional_byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    cutover_common::config::byte_size::deserialize(d).map(Some)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_worker_min_healthy_time() -> Duration {
    Duration::from_secs(10)
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_smoke_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_healthy_deadline() -> Duration {
    Duration::from_secs(30)
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
        }
        for (name, service) in &self.services {
            let key = format!("services.{name}");
            name_ok(name).map_err(|m| (key.clone(), m))?;
            validate_service(service).map_err(|(k, m)| (format!("{key}.{k}"), m))?;
        }
        crate::notify::spec::check(&self.notify)?;
        crate::jobs::spec::check_all(self)?;
        for (name, environment) in &self.environments {
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

    /// Resolves one service in one environment, with its release pinned to
    /// `version` and, by its runtime, `artifact` or `image` (already pinned
    /// to a digest).
    pub fn resolve(
        &self,
        file: &str,
        env: &str,
        service: &str,
        version: &str,
        artifact: Option<&pb::Artifact>,
        image: Option<&str>,
    ) -> Result<Resolved, SpecError> {
        let error = |key: String, message: String| SpecError {
            file: file.to_string(),
            key,
            message,
        };
        let environment = self.environment(file, env)?;
        let spec = self
            .services
            .get(service)
            .ok_or_else(|| error("services".into(), format!("no service {service:?}")))?;
        rules::version(version).map_err(|e| error(String::new(), e.message))?;
        // Sent by its canonical name ("SIGQUIT" for "quit"), the one every
        // agent reads.
        let stop_signal = match &spec.stop_signal {
            Some(signal) => rules::stop_signal(signal)
                .map_err(|e| error(format!("services.{service}.stop_signal"), e.message))?
                .to_string(),
            None => String::new(),
        };
        let mut selector = environment.nodes.clone();
        for (k, v) in &spec.nodes {
            if let Some(existing) = selector.get(k).filter(|e| *e != v) {
                return Err(error(
                    format!("services.{service}.nodes.{k}"),
                    format!("selects {k}={v} but environment {env} selects {k}={existing}; no node can match both"),
                ));
            }
            selector.insert(k.clone(), v.clone());
        }
        let (artifact, container) = match (spec.runtime.as_str(), artifact, image) {
            ("docker", _, Some(image)) => (
                None,
                Some(pb::Container {
                    image: image.to_string(),
                    network: spec.network.clone().unwrap_or_default(),
                    memory_bytes: spec.memory.unwrap_or(0) as u64,
                    cpus: spec.cpus.unwrap_or(0.0),
                    init: spec.init.unwrap_or(false),
                }),
            ),
            ("docker", _, None) => {
                return Err(error(
                    format!("services.{service}.image"),
                    format!("service {service} runs as a container: deploy it with --image REPO:TAG or set services.{service}.image"),
                ))
            }
            (_, Some(artifact), _) => (Some(artifact.clone()), None),
            (_, None, _) => {
                return Err(error(
                    format!("services.{service}"),
                    format!("service {service} runs as a process: deploy it with --artifact"),
                ))
            }
        };
        let mut vars = environment.env.clone();
        vars.extend(spec.env.clone());
        let kind = match &spec.listen {
            Some(listen) => {
                let health = spec
                    .health
                    .as_ref()
                    .expect("validated: web services have a health check");
                let web = pb::WebService {
                    listen: listen.clone(),
                    health: Some(health_check(health)),
                    health_interval_ms: ms(health.interval),
                    healthy_threshold: health.healthy_threshold,
                    healthy_deadline_ms: ms(health.healthy_deadline),
                    smoke: spec
                        .smoke
                        .iter()
                        .map(|s| pb::Check {
                            probe: Some(pb::check::Probe::Http(http_probe(
                                &s.path,
                                s.expect_status.or(Some(StatusRange(
                                    rules::DEFAULT_SMOKE_STATUS.0,
                                    rules::DEFAULT_SMOKE_STATUS.1,
                                ))),
                                &s.expect_body,
                            ))),
                            timeout_ms: ms(s.timeout),
                        })
                        .collect(),
                    drain_timeout_ms: ms(spec.drain_timeout),
                };
                pb::release::Kind::Web(web)
            }
            None => {
                let health = spec.health.as_ref();
                let worker = pb::Worker {
                    health: health.map(health_check),
                    health_interval_ms: health.map_or(0, |h| ms(h.interval)),
                    healthy_threshold: health.map_or(0, |h| h.healthy_threshold),
                    healthy_deadline_ms: health.map_or(0, |h| ms(h.healthy_deadline)),
                    min_healthy_time_ms: ms(spec
                        .min_healthy_time
                        .unwrap_or_else(default_worker_min_healthy_time)),
                };
                pb::release::Kind::Worker(worker)
            }
        };
        let mut release = pb::Release {
            release_id: String::new(),
            service: service.to_string(),
            version: version.to_string(),
            artifact,
            container,
            secrets: spec
                .secrets
                .iter()
                .map(|name| pb::SecretRef {
                    name: name.clone(),
                    version: 0,
                })
                .collect(),
            command: spec.command.clone(),
            env: vars.into_iter().collect(),
            kind: Some(kind),
            stop_signal,
            stop_grace_ms: ms(spec.stop_grace),
            stop_command: spec.stop_command.clone(),
            stop_timeout_ms: ms(spec.stop_timeout),
            hooks: self
                .hooks
                .iter()
                .filter(|h| h.at.on_every_node() && h.runs_for(service, ""))
                .map(HookSpec::release_hook)
                .collect(),
        };
        release.release_id = release_id(&release);
        // The agents' own check, run here too: a release a node would
        // refuse is refused at deploy time, with the message it would give.
        ReleaseSpec::try_from(&release).map_err(|e| {
            error(
                format!("services.{service}"),
                format!("the release would be refused: {e}"),
            )
        })?;
        // Every release is stored whole and sent with every command: a
        // bound keeps the store and the command path small.
        let size = release.encoded_len();
        if size > MAX_RELEASE_BYTES {
            let (key, value) = release
                .env
                .iter()
                .max_by_key(|(k, v)| k.len() + v.len())
                .map_or((String::new(), 0), |(k, v)| {
                    let table = if spec.env.contains_key(k) {
                        format!("services.{service}.env.{k}")
                    } else {
                        format!("environments.{env}.env.{k}")
                    };
                    (table, k.len() + v.len())
                });
            return Err(error(
                key,
                format!(
                    "the release of {service} would be {} KiB, over the {} KiB limit (this value: {} KiB); ship large data in the artifact or image, not the environment",
                    size / 1024,
                    MAX_RELEASE_BYTES / 1024,
                    value / 1024
                ),
            ));
        }
        let (strategy, key) = match &environment.strategy {
            Some(strategy) => (strategy, format!("environments.{env}.strategy")),
            None => (&self.strategy, "strategy".to_string()),
        };
        let analyses = self.analyses().map_err(|(k, message)| error(k, message))?;
        let strategy = strategy
            .resolve(&analyses)
            .map_err(|(k, message)| error(format!("{key}.{k}"), message))?;
        let migrate = self.migrate.as_ref().filter(|m| m.service == service);
        let backup_gates = environment
            .require_backup
            .iter()
            .chain(migrate.and_then(|m| m.require_backup.as_ref()))
            .cloned()
            .collect();
        Ok(Resolved {
            app: self.app.clone(),
            env: env.to_string(),
            service: service.to_string(),
            selector,
            strategy,
            release,
            migration: migrate.map(MigrateSpec::plan),
            hooks: self.once_hooks(service),
            notify: self.notify.iter().map(NotifySpec::target).collect(),
            backup_gates,
        })
    }
}

/// `<service>-<version>-<8 hex>`: the hash covers everything the release
/// runs, so the same version with another command, environment or artifact
/// is another release, and deploying an identical one again is recognised.
/// The environment's map is hashed in key order, so the id is stable.
pub fn release_id(release: &pb::Release) -> String {
    let mut canonical = release.clone();
    canonical.release_id.clear();
    let mut hasher = Sha256::new();
    let mut env: Vec<_> = std::mem::take(&mut canonical.env).into_iter().collect();
    env.sort();
    for (k, v) in env {
        hasher.update(k.as_bytes());
        hasher.update([0]);
        hasher.update(v.as_bytes());
        hasher.update([0]);
    }
    hasher.update(encoding_before_the_oneof(&canonical));
    let hash = hasher.finalize();
    let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{hex}", release.service, release.version)
}

/// A release's bytes in the field order they had before `web` and `worker`
/// became a oneof: prost encodes a oneof at its lowest tag (7), which puts a
/// worker (tag 10) before fields 8 and 9 and would change the id of every
/// worker, so a worker deployed again would no longer be recognised. Fields
/// after 10 go after the worker, as they did.
fn encoding_before_the_oneof(release: &pb::Release) -> Vec<u8> {
    let Some(pb::release::Kind::Worker(worker)) = &release.kind else {
        return release.encode_to_vec();
    };
    let mut head = release.clone();
    head.kind = None;
    let tail = pb::Release {
        stop_command: std::mem::take(&mut head.stop_command),
        stop_timeout_ms: std::mem::take(&mut head.stop_timeout_ms),
        container: head.container.take(),
        secrets: std::mem::take(&mut head.secrets),
        ..Default::default()
    };
    let worker = pb::Release {
        kind: Some(pb::release::Kind::Worker(worker.clone())),
        ..Default::default()
    };
    [head, worker, tail]
        .iter()
        .flat_map(|part| part.encode_to_vec())
        .collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn http_probe(path: &str, status: Option<StatusRange>, body: &Option<String>) -> pb::HttpProbe {
    let (min, max) = status.map_or(rules::DEFAULT_HEALTH_STATUS, |StatusRange(min, max)| {
        (min, max)
    });
    pb::HttpProbe {
        path: path.to_string(),
        status_min: min.into(),
        status_max: max.into(),
        body_contains: body.clone().unwrap_or_default(),
    }
}

fn health_check(h: &HealthSpec) -> pb::Check {
    let probe = if let Some(path) = &h.path {
        pb::check::Probe::Http(http_probe(path, h.expect_status, &h.expect_body))
    } else if let Some(command) = &h.exec {
        pb::check::Probe::Exec(pb::ExecProbe {
            command: command.clone(),
        })
    } else {
        pb::check::Probe::Tcp(pb::TcpProbe {})
    };
    pb::Check {
        probe: Some(probe),
        timeout_ms: ms(h.timeout),
    }
}

pub(crate) fn name_ok(name: &str) -> Result<(), String> {
    rules::name(name).map_err(|e| e.message)
}

fn validate_service(s: &ServiceSpec) -> Result<(), (String, String)> {
    let docker = match s.runtime.as_str() {
        "process" => false,
        "docker" => true,
        other => {
            return Err((
                "runtime".into(),
                format!(
                    "{other:?} is not a runtime this version has; use \"process\" or \"docker\""
                ),
            ))
        }
    };
    if docker {
        if let Some(image) = &s.image {
            ImageRef::parse(image).map_err(|e| ("image".to_string(), e.to_string()))?;
        }
        if let Some(network) = s
            .network
            .as_deref()
            .filter(|n| !["bridge", "host"].contains(n))
        {
            return Err((
                "network".into(),
                format!("{network:?}: use \"bridge\" (the default) or \"host\""),
            ));
        }
        if let Some(cpus) = s
            .cpus
            .filter(|c| !(c.is_finite() && *c > 0.0 && *c <= 1024.0))
        {
            return Err((
                "cpus".into(),
                format!("{cpus}: expected a number of CPUs above 0, e.g. 1.5"),
            ));
        }
        if s.health.as_ref().is_some_and(|h| h.exec.is_some()) {
            rules::exec_check(docker).map_err(|e| ("health.exec".to_string(), e.message))?;
        }
    } else {
        let docker_only = [
            ("image", s.image.is_some()),
            ("network", s.network.is_some()),
            ("memory", s.memory.is_some()),
            ("cpus", s.cpus.is_some()),
            ("init", s.init.is_some()),
        ];
        if let Some((key, _)) = docker_only.iter().find(|(_, set)| *set) {
            return Err((
                key.to_string(),
                "is a docker setting; this service runs as a process (set runtime = \"docker\" to run an image)".into(),
            ));
        }
    }
    if s.command.first().is_some_and(|p| p.is_empty()) || (!docker && s.command.is_empty()) {
        return Err((
            "command".into(),
            "must name the program to run, e.g. [\"php\", \"artisan\", \"octane:start\"]".into(),
        ));
    }
    if let Some(signal) = &s.stop_signal {
        rules::stop_signal(signal).map_err(|e| ("stop_signal".to_string(), e.message))?;
    }
    crate::spec_checks::env_vars(&s.env).map_err(|(k, m)| (format!("env.{k}"), m))?;
    for (i, name) in s.secrets.iter().enumerate() {
        crate::secrets::validate_name(name)
            .map_err(|e| (format!("secrets[{i}]"), e.to_string()))?;
        if s.env.contains_key(name) {
            return Err((
                format!("secrets[{i}]"),
                format!("{name} is also in env; a variable comes from one place"),
            ));
        }
    }
    if s.stop_command.first().is_some_and(|p| p.is_empty()) {
        return Err((
            "stop_command".into(),
            "must name a program, e.g. [\"php\", \"artisan\", \"horizon:terminate\"]".into(),
        ));
    }
    if let Some(listen) = &s.listen {
        parse_listen(listen).map_err(|m| ("listen".to_string(), m))?;
        let Some(health) = &s.health else {
            return Err(("health".into(), "a web service (it has `listen`) needs a health check: add [services.NAME.health] with a `path`".into()));
        };
        validate_health(health).map_err(|(k, m)| (format!("health.{k}"), m))?;
        if s.min_healthy_time.is_some() {
            return Err(("min_healthy_time".into(), "is for workers (services without `listen`); a web release is judged by its health check, and batches by strategy.min_healthy_time".into()));
        }
    } else {
        if !s.smoke.is_empty() {
            return Err((
                "smoke".into(),
                "smoke checks are HTTP requests: they need a `listen` address (a web service)"
                    .into(),
            ));
        }
        if let Some(health) = &s.health {
            validate_health(health).map_err(|(k, m)| (format!("health.{k}"), m))?;
            if health.exec.is_none() {
                return Err((
                    "health".into(),
                    "a worker has no port: its health check must be `exec = [..]`".into(),
                ));
            }
        }
    }
    for (i, smoke) in s.smoke.iter().enumerate() {
        if !smoke.path.starts_with('/') {
            return Err((
                format!("smoke[{i}].path"),
                format!("{:?} must start with /", smoke.path),
            ));
        }
    }
    Ok(())
}

fn validate_health(h: &HealthSpec) -> Result<(), (String, String)> {
    let kinds = usize::from(h.path.is_some()) + usize::from(h.tcp) + usize::from(h.exec.is_some());
    if kinds != 1 {
        return Err((
            String::from("path"),
            "set exactly one probe: `path` (HTTP), `tcp = true` or `exec = [..]`".into(),
        ));
    }
    if let Some(path) = &h.path {
        if !path.starts_with('/') {
            return Err(("path".into(), format!("{path:?} must start with /")));
        }
    }
    if h.exec.as_ref().is_some_and(|c| c.is_empty()) {
        return Err(("exec".into(), "must name a command".into()));
    }
    if h.healthy_threshold == 0 {
        return Err(("healthy_threshold".into(), "must be at least 1".into()));
    }
    if h.interval.is_zero() {
        return Err(("interval".into(), "must be above zero, e.g. \"1s\"".into()));
    }
    if h.timeout.is_zero() {
        return Err(("timeout".into(), "must be above zero, e.g. \"1s\"".into()));
    }
    if h.healthy_deadline < h.interval {
        return Err((
            "healthy_deadline".into(),
            format!(
                "{} is shorter than the interval {}; the check could never pass",
                humantime::format_duration(h.healthy_deadline),
                humantime::format_duration(h.interval)
            ),
        ));
    }
    Ok(())
}

/// ":8080" (the node's address) or "ip:port".
fn parse_listen(listen: &str) -> Result<(), String> {
    let bad = || format!("{listen:?} is not a listen address: use \":PORT\" or \"IP:PORT\"");
    if let Some(port) = listen.strip_prefix(':') {
        return port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|_| ())
            .ok_or_else(bad);
    }
    listen.parse::<SocketAddr>().map(|_| ()).map_err(|_| bad())
}

/// Whether a node's labels satisfy a selector (every key equal).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::HookAt;

    const GOOD: &str = r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":8080"
nodes = { role = "web" }
drain_timeout = "10s"
[services.web.env]
APP_NAME = "shop"
[services.web.health]
path = "/health"
interval = "1s"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "30s"
[[services.web.smoke]]
path = "/"
expect_status = 200

[strategy]
kind = "rolling"
batch = "25%"
max_unavailable = 0
min_healthy_time = "5s"
progress_deadline = "10m"
auto_rollback = true

[environments.local]
nodes = { env = "local" }
[environments.local.env]
APP_ENV = "local"
"#;

    /// Service web of `spec` resolved in environment local at v1.
    fn resolve_web(spec: &AppSpec) -> Result<Resolved, SpecError> {
        spec.resolve(
            "cutover.toml",
            "local",
            "web",
            "v1",
            Some(&artifact()),
            None,
        )
    }

    fn artifact() -> pb::Artifact {
        pb::Artifact {
            url: "coordinator:".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
        }
    }

    fn error_of(text: &str) -> SpecError {
        AppSpec::parse(text, "cutover.toml").expect_err("spec must be refused")
    }

    #[test]
    fn the_documented_shape_resolves_to_a_release() {
        let spec = AppSpec::parse(GOOD, "cutover.toml").unwrap();
        let resolved = resolve_web(&spec).unwrap();
        assert_eq!(
            resolved.selector,
            [
                ("env".into(), "local".into()),
                ("role".into(), "web".into())
            ]
            .into()
        );
        assert_eq!(resolved.strategy.batches().batch, BatchSize::Percent(25));
        let release = &resolved.release;
        assert!(
            release.release_id.starts_with("web-v1-"),
            "{}",
            release.release_id
        );
        assert_eq!(
            release.env.get("APP_ENV").map(String::as_str),
            Some("local")
        );
        assert_eq!(
            release.env.get("APP_NAME").map(String::as_str),
            Some("shop")
        );
        let Some(pb::release::Kind::Web(web)) = &release.kind else {
            panic!("a service with `listen` is a web service")
        };
        assert_eq!(web.drain_timeout_ms, 10_000);
        assert_eq!(web.smoke.len(), 1);
        // The same inputs give the same id; another command gives another.
        let again = resolve_web(&spec).unwrap();
        assert_eq!(again.release.release_id, release.release_id);
        let changed = AppSpec::parse(&GOOD.replace("app.py", "app2.py"), "cutover.toml").unwrap();
        let other = resolve_web(&changed).unwrap();
        assert_ne!(other.release.release_id, release.release_id);
    }

    #[test]
    fn bad_specs_name_file_key_and_value() {
        let e = error_of(&GOOD.replace(
            "drain_timeout = \"10s\"",
            "drain_timeout = \"10s\"\ndrain_timout = \"5s\"",
        ));
        assert_eq!(e.key, "services.web.drain_timout");
        assert!(e.message.contains("unknown field"), "{e}");
        eprintln!("{e}");
        let e = error_of(&GOOD.replace("interval = \"1s\"", "interval = \"1x\""));
        assert_eq!(e.key, "services.web.health.interval");
        assert!(
            e.to_string()
                .starts_with("cutover.toml: key `services.web.health.interval`"),
            "{e}"
        );
        assert!(e.message.contains("1x"), "{e}");
        eprintln!("{e}");
        let e = error_of(&GOOD.replace("batch = \"25%\"", "batch = 0"));
        assert_eq!(e.key, "strategy.batch");
        assert!(e.message.contains("0 is not a batch size"), "{e}");
        let e = error_of(&GOOD.replace("[services.web.health]\npath = \"/health\"\ninterval = \"1s\"\ntimeout = \"1s\"\nhealthy_threshold = 2\nhealthy_deadline = \"30s\"\n", ""));
        assert_eq!(e.key, "services.web.health", "{e}");
        let e = error_of(&GOOD.replace("listen = \":8080\"", "listen = \"8080\""));
        assert_eq!(e.key, "services.web.listen");
        assert!(e.message.contains("\"8080\""), "{e}");
        let e = error_of(&GOOD.replace("app = \"shop\"", "app = \"shop\"\n[[oops"));
        assert!(e.message.starts_with("not valid TOML"), "{e}");
    }

    #[test]
    fn release_ids_stay_what_earlier_versions_computed() {
        // Ids are compared with stored ones to recognise a release deployed
        // again: the hash must not move when the wire type changes shape
        // (web and worker became a oneof, which prost encodes at tag 7).
        let text = format!(
            "{GOOD}\n[services.horizon]\ncommand = [\"php\", \"artisan\", \"horizon\"]\nstop_signal = \"quit\"\nstop_command = [\"php\", \"artisan\", \"horizon:terminate\"]\n"
        );
        let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
        let web = resolve_web(&spec).unwrap().release;
        let worker = spec
            .resolve(
                "cutover.toml",
                "local",
                "horizon",
                "v1",
                Some(&artifact()),
                None,
            )
            .unwrap()
            .release;
        assert_eq!(web.release_id, "web-v1-33c1932c");
        assert_eq!(worker.release_id, "horizon-v1-a703644a");
    }

    #[test]
    fn a_deploy_of_several_services_runs_them_in_the_declared_order_web_first_by_default() {
        let worker = |name: &str| {
            format!("\n[services.{name}]\ncommand = [\"php\", \"artisan\", \"{name}\"]\n")
        };
        let text = format!("{GOOD}{}{}", worker("horizon"), worker("audit"));
        let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
        assert_eq!(
            spec.services_for(None, "cutover.toml").unwrap(),
            ["web", "audit", "horizon"],
            "web services first, then workers by name"
        );
        let ordered = format!("order = [\"horizon\"]\n{text}");
        let spec = AppSpec::parse(&ordered, "cutover.toml").unwrap();
        assert_eq!(
            spec.services_for(None, "cutover.toml").unwrap(),
            ["horizon", "web", "audit"]
        );
        let e = AppSpec::parse(&format!("order = [\"api\"]\n{text}"), "f").unwrap_err();
        assert_eq!(e.key, "order");
        assert!(
            e.message.contains("\"api\"") && e.message.contains("horizon"),
            "{e}"
        );
        let e = AppSpec::parse(&format!("order = [\"web\", \"web\"]\n{text}"), "f").unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn a_release_over_the_size_limit_is_refused_naming_its_largest_value() {
        let big = "x".repeat(MAX_RELEASE_BYTES);
        let text = GOOD.replace("APP_ENV = \"local\"", "APP_ENV = \"local\"\nSMALL = \"1\"");
        let text = text.replace(
            "APP_NAME = \"shop\"",
            &format!(
                "APP_NAME = \"shop\"\nBLOB = \"{}\"",
                &big[..MAX_RELEASE_BYTES / 2]
            ),
        );
        let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
        let release = resolve_web(&spec).unwrap();
        assert!(release.release.encoded_len() < MAX_RELEASE_BYTES);
        let text = GOOD.replace(
            "APP_ENV = \"local\"",
            &format!(
                "APP_ENV = \"local\"\nBLOB = \"{}\"",
                &big[..MAX_RELEASE_BYTES / 2]
            ),
        );
        let text = text.replace(
            "APP_NAME = \"shop\"",
            &format!(
                "APP_NAME = \"shop\"\nBLOB2 = \"{}\"",
                &big[..MAX_RELEASE_BYTES / 2 - 10]
            ),
        );
        let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
        let e = resolve_web(&spec).unwrap_err();
        assert_eq!(e.key, "environments.local.env.BLOB", "{e}");
        assert!(e.message.contains("over the 256 KiB limit"), "{e}");
        let huge = "x".repeat(MAX_SPEC_BYTES);
        let e = AppSpec::parse(&format!("{GOOD}\n# {huge}"), "cutover.toml").unwrap_err();
        assert!(e.message.contains("over the 1024 KiB limit"), "{e}");
    }

    #[test]
    fn resolving_names_missing_environments_and_services() {
        let spec = AppSpec::parse(GOOD, "cutover.toml").unwrap();
        let e = spec
            .resolve(
                "cutover.toml",
                "production",
                "web",
                "v1",
                Some(&artifact()),
                None,
            )
            .unwrap_err();
        assert_eq!(e.key, "environments");
        assert!(
            e.message.contains("\"production\"") && e.message.contains("local"),
            "{e}"
        );
        let e = spec.services_for(Some("api"), "cutover.toml").unwrap_err();
        assert!(e.message.contains("\"api\""), "{e}");
        let e = spec
            .resolve(
                "cutover.toml",
                "local",
                "web",
                "v 1",
                Some(&artifact()),
                None,
            )
            .unwrap_err();
        assert!(e.message.contains("version \"v 1\""), "{e}");
    }

    #[test]
    fn stop_signals_are_sent_by_their_name_and_unknown_ones_refused_at_deploy() {
        let with_signal = |signal: &str| {
            GOOD.replace(
                "drain_timeout = \"10s\"",
                &format!("drain_timeout = \"10s\"\nstop_signal = {signal:?}"),
            )
        };
        for (spelling, name) in [
            ("SIGTERM", "SIGTERM"),
            ("quit", "SIGQUIT"),
            ("3", "SIGQUIT"),
        ] {
            let spec = AppSpec::parse(&with_signal(spelling), "cutover.toml").unwrap();
            let resolved = resolve_web(&spec).unwrap();
            assert_eq!(resolved.release.stop_signal, name, "{spelling}");
        }
        // What an agent would refuse never reaches one.
        for bad in ["SIGSTOP", "SIGRTMIN+3", "NOPE", ""] {
            let e = error_of(&with_signal(bad));
            assert_eq!(e.key, "services.web.stop_signal", "{e}");
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn env_var_names_follow_the_secret_name_rule() {
        let long = "A".repeat(129);
        let e = error_of(&GOOD.replace("APP_NAME = \"shop\"", &format!("{long} = \"x\"")));
        assert_eq!(e.key, format!("services.web.env.{long}"), "{e}");
        assert!(
            e.message.contains("not an environment variable name"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("APP_ENV = \"local\"", "1X = \"local\""));
        assert_eq!(e.key, "environments.local.env.1X", "{e}");
        let e = error_of(&GOOD.replace(
            "drain_timeout = \"10s\"",
            "drain_timeout = \"10s\"\nsecrets = [\"DB-PASSWORD\"]",
        ));
        assert_eq!(e.key, "services.web.secrets[0]", "{e}");
        assert!(e.message.contains("\"DB-PASSWORD\""), "{e}");
    }

    #[test]
    fn hooks_go_to_the_rollout_or_into_the_release_by_where_they_run() {
        let hooks = r#"
[[hooks]]
at = "pre_activate"
command = ["php", "artisan", "config:cache"]
[[hooks]]
at = "pre_deploy"
command = ["php", "artisan", "down:check"]
timeout = "1m"
[[hooks]]
at = "post_deploy"
command = ["notify"]
service = "worker"
"#;
        let worker = "\n[services.worker]\ncommand = [\"php\", \"artisan\", \"horizon\"]\n";
        let spec = AppSpec::parse(&format!("{GOOD}{worker}{hooks}"), "cutover.toml").unwrap();
        let web = resolve_web(&spec).unwrap();
        assert_eq!(
            web.hooks.len(),
            1,
            "run-once hooks without a service go with web"
        );
        assert_eq!(web.hooks[0].at, HookAt::PreDeploy);
        assert_eq!(web.hooks[0].timeout_ms, 60_000);
        assert_eq!(web.release.hooks.len(), 1);
        assert_eq!(
            web.release.hooks[0].command,
            ["php", "artisan", "config:cache"]
        );
        let worker = spec
            .resolve(
                "cutover.toml",
                "local",
                "worker",
                "v1",
                Some(&artifact()),
                None,
            )
            .unwrap();
        assert_eq!(worker.hooks.len(), 1);
        assert_eq!(worker.hooks[0].at, HookAt::PostDeploy);
        assert_eq!(
            worker.release.hooks.len(),
            1,
            "activate hooks: every service"
        );
        // A hook is part of the release it runs in.
        assert_ne!(
            web.release.release_id,
            resolve_web(&AppSpec::parse(GOOD, "cutover.toml").unwrap())
                .unwrap()
                .release
                .release_id
        );

        let e = error_of(&format!(
            "{GOOD}\n[[hooks]]\nat = \"pre_deploy\"\ncommand = []\n"
        ));
        assert_eq!(e.key, "hooks[0].command", "{e}");
        let e = error_of(&format!(
            "{GOOD}\n[[hooks]]\nat = \"post_deploy\"\ncommand = [\"x\"]\ntimeout = \"0s\"\n"
        ));
        assert_eq!(e.key, "hooks[0].timeout", "{e}");
        let e = error_of(&format!(
            "{GOOD}\n[[hooks]]\nat = \"later\"\ncommand = [\"x\"]\n"
        ));
        assert_eq!(e.key, "hooks[0].at", "{e}");
        let docker = "\n[services.api]\nruntime = \"docker\"\nimage = \"ghcr.io/acme/api:1\"\n";
        let e = error_of(&format!(
            "{GOOD}{docker}\n[[hooks]]\nat = \"pre_activate\"\ncommand = [\"x\"]\n"
        ));
        assert_eq!(e.key, "hooks[0]", "{e}");
        assert!(
            e.message.contains("service api runs as a docker container"),
            "{e}"
        );
        let e = error_of(&format!(
            "{GOOD}{docker}\n[migrate]\nservice = \"api\"\ncommand = [\"migrate\"]\n"
        ));
        assert_eq!(e.key, "migrate.service", "{e}");
    }

    #[test]
    fn docker_services_take_an_image_and_refuse_process_only_settings() {
        let docker = GOOD.replace(
            "command = [\"python3\", \"app.py\"]",
            "runtime = \"docker\"\nimage = \"ghcr.io/acme/shop:1.4\"\nmemory = \"512MiB\"\ncpus = 1.5\ninit = true",
        );
        let spec = AppSpec::parse(&docker, "cutover.toml").unwrap();
        let pinned = format!("ghcr.io/acme/shop@sha256:{}", "b".repeat(64));
        let resolved = spec
            .resolve("cutover.toml", "local", "web", "v1", None, Some(&pinned))
            .unwrap();
        let release = &resolved.release;
        assert!(release.artifact.is_none());
        assert!(release.command.is_empty(), "the image's own command");
        let container = release.container.clone().unwrap();
        assert_eq!(container.image, pinned);
        assert_eq!(container.memory_bytes, 512 << 20);
        assert_eq!(container.cpus, 1.5);
        assert!(container.init);
        // Another digest is another release.
        let other = spec
            .resolve(
                "cutover.toml",
                "local",
                "web",
                "v1",
                None,
                Some(&pinned.replace('b', "c")),
            )
            .unwrap();
        assert_ne!(other.release.release_id, release.release_id);
        // What an agent would refuse is refused here, in the agent's words.
        let e = spec
            .resolve("cutover.toml", "local", "web", "v1", None, Some("shop:1.4"))
            .unwrap_err();
        assert_eq!(e.key, "services.web", "{e}");
        assert!(
            e.message
                .contains("would be refused: container.image: \"shop:1.4\" is not pinned"),
            "{e}"
        );
        // A docker service needs an image, a process service an artifact.
        let e = resolve_web(&spec).unwrap_err();
        assert!(e.message.contains("--image"), "{e}");
        let process = AppSpec::parse(GOOD, "cutover.toml").unwrap();
        let e = process
            .resolve("cutover.toml", "local", "web", "v1", None, Some(&pinned))
            .unwrap_err();
        assert!(e.message.contains("--artifact"), "{e}");

        let e = error_of(&docker.replace("cpus = 1.5", "cpus = -1"));
        assert_eq!(e.key, "services.web.cpus");
        let e = error_of(&docker.replace("ghcr.io/acme/shop:1.4", "Shop:1.4"));
        assert_eq!(e.key, "services.web.image");
        let e = error_of(&docker.replace("init = true", "network = \"overlay\""));
        assert_eq!(e.key, "services.web.network");
        let e =
            error_of(&GOOD.replace("listen = \":8080\"", "listen = \":8080\"\nimage = \"shop\""));
        assert_eq!(e.key, "services.web.image");
        assert!(e.message.contains("runtime = \"docker\""), "{e}");
        let e = error_of(&GOOD.replace("runtime", "x").replace(
            "command = [\"python3\", \"app.py\"]",
            "runtime = \"podman\"",
        ));
        assert_eq!(e.key, "services.web.runtime");
    }

    #[test]
    fn webhooks_are_checked_with_the_spec_and_go_with_every_service() {
        let text = format!(
            "{GOOD}\n[[notify]]\nurl = \"https://hooks.example.com/x\"\nevents = [\"failed\"]\n"
        );
        let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
        let notify = resolve_web(&spec).unwrap().notify;
        assert_eq!(notify.len(), 1);
        assert_eq!(notify[0].url, "https://hooks.example.com/x");
        let e = error_of(&text.replace("https://", "ftp://"));
        assert!(
            e.to_string()
                .starts_with("cutover.toml: key `notify[0].url`: \"ftp://hooks.example.com/x\""),
            "{e}"
        );
        let e = error_of(&format!("{text}tiemout = \"1s\"\n"));
        assert_eq!(e.key, "notify[0].tiemout", "{e}");
    }

    #[test]
    fn batch_sizes() {
        assert_eq!(BatchSize::Percent(25).nodes(5), 2);
        assert_eq!(BatchSize::Percent(100).nodes(5), 5);
        assert_eq!(BatchSize::Percent(1).nodes(5), 1);
        assert_eq!(BatchSize::Count(2).nodes(5), 2);
        assert_eq!(BatchSize::Count(9).nodes(5), 5);
    }
}
