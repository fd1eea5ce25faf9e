//! Rolling rollouts across an in-process cluster: real coordinator, real
//! agents, real releases of the test app behind the node proxies.

use std::time::Duration;

use cutover_integration_tests::load::Load;
use cutover_integration_tests::{
    activate, app_archive, body, deploy_request, ended, http_get, wait_for_rollout, web_release,
    web_spec as spec, Cluster, Tuning,
};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use tonic::transport::Channel;

struct Setup {
    cluster: Cluster,
    client: OperatorServiceClient<Channel>,
    artifact: (String, String),
    port: u16,
    _dir: tempfile::TempDir,
}

async fn setup(nodes: usize) -> Setup {
    setup_on(Cluster::start(nodes, Tuning::default()).await, nodes).await
}

/// A setup on a cluster the test started itself, with `nodes` agents.
async fn setup_on(cluster: Cluster, nodes: usize) -> Setup {
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == nodes && n.iter().all(|n| n.connected)
        })
        .await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let client = cluster.operator().await;
    Setup {
        cluster,
        client,
        artifact,
        port,
        _dir: dir,
    }
}

const FAST: &str = "batch = 2\nmin_healthy_time = \"500ms\"";

impl Setup {
    /// A deploy of `spec_text` to environment test with this test's artifact.
    fn request(&self, spec_text: String, version: &str) -> pb::DeployRequest {
        deploy_request(spec_text, version, &self.artifact)
    }

    async fn deploy(
        &mut self,
        version: &str,
        extra_env: &str,
        strategy: &str,
    ) -> Result<pb::DeployResponse, tonic::Status> {
        let env = format!("VERSION = \"{version}\"\n{extra_env}");
        self.client
            .deploy(self.request(spec(self.port, &env, strategy), version))
            .await
            .map(|r| r.into_inner())
    }

    /// Deploys and returns the rollout's id.
    async fn start(&mut self, version: &str, extra_env: &str, strategy: &str) -> String {
        let response = self
            .deploy(version, extra_env, strategy)
            .await
            .expect("deploy accepted");
        assert_eq!(response.rollouts.len(), 1, "{response:?}");
        response.rollouts[0].id.clone()
    }

    async fn get(&mut self, id: &str) -> pb::Rollout {
        self.client
            .get_rollout(pb::GetRolloutRequest { id: id.into() })
            .await
            .expect("get rollout")
            .into_inner()
    }

