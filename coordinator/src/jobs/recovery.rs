//! What the runs of backups and restore drills say about each data set:
//! how old its newest backup is against its RPO, whether its newest drill
//! restored it and how long that took against its RTO, and a verdict
//! (`cutover recovery status`); and the backup gate a deploy may require.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{period_ms, JobError, Jobs};
use crate::metrics::{data_time_s, drill_data_age_s};
use crate::store::{JobDef, JobKind, JobRun, RunState, Store, StoreError};

/// What a deploy may require of a data set (`require_backup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireBackup {
    pub dataset: String,
    /// The newest successful backup may be at most this old.
    #[serde(with = "humantime_serde")]
    pub max_age: std::time::Duration,
    /// The newest restore drill of the data set must have passed.
    #[serde(default)]
    pub restore_tested: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    AtRisk,
    Breached,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::AtRisk => "at_risk",
            Verdict::Breached => "breached",
        }
    }
}

/// One data set's recovery, as its jobs' runs show it.
#[derive(Debug, Clone)]
pub struct DatasetStatus {
    pub app: String,
    pub dataset: String,
    /// Where it is backed up (empty: no backup job).
    pub env: String,
    pub rpo_ms: Option<u64>,
    pub rto_ms: Option<u64>,
    /// The newest successful backup, and its data's age now.
    pub last_backup: Option<JobRun>,
    pub backup_age_ms: Option<i64>,
    /// The newest backup that ended, if it did not succeed.
    pub failed_backup: Option<JobRun>,
    /// The newest drill that ended (passed or not).
    pub last_drill: Option<JobRun>,
    /// The newest drill that passed.
    pub passed_drill: Option<JobRun>,
    pub verdict: Verdict,
    /// Why, worst first; empty when met.
    pub reasons: Vec<String>,
}

fn newest<'a>(runs: impl Iterator<Item = &'a JobRun>) -> Option<&'a JobRun> {
    runs.max_by_key(|r| (r.ended_ms, r.started_ms))
}

/// A span of milliseconds to the second, as status lines and the CLI
/// print it ("22m 5s").
pub fn duration(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_secs((ms.max(0) / 1000) as u64))
        .to_string()
}

/// The newest successful backup of a data set: its age in ms at `now_ms`.
fn backup_age_ms(run: &JobRun, now_ms: i64) -> Option<i64> {
    data_time_s(run).map(|t| now_ms - (t * 1000.0) as i64)
}

