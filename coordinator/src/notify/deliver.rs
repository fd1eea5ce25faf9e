//! Sending one webhook: signed with the target's secret (read when it is
//! sent), POSTed with a timeout per attempt, tried again with backoff while
//! the receiver may recover (no answer, 5xx, 429), and a final failure put
//! in the event log with what to do about it. Redirects are not followed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::spec::{EventKind, NotifyTarget};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::store::NewEvent;

/// Waits before the second, third and fourth attempt.
pub const BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// One webhook to send: the same body and id on every attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub target: NotifyTarget,
    pub env: String,
    /// What it is about, for messages: "rollout web-42", "web in
    /// production".
    pub subject: String,
    pub event: EventKind,
    pub id: String,
    pub body: Bytes,
}

impl Delivery {
    /// What messages call it.
    fn describe(&self) -> String {
        format!(
            "webhook {} of {} to {}",
            self.event.as_str(),
            self.subject,
            self.target.shown()
        )
    }
}

/// Why an attempt did not go through, whether another may, and what the
/// operator can do.
struct Failure {
    why: String,
    retry: bool,
    next: String,
}

pub struct Sender {
    client: Client<cutover_common::fetch::HttpsConnector, Full<Bytes>>,
    secrets: Arc<Secrets>,
    journal: Journal,
    metrics: Arc<Metrics>,
}

impl Sender {
    pub fn new(secrets: Arc<Secrets>, journal: Journal, metrics: Arc<Metrics>) -> Self {
        let connector =
            cutover_common::fetch::https_connector(cutover_common::fetch::public_roots());
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            secrets,
            journal,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends `delivery` until it is answered 2xx, refused, or out of
    /// attempts.
    pub async fn send(&self, delivery: &Delivery) {
        let signature = match &delivery.target.secret {
            None => None,
            Some(name) => match self.secrets.current_value(&delivery.env, name).await {
                Ok(key) => Some(sign(key.as_bytes(), &delivery.body)),
                Err(error) => {
                    let message = format!("{} not sent: {error}", delivery.describe());
                    return self.failed(delivery, 0, message);
                }
            },
        };
        for attempt in 1.. {
            let failure = match self.attempt(delivery, signature.as_deref()).await {
                Ok(()) => {
                    tracing::debug!(subject = %delivery.subject, event = delivery.event.as_str(), url = %delivery.target.shown(), attempt, "webhook delivered");
                    self.metrics
                        .notify_delivery(delivery.event.as_str(), "delivered");
                    return;
                }
                Err(failure) => failure,
            };
            match BACKOFF.get(attempt - 1).filter(|_| failure.retry) {
                Some(wait) => {
                    tracing::debug!(subject = %delivery.subject, event = delivery.event.as_str(), url = %delivery.target.shown(), attempt, why = %failure.why, "webhook not delivered; trying again");
                    tokio::time::sleep(*wait).await;
                }
                None => {
                    let message = format!(
                        "{} failed after {attempt} attempt{}: {}; {}",
                        delivery.describe(),
                        if attempt == 1 { "" } else { "s" },
                        failure.why,
                        failure.next
                    );
                    return self.failed(delivery, attempt, message);
                }
            }
        }
    }

    async fn attempt(&self, delivery: &Delivery, signature: Option<&str>) -> Result<(), Failure> {
        let target = &delivery.target;
        let mut request = hyper::Request::post(&target.url)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, format!("cutover/{}", cutover_common::VERSION))
            .header("X-Cutover-Event", delivery.event.as_str())
            .header("X-Cutover-Delivery", &delivery.id);
        if let Some(signature) = signature {
            request = request.header("X-Cutover-Signature", format!("sha256={signature}"));
        }
        let request = request
            .body(Full::new(delivery.body.clone()))
            .map_err(|e| Failure {
                why: format!("the request cannot be made: {e}"),
                retry: false,
                next: "fix the url in the spec's [[notify]]".into(),
            })?;
        let timeout = target.timeout();
        let unreachable = format!(
            "check that the receiver is up, reachable from the coordinator and answers within {}; rollouts go on regardless",
            humantime::format_duration(timeout)
        );
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                return Err(Failure {
                    why: format!("cannot reach it: {}", cutover_common::error_chain(&error)),
                    retry: true,
                    next: unreachable,
                })
            }
            Err(_) => {
                return Err(Failure {
                    why: format!("no answer within {}", humantime::format_duration(timeout)),
                    retry: true,
                    next: unreachable,
                })
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let why = format!("the receiver answered {status}");
        Err(
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                Failure {
                    why,
                    retry: true,
                    next: unreachable,
                }
            } else if status.is_redirection() {
                Failure {
                why,
                retry: false,
                next: "webhooks do not follow redirects: set the [[notify]] url to the address it redirects to".into(),
            }
            } else {
                Failure {
                why,
                retry: false,
                next: "the receiver refused it: check the [[notify]] url, and with a secret, that the receiver verifies X-Cutover-Signature with the same value".into(),
            }
            },
        )
    }

    fn failed(&self, delivery: &Delivery, attempts: usize, message: String) {
        tracing::warn!(subject = %delivery.subject, event = delivery.event.as_str(), url = %delivery.target.shown(), attempts, "{message}");
        self.metrics
            .notify_delivery(delivery.event.as_str(), "failed");
        self.journal.event(NewEvent {
            kind: "notify",
            node_id: String::new(),
            node_name: String::new(),
            message,
        });
    }
}

