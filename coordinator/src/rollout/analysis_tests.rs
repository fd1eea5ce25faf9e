//! A canary's analysis steps in the engine: proxy samples from the canary
//! nodes' heartbeats, measurements the driver takes, and what each verdict
//! does to the rollout.

use std::collections::BTreeMap;

use super::canary_tests::{
    canary, commanded_until_done, kinds, promote, staged_with, succeed, tick, weights,
};
use super::engine::{awaiting_promotion, external_due, handle, Input};
use super::model::*;
use crate::analysis::run::Verdict;
use crate::analysis::{Analysis, Metric, Provider};
use crate::store::Traffic;
use crate::strategy::canary::CanaryStep;
use crate::strategy::{BatchSize, Strategy, StrategyKind};

/// A canary of `steps` on 2 of 2 nodes whose analysis "errors" has
/// `metric`.
fn strategy(steps: Vec<CanaryStep>, metric: Metric) -> Strategy {
    let mut strategy = canary(BatchSize::Count(2), steps);
    let StrategyKind::Canary(c) = &mut strategy.kind else {
        unreachable!("a canary")
    };
    c.analyses = BTreeMap::from([(
        "errors".to_string(),
        Analysis {
            name: "errors".into(),
            metrics: vec![metric],
        },
    )]);
    strategy
}

fn proxy_metric(condition: &str, min_requests: u64) -> Metric {
    Metric {
        name: "success".into(),
        provider: Provider::Proxy,
        condition: condition.into(),
        interval_ms: 1_000,
        count: 2,
        failure_limit: 0,
        inconclusive_limit: 0,
        min_requests,
    }
}

/// Totals of `ok` 2xx and `errors` 5xx answers of `release`, all fast.
pub(super) fn traffic(release: &str, ok: u64, errors: u64) -> Option<Traffic> {
    Some(Traffic {
        release_id: release.into(),
        requests: ok + errors,
        by_class: vec![0, ok, 0, 0, errors],
        upstream_failures: 0,
        latency_bounds_ms: vec![5, 10],
        latency_cumulative: vec![ok + errors; 3],
        latency_sum_us: 0,
    })
}

/// A tick whose canary nodes each report `canary` and `stable` totals.
pub(super) fn counted(r: &Rollout, now: i64, canary: (u64, u64), stable: (u64, u64)) -> Input {
    let mut input = tick(r, now, None);
    let Input::Tick { nodes } = &mut input else {
        unreachable!()
    };
    for seen in nodes {
        let service = seen.service.as_mut().expect("a service");
        service.traffic = traffic(&service.release_id, stable.0, stable.1);
        if let Some(side) = service.side.as_mut() {
            side.traffic = traffic(&side.release_id, canary.0, canary.1);
        }
    }
    input
}

/// Staged with the first step (weight 20) applied: the analysis begins
/// (at 30), its first tick takes the totals its first window starts from.
fn at_analysis(strategy: Strategy) -> Rollout {
    let (mut r, sets) = staged_with(2, strategy);
    assert_eq!(weights(&sets), [20, 20]);
    assert!(succeed(&mut r, 30, &sets).is_empty());
    assert_eq!(r.analysis.len(), 1, "{:?}", kinds(&r));
    assert_eq!(r.analysis[0].started_at_ms, 30);
    r
}

#[test]
fn a_canary_returning_errors_fails_its_analysis_and_every_node_returns_to_stable() {
    let steps = vec![
        CanaryStep::SetWeight(20),
        CanaryStep::Analysis("errors".into()),
        CanaryStep::Pause(None),
    ];
    let mut r = at_analysis(strategy(
        steps,
        proxy_metric("canary_success_rate >= 0.99", 0),
    ));
    // The heartbeats right after the step began were sent before the
    // canary showed in them: no node to count yet.
    let mut t = tick(&r, 50, None);
    let Input::Tick { nodes } = &mut t else {
        unreachable!()
    };
    for seen in nodes {
        seen.last_seen_ms = 0;
        seen.service.as_mut().unwrap().side = None;
    }
    assert!(handle(&mut r, 50, t).is_empty());
    // Each node's first window starts when it is first seen, whatever was
    // counted before.
    let t = counted(&r, 100, (500, 500), (1000, 0));
    assert!(handle(&mut r, 100, t).is_empty());
    assert!(r.analysis[0].metrics[0].baseline.is_some());
    // Not due before one interval: nothing is judged.
    let t = counted(&r, 900, (545, 505), (1400, 0));
    assert!(handle(&mut r, 900, t).is_empty());
    assert!(r.analysis[0].metrics[0].samples.is_empty());
    // 90 of 100 canary answers fine on each node: 10 % errors.
    let t = counted(&r, 1_100, (590, 510), (1900, 0));
    let returns = handle(&mut r, 1_100, t);
    assert_eq!(r.analysis[0].verdict, Some(Verdict::Failed));
    let error = r.error.as_ref().expect("the rollout failed").to_string();
    assert!(
        error.contains("analysis errors failed: metric success (proxy): `canary_success_rate >= 0.99` failed in 1 of 1 samples")
            && error.contains("canary_success_rate=0.9")
            && error.contains("canary_requests=200"),
        "{error}"
    );
    let returned = commanded_until_done(&mut r, 1_200, returns);
    assert_eq!(returned, ["node-0", "node-1"], "both canary nodes return");
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", kinds(&r));
}

