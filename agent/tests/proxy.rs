//! The node proxy against real backends on real sockets.

mod common;
use common::get;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_agent::proxy::routes::HeaderRule;
use cutover_agent::proxy::{Proxy, ProxyConfig, RouteSpec};
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type TestBody = BoxBody<Bytes, Infallible>;

/// An HTTP backend named `name`: `/` answers the name, `/slow` streams three
/// chunks a second apart, `/headers` echoes the request headers, `/hang`
/// never answers in time (a minute).
struct Backend {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn backend(name: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let name: Arc<str> = name.into();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = tokio::select! {
                _ = stopped.cancelled() => break,
                accepted = listener.accept() => accepted.unwrap(),
            };
            let name = name.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let name = name.clone();
                    async move { Ok::<_, Infallible>(answer(&name, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
        // A stopped release drops every connection at once.
        connections.abort_all();
    });
    Backend { addr, stop }
}

async fn answer(name: &str, request: Request<Incoming>) -> Response<TestBody> {
    let full = |text: String| Full::new(Bytes::from(text)).boxed();
    match request.uri().path() {
        "/slow" => {
            let name = name.to_string();
            let chunks = futures_util::stream::unfold(0, move |i| {
                let name = name.clone();
                async move {
                    if i == 3 {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{name}{}", i + 1)))),
                        i + 1,
                    ))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
        "/headers" => {
            let mut lines: Vec<String> = request
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            Response::new(full(lines.join("\n")))
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Response::new(full("late".into()))
        }
        _ => Response::new(full(name.to_string())),
    }
}

/// A WebSocket backend that echoes each text message as "<name>:<text>".
async fn websocket_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        let _ = socket.send(Message::text(format!("{name}:{text}"))).await;
                    }
                }
            });
        }
    });
    addr
}

