//! `cutover promote` (a release stable in one environment, deployed to
//! the next), `cutover approve` and `reject` (a rollout awaiting approval)
//! and `cutover freeze status` (an environment's policy: freeze windows,
//! promotion rule, approvals, as the coordinator keeps them).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use cutover_coordinator::policy::show_duration;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::rfc3339;

#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The service to promote.
    pub service: String,
    /// The app spec: the target environment's environment, secrets and
    /// strategy come from it.
    #[arg(short = 'f', long = "file", default_value = "cutover.toml")]
    pub file: PathBuf,
    /// The environment the release is stable in.
    #[arg(long)]
    pub from: String,
    /// The environment to deploy it to.
    #[arg(long)]
    pub to: String,
    /// The release of --from to promote (`cutover releases SERVICE --env
    /// FROM`); default: its current one.
    #[arg(long)]
    pub release: Option<String>,
    /// Follow the rollout to its end; exit 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
    /// Roll out without the nodes that are unreachable now.
    #[arg(long)]
    pub allow_unreachable: bool,
    /// Promote past the target's freeze window, soak time and a `cutover
    /// lock` of the service (admin, with --reason; audited and notified).
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    /// Why (kept in the audit log and the rollout's timeline).
    #[arg(long)]
    pub reason: Option<String>,
}

