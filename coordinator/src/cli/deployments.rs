//! Deployments (a deploy of several services) in the CLI: following one
//! rollout after another to the deployment's end, and showing its steps.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

/// How often a follower looks for the deployment's next rollout.
const POLL: Duration = Duration::from_millis(500);

pub fn is_terminal(state: pb::DeploymentState) -> bool {
    use pb::DeploymentState as D;
    matches!(state, D::Succeeded | D::Failed | D::RolledBack | D::Aborted)
}

pub async fn get(client: &mut OperatorServiceClient<Channel>, id: &str) -> Result<pb::Deployment> {
    Ok(client
        .get_deployment(pb::GetDeploymentRequest { id: id.to_string() })
        .await
        .map_err(explain)?
        .into_inner())
}

/// Follows each rollout of the deployment as it starts (`follow_rollout`
/// shows one live) until the deployment ends; returns its last state.
pub async fn follow<F, Fut>(
    client: &mut OperatorServiceClient<Channel>,
    id: &str,
    quiet: bool,
    mut follow_rollout: F,
) -> Result<pb::Deployment>
where
    F: FnMut(OperatorServiceClient<Channel>, String) -> Fut,
    Fut: std::future::Future<Output = Result<pb::Rollout>>,
{
    let mut followed = HashSet::new();
    loop {
        let deployment = get(client, id).await?;
        let next = deployment
            .steps
            .iter()
            .flat_map(|s| [&s.rollout_id, &s.rollback_rollout_id])
            .find(|r| !r.is_empty() && !followed.contains(*r))
            .cloned();
        match next {
            Some(rollout) => {
                followed.insert(rollout.clone());
                follow_rollout(client.clone(), rollout).await?;
            }
            None if is_terminal(deployment.state()) => {
                if !quiet {
                    eprintln!("{}", summary(&deployment));
                }
                return Ok(deployment);
            }
            None => tokio::time::sleep(POLL).await,
        }
    }
}

pub fn exit_for(deployment: &pb::Deployment) -> ExitCode {
    if deployment.state() == pb::DeploymentState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub fn summary(d: &pb::Deployment) -> String {
    let steps: Vec<String> = d
        .steps
        .iter()
        .map(|s| format!("{} {}", s.service, s.state().as_str()))
        .collect();
    let mut text = format!(
        "deployment {} {}: {}",
        d.id,
        d.state().as_str(),
        steps.join(", ")
    );
    if !d.error.is_empty() {
        text.push_str(&format!("\n  cause: {}", d.error));
    }
    text
}

/// `cutover rollout deployment ID`.
pub fn describe(d: &pb::Deployment) -> String {
    let mut out = format!(
        "deployment {}\nstate      {}\napp        {} in {}\nby         {} at {}\n",
        d.id,
        d.state().as_str(),
        d.app,
        d.env,
        d.created_by,
        rfc3339(d.created_at_ms)
    );
    if !d.error.is_empty() {
        out.push_str(&format!("error      {}\n", d.error));
    }
    let mut rows = vec![["SERVICE", "RELEASE", "STATE", "ROLLOUT", "ROLLBACK"]
        .map(String::from)
        .to_vec()];
    rows.extend(d.steps.iter().map(|s| {
        vec![
            s.service.clone(),
            s.release_id.clone(),
            s.state().as_str().to_string(),
            dash(&s.rollout_id),
            dash(&s.rollback_rollout_id),
        ]
    }));
    out.push('\n');
    out.push_str(&render_table(&rows));
    out
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_string()
    }
}

pub fn to_json(d: &pb::Deployment) -> Value {
    json!({
        "deployment": d.id,
        "app": d.app,
        "env": d.env,
        "state": d.state().as_str(),
        "error": (!d.error.is_empty()).then_some(&d.error),
        "created_by": d.created_by,
        "created_at": rfc3339(d.created_at_ms),
        "finished_at": (d.finished_at_ms != 0).then(|| rfc3339(d.finished_at_ms)),
        "steps": d.steps.iter().map(|s| json!({
            "service": s.service,
            "release": s.release_id,
            "state": s.state().as_str(),
            "rollout": (!s.rollout_id.is_empty()).then_some(&s.rollout_id),
            "rollback_rollout": (!s.rollback_rollout_id.is_empty()).then_some(&s.rollback_rollout_id),
        })).collect::<Vec<_>>(),
    })
}
