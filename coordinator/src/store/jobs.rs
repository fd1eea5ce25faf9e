//! Scheduled jobs: each environment's job definitions (as the last
//! `cutover jobs apply` left them, with the scheduler's place in their
//! schedule) and their runs, oldest first per job, the newest few hundred
//! kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::backend::{Durability, Swap, Table};
use super::kv::{Change, Kv};
use super::StoreError;

/// What a job is for: a plain job, or a backup or a restore drill of a
/// data set, which `recovery status` and the backup gate read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    #[default]
    Job,
    Backup,
    RestoreTest,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Job => "job",
            JobKind::Backup => "backup",
            JobKind::RestoreTest => "restore_test",
        }
    }
}

/// Where each run goes: one ready node of the selector, or every one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOn {
    #[default]
    One,
    Each,
}

/// A run due while another of the job still runs: skipped, or started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Concurrency {
    #[default]
    Forbid,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// A crontab expression in a named zone of the tz database.
    Cron {
        expression: String,
        timezone: String,
    },
    /// Every `every_ms` from when the job was applied.
    Every { every_ms: u64 },
}

/// A job of one environment, as applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDef {
    pub app: String,
    pub env: String,
    pub name: String,
    pub kind: JobKind,
    /// Run with this service's current release in the environment (its
    /// files, environment and secrets); `None`: a plain command on the node.
    pub service: Option<String>,
    pub command: Vec<String>,
    /// Added to the command's environment.
    pub vars: BTreeMap<String, String>,
    pub schedule: Schedule,
    pub run_on: RunOn,
    /// The environment's selector ANDed with the job's (and its service's).
    pub selector: BTreeMap<String, String>,
    pub timeout_ms: u64,
    pub concurrency: Concurrency,
    pub dataset: Option<String>,
    pub rpo_ms: Option<u64>,
    pub rto_ms: Option<u64>,
    pub applied_at_ms: i64,
    pub applied_by: String,
    /// The scheduler's place: the last due time it acted on (ran, skipped,
    /// or folded into a later one after an outage). Runs are due after it.
    pub last_tick_ms: i64,
    pub paused: bool,
    /// A backup or drill the agent runs with pgBackRest (`command` is
    /// empty then).
    #[serde(default)]
    pub pgbackrest: Option<crate::pgbackrest::PgBackrestSpec>,
    /// A pgBackRest drill's checks of the restored copy.
    #[serde(default)]
    pub verify: Vec<crate::pgbackrest::VerifySpec>,
}

/// How a run ended, or that it has not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Succeeded,
    /// Exited non-zero, or the node could not run it.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Its node went away (or restarted) mid-run: whether it finished is
    /// not known. Never retried on its own.
    Lost,
    /// Due while another run of the job still ran (`concurrency =
    /// "forbid"`). (A tick no node could take is `Failed`.)
    Skipped,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Lost => "lost",
            RunState::Skipped => "skipped",
        }
    }

    pub fn ended(self) -> bool {
        self != RunState::Running
    }
}

/// One run of a job on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRun {
    /// `JOB.YYYYMMDD-HHMMSS` of its due time (`.NODE` added for a job that
    /// runs on each node): ordered by time within a job, and the same id
    /// for the same due time, so a tick is never run twice.
    pub id: String,
    pub app: String,
    pub env: String,
    pub job: String,
    pub kind: JobKind,
    pub dataset: Option<String>,
    /// Empty when no node could take it.
    pub node: String,
    pub release_id: Option<String>,
    /// When it was due (its tick), or asked for.
    pub due_ms: i64,
    /// Ticks passed over while the coordinator was down, run as this one.
    pub missed: u32,
    /// Who asked for it; empty for the schedule.
    pub manual_by: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub detail: String,
    pub output_tail: String,
    /// The fields of the JSON object the job printed as its last line.
    pub facts: BTreeMap<String, serde_json::Value>,
    /// The agent command that runs it: resent as is after a reconnect or a
    /// coordinator restart, which the agent runs once.
    pub command_id: String,
    /// The job as it was when the run started (what it runs, its timeout):
    /// a run is resent and judged by it, whatever is applied later. `None`
    /// for a tick that ran nowhere.
    #[serde(default)]
    pub definition: Option<Box<JobDef>>,
}

