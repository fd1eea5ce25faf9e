//! Webhooks for rollout events: the spec's `[[notify]]` (`spec`), fixed in
//! each rollout when it is created. The driver hands every change of a
//! rollout to the `Notifier`, which reads the events out of it (`events`)
//! and queues one delivery per event and target without ever waiting: a
//! full queue drops (counted and logged), and a slow or dead receiver
//! delays only the webhooks behind it. One task sends them (`deliver`),
//! in order per URL, receivers side by side, and stops with the
//! coordinator.

pub mod deliver;
pub mod events;
pub mod spec;
#[cfg(test)]
pub(crate) mod test_receiver;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::rollout::model::Rollout;
use deliver::{Delivery, Sender};
use spec::{Format, NotifyTarget};

/// Deliveries handed over and not yet taken in by the sending task.
const QUEUE: usize = 1024;
/// Deliveries waiting behind the one being sent to the same URL.
const PER_URL: usize = 256;

#[derive(Clone)]
pub struct Notifier {
    queue: mpsc::Sender<Delivery>,
    sender: Arc<Sender>,
}

impl Notifier {
    /// Starts the sending task on `tasks`; it stops at `shutdown`.
    pub fn start(sender: Sender, shutdown: CancellationToken, tasks: &TaskTracker) -> Self {
        let (queue, inbox) = mpsc::channel(QUEUE);
        let sender = Arc::new(sender);
        tasks.spawn(dispatch(inbox, sender.clone(), shutdown));
        Self { queue, sender }
    }

    /// Queues the webhooks of what happened between `before` and `after`,
    /// without waiting.
    pub fn rollout_changed(&self, before: &Rollout, after: &Rollout) {
        if after.notify.is_empty() {
            return;
        }
        for event in events::derive(before, after) {
            for target in after.notify.iter().filter(|t| t.wants(event.kind)) {
                let id = uuid::Uuid::new_v4().to_string();
                let body = match target.format {
                    Format::Json => events::body(after, &event, &id),
                    Format::Slack => events::slack_body(&events::rollout_text(after, &event)),
                };
                self.queue(Delivery {
                    body: body.into(),
                    target: target.clone(),
                    env: after.env.clone(),
                    subject: format!("rollout {}", after.id),
                    event: event.kind,
                    id,
                });
            }
        }
    }

    /// Queues the webhooks of a lever set or lifted, or an alert raised or
    /// resolved, to `targets` (those of the service's current release),
    /// without waiting.
    pub fn service_event(&self, targets: &[NotifyTarget], lever: &events::ServiceEvent) {
        for target in targets.iter().filter(|t| t.wants(lever.kind)) {
            let id = uuid::Uuid::new_v4().to_string();
            let body = match target.format {
                Format::Json => events::service_body(lever, &id),
                Format::Slack => events::slack_body(&events::service_text(lever)),
            };
            self.queue(Delivery {
                body: body.into(),
                target: target.clone(),
                env: lever.env.clone(),
                subject: format!("{} in {}", lever.service, lever.env),
                event: lever.kind,
                id,
            });
        }
    }

    fn queue(&self, delivery: Delivery) {
        match self.queue.try_send(delivery) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(delivery)) => {
                dropped(&self.sender, &delivery, "the webhook queue is full");
            }
            Err(mpsc::error::TrySendError::Closed(delivery)) => {
                dropped(&self.sender, &delivery, "the coordinator is stopping");
            }
        }
    }
}

/// The webhooks of `service` in `env` outside a rollout (levers, alerts):
/// those of the rollout that made its current release current, with the
/// app's name; `None` when it has no current release.
pub async fn service_targets(
    store: &crate::store::Store,
    env: &str,
    service: &str,
) -> Result<Option<(String, Vec<NotifyTarget>)>, crate::store::StoreError> {
    let Some(current) = store.releases.current(env, service).await? else {
        return Ok(None);
    };
    let rollout = store.rollouts.get(&current.rollout_id).await?;
    Ok(Some((
        current.app,
        rollout.map(|r| r.notify).unwrap_or_default(),
    )))
}

fn dropped(sender: &Sender, delivery: &Delivery, why: &str) {
    tracing::warn!(subject = %delivery.subject, event = delivery.event.as_str(), url = %delivery.target.shown(), "webhook dropped: {why}");
    sender
        .metrics()
        .notify_delivery(delivery.event.as_str(), "dropped");
}

