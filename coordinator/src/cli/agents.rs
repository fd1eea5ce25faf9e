//! `cutover agents upgrade`: pushes an agent artifact and rolls it across
//! the fleet (see `agent_upgrade`), following it with `--wait`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{AgentUpgradeEvent, UpgradeAgentsRequest};
use tonic::transport::Channel;

use super::client::explain;

#[derive(Debug, clap::Subcommand)]
pub enum AgentsCommand {
    /// Roll a new agent binary across every node (admin): each node
    /// fetches and checks it, then in batches each agent hands its node to
    /// the new binary without a failed request; one whose new agent is not
    /// back healthy within the deadline returns to its previous agent and
    /// the upgrade stops.
    Upgrade(UpgradeArgs),
}

#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The agent artifact: a .tar.gz with the `cutover-agent` binary at its
    /// top (or in bin/).
    #[arg(long)]
    pub artifact: PathBuf,
    /// Refuse the artifact unless it has this sha256 digest.
    #[arg(long)]
    pub digest: Option<String>,
    /// Nodes upgraded at once: a count or a percentage of the fleet.
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// How long each node's new agent has to come back healthy.
    #[arg(long, default_value = "2m")]
    pub deadline: humantime::Duration,
    /// Follow the upgrade to its end; exit 1 if it failed.
    #[arg(long)]
    pub wait: bool,
}

pub async fn agents(
    client: &mut OperatorServiceClient<Channel>,
    command: AgentsCommand,
    json: bool,
) -> Result<ExitCode> {
    match command {
        AgentsCommand::Upgrade(args) => upgrade(client, args, json).await,
    }
}

async fn upgrade(
    client: &mut OperatorServiceClient<Channel>,
    args: UpgradeArgs,
    json: bool,
) -> Result<ExitCode> {
    let pushed = super::artifacts::push(client, &args.artifact, args.digest).await?;
    let mut events = client
        .upgrade_agents(UpgradeAgentsRequest {
            digest: pushed.digest.clone(),
            batch: args.batch,
            deadline_ms: args.deadline.as_millis() as u64,
        })
        .await
        .map_err(explain)?
        .into_inner();
    while let Some(event) = events.message().await.map_err(explain)? {
        print_event(&event, json);
        match event.step.as_str() {
            "started" if !args.wait => {
                if !json {
                    println!(
                        "follow it with `cutover events` and `cutover nodes`, or run this with --wait"
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            "done" if event.node.is_empty() => return Ok(ExitCode::SUCCESS),
            "failed" if event.node.is_empty() => return Ok(ExitCode::FAILURE),
            _ => {}
        }
    }
    anyhow::bail!(
        "the coordinator ended the upgrade's stream before its end; see `cutover events` for how it goes on"
    )
}

fn print_event(event: &AgentUpgradeEvent, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "upgrade": event.upgrade_id,
                "node": event.node,
                "step": event.step,
                "message": event.message,
            })
        );
    } else if event.node.is_empty() {
        println!("{} {}: {}", event.upgrade_id, event.step, event.message);
    } else {
        println!("  {} {}: {}", event.node, event.step, event.message);
    }
}
