//! A simulated agent on the real registry, as `agent_api` attaches one: it
//! runs the commands it gets one after another with seeded durations,
//! reports progress and results, heartbeats what it runs, and answers a
//! command id it completed from its journal, as the real agent does. Its
//! faults: results lost on the way, outages (a partition keeps the work
//! going, a crash loses the work in progress), a release whose prepare or
//! health check fails here, and one that crash-loops after it switched.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::pending;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_common::tls::PeerInfo;
use cutover_proto::v1::{self as pb, command, coordinator_message, CoordinatorMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::registry::{Attached, Registry};
use crate::store::{ServiceStatus, SideStatus, Traffic};

const HEARTBEAT: Duration = Duration::from_secs(1);
/// A result is lost at most this often in a row: the driver's resends
/// (every 15 s) then get an answer well within a command's deadline.
const DROPS_IN_A_ROW: u32 = 2;

/// Time away from the coordinator, from the start of the faulty phase.
#[derive(Debug, Clone)]
pub(super) struct Outage {
    pub at: Duration,
    pub length: Duration,
    /// The agent process died: the command in progress and those queued
    /// are forgotten (the journal stays).
    pub crash: bool,
}

/// One node's seeded faults; versions name the release they hit.
#[derive(Debug, Clone, Default)]
pub(super) struct Faults {
    pub rejects: Option<String>,
    pub prepare_fails: Option<String>,
    /// The version crashes over and over this long after its switch.
    pub crash_loops: Option<(String, Duration)>,
    pub drop_results: f64,
    pub outages: Vec<Outage>,
    /// The version answers one request in ten with a 5xx.
    pub errors: Option<String>,
    /// The version no longer starts here once something else replaced it
    /// (its files are gone): a return to it is refused, unless it still
    /// runs (a proxy switch).
    pub cannot_return: Option<String>,
}

/// What runs on a node, shared with the checks.
#[derive(Debug, Default)]
pub(super) struct Node {
    pub services: BTreeMap<String, Running>,
    /// Each service's side release (a canary, or one kept warm).
    pub sides: BTreeMap<String, Side>,
}

#[derive(Debug, Clone)]
pub(super) struct Side {
    pub running: Running,
    /// Percent of the node's requests it gets.
    pub weight: u32,
    /// The agent stops it by itself then (kept warm after a switch).
    pub retire_at: Option<Instant>,
    /// Kept warm until a later activation or stage replaces it
    /// (`keep_previous_warm`).
    pub kept_warm: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Running {
    pub release_id: String,
    pub version: String,
    pub since: Instant,
    /// What the node's proxy counted for it: requests, and 5xx answers.
    pub requests: u64,
    pub errors: u64,
}

impl Running {
    pub fn new(release_id: &str, version: &str, since: Instant) -> Self {
        Running {
            release_id: release_id.to_string(),
            version: version.to_string(),
            since,
            requests: 0,
            errors: 0,
        }
    }

    /// `n` more requests served, one in ten failing where `errors` names
    /// its version.
    fn serve(&mut self, n: u64, errors: &Option<String>) {
        self.requests += n;
        if errors.as_deref() == Some(self.version.as_str()) {
            self.errors += n / 10;
        }
    }

    /// The counts as the proxy reports them (every answer in 5 ms).
    fn traffic(&self) -> Traffic {
        Traffic {
            release_id: self.release_id.clone(),
            requests: self.requests,
            by_class: vec![0, self.requests - self.errors, 0, 0, self.errors],
            upstream_failures: 0,
            latency_bounds_ms: vec![5, 10],
            latency_cumulative: vec![self.requests; 3],
            latency_sum_us: self.requests * 5_000,
        }
    }
}

pub(super) struct Agent {
    pub index: usize,
    pub labels: BTreeMap<String, String>,
    pub faults: Faults,
    pub node: Arc<Mutex<Node>>,
}

impl Agent {
    pub fn id(&self) -> String {
        format!("id-{}", self.index)
    }
}

struct Session {
    attached: Attached,
    commands: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
}

/// The command being run: what it does when.
struct Work {
    command: pb::Command,
    steps: VecDeque<(Instant, Step)>,
}

enum Step {
    Progress(&'static str),
    /// The node serves the activated release from here on.
    Switch,
    Finish(Result<(), String>),
}

struct Runner {
    agent: Agent,
    registry: Arc<Registry>,
    rng: StdRng,
    session: Option<Session>,
    /// Away (partitioned or crashed) until then.
    away_until: Option<Instant>,
    queue: VecDeque<pb::Command>,
    work: Option<Work>,
    journal: HashMap<String, pb::CommandResult>,
    drops: HashMap<String, u32>,
    /// The faulty phase began here; outages count from it.
    faults_from: Instant,
}

/// Runs `agent` until `done`; its outages count from `faults_from`.
pub(super) async fn run(
    agent: Agent,
    registry: Arc<Registry>,
    seed: u64,
    faults_from: Instant,
    done: CancellationToken,
) {
    let mut outages: VecDeque<Outage> = agent.faults.outages.clone().into();
    let mut runner = Runner {
        rng: StdRng::seed_from_u64(seed),
        agent,
        registry,
        session: None,
        away_until: None,
        queue: VecDeque::new(),
        work: None,
        journal: HashMap::new(),
        drops: HashMap::new(),
        faults_from,
    };
    runner.connect().await;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        let next_step = runner.work.as_ref().map(|w| w.steps[0].0);
        let next_outage = outages.front().map(|o| runner.faults_from + o.at);
        tokio::select! {
            biased;
            _ = done.cancelled() => return,
            message = next_message(&mut runner.session) => runner.on_message(message),
            _ = heartbeat.tick() => runner.heartbeat(),
            _ = sleep_until(next_step.unwrap_or_else(Instant::now)), if next_step.is_some() => runner.step(),
            _ = sleep_until(next_outage.unwrap_or_else(Instant::now)), if next_outage.is_some() => {
                let outage = outages.pop_front().expect("checked above");
                runner.go_away(&outage);
            }
            _ = sleep_until(runner.away_until.unwrap_or_else(Instant::now)), if runner.away_until.is_some() => {
                runner.connect().await;
            }
        }
        runner.start_next();
    }
}

async fn next_message(session: &mut Option<Session>) -> Option<CoordinatorMessage> {
    match session {
        Some(session) => session.commands.recv().await.and_then(Result::ok),
        None => pending().await,
    }
}

impl Runner {
    async fn connect(&mut self) {
        self.away_until = None;
        let (sender, commands) = mpsc::channel(64);
        let hello = pb::Hello {
            node_id: self.agent.id(),
            name: format!("node-{}", self.agent.index),
            address: format!("10.0.0.{}", self.agent.index),
            labels: self.agent.labels.clone().into_iter().collect(),
            agent_version: "sim".into(),
            capabilities: vec![
                "runtime.process".into(),
                "command.stage_release".into(),
                "command.set_traffic".into(),
            ],
            recent_command_ids: vec![],
            protocol_version: cutover_common::AGENT_PROTOCOL,
            agent_build: String::new(),
            trust_bundle_sha256: String::new(),
        };
        let peer = PeerInfo {
            remote_addr: None,
            identity: None,
            serial: None,
            not_before: None,
            not_after: None,
            issuer: None,
        };
        let attached = self
            .registry
            .attach(&hello, &peer, sender, &CancellationToken::new())
            .await
            .expect("a simulated agent attaches");
        self.session = Some(Session { attached, commands });
        self.heartbeat();
    }

    fn go_away(&mut self, outage: &Outage) {
        if let Some(session) = self.session.take() {
            let why = if outage.crash {
                "agent crashed"
            } else {
                "partition"
            };
            self.registry.detach(&session.attached, why);
        }
        if outage.crash {
            self.work = None;
            self.queue.clear();
        }
        // Outages that overlap add up to the longer one.
        let back = Instant::now() + outage.length;
        self.away_until = Some(self.away_until.map_or(back, |until| until.max(back)));
    }

    fn on_message(&mut self, message: Option<CoordinatorMessage>) {
        let Some(message) = message else {
            // The registry ended the session: connect again shortly.
            self.session = None;
            self.away_until = Some(Instant::now() + Duration::from_secs(1));
            return;
        };
        let Some(coordinator_message::Kind::Command(command)) = message.kind else {
            return;
        };
        if let Some(result) = self.journal.get(&command.command_id) {
            let result = pb::CommandResult {
                replayed: true,
                ..result.clone()
            };
            self.answer(result);
            return;
        }
        let id = &command.command_id;
        let known = self
            .work
            .iter()
            .map(|w| &w.command)
            .chain(&self.queue)
            .any(|c| &c.command_id == id);
        if !known {
            self.queue.push_back(command);
        }
    }

    fn start_next(&mut self) {
        if self.work.is_some() {
            return;
        }
        let Some(command) = self.queue.pop_front() else {
            return;
        };
        let now = Instant::now();
        let at = |rng: &mut StdRng, lo: u64, hi: u64| {
            now + Duration::from_millis(rng.random_range(lo..hi))
        };
        let faults = &self.agent.faults;
        let steps: Vec<(Instant, Step)> = match &command.kind {
            Some(command::Kind::Prepare(prepare)) => {
                let version = version(prepare.release.as_ref());
                let outcome = match faults.prepare_fails.as_deref() == Some(version) {
                    true => Err(format!("cannot fetch the artifact of {version}: 404")),
                    false => Ok(()),
                };
                vec![(at(&mut self.rng, 50, 2_000), Step::Finish(outcome))]
            }
            Some(command::Kind::Activate(activate)) => {
                let version = version(activate.release.as_ref());
                let switch = at(&mut self.rng, 200, 3_000);
                let finish = switch + Duration::from_millis(self.rng.random_range(100..3_000));
                let refused_return = faults.cannot_return(version)
                    && activate.release.as_ref().is_some_and(|r| self.replaced(r));
                if faults.rejects.as_deref() == Some(version) || refused_return {
                    vec![
                        (switch, Step::Progress("health_checking")),
                        (
                            finish,
                            Step::Finish(Err(format!(
                                "{version} failed its health check: 503 from /health"
                            ))),
                        ),
                    ]
                } else {
                    vec![
                        (switch, Step::Progress("switching")),
                        (switch, Step::Switch),
                        (switch, Step::Progress("draining")),
                        (finish, Step::Finish(Ok(()))),
                    ]
                }
            }
            Some(command::Kind::StopService(_)) => {
                vec![(at(&mut self.rng, 50, 1_000), Step::Finish(Ok(())))]
            }
            // Starts beside the serving release, checked as an activation.
            Some(command::Kind::StageRelease(stage)) => {
                let version = version(stage.release.as_ref());
                let ready = at(&mut self.rng, 200, 3_000);
                if faults.rejects.as_deref() == Some(version) {
                    vec![(
                        ready,
                        Step::Finish(Err(format!(
                            "{version} failed its health check: 503 from /health"
                        ))),
                    )]
                } else {
                    vec![(ready, Step::Switch), (ready, Step::Finish(Ok(())))]
                }
            }
            // A proxy table swap.
            Some(command::Kind::SetTraffic(_)) => {
                let done = at(&mut self.rng, 10, 200);
                vec![(done, Step::Switch), (done, Step::Finish(Ok(())))]
            }
            other => panic!("the simulation sends no {other:?}"),
        };
        self.work = Some(Work {
            command,
            steps: steps.into(),
        });
    }

    fn step(&mut self) {
        let work = self.work.as_mut().expect("a step of the work in progress");
        let (_, step) = work.steps.pop_front().expect("work has steps left");
        let id = work.command.command_id.clone();
        match step {
            Step::Progress(step) => {
                if self.session.is_some() {
                    self.registry.command_progress(pb::CommandProgress {
                        command_id: id,
                        step: step.into(),
                        message: String::new(),
                    });
                }
            }
            Step::Switch => {
                let command = work.command.clone();
                if let Err(why) = self.switch(&command) {
                    // What the real agent refuses fails the command.
                    let work = self.work.as_mut().expect("checked above");
                    work.steps.clear();
                    work.steps
                        .push_back((Instant::now(), Step::Finish(Err(why))));
                }
            }
            Step::Finish(outcome) => {
                let command = self.work.take().expect("checked above").command;
                if let Some(command::Kind::StopService(stop)) = &command.kind {
                    // A stop retires the side release too (`Service::stop`).
                    let mut node = self.agent.node.lock().expect("node lock");
                    node.services.remove(&stop.service);
                    node.sides.remove(&stop.service);
                }
                let (status, message) = match outcome {
                    Ok(()) => (pb::CommandStatus::Succeeded, String::new()),
                    Err(message) => (pb::CommandStatus::Failed, message),
                };
                let result = pb::CommandResult {
                    command_id: id.clone(),
                    status: status.into(),
                    message,
                    ..Default::default()
                };
                self.journal.insert(id, result.clone());
                self.answer(result);
            }
        }
    }

    /// What a command changes on the node, as the real agent does it (see
    /// `ActivateRelease`, `StageRelease` and `SetTraffic` in agent.proto).
    /// How often `running` crashed by `now` (its release crash-loops from
    /// a while after it started, as the faults say).
    fn crashes(&self, running: &Running, now: Instant) -> u32 {
        let crashing_since = self
            .agent
            .faults
            .crash_loops
            .as_ref()
            .filter(|(version, _)| *version == running.version)
            .map(|(_, after)| running.since + *after)
            .filter(|since| now >= *since);
        crashing_since.map_or(0, |since| (now - since).as_secs() as u32 + 1)
    }

    /// Whether the node runs another release of `release`'s service and
    /// not `release` itself (neither serving nor beside it).
    fn replaced(&self, release: &pb::Release) -> bool {
        let node = self.agent.node.lock().expect("node lock");
        let is = |r: &Running| r.release_id == release.release_id;
        node.services
            .get(&release.service)
            .is_some_and(|serving| !is(serving))
            && !node
                .sides
                .get(&release.service)
                .is_some_and(|side| is(&side.running))
    }

    fn switch(&mut self, command: &pb::Command) -> Result<(), String> {
        let now = Instant::now();
        let mut node = self.agent.node.lock().expect("node lock");
        let running =
            |release: &pb::Release| Running::new(&release.release_id, &release.version, now);
        match &command.kind {
            Some(command::Kind::Activate(activate)) => {
                let release = activate
                    .release
                    .as_ref()
                    .expect("an activation names its release");
                let service = release.service.clone();
                let side = node.sides.remove(&service);
                // Some(None): kept warm until replaced.
                let keep = match (activate.keep_previous_warm, activate.keep_previous_ms) {
                    (true, _) => Some(None),
                    (false, 0) => None,
                    (false, ms) => Some(Some(now + Duration::from_millis(ms))),
                };
                let active = node.services.get(&service).cloned();
                let (serving, replaced) = match (active, side) {
                    // Already serving: the side (if any) loses its traffic.
                    (Some(active), side) if active.release_id == release.release_id => {
                        (active, side.map(|s| s.running))
                    }
                    // The side release takes over in the proxy alone.
                    (active, Some(side)) if side.running.release_id == release.release_id => {
                        (side.running, active)
                    }
                    (active, _) => (running(release), active),
                };
                node.services.insert(service.clone(), serving);
                if let (Some(replaced), Some(retire_at)) = (replaced, keep) {
                    node.sides.insert(
                        service,
                        Side {
                            running: replaced,
                            weight: 0,
                            retire_at,
                            kept_warm: retire_at.is_none(),
                        },
                    );
                }
                Ok(())
            }
            Some(command::Kind::StageRelease(stage)) => {
                let release = stage.release.as_ref().expect("a stage names its release");
                if !node.services.contains_key(&release.service) {
                    return Err(format!(
                        "service {} serves nothing to stage beside",
                        release.service
                    ));
                }
                let weight = stage.split.as_ref().map_or(0, |s| s.weight);
                // As the agent: reused only if it has not crashed since.
                let kept = node
                    .sides
                    .get(&release.service)
                    .filter(|s| s.running.release_id == release.release_id)
                    .filter(|s| self.crashes(&s.running, now) == 0)
                    .map(|s| s.running.clone());
                node.sides.insert(
                    release.service.clone(),
                    Side {
                        running: kept.unwrap_or_else(|| running(release)),
                        weight,
                        retire_at: None,
                        kept_warm: false,
                    },
                );
                Ok(())
            }
            Some(command::Kind::SetTraffic(set)) => match node.sides.get_mut(&set.service) {
                Some(side) if side.running.release_id == set.side_release_id => {
                    side.weight = set.split.as_ref().map_or(0, |s| s.weight);
                    Ok(())
                }
                _ => Err(format!(
                    "{} is not the side release of {}",
                    set.side_release_id, set.service
                )),
            },
            other => unreachable!("nothing to switch for {other:?}"),
        }
    }

    /// Side releases kept warm past their time stop.
    fn retire(&mut self) {
        let now = Instant::now();
        let mut node = self.agent.node.lock().expect("node lock");
        node.sides
            .retain(|_, side| side.retire_at.is_none_or(|at| at > now));
    }

    /// Sends a result, unless the session is gone or the network loses it.
    fn answer(&mut self, result: pb::CommandResult) {
        if self.session.is_none() {
            return;
        }
        let drops = self.drops.entry(result.command_id.clone()).or_default();
        if *drops < DROPS_IN_A_ROW && self.rng.random_bool(self.agent.faults.drop_results) {
            *drops += 1;
            return;
        }
        *drops = 0;
        self.registry.complete_command(result);
    }

    fn heartbeat(&mut self) {
        // The node's processes run on while the agent is away or down.
        self.retire();
        let Some(session) = &self.session else {
            return;
        };
        let now = Instant::now();
        let mut node = self.agent.node.lock().expect("node lock");
        // A hundred requests a beat, divided as the proxy's split says.
        let Node { services, sides } = &mut *node;
        for (service, running) in services.iter_mut() {
            let side_weight = sides.get(service).map_or(0, |s| u64::from(s.weight));
            running.serve(100 - side_weight, &self.agent.faults.errors);
            if let Some(side) = sides.get_mut(service) {
                side.running.serve(side_weight, &self.agent.faults.errors);
            }
        }
        let crashes_of = |running: &Running| self.crashes(running, now);
        let services = node
            .services
            .iter()
            .map(|(service, running)| {
                let crashes = crashes_of(running);
                let side = node.sides.get(service).map(|side| {
                    let crashes = crashes_of(&side.running);
                    SideStatus {
                        release_id: side.running.release_id.clone(),
                        weight: side.weight,
                        running: crashes == 0,
                        healthy: crashes == 0,
                        crashes,
                        health_detail: if crashes == 0 {
                            String::new()
                        } else {
                            "connection refused".into()
                        },
                        retire_at_ms: match (side.kept_warm, side.retire_at) {
                            (true, _) => -1,
                            (false, None) => 0,
                            (false, Some(at)) => {
                                self.registry.now_ms()
                                    + at.saturating_duration_since(now).as_millis() as i64
                            }
                        },
                        traffic: Some(side.running.traffic()),
                        memory_bytes: 0,
                        last_exit: String::new(),
                    }
                });
                ServiceStatus {
                    service: service.clone(),
                    release_id: running.release_id.clone(),
                    running: crashes == 0,
                    healthy: crashes == 0,
                    crashes,
                    last_exit: if crashes == 0 {
                        String::new()
                    } else {
                        "exit status 1".into()
                    },
                    health_detail: if crashes == 0 {
                        String::new()
                    } else {
                        "connection refused".into()
                    },
                    side,
                    traffic: Some(running.traffic()),
                    ..Default::default()
                }
            })
            .collect();
        self.registry.heartbeat(&session.attached, None, services);
    }
}

fn version(release: Option<&pb::Release>) -> &str {
    release.map_or("", |r| r.version.as_str())
}

impl Faults {
    /// The longest time away at a stretch, outages that overlap (or are
    /// less than a second apart: the driver looks every 250 ms and may
    /// miss the node between them) as one.
    pub fn longest_away(&self) -> Duration {
        let mut longest = Duration::ZERO;
        let mut span: Option<(Duration, Duration)> = None;
        for outage in &self.outages {
            let end = outage.at + outage.length;
            span = match span {
                Some((start, until)) if outage.at <= until + Duration::from_secs(1) => {
                    Some((start, until.max(end)))
                }
                _ => Some((outage.at, end)),
            };
            let (start, until) = span.expect("set above");
            longest = longest.max(until - start);
        }
        longest
    }

    /// Whether a return to `version` fails here.
    pub fn cannot_return(&self, version: &str) -> bool {
        self.cannot_return.as_deref() == Some(version)
    }

    /// Whether `version` fails here (prepare, health, or crashes).
    pub fn cannot_run(&self, version: &str) -> bool {
        let hit = |v: &Option<String>| v.as_deref() == Some(version);
        hit(&self.rejects)
            || hit(&self.prepare_fails)
            || self.crash_loops.as_ref().is_some_and(|(v, _)| v == version)
    }
}
