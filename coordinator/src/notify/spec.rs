//! The spec's `[[notify]]` webhooks: what an operator writes
//! (`NotifySpec`), checked in full like every other key, and what a rollout
//! stores when it is created (`NotifyTarget`), so a change to the spec
//! takes effect at the next deploy and a rollout resumed after a restart
//! keeps notifying where it did.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Webhooks one spec may have.
pub const MAX_TARGETS: usize = 16;
const MAX_URL_BYTES: usize = 2048;
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// What a webhook can be sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Paused,
    Resumed,
    Succeeded,
    Failed,
    RolledBack,
    Aborted,
    MigrationStarted,
    MigrationFailed,
    /// A command that must run once may or may not have run: the rollout
    /// waits for the operator (`retry` or `abort`).
    Held,
    /// An admin deployed past a freeze window or a promotion rule
    /// (`--break-glass`).
    BreakGlass,
    /// A rollout waits for approvals by other operators (`cutover
    /// approve`).
    AwaitingApproval,
    /// Incident levers (`cutover maintenance`, `throttle`,
    /// `pause-traffic`): set or lifted, for a service in an environment.
    MaintenanceOn,
    MaintenanceOff,
    ThrottleOn,
    ThrottleOff,
    TrafficPaused,
    TrafficResumed,
    /// The coordinator's own alerts about a service's queue probe
    /// (`queue_alerts`): a queue over its `max_depth` or `max_wait`, or
    /// no worker running, for two minutes; and their end.
    QueueBacklog,
    QueueRecovered,
    WorkersDown,
    WorkersUp,
}

impl EventKind {
    pub const ALL: [EventKind; 22] = [
        EventKind::Started,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::Succeeded,
        EventKind::Failed,
        EventKind::RolledBack,
        EventKind::Aborted,
        EventKind::MigrationStarted,
        EventKind::MigrationFailed,
        EventKind::Held,
        EventKind::BreakGlass,
        EventKind::AwaitingApproval,
        EventKind::MaintenanceOn,
        EventKind::MaintenanceOff,
        EventKind::ThrottleOn,
        EventKind::ThrottleOff,
        EventKind::TrafficPaused,
        EventKind::TrafficResumed,
        EventKind::QueueBacklog,
        EventKind::QueueRecovered,
        EventKind::WorkersDown,
        EventKind::WorkersUp,
    ];

    /// As the spec and the body spell it (also its serde form).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::RolledBack => "rolled_back",
            EventKind::Aborted => "aborted",
            EventKind::MigrationStarted => "migration_started",
            EventKind::MigrationFailed => "migration_failed",
            EventKind::Held => "held",
            EventKind::BreakGlass => "break_glass",
            EventKind::AwaitingApproval => "awaiting_approval",
            EventKind::MaintenanceOn => "maintenance_on",
            EventKind::MaintenanceOff => "maintenance_off",
            EventKind::ThrottleOn => "throttle_on",
            EventKind::ThrottleOff => "throttle_off",
            EventKind::TrafficPaused => "traffic_paused",
            EventKind::TrafficResumed => "traffic_resumed",
            EventKind::QueueBacklog => "queue_backlog",
            EventKind::QueueRecovered => "queue_recovered",
            EventKind::WorkersDown => "workers_down",
            EventKind::WorkersUp => "workers_up",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The rollout's state right after the event: an ending is named after
    /// its state, the rest happen while it runs (or is paused).
    pub fn state(self) -> &'static str {
        match self {
            EventKind::Paused => "paused",
            EventKind::Held => "held",
            EventKind::Succeeded
            | EventKind::Failed
            | EventKind::RolledBack
            | EventKind::Aborted => self.as_str(),
            EventKind::BreakGlass => "pending",
            EventKind::AwaitingApproval => "awaiting_approval",
            EventKind::Started
            | EventKind::Resumed
            | EventKind::MigrationStarted
            | EventKind::MigrationFailed => "running",
            // Not a rollout's: a lever's body says how every lever still
            // set leaves the service (`ServiceEvent::state`).
            EventKind::MaintenanceOn
            | EventKind::MaintenanceOff
            | EventKind::ThrottleOn
            | EventKind::ThrottleOff
            | EventKind::TrafficPaused
            | EventKind::TrafficResumed => "lever",
            // Nor these: an alert's body says `alerting` or `resolved`.
            EventKind::QueueBacklog
            | EventKind::QueueRecovered
            | EventKind::WorkersDown
            | EventKind::WorkersUp => "alert",
        }
    }
}

fn all_names() -> String {
    EventKind::ALL.map(EventKind::as_str).join(", ")
}

