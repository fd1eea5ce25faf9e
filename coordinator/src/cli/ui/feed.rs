//! One view of the fleet shared by every open page: the nodes, what each
//! environment means them to run, and the recent rollouts, read from the
//! coordinator every `refresh` while a page listens (and the queues'
//! depths over those reads), and on demand when a
//! page is loaded with an old view.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proto::v1 as pb;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use super::colors::Colors;
use super::depths::QueueDepths;
use super::dial::Dialer;

/// How long one read of the fleet may take before the pages say the
/// coordinator does not answer (and keep the view they have).
const READ_DEADLINE: Duration = Duration::from_secs(10);

/// Recent rollouts a page shows; older ones are read one at a time.
const RECENT_ROLLOUTS: u32 = 50;

#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<pb::Node>,
    pub fleet: Vec<pb::FleetService>,
    /// Newest first: the recent ones, and every one running.
    pub rollouts: Vec<pb::Rollout>,
    /// Why the last read failed; the view before it stays.
    pub error: Option<String>,
    pub colors: Colors,
    /// The queues and workers as their probes last read them.
    pub queues: pb::ListQueuesResponse,
    pub depths: QueueDepths,
    read_at: Option<Instant>,
}

impl Snapshot {
    pub fn node(&self, name: &str) -> Option<&pb::Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn node_by_id(&self, id: &str) -> Option<&pb::Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn rollout(&self, id: &str) -> Option<&pb::Rollout> {
        self.rollouts.iter().find(|r| r.id == id)
    }

    /// The version of a release id, where a known release says it.
    pub fn version_of(&self, release_id: &str) -> Option<&str> {
        let from_fleet = self.fleet.iter().filter_map(|s| s.release.as_ref());
        let from_rollouts = self
            .rollouts
            .iter()
            .flat_map(|r| [r.release.as_ref(), r.previous_release.as_ref()])
            .flatten();
        from_fleet
            .chain(from_rollouts)
            .find(|r| r.id == release_id)
            .map(|r| r.version.as_str())
    }
}

/// One read of the coordinator.
struct Read {
    nodes: Vec<pb::Node>,
    fleet: Vec<pb::FleetService>,
    rollouts: Vec<pb::Rollout>,
    queues: pb::ListQueuesResponse,
}

#[derive(Clone)]
pub struct Feed {
    dialer: Arc<Dialer>,
    refresh: Duration,
    sender: Arc<watch::Sender<Arc<Snapshot>>>,
    /// One read at a time: pages loaded together share it.
    reading: Arc<Mutex<()>>,
    shutdown: CancellationToken,
}

impl Feed {
    pub fn new(dialer: Arc<Dialer>, refresh: Duration, shutdown: CancellationToken) -> Self {
        Self {
            dialer,
            refresh,
            sender: Arc::new(watch::channel(Arc::new(Snapshot::default())).0),
            reading: Arc::new(Mutex::new(())),
            shutdown,
        }
    }

    /// Changes of the view, for a live page.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }

    /// A view no older than `refresh`.
    pub async fn current(&self) -> Arc<Snapshot> {
        self.no_older_than(self.refresh).await
    }

    /// A view read at most `age` ago. While a read is under way, a caller
    /// that has a view gets it at once (the read sends its result to the
    /// live pages when it ends): a slow coordinator stalls no page.
    async fn no_older_than(&self, age: Duration) -> Arc<Snapshot> {
        let last = self.sender.borrow().clone();
        let fresh = |s: &Snapshot| s.read_at.is_some_and(|at| at.elapsed() < age);
        if fresh(&last) {
            return last;
        }
        let _one = match self.reading.try_lock() {
            Ok(one) => one,
            Err(_) if last.read_at.is_some() => return last,
            Err(_) => self.reading.lock().await,
        };
        let last = self.sender.borrow().clone();
        if fresh(&last) {
            return last;
        }
        let next = Arc::new(self.read(&last).await);
        self.sender.send_replace(next.clone());
        next
    }

    /// Reads the fleet every `refresh` while a live page listens.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.sender.receiver_count() > 0 {
                // Half: a page loaded just before spares a read, a read
                // that ended just after the last tick does not.
                self.no_older_than(self.refresh / 2).await;
            }
        }
    }

    /// Stamped when it starts, so reads come every `refresh` however long
    /// each takes.
    async fn read(&self, last: &Snapshot) -> Snapshot {
        let started = Instant::now();
        let read = tokio::time::timeout(READ_DEADLINE, async {
            match self.read_all().await {
                // Gone, or following another: dial the leader, read again.
                Err(status) if Dialer::lost(&status) => match self.dialer.redial().await {
                    Ok(()) => self.read_all().await,
                    Err(error) => {
                        tracing::debug!(%error, "cannot reach a leading coordinator");
                        Err(status)
                    }
                },
                read => read,
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "the coordinator did not answer within {}",
                humantime::format_duration(READ_DEADLINE)
            )))
        });
        match read {
            Ok(read) => Snapshot {
                colors: Colors::assign(&read.rollouts, &read.fleet, &read.nodes),
                depths: last.depths.with(&read.queues.queues),
                nodes: read.nodes,
                fleet: read.fleet,
                rollouts: read.rollouts,
                queues: read.queues,
                error: None,
                read_at: Some(started),
            },
            Err(status) => Snapshot {
                colors: Colors::assign(&last.rollouts, &last.fleet, &last.nodes),
                nodes: last.nodes.clone(),
                fleet: last.fleet.clone(),
                rollouts: last.rollouts.clone(),
                queues: last.queues.clone(),
                depths: last.depths.clone(),
                error: Some(super::super::client::explain(status).to_string()),
                read_at: Some(started),
            },
        }
    }

    async fn read_all(&self) -> Result<Read, tonic::Status> {
        let mut client = self.dialer.client();
        let mut nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let fleet = client
            .get_fleet(pb::GetFleetRequest {})
            .await?
            .into_inner()
            .services;
        let mut rollouts = client
            .list_rollouts(pb::ListRolloutsRequest {
                limit: RECENT_ROLLOUTS,
                ..Default::default()
            })
            .await?
            .into_inner()
            .rollouts;
        // A running rollout older than the recent ones is still shown.
        for service in &fleet {
            let id = &service.rollout_id;
            if !id.is_empty() && !rollouts.iter().any(|r| &r.id == id) {
                let rollout = client
                    .get_rollout(pb::GetRolloutRequest { id: id.clone() })
                    .await?
                    .into_inner();
                rollouts.push(rollout);
            }
        }
        rollouts.sort_by_key(|r| std::cmp::Reverse(r.created_at_ms));
        let queues = client
            .list_queues(pb::ListQueuesRequest::default())
            .await?
            .into_inner();
        Ok(Read {
            nodes,
            fleet,
            rollouts,
            queues,
        })
    }
}
