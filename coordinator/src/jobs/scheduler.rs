//! Turns due ticks into runs. Once a second the loop looks at every job:
//! a tick due since its last one starts a run (or a skipped record, when
//! the job forbids overlap and a run still goes). Ticks passed over while
//! the coordinator was down run once, as the newest of them, with the
//! count of those it stands for. The run is stored before the job's place
//! moves on, and its id is its tick: a crash between the two runs nothing
//! twice.

use std::sync::Arc;
use std::time::Duration;

use super::{run_id, JobError, Jobs};
use crate::spec::selects;
use crate::store::{JobDef, JobRun, NodeStatus, RunOn, RunState, Schedule};

/// The capability of agents that run a task without a release.
const PLAIN_TASKS: &str = "command.run_plain_task";
/// Where the runs of a tick go.
enum Placement {
    Nodes(Vec<String>),
    /// Not yet: a node that may take it is reconnecting.
    Wait,
    /// No node can take it, and why.
    Nowhere(String),
}

/// How often the loop looks for due ticks.
const TICK: Duration = Duration::from_millis(500);
/// Ticks looked at to find the newest one due, at most: a 1s schedule
/// after a day down.
const MAX_TICKS_SCANNED: u32 = 100_000;

/// The first time `schedule` fires after `after_ms`.
pub fn next_due(schedule: &Schedule, after_ms: i64) -> Option<i64> {
    match schedule {
        Schedule::Every { every_ms } => after_ms.checked_add(*every_ms as i64),
        Schedule::Cron {
            expression,
            timezone,
        } => {
            let cron = super::cron::Cron::parse(expression).ok()?;
            let tz = jiff::tz::TimeZone::get(timezone).ok()?;
            let after = jiff::Timestamp::from_millisecond(after_ms).ok()?;
            cron.next_after(after, &tz).map(|t| t.as_millisecond())
        }
    }
}

/// The time between two runs of `schedule` after `now_ms`.
pub fn period_ms(schedule: &Schedule, now_ms: i64) -> Option<i64> {
    let first = next_due(schedule, now_ms)?;
    Some(next_due(schedule, first)? - first)
}

/// When a job whose last tick was `last_ms` runs next, seen at `now_ms`:
/// its next tick on the job's own grid, not counted from now.
pub fn next_run(schedule: &Schedule, last_ms: i64, now_ms: i64) -> Option<i64> {
    match schedule {
        Schedule::Every { every_ms } => {
            let every = (*every_ms as i64).max(1);
            let passed = (now_ms - last_ms).max(0) / every;
            last_ms.checked_add((passed + 1).checked_mul(every)?)
        }
        Schedule::Cron { .. } => next_due(schedule, last_ms.max(now_ms)),
    }
}

/// The newest tick due at `now_ms` after `last_ms`, and how many earlier
/// ones it passes over; `None` when none is due yet.
pub(super) fn due_tick(schedule: &Schedule, last_ms: i64, now_ms: i64) -> Option<(i64, u32)> {
    let mut tick = next_due(schedule, last_ms).filter(|t| *t <= now_ms)?;
    if let Schedule::Every { every_ms } = schedule {
        // On the grid of the job's ticks, without walking it.
        let every = (*every_ms as i64).max(1);
        let passed = (now_ms - tick) / every;
        return Some((
            tick + passed * every,
            u32::try_from(passed).unwrap_or(u32::MAX),
        ));
    }
    let mut missed = 0;
    while missed < MAX_TICKS_SCANNED {
        match next_due(schedule, tick) {
            Some(next) if next <= now_ms => {
                tick = next;
                missed += 1;
            }
            _ => break,
        }
    }
    Some((tick, missed))
}

