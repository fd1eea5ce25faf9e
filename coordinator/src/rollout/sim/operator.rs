//! The operator of a seeded run: deploys the second release of a service,
//! pauses, resumes, aborts or promotes it as the seed says, and may roll it
//! back once it succeeded (the fast path, or `--careful`), on whichever
//! coordinator runs, again until one takes each request.

use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1 as pb;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};

use super::scenario::{Verdict, SECOND};
use crate::rollout::engine::{self, Input};
use crate::rollout::model::RolloutState;
use crate::rollout::{
    DeployRequest, Deployed, RollbackRequest, RolloutError, Rollouts, Started, StopRequest,
};

pub(super) struct OperatorPlan {
    pub spec: String,
    pub service: &'static str,
    pub allow_unreachable: bool,
    pub deploy_at: Duration,
    pub pause: Option<(Duration, Duration)>,
    pub abort: Option<Duration>,
    pub promote: Option<(Duration, bool)>,
    /// Once the deploy succeeded, rolls it back after this long
    /// (`careful`: `--careful`).
    pub rollback: Option<(Duration, bool)>,
    /// Once the deploy (and its rollback) ended, stops the service after
    /// this long (`true`: removes it).
    pub stop: Option<(Duration, bool)>,
    /// What the reviewer does with the deploy's approval request, and
    /// whether a rollback asks for one too.
    pub approval: Option<(Verdict, bool)>,
}

/// The operator: deploys the second release of a service, and pauses,
/// resumes or aborts it as the seed says, on whichever coordinator runs.
pub(super) async fn operate(
    plan: OperatorPlan,
    current: watch::Receiver<Arc<Rollouts>>,
    from: Instant,
) -> String {
    sleep_until(from + plan.deploy_at).await;
    let id = deploy(
        &current,
        &plan.spec,
        plan.service,
        SECOND,
        plan.allow_unreachable,
    )
    .await;
    if let Some((verdict, _)) = plan.approval {
        review(&current, &id, verdict).await;
    }
    if let Some((pause, resume)) = plan.pause {
        sleep_until(from + pause).await;
        control(&current, &id, Input::Pause { by: "op".into() }).await;
        sleep_until(from + resume).await;
        control(&current, &id, Input::Resume { by: "op".into() }).await;
    }
    if let Some(abort) = plan.abort {
        sleep_until(from + abort).await;
        control(&current, &id, Input::Abort { by: "op".into() }).await;
    }
    if let Some((after, full)) = plan.promote {
        promote(&current, &id, after, full).await;
    }
    let last = match plan.rollback {
        Some((after, careful)) if ended(&current, &id).await == RolloutState::Succeeded => {
            sleep(after).await;
            let rollback = rollback(&current, plan.service, plan.allow_unreachable, careful).await;
            if let (Some(rollback), Some((_, true))) = (&rollback, plan.approval) {
                review(&current, rollback, Verdict::Approve(Duration::from_secs(5))).await;
            }
            rollback.unwrap_or(id)
        }
        _ => id,
    };
    match plan.stop {
        Some((after, remove)) => {
            ended(&current, &last).await;
            sleep(after).await;
            stop(&current, plan.service, remove).await
        }
        None => last,
    }
}

/// Stops (or removes) `service`, again until a coordinator takes it.
async fn stop(current: &watch::Receiver<Arc<Rollouts>>, service: &str, remove: bool) -> String {
    loop {
        let rollouts = current.borrow().clone();
        let request = StopRequest {
            env: "sim".into(),
            service: service.into(),
            by: "op".into(),
            remove,
            reason: "sim".into(),
            break_glass: None,
        };
        match rollouts.stop_service(request).await {
            Ok(Started::Rollout(rollout)) => return rollout.id,
            Ok(Started::NoOp { message, .. }) => {
                panic!("a first stop of {service} did nothing: {message}")
            }
            Err(
                RolloutError::Store(_)
                | RolloutError::Locked { .. }
                | RolloutError::Claimed { .. }
                | RolloutError::NoneReachable { .. },
            ) => sleep(Duration::from_secs(2)).await,
            Err(error) => panic!("stop of {service} refused: {error}"),
        }
    }
}

/// How rollout `id` ended, once it did.
async fn ended(current: &watch::Receiver<Arc<Rollouts>>, id: &str) -> RolloutState {
    loop {
        let rollouts = current.borrow().clone();
        if let Ok(rollout) = rollouts.get(id).await {
            if rollout.state.is_terminal() {
                return rollout.state;
            }
        }
        sleep(Duration::from_secs(1)).await;
    }
}