#[test]
fn a_successful_analysis_goes_on_and_an_inconclusive_one_waits_for_a_person() {
    let steps = vec![
        CanaryStep::SetWeight(20),
        CanaryStep::Analysis("errors".into()),
        CanaryStep::Pause(None),
    ];
    let relative = "canary_success_rate >= stable_success_rate - 0.01";
    let mut r = at_analysis(strategy(steps, proxy_metric(relative, 50)));
    let mut now = 100;
    for (canary_ok, stable_ok) in [(0, 0), (100, 400), (200, 800)] {
        let t = counted(&r, now, (canary_ok, 0), (stable_ok, 0));
        handle(&mut r, now, t);
        now += 1_000;
    }
    assert_eq!(r.analysis[0].verdict, Some(Verdict::Successful));
    let t = tick(&r, now, None);
    handle(&mut r, now, t);
    assert!(
        kinds(&r).contains(&"analysis_successful"),
        "{:?}",
        kinds(&r)
    );
    assert!(awaiting_promotion(&r), "at the pause after the analysis");

    // Too little traffic: no verdict, and a person decides.
    let steps = vec![
        CanaryStep::SetWeight(20),
        CanaryStep::Analysis("errors".into()),
        CanaryStep::SetWeight(50),
    ];
    let mut r = at_analysis(strategy(steps, proxy_metric(relative, 50)));
    let t = counted(&r, 100, (0, 0), (0, 0));
    handle(&mut r, 100, t);
    let t = counted(&r, 1_100, (10, 0), (40, 0));
    handle(&mut r, 1_100, t);
    assert_eq!(r.analysis[0].verdict, Some(Verdict::Inconclusive));
    assert!(r.analysis[0].summary.contains("fewer than min_requests 50"));
    assert!(kinds(&r).contains(&"analysis_inconclusive"));
    assert_eq!(r.state, RolloutState::Running);
    assert!(awaiting_promotion(&r));
    let sets = promote(&mut r, 1_200, false);
    assert!(kinds(&r).contains(&"promoted"), "{:?}", kinds(&r));
    assert_eq!(weights(&sets), [50, 50], "the next step");
}

#[test]
fn measurements_the_driver_takes_are_recorded_once_also_after_a_restart() {
    let steps = vec![
        CanaryStep::SetWeight(20),
        CanaryStep::Analysis("errors".into()),
    ];
    let metric = Metric {
        name: "orders".into(),
        provider: Provider::Prometheus {
            address: "http://127.0.0.1:9090".into(),
            query: "sum(orders_failed_total)".into(),
            timeout_ms: 1_000,
        },
        condition: "result < 5".into(),
        ..proxy_metric("", 0)
    };
    let mut r = at_analysis(strategy(steps, metric));
    assert!(external_due(&r, 1_000).is_empty(), "due one interval in");
    let due = external_due(&r, 1_030);
    assert_eq!((due.len(), due[0].step, due[0].sample), (1, 1, 0));
    let measured = |sample, result| Input::Measured {
        step: 1,
        metric: 0,
        sample,
        result,
    };
    handle(&mut r, 1_050, measured(0, Ok(3.0)));
    // The same sample again (a driver restarted mid-measurement): ignored.
    handle(&mut r, 1_060, measured(0, Ok(50.0)));
    assert_eq!(r.analysis[0].metrics[0].samples.len(), 1);
    // The run survives a restart as stored and goes on where it was.
    let stored = serde_json::to_string(&r).unwrap();
    let mut r: Rollout = serde_json::from_str(&stored).unwrap();
    handle(&mut r, 1_500, Input::Recover);
    // One interval after the sample before (taken at 1 050).
    assert!(external_due(&r, 2_040).is_empty());
    assert_eq!(external_due(&r, 2_050)[0].sample, 1);
    handle(
        &mut r,
        2_060,
        measured(1, Err("no answer within 1000 ms".into())),
    );
    // Out of its limit of 0 inconclusive samples.
    assert_eq!(r.analysis[0].verdict, Some(Verdict::Inconclusive));
    assert!(
        r.analysis[0].summary.contains("no answer"),
        "{}",
        r.analysis[0].summary
    );
    assert!(
        external_due(&r, 99_000).is_empty(),
        "decided: nothing more due"
    );
}