impl Jobs {
    /// Runs until shutdown: starts the runs their schedules make due.
    pub async fn schedule_loop(self: Arc<Self>) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            if let Err(error) = self.start_due().await {
                tracing::warn!(%error, "job scheduler pass failed; trying again");
            }
        }
    }

    async fn start_due(self: &Arc<Self>) -> Result<(), JobError> {
        let now_ms = self.registry.now_ms();
        for job in self.store.jobs.list(None).await? {
            // One job's failure (its store records, its release) must not
            // hold up the others.
            if let Err(error) = self.start_job_due(&job, now_ms).await {
                tracing::warn!(%error, job = %job.name, env = %job.env, "cannot start a due job run; trying again");
            }
        }
        Ok(())
    }

    async fn start_job_due(self: &Arc<Self>, job: &JobDef, now_ms: i64) -> Result<(), JobError> {
        if job.paused {
            return Ok(());
        }
        let Some((tick, missed)) = due_tick(&job.schedule, job.last_tick_ms, now_ms) else {
            return Ok(());
        };
        match self.start(job, tick, missed, "", None).await? {
            // Its node is reconnecting, or a run left by the previous
            // coordinator is not accounted for yet: the tick waits.
            None => return Ok(()),
            Some(_) if missed > 0 => {
                tracing::info!(job = %job.name, env = %job.env, missed, "ticks passed while the coordinator was down ran once");
            }
            Some(_) => {}
        }
        // The job moves on only once its tick's run is stored.
        self.store
            .jobs
            .update(&job.env, &job.name, |j| {
                j.last_tick_ms = j.last_tick_ms.max(tick)
            })
            .await?;
        Ok(())
    }

    /// Starts the runs of one tick (or of a manual request, `by` set):
    /// on one ready node, or on each; stored first, then sent. `None`: not
    /// yet, a node that may take it is reconnecting, or a run it may not
    /// overlap was left by the previous coordinator and is not answered
    /// for yet.
    pub(super) async fn start(
        self: &Arc<Self>,
        job: &JobDef,
        due_ms: i64,
        missed: u32,
        by: &str,
        only_node: Option<&str>,
    ) -> Result<Option<Vec<JobRun>>, JobError> {
        // A manual run that cannot start is the caller's answer, not a
        // failed run: nothing is recorded, nothing counts against the job.
        let manual = !by.is_empty();
        let cannot = |reason: String| JobError::CannotRun {
            env: job.env.clone(),
            job: job.name.clone(),
            reason,
        };
        // Checking for a run that goes on and starting this one are one
        // step: two starts at once (a manual run and a tick) never both
        // pass the check.
        let _starting = self.starting.lock().await;
        if let Some((running, why, recovered)) = self.blocking_run(job) {
            // A run the previous coordinator left may have ended long ago;
            // only its node's answer tells. Skipping the tick on a guess
            // would drop it (and the missed ones it stands for): it waits
            // for the answer, as for a reconnecting node.
            if recovered && !manual {
                tracing::debug!(job = %job.name, env = %job.env, run = %running, "a due tick waits for a run the previous coordinator left to be answered for");
                return Ok(None);
            }
            if manual {
                return Err(JobError::Busy {
                    env: job.env.clone(),
                    job: job.name.clone(),
                    run: running,
                    why,
                });
            }
            let detail = format!("due while {running} still ran ({why})");
            let skipped = self
                .record_unrun(job, due_ms, missed, RunState::Skipped, detail)
                .await?;
            return Ok(Some(vec![skipped]));
        }
        let release = match &job.service {
            Some(service) => match self.store.releases.current(&job.env, service).await? {
                Some(record) => Some(record.release.id().to_string()),
                None => {
                    let detail = format!(
                        "{service} has no current release in {}; deploy it first",
                        job.env
                    );
                    if manual {
                        return Err(cannot(detail));
                    }
                    return Ok(Some(vec![
                        self.record_unrun(job, due_ms, missed, RunState::Failed, detail)
                            .await?,
                    ]));
                }
            },
            None => None,
        };
        let nodes = match self.pick_nodes(job, release.as_deref(), only_node) {
            Placement::Nodes(nodes) => nodes,
            Placement::Wait if manual => {
                return Err(cannot(
                    "its nodes are reconnecting; try again in a few seconds".into(),
                ))
            }
            Placement::Wait => return Ok(None),
            Placement::Nowhere(detail) if manual => return Err(cannot(detail)),
            Placement::Nowhere(detail) => {
                return Ok(Some(vec![
                    self.record_unrun(job, due_ms, missed, RunState::Failed, detail)
                        .await?,
                ]));
            }
        };
        let mut runs = Vec::new();
        for node in nodes {
            let each = (job.run_on == RunOn::Each).then_some(node.as_str());
            let mut run = self.new_run(job, due_ms, missed, by, each);
            run.node = node.clone();
            run.release_id = release.clone();
            run.definition = Some(Box::new(job.clone()));
            if !self.create_unique(&mut run, by).await? {
                continue;
            }
            tracing::info!(run = %run.id, job = %job.name, env = %job.env, node = %run.node, missed, "job run started");
            self.supervise(run.clone(), false);
            runs.push(run);
        }
        Ok(Some(runs))
    }

    /// Stores a new run. A scheduled tick stored before (a crash between
    /// storing it and moving the job on) is not run again: `false`. A
    /// manual run in the same second as another gets a suffix.
    async fn create_unique(&self, run: &mut JobRun, by: &str) -> Result<bool, JobError> {
        if self.store.jobs.create_run(run).await? {
            return Ok(true);
        }
        if by.is_empty() {
            return Ok(false);
        }
        let base = run.id.clone();
        for n in 2..100 {
            run.id = format!("{base}-{n}");
            run.command_id = command_id(run);
            if self.store.jobs.create_run(run).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The nodes a run goes to: the one asked for, the ready nodes of the
    /// selector (each), or one of them, preferring one that runs the
    /// release already (it has the files). Else why none can.
    fn pick_nodes(&self, job: &JobDef, release: Option<&str>, only: Option<&str>) -> Placement {
        let candidates: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|v| selects(&job.selector, &v.record.labels))
            .collect();
        // A plain command needs an agent that runs one without a release;
        // a pgBackRest job, one that runs pgBackRest.
        let needs = match (&job.pgbackrest, &job.service) {
            (Some(_), _) => Some(crate::pgbackrest::CAPABILITY),
            (None, None) => Some(PLAIN_TASKS),
            (None, Some(_)) => None,
        };
        let capable = |v: &crate::registry::NodeView| {
            needs.is_none_or(|need| v.record.capabilities.iter().any(|c| c == need))
        };
        let ready = |v: &&crate::registry::NodeView| {
            v.connected && v.record.status == NodeStatus::Ready && capable(v)
        };
        let selector = || {
            job.selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        if let Some(name) = only {
            let Some(node) = candidates.iter().find(|v| v.record.name == name) else {
                return Placement::Nowhere(format!("{name} is not a node of the job's selector {}; `cutover nodes` shows each node's labels", selector()));
            };
            if !ready(&node) {
                return Placement::Nowhere(match capable(node) {
                    true => format!(
                        "{name} is not connected and ready; pick another, or leave --node out"
                    ),
                    false => format!(
                        "the agent on {name} cannot run this job ({}); upgrade it",
                        needs.unwrap_or_default()
                    ),
                });
            }
            return Placement::Nodes(vec![name.to_string()]);
        }
        // A node still within its heartbeat TTL but not connected (the
        // coordinator just started, or the agent is reconnecting) may take
        // the tick in a moment: the tick waits for it, at most one TTL.
        let reconnecting = candidates
            .iter()
            .any(|v| !v.connected && v.record.status == NodeStatus::Ready && capable(v));
        let ready_nodes: Vec<_> = candidates.iter().filter(ready).collect();
        if reconnecting && (ready_nodes.is_empty() || job.run_on == RunOn::Each) {
            return Placement::Wait;
        }
        if ready_nodes.is_empty() {
            return Placement::Nowhere(format!(
                "no node of selector {} is connected, ready and able to run it ({} known); `cutover nodes` shows them",
                selector(),
                candidates.len()
            ));
        }
        if job.run_on == RunOn::Each {
            return Placement::Nodes(ready_nodes.iter().map(|v| v.record.name.clone()).collect());
        }
        let serving = |v: &&&crate::registry::NodeView| {
            release.is_some_and(|id| v.record.services.iter().any(|s| s.release_id == id))
        };
        let pick = ready_nodes.iter().find(serving).unwrap_or(&ready_nodes[0]);
        Placement::Nodes(vec![pick.record.name.clone()])
    }

    fn new_run(
        &self,
        job: &JobDef,
        due_ms: i64,
        missed: u32,
        by: &str,
        node: Option<&str>,
    ) -> JobRun {
        let mut run = JobRun {
            id: run_id(&job.name, due_ms, !by.is_empty(), node),
            app: job.app.clone(),
            env: job.env.clone(),
            job: job.name.clone(),
            kind: job.kind,
            dataset: job.dataset.clone(),
            node: String::new(),
            release_id: None,
            due_ms,
            missed,
            manual_by: by.to_string(),
            started_ms: self.registry.now_ms(),
            ended_ms: None,
            state: RunState::Running,
            exit_code: None,
            detail: String::new(),
            output_tail: String::new(),
            facts: Default::default(),
            command_id: String::new(),
            definition: None,
        };
        run.command_id = command_id(&run);
        run
    }

    /// Records a tick that ran nowhere: skipped (a run still going) or
    /// failed (no node, no release), so history and alerts show it.
    async fn record_unrun(
        &self,
        job: &JobDef,
        due_ms: i64,
        missed: u32,
        state: RunState,
        detail: String,
    ) -> Result<JobRun, JobError> {
        let mut run = self.new_run(job, due_ms, missed, "", None);
        run.state = state;
        run.ended_ms = Some(run.started_ms);
        run.detail = detail;
        if self.create_unique(&mut run, "").await? {
            tracing::warn!(run = %run.id, job = %job.name, env = %job.env, state = state.as_str(), detail = %run.detail, "job tick not run");
            self.metrics.jobs.run_ended(&run);
        }
        Ok(run)
    }
}

/// The agent command id of a run: unique per environment and run.
fn command_id(run: &JobRun) -> String {
    format!("job.{}.{}", run.env, run.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn an_interval_runs_its_newest_tick_once_after_an_outage() {
        let every = Schedule::Every { every_ms: 10_000 };
        assert_eq!(due_tick(&every, 0, 9_999), None);
        assert_eq!(due_tick(&every, 0, 10_000), Some((10_000, 0)));
        // Down for a minute: one run, at the newest tick, five passed over.
        assert_eq!(due_tick(&every, 0, 65_000), Some((60_000, 5)));
    }

    #[test]
    fn a_cron_schedule_runs_its_newest_tick_once_after_an_outage() {
        let cron = Schedule::Cron {
            expression: "*/15 * * * *".into(),
            timezone: "UTC".into(),
        };
        let last = ms("2026-12-02T17:00:00Z");
        assert_eq!(due_tick(&cron, last, ms("2026-12-02T17:14:59Z")), None);
        assert_eq!(
            due_tick(&cron, last, ms("2026-12-02T17:15:00Z")),
            Some((ms("2026-12-02T17:15:00Z"), 0))
        );
        assert_eq!(
            due_tick(&cron, last, ms("2026-12-02T18:20:00Z")),
            Some((ms("2026-12-02T18:15:00Z"), 4))
        );
    }

    #[test]
    fn run_ids_are_the_tick_in_utc() {
        assert_eq!(
            run_id("scheduler", ms("2026-12-02T17:05:00Z"), false, None),
            "scheduler.20261202-170500"
        );
        assert_eq!(
            run_id("backup", ms("2026-12-02T17:05:07.5Z"), false, Some("db-1")),
            "backup.20261202-170507.db-1"
        );
        // A manual run never takes a tick's id.
        assert_eq!(
            run_id("db.backup", ms("2026-12-02T17:05:00Z"), true, None),
            "db.backup.20261202-170500m"
        );
    }

    #[test]
    fn the_next_run_of_an_interval_stays_on_its_grid() {
        let hourly = Schedule::Every {
            every_ms: 3_600_000,
        };
        let last = ms("2026-12-02T10:00:00Z");
        assert_eq!(
            next_run(&hourly, last, ms("2026-12-02T10:30:00Z")),
            Some(ms("2026-12-02T11:00:00Z"))
        );
        assert_eq!(
            next_run(&hourly, last, ms("2026-12-02T12:10:00Z")),
            Some(ms("2026-12-02T13:00:00Z"))
        );
    }
}
