//! `OperatorService`: what the CLI calls.
//!
//! One module per resource holds its handlers; the service impl below only
//! hands each call to its handler (tonic wants all of them in one impl). A
//! mutating call goes through `audited`, so the role check, the call and its
//! audit entry cannot drift apart between handlers; a read is checked alone.
//! Which gRPC code a domain error answers with is decided in `errors`.

mod analysis;
mod artifacts;
mod backup;
mod ca;
mod config;
mod environments;
mod errors;
mod events;
mod fleet;
mod jobs;
mod levers;
mod locks;
mod logs;
mod nodes;
mod operators;
mod rollouts;
mod scale;
mod secrets;
mod services;
mod tasks;
mod tokens;

use std::future::Future;
use std::sync::Arc;

use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_server::OperatorService;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::access::{Access, Caller, Need};
use crate::artifacts::ArtifactStore;
use crate::registry::Registry;
use crate::rollout::Rollouts;
use crate::secrets::Secrets;

/// Longest reason (for a lock, a stop, a break of glass) taken: longer
/// than anyone writes on a command line, a paste gone wrong.
const MAX_REASON: usize = 500;

pub struct OperatorApi {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub registry: Arc<Registry>,
    pub artifacts: Arc<ArtifactStore>,
    pub rollouts: Arc<Rollouts>,
    pub jobs: Arc<crate::jobs::Jobs>,
    pub agent_upgrades: Arc<crate::agent_upgrade::AgentUpgrades>,
    pub access: Arc<Access>,
    /// Signs operator certificates; without `ca_key` in the config it has
    /// no signer, and calls that sign fail with a failed precondition.
    pub pki: Arc<crate::ca::Pki>,
    pub secrets: Arc<Secrets>,
    pub levers: Arc<crate::levers::Levers>,
    /// Ends the streams that would run on forever (`logs --follow`).
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl OperatorApi {
    /// A mutating call: checks that the caller's role allows `need` (a
    /// refusal is audited by the check), runs the call with the caller and
    /// the request's message, and audits how it ended. `args` are what the
    /// audit log keeps of the call, refused or not: never a secret.
    async fn audited<Q, T, F, Fut>(
        &self,
        request: Request<Q>,
        need: Need<'_>,
        action: &str,
        args: Value,
        run: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Caller, Q) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let caller = self.access.check(&request, need, action, &args).await?;
        let result = run(caller.clone(), request.into_inner())
            .await
            .map(Response::new);
        self.access.audit(&caller, action, &args, &result).await;
        result
    }
}

