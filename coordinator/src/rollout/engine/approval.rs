//! Approvals: a rollout in an environment with `approvals` waits, before
//! anything is sent, until that many operators other than its requester
//! approve it. A rejection, an abort or the request's expiry ends it
//! aborted with nothing changed. Who may approve at all (deployer rights
//! on the environment) is the operator API's to check; what the rollout
//! itself rules out is here, in `approve_refusal`, which the API and the
//! engine share.

use super::{finish, note};
use crate::rollout::model::{Decision, Rollout, RolloutState};

/// Why `by` cannot approve `r` now; `None` when the approval counts.
pub fn approve_refusal(r: &Rollout, by: &str) -> Option<String> {
    let id = &r.id;
    let Some(approval) = r.approval.as_ref() else {
        return Some(format!(
            "rollout {id} needs no approval: it asked for none when it was created (it is {})",
            r.state.as_str()
        ));
    };
    if r.state != RolloutState::AwaitingApproval {
        return Some(format!(
            "rollout {id} is {}, not awaiting approval: there is nothing to approve",
            r.state.as_str()
        ));
    }
    if r.created_by == by {
        return Some(format!(
            "{by} requested rollout {id} and cannot approve it: another operator with deployer rights on {} approves it (or you abort it)",
            r.env
        ));
    }
    if approval.approvals.iter().any(|a| a.by == by) {
        return Some(format!(
            "{by} approved rollout {id} already; it needs {} more approval(s) by other operators",
            approval
                .required
                .saturating_sub(approval.approvals.len() as u32)
        ));
    }
    None
}

/// Why `r` cannot be rejected now.
pub fn reject_refusal(r: &Rollout) -> Option<String> {
    (r.state != RolloutState::AwaitingApproval).then(|| {
        format!(
            "rollout {} is {}, not awaiting approval: abort it instead (`cutover rollout abort {}`)",
            r.id,
            r.state.as_str(),
            r.id
        )
    })
}

/// At the start: whether `r` waits for approvals (and now does).
pub(super) fn awaits(r: &mut Rollout, now: i64) -> bool {
    let Some(approval) = r.approval.as_ref().filter(|a| !a.granted()) else {
        return false;
    };
    let message = format!(
        "waits for {} approval(s) by operators other than {} until {}: `cutover approve {}` (or reject)",
        approval
            .required
            .saturating_sub(approval.approvals.len() as u32),
        r.created_by,
        show_time(approval.expires_at_ms),
        r.id
    );
    r.state = RolloutState::AwaitingApproval;
    note(r, now, "awaiting_approval", "", message);
    true
}

/// One more approval; the rollout starts once it has them all (the caller
/// checked `approve_refusal`). Returns whether it may start now.
pub(super) fn on_approve(r: &mut Rollout, now: i64, by: String, comment: String) -> bool {
    if approve_refusal(r, &by).is_some() {
        return false;
    }
    let approval = r.approval.as_mut().expect("checked by approve_refusal");
    approval.approvals.push(Decision {
        by: by.clone(),
        comment: comment.clone(),
        at_ms: now,
    });
    let granted = approval.granted();
    let left = approval
        .required
        .saturating_sub(approval.approvals.len() as u32);
    let message = match (comment.as_str(), granted) {
        ("", true) => format!("{by} approved"),
        ("", false) => format!("{by} approved; {left} more to go"),
        (comment, true) => format!("{by} approved: {comment}"),
        (comment, false) => format!("{by} approved: {comment}; {left} more to go"),
    };
    note(r, now, "approved", "", message);
    if granted {
        r.state = RolloutState::Pending;
    }
    granted
}

pub(super) fn on_reject(r: &mut Rollout, now: i64, by: String, comment: String) {
    if reject_refusal(r).is_some() {
        return;
    }
    let why = match comment.as_str() {
        "" => String::new(),
        comment => format!(": {comment}"),
    };
    if let Some(approval) = r.approval.as_mut() {
        approval.rejected = Some(Decision {
            by: by.clone(),
            comment,
            at_ms: now,
        });
    }
    note(r, now, "rejected", "", format!("{by} rejected it{why}"));
    finish(
        r,
        now,
        RolloutState::Aborted,
        format!("rejected by {by}; nothing changed"),
    );
}

/// A request nobody answered in time ends.
pub(super) fn expire(r: &mut Rollout, now: i64) {
    let Some(approval) = r.approval.as_ref() else {
        return;
    };
    if r.state != RolloutState::AwaitingApproval || now < approval.expires_at_ms {
        return;
    }
    let message = format!(
        "the approval request expired at {} with {} of {} approval(s); nothing changed: deploy again to ask anew",
        show_time(approval.expires_at_ms),
        approval.approvals.len(),
        approval.required
    );
    finish(r, now, RolloutState::Aborted, message);
}

/// An abort by any operator of the environment (the requester withdrawing).
pub(super) fn on_abort(r: &mut Rollout, now: i64, by: &str) {
    finish(
        r,
        now,
        RolloutState::Aborted,
        format!("{by} aborted it while it awaited approval; nothing changed"),
    );
}

/// UTC, to the second, as the timeline says it.
fn show_time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| format!("{ms} ms"))
}
