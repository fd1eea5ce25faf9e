//! The real `cutover-agent` binary killed with SIGKILL, in steady state and
//! in the middle of a cutover: after a restart one release serves and no
//! process is orphaned.

use std::path::Path;
use std::time::{Duration, Instant};

use cutover_integration_tests::{
    activate, app_archive, body, deploy_request, ended, find, get_when_up, http_get, ready,
    release_pids, wait_for_rollout, web_release, web_spec, Cluster, Tuning,
};
use cutover_proto::v1 as pb;

async fn wait_ready(cluster: &Cluster) {
    cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            find(n, "node-1").is_some_and(ready)
        })
        .await;
}

async fn wait_for_releases(state_dir: &Path, count: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = release_pids(state_dir);
        if pids.len() == count {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} release processes, found {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_comes_back_to_one_serving_release_without_orphans() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let agent = cluster.spawn_agent_binary("node-1");
    wait_ready(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let public = format!("127.0.0.11:{port}");

    let (result, _) = cluster
        .run_command(
            "node-1",
            activate("v1", web_release("v1", port, &artifact, &[])),
        )
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        result.message
    );
    assert_eq!(body(&http_get(&public, "/")), "v1");
    let state_dir = agent.state_dir.clone();
    let v1 = wait_for_releases(&state_dir, 1).await;

    // Steady state: kill -9. The release keeps running without its agent,
    // and the restarted agent adopts it.
    agent.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        release_pids(&state_dir),
        v1,
        "the release survived its agent"
    );
    let agent = cluster.spawn_agent_binary("node-1");
    wait_ready(&cluster).await;
    assert_eq!(body(&get_when_up(&public).await), "v1");
    assert_eq!(agent.release_pids(), v1, "adopted, not started again");

    // During a cutover: v2 never turns healthy, so the agent is killed while
    // it checks v2 beside v1.
    let mut v2 = web_release("v2", port, &artifact, &[("HEALTH", "fail")]);
    if let Some(pb::release::Kind::Web(web)) = &mut v2.kind {
        web.healthy_deadline_ms = 60_000;
    }
    let registry = &cluster.coordinator.as_ref().unwrap().registry;
    let pending = registry.send_command("node-1", activate("v2", v2)).unwrap();
    let waiting = pending.wait(Duration::from_secs(60), |_| {});
    let (outcome, _) = tokio::join!(waiting, async {
        wait_for_releases(&state_dir, 2).await;
        // Into v2's health check (60 s), where it is recorded as a
        // leftover. A kill in the moment between its spawn and that record
        // leaves it unrecorded; the restarted agent finds it by its label
        // (agent/tests/state_dir.rs covers that moment).
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.kill();
    });
    assert!(
        outcome.is_err(),
        "the command ends with its agent: {outcome:?}"
    );

    let agent = cluster.spawn_agent_binary("node-1");
    wait_ready(&cluster).await;
    assert_eq!(body(&get_when_up(&public).await), "v1");
    assert_eq!(
        wait_for_releases(&state_dir, 1).await,
        v1,
        "v2's candidate was stopped, v1 kept"
    );

    let stop = pb::Command {
        command_id: "stop".into(),
        kind: Some(pb::command::Kind::StopService(pb::StopService {
            service: "web".into(),
            remove: false,
        })),
    };
    let (stopped, _) = cluster.run_command("node-1", stop).await;
    assert_eq!(
        stopped.status,
        pb::CommandStatus::Succeeded as i32,
        "{}",
        stopped.message
    );
    wait_for_releases(&state_dir, 0).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_during_its_own_cutover_in_a_rollout_ends_on_one_release() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let names = ["node-1", "node-2", "node-3"];
    let mut agents: Vec<_> = names
        .iter()
        .map(|n| cluster.spawn_agent_binary(n))
        .collect();
    cluster
        .wait_for_nodes(Duration::from_secs(20), |n| {
            n.len() == 3 && n.iter().all(ready)
        })
        .await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 11].into(), &(40000..=44999), &[]).unwrap();
    let mut client = cluster.operator().await;
    let deploy = |version: &str, env: &str, strategy: &str| {
        let spec = web_spec(port, &format!("VERSION = \"{version}\"\n{env}"), strategy);
        deploy_request(spec, version, &artifact)
    };
    let v1 = client
        .deploy(deploy("v1", "", "batch = 3"))
        .await
        .unwrap()
        .into_inner()
        .rollouts[0]
        .id
        .clone();
    let v1 = wait_for_rollout(&mut client, &v1, Duration::from_secs(90), ended).await;
    assert_eq!(v1.state().as_str(), "succeeded");

    // v2 starts slowly, so its cutover on node-2 is well under way when
    // node-2's agent is killed.
    let v2 = client
        .deploy(deploy(
            "v2",
            "START_DELAY = \"1.5\"",
            "batch = 1\nmin_healthy_time = \"500ms\"",
        ))
        .await
        .unwrap()
        .into_inner()
        .rollouts[0]
        .id
        .clone();
    wait_for_rollout(&mut client, &v2, Duration::from_secs(60), |r| {
        r.nodes
            .iter()
            .any(|n| n.name == "node-2" && n.state().as_str() == "activating")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    agents.remove(1).kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    agents.insert(1, cluster.spawn_agent_binary("node-2"));

    let done = wait_for_rollout(&mut client, &v2, Duration::from_secs(90), ended).await;
    let last = done.timeline.last().map(|e| e.kind.as_str());
    assert_eq!(last, Some(done.state().as_str()), "{done:#?}");
    let expected = match done.state().as_str() {
        "succeeded" => "v2",
        "rolled_back" => "v1",
        other => panic!("the rollout ended {other}: {done:#?}"),
    };
    for (i, agent) in agents.iter().enumerate() {
        let public = format!("127.0.0.{}:{port}", 11 + i);
        assert_eq!(
            body(&get_when_up(&public).await),
            expected,
            "node-{}",
            i + 1
        );
        assert_eq!(
            wait_for_releases(&agent.state_dir, 1).await.len(),
            1,
            "node-{}: one release process, no orphan",
            i + 1
        );
    }
    eprintln!(
        "the rollout ended {} ({expected} everywhere)",
        done.state().as_str()
    );
    drop(agents);
}

fn task(id: &str, release: pb::Release, script: &str, timeout_ms: u64) -> pb::Command {
    pb::Command {
        command_id: id.into(),
        kind: Some(pb::command::Kind::RunTask(pb::RunTask {
            release: Some(release),
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_ms,
            secret_values: Default::default(),
            env: [("CUTOVER_ENV".to_string(), "test".to_string())].into(),
        })),
    }
}

fn task_result(result: &pb::CommandResult) -> &pb::TaskResult {
    match &result.output {
        Some(pb::command_result::Output::Task(task)) => task,
        _ => panic!("not a task result: {result:?}"),
    }
}

/// A task runs once per id, with its release's files and environment: its
/// exit code, output and timeout come back; an agent killed while one runs
/// answers its id, once restarted, with UNKNOWN, and never runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_once_even_when_its_agent_is_killed_while_it_runs() {
    let cluster = Cluster::start(0, Tuning::default()).await;
    let agent = cluster.spawn_agent_binary("node-1");
    wait_ready(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let artifact = app_archive(dir.path());
    let release = web_release("v1", 1, &artifact, &[("GREETING", "hello")]);

    let script =
        "test -f app.py && echo \"$GREETING $VERSION in $CUTOVER_ENV\"; echo oops >&2; exit 3";
    let (result, steps) = cluster
        .run_command("node-1", task("t1", release.clone(), script, 0))
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Succeeded as i32,
        "{result:?}"
    );
    let ended = task_result(&result);
    assert_eq!(ended.exit_code, 3, "{ended:?}");
    assert!(!ended.timed_out);
    assert!(ended.output_tail.contains("hello v1 in test"), "{ended:?}");
    assert!(ended.output_tail.contains("oops"), "{ended:?}");
    assert!(steps.iter().any(|s| s == "output"), "{steps:?}");

    let (result, _) = cluster
        .run_command("node-1", task("t2", release.clone(), "sleep 30", 300))
        .await;
    let ended = task_result(&result);
    assert!(ended.timed_out && ended.exit_code == -1, "{ended:?}");

    // Killed mid-run: the marker shows it started, once.
    let marker = dir.path().join("runs");
    let script = format!("echo run >> {}; sleep 30", marker.display());
    cluster.send_command("node-1", task("t3", release.clone(), &script, 0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&marker).is_ok_and(|m| m == "run\n") {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill();
    cluster
        .wait_for_nodes(Duration::from_secs(15), |n| {
            find(n, "node-1").is_some_and(|n| !n.connected)
        })
        .await;
    let _agent = cluster.spawn_agent_binary("node-1");
    wait_ready(&cluster).await;
    let (result, _) = cluster
        .run_command("node-1", task("t3", release, &script, 0))
        .await;
    assert_eq!(
        result.status,
        pb::CommandStatus::Unknown as i32,
        "{result:?}"
    );
    assert!(result.replayed, "{result:?}");
    assert!(result.message.contains("not known"), "{}", result.message);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "run\n",
        "run once, never again"
    );
}