/// One `[[notify]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// Where the JSON body is POSTed: http:// or https://.
    pub url: String,
    /// Which events; left out: every one.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// The name of a secret of the rollout's environment (`cutover secret
    /// set`) that signs each body; read when a webhook is sent.
    #[serde(default)]
    pub secret: Option<String>,
    /// How long one attempt may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// "json" (the default: cutover's own body) or "slack" (`{"text":
    /// ...}`, what Slack's and Mattermost's incoming webhooks take).
    #[serde(default)]
    pub format: Option<String>,
}

/// The body a webhook carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Json,
    Slack,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A webhook as a rollout stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyTarget {
    pub url: String,
    /// `None`: every event, also those a later version adds.
    pub events: Option<Vec<EventKind>>,
    /// A secret's name, never its value.
    pub secret: Option<String>,
    pub timeout_ms: u64,
    #[serde(default)]
    pub format: Format,
}

/// Checks every `[[notify]]`; an error names the key (`notify[I].KEY`)
/// and what is wrong with its value.
pub fn check(specs: &[NotifySpec]) -> Result<(), (String, String)> {
    if specs.len() > MAX_TARGETS {
        return Err((
            "notify".into(),
            format!(
                "{} webhooks; at most {MAX_TARGETS} are allowed (point several at one receiver that fans out)",
                specs.len()
            ),
        ));
    }
    for (i, spec) in specs.iter().enumerate() {
        spec.check()
            .map_err(|(key, message)| (format!("notify[{i}].{key}"), message))?;
    }
    Ok(())
}

impl NotifySpec {
    fn check(&self) -> Result<(), (String, String)> {
        check_url(&self.url).map_err(|message| ("url".to_string(), message))?;
        if let Some(events) = &self.events {
            if events.is_empty() {
                return Err((
                    "events".into(),
                    format!(
                        "is empty: leave it out for every event, or name some of: {}",
                        all_names()
                    ),
                ));
            }
            for (j, name) in events.iter().enumerate() {
                let key = format!("events[{j}]");
                if EventKind::parse(name).is_none() {
                    return Err((
                        key,
                        format!("{name:?} is not an event; use one of: {}", all_names()),
                    ));
                }
                if events[..j].contains(name) {
                    return Err((key, format!("names {name:?} twice")));
                }
            }
        }
        if let Some(secret) = &self.secret {
            crate::secrets::validate_name(secret)
                .map_err(|e| ("secret".to_string(), e.to_string()))?;
        }
        if let Some(format) = &self.format {
            if !matches!(format.as_str(), "json" | "slack") {
                return Err((
                    "format".into(),
                    format!("{format:?} is not a payload format; use \"json\" or \"slack\""),
                ));
            }
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err((
                "timeout".into(),
                format!(
                    "{}: must be above zero and at most {}, e.g. \"5s\"",
                    humantime::format_duration(self.timeout),
                    humantime::format_duration(MAX_TIMEOUT)
                ),
            ));
        }
        Ok(())
    }

    /// What a rollout stores (of a checked spec).
    pub fn target(&self) -> NotifyTarget {
        NotifyTarget {
            url: self.url.clone(),
            events: self
                .events
                .as_ref()
                .map(|names| names.iter().filter_map(|n| EventKind::parse(n)).collect()),
            secret: self.secret.clone(),
            timeout_ms: self.timeout.as_millis() as u64,
            format: match self.format.as_deref() {
                Some("slack") => Format::Slack,
                _ => Format::Json,
            },
        }
    }
}

/// An http:// or https:// URL with a host and no credentials (URLs show in
/// events and logs): webhooks' and analysis queries'.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!(
            "is {} bytes long; at most {MAX_URL_BYTES} are accepted",
            url.len()
        ));
    }
    let uri: hyper::Uri = url.parse().map_err(|e| {
        format!("{url:?} is not a URL ({e}); write e.g. \"https://hooks.example.com/cutover\"")
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{url:?}: use an http:// or https:// URL"));
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(format!("{url:?} names no host"));
    };
    // A URL is shown in events and logs; a password in it would be too.
    if authority.as_str().contains('@') {
        return Err(
            "holds credentials (user@ or user:password@), which events and logs would show; authenticate another way (a webhook's `secret` signs its body)"
                .into(),
        );
    }
    Ok(())
}