async fn proxy(config: impl FnOnce(&mut ProxyConfig)) -> (Proxy, CancellationToken) {
    let mut settings = ProxyConfig::new("web", "127.0.0.1:0".parse().unwrap());
    config(&mut settings);
    let shutdown = CancellationToken::new();
    (
        Proxy::bind(settings, shutdown.clone()).await.unwrap(),
        shutdown,
    )
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_back_to_back_cutovers_under_load_fail_no_request() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let url = format!("http://{}/", proxy.local_addr());
    let mut current = backend("v0").await;
    proxy.switch(Some(RouteSpec::all("v0", current.addr)));

    let stop = CancellationToken::new();
    let ok = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let (url, stop, ok) = (url.clone(), stop.clone(), ok.clone());
        loaders.push(tokio::spawn(async move {
            let client = client();
            let mut failures = Vec::new();
            while !stop.is_cancelled() {
                match get(&client, &url).await {
                    Ok((200, body)) if body.starts_with('v') => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{other:?}")),
                }
            }
            failures
        }));
    }

    // Load on every release: before each cutover, wait for requests served
    // since the last one (rather than a pause that a slow machine may fill
    // with nothing).
    let served_since = |from: u64, what: String| {
        let ok = ok.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while ok.load(Ordering::Relaxed) < from + 15 {
                assert!(
                    Instant::now() < deadline,
                    "no load went through {what}: {} requests",
                    ok.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let mut counted = 0;
    for i in 1..=20 {
        served_since(ok.load(Ordering::Relaxed), format!("v{}", i - 1)).await;
        let name = format!("v{i}");
        let next = backend(&name).await;
        let previous = proxy
            .switch(Some(RouteSpec::all(&name, next.addr)))
            .expect("a release was active");
        let report = previous.drain(Duration::from_secs(5)).await;
        // Drained: the outgoing release's count is final.
        counted += proxy
            .release_stats(previous.release())
            .unwrap_or_default()
            .requests;
        assert!(
            report.completed,
            "drain of {} cut {} requests",
            previous.release(),
            report.cut
        );
        drop(std::mem::replace(&mut current, next));
    }
    served_since(ok.load(Ordering::Relaxed), "v20".into()).await;
    stop.cancel();
    let mut failures = Vec::new();
    for loader in loaders {
        failures.extend(loader.await.unwrap());
    }
    counted += proxy.release_stats("v20").unwrap_or_default().requests;
    let served = ok.load(Ordering::Relaxed);
    assert_eq!(
        counted, served,
        "every request counted for the release that served it"
    );
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        served,
        &failures[..failures.len().min(5)]
    );
    assert!(served > 200, "only {served} requests went through");
    // Counts are kept for the serving release and the one it replaced.
    let stats = proxy.stats();
    let kept: Vec<&str> = stats.iter().map(|(release, _)| release.as_str()).collect();
    assert_eq!(kept, ["v19", "v20"]);
    assert!(stats
        .iter()
        .all(|(_, s)| s.upstream_failures == 0 && s.requests == s.by_class[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_streamed_response_started_on_a_completes_after_the_switch() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let a = backend("A").await;
    let b = backend("B").await;
    proxy.switch(Some(RouteSpec::all("A", a.addr)));

    let client = client();
    let response = client
        .get(
            format!("http://{}/slow", proxy.local_addr())
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let reading =
        tokio::spawn(async move { response.into_body().collect().await.map(|b| b.to_bytes()) });

    let previous = proxy.switch(Some(RouteSpec::all("B", b.addr))).unwrap();
    assert_eq!(
        previous.in_flight(),
        1,
        "the streaming request is in flight to A"
    );
    assert_eq!(
        get(&client, &format!("http://{}/", proxy.local_addr()))
            .await
            .unwrap(),
        (200, "B".into())
    );
    let report = previous.drain(Duration::from_secs(10)).await;
    assert!(report.completed && report.cut == 0, "{report:?}");
    assert!(
        report.waited >= Duration::from_millis(1500),
        "drain returned before the stream ended: {report:?}"
    );
    let body = reading.await.unwrap().unwrap();
    assert_eq!(&body[..], b"A1A2A3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_address_serves_the_same_routes_and_closes_without_cutting_a_response() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let a = backend("A").await;
    let b = backend("B").await;
    proxy.switch(Some(RouteSpec::all("A", a.addr)));
    let first = proxy.local_addr();
    let second = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    proxy.add_listener(second, None).await.unwrap();
    proxy.add_listener(second, None).await.unwrap();
    assert_eq!(proxy.listens().len(), 2, "an address is listened on once");
    let client = client();
    for addr in [first, second] {
        assert_eq!(
            get(&client, &format!("http://{addr}/")).await.unwrap(),
            (200, "A".into())
        );
    }
    // One switch moves both.
    proxy.switch(Some(RouteSpec::all("B", b.addr)));
    assert_eq!(
        get(&client, &format!("http://{second}/")).await.unwrap(),
        (200, "B".into())
    );

    // A response streaming through the address being closed completes.
    let response = client
        .get(format!("http://{second}/slow").parse().unwrap())
        .await
        .unwrap();
    let reading =
        tokio::spawn(async move { response.into_body().collect().await.map(|b| b.to_bytes()) });
    assert!(proxy.remove_listener(second).await);
    assert!(!proxy.remove_listener(second).await, "closed once");
    assert_eq!(&reading.await.unwrap().unwrap()[..], b"B1B2B3");
    assert!(
        tokio::net::TcpStream::connect(second).await.is_err(),
        "nothing accepts there any more"
    );
    std::net::TcpListener::bind(second).expect("the port is free");
    assert_eq!(proxy.listens().len(), 1);
    assert_eq!(proxy.local_addr(), first);
    assert_eq!(
        get(&client, &format!("http://{first}/")).await.unwrap(),
        (200, "B".into()),
        "the first address serves on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_opened_on_a_stays_usable_until_the_drain_deadline() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let a = websocket_backend("A").await;
    let b = websocket_backend("B").await;
    proxy.switch(Some(RouteSpec::all("A", a)));

    let tcp = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    let (mut socket, response) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.local_addr()), tcp)
            .await
            .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    socket.send(Message::text("1")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("A:1"));

    let previous = proxy.switch(Some(RouteSpec::all("B", b))).unwrap();
    socket.send(Message::text("2")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("A:2"),
        "still on A after the switch"
    );

    let started = Instant::now();
    let report = previous.drain(Duration::from_millis(800)).await;
    assert!(!report.completed && report.cut == 1, "{report:?}");
    assert!(started.elapsed() >= Duration::from_millis(750));
    // At the deadline the tunnel is closed. The bound only turns "never
    // closed" (the echo backend would keep it open for ever) into a failure
    // instead of a hang.
    let after = tokio::time::timeout(Duration::from_secs(20), socket.next())
        .await
        .expect("the tunnel was not closed at the drain deadline");
    assert!(
        matches!(after, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{after:?}"
    );

    // A new WebSocket goes to B.
    let tcp = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    let (mut socket, _) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.local_addr()), tcp)
            .await
            .unwrap();
    socket.send(Message::text("3")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("B:3"));
}

#[tokio::test]
async fn no_release_gives_502_and_readiness_follows_release_and_drain() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let client = client();
    let base = format!("http://{}", proxy.local_addr());
    let (status, body) = get(&client, &format!("{base}/")).await.unwrap();
    assert_eq!(status, 502);
    assert!(body.contains("no release of service web"), "{body}");
    assert_eq!(
        get(&client, &format!("{base}/_cutover/ready"))
            .await
            .unwrap()
            .0,
        503
    );

    let a = backend("A").await;
    proxy.switch(Some(RouteSpec::all("A", a.addr)));
    assert_eq!(
        get(&client, &format!("{base}/_cutover/ready"))
            .await
            .unwrap(),
        (200, "ready: A\n".into())
    );

    proxy.set_admitted(false);
    let (status, body) = get(&client, &format!("{base}/_cutover/ready"))
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("draining"));
    assert_eq!(
        get(&client, &format!("{base}/")).await.unwrap(),
        (200, "A".into()),
        "a drained node still serves"
    );
    proxy.set_admitted(true);
    assert_eq!(
        get(&client, &format!("{base}/_cutover/ready"))
            .await
            .unwrap()
            .0,
        200
    );
}

#[tokio::test]
async fn forwarding_headers_and_request_ids() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let a = backend("A").await;
    proxy.switch(Some(RouteSpec::all("A", a.addr)));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{}/headers", proxy.local_addr()))
        .header("x-request-id", "req-42")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.headers().get("x-request-id").unwrap(), "req-42");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&body);
    assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http"), "{seen}");
    assert!(
        seen.contains(&format!("x-forwarded-host: {}", proxy.local_addr())),
        "{seen}"
    );
    assert!(seen.contains("x-request-id: req-42"), "{seen}");
    assert!(
        !seen.contains("x-hop"),
        "hop-by-hop header forwarded: {seen}"
    );

    // Without one, the proxy makes an id and returns it.
    let response = client
        .get(format!("http://{}/", proxy.local_addr()).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.headers().get("x-request-id").unwrap().len(), 36);
}