/// Takes deliveries in and sends them: one at a time per URL, in the order
/// they came, URLs side by side. What is left at shutdown is dropped.
async fn dispatch(
    mut inbox: mpsc::Receiver<Delivery>,
    sender: Arc<Sender>,
    shutdown: CancellationToken,
) {
    // A URL has an entry while one of its deliveries is being sent; the
    // entry holds those waiting behind it.
    let mut waiting: HashMap<String, VecDeque<Delivery>> = HashMap::new();
    let mut sending = JoinSet::new();
    let mut sent_by: HashMap<Id, Delivery> = HashMap::new();
    let start =
        |delivery: Delivery, sending: &mut JoinSet<()>, sent_by: &mut HashMap<Id, Delivery>| {
            let sender = sender.clone();
            let copy = delivery.clone();
            let task = sending.spawn(async move { sender.send(&copy).await });
            sent_by.insert(task.id(), delivery);
        };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = sending.join_next_with_id() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(error) => error.id(),
                };
                let url = sent_by.remove(&id).map(|d| d.target.url).unwrap_or_default();
                match waiting.get_mut(&url).and_then(VecDeque::pop_front) {
                    Some(next) => start(next, &mut sending, &mut sent_by),
                    None => {
                        waiting.remove(&url);
                    }
                }
            }
            next = inbox.recv() => {
                let Some(delivery) = next else { break };
                match waiting.get_mut(&delivery.target.url) {
                    Some(queue) if queue.len() >= PER_URL => {
                        dropped(&sender, &delivery, "too many webhooks wait for this receiver");
                    }
                    Some(queue) => queue.push_back(delivery),
                    None => {
                        waiting.insert(delivery.target.url.clone(), VecDeque::new());
                        start(delivery, &mut sending, &mut sent_by);
                    }
                }
            }
        }
    }
    sending.abort_all();
    inbox.close();
    let left: Vec<Delivery> = sent_by
        .into_values()
        .chain(waiting.into_values().flatten())
        .chain(std::iter::from_fn(|| inbox.try_recv().ok()))
        .collect();
    for delivery in &left {
        sender
            .metrics()
            .notify_delivery(delivery.event.as_str(), "dropped");
    }
    if !left.is_empty() {
        tracing::warn!(
            count = left.len(),
            "the coordinator is stopping: webhooks not sent yet are dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use prometheus_client::metrics::gauge::Gauge;

    use super::spec::NotifyTarget;
    use super::*;
    use crate::metrics::Metrics;
    use crate::rollout::engine::{self, Input, Outcome};
    use crate::secrets::Secrets;
    use crate::store::memory::MemoryBackend;
    use crate::store::Store;

    fn target(url: String) -> NotifyTarget {
        NotifyTarget {
            url,
            events: None,
            secret: None,
            timeout_ms: 5_000,
            format: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_dead_receiver_holds_up_only_its_own_webhooks_and_shutdown_does_not_wait() {
        // Connections are accepted (the backlog) and never answered.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (live, received) = test_receiver::receiver(&[200]).await;
        let store = Store::new(Arc::new(MemoryBackend::new()));
        let metrics = Arc::new(Metrics::new());
        let sender = Sender::new(
            Arc::new(Secrets::new(store.clone(), None)),
            crate::journal::Journal::start(store, Gauge::default()),
            metrics.clone(),
        );
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let notifier = Notifier::start(sender, shutdown.clone(), &tasks);
        let mut r = crate::rollout::sim::rollout(1, crate::rollout::sim::strategy());
        r.notify = vec![
            target(format!("http://{}/dead", dead.local_addr().unwrap())),
            target(live),
        ];
        let feed = |r: &mut Rollout, input: Input| {
            let before = r.clone();
            engine::handle(r, 1, input);
            notifier.rollout_changed(&before, r);
        };
        feed(&mut r, Input::Start);
        let id = r.nodes[0].command_id.clone().unwrap();
        feed(
            &mut r,
            Input::Result {
                command_id: id,
                outcome: Outcome::Failed("disk full".into()),
            },
        );
        // Both reach the live receiver, in order, well within the dead
        // one's timeout.
        let deadline = Instant::now() + Duration::from_secs(3);
        while received.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "the live receiver waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let events: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .map(|(headers, _)| headers["x-cutover-event"].to_str().unwrap().to_string())
            .collect();
        assert_eq!(events, ["started", "rolled_back"]);
        shutdown.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .expect("the sender stops at once");
        let metrics = metrics.render(&[]);
        for event in ["started", "rolled_back"] {
            assert!(
                metrics.contains(&format!(
                    "cutover_notify_deliveries_total{{event=\"{event}\",outcome=\"dropped\"}} 1"
                )),
                "the dead receiver's webhooks are dropped at shutdown: {metrics}"
            );
        }
    }

    #[tokio::test]
    async fn a_lever_goes_to_json_and_slack_receivers_in_their_format() {
        let (json_url, json_got) = test_receiver::receiver(&[200]).await;
        let (slack_url, slack_got) = test_receiver::receiver(&[200]).await;
        let store = Store::new(Arc::new(MemoryBackend::new()));
        let sender = Sender::new(
            Arc::new(Secrets::new(store.clone(), None)),
            crate::journal::Journal::start(store, Gauge::default()),
            Arc::new(Metrics::new()),
        );
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let notifier = Notifier::start(sender, shutdown.clone(), &tasks);
        let mut slack = target(slack_url);
        slack.format = Format::Slack;
        // One that wants only rollout endings gets nothing.
        let mut endings = target(json_url.clone());
        endings.events = Some(vec![spec::EventKind::Failed]);
        let lever = events::ServiceEvent {
            kind: spec::EventKind::MaintenanceOn,
            app: "shop".into(),
            env: "production".into(),
            service: "web".into(),
            node: String::new(),
            operator: "pete".into(),
            message: "maintenance set for web in production on every node by pete: 503 \"<!channel> back soon\"".into(),
            state: "maintenance",
            at_ms: 1_700_000_000_000,
        };
        notifier.service_event(&[target(json_url), slack, endings], &lever);
        let deadline = Instant::now() + Duration::from_secs(3);
        while json_got.lock().unwrap().is_empty() || slack_got.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "webhooks not received");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let json_got = json_got.lock().unwrap();
        assert_eq!(json_got.len(), 1, "the endings-only target got nothing");
        let (headers, body) = &json_got[0];
        assert_eq!(headers["x-cutover-event"], "maintenance_on");
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["event"], "maintenance_on");
        assert_eq!(body["state"], "maintenance");
        assert_eq!(body["service"], "web");
        assert_eq!(body["operator"], "pete");
        assert_eq!(body["node"], serde_json::Value::Null);
        let slack: serde_json::Value =
            serde_json::from_slice(&slack_got.lock().unwrap()[0].1).unwrap();
        assert_eq!(
            slack,
            serde_json::json!({"text": "[production] shop/web: maintenance set for web in production on every node by pete: 503 \"&lt;!channel&gt; back soon\""})
        );
        shutdown.cancel();
    }
}