/// Works out one data set's status from its jobs and their runs.
pub fn dataset_status(
    app: &str,
    dataset: &str,
    jobs: &[&JobDef],
    runs: &[&JobRun],
    now_ms: i64,
) -> DatasetStatus {
    let backup_job = jobs.iter().find(|j| j.kind == JobKind::Backup);
    let drill_job = jobs.iter().find(|j| j.kind == JobKind::RestoreTest);
    let of = |kind: JobKind| {
        runs.iter()
            .copied()
            .filter(move |r| r.kind == kind && r.state.ended() && r.state != RunState::Skipped)
    };
    let last_backup =
        newest(of(JobKind::Backup).filter(|r| r.state == RunState::Succeeded)).cloned();
    let latest_backup = newest(of(JobKind::Backup)).cloned();
    let failed_backup = latest_backup.filter(|r| r.state != RunState::Succeeded);
    let last_drill = newest(of(JobKind::RestoreTest)).cloned();
    let passed_drill =
        newest(of(JobKind::RestoreTest).filter(|r| r.state == RunState::Succeeded)).cloned();
    // Several backup jobs of one data set (incremental, nightly full), or
    // drills: the tightest target counts.
    let rpo_ms = jobs
        .iter()
        .filter(|j| j.kind == JobKind::Backup)
        .filter_map(|j| j.rpo_ms)
        .min();
    let rto_ms = jobs
        .iter()
        .filter(|j| j.kind == JobKind::RestoreTest)
        .filter_map(|j| j.rto_ms)
        .min();
    let backup_age_ms = last_backup.as_ref().and_then(|r| backup_age_ms(r, now_ms));

    let mut breached = Vec::new();
    let mut at_risk = Vec::new();
    match (&last_backup, backup_age_ms, rpo_ms) {
        (None, _, _) => breached.push(match backup_job {
            Some(job) => format!(
                "no backup has succeeded yet; run one: cutover jobs run {} --env {}",
                job.name, job.env
            ),
            None => "no backup job; add one with kind = \"backup\" and this dataset".into(),
        }),
        (Some(_), Some(age), Some(rpo)) if age > rpo as i64 => breached.push(format!(
            "the newest backup's data is {} old, over the RPO of {}",
            duration(age),
            duration(rpo as i64)
        )),
        (Some(_), Some(age), Some(rpo)) if age * 5 > rpo as i64 * 4 => at_risk.push(format!(
            "the newest backup's data is {} old, close to the RPO of {}",
            duration(age),
            duration(rpo as i64)
        )),
        _ => {}
    }
    // Run details may quote the data (a check's value): they stay with the
    // runs, which need deploy rights to read.
    let see = |run: &JobRun| format!("`cutover jobs show {} --env {}` says why", run.id, run.env);
    if let Some(failed) = &failed_backup {
        at_risk.push(format!(
            "the newest backup run {} {}; {}",
            failed.id,
            failed.state.as_str(),
            see(failed)
        ));
    }
    match (&last_drill, &passed_drill) {
        (None, _) => at_risk.push(match drill_job {
            Some(job) => format!(
                "no restore drill has run yet; run one: cutover jobs run {} --env {}",
                job.name, job.env
            ),
            None => "no restore drill: nothing proves the backups restore; add a restore_test job"
                .into(),
        }),
        (Some(last), _) if last.state != RunState::Succeeded => breached.push(format!(
            "the newest restore drill {} {}; {}",
            last.id,
            last.state.as_str(),
            see(last)
        )),
        _ => {}
    }
    if let Some(passed) = &passed_drill {
        let took = passed.ended_ms.unwrap_or(passed.started_ms) - passed.started_ms;
        if let Some(rto) = rto_ms.filter(|rto| took > *rto as i64) {
            breached.push(format!(
                "the newest drill took {}, over the RTO of {}",
                duration(took),
                duration(rto as i64)
            ));
        }
        let data_age = drill_data_age_s(passed).map(|s| (s * 1000.0) as i64);
        if let (Some(age), Some(rpo)) = (data_age, rpo_ms) {
            if age > rpo as i64 {
                at_risk.push(format!(
                    "the newest drill restored data {} old, over the RPO of {}",
                    duration(age),
                    duration(rpo as i64)
                ));
            }
        }
        let age = now_ms - passed.ended_ms.unwrap_or(passed.started_ms);
        if let Some(period) = drill_job.and_then(|j| period_ms(&j.schedule, now_ms)) {
            if age > 2 * period {
                at_risk.push(format!(
                    "the newest passing drill ran {} ago; its schedule runs one every {}",
                    duration(age),
                    duration(period)
                ));
            }
        }
    }
    let verdict = if !breached.is_empty() {
        Verdict::Breached
    } else if !at_risk.is_empty() {
        Verdict::AtRisk
    } else {
        Verdict::Met
    };
    breached.extend(at_risk);
    DatasetStatus {
        app: app.to_string(),
        dataset: dataset.to_string(),
        env: backup_job.map(|j| j.env.clone()).unwrap_or_default(),
        rpo_ms,
        rto_ms,
        last_backup,
        backup_age_ms,
        failed_backup,
        last_drill,
        passed_drill,
        verdict,
        reasons: breached,
    }
}

/// Why a deploy's backup gate does not hold, if it does not.
pub fn gate_refusal(status: &DatasetStatus, required: &RequireBackup, env: &str) -> Option<String> {
    let max_age = required.max_age.as_millis() as i64;
    let backup_job = || {
        format!(
            "`cutover deploy --backup-now` runs the {} backup first",
            required.dataset
        )
    };
    match (&status.last_backup, status.backup_age_ms) {
        (None, _) => {
            return Some(format!(
                "the deploy requires a backup of {} at most {} old, and it has none in {env}; {}",
                required.dataset,
                duration(max_age),
                backup_job()
            ))
        }
        (Some(run), Some(age)) if age > max_age => {
            return Some(format!(
                "the deploy requires a backup of {} at most {} old; the newest ({} on {}) is {} old; {}",
                required.dataset,
                duration(max_age),
                run.id,
                run.node,
                duration(age),
                backup_job()
            ))
        }
        _ => {}
    }
    if required.restore_tested {
        match &status.last_drill {
            None => return Some(format!("the deploy requires a tested restore of {}, and no restore drill has run; run one with `cutover jobs run DRILL --env ENV`", required.dataset)),
            Some(drill) if drill.state != RunState::Succeeded => {
                return Some(format!(
                    "the deploy requires a tested restore of {}, and the newest drill {} {}: {}; fix it and run the drill again",
                    required.dataset,
                    drill.id,
                    drill.state.as_str(),
                    drill.detail
                ))
            }
            Some(_) => {}
        }
    }
    None
}

