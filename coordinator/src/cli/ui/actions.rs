//! What the dashboard changes: a rollout's pause, resume, abort, retry,
//! promote, approve and reject, and a rollback to a kept release. The
//! coordinator checks the operator's role on each, as for the CLI; a
//! refusal is shown in its words, with the status it maps to.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use cutover_proto::v1 as pb;
use serde::Deserialize;

use super::pages::{encode, plain_page, PageError};
use super::Ui;

#[derive(Deserialize)]
pub struct ControlForm {
    action: String,
    #[serde(default)]
    comment: String,
}

fn action_of(name: &str) -> Option<pb::RolloutAction> {
    use pb::RolloutAction as A;
    Some(match name {
        "pause" => A::Pause,
        "resume" => A::Resume,
        "abort" => A::Abort,
        "retry" => A::Retry,
        "promote" => A::Promote,
        "promote-full" => A::PromoteFull,
        "approve" => A::Approve,
        "reject" => A::Reject,
        _ => return None,
    })
}

/// Back to the page that asked (`to` from the dashboard's root), which
/// shows the change live.
fn see(ui: &Ui, to: &str) -> Response {
    let location = format!("{}{to}", ui.guard.base());
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

fn refused(e: PageError, back: &str) -> Response {
    let text = format!("{} (back: {back})", e.message);
    (e.status, plain_page("Refused", &text)).into_response()
}

pub async fn control_rollout(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    Form(form): Form<ControlForm>,
) -> Response {
    let back = format!("/rollouts/{}", encode(&id));
    let Some(action) = action_of(&form.action) else {
        let e = PageError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "{:?} is not a rollout action; the actions are pause, resume, abort, retry, promote, promote-full, approve and reject",
                form.action
            ),
        };
        return refused(e, &back);
    };
    let request = pb::ControlRolloutRequest {
        id,
        action: action as i32,
        comment: form.comment,
    };
    match ui.client().control_rollout(request).await {
        Ok(_) => see(&ui, &back),
        Err(status) => refused(PageError::from_status(status), &back),
    }
}

#[derive(Deserialize)]
pub struct RollbackForm {
    env: String,
    service: String,
    to: String,
}

pub async fn rollback(State(ui): State<Arc<Ui>>, Form(form): Form<RollbackForm>) -> Response {
    let back = format!(
        "/releases?env={}&service={}",
        encode(&form.env),
        encode(&form.service)
    );
    let request = pb::RollbackRequest {
        env: form.env,
        service: form.service,
        to_release: form.to,
        ..Default::default()
    };
    match ui.client().rollback(request).await {
        Ok(response) => match response.into_inner().rollouts.first() {
            Some(rollout) => see(&ui, &format!("/rollouts/{}", encode(&rollout.id))),
            None => see(&ui, &back),
        },
        Err(status) => refused(PageError::from_status(status), &back),
    }
}
