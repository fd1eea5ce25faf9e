//! Backups and restore drills of PostgreSQL with pgBackRest, as the
//! coordinator asks for them (`RunRecovery`): a backup reports the facts
//! `pgbackrest info` gives of it; a drill restores the latest backup into
//! a scratch copy on this node, starts it, verifies it, measures how long
//! that took (the recovery time) and how recent the data is (the recovery
//! point), and drops the copy.
//!
//! A request that cannot run as written is an error (the command fails);
//! anything that goes wrong on the node is a result that did not pass,
//! with its reason and the facts gathered until then.

mod drill;
mod pgbackrest;
mod scratch;
mod steps;
mod verify;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cutover_proto::v1::{self as pb, run_recovery};
use serde_json::Value;
use tokio::sync::mpsc;

use self::drill::Drill;
use self::pgbackrest::Stanza;
use self::steps::{OsUser, Steps};
use self::verify::{database_or_default, trimmed_sql, Check};

/// A backup or drill without a timeout of its own.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The OS user when the request names none: Debian's.
const DEFAULT_OS_USER: &str = "postgres";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecoveryError {
    #[error("run_recovery without a stanza: name the pgBackRest stanza to back up or restore")]
    NoStanza,
    #[error("run_recovery without an action: give backup or restore_drill")]
    NoAction,
    #[error("run_recovery backup type {0} is unknown to agent {ver}: upgrade the agent", ver = cutover_common::VERSION)]
    UnknownBackupType(i32),
    #[error("run_recovery recovery target {0} is unknown to agent {ver}: upgrade the agent", ver = cutover_common::VERSION)]
    UnknownTarget(i32),
    #[error("restore drill scratch_parent {0:?} is not an absolute path: name the directory to restore the scratch copy under")]
    ScratchParent(String),
    #[error("restore drill check {index} ({name:?}) {problem}")]
    Check {
        index: usize,
        name: String,
        problem: String,
    },
    #[error("restore drill freshness_sql is a blank query: give one returning a timestamp, or leave it empty")]
    BlankFreshness,
}

/// A request checked: what runs.
#[derive(Debug, Clone)]
enum Action {
    Backup { kind: Option<&'static str> },
    Drill(Drill),
}

#[derive(Debug, Clone)]
pub struct Request {
    stanza: Stanza,
    os_user: String,
    timeout: Duration,
    action: Action,
}

impl TryFrom<&pb::RunRecovery> for Request {
    type Error = RecoveryError;

