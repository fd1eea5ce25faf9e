//! pgBackRest: the arguments that name a stanza, a backup, and what
//! `pgbackrest info --output=json` says about a stanza's backups (only the
//! fields the facts need; the rest is ignored, so newer versions parse).

use serde::Deserialize;
use serde_json::{json, Value};

use super::steps::{failed, Failure, Steps};
use cutover_proto::v1 as pb;

/// The stanza and config file as pgbackrest's options.
#[derive(Debug, Clone)]
pub(super) struct Stanza {
    pub name: String,
    pub config: Option<String>,
}

impl Stanza {
    /// `--stanza=S [--config=C]` followed by `rest`.
    pub fn args(&self, rest: &[&str]) -> Vec<String> {
        let mut args = vec![format!("--stanza={}", self.name)];
        if let Some(config) = &self.config {
            args.push(format!("--config={config}"));
        }
        args.extend(rest.iter().map(|a| a.to_string()));
        args
    }

    /// What `info` says about this stanza now.
    pub async fn info(&self, steps: &mut Steps) -> Result<StanzaInfo, Failure> {
        let json = steps
            .capture(
                "pgbackrest info",
                "pgbackrest",
                &self.args(&["info", "--output=json"]),
            )
            .await?;
        parse_info(&json, &self.name).map_err(|e| failed("pgbackrest info", e))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StanzaInfo {
    pub name: String,
    pub status: Status,
    #[serde(default)]
    pub archive: Vec<Archive>,
    #[serde(default)]
    pub backup: Vec<Backup>,
    #[serde(default)]
    pub db: Vec<Db>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// e.g. "ok", "no valid backups".
    pub message: String,
}

/// The WAL archived for one database (system) of the stanza.
#[derive(Debug, Clone, Deserialize)]
pub struct Archive {
    pub database: DbRef,
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct DbRef {
    pub id: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Db {
    pub id: u64,
    /// The PostgreSQL major version, e.g. "15".
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Backup {
    pub label: String,
    /// "full", "diff" or "incr".
    #[serde(rename = "type")]
    pub kind: String,
    pub prior: Option<String>,
    pub timestamp: Span,
    pub archive: WalRange,
    pub info: Sizes,
    pub database: DbRef,
}

/// Unix seconds.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Span {
    pub start: i64,
    pub stop: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WalRange {
    pub start: Option<String>,
    pub stop: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sizes {
    /// The database, and what this backup copied of it.
    pub size: u64,
    pub delta: u64,
    pub repository: RepoSizes,
}

/// The same in the repository (compressed).
#[derive(Debug, Clone, Deserialize)]
pub struct RepoSizes {
    pub size: u64,
    pub delta: u64,
}

/// The stanza named `stanza` in `info --output=json`'s answer.
pub fn parse_info(json: &str, stanza: &str) -> Result<StanzaInfo, String> {
    let stanzas: Vec<StanzaInfo> = serde_json::from_str(json).map_err(|e| {
        format!("cannot read pgbackrest info's JSON: {e}; is pgbackrest 2.x installed?")
    })?;
    stanzas
        .into_iter()
        .find(|s| s.name == stanza)
        .ok_or_else(|| format!("pgbackrest info does not list the stanza {stanza:?}: check the stanza name and the config file, and run stanza-create"))
}

impl StanzaInfo {
    /// The backup a restore of "the latest" takes: the one that ended last.
    pub fn newest(&self) -> Option<&Backup> {
        self.backup
            .iter()
            .max_by(|a, b| (a.timestamp.stop, &a.label).cmp(&(b.timestamp.stop, &b.label)))
    }

    /// The newest backup, or why there is none to use.
    pub fn newest_or_why(&self) -> Result<&Backup, String> {
        self.newest().ok_or_else(|| {
            format!(
                "the stanza {:?} has no backup (pgbackrest says: {}): run a backup first",
                self.name, self.status.message
            )
        })
    }

    /// The PostgreSQL major version `backup` is of.
    pub fn pg_version(&self, backup: &Backup) -> Option<&str> {
        self.db
            .iter()
            .find(|db| db.id == backup.database.id)
            .map(|db| db.version.as_str())
    }

    /// The facts of `backup`, under the key names the coordinator keeps
    /// (see RecoveryResult.facts_json).
    pub fn facts(&self, backup: &Backup) -> Value {
        let archive = self.archive.iter().find(|a| a.database == backup.database);
        json!({
            "label": backup.label,
            "type": backup.kind,
            "prior": backup.prior,
            "started_at": backup.timestamp.start,
            "stopped_at": backup.timestamp.stop,
            "size_bytes": backup.info.size,
            "delta_bytes": backup.info.delta,
            "repo_size_bytes": backup.info.repository.size,
            "repo_delta_bytes": backup.info.repository.delta,
            "wal_start": backup.archive.start,
            "wal_stop": backup.archive.stop,
            "archive_min": archive.and_then(|a| a.min.clone()),
            "archive_max": archive.and_then(|a| a.max.clone()),
            "pg_version": self.pg_version(backup),
            // A backup is consistent to the moment it stopped.
            "data_time": backup.timestamp.stop,
        })
    }
}

/// pgbackrest's `--type` for a backup; `None`: its default.
pub(super) fn backup_type(kind: pb::recovery_backup::Type) -> Option<&'static str> {
    match kind {
        pb::recovery_backup::Type::Unspecified => None,
        pb::recovery_backup::Type::Full => Some("full"),
        pb::recovery_backup::Type::Diff => Some("diff"),
        pb::recovery_backup::Type::Incr => Some("incr"),
    }
}

/// Runs a backup and reads back what it made.
pub(super) async fn backup(
    steps: &mut Steps,
    stanza: &Stanza,
    kind: Option<&str>,
) -> Result<Value, Failure> {
    let started_at = cutover_common::now_ms() / 1000;
    let type_arg = kind.map(|k| format!("--type={k}"));
    let mut rest = vec!["--log-level-console=info"];
    rest.extend(type_arg.as_deref());
    rest.push("backup");
    steps
        .run("pgbackrest backup", "pgbackrest", &stanza.args(&rest))
        .await?;
    let info = stanza.info(steps).await?;
    let newest = info
        .newest_or_why()
        .map_err(|e| failed("pgbackrest info", e))?;
    // The clock's second granularity: a backup that started in the same
    // second as this run is this run's.
    if newest.timestamp.start < started_at - 1 {
        return Err(failed(
            "pgbackrest info",
            format!(
                "the newest backup ({}) started before this backup did: pgbackrest reported success but info does not list a new backup",
                newest.label
            ),
        ));
    }
    Ok(info.facts(newest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pgbackrest info --output=json` of pgBackRest 2.45 (PostgreSQL 15)
    /// after a full and an incremental backup.
    const FULL_AND_INCR: &str = include_str!("fixtures/info-full-incr.json");

    #[test]
    fn the_newest_backup_of_a_real_info_becomes_facts() {
        let info = parse_info(FULL_AND_INCR, "probe").unwrap();
        assert_eq!(info.status.message, "ok");
        let newest = info.newest().unwrap();
        assert_eq!(newest.label, "20261202-164129F_20261202-164134I");
        assert_eq!(
            info.facts(newest),
            json!({
                "label": "20261202-164129F_20261202-164134I",
                "type": "incr",
                "prior": "20261202-164129F",
                "started_at": 1796229694,
                "stopped_at": 1796229695,
                "size_bytes": 23115253,
                "delta_bytes": 672009,
                "repo_size_bytes": 3051466,
                "repo_delta_bytes": 58503,
                "wal_start": "000000010000000000000004",
                "wal_stop": "000000010000000000000004",
                "archive_min": "000000010000000000000001",
                "archive_max": "000000010000000000000004",
                "pg_version": "15",
                "data_time": 1796229695,
            })
        );
    }

    #[test]
    fn a_stanza_without_backups_says_to_run_one() {
        let json = r#"[{"archive":[],"backup":[],"cipher":"none","db":[],"name":"main",
            "repo":[],"status":{"code":2,"message":"no valid backups"},"future":{"x":1}}]"#;
        let info = parse_info(json, "main").unwrap();
        assert_eq!(
            info.newest_or_why().unwrap_err(),
            "the stanza \"main\" has no backup (pgbackrest says: no valid backups): run a backup first"
        );
    }

    #[test]
    fn a_missing_stanza_and_bad_json_are_named() {
        let error = parse_info(FULL_AND_INCR, "other").unwrap_err();
        assert!(
            error.contains("does not list the stanza \"other\""),
            "{error}"
        );
        let error = parse_info("WARN: oops", "main").unwrap_err();
        assert!(
            error.starts_with("cannot read pgbackrest info's JSON"),
            "{error}"
        );
    }
}
