//! The driver of one rollout: it feeds the pure engine with command
//! results, heartbeats, operator requests and the clock, persists every
//! change before the commands it implies go out, and delivers them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::engine::{
    self, Input, Observation, Outcome, ServiceObservation, SideObservation, TaskEnd,
};
use super::model::Rollout;
use super::{RolloutError, Rollouts};
use crate::registry::{Registry, RegistryError};
use crate::secrets::{SecretError, Secrets};
use crate::store::{LockHolder, NewEvent, NodeStatus};

/// How often a running rollout looks at heartbeats and deadlines.
const TICK: Duration = Duration::from_millis(250);
/// Pause before resending a command to a node that was not connected.
const RESEND_DELAY: Duration = Duration::from_millis(500);
/// A command without an answer this long is sent again (same id).
const RESEND_EVERY: Duration = Duration::from_secs(15);
/// Inputs taken in at most before the rollout is written (see `run`).
const GROUP_INPUTS: usize = 512;

/// An operator's request to a running rollout, answered with the rollout
/// once taken in.
pub(super) type Control = (Input, oneshot::Sender<Rollout>);

pub(super) struct Handle {
    pub(super) control: mpsc::UnboundedSender<Control>,
    pub(super) watch: watch::Receiver<Arc<Rollout>>,
}

impl Rollouts {
    pub(super) fn record(&self, rollout: &Rollout, kind: &str, node: &str, message: String) {
        tracing::info!(rollout = %rollout.id, event = kind, node, "{message}");
        let event = NewEvent {
            kind: "rollout",
            node_id: String::new(),
            node_name: node.to_string(),
            message: format!("{} {kind}: {message}", rollout.id),
        };
        self.registry.journal().event(event);
    }

