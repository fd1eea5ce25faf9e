//! `cutover maintenance`, `throttle`, `pause-traffic` / `resume-traffic`
//! and `levers`: incident levers at the node proxies (see `crate::levers`);
//! `queues`: queue depth and worker health (see `crate::queues`), what an
//! operator reads before pulling one.

use cutover_common::levers::{LeverSettings, BYPASS_PATH};
use cutover_proto::v1 as pb;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::levers::{describe, LeverChange, LeverError, NodeOutcome};
use crate::store::LeverKind;

/// What a maintenance says when the operator gives no message.
const DEFAULT_MESSAGE: &str = "Down for maintenance; please try again shortly.";

impl From<LeverError> for Status {
    fn from(error: LeverError) -> Self {
        let message = error.to_string();
        match error {
            LeverError::NotDeployed { .. } => Status::not_found(message),
            LeverError::Worker { .. } => Status::failed_precondition(message),
            LeverError::NotANode { .. } | LeverError::Invalid(_) => {
                Status::invalid_argument(message)
            }
            LeverError::Store(_) => Status::internal(message),
        }
    }
}

impl OperatorApi {
    pub(super) async fn handle_set_lever(
        &self,
        request: Request<pb::SetLeverRequest>,
    ) -> Result<Response<pb::SetLeverResponse>, Status> {
        let r = request.get_ref();
        // `describe` names a bypass secret, never shows it.
        let set = r.set.clone();
        let args = json!({
            "env": r.env,
            "service": r.service,
            "node": r.node,
            "lever": r.lever,
            "set": set.map(|s| describe(&Some(&s).into())),
            "generate_bypass_secret": r.generate_bypass_secret,
        });
        let env = r.env.clone();
        self.audited(
            request,
            Need::Deploy(&env),
            "set_lever",
            args,
            |caller, r| async move {
                let kind = match r.lever.as_str() {
                    "maintenance" => LeverKind::Maintenance,
                    "throttle" => LeverKind::Throttle,
                    "pause" => LeverKind::Pause,
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "lever {other:?} is none of maintenance, throttle or pause"
                        )))
                    }
                };
                let mut bypass_path = String::new();
                let set = match r.set.as_ref() {
                    None => None,
                    Some(wire) => {
                        let mut settings = only(kind, Some(wire).into())?;
                        with_defaults(&mut settings);
                        if let Some(m) = settings.maintenance.as_mut() {
                            if r.generate_bypass_secret {
                                m.bypass_secret = uuid::Uuid::new_v4().simple().to_string();
                            }
                            if !m.bypass_secret.is_empty() {
                                bypass_path = format!("{BYPASS_PATH}{}", m.bypass_secret);
                            }
                        }
                        Some(settings)
                    }
                };
                let description = set.as_ref().map(describe).unwrap_or_default();
                let report = self
                    .levers
                    .change(LeverChange {
                        env: r.env,
                        service: r.service,
                        node: r.node,
                        kind,
                        set,
                        by: caller.identity.name,
                    })
                    .await?;
                let nodes = report
                    .nodes
                    .into_iter()
                    .map(|(node, outcome)| {
                        let (outcome, detail) = match outcome {
                            NodeOutcome::Applied => ("applied", String::new()),
                            NodeOutcome::Pending(why) => ("pending", why),
                            NodeOutcome::Failed(why) => ("failed", why),
                        };
                        pb::LeverNodeOutcome {
                            node,
                            outcome: outcome.into(),
                            detail,
                        }
                    })
                    .collect();
                Ok(pb::SetLeverResponse {
                    changed: report.changed,
                    nodes,
                    bypass_path,
                    description,
                    note: report.note,
                })
            },
        )
        .await
    }

    pub(super) async fn handle_list_levers(
        &self,
        request: Request<pb::ListLeversRequest>,
    ) -> Result<Response<pb::ListLeversResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_levers",
                &serde_json::Value::Null,
            )
            .await?;
        let env = request.into_inner().env;
        let states = self
            .levers
            .list((!env.is_empty()).then_some(env.as_str()))
            .await?;
        let levers = states
            .into_iter()
            .map(|state| pb::LeverEntry {
                description: describe(&state.record.settings),
                env: state.record.env,
                service: state.record.service,
                node: state.record.node,
                lever: state.record.kind.as_str().into(),
                by: state.record.by,
                at_ms: state.record.at_ms,
                applied: state.applied,
                pending: state.pending,
            })
            .collect();
        Ok(Response::new(pb::ListLeversResponse { levers }))
    }
}

impl OperatorApi {
    pub(super) async fn handle_list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_queues",
                &serde_json::Value::Null,
            )
            .await?;
        let env = request.into_inner().env;
        let view = crate::queues::collect(
            self.access.store(),
            &self.registry,
            (!env.is_empty()).then_some(env.as_str()),
        )
        .await?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: view
                .queues
                .into_iter()
                .map(|q| pb::QueueEntry {
                    app: q.app,
                    env: q.env,
                    service: q.service,
                    queue: q.queue,
                    waiting: q.waiting,
                    delayed: q.delayed,
                    reserved: q.reserved,
                    oldest_age_ms: q.oldest_age_ms,
                    node: q.node,
                    probed_at_ms: q.probed_at_ms,
                    max_depth: q.max_depth.unwrap_or(0),
                    max_wait_ms: q.max_wait_ms.unwrap_or(0),
                })
                .collect(),
            workers: view
                .workers
                .into_iter()
                .map(|w| pb::WorkerEntry {
                    app: w.app,
                    env: w.env,
                    service: w.service,
                    node: w.node,
                    up: w.up,
                    status: w.status,
                    detail: w.detail,
                    probe_error: w.probe_error,
                    probed_at_ms: w.probed_at_ms,
                })
                .collect(),
        }))
    }
}

/// `settings` with only the lever of `kind`; refused when that one is
/// missing (a request that sets nothing must not lift it).
fn only(kind: LeverKind, settings: LeverSettings) -> Result<LeverSettings, Status> {
    let only = match kind {
        LeverKind::Maintenance => LeverSettings {
            maintenance: settings.maintenance,
            ..Default::default()
        },
        LeverKind::Throttle => LeverSettings {
            throttle: settings.throttle,
            ..Default::default()
        },
        LeverKind::Pause => LeverSettings {
            pause: settings.pause,
            ..Default::default()
        },
    };
    if only.is_empty() {
        return Err(Status::invalid_argument(format!(
            "setting {} needs its settings in `set.{}`",
            kind.as_str(),
            kind.as_str()
        )));
    }
    Ok(only)
}

/// Fills in what the operator left out: a maintenance message, a
/// throttle's burst (one second's worth) and key (every request alike),
/// a pause's start.
fn with_defaults(settings: &mut LeverSettings) {
    if let Some(m) = settings.maintenance.as_mut() {
        if m.message.trim().is_empty() {
            m.message = DEFAULT_MESSAGE.into();
        }
    }
    if let Some(t) = settings.throttle.as_mut() {
        if t.burst == 0 {
            t.burst = t.rps;
        }
        if t.per.is_empty() {
            t.per = "all".into();
        }
    }
    if let Some(p) = settings.pause.as_mut() {
        p.since_ms = cutover_common::now_ms();
    }
}
