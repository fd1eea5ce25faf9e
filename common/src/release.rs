//! A release as both sides act on it: a `cutover.v1.Release` checked and
//! defaulted once. The coordinator converts every release it builds before
//! it is stored or sent, the agent every release it receives before it acts,
//! so a release a node would refuse is refused at deploy time, with the same
//! message.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use cutover_proto::v1 as pb;

use crate::digest::Digest;
use crate::rules;

/// A check's timeout when the release names none.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a health check runs when the release says 0.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a new release may take to turn healthy when the release says 0.
pub const DEFAULT_HEALTHY_DEADLINE: Duration = Duration::from_secs(60);
/// A web release's drain timeout when its spec names none; also that of
/// releases an agent recorded before releases carried their own.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a release may take to exit after its stop signal when the
/// release says 0.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Most processes of one release per node (`cutover scale`): each needs a
/// port of its own and its share of the node's memory; past this, add
/// nodes.
pub const MAX_INSTANCES: u32 = 32;

/// A release refused: which field, what is wrong with it and what is
/// expected instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ReleaseError {
    /// The field as the wire type names it, e.g. `web.health.http.path`.
    pub field: String,
    pub problem: String,
}

fn refuse(field: impl Into<String>, problem: impl Into<String>) -> ReleaseError {
    ReleaseError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A checked release.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseSpec {
    pub release_id: String,
    pub service: String,
    pub version: String,
    pub source: Source,
    /// Empty only for a container, which then runs its image's command.
    pub command: Vec<String>,
    /// Sorted by name.
    pub env: Vec<(String, String)>,
    pub kind: Kind,
    /// Its canonical name ("SIGQUIT"); `None` when the release names none
    /// (a process then stops with SIGTERM, a container with its image's
    /// STOPSIGNAL, which only the node can look up).
    pub stop_signal: Option<&'static str>,
    pub stop_grace: Duration,
    /// Run to ask the release to finish its work and exit; empty: none.
    pub stop_command: Vec<String>,
    pub stop_timeout: Duration,
    /// The secrets the release's environment gets, by name; each name is an
    /// environment variable name.
    pub secrets: Vec<SecretRef>,
    /// Run around the release's start on each node (see `ReleaseHook` in
    /// the proto), in order.
    pub hooks: Vec<ActivateHook>,
    /// Queue depth and worker health to probe while it serves.
    pub queues: Option<crate::queues::QueueProbeSpec>,
    /// Processes per node, 1 to `MAX_INSTANCES` (`Release.instances`).
    pub instances: u32,
}

/// A command the node runs as part of a release's cutover.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActivateHook {
    pub at: HookPoint,
    pub command: Vec<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    /// Before the release starts.
    PreActivate,
    /// Once it passed its checks, before the switch.
    PostActivate,
}

impl HookPoint {
    pub fn as_str(self) -> &'static str {
        match self {
            HookPoint::PreActivate => "pre_activate",
            HookPoint::PostActivate => "post_activate",
        }
    }
}

/// Where a release's code comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// An archive fetched from `url` (see `Artifact.url`), refused unless it
    /// matches `digest`.
    Artifact {
        url: String,
        digest: Digest,
    },
    Container(Container),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    /// Pinned: `REPO@sha256:<64 hex digits>`.
    pub image: String,
    /// Shares the node's network instead of publishing a port.
    pub host_network: bool,
    /// 0: no limit.
    pub memory_bytes: u64,
    /// 0: no limit.
    pub cpus: f64,
    pub init: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub version: u32,
}

/// What a release runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Web(Web),
    Worker(Worker),
}

/// A service served through the node proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Web {
    pub listen: Listen,
    /// More addresses the proxy serves on (`also_listen`).
    pub also_listen: Vec<Listen>,
    pub health: Check,
    pub gate: HealthGate,
    pub smoke: Vec<Check>,
    pub drain_timeout: Duration,
}

/// A service without a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// An exec check, if any: without a port nothing else can be probed.
    pub health: Option<Check>,
    pub gate: HealthGate,
    /// A new release must stay up this long without a crash to be healthy.
    pub min_healthy_time: Duration,
}