/// GETs `url` with `x-request-id: id`; returns the status, the body and
/// the request id the proxy answered with.
/// A table of two routes: a header rule sends testers to the canary, the
/// weights send everyone else to stable; a weight change keeps the
/// upstreams, and emptying the table retires both and answers 502.
#[tokio::test]
async fn a_header_rule_routes_to_a_weightless_canary_and_an_empty_table_gives_502() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let (stable, canary) = (backend("stable").await, backend("canary").await);
    let rule = HeaderRule {
        name: http::HeaderName::from_static("x-canary"),
        value: http::HeaderValue::from_static("yes"),
    };
    let table = |canary_weight| {
        vec![
            RouteSpec::all("stable", stable.addr),
            RouteSpec {
                weight: canary_weight,
                rules: vec![rule.clone()],
                ..RouteSpec::all("canary", canary.addr)
            },
        ]
    };
    assert!(proxy.set_routes(table(0)).is_empty());
    let base = format!("http://{}", proxy.local_addr());
    assert_eq!(
        get(&client(), &format!("{base}/")).await.unwrap(),
        (200, "stable".into())
    );
    let tester = Request::get(format!("{base}/"))
        .header("x-canary", "yes")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client().request(tester).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "canary");

    let before = proxy.routes();
    assert!(
        proxy.set_routes(table(10)).is_empty(),
        "a weight change retires nothing"
    );
    let after = proxy.routes();
    assert!(after.contains(&before.get("canary").unwrap().upstream));

    let retired = proxy.set_routes(Vec::new());
    let names: Vec<&str> = retired.iter().map(|u| u.release()).collect();
    assert_eq!(names, ["stable", "canary"]);
    let (status, body) = get(&client(), &format!("{base}/")).await.unwrap();
    assert_eq!(status, 502);
    assert!(body.contains("no release of service web"), "{body}");
}

