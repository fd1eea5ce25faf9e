//! `cutover logs`: what a service's releases wrote, from every node that
//! runs it, each line as `NODE RELEASE | line`; what they wrote to stderr
//! goes to stderr, as `docker logs` does. `--follow` keeps printing new
//! lines until Ctrl-C.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::rfc3339;

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The service whose releases' output to show.
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// Only this node's lines. Default: every node of the environment that
    /// runs the service.
    #[arg(long)]
    pub node: Option<String>,
    /// Only lines this recent, e.g. "10m", "2h": by when the node's agent
    /// first saw them, which is within about 2 s of when they were written
    /// (while the agent was down: when it came back).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Keep printing new lines as they are written, until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// Only this release's lines (`cutover releases` lists them). Default:
    /// every release of the service whose logs the nodes keep.
    #[arg(long)]
    pub release: Option<String>,
}

pub async fn logs(
    client: &mut OperatorServiceClient<Channel>,
    args: LogsArgs,
    json: bool,
) -> Result<()> {
    let since_ms = args.since.map_or(0, |since| {
        (cutover_common::now_ms() - since.as_millis() as i64).max(1)
    });
    let mut events = client
        .stream_logs(pb::StreamLogsRequest {
            env: args.env,
            service: args.service,
            node: args.node.unwrap_or_default(),
            release_id: args.release.unwrap_or_default(),
            since_ms,
            follow: args.follow,
        })
        .await
        .map_err(explain)?
        .into_inner();
    // Raced against every wait: Ctrl-C ends a follow (or a long read) at
    // once, and cleanly.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let event = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            event = events.message() => event.map_err(explain)?,
        };
        let Some(event) = event else {
            return Ok(());
        };
        let printed = match event.kind {
            Some(pb::logs_event::Kind::Line(line)) => print_line(&line, json),
            Some(pb::logs_event::Kind::Notice(notice)) => {
                writeln!(std::io::stderr(), "note: {notice}")
            }
            None => Ok(()),
        };
        // The reader went away (`cutover logs ... | head`): done.
        if printed.is_err() {
            return Ok(());
        }
    }
}

fn print_line(line: &pb::LogLine, json: bool) -> std::io::Result<()> {
    let stderr = line.stream == pb::LogStream::Stderr as i32;
    if json {
        let object = json!({
            "node": line.node,
            "release": line.release_id,
            "stream": if stderr { "stderr" } else { "stdout" },
            "time": rfc3339(line.time_ms),
            "time_ms": line.time_ms,
            "text": line.text,
        });
        return writeln!(std::io::stdout(), "{object}");
    }
    let text = format!("{} {} | {}", line.node, line.release_id, line.text);
    if stderr {
        writeln!(std::io::stderr(), "{text}")
    } else {
        writeln!(std::io::stdout(), "{text}")
    }
}
