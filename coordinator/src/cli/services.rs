//! `cutover service stop|start|remove`: a service of an environment
//! stopped on every node (its port freed), started again with its current
//! release, or removed (see `rollout::stopping`).

use std::process::ExitCode;

use anyhow::Result;
use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;

use super::client::explain;
use super::rollouts::started;

#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// Drain and stop the service on every node of the environment, and
    /// free its port. It keeps its current release: `service start` starts
    /// it again, a deploy starts a new one. A node that comes back running
    /// it is stopped too.
    Stop(StopArgs),
    /// Start a stopped service again with its current release, rolled out
    /// as a deploy of it (the environment's strategy, health checks,
    /// rollback on failure).
    Start(StartArgs),
    /// Stop the service on every node of the environment, and have each
    /// forget it (its releases and logs are pruned); it has no current
    /// release any more. Its history stays; a deploy brings it back.
    Remove(RemoveArgs),
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// Why: in the rollout's timeline and the audit log.
    #[arg(long)]
    pub reason: Option<String>,
    /// Stop it past a `cutover lock` of the service (admin, with --reason;
    /// audited and notified).
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    /// Follow the stop until it ends.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// Say it: removing is not undone by `service start`.
    #[arg(long)]
    pub yes: bool,
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub allow_unreachable: bool,
}

pub async fn service(
    client: &mut OperatorServiceClient<Channel>,
    command: ServiceCommand,
    json: bool,
) -> Result<ExitCode> {
    let (response, wait) = match command {
        ServiceCommand::Stop(args) => (
            stop(
                client,
                &args.service,
                &args.env,
                false,
                args.reason,
                args.break_glass,
            )
            .await?,
            args.wait,
        ),
        ServiceCommand::Remove(args) => {
            if !args.yes {
                anyhow::bail!(
                    "removing {} from {} stops it on every node and forgets it there; its current release is gone (a deploy brings it back, `service start` does not); run it again with --yes",
                    args.service,
                    args.env
                );
            }
            (
                stop(
                    client,
                    &args.service,
                    &args.env,
                    true,
                    args.reason,
                    args.break_glass,
                )
                .await?,
                args.wait,
            )
        }
        ServiceCommand::Start(args) => {
            let response = client
                .start_service(pb::StartServiceRequest {
                    env: args.env,
                    service: args.service,
                    reason: args.reason.unwrap_or_default(),
                    break_glass: args.break_glass,
                    allow_unreachable: args.allow_unreachable,
                })
                .await
                .map_err(explain)?
                .into_inner();
            (response, args.wait)
        }
    };
    started(client, response, wait, json).await
}

async fn stop(
    client: &mut OperatorServiceClient<Channel>,
    service: &str,
    env: &str,
    remove: bool,
    reason: Option<String>,
    break_glass: bool,
) -> Result<pb::DeployResponse> {
    Ok(client
        .stop_service(pb::StopServiceRequest {
            env: env.to_string(),
            service: service.to_string(),
            remove,
            reason: reason.unwrap_or_default(),
            break_glass,
        })
        .await
        .map_err(explain)?
        .into_inner())
}
