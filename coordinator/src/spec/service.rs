//! `[services.NAME]`: a service's tables as written (its runtime, health
//! check, smoke checks) and the checks of each key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cutover_common::registry::ImageRef;
use cutover_common::rules;
use serde::Deserialize;

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
    /// More addresses the node proxy serves on: how a service moves to a
    /// new port without a moment unserved (see the operator guide).
    #[serde(default)]
    pub also_listen: Vec<String>,
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
    /// Queue depth and worker health, probed by the nodes that run it.
    #[serde(default)]
    pub queues: Option<QueuesSpec>,
}

/// `[services.NAME.queues]`: Laravel's Redis queues and the worker's
/// status command (see `cutover_common::queues`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesSpec {
    /// "HOST:PORT" of the Redis server.
    pub redis: String,
    #[serde(default)]
    pub db: u32,
    /// A secret of the service holding the Redis password.
    pub password_secret: Option<String>,
    /// The app's Redis key prefix (Laravel: database.redis.options.prefix).
    #[serde(default)]
    pub prefix: String,
    pub names: Vec<String>,
    /// E.g. ["php", "artisan", "horizon:status"]: exit 0 running, 1 paused.
    #[serde(default)]
    pub status_command: Vec<String>,
    #[serde(default = "default_queue_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Alert when more jobs wait than this (for a while).
    pub max_depth: Option<u64>,
    /// Alert when the oldest job waited longer than this.
    #[serde(default, with = "humantime_serde")]
    pub max_wait: Option<Duration>,
    /// A new release must keep the waiting jobs from growing over this
    /// long before the old one is told to stop.
    #[serde(default, with = "humantime_serde")]
    pub gate: Option<Duration>,
}

impl QueuesSpec {
    pub fn probe(&self) -> cutover_common::queues::QueueProbeSpec {
        cutover_common::queues::QueueProbeSpec {
            redis: self.redis.clone(),
            db: self.db,
            password_secret: self.password_secret.clone(),
            prefix: self.prefix.clone(),
            names: self.names.clone(),
            status_command: self.status_command.clone(),
            interval: self.interval,
            max_depth: self.max_depth,
            max_wait: self.max_wait,
            gate: self.gate,
        }
    }
}

fn default_queue_interval() -> Duration {
    Duration::from_secs(10)
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
pub(super) fn default_worker_min_healthy_time() -> Duration {
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

pub(super) fn validate_service(s: &ServiceSpec) -> Result<(), (String, String)> {
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
    if !s.also_listen.is_empty() && s.listen.is_none() {
        return Err((
            "also_listen".into(),
            "is for web services: set `listen` first (a worker has no port)".into(),
        ));
    }
    for (i, also) in s.also_listen.iter().enumerate() {
        parse_listen(also).map_err(|m| ("also_listen".to_string(), m))?;
        if s.listen.as_ref() == Some(also) || s.also_listen[..i].contains(also) {
            return Err(("also_listen".into(), format!("{also:?} is listed twice (with `listen` or in `also_listen`); name each address once")));
        }
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
    if let Some(queues) = &s.queues {
        queues
            .probe()
            .check(&s.secrets)
            .map_err(|e| (format!("queues.{}", e.key), e.message))?;
        if queues.gate.is_some() && s.listen.is_some() {
            return Err((
                "queues.gate".into(),
                "is for workers (services without `listen`): a web release takes no jobs, so its gate would measure only what fills the queues".into(),
            ));
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

pub(super) fn validate_health(h: &HealthSpec) -> Result<(), (String, String)> {
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
pub(super) fn parse_listen(listen: &str) -> Result<(), String> {
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
