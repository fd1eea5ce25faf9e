//! Partitions across real network boundaries: each agent on a host of its
//! own (a network namespace joined by a veth link), its link to the
//! coordinator cut with iptables DROP while its services stay reachable.

use std::time::{Duration, Instant};

use cutover_integration_tests::netns::NetLab;
use cutover_integration_tests::{
    app_archive, body, deploy_request, ended, http_get, wait_for_rollout, web_spec, AgentProcess,
    Cluster, Tuning,
};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use tonic::transport::Channel;

/// Where the web service listens on each node.
const PORT: u16 = 8080;

struct Lab {
    // Dropped last: the namespaces outlive the agents in them.
    agents: Vec<AgentProcess>,
    cluster: Cluster,
    client: OperatorServiceClient<Channel>,
    artifact: (String, String),
    _dir: tempfile::TempDir,
    net: NetLab,
}

impl Lab {
    async fn start(nodes: usize) -> Self {
        let net = NetLab::new(nodes);
        let tuning = Tuning {
            keepalive: Duration::from_secs(2),
            ..Tuning::default()
        };
        let cluster = Cluster::start_on([0, 0, 0, 0].into(), 0, tuning).await;
        let agents = (0..nodes)
            .map(|i| cluster.spawn_agent_binary_on(&format!("node-{}", i + 1), Some(net.host(i))))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let artifact = app_archive(dir.path());
        let client = cluster.operator().await;
        let lab = Self {
            agents,
            cluster,
            client,
            artifact,
            _dir: dir,
            net,
        };
        lab.wait_for_nodes("every node connects", |n| {
            n.len() == nodes && n.iter().all(cutover_integration_tests::ready)
        })
        .await;
        lab
    }