    pub(super) fn spawn(self: &Arc<Self>, rollout: Rollout, first: Input) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (watch_tx, watch) = watch::channel(Arc::new(rollout.clone()));
        self.running
            .lock()
            .expect("rollouts lock")
            .insert(rollout.id.clone(), Handle { control, watch });
        self.metrics.rollouts_in_progress.inc();
        let this = self.clone();
        self.tasks.spawn(async move {
            let id = rollout.id.clone();
            this.run(rollout, first, control_rx, watch_tx).await;
            this.running.lock().expect("rollouts lock").remove(&id);
            this.metrics.rollouts_in_progress.dec();
        });
    }

    /// Asks a running rollout to pause, resume, abort, promote, or a
    /// rollout awaiting approval to take an approval or a rejection.
    pub async fn control(&self, id: &str, input: Input) -> Result<Rollout, RolloutError> {
        let action = match &input {
            Input::Pause { .. } => "pause",
            Input::Resume { .. } => "resume",
            Input::Promote { .. } => "promote",
            Input::Approve { .. } => "approve",
            Input::Reject { .. } => "reject",
            _ => "abort",
        };
        let (reply, answer) = oneshot::channel();
        let sent = {
            let running = self.running.lock().expect("rollouts lock");
            running
                .get(id)
                .is_some_and(|handle| handle.control.send((input, reply)).is_ok())
        };
        // The answer is the rollout once the request is taken in.
        match (sent, answer.await) {
            (true, Ok(rollout)) => Ok(rollout),
            // Not taken in: the rollout ended, or its driver stopped first
            // (a shutdown), which must not read as ended (the simulation's
            // seed 1138: a resume so lost left a rollout paused for good).
            _ => {
                let rollout = self.get(id).await?;
                if !rollout.state.is_terminal() {
                    return Err(RolloutError::Interrupted {
                        id: id.to_string(),
                        action,
                    });
                }
                Err(RolloutError::Finished {
                    id: id.to_string(),
                    state: rollout.state.as_str(),
                    action,
                })
            }
        }
    }

    async fn run(
        self: &Arc<Self>,
        mut rollout: Rollout,
        first: Input,
        mut control: mpsc::UnboundedReceiver<Control>,
        watch: watch::Sender<Arc<Rollout>>,
    ) {
        let mut reply: Option<oneshot::Sender<Rollout>> = None;
        let (results_tx, mut results) = mpsc::unbounded_channel::<Input>();
        let mut commands: HashMap<String, AbortHandle> = HashMap::new();
        let mut measuring: HashMap<(u32, usize, usize), AbortHandle> = HashMap::new();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The load balancer's weights as last set (none yet: a restarted
        // coordinator sets them again), and the commands that wait for
        // weights it could not set yet.
        let mut weights: Option<super::balancer::Weights> = None;
        let mut held: Vec<engine::Send> = Vec::new();
        // The weights that could not be set (noted once each).
        let mut not_set: Option<super::balancer::Weights> = None;
        let mut input = first;
        loop {
            let before = rollout.clone();
            let mut sends = engine::handle(&mut rollout, self.registry.now_ms(), input);
            // Answers that arrived meanwhile are taken in before the one
            // write below: a batch of a hundred nodes answering costs a few
            // writes, not one per node. The engine is pure, so this is the
            // same as handling them one by one.
            for _ in 0..GROUP_INPUTS {
                if rollout.state.is_terminal() {
                    break;
                }
                match results.try_recv() {
                    Ok(next) => {
                        sends.extend(engine::handle(&mut rollout, self.registry.now_ms(), next))
                    }
                    Err(_) => break,
                }
            }
            if rollout.state.is_terminal() && !before.state.is_terminal() {
                // The balancer as the rollout found it, before the end is
                // stored: `deploy --wait` returns to servers that take
                // requests, and a crash in between does it again.
                if let Some(lb) = &rollout.load_balancer {
                    super::balancer::restore(lb, &self.registry, &rollout).await;
                    weights = super::balancer::desired(&rollout);
                }
                // The history first: once the terminal state is stored the
                // deploy lock is free, and the next deploy must find the
                // release this one made current. A crash in between only
                // redoes the end after the restart.
                if !self.finished(&rollout).await {
                    return abort_all(commands, measuring);
                }
            }
            if rollout != before {
                // Durable before anything it implies is sent.
                while let Err(error) = self.store.rollouts.put(&rollout).await {
                    tracing::error!(rollout = %rollout.id, %error, "cannot persist the rollout; retrying");
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return abort_all(commands, measuring),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                for entry in &rollout.timeline[before.timeline.len().min(rollout.timeline.len())..]
                {
                    self.record(&rollout, &entry.kind, &entry.node, entry.message.clone());
                }
                self.notifier.rollout_changed(&before, &rollout);
                if rollout.state.is_terminal() {
                    let holder = LockHolder::Rollout(rollout.id.clone());
                    // A deployment's rollouts run under its lock.
                    if rollout.deployment.is_empty() {
                        self.free_service(&rollout.env, &rollout.service, &holder)
                            .await;
                    }
                    if rollout.migration.is_some() {
                        let migrations = super::locks::migration_lock(&rollout.app);
                        self.free_service(&rollout.env, &migrations, &holder).await;
                    }
                }
                watch.send_replace(Arc::new(rollout.clone()));
            }
            if let Some(reply) = reply.take() {
                let _ = reply.send(rollout.clone());
            }
            let live: HashSet<&str> = rollout.commands_out().collect();
            commands.retain(|id, handle| {
                let keep = live.contains(id.as_str());
                if !keep {
                    handle.abort();
                }
                keep
            });
            // A canary split through the balancer: its weights first, then
            // the weight changes that raise its share (a proxy sends all to
            // the canary only once the balancer gives its node no more than
            // the canary's share). Everything else goes at once: a return
            // to stable never waits for HAProxy.
            held.retain(|send| live.contains(send.command.command_id.as_str()));
            let wanted = super::balancer::desired(&rollout);
            if let (Some(lb), Some(want)) = (&rollout.load_balancer, wanted) {
                if weights != Some(want) {
                    match super::balancer::apply_weights(lb, &self.registry, &rollout, want).await {
                        Ok(()) => weights = Some(want),
                        Err(error) if not_set != Some(want) => {
                            not_set = Some(want);
                            let message = format!("cannot set the {} weights in HAProxy ({error}); a weight change of the canary waits for them, tried again each second", lb.backend);
                            self.record(&rollout, "load_balancer", "", message);
                        }
                        Err(_) => {}
                    }
                }
            }
            let (wait, go): (Vec<_>, Vec<_>) = sends
                .into_iter()
                .chain(std::mem::take(&mut held))
                .partition(|send| super::balancer::raises_share(&send.command));
            let weighted = wanted.is_none() || weights == wanted;
            let sends = match weighted {
                true => go.into_iter().chain(wait).collect(),
                false => {
                    held = wait;
                    go
                }
            };
            for send in sends {
                let id = send.command.command_id.clone();
                let task = tokio::spawn(deliver(
                    self.registry.clone(),
                    self.secrets.clone(),
                    rollout.env.clone(),
                    rollout.load_balancer.clone(),
                    send,
                    results_tx.clone(),
                ));
                commands.insert(id, task.abort_handle());
            }
            self.measure(&rollout, &mut measuring, &results_tx);
            if rollout.state.is_terminal() {
                break;
            }
            // Biased, in this order: which of several ready inputs comes
            // first is then the same on every run, so a simulation seed
            // replays (`sim`); shutdown first so that it is prompt.
            input = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some((next, answer)) = control.recv() => {
                    reply = Some(answer);
                    next
                }
                Some(next) = results.recv() => next,
                _ = ticker.tick() => {
                    self.metrics.rollout_ticks.inc();
                    Input::Tick { nodes: self.observe(&rollout) }
                }
            };
        }
        abort_all(commands, measuring);
    }

    /// Takes the analysis measurements due (prometheus, web), each once:
    /// one still running is left to finish, one no longer due (the run
    /// moved on or ended) is stopped. Each answers as `Input::Measured`.
    fn measure(
        &self,
        rollout: &Rollout,
        measuring: &mut HashMap<(u32, usize, usize), AbortHandle>,
        results: &mpsc::UnboundedSender<Input>,
    ) {
        let due = match rollout.state.is_terminal() {
            true => Vec::new(),
            false => engine::external_due(rollout, self.registry.now_ms()),
        };
        let wanted: HashSet<(u32, usize, usize)> =
            due.iter().map(|d| (d.step, d.metric, d.sample)).collect();
        measuring.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for due in due {
            let key = (due.step, due.metric, due.sample);
            if measuring.contains_key(&key) {
                continue;
            }
            let results = results.clone();
            let (secrets, env) = (self.secrets.clone(), rollout.env.clone());
            let task = tokio::spawn(async move {
                let result = match header_secrets(&secrets, &env, &due.provider).await {
                    Ok(values) => crate::analysis::query::measure(&due.provider, &values).await,
                    Err(error) => Err(error),
                };
                let _ = results.send(Input::Measured {
                    step: due.step,
                    metric: due.metric,
                    sample: due.sample,
                    result,
                });
            });
            measuring.insert(key, task.abort_handle());
        }
    }

    fn observe(&self, rollout: &Rollout) -> Vec<Observation> {
        let wanted: HashSet<&str> = rollout.nodes.iter().map(|n| n.id.as_str()).collect();
        self.registry
            .list()
            .into_iter()
            .filter(|v| wanted.contains(v.record.id.as_str()))
            .map(|v| Observation {
                service: v
                    .record
                    .services
                    .iter()
                    .find(|s| s.service == rollout.service)
                    .map(|s| ServiceObservation {
                        release_id: s.release_id.clone(),
                        running: s.running,
                        healthy: s.healthy,
                        crashes: s.crashes,
                        detail: detail(&s.health_detail, &s.last_exit),
                        traffic: s.traffic.clone(),
                        side: s.side.as_ref().map(|side| SideObservation {
                            release_id: side.release_id.clone(),
                            running: side.running,
                            healthy: side.healthy,
                            crashes: side.crashes,
                            detail: detail(&side.health_detail, &side.last_exit),
                            traffic: side.traffic.clone(),
                        }),
                    }),
                node_id: v.record.id,
                // A node whose heartbeats stopped is as lost as a closed
                // connection (a partition can keep one open for a while).
                connected: v.connected && v.record.status == NodeStatus::Ready,
                last_seen_ms: v.record.services_at_ms,
            })
            .collect()
    }
}

