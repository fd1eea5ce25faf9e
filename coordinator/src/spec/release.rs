//! What a deploy of one service in one environment resolves to: its
//! nodes, strategy, hooks and the release, whose id hashes everything it
//! runs.

use std::time::Duration;

use cutover_common::release::ReleaseSpec;
use cutover_common::rules;
use cutover_proto::v1 as pb;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::hooks::HookSpec;
use crate::migration::MigrateSpec;
use crate::notify::spec::NotifySpec;

use super::service::*;
use super::{AppSpec, Resolved, SpecError, MAX_RELEASE_BYTES};

impl AppSpec {
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
                    also_listen: spec.also_listen.clone(),
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
            queues: spec.queues.as_ref().map(|q| (&q.probe()).into()),
            // A deploy keeps the count the service runs now (`scale` sets
            // it): the planner fills it in.
            instances: 0,
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
            load_balancer: environment
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.for_service(service)),
            config: Default::default(),
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