/// Runs kept per job; the oldest go first.
pub const RUNS_KEPT: usize = 500;
/// Runs past `RUNS_KEPT` before a prune.
const PRUNE_BATCH: usize = 50;

#[derive(Clone)]
pub struct JobRepo {
    kv: Kv,
}

fn job_key(env: &str, name: &str) -> Vec<u8> {
    format!("{env}\0{name}").into_bytes()
}

fn runs_prefix(env: &str, job: &str) -> Vec<u8> {
    format!("{env}\0{job}\0").into_bytes()
}

fn run_key(env: &str, job: &str, id: &str) -> Vec<u8> {
    let mut key = runs_prefix(env, job);
    key.extend_from_slice(id.as_bytes());
    key
}

impl JobRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    /// Every job, or an environment's (`Some(env)`).
    pub async fn list(&self, env: Option<&str>) -> Result<Vec<JobDef>, StoreError> {
        let prefix = env
            .map(|e| format!("{e}\0").into_bytes())
            .unwrap_or_default();
        self.kv.list(Table::Jobs, &prefix).await
    }

    pub async fn get(&self, env: &str, name: &str) -> Result<Option<JobDef>, StoreError> {
        self.kv.get(Table::Jobs, &job_key(env, name)).await
    }

    pub async fn put(&self, job: &JobDef) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::Jobs,
                &job_key(&job.env, &job.name),
                job,
                Durability::Durable,
            )
            .await
    }

    /// Read-modify-write of one job; `None` if there is no such job.
    pub async fn update(
        &self,
        env: &str,
        name: &str,
        mut change: impl FnMut(&mut JobDef) + Send,
    ) -> Result<Option<JobDef>, StoreError> {
        self.kv
            .update::<JobDef, StoreError>(Table::Jobs, &job_key(env, name), |job| {
                Ok(match job {
                    Some(mut job) => {
                        change(&mut job);
                        Change::Put(job)
                    }
                    None => Change::Keep,
                })
            })
            .await
    }

    /// Removes a job; its runs stay until they age out of `RUNS_KEPT` (they
    /// are history).
    pub async fn delete(&self, env: &str, name: &str) -> Result<bool, StoreError> {
        self.kv
            .delete(Table::Jobs, &job_key(env, name), Durability::Durable)
            .await
    }

    /// Stores a new run unless one with its id exists: `false` then, and
    /// nothing changes. Prunes the job's oldest runs past `RUNS_KEPT`, in
    /// batches (reading them is the cost), never one still running nor
    /// the newest that succeeded: what recovery and `recovery status`
    /// read.
    pub async fn create_run(&self, run: &JobRun) -> Result<bool, StoreError> {
        let key = run_key(&run.env, &run.job, &run.id);
        if self.kv.swap(Table::JobRuns, &key, None, Some(run)).await? == Swap::Conflict {
            return Ok(false);
        }
        let prefix = runs_prefix(&run.env, &run.job);
        if self.kv.keys(Table::JobRuns, &prefix).await?.len() <= RUNS_KEPT + PRUNE_BATCH {
            return Ok(true);
        }
        let runs: Vec<JobRun> = self.kv.list(Table::JobRuns, &prefix).await?;
        let newest_success = runs.iter().rposition(|r| r.state == RunState::Succeeded);
        let mut excess = runs.len().saturating_sub(RUNS_KEPT);
        for (i, old) in runs.iter().enumerate() {
            if excess == 0 {
                break;
            }
            if old.state == RunState::Running || Some(i) == newest_success {
                continue;
            }
            let key = run_key(&old.env, &old.job, &old.id);
            self.kv
                .delete(Table::JobRuns, &key, Durability::Lazy)
                .await?;
            excess -= 1;
        }
        Ok(true)
    }

    pub async fn put_run(&self, run: &JobRun) -> Result<(), StoreError> {
        self.kv
            .put(
                Table::JobRuns,
                &run_key(&run.env, &run.job, &run.id),
                run,
                Durability::Durable,
            )
            .await
    }

    pub async fn get_run(
        &self,
        env: &str,
        job: &str,
        id: &str,
    ) -> Result<Option<JobRun>, StoreError> {
        self.kv.get(Table::JobRuns, &run_key(env, job, id)).await
    }

    /// A job's kept runs, oldest first.
    pub async fn runs(&self, env: &str, job: &str) -> Result<Vec<JobRun>, StoreError> {
        self.kv.list(Table::JobRuns, &runs_prefix(env, job)).await
    }

    /// Every kept run of every job (recovery, and the recovery figures).
    pub async fn all_runs(&self) -> Result<Vec<JobRun>, StoreError> {
        self.kv.list(Table::JobRuns, b"").await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{SledBackend, Store};

    fn run(id: &str) -> JobRun {
        JobRun {
            id: id.into(),
            app: "shop".into(),
            env: "prod".into(),
            job: "scheduler".into(),
            kind: JobKind::Job,
            dataset: None,
            node: "n1".into(),
            release_id: None,
            due_ms: 1,
            missed: 0,
            manual_by: String::new(),
            started_ms: 1,
            ended_ms: None,
            state: RunState::Running,
            exit_code: None,
            detail: String::new(),
            output_tail: String::new(),
            facts: BTreeMap::new(),
            command_id: format!("job.{id}"),
            definition: None,
        }
    }

    fn job() -> JobDef {
        JobDef {
            app: "shop".into(),
            env: "prod".into(),
            name: "scheduler".into(),
            kind: JobKind::Job,
            service: Some("web".into()),
            command: vec!["php".into(), "artisan".into(), "schedule:run".into()],
            vars: BTreeMap::new(),
            schedule: Schedule::Cron {
                expression: "* * * * *".into(),
                timezone: "UTC".into(),
            },
            run_on: RunOn::One,
            selector: [("role".to_string(), "web".to_string())].into(),
            timeout_ms: 600_000,
            concurrency: Concurrency::Forbid,
            dataset: None,
            rpo_ms: None,
            rto_ms: None,
            applied_at_ms: 1,
            applied_by: "operator/ops".into(),
            last_tick_ms: 1,
            paused: false,
            pgbackrest: None,
            verify: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_jobs_pause_and_place_in_its_schedule_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
            store.jobs.put(&job()).await.unwrap();
            let updated = store
                .jobs
                .update("prod", "scheduler", |j| {
                    j.paused = true;
                    j.last_tick_ms = 60_000;
                })
                .await
                .unwrap();
            assert!(updated.is_some());
            store.flush().await.unwrap();
        }
        let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
        let jobs = store.jobs.list(Some("prod")).await.unwrap();
        assert_eq!(
            jobs,
            vec![JobDef {
                paused: true,
                last_tick_ms: 60_000,
                ..job()
            }]
        );
        assert!(store.jobs.list(Some("staging")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_run_id_is_created_once_and_runs_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
            let mut first = run("scheduler.20261202-170500");
            first.definition = Some(Box::new(job()));
            assert!(store.jobs.create_run(&first).await.unwrap());
            let mut again = run("scheduler.20261202-170500");
            again.node = "n2".into();
            assert!(!store.jobs.create_run(&again).await.unwrap());
            store.flush().await.unwrap();
        }
        let store = Store::new(Arc::new(SledBackend::open(dir.path()).unwrap()));
        let runs = store.jobs.runs("prod", "scheduler").await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].node, "n1");
        assert_eq!(runs[0].definition.as_deref(), Some(&job()));
    }

    #[tokio::test]
    async fn only_the_newest_runs_are_kept_but_never_a_running_one_or_the_last_success() {
        let store = Store::new(Arc::new(crate::store::memory::MemoryBackend::new()));
        let mut first = run("scheduler.000000");
        first.state = RunState::Succeeded;
        store.jobs.create_run(&first).await.unwrap();
        // Still running, old as it is.
        store
            .jobs
            .create_run(&run("scheduler.000001"))
            .await
            .unwrap();
        for i in 2..RUNS_KEPT + PRUNE_BATCH + 1 {
            let mut skipped = run(&format!("scheduler.{i:06}"));
            skipped.state = RunState::Skipped;
            store.jobs.create_run(&skipped).await.unwrap();
        }
        let runs = store.jobs.runs("prod", "scheduler").await.unwrap();
        assert_eq!(runs.len(), RUNS_KEPT);
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids[..3],
            ["scheduler.000000", "scheduler.000001", "scheduler.000053"]
        );
        // Another job's runs and another environment's are their own.
        assert!(store
            .jobs
            .runs("prod", "schedule")
            .await
            .unwrap()
            .is_empty());
    }
}
