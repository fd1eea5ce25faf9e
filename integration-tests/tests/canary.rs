//! Canary rollouts on real binaries (`cutover dev up`), driven through the
//! CLI: the node proxies split the traffic by weight with sticky cohorts,
//! a CI job's `deploy --wait` stops at a pause with exit code 3, the split
//! survives a coordinator and an agent SIGKILL, `promote` finishes the
//! rollout, `abort` returns every request to stable, `retry` starts it
//! again, and a canary that turns sick is rolled back by itself.

use std::time::{Duration, Instant};

use cutover_integration_tests::canary::{
    awaits_promotion, newest_id, one_version_each, share_of, succeeded, Client, Fixture,
};
use cutover_integration_tests::{body, field, http_get_with, running, sigkill, text, versions};
use serde_json::Value;

const CLIENTS: usize = 1000;

const CANARY_20: &str = r#"kind = "canary"
steps = [{ set_weight = 20 }, { pause = {} }, { set_weight = 50 }]
min_healthy_time = "1s"
scale_down_delay = "15s""#;

#[test]
fn a_canary_splits_by_sticky_cohort_survives_restarts_and_promotes() {
    let f = Fixture::up();
    let out = f.deploy("v1", "batch = 2");
    succeeded(&out);

    let out = f.deploy("v2", CANARY_20);
    awaits_promotion(&out);
    let id = newest_id(&f);
    let rollout = f.rollout(&id);
    assert_eq!(rollout["state"], "running", "{rollout:#}");
    assert_eq!(rollout["canary"]["weight"], 20, "{rollout:#}");
    assert_eq!(rollout["canary"]["awaiting_promotion"], true, "{rollout:#}");
    assert_eq!(
        rollout["canary"]["canary_nodes"].as_array().unwrap().len(),
        2
    );
    f.wait_sides("v2 healthy at weight 20 on both nodes", |s| {
        s["weight"] == 20 && s["healthy"] == true
    });

    // 10,000 requests of 1,000 clients, half of them keeping the cookie.
    let mut clients = Client::many(CLIENTS);
    let seen = f.traffic(&mut clients);
    let chosen = one_version_each(&seen);
    let share = share_of("v2", &chosen);
    eprintln!(
        "canary share at weight 20: {:.1}% of {CLIENTS} clients",
        share * 100.0
    );
    assert!((0.18..=0.22).contains(&share), "canary share {share}");
    let cookieless: Vec<String> = chosen.iter().skip(1).step_by(2).cloned().collect();
    let share = share_of("v2", &cookieless);
    assert!((0.15..=0.25).contains(&share), "cookieless share {share}");

    // Testers pick a version whatever their cohort.
    let stable_client = &clients[chosen.iter().position(|v| v == "v1").unwrap()];
    let canary_client = &clients[chosen.iter().position(|v| v == "v2").unwrap()];
    let always = [("X-Cutover-Canary", "always")];
    let never = [("X-Cutover-Canary", "never")];
    assert_eq!(f.get(0, stable_client, &always).0, "v2");
    assert_eq!(f.get(1, canary_client, &never).0, "v1");

    // The coordinator killed during the pause: the rollout stays at the
    // same step with the same weight, the proxies keep splitting.
    f.cluster.kill_and_restart_coordinator();
    let rollout = f.wait_rollout(&id, Duration::from_secs(30), |r| {
        r["canary"]["awaiting_promotion"] == true
    });
    assert_eq!(rollout["canary"]["step"], 2, "at the pause: {rollout:#}");
    assert_eq!(rollout["canary"]["weight"], 20, "{rollout:#}");
    // An agent killed and restarted: its proxy comes back with the same
    // split, every client in its cohort.
    let agent = f.cluster.pid("agent-1.pid");
    sigkill(agent);
    while running(agent) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let config = f.cluster.path("agent-1.toml").display().to_string();
    f.cluster.restart(
        "cutover-agent",
        &["--config", &config],
        "agent-1.pid",
        "agent-1.log",
    );
    f.cluster.wait_for_nodes(Duration::from_secs(30), |nodes| {
        nodes.len() == 2 && nodes.iter().all(|n| field(n, "status") == "ready")
    });
    f.wait_until_serving(0);
    let mut again: Vec<Client> = clients.iter().take(200).cloned().collect();
    let seen = f.traffic(&mut again);
    assert_eq!(
        one_version_each(&seen),
        chosen[..200],
        "clients changed cohorts across the restarts"
    );
    let rollout = f.rollout(&id);
    assert_eq!(rollout["state"], "running", "{rollout:#}");
    assert_eq!(rollout["canary"]["weight"], 20, "{rollout:#}");

    // Promote: weight 50, then the canary nodes' batch; the stable release
    // stays warm for scale_down_delay, then stops.
    let out = f.cluster.cutover(&["rollout", "promote", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = f.cluster.cutover(&["rollout", "watch", &id]);
    succeeded(&out);
    assert_eq!(f.rollout(&id)["state"], "succeeded");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
    f.wait_sides("v1 kept warm, out of the traffic, until retired", |s| {
        s["weight"] == 0 && s["retire_at"].is_string()
    });
    f.wait_sides("v1 retired", Value::is_null);
    // Everyone is on v2 now, whatever their cohort was.
    let mut sample: Vec<Client> = clients.iter().take(50).cloned().collect();
    let seen = f.traffic(&mut sample);
    assert!(one_version_each(&seen).iter().all(|v| v == "v2"));
}

#[test]
fn an_abort_returns_every_request_to_stable_and_a_sick_canary_rolls_back() {
    let f = Fixture::up();
    let out = f.deploy("v1", "batch = 2");
    succeeded(&out);
    let half = r#"kind = "canary"
steps = [{ set_weight = 50 }, { pause = {} }]
abort_scale_down_delay = "2s""#;
    let out = f.deploy("v2", half);
    awaits_promotion(&out);
    let id = newest_id(&f);

    // Cookieless clients from 200 addresses, half of them on the canary,
    // until the first pass after the abort in which all got stable.
    let clients = Client::many(200);
    let pass = |f: &Fixture, canary: &str| -> usize {
        clients
            .iter()
            .enumerate()
            .filter(|(i, c)| f.get(i % 2, c, &[]).0 == canary)
            .count()
    };
    let before = pass(&f, "v2");
    assert!(
        (60..=140).contains(&before),
        "{before} of 200 on the canary"
    );
    let asked = Instant::now();
    let out = f.cluster.cutover(&["rollout", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut passes = 0;
    while pass(&f, "v2") > 0 {
        passes += 1;
        assert!(
            passes < 100,
            "requests still reach the canary after the abort"
        );
    }
    eprintln!(
        "abort at 50%: every request on stable {:?} after the abort was asked ({passes} mixed passes)",
        asked.elapsed()
    );
    let rollout = f.wait_rollout(&id, Duration::from_secs(30), |r| r["state"] == "aborted");
    assert_eq!(rollout["canary"]["weight"], 0, "{rollout:#}");
    // The canary stays up for abort_scale_down_delay (for debugging), out
    // of the traffic, then stops.
    f.wait_sides("the canary out of the traffic", |s| {
        s.is_null() || s["weight"] == 0
    });
    f.wait_sides("the canary retired", Value::is_null);
    assert_eq!(versions(f.port, 2), ["v1", "v1"]);

    // Retried, the aborted deploy starts again from its first step as a
    // new rollout; promoted in full, it ends on v2.
    let out = f.cluster.cutover(&["rollout", "retry", &id, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let retry: Value = serde_json::from_slice(&out.stdout).unwrap();
    let retry_id = retry["id"].as_str().unwrap().to_string();
    assert_ne!(retry_id, id);
    let rollout = f.wait_rollout(&retry_id, Duration::from_secs(60), |r| {
        r["canary"]["awaiting_promotion"] == true
    });
    assert_eq!(rollout["canary"]["weight"], 50, "{rollout:#}");
    let out = f
        .cluster
        .cutover(&["rollout", "promote", &retry_id, "--full"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rollout = f.wait_rollout(&retry_id, Duration::from_secs(60), |r| {
        r["state"] != "running"
    });
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);

    // A canary that turns sick while it takes traffic is rolled back by
    // itself; its clients return to v2.
    let out = f.deploy("v3", half);
    awaits_promotion(&out);
    let id = newest_id(&f);
    for i in 0..2 {
        let answer = http_get_with(&f.node(i), "/sick", &[("X-Cutover-Canary", "always")]);
        assert_eq!(body(&answer), "now sick");
    }
    let rollout = f.wait_rollout(&id, Duration::from_secs(60), |r| {
        matches!(
            r["state"].as_str(),
            Some("rolled_back" | "failed" | "succeeded" | "aborted")
        )
    });
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert!(
        rollout["error"].to_string().contains("health"),
        "the cause names the health check: {rollout:#}"
    );
    assert_eq!(pass(&f, "v3"), 0, "every client back on v2");
    assert_eq!(versions(f.port, 2), ["v2", "v2"]);
}
