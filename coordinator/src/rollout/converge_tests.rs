//! The converger's decisions, node by node and outcome by outcome.

use super::*;
use crate::rollout::model::StoredRelease;
use crate::spec::{BatchSize, Strategy};
use crate::store::{NodeRecord, ServiceStatus, StoppedBy};
use cutover_proto::v1 as pb;

fn release(id: &str, state: ReleaseState, current: bool, at: i64) -> ReleaseRecord {
    ReleaseRecord {
        app: "shop".into(),
        env: "production".into(),
        service: "web".into(),
        release: StoredRelease(pb::Release {
            release_id: id.into(),
            service: "web".into(),
            ..Default::default()
        }),
        state,
        current,
        deployed_by: "operator/root".into(),
        deployed_at_ms: at,
        rollout_id: format!("web-{at}"),
        selector: [("env".to_string(), "production".to_string())].into(),
        strategy: Strategy {
            prepare_parallelism: 1,
            ..Strategy::rolling(BatchSize::Count(1), 0, 0)
        },
        note: String::new(),
        migration: None,
        current_since_ms: 0,
        current_until_ms: 0,
        promoted_from: String::new(),
        config: Default::default(),
    }
}

fn node(id: &str, env: &str, runs: &str, connected: bool) -> NodeView {
    NodeView {
        record: NodeRecord {
            id: id.into(),
            name: id.into(),
            address: "10.0.0.1".into(),
            labels: [("env".to_string(), env.to_string())].into(),
            agent_version: String::new(),
            agent_build: String::new(),
            capabilities: Vec::new(),
            status: NodeStatus::Ready,
            registered_at_ms: 0,
            last_seen_ms: 0,
            figures: None,
            services: (!runs.is_empty())
                .then(|| ServiceStatus {
                    service: "web".into(),
                    release_id: runs.into(),
                    running: true,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            // After every outcome the tests record (`ended`).
            services_at_ms: 1_000,
            cert_serial: String::new(),
            cert_expires_at_ms: 0,
            cert_ca: String::new(),
            trust_bundle: String::new(),
        },
        connected,
        heartbeat_age: Duration::ZERO,
        revoked: false,
    }
}

#[test]
fn only_connected_nodes_of_the_environment_on_another_release_are_converged() {
    let v1 = release("web-v1", ReleaseState::Stable, true, 1);
    let history = [
        v1.clone(),
        release("web-v2", ReleaseState::Failed, false, 2),
    ];
    let fleet = [
        node("on-v1", "production", "web-v1", true),
        node("on-v2", "production", "web-v2", true),
        node("on-v2-gone", "production", "web-v2", false),
        node("staging-on-v2", "staging", "web-v2", true),
        node("never-ran-web", "production", "", true),
    ];
    let mut backoff = Backoff::new();
    let now = Instant::now();
    let (drifted, due) = decide(&Want::from(&v1), None, &history, &fleet, &mut backoff, now);
    assert_eq!(drifted, 2);
    assert_eq!(due, ["on-v2"]);

    // Tried again only after the backoff, then after twice as long.
    let soon = now + FIRST_RETRY - Duration::from_secs(1);
    assert!(
        decide(&Want::from(&v1), None, &history, &fleet, &mut backoff, soon)
            .1
            .is_empty()
    );
    let later = now + FIRST_RETRY;
    assert_eq!(
        decide(
            &Want::from(&v1),
            None,
            &history,
            &fleet,
            &mut backoff,
            later
        )
        .1,
        ["on-v2"]
    );
    let after_one_wait = later + FIRST_RETRY;
    assert!(
        decide(
            &Want::from(&v1),
            None,
            &history,
            &fleet,
            &mut backoff,
            after_one_wait
        )
        .1
        .is_empty(),
        "the second wait is twice as long"
    );
    let after_two = later + FIRST_RETRY * 2;
    assert_eq!(
        decide(
            &Want::from(&v1),
            None,
            &history,
            &fleet,
            &mut backoff,
            after_two
        )
        .1,
        ["on-v2"]
    );

    // Once converged, its backoff is forgotten.
    let fleet = [node("on-v2", "production", "web-v1", true)];
    assert_eq!(
        decide(
            &Want::from(&v1),
            None,
            &history,
            &fleet,
            &mut backoff,
            after_two
        )
        .0,
        0
    );
    assert!(backoff.is_empty());
}

#[test]
fn fleets_an_operator_left_mixed_are_left_alone() {
    let v1 = release("web-v1", ReleaseState::Stable, true, 1);
    let fleet = [node("on-v2", "production", "web-v2", true)];
    let aborted = [
        v1.clone(),
        release("web-v2", ReleaseState::Aborted, false, 2),
    ];
    let mut manual = release("web-v2", ReleaseState::Failed, false, 2);
    manual.strategy.auto_rollback = false;
    let no_auto_rollback = [v1.clone(), manual];
    for history in [&aborted[..], &no_auto_rollback[..]] {
        let (drifted, due) = decide(
            &Want::from(&v1),
            None,
            history,
            &fleet,
            &mut Backoff::new(),
            Instant::now(),
        );
        assert_eq!((drifted, due.len()), (0, 0), "{history:?}");
    }
    // An older abort does not hold back a later stable release.
    let later = [
        release("web-v2", ReleaseState::Aborted, false, 1),
        release("web-v3", ReleaseState::Stable, true, 2),
    ];
    let (_, due) = decide(
        &Want::from(&later[1]),
        None,
        &later,
        &fleet,
        &mut Backoff::new(),
        Instant::now(),
    );
    assert_eq!(due, ["on-v2"]);
}

fn ended(kind: RolloutKind, state: RolloutState, auto_rollback: bool) -> ServiceOutcome {
    ServiceOutcome {
        env: "production".into(),
        service: "web".into(),
        rollout_id: "web-9".into(),
        kind,
        state,
        auto_rollback,
        at_ms: 9,
        returned: false,
        refused: Vec::new(),
        stopped: kind.stops().then(|| StoppedBy {
            rollout_id: "web-9".into(),
            removed: kind == RolloutKind::Remove,
        }),
    }
}

/// A node whose agent refused the release it was to return to is
/// drifted (it says so in the metric) but not converged; once an
/// outcome no longer names it, it is again.
#[test]
fn a_node_that_refused_its_return_is_left_until_the_next_rollout() {
    let v1 = release("web-v1", ReleaseState::Stable, true, 1);
    let history = [
        v1.clone(),
        release("web-v2", ReleaseState::Reverted, false, 2),
    ];
    let fleet = [
        node("refused", "production", "web-v2", true),
        node("lost", "production", "web-v2", true),
    ];
    let rollback = ServiceOutcome {
        refused: vec!["refused".into()],
        ..ended(RolloutKind::Rollback, RolloutState::Failed, true)
    };
    let now = Instant::now();
    let (drifted, due) = decide(
        &Want::from(&v1),
        Some(&rollback),
        &history,
        &fleet,
        &mut Backoff::new(),
        now,
    );
    assert_eq!(drifted, 2);
    assert_eq!(
        due,
        ["lost"],
        "the node whose return is not known converges"
    );

    let next = ended(RolloutKind::Deploy, RolloutState::Succeeded, true);
    let (_, due) = decide(
        &Want::from(&v1),
        Some(&next),
        &history,
        &fleet,
        &mut Backoff::new(),
        now,
    );
    assert_eq!(due, ["refused", "lost"]);
}

#[test]
fn a_stopped_service_is_stopped_where_it_runs_again_unless_the_stop_was_aborted() {
    let v1 = release("web-v1", ReleaseState::Stable, true, 1);
    let nothing = Want {
        release: "",
        ..Want::from(&v1)
    };
    let fleet = [
        node("runs-it", "production", "web-v1", true),
        node("stopped", "production", "", true),
        node("away", "production", "web-v1", false),
        node("staging", "staging", "web-v1", true),
    ];
    let decide_after = |last: ServiceOutcome| {
        decide(
            &nothing,
            Some(&last),
            &[],
            &fleet,
            &mut Backoff::new(),
            Instant::now(),
        )
    };
    let due = (2, vec!["runs-it".to_string()]);
    assert_eq!(
        decide_after(ended(RolloutKind::Stop, RolloutState::Succeeded, false)),
        due
    );
    // What a stop could not stop is no one's choice: it goes too.
    assert_eq!(
        decide_after(ended(RolloutKind::Remove, RolloutState::Failed, false)),
        due
    );
    assert_eq!(
        decide_after(ended(RolloutKind::Stop, RolloutState::Aborted, false)),
        (0, Vec::new()),
        "an aborted stop leaves what it left"
    );
}

#[test]
fn a_heartbeat_from_before_the_newest_rollout_ended_is_not_drift() {
    let v1 = release("web-v1", ReleaseState::Stable, true, 1);
    let history = [v1.clone()];
    let mut stale = node("n", "production", "web-v2", true);
    // A canary's abort, which returned every node.
    let returned = ServiceOutcome {
        at_ms: 2_000,
        returned: true,
        ..ended(RolloutKind::Deploy, RolloutState::Aborted, true)
    };
    let (drifted, due) = decide(
        &Want::from(&v1),
        Some(&returned),
        &history,
        std::slice::from_ref(&stale),
        &mut Backoff::new(),
        Instant::now(),
    );
    assert_eq!((drifted, due), (0, Vec::<String>::new()));
    // The next heartbeat still shows v2: that is drift.
    stale.record.services_at_ms = 2_500;
    let (drifted, due) = decide(
        &Want::from(&v1),
        Some(&returned),
        &history,
        &[stale],
        &mut Backoff::new(),
        Instant::now(),
    );
    assert_eq!((drifted, due), (1, vec!["n".to_string()]));
}

#[test]
fn the_newest_rollout_of_any_kind_says_whether_the_operator_chose_the_mix() {
    // A rollback from v2 to v1 aborted half-way: v2 stays current, and
    // the nodes already back on v1 are the operator's doing.
    let v2 = release("web-v2", ReleaseState::Stable, true, 2);
    let history = [
        release("web-v1", ReleaseState::Stable, false, 1),
        v2.clone(),
    ];
    let fleet = [node("on-v1", "production", "web-v1", true)];
    let decide_after = |last: ServiceOutcome| {
        decide(
            &Want::from(&v2),
            Some(&last),
            &history,
            &fleet,
            &mut Backoff::new(),
            Instant::now(),
        )
    };
    let rollback_aborted = ended(RolloutKind::Rollback, RolloutState::Aborted, true);
    assert_eq!(decide_after(rollback_aborted), (0, Vec::new()));
    let rollback_failed_by_hand = ended(RolloutKind::Rollback, RolloutState::Failed, false);
    assert_eq!(decide_after(rollback_failed_by_hand), (0, Vec::new()));
    let converge_aborted = ended(RolloutKind::Converge, RolloutState::Aborted, false);
    assert_eq!(decide_after(converge_aborted), (0, Vec::new()));
    // A convergence that failed is tried again; a partition that left a
    // rollback incomplete is repaired.
    let converge_failed = ended(RolloutKind::Converge, RolloutState::Failed, false);
    assert_eq!(decide_after(converge_failed).1, ["on-v1"]);
    let deploy_failed = ended(RolloutKind::Deploy, RolloutState::Failed, true);
    assert_eq!(decide_after(deploy_failed).1, ["on-v1"]);
    // A canary's abort returned its nodes: no mix was chosen.
    let canary_aborted = ServiceOutcome {
        returned: true,
        ..ended(RolloutKind::Deploy, RolloutState::Aborted, true)
    };
    assert_eq!(decide_after(canary_aborted).1, ["on-v1"]);
    // The outcome outweighs an older aborted deploy in the history.
    let history = [
        release("web-v3", ReleaseState::Aborted, false, 3),
        v2.clone(),
    ];
    let rolled_back = ended(RolloutKind::Rollback, RolloutState::Succeeded, true);
    let (_, due) = decide(
        &Want::from(&v2),
        Some(&rolled_back),
        &history,
        &fleet,
        &mut Backoff::new(),
        Instant::now(),
    );
    assert_eq!(due, ["on-v1"]);
}
