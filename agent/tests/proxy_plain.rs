//! The node proxy's plain path (heads passed through, bodies framed as
//! they came) against a backend that writes its answers byte by byte:
//! every way a response body ends, heads as the client sent them,
//! pipelining, and a connection that goes on under hyper.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cutover_agent::proxy::{Proxy, ProxyConfig, RouteSpec};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn proxy(config: impl FnOnce(&mut ProxyConfig)) -> (Proxy, CancellationToken) {
    let mut settings = ProxyConfig::new("web", "127.0.0.1:0".parse().unwrap());
    config(&mut settings);
    let shutdown = CancellationToken::new();
    (
        Proxy::bind(settings, shutdown.clone()).await.unwrap(),
        shutdown,
    )
}

/// A request as the scripted backend read it.
struct Received {
    method: String,
    path: String,
    head: Vec<u8>,
    body: Vec<u8>,
}

/// Reads one request (its body by Content-Length) off `tcp`.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = request.parse(buf) {
            let length: usize = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            let (method, path) = (
                request.method.unwrap().to_string(),
                request.path.unwrap().to_string(),
            );
            while buf.len() < head_len + length {
                read_more(tcp, buf).await?;
            }
            let head = buf[..head_len].to_vec();
            let body = buf[head_len..head_len + length].to_vec();
            buf.drain(..head_len + length);
            return Some(Received {
                method,
                path,
                head,
                body,
            });
        }
        read_more(tcp, buf).await?;
    }
}

async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// Writes `pieces` one by one, 20 ms apart: a response that arrives in
/// several reads.
async fn write_pieces(tcp: &mut TcpStream, pieces: &[&[u8]]) {
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tcp.write_all(piece).await.unwrap();
    }
}

/// A backend that writes each answer as raw bytes, by path: a body of
/// known length, a chunked one with a trailer, one ended by closing, a
/// HEAD answer, a 204, an early hint before the answer, a close after a
/// whole answer, the request head or body echoed, a length it names in
/// Connection, a late answer (whole or after half its head), a body that
/// takes its time, and a body cut short.
async fn scripted_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(request) = read_request(&mut tcp, &mut buf).await {
                    let keep_open = answer(&mut tcp, &request).await;
                    if !keep_open {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Writes the scripted answer to `request`; whether the connection stays
/// open.
async fn answer(tcp: &mut TcpStream, request: &Received) -> bool {
    let echo = |body: &[u8]| {
        let mut answer =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(body);
        answer
    };
    let path = request.path.split('?').next().unwrap_or_default();
    match (request.method.as_str(), path) {
        ("HEAD", _) => tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
            .await
            .unwrap(),
        (_, "/length") => {
            write_pieces(
                tcp,
                &[
                    b"HTTP/1.1 200 OK\r\nX-Case: Kept\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 5\r\n\r\nhe",
                    b"llo",
                ],
            )
            .await
        }
        (_, "/chunked") => {
            write_pieces(
                tcp,
                &[
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r",
                    b"\n6;note=1\r\n world\r\n0\r\n",
                    b"x-trailer: t\r\n\r\n",
                ],
            )
            .await
        }
        (_, "/close") => {
            write_pieces(tcp, &[b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"close"]).await;
            return false;
        }
        (_, "/empty") => tcp
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap(),
        (_, "/hints") => {
            write_pieces(
                tcp,
                &[
                    b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                ],
            )
            .await
        }
        (_, "/upstream-close") => {
            tcp.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            return false;
        }
        (_, "/echo-head") => tcp.write_all(&echo(&request.head)).await.unwrap(),
        (_, "/echo-body") => tcp.write_all(&echo(&request.body)).await.unwrap(),
        (_, "/named-length") => tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\nConnection: content-length\r\ncontent-length: 2\r\n\r\nok",
            )
            .await
            .unwrap(),
        (_, "/slow-body") => {
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            tcp.write_all(b"cd").await.unwrap();
        }
        (_, "/half-late") => {
            tcp.write_all(b"HTTP/1.1 302 Found\r\nset-cookie: stale=1\r\nx-a: ")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = tcp.write_all(b"1\r\ncontent-length: 0\r\n\r\n").await;
        }
        (_, "/late") => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = tcp.write_all(&echo(b"late")).await;
        }
        (_, "/cut") => {
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                .await
                .unwrap();
            return false;
        }
        _ => tcp
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap(),
    }
    true
}

