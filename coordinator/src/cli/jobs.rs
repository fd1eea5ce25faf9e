//! `cutover jobs`: apply an environment's scheduled jobs from the spec,
//! list them, read their runs, run one now, pause and resume.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cutover_coordinator::spec::AppSpec;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

/// How often `jobs run --wait` asks how the run goes.
const WAIT_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Make an environment's jobs those of the spec's `[jobs.NAME]`: new
    /// ones added, changed ones replaced, the app's others removed.
    Apply {
        /// The app spec.
        #[arg(short = 'f', long = "file", default_value = "cutover.toml")]
        file: PathBuf,
        #[arg(long)]
        env: String,
    },
    /// Jobs with their schedule, next run and last run.
    List {
        /// Only this environment's.
        #[arg(long)]
        env: Option<String>,
    },
    /// A job's runs, newest first (deployer of the environment: output may
    /// hold customer data).
    History {
        job: String,
        #[arg(long)]
        env: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One run: how it ended, its facts and the end of its output.
    Show {
        /// The run id (`cutover jobs history` lists them).
        run: String,
        #[arg(long)]
        env: String,
    },
    /// Run a job now, whatever its schedule.
    Run {
        job: String,
        #[arg(long)]
        env: String,
        /// On this node (one of the job's); default: where its `run_on`
        /// says.
        #[arg(long)]
        node: Option<String>,
        /// Wait for the run to end; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Stop a job's schedule (a run that goes on ends as it would).
    Pause {
        job: String,
        #[arg(long)]
        env: String,
    },
    /// Start a paused job's schedule again, from its next due time.
    Resume {
        job: String,
        #[arg(long)]
        env: String,
    },
}

pub async fn jobs(
    client: &mut OperatorServiceClient<Channel>,
    command: JobsCommand,
    json: bool,
) -> Result<ExitCode> {
    match command {
        JobsCommand::Apply { file, env } => apply(client, file, env, json).await,
        JobsCommand::List { env } => list(client, env, json).await,
        JobsCommand::History { job, env, limit } => {
            let runs = client
                .list_job_runs(pb::ListJobRunsRequest {
                    env,
                    job: job.clone(),
                    limit,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .runs;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&runs.iter().map(run_json).collect::<Vec<_>>())?
                );
            } else if runs.is_empty() {
                println!("{job} has not run yet");
            } else {
                print!("{}", runs_table(&runs));
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { run, env } => {
            let run = get_run(client, &env, &run).await?;
            print_run(&run, json)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Run {
            job,
            env,
            node,
            wait,
        } => {
            let runs = client
                .run_job(pb::RunJobRequest {
                    env: env.clone(),
                    job,
                    node: node.unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .runs;
            if !wait {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &runs.iter().map(run_json).collect::<Vec<_>>()
                        )?
                    );
                } else {
                    for run in &runs {
                        println!("run {} started on {}", run.id, run.node);
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let mut ok = true;
            for run in runs {
                let ended = wait_for(client, &env, run).await?;
                ok &= ended.state() == pb::JobRunState::Succeeded;
                print_run(&ended, json)?;
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        JobsCommand::Pause { job, env } => set_paused(client, job, env, true, json).await,
        JobsCommand::Resume { job, env } => set_paused(client, job, env, false, json).await,
    }
}

async fn apply(
    client: &mut OperatorServiceClient<Channel>,
    file: PathBuf,
    env: String,
    json: bool,
) -> Result<ExitCode> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read the app spec {name}"))?;
    // Checked here first, so a typo fails with the spec's own message.
    AppSpec::parse(&text, &name)?;
    let applied = client
        .apply_jobs(pb::ApplyJobsRequest {
            spec: text,
            spec_file: name,
            env: env.clone(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "added": applied.added, "changed": applied.changed,
                "removed": applied.removed, "unchanged": applied.unchanged,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for (what, names) in [
        ("added", &applied.added),
        ("changed", &applied.changed),
        ("removed", &applied.removed),
        ("unchanged", &applied.unchanged),
    ] {
        if !names.is_empty() {
            println!("{what}: {}", names.join(", "));
        }
    }
    if [
        &applied.added,
        &applied.changed,
        &applied.removed,
        &applied.unchanged,
    ]
    .iter()
    .all(|n| n.is_empty())
    {
        println!("{env} has no jobs of this app");
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(
    client: &mut OperatorServiceClient<Channel>,
    env: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let jobs = client
        .list_jobs(pb::ListJobsRequest {
            env: env.clone().unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .jobs;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        match env {
            Some(env) => println!(
                "no jobs in {env}; `cutover jobs apply --env {env}` sets them from the spec"
            ),
            None => println!(
                "no jobs; `cutover jobs apply --env ENV` sets an environment's from the spec"
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![[
        "NAME", "ENV", "KIND", "SCHEDULE", "RUN_ON", "NEXT", "LAST RUN",
    ]
    .map(String::from)
    .to_vec()];
    rows.extend(jobs.iter().map(|j| {
        let kind = match j.kind() {
            pb::JobKind::Job => String::new(),
            kind => format!("{} {}", kind.as_str(), j.dataset),
        };
        let next = match (j.paused, j.next_due_ms) {
            (true, _) => "paused".to_string(),
            (false, 0) => "never".to_string(),
            (false, ms) => rfc3339(ms),
        };
        let last = j.last_run.as_ref().map_or("-".to_string(), |r| {
            format!(
                "{} {} on {}",
                r.state().as_str(),
                rfc3339(r.started_ms),
                if r.node.is_empty() { "-" } else { &r.node }
            )
        });
        vec![
            j.name.clone(),
            j.env.clone(),
            kind,
            schedule(j),
            j.run_on.clone(),
            next,
            last,
        ]
    }));
    print!("{}", render_table(&rows));
    Ok(ExitCode::SUCCESS)
}

async fn set_paused(
    client: &mut OperatorServiceClient<Channel>,
    job: String,
    env: String,
    paused: bool,
    json: bool,
) -> Result<ExitCode> {
    let job = client
        .set_job_paused(pb::SetJobPausedRequest { env, job, paused })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
    } else if paused {
        println!(
            "job {} in {} paused; `cutover jobs resume {} --env {}` starts it again",
            job.name, job.env, job.name, job.env
        );
    } else {
        println!(
            "job {} in {} resumed; next run {}",
            job.name,
            job.env,
            rfc3339(job.next_due_ms)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `deploy --backup-now`: runs the backup job of each data set the deploy's
/// backup gates name (the environment's, and the migration's when the
/// deploy runs it) and waits for each to succeed.
pub async fn backup_now(
    client: &mut OperatorServiceClient<Channel>,
    spec: &AppSpec,
    env: &str,
    service: Option<&str>,
    skip_migrate: bool,
    json: bool,
) -> Result<()> {
    let migrating = spec
        .migrate
        .as_ref()
        .filter(|m| !skip_migrate && service.is_none_or(|s| s == m.service));
    let datasets: std::collections::BTreeSet<&String> = spec
        .environments
        .get(env)
        .and_then(|e| e.require_backup.as_ref())
        .into_iter()
        .chain(migrating.and_then(|m| m.require_backup.as_ref()))
        .map(|gate| &gate.dataset)
        .collect();
    if datasets.is_empty() {
        anyhow::bail!(
            "--backup-now: the spec requires no backup for a deploy to {env}; leave it out"
        );
    }
    let jobs = client
        .list_jobs(pb::ListJobsRequest {
            env: env.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .jobs;
    for dataset in datasets {
        let job = jobs
            .iter()
            .find(|j| j.app == spec.app && j.kind() == pb::JobKind::Backup && &j.dataset == dataset)
            .with_context(|| format!("--backup-now: {env} has no backup job of {dataset}; `cutover jobs apply --env {env}` sets the spec's jobs"))?;
        if !json {
            eprintln!("backing up {dataset}: running job {} ...", job.name);
        }
        let started = client
            .run_job(pb::RunJobRequest {
                env: env.to_string(),
                job: job.name.clone(),
                node: String::new(),
            })
            .await;
        let runs = match started {
            Ok(response) => response.into_inner().runs,
            // A backup already going (the schedule's): wait for that one.
            Err(status) if status.code() == tonic::Code::Aborted => client
                .list_job_runs(pb::ListJobRunsRequest {
                    env: env.to_string(),
                    job: job.name.clone(),
                    limit: 10,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .runs
                .into_iter()
                .filter(|r| r.state() == pb::JobRunState::Running)
                .collect(),
            Err(status) => return Err(explain(status)),
        };
        for run in runs {
            let ended = wait_for(client, env, run).await?;
            if ended.state() != pb::JobRunState::Succeeded {
                anyhow::bail!(
                    "backup {} of {dataset} {}: {}; nothing was deployed (`cutover jobs show {} --env {env}` shows its output)",
                    ended.id,
                    ended.state().as_str(),
                    ended.detail,
                    ended.id
                );
            }
            if !json {
                eprintln!(
                    "backup {} of {dataset} succeeded in {}",
                    ended.id,
                    duration(&ended)
                );
            }
        }
    }
    Ok(())
}

/// The job of a run id: what comes before its time, `.YYYYMMDD-HHMMSS`
/// (a job's name may hold dots).
fn job_of(run: &str) -> Result<&str> {
    let is_time = |rest: &str| {
        let b = rest.as_bytes();
        b.len() >= 15
            && b[..8].iter().all(u8::is_ascii_digit)
            && b[8] == b'-'
            && b[9..15].iter().all(u8::is_ascii_digit)
    };
    run.match_indices('.')
        .map(|(i, _)| i)
        .find(|i| *i > 0 && is_time(&run[i + 1..]))
        .map(|i| &run[..i])
        .with_context(|| format!("{run:?} is not a run id (JOB.YYYYMMDD-HHMMSS); `cutover jobs history JOB --env ENV` lists them"))
}

async fn get_run(
    client: &mut OperatorServiceClient<Channel>,
    env: &str,
    run: &str,
) -> Result<pb::JobRun> {
    fetch_run(client, env, job_of(run)?, run).await
}

async fn fetch_run(
    client: &mut OperatorServiceClient<Channel>,
    env: &str,
    job: &str,
    run: &str,
) -> Result<pb::JobRun> {
    Ok(client
        .get_job_run(pb::GetJobRunRequest {
            env: env.to_string(),
            job: job.to_string(),
            run_id: run.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner())
}

async fn wait_for(
    client: &mut OperatorServiceClient<Channel>,
    env: &str,
    mut run: pb::JobRun,
) -> Result<pb::JobRun> {
    while run.state() == pb::JobRunState::Running {
        tokio::time::sleep(WAIT_POLL).await;
        run = fetch_run(client, env, &run.job.clone(), &run.id).await?;
    }
    Ok(run)
}

fn schedule(job: &pb::Job) -> String {
    match (job.schedule.as_str(), job.every_ms) {
        ("", ms) => format!(
            "every {}",
            humantime::format_duration(Duration::from_millis(ms))
        ),
        (cron, _) if job.timezone == "UTC" => cron.to_string(),
        (cron, _) => format!("{cron} ({})", job.timezone),
    }
}

fn duration(run: &pb::JobRun) -> String {
    match run.ended_ms {
        0 => "-".into(),
        end => format!("{:.1}s", (end - run.started_ms) as f64 / 1000.0),
    }
}

fn runs_table(runs: &[pb::JobRun]) -> String {
    let mut rows = vec![
        ["RUN", "NODE", "STARTED", "TOOK", "STATE", "EXIT", "DETAIL"]
            .map(String::from)
            .to_vec(),
    ];
    rows.extend(runs.iter().map(|r| {
        let mut detail = r.detail.clone();
        if r.missed > 0 {
            detail = format!("{detail} (stands for {} missed ticks)", r.missed)
                .trim()
                .to_string();
        }
        if !r.manual_by.is_empty() {
            detail = format!("{detail} (run by {})", r.manual_by)
                .trim()
                .to_string();
        }
        vec![
            r.id.clone(),
            if r.node.is_empty() {
                "-".into()
            } else {
                r.node.clone()
            },
            rfc3339(r.started_ms),
            duration(r),
            r.state().as_str().to_string(),
            r.exit_code.map_or("-".into(), |c| c.to_string()),
            detail,
        ]
    }));
    render_table(&rows)
}

fn print_run(run: &pb::JobRun, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&run_json(run))?);
        return Ok(());
    }
    print!("{}", runs_table(std::slice::from_ref(run)));
    if run.facts_json != "{}" && !run.facts_json.is_empty() {
        println!("facts: {}", run.facts_json);
    }
    if !run.output_tail.is_empty() {
        println!("--- output (end) ---\n{}", run.output_tail.trim_end());
    }
    Ok(())
}

fn job_json(j: &pb::Job) -> Value {
    json!({
        "app": j.app, "env": j.env, "name": j.name, "kind": j.kind().as_str(),
        "service": j.service, "command": j.command, "schedule": schedule(j),
        "run_on": j.run_on, "concurrency": j.concurrency, "nodes": j.nodes,
        "timeout_ms": j.timeout_ms, "dataset": j.dataset, "rpo_ms": j.rpo_ms, "rto_ms": j.rto_ms,
        "paused": j.paused,
        "next_due": (j.next_due_ms > 0).then(|| rfc3339(j.next_due_ms)),
        "last_run": j.last_run.as_ref().map(run_json),
        "applied_by": j.applied_by, "applied_at": rfc3339(j.applied_at_ms),
    })
}

fn run_json(r: &pb::JobRun) -> Value {
    json!({
        "id": r.id, "app": r.app, "env": r.env, "job": r.job, "kind": r.kind().as_str(),
        "dataset": r.dataset, "node": r.node, "release": r.release_id,
        "due": rfc3339(r.due_ms), "missed": r.missed, "manual_by": r.manual_by,
        "started": rfc3339(r.started_ms), "ended": (r.ended_ms > 0).then(|| rfc3339(r.ended_ms)),
        "state": r.state().as_str(), "exit_code": r.exit_code, "detail": r.detail,
        "facts": serde_json::from_str::<Value>(&r.facts_json).unwrap_or(Value::Null),
        "output_tail": r.output_tail,
    })
}

#[cfg(test)]
mod tests {
    use super::job_of;

    #[test]
    fn a_run_ids_job_may_hold_dots() {
        assert_eq!(job_of("scheduler.20261202-170500").unwrap(), "scheduler");
        assert_eq!(job_of("db.backup.20261202-170500m-2").unwrap(), "db.backup");
        assert_eq!(job_of("backup.20261202-170500.db-1").unwrap(), "backup");
        assert!(job_of("scheduler").is_err());
    }
}
