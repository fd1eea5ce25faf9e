//! Side releases (canaries, warm standbys) of a real web app
//! (tests/fixtures/app.py) behind the node proxy: real processes, real
//! sockets, the split per client, activation of the side release, the
//! agent retiring a kept release on time, and an agent restart.

mod common;
use common::app::{app_pids, release_dir, settings, web_release};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_agent::artifacts::ArtifactCache;
use cutover_agent::proxy::cohort::{Cohorts, Split, Sticky};
use cutover_agent::proxy::{Proxy, ProxyConfig};
use cutover_agent::service::{
    shared, CutoverError, KeepPrevious, Service, ServiceKind, Step, WebRelease, KEPT_WARM,
};
use cutover_agent::store::AgentStore;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

struct Fixture {
    root: tempfile::TempDir,
    cache: ArtifactCache,
    store: Arc<AgentStore>,
    service: Arc<Mutex<Service>>,
    shutdown: CancellationToken,
    client: HttpClient,
}

/// A web service serving v1.
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
    let fx = Fixture {
        service: shared(service, shutdown.clone()),
        root,
        cache,
        store,
        shutdown,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let v1 = fx.release("v1").await;
    fx.service.lock().await.cutover(v1, |_| {}).await.unwrap();
    fx
}

fn split(weight: u32, sticky: Sticky) -> Cohorts {
    Cohorts::new(Split {
        weight,
        sticky,
        sticky_name: String::new(),
        override_header: "x-canary".into(),
    })
    .unwrap()
}

/// The address of client `i`, as a load balancer in front forwards it.
fn client(i: u32) -> String {
    std::net::Ipv4Addr::from(0xc633_6400 + i).to_string() // 198.51.100.0 + i
}

impl Fixture {
    async fn release(&self, version: &str) -> WebRelease {
        let dir = release_dir(self.root.path(), &self.cache, version).await;
        web_release(&dir, version, &[])
    }

    async fn stage(&self, version: &str, cohorts: Cohorts) {
        let release = self.release(version).await;
        let mut service = self.service.lock().await;
        service.stage(release, cohorts, |_| {}).await.unwrap();
    }