/// One kept client connection to the proxy, driven by hyper's client.
async fn connection(proxy: &Proxy) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    method: &str,
    path: &str,
) -> (u16, String) {
    sender.ready().await.unwrap();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "shop.example")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn every_way_a_response_body_ends_passes_through_on_one_kept_connection() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let mut sender = connection(&proxy).await;
    for (method, path, want) in [
        ("GET", "/length", (200, "hello")),
        ("GET", "/chunked", (200, "hello world")),
        ("HEAD", "/head", (200, "")),
        ("GET", "/empty", (204, "")),
        ("GET", "/hints", (200, "ok")),
        // The release closes its connection; the client's stays open.
        ("GET", "/upstream-close", (200, "ok")),
        ("GET", "/length", (200, "hello")),
        ("GET", "/close", (200, "until close")),
    ] {
        let (status, body) = send(&mut sender, method, path).await;
        assert_eq!((status, body.as_str()), want, "{method} {path}");
    }
    // A body ended by the release closing can only be passed on the same
    // way: the client connection closes after it.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !sender.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the client connection closes after a close-delimited body");
    let stats = proxy.release_stats("scripted").unwrap();
    assert_eq!(stats.upstream_failures, 0);
}

#[tokio::test]
async fn the_release_gets_the_head_as_sent_but_for_what_the_proxy_owns() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(
            b"GET /echo-head?q=1 HTTP/1.1\r\nHost: shop.example\r\nX-Mixed-Case: v\r\n\
              X-Dup: 1\r\nConnection: keep-alive, X-Drop, X-Request-Id\r\nX-Drop: secret\r\n\
              Keep-Alive: timeout=5\r\nX-Dup: 2\r\nX-Request-Id: abc-1\r\n\
              X-Forwarded-For: 203.0.113.7\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, head, body) = read_response(&mut client, &mut buf).await;
    assert_eq!(status, 200);
    let seen = String::from_utf8(body).unwrap();
    assert!(seen.starts_with("GET /echo-head?q=1 HTTP/1.1\r\nHost: shop.example\r\nX-Mixed-Case: v\r\nX-Dup: 1\r\nX-Dup: 2\r\n"), "{seen}");
    for gone in ["X-Drop", "Keep-Alive", "Connection", "connection"] {
        assert!(!seen.contains(gone), "{gone} went on: {seen}");
    }
    // The loopback peer is trusted: it appends to the client's hops. The
    // request id it named in Connection stays (a client cannot strip it).
    for kept in [
        "x-forwarded-for: 203.0.113.7, 127.0.0.1\r\n",
        "x-forwarded-proto: http\r\n",
        "x-forwarded-host: shop.example\r\n",
        "x-request-id: abc-1\r\n",
    ] {
        assert!(seen.contains(kept), "{kept:?} missing: {seen}");
    }
    assert!(head.contains("x-request-id: abc-1\r\n"), "{head}");
    // The release sent no Date: the proxy adds one (RFC 9110 6.6.1).
    assert_eq!(head.matches("date: ").count(), 1, "{head}");
}