impl Jobs {
    /// Every data set of environment `env` (its jobs' data sets), or of
    /// every environment, with its status now.
    pub async fn recovery_status(&self, env: Option<&str>) -> Result<Vec<DatasetStatus>, JobError> {
        let jobs = self.store.jobs.list(None).await?;
        let runs = self.store.jobs.all_runs().await?;
        let wanted: BTreeSet<(String, String)> = jobs
            .iter()
            .filter(|j| env.is_none_or(|e| j.env == e))
            .filter_map(|j| j.dataset.as_ref().map(|d| (j.app.clone(), d.clone())))
            .collect();
        let now_ms = self.registry.now_ms();
        Ok(wanted
            .into_iter()
            .map(|(app, dataset)| {
                let backed_up_here = env.filter(|e| backs_up(&jobs, &app, &dataset, e));
                dataset_in(&app, &dataset, backed_up_here, &jobs, &runs, now_ms)
            })
            .collect())
    }
}

/// Whether environment `env` has a backup job of `app`'s `dataset`.
fn backs_up(jobs: &[JobDef], app: &str, dataset: &str, env: &str) -> bool {
    jobs.iter().any(|j| {
        j.app == app
            && j.dataset.as_deref() == Some(dataset)
            && j.kind == JobKind::Backup
            && j.env == env
    })
}

/// One data set's status: its backups taken in `backups_in` (`None`:
/// wherever they are), its drills wherever they run.
fn dataset_in(
    app: &str,
    dataset: &str,
    backups_in: Option<&str>,
    jobs: &[JobDef],
    runs: &[JobRun],
    now_ms: i64,
) -> DatasetStatus {
    let of_dataset = |j_app: &str, j_dataset: Option<&String>| {
        j_app == app && j_dataset.map(String::as_str) == Some(dataset)
    };
    // Backups of other environments are other copies of the data.
    let counts =
        |kind: JobKind, env: &str| kind != JobKind::Backup || backups_in.is_none_or(|e| env == e);
    let mine: Vec<&JobDef> = jobs
        .iter()
        .filter(|j| of_dataset(&j.app, j.dataset.as_ref()) && counts(j.kind, &j.env))
        .collect();
    let its_runs: Vec<&JobRun> = runs
        .iter()
        .filter(|r| of_dataset(&r.app, r.dataset.as_ref()) && counts(r.kind, &r.env))
        .collect();
    dataset_status(app, dataset, &mine, &its_runs, now_ms)
}

