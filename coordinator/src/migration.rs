//! The spec's `[migrate]` step: a database migration run once per deploy,
//! fleet-wide, on one node with the new release (see docs/migrations.md).
//! What the spec says (`MigrateSpec`), and the checked plan a rollout
//! stores (`Migration`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec_checks::{is_empty, known_service};

/// `[migrate]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSpec {
    /// Whose release it runs with: a deploy of this service runs it.
    pub service: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub when: When,
    #[serde(default)]
    pub phase: MigrationPhase,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Guards run first, on the same node, in order: any failure stops the
    /// deploy before the migration runs.
    #[serde(default)]
    pub checks: Vec<Vec<String>>,
    /// Run after the migration, on the same node: what it prints (e.g.
    /// `php artisan migrate:status`) is recorded with the release, the
    /// schema it runs with.
    #[serde(default)]
    pub schema_command: Option<Vec<String>>,
    /// A fresh (and, if asked, restore-tested) backup the migration
    /// needs before it may run: the deploy is refused without one.
    #[serde(default)]
    pub require_backup: Option<crate::jobs::recovery::RequireBackup>,
}

/// When the migration runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Before the first batch: the new code finds the new schema.
    #[default]
    Before,
    /// Once every node serves the release.
    After,
}

/// What the migration does to releases before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Additive: releases before this one still work with the new schema.
    #[default]
    Expand,
    /// Destructive: releases before this one do not.
    Contract,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Expand => "expand",
            MigrationPhase::Contract => "contract",
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// A rollout's migration step as planned: what runs, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The checks, then the migration itself, each to exit 0.
    pub commands: Vec<Vec<String>>,
    pub when: When,
    pub phase: MigrationPhase,
    pub timeout_ms: u64,
    /// The node an operator chose to run it on (`--migrate-node`).
    #[serde(default)]
    pub node: Option<String>,
    /// Run after the migration; its output is recorded with the release.
    #[serde(default)]
    pub schema_command: Option<Vec<String>>,
}

impl MigrateSpec {
    /// Checked against the spec's services; an error names the key (under
    /// `migrate.`) and what is wrong.
    pub fn check(&self, services: &[&String]) -> Result<(), (String, String)> {
        known_service(&self.service, services)?;
        if is_empty(&self.command) {
            return Err((
                "command".into(),
                "is empty; give the migration's command, e.g. [\"php\", \"artisan\", \"migrate\", \"--force\"]".into(),
            ));
        }
        if let Some(i) = self.checks.iter().position(|c| is_empty(c)) {
            return Err((format!("checks[{i}]"), "is an empty command".into()));
        }
        if self.schema_command.as_ref().is_some_and(|c| is_empty(c)) {
            return Err((
                "schema_command".into(),
                "is empty; give a command that prints the schema's state, e.g. [\"php\", \"artisan\", \"migrate:status\"], or leave the key out".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(("timeout".into(), "must be above zero, e.g. \"15m\"".into()));
        }
        if self.phase == MigrationPhase::Contract && self.when == When::Before {
            return Err((
                "phase".into(),
                "\"contract\" needs when = \"after\": a destructive change runs only once no node runs code that needs the old schema".into(),
            ));
        }
        Ok(())
    }

    /// The plan a rollout of the release stores.
    pub fn plan(&self) -> Migration {
        Migration {
            commands: self
                .checks
                .iter()
                .chain(std::iter::once(&self.command))
                .cloned()
                .collect(),
            when: self.when,
            phase: self.phase,
            timeout_ms: self.timeout.as_millis() as u64,
            node: None,
            schema_command: self.schema_command.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> MigrateSpec {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn checks_run_before_the_migration_and_contract_runs_after() {
        let web = "web".to_string();
        let services = [&web];
        let m = spec("service = \"web\"\ncommand = [\"migrate\"]\nchecks = [[\"status\"]]");
        assert_eq!(m.check(&services), Ok(()));
        let plan = m.plan();
        assert_eq!(
            plan.commands,
            vec![vec!["status".to_string()], vec!["migrate".into()]]
        );
        assert_eq!(
            (plan.when, plan.phase),
            (When::Before, MigrationPhase::Expand)
        );
        assert_eq!(plan.timeout_ms, 15 * 60 * 1000);

        let bad = |text: &str| spec(text).check(&services).unwrap_err().0;
        assert_eq!(bad("service = \"api\"\ncommand = [\"m\"]"), "service");
        assert_eq!(bad("service = \"web\"\ncommand = []"), "command");
        assert_eq!(
            bad("service = \"web\"\ncommand = [\"m\"]\nchecks = [[]]"),
            "checks[0]"
        );
        assert_eq!(
            bad("service = \"web\"\ncommand = [\"m\"]\nschema_command = []"),
            "schema_command"
        );
        assert_eq!(
            bad("service = \"web\"\ncommand = [\"m\"]\ntimeout = \"0s\""),
            "timeout"
        );
        assert_eq!(
            bad("service = \"web\"\ncommand = [\"m\"]\nphase = \"contract\""),
            "phase"
        );
        let after =
            spec("service = \"web\"\ncommand = [\"m\"]\nphase = \"contract\"\nwhen = \"after\"");
        assert_eq!(after.check(&services), Ok(()));
    }
}