impl NotifyTarget {
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events
            .as_ref()
            .is_none_or(|kinds| kinds.contains(&kind))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The URL as messages show it: scheme, host and path, without the
    /// query (receivers often take a token there).
    pub fn shown(&self) -> String {
        match self.url.parse::<hyper::Uri>() {
            Ok(uri) => format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or_default(),
                uri.authority().map_or("", |a| a.as_str()),
                uri.path()
            ),
            Err(_) => "an invalid URL".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> NotifySpec {
        toml::from_str(text).unwrap()
    }

    fn refused(text: &str) -> (String, String) {
        check(&[spec("url = \"http://127.0.0.1:9/ok\""), spec(text)]).expect_err("must be refused")
    }

    #[test]
    fn a_target_keeps_what_the_spec_says_and_defaults_to_every_event() {
        let all = spec("url = \"https://hooks.example.com/cutover?token=abc\"");
        check(std::slice::from_ref(&all)).unwrap();
        let target = all.target();
        assert_eq!(target.timeout(), Duration::from_secs(5));
        assert!(EventKind::ALL.iter().all(|k| target.wants(*k)));
        assert_eq!(target.shown(), "https://hooks.example.com/cutover");
        let some = spec(
            "url = \"http://10.0.0.5:8080/hook\"\nevents = [\"failed\", \"rolled_back\"]\nsecret = \"HOOK_KEY\"\ntimeout = \"2s\"",
        );
        check(std::slice::from_ref(&some)).unwrap();
        let target = some.target();
        assert!(target.wants(EventKind::RolledBack));
        assert!(!target.wants(EventKind::Started));
        assert_eq!(target.secret.as_deref(), Some("HOOK_KEY"));
        assert_eq!(target.timeout_ms, 2000);
        assert_eq!(target.format, Format::Json);
        let chat = spec("url = \"https://hooks.slack.com/services/T/B/x\"\nformat = \"slack\"");
        check(std::slice::from_ref(&chat)).unwrap();
        assert_eq!(chat.target().format, Format::Slack);
        let (key, message) = refused("url = \"http://127.0.0.1:9/x\"\nformat = \"teams\"");
        assert_eq!(key, "notify[1].format");
        assert!(message.contains("\"json\" or \"slack\""), "{message}");
        // Stored as the body spells the events.
        let stored = serde_json::to_value(&target).unwrap();
        assert_eq!(
            stored["events"],
            serde_json::json!(["failed", "rolled_back"])
        );
    }

    #[test]
    fn rollouts_and_deployments_stored_before_webhooks_read_without_any() {
        let rollout = crate::rollout::sim::rollout(1, crate::rollout::sim::strategy());
        let mut stored = serde_json::to_value(&rollout).unwrap();
        stored.as_object_mut().unwrap().remove("notify").unwrap();
        let read: crate::rollout::model::Rollout = serde_json::from_value(stored).unwrap();
        assert_eq!(read, rollout);
        let deployment = serde_json::json!({
            "id": "shop-d1", "app": "shop", "env": "test", "state": "running",
            "steps": [], "allow_unreachable": false, "created_by": "alice",
            "created_at_ms": 1, "finished_at_ms": null, "error": "",
        });
        let read: crate::rollout::deployment::Deployment =
            serde_json::from_value(deployment).unwrap();
        assert!(read.notify.is_empty());
    }

    #[test]
    fn bad_values_are_refused_naming_the_key_and_the_value() {
        for (text, key, says) in [
            ("url = \"ftp://x/y\"", "notify[1].url", "\"ftp://x/y\""),
            ("url = \"hooks.example.com\"", "notify[1].url", "http://"),
            ("url = \"http://a b/\"", "notify[1].url", "not a URL"),
            ("url = \"https://bob:pw@x/\"", "notify[1].url", "credentials"),
            (
                "url = \"http://x/\"\nevents = [\"started\", \"deployed\"]",
                "notify[1].events[1]",
                "\"deployed\" is not an event; use one of: started, paused, resumed, succeeded, failed, rolled_back, aborted, migration_started, migration_failed",
            ),
            ("url = \"http://x/\"\nevents = []", "notify[1].events", "leave it out"),
            (
                "url = \"http://x/\"\nevents = [\"failed\", \"failed\"]",
                "notify[1].events[1]",
                "twice",
            ),
            ("url = \"http://x/\"\nsecret = \"HOOK-KEY\"", "notify[1].secret", "\"HOOK-KEY\""),
            ("url = \"http://x/\"\ntimeout = \"0s\"", "notify[1].timeout", "above zero"),
            ("url = \"http://x/\"\ntimeout = \"2m\"", "notify[1].timeout", "2m: must be"),
        ] {
            let (k, message) = refused(text);
            assert_eq!(k, key, "{text}: {message}");
            assert!(message.contains(says), "{text}: {message}");
        }
        let many = vec![spec("url = \"http://x/\""); MAX_TARGETS + 1];
        let (key, message) = check(&many).unwrap_err();
        assert_eq!(key, "notify");
        assert!(message.contains("at most 16"), "{message}");
    }
}