/// Where the node proxy of a web service listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// ":PORT": this port on the node's address.
    NodePort(u16),
    /// "IP:PORT".
    Addr(SocketAddr),
}

impl Listen {
    pub fn parse(text: &str) -> Result<Self, ReleaseError> {
        let bad = || {
            refuse(
                "web.listen",
                format!("{text:?} is not an address: expected \":PORT\" (the node's address) or \"IP:PORT\", e.g. \":8080\""),
            )
        };
        match text.strip_prefix(':') {
            Some(port) => port.parse().map(Listen::NodePort).map_err(|_| bad()),
            None => text.parse().map(Listen::Addr).map_err(|_| bad()),
        }
    }

    /// The socket address on a node whose address is `node`.
    pub fn on(self, node: IpAddr) -> SocketAddr {
        match self {
            Listen::NodePort(port) => SocketAddr::new(node, port),
            Listen::Addr(addr) => addr,
        }
    }
}

impl Web {
    /// Every address its proxy listens on, on node address `node`:
    /// `listen` first.
    pub fn listens(&self, node: IpAddr) -> Vec<SocketAddr> {
        std::iter::once(self.listen)
            .chain(self.also_listen.iter().copied())
            .map(|l| l.on(node))
            .collect()
    }
}

/// A health or smoke check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    pub probe: Probe,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Probe {
    /// GET `path`; passes when the status is in `expect_status` and, if set,
    /// the body contains `body_contains`.
    Http {
        path: String,
        expect_status: RangeInclusive<u16>,
        body_contains: Option<String>,
    },
    /// A TCP connection to the release's port is accepted.
    Tcp,
    /// The command exits 0; it runs in the release dir with the release
    /// environment and `PORT`.
    Exec { command: Vec<String> },
}

impl Check {
    pub fn describe(&self) -> String {
        match &self.probe {
            Probe::Http { path, .. } => format!("http GET {path}"),
            Probe::Tcp => "tcp connect".to_string(),
            Probe::Exec { command } => format!("exec {}", command.join(" ")),
        }
    }

    fn is_exec(&self) -> bool {
        matches!(self.probe, Probe::Exec { .. })
    }
}

/// How a health check gates a release: it must pass `healthy_threshold`
/// times in a row, tried every `interval`, within `deadline`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthGate {
    pub interval: Duration,
    pub healthy_threshold: u32,
    pub deadline: Duration,
}

impl HealthGate {
    fn from_wire(interval_ms: u64, healthy_threshold: u32, deadline_ms: u64) -> Self {
        HealthGate {
            interval: millis(interval_ms, DEFAULT_HEALTH_INTERVAL),
            healthy_threshold: healthy_threshold.max(1),
            deadline: millis(deadline_ms, DEFAULT_HEALTHY_DEADLINE),
        }
    }
}

/// A rule's refusal of `field`.
fn rule(field: &str) -> impl Fn(rules::RuleError) -> ReleaseError + '_ {
    move |e| refuse(field, e.message)
}

