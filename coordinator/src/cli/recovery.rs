//! `cutover recovery status`: per data set, its RPO and RTO, the newest
//! backup and restore drill, and whether the targets hold.

use std::process::ExitCode;

use anyhow::Result;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::{json, Value};
use tonic::transport::Channel;

use cutover_coordinator::jobs::recovery::duration;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

#[derive(Debug, clap::Subcommand)]
pub enum RecoveryCommand {
    /// Each data set's targets, newest backup and drill, and a verdict:
    /// met, at_risk or breached (with why). Exits 1 when one is breached.
    Status {
        /// Only the data sets of this environment's jobs.
        #[arg(long)]
        env: Option<String>,
    },
}

pub async fn recovery(
    client: &mut OperatorServiceClient<Channel>,
    command: RecoveryCommand,
    json: bool,
) -> Result<ExitCode> {
    let RecoveryCommand::Status { env } = command;
    let datasets = client
        .get_recovery_status(pb::GetRecoveryStatusRequest {
            env: env.clone().unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .datasets;
    let breached = datasets.iter().any(|d| d.verdict == "breached");
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&datasets.iter().map(dataset_json).collect::<Vec<_>>())?
        );
    } else if datasets.is_empty() {
        println!("no data sets: give a backup job `kind = \"backup\"` and `dataset`, then `cutover jobs apply`");
    } else {
        let mut rows = vec![[
            "DATASET",
            "ENV",
            "RPO",
            "LAST BACKUP",
            "RTO",
            "LAST DRILL",
            "VERDICT",
        ]
        .map(String::from)
        .to_vec()];
        rows.extend(datasets.iter().map(|d| {
            vec![
                format!("{}/{}", d.app, d.dataset),
                if d.env.is_empty() {
                    "-".into()
                } else {
                    d.env.clone()
                },
                target(d.rpo_ms),
                backup(d),
                target(d.rto_ms),
                drill(d),
                d.verdict.clone(),
            ]
        }));
        print!("{}", render_table(&rows));
        for d in datasets.iter().filter(|d| !d.reasons.is_empty()) {
            println!("\n{}/{} {}:", d.app, d.dataset, d.verdict);
            for reason in &d.reasons {
                println!("  - {reason}");
            }
        }
    }
    Ok(if breached {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn target(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        duration(ms as i64)
    }
}

fn facts(run: &pb::JobRun) -> Value {
    serde_json::from_str(&run.facts_json).unwrap_or(Value::Null)
}

fn backup(d: &pb::DatasetRecovery) -> String {
    let Some(run) = &d.last_backup else {
        return "none".into();
    };
    let f = facts(run);
    let mut parts = vec![format!("data {} old", duration(d.backup_age_ms))];
    if let Some(size) = f["size_bytes"].as_f64() {
        parts.push(format!("{:.1} MiB", size / (1024.0 * 1024.0)));
    }
    if let Some(kind) = f["type"].as_str() {
        parts.push(kind.to_string());
    }
    parts.push(format!("on {}", run.node));
    parts.join(", ")
}

fn drill(d: &pb::DatasetRecovery) -> String {
    let Some(last) = &d.last_drill else {
        return "none".into();
    };
    let ago = duration(cutover_common::now_ms() - last.ended_ms);
    if last.state() != pb::JobRunState::Succeeded {
        return format!("{} {ago} ago", last.state().as_str());
    }
    let took = duration(last.ended_ms - last.started_ms);
    let mut text = format!("passed {ago} ago in {took}");
    if let Some(t) = facts(last)["data_time"].as_f64() {
        text.push_str(&format!(
            ", data {} old",
            duration(last.started_ms - (t * 1000.0) as i64)
        ));
    }
    text
}

fn run_json(run: &Option<pb::JobRun>) -> Value {
    match run {
        None => Value::Null,
        Some(r) => json!({
            "id": r.id, "env": r.env, "node": r.node, "state": r.state().as_str(),
            "started": rfc3339(r.started_ms), "ended": (r.ended_ms > 0).then(|| rfc3339(r.ended_ms)),
            "duration_ms": (r.ended_ms > 0).then(|| r.ended_ms - r.started_ms),
            "detail": r.detail, "facts": facts(r),
        }),
    }
}

fn dataset_json(d: &pb::DatasetRecovery) -> Value {
    json!({
        "app": d.app, "dataset": d.dataset, "env": d.env,
        "rpo_ms": (d.rpo_ms > 0).then_some(d.rpo_ms), "rto_ms": (d.rto_ms > 0).then_some(d.rto_ms),
        "last_backup": run_json(&d.last_backup),
        "backup_age_ms": d.last_backup.as_ref().map(|_| d.backup_age_ms),
        "failed_backup": run_json(&d.failed_backup),
        "last_drill": run_json(&d.last_drill),
        "passed_drill": run_json(&d.passed_drill),
        "verdict": d.verdict, "reasons": d.reasons,
    })
}
