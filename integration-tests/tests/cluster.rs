//! In-process cluster tests: coordinator and agents in this process, real
//! mTLS over loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_common::identity::Role;
use cutover_common::pki::CertificateAuthority;
use cutover_common::tls;
use cutover_integration_tests::{find, operator_client, ready, spawn_agent, Cluster, Tuning};
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::{
    self as pb, agent_message, ListEventsRequest, ListNodesRequest, PingNodeRequest,
};

#[tokio::test]
async fn agents_register_report_figures_and_take_commands() {
    let cluster = Cluster::start(3, Tuning::default()).await;
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(10), |nodes| {
            nodes.len() == 3 && nodes.iter().all(|n| ready(n) && n.figures.is_some())
        })
        .await;
    for agent in &cluster.agents {
        let node = find(&nodes, &agent.name).expect("listed");
        assert_eq!(node.id, agent.node_id);
        assert_eq!(node.labels.get("env").map(String::as_str), Some("test"));
        assert!(node.address.starts_with("127.0.0."), "{}", node.address);
        let figures = node.figures.as_ref().unwrap();
        assert!(figures.memory_total_bytes > 0 && figures.disk_total_bytes > 0);
        assert_eq!(node.agent_version, cutover_common::VERSION);
    }

    let mut operator = cluster.operator().await;
    let pong = operator
        .ping_node(PingNodeRequest {
            node: "node-2".into(),
            timeout_ms: 5_000,
        })
        .await
        .expect("ping answered")
        .into_inner();
    assert!(pong.round_trip_us > 0);
    let missing = operator
        .ping_node(PingNodeRequest {
            node: "node-9".into(),
            timeout_ms: 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let events = operator
        .list_events(ListEventsRequest {
            after_seq: 0,
            limit: 100,
            newest: false,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let registered = events
        .iter()
        .filter(|e| e.kind == "node_registered")
        .count();
    assert_eq!(registered, 3, "{events:#?}");
}

#[tokio::test]
async fn a_crashed_agent_turns_unreachable_after_the_ttl_and_ready_on_return() {
    let tuning = Tuning::default();
    let ttl = tuning.heartbeat_ttl;
    let mut cluster = Cluster::start(2, tuning).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == 2 && n.iter().all(ready)
        })
        .await;
    let victim = cluster.agents.remove(0);
    let (name, id) = (victim.name.clone(), victim.node_id.clone());
    let crashed_at = Instant::now();
    victim.crash().await;

    let nodes = cluster
        .wait_for_nodes(ttl + Duration::from_secs(5), |n| {
            find(n, &name).is_some_and(|n| n.status == pb::NodeStatus::Unreachable as i32)
        })
        .await;
    let elapsed = crashed_at.elapsed();
    // Not before the TTL: a missed heartbeat or two must not flap the node.
    assert!(
        elapsed >= ttl - Duration::from_millis(400),
        "unreachable after only {elapsed:?}"
    );
    assert!(!find(&nodes, &name).unwrap().connected);
    assert!(
        ready(find(&nodes, "node-2").unwrap()),
        "the other node is unaffected"
    );

    let back = cluster.start_agent(&name).await;
    assert_eq!(back.node_id, id, "same state dir, same node id");
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            find(n, &name).is_some_and(ready)
        })
        .await;
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    assert_eq!(
        nodes.len(),
        2,
        "re-registration must not duplicate the node"
    );
    assert_eq!(find(&nodes, &name).unwrap().id, id);
}

#[tokio::test]
async fn a_coordinator_restart_keeps_the_node_list_and_agents_reconnect() {
    let mut cluster = Cluster::start(3, Tuning::default()).await;
    let before = cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == 3 && n.iter().all(ready)
        })
        .await;

    // A clean stop with agents connected ends their sessions and drains well
    // within the grace period instead of running into the forced close.
    let stopping = Instant::now();
    cluster.stop_coordinator().await;
    let drain = stopping.elapsed();
    assert!(
        drain < cutover_integration_tests::SHUTDOWN_GRACE,
        "the drain ran into the forced close after {drain:?}"
    );
    cluster.restart_coordinator().await;
    // Straight after the restart the list comes from the store.
    let mut client = cluster.operator().await;
    let listed = client
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let mut ids: Vec<_> = listed.iter().map(|n| n.id.clone()).collect();
    let mut expected: Vec<_> = before.iter().map(|n| n.id.clone()).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);

    // And every agent comes back by itself.
    let after = cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            n.len() == 3 && n.iter().all(ready)
        })
        .await;
    for node in &after {
        let old = find(&before, &node.name).unwrap();
        assert_eq!(node.registered_at_ms, old.registered_at_ms);
    }
    let events = client
        .list_events(ListEventsRequest {
            after_seq: 0,
            limit: 1000,
            newest: false,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "node_registered")
            .count(),
        3
    );
    assert!(events.iter().filter(|e| e.kind == "node_connected").count() >= 3);
}

