//! Incident levers at the node proxies: `cutover maintenance on|off`,
//! `throttle`, `pause-traffic`, `resume-traffic` and `levers`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

/// Where a lever applies.
#[derive(Debug, clap::Args)]
pub struct Scope {
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// One node only (its name); default: every node of the service.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum MaintenanceCommand {
    /// The node proxies answer 503 with the message and Retry-After,
    /// without touching the app; allowed networks and holders of the
    /// bypass cookie still reach it.
    On {
        #[command(flatten)]
        scope: Scope,
        /// What clients read (a page for browsers, text for the rest).
        #[arg(long)]
        message: Option<String>,
        /// Seconds clients are told to wait (Retry-After); 0: not said.
        #[arg(long, default_value_t = 120)]
        retry_after: u32,
        /// Client networks that still reach the app, e.g. 203.0.113.0/24
        /// (repeatable).
        #[arg(long, value_name = "CIDR")]
        allow: Vec<String>,
        /// Make a bypass secret: opening /_cutover/bypass/SECRET on the
        /// service sets a cookie that passes maintenance (to check a fix).
        #[arg(long)]
        bypass_secret: bool,
    },
    /// Lift maintenance: on every node, or with --node that node's own.
    Off {
        #[command(flatten)]
        scope: Scope,
    },
}

#[derive(Debug, clap::Args)]
pub struct ThrottleArgs {
    #[command(flatten)]
    pub scope: Scope,
    /// Requests a second each node proxy lets through (per key).
    #[arg(long, required_unless_present = "off")]
    pub rps: Option<u32>,
    /// Requests let through at once beyond the rate (default: the rps).
    #[arg(long)]
    pub burst: Option<u32>,
    /// What one bucket is for: client-ip, header:NAME or all (default).
    #[arg(long)]
    pub per: Option<String>,
    /// Only requests whose path starts with it, e.g. /checkout.
    #[arg(long)]
    pub path_prefix: Option<String>,
    /// Lift the throttle.
    #[arg(long, conflicts_with_all = ["rps", "burst", "per", "path_prefix"])]
    pub off: bool,
}

#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub scope: Scope,
    /// How long each request is held before it is answered 503 (at most
    /// 10m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_pause: Duration,
}

#[derive(Debug, clap::Args)]
pub struct LeversArgs {
    /// One environment; default: every one.
    #[arg(long)]
    pub env: Option<String>,
}

fn request(scope: Scope, lever: &str, set: Option<pb::TrafficLevers>) -> pb::SetLeverRequest {
    pb::SetLeverRequest {
        env: scope.env,
        service: scope.service,
        node: scope.node.unwrap_or_default(),
        lever: lever.into(),
        set,
        generate_bypass_secret: false,
    }
}

pub async fn maintenance(
    client: &mut OperatorServiceClient<Channel>,
    command: MaintenanceCommand,
    json: bool,
) -> Result<ExitCode> {
    let request = match command {
        MaintenanceCommand::On {
            scope,
            message,
            retry_after,
            allow,
            bypass_secret,
        } => {
            let set = pb::TrafficLevers {
                maintenance: Some(pb::Maintenance {
                    message: message.unwrap_or_default(),
                    retry_after_s: retry_after,
                    allow,
                    bypass_secret: String::new(),
                }),
                ..Default::default()
            };
            let mut request = request(scope, "maintenance", Some(set));
            request.generate_bypass_secret = bypass_secret;
            request
        }
        MaintenanceCommand::Off { scope } => request(scope, "maintenance", None),
    };
    set_lever(client, request, json).await
}

pub async fn throttle(
    client: &mut OperatorServiceClient<Channel>,
    args: ThrottleArgs,
    json: bool,
) -> Result<ExitCode> {
    let set = (!args.off).then(|| pb::TrafficLevers {
        throttle: Some(pb::Throttle {
            rps: args.rps.unwrap_or_default(),
            burst: args.burst.unwrap_or_default(),
            per: args.per.unwrap_or_default(),
            path_prefix: args.path_prefix.unwrap_or_default(),
        }),
        ..Default::default()
    });
    set_lever(client, request(args.scope, "throttle", set), json).await
}

