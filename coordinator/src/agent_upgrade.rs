//! Fleet-wide agent upgrades (`cutover agents upgrade`): an agent artifact
//! from the coordinator's store rolled across every node like a release.
//!
//! Every node first fetches the artifact and proves its binary runs there
//! (`prepare_agent`): one that cannot stops the upgrade before any agent
//! changed. Then, batch by batch, each agent hands its node to the new
//! binary (`upgrade_agent`, the handoff of a planned restart: no request
//! fails) on probation; once the new agent is back with the new build and
//! every release it found serving still serves, healthy, it is committed
//! (`commit_agent`). One that is not back healthy within the deadline is
//! never committed, hands the node back to its previous agent by itself,
//! and the upgrade stops there.
//!
//! The upgrade lives in this coordinator's memory: one that restarts
//! mid-way ends it, and the agents on probation return to their previous
//! binaries when their probation runs out (nothing is committed without
//! the coordinator's word).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::registry::{agent_label, CommandWaitError, Registry};
use crate::store::NewEvent;
use crate::strategy::BatchSize;

/// How long a node's new agent has to come back healthy unless told.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// How long fetching and checking the artifact may take on a node.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a node has to answer a commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long past the deadline a node that failed is watched for its
/// return to the previous agent (a handoff back, within its settle time).
const RETURN_WAIT: Duration = Duration::from_secs(90);
/// How long past the deadline a new agent's probation lasts: the time its
/// commit has to arrive once it was found healthy by the deadline.
fn commit_margin(deadline: Duration) -> Duration {
    (deadline / 4).clamp(Duration::from_secs(2), Duration::from_secs(30))
}

/// How often a node's state is looked at while waiting for it.
const POLL: Duration = Duration::from_millis(200);
const CAPABILITY: &str = "command.upgrade_agent";

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub digest: String,
    pub batch: BatchSize,
    pub deadline: Duration,
}

/// The upgrades of this coordinator: one runs at a time.
pub struct AgentUpgrades {
    registry: Arc<Registry>,
    running: Mutex<Option<String>>,
}

pub type Events = mpsc::UnboundedReceiver<pb::AgentUpgradeEvent>;

/// Says how the upgrade goes: to the caller (while it listens) and to
/// the event log.
struct Reporter {
    id: String,
    registry: Arc<Registry>,
    events: mpsc::UnboundedSender<pb::AgentUpgradeEvent>,
}

impl Reporter {
    fn say(&self, node: &str, step: &str, message: String) {
        tracing::info!(upgrade = %self.id, node, step, "{message}");
        self.registry.journal().event(NewEvent {
            kind: "agent_upgrade",
            node_id: String::new(),
            node_name: node.to_string(),
            message: format!("{} {step}: {message}", self.id),
        });
        let _ = self.events.send(pb::AgentUpgradeEvent {
            upgrade_id: self.id.clone(),
            node: node.to_string(),
            step: step.to_string(),
            message,
        });
    }
}

