//! The docker runtime against a real engine and a real registry (started by
//! `scripts/test.sh`): images of the sample app built `FROM scratch`, pushed
//! to the local registry, resolved to digests by the coordinator and run as
//! containers by the agents, behind the same node proxy and cutover as
//! process releases, and scaled to two containers per node.

use std::time::{Duration, Instant};

use cutover_common::registry::{load_credentials, RegistryError, RegistryLogin};
use cutover_coordinator::images::ImageResolver;
use cutover_integration_tests::docker::{
    container_image_and_state, containers_of, docker, docker_env, image_present, push_sample_image,
    ContainerCleanup, AUTH_LOGIN,
};
use cutover_integration_tests::load::Load;
use cutover_integration_tests::{
    body, find, get_when_up, http_get, ready, spawn_agent, start_on_moved_state_dir, web_release,
    Cluster, Tuning,
};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use tonic::transport::Channel;

struct Setup {
    _cluster: Cluster,
    client: OperatorServiceClient<Channel>,
    port: u16,
    /// REGISTRY/REPO, one per test so tests never share tags.
    repo: String,
    node_ids: Vec<String>,
    _cleanup: ContainerCleanup,
}

async fn setup(nodes: usize, test: &str) -> Setup {
    let env = docker_env();
    let cluster = Cluster::start(nodes, Tuning::default()).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == nodes && n.iter().all(|n| n.connected)
        })
        .await;
    let node_ids: Vec<String> = cluster.agents.iter().map(|a| a.node_id.clone()).collect();
    let repo = format!(
        "{}/cutover-test/{test}-{}",
        env.registry,
        std::process::id()
    );
    Setup::on(cluster, repo, node_ids.clone(), ContainerCleanup(node_ids)).await
}

/// What a rollout's error says, or nothing.
fn error_message(rollout: &pb::Rollout) -> String {
    rollout
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default()
}

fn spec(port: u16, strategy: &str) -> String {
    spec_with(port, "", strategy)
}

/// The web service's spec with `settings` added to its table.
fn spec_with(port: u16, settings: &str, strategy: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
runtime = "docker"
listen = ":{port}"
init = true
memory = "64MiB"
cpus = 0.5
{settings}
drain_timeout = "2s"
stop_grace = "2s"
[services.web.health]
path = "/health"
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "10s"
[[services.web.smoke]]
path = "/"
expect_status = 200

[strategy]
{strategy}

[environments.test]
nodes = {{ env = "test" }}
"#
    )
}

const FAST: &str = "batch = 1\nmin_healthy_time = \"300ms\"";

