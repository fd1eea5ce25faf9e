//! The node proxy's incident levers (maintenance, throttle, pause) against
//! a real backend on real sockets.

mod common;
use common::get;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_agent::proxy::levers::{
    LeverSettings, MaintenanceSettings, PauseSettings, ThrottleSettings, BYPASS_COOKIE,
};
use cutover_agent::proxy::{Proxy, ProxyConfig, RouteSpec};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A backend that answers "app" to everything.
async fn backend(stop: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap(),
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("app"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(stop: &CancellationToken) -> (Proxy, String) {
    let upstream = backend(stop.clone()).await;
    let proxy = Proxy::bind(
        ProxyConfig::new("web", "127.0.0.1:0".parse().unwrap()),
        stop.clone(),
    )
    .await
    .unwrap();
    proxy.switch(Some(RouteSpec::all("web-v1", upstream)));
    let base = format!("http://{}", proxy.local_addr());
    (proxy, base)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs `url` with `headers`; returns the status, the headers and the body.
async fn get_with(url: &str, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, String) {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client()
        .request(request.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn maintenance_answers_with_the_message_but_lets_the_bypass_cookie_through() {
    let stop = CancellationToken::new();
    let (proxy, base) = proxy(&stop).await;
    let secret = "bypass-0123456789abcdef";
    proxy
        .levers()
        .set(LeverSettings {
            maintenance: Some(MaintenanceSettings {
                message: "Back at 04:00 <UTC>".into(),
                retry_after_s: 120,
                allow: vec!["10.9.0.0/16".into()],
                bypass_secret: secret.into(),
            }),
            ..Default::default()
        })
        .unwrap();
    let (status, headers, body) = get_with(&format!("{base}/cart"), &[]).await;
    assert_eq!((status, body.as_str()), (503, "Back at 04:00 <UTC>\n"));
    assert_eq!(headers["retry-after"], "120");
    let (_, _, page) = get_with(&format!("{base}/"), &[("accept", "text/html")]).await;
    assert!(page.contains("Back at 04:00 &lt;UTC&gt;"), "{page}");
    // The readiness path is the load balancer's, not the public's.
    let (ready, _, _) = get_with(&format!("{base}/_cutover/ready"), &[]).await;
    assert_eq!(ready, 200);
    // The bypass link sets the cookie; the cookie reaches the app.
    let (status, headers, _) = get_with(&format!("{base}/_cutover/bypass/{secret}"), &[]).await;
    assert_eq!(status, 302);
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with(&format!("{BYPASS_COOKIE}={secret};")),
        "{cookie}"
    );
    let cookie = format!("{BYPASS_COOKIE}={secret}");
    let (status, _, body) = get_with(&format!("{base}/cart"), &[("cookie", &cookie)]).await;
    assert_eq!((status, body.as_str()), (200, "app"));
    // Lifted: everyone reaches the app again.
    proxy.levers().set(LeverSettings::default()).unwrap();
    assert_eq!(
        get(&client(), &format!("{base}/cart")).await.unwrap(),
        (200, "app".to_string())
    );
    let counts = proxy.levers().counts();
    assert_eq!(
        (counts.maintenance_answered, counts.maintenance_bypassed),
        (2, 1)
    );
    stop.cancel();
}

#[tokio::test]
async fn a_throttle_answers_429_beyond_its_burst_on_its_paths_only() {
    let stop = CancellationToken::new();
    let (proxy, base) = proxy(&stop).await;
    proxy
        .levers()
        .set(LeverSettings {
            throttle: Some(ThrottleSettings {
                rps: 1,
                burst: 3,
                per: "all".into(),
                path_prefix: "/checkout".into(),
            }),
            ..Default::default()
        })
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, headers, _) = get_with(&format!("{base}/checkout"), &[]).await;
        if status == 429 {
            assert_eq!(headers["retry-after"], "1");
        }
        statuses.push(status);
    }
    // The burst, then (a token comes a second later) 429s: one more may
    // pass should the machine stall for a second in between.
    assert_eq!(statuses[..3], [200, 200, 200]);
    assert_eq!(statuses[4], 429, "{statuses:?}");
    let (status, _, _) = get_with(&format!("{base}/cart"), &[]).await;
    assert_eq!(status, 200, "other paths pass");
    let throttled = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(proxy.levers().counts().throttled, throttled);
    stop.cancel();
}

#[tokio::test]
async fn a_pause_holds_requests_until_lifted_and_answers_503_at_its_limit() {
    let stop = CancellationToken::new();
    let (proxy, base) = proxy(&stop).await;
    let paused = LeverSettings {
        pause: Some(PauseSettings {
            max_pause_ms: 10_000,
            since_ms: 1,
        }),
        ..Default::default()
    };
    proxy.levers().set(paused).unwrap();
    let started = Instant::now();
    let held: Vec<_> = (0..20)
        .map(|_| {
            let url = format!("{base}/");
            tokio::spawn(async move { get(&client(), &url).await.unwrap() })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.levers().counts().holding < 20 {
        assert!(Instant::now() < deadline, "the requests are not held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.iter().all(|h| !h.is_finished()), "held, not answered");
    proxy.levers().set(LeverSettings::default()).unwrap();
    for request in held {
        assert_eq!(request.await.unwrap(), (200, "app".to_string()));
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Past its limit a held request is answered 503.
    proxy
        .levers()
        .set(LeverSettings {
            pause: Some(PauseSettings {
                max_pause_ms: 300,
                since_ms: 1,
            }),
            ..Default::default()
        })
        .unwrap();
    let (status, headers, _) = get_with(&format!("{base}/"), &[]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");
    let counts = proxy.levers().counts();
    assert_eq!(
        (counts.held, counts.hold_expired, counts.holding),
        (21, 1, 0)
    );
    stop.cancel();
}
