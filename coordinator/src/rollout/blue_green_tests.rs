//! Blue/green in the engine: every node stages, all switch together on
//! promote (or by themselves after `auto_promote_after`), a failed
//! post-promotion analysis switches all back to the release that never
//! stopped, and a promoted node keeps the old release warm.

use std::collections::BTreeMap;

use cutover_proto::v1::command;

use super::analysis_tests::counted;
use super::canary_tests::{commanded_until_done, kinds, promote, staged_with, succeed, tick};
use super::engine::{awaiting_promotion, handle, promote_refusal, Send};
use super::model::*;
use crate::analysis::run::Verdict;
use crate::strategy::{Strategy, StrategySpec};

/// The blue/green strategy of `keys` (under `[strategy]`, kind set), with
/// `[analysis.errors]`: a canary success rate of at least 99 %.
fn blue_green(keys: &str) -> Strategy {
    let analyses: BTreeMap<String, crate::analysis::AnalysisSpec> = toml::from_str(
        r#"[[errors.metrics]]
name = "success"
condition = "canary_success_rate >= 0.99"
interval = "1s"
count = 2"#,
    )
    .unwrap();
    let analyses = crate::analysis::resolve(&analyses).unwrap();
    let spec: StrategySpec = toml::from_str(&format!(
        "kind = \"blue_green\"\nmin_healthy_time = \"0s\"\n{keys}"
    ))
    .unwrap();
    spec.resolve(&analyses).unwrap()
}

fn switches(sends: &[Send]) -> Vec<(String, u32)> {
    sends
        .iter()
        .map(|s| match &s.command.kind {
            Some(command::Kind::SetTraffic(set)) => {
                (s.node_name.clone(), set.split.as_ref().unwrap().weight)
            }
            other => panic!("not a switch: {other:?}"),
        })
        .collect()
}

fn activations(sends: &[Send]) -> Vec<(String, String, u64, bool)> {
    sends
        .iter()
        .map(|s| match &s.command.kind {
            Some(command::Kind::Activate(a)) => (
                s.node_name.clone(),
                a.release.as_ref().unwrap().release_id.clone(),
                a.keep_previous_ms,
                a.keep_previous_warm,
            ),
            other => panic!("not an activation: {other:?}"),
        })
        .collect()
}

#[test]
fn every_node_stages_then_all_switch_together_and_keep_the_old_release_warm() {
    let (mut r, after_stage) = staged_with(3, blue_green("keep_warm = 1"));
    assert!(r.nodes.iter().all(|n| n.canary), "every node runs both");
    assert!(after_stage.is_empty(), "waits for promote");
    assert!(
        !awaiting_promotion(&r),
        "no node reported the new release yet"
    );
    let t = tick(&r, 30, None);
    assert!(handle(&mut r, 30, t).is_empty());
    assert!(awaiting_promotion(&r));
    let t = tick(&r, 900_000, None);
    assert!(handle(&mut r, 900_000, t).is_empty(), "however long");
    assert_eq!(r.state, RolloutState::Running);

    let sends = promote(&mut r, 900_100, false);
    assert_eq!(
        switches(&sends),
        [
            ("node-0".to_string(), 100),
            ("node-1".to_string(), 100),
            ("node-2".to_string(), 100)
        ],
        "all nodes switch in one go"
    );
    let promoted = succeed(&mut r, 900_200, &sends);
    let new = r.release.id().to_string();
    assert_eq!(
        activations(&promoted),
        (0..3)
            .map(|i| (format!("node-{i}"), new.clone(), 30_000, true))
            .collect::<Vec<_>>(),
        "promoted together, the old release kept warm"
    );
    commanded_until_done(&mut r, 900_300, promoted);
    assert_eq!(r.state, RolloutState::Succeeded, "{:?}", kinds(&r));
}

#[test]
fn a_failed_post_promotion_analysis_switches_every_node_back_to_the_running_release() {
    let (mut r, after_stage) = staged_with(
        2,
        blue_green("auto_promote_after = \"5s\"\npost_promotion_analysis = \"errors\""),
    );
    assert!(after_stage.is_empty());
    let t = tick(&r, 30, None);
    assert!(handle(&mut r, 30, t).is_empty());
    assert!(!awaiting_promotion(&r), "a timed wait goes on by itself");
    assert!(promote_refusal(&r, false).is_none(), "or on promote");
    let t = tick(&r, 5_100, None);
    let sends = handle(&mut r, 5_100, t);
    assert_eq!(
        switches(&sends).len(),
        2,
        "switched after auto_promote_after"
    );
    assert!(succeed(&mut r, 5_200, &sends).is_empty(), "analysis first");
    assert_eq!(r.analysis.len(), 1);
    // Every request now goes to the new release: 10 % fail.
    let t = counted(&r, 5_300, (0, 0), (0, 0));
    handle(&mut r, 5_300, t);
    let t = counted(&r, 6_400, (90, 10), (0, 0));
    let back = handle(&mut r, 6_400, t);
    assert_eq!(r.analysis[0].verdict, Some(Verdict::Failed));
    let previous = r.previous.as_ref().unwrap().id().to_string();
    assert_eq!(
        activations(&back),
        [
            ("node-0".to_string(), previous.clone(), 30_000, false),
            ("node-1".to_string(), previous.clone(), 30_000, false)
        ],
        "the release each node still serves takes all traffic back: a switch"
    );
    commanded_until_done(&mut r, 6_500, back);
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", kinds(&r));
}