// The handlers are named `handle_<rpc>`, not after the RPC itself: a call
// below that found no handler of that name would otherwise resolve to the
// trait method and recurse forever without a word from the compiler.
#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.handle_create_token(request).await
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.handle_list_tokens(request).await
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        self.handle_revoke_token(request).await
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        self.handle_revoke_node(request).await
    }

    async fn rotate_secret(
        &self,
        request: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<pb::RotateSecretResponse>, Status> {
        self.handle_rotate_secret(request).await
    }

    async fn set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretEntry>, Status> {
        self.handle_set_secret(request).await
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        self.handle_list_secrets(request).await
    }

    async fn remove_secret(
        &self,
        request: Request<pb::RemoveSecretRequest>,
    ) -> Result<Response<pb::RemoveSecretResponse>, Status> {
        self.handle_remove_secret(request).await
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        self.handle_rotate_master_key(request).await
    }

    async fn rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.handle_rotate_ca(request).await
    }

    async fn get_ca_status(
        &self,
        request: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.handle_get_ca_status(request).await
    }

    async fn renew_operator_certificate(
        &self,
        request: Request<pb::RenewOperatorCertificateRequest>,
    ) -> Result<Response<pb::RenewOperatorCertificateResponse>, Status> {
        self.handle_renew_operator_certificate(request).await
    }

    async fn create_operator(
        &self,
        request: Request<pb::CreateOperatorRequest>,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        self.handle_create_operator(request).await
    }

    async fn list_operators(
        &self,
        request: Request<pb::ListOperatorsRequest>,
    ) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        self.handle_list_operators(request).await
    }

    async fn revoke_operator(
        &self,
        request: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::Operator>, Status> {
        self.handle_revoke_operator(request).await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.handle_list_audit(request).await
    }

    async fn push_artifact(
        &self,
        request: Request<tonic::Streaming<pb::PushArtifactRequest>>,
    ) -> Result<Response<pb::PushArtifactResponse>, Status> {
        self.handle_push_artifact(request).await
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.handle_list_nodes(request).await
    }

    async fn ping_node(
        &self,
        request: Request<pb::PingNodeRequest>,
    ) -> Result<Response<pb::PingNodeResponse>, Status> {
        self.handle_ping_node(request).await
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        self.handle_list_events(request).await
    }

    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_deploy(request).await
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_rollback(request).await
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_promote(request).await
    }

    async fn get_environment_policy(
        &self,
        request: Request<pb::GetEnvironmentPolicyRequest>,
    ) -> Result<Response<pb::EnvironmentPolicy>, Status> {
        self.handle_get_environment_policy(request).await
    }

    async fn set_config(
        &self,
        request: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_set_config(request).await
    }

    async fn scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_scale_service(request).await
    }

    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ServiceConfig>, Status> {
        self.handle_get_config(request).await
    }

    async fn set_lever(
        &self,
        request: Request<pb::SetLeverRequest>,
    ) -> Result<Response<pb::SetLeverResponse>, Status> {
        self.handle_set_lever(request).await
    }

    async fn lock_service(
        &self,
        request: Request<pb::LockServiceRequest>,
    ) -> Result<Response<pb::ManualLock>, Status> {
        self.handle_lock_service(request).await
    }

    async fn unlock_service(
        &self,
        request: Request<pb::UnlockServiceRequest>,
    ) -> Result<Response<pb::UnlockServiceResponse>, Status> {
        self.handle_unlock_service(request).await
    }

    async fn stop_service(
        &self,
        request: Request<pb::StopServiceRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_stop_service(request).await
    }

    async fn start_service(
        &self,
        request: Request<pb::StartServiceRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        self.handle_start_service(request).await
    }

    async fn list_service_locks(
        &self,
        request: Request<pb::ListServiceLocksRequest>,
    ) -> Result<Response<pb::ListServiceLocksResponse>, Status> {
        self.handle_list_service_locks(request).await
    }

    async fn list_levers(
        &self,
        request: Request<pb::ListLeversRequest>,
    ) -> Result<Response<pb::ListLeversResponse>, Status> {
        self.handle_list_levers(request).await
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        self.handle_list_queues(request).await
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::Operator>, Status> {
        self.handle_who_am_i(request).await
    }

    async fn get_fleet(
        &self,
        request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<pb::Fleet>, Status> {
        self.handle_get_fleet(request).await
    }

    async fn diff_environments(
        &self,
        request: Request<pb::DiffEnvironmentsRequest>,
    ) -> Result<Response<pb::EnvironmentDiff>, Status> {
        self.handle_diff_environments(request).await
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.handle_list_rollouts(request).await
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.handle_get_deployment(request).await
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.handle_get_rollout(request).await
    }

    type WatchRolloutStream = rollouts::WatchStream;

    type UpgradeAgentsStream = nodes::UpgradeStream;

    async fn upgrade_agents(
        &self,
        request: Request<pb::UpgradeAgentsRequest>,
    ) -> Result<Response<Self::UpgradeAgentsStream>, Status> {
        self.handle_upgrade_agents(request).await
    }

    type RunTaskStream = tasks::TaskStream;

    async fn run_task(
        &self,
        request: Request<pb::RunTaskRequest>,
    ) -> Result<Response<Self::RunTaskStream>, Status> {
        self.handle_run_task(request).await
    }

    type StreamLogsStream = logs::LogsStream;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        self.handle_stream_logs(request).await
    }

    async fn watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.handle_watch_rollout(request).await
    }

    async fn control_rollout(
        &self,
        request: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.handle_control_rollout(request).await
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        self.handle_list_releases(request).await
    }

    async fn apply_jobs(
        &self,
        request: Request<pb::ApplyJobsRequest>,
    ) -> Result<Response<pb::ApplyJobsResponse>, Status> {
        self.handle_apply_jobs(request).await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.handle_list_jobs(request).await
    }

    async fn list_job_runs(
        &self,
        request: Request<pb::ListJobRunsRequest>,
    ) -> Result<Response<pb::ListJobRunsResponse>, Status> {
        self.handle_list_job_runs(request).await
    }

    async fn get_job_run(
        &self,
        request: Request<pb::GetJobRunRequest>,
    ) -> Result<Response<pb::JobRun>, Status> {
        self.handle_get_job_run(request).await
    }

    async fn run_job(
        &self,
        request: Request<pb::RunJobRequest>,
    ) -> Result<Response<pb::RunJobResponse>, Status> {
        self.handle_run_job(request).await
    }

    async fn set_job_paused(
        &self,
        request: Request<pb::SetJobPausedRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.handle_set_job_paused(request).await
    }

    async fn get_recovery_status(
        &self,
        request: Request<pb::GetRecoveryStatusRequest>,
    ) -> Result<Response<pb::RecoveryStatus>, Status> {
        self.handle_get_recovery_status(request).await
    }

    type BackupStoreStream = backup::BackupStream;

    async fn backup_store(
        &self,
        request: Request<pb::BackupStoreRequest>,
    ) -> Result<Response<Self::BackupStoreStream>, Status> {
        self.handle_backup_store(request).await
    }
}