pub async fn promote(
    client: &mut OperatorServiceClient<Channel>,
    args: PromoteArgs,
    json: bool,
) -> Result<ExitCode> {
    let (file, text, spec) = super::rollouts::read_spec(&args.file)?;
    spec.services_for(Some(&args.service), &file)?;
    spec.environment(&file, &args.from)?;
    spec.environment(&file, &args.to)?;
    let response = client
        .promote(pb::PromoteRequest {
            spec: text,
            spec_file: file,
            service: args.service,
            from_env: args.from,
            to_env: args.to,
            release_id: args.release.unwrap_or_default(),
            allow_unreachable: args.allow_unreachable,
            break_glass: args.break_glass,
            reason: args.reason.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    super::rollouts::started(client, response, args.wait, json).await
}

#[derive(Debug, clap::Args)]
pub struct DecisionArgs {
    /// The rollout awaiting approval (`cutover rollout list`).
    pub rollout: String,
    /// Why (kept in the rollout's timeline and the audit log).
    #[arg(long)]
    pub comment: Option<String>,
}

/// `cutover approve` and `cutover reject`: one operator's decision on a
/// rollout awaiting approval; prints the rollout as it is then.
pub async fn decide(
    client: &mut OperatorServiceClient<Channel>,
    args: DecisionArgs,
    action: pb::RolloutAction,
    json: bool,
) -> Result<ExitCode> {
    let rollout = client
        .control_rollout(pb::ControlRolloutRequest {
            id: args.rollout,
            action: action as i32,
            comment: args.comment.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&super::rollout_view::to_json(&rollout))?
        );
    } else {
        print!("{}", super::rollout_view::describe(&rollout));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    pub service: String,
    /// The two environments, e.g. `--env staging --env production`.
    #[arg(long = "env", num_args = 1, required = true)]
    pub envs: Vec<String>,
    /// Show the rows that are the same too.
    #[arg(long)]
    pub all: bool,
}

/// `cutover diff`: what differs between two environments' current
/// releases of a service and their nodes. Exits 0 either way (`--json`
/// has every row with `same`).
pub async fn diff(
    client: &mut OperatorServiceClient<Channel>,
    args: DiffArgs,
    json: bool,
) -> Result<ExitCode> {
    let [env_a, env_b] = <[String; 2]>::try_from(args.envs).map_err(|envs| {
        anyhow::anyhow!(
            "name two environments with --env, e.g. `cutover diff {} --env staging --env production` (got {})",
            args.service,
            envs.len()
        )
    })?;
    let diff = client
        .diff_environments(pb::DiffEnvironmentsRequest {
            service: args.service,
            env_a,
            env_b,
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        let rows: Vec<_> = diff
            .rows
            .iter()
            .map(|r| json!({"aspect": r.aspect, "key": r.key, "a": r.a, "b": r.b, "same": r.same}))
            .collect();
        let value = json!({
            "service": diff.service,
            "a": diff.env_a,
            "b": diff.env_b,
            "differences": diff.rows.iter().filter(|r| !r.same).count(),
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = vec![vec![
        "ASPECT".to_string(),
        "KEY".to_string(),
        diff.env_a.to_uppercase(),
        diff.env_b.to_uppercase(),
    ]];
    let shown = |v: &str| match v {
        "" => "-".to_string(),
        v => v.to_string(),
    };
    table.extend(
        diff.rows
            .iter()
            .filter(|r| args.all || !r.same)
            .map(|r| vec![r.aspect.clone(), r.key.clone(), shown(&r.a), shown(&r.b)]),
    );
    let differences = diff.rows.iter().filter(|r| !r.same).count();
    if table.len() > 1 {
        print!("{}", super::nodes::render_table(&table));
    }
    println!(
        "{differences} difference(s) between {} in {} and in {}",
        diff.service, diff.env_a, diff.env_b
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Subcommand)]
pub enum FreezeCommand {
    /// An environment's freeze windows, whether one runs now and until
    /// when, and the next one; with its promotion rule. Exits 0 either
    /// way (`--json` says `frozen`).
    Status {
        #[arg(long)]
        env: String,
    },
}

pub async fn freeze(
    client: &mut OperatorServiceClient<Channel>,
    command: FreezeCommand,
    json: bool,
) -> Result<ExitCode> {
    let FreezeCommand::Status { env } = command;
    let p = client
        .get_environment_policy(pb::GetEnvironmentPolicyRequest { env })
        .await
        .map_err(explain)?
        .into_inner();
    let at = |ms: i64| (ms > 0).then(|| rfc3339(ms));
    if json {
        let value = json!({
            "env": p.env,
            "pinned": p.pinned,
            "promotion": (!p.promotion_from.is_empty()).then(|| json!({
                "from": p.promotion_from,
                "min_soak_ms": p.min_soak_ms,
            })),
            "timezone": p.timezone,
            "windows": p.freeze,
            "frozen": !p.frozen_by.is_empty(),
            "frozen_by": (!p.frozen_by.is_empty()).then_some(&p.frozen_by),
            "frozen_until": at(p.frozen_until_ms),
            "next": (!p.next_window.is_empty()).then(|| json!({
                "window": p.next_window,
                "starts_at": at(p.next_starts_at_ms),
                "ends_at": at(p.next_ends_at_ms),
            })),
            "approvals": p.approvals,
            "approvals_for_rollback": p.approvals_for_rollback,
            "approval_timeout_ms": p.approval_timeout_ms,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    if !p.pinned {
        println!(
            "environment {}: no policy pinned (no deploy set one): no freeze window, no promotion rule, no approvals",
            p.env
        );
        return Ok(ExitCode::SUCCESS);
    }
    match p.promotion_from.as_str() {
        "" => println!("promotion: none (any release deploys)"),
        from => println!(
            "promotion: only releases stable in {from} for {}",
            show_duration(p.min_soak_ms)
        ),
    }
    match (p.approvals, p.approvals_for_rollback) {
        (0, 0) => println!("approvals: none"),
        (deploy, rollback) => println!(
            "approvals: {deploy} for a deploy or promotion, {rollback} for a rollback, by operators other than the requester, within {}",
            show_duration(p.approval_timeout_ms)
        ),
    }
    if p.freeze.is_empty() {
        println!("freeze windows: none");
    } else {
        println!("freeze windows ({}):", p.timezone);
        for window in &p.freeze {
            println!("  {window}");
        }
    }
    if p.frozen_by.is_empty() {
        println!("now: open for deploys");
    } else {
        println!("now: FROZEN by {:?} until {}", p.frozen_by, p.frozen_until);
    }
    if !p.next_window.is_empty() {
        println!(
            "next: {:?} from {} to {}",
            p.next_window, p.next_starts_at, p.next_ends_at
        );
    }
    Ok(ExitCode::SUCCESS)
}