/// The backup gate of a deploy of `app` to `env`: why it does not hold,
/// or `None`.
pub async fn check_gate(
    store: &Store,
    app: &str,
    env: &str,
    required: &RequireBackup,
    now_ms: i64,
) -> Result<Option<String>, StoreError> {
    let jobs = store.jobs.list(None).await?;
    // Only backups taken in the deploy's own environment count: another
    // environment's are of other data.
    if !backs_up(&jobs, app, &required.dataset, env) {
        return Ok(Some(format!(
            "the deploy requires a backup of {}, and {env} has no backup job of it; `cutover jobs apply --env {env}` sets the spec's jobs there",
            required.dataset
        )));
    }
    let runs = store.jobs.all_runs().await?;
    let status = dataset_in(app, &required.dataset, Some(env), &jobs, &runs, now_ms);
    Ok(gate_refusal(&status, required, env))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{Concurrency, RunOn, Schedule};

    const MIN: i64 = 60_000;

    fn job(kind: JobKind, env: &str, rpo: Option<i64>, rto: Option<i64>) -> JobDef {
        JobDef {
            app: "shop".into(),
            env: env.into(),
            name: kind.as_str().into(),
            kind,
            service: None,
            command: vec!["true".into()],
            vars: Default::default(),
            schedule: Schedule::Every {
                every_ms: 60 * MIN as u64,
            },
            run_on: RunOn::One,
            selector: Default::default(),
            timeout_ms: 60_000,
            concurrency: Concurrency::Forbid,
            dataset: Some("db".into()),
            rpo_ms: rpo.map(|m| (m * MIN) as u64),
            rto_ms: rto.map(|m| (m * MIN) as u64),
            applied_at_ms: 0,
            applied_by: "ops".into(),
            last_tick_ms: 0,
            paused: false,
            pgbackrest: None,
            verify: Vec::new(),
        }
    }

    fn run(
        kind: JobKind,
        state: RunState,
        started_min: i64,
        took_min: i64,
        data_time_min: Option<i64>,
    ) -> JobRun {
        let mut facts = BTreeMap::new();
        if let Some(t) = data_time_min {
            facts.insert("data_time".to_string(), serde_json::json!(t * 60));
        }
        JobRun {
            id: format!("{}.{started_min}", kind.as_str()),
            app: "shop".into(),
            env: "prod".into(),
            job: kind.as_str().into(),
            kind,
            dataset: Some("db".into()),
            node: "db-1".into(),
            release_id: None,
            due_ms: started_min * MIN,
            missed: 0,
            manual_by: String::new(),
            started_ms: started_min * MIN,
            ended_ms: Some((started_min + took_min) * MIN),
            state,
            exit_code: Some(0),
            detail: "exit status: 1".into(),
            output_tail: String::new(),
            facts,
            command_id: String::new(),
            definition: None,
        }
    }

    fn status(runs: &[JobRun], now_min: i64) -> DatasetStatus {
        let jobs = [
            job(JobKind::Backup, "prod", Some(15), None),
            job(JobKind::RestoreTest, "staging", None, Some(60)),
        ];
        let jobs: Vec<&JobDef> = jobs.iter().collect();
        let runs: Vec<&JobRun> = runs.iter().collect();
        dataset_status("shop", "db", &jobs, &runs, now_min * MIN)
    }

    #[test]
    fn fresh_backups_and_a_passing_drill_meet_the_targets() {
        let runs = [
            run(JobKind::Backup, RunState::Succeeded, 100, 1, Some(100)),
            run(JobKind::RestoreTest, RunState::Succeeded, 90, 20, Some(85)),
        ];
        let s = status(&runs, 105);
        assert_eq!(s.verdict, Verdict::Met, "{:?}", s.reasons);
        assert_eq!(s.backup_age_ms, Some(5 * MIN));
    }

    #[test]
    fn verdicts_say_why() {
        // Backup data 20 minutes old against a 15 minute RPO.
        let s = status(
            &[
                run(JobKind::Backup, RunState::Succeeded, 80, 1, Some(80)),
                run(JobKind::RestoreTest, RunState::Succeeded, 90, 20, None),
            ],
            100,
        );
        assert_eq!(s.verdict, Verdict::Breached);
        assert!(
            s.reasons[0].contains("20m old, over the RPO of 15m"),
            "{:?}",
            s.reasons
        );
        // 13 of 15 minutes: at risk.
        let s = status(
            &[
                run(JobKind::Backup, RunState::Succeeded, 87, 1, Some(87)),
                run(JobKind::RestoreTest, RunState::Succeeded, 90, 5, None),
            ],
            100,
        );
        assert_eq!(s.verdict, Verdict::AtRisk, "{:?}", s.reasons);
        // No drill ever: at risk, naming the command.
        let s = status(
            &[run(JobKind::Backup, RunState::Succeeded, 99, 1, Some(99))],
            100,
        );
        assert_eq!(s.verdict, Verdict::AtRisk);
        assert!(
            s.reasons[0].contains("cutover jobs run restore_test --env staging"),
            "{:?}",
            s.reasons
        );
        // The newest drill failed (an older one passed): breached.
        let s = status(
            &[
                run(JobKind::Backup, RunState::Succeeded, 99, 1, Some(99)),
                run(JobKind::RestoreTest, RunState::Succeeded, 50, 5, None),
                run(JobKind::RestoreTest, RunState::Failed, 80, 5, None),
            ],
            100,
        );
        assert_eq!(s.verdict, Verdict::Breached);
        assert!(
            s.reasons[0].contains("restore_test.80 failed"),
            "{:?}",
            s.reasons
        );
        // A drill over the RTO: breached.
        let s = status(
            &[
                run(JobKind::Backup, RunState::Succeeded, 199, 1, Some(199)),
                run(JobKind::RestoreTest, RunState::Succeeded, 100, 70, None),
            ],
            200,
        );
        assert!(
            s.reasons
                .iter()
                .any(|r| r.contains("took 1h 10m, over the RTO of 1h")),
            "{:?}",
            s.reasons
        );
        // Nothing at all.
        assert_eq!(status(&[], 100).verdict, Verdict::Breached);
    }

    #[test]
    fn the_gate_names_the_backup_its_age_and_the_way_out() {
        let required = RequireBackup {
            dataset: "db".into(),
            max_age: std::time::Duration::from_secs(15 * 60),
            restore_tested: true,
        };
        let old = status(
            &[run(JobKind::Backup, RunState::Succeeded, 60, 1, Some(60))],
            100,
        );
        let refusal = gate_refusal(&old, &required, "prod").unwrap();
        assert!(
            refusal.contains("the newest (backup.60 on db-1) is 40m old"),
            "{refusal}"
        );
        assert!(refusal.contains("--backup-now"), "{refusal}");
        let untested = status(
            &[run(JobKind::Backup, RunState::Succeeded, 99, 1, Some(99))],
            100,
        );
        assert!(gate_refusal(&untested, &required, "prod")
            .unwrap()
            .contains("no restore drill has run"));
        let good = status(
            &[
                run(JobKind::Backup, RunState::Succeeded, 99, 1, Some(99)),
                run(JobKind::RestoreTest, RunState::Succeeded, 90, 5, None),
            ],
            100,
        );
        assert_eq!(gate_refusal(&good, &required, "prod"), None);
    }
}
