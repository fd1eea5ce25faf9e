//! Scheduled jobs (`[jobs.NAME]`): commands the agents run on a schedule,
//! where the coordinator decides which node runs each tick and keeps a
//! durable record of every run. A tick runs at most once (its run id is
//! its due time), a run is stored before its command is sent, and a run
//! whose node went away ends `lost`, never retried on its own.
//!
//! `spec` reads the spec's section, `cron` the schedules, `scheduler`
//! turns due ticks into runs, `runner` sees each run to its end.

pub mod cron;
pub mod recovery;
mod runner;
mod scheduler;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::secrets::Secrets;
use crate::spec::{AppSpec, SpecError};
use crate::store::{Concurrency, JobDef, JobKind, JobRun, Store, StoreError};

pub use scheduler::{next_due, next_run, period_ms};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no job {name:?} in {env}; {}", known_jobs(.known))]
    NotFound {
        env: String,
        name: String,
        known: Vec<String>,
    },
    #[error(
        "no run {run:?} of job {job} in {env}; `cutover jobs history {job} --env {env}` lists them"
    )]
    RunNotFound {
        env: String,
        job: String,
        run: String,
    },
    #[error("job {name} in {env} belongs to app {owner}, not {app}; rename one of them")]
    OtherApp {
        env: String,
        name: String,
        owner: String,
        app: String,
    },
    #[error("job {job} in {env} cannot start while {run} is still running ({why}); wait for it (`cutover jobs list --env {env}`)")]
    Busy {
        env: String,
        job: String,
        run: String,
        why: String,
    },
    #[error("{0}")]
    EnvironmentPinned(String),
    #[error("job {job} in {env} cannot run now: {reason}")]
    CannotRun {
        env: String,
        job: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn known_jobs(known: &[String]) -> String {
    if known.is_empty() {
        "it has none; `cutover jobs apply --env ENV` sets them from the spec".into()
    } else {
        format!("it has {}", known.join(", "))
    }
}

/// What `cutover jobs apply` changed in an environment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

/// A job with what the list shows of it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub def: JobDef,
    pub next_due_ms: Option<i64>,
    pub last_run: Option<JobRun>,
}

pub struct Jobs {
    store: Store,
    registry: Arc<Registry>,
    secrets: Arc<Secrets>,
    metrics: Arc<Metrics>,
    /// Runs being seen to their end: what `forbid` and one backup per
    /// data set check.
    running: Mutex<Vec<Running>>,
    /// Held from the check for a run that goes on to the new run's
    /// supervision, so `forbid` holds between a tick and a manual run.
    starting: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Jobs {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        secrets: Arc<Secrets>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            registry,
            secrets,
            metrics,
            running: Mutex::new(Vec::new()),
            starting: tokio::sync::Mutex::new(()),
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    /// Sees every run a previous coordinator left running to its end (the
    /// agent answers its command id once more), and loads the recovery
    /// figures. Returns how many runs it picked up.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let runs = self.store.jobs.all_runs().await?;
        for run in &runs {
            if run.state.ended() {
                self.metrics.jobs.run_seen(run);
            }
        }
        for job in self.store.jobs.list(None).await? {
            self.metrics
                .jobs
                .targets(&job, period_ms(&job.schedule, self.registry.now_ms()));
        }
        let open: Vec<JobRun> = runs.into_iter().filter(|r| !r.state.ended()).collect();
        for run in &open {
            tracing::info!(run = %run.id, job = %run.job, env = %run.env, node = %run.node, "resuming a job run after restart");
            self.supervise(run.clone(), true);
        }
        Ok(open.len())
    }