impl Setup {
    /// A setup on a cluster the test built itself.
    async fn on(
        cluster: Cluster,
        repo: String,
        node_ids: Vec<String>,
        cleanup: ContainerCleanup,
    ) -> Self {
        Setup {
            client: cluster.operator().await,
            port: cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[])
                .unwrap(),
            repo,
            node_ids,
            _cleanup: cleanup,
            _cluster: cluster,
        }
    }

    /// Deploys `image`, its version label its tag.
    async fn deploy(
        &mut self,
        image: &str,
        strategy: &str,
    ) -> Result<pb::DeployResponse, tonic::Status> {
        self.deploy_as(image, "", strategy).await
    }

    async fn deploy_as(
        &mut self,
        image: &str,
        version: &str,
        strategy: &str,
    ) -> Result<pb::DeployResponse, tonic::Status> {
        self.client
            .deploy(pb::DeployRequest {
                spec: spec(self.port, strategy),
                spec_file: "cutover.toml".into(),
                env: "test".into(),
                service: String::new(),
                version: version.into(),
                artifact: None,
                image: image.into(),
                allow_unreachable: false,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn finish(&mut self, id: &str) -> pb::Rollout {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let rollout = self
                .client
                .get_rollout(pb::GetRolloutRequest { id: id.into() })
                .await
                .expect("get rollout")
                .into_inner();
            if matches!(
                rollout.state().as_str(),
                "succeeded" | "failed" | "rolled_back" | "aborted"
            ) {
                return rollout;
            }
            assert!(
                Instant::now() < deadline,
                "rollout did not end: {rollout:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deploys `image` and waits for the rollout's end.
    async fn roll(&mut self, image: &str, strategy: &str) -> pb::Rollout {
        self.roll_as(image, "", strategy).await
    }

    async fn roll_as(&mut self, image: &str, version: &str, strategy: &str) -> pb::Rollout {
        let response = self
            .deploy_as(image, version, strategy)
            .await
            .expect("deploy accepted");
        assert_eq!(response.rollouts.len(), 1, "{response:?}");
        let id = response.rollouts[0].id.clone();
        self.finish(&id).await
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", 11 + i, self.port)
    }

    fn versions(&self) -> Vec<String> {
        (0..self.node_ids.len())
            .map(|i| body(&http_get(&self.addr(i), "/")).trim().to_string())
            .collect()
    }

    /// Each node's containers as (image, state).
    fn containers(&self) -> Vec<Vec<(String, String)>> {
        self.node_ids
            .iter()
            .map(|id| {
                containers_of(id)
                    .iter()
                    .map(|c| container_image_and_state(c))
                    .collect()
            })
            .collect()
    }

    /// Asserts every node runs exactly one container, of `image`.
    fn assert_each_node_runs(&self, image: &str) {
        for (node, containers) in self.containers().iter().enumerate() {
            assert_eq!(
                containers,
                &vec![(image.to_string(), "running".to_string())],
                "node {node}'s containers"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_image_versions_cut_over_under_load_without_a_failed_request() {
    let mut s = setup(2, "cutover").await;
    let v1 = push_sample_image(&format!("{}:v1", s.repo), "v1", &[]);
    let v2 = push_sample_image(&format!("{}:v2", s.repo), "v2", &[]);

    let rollout = s.roll(&format!("{}:v1", s.repo), FAST).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    // The version label defaults to the tag; the release pins the digest.
    let release = rollout.release.clone().unwrap_or_default();
    assert!(release.id.starts_with("web-v1-"), "{release:?}");
    assert_eq!(release.image, format!("{}@{v1}", s.repo));
    assert_eq!(release.digest, v1);
    assert_eq!(s.versions(), vec!["v1", "v1"]);
    s.assert_each_node_runs(&format!("{}@{v1}", s.repo));

    let targets = (0..2).map(|i| s.addr(i).parse().unwrap()).collect();
    let load = Load::start(targets, "/", 8);
    load.wait_for_sent(0, 250, "on v1").await;
    let rollout = s.roll(&format!("{}:v2", s.repo), FAST).await;
    let (sent, _) = load.progress();
    load.wait_for_sent(sent, 250, "on v2").await;
    let report = load.stop().await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(
        report.sent > 500,
        "too little load to prove anything: {report:?}"
    );
    let bodies: Vec<&str> = report.by_body.keys().map(|b| b.trim()).collect();
    assert_eq!(bodies, vec!["v1", "v2"], "{:?}", report.by_body);
    assert_eq!(s.versions(), vec!["v2", "v2"]);
    // The old containers are gone, not merely stopped.
    s.assert_each_node_runs(&format!("{}@{v2}", s.repo));
    // Limits, labels and log rotation as the spec and agent config say.
    let container = &containers_of(&s.node_ids[0])[0];
    let settings = docker(&[
        "inspect",
        "--format",
        r#"{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.RestartPolicy.Name}} {{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config "max-size"}} {{index .Config.Labels "cutover.service"}} {{index .Config.Labels "cutover.node"}}"#,
        container,
    ]);
    assert_eq!(
        settings,
        format!("{} 500000000 no json-file {} web node-1", 64 << 20, 1 << 20)
    );
    // Scaled: two containers of the image per node, each on a port of its
    // own behind the node's proxy.
    let scaled = s
        .client
        .scale_service(pb::ScaleServiceRequest {
            env: "test".into(),
            service: "web".into(),
            instances: 2,
            ..Default::default()
        })
        .await
        .expect("scale accepted")
        .into_inner();
    let rollout = s.finish(&scaled.rollouts[0].id).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    let running = vec![(format!("{}@{v2}", s.repo), "running".to_string()); 2];
    assert_eq!(s.containers(), vec![running.clone(), running]);
    assert_eq!(s.versions(), vec!["v2", "v2"]);
    println!(
        "docker cutover under load: {} requests, 0 failed, p99 {:.2} ms",
        report.sent,
        report.quantile_ms(0.99)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_during_a_rollout_changes_nothing() {
    let mut s = setup(2, "moved-tag").await;
    let stable = format!("{}:stable", s.repo);
    let first = push_sample_image(&stable, "first", &[]);
    // Slow batches: the tag moves while the first node is being watched.
    let response = s
        .deploy(&stable, "batch = 1\nmin_healthy_time = \"3s\"")
        .await
        .expect("deploy accepted");
    let id = response.rollouts[0].id.clone();
    let second = push_sample_image(&stable, "second", &[]);
    assert_ne!(first, second, "the tag really moved");
    let rollout = s.finish(&id).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    assert_eq!(s.versions(), vec!["first", "first"]);
    s.assert_each_node_runs(&format!("{}@{first}", s.repo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_refused_and_the_serving_release_is_untouched() {
    let mut s = setup(1, "missing").await;
    // A tag the registry does not have: the deploy itself is refused.
    let error = s
        .deploy(&format!("{}:nope", s.repo), FAST)
        .await
        .expect_err("an unknown tag is refused");
    assert!(error.message().contains("not found"), "{}", error.message());
    assert!(error.message().contains("nope"), "{}", error.message());
    let listed = s
        .client
        .list_rollouts(pb::ListRolloutsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.rollouts.is_empty(),
        "nothing was created: {listed:?}"
    );

    let v1 = push_sample_image(&format!("{}:v1", s.repo), "v1", &[]);
    assert_eq!(
        s.roll(&format!("{}:v1", s.repo), FAST)
            .await
            .state()
            .as_str(),
        "succeeded"
    );
    // A pinned digest is taken as is; the node cannot pull it, and says so.
    let absent = format!("{}@sha256:{}", s.repo, "0".repeat(64));
    let rollout = s.roll_as(&absent, "v2", FAST).await;
    assert_ne!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    let error = error_message(&rollout);
    assert!(error.contains("not found"), "{rollout:#?}");
    assert_eq!(s.versions(), vec!["v1"]);
    s.assert_each_node_runs(&format!("{}@{v1}", s.repo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_image_never_takes_traffic() {
    let mut s = setup(1, "broken").await;
    let v1 = push_sample_image(&format!("{}:v1", s.repo), "v1", &[]);
    push_sample_image(&format!("{}:v2", s.repo), "v2", &[("BROKEN", "0")]);
    assert_eq!(
        s.roll(&format!("{}:v1", s.repo), FAST)
            .await
            .state()
            .as_str(),
        "succeeded"
    );
    let rollout = s
        .roll(
            &format!("{}:v2", s.repo),
            "batch = 1\nmin_healthy_time = \"300ms\"\nauto_rollback = true",
        )
        .await;
    assert_ne!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    let error = error_message(&rollout);
    assert!(error.contains("not healthy"), "{rollout:#?}");
    assert_eq!(s.versions(), vec!["v1"]);
    // The broken container was removed; only v1's runs.
    s.assert_each_node_runs(&format!("{}@{v1}", s.repo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_readopts_its_container_and_restarts_one_that_died() {
    let env = docker_env();
    let cluster = Cluster::start(0, Tuning::default()).await;
    let agent = cluster.spawn_agent_binary("node-1");
    let wait_ready = || async {
        cluster
            .wait_for_nodes(Duration::from_secs(15), |n| {
                find(n, "node-1").is_some_and(ready)
            })
            .await
    };
    wait_ready().await;
    let node_id = cutover_agent::state::node_id(&agent.state_dir).unwrap();
    let _cleanup = ContainerCleanup(vec![node_id.clone()]);
    let repo = format!("{}/cutover-test/adopt-{}", env.registry, std::process::id());
    push_sample_image(&format!("{repo}:v1"), "v1", &[]);
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[]).unwrap();
    let mut client = cluster.operator().await;
    let response = client
        .deploy(pb::DeployRequest {
            spec: spec(port, FAST),
            spec_file: "cutover.toml".into(),
            env: "test".into(),
            image: format!("{repo}:v1"),
            ..Default::default()
        })
        .await
        .expect("deploy accepted")
        .into_inner();
    let id = response.rollouts[0].id.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rollout = client
            .get_rollout(pb::GetRolloutRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if rollout.state().as_str() == "succeeded" {
            break;
        }
        assert!(
            Instant::now() < deadline && matches!(rollout.state().as_str(), "pending" | "running"),
            "{rollout:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let public = format!("127.0.0.11:{port}");
    let before = containers_of(&node_id);
    assert_eq!(before.len(), 1);

    // kill -9 of the agent: the container keeps running on its own.
    let state_dir = agent.state_dir.clone();
    agent.kill();
    assert_eq!(container_image_and_state(&before[0]).1, "running");
    let agent = cluster.spawn_agent_binary("node-1");
    wait_ready().await;
    let served = get_when_up(&public).await;
    assert_eq!(body(&served).trim(), "v1");
    assert_eq!(
        containers_of(&node_id),
        before,
        "the same container, adopted"
    );

    // An agent of the node on another state dir (a hand-run agent
    // replaced by the unit) would not see the container: it refuses,
    // naming the dir the container came from, and changes nothing.
    agent.kill();
    let (config, _) = cluster.agent_config_file("node-1", None);
    let (moved, said) = start_on_moved_state_dir(&config, &state_dir);
    assert!(
        said.contains(&format!(
            "releases of node node-1 run from state dir {} (container {}",
            state_dir.display(),
            &before[0][..12]
        )),
        "{said}"
    );
    assert!(!moved.join("node-id").exists());
    assert_eq!(containers_of(&node_id), before, "left alone");

    // The container dies while the agent is down: the restarted agent
    // removes it and starts the active release again.
    docker(&["kill", &before[0]]);
    let agent = cluster.spawn_agent_binary("node-1");
    wait_ready().await;
    assert_eq!(body(&get_when_up(&public).await).trim(), "v1");
    // Reported: the node's state counts it as a crash, and says how.
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            find(n, "node-1").is_some_and(|node| {
                node.services.iter().any(|s| {
                    s.service == "web" && s.crashes == 1 && s.last_exit.contains("agent was down")
                })
            })
        })
        .await;
    let after = containers_of(&node_id);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before, "a new container replaced the dead one");
    assert_eq!(container_image_and_state(&after[0]).1, "running");
    assert_eq!(agent.state_dir, state_dir);
    agent.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_the_images_of_the_active_previous_and_newest_releases_only() {
    let env = docker_env();
    let cluster = Cluster::start(0, Tuning::default()).await;
    let mut config = cluster.agent_config("node-1");
    config.releases_keep = 1;
    let agent = spawn_agent(config).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            find(n, "node-1").is_some_and(ready)
        })
        .await;
    let mut s = Setup::on(
        cluster,
        format!("{}/cutover-test/prune-{}", env.registry, std::process::id()),
        vec![agent.node_id.clone()],
        ContainerCleanup(vec![agent.node_id.clone()]),
    )
    .await;
    let mut images = Vec::new();
    for version in ["v1", "v2", "v3", "v4"] {
        let digest = push_sample_image(&format!("{}:{version}", s.repo), version, &[]);
        images.push(format!("{}@{digest}", s.repo));
        if version == "v4" {
            // Releases prepared more than a day ago are fair game.
            let releases = agent.state_dir.join("releases");
            let old = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
            for entry in std::fs::read_dir(&releases).unwrap() {
                let path = entry.unwrap().path();
                std::fs::File::open(&path)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
        let rollout = s.roll(&format!("{}:{version}", s.repo), FAST).await;
        assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
        assert!(image_present(images.last().unwrap()), "pulled by digest");
    }
    // Kept: v4 (active, and the newest one `releases_keep = 1` keeps) and
    // v3 (previous, for a fast rollback). Pruned: v1 and v2.
    let present: Vec<bool> = images.iter().map(|i| image_present(i)).collect();
    assert_eq!(present, vec![false, false, true, true], "{images:?}");
    let mut dirs: Vec<String> = std::fs::read_dir(agent.state_dir.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    assert!(
        dirs[0].starts_with("web-v3-") && dirs[1].starts_with("web-v4-"),
        "{dirs:?}"
    );
    s.assert_each_node_runs(&images[3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_wants_a_login_refuses_without_one_and_serves_with_it() {
    let env = docker_env();
    let repo = format!(
        "{}/cutover-test/auth-{}",
        env.auth_registry,
        std::process::id()
    );
    let digest = push_sample_image(&format!("{repo}:v1"), "v1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{}\n", AUTH_LOGIN.1)).unwrap();
    let login = |password_file: &std::path::Path| RegistryLogin {
        registry: env.auth_registry.clone(),
        username: AUTH_LOGIN.0.into(),
        password_file: password_file.to_path_buf(),
    };

    // Resolving the tag: with the login the coordinator gets the digest,
    // without one (or with a wrong one) it says the registry refused.
    let credentials = load_credentials(&[login(&password_file)]).unwrap();
    let resolver = ImageResolver::new(None, credentials).unwrap();
    let pinned = resolver.pin(&format!("{repo}:v1")).await.unwrap();
    assert_eq!(pinned.image, format!("{repo}@{digest}"));
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    for credentials in [Vec::new(), load_credentials(&[login(&wrong)]).unwrap()] {
        let error = ImageResolver::new(None, credentials)
            .unwrap()
            .pin(&format!("{repo}:v1"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, RegistryError::AuthRefused { .. }),
            "{error}"
        );
        assert!(error.to_string().contains(&env.auth_registry), "{error}");
    }

    // The test coordinator has no login: the deploy is refused at once.
    let cluster = Cluster::start(0, Tuning::default()).await;
    let agent = spawn_agent(cluster.agent_config("node-1")).await;
    let wait_ready = || async {
        cluster
            .wait_for_nodes(Duration::from_secs(10), |n| {
                find(n, "node-1").is_some_and(ready)
            })
            .await
    };
    wait_ready().await;
    let node_id = agent.node_id.clone();
    let mut s = Setup::on(
        cluster,
        repo.clone(),
        vec![node_id.clone()],
        ContainerCleanup(vec![node_id]),
    )
    .await;
    let error = s.deploy(&format!("{repo}:v1"), FAST).await.unwrap_err();
    assert!(
        error.message().contains("refused access"),
        "{}",
        error.message()
    );

    // Pinned, the image reaches the agent, which has no login either.
    let rollout = s.roll_as(&pinned.image, "v1", FAST).await;
    assert_ne!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    let message = rollout.error.map(|e| e.message).unwrap_or_default();
    assert!(message.contains("refused access"), "{message}");
    assert!(containers_of(&s.node_ids[0]).is_empty());

    // Given the login, the same agent pulls and serves it.
    agent.stop().await;
    let mut config = s._cluster.agent_config("node-1");
    config.registries = vec![login(&password_file)];
    let _agent = spawn_agent(config).await;
    s._cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            find(n, "node-1").is_some_and(ready)
        })
        .await;
    let rollout = s.roll_as(&pinned.image, "v1", FAST).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    assert_eq!(s.versions(), vec!["v1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_networking_serves_on_the_node_address() {
    let mut s = setup(1, "host-net").await;
    let v1 = push_sample_image(&format!("{}:v1", s.repo), "v1", &[]);
    let response = s
        .client
        .deploy(pb::DeployRequest {
            spec: spec_with(s.port, "network = \"host\"", FAST),
            spec_file: "cutover.toml".into(),
            env: "test".into(),
            image: format!("{}:v1", s.repo),
            ..Default::default()
        })
        .await
        .expect("deploy accepted")
        .into_inner();
    let rollout = s.finish(&response.rollouts[0].id).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    assert_eq!(s.versions(), vec!["v1"]);
    let container = &containers_of(&s.node_ids[0])[0];
    assert_eq!(
        docker(&[
            "inspect",
            "--format",
            "{{.HostConfig.NetworkMode}}",
            container
        ]),
        "host"
    );
    s.assert_each_node_runs(&format!("{}@{v1}", s.repo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_container_is_asked_by_its_stop_command_and_finishes_its_job() {
    let mut s = setup(1, "worker").await;
    let v1 = push_sample_image(&format!("{}:v1", s.repo), "v1", &[]);
    let v2 = push_sample_image(&format!("{}:v2", s.repo), "v2", &[]);
    // No init: the worker is PID 1 and ignores SIGTERM, so only its stop
    // command can end it before the long stop timeout and grace.
    let worker_spec = r#"
app = "shop"

[services.worker]
runtime = "docker"
command = ["worker"]
stop_command = ["/sample-app", "stop"]
stop_timeout = "30s"
stop_grace = "30s"
min_healthy_time = "500ms"

[strategy]
batch = 1
min_healthy_time = "300ms"

[environments.test]
nodes = { env = "test" }
"#;
    let client = s.client.clone();
    let deploy = |image: String| {
        let mut client = client.clone();
        async move {
            client
                .deploy(pb::DeployRequest {
                    spec: worker_spec.into(),
                    spec_file: "cutover.toml".into(),
                    env: "test".into(),
                    image,
                    ..Default::default()
                })
                .await
                .expect("deploy accepted")
                .into_inner()
                .rollouts[0]
                .id
                .clone()
        }
    };
    let id = deploy(format!("{}:v1", s.repo)).await;
    assert_eq!(s.finish(&id).await.state().as_str(), "succeeded");
    s.assert_each_node_runs(&format!("{}@{v1}", s.repo));
    let started = Instant::now();
    let id = deploy(format!("{}:v2", s.repo)).await;
    let rollout = s.finish(&id).await;
    assert_eq!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    // The stop signal would have needed the 30 s stop timeout and 30 s
    // grace: a bound well short of that says the stop command ended it,
    // however slow the machine is otherwise.
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the old worker was not ended by its stop command: {:?}",
        started.elapsed()
    );
    s.assert_each_node_runs(&format!("{}@{v2}", s.repo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_reports_its_layers_and_bytes_as_it_goes() {
    let s = setup(1, "progress").await;
    let digest = push_sample_image(&format!("{}:v1", s.repo), "v1", &[]);
    let image = format!("{}@{digest}", s.repo);
    let mut release = web_release("v1", s.port, &(String::new(), String::new()), &[]);
    release.artifact = None;
    release.command.clear();
    release.container = Some(pb::Container {
        image: image.clone(),
        ..Default::default()
    });
    let command = pb::Command {
        command_id: "prepare-1".into(),
        kind: Some(pb::command::Kind::Prepare(pb::PrepareRelease {
            release: Some(release),
        })),
    };
    let (result, steps) = s._cluster.run_command("node-1", command).await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{result:?}"
    );
    assert_eq!(
        steps.first().map(String::as_str),
        Some("pulling"),
        "{steps:?}"
    );
    // The last summary: every layer done, sizes in MiB.
    let last = steps.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("pulling: 1/1 layers,") && last.ends_with("MiB"),
        "{steps:?}"
    );
    assert!(image_present(&image));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_engine_says_so_and_changes_nothing() {
    let env = docker_env();
    let cluster = Cluster::start(0, Tuning::default()).await;
    let mut config = cluster.agent_config("node-1");
    config.docker_host = "unix:///nonexistent/docker.sock".into();
    let _agent = spawn_agent(config).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            find(n, "node-1").is_some_and(ready)
        })
        .await;
    let repo = format!(
        "{}/cutover-test/no-engine-{}",
        env.registry,
        std::process::id()
    );
    push_sample_image(&format!("{repo}:v1"), "v1", &[]);
    let mut s = Setup::on(
        cluster,
        repo.clone(),
        Vec::new(),
        ContainerCleanup(Vec::new()),
    )
    .await;
    let rollout = s.roll(&format!("{repo}:v1"), FAST).await;
    assert_ne!(rollout.state().as_str(), "succeeded", "{rollout:#?}");
    let message = rollout.error.map(|e| e.message).unwrap_or_default();
    assert!(
        message.contains("/nonexistent/docker.sock") && message.contains("is dockerd running"),
        "{message}"
    );
    // Nothing serves: the public port was never taken.
    assert!(std::net::TcpStream::connect(format!("127.0.0.11:{}", s.port)).is_err());
}