    fn try_from(run: &pb::RunRecovery) -> Result<Self, RecoveryError> {
        let target = run.target.clone().unwrap_or_default();
        if target.stanza.trim().is_empty() {
            return Err(RecoveryError::NoStanza);
        }
        let os_user = match target.os_user.trim() {
            "" => DEFAULT_OS_USER.to_string(),
            user => user.to_string(),
        };
        let action = match &run.action {
            None => return Err(RecoveryError::NoAction),
            Some(run_recovery::Action::Backup(backup)) => {
                let kind = pb::recovery_backup::Type::try_from(backup.r#type)
                    .map_err(|_| RecoveryError::UnknownBackupType(backup.r#type))?;
                Action::Backup {
                    kind: pgbackrest::backup_type(kind),
                }
            }
            Some(run_recovery::Action::RestoreDrill(drill)) => {
                Action::Drill(drill_of(drill, &target, &os_user)?)
            }
        };
        Ok(Self {
            stanza: Stanza {
                name: target.stanza.trim().to_string(),
                config: Some(target.config_path.trim())
                    .filter(|c| !c.is_empty())
                    .map(String::from),
            },
            os_user,
            timeout: match run.timeout_ms {
                0 => DEFAULT_TIMEOUT,
                ms => Duration::from_millis(ms),
            },
            action,
        })
    }
}

fn drill_of(
    drill: &pb::RestoreDrill,
    target: &pb::PgBackRestTarget,
    os_user: &str,
) -> Result<Drill, RecoveryError> {
    let parent = PathBuf::from(drill.scratch_parent.trim());
    if !parent.is_absolute() {
        return Err(RecoveryError::ScratchParent(drill.scratch_parent.clone()));
    }
    let immediate = match pb::restore_drill::Target::try_from(drill.recovery_target) {
        Ok(pb::restore_drill::Target::Immediate) => true,
        Ok(pb::restore_drill::Target::Latest | pb::restore_drill::Target::Unspecified) => false,
        Err(_) => return Err(RecoveryError::UnknownTarget(drill.recovery_target)),
    };
    let mut names = HashSet::new();
    let mut checks = Vec::with_capacity(drill.checks.len());
    for (index, check) in drill.checks.iter().enumerate() {
        let problem = |problem: String| RecoveryError::Check {
            index,
            name: check.name.clone(),
            problem,
        };
        let checked = Check::from_proto(check).map_err(problem)?;
        if !names.insert(checked.name.clone()) {
            return Err(problem(
                "has the name of an earlier check: give each check a name of its own".into(),
            ));
        }
        checks.push(checked);
    }
    let freshness = match (
        drill.freshness_sql.is_empty(),
        trimmed_sql(&drill.freshness_sql),
    ) {
        (true, _) => None,
        (false, "") => return Err(RecoveryError::BlankFreshness),
        (false, sql) => Some((
            sql.to_string(),
            database_or_default(&drill.freshness_database),
        )),
    };
    Ok(Drill {
        scratch_parent: parent,
        immediate,
        checks,
        freshness,
        pg_bin_dir: Some(target.pg_bin_dir.trim())
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
        db_user: match target.db_user.trim() {
            "" => os_user.to_string(),
            role => role.to_string(),
        },
    })
}

/// Runs a checked request to its result; its output goes to `output` as
/// it comes.
pub async fn run(request: &Request, output: mpsc::UnboundedSender<String>) -> pb::RecoveryResult {
    let started = Instant::now();
    let user = match OsUser::resolve(&request.os_user) {
        Ok(user) => user,
        Err(reason) => {
            return pb::RecoveryResult {
                reason,
                facts_json: "{}".into(),
                duration_ms: started.elapsed().as_millis() as u64,
                ..Default::default()
            }
        }
    };
    let mut steps = Steps::new(user, request.timeout, output);
    match &request.action {
        Action::Backup { kind } => {
            let made = pgbackrest::backup(&mut steps, &request.stanza, *kind).await;
            let timed_out = matches!(made, Err(steps::Failure::TimedOut { .. }));
            let (passed, reason, facts) = match made {
                Ok(facts) => (true, String::new(), facts),
                Err(failure) => (
                    false,
                    failure.to_string(),
                    Value::Object(Default::default()),
                ),
            };
            let data_time_ms = facts["data_time"].as_i64().map_or(0, |s| s * 1000);
            pb::RecoveryResult {
                passed,
                reason,
                facts_json: facts.to_string(),
                checks: Vec::new(),
                duration_ms: started.elapsed().as_millis() as u64,
                data_time_ms,
                output_tail: steps.tail(),
                recovered_at_ms: 0,
                timed_out,
            }
        }
        Action::Drill(drill) => {
            let report = drill::run(&mut steps, &request.stanza, drill).await;
            pb::RecoveryResult {
                passed: report.passed,
                reason: report.reason,
                facts_json: Value::Object(report.facts).to_string(),
                checks: report.checks,
                duration_ms: report.duration.as_millis() as u64,
                data_time_ms: report.data_time_ms,
                output_tail: steps.tail(),
                recovered_at_ms: report.recovered_at_ms,
                timed_out: report.timed_out,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::recovery_check::Expect;

    fn drill_request(drill: pb::RestoreDrill) -> pb::RunRecovery {
        pb::RunRecovery {
            timeout_ms: 0,
            target: Some(pb::PgBackRestTarget {
                stanza: "main".into(),
                ..Default::default()
            }),
            action: Some(run_recovery::Action::RestoreDrill(drill)),
        }
    }

    fn counted(name: &str) -> pb::RecoveryCheck {
        pb::RecoveryCheck {
            name: name.into(),
            sql: "select count(*) from t".into(),
            database: "shop".into(),
            expect: Some(Expect::AtLeast(1.0)),
        }
    }

    #[test]
    fn a_request_is_checked_before_anything_runs() {
        let no_stanza = pb::RunRecovery {
            action: Some(run_recovery::Action::Backup(pb::RecoveryBackup::default())),
            ..Default::default()
        };
        assert_eq!(
            Request::try_from(&no_stanza).unwrap_err(),
            RecoveryError::NoStanza
        );
        let mut no_action = drill_request(pb::RestoreDrill::default());
        no_action.action = None;
        assert_eq!(
            Request::try_from(&no_action).unwrap_err(),
            RecoveryError::NoAction
        );
        let relative = drill_request(pb::RestoreDrill {
            scratch_parent: "scratch".into(),
            ..Default::default()
        });
        assert_eq!(
            Request::try_from(&relative).unwrap_err().to_string(),
            "restore drill scratch_parent \"scratch\" is not an absolute path: name the directory to restore the scratch copy under"
        );
        let twice = drill_request(pb::RestoreDrill {
            scratch_parent: "/srv/scratch".into(),
            checks: vec![counted("rows"), counted("rows")],
            ..Default::default()
        });
        assert_eq!(
            Request::try_from(&twice).unwrap_err().to_string(),
            "restore drill check 1 (\"rows\") has the name of an earlier check: give each check a name of its own"
        );
        let blank = drill_request(pb::RestoreDrill {
            scratch_parent: "/srv/scratch".into(),
            freshness_sql: " ; ".into(),
            ..Default::default()
        });
        assert_eq!(
            Request::try_from(&blank).unwrap_err(),
            RecoveryError::BlankFreshness
        );
    }

    #[test]
    fn defaults_fill_what_a_request_leaves_out() {
        let request = Request::try_from(&drill_request(pb::RestoreDrill {
            scratch_parent: "/srv/scratch".into(),
            checks: vec![counted("rows")],
            freshness_sql: "select max(at) from t;".into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(request.os_user, "postgres");
        assert_eq!(request.timeout, DEFAULT_TIMEOUT);
        assert_eq!(request.stanza.args(&["info"]), ["--stanza=main", "info"]);
        let Action::Drill(drill) = request.action else {
            panic!("a drill");
        };
        assert!(!drill.immediate);
        assert_eq!(drill.db_user, "postgres");
        assert_eq!(drill.pg_bin_dir, None);
        assert_eq!(
            drill.freshness,
            Some(("select max(at) from t".into(), "postgres".into()))
        );
        assert_eq!(drill.checks[0].database, "shop");
    }
}