/// Reads one response with a Content-Length body off `tcp`: its status,
/// head and body.
async fn read_response(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String, Vec<u8>) {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = response.parse(buf) {
            let length: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            let status = response.code.unwrap();
            while buf.len() < head_len + length {
                read_more(tcp, buf).await.expect("a whole response");
            }
            let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
            let body = buf[head_len..head_len + length].to_vec();
            buf.drain(..head_len + length);
            return (status, head, body);
        }
        read_more(tcp, buf).await.expect("a response head");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(
            b"GET /length HTTP/1.1\r\nHost: a\r\n\r\n\
              POST /echo-body HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
              GET /echo-body HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..3 {
        let (status, head, body) = read_response(&mut client, &mut buf).await;
        if i == 0 {
            // The release's own Date is kept, and not doubled.
            assert_eq!(head.to_lowercase().matches("date: ").count(), 1, "{head}");
            assert!(
                head.contains("Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"),
                "{head}"
            );
        }
        bodies.push((status, String::from_utf8(body).unwrap()));
    }
    assert_eq!(
        bodies,
        [
            (200, "hello".into()),
            (200, "abc".into()),
            (200, String::new())
        ]
    );
}

/// A backend that answers each request with its method, version and
/// body, served by hyper (which reads chunked bodies).
async fn echo_backend() -> SocketAddr {
    common::hyper_backend(|request: Request<Incoming>| async move {
        let mut answer = format!("{} {:?} ", request.method(), request.version()).into_bytes();
        answer.extend_from_slice(&request.into_body().collect().await.unwrap().to_bytes());
        Response::new(Full::new(Bytes::from(answer)))
    })
    .await
}

#[tokio::test]
async fn a_connection_goes_on_under_hyper_from_a_request_the_plain_path_does_not_take() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("echo", echo_backend().await)));
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut buf = Vec::new();
    let mut exchange = async |request: &[u8]| {
        client.write_all(request).await.unwrap();
        let (status, _, body) = read_response(&mut client, &mut buf).await;
        (status, String::from_utf8(body).unwrap())
    };
    assert_eq!(
        exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await,
        (200, "GET HTTP/1.1 ".into())
    );
    // A chunked upload: left to hyper, which goes on with the connection.
    let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    assert_eq!(exchange(chunked).await, (200, "POST HTTP/1.1 abcde".into()));
    assert_eq!(
        exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await,
        (200, "GET HTTP/1.1 ".into())
    );
    // HTTP/1.0, on a new connection: hyper's, closed after the answer.
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut all))
        .await
        .expect("an HTTP/1.0 connection closes after its answer")
        .unwrap();
    let all = String::from_utf8(all).unwrap();
    assert!(
        all.starts_with("HTTP/1.0 200 OK\r\n") && all.ends_with("GET HTTP/1.0 "),
        "{all}"
    );
}

#[tokio::test]
async fn a_late_response_is_a_504_and_never_reaches_the_next_request() {
    let (proxy, _shutdown) = proxy(|c| c.request_timeout = Duration::from_millis(200)).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let mut sender = connection(&proxy).await;
    let (status, body) = send(&mut sender, "GET", "/late").await;
    assert_eq!(status, 504, "{body}");
    // Half a head came before the deadline: it is not the next one's start.
    let (status, body) = send(&mut sender, "GET", "/half-late").await;
    assert_eq!(status, 504, "{body}");
    // On the same client connection: the connection the late answer will
    // come on is not used again.
    assert_eq!(
        send(&mut sender, "GET", "/length").await,
        (200, "hello".into())
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        send(&mut sender, "GET", "/length").await,
        (200, "hello".into())
    );
    let stats = proxy.release_stats("scripted").unwrap();
    assert_eq!((stats.by_class[4], stats.upstream_failures), (2, 2));
}

#[tokio::test]
async fn a_body_the_release_cuts_short_is_cut_short_for_the_client() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let mut sender = connection(&proxy).await;
    sender.ready().await.unwrap();
    let request = Request::get("/cut")
        .header("host", "a")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await;
    assert!(
        body.is_err(),
        "a body of 3 of its 10 bytes must not look whole"
    );
    // The proxy itself is fine: a new connection is served.
    let mut sender = connection(&proxy).await;
    assert_eq!(
        send(&mut sender, "GET", "/length").await,
        (200, "hello".into())
    );
}