/// The background analysis runs beside the steps from its step on, one
/// run after the other: a successful run is followed by the next, and the
/// failed one aborts the canary wherever it stands (here at a pause that
/// waits for promotion).
#[test]
fn a_background_analysis_runs_beside_the_steps_and_a_failed_run_returns_every_node() {
    let steps = vec![
        CanaryStep::SetWeight(20),
        CanaryStep::Pause(None),
        CanaryStep::SetWeight(50),
    ];
    let mut strategy = strategy(steps, proxy_metric("canary_success_rate >= 0.99", 0));
    let StrategyKind::Canary(c) = &mut strategy.kind else {
        unreachable!("a canary")
    };
    c.background = Some(crate::strategy::canary::Background {
        analysis: "errors".into(),
        from_index: 0,
    });
    let (mut r, sets) = staged_with(2, strategy);
    assert!(succeed(&mut r, 30, &sets).is_empty(), "at the pause");
    let background = |r: &Rollout| {
        r.analysis
            .iter()
            .filter(|a| a.step == super::engine::BACKGROUND)
            .map(|a| a.verdict)
            .collect::<Vec<_>>()
    };
    assert_eq!(background(&r), [None], "running from step 1 on");
    // Two good windows: the run succeeds, the next begins.
    let mut now = 100;
    for (canary_ok, stable_ok) in [(0, 0), (100, 400), (200, 800)] {
        let t = counted(&r, now, (canary_ok, 0), (stable_ok, 0));
        handle(&mut r, now, t);
        now += 1_000;
    }
    assert_eq!(background(&r), [Some(Verdict::Successful), None]);
    assert!(kinds(&r).contains(&"background_analysis"));
    assert!(awaiting_promotion(&r), "the pause still waits for a person");
    // The canary turns bad: the next run's first window (on from where the
    // last one ended) fails, and the rollout with it.
    let t = counted(&r, now, (250, 50), (1_000, 0));
    let returns = handle(&mut r, now, t);
    let error = r.error.as_ref().expect("failed").to_string();
    assert!(
        error.contains("background analysis errors failed"),
        "{error}"
    );
    let returned = commanded_until_done(&mut r, now + 100, returns);
    assert_eq!(returned, ["node-0", "node-1"]);
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", kinds(&r));
}

/// Under a balancer split the canary nodes send everything to the canary:
/// the stable release's values come from the other nodes, so a condition
/// relative to stable still decides.
#[test]
fn under_a_balancer_split_stable_is_measured_on_the_other_nodes() {
    let steps = vec![
        CanaryStep::SetWeight(10),
        CanaryStep::Analysis("errors".into()),
        CanaryStep::Pause(None),
    ];
    let mut strategy = strategy(
        steps,
        proxy_metric("canary_success_rate >= stable_success_rate - 0.01", 0),
    );
    let StrategyKind::Canary(c) = &mut strategy.kind else {
        unreachable!("a canary")
    };
    c.canary_nodes = BatchSize::Count(1);
    let mut r = super::sim::rollout(3, strategy);
    r.load_balancer = Some(crate::lb::LoadBalancer {
        runtime_api: "127.0.0.1:9999".into(),
        backend: "shop_web".into(),
        server_label: None,
        drain_timeout_ms: 1_000,
    });
    let prepares = handle(&mut r, 0, Input::Start);
    let stages = succeed(&mut r, 10, &prepares);
    let sets = succeed(&mut r, 20, &stages);
    assert!(r.balancer_split);
    assert!(succeed(&mut r, 30, &sets).is_empty(), "at the analysis");
    let mut now = 100;
    for (canary_ok, stable_ok) in [(0, 0), (100, 400), (200, 800)] {
        // `counted` gives every node these totals: the canary node's side
        // its canary counts, the others' serving release the stable ones.
        let t = counted(&r, now, (canary_ok, 0), (stable_ok, 0));
        handle(&mut r, now, t);
        now += 1_000;
    }
    let run = &r.analysis[0];
    assert_eq!(run.verdict, Some(Verdict::Successful), "{run:#?}");
    let values = &run.metrics[0].samples[0].values;
    // The canary node's canary; the serving release of all three nodes:
    // the two others' and the canary node's own (which takes nothing in
    // practice under the split; `counted` gives every node the same).
    assert_eq!(values["canary_requests"], 100.0, "{values:?}");
    assert_eq!(values["stable_requests"], 1_200.0, "{values:?}");
}
