//! `cutover`: the coordinator daemon (`cutover server`) and the operator CLI.
#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cutover_common::telemetry::{self, LogFormat};
use cutover_coordinator::config::CoordinatorConfig;
use cutover_proto::v1::{ListNodesRequest, PingNodeRequest};

use cli::client::{ensure_output, explain, ConnectArgs};

/// cutover: zero-downtime deployments on plain VMs.
#[derive(Parser)]
#[command(name = "cutover", version)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Output format of commands that print data: table or json.
    #[arg(
        long,
        short,
        global = true,
        default_value = "table",
        env = "CUTOVER_OUTPUT"
    )]
    output: String,
    /// Log format of `cutover server`; overrides its config file.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum ServerAction {
    /// Ask every coordinator listed in --coordinator whether it leads (or
    /// runs alone) or whom it follows, since when and with which fencing
    /// token, and every etcd member for its health. Exits 1 when none of
    /// them leads.
    Status,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the coordinator daemon; `server status`: who leads.
    Server {
        #[arg(
            long,
            env = "CUTOVER_SERVER_CONFIG",
            default_value = "/etc/cutover/coordinator.toml"
        )]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<ServerAction>,
    },
    /// Manage the certificate authority.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// List nodes, or act on one.
    Nodes {
        #[command(subcommand)]
        action: Option<NodesAction>,
    },
    /// The fleet's agents: `upgrade` rolls a new agent binary across it.
    Agents {
        #[command(subcommand)]
        action: cli::agents::AgentsCommand,
    },
    /// The coordinator's event log: the newest events, or `--follow` them.
    Events(cli::logs::EventsArgs),
    /// The coordinator's artifact store.
    Artifact {
        #[command(subcommand)]
        action: ArtifactAction,
    },
    /// Roll a release of the app's services out to their nodes.
    Deploy(cli::rollouts::DeployArgs),
    /// List, follow, pause, resume or abort rollouts.
    Rollout {
        #[command(subcommand)]
        action: cli::rollouts::RolloutCommand,
    },
    /// Roll a service back to its previous stable release (or --to one).
    Rollback(cli::rollouts::RollbackArgs),
    /// Deploy to one environment the release stable in another: the same
    /// artifact (or image digest) and version, with the target's
    /// environment, secrets and strategy.
    Promote(cli::environments::PromoteArgs),
    /// A service's environment: `set` rolls out the current release with
    /// variables changed (a config-only release), `show` prints it.
    Config {
        #[command(subcommand)]
        action: cli::config::ConfigCommand,
    },
    /// What differs between two environments' current releases of a
    /// service and their nodes (build, command, environment, secrets by
    /// version, checks, strategy, node count, OS, CPUs, memory).
    Diff(cli::environments::DiffArgs),
    /// Approve a rollout awaiting approval (an operator with deployer
    /// rights on its environment, not the one who asked); it starts once
    /// it has every approval its environment requires.
    Approve(cli::environments::DecisionArgs),
    /// Reject a rollout awaiting approval: it ends aborted, nothing
    /// changed.
    Reject(cli::environments::DecisionArgs),
    /// An environment's policy: `status` shows its freeze windows, whether
    /// one runs now, the next, its promotion rule and approvals.
    Freeze {
        #[command(subcommand)]
        action: cli::environments::FreezeCommand,
    },
    /// Maintenance at a service's node proxies: `on` answers 503 with a
    /// message (but to allowed networks and the bypass cookie), `off`
    /// lifts it.
    Maintenance {
        #[command(subcommand)]
        action: cli::levers::MaintenanceCommand,
    },
    /// Limit the requests a service's node proxies let through (429 with
    /// Retry-After beyond it); --off lifts it.
    Throttle(cli::levers::ThrottleArgs),
    /// Hold a service's requests at its node proxies (not fail them), each
    /// up to --max-pause, then 503: for a short database failover.
    PauseTraffic(cli::levers::PauseArgs),
    /// Send the requests held by pause-traffic on.
    ResumeTraffic(cli::levers::Scope),
    /// The incident levers set (maintenance, throttle, pause) and the
    /// nodes that apply each.
    Levers(cli::levers::LeversArgs),
    /// Lock a service of an environment while you work on it by hand:
    /// deploys, rollbacks, promotions, config changes and scaling of it
    /// are refused, naming you and --reason, until `cutover unlock`.
    Lock(cli::locks::LockArgs),
    /// Lift a service's lock (anyone who may deploy there).
    Unlock(cli::locks::UnlockArgs),
    /// Stop a service of an environment on every node (freeing its port),
    /// start it again, or remove it.
    Service {
        #[command(subcommand)]
        action: cli::services::ServiceCommand,
    },
    /// The locked services, who locked them, since when and why.
    Locks(cli::locks::LocksArgs),
    /// Run N processes of a service per node: its current release rolled
    /// out again with that count (health-checked before they get requests,
    /// rolled back if they fail), kept by later deploys.
    Scale(cli::config::ScaleArgs),
    /// Queue depth (waiting, delayed, reserved, the oldest job's wait) and
    /// worker health of the services that probe their queues.
    Queues(cli::queues::QueuesArgs),
    /// A service's kept releases in an environment.
    Releases(cli::rollouts::ReleasesArgs),
    /// Run a command once on one node with a release of a service (its
    /// files, environment and secrets), e.g. `cutover run web --env prod --
    /// php artisan migrate:status`; exits with the command's exit code.
    Run(cli::tasks::RunArgs),
    /// What a service's releases wrote to stdout and stderr, from every node
    /// that runs it, each line as `NODE RELEASE | line`; `--follow` keeps
    /// printing new lines (deployer or admin: logs may hold customer data).
    Logs(cli::release_logs::LogsArgs),
    /// Scheduled jobs: apply them from the spec, list them and their runs,
    /// run one now, pause or resume one.
    Jobs {
        #[command(subcommand)]
        action: cli::jobs::JobsCommand,
    },
    /// Backups and restore drills against their RPO and RTO.
    Recovery {
        #[command(subcommand)]
        action: cli::recovery::RecoveryCommand,
    },
    /// Create, list or revoke operators and their roles.
    Operator {
        #[command(subcommand)]
        action: cli::access::OperatorCommand,
    },
    /// The audit log: every mutating call, who made it and how it ended.
    Audit(cli::logs::AuditArgs),
    /// Join tokens that let new nodes enroll (`cutover-agent join`).
    Token {
        #[command(subcommand)]
        action: cli::access::TokenCommand,
    },
    /// Set, list or remove an environment's secrets; rotate the master key.
    Secret {
        #[command(subcommand)]
        action: cli::access::SecretCommand,
    },
    /// Back up the coordinator's store while it runs, or restore a backup
    /// into an empty data dir.
    Admin {
        #[command(subcommand)]
        action: cli::backup::AdminCommand,
    },
    /// The dashboard: a local web server, on loopback unless told, that
    /// shows the fleet, rollouts live, releases and recovery, and acts as
    /// you (your certificate and role). Open the address it prints.
    Ui(cli::ui::UiArgs),
    /// A local cluster on loopback for development and demos.
    Dev {
        #[command(subcommand)]
        action: DevAction,
    },
    /// Print the shell completion script:
    /// `cutover completion bash > /etc/bash_completion.d/cutover`,
    /// `cutover completion zsh > "${fpath[1]}/_cutover"`,
    /// `cutover completion fish > ~/.config/fish/completions/cutover.fish`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (cutover.1 and one per command, e.g.
    /// cutover-rollout-status.1) into --out: `cutover man --out
    /// /usr/local/share/man/man1`.
    Man {
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaAction {
    /// Create a CA and the coordinator's certificate in DIR.
    Init {
        #[arg(long, env = "CUTOVER_PKI_DIR", default_value = "/etc/cutover/pki")]
        dir: PathBuf,
        /// Extra DNS names or IPs agents and operators use to reach the
        /// coordinator (localhost, 127.0.0.1 and ::1 are always included).
        #[arg(long = "san", value_delimiter = ',')]
        sans: Vec<String>,
    },
    /// Issue a client certificate for an agent or an operator.
    Issue {
        #[arg(value_enum)]
        role: cli::ca_local::IssueRole,
        /// Node name (agents) or person's name (operators).
        #[arg(long)]
        name: String,
        #[arg(long, env = "CUTOVER_PKI_DIR", default_value = "/etc/cutover/pki")]
        dir: PathBuf,
        /// Where the files go. An agent's agent-<name>.crt/.key: default the
        /// PKI dir. An operator's whole CLI credentials (key, certificate,
        /// ca.crt and a cli.toml dialing --coordinator, default
        /// https://localhost:7443): default ~/.config/cutover, where the
        /// CLI looks.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Lifetime. Default: 7 days for an agent (it renews its certificate
        /// at two thirds of its life, over its connection), 365 for an
        /// operator.
        #[arg(long)]
        days: Option<i64>,
    },
    /// Move the installation to a new CA without downtime (admin): the new
    /// CA signs from now on while the old one stays trusted, every node
    /// renews, and the old CA is retired once all have. Renews your own
    /// credentials too.
    Rotate,
    /// The CAs, the rotation in progress and which nodes still hold what.
    Status,
}

#[derive(Subcommand)]
enum NodesAction {
    /// List nodes (the default).
    List,
    /// Send a ping command down a node's agent stream and time the answer.
    Ping {
        /// Node name or id.
        node: String,
        #[arg(long, default_value = "10s")]
        timeout: humantime::Duration,
    },
    /// End a node's session and refuse its certificate from now on (admin).
    /// The node keeps serving what it runs; a new certificate lets it back.
    Revoke {
        /// Node name.
        node: String,
    },
}

#[derive(Subcommand)]
enum ArtifactAction {
    /// Upload a file (a release's .tar.gz) and print its sha256 digest;
    /// releases then use it with the artifact url "coordinator:".
    Push {
        file: PathBuf,
        /// Refuse the upload unless the file has this digest.
        #[arg(long)]
        digest: Option<String>,
    },
}

#[derive(Subcommand)]
enum DevAction {
    /// Start a coordinator and N agents in the background.
    Up(cli::dev::UpArgs),
    /// Stop everything `dev up` started in DIR.
    Down {
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cutover_common::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", cutover_common::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    ensure_output(&cli.output)?;
    let json = cli.output == "json";
    match cli.command {
        Commands::Server {
            action: Some(ServerAction::Status),
            ..
        } => {
            // Exit 1 when no listed coordinator acts: a check for scripts.
            if !cli::server::status(&cli.connect, json).await? {
                return Ok(ExitCode::from(1));
            }
        }
        Commands::Server {
            config,
            action: None,
        } => {
            let config = match CoordinatorConfig::load(&config) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("error: {error}");
                    return Ok(ExitCode::from(2));
                }
            };
            telemetry::init(cli.log_format.unwrap_or(config.log_format), "info");
            // Whatever the daemon creates from now on (store files, pushed
            // artifacts) is its own, whatever umask it was started with.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            let shutdown = cutover_common::shutdown::on_signals();
            cutover_coordinator::leading::serve(config, shutdown).await?;
        }
        Commands::Ca { action } => ca(action, &cli.connect, json).await?,
        Commands::Completion { shell } => {
            cli::shell::completion(shell, <Cli as clap::CommandFactory>::command())
        }
        Commands::Man { out } => {
            let written = cli::shell::man_pages(<Cli as clap::CommandFactory>::command(), &out)?;
            println!("wrote {written} man pages into {}", out.display());
        }
        Commands::Nodes { action } => {
            let mut client = cli.connect.operator_client().await?;
            match action.unwrap_or(NodesAction::List) {
                NodesAction::List => {
                    let nodes = client
                        .list_nodes(ListNodesRequest {})
                        .await
                        .map_err(explain)?
                        .into_inner()
                        .nodes;
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&cli::nodes::to_json(&nodes))?
                        );
                    } else {
                        print!("{}", cli::nodes::to_table(&nodes));
                    }
                }
                NodesAction::Revoke { node } => {
                    let revoked = client
                        .revoke_node(cutover_proto::v1::RevokeNodeRequest { node: node.clone() })
                        .await
                        .map_err(explain)?
                        .into_inner();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"node": revoked.node, "serial": revoked.serial})
                        );
                    } else if revoked.serial.is_empty() {
                        println!("node {node} was never seen: every certificate of it is refused from now on");
                    } else {
                        println!(
                            "node {node}: certificate {} refused from now on, its session ended; issue it a new one to let it back (`cutover ca issue agent --name {node}`)",
                            revoked.serial
                        );
                    }
                }
                NodesAction::Ping { node, timeout } => {
                    let pong = client
                        .ping_node(PingNodeRequest {
                            node: node.clone(),
                            timeout_ms: timeout.as_millis() as u64,
                        })
                        .await
                        .map_err(explain)?
                        .into_inner();
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "node": node,
                                "command_id": pong.command_id,
                                "round_trip_us": pong.round_trip_us,
                                "agent_time": cli::nodes::rfc3339(pong.agent_time_ms),
                            })
                        );
                    } else {
                        println!(
                            "{node}: pong in {:.2} ms",
                            pong.round_trip_us as f64 / 1000.0
                        );
                    }
                }
            }
        }
        Commands::Events(args) => {
            let mut client = cli.connect.operator_client().await?;
            cli::logs::events(&mut client, args, json).await?;
        }
        Commands::Artifact {
            action: ArtifactAction::Push { file, digest },
        } => {
            let mut client = cli.connect.operator_client().await?;
            let pushed = cli::artifacts::push(&mut client, &file, digest).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "digest": pushed.digest,
                        "size": pushed.size,
                        "already_present": pushed.already_present,
                        "url": "coordinator:",
                    })
                );
            } else if pushed.already_present {
                println!(
                    "{} (already in the store, {} bytes)",
                    pushed.digest, pushed.size
                );
            } else {
                println!("{} ({} bytes pushed)", pushed.digest, pushed.size);
            }
        }
        Commands::Agents { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::agents::agents(&mut client, action, json).await;
        }
        Commands::Deploy(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::rollouts::deploy(&mut client, args, json).await;
        }
        Commands::Rollout { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::rollouts::rollout(&mut client, action, json).await;
        }
        Commands::Rollback(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::rollouts::rollback(&mut client, args, json).await;
        }
        Commands::Promote(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::environments::promote(&mut client, args, json).await;
        }
        Commands::Config { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::config::config(&mut client, action, json).await;
        }
        Commands::Maintenance { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::levers::maintenance(&mut client, action, json).await;
        }
        Commands::Throttle(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::levers::throttle(&mut client, args, json).await;
        }
        Commands::PauseTraffic(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::levers::pause(&mut client, args, json).await;
        }
        Commands::ResumeTraffic(scope) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::levers::resume(&mut client, scope, json).await;
        }
        Commands::Lock(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::locks::lock(&mut client, args, json).await;
        }
        Commands::Unlock(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::locks::unlock(&mut client, args, json).await;
        }
        Commands::Service { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::services::service(&mut client, action, json).await;
        }
        Commands::Locks(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::locks::list(&mut client, args, json).await;
        }
        Commands::Scale(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::config::scale(&mut client, args, json).await;
        }
        Commands::Queues(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::queues::queues(&mut client, args, json).await;
        }
        Commands::Levers(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::levers::list(&mut client, args, json).await;
        }
        Commands::Diff(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::environments::diff(&mut client, args, json).await;
        }
        Commands::Approve(args) => {
            let mut client = cli.connect.operator_client().await?;
            let action = cutover_proto::v1::RolloutAction::Approve;
            return cli::environments::decide(&mut client, args, action, json).await;
        }
        Commands::Reject(args) => {
            let mut client = cli.connect.operator_client().await?;
            let action = cutover_proto::v1::RolloutAction::Reject;
            return cli::environments::decide(&mut client, args, action, json).await;
        }
        Commands::Freeze { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::environments::freeze(&mut client, action, json).await;
        }
        Commands::Releases(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::rollouts::releases(&mut client, args, json).await;
        }
        Commands::Jobs { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::jobs::jobs(&mut client, action, json).await;
        }
        Commands::Recovery { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::recovery::recovery(&mut client, action, json).await;
        }
        Commands::Run(args) => {
            let mut client = cli.connect.operator_client().await?;
            return cli::tasks::run(&mut client, args).await;
        }
        Commands::Logs(args) => {
            let mut client = cli.connect.operator_client().await?;
            cli::release_logs::logs(&mut client, args, json).await?;
        }
        Commands::Operator { action } => {
            cli::access::operator(&cli.connect, action, json).await?;
        }
        Commands::Secret { action } => {
            let mut client = cli.connect.operator_client().await?;
            return cli::access::secret(&mut client, action, json).await;
        }
        Commands::Token { action } => {
            cli::access::token(&cli.connect, action, json).await?;
        }
        Commands::Audit(args) => {
            let mut client = cli.connect.operator_client().await?;
            cli::logs::audit(&mut client, args, json).await?;
        }
        Commands::Admin { action } => cli::backup::admin(&cli.connect, action, json).await?,
        Commands::Ui(args) => cli::ui::run(&cli.connect, args).await?,
        Commands::Dev { action } => match action {
            DevAction::Up(args) => cli::dev::up(args).await?,
            DevAction::Down { dir } => cli::dev::down(&dir)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

async fn ca(action: CaAction, connect: &ConnectArgs, json: bool) -> Result<()> {
    match action {
        CaAction::Rotate => cli::ca::rotate(connect, json).await?,
        CaAction::Status => cli::ca::status(connect, json).await?,
        CaAction::Init { dir, sans } => cli::ca_local::init(&dir, &sans)?,
        CaAction::Issue {
            role,
            name,
            dir,
            out,
            days,
        } => cli::ca_local::issue(role, &name, &dir, out, days, connect)?,
    }
    Ok(())
}