async fn get_with_id(url: &str, id: &str) -> (u16, String, String) {
    let request = Request::get(url)
        .header("x-request-id", id)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status().as_u16();
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), echoed)
}

#[tokio::test]
async fn a_dead_release_gives_502_and_a_slow_one_504_without_internals() {
    let (proxy, _shutdown) = proxy(|c| c.request_timeout = Duration::from_millis(300)).await;
    let base = format!("http://{}", proxy.local_addr());

    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    proxy.switch(Some(RouteSpec::all("release-gone", dead)));
    let (status, body, id) = get_with_id(&format!("{base}/"), "req-502").await;
    assert_eq!((status, id.as_str()), (502, "req-502"));
    assert_eq!(body, "bad gateway (request id req-502)\n");
    for internal in ["release-gone", &dead.to_string(), "127.0.0.1", "refused"] {
        assert!(!body.contains(internal), "{internal} leaked: {body}");
    }

    let slow = backend("S").await;
    proxy.switch(Some(RouteSpec::all("release-slow", slow.addr)));
    let started = Instant::now();
    let (status, body, _) = get_with_id(&format!("{base}/hang"), "req-504").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body, "gateway timeout (request id req-504)\n");
    assert!(!body.contains("release-slow") && !body.contains(&slow.addr.to_string()));
    // The 504 is the proof the request timeout fired; the bound only rules
    // out waiting on the release (300 ms timeout vs a minute of /hang).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    let stats = proxy.stats();
    let gone = &stats.iter().find(|(r, _)| r == "release-gone").unwrap().1;
    assert_eq!((gone.by_class[4], gone.upstream_failures), (1, 1));
    let slow = &stats.iter().find(|(r, _)| r == "release-slow").unwrap().1;
    assert_eq!((slow.by_class[4], slow.upstream_failures), (1, 1));
}

/// A backend that reads each request's whole body and answers with its
/// length.
async fn echo_backend() -> SocketAddr {
    common::hyper_backend(|request: Request<Incoming>| async move {
        let length = match request.into_body().collect().await {
            Ok(body) => body.to_bytes().len().to_string(),
            Err(error) => format!("broken body: {error}"),
        };
        Response::new(Full::new(Bytes::from(length)))
    })
    .await
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_fault_not_the_releases() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("echo", echo_backend().await)));
    let mut tcp = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    // One good chunk, then a chunk size that is not hex.
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nhost: shop.example\r\nx-request-id: req-400\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nbroken\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("(request id req-400)"), "{answer}");
    let stats = proxy.release_stats("echo").unwrap();
    assert_eq!(
        (
            stats.upstream_failures,
            stats.by_class[4],
            stats.by_class[3]
        ),
        (0, 0, 1),
        "a client error, not a failure of the release: {stats:?}"
    );
}

#[tokio::test]
async fn request_bodies_stream_through() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("echo", echo_backend().await)));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let payload = Bytes::from(vec![b'x'; 8 << 20]);
    let request = Request::post(format!("http://{}/upload", proxy.local_addr()))
        .body(Full::new(payload))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], (8usize << 20).to_string().as_bytes());
}

