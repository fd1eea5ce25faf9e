//! The spec's `[[hooks]]`: commands a deploy runs at fixed points, with the
//! new release's files (or image), environment and secrets. Some run once
//! per deploy on one node, like the migration (`pre_deploy`,
//! `post_deploy`, `on_failure`); the others on every node around its
//! switch (`pre_activate`, `post_activate`), run by the agent as part of
//! the node's cutover. What the spec says (`HookSpec`), and the checked
//! plan a rollout stores (`Hook`).

use std::time::Duration;

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::spec_checks::{is_empty, known_service};

/// `[[hooks]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    pub at: HookAt,
    pub command: Vec<String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Whose deploy runs it, with whose release. Default: for the hooks
    /// around a node's switch, every service; for the others, the
    /// migration's service, else the first in the deploy order.
    #[serde(default)]
    pub service: Option<String>,
}

/// Where a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookAt {
    /// Once, before the migration and the first batch: a failure stops the
    /// deploy before anything changed.
    PreDeploy,
    /// Once, after every node serves the release: a failure is reported.
    PostDeploy,
    /// Once, after a failed deploy ended (rolled back or not): a failure
    /// is reported.
    OnFailure,
    /// On every node, before its new release starts: a failure fails the
    /// node's cutover, nothing switched.
    PreActivate,
    /// On every node, once its proxy (or worker) switched: a failure fails
    /// the node's cutover like a failed smoke check.
    PostActivate,
}

impl HookAt {
    pub fn as_str(self) -> &'static str {
        match self {
            HookAt::PreDeploy => "pre_deploy",
            HookAt::PostDeploy => "post_deploy",
            HookAt::OnFailure => "on_failure",
            HookAt::PreActivate => "pre_activate",
            HookAt::PostActivate => "post_activate",
        }
    }

    /// Run by the agent on every node, as part of the release.
    pub fn on_every_node(self) -> bool {
        matches!(self, HookAt::PreActivate | HookAt::PostActivate)
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}

/// A run-once hook as a rollout stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub at: HookAt,
    pub command: Vec<String>,
    pub timeout_ms: u64,
}

impl HookSpec {
    /// Checked against the spec's services; an error names the key (under
    /// `hooks[i].`) and what is wrong.
    pub fn check(&self, services: &[&String]) -> Result<(), (String, String)> {
        if let Some(service) = &self.service {
            known_service(service, services)?;
        }
        if is_empty(&self.command) {
            return Err((
                "command".into(),
                "is empty; give the hook's command, e.g. [\"php\", \"artisan\", \"config:cache\"]"
                    .into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(("timeout".into(), "must be above zero, e.g. \"5m\"".into()));
        }
        Ok(())
    }

    /// Whether a deploy of `service` runs this hook; `once_service` is the
    /// service run-once hooks default to.
    pub fn runs_for(&self, service: &str, once_service: &str) -> bool {
        match &self.service {
            Some(named) => named == service,
            None if self.at.on_every_node() => true,
            None => service == once_service,
        }
    }

    /// What the agent runs around a node's switch (activate hooks).
    pub fn release_hook(&self) -> pb::ReleaseHook {
        let at = match self.at {
            HookAt::PreActivate => pb::release_hook::At::PreActivate,
            _ => pb::release_hook::At::PostActivate,
        };
        pb::ReleaseHook {
            at: at as i32,
            command: self.command.clone(),
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }

    /// The plan a rollout stores (run-once hooks).
    pub fn plan(&self) -> Hook {
        Hook {
            at: self.at,
            command: self.command.clone(),
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> HookSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn hooks_name_their_bad_key_and_run_for_the_services_they_should() {
        let (web, worker) = ("web".to_string(), "worker".to_string());
        let services = [&web, &worker];
        let bad = |text: &str| spec(text).check(&services).unwrap_err().0;
        assert_eq!(bad("at = \"pre_deploy\"\ncommand = []"), "command");
        assert_eq!(bad("at = \"pre_deploy\"\ncommand = [\"\"]"), "command");
        assert_eq!(
            bad("at = \"pre_deploy\"\ncommand = [\"x\"]\ntimeout = \"0s\""),
            "timeout"
        );
        assert_eq!(
            bad("at = \"pre_deploy\"\ncommand = [\"x\"]\nservice = \"api\""),
            "service"
        );
        assert!(toml::from_str::<HookSpec>("at = \"pre_start\"\ncommand = [\"x\"]").is_err());

        let once = spec("at = \"post_deploy\"\ncommand = [\"x\"]");
        assert_eq!(once.check(&services), Ok(()));
        assert!(once.runs_for("web", "web"));
        assert!(!once.runs_for("worker", "web"));
        assert_eq!(once.plan().timeout_ms, 300_000);
        let every = spec("at = \"post_activate\"\ncommand = [\"x\"]");
        assert!(every.runs_for("web", "web") && every.runs_for("worker", "web"));
        let named = spec("at = \"pre_activate\"\ncommand = [\"x\"]\nservice = \"worker\"");
        assert!(!named.runs_for("web", "web") && named.runs_for("worker", "web"));
    }
}
