//! What the dashboard changes: a rollout's pause, resume, abort, retry,
//! promote, approve and reject, and a rollback to a kept release. The
//! coordinator checks the operator's role on each, as for the CLI; a
//! refusal is shown in its words, with the status it maps to.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use cutover_proto::v1 as pb;
use maud::{html, DOCTYPE};
use serde::Deserialize;

use super::pages::{encode, PageError};
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

/// The coordinator's refusal in its words, and the way back to the page
/// that asked (`back` from the dashboard's root).
fn refused(ui: &Ui, e: PageError, back: &str) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Refused · cutover" } }
            body {
                h1 { "Refused" }
                p.refusal { (e.message) }
                p { a href=(format!("{}{back}", ui.guard.base())) { "Back" } }
            }
        }
    };
    (e.status, Html(page.into_string())).into_response()
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
        return refused(&ui, e, &back);
    };
    let request = pb::ControlRolloutRequest {
        id,
        action: action as i32,
        comment: form.comment,
    };
    match ui.client().control_rollout(request).await {
        Ok(_) => see(&ui, &back),
        Err(status) => refused(&ui, PageError::from_status(status), &back),
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
        Err(status) => refused(&ui, PageError::from_status(status), &back),
    }
}