/// The hex HMAC-SHA256 of `body` under `secret`: what X-Cutover-Signature
/// carries after `sha256=`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::gauge::Gauge;

    use super::super::test_receiver::receiver;
    use super::*;
    use crate::secrets::MasterKeys;
    use crate::store::memory::MemoryBackend;
    use crate::store::{Page, Store};

    struct Fixture {
        sender: Sender,
        store: Store,
        journal: Journal,
        _dir: tempfile::TempDir,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        MasterKeys::create(&key).unwrap();
        let store = Store::new(Arc::new(MemoryBackend::new()));
        let secrets = Arc::new(Secrets::new(
            store.clone(),
            Some(MasterKeys::load(&key).unwrap()),
        ));
        secrets
            .set("test", "HOOK_KEY", b"s3cret", "alice", None)
            .await
            .unwrap();
        let journal = Journal::start(store.clone(), Gauge::default());
        Fixture {
            sender: Sender::new(secrets, journal.clone(), Arc::new(Metrics::new())),
            store,
            journal,
            _dir: dir,
        }
    }

    impl Fixture {
        /// The event log's messages, once written.
        async fn events(self) -> Vec<String> {
            self.journal.close().await;
            let events = self.store.events.page(Page::oldest(0, 100)).await.unwrap();
            assert!(events.iter().all(|e| e.kind == "notify"), "{events:?}");
            events.into_iter().map(|e| e.message).collect()
        }
    }

    fn delivery(url: &str, secret: Option<&str>) -> Delivery {
        Delivery {
            target: NotifyTarget {
                url: url.into(),
                events: None,
                secret: secret.map(str::to_string),
                timeout_ms: 2_000,
                format: Default::default(),
            },
            env: "test".into(),
            subject: "rollout web-1".into(),
            event: EventKind::Started,
            id: "d-1".into(),
            body: Bytes::from_static(b"{\"event\":\"started\"}"),
        }
    }

    #[tokio::test]
    async fn a_busy_receiver_gets_the_same_signed_webhook_again() {
        let f = fixture().await;
        let (url, received) = receiver(&[429, 503, 200]).await;
        f.sender.send(&delivery(&url, Some("HOOK_KEY"))).await;
        let received = received.lock().unwrap().clone();
        assert_eq!(received.len(), 3, "two retries");
        let signature = format!("sha256={}", sign(b"s3cret", b"{\"event\":\"started\"}"));
        for (headers, body) in &received {
            assert_eq!(body.as_ref(), b"{\"event\":\"started\"}");
            assert_eq!(headers["x-cutover-signature"], signature.as_str());
            assert_eq!(headers["x-cutover-delivery"], "d-1");
            assert_eq!(headers["x-cutover-event"], "started");
            assert_eq!(headers["content-type"], "application/json");
        }
        let metrics = f.sender.metrics.render(&[]);
        assert!(
            metrics.contains(
                "cutover_notify_deliveries_total{event=\"started\",outcome=\"delivered\"} 1"
            ),
            "{metrics}"
        );
        assert!(f.events().await.is_empty());
    }

    #[tokio::test]
    async fn refusals_and_redirects_are_not_retried_and_go_to_the_event_log() {
        let f = fixture().await;
        let (refusing, refused) = receiver(&[404]).await;
        f.sender.send(&delivery(&refusing, None)).await;
        let (moved, redirected) = receiver(&[301]).await;
        f.sender.send(&delivery(&moved, None)).await;
        // Unsigned: no signature header.
        let refused = refused.lock().unwrap().clone();
        assert_eq!(refused.len(), 1);
        assert!(refused[0].0.get("x-cutover-signature").is_none());
        assert_eq!(redirected.lock().unwrap().len(), 1);
        // A secret nobody set: nothing is sent.
        let (unsent, nothing) = receiver(&[200]).await;
        f.sender.send(&delivery(&unsent, Some("NOPE"))).await;
        assert!(nothing.lock().unwrap().is_empty());
        let metrics = f.sender.metrics.render(&[]);
        assert!(
            metrics.contains(
                "cutover_notify_deliveries_total{event=\"started\",outcome=\"failed\"} 3"
            ),
            "{metrics}"
        );
        let events = f.events().await;
        assert_eq!(events.len(), 3, "{events:?}");
        let host = refusing
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        assert!(
            events[0].starts_with(&format!("webhook started of rollout web-1 to http://{host}/hook failed after 1 attempt: the receiver answered 404 Not Found; the receiver refused it")),
            "{events:?}"
        );
        assert!(
            events[1].contains("301 Moved Permanently; webhooks do not follow redirects"),
            "{events:?}"
        );
        assert!(
            events[2].ends_with("not sent: no secret NOPE in environment test; set it with `cutover secret set --env test NOPE`"),
            "{events:?}"
        );
        assert!(
            events.iter().all(|e| !e.contains("t0ps3cret")),
            "the query stays out: {events:?}"
        );
    }

    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Another body or another secret, another signature.
        assert_ne!(
            sign(b"Jefe", b"what do ya want for nothing!"),
            sign(b"Jefe", b"what do ya want for nothing?")
        );
        assert_ne!(sign(b"Jeff", b"x"), sign(b"Jefe", b"x"));
    }
}