pub async fn pause(
    client: &mut OperatorServiceClient<Channel>,
    args: PauseArgs,
    json: bool,
) -> Result<ExitCode> {
    let set = pb::TrafficLevers {
        pause: Some(pb::PauseTraffic {
            max_pause_ms: u64::try_from(args.max_pause.as_millis()).unwrap_or(u64::MAX),
            since_ms: 0,
        }),
        ..Default::default()
    };
    set_lever(client, request(args.scope, "pause", Some(set)), json).await
}

pub async fn resume(
    client: &mut OperatorServiceClient<Channel>,
    scope: Scope,
    json: bool,
) -> Result<ExitCode> {
    set_lever(client, request(scope, "pause", None), json).await
}

/// Sends the change and says how each node took it; exits 1 when a node
/// refused it (those not reached get it when they are back).
async fn set_lever(
    client: &mut OperatorServiceClient<Channel>,
    request: pb::SetLeverRequest,
    json: bool,
) -> Result<ExitCode> {
    let (lever, service, env) = (
        request.lever.clone(),
        request.service.clone(),
        request.env.clone(),
    );
    let lifting = request.set.is_none();
    let response = client
        .set_lever(request)
        .await
        .map_err(explain)?
        .into_inner();
    let failed = response.nodes.iter().any(|n| n.outcome == "failed");
    if json {
        let nodes: Vec<_> = response
            .nodes
            .iter()
            .map(|n| json!({"node": n.node, "outcome": n.outcome, "detail": n.detail}))
            .collect();
        let value = json!({
            "env": env,
            "service": service,
            "lever": lever,
            "lifted": lifting,
            "changed": response.changed,
            "description": response.description,
            "bypass_path": response.bypass_path,
            "note": response.note,
            "nodes": nodes,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match (lifting, response.changed) {
            (true, true) => println!("{lever} lifted for {service} in {env}"),
            (true, false) => println!("{lever} was not set for {service} in {env}"),
            (false, _) => println!(
                "{lever} set for {service} in {env}: {}",
                response.description
            ),
        }
        if !response.note.is_empty() {
            println!("note: {}", response.note);
        }
        if !response.bypass_path.is_empty() {
            println!(
                "bypass: open {} on the service's address once to set the cookie that passes maintenance",
                response.bypass_path
            );
        }
        for node in &response.nodes {
            match node.detail.as_str() {
                "" => println!("  {} {}", node.node, node.outcome),
                detail => println!("  {} {}: {detail}", node.node, node.outcome),
            }
        }
        if response.nodes.is_empty() {
            println!(
                "  no node serves {service} in {env} now; nodes that do get it when they report"
            );
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn list(
    client: &mut OperatorServiceClient<Channel>,
    args: LeversArgs,
    json: bool,
) -> Result<ExitCode> {
    let levers = client
        .list_levers(pb::ListLeversRequest {
            env: args.env.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .levers;
    if json {
        let entries: Vec<_> = levers
            .iter()
            .map(|l| {
                json!({
                    "env": l.env,
                    "service": l.service,
                    "node": l.node,
                    "lever": l.lever,
                    "description": l.description,
                    "by": l.by,
                    "at": rfc3339(l.at_ms),
                    "applied": l.applied,
                    "pending": l.pending,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if levers.is_empty() {
        println!("no lever is set");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![[
        "ENV", "SERVICE", "LEVER", "NODES", "WHAT", "APPLIED", "PENDING", "SET BY",
    ]
    .map(String::from)
    .to_vec()];
    let list = |nodes: &[String]| match nodes.is_empty() {
        true => "-".to_string(),
        false => nodes.join(","),
    };
    rows.extend(levers.iter().map(|l| {
        vec![
            l.env.clone(),
            l.service.clone(),
            l.lever.clone(),
            match l.node.as_str() {
                "" => "all".into(),
                node => node.into(),
            },
            l.description.clone(),
            list(&l.applied),
            list(&l.pending),
            format!("{} at {}", l.by, rfc3339(l.at_ms)),
        ]
    }));
    print!("{}", render_table(&rows));
    Ok(ExitCode::SUCCESS)
}