    async fn wait_for_nodes(
        &self,
        what: &str,
        done: impl Fn(&[pb::Node]) -> bool,
    ) -> Vec<pb::Node> {
        let mut client = self.client.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nodes;
            if done(&nodes) {
                return nodes;
            }
            assert!(Instant::now() < deadline, "{what}: {nodes:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn port(&self) -> u16 {
        self.cluster.grpc_addr.port()
    }

    /// What node `i`'s proxy answers on `/`, from the test's namespace.
    fn serves(&self, i: usize) -> String {
        body(&http_get(
            &format!("{}:{PORT}", self.net.host(i).address),
            "/",
        ))
        .to_string()
    }

    async fn deploy(&mut self, version: &str, strategy: &str) -> String {
        self.try_deploy(version, strategy)
            .await
            .expect("deploy accepted")
            .rollouts[0]
            .id
            .clone()
    }

    async fn try_deploy(
        &mut self,
        version: &str,
        strategy: &str,
    ) -> Result<pb::DeployResponse, tonic::Status> {
        let spec = web_spec(PORT, &format!("VERSION = \"{version}\""), strategy);
        self.client
            .deploy(deploy_request(spec, version, &self.artifact))
            .await
            .map(|r| r.into_inner())
    }

    async fn rollout_until(
        &mut self,
        id: &str,
        done: impl Fn(&pb::Rollout) -> bool,
    ) -> pb::Rollout {
        wait_for_rollout(&mut self.client, id, Duration::from_secs(90), done).await
    }

    async fn rollouts(&mut self) -> Vec<pb::Rollout> {
        self.client
            .list_rollouts(pb::ListRolloutsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .rollouts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_partitioned_mid_rollout_keeps_serving_and_converges_when_the_link_heals() {
    let mut lab = Lab::start(3).await;
    let v1 = lab.deploy("v1", "batch = 3").await;
    let done = lab.rollout_until(&v1, ended).await;
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    for i in 0..3 {
        assert_eq!(lab.serves(i), "v1");
    }

    // v2 one node at a time; the second node to switch loses its link to
    // the coordinator while it is watched.
    let v2 = lab
        .deploy("v2", "batch = 1\nmin_healthy_time = \"8s\"")
        .await;
    let watched = lab
        .rollout_until(&v2, |r| {
            r.nodes
                .iter()
                .filter(|n| n.state().as_str() == "switched")
                .count()
                == 2
        })
        .await;
    let (first, second): (Vec<_>, Vec<_>) = watched
        .nodes
        .iter()
        .filter(|n| n.state().as_str() == "switched")
        .map(|n| n.name.clone())
        .partition(|name| {
            watched
                .nodes
                .iter()
                .find(|n| &n.name == name)
                .is_some_and(|n| n.batch == 1)
        });
    let cut_name = second[0].clone();
    let cut = cut_name
        .trim_start_matches("node-")
        .parse::<usize>()
        .unwrap()
        - 1;
    lab.net.host(cut).cut(lab.port());

    // The rollout fails once the node is lost for healthy_deadline, and is
    // rolled back on the nodes it can reach; the lost one is reported.
    let failed = lab.rollout_until(&v2, ended).await;
    assert_eq!(failed.state().as_str(), "failed", "{failed:#?}");
    assert!(
        failed
            .nodes
            .iter()
            .any(|n| n.name == first[0] && n.state().as_str() == "rolled_back"),
        "{failed:#?}"
    );
    for i in 0..3 {
        let expected = if i == cut { "v2" } else { "v1" };
        // Fail static: the partitioned node goes on serving what it runs.
        assert_eq!(lab.serves(i), expected, "node-{}", i + 1);
    }
    // The coordinator drops the session (keepalive), and with it whatever
    // it still had queued for the node.
    lab.wait_for_nodes("the coordinator drops the node's session", |n| {
        n.iter().any(|n| n.name == cut_name && !n.connected)
    })
    .await;
    assert_eq!(lab.serves(cut), "v2");

    // The link heals: the node comes back and is brought to v1, the
    // release the fleet is on, by a converge rollout, without an operator.
    lab.net.host(cut).heal();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab.serves(cut) != "v1" {
        assert!(
            Instant::now() < deadline,
            "node-{} never converged",
            cut + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rollouts = lab.rollouts().await;
    let converge = rollouts
        .iter()
        .find(|r| r.kind == "converge")
        .unwrap_or_else(|| panic!("no converge rollout: {rollouts:#?}"));
    let converge = lab.rollout_until(&converge.id.clone(), ended).await;
    assert_eq!(converge.state().as_str(), "succeeded", "{converge:#?}");
    assert_eq!(converge.created_by, "converger");
    assert_eq!(
        converge.nodes.len(),
        1,
        "only the node that drifted: {converge:#?}"
    );
    assert_eq!(converge.nodes[0].name, cut_name);
    for i in 0..3 {
        assert_eq!(lab.serves(i), "v1", "node-{}", i + 1);
    }
    // Nothing more to do: two more passes of the converger start nothing.
    lab.cluster
        .wait_for_counter("converger_passes", 2, Duration::from_secs(20))
        .await;
    assert_eq!(lab.rollouts().await.len(), rollouts.len());
    drop(lab.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_every_node_changes_nothing() {
    let mut lab = Lab::start(3).await;
    let v1 = lab.deploy("v1", "batch = 3").await;
    let done = lab.rollout_until(&v1, ended).await;
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    let before = lab.rollouts().await.len();

    for i in 0..3 {
        lab.net.host(i).cut(lab.port());
    }
    lab.wait_for_nodes("every node is seen gone", |n| {
        n.iter().all(|n| !cutover_integration_tests::ready(n))
    })
    .await;
    // Every node goes on serving, requests keep succeeding.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut served = 0;
    while Instant::now() < deadline {
        for i in 0..3 {
            assert_eq!(lab.serves(i), "v1", "node-{}", i + 1);
            served += 1;
        }
    }
    // A deploy while every node is out of reach is refused and changes
    // nothing.
    let refused = lab.try_deploy("v2", "batch = 3").await.unwrap_err();
    assert!(refused.message().contains("unreachable"), "{refused:?}");

    for i in 0..3 {
        lab.net.host(i).heal();
    }
    lab.wait_for_nodes("every node is back", |n| {
        n.iter().all(cutover_integration_tests::ready)
    })
    .await;
    // Two passes of the converger over the healed fleet start nothing.
    lab.cluster
        .wait_for_counter("converger_passes", 2, Duration::from_secs(20))
        .await;
    assert_eq!(lab.rollouts().await.len(), before, "nothing was started");
    for i in 0..3 {
        assert_eq!(lab.serves(i), "v1");
    }
    eprintln!("{served} requests served while the coordinator was cut off");
    drop(lab.agents);
}
