//! `cutover rollout logs ID`: what a rollout's run-once commands (its
//! migration's checks, migration and schema command, its hooks) printed,
//! as its timeline keeps it (the first 200 lines of each step), each line
//! prefixed with the step and the node. `--follow` prints lines as they
//! come until the rollout ends or is held.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::rfc3339;
use super::rollouts::watch_ends;

/// How often `--follow` asks for the rollout again.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

pub async fn rollout_logs(
    client: &mut OperatorServiceClient<Channel>,
    id: String,
    follow: bool,
    json: bool,
) -> Result<ExitCode> {
    let mut printed = 0;
    loop {
        let rollout = client
            .get_rollout(pb::GetRolloutRequest { id: id.clone() })
            .await
            .map_err(explain)?
            .into_inner();
        for entry in rollout.timeline.iter().skip(printed) {
            let Some(step) = entry.kind.strip_suffix("_output") else {
                continue;
            };
            if json {
                let line = json!({
                    "at": rfc3339(entry.at_ms),
                    "step": step,
                    "node": entry.node,
                    "line": entry.message,
                });
                println!("{line}");
            } else {
                println!("{step} {} | {}", entry.node, entry.message);
            }
        }
        printed = rollout.timeline.len();
        if !follow || watch_ends(&rollout) {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}