/// A release's health as operators read it: the check's detail and how
/// it last exited.
fn detail(health: &str, last_exit: &str) -> String {
    match last_exit {
        "" => health.to_string(),
        exit => format!("{health} (last exit: {exit})"),
    }
}

/// What an agent's answer says, for the engine.
fn outcome_of(result: pb::CommandResult) -> Outcome {
    match (pb::CommandStatus::try_from(result.status), result.output) {
        (Ok(pb::CommandStatus::Succeeded), Some(pb::command_result::Output::Task(task))) => {
            Outcome::Task(TaskEnd {
                exit_code: task.exit_code,
                timed_out: task.timed_out,
                detail: task.detail,
                duration_ms: task.duration_ms,
            })
        }
        (Ok(pb::CommandStatus::Succeeded), _) => Outcome::Succeeded,
        (Ok(pb::CommandStatus::Unknown), _) => Outcome::Unknown(result.message),
        _ => Outcome::Failed(result.message),
    }
}

/// The values of the secrets a web measurement's headers name, read now
/// (a rotated secret counts from its rotation on).
async fn header_secrets(
    secrets: &Secrets,
    env: &str,
    provider: &crate::analysis::Provider,
) -> Result<BTreeMap<String, String>, String> {
    let crate::analysis::Provider::Web { headers, .. } = provider else {
        return Ok(BTreeMap::new());
    };
    let mut values = BTreeMap::new();
    for name in headers.values().filter_map(|v| v.secret()) {
        let value = secrets
            .current_value(env, name)
            .await
            .map_err(|e| format!("secret {name} of environment {env} for a header: {e}"))?;
        values.insert(name.to_string(), value);
    }
    Ok(values)
}

