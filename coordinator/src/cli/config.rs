//! `cutover config set` (a config-only release of the current artifact),
//! `cutover config show` (a service's effective environment) and `cutover
//! scale` (the current release with another number of processes per node).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Result};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Roll out the service's current release with its environment
    /// changed: KEY=VALUE sets (or changes) a variable, --unset removes
    /// one, --reset gives one back its spec's value. The change stays in
    /// force across deploys until reset; it rolls out like a deploy (the
    /// environment's strategy, freeze windows, approvals) and rolls back
    /// like one.
    Set {
        service: String,
        #[arg(long)]
        env: String,
        /// KEY=VALUE pairs.
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Remove a variable (repeatable).
        #[arg(long, value_name = "KEY")]
        unset: Vec<String>,
        /// Drop an override: the spec's value again (repeatable).
        #[arg(long, value_name = "KEY")]
        reset: Vec<String>,
        /// Follow the rollout to its end; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
        /// Roll out without the nodes that are unreachable now.
        #[arg(long)]
        allow_unreachable: bool,
        /// Past the environment's freeze window, approvals and a `cutover
        /// lock` of the service (admin, with
        /// --reason; audited and notified).
        #[arg(long, requires = "reason")]
        break_glass: bool,
        /// Why (kept in the audit log and the rollout's timeline).
        #[arg(long)]
        reason: Option<String>,
    },
    /// The service's effective environment in ENV: each variable of its
    /// current release and where it comes from (the spec, an override of
    /// `config set`), and its secrets by name and version, never their
    /// values.
    Show {
        service: String,
        #[arg(long)]
        env: String,
    },
}

/// `cutover scale SERVICE --env ENV --instances N`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    service: String,
    #[arg(long)]
    env: String,
    /// Processes per node, 1 to 32.
    #[arg(long)]
    instances: u32,
    /// Follow the rollout to its end; exit 0 only if it succeeded.
    #[arg(long)]
    wait: bool,
    /// Roll out without the nodes that are unreachable now.
    #[arg(long)]
    allow_unreachable: bool,
    /// Past the environment's freeze window, approvals and a `cutover
    /// lock` of the service (admin, with
    /// --reason; audited and notified).
    #[arg(long, requires = "reason")]
    break_glass: bool,
    /// Why (kept in the audit log and the rollout's timeline).
    #[arg(long)]
    reason: Option<String>,
}

pub async fn scale(
    client: &mut OperatorServiceClient<Channel>,
    args: ScaleArgs,
    json: bool,
) -> Result<ExitCode> {
    let response = client
        .scale_service(pb::ScaleServiceRequest {
            env: args.env,
            service: args.service,
            instances: args.instances,
            allow_unreachable: args.allow_unreachable,
            break_glass: args.break_glass,
            reason: args.reason.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    super::rollouts::started(client, response, args.wait, json).await
}

pub async fn config(
    client: &mut OperatorServiceClient<Channel>,
    command: ConfigCommand,
    json: bool,
) -> Result<ExitCode> {
    match command {
        ConfigCommand::Set {
            service,
            env,
            pairs,
            unset,
            reset,
            wait,
            allow_unreachable,
            break_glass,
            reason,
        } => {
            let mut set = std::collections::HashMap::new();
            for pair in pairs {
                let Some((key, value)) = pair.split_once('=') else {
                    bail!("{pair:?} is not KEY=VALUE; to remove a variable use --unset {pair}");
                };
                if set.insert(key.to_string(), value.to_string()).is_some() {
                    bail!("{key} is set twice; give each variable one value");
                }
            }
            let response = client
                .set_config(pb::SetConfigRequest {
                    env,
                    service,
                    set,
                    unset,
                    reset,
                    allow_unreachable,
                    break_glass,
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            super::rollouts::started(client, response, wait, json).await
        }
        ConfigCommand::Show { service, env } => {
            let config = client
                .get_config(pb::GetConfigRequest { env, service })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                let entries: Vec<_> = config.entries.iter().map(entry_json).collect();
                let value = json!({
                    "env": config.env,
                    "service": config.service,
                    "release": config.release_id,
                    "entries": entries,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!(
                    "{} in {}, release {}",
                    config.service, config.env, config.release_id
                );
                let mut rows = vec![["KEY", "VALUE", "SOURCE", "SPEC SAYS", "SET BY"]
                    .map(String::from)
                    .to_vec()];
                rows.extend(config.entries.iter().map(|e| {
                    let overridden = matches!(e.source.as_str(), "override" | "removed");
                    vec![
                        e.key.clone(),
                        match e.source.as_str() {
                            "secret" => format!("(secret, version {})", e.secret_version),
                            "removed" => "(removed)".into(),
                            _ => e.value.clone(),
                        },
                        e.source.clone(),
                        match (overridden, e.in_spec) {
                            (false, _) => "-".into(),
                            (true, true) => e.spec_value.clone(),
                            (true, false) => "(nothing)".into(),
                        },
                        match overridden {
                            true => format!("{} at {}", e.by, rfc3339(e.at_ms)),
                            false => "-".into(),
                        },
                    ]
                }));
                print!("{}", render_table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn entry_json(e: &pb::ConfigEntry) -> serde_json::Value {
    let overridden = matches!(e.source.as_str(), "override" | "removed");
    let mut value: BTreeMap<&str, serde_json::Value> =
        BTreeMap::from([("key", json!(e.key)), ("source", json!(e.source))]);
    match e.source.as_str() {
        "secret" => {
            value.insert("secret_version", json!(e.secret_version));
        }
        "removed" => {}
        _ => {
            value.insert("value", json!(e.value));
        }
    }
    if overridden {
        value.insert("spec_value", json!(e.in_spec.then_some(&e.spec_value)));
        value.insert("by", json!(e.by));
        value.insert("at", json!(rfc3339(e.at_ms)));
    }
    json!(value)
}
