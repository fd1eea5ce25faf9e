//! `cutover-agent --config agent.toml`
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cutover_agent::config::AgentConfig;
use cutover_agent::Agent;
use cutover_common::telemetry::{self, LogFormat};

/// The cutover agent: runs releases on this node for the coordinator.
#[derive(Parser)]
#[command(name = "cutover-agent", version)]
struct Args {
    /// Agent config file (see deploy/config/agent.toml).
    #[arg(
        long,
        env = "CUTOVER_AGENT_CONFIG",
        default_value = "/etc/cutover/agent.toml"
    )]
    config: PathBuf,
    /// Log format; overrides the config file's `log_format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match AgentConfig::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(args.log_format.unwrap_or(config.log_format), "info");
    cutover_common::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let shutdown = cutover_common::shutdown::on_signals();
        let agent = match Agent::new(config, shutdown).await {
            Ok(agent) => agent,
            Err(error) => {
                eprintln!("error: {}", cutover_common::error_chain(&error));
                return ExitCode::from(2);
            }
        };
        agent.run().await;
        ExitCode::SUCCESS
    })
}