    /// Waits for the run tasks to stop after shutdown, within `grace`.
    /// Runs still going stay `running` in the store, for the next start.
    pub async fn drain(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("job run tasks did not stop in time");
        }
    }

    /// Makes environment `env`'s jobs of the spec's app those of `spec`:
    /// new ones added, changed ones replaced (keeping their pause and, if
    /// their schedule is the same, their place in it), the app's others
    /// removed. Nothing changes unless all of it can.
    pub async fn apply(
        &self,
        spec: &AppSpec,
        file: &str,
        env: &str,
        by: &str,
        may_pin: bool,
    ) -> Result<Applied, JobError> {
        let now_ms = self.registry.now_ms();
        let wanted = spec::resolve(spec, file, env, now_ms, by)?;
        // A job runs where its environment's nodes are: the coordinator's
        // pinned selector, as for a deploy.
        if !wanted.is_empty() {
            let selector = &spec.environment(file, env)?.nodes;
            crate::environments::pin(&self.store, env, selector, may_pin, by)
                .await?
                .map_err(JobError::EnvironmentPinned)?;
        }
        let existing: BTreeMap<String, JobDef> = self
            .store
            .jobs
            .list(Some(env))
            .await?
            .into_iter()
            .map(|j| (j.name.clone(), j))
            .collect();
        if let Some(clash) = wanted
            .iter()
            .find_map(|w| existing.get(&w.name).filter(|e| e.app != w.app))
        {
            return Err(JobError::OtherApp {
                env: env.into(),
                name: clash.name.clone(),
                owner: clash.app.clone(),
                app: spec.app.clone(),
            });
        }
        let wanted_names: BTreeSet<String> = wanted.iter().map(|j| j.name.clone()).collect();
        let mut applied = Applied::default();
        for mut job in wanted {
            match existing.get(&job.name) {
                Some(old) if same_definition(old, &job) => {
                    applied.unchanged.push(job.name.clone());
                    continue;
                }
                Some(old) => {
                    job.paused = old.paused;
                    if old.schedule == job.schedule {
                        job.last_tick_ms = old.last_tick_ms;
                    }
                    applied.changed.push(job.name.clone());
                }
                None => applied.added.push(job.name.clone()),
            }
            self.store.jobs.put(&job).await?;
            self.metrics
                .jobs
                .targets(&job, period_ms(&job.schedule, self.registry.now_ms()));
        }
        for old in existing.values().filter(|e| e.app == spec.app) {
            if !wanted_names.contains(&old.name) {
                self.store.jobs.delete(env, &old.name).await?;
                self.metrics.jobs.removed(old);
                applied.removed.push(old.name.clone());
            }
        }
        Ok(applied)
    }

    /// Every job (of `env`, if given) with its next due time and last run.
    pub async fn list(&self, env: Option<&str>) -> Result<Vec<JobView>, JobError> {
        let now_ms = self.registry.now_ms();
        let mut views = Vec::new();
        for def in self.store.jobs.list(env).await? {
            let last_run = self
                .store
                .jobs
                .runs(&def.env, &def.name)
                .await?
                .into_iter()
                .max_by_key(|r| r.started_ms);
            let next_due_ms = match def.paused {
                true => None,
                false => next_run(&def.schedule, def.last_tick_ms, now_ms),
            };
            views.push(JobView {
                def,
                next_due_ms,
                last_run,
            });
        }
        Ok(views)
    }

    pub async fn job(&self, env: &str, name: &str) -> Result<JobDef, JobError> {
        match self.store.jobs.get(env, name).await? {
            Some(job) => Ok(job),
            None => Err(self.not_found(env, name).await?),
        }
    }

    /// The error for a job `env` lacks, naming the ones it has.
    async fn not_found(&self, env: &str, name: &str) -> Result<JobError, JobError> {
        let known = self.store.jobs.list(Some(env)).await?;
        Ok(JobError::NotFound {
            env: env.into(),
            name: name.into(),
            known: known.into_iter().map(|j| j.name).collect(),
        })
    }

    /// A job's newest `limit` runs, newest first.
    pub async fn history(
        &self,
        env: &str,
        name: &str,
        limit: usize,
    ) -> Result<Vec<JobRun>, JobError> {
        let mut runs = self.store.jobs.runs(env, name).await?;
        if runs.is_empty() {
            self.job(env, name).await?;
        }
        runs.sort_by_key(|r| std::cmp::Reverse((r.started_ms, r.id.clone())));
        runs.truncate(limit);
        Ok(runs)
    }

    pub async fn run(&self, env: &str, job: &str, id: &str) -> Result<JobRun, JobError> {
        self.store
            .jobs
            .get_run(env, job, id)
            .await?
            .ok_or_else(|| JobError::RunNotFound {
                env: env.into(),
                job: job.into(),
                run: id.into(),
            })
    }

    /// Pauses or resumes a job. A resumed job runs from its next due time
    /// on, not the ticks it passed while paused.
    pub async fn set_paused(
        &self,
        env: &str,
        name: &str,
        paused: bool,
    ) -> Result<JobDef, JobError> {
        let now_ms = self.registry.now_ms();
        let updated = self
            .store
            .jobs
            .update(env, name, |job| {
                if job.paused && !paused {
                    job.last_tick_ms = now_ms;
                }
                job.paused = paused;
            })
            .await?;
        match updated {
            Some(job) => Ok(job),
            None => Err(self.not_found(env, name).await?),
        }
    }

    /// Starts a run of `name` now (on `node`, or where its `run_on` says),
    /// whatever its schedule; refused while another runs unless the job
    /// allows overlap.
    pub async fn run_now(
        self: &Arc<Self>,
        env: &str,
        name: &str,
        node: Option<&str>,
        by: &str,
    ) -> Result<Vec<JobRun>, JobError> {
        let job = self.job(env, name).await?;
        let runs = self
            .start(&job, self.registry.now_ms(), 0, by, node)
            .await?;
        // A manual run never waits: it starts, or says why not.
        Ok(runs.unwrap_or_default())
    }

    /// A run that `job` may not overlap, and why: one of its own unless it
    /// allows overlap (`concurrency`), and for a backup any backup of the
    /// same data set, its own included whatever its `concurrency` (two at
    /// once only fight over the repository's lock). Also whether that run
    /// was left by a previous coordinator and its node has not answered
    /// for it yet.
    fn blocking_run(&self, job: &JobDef) -> Option<(String, String, bool)> {
        let running = self.running.lock().expect("jobs lock");
        let own = running
            .iter()
            .filter(|_| job.concurrency == Concurrency::Forbid)
            .find(|r| r.env == job.env && r.job == job.name)
            .map(|r| {
                (
                    r.id.clone(),
                    "concurrency = \"forbid\"".to_string(),
                    r.recovered,
                )
            });
        own.or_else(|| {
            let dataset = job
                .dataset
                .as_ref()
                .filter(|_| job.kind == JobKind::Backup)?;
            running
                .iter()
                .find(|r| {
                    r.kind == JobKind::Backup
                        && r.app == job.app
                        && r.env == job.env
                        && r.dataset.as_ref() == Some(dataset)
                })
                .map(|r| {
                    (
                        r.id.clone(),
                        format!("one backup of {dataset} at a time"),
                        r.recovered,
                    )
                })
        })
    }
}

