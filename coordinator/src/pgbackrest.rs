//! A job's `[jobs.NAME.pgbackrest]` and `[[jobs.NAME.verify]]`: a backup
//! or restore drill of PostgreSQL that the agent runs itself with
//! pgBackRest (the `RunRecovery` command), instead of a plain command.
//! Kept as written in the job's stored definition, and turned into the
//! agent's command at each send.

use std::time::Duration;

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// The agent capability of nodes that run pgBackRest jobs.
pub const CAPABILITY: &str = "command.run_recovery";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgBackrestSpec {
    pub stanza: String,
    /// pgBackRest's config file; left out: its default.
    #[serde(default)]
    pub config: Option<String>,
    /// The OS user pgBackRest and the drill's server run as; default
    /// "postgres" (the agent must be root, or that user).
    #[serde(default)]
    pub user: Option<String>,
    /// The role the drill's checks connect as; default the OS user's name.
    #[serde(default)]
    pub db_user: Option<String>,
    /// Default: /usr/lib/postgresql/MAJOR/bin of the backup's version.
    #[serde(default)]
    pub pg_bin_dir: Option<String>,
    /// Backups: "full", "diff" or "incr" (default: incr, full when there
    /// is none yet).
    #[serde(default, rename = "type")]
    pub backup_type: Option<String>,
    /// Drills: the dir the scratch copy is restored under (absolute).
    #[serde(default)]
    pub scratch_dir: Option<String>,
    /// Drills: "latest" (replay every archived WAL, the default) or
    /// "immediate" (the backup alone).
    #[serde(default)]
    pub target: Option<String>,
    /// Drills: one timestamp saying how fresh the restored data is, e.g.
    /// "SELECT max(created_at) FROM orders"; default the last replayed
    /// commit.
    #[serde(default)]
    pub freshness_sql: Option<String>,
    #[serde(default)]
    pub freshness_database: Option<String>,
}

/// One check of a restored copy: a query returning one value, and what
/// it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    pub name: String,
    pub sql: String,
    /// Default "postgres".
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub equals: Option<String>,
    #[serde(default)]
    pub at_least: Option<i64>,
    #[serde(default)]
    pub at_most: Option<i64>,
    /// A timestamp at most this old when the drill starts.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// Checks a job's pgBackRest section: (key under the job, message).
pub fn check(
    spec: &PgBackrestSpec,
    drill: bool,
    verify: &[VerifySpec],
) -> Result<(), (String, String)> {
    let key = |k: &str| format!("pgbackrest.{k}");
    if spec.stanza.trim().is_empty() {
        return Err((
            key("stanza"),
            "no stanza; name the pgBackRest stanza of the cluster".into(),
        ));
    }
    let only = |value: bool, name: &str, kind: &str| match value {
        true => Err((key(name), format!("only a {kind} has {name}; remove it"))),
        false => Ok(()),
    };
    if let Some(kind) = &spec.backup_type {
        only(drill, "type", "backup")?;
        if !matches!(kind.as_str(), "full" | "diff" | "incr") {
            return Err((
                key("type"),
                format!("{kind:?} is not a backup type; use \"full\", \"diff\" or \"incr\""),
            ));
        }
    }
    only(
        !drill && spec.scratch_dir.is_some(),
        "scratch_dir",
        "restore drill",
    )?;
    only(
        !drill && spec.freshness_database.is_some(),
        "freshness_database",
        "restore drill",
    )?;
    only(!drill && spec.target.is_some(), "target", "restore drill")?;
    only(
        !drill && spec.freshness_sql.is_some(),
        "freshness_sql",
        "restore drill",
    )?;
    if let Some(target) = &spec.target {
        if !matches!(target.as_str(), "latest" | "immediate") {
            return Err((
                key("target"),
                format!("{target:?} is not a recovery target; use \"latest\" or \"immediate\""),
            ));
        }
    }
    if drill
        && !spec
            .scratch_dir
            .as_deref()
            .is_some_and(|d| d.starts_with('/'))
    {
        return Err((
            key("scratch_dir"),
            "a restore drill needs an absolute scratch_dir to restore the copy under, with room for the whole database, e.g. \"/var/tmp\"".into(),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, v) in verify.iter().enumerate() {
        let key = |k: &str| format!("verify[{i}].{k}");
        if v.name.trim().is_empty() || !names.insert(v.name.as_str()) {
            return Err((
                key("name"),
                format!("{:?}: each check needs a name of its own", v.name),
            ));
        }
        if v.sql.trim().is_empty() {
            return Err((key("sql"), "no query; give one returning one value".into()));
        }
        let expectations = [
            v.equals.is_some(),
            v.at_least.is_some(),
            v.at_most.is_some(),
            v.max_age.is_some(),
        ];
        if expectations.iter().filter(|e| **e).count() != 1 {
            return Err((
                key("equals"),
                "give exactly one expectation: equals, at_least, at_most or max_age".into(),
            ));
        }
    }
    Ok(())
}

/// The agent command's body for a job run: a backup, or a drill with its
/// checks.
pub fn command(
    spec: &PgBackrestSpec,
    drill: bool,
    verify: &[VerifySpec],
    timeout_ms: u64,
) -> pb::RunRecovery {
    let target = pb::PgBackRestTarget {
        stanza: spec.stanza.clone(),
        config_path: spec.config.clone().unwrap_or_default(),
        os_user: spec.user.clone().unwrap_or_default(),
        pg_bin_dir: spec.pg_bin_dir.clone().unwrap_or_default(),
        db_user: spec.db_user.clone().unwrap_or_default(),
    };
    let action = if drill {
        let recovery_target = match spec.target.as_deref() {
            Some("immediate") => pb::restore_drill::Target::Immediate,
            _ => pb::restore_drill::Target::Latest,
        };
        pb::run_recovery::Action::RestoreDrill(pb::RestoreDrill {
            scratch_parent: spec.scratch_dir.clone().unwrap_or_default(),
            recovery_target: recovery_target.into(),
            checks: verify.iter().map(check_command).collect(),
            freshness_sql: spec.freshness_sql.clone().unwrap_or_default(),
            freshness_database: spec.freshness_database.clone().unwrap_or_default(),
        })
    } else {
        let kind = match spec.backup_type.as_deref() {
            Some("full") => pb::recovery_backup::Type::Full,
            Some("diff") => pb::recovery_backup::Type::Diff,
            Some("incr") => pb::recovery_backup::Type::Incr,
            _ => pb::recovery_backup::Type::Unspecified,
        };
        pb::run_recovery::Action::Backup(pb::RecoveryBackup {
            r#type: kind.into(),
        })
    };
    pb::RunRecovery {
        timeout_ms,
        target: Some(target),
        action: Some(action),
    }
}

fn check_command(v: &VerifySpec) -> pb::RecoveryCheck {
    use pb::recovery_check::Expect;
    let expect = if let Some(text) = &v.equals {
        Expect::Equals(text.clone())
    } else if let Some(n) = v.at_least {
        Expect::AtLeast(n as f64)
    } else if let Some(n) = v.at_most {
        Expect::AtMost(n as f64)
    } else {
        Expect::MaxAgeMs(v.max_age.unwrap_or_default().as_millis() as u64)
    };
    pb::RecoveryCheck {
        name: v.name.clone(),
        sql: v.sql.clone(),
        database: v.database.clone().unwrap_or_default(),
        expect: Some(expect),
    }
}
