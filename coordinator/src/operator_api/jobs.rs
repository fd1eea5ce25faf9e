//! Scheduled jobs: apply an environment's from the spec, list them and
//! their runs, run one now, pause and resume. Runs' output may hold
//! customer data, so reading runs needs deploy rights on the environment,
//! as logs do.

use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::jobs::JobView;
use crate::spec::AppSpec;
use crate::store::{JobDef, JobKind, JobRun, RunState, Schedule};

/// Runs a history answer holds when the caller gives no limit.
const DEFAULT_RUNS: usize = 20;
const MAX_RUNS: usize = 500;

impl OperatorApi {
    pub(super) async fn handle_apply_jobs(
        &self,
        request: Request<pb::ApplyJobsRequest>,
    ) -> Result<Response<pb::ApplyJobsResponse>, Status> {
        let r = request.get_ref();
        let args = json!({ "env": r.env, "spec_file": r.spec_file });
        let env = r.env.clone();
        self.audited(
            request,
            Need::Deploy(&env),
            "apply_jobs",
            args,
            |caller, r| async move {
                let spec = AppSpec::parse(&r.spec, &r.spec_file)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let applied = self
                    .jobs
                    .apply(
                        &spec,
                        &r.spec_file,
                        &r.env,
                        &caller.who(),
                        caller.may_pin_environments(),
                    )
                    .await?;
                Ok(pb::ApplyJobsResponse {
                    added: applied.added,
                    changed: applied.changed,
                    removed: applied.removed,
                    unchanged: applied.unchanged,
                })
            },
        )
        .await
    }

    pub(super) async fn handle_list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.access
            .check(&request, Need::Read, "list_jobs", &serde_json::Value::Null)
            .await?;
        let env = request.into_inner().env;
        let jobs = self
            .jobs
            .list((!env.is_empty()).then_some(env.as_str()))
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            // The last run's output stays with the runs (deploy rights).
            jobs: jobs.into_iter().map(job_info).collect(),
        }))
    }

    pub(super) async fn handle_list_job_runs(
        &self,
        request: Request<pb::ListJobRunsRequest>,
    ) -> Result<Response<pb::ListJobRunsResponse>, Status> {
        let r = request.get_ref();
        let args = json!({ "env": r.env, "job": r.job });
        let env = r.env.clone();
        self.access
            .check(&request, Need::Deploy(&env), "list_job_runs", &args)
            .await?;
        let r = request.into_inner();
        let limit = match r.limit as usize {
            0 => DEFAULT_RUNS,
            n => n.min(MAX_RUNS),
        };
        let runs = self.jobs.history(&r.env, &r.job, limit).await?;
        Ok(Response::new(pb::ListJobRunsResponse {
            runs: runs.into_iter().map(run_info).collect(),
        }))
    }

    pub(super) async fn handle_get_job_run(
        &self,
        request: Request<pb::GetJobRunRequest>,
    ) -> Result<Response<pb::JobRun>, Status> {
        let r = request.get_ref();
        let args = json!({ "env": r.env, "job": r.job, "run": r.run_id });
        let env = r.env.clone();
        self.access
            .check(&request, Need::Deploy(&env), "get_job_run", &args)
            .await?;
        let r = request.into_inner();
        let run = self.jobs.run(&r.env, &r.job, &r.run_id).await?;
        Ok(Response::new(run_info(run)))
    }

    pub(super) async fn handle_run_job(
        &self,
        request: Request<pb::RunJobRequest>,
    ) -> Result<Response<pb::RunJobResponse>, Status> {
        let r = request.get_ref();
        let args = json!({ "env": r.env, "job": r.job, "node": r.node });
        let env = r.env.clone();
        self.audited(
            request,
            Need::Deploy(&env),
            "run_job",
            args,
            |caller, r| async move {
                let node = (!r.node.is_empty()).then_some(r.node.as_str());
                let runs = self
                    .jobs
                    .run_now(&r.env, &r.job, node, &caller.who())
                    .await?;
                Ok(pb::RunJobResponse {
                    runs: runs.into_iter().map(run_info).collect(),
                })
            },
        )
        .await
    }

    pub(super) async fn handle_set_job_paused(
        &self,
        request: Request<pb::SetJobPausedRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.get_ref();
        let args = json!({ "env": r.env, "job": r.job, "paused": r.paused });
        let env = r.env.clone();
        let action = if r.paused { "pause_job" } else { "resume_job" };
        self.audited(
            request,
            Need::Deploy(&env),
            action,
            args,
            |_, r| async move {
                self.jobs.set_paused(&r.env, &r.job, r.paused).await?;
                let view = self
                    .jobs
                    .list(Some(&r.env))
                    .await?
                    .into_iter()
                    .find(|v| v.def.name == r.job)
                    .ok_or_else(|| {
                        Status::not_found(format!(
                            "job {} was removed from {} meanwhile",
                            r.job, r.env
                        ))
                    })?;
                Ok(job_info(view))
            },
        )
        .await
    }
}

