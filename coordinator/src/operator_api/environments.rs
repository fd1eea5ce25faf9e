//! Promotions (`cutover promote`), what an environment allows (`cutover
//! freeze status`: its pinned policy read back), and what differs between
//! two environments (`cutover diff`).

use cutover_common::digest::Digest;
use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::spec::AppSpec;

impl OperatorApi {
    pub(super) async fn handle_promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.get_ref();
        let spec_sha256 = Digest::from_hasher(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
            r.spec.as_bytes(),
        ));
        let args = json!({
            "service": r.service,
            "from": r.from_env,
            "to": r.to_env,
            "release": r.release_id,
            "spec_file": r.spec_file,
            "spec_sha256": spec_sha256.to_string(),
            "allow_unreachable": r.allow_unreachable,
            "break_glass": r.break_glass,
            "reason": r.reason,
        });
        let env = r.to_env.clone();
        let need = if r.break_glass {
            Need::Admin
        } else {
            Need::Deploy(&env)
        };
        self.audited(request, need, "promote", args, |caller, r| async move {
            if r.service.is_empty() {
                return Err(Status::invalid_argument(
                    "a promotion names its service: `cutover promote SERVICE --from ENV --to ENV`",
                ));
            }
            if r.from_env == r.to_env {
                return Err(Status::invalid_argument(format!(
                    "--from and --to are both {}; a promotion goes from one environment to another",
                    r.to_env
                )));
            }
            let file = match r.spec_file.as_str() {
                "" => "cutover.toml".to_string(),
                file => file.to_string(),
            };
            let invalid = |e: crate::spec::SpecError| Status::invalid_argument(e.to_string());
            let spec = AppSpec::parse(&r.spec, &file).map_err(invalid)?;
            spec.environment(&file, &r.from_env).map_err(invalid)?;
            spec.services_for(Some(&r.service), &file)
                .map_err(invalid)?;
            let release_id = Some(r.release_id.as_str()).filter(|id| !id.is_empty());
            let source = crate::policy::promotion::source(
                self.access.store(),
                &r.from_env,
                &r.service,
                release_id,
            )
            .await?
            .map_err(Status::failed_precondition)?;
            let release = &source.release;
            let promoted_from = format!("{}/{}", r.from_env, release.id());
            let deploy = pb::DeployRequest {
                spec: r.spec,
                spec_file: file,
                env: r.to_env,
                service: r.service,
                version: release.version().to_string(),
                artifact: release.0.artifact.clone(),
                image: release.image().to_string(),
                allow_unreachable: r.allow_unreachable,
                break_glass: r.break_glass,
                reason: r.reason,
                ..Default::default()
            };
            self.deploy_as(caller, deploy, Some(promoted_from)).await
        })
        .await
    }

    pub(super) async fn handle_get_environment_policy(
        &self,
        request: Request<pb::GetEnvironmentPolicyRequest>,
    ) -> Result<Response<pb::EnvironmentPolicy>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "get_environment_policy",
                &serde_json::Value::Null,
            )
            .await?;
        let env = request.into_inner().env;
        crate::spec::name_ok(&env)
            .map_err(|m| Status::invalid_argument(format!("environment {env:?}: {m}")))?;
        let pinned = self.access.store().releases.policy(&env).await?;
        let policy = pinned.clone().unwrap_or_default();
        let freeze = policy.freeze().map_err(|e| {
            Status::failed_precondition(format!(
                "environment {env} has freeze windows this coordinator cannot read ({e}); an admin deploys a spec with valid ones"
            ))
        })?;
        let now = jiff::Timestamp::from_millisecond(self.registry.now_ms())
            .map_err(|e| Status::internal(format!("the clock: {e}")))?;
        let frozen = freeze.frozen_at(now);
        let next = freeze.next_after(now);
        let ms = |t: jiff::Timestamp| t.as_millisecond();
        Ok(Response::new(pb::EnvironmentPolicy {
            env,
            pinned: pinned.is_some(),
            promotion_from: policy
                .promotion
                .as_ref()
                .map(|p| p.from.clone())
                .unwrap_or_default(),
            min_soak_ms: policy.promotion.as_ref().map_or(0, |p| p.min_soak_ms),
            freeze: policy.freeze.clone(),
            timezone: freeze.timezone().to_string(),
            frozen_by: frozen
                .as_ref()
                .map(|f| f.window.clone())
                .unwrap_or_default(),
            frozen_until_ms: frozen.as_ref().map_or(0, |f| ms(f.until)),
            frozen_until: frozen
                .as_ref()
                .map(|f| freeze.show(f.until))
                .unwrap_or_default(),
            next_window: next.as_ref().map(|n| n.window.clone()).unwrap_or_default(),
            next_starts_at_ms: next.as_ref().map_or(0, |n| ms(n.starts)),
            next_ends_at_ms: next.as_ref().map_or(0, |n| ms(n.ends)),
            next_starts_at: next
                .as_ref()
                .map(|n| freeze.show(n.starts))
                .unwrap_or_default(),
            next_ends_at: next
                .as_ref()
                .map(|n| freeze.show(n.ends))
                .unwrap_or_default(),
            approvals: policy.approvals,
            approvals_for_rollback: policy.rollback_approval().map_or(0, |r| r.required),
            approval_timeout_ms: policy
                .deploy_approval()
                .or(policy.rollback_approval())
                .map_or(0, |r| r.timeout_ms),
        }))
    }

    pub(super) async fn handle_diff_environments(
        &self,
        request: Request<pb::DiffEnvironmentsRequest>,
    ) -> Result<Response<pb::EnvironmentDiff>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "diff_environments",
                &serde_json::Value::Null,
            )
            .await?;
        let r = request.into_inner();
        for (what, name) in [
            ("service", &r.service),
            ("environment", &r.env_a),
            ("environment", &r.env_b),
        ] {
            crate::spec::name_ok(name)
                .map_err(|m| Status::invalid_argument(format!("{what} {name:?}: {m}")))?;
        }
        if r.env_a == r.env_b {
            return Err(Status::invalid_argument(format!(
                "both sides are {}: name two environments, `cutover diff {} --env staging --env production`",
                r.env_a, r.service
            )));
        }
        let store = self.access.store();
        let mut current = Vec::new();
        for env in [&r.env_a, &r.env_b] {
            let Some(record) = store.releases.current(env, &r.service).await? else {
                return Err(Status::not_found(format!(
                    "{} has no current release in {env}: nothing runs there to compare; deploy it first",
                    r.service
                )));
            };
            current.push(record);
        }
        let nodes = self.registry.list();
        let sides: Vec<crate::env_diff::Side> = current
            .iter()
            .map(|record| crate::env_diff::Side {
                release: &record.release.0,
                strategy: &record.strategy,
                nodes: nodes
                    .iter()
                    .filter(|n| crate::spec::selects(&record.selector, &n.record.labels))
                    .map(|n| n.record.figures.as_ref())
                    .collect(),
            })
            .collect();
        let rows = crate::env_diff::compare(&sides[0], &sides[1])
            .into_iter()
            .map(|row| pb::DiffRow {
                same: row.same(),
                aspect: row.aspect.to_string(),
                key: row.key,
                a: row.a,
                b: row.b,
            })
            .collect();
        Ok(Response::new(pb::EnvironmentDiff {
            service: r.service,
            env_a: r.env_a,
            env_b: r.env_b,
            rows,
        }))
    }
}