    /// GET / with `headers`: the version that answered, and the cookie
    /// the proxy set, if any.
    async fn ask(&self, headers: &[(&str, &str)]) -> (String, Option<String>) {
        let listen = self.service.lock().await.proxy().unwrap().local_addr();
        let mut request = http::Request::get(format!("http://{listen}/"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .client
            .request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let cookie = response
            .headers()
            .get(http::header::SET_COOKIE)
            .map(|v| v.to_str().unwrap().to_string());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (String::from_utf8_lossy(&body).into_owned(), cookie)
    }

    /// The version each of `clients` clients gets (by forwarded address).
    async fn versions(&self, clients: u32) -> BTreeMap<u32, String> {
        let mut got = BTreeMap::new();
        for i in 0..clients {
            let (version, _) = self.ask(&[("x-forwarded-for", &client(i))]).await;
            got.insert(i, version);
        }
        got
    }

    fn app_processes(&self) -> usize {
        app_pids(self.root.path()).len()
    }

    /// An agent restart (kill -9 and start again): the service recovers
    /// from the store on the same proxy port.
    async fn restart_agent(&mut self) {
        let listen = self.service.lock().await.proxy().unwrap().local_addr();
        let shutdown = std::mem::replace(&mut self.shutdown, CancellationToken::new());
        shutdown.cancel();
        let proxy = Proxy::bind(
            ProxyConfig::new("web", "127.0.0.1:0".parse().unwrap()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let mut placeholder = settings(self.root.path());
        placeholder.name = "placeholder".into();
        let placeholder =
            Service::recover(placeholder, ServiceKind::Web(proxy), self.store.clone())
                .await
                .unwrap();
        let old = std::mem::replace(
            &mut self.service,
            shared(placeholder, CancellationToken::new()),
        );
        let Ok(old) = Arc::try_unwrap(old) else {
            panic!("the service is shared elsewhere");
        };
        if let Some(proxy) = old.into_inner().release().await {
            proxy.close().await;
        }
        let proxy = Proxy::bind(ProxyConfig::new("web", listen), self.shutdown.clone())
            .await
            .unwrap();
        let service = Service::recover(
            settings(self.root.path()),
            ServiceKind::Web(proxy),
            self.store.clone(),
        )
        .await
        .unwrap();
        self.service = shared(service, self.shutdown.clone());
    }

    /// Waits until `n` release processes run.
    async fn until_processes(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.app_processes() != n {
            assert!(Instant::now() < deadline, "expected {n} release processes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(&self) {
        self.service.lock().await.stop().await;
        assert_eq!(self.app_processes(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_gets_its_share_and_every_client_stays_on_its_release() {
    let fx = fixture().await;
    fx.stage("v2", split(20, Sticky::Cookie)).await;
    assert_eq!(fx.app_processes(), 2);
    let state = fx.service.lock().await.state();
    assert_eq!(state.release_id, "web-v1");
    let side = state.side.expect("a side release");
    assert_eq!((side.release_id.as_str(), side.running), ("web-v2", true));
    assert_eq!(side.split.unwrap().weight, 20);

    // 1,000 clients behind a load balancer (the loopback peer is trusted),
    // 10 requests each: the first without a cookie gets one, the others
    // send it back, from another address, and keep their release.
    let mut side_requests: u32 = 0;
    for i in 0..1_000 {
        let (first, cookie) = fx.ask(&[("x-forwarded-for", &client(i))]).await;
        let cookie = cookie.unwrap_or_else(|| panic!("client {i} got no cookie"));
        assert!(
            cookie.ends_with("; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        let elsewhere = client(i + 5_000);
        for _ in 0..9 {
            let headers = [("cookie", pair.as_str()), ("x-forwarded-for", &elsewhere)];
            let (again, set) = fx.ask(&headers).await;
            assert_eq!(again, first, "client {i} ({pair}) changed release");
            assert_eq!(set, None, "a client with the cookie gets no new one");
        }
        side_requests += if first == "v2" { 10 } else { 0 };
    }
    let share = f64::from(side_requests) / 10_000.0;
    assert!((0.18..=0.22).contains(&share), "side share {share}");

    // Testers pick their release.
    let from = client(1);
    for _ in 0..5 {
        let always = [("x-canary", "always"), ("x-forwarded-for", from.as_str())];
        assert_eq!(fx.ask(&always).await.0, "v2");
        let never = [("x-canary", "never"), ("x-forwarded-for", from.as_str())];
        assert_eq!(fx.ask(&never).await.0, "v1");
    }
    let state = fx.service.lock().await.state();
    let traffic = state.side.unwrap().traffic.unwrap();
    assert_eq!(traffic.requests, u64::from(side_requests) + 5);
    assert_eq!(traffic.release_id, "web-v2");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_traffic_moves_clients_one_way_and_zero_leaves_the_override_only() {
    let fx = fixture().await;
    fx.stage("v2", split(20, Sticky::ClientIp)).await;
    let pids = app_pids(fx.root.path());
    let at_20 = fx.versions(300).await;

    let error = fx
        .service
        .lock()
        .await
        .set_traffic("web-v9", split(50, Sticky::ClientIp))
        .unwrap_err();
    assert!(
        error.to_string().contains(
            "release web-v9 is not the side release of service web (its side release is web-v2)"
        ),
        "{error}"
    );
    fx.service
        .lock()
        .await
        .set_traffic("web-v2", split(50, Sticky::ClientIp))
        .unwrap();
    let at_50 = fx.versions(300).await;
    let on_side = at_50.values().filter(|v| *v == "v2").count();
    assert!((105..=195).contains(&on_side), "{on_side} of 300 at 50%");
    for (i, version) in &at_20 {
        assert!(
            version == "v1" || at_50[i] == "v2",
            "client {i} moved back to the serving release"
        );
    }

    // Staging the side release again only sets the split: no new process.
    fx.stage("v2", split(0, Sticky::ClientIp)).await;
    assert_eq!(app_pids(fx.root.path()), pids);
    let at_0 = fx.versions(300).await;
    assert!(at_0.values().all(|v| v == "v1"), "weight 0 sends nothing");
    let from = client(1);
    let always = [("x-canary", "always"), ("x-forwarded-for", from.as_str())];
    assert_eq!(fx.ask(&always).await.0, "v2");
    let (_, cookie) = fx.ask(&[]).await;
    assert_eq!(cookie, None, "sticky by address sets no cookie");
    let record = fx.store.service("web").unwrap().unwrap();
    assert_eq!(record.side.unwrap().split.weight, 0);
    fx.stop().await;
}

/// A side release that crashed since it was staged (an aborted canary
/// kept for debugging) is not reused by the next stage of the same
/// release: it starts anew, vetted again, its crashes forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_again_restarts_a_side_release_that_crashed() {
    let fx = fixture().await;
    fx.stage("v2", split(0, Sticky::ClientIp)).await;
    let before = app_pids(fx.root.path());
    let addr = fx.service.lock().await.side().unwrap().1;
    // The app exits on /crash; its supervisor counts it.
    let request = format!("http://{addr}/crash");
    let _ = fx
        .client
        .request(http::Request::get(request).body(Empty::new()).unwrap())
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while fx.service.lock().await.state().side.unwrap().crashes == 0 {
        assert!(Instant::now() < deadline, "the side release did not crash");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.stage("v2", split(0, Sticky::ClientIp)).await;
    let side = fx.service.lock().await.state().side.unwrap();
    assert_eq!((side.release_id.as_str(), side.crashes), ("web-v2", 0));
    let after = app_pids(fx.root.path());
    assert_eq!(after.len(), 2, "{after:?}");
    assert_ne!(after, before, "a new process for v2");
    fx.stop().await;
}

/// Blue/green's keep_warm: the release a promotion replaced stays running
/// without a retire time, also in the record a restarted agent reads, and
/// switching back to it is a switch in the proxy, no process started; the
/// next stage replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_previous_release_stays_until_replaced_and_switching_back_starts_nothing() {
    let mut fx = fixture().await;
    fx.stage("v2", split(0, Sticky::ClientIp)).await;
    let pids = app_pids(fx.root.path());
    let mut service = fx.service.lock().await;
    service
        .promote("web-v2", KeepPrevious::Warm, |_| {})
        .await
        .unwrap();
    let side = service.state().side.unwrap();
    assert_eq!(
        (side.release_id.as_str(), side.retire_at_ms),
        ("web-v1", KEPT_WARM)
    );
    let record = fx.store.service("web").unwrap().unwrap();
    assert_eq!(
        record.side.as_ref().map(|s| s.retire_at_ms),
        Some(KEPT_WARM)
    );
    assert!(service.retire_if_due().await.is_none(), "never due");
    drop(service);
    assert!(fx.versions(30).await.values().all(|v| v == "v2"));
    // A restarted agent adopts it, still warm, still running.
    fx.restart_agent().await;
    let side = fx.service.lock().await.state().side.unwrap();
    assert_eq!(
        (side.release_id.as_str(), side.retire_at_ms),
        ("web-v1", KEPT_WARM)
    );
    assert_eq!(app_pids(fx.root.path()), pids, "adopted, not restarted");

    // Back to v1: a switch, v2 now kept warm in its place.
    let started = Instant::now();
    let report = fx
        .service
        .lock()
        .await
        .promote("web-v1", KeepPrevious::Warm, |_| {})
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(report.kept.as_deref(), Some("web-v2"));
    assert_eq!(
        app_pids(fx.root.path()),
        pids,
        "no process started or stopped"
    );
    assert!(fx.versions(30).await.values().all(|v| v == "v1"));
    assert!(
        took < Duration::from_secs(1),
        "the switch back took {took:?}"
    );

    // A new release staged replaces the warm one: two processes, not three.
    fx.stage("v3", split(0, Sticky::ClientIp)).await;
    fx.until_processes(2, Duration::from_secs(15)).await;
    let side = fx.service.lock().await.state().side.unwrap();
    assert_eq!(side.release_id, "web-v3");
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_the_side_release_is_a_switch_and_the_kept_one_retires_on_time() {
    let fx = fixture().await;
    fx.stage("v2", split(10, Sticky::Cookie)).await;
    let pids = app_pids(fx.root.path());
    assert_eq!(pids.len(), 2);

    let steps = std::sync::Mutex::new(Vec::new());
    let report = fx
        .service
        .lock()
        .await
        .promote(
            "web-v2",
            KeepPrevious::For(Duration::from_millis(1500)),
            |step| steps.lock().unwrap().push(step),
        )
        .await
        .unwrap();
    assert_eq!(steps.into_inner().unwrap(), [Step::Switching]);
    assert_eq!(report.kept.as_deref(), Some("web-v1"));
    assert_eq!(app_pids(fx.root.path()), pids, "no process started");
    let versions = fx.versions(50).await;
    assert!(versions.values().all(|v| v == "v2"), "{versions:?}");
    let state = fx.service.lock().await.state();
    assert_eq!(state.release_id, "web-v2");
    let side = state.side.unwrap();
    assert_eq!(
        (
            side.release_id.as_str(),
            side.split.as_ref().unwrap().weight
        ),
        ("web-v1", 0)
    );
    assert!(side.retire_at_ms > cutover_common::now_ms(), "{side:?}");
    // The canary's override means the canary, which serves now: the kept
    // release takes nothing, not even testers' requests.
    let from = client(1);
    let always = [("x-canary", "always"), ("x-forwarded-for", from.as_str())];
    assert_eq!(fx.ask(&always).await.0, "v2");
    assert_eq!(app_pids(fx.root.path()), pids, "the kept release runs");

    // The agent stops it by itself when its time is up.
    fx.until_processes(1, Duration::from_secs(15)).await;
    assert!(fx.service.lock().await.state().side.is_none());
    let record = fx.store.service("web").unwrap().unwrap();
    assert!(record.side.is_none() && record.leftovers.is_empty());
    assert_eq!(record.previous.as_deref(), Some("web-v1"));

    // A canary taken back: all traffic to the serving release at once,
    // the canary kept a while, then stopped at once by a second take-back.
    fx.stage("v3", split(100, Sticky::Cookie)).await;
    assert!(fx.versions(20).await.values().all(|v| v == "v3"));
    let mut service = fx.service.lock().await;
    assert!(service
        .take_back(KeepPrevious::For(Duration::from_secs(600)))
        .await
        .unwrap()
        .is_none());
    drop(service);
    assert!(fx.versions(20).await.values().all(|v| v == "v2"));
    assert_eq!(fx.app_processes(), 2, "kept for a while");
    let retired = fx
        .service
        .lock()
        .await
        .take_back(KeepPrevious::Stop)
        .await
        .unwrap()
        .expect("the side release stopped");
    assert_eq!(retired.release_id, "web-v3");
    assert_eq!(fx.app_processes(), 1);
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_side_release_its_split_and_its_retire_time() {
    let mut fx = fixture().await;
    fx.stage("v2", split(30, Sticky::Cookie)).await;
    let pids = app_pids(fx.root.path());
    let before = fx.versions(200).await;
    let on_side = before.values().filter(|v| *v == "v2").count();
    assert!((30..=90).contains(&on_side), "{on_side} of 200 at 30%");

    fx.restart_agent().await;
    assert_eq!(app_pids(fx.root.path()), pids, "adopted, not started again");
    assert_eq!(
        fx.versions(200).await,
        before,
        "every client keeps its release"
    );
    let state = fx.service.lock().await.state();
    assert_eq!(state.side.unwrap().split.unwrap().weight, 30);

    // Kept for a second after a take-back; the agent restarts meanwhile.
    let mut service = fx.service.lock().await;
    service
        .take_back(KeepPrevious::For(Duration::from_secs(1)))
        .await
        .unwrap();
    drop(service);
    fx.restart_agent().await;
    let side = fx.service.lock().await.state().side;
    assert!(side.is_some_and(|s| s.retire_at_ms > 0), "recorded");
    fx.until_processes(1, Duration::from_secs(15)).await;
    assert!(fx.store.service("web").unwrap().unwrap().side.is_none());
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_cut_short_by_an_agent_crash_leaves_no_orphan() {
    let mut fx = fixture().await;
    let mut v2 = web_release(
        &release_dir(fx.root.path(), &fx.cache, "v2").await,
        "v2",
        &[("HEALTH", "fail")],
    );
    v2.gate.deadline = Duration::from_secs(60);
    let (checking, checked) = tokio::sync::oneshot::channel();
    let checking = std::sync::Mutex::new(Some(checking));
    let mut service = fx.service.lock().await;
    tokio::select! {
        _ = service.stage(v2, split(50, Sticky::Cookie), |step| {
            if step == Step::HealthChecking {
                if let Some(tx) = checking.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            }
        }) => panic!("v2 cannot pass its checks"),
        _ = checked => {}
    }
    drop(service);
    fx.until_processes(2, Duration::from_secs(5)).await;
    fx.restart_agent().await;
    assert_eq!(fx.app_processes(), 1, "the staged release was stopped");
    assert!(fx.service.lock().await.side().is_none());
    assert!(fx.versions(20).await.values().all(|v| v == "v1"));
    fx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_needs_a_web_service_that_serves() {
    let fx = fixture().await;
    let v1 = fx.release("v1").await;
    let error = fx
        .service
        .lock()
        .await
        .stage(v1, split(10, Sticky::Cookie), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(error, CutoverError::AlreadyServes { .. }),
        "{error}"
    );
    fx.stop().await;

    // Nothing serves any more.
    let v2 = fx.release("v2").await;
    let error = fx
        .service
        .lock()
        .await
        .stage(v2.clone(), split(10, Sticky::Cookie), |_| {})
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "nothing serves service web on this node yet, so release web-v2 has nothing to run beside; activate a release first"
    );

    let mut worker_settings = settings(fx.root.path());
    worker_settings.name = "jobs".into();
    let mut worker = Service::recover(worker_settings, ServiceKind::Worker, fx.store.clone())
        .await
        .unwrap();
    let error = worker
        .stage(v2, split(10, Sticky::Cookie), |_| {})
        .await
        .unwrap_err();
    assert!(
        error.to_string().starts_with("service jobs is a worker"),
        "{error}"
    );
    assert_eq!(fx.app_processes(), 0, "nothing started");
}
