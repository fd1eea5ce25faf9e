//! `cutover lock`, `unlock` and `locks`: an operator's hold on a service
//! while they work on it by hand (see `policy::lock`).

use std::process::ExitCode;

use anyhow::Result;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::json;
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

#[derive(Debug, clap::Args)]
pub struct LockArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// Why, said in every refused deploy (e.g. "reindexing orders, until
    /// 15:00 - dana").
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct UnlockArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
}

#[derive(Debug, clap::Args)]
pub struct LocksArgs {
    /// Only this environment's; default: every environment's.
    #[arg(long)]
    pub env: Option<String>,
}

fn lock_json(lock: &pb::ManualLock) -> serde_json::Value {
    json!({
        "env": lock.env,
        "service": lock.service,
        "reason": lock.reason,
        "by": lock.by,
        "at": rfc3339(lock.at_ms),
    })
}

pub async fn lock(
    client: &mut OperatorServiceClient<Channel>,
    args: LockArgs,
    json: bool,
) -> Result<ExitCode> {
    let lock = client
        .lock_service(pb::LockServiceRequest {
            env: args.env,
            service: args.service,
            reason: args.reason,
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&lock_json(&lock))?);
    } else {
        println!(
            "locked {} in {}: deploys, rollbacks, promotions, config changes and scaling of it are refused until `cutover unlock {} --env {}`",
            lock.service, lock.env, lock.service, lock.env
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn unlock(
    client: &mut OperatorServiceClient<Channel>,
    args: UnlockArgs,
    json: bool,
) -> Result<ExitCode> {
    let released = client
        .unlock_service(pb::UnlockServiceRequest {
            env: args.env.clone(),
            service: args.service.clone(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .released;
    if json {
        let released = released.as_ref().map(lock_json);
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "released": released }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    match released {
        Some(lock) => println!(
            "unlocked {} in {} (locked by {} at {}: {:?})",
            lock.service,
            lock.env,
            lock.by,
            rfc3339(lock.at_ms),
            lock.reason
        ),
        None => println!(
            "{} in {} was not locked; nothing changed",
            args.service, args.env
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    client: &mut OperatorServiceClient<Channel>,
    args: LocksArgs,
    json: bool,
) -> Result<ExitCode> {
    let locks = client
        .list_service_locks(pb::ListServiceLocksRequest {
            env: args.env.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .locks;
    if json {
        let entries: Vec<_> = locks.iter().map(lock_json).collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if locks.is_empty() {
        println!("no service is locked");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["ENV", "SERVICE", "LOCKED BY", "SINCE", "REASON"]
        .map(String::from)
        .to_vec()];
    rows.extend(locks.iter().map(|l| {
        vec![
            l.env.clone(),
            l.service.clone(),
            l.by.clone(),
            rfc3339(l.at_ms),
            l.reason.clone(),
        ]
    }));
    print!("{}", render_table(&rows));
    Ok(ExitCode::SUCCESS)
}
