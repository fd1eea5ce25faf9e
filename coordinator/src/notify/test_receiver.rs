//! A webhook receiver for the notifier's tests: real HTTP over loopback.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// What a receiver got: each request's headers and body.
pub type Received = Arc<Mutex<Vec<(hyper::HeaderMap, Bytes)>>>;

/// An HTTP receiver answering each request with the next of `statuses`
/// (the last one once they run out); returns its URL.
pub async fn receiver(statuses: &[u16]) -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hook?token=t0ps3cret",
        listener.local_addr().unwrap()
    );
    let received = Received::default();
    let statuses = Arc::new(Mutex::new(
        statuses.iter().copied().collect::<VecDeque<u16>>(),
    ));
    let log = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (log, statuses) = (log.clone(), statuses.clone());
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let (log, statuses) = (log.clone(), statuses.clone());
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    log.lock().unwrap().push((parts.headers, body));
                    let mut statuses = statuses.lock().unwrap();
                    let status = match statuses.len() {
                        1 => statuses[0],
                        _ => statuses.pop_front().unwrap(),
                    };
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(status)
                            .header("Location", "http://elsewhere.example/")
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (url, received)
}