impl OperatorApi {
    pub(super) async fn handle_get_recovery_status(
        &self,
        request: Request<pb::GetRecoveryStatusRequest>,
    ) -> Result<Response<pb::RecoveryStatus>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "get_recovery_status",
                &serde_json::Value::Null,
            )
            .await?;
        let env = request.into_inner().env;
        let datasets = self
            .jobs
            .recovery_status((!env.is_empty()).then_some(env.as_str()))
            .await?;
        let brief = |run: Option<JobRun>| run.map(brief_run);
        Ok(Response::new(pb::RecoveryStatus {
            datasets: datasets
                .into_iter()
                .map(|d| pb::DatasetRecovery {
                    app: d.app,
                    dataset: d.dataset,
                    env: d.env,
                    rpo_ms: d.rpo_ms.unwrap_or(0),
                    rto_ms: d.rto_ms.unwrap_or(0),
                    last_backup: brief(d.last_backup),
                    backup_age_ms: d.backup_age_ms.unwrap_or(0),
                    failed_backup: brief(d.failed_backup),
                    last_drill: brief(d.last_drill),
                    passed_drill: brief(d.passed_drill),
                    verdict: d.verdict.as_str().to_string(),
                    reasons: d.reasons,
                })
                .collect(),
        }))
    }
}

fn kind(kind: JobKind) -> pb::JobKind {
    match kind {
        JobKind::Job => pb::JobKind::Job,
        JobKind::Backup => pb::JobKind::Backup,
        JobKind::RestoreTest => pb::JobKind::RestoreTest,
    }
}

fn job_info(view: JobView) -> pb::Job {
    let JobView {
        def,
        next_due_ms,
        last_run,
    } = view;
    let JobDef {
        app,
        env,
        name,
        kind: job_kind,
        service,
        command,
        schedule,
        run_on,
        selector,
        timeout_ms,
        concurrency,
        dataset,
        rpo_ms,
        rto_ms,
        applied_at_ms,
        applied_by,
        paused,
        ..
    } = def;
    let (schedule, timezone, every_ms) = match schedule {
        Schedule::Cron {
            expression,
            timezone,
        } => (expression, timezone, 0),
        Schedule::Every { every_ms } => (String::new(), String::new(), every_ms),
    };
    pb::Job {
        app,
        env,
        name,
        kind: kind(job_kind).into(),
        service: service.unwrap_or_default(),
        command,
        schedule,
        timezone,
        every_ms,
        run_on: serde_plain(&run_on),
        concurrency: serde_plain(&concurrency),
        nodes: selector.into_iter().collect(),
        timeout_ms,
        dataset: dataset.unwrap_or_default(),
        rpo_ms: rpo_ms.unwrap_or(0),
        rto_ms: rto_ms.unwrap_or(0),
        paused,
        next_due_ms: next_due_ms.unwrap_or(0),
        last_run: last_run.map(|run| pb::JobRun {
            facts_json: "{}".into(),
            ..brief_run(run)
        }),
        applied_by,
        applied_at_ms,
    }
}

/// A unit enum as its serde name ("one", "forbid").
fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A run as any role may see it: without its output or detail, which may
/// quote the data (reading them needs deploy rights).
fn brief_run(run: JobRun) -> pb::JobRun {
    pb::JobRun {
        output_tail: String::new(),
        detail: String::new(),
        ..run_info(run)
    }
}

fn run_info(run: JobRun) -> pb::JobRun {
    let state = match run.state {
        RunState::Running => pb::JobRunState::Running,
        RunState::Succeeded => pb::JobRunState::Succeeded,
        RunState::Failed => pb::JobRunState::Failed,
        RunState::TimedOut => pb::JobRunState::TimedOut,
        RunState::Lost => pb::JobRunState::Lost,
        RunState::Skipped => pb::JobRunState::Skipped,
    };
    pb::JobRun {
        facts_json: serde_json::to_string(&run.facts).unwrap_or_else(|_| "{}".into()),
        id: run.id,
        app: run.app,
        env: run.env,
        job: run.job,
        kind: kind(run.kind).into(),
        dataset: run.dataset.unwrap_or_default(),
        node: run.node,
        release_id: run.release_id.unwrap_or_default(),
        due_ms: run.due_ms,
        missed: run.missed,
        manual_by: run.manual_by,
        started_ms: run.started_ms,
        ended_ms: run.ended_ms.unwrap_or(0),
        state: state.into(),
        exit_code: run.exit_code,
        detail: run.detail,
        output_tail: run.output_tail,
    }
}