#[tokio::test]
async fn a_body_in_pieces_goes_through_whole_and_one_cut_short_is_the_clients_fault() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let body: Vec<u8> = (0..40_000).map(|i| b'a' + (i % 26) as u8).collect();
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let head = format!(
        "POST /echo-body HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(7_000) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        client.write_all(piece).await.unwrap();
    }
    let mut buf = Vec::new();
    let (status, _, echoed) = read_response(&mut client, &mut buf).await;
    assert_eq!(status, 200);
    assert!(
        echoed == body,
        "the body came back changed ({} bytes)",
        echoed.len()
    );

    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(b"POST /echo-body HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly this")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let (status, head, _) = read_response(&mut client, &mut buf).await;
    assert_eq!(status, 400, "{head}");
    assert!(head.contains("connection: close\r\n"), "{head}");
    let stats = proxy.release_stats("scripted").unwrap();
    assert_eq!((stats.by_class[3], stats.upstream_failures), (1, 0));
}

#[tokio::test]
async fn framing_headers_cannot_be_named_away_by_either_side() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    // A client naming Content-Length in Connection: the release must not
    // read its body as a request of its own (one that went round the
    // proxy's forwarding rules).
    let smuggled = "GET /echo-head HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let request = format!(
        "POST /echo-body HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}\
         GET /length HTTP/1.1\r\nHost: a\r\n\r\n",
        smuggled.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (status, _, body) = read_response(&mut client, &mut buf).await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap().as_str()),
        (200, smuggled)
    );
    let (status, _, body) = read_response(&mut client, &mut buf).await;
    assert_eq!((status, body.as_slice()), (200, b"hello".as_slice()));

    // A release naming its Content-Length in Connection: the client still
    // gets it, and its connection stays usable.
    let mut sender = connection(&proxy).await;
    assert_eq!(
        send(&mut sender, "GET", "/named-length").await,
        (200, "ok".into())
    );
    assert_eq!(
        send(&mut sender, "GET", "/length").await,
        (200, "hello".into())
    );
}

#[tokio::test]
async fn the_proxys_own_answer_to_a_head_request_has_no_body() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    let mut chunk = [0u8; 4096];
    // Both answers (no release serves), the first a head alone.
    while all.windows(12).filter(|w| w == b"HTTP/1.1 502").count() < 2
        || !all.ends_with(b"this node\n")
    {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
            .await
            .expect("both answers")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&all));
        all.extend_from_slice(&chunk[..n]);
    }
    let all = String::from_utf8(all).unwrap();
    let second = all.rfind("HTTP/1.1 502").unwrap();
    assert!(
        all[..second].ends_with("\r\n\r\n"),
        "the HEAD answer carried a body: {all}"
    );
    assert_eq!(all.matches("no release of service web").count(), 1, "{all}");
}

#[tokio::test]
async fn a_handoff_during_a_response_closes_the_connection_after_the_next_one() {
    let (proxy, _shutdown) = proxy(|_| {}).await;
    proxy.switch(Some(RouteSpec::all("scripted", scripted_backend().await)));
    let mut sender = connection(&proxy).await;
    sender.ready().await.unwrap();
    let request = Request::get("/slow-body")
        .header("host", "a")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert!(response.headers().get("connection").is_none());
    // The handoff starts after this response's head went out without
    // `Connection: close`: the client may reuse the connection, so it
    // must stay open for one more request, whose answer closes it.
    let handing_off = tokio::spawn(proxy.hand_off(Duration::from_secs(5)));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"abcd");
    sender.ready().await.unwrap();
    let request = Request::get("/length")
        .header("host", "a")
        .body(Empty::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("the connection was still open");
    assert_eq!(response.headers().get("connection").unwrap(), "close");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    handing_off.await.unwrap();
}