/// A run being seen to its end.
#[derive(Debug, Clone)]
pub(crate) struct Running {
    env: String,
    job: String,
    id: String,
    app: String,
    kind: JobKind,
    dataset: Option<String>,
    /// Left running by a previous coordinator: whether it still goes is
    /// not known until its node answers for it.
    recovered: bool,
}

/// Whether two definitions differ only in who applied them when.
fn same_definition(old: &JobDef, new: &JobDef) -> bool {
    let strip = |j: &JobDef| JobDef {
        applied_at_ms: 0,
        applied_by: String::new(),
        last_tick_ms: 0,
        paused: false,
        ..j.clone()
    };
    strip(old) == strip(new)
}

/// A run's id: the job and its due time (UTC, to the second; `m` after
/// it for a manual run, so one never takes a tick's id), and the node for
/// a job that runs on each.
pub fn run_id(job: &str, due_ms: i64, manual: bool, node: Option<&str>) -> String {
    let mut time = jiff::Timestamp::from_millisecond(due_ms)
        .map(|t| t.strftime("%Y%m%d-%H%M%S").to_string())
        .unwrap_or_else(|_| due_ms.to_string());
    if manual {
        time.push('m');
    }
    match node {
        Some(node) => format!("{job}.{time}.{node}"),
        None => format!("{job}.{time}"),
    }
}