#[tokio::test]
async fn connections_without_the_right_certificate_are_refused() {
    let cluster = Cluster::start_ready(1, Tuning::default()).await;
    let url = cluster.url();

    // No client certificate at all: the handshake fails.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in tls::load_certs(&cluster.pki.dir().join("ca.crt"), "ca").unwrap() {
            roots.add(cert).unwrap();
        }
        roots
    };
    let mut anonymous = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let refused = match cutover_integration_tests::connect_with(&url, Arc::new(anonymous)).await {
        Err(_) => true,
        Ok(mut client) => client.list_nodes(ListNodesRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate got an answer");

    // A certificate from another CA, trusting ours for the server side.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = CertificateAuthority::init_dir(foreign_dir.path(), &[]).unwrap();
    let identity = cutover_common::identity::Identity::new(Role::Operator, "mallory").unwrap();
    foreign
        .issue_client(&identity, 1)
        .unwrap()
        .write(foreign_dir.path(), "operator-mallory")
        .unwrap();
    let mut files = tls::TlsFiles::in_dir(foreign_dir.path(), "operator-mallory");
    files.ca_cert = cluster.pki.dir().join("ca.crt");
    let refused = match operator_client(&url, &files).await {
        Err(_) => true,
        Ok(mut client) => client.list_nodes(ListNodesRequest {}).await.is_err(),
    };
    assert!(refused, "a certificate from another CA got an answer");

    // An agent certificate cannot call the operator API.
    let agent_files = cluster.pki.client_files(Role::Agent, "node-1");
    let mut as_agent = operator_client(&url, &agent_files).await.unwrap();
    let status = as_agent.list_nodes(ListNodesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // An operator certificate cannot act as an agent.
    let operator_files = cluster.pki.client_files(Role::Operator, "alice");
    let status = open_session(&url, &operator_files, "alice", SOME_ID)
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // An agent certificate cannot register under another node's name.
    let status = open_session(&url, &agent_files, "node-2", SOME_ID)
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-1"), "{}", status.message());

    // None of it reached the registry.
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    assert_eq!(nodes.len(), 1);
}

/// An agent session opened by hand: the sender keeps our half open.
struct RawSession {
    _outbound: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
}

/// Opens an agent session by hand; succeeds only when the coordinator
/// answers with a welcome.
async fn open_session(
    url: &str,
    files: &tls::TlsFiles,
    name: &str,
    node_id: &str,
) -> Result<RawSession, tonic::Status> {
    let config = tls::client_config(files).unwrap();
    let url = tls::CoordinatorUrl::parse(url).unwrap();
    let connection = tls::connect(&url, None, config, &tls::ChannelOptions::default())
        .await
        .unwrap();
    let mut client = AgentServiceClient::new(connection);
    let hello = pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(pb::Hello {
            node_id: node_id.into(),
            name: name.into(),
            address: "127.0.0.99".into(),
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await.unwrap();
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await?.and_then(|m| m.kind) {
        Some(pb::coordinator_message::Kind::Welcome(_)) => Ok(RawSession {
            _outbound: tx,
            inbound,
        }),
        other => panic!("unexpected first message {other:?}"),
    }
}

const SOME_ID: &str = "0b5c4a0e-7a51-4c43-a4f5-0c2f4bb44f55";

#[tokio::test]
async fn an_agent_cannot_take_over_another_nodes_id() {
    let cluster = Cluster::start(2, Tuning::default()).await;
    let before = cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == 2 && n.iter().all(ready)
        })
        .await;
    let victim = find(&before, "node-2").unwrap().clone();
    // node-1's own certificate and name, but node-2's id (as a cloned disk
    // image would present it).
    let files = cluster.pki.client_files(Role::Agent, "node-1");
    let status = open_session(&cluster.url(), &files, "node-1", &victim.id)
        .await
        .err()
        .expect("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("node-id"), "{}", status.message());
    let after = cluster
        .wait_for_nodes(Duration::from_secs(1), |_| true)
        .await;
    let still = find(&after, "node-2").unwrap();
    assert_eq!(
        (still.id.as_str(), still.connected),
        (victim.id.as_str(), true)
    );
    assert!(ready(find(&after, "node-1").unwrap()));
}

#[tokio::test]
async fn a_new_session_from_the_same_node_replaces_a_stale_one() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let config = cluster.agent_config("node-1");
    std::fs::create_dir_all(&config.state_dir).unwrap();
    std::fs::write(config.state_dir.join("node-id"), format!("{SOME_ID}\n")).unwrap();

    // A session that went quiet, as a half-open connection does.
    let mut stale = open_session(&cluster.url(), &config.tls, "node-1", SOME_ID)
        .await
        .unwrap();
    // The real agent (same id, same certificate) connects: it takes over,
    // and the coordinator closes the stale stream.
    let agent = spawn_agent(config).await;
    assert_eq!(agent.node_id, SOME_ID);
    let closed = tokio::time::timeout(Duration::from_secs(5), stale.inbound.message())
        .await
        .expect("the stale session is closed promptly");
    assert!(matches!(closed, Ok(None) | Err(_)), "{closed:?}");
    let nodes = cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == 1 && n.iter().all(ready)
        })
        .await;
    assert_eq!(nodes[0].id, SOME_ID);
    let mut operator = cluster.operator().await;
    operator
        .ping_node(PingNodeRequest {
            node: "node-1".into(),
            timeout_ms: 5_000,
        })
        .await
        .expect("the new session takes commands");
    agent.stop().await;
}