/// When a backend that answers one request per connection closes it.
enum Close {
    /// When the next request arrives, unanswered: as a server whose
    /// keep-alive timeout fires just as a reused connection carries one.
    OnNextRequest,
    /// 50 ms after the answer, idle: as a server whose keep-alive timeout
    /// is short, or one restarting.
    Idle,
}

/// A backend that answers the first request of each connection with "ok"
/// and closes the connection as `close` says.
async fn closing_backend(close: Close) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let close = Arc::new(close);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let close = close.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                match *close {
                    Close::OnNextRequest => {
                        let _ = tcp.read(&mut buf).await;
                    }
                    Close::Idle => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_bodiless_request_on_a_connection_the_release_just_closed_is_sent_again() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all(
        "closing",
        closing_backend(Close::OnNextRequest).await,
    )));
    let client = client();
    let url = format!("http://{}/", proxy.local_addr());
    for i in 0..20 {
        assert_eq!(
            get(&client, &url).await.unwrap(),
            (200, "ok".into()),
            "request {i}"
        );
    }
    let stats = proxy.release_stats("closing").unwrap();
    assert_eq!((stats.requests, stats.upstream_failures), (20, 0));

    // A request with a body may have had an effect: it is not sent twice.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let request = Request::post(url.clone())
            .body(Full::new(Bytes::from_static(b"order")))
            .unwrap();
        statuses.push(client.request(request).await.unwrap().status().as_u16());
    }
    assert!(statuses.contains(&502), "{statuses:?}");
}

/// A connection the release closed while it was idle is not used again,
/// whether the client connection that holds it stays open or ended and
/// left it to the next one: the close is seen before the request is
/// written, so even a request with a body, which cannot be sent twice,
/// goes on a new connection and gets its answer.
#[tokio::test]
async fn a_connection_the_release_closed_while_idle_is_not_used() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all(
        "closing",
        closing_backend(Close::Idle).await,
    )));
    let url = format!("http://{}/", proxy.local_addr());
    let post = || {
        Request::post(url.clone())
            .body(Full::new(Bytes::from_static(b"order")))
            .unwrap()
    };
    let kept: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let one_per_request: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    for (client, name) in [(kept, "kept"), (one_per_request, "one per request")] {
        for i in 0..4 {
            let response = client.request(post()).await.unwrap();
            assert_eq!(
                response.status(),
                200,
                "{name} client connection, request {i}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let stats = proxy.release_stats("closing").unwrap();
    assert_eq!((stats.requests, stats.upstream_failures), (8, 0));
}

/// A backend answering "ok" that counts the connections it accepted.
async fn counting_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A client that opens a connection per request does not cost the
/// release a connection per request: a client connection that ends leaves
/// its upstream connection to the next (one per proxy runtime at most,
/// as each keeps its own).
#[tokio::test]
async fn upstream_connections_outlive_the_client_connections_that_opened_them() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let (addr, accepted) = counting_backend().await;
    proxy.switch(Some(RouteSpec::all("counted", addr)));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let url = format!("http://{}/", proxy.local_addr());
    for i in 0..12 {
        assert_eq!(
            get(&client, &url).await.unwrap(),
            (200, "ok".into()),
            "request {i}"
        );
        // Time for the proxy to see the client connection end.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let runtimes = cutover_agent::proxy::workers::start(0) as u64;
    let accepted = accepted.load(Ordering::SeqCst);
    assert!(
        (1..=runtimes).contains(&accepted),
        "{accepted} upstream connections for 12 client connections on {runtimes} proxy runtimes"
    );
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
    // No trusted networks: even loopback is just a client here.
    let (proxy, _shutdown) = proxy(|c| c.trusted_networks = Vec::new()).await;
    let a = backend("A").await;
    proxy.switch(Some(RouteSpec::all("A", a.addr)));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("http://{}/headers", proxy.local_addr()))
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-forwarded-proto", "https")
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&body);
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(!seen.contains("10.1.2.3"), "{seen}");
}