/// Rolls `service` back to its previous release, again until a coordinator
/// takes it; `None` when every node runs it already.
async fn rollback(
    current: &watch::Receiver<Arc<Rollouts>>,
    service: &str,
    allow_unreachable: bool,
    careful: bool,
) -> Option<String> {
    loop {
        let rollouts = current.borrow().clone();
        let request = RollbackRequest {
            env: "sim".into(),
            service: service.into(),
            to: None,
            allow_unreachable,
            force: false,
            ignore_schema: None,
            by: "op".into(),
            deployment: String::new(),
            careful,
            break_glass: None,
        };
        match rollouts.rollback(request).await {
            Ok(Started::Rollout(rollout)) => return Some(rollout.id),
            Ok(Started::NoOp { .. }) => return None,
            Err(
                RolloutError::Store(_)
                | RolloutError::Locked { .. }
                | RolloutError::Claimed { .. }
                | RolloutError::Unreachable { .. },
            ) => sleep(Duration::from_secs(2)).await,
            Err(error) => panic!("rollback of {service} refused: {error}"),
        }
    }
}

/// Promotes the canary each time it waits for promotion, `after` it was
/// first seen waiting, until the rollout ends.
async fn promote(current: &watch::Receiver<Arc<Rollouts>>, id: &str, after: Duration, full: bool) {
    loop {
        sleep(Duration::from_secs(1)).await;
        let rollouts = current.borrow().clone();
        let Ok(rollout) = rollouts.get(id).await else {
            continue;
        };
        if rollout.state.is_terminal() {
            return;
        }
        if engine::awaiting_promotion(&rollout) {
            sleep(after).await;
            let rollouts = current.borrow().clone();
            let refused = match rollouts.get(id).await {
                Ok(rollout) => engine::promote_refusal(&rollout, full).is_some(),
                Err(_) => true,
            };
            if !refused {
                control(
                    current,
                    id,
                    Input::Promote {
                        by: "op".into(),
                        full,
                    },
                )
                .await;
            }
        }
    }
}

/// Deploys `version` of `service`, again until a coordinator takes it.
pub(super) async fn deploy(
    current: &watch::Receiver<Arc<Rollouts>>,
    spec: &str,
    service: &str,
    version: &str,
    allow_unreachable: bool,
) -> String {
    loop {
        let rollouts = current.borrow().clone();
        let request = DeployRequest {
            spec_text: spec.to_string(),
            spec_file: "cutover.toml".into(),
            env: "sim".into(),
            service: Some(service.into()),
            version: version.into(),
            artifact: Some(pb::Artifact {
                url: format!("https://artifacts.sim/{service}-{version}.tar.gz"),
                digest: format!("sha256:{}", version.repeat(64)),
            }),
            image: None,
            allow_unreachable,
            skip_migrate: false,
            skip_backup_gate: false,
            migrate_node: None,
            by: "op".into(),
            may_pin_environments: true,
            may_set_policy: true,
            break_glass: None,
            promoted_from: None,
        };
        match rollouts.deploy(request).await {
            Ok(Deployed::Alone(mut started)) => match started.pop() {
                Some(Started::Rollout(rollout)) => return rollout.id,
                _ => panic!("{service} {version} already ran everywhere"),
            },
            Ok(Deployed::Together(_)) => panic!("one service makes no deployment"),
            Err(
                RolloutError::Store(_)
                | RolloutError::Locked { .. }
                | RolloutError::Claimed { .. }
                | RolloutError::Unreachable { .. },
            ) => {
                sleep(Duration::from_secs(2)).await;
            }
            Err(error) => panic!("deploy of {service} {version} refused: {error}"),
        }
    }
}

/// The reviewer, another operator than the one who deployed: approves
/// or rejects rollout `id` after a while, or lets its request expire.
pub(super) async fn review(current: &watch::Receiver<Arc<Rollouts>>, id: &str, verdict: Verdict) {
    let by = "reviewer".to_string();
    let comment = "seen".to_string();
    let (after, input) = match verdict {
        Verdict::Approve(after) => (after, Input::Approve { by, comment }),
        Verdict::Reject(after) => (after, Input::Reject { by, comment }),
        Verdict::Expire => return,
    };
    sleep(after).await;
    control(current, id, input).await;
}

/// Pauses, resumes, aborts, approves or rejects a rollout, again until a
/// coordinator takes it in or the rollout ended. A resume must arrive, or
/// the rollout waits forever.
async fn control(current: &watch::Receiver<Arc<Rollouts>>, id: &str, input: Input) {
    loop {
        let rollouts = current.borrow().clone();
        match rollouts.control(id, input.clone()).await {
            Ok(_) | Err(RolloutError::Finished { .. }) => return,
            Err(_) => sleep(Duration::from_secs(1)).await,
        }
    }
}
