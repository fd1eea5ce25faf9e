//! A real HAProxy in front of 4 nodes (`cutover dev up`): with the
//! environment's `load_balancer`, a rolling deploy with max_unavailable = 1
//! drains each node's server through HAProxy's runtime API for its cutover,
//! one at a time, and makes it ready again, with no request failing through
//! HAProxy; a canary at 10 % on the 4 nodes' proxies gets 10 % ± 2 % of the
//! requests that come through HAProxy, each client kept on one version.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_integration_tests::canary::{
    analysed_spec, awaits_promotion, newest_id, one_version_each, share_of, succeeded, Client,
    Fixture, Shoppers,
};
use cutover_integration_tests::haproxy::{self, Haproxy, BACKEND};
use cutover_integration_tests::{body, http_get_with, text};

const NODES: u8 = 4;

/// The spec's load balancer: the dev cluster's environment `local`.
fn load_balancer(api: &str) -> String {
    format!(
        r#"
[environments.local.load_balancer]
kind = "haproxy"
runtime_api = "{api}"
backends = {{ web = "{BACKEND}" }}
drain_timeout = "5s"
"#
    )
}

#[test]
fn haproxy_drains_each_node_for_its_cutover_and_splits_a_canary_across_four_nodes() {
    let f = Fixture::with_nodes(NODES);
    let servers: Vec<(String, String)> = (0..NODES as usize)
        .map(|i| (format!("node-{}", i + 1), f.node(i)))
        .collect();
    let haproxy = Haproxy::start(&servers);
    let tail = load_balancer(&haproxy.api);
    let rolling = "batch = 1\nmax_unavailable = 1\nmin_healthy_time = \"1s\"";
    let deploy = |version: &str, strategy: &str| {
        let spec = analysed_spec(f.port, version, "", strategy, &tail);
        f.cluster.deploy_spec(&spec, version, &["--wait"])
    };
    succeeded(&deploy("v1", rolling));
    haproxy.wait_all_up();
    assert!(haproxy.servers().iter().all(|s| !s.drained));

    // v2 rolls one node at a time under load through HAProxy: each node's
    // server is drained there for its cutover, never two at once.
    let watching = Arc::new(AtomicBool::new(true));
    let seen: Arc<Mutex<Vec<BTreeSet<String>>>> = Arc::default();
    let watcher = {
        let (watching, seen) = (watching.clone(), seen.clone());
        let api = haproxy.api.clone();
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                let drained: BTreeSet<String> = haproxy::servers(&api)
                    .into_iter()
                    .filter(|s| s.drained)
                    .map(|s| s.name)
                    .collect();
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&drained) {
                    seen.push(drained);
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let shoppers = Shoppers::at(std::slice::from_ref(&haproxy.frontend));
    succeeded(&deploy("v2", rolling));
    let answers = shoppers.finish();
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let drained_once: BTreeSet<&String> = seen.iter().flatten().collect();
    assert_eq!(
        drained_once.len(),
        NODES as usize,
        "each server drained: {seen:?}"
    );
    assert!(seen.iter().all(|d| d.len() <= 1), "one at a time: {seen:?}");
    assert!(
        seen.last().is_some_and(BTreeSet::is_empty),
        "all back: {seen:?}"
    );
    let failed: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(answers.len() > 100, "{} answers", answers.len());
    let rollout = f.cluster.newest_rollout();
    assert_eq!(rollout["state"], "succeeded", "{rollout:#}");
    let events = text(&f.cluster.cutover(&["events", "--limit", "1000"]).stdout);
    for node in 1..=NODES {
        for what in ["drained in HAProxy", "ready in HAProxy"] {
            let line = format!("{BACKEND}/node-{node} {what}");
            assert!(
                events.contains(&line),
                "no {line:?} in the events:\n{events}"
            );
        }
    }

    // A canary at 10 % on every node: through HAProxy's round robin, a
    // tenth of 10,000 requests from 1,000 clients reach v3, and each client
    // one version whichever node HAProxy picked.
    let canary = "kind = \"canary\"\nsteps = [{ set_weight = 10 }, { pause = {} }]\nmin_healthy_time = \"1s\"\nabort_scale_down_delay = \"1s\"";
    awaits_promotion(&deploy("v3", canary));
    let id = newest_id(&f);
    let clients: Vec<Client> = Client::many(1_000);
    let seen = through(&haproxy, &clients);
    let versions = one_version_each(&seen);
    let share = share_of("v3", &versions);
    assert!(
        (0.08..=0.12).contains(&share),
        "v3 served {share:.3} of the clients"
    );
    let requests: usize = seen.iter().map(|s| s.values().sum::<usize>()).sum();
    let on_canary: usize = seen.iter().filter_map(|s| s.get("v3")).sum();
    let request_share = on_canary as f64 / requests as f64;
    assert!(
        (0.08..=0.12).contains(&request_share),
        "{on_canary} of {requests} requests on v3"
    );
    let out = f.cluster.cutover(&["rollout", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    f.wait_rollout(&id, Duration::from_secs(30), |r| r["state"] == "aborted");
    let again = through(&haproxy, &clients[..100]);
    assert!(one_version_each(&again).iter().all(|v| v == "v2"));
    assert!(
        haproxy.servers().iter().all(|s| s.weight == 1),
        "weights untouched"
    );

    // A canary on 1 of the 4 nodes at 10 %: HAProxy's weights send a tenth
    // of the requests to that node, whose proxy sends them all to v4.
    let one_node = canary.replace("kind = \"canary\"", "kind = \"canary\"\ncanary_nodes = 1");
    awaits_promotion(&deploy("v4", &one_node));
    let id = newest_id(&f);
    let mut weights: Vec<u32> = haproxy.servers().iter().map(|s| s.weight).collect();
    weights.sort_unstable();
    assert_eq!(weights, [85, 256, 256, 256], "85 for the canary node");
    let seen = through(&haproxy, &clients);
    let requests: usize = seen.iter().map(|s| s.values().sum::<usize>()).sum();
    let on_canary: usize = seen.iter().filter_map(|s| s.get("v4")).sum();
    let request_share = on_canary as f64 / requests as f64;
    assert!(
        (0.08..=0.12).contains(&request_share),
        "{on_canary} of {requests} requests on v4"
    );
    let rollout = f.rollout(&id);
    assert_eq!(rollout["canary"]["fleet_weight"], 10.0, "{rollout:#}");
    // Abort: the canary node's proxy takes all back to v2 first, then the
    // weights return to the configured ones.
    let out = f.cluster.cutover(&["rollout", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    f.wait_rollout(&id, Duration::from_secs(30), |r| r["state"] == "aborted");
    // Set back once the rollout ended (just after its state is stored).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while haproxy.servers().iter().any(|s| s.weight != 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            haproxy.servers()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = through(&haproxy, &clients[..100]);
    assert!(one_version_each(&again).iter().all(|v| v == "v2"));
}

/// Ten requests of each of `clients` through HAProxy (its address in
/// X-Forwarded-For, which HAProxy keeps and the node proxies trust), from 8
/// threads: the versions each saw.
fn through(haproxy: &Haproxy, clients: &[Client]) -> Vec<BTreeMap<String, usize>> {
    let chunk = clients.len().div_ceil(8);
    std::thread::scope(|scope| {
        let workers: Vec<_> = clients
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|client| {
                            let address = client.address();
                            let mut seen = BTreeMap::new();
                            for _ in 0..10 {
                                let answer = http_get_with(
                                    &haproxy.frontend,
                                    "/",
                                    &[("X-Forwarded-For", &address)],
                                );
                                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                                *seen.entry(body(&answer).to_string()).or_insert(0) += 1;
                            }
                            seen
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a client thread"))
            .collect()
    })
}
