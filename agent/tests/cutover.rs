//! Cutovers of a real web app (tests/fixtures/app.py, run by python3) behind
//! the node proxy: real processes, real sockets.

mod common;
use common::app::{app_pids, release_dir, running_app, settings, web_release};
use common::get;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cutover_agent::artifacts::ArtifactCache;
use cutover_agent::checks::Probe;
use cutover_agent::proxy::{Proxy, ProxyConfig};
use cutover_agent::service::{CutoverError, Service, ServiceKind, Step, WebRelease};
use cutover_agent::store::AgentStore;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

struct Fixture {
    root: tempfile::TempDir,
    cache: ArtifactCache,
    store: Arc<AgentStore>,
    service: Service,
    shutdown: CancellationToken,
}

async fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(
        root.path().join("artifacts"),
        None,
        &[root.path().to_path_buf()],
    )
    .unwrap();
    let store = Arc::new(AgentStore::open(&root.path().join("db")).unwrap());
    let shutdown = CancellationToken::new();
    let proxy = Proxy::bind(
        ProxyConfig::new("web", "127.0.0.1:0".parse().unwrap()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let service = Service::recover(
        settings(root.path()),
        ServiceKind::Web(proxy),
        store.clone(),
    )
    .await
    .unwrap();
    Fixture {
        root,
        cache,
        store,
        service,
        shutdown,
    }
}

impl Fixture {
    /// Starts a cutover to `version`, which never turns healthy, and drops it
    /// in its health checks (as an agent crash would) once the candidate
    /// runs, with `processes` release processes running in all.
    async fn cut_short_in_health_checks(&mut self, version: &str, processes: usize) {
        let mut release = self.release(version, &[("HEALTH", "fail")]).await;
        release.gate.deadline = Duration::from_secs(60);
        let (checking, checked) = tokio::sync::oneshot::channel();
        let checking = std::sync::Mutex::new(Some(checking));
        tokio::select! {
            _ = self.service.cutover(release, |step| {
                if step == Step::HealthChecking {
                    if let Some(tx) = checking.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                }
            }) => panic!("{version} cannot pass its checks"),
            _ = checked => {}
        }
        // Spawned, but maybe not yet exec'd into python (until then its
        // command line is still this test's).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.app_processes() != processes {
            assert!(
                std::time::Instant::now() < deadline,
                "expected {processes} release processes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What an agent restart does to this service: the old agent goes away
    /// without stopping anything (as after kill -9), a new one binds the
    /// same proxy port and recovers from the store.
    async fn restart_agent(&mut self, before_recovery: impl FnOnce()) {
        let listen = self.service.proxy().expect("a web service").local_addr();
        let shutdown = std::mem::replace(&mut self.shutdown, CancellationToken::new());
        let old = std::mem::replace(
            &mut self.service,
            placeholder(&self.root, &self.store).await,
        );
        shutdown.cancel();
        if let Some(proxy) = old.release().await {
            proxy.close().await;
        }
        before_recovery();
        let proxy = Proxy::bind(ProxyConfig::new("web", listen), self.shutdown.clone())
            .await
            .unwrap();
        self.service = Service::recover(
            settings(self.root.path()),
            ServiceKind::Web(proxy),
            self.store.clone(),
        )
        .await
        .unwrap();
    }

    async fn release(&self, version: &str, env: &[(&str, &str)]) -> WebRelease {
        let dir = release_dir(self.root.path(), &self.cache, version).await;
        web_release(&dir, version, env)
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.service.proxy().expect("a web service").local_addr()
        )
    }

    /// Starts GET /slow?chunks=N (a chunk a second) and returns once it is
    /// under way: in flight to the serving release until its last chunk,
    /// which the returned task reads.
    async fn hold_request(&self, chunks: u32) -> tokio::task::JoinHandle<()> {
        let client = Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let url = self.url(&format!("/slow?chunks={chunks}"));
        let response = client.get(url.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);
        tokio::spawn(async move {
            let _ = response.into_body().collect().await;
        })
    }

    /// Live processes of this fixture's releases.
    fn app_processes(&self) -> usize {
        app_pids(self.root.path()).len()
    }
}

/// A stand-in service on a throwaway port while the real one is swapped out.
async fn placeholder(root: &tempfile::TempDir, store: &Arc<AgentStore>) -> Service {
    let proxy = Proxy::bind(
        ProxyConfig::new("web", "127.0.0.1:0".parse().unwrap()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut settings = settings(root.path());
    settings.name = "placeholder".into();
    Service::recover(settings, ServiceKind::Web(proxy), store.clone())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_cutovers_of_a_real_app_under_load_fail_no_request() {
    let mut fx = fixture().await;
    let first = fx.release("v0", &[]).await;
    fx.service.cutover(first, |_| {}).await.unwrap();

    let stop = CancellationToken::new();
    let served = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for _ in 0..3 {
        let (url, stop, served) = (fx.url("/"), stop.clone(), served.clone());
        loaders.push(tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http();
            let mut failures = Vec::new();
            while !stop.is_cancelled() {
                match get(&client, &url).await {
                    Ok((200, body)) if body.starts_with('v') => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            failures
        }));
    }

    for i in 1..=20 {
        let version = format!("v{i}");
        let release = fx.release(&version, &[]).await;
        let steps = std::sync::Mutex::new(Vec::new());
        let report = fx
            .service
            .cutover(release, |step| steps.lock().unwrap().push(step))
            .await
            .unwrap();
        let previous = report.previous.expect("a release served before");
        assert!(previous.drain.completed, "{previous:?}");
        assert_eq!(
            steps.into_inner().unwrap(),
            [
                Step::Starting,
                Step::HealthChecking,
                Step::SmokeTesting,
                Step::Switching,
                Step::Draining,
                Step::StoppingOld
            ]
        );
    }
    stop.cancel();
    let mut failures = Vec::new();
    for loader in loaders {
        failures.extend(loader.await.unwrap());
    }
    let served = served.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        served,
        &failures[..failures.len().min(5)]
    );
    assert!(served > 100, "only {served} requests");
    assert_eq!(fx.service.active().unwrap().0, "web-v20");
    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v20".into())
    );
    assert_eq!(
        fx.app_processes(),
        1,
        "exactly one release runs, no orphans"
    );
    let record = fx.store.service("web").unwrap().unwrap();
    assert_eq!(
        record.history.len(),
        21,
        "every release it served, oldest first"
    );
    assert_eq!(
        (record.history[0].as_str(), record.history[20].as_str()),
        ("web-v0", "web-v20")
    );
    assert_eq!(record.previous.as_deref(), Some("web-v19"));
    assert!(record.leftovers.is_empty());
    fx.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_release_is_refused_and_the_old_one_keeps_serving() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();

    let mut v2 = fx.release("v2", &[("HEALTH", "fail")]).await;
    v2.gate.deadline = Duration::from_millis(800);
    let error = fx.service.cutover(v2, |_| {}).await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, CutoverError::Unhealthy { .. }), "{error:?}");
    assert!(
        text.contains("web-v2") && text.contains("release web-v1 keeps serving"),
        "{text}"
    );
    assert!(
        text.contains("http GET /health") && text.contains("database unreachable"),
        "{text}"
    );

    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v1".into())
    );
    assert_eq!(fx.service.active().unwrap().0, "web-v1");
    assert_eq!(fx.app_processes(), 1, "the refused release was stopped");
    fx.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_smoke_check_or_a_crash_keeps_the_old_release() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();

    let mut v2 = fx.release("v2", &[]).await;
    v2.smoke[0].probe = Probe::Http {
        path: "/".into(),
        expect_status: 200..=200,
        body_contains: Some("checkout".into()),
    };
    let error = fx.service.cutover(v2, |_| {}).await.unwrap_err();
    assert!(
        matches!(error, CutoverError::SmokeFailed { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("lacks \"checkout\""), "{error}");

    let mut v3 = fx.release("v3", &[]).await;
    v3.command = vec![
        "python3".into(),
        "-c".into(),
        "import sys; sys.exit(4)".into(),
    ];
    v3.gate.deadline = Duration::from_millis(1500);
    let error = fx.service.cutover(v3, |_| {}).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("the process crashed: exit status: 4"),
        "{error}"
    );

    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v1".into())
    );
    assert_eq!(fx.app_processes(), 1);
    fx.service.stop().await;
    assert_eq!(fx.app_processes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_from_the_old_release_completes_across_a_cutover() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.get(fx.url("/slow").parse().unwrap()).await.unwrap();
    let body =
        tokio::spawn(async move { response.into_body().collect().await.map(|b| b.to_bytes()) });

    let v2 = fx.release("v2", &[]).await;
    let report = fx.service.cutover(v2, |_| {}).await.unwrap();
    let previous = report.previous.unwrap();
    assert!(
        previous.drain.completed && previous.drain.cut == 0,
        "{previous:?}"
    );
    assert_eq!(&body.await.unwrap().unwrap()[..], b"v1-0v1-1v1-2");
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v2".into())
    );
    fx.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_running_release_and_serves_it_again() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();
    let pids = app_pids(fx.root.path());
    assert_eq!(pids.len(), 1);

    fx.restart_agent(|| {}).await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v1".into())
    );
    assert_eq!(app_pids(fx.root.path()), pids, "adopted, not started again");

    // The adopted release can be replaced like any other.
    let v2 = fx.release("v2", &[]).await;
    let report = fx.service.cutover(v2, |_| {}).await.unwrap();
    assert!(report.previous.unwrap().stop.graceful);
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v2".into())
    );
    assert_eq!(app_pids(fx.root.path()).len(), 1);
    fx.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_died_with_the_agent_is_started_again_on_recovery() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();
    let pids = app_pids(fx.root.path());
    fx.restart_agent(|| {
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // Judged by /proc/<pid>/stat, not the command line: an exiting
        // process loses its command line before it is a zombie.
        let alive = |pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
        };
        while pids.iter().any(alive) {
            assert!(
                std::time::Instant::now() < deadline,
                "the release did not die"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v1".into())
    );
    let now = app_pids(fx.root.path());
    assert_eq!(now.len(), 1);
    assert!(!pids.contains(&now[0]), "a new process");
    // The store names the new process, so the next restart adopts it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let record = fx.store.service("web").unwrap().unwrap();
        if record
            .active
            .unwrap()
            .instances
            .ids()
            .next()
            .and_then(|i| i.process())
            .map(|p| p.pid)
            == Some(now[0])
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store still names the dead process"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.service.stop().await;
    assert!(app_pids(fx.root.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_cut_short_by_an_agent_crash_leaves_no_orphan() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();

    // v2 never turns healthy, so its cutover sits in the health checks
    // until the "crash" drops it there.
    fx.cut_short_in_health_checks("v2", 2).await;

    fx.restart_agent(|| {}).await;
    assert_eq!(
        fx.app_processes(),
        1,
        "the candidate was stopped on recovery"
    );
    let client = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(
        get(&client, &fx.url("/")).await.unwrap(),
        (200, "v1".into())
    );
    fx.service.stop().await;
    assert_eq!(fx.app_processes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_release_that_turns_unhealthy_shows_in_the_service_state() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fx.service.state().health_detail.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no health check after the cutover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fx.service.state().healthy);

    assert_eq!(get(&client, &fx.url("/sick")).await.unwrap().0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fx.service.state().healthy {
        assert!(
            std::time::Instant::now() < deadline,
            "the degraded release still reads healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = fx.service.state();
    assert!(
        state.health_detail.contains("503") && state.health_detail.contains("database unreachable"),
        "{state:?}"
    );
    assert_eq!(
        state.release_id, "web-v1",
        "it keeps serving: health is reported, not acted on here"
    );
    fx.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_cutover_cut_short_leaves_no_orphan() {
    let mut fx = fixture().await;
    fx.cut_short_in_health_checks("v1", 1).await;
    fx.restart_agent(|| {}).await;
    assert_eq!(
        fx.app_processes(),
        0,
        "the candidate of the first cutover was stopped"
    );
    assert!(fx.service.active().is_none());
}

/// The drain when cutting over to a release is that release's own drain
/// timeout, in both directions, whatever the service's first release said;
/// a stop drains with the serving release's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_release_drains_with_its_own_drain_timeout() {
    let (short, long) = (Duration::from_millis(200), Duration::from_secs(60));
    let mut fx = fixture().await;
    let draining = |mut release: WebRelease, drain_timeout| {
        release.drain_timeout = drain_timeout;
        release
    };
    let v1 = draining(fx.release("v1", &[]).await, short);
    fx.service.cutover(v1, |_| {}).await.unwrap();

    // Short to long: a 2 s response to v1 finishes, v1's 200 ms aside.
    let held = fx.hold_request(3).await;
    let v2 = draining(fx.release("v2", &[]).await, long);
    let report = fx.service.cutover(v2, |_| {}).await.unwrap();
    let drain = report.previous.unwrap().drain;
    assert!(drain.completed && drain.cut == 0, "{drain:?}");
    held.await.unwrap();

    // Long to short: a response to v2 that would take a minute is cut.
    let held = fx.hold_request(60).await;
    let v3 = draining(fx.release("v3", &[]).await, short);
    let report = fx.service.cutover(v3, |_| {}).await.unwrap();
    let drain = report.previous.unwrap().drain;
    assert!(!drain.completed && drain.cut == 1, "{drain:?}");
    assert!(drain.waited >= short, "{drain:?}");
    held.abort();

    // A stop drains as the serving release says.
    let v4 = draining(fx.release("v4", &[]).await, long);
    fx.service.cutover(v4, |_| {}).await.unwrap();
    let held = fx.hold_request(3).await;
    let stopped = fx.service.stop().await.unwrap();
    assert!(
        stopped.drain.completed && stopped.drain.cut == 0,
        "{:?}",
        stopped.drain
    );
    held.await.unwrap();
    assert_eq!(fx.app_processes(), 0);
}

/// GETs /whoami `n` times: how many answers each (port, pid) gave; every
/// answer must be a 200 from `version`.
async fn whoami(fx: &Fixture, version: &str, n: usize) -> BTreeMap<(u16, u32), usize> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (status, body) = get(&client, &fx.url("/whoami")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let mut words = body.split(' ');
        assert_eq!(words.next(), Some(version), "{body}");
        let port = words.next().unwrap().parse().unwrap();
        let pid = words.next().unwrap().parse().unwrap();
        *seen.entry((port, pid)).or_default() += 1;
    }
    seen
}

/// Waits until the serving release reports `up` of its processes up.
async fn until_up(fx: &Fixture, up: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fx.service.state().instances_up != up {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?} processes up, not {up}",
            fx.service.state().instances_up
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_release_spreads_requests_and_skips_a_process_that_died() {
    let mut fx = fixture().await;
    let mut release = fx.release("v1", &[]).await;
    release.instances = 3;
    fx.service.cutover(release, |_| {}).await.unwrap();
    assert_eq!(fx.app_processes(), 3);
    let state = fx.service.state();
    assert_eq!((state.instances, state.instances_up), (3, 3));

    let seen = whoami(&fx, "v1", 30).await;
    assert_eq!(seen.len(), 3, "every process answers: {seen:?}");
    assert!(seen.values().all(|n| *n >= 5), "spread: {seen:?}");

    // One dies: once its supervisor sees it, it gets nothing until its
    // restart passes a health check.
    let &(port, pid) = seen.keys().next().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    until_up(&fx, 2).await;
    let meanwhile = whoami(&fx, "v1", 20).await;
    assert!(
        meanwhile.keys().all(|(p, _)| *p != port),
        "the dead process's port got requests: {meanwhile:?}"
    );
    until_up(&fx, 3).await;
    let after = whoami(&fx, "v1", 30).await;
    assert!(
        after.keys().any(|&(p, id)| p == port && id != pid),
        "the restarted process serves on its port again: {after:?}"
    );

    // A restarted agent adopts all three, as recorded.
    let pids = app_pids(fx.root.path());
    fx.restart_agent(|| {}).await;
    let mut adopted = app_pids(fx.root.path());
    adopted.sort_unstable();
    let mut before = pids.clone();
    before.sort_unstable();
    assert_eq!(adopted, before, "the same three processes");
    until_up(&fx, 3).await;
    assert_eq!(whoami(&fx, "v1", 30).await.len(), 3);
    fx.service.stop().await;
    assert_eq!(fx.app_processes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_is_a_cutover_and_a_failed_scale_up_leaves_the_old_count_serving() {
    let mut fx = fixture().await;
    let v1 = fx.release("v1", &[]).await;
    fx.service.cutover(v1, |_| {}).await.unwrap();

    // Three processes that never turn healthy: all stopped, v1 serves on.
    let mut sick = fx.release("v2", &[("HEALTH", "fail")]).await;
    sick.instances = 3;
    sick.gate.deadline = Duration::from_secs(2);
    let error = fx.service.cutover(sick, |_| {}).await.unwrap_err();
    assert!(matches!(error, CutoverError::Unhealthy { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(" of 3 on port "),
        "names the process: {message}"
    );
    assert_eq!(fx.app_processes(), 1);
    assert_eq!(whoami(&fx, "v1", 5).await.len(), 1);
    let record = fx.store.service("web").unwrap().unwrap();
    assert!(record.leftovers.is_empty(), "{:?}", record.leftovers);

    // Up to three and back to one: each a cutover, each count served.
    for (version, instances) in [("v3", 3), ("v4", 1)] {
        let mut release = fx.release(version, &[]).await;
        release.instances = instances;
        fx.service.cutover(release, |_| {}).await.unwrap();
        assert_eq!(fx.app_processes(), instances as usize);
        assert_eq!(whoami(&fx, version, 20).await.len(), instances as usize);
        let record = fx.store.service("web").unwrap().unwrap();
        let active = record.active.unwrap();
        assert_eq!(active.instances.ports().count(), instances as usize);
    }
    fx.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_three_processes_is_recorded_whole_and_adopted_after_a_restart() {
    let fx = fixture().await;
    let mut settings = settings(fx.root.path());
    settings.name = "jobs".into();
    let recover = || Service::recover(settings.clone(), ServiceKind::Worker, fx.store.clone());
    let mut worker = recover().await.unwrap();
    // A worker listens nowhere: each of its processes has port 0 (the app
    // binds a port of the kernel's choosing, unused).
    let mut release = fx.release("w1", &[("PORT", "0")]).await;
    release.health = None;
    release.smoke.clear();
    release.instances = 3;
    worker.cutover(release, |_| {}).await.unwrap();
    let pids = running_app(fx.root.path(), 3).await;
    // Each process is recorded as itself, not one in place of another.
    let recorded = || {
        let record = fx.store.service("jobs").unwrap().unwrap();
        let mut ids: Vec<u32> = record
            .active
            .unwrap()
            .instances
            .ids()
            .filter_map(|i| i.process())
            .map(|p| p.pid)
            .collect();
        ids.sort_unstable();
        ids
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while recorded() != pids {
        assert!(
            std::time::Instant::now() < deadline,
            "recorded {:?}, running {pids:?}",
            recorded()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert!(worker.release().await.is_none(), "a worker has no proxy");
    let mut worker = recover().await.unwrap();
    assert_eq!(
        running_app(fx.root.path(), 3).await,
        pids,
        "the same three processes, adopted"
    );
    let state = worker.state();
    assert_eq!((state.instances, state.instances_up), (3, 3));
    worker.stop().await;
    assert_eq!(fx.app_processes(), 0);
}
