//! `cutover-agent --config agent.toml`, or `cutover-agent join ...` once,
//! to get a certificate with a join token.
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Get this node's certificate with a join token (`cutover token
    /// create`) and write a config to run with: the key is made here and
    /// never leaves the node.
    Join {
        /// https://host:port of the coordinator.
        #[arg(long)]
        coordinator: String,
        #[arg(long, env = "CUTOVER_JOIN_TOKEN")]
        token: String,
        /// sha256:... of the installation's CA, as `cutover token create`
        /// prints it: pins the coordinator on this first contact.
        #[arg(long)]
        ca_fingerprint: String,
        /// The node's name. Default: the host name.
        #[arg(long)]
        name: Option<String>,
        /// Where the key, certificates, agent.toml and state go.
        #[arg(long, default_value = "/etc/cutover")]
        out: PathBuf,
    },
}

fn join(command: Command) -> ExitCode {
    let Command::Join {
        coordinator,
        token,
        ca_fingerprint,
        name,
        out,
    } = command;
    let name = name.or_else(sysinfo::System::host_name).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(cutover_agent::enroll::join(
        &coordinator,
        &token,
        &ca_fingerprint,
        &name,
        &out,
    )) {
        Ok(joined) => {
            let labels: Vec<String> = joined
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!(
                "node {name} joined with labels {}; run it with: cutover-agent --config {}",
                labels.join(","),
                joined.config.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(command) = args.command {
        cutover_common::tls::install_crypto_provider();
        return join(command);
    }
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
