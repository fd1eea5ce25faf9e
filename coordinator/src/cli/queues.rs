//! `cutover queues`: queue depth and worker health of the current
//! releases with a queue probe.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    /// One environment; default: every one.
    #[arg(long)]
    pub env: Option<String>,
}

fn status_text(w: &pb::WorkerEntry) -> &'static str {
    match (w.up, w.status) {
        (true, _) => "running",
        (false, 1) => "paused",
        (false, -1) => "unknown",
        (false, _) => "down",
    }
}

fn age(ms: i64) -> String {
    match ms {
        ms if ms < 0 => "-".into(),
        ms => {
            humantime::format_duration(Duration::from_secs(u64::try_from(ms / 1000).unwrap_or(0)))
                .to_string()
        }
    }
}

pub async fn queues(
    client: &mut OperatorServiceClient<Channel>,
    args: QueuesArgs,
    json: bool,
) -> Result<ExitCode> {
    let response = client
        .list_queues(pb::ListQueuesRequest {
            env: args.env.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        let queues: Vec<_> = response
            .queues
            .iter()
            .map(|q| {
                json!({
                    "app": q.app, "env": q.env, "service": q.service, "queue": q.queue,
                    "waiting": q.waiting, "delayed": q.delayed, "reserved": q.reserved,
                    "oldest_age_ms": (q.oldest_age_ms >= 0).then_some(q.oldest_age_ms),
                    "node": q.node, "probed_at": rfc3339(q.probed_at_ms),
                    "max_depth": (q.max_depth > 0).then_some(q.max_depth),
                    "max_wait_ms": (q.max_wait_ms > 0).then_some(q.max_wait_ms),
                })
            })
            .collect();
        let workers: Vec<_> = response
            .workers
            .iter()
            .map(|w| {
                json!({
                    "app": w.app, "env": w.env, "service": w.service, "node": w.node,
                    "up": w.up, "status": status_text(w), "exit_code": w.status,
                    "detail": w.detail, "probe_error": w.probe_error,
                    "probed_at": (w.probed_at_ms > 0).then(|| rfc3339(w.probed_at_ms)),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"queues": queues, "workers": workers}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if response.queues.is_empty() && response.workers.is_empty() {
        println!("no current release probes queues; add [services.NAME.queues] to the spec");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![[
        "ENV", "SERVICE", "QUEUE", "WAITING", "DELAYED", "RESERVED", "OLDEST", "LIMITS", "READ",
    ]
    .map(String::from)
    .to_vec()];
    rows.extend(response.queues.iter().map(|q| {
        let mut limits = Vec::new();
        if q.max_depth > 0 {
            limits.push(format!("{} jobs", q.max_depth));
        }
        if q.max_wait_ms > 0 {
            limits.push(age(i64::try_from(q.max_wait_ms).unwrap_or(i64::MAX)));
        }
        let over = (q.max_depth > 0 && q.waiting > q.max_depth)
            || (q.max_wait_ms > 0
                && q.oldest_age_ms > i64::try_from(q.max_wait_ms).unwrap_or(i64::MAX));
        vec![
            q.env.clone(),
            q.service.clone(),
            q.queue.clone(),
            format!("{}{}", q.waiting, if over { " (over)" } else { "" }),
            q.delayed.to_string(),
            q.reserved.to_string(),
            age(q.oldest_age_ms),
            if limits.is_empty() {
                "-".into()
            } else {
                limits.join(", ")
            },
            format!("{} at {}", q.node, rfc3339(q.probed_at_ms)),
        ]
    }));
    print!("{}", render_table(&rows));
    println!();
    let mut rows = vec![["ENV", "SERVICE", "NODE", "WORKER", "DETAIL"]
        .map(String::from)
        .to_vec()];
    rows.extend(response.workers.iter().map(|w| {
        let mut detail = w.detail.lines().last().unwrap_or_default().to_string();
        if !w.probe_error.is_empty() {
            detail = format!("{detail} (queues unread: {})", w.probe_error);
        }
        vec![
            w.env.clone(),
            w.service.clone(),
            w.node.clone(),
            status_text(w).to_string(),
            detail,
        ]
    }));
    print!("{}", render_table(&rows));
    Ok(ExitCode::SUCCESS)
}
