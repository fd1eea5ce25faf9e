//! Approvals (`engine/approval.rs`), decision by decision: nothing is sent
//! before the last approval, the requester and a repeated approver do not
//! count, and a rejection, an abort or the request's expiry ends the
//! rollout with nothing changed, across a coordinator restart too.

use super::engine::{approve_refusal, handle, reject_refusal, Input};
use super::engine_tests::kinds;
use super::model::*;
use super::sim::{rollout, strategy};

const EXPIRES_AT: i64 = 3_600_000;

/// A rollout of three nodes by "sim" that needs `required` approvals,
/// started (and so waiting).
fn waiting(required: u32) -> Rollout {
    let mut r = rollout(3, strategy());
    r.approval = Some(Approval {
        required,
        expires_at_ms: EXPIRES_AT,
        approvals: Vec::new(),
        rejected: None,
    });
    let sends = handle(&mut r, 0, Input::Start);
    assert!(
        sends.is_empty(),
        "nothing goes out before approval: {sends:?}"
    );
    assert_eq!(r.state, RolloutState::AwaitingApproval);
    r
}

fn approve(by: &str) -> Input {
    Input::Approve {
        by: by.into(),
        comment: format!("{by} looked"),
    }
}

#[test]
fn a_rollout_starts_only_once_others_than_its_requester_approved() {
    let mut r = waiting(2);
    let asked = r.timeline.last().unwrap();
    assert_eq!(asked.kind, "awaiting_approval");
    assert!(
        asked
            .message
            .contains("2 approval(s) by operators other than sim")
            && asked.message.contains("cutover approve web-1"),
        "{}",
        asked.message
    );

    let own = approve_refusal(&r, "sim").expect("the requester is refused");
    assert!(own.contains("sim requested rollout web-1"), "{own}");
    assert!(handle(&mut r, 10, approve("sim")).is_empty());
    assert!(r.approval.as_ref().unwrap().approvals.is_empty());

    assert!(approve_refusal(&r, "ana").is_none());
    assert!(handle(&mut r, 20, approve("ana")).is_empty(), "1 of 2");
    assert_eq!(r.state, RolloutState::AwaitingApproval);
    let twice = approve_refusal(&r, "ana").expect("ana counted once");
    assert!(twice.contains("approved rollout web-1 already"), "{twice}");
    assert!(handle(&mut r, 30, approve("ana")).is_empty());
    assert_eq!(r.approval.as_ref().unwrap().approvals.len(), 1);

    let sends = handle(&mut r, 40, approve("ben"));
    assert_eq!(r.state, RolloutState::Running);
    assert!(
        !sends.is_empty(),
        "the prepare goes out with the last approval"
    );
    assert_eq!(
        kinds(&r),
        ["awaiting_approval", "approved", "approved", "started"]
    );
    assert_eq!(r.deadline_ms, 40 + r.strategy.progress_deadline_ms as i64);
    let refused = approve_refusal(&r, "cy").expect("nothing left to approve");
    assert!(
        refused.contains("is running, not awaiting approval"),
        "{refused}"
    );
}

#[test]
fn a_rejection_ends_it_aborted_with_nothing_sent() {
    let mut r = waiting(1);
    assert!(reject_refusal(&r).is_none());
    let sends = handle(
        &mut r,
        50,
        Input::Reject {
            by: "ana".into(),
            comment: "not during the sale".into(),
        },
    );
    assert!(sends.is_empty());
    assert_eq!(r.state, RolloutState::Aborted);
    assert!(r.sent_nothing(), "no command id was ever taken");
    assert!(r.nodes.iter().all(|n| n.state == NodeState::Pending));
    let rejected = r.approval.as_ref().unwrap().rejected.as_ref().unwrap();
    assert_eq!((rejected.by.as_str(), rejected.at_ms), ("ana", 50));
    let end = r.timeline.last().unwrap();
    assert_eq!(end.message, "rejected by ana; nothing changed");
    assert!(kinds(&r).contains(&"rejected"));
    // Ended: nothing more to approve or reject.
    assert!(approve_refusal(&r, "ben").is_some());
    assert!(reject_refusal(&r).is_some());
    assert!(handle(&mut r, 60, approve("ben")).is_empty());
    assert_eq!(r.state, RolloutState::Aborted);
}

#[test]
fn an_unanswered_request_expires_and_an_abort_withdraws_it() {
    let mut r = waiting(1);
    let tick = || Input::Tick { nodes: vec![] };
    assert!(handle(&mut r, EXPIRES_AT - 1, tick()).is_empty());
    assert_eq!(r.state, RolloutState::AwaitingApproval, "not yet");
    assert!(handle(&mut r, EXPIRES_AT, tick()).is_empty());
    assert_eq!(r.state, RolloutState::Aborted);
    let end = &r.timeline.last().unwrap().message;
    assert!(
        end.contains("approval request expired") && end.contains("0 of 1"),
        "{end}"
    );

    let mut r = waiting(1);
    assert!(handle(&mut r, 5, Input::Abort { by: "sim".into() }).is_empty());
    assert_eq!(r.state, RolloutState::Aborted);
    assert!(r.sent_nothing());
    // A pause or resume of a request changes nothing.
    let mut r = waiting(1);
    handle(&mut r, 5, Input::Pause { by: "sim".into() });
    handle(&mut r, 6, Input::Resume { by: "sim".into() });
    assert_eq!(r.state, RolloutState::AwaitingApproval);
    assert!(!r.pause_requested);
}

#[test]
fn a_request_survives_a_coordinator_restart() {
    let mut r = waiting(1);
    let stored: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(stored, r, "the request is stored whole");
    r = stored;
    assert!(handle(&mut r, 100, Input::Recover).is_empty());
    assert_eq!(r.state, RolloutState::AwaitingApproval);
    let sends = handle(&mut r, 200, approve("ana"));
    assert_eq!(r.state, RolloutState::Running);
    assert!(!sends.is_empty());

    // Stored before its start (a crash right after its creation), it asks
    // on recovery.
    let mut r = rollout(2, strategy());
    r.approval = Some(Approval {
        required: 1,
        expires_at_ms: EXPIRES_AT,
        approvals: Vec::new(),
        rejected: None,
    });
    assert!(handle(&mut r, 0, Input::Recover).is_empty());
    assert_eq!(r.state, RolloutState::AwaitingApproval);
}

#[test]
fn a_rollout_without_approvals_says_so_when_approved() {
    let mut r = rollout(2, strategy());
    handle(&mut r, 0, Input::Start);
    assert_eq!(r.state, RolloutState::Running);
    let refused = approve_refusal(&r, "ana").unwrap();
    assert!(refused.contains("needs no approval"), "{refused}");
    let refused = reject_refusal(&r).unwrap();
    assert!(refused.contains("abort it instead"), "{refused}");
}
