//! The blue/green strategy: every target node starts the new release
//! beside the serving one (health-checked and smoke-tested, taking no
//! traffic but testers' override), an optional `pre_promotion_analysis`
//! judges it, then all nodes switch their proxies together on `cutover
//! rollout promote` (or after `auto_promote_after`), an optional
//! `post_promotion_analysis` judges it serving, and the nodes keep the old
//! release warm: for `scale_down_delay`, or with `keep_warm = 1` until the
//! next deploy, so that `cutover rollback` is a switch in the proxy.
//!
//! It is a canary plan the engine already runs (`canary::Canary` on every
//! node): [analysis pre], pause, set_weight 100, [analysis post]. A
//! failure up to the promotion puts all traffic back on the old release,
//! which never stopped: a proxy table swap, no restart.

use std::collections::BTreeMap;
use std::time::Duration;

use super::canary::{Canary, CanaryStep, Sticky};
use super::{ms, BatchSize, Rolling, StrategySpec};
use crate::analysis::Analysis;

type KeyError = (String, String);

/// The blue/green settings of `spec` (kind = "blue_green") as the canary
/// plan that runs them; an error names the key (under `strategy.`).
pub(super) fn resolve(
    spec: &StrategySpec,
    min_healthy_time_ms: u64,
    analyses: &BTreeMap<String, Analysis>,
) -> Result<Canary, KeyError> {
    let canary_only = [
        ("canary_nodes", spec.canary_nodes.is_some()),
        ("steps", spec.steps.is_some()),
        ("sticky", spec.sticky.is_some()),
        ("sticky_name", spec.sticky_name.is_some()),
        ("background_analysis", spec.background_analysis.is_some()),
        // Every node switches at once: there are no batches.
        ("batch", spec.batch.is_some()),
    ];
    if let Some((key, _)) = canary_only.iter().find(|(_, written)| *written) {
        return Err((
            key.to_string(),
            "does not apply to kind = \"blue_green\": every node runs the new release beside the old one and all switch together".into(),
        ));
    }
    if spec.max_unavailable > 0 {
        return Err((
            "max_unavailable".into(),
            format!(
                "{} nodes out of the load balancer: blue/green never takes a node out, each runs both releases and switches in its proxy; remove the key or use kind = \"rolling\"",
                spec.max_unavailable
            ),
        ));
    }
    let mut steps = Vec::new();
    let mut used = BTreeMap::new();
    let mut judged_by = |key: &str, name: &Option<String>, steps: &mut Vec<CanaryStep>| {
        if let Some(name) = name {
            let template = super::canary::template(analyses, key, name)?;
            used.insert(name.clone(), template);
            steps.push(CanaryStep::Analysis(name.clone()));
        }
        Ok::<(), KeyError>(())
    };
    judged_by(
        "pre_promotion_analysis",
        &spec.pre_promotion_analysis,
        &mut steps,
    )?;
    steps.push(match spec.auto_promote_after {
        Some(after) if after.is_zero() => return Err((
            "auto_promote_after".into(),
            "must be above zero, e.g. \"10m\"; leave it out to wait for `cutover rollout promote`"
                .into(),
        )),
        after => CanaryStep::Pause(after.map(ms)),
    });
    // The switch: every node's proxy sends everything to the new release.
    steps.push(CanaryStep::SetWeight(100));
    judged_by(
        "post_promotion_analysis",
        &spec.post_promotion_analysis,
        &mut steps,
    )?;
    // Before the switch only testers reach the new release; after it the
    // old one takes nothing: the proxies have nothing to measure, or to
    // compare with.
    if let Some(name) = &spec.pre_promotion_analysis {
        if let Some(metric) = analyses[name].proxy_metric() {
            return Err((
                "pre_promotion_analysis".into(),
                format!("{name:?} measures with the node proxies (metric {}), but before the switch the new release takes only testers' requests; use a prometheus or web metric (a smoke endpoint)", metric.name),
            ));
        }
    }
    if let Some(name) = &spec.post_promotion_analysis {
        if let Some((metric, stable)) = analyses[name].reads_stable() {
            return Err((
                "post_promotion_analysis".into(),
                format!("{name:?} compares with the old release (metric {} reads {stable}), which takes no requests after the switch; write an absolute condition, e.g. canary_success_rate >= 0.99", metric.name),
            ));
        }
    }
    let keep_warm = match spec.keep_warm {
        None | Some(0) => false,
        Some(1) => true,
        Some(n) => {
            return Err((
                "keep_warm".into(),
                format!("{n} releases: a node keeps at most one previous release warm; use 0 or 1"),
            ))
        }
    };
    let override_header = super::canary::override_header(spec)?;
    Ok(Canary {
        canary_nodes: BatchSize::Percent(100),
        steps,
        // At weight 0 or 100 no client is hashed: no cookie is set.
        sticky: Sticky::ClientIp,
        sticky_name: String::new(),
        override_header,
        scale_down_delay_ms: ms(spec.scale_down_delay.unwrap_or(Duration::from_secs(30))),
        abort_scale_down_delay_ms: ms(spec
            .abort_scale_down_delay
            .unwrap_or(Duration::from_secs(30))),
        promotion: Rolling {
            batch: BatchSize::Percent(100),
            max_unavailable: 0,
            min_healthy_time_ms,
        },
        analyses: used,
        keep_warm,
        background: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::StrategyKind;

    fn resolve(keys: &str) -> Result<StrategyKind, KeyError> {
        let analyses: BTreeMap<String, crate::analysis::AnalysisSpec> = toml::from_str(
            r#"[[smoke.metrics]]
name = "ok"
provider = "web"
url = "http://127.0.0.1:9/smoke"
condition = "result >= 1"
[[errors.metrics]]
name = "success"
condition = "canary_success_rate >= 0.99"
[[relative.metrics]]
name = "latency"
condition = "canary_p99 <= 1.2 * stable_p99""#,
        )
        .unwrap();
        let analyses = crate::analysis::resolve(&analyses).unwrap();
        let spec: StrategySpec =
            toml::from_str(&format!("kind = \"blue_green\"\n{keys}")).expect("valid toml");
        spec.resolve(&analyses).map(|s| s.kind)
    }

    #[test]
    fn the_keys_make_a_plan_of_every_node_switched_at_once() {
        let StrategyKind::BlueGreen(plan) = resolve(
            r#"pre_promotion_analysis = "smoke"
            post_promotion_analysis = "errors"
            auto_promote_after = "10m"
            scale_down_delay = "1m"
            keep_warm = 1
            min_healthy_time = "3s""#,
        )
        .unwrap() else {
            panic!("blue/green")
        };
        assert_eq!(
            plan.steps,
            [
                CanaryStep::Analysis("smoke".into()),
                CanaryStep::Pause(Some(600_000)),
                CanaryStep::SetWeight(100),
                CanaryStep::Analysis("errors".into()),
            ]
        );
        assert_eq!(plan.canary_nodes, BatchSize::Percent(100));
        assert_eq!(plan.promotion.batch, BatchSize::Percent(100));
        assert_eq!(plan.promotion.max_unavailable, 0);
        assert_eq!(plan.promotion.min_healthy_time_ms, 3_000);
        assert_eq!(plan.scale_down_delay_ms, 60_000);
        assert!(plan.keep_warm && plan.analyses.len() == 2);
        // Without keys: stage, wait for promote, switch.
        let StrategyKind::BlueGreen(plain) = resolve("").unwrap() else {
            panic!("blue/green")
        };
        assert_eq!(
            plain.steps,
            [CanaryStep::Pause(None), CanaryStep::SetWeight(100)]
        );
        assert!(!plain.keep_warm);
    }

    #[test]
    fn bad_keys_name_the_key_and_the_value() {
        let cases = [
            (
                "max_unavailable = 1",
                "max_unavailable",
                "never takes a node out",
            ),
            ("batch = 2", "batch", "all switch together"),
            ("steps = [{ set_weight = 5 }]", "steps", "blue_green"),
            ("canary_nodes = \"50%\"", "canary_nodes", "every node"),
            ("keep_warm = 2", "keep_warm", "2 releases"),
            (
                "auto_promote_after = \"0s\"",
                "auto_promote_after",
                "above zero",
            ),
            (
                "post_promotion_analysis = \"smok\"",
                "post_promotion_analysis",
                "\"smok\" is not an analysis of this spec; it defines errors, relative, smoke",
            ),
            (
                "pre_promotion_analysis = \"errors\"",
                "pre_promotion_analysis",
                "\"errors\" measures with the node proxies (metric success), but before the switch",
            ),
            (
                "post_promotion_analysis = \"relative\"",
                "post_promotion_analysis",
                "(metric latency reads stable_p99), which takes no requests after the switch",
            ),
            (
                "pre_promotion_analysis = \"x\"",
                "pre_promotion_analysis",
                "\"x\" is not an analysis",
            ),
            ("override_header = \"a b\"", "override_header", "\"a b\""),
        ];
        for (keys, key, message) in cases {
            let (k, m) = resolve(keys).unwrap_err();
            assert_eq!(k, key, "{keys}: {m}");
            assert!(m.contains(message), "{keys}: {m}");
        }
        // Blue/green keys are refused for the other kinds.
        let spec: StrategySpec =
            toml::from_str("kind = \"canary\"\nsteps = [{ set_weight = 5 }]\nkeep_warm = 1")
                .unwrap();
        assert_eq!(spec.resolve(&BTreeMap::new()).unwrap_err().0, "keep_warm");
        let spec: StrategySpec = toml::from_str("auto_promote_after = \"1m\"").unwrap();
        let (key, message) = spec.resolve(&BTreeMap::new()).unwrap_err();
        assert_eq!(key, "auto_promote_after");
        assert!(message.contains("blue_green"), "{message}");
    }
}