/// Milliseconds on the wire, where 0 means `default`.
fn millis(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

impl TryFrom<&pb::Release> for ReleaseSpec {
    type Error = ReleaseError;

    fn try_from(release: &pb::Release) -> Result<Self, ReleaseError> {
        rules::release_id(&release.release_id).map_err(rule("release_id"))?;
        rules::name(&release.service).map_err(rule("service"))?;
        rules::version(&release.version).map_err(rule("version"))?;
        let source = match (&release.artifact, &release.container) {
            (Some(_), Some(_)) => return Err(refuse(
                "artifact",
                "set beside a container: a release runs an artifact or a container image, not both",
            )),
            (Some(artifact), None) => Source::Artifact {
                url: artifact.url.clone(),
                digest: Digest::parse(&artifact.digest)
                    .map_err(|e| refuse("artifact.digest", e.to_string()))?,
            },
            (None, Some(container)) => Source::Container(container_from(container)?),
            (None, None) => return Err(refuse(
                "artifact",
                "missing: a release needs an artifact (url and sha256 digest) or a container image",
            )),
        };
        let in_container = matches!(source, Source::Container(_));
        // An image brings its own command; an artifact needs one.
        if !in_container && release.command.is_empty() {
            return Err(refuse(
                "command",
                "empty: a release from an artifact needs the command to run, e.g. [\"./server\"]",
            ));
        }
        let kind = match &release.kind {
            Some(pb::release::Kind::Web(web)) => Kind::Web(web_from(web)?),
            Some(pb::release::Kind::Worker(worker)) => Kind::Worker(worker_from(worker)?),
            None => {
                return Err(refuse(
                    "kind",
                    "missing: a release is a web service (`web`) or a worker (`worker`)",
                ))
            }
        };
        let checks: Vec<(&str, &Check)> = match &kind {
            Kind::Web(web) => std::iter::once(("web.health", &web.health))
                .chain(web.smoke.iter().map(|c| ("web.smoke", c)))
                .collect(),
            Kind::Worker(worker) => worker.health.iter().map(|c| ("worker.health", c)).collect(),
        };
        if let Some((field, _)) = checks.iter().find(|(_, check)| check.is_exec()) {
            rules::exec_check(in_container).map_err(rule(field))?;
        }
        let stop_signal = match release.stop_signal.as_str() {
            "" => None,
            text => Some(rules::stop_signal(text).map_err(rule("stop_signal"))?),
        };
        let secrets = release
            .secrets
            .iter()
            .enumerate()
            .map(|(i, secret)| {
                rules::env_var_name(&secret.name)
                    .map_err(rule(&format!("secrets[{i}].name")))
                    .map(|()| SecretRef {
                        name: secret.name.clone(),
                        version: secret.version,
                    })
            })
            .collect::<Result<_, _>>()?;
        let hooks = release
            .hooks
            .iter()
            .enumerate()
            .map(|(i, hook)| hook_from(hook, in_container, &format!("hooks[{i}]")))
            .collect::<Result<_, _>>()?;
        let secret_names: Vec<String> = release.secrets.iter().map(|s| s.name.clone()).collect();
        let queues = release
            .queues
            .as_ref()
            .map(|q| crate::queues::QueueProbeSpec::from_wire(q, &secret_names))
            .transpose()
            .map_err(|e| refuse(format!("queues.{}", e.key), e.message))?;
        let mut env: Vec<(String, String)> = release
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.sort();
        let instances = match release.instances {
            0 => 1,
            n if n > MAX_INSTANCES => {
                return Err(refuse(
                    "instances",
                    format!("{n} is too many: at most {MAX_INSTANCES} processes of a release per node; add nodes instead"),
                ))
            }
            n => n,
        };
        Ok(ReleaseSpec {
            release_id: release.release_id.clone(),
            service: release.service.clone(),
            version: release.version.clone(),
            source,
            command: release.command.clone(),
            env,
            kind,
            stop_signal,
            stop_grace: millis(release.stop_grace_ms, DEFAULT_STOP_GRACE),
            stop_command: release.stop_command.clone(),
            stop_timeout: Duration::from_millis(release.stop_timeout_ms),
            secrets,
            hooks,
            queues,
            instances,
        })
    }
}

fn hook_from(
    hook: &pb::ReleaseHook,
    in_container: bool,
    field: &str,
) -> Result<ActivateHook, ReleaseError> {
    let at = match pb::release_hook::At::try_from(hook.at) {
        Ok(pb::release_hook::At::PreActivate) => HookPoint::PreActivate,
        Ok(pb::release_hook::At::PostActivate) => HookPoint::PostActivate,
        _ => {
            return Err(refuse(
                format!("{field}.at"),
                "must be pre_activate or post_activate",
            ))
        }
    };
    if in_container {
        return Err(refuse(
            field,
            "hooks run as processes in the release's dir; a container release cannot have them",
        ));
    }
    if hook.command.first().is_none_or(|p| p.is_empty()) {
        return Err(refuse(format!("{field}.command"), "empty"));
    }
    if hook.timeout_ms == 0 {
        return Err(refuse(format!("{field}.timeout_ms"), "must be above zero"));
    }
    Ok(ActivateHook {
        at,
        command: hook.command.clone(),
        timeout: Duration::from_millis(hook.timeout_ms),
    })
}

/// The image must be pinned by digest, so every node runs the same bytes
/// whatever a tag says now.
fn container_from(container: &pb::Container) -> Result<Container, ReleaseError> {
    let pinned = container
        .image
        .split_once("@sha256:")
        .is_some_and(|(repo, hex)| {
            !repo.is_empty() && hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
    if !pinned {
        return Err(refuse(
            "container.image",
            format!(
                "{:?} is not pinned: expected REPO@sha256:<64 hex digits>",
                container.image
            ),
        ));
    }
    let host_network = match container.network.as_str() {
        "" | "bridge" => false,
        "host" => true,
        other => {
            return Err(refuse(
                "container.network",
                format!("{other:?} is not a network: expected \"bridge\" or \"host\""),
            ))
        }
    };
    if !(container.cpus >= 0.0 && container.cpus.is_finite()) {
        return Err(refuse(
            "container.cpus",
            format!(
                "{} is not a cpu count: expected a positive number, or 0 for no limit",
                container.cpus
            ),
        ));
    }
    Ok(Container {
        image: container.image.clone(),
        host_network,
        memory_bytes: container.memory_bytes,
        cpus: container.cpus,
        init: container.init,
    })
}

fn web_from(web: &pb::WebService) -> Result<Web, ReleaseError> {
    let health = web.health.as_ref().ok_or_else(|| {
        refuse(
            "web.health",
            "missing: a web release needs a health check (http, tcp or exec)",
        )
    })?;
    Ok(Web {
        listen: Listen::parse(&web.listen)?,
        also_listen: web
            .also_listen
            .iter()
            .map(|text| Listen::parse(text))
            .collect::<Result<_, _>>()?,
        health: check_from(health, "web.health")?,
        gate: HealthGate::from_wire(
            web.health_interval_ms,
            web.healthy_threshold,
            web.healthy_deadline_ms,
        ),
        smoke: web
            .smoke
            .iter()
            .enumerate()
            .map(|(i, check)| check_from(check, &format!("web.smoke[{i}]")))
            .collect::<Result<_, _>>()?,
        drain_timeout: millis(web.drain_timeout_ms, DEFAULT_DRAIN_TIMEOUT),
    })
}

fn worker_from(worker: &pb::Worker) -> Result<Worker, ReleaseError> {
    let health = worker
        .health
        .as_ref()
        .map(|check| check_from(check, "worker.health"))
        .transpose()?;
    if health.as_ref().is_some_and(|check| !check.is_exec()) {
        return Err(refuse(
            "worker.health",
            "not an exec check: a worker has no port, so its health check must be an exec check",
        ));
    }
    Ok(Worker {
        health,
        gate: HealthGate::from_wire(
            worker.health_interval_ms,
            worker.healthy_threshold,
            worker.healthy_deadline_ms,
        ),
        min_healthy_time: Duration::from_millis(worker.min_healthy_time_ms),
    })
}

fn check_from(check: &pb::Check, field: &str) -> Result<Check, ReleaseError> {
    let probe = match &check.probe {
        Some(pb::check::Probe::Http(http)) => {
            if !http.path.starts_with('/') {
                return Err(refuse(
                    format!("{field}.http.path"),
                    format!(
                        "{:?} is not a path: expected one starting with /",
                        http.path
                    ),
                ));
            }
            let (min, max) = rules::status_range(
                http.status_min,
                http.status_max,
                rules::DEFAULT_HEALTH_STATUS,
            )
            .map_err(|e| refuse(format!("{field}.http.status"), e.message))?;
            Probe::Http {
                path: http.path.clone(),
                expect_status: min..=max,
                body_contains: Some(http.body_contains.clone()).filter(|b| !b.is_empty()),
            }
        }
        Some(pb::check::Probe::Tcp(_)) => Probe::Tcp,
        Some(pb::check::Probe::Exec(exec)) if !exec.command.is_empty() => Probe::Exec {
            command: exec.command.clone(),
        },
        Some(pb::check::Probe::Exec(_)) => {
            return Err(refuse(
                format!("{field}.exec.command"),
                "empty: an exec check needs the command to run",
            ))
        }
        None => return Err(refuse(field, "no probe: expected one of http, tcp or exec")),
    };
    Ok(Check {
        probe,
        timeout: millis(check.timeout_ms, DEFAULT_CHECK_TIMEOUT),
    })
}

#[cfg(test)]
#[path = "release_tests.rs"]
mod tests;
