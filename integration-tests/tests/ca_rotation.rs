//! CA rotation across a cluster of real agent processes: every node moves
//! to the new CA, none is disconnected for longer than one reconnect, and
//! the old CA is trusted nowhere afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use cutover_common::identity::{certificate_facts, Role};
use cutover_common::tls::{load_certs, TlsFiles};
use cutover_integration_tests::{bin, operator_client, Cluster, Tuning};
use cutover_proto::v1::{ListNodesRequest, PingNodeRequest};

/// `cutover ARGS` with the credentials of `files`; its stdout, or a panic
/// with its stderr.
fn cutover(url: &str, files: &TlsFiles, args: &[&str]) -> String {
    let output = std::process::Command::new(bin("cutover"))
        .args(["--coordinator", url, "--ca-cert"])
        .arg(&files.ca_cert)
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .args(args)
        .output()
        .expect("run cutover");
    assert!(
        output.status.success(),
        "cutover {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Common names of the certificates in a PEM file.
fn subjects(path: &Path) -> Vec<String> {
    load_certs(path, "certificate")
        .unwrap()
        .iter()
        .map(|der| certificate_facts(der).unwrap().subject)
        .collect()
}

fn issuer(path: &Path) -> String {
    certificate_facts(&load_certs(path, "certificate").unwrap()[0])
        .unwrap()
        .issuer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_moves_every_node_without_dropping_one() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let url = cluster.url();
    let names = ["node-1", "node-2", "node-3"];
    let agents: Vec<_> = names
        .iter()
        .map(|name| cluster.spawn_agent_binary(name))
        .collect();
    let agent_files: Vec<TlsFiles> = names
        .iter()
        .map(|name| cluster.pki.files_of(Role::Agent, name))
        .collect();
    let admin = cluster.pki.client_files(Role::Operator, "root");
    // An operator who does not renew during the rotation.
    let laggard = cluster.pki.client_files(Role::Operator, "late");
    let old_ca = subjects(&cluster.pki.coordinator_files().ca_cert)[0].clone();

    cluster
        .wait_for_nodes(Duration::from_secs(20), |n| {
            n.len() == 3 && n.iter().all(|n| n.connected)
        })
        .await;
    // Opened before the rotation, with a certificate of the old CA.
    let mut watcher = operator_client(&url, &admin).await.unwrap();

    let started = cutover(&url, &admin, &["ca", "rotate", "--output", "json"]);
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    assert_eq!(started["phase"], "reissuing", "{started}");
    let new_ca = started["new_ca"].as_str().unwrap().to_string();
    assert_ne!(new_ca, old_ca);
    // The admin's own credentials moved with the call.
    assert_eq!(issuer(&admin.cert), new_ca);
    assert_eq!(subjects(&admin.ca_cert), [old_ca.clone(), new_ca.clone()]);
    // Asking again answers with the rotation in progress.
    let again: serde_json::Value = serde_json::from_str(&cutover(
        &url,
        &admin,
        &["ca", "rotate", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(again["new_ca"], new_ca.as_str());

    // Follow the rotation, each look over a fresh handshake with the
    // admin's renewed credentials: what the coordinator presents and
    // trusts must fit them in every phase.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let nodes = operator_client(&url, &admin)
            .await
            .expect("the renewed admin connects in every phase")
            .list_nodes(ListNodesRequest {})
            .await
            .expect("the renewed admin is served in every phase")
            .into_inner()
            .nodes;
        assert_eq!(nodes.len(), 3);
        let status: serde_json::Value = serde_json::from_str(&cutover(
            &url,
            &admin,
            &["ca", "status", "--output", "json"],
        ))
        .unwrap();
        if status["phase"] == "finished" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not finish: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status["retired_at"].is_string(), "{status:#}");
    let cas = status["cas"].as_array().unwrap();
    assert_eq!(cas.len(), 1, "{status:#}");
    assert_eq!(cas[0]["name"], new_ca.as_str());
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["moved"], true, "{status:#}");
        assert_eq!(node["cert_ca"], new_ca.as_str(), "{status:#}");
    }

    // On every node's own disk: a certificate of the new CA, and trust in
    // the new CA alone.
    for files in &agent_files {
        assert_eq!(issuer(&files.cert), new_ca, "{}", files.cert.display());
        assert_eq!(subjects(&files.ca_cert), std::slice::from_ref(&new_ca));
    }
    let coordinator = cluster.pki.coordinator_files();
    assert_eq!(issuer(&coordinator.cert), new_ca);
    assert_eq!(
        subjects(&coordinator.ca_cert),
        std::slice::from_ref(&new_ca)
    );

    // The connection opened before the rotation, with the old CA's
    // certificate, is refused now, though it stayed open.
    let refused = watcher.list_nodes(ListNodesRequest {}).await.unwrap_err();
    assert!(refused.message().contains("retired"), "{refused:?}");
    let mut watcher = operator_client(&url, &admin).await.unwrap();
    let events = watcher
        .list_events(cutover_proto::v1::ListEventsRequest {
            after_seq: 0,
            limit: 1000,
            newest: false,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    // The retirement ended the sessions opened with certificates of the
    // old CA; each node came back at once with its new one: one reconnect
    // (reconnect_min is 50 ms here), never longer.
    let mut longest_down = 0;
    for name in names {
        let mut down_at = None;
        let mut reconnects = 0;
        for event in events.iter().filter(|e| e.node_name == name) {
            match event.kind.as_str() {
                "node_disconnected" => down_at = Some(event.at_ms),
                "node_connected" => {
                    let at = down_at.take().expect("a reconnect follows a disconnect");
                    longest_down = longest_down.max(event.at_ms - at);
                    reconnects += 1;
                }
                _ => {}
            }
        }
        assert_eq!(reconnects, 1, "{name}: {events:?}");
        assert!(down_at.is_none(), "{name} is still down: {events:?}");
    }
    eprintln!("longest disconnection during the rotation: {longest_down} ms");
    assert!(longest_down < 2000, "a node was down {longest_down} ms");

    // Commands still reach every node.
    for name in names {
        watcher
            .ping_node(PingNodeRequest {
                node: name.into(),
                timeout_ms: 5000,
            })
            .await
            .unwrap_or_else(|e| panic!("ping {name}: {e}"));
    }

    // The old CA opens nothing any more: the operator who did not renew is
    // refused, and so is a fresh certificate of the old CA even when it
    // trusts the new CA.
    let refused = |files: TlsFiles| {
        let url = url.clone();
        async move {
            match operator_client(&url, &files).await {
                Err(_) => true,
                Ok(mut client) => client.list_nodes(ListNodesRequest {}).await.is_err(),
            }
        }
    };
    assert!(refused(laggard).await, "an operator of the old CA got in");
    let mut forged = cluster.pki.client_files(Role::Operator, "forger");
    forged.ca_cert = coordinator.ca_cert.clone();
    assert!(
        refused(forged).await,
        "a certificate of the retired CA got in"
    );

    // Renewing outside a rotation keeps the certificate's lifetime.
    let validity = |path: &Path| {
        let facts = certificate_facts(&load_certs(path, "certificate").unwrap()[0]).unwrap();
        (facts.serial, facts.not_after - facts.not_before)
    };
    let before = validity(&admin.cert);
    cutover(&url, &admin, &["operator", "renew"]);
    let after = validity(&admin.cert);
    assert_ne!(before.0, after.0);
    assert!((before.1 - after.1).abs() < 5, "{before:?} -> {after:?}");
    cutover(&url, &admin, &["nodes"]);
    // The renewal retired the certificate it replaced, also on a
    // connection that stayed open.
    let refused = watcher.list_nodes(ListNodesRequest {}).await.unwrap_err();
    assert!(
        refused.message().contains("replaced by a renewal"),
        "{refused:?}"
    );
    let mut watcher = operator_client(&url, &admin).await.unwrap();

    // The whole cluster comes back after the agents restart: what they
    // wrote is complete and consistent.
    for agent in agents {
        agent.kill();
    }
    let agents: Vec<_> = names
        .iter()
        .map(|name| cluster.spawn_agent_binary(name))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = watcher
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if nodes.iter().filter(|n| n.connected).count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents did not come back: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_node_holds_the_rotation_across_a_coordinator_restart_until_it_is_back() {
    let mut cluster = Cluster::start(0, Tuning::default()).await;
    let url = cluster.url();
    let admin = cluster.pki.client_files(Role::Operator, "root");
    let online = cluster.spawn_agent_binary("node-1");
    let offline = cluster.spawn_agent_binary("node-2");
    let status = |cluster_url: &str| -> serde_json::Value {
        serde_json::from_str(&cutover(
            cluster_url,
            &admin,
            &["ca", "status", "-o", "json"],
        ))
        .unwrap()
    };
    let wait_for = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = status(&url);
            if done(&now) {
                return now;
            }
            assert!(Instant::now() < deadline, "{what}: {now:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("both nodes connect", &|s| {
        s["nodes"].as_array().unwrap().len() == 2
            && s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["connected"] == true)
    });
    let before = status(&url);
    assert_eq!(before["phase"], "none");
    // Each agent says which bundle it trusts from its first contact: no
    // rotation ran, so both hold the current one.
    for node in before["nodes"].as_array().unwrap() {
        assert_eq!(node["current_bundle"], true, "{before:#}");
    }
    offline.kill();
    wait_for("node-2 is seen gone", &|s| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["connected"] == false)
    });

    cutover(&url, &admin, &["ca", "rotate"]);
    let waiting = wait_for("node-1 moves", &|s| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "node-1" && n["moved"] == true)
    });
    // node-2 cannot have moved, so the old CA stays trusted, and the
    // status says why it waits. Evidence that the rotation had its chance
    // to go on (not a pause): a drive step after node-1 moved counted
    // node-2 alone as waiting, and held.
    let metrics = cluster.coordinator.as_ref().unwrap().http_addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = cutover_integration_tests::http_get(&metrics, "/metrics");
        if text
            .lines()
            .any(|l| l == "cutover_ca_rotation_nodes_waiting 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rotation step counted node-2 alone: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held = status(&url);
    assert_eq!(held["phase"], "reissuing", "{held:#}");
    assert_eq!(held["cas"].as_array().unwrap().len(), 2, "{held:#}");
    let node_2 = held["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap();
    assert!(
        node_2["waiting_because"]
            .as_str()
            .unwrap()
            .starts_with("offline"),
        "{held:#}"
    );
    let new_ca = waiting["new_ca"].as_str().unwrap().to_string();

    // The coordinator restarts mid-rotation and goes on where it was.
    cluster.restart_coordinator().await;
    let node_2 = cluster.spawn_agent_binary("node-2");
    let done = wait_for("the rotation finishes", &|s| s["phase"] == "finished");
    assert_eq!(done["new_ca"], new_ca.as_str());
    for name in ["node-1", "node-2"] {
        let files = cluster.pki.files_of(Role::Agent, name);
        assert_eq!(issuer(&files.cert), new_ca);
        assert_eq!(subjects(&files.ca_cert), std::slice::from_ref(&new_ca));
    }
    drop((online, node_2));
}