/// Fills the `secret_values` of an activation or a task from the secret
/// store.
async fn add_secret_values(
    secrets: &Secrets,
    env: &str,
    command: &mut pb::Command,
) -> Result<(), SecretError> {
    let (release, values) = match command.kind.as_mut() {
        Some(pb::command::Kind::Activate(activate)) => {
            (&activate.release, &mut activate.secret_values)
        }
        Some(pb::command::Kind::RunTask(task)) => (&task.release, &mut task.secret_values),
        Some(pb::command::Kind::StageRelease(stage)) => (&stage.release, &mut stage.secret_values),
        _ => return Ok(()),
    };
    let refs = release
        .as_ref()
        .map(|r| r.secrets.clone())
        .unwrap_or_default();
    *values = secrets.values_for(env, &refs).await?;
    Ok(())
}

/// Stops the command deliveries and measurements of a driver that ends.
fn abort_all(
    commands: HashMap<String, AbortHandle>,
    measuring: HashMap<(u32, usize, usize), AbortHandle>,
) {
    for handle in commands.values().chain(measuring.values()) {
        handle.abort();
    }
}

/// Sends one command to its node and reports the result, resending the same
/// id whenever the node was not connected or dropped before answering. The
/// engine decides when to give up (the command's deadline) and the driver
/// then aborts this task.
async fn deliver(
    registry: Arc<Registry>,
    secrets: Arc<Secrets>,
    env: String,
    lb: Option<crate::lb::LoadBalancer>,
    mut send: engine::Send,
    results: mpsc::UnboundedSender<Input>,
) {
    let command_id = send.command.command_id.clone();
    // Secret values join the command here, on its way out: the rollout
    // record (and anything else stored) holds only names and versions.
    if let Err(error) = add_secret_values(&secrets, &env, &mut send.command).await {
        let _ = results.send(Input::Result {
            command_id,
            outcome: Outcome::Failed(error.to_string()),
        });
        return;
    }
    // Out of the external load balancer before the command goes, back in
    // before its result is taken in: a restart in between resends the
    // command, and this again.
    let lb = lb.filter(|_| super::balancer::drains(&send.command));
    let mut drained = None;
    if let Some(lb) = &lb {
        let server = super::balancer::leave(lb, &registry, &send.node_id, &send.node_name).await;
        drained = Some((lb, server));
    }
    loop {
        match registry.send_command(&send.node_id, send.command.clone()) {
            Ok(pending) => {
                let progress = results.clone();
                let id = command_id.clone();
                // Resent now and then while waiting: a result the agent
                // could not send (its queue full) is replayed from its
                // journal; a command still running is not run twice.
                let waited = pending
                    .wait(RESEND_EVERY, |step| {
                        let _ = progress.send(Input::Progress {
                            command_id: id.clone(),
                            step: step.step,
                            message: step.message,
                        });
                    })
                    .await;
                if let Ok(result) = waited {
                    if let Some((lb, server)) = &drained {
                        super::balancer::come_back(
                            lb,
                            &registry,
                            &send.node_id,
                            &send.node_name,
                            server,
                        )
                        .await;
                    }
                    let outcome = outcome_of(result);
                    let _ = results.send(Input::Result {
                        command_id,
                        outcome,
                    });
                    return;
                }
            }
            Err(RegistryError::UnknownNode(_)) => {
                let _ = results.send(Input::Result {
                    command_id,
                    outcome: Outcome::Failed(format!(
                        "node {} is no longer registered",
                        send.node_name
                    )),
                });
                return;
            }
            Err(error) => {
                tracing::debug!(node = %send.node_name, %error, "command not delivered yet; will resend");
            }
        }
        tokio::time::sleep(RESEND_DELAY).await;
    }
}