    async fn wait_until(
        &mut self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&pb::Rollout) -> bool,
    ) -> pb::Rollout {
        wait_for_rollout(&mut self.client, id, timeout, done).await
    }

    /// Aborts rollout `id` and waits for it to end aborted.
    async fn abort(&mut self, id: &str) {
        self.client
            .control_rollout(pb::ControlRolloutRequest {
                id: id.into(),
                action: pb::RolloutAction::Abort as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(self.finish(id).await.state().as_str(), "aborted");
    }

    async fn finish(&mut self, id: &str) -> pb::Rollout {
        self.wait_until(id, Duration::from_secs(60), ended).await
    }

    async fn deploy_and_finish(&mut self, version: &str) -> pb::Rollout {
        let id = self.start(version, "", FAST).await;
        let rollout = self.finish(&id).await;
        assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
        rollout
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", 11 + i, self.port)
    }

    /// What each node's proxy answers on `/`.
    fn versions(&self) -> Vec<String> {
        (0..self.cluster.agents.len())
            .map(|i| body(&http_get(&self.addr(i), "/")).to_string())
            .collect()
    }

    async fn releases(&mut self) -> Vec<pb::ReleaseEntry> {
        self.client
            .list_releases(pb::ListReleasesRequest {
                env: "test".into(),
                service: "web".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .releases
    }
}

fn timeline_kinds(r: &pb::Rollout) -> Vec<&str> {
    r.timeline.iter().map(|t| t.kind.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_in_batches_of_two_under_load_end_on_v2_without_a_failed_request() {
    let mut s = setup(5).await;
    s.deploy_and_finish("v1").await;
    assert_eq!(s.versions(), vec!["v1"; 5]);

    let targets = (0..5).map(|i| s.addr(i).parse().unwrap()).collect();
    let load = Load::start(targets, "/", 10);
    load.wait_for_sent(0, 300, "on v1").await;
    let rollout = s.deploy_and_finish("v2").await;
    let (sent, _) = load.progress();
    load.wait_for_sent(sent, 250, "on v2").await;
    let report = load.stop().await;

    assert_eq!(rollout.batches, 3);
    assert_eq!(rollout.batch_size, 2);
    assert!(
        rollout
            .nodes
            .iter()
            .all(|n| n.state().as_str() == "switched" && n.release.starts_with("web-v2-")),
        "{rollout:#?}"
    );
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    assert!(
        report.sent > 500,
        "too little load to prove anything: {}",
        report.sent
    );
    assert!(
        report.by_body.contains_key("v1") && report.by_body.contains_key("v2"),
        "{:?}",
        report.by_body
    );
    assert_eq!(s.versions(), vec!["v2"; 5]);
    let kinds = timeline_kinds(&rollout);
    assert_eq!(
        kinds.iter().filter(|k| **k == "batch_started").count(),
        3,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "node_switched").count(),
        5,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"succeeded"));
    let history = s.releases().await;
    assert_eq!(history.len(), 2);
    assert!(
        history[0].current
            && history[0].state().as_str() == "stable"
            && history[0].release.as_ref().unwrap().version == "v2"
    );
    assert_eq!(history[0].deployed_by, "tester");

    let http = s
        .cluster
        .coordinator
        .as_ref()
        .unwrap()
        .http_addr
        .to_string();
    let metrics = body(&http_get(&http, "/metrics")).to_string();
    assert!(
        metrics.contains(r#"cutover_rollouts_total{env="test",service="web",kind="deploy",outcome="succeeded"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("cutover_rollout_duration_seconds_count{env=\"test\",service=\"web\",kind=\"deploy\"} 2"), "{metrics}");
    assert!(
        metrics.contains("cutover_rollouts_in_progress 0"),
        "{metrics}"
    );
    let on_v2 = metrics
        .lines()
        .filter(|l| l.starts_with("cutover_node_release{") && l.contains("release=\"web-v2-"))
        .count();
    assert_eq!(on_v2, 5, "{metrics}");
    let expiries = metrics
        .lines()
        .filter(|l| l.starts_with("cutover_node_cert_expiry_timestamp_seconds{"))
        .count();
    assert_eq!(expiries, 5, "{metrics}");
    assert!(metrics.contains("cutover_ca_rotation_phase 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_health_on_the_third_node_is_rolled_back_everywhere() {
    let mut s = setup(5).await;
    s.deploy_and_finish("v1").await;
    let id = s.start("v2", "FAIL_HOST = \"127.0.0.13\"", FAST).await;
    let rollout = s.finish(&id).await;
    assert_eq!(rollout.state().as_str(), "rolled_back", "{rollout:#?}");
    let error = rollout.error.clone().expect("an error");
    assert_eq!(error.node, "node-3");
    assert_eq!(error.step, "health_checking");
    assert!(
        error.message.contains("/health") && error.message.contains("503"),
        "{error:?}"
    );
    assert_eq!(s.versions(), vec!["v1"; 5]);
    // The first batch had switched and came back.
    for name in ["node-1", "node-2"] {
        let node = rollout.nodes.iter().find(|n| n.name == name).unwrap();
        assert_eq!(node.state().as_str(), "rolled_back", "{node:?}");
        assert!(node.release.starts_with("web-v1-"), "{node:?}");
    }
    let history = s.releases().await;
    let v2 = history
        .iter()
        .find(|r| r.release.as_ref().unwrap().version == "v2")
        .unwrap();
    assert_eq!(v2.state().as_str(), "rolled_back");
    assert!(
        history
            .iter()
            .find(|r| r.current)
            .unwrap()
            .release
            .as_ref()
            .unwrap()
            .version
            == "v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort_take_effect_between_nodes() {
    let mut s = setup(3).await;
    s.deploy_and_finish("v1").await;
    let slow = "batch = 1\nmin_healthy_time = \"1s\"";

    let id = s.start("v2", "", slow).await;
    let control = |id: &str, action: pb::RolloutAction| pb::ControlRolloutRequest {
        id: id.into(),
        action: action as i32,
        ..Default::default()
    };
    s.client
        .control_rollout(control(&id, pb::RolloutAction::Pause))
        .await
        .unwrap();
    let paused = s
        .wait_until(&id, Duration::from_secs(20), |r| {
            r.state().as_str() == "paused"
        })
        .await;
    let switched = paused
        .nodes
        .iter()
        .filter(|n| n.state().as_str() == "switched")
        .count();
    assert!(switched < 3, "paused after the end: {paused:#?}");
    // Its driver keeps looking (8 ticks: twice the 1 s watch that would
    // otherwise have let the next batch start), and nothing moves.
    s.cluster
        .wait_for_counter("rollout_ticks", 8, Duration::from_secs(20))
        .await;
    let still = s.get(&id).await;
    assert_eq!(still.state().as_str(), "paused");
    assert_eq!(
        still
            .nodes
            .iter()
            .filter(|n| n.state().as_str() == "switched")
            .count(),
        switched,
        "nothing moves while paused"
    );
    s.client
        .control_rollout(control(&id, pb::RolloutAction::Resume))
        .await
        .unwrap();
    let done = s.finish(&id).await;
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    assert!(timeline_kinds(&done).contains(&"resumed"));

    // Abort once the first node switched: the rest stay where they are.
    let id = s.start("v3", "", slow).await;
    s.wait_until(&id, Duration::from_secs(20), |r| {
        r.nodes.iter().any(|n| n.state().as_str() == "switched")
    })
    .await;
    s.client
        .control_rollout(control(&id, pb::RolloutAction::Abort))
        .await
        .unwrap();
    let aborted = s.finish(&id).await;
    assert_eq!(aborted.state().as_str(), "aborted", "{aborted:#?}");
    let versions = s.versions();
    for (i, node) in aborted.nodes.iter().enumerate() {
        let expect = if node.release.starts_with("web-v3-") {
            "v3"
        } else {
            "v2"
        };
        assert_eq!(
            versions[i], expect,
            "node {} serves what the rollout reports: {aborted:#?}",
            node.name
        );
    }
    assert!(
        versions.contains(&"v3".to_string()) && versions.contains(&"v2".to_string()),
        "{versions:?}"
    );
    // A finished rollout cannot be paused.
    let refused = s
        .client
        .control_rollout(control(&id, pb::RolloutAction::Pause))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("already ended (aborted)"),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_returns_to_the_previous_or_a_named_release() {
    let mut s = setup(3).await;
    let v1 = s.deploy_and_finish("v1").await;
    s.deploy_and_finish("v2").await;
    s.deploy_and_finish("v3").await;
    assert_eq!(s.versions(), vec!["v3"; 3]);

    let rollback = |to: &str| pb::RollbackRequest {
        env: "test".into(),
        service: "web".into(),
        to_release: to.into(),
        allow_unreachable: false,
        force: false,
        ..Default::default()
    };
    let started = s.client.rollback(rollback("")).await.unwrap().into_inner();
    let id = started.rollouts[0].id.clone();
    let done = s.finish(&id).await;
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    assert_eq!(done.kind, "rollback");
    assert_eq!(s.versions(), vec!["v2"; 3]);

    let v1_id = v1.release.unwrap().id;
    let started = s
        .client
        .rollback(rollback(&v1_id))
        .await
        .unwrap()
        .into_inner();
    let done = s.finish(&started.rollouts[0].id).await;
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    assert_eq!(s.versions(), vec!["v1"; 3]);

    let history = s.releases().await;
    let state_of = |v: &str| {
        let r = history
            .iter()
            .find(|r| r.release.as_ref().unwrap().version == v)
            .unwrap();
        (r.state().as_str().to_string(), r.current)
    };
    assert_eq!(state_of("v1"), ("stable".into(), true));
    // Replaced by an operator's rollback, not failed: kept apart.
    assert_eq!(state_of("v2").0, "reverted");
    assert_eq!(state_of("v3").0, "reverted");
    let note_of = |v: &str| {
        history
            .iter()
            .find(|r| r.release.as_ref().unwrap().version == v)
            .unwrap()
            .note
            .clone()
    };
    assert!(
        note_of("v3").contains("rolled back to"),
        "{}",
        note_of("v3")
    );

    // "Previous" never walks forward: nothing stable was deployed before v1.
    let none = s.client.rollback(rollback("")).await.unwrap_err();
    assert!(
        none.message()
            .contains("no stable release deployed before the current one"),
        "{}",
        none.message()
    );

    let missing = s
        .client
        .rollback(rollback("web-v9-00000000"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition);
    assert!(
        missing.message().contains("web-v9-00000000"),
        "{}",
        missing.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_says_why_it_cannot_start_and_a_failed_target_needs_force() {
    let mut s = setup(2).await;
    s.deploy_and_finish("v1").await;
    // v2 fails its health check and is rolled back automatically.
    let id = s.start("v2", "HEALTH = \"fail\"", FAST).await;
    let failed = s.finish(&id).await;
    assert_eq!(failed.state().as_str(), "rolled_back", "{failed:#?}");
    let v2 = failed.release.unwrap().id;
    let history = s.releases().await;
    let entry = history
        .iter()
        .find(|r| r.release.as_ref().unwrap().id == v2)
        .unwrap();
    assert_eq!(entry.state().as_str(), "rolled_back");
    assert!(entry.note.contains("health"), "{entry:?}");

    let rollback = |to: &str, force: bool| pb::RollbackRequest {
        env: "test".into(),
        service: "web".into(),
        to_release: to.into(),
        allow_unreachable: false,
        force,
        ..Default::default()
    };
    let refused = s.client.rollback(rollback(&v2, false)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("--force") && refused.message().contains("rolled_back"),
        "{}",
        refused.message()
    );

    // While a rollout runs, the answer is that rollout, and how to stop it.
    let running = s
        .start("v3", "", "batch = 1\nmin_healthy_time = \"30s\"")
        .await;
    s.wait_until(&running, Duration::from_secs(30), |r| r.phase == "watch")
        .await;
    let locked = s.client.rollback(rollback("", false)).await.unwrap_err();
    assert_eq!(locked.code(), tonic::Code::Aborted, "{locked:?}");
    assert!(
        locked.message().contains(&running) && locked.message().contains("cutover rollout abort"),
        "{}",
        locked.message()
    );
    s.client
        .control_rollout(pb::ControlRolloutRequest {
            id: running.clone(),
            action: pb::RolloutAction::Abort as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    s.finish(&running).await;

    // Forced, with the warning first in its timeline.
    let forced = s
        .client
        .rollback(rollback(&v2, true))
        .await
        .unwrap()
        .into_inner();
    let first = &forced.rollouts[0].timeline[0];
    assert_eq!(first.kind, "warning");
    assert!(first.message.contains("forced a rollback"), "{first:?}");
    s.finish(&forced.rollouts[0].id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_lock_no_op_and_unreachable_nodes() {
    let mut s = setup(3).await;
    s.deploy_and_finish("v1").await;

    // The same release again changes nothing.
    let again = s.deploy("v1", "", FAST).await.unwrap();
    assert!(again.rollouts.is_empty(), "{again:?}");
    assert!(
        again.unchanged[0]
            .message
            .contains("already runs on all 3 nodes"),
        "{again:?}"
    );
    assert_eq!(again.unchanged[0].service, "web");

    // One rollout per service and environment at a time.
    let id = s
        .start("v2", "", "batch = 1\nmin_healthy_time = \"30s\"")
        .await;
    let locked = s.deploy("v3", "", FAST).await.unwrap_err();
    assert_eq!(locked.code(), tonic::Code::Aborted);
    assert!(locked.message().contains(&id), "{}", locked.message());
    s.abort(&id).await;

    // A node down at the start is named, and skipped only on request.
    let down = s.cluster.agents.pop().unwrap();
    down.crash().await;
    s.cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.iter()
                .any(|n| n.name == "node-3" && n.status == pb::NodeStatus::Unreachable as i32)
        })
        .await;
    let refused = s.deploy("v3", "", FAST).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("node-3") && refused.message().contains("--allow-unreachable"),
        "{}",
        refused.message()
    );
    let rollouts_before = s
        .client
        .list_rollouts(pb::ListRolloutsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rollouts
        .len();

    let env = "VERSION = \"v3\"";
    let response = s
        .client
        .deploy(pb::DeployRequest {
            service: "web".into(),
            allow_unreachable: true,
            ..s.request(spec(s.port, env, FAST), "v3")
        })
        .await
        .unwrap()
        .into_inner();
    let rollout = s.finish(&response.rollouts[0].id).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    assert_eq!(rollout.skipped_nodes, vec!["node-3".to_string()]);
    assert_eq!(rollout.nodes.len(), 2);
    assert!(timeline_kinds(&rollout).contains(&"nodes_skipped"));
    let rollouts_after = s
        .client
        .list_rollouts(pb::ListRolloutsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rollouts
        .len();
    assert_eq!(rollouts_after, rollouts_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spec_files_are_refused_and_create_nothing() {
    let mut s = setup(1).await;
    let good = spec(s.port, "VERSION = \"v1\"", FAST);
    let cases: Vec<(String, &str, &[&str])> = vec![
        (good.replace("drain_timeout", "drain_timout"), "test", &["cutover.toml", "services.web.drain_timout", "unknown field"]),
        (good.replace("interval = \"100ms\"", "interval = \"10 parsecs\""), "test", &["services.web.health.interval", "10 parsecs"]),
        (good.replace("batch = 2", "batch = 0"), "test", &["strategy.batch", "0 is not a batch size"]),
        (good.clone(), "production", &["environments", "\"production\"", "test"]),
        (good.replace("env = \"test\"", "env = \"staging\""), "test", &["no node matches env=staging"]),
        (good.replace("[services.web.health]", "[services.web.nothealth]"), "test", &["services.web.nothealth"]),
        (
            good.replace("[services.web.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nhealthy_threshold = 2\nhealthy_deadline = \"3s\"\n", ""),
            "test",
            &["services.web.health", "needs a health check"],
        ),
    ];
    for (text, env, expect) in cases {
        let error = s
            .client
            .deploy(pb::DeployRequest {
                env: env.into(),
                ..s.request(text, "v1")
            })
            .await
            .expect_err("a bad spec is refused");
        for fragment in expect {
            assert!(
                error.message().contains(fragment),
                "{fragment:?} missing in: {}",
                error.message()
            );
        }
    }
    let rollouts = s
        .client
        .list_rollouts(pb::ListRolloutsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rollouts;
    assert!(rollouts.is_empty(), "{rollouts:?}");
    assert!(s.releases().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_a_coordinator_restart_mid_batch() {
    let mut s = setup(3).await;
    s.deploy_and_finish("v1").await;
    let id = s
        .start("v2", "", "batch = 1\nmin_healthy_time = \"1s\"")
        .await;
    s.wait_until(&id, Duration::from_secs(20), |r| {
        r.nodes.iter().any(|n| n.state().as_str() == "switched")
    })
    .await;
    s.cluster.restart_coordinator().await;
    s.client = s.cluster.operator().await;
    let done = s.finish(&id).await;
    assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    assert_eq!(s.versions(), vec!["v2"; 3]);
    let kinds = timeline_kinds(&done);
    assert!(kinds.contains(&"recovered"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "node_switched").count(),
        3,
        "each node switched once: {kinds:?}"
    );
}

/// The deploy lock is a record in the store, and the restart path
/// reconciles it: locks a crash left behind (their rollout ended, or was
/// never stored) are freed, and a rollout stored without one (by a version
/// before the lock was a record) takes its lock again before it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_lock_is_reconciled_after_a_restart() {
    use cutover_coordinator::store::{LockHolder, ServiceLock, Store};
    let mut s = setup(2).await;
    let first = s.deploy_and_finish("v1").await;
    let id = s
        .start("v2", "", "batch = 1\nmin_healthy_time = \"30s\"")
        .await;
    s.wait_until(&id, Duration::from_secs(20), |r| {
        r.nodes.iter().any(|n| n.state().as_str() == "switched")
    })
    .await;
    s.cluster.stop_coordinator().await;
    let store_dir = s.cluster.data_dir().join("store");
    {
        let store = Store::open_sled(&store_dir).unwrap();
        let held: Vec<(String, LockHolder)> = store
            .rollouts
            .locks()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.service, l.holder))
            .collect();
        assert_eq!(held, [("web".to_string(), LockHolder::Rollout(id.clone()))]);
        assert!(store
            .rollouts
            .release_lock("test", "web", &LockHolder::Rollout(id.clone()))
            .await
            .unwrap());
        for (service, holder) in [
            ("api", LockHolder::Rollout(first.id.clone())),
            ("horizon", LockHolder::Rollout("horizon-999".into())),
            ("web", LockHolder::Deployment("shop-d998".into())),
        ] {
            let lock = ServiceLock {
                env: if service == "web" { "staging" } else { "test" }.into(),
                service: service.into(),
                holder,
                at_ms: 1,
            };
            assert!(store.rollouts.take_lock(&lock, None).await.unwrap());
        }
        store.flush().await.unwrap();
    }
    s.cluster.restart_coordinator().await;
    s.client = s.cluster.operator().await;
    let locked = s.deploy("v3", "", FAST).await.unwrap_err();
    assert_eq!(locked.code(), tonic::Code::Aborted, "{locked:?}");
    assert!(locked.message().contains(&id), "{}", locked.message());
    s.abort(&id).await;
    s.cluster.stop_coordinator().await;
    let store = Store::open_sled(&store_dir).unwrap();
    assert_eq!(
        store.rollouts.locks().await.unwrap(),
        [],
        "the ended rollout freed its lock, the restart the leftovers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rollout_lets_old_workers_finish_their_jobs() {
    let mut s = setup(3).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("worker");
    let worker_spec = |version: &str| {
        format!(
            r#"
app = "shop"
[services.queue]
command = ["python3", "worker.py"]
stop_command = ["python3", "worker.py", "terminate"]
stop_timeout = "5s"
stop_grace = "1s"
min_healthy_time = "500ms"
[services.queue.env]
VERSION = "{version}"
WORKER_LOG = "{}"
[strategy]
batch = 3
min_healthy_time = "300ms"
[environments.test]
nodes = {{ env = "test" }}
"#,
            log.display()
        )
    };
    for version in ["v1", "v2"] {
        let response = s
            .client
            .deploy(s.request(worker_spec(version), version))
            .await
            .unwrap()
            .into_inner();
        let done = s.finish(&response.rollouts[0].id).await;
        assert_eq!(done.state().as_str(), "succeeded", "{done:#?}");
    }
    for i in 0..3 {
        let host = format!("127.0.0.{}", 11 + i);
        let text = std::fs::read_to_string(format!("{}-{host}", log.display())).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // v2 started beside v1; v1 then finished its job and left by itself
        // (it ignores SIGTERM: a kill would leave no such line).
        assert_eq!(
            lines,
            [
                "v1 started",
                "v2 started",
                "v1 finished its jobs and exited"
            ],
            "{host}"
        );
    }
    let nodes = s
        .cluster
        .wait_for_nodes(Duration::from_secs(5), |nodes| {
            nodes.iter().all(|n| {
                n.services.iter().any(|x| {
                    x.service == "queue" && x.release_id.starts_with("queue-v2-") && x.running
                })
            })
        })
        .await;
    let queue = nodes[0]
        .services
        .iter()
        .find(|x| x.service == "queue")
        .unwrap();
    assert_eq!(queue.listen, "", "a worker listens nowhere");
    assert_eq!(queue.upstream, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_all_through_a_rollout_under_load_fail_nothing() {
    // Renewed certificates live 30 s and start 5 minutes back, so every
    // check (each 200 ms) finds them due: the agents renew over and over
    // while the rollout runs.
    let tuning = Tuning {
        agent_cert_lifetime: Duration::from_secs(30),
        ..Tuning::default()
    };
    let mut cluster = Cluster::start(0, tuning).await;
    for i in 1..=3 {
        let name = format!("node-{i}");
        let mut config = cluster.agent_config(&name);
        config.certificate_check_interval = Duration::from_millis(200);
        cluster.pki.client_files_for(
            cutover_common::identity::Role::Agent,
            &name,
            Duration::from_secs(60),
        );
        let agent = cutover_integration_tests::spawn_agent(config).await;
        cluster.agents.push(agent);
    }
    let mut s = setup_on(cluster, 3).await;
    s.deploy_and_finish("v1").await;

    let renewals = |audit: &[pb::AuditEntry]| {
        audit
            .iter()
            .filter(|e| e.action == "renew_certificate" && e.outcome == "ok")
            .count()
    };
    let audit = |client: &mut OperatorServiceClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .list_audit(pb::ListAuditRequest {
                    since_ms: 0,
                    limit: 100_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries
        }
    };
    let before = renewals(&audit(&mut s.client).await);
    let targets = (0..3).map(|i| s.addr(i).parse().unwrap()).collect();
    let load = Load::start(targets, "/", 6);
    load.wait_for_sent(0, 100, "before the rollout").await;
    let rollout = s.deploy_and_finish("v2").await;
    // Enough load to prove anything, however fast the rollout went.
    load.wait_for_sent(0, 1001, "in all").await;
    let report = load.stop().await;
    let during = renewals(&audit(&mut s.client).await) - before;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    assert!(rollout.error.is_none(), "no command failed: {rollout:#?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(report.sent > 1000, "{report:?}");
    assert!(during >= 6, "only {during} renewals during the rollout");
    assert_eq!(s.versions(), vec!["v2"; 3]);
    println!(
        "{during} certificate renewals during the rollout; {} requests, 0 failed",
        report.sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_that_flaps_during_the_watch_rolls_the_release_back() {
    let mut s = setup(3).await;
    s.deploy_and_finish("v1").await;
    let id = s
        .start("v2", "", "batch = 1\nmin_healthy_time = \"5s\"")
        .await;
    // The first node switched and is being watched: its release turns sick
    // for a moment and recovers. It was not healthy all through the watch.
    s.wait_until(&id, Duration::from_secs(30), |r| {
        r.phase == "watch"
            && r.nodes
                .iter()
                .any(|n| n.name == "node-1" && n.state().as_str() == "switched")
    })
    .await;
    assert!(body(&http_get(&s.addr(0), "/sick")).contains("now sick"));
    // Sick until the watch has seen it (its error is set), not for a fixed
    // time a slow machine may spend before the next health check.
    s.wait_until(&id, Duration::from_secs(30), |r| r.error.is_some())
        .await;
    assert!(body(&http_get(&s.addr(0), "/heal")).contains("healthy again"));
    let rollout = s.finish(&id).await;
    assert_eq!(rollout.state().as_str(), "rolled_back", "{rollout:#?}");
    let error = rollout.error.clone().expect("an error");
    assert_eq!(error.node, "node-1", "{error:?}");
    assert!(error.message.contains("unhealthy"), "{error:?}");
    assert_eq!(s.versions(), vec!["v1"; 3]);
    // Only the first batch ever switched.
    let switched = rollout
        .timeline
        .iter()
        .filter(|t| t.kind == "node_switched")
        .count();
    assert_eq!(switched, 1, "{:?}", timeline_kinds(&rollout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_changed_by_hand_is_converged_and_a_deploy_goes_before_a_convergence() {
    let mut s = setup(3).await;
    // v1 starts slowly, so a convergence back to it is still under way
    // when the operator deploys.
    let id = s.start("v1", "START_DELAY = \"1.5\"", FAST).await;
    assert_eq!(s.finish(&id).await.state().as_str(), "succeeded");

    // Someone starts another release on node-2 behind cutover's back.
    let stray = web_release("stray", s.port, &s.artifact, &[]);
    let (result, _) = s
        .cluster
        .run_command("node-2", activate("by-hand", stray))
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{result:?}"
    );
    assert_eq!(s.versions()[1], "stray");

    // The converger notices from node-2's heartbeats and brings it back.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let converge = loop {
        let rollouts = s
            .client
            .list_rollouts(pb::ListRolloutsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .rollouts;
        if let Some(r) = rollouts.into_iter().find(|r| r.kind == "converge") {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no convergence started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(converge.created_by, "converger");
    assert_eq!(
        converge
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["node-2"]
    );

    s.wait_until(&converge.id, Duration::from_secs(20), |r| {
        r.nodes[0].state().as_str() == "activating"
    })
    .await;

    // An operator's deploy is not refused for it: the convergence is
    // aborted (node-2 finishes its cutover first) and the deploy rolls out.
    let v2 = s.start("v2", "", FAST).await;
    let aborted = s.finish(&converge.id).await;
    assert_eq!(aborted.state().as_str(), "aborted", "{aborted:#?}");
    assert_eq!(s.finish(&v2).await.state().as_str(), "succeeded");
    assert_eq!(s.versions(), ["v2", "v2", "v2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_starts_an_ended_deploy_again_while_the_service_is_where_it_left_it() {
    let mut s = setup(2).await;
    let first = s.deploy_and_finish("v1").await;
    let retry = |id: &str| pb::ControlRolloutRequest {
        id: id.into(),
        action: pb::RolloutAction::Retry as i32,
        ..Default::default()
    };

    // A deploy that succeeded has nothing to retry.
    let refused = s
        .client
        .control_rollout(retry(&first.id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("succeeded"),
        "{}",
        refused.message()
    );

    let aborted = s
        .start("v2", "", "batch = 1\nmin_healthy_time = \"30s\"")
        .await;
    s.abort(&aborted).await;

    // The same release again, from the first batch, as a new rollout.
    let again = s
        .client
        .control_rollout(retry(&aborted))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.id, aborted);
    assert!(again.release.as_ref().unwrap().id.starts_with("web-v2-"));
    assert!(
        again
            .timeline
            .iter()
            .any(|e| e.message.contains(&format!("retried rollout {aborted}"))),
        "{:?}",
        again.timeline
    );
    s.abort(&again.id).await;

    // Once another release is current, a retry would not start from where
    // the aborted rollout left the service: refused, naming both.
    s.deploy_and_finish("v3").await;
    let refused = s.client.control_rollout(retry(&aborted)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("web-v3") && refused.message().contains("cutover deploy"),
        "{}",
        refused.message()
    );
}
