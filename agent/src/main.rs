//! `cutover-agent --config agent.toml`, or `cutover-agent join ...` once,
//! to get a certificate with a join token.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cutover_agent::config::AgentConfig;
use cutover_agent::{binaries, Agent, Startup};
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
        /// The name the coordinator's certificate holds, when it is not
        /// the host of --coordinator (an IP its certificate does not list,
        /// a name behind a load balancer); kept in agent.toml.
        #[arg(long)]
        server_name: Option<String>,
        /// The IP address this node's services bind and the coordinator
        /// reaches it on; kept in agent.toml. Default: the address the
        /// agent's connection to the coordinator leaves from.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        #[arg(long, env = "CUTOVER_JOIN_TOKEN")]
        token: String,
        /// sha256:... of the installation's CA, as `cutover token create`
        /// prints it: pins the coordinator on this first contact.
        #[arg(long)]
        ca_fingerprint: String,
        /// The node's name. Default: the host name.
        #[arg(long)]
        name: Option<String>,
        /// Where the key, certificates and agent.toml go.
        #[arg(long, default_value = "/etc/cutover")]
        out: PathBuf,
        /// The agent's state dir, written to agent.toml: the unit's
        /// (deploy/systemd/cutover-agent.service), so an agent run by hand
        /// first and by systemd later keeps its node id and releases.
        #[arg(long, default_value = "/var/lib/cutover-agent")]
        state_dir: PathBuf,
    },
    /// Hand the running agent's node over to a new agent process, of a new
    /// binary if given (installed where the running one was started from),
    /// without a refused connection; waits for the outcome. The same as
    /// `systemctl reload cutover-agent` after a package upgrade.
    Upgrade {
        /// The new cutover-agent binary.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The running agent's state dir. Default: the config's.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// How long to wait for the handoff's outcome.
        #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

fn upgrade(
    config: &std::path::Path,
    binary: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    wait: std::time::Duration,
) -> ExitCode {
    use cutover_agent::handoff::Outcome;
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => match AgentConfig::load(config) {
            Ok(config) => config.state_dir,
            Err(error) => {
                eprintln!("error: {error}; or name the agent's state dir with --state-dir");
                return ExitCode::from(2);
            }
        },
    };
    let upgraded = match cutover_agent::upgrade::upgrade(&state_dir, binary.as_deref(), wait) {
        Ok(upgraded) => upgraded,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(installed) = &upgraded.installed {
        println!(
            "installed cutover-agent {} as {}",
            installed.version,
            installed.target.display()
        );
    }
    let restored = if upgraded.restored {
        "; the previous binary is back in place"
    } else {
        ""
    };
    match upgraded.outcome {
        Outcome::TookOver { pid, version } => {
            println!(
                "agent {pid} (cutover-agent {version}) took over the node from agent {}",
                upgraded.old_pid
            );
            ExitCode::SUCCESS
        }
        Outcome::FellBack { pid, version, why } => {
            eprintln!(
                "error: the new agent failed after the old one let go of the node ({why}); agent {pid} of the old binary (cutover-agent {version}) took over instead{restored}"
            );
            ExitCode::from(1)
        }
        Outcome::Refused(why) => {
            eprintln!(
                "error: the handoff was refused: {why}; agent {} serves on{restored}",
                upgraded.old_pid
            );
            ExitCode::from(1)
        }
        Outcome::Failed(why) => {
            eprintln!(
                "error: no agent could take over: {why}; the service manager restarts the agent{restored}"
            );
            ExitCode::from(1)
        }
    }
}

fn join(
    target: &cutover_agent::enroll::JoinTarget<'_>,
    token: String,
    ca_fingerprint: String,
    name: Option<String>,
    out: PathBuf,
    state_dir: PathBuf,
) -> ExitCode {
    let name = name.or_else(sysinfo::System::host_name).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(cutover_agent::enroll::join(
        target,
        &token,
        &ca_fingerprint,
        &name,
        &out,
        &state_dir,
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
    match args.command {
        Some(Command::Join {
            coordinator,
            server_name,
            address,
            token,
            ca_fingerprint,
            name,
            out,
            state_dir,
        }) => {
            cutover_common::tls::install_crypto_provider();
            let target = cutover_agent::enroll::JoinTarget {
                coordinator: &coordinator,
                server_name: server_name.as_deref(),
                address,
            };
            return join(&target, token, ca_fingerprint, name, out, state_dir);
        }
        Some(Command::Upgrade {
            binary,
            state_dir,
            wait,
        }) => return upgrade(&args.config, binary, state_dir, wait),
        None => {}
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
    // Before the runtime's threads: what runs is decided (the committed
    // binary of a fleet upgrade may take this process's place), then
    // taken out of the environment.
    let own_binary = std::env::current_exe().unwrap_or_default();
    let start = match binaries::at_start(&config.state_dir, &own_binary, cutover_common::VERSION) {
        binaries::Start::Exec(installed) => {
            let error = binaries::exec(&installed);
            tracing::error!(binary = %installed.binary.display(), %error, "cannot run the committed agent binary; running this one");
            binaries::Start::Plain {
                build: String::new(),
            }
        }
        start => start,
    };
    let startup = Startup::from_env(start);
    cutover_agent::proxy::workers::start(config.proxy_threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let shutdown = cutover_common::shutdown::on_signals();
        let mut startup = startup;
        startup.handle_reloads();
        let agent = match Agent::new(config, shutdown, startup).await {
            Ok(agent) => agent,
            Err(error) => {
                eprintln!("error: {}", cutover_common::error_chain(&error));
                return ExitCode::from(2);
            }
        };
        match agent.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {}", cutover_common::error_chain(&error));
                ExitCode::from(1)
            }
        }
    })
}