impl AgentUpgrades {
    pub fn new(registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            registry,
            running: Mutex::new(None),
        })
    }

    /// The upgrade running now, if any.
    pub fn running(&self) -> Option<String> {
        self.running.lock().expect("upgrades lock").clone()
    }

    /// Checks the fleet can take `plan` (every node connected and able to),
    /// then starts it; its events. `rollouts` are the rollouts running
    /// now: their commands would wait on the handoffs.
    pub fn start(
        self: &Arc<Self>,
        plan: Plan,
        rollouts: &[crate::rollout::Running],
    ) -> Result<Events, String> {
        if let Some(first) = rollouts.first() {
            return Err(format!(
                "rollout {} is running; upgrade the agents once it ended (`cutover rollouts`)",
                first.id
            ));
        }
        let nodes = self.registry.list();
        if nodes.is_empty() {
            return Err("no node has registered; there is no agent to upgrade".into());
        }
        let unreachable: Vec<&str> = nodes
            .iter()
            .filter(|n| !n.connected)
            .map(|n| n.record.name.as_str())
            .collect();
        if !unreachable.is_empty() {
            return Err(format!(
                "nodes {} are not connected; bring their agents back, or revoke nodes that are gone (`cutover nodes revoke NODE`), then upgrade",
                unreachable.join(", ")
            ));
        }
        let unable: Vec<String> = nodes
            .iter()
            .filter(|n| !n.record.capabilities.iter().any(|c| c == CAPABILITY))
            .map(|n| format!("{} (agent {})", n.record.name, n.record.agent_version))
            .collect();
        if !unable.is_empty() {
            return Err(format!(
                "agents on {} cannot take fleet upgrades; upgrade them once on their node (`cutover-agent upgrade --binary NEW`)",
                unable.join(", ")
            ));
        }
        let id = format!(
            "agent-upgrade.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        {
            let mut running = self.running.lock().expect("upgrades lock");
            if let Some(other) = running.as_ref() {
                return Err(format!(
                    "agent upgrade {other} is running; wait for it to end (`cutover events`)"
                ));
            }
            *running = Some(id.clone());
        }
        let (events, received) = mpsc::unbounded_channel();
        let reporter = Reporter {
            id: id.clone(),
            registry: self.registry.clone(),
            events,
        };
        let names: Vec<String> = nodes.into_iter().map(|n| n.record.name).collect();
        let this = self.clone();
        tokio::spawn(async move {
            reporter.say(
                "",
                "started",
                format!(
                    "agent build {} on {} nodes, {} at a time, {} each to come back healthy",
                    plan.digest,
                    names.len(),
                    plan.batch.nodes(names.len()),
                    humantime::format_duration(plan.deadline)
                ),
            );
            match this.run(&plan, &names, &reporter).await {
                Ok(upgraded) => reporter.say(
                    "",
                    "done",
                    format!(
                        "{upgraded} of {} agents upgraded to build {}",
                        names.len(),
                        plan.digest
                    ),
                ),
                Err(why) => reporter.say("", "failed", why),
            }
            *this.running.lock().expect("upgrades lock") = None;
        });
        Ok(received)
    }

    /// The whole upgrade: the agents it upgraded, or why it stopped.
    async fn run(
        &self,
        plan: &Plan,
        nodes: &[String],
        reporter: &Reporter,
    ) -> Result<usize, String> {
        let prepared = futures_util::future::join_all(
            nodes.iter().map(|node| self.prepare(node, plan, reporter)),
        )
        .await;
        let failed: Vec<String> = prepared.into_iter().filter_map(Result::err).collect();
        if !failed.is_empty() {
            return Err(format!(
                "no agent changed: {}; fix the artifact or the nodes and upgrade again",
                failed.join("; ")
            ));
        }
        let mut todo = Vec::new();
        for node in nodes {
            match self.build_of(node) {
                Some(build) if build == plan.digest => {
                    reporter.say(node, "skipped", "already runs this build".into());
                }
                _ => todo.push(node.clone()),
            }
        }
        let size = plan.batch.nodes(nodes.len());
        let mut upgraded = 0;
        for batch in todo.chunks(size) {
            let results = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|node| self.upgrade_node(node, plan, reporter)),
            )
            .await;
            let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
            upgraded += batch.len() - failed.len();
            if !failed.is_empty() {
                let left = todo.len() - upgraded - failed.len();
                return Err(format!(
                    "{}; the upgrade stopped: {upgraded} upgraded, {left} not started",
                    failed.join("; ")
                ));
            }
        }
        Ok(upgraded)
    }

    async fn prepare(&self, node: &str, plan: &Plan, reporter: &Reporter) -> Result<(), String> {
        let command = pb::command::Kind::PrepareAgent(pb::PrepareAgent {
            artifact: Some(pb::Artifact {
                url: "coordinator:".into(),
                digest: plan.digest.clone(),
            }),
        });
        match self
            .command(node, "prepare", command, PREPARE_TIMEOUT)
            .await
        {
            Ok(Some(pb::command_result::Output::AgentBinary(binary))) => {
                reporter.say(
                    node,
                    "prepared",
                    format!("agent {} fetched and runs", binary.version),
                );
                Ok(())
            }
            Ok(_) => Err(format!("{node}: the agent did not say what it prepared")),
            Err(why) => Err(format!("{node} cannot prepare it: {why}")),
        }
    }

    /// One node: the handoff on probation, the wait for the new agent to
    /// come back healthy, the commit; or why not (the node then returns
    /// to its previous agent by itself).
    async fn upgrade_node(
        &self,
        node: &str,
        plan: &Plan,
        reporter: &Reporter,
    ) -> Result<(), String> {
        let serving = self.serving(node);
        let deadline = tokio::time::Instant::now() + plan.deadline;
        reporter.say(
            node,
            "handing_over",
            format!(
                "from agent {}; {} release(s) serving to find again",
                self.label_of(node),
                serving.len()
            ),
        );
        let command = pb::command::Kind::UpgradeAgent(pb::UpgradeAgent {
            digest: plan.digest.clone(),
            probation_ms: (plan.deadline + commit_margin(plan.deadline)).as_millis() as u64,
        });
        match self.command(node, "upgrade", command, plan.deadline).await {
            // The session ends as the new agent takes over: the answer
            // may not make it.
            Ok(_) | Err(Failure::Disconnected) => {}
            Err(Failure::Said(why)) => return Err(format!("{node} did not hand over: {why}")),
            Err(why) => {
                return Err(format!("{node} did not hand over: {why}"));
            }
        }
        // The record keeps the old agent's last report until the new one
        // sends its own: only a heartbeat after the new build was seen
        // connected counts.
        let mut seen_at: Option<i64> = None;
        let why = loop {
            if seen_at.is_none() && self.build_of(node).as_deref() == Some(plan.digest.as_str()) {
                seen_at = Some(self.registry.now_ms());
            }
            let state = self.state(node, plan, seen_at.unwrap_or(i64::MAX), &serving);
            if tokio::time::Instant::now() >= deadline {
                break state.err().unwrap_or_else(|| "no commit in time".into());
            }
            if state.is_ok() {
                let until = deadline + commit_margin(plan.deadline) / 2;
                match self.commit(node, plan, until).await {
                    Ok(_) => {
                        reporter.say(
                            node,
                            "upgraded",
                            format!("agent {} serves", self.label_of(node)),
                        );
                        return Ok(());
                    }
                    Err(why) => break format!("the commit failed: {why}"),
                }
            }
            tokio::time::sleep(POLL).await;
        };
        let failure = format!(
            "the new agent on {node} did not come back healthy within {} ({why})",
            humantime::format_duration(plan.deadline)
        );
        reporter.say(
            node,
            "failed",
            format!("{failure}; it returns to its previous agent"),
        );
        self.await_return(node, plan, reporter).await;
        Err(failure)
    }

    /// Commits the node's new agent, asking again (it is idempotent) while
    /// an answer is lost, until `until`: well before the agent's
    /// probation ends.
    async fn commit(
        &self,
        node: &str,
        plan: &Plan,
        until: tokio::time::Instant,
    ) -> Result<(), Failure> {
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Failure::Said("no answer to the commit in time".into()));
            }
            let commit = pb::command::Kind::CommitAgent(pb::CommitAgent {
                digest: plan.digest.clone(),
            });
            match self
                .command(node, "commit", commit, COMMIT_TIMEOUT.min(left))
                .await
            {
                Ok(_) => return Ok(()),
                Err(Failure::Said(why)) => return Err(Failure::Said(why)),
                Err(lost) => {
                    tracing::warn!(node, error = %lost, "no answer to the commit; asking again");
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Reports when the node is back on an agent of another build (its
    /// probation ran out), or that it is not yet.
    async fn await_return(&self, node: &str, plan: &Plan, reporter: &Reporter) {
        let until = tokio::time::Instant::now() + RETURN_WAIT;
        while tokio::time::Instant::now() < until {
            let back = self
                .registry
                .list()
                .into_iter()
                .find(|n| n.record.name == node)
                .filter(|n| n.connected && n.record.agent_build != plan.digest);
            if let Some(view) = back {
                reporter.say(
                    node,
                    "returned",
                    format!(
                        "back on agent {}",
                        agent_label(&view.record.agent_version, &view.record.agent_build)
                    ),
                );
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        reporter.say(
            node,
            "returned",
            format!(
                "not back on its previous agent within {}; see the agent's log on the node (journalctl -u cutover-agent)",
                humantime::format_duration(RETURN_WAIT)
            ),
        );
    }

    /// Whether the node runs the new build and serves what it served
    /// before, healthy, in a heartbeat received after `since_ms`; or what
    /// is missing.
    fn state(
        &self,
        node: &str,
        plan: &Plan,
        since_ms: i64,
        serving: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let view = self
            .registry
            .list()
            .into_iter()
            .find(|n| n.record.name == node)
            .ok_or_else(|| "the node is no longer registered".to_string())?;
        if !view.connected {
            return Err("its agent is not connected".into());
        }
        if view.record.agent_build != plan.digest {
            return Err(format!(
                "agent {} is connected, not the new build",
                agent_label(&view.record.agent_version, &view.record.agent_build)
            ));
        }
        if view.record.services_at_ms <= since_ms {
            return Err("no heartbeat from the new agent yet".into());
        }
        for (service, release) in serving {
            let found = view.record.services.iter().find(|s| &s.service == service);
            match found {
                Some(s) if &s.release_id == release && s.running && s.healthy => {}
                Some(s) if &s.release_id != release => {
                    return Err(format!(
                        "{service} serves {} instead of {release}",
                        s.release_id
                    ))
                }
                Some(s) => {
                    return Err(format!(
                        "{service} {release} is not healthy: {}",
                        if s.health_detail.is_empty() {
                            "not running"
                        } else {
                            &s.health_detail
                        }
                    ))
                }
                None => return Err(format!("{service} is not reported")),
            }
        }
        Ok(())
    }

    /// The releases the node serves healthy now, by service: what the new
    /// agent must serve too.
    fn serving(&self, node: &str) -> BTreeMap<String, String> {
        self.registry
            .list()
            .into_iter()
            .find(|n| n.record.name == node)
            .map(|n| {
                n.record
                    .services
                    .into_iter()
                    .filter(|s| s.running && s.healthy && !s.release_id.is_empty())
                    .map(|s| (s.service, s.release_id))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn build_of(&self, node: &str) -> Option<String> {
        self.registry
            .list()
            .into_iter()
            .find(|n| n.record.name == node)
            .map(|n| n.record.agent_build)
    }

    fn label_of(&self, node: &str) -> String {
        self.registry
            .list()
            .into_iter()
            .find(|n| n.record.name == node)
            .map(|n| agent_label(&n.record.agent_version, &n.record.agent_build))
            .unwrap_or_default()
    }

    /// Sends one command and waits for its answer: the output of a success.
    async fn command(
        &self,
        node: &str,
        what: &str,
        kind: pb::command::Kind,
        timeout: Duration,
    ) -> Result<Option<pb::command_result::Output>, Failure> {
        let command = pb::Command {
            command_id: format!("agent-{what}.{}", uuid::Uuid::new_v4()),
            kind: Some(kind),
        };
        let pending = self
            .registry
            .send_command(node, command)
            .map_err(|e| Failure::Send(e.to_string()))?;
        let result = pending.wait(timeout, |_| {}).await.map_err(|e| match e {
            CommandWaitError::Disconnected => Failure::Disconnected,
            CommandWaitError::TimedOut(_) => Failure::NoAnswer(e.to_string()),
        })?;
        match pb::CommandStatus::try_from(result.status) {
            Ok(pb::CommandStatus::Succeeded) => Ok(result.output),
            _ => Err(Failure::Said(result.message)),
        }
    }
}

#[derive(Debug)]
enum Failure {
    Send(String),
    Disconnected,
    NoAnswer(String),
    Said(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Send(why) | Failure::Said(why) | Failure::NoAnswer(why) => f.write_str(why),
            Failure::Disconnected => f.write_str("the node disconnected before answering"),
        }
    }
}
