//! Blue/green on real binaries (`cutover dev up`, 2 nodes, under load):
//! both nodes run the new release beside the old one without traffic,
//! switch together on promote, a failed post-promotion analysis switches
//! them back to the release that never stopped (no process started, no
//! request lost in the switch), and with keep_warm the previous release
//! keeps running so that `cutover rollback` is a switch in the proxies
//! (no process started; how fast: integration-tests/bench/blue_green.sh).

use std::collections::BTreeMap;

use cutover_integration_tests::canary::{
    analysed_spec, awaits_promotion, newest_id, succeeded, Fixture, Shoppers, ERRORS_ANALYSIS,
};
use cutover_integration_tests::{body, http_get_with, text, versions};

const BLUE_GREEN: &str = r#"kind = "blue_green"
keep_warm = 1
post_promotion_analysis = "errors"
min_healthy_time = "1s"
abort_scale_down_delay = "1s""#;

/// The release ids of the processes running, by version ("v1", ...).
fn processes(f: &Fixture) -> BTreeMap<String, Vec<u32>> {
    f.release_processes()
        .into_iter()
        .map(|(release, pids)| {
            let version = release.split('-').nth(1).unwrap_or_default().to_string();
            (version, pids)
        })
        .collect()
}

/// Answers that were not a release's own: refused, reset or a proxy's 502.
fn lost(answers: &[(u16, String)]) -> Vec<&(u16, String)> {
    answers
        .iter()
        .filter(|(status, body)| !(*status == 200 || (*status == 500 && body == "failed")))
        .collect()
}

#[test]
fn blue_green_switches_together_switches_back_on_a_failed_analysis_and_rolls_back_warm() {
    let f = Fixture::up();
    let deploy = |version: &str, env: &str, args: &[&str]| {
        let spec = analysed_spec(f.port, version, env, BLUE_GREEN, ERRORS_ANALYSIS);
        f.cluster.deploy_spec(&spec, version, args)
    };
    // A first deploy has nothing to stand beside: it rolls out.
    succeeded(&deploy("v1", "", &["--wait"]));

    // v2 starts beside v1 on both nodes and takes nothing but testers'
    // requests; the deploy stops at the wait for promotion (exit 3).
    let shoppers = Shoppers::start(&f);
    let out = deploy("v2", "", &["--wait"]);
    awaits_promotion(&out);
    let id = newest_id(&f);
    let staged = processes(&f);
    assert_eq!(
        (staged["v1"].len(), staged["v2"].len()),
        (2, 2),
        "{staged:?}"
    );
    assert_eq!(versions(f.port, 2), ["v1", "v1"]);
    let tester = http_get_with(&f.node(1), "/", &[("X-Cutover-Canary", "always")]);
    assert_eq!(body(&tester), "v2");

    // Promote: both switch, the analysis passes, v1 stays warm.
    let out = f.cluster.cutover(&["rollout", "promote", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    succeeded(&f.cluster.cutover(&["rollout", "watch", &id]));
    let rollout = f.rollout(&id);
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["analysis"][0]["state"], "successful", "{rollout:#}");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
    f.wait_sides("v1 kept warm", |s| {
        s["release"].as_str().is_some_and(|r| r.contains("-v1-"))
            && s["weight"] == 0
            && s["kept_warm"] == true
    });
    assert_eq!(
        processes(&f),
        staged,
        "the switch started and stopped nothing"
    );

    // v3 errs once in ten requests after the switch: the post-promotion
    // analysis fails and every node switches back to v2, still running.
    let out = deploy("v3", "FAIL_PERCENT = \"10\"", &["--wait"]);
    awaits_promotion(&out);
    let v3 = newest_id(&f);
    let with_v3 = processes(&f);
    assert_eq!(with_v3["v3"].len(), 2, "{with_v3:?}");
    assert!(
        !with_v3.contains_key("v1"),
        "the stage replaced warm v1: {with_v3:?}"
    );
    let out = f.cluster.cutover(&["rollout", "promote", &v3]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = f.cluster.cutover(&["rollout", "watch", &v3]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let rollout = f.rollout(&v3);
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    let error = rollout["error"].to_string();
    assert!(error.contains("analysis errors failed"), "{error}");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
    assert_eq!(
        processes(&f)["v2"],
        with_v3["v2"],
        "v2 took the traffic back without a restart"
    );

    // v4 promoted keeps v2 warm: the rollback to v2 is a switch in the
    // proxies.
    let out = deploy("v4", "", &["--wait"]);
    awaits_promotion(&out);
    let v4 = newest_id(&f);
    let out = f.cluster.cutover(&["rollout", "promote", &v4]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    succeeded(&f.cluster.cutover(&["rollout", "watch", &v4]));
    let before = processes(&f);
    assert_eq!(before["v2"], with_v3["v2"], "v2 kept warm: {before:?}");
    let out = f
        .cluster
        .cutover(&["rollback", "web", "--env", "local", "--wait"]);
    succeeded(&out);
    let answers = shoppers.finish();
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
    let after = processes(&f);
    assert_eq!(after["v2"], before["v2"], "the rollback started no process");
    // A switch in the proxies: no process started (above), both nodes
    // switched by the rollback (how fast: integration-tests/bench/
    // blue_green.sh).
    let back = f.rollout(&newest_id(&f));
    assert_eq!(back["kind"], "rollback", "{back:#}");
    assert_eq!(back["state"], "succeeded", "{back:#}");
    let switched = back["timeline"]
        .as_array()
        .expect("a timeline")
        .iter()
        .filter(|t| t["kind"] == "node_switched")
        .count();
    assert_eq!(switched, 2, "{back:#}");
    assert!(
        lost(&answers).is_empty(),
        "{:?} of {}",
        lost(&answers),
        answers.len()
    );
    assert!(answers.len() > 100, "{} answers", answers.len());
}
