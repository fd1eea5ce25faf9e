//! `cutover run`: a command once on one node with a release of a service
//! (its files, environment and secrets), its output as it comes, and its
//! exit code as `cutover`'s own.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{run_task_event, RunTaskRequest};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

use super::client::explain;

/// `cutover`'s exit code when the task ran past its timeout (as timeout(1)).
const TIMED_OUT: u8 = 124;
/// When whether it finished is not known (its node was lost mid-run).
const UNKNOWN: u8 = 125;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The service whose release the command runs with.
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// The node to run on. Default: a ready node of the environment, one
    /// that serves the release if there is one.
    #[arg(long)]
    pub node: Option<String>,
    /// A kept release (`cutover releases`). Default: the environment's
    /// current one.
    #[arg(long)]
    pub release: Option<String>,
    /// Killed, with all it started, after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn run(client: &mut OperatorServiceClient<Channel>, args: RunArgs) -> Result<ExitCode> {
    let mut events = client
        .run_task(RunTaskRequest {
            env: args.env,
            service: args.service,
            node: args.node.unwrap_or_default(),
            release_id: args.release.unwrap_or_default(),
            command: args.command,
            timeout_ms: args.timeout.as_millis() as u64,
        })
        .await
        .map_err(explain)?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    while let Some(event) = events.message().await.map_err(explain)? {
        match event.kind {
            Some(run_task_event::Kind::Started(started)) => eprintln!(
                "running on {} with {} (task {})",
                started.node, started.release_id, started.task_id
            ),
            Some(run_task_event::Kind::Output(text)) => {
                stdout.write_all(text.as_bytes()).await?;
                stdout.flush().await?;
            }
            Some(run_task_event::Kind::Ended(ended)) => {
                let took = humantime::format_duration(Duration::from_millis(ended.duration_ms));
                if ended.unknown {
                    eprintln!("error: {}", ended.detail);
                    return Ok(ExitCode::from(UNKNOWN));
                }
                if ended.timed_out {
                    eprintln!("error: the task was {}", ended.detail);
                    return Ok(ExitCode::from(TIMED_OUT));
                }
                if ended.exit_code != 0 {
                    eprintln!("the task ended with {} after {took}", ended.detail);
                }
                return Ok(ExitCode::from(u8::try_from(ended.exit_code).unwrap_or(1)));
            }
            None => {}
        }
    }
    bail!("the coordinator ended the task's stream without saying how it ended; `cutover events` may tell")
}
