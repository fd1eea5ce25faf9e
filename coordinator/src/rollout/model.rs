//! A rollout as it is stored: everything the engine needs to carry on after
//! a coordinator restart lives in here.

use cutover_proto::v1 as pb;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::hooks::{Hook, HookAt};
use crate::migration::{Migration, When};
use crate::notify::spec::NotifyTarget;
use crate::strategy::{Strategy, StrategyKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Pending,
    Running,
    Paused,
    /// Stopped until the operator decides: a run-once command's outcome is
    /// not known (`cutover rollout retry` or `abort`).
    Held,
    Succeeded,
    Failed,
    RollingBack,
    RolledBack,
    Aborted,
    /// Created, nothing sent: waits for approvals (`Rollout::approval`).
    AwaitingApproval,
}

impl RolloutState {
    /// As operators see it: the wire enum's name (see `rollout::states`).
    pub fn as_str(self) -> &'static str {
        pb::RolloutState::from(self).as_str()
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Failed
                | RolloutState::RolledBack
                | RolloutState::Aborted
        )
    }
}

/// Who the rollouts the converger starts are by, in events and the audit
/// of history (see `rollout::converge`).
pub const CONVERGER: &str = "converger";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    Deploy,
    Rollback,
    /// Nodes that drifted from their environment's current release,
    /// brought back to it (see `rollout::converge`).
    Converge,
    /// `cutover service stop`: every node drains and stops the service,
    /// which keeps its current release for `cutover service start`.
    Stop,
    /// `cutover service remove`: a stop after which the nodes forget the
    /// service and it has no current release.
    Remove,
}

impl RolloutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::Deploy => "deploy",
            RolloutKind::Rollback => "rollback",
            RolloutKind::Converge => "converge",
            RolloutKind::Stop => "stop",
            RolloutKind::Remove => "remove",
        }
    }

    /// Whether it leaves the service running nothing (see
    /// `rollout::stopping`).
    pub fn stops(self) -> bool {
        matches!(self, RolloutKind::Stop | RolloutKind::Remove)
    }
}

/// Where one node is in the rollout. States ending in -ing have a command
/// in flight (`RolloutNode::command_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Waiting for its prepare.
    Pending,
    Preparing,
    /// Has the release on disk; waits for its batch.
    Prepared,
    /// Its cutover runs (out of the load balancer meanwhile when
    /// `max_unavailable > 0`).
    Activating,
    /// Serves the new release.
    Switched,
    /// Already ran the release when the rollout started.
    Unchanged,
    Failed,
    RollingBack,
    RolledBack,
    /// A canary node starting the release beside the stable one.
    Staging,
    /// A canary node: the release runs beside the stable one and gets the
    /// node's `weight`.
    Canary,
    /// A canary node changing its weight.
    Weighting,
    /// Its release drains and stops (a stop or removal of the service).
    Stopping,
    /// Runs nothing of the service.
    Stopped,
}

impl NodeState {
    /// As operators see it: the wire enum's name (see `rollout::states`).
    pub fn as_str(self) -> &'static str {
        pb::RolloutNodeState::from(self).as_str()
    }

    pub fn in_flight(self) -> bool {
        matches!(
            self,
            NodeState::Preparing
                | NodeState::Activating
                | NodeState::RollingBack
                | NodeState::Staging
                | NodeState::Weighting
                | NodeState::Stopping
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutNode {
    pub id: String,
    pub name: String,
    pub state: NodeState,
    /// The release the node serves as far as the rollout knows; empty for
    /// none.
    pub release: String,
    /// What it served when the rollout started.
    pub from_release: String,
    pub batch: Option<u32>,
    /// The command in flight, resent as is after a coordinator restart (the
    /// agent runs an id once).
    pub command_id: Option<String>,
    pub command_deadline_ms: i64,
    /// The agent's last reported step of the command in flight.
    pub step: String,
    pub detail: String,
    pub switched_at_ms: i64,
    /// A heartbeat sent after the switch showed the new release healthy.
    pub seen_healthy: bool,
    /// Since when the node has been disconnected, while it serves the new
    /// release.
    pub lost_since_ms: Option<i64>,
    /// The node's command timed out: it may or may not have switched, so a
    /// rollback includes it.
    pub uncertain: bool,
    /// Runs the canary beside the stable release (a canary rollout).
    #[serde(default)]
    pub canary: bool,
    /// A canary node: percent of its requests the canary gets, as the
    /// agent last confirmed.
    #[serde(default)]
    pub weight: u32,
    /// Its agent refused the release it was to return to (it cannot start
    /// there): it serves what it served, and the converger leaves it so
    /// until the service's next rollout.
    #[serde(default)]
    pub refused: bool,
}

impl RolloutNode {
    /// A node as a rollout starts with it: serving `from_release` (empty:
    /// nothing), `unchanged` when that already is the rollout's release.
    pub fn new(id: String, name: String, from_release: String, unchanged: bool) -> Self {
        Self {
            id,
            name,
            state: if unchanged {
                NodeState::Unchanged
            } else {
                NodeState::Pending
            },
            release: from_release.clone(),
            from_release,
            batch: None,
            command_id: None,
            command_deadline_ms: 0,
            step: String::new(),
            detail: String::new(),
            switched_at_ms: 0,
            seen_healthy: false,
            lost_since_ms: None,
            uncertain: false,
            canary: false,
            weight: 0,
            refused: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutError {
    /// Empty when the rollout as a whole failed (its deadline).
    pub node: String,
    pub step: String,
    pub message: String,
}

impl std::fmt::Display for RolloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.node.as_str() {
            "" => write!(f, "{}: {}", self.step, self.message),
            node => write!(f, "node {node}, step {}: {}", self.step, self.message),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at_ms: i64,
    pub kind: String,
    pub node: String,
    pub message: String,
}

/// What a rollout does, in order; the engine runs one step after the
/// other, each in a module of its own (`engine::steps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Every node fetches and unpacks the release, nothing switches.
    Prepare,
    /// The app's migration runs once, on one node, with the release
    /// (`engine/migrate.rs`).
    Migrate,
    /// The strategy moves the nodes to the release (batches, for rolling).
    Cutover,
    /// The spec's hooks at this point run once, on one node, in order
    /// (`engine/hooks.rs`).
    Hooks(HookAt),
    /// A rollback's fast path, its only step: every node returns to a
    /// release that ran there, all at once, each health-gated by its
    /// agent, without batches or watches (`engine/fast.rs`).
    Return,
    /// A stop or removal's only step: every node drains and stops the
    /// service (`engine/stop.rs`).
    Stop,
}

/// The steps of a rollout stored before they were recorded.
pub fn default_steps() -> Vec<Step> {
    vec![Step::Prepare, Step::Cutover]
}

/// A rollout's steps: with a migration, before or after the cutover; with
/// hooks, before the migration and after everything. `on_failure` hooks
/// are not a step: they run when a failed rollout ends.
pub fn steps_for(migration: Option<&Migration>, hooks: &[Hook]) -> Vec<Step> {
    let has = |at: HookAt| hooks.iter().any(|h| h.at == at);
    let mut steps = vec![Step::Prepare];
    if has(HookAt::PreDeploy) {
        steps.push(Step::Hooks(HookAt::PreDeploy));
    }
    match migration.map(|m| m.when) {
        None => steps.push(Step::Cutover),
        Some(When::Before) => steps.extend([Step::Migrate, Step::Cutover]),
        Some(When::After) => steps.extend([Step::Cutover, Step::Migrate]),
    }
    if has(HookAt::PostDeploy) {
        steps.push(Step::Hooks(HookAt::PostDeploy));
    }
    steps
}

/// Where a rollout is: in one of its steps (a strategy's cutover has
/// phases of its own), rolling back, or done. Stored as it was before
/// steps had names, so a rollout running across an upgrade resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Prepare,
    Migrate,
    Hooks(HookAt),
    /// The fast path of a rollback (`Step::Return`).
    Return,
    /// A stop or removal (`Step::Stop`).
    Stop,
    RollingBack,
    Done,
    /// The canary strategy before its promotion (which is rolling's
    /// batches).
    Canary(CanaryPhase),
    #[serde(untagged)]
    Rolling(RollingPhase),
}

/// Where a canary is in its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryPhase {
    /// The canary nodes start the release beside the stable one.
    Staging,
    /// Step `index` of the strategy's plan; `since_ms` once it began (a
    /// requested pause waits for a step that has not).
    Step { index: u32, since_ms: Option<i64> },
}

/// The rolling strategy's cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollingPhase {
    Batch(u32),
    /// Every node of the batch switched; it must stay healthy until then.
    Watch {
        batch: u32,
        until_ms: i64,
    },
}

/// Commands run once each, in order, on one node (a migration's, the
/// hooks at one point): where they run, which one is out, what they
/// printed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRun {
    /// The node they run on, chosen when the step starts.
    pub node_id: String,
    pub node_name: String,
    /// Index of the command out (or next).
    pub next: usize,
    /// The command out, under this id: resent as is after a restart, and
    /// the agent runs an id once.
    pub command_id: Option<String>,
    pub deadline_ms: i64,
    /// The tail of what the commands printed.
    pub output: String,
    /// Output lines put in the timeline so far (a bounded number).
    pub lines_noted: u32,
    /// The command out when its outcome turned out unknown: the rollout is
    /// held until the operator retries (a new id) or aborts.
    #[serde(default)]
    pub unknown: bool,
}

/// A rollout's migration step as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRun {
    pub plan: Migration,
    #[serde(flatten)]
    pub run: TaskRun,
    /// The migration itself (not a check) went out: whatever came of it,
    /// the schema may have changed.
    #[serde(default)]
    pub sent: bool,
    /// What the migration printed (its tail), once it exited 0.
    #[serde(default)]
    pub summary: String,
    /// How long the migration ran.
    #[serde(default)]
    pub duration_ms: u64,
    /// What `schema_command` printed after the migration (its tail).
    #[serde(default)]
    pub schema: Option<String>,
}

impl MigrationRun {
    /// Every command, the migration last, exited 0.
    pub fn ran(&self) -> bool {
        self.run.next >= self.plan.commands.len()
    }
}

/// The run-once hooks at one point as they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    pub at: HookAt,
    /// In the spec's order.
    pub hooks: Vec<Hook>,
    #[serde(flatten)]
    pub run: TaskRun,
}

impl Phase {
    /// The step this phase belongs to; `None` rolling back or done.
    pub fn step(self) -> Option<Step> {
        match self {
            Phase::Prepare => Some(Step::Prepare),
            Phase::Migrate => Some(Step::Migrate),
            Phase::Hooks(at) => Some(Step::Hooks(at)),
            Phase::Return => Some(Step::Return),
            Phase::Stop => Some(Step::Stop),
            Phase::Rolling(_) | Phase::Canary(_) => Some(Step::Cutover),
            Phase::RollingBack | Phase::Done => None,
        }
    }
}

/// A release, stored as its protobuf encoding: the wire type is the one
/// definition of a release, and prost decoding tolerates fields added later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StoredRelease(pub pb::Release);

impl TryFrom<String> for StoredRelease {
    type Error = String;
    fn try_from(hex: String) -> Result<Self, String> {
        if !hex.len().is_multiple_of(2) {
            return Err("odd hex length".into());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
            .collect::<Result<Vec<u8>, String>>()?;
        pb::Release::decode(bytes.as_slice())
            .map(StoredRelease)
            .map_err(|e| e.to_string())
    }
}

impl From<StoredRelease> for String {
    fn from(release: StoredRelease) -> String {
        release
            .0
            .encode_to_vec()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl StoredRelease {
    /// What names the release (id, service, version, artifact or image),
    /// without what only a node needs to run it (environment, command,
    /// checks): the form a finished rollout keeps.
    pub fn summary(&self) -> StoredRelease {
        let release = &self.0;
        StoredRelease(pb::Release {
            release_id: release.release_id.clone(),
            service: release.service.clone(),
            version: release.version.clone(),
            artifact: release.artifact.clone(),
            container: release.container.as_ref().map(|c| pb::Container {
                image: c.image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub fn id(&self) -> &str {
        &self.0.release_id
    }
    pub fn version(&self) -> &str {
        &self.0.version
    }
    /// The artifact's digest, or the image's.
    pub fn digest(&self) -> &str {
        match (&self.0.artifact, &self.0.container) {
            (Some(artifact), _) => &artifact.digest,
            (None, Some(container)) => container
                .image
                .rsplit_once('@')
                .map_or("", |(_, digest)| digest),
            (None, None) => "",
        }
    }
    /// `REPO@sha256:...` for a docker release, empty otherwise.
    pub fn image(&self) -> &str {
        self.0.container.as_ref().map_or("", |c| c.image.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub app: String,
    pub env: String,
    pub service: String,
    pub kind: RolloutKind,
    pub state: RolloutState,
    /// The plan, fixed when the rollout is created.
    #[serde(default = "default_steps")]
    pub steps: Vec<Step>,
    /// The app's migration, for a deploy of the service that runs it.
    #[serde(default)]
    pub migration: Option<MigrationRun>,
    /// The spec's run-once hooks, by point.
    #[serde(default)]
    pub hooks: Vec<HookRun>,
    /// A failed rollout's end, kept while its `on_failure` hooks run.
    #[serde(default)]
    pub ending: Option<(RolloutState, String)>,
    /// When the rollout was held (`RolloutState::Held`).
    #[serde(default)]
    pub held_at_ms: Option<i64>,
    pub phase: Phase,
    pub release: StoredRelease,
    /// What a failure returns switched nodes to; `None` on a first deploy,
    /// where they stop serving the service instead.
    pub previous: Option<StoredRelease>,
    pub strategy: Strategy,
    pub nodes: Vec<RolloutNode>,
    /// Nodes the selector matched but that were unreachable at the start and
    /// skipped on the operator's word (`--allow-unreachable`).
    pub skipped: Vec<String>,
    pub batch_size: u32,
    pub batches: u32,
    pub deadline_ms: i64,
    pub paused_at_ms: Option<i64>,
    /// Until then a disconnected node does not count as lost (agents
    /// reconnecting after a coordinator restart).
    #[serde(default)]
    pub lost_grace_until_ms: i64,
    /// A node with a command in flight counts as lost once out of reach
    /// this long (or its release's healthy_deadline, if longer): long
    /// enough for an agent to reconnect after a blip (twice the
    /// coordinator's heartbeat_ttl), short of the command's own timeout.
    #[serde(default)]
    pub node_lost_after_ms: u64,
    pub pause_requested: bool,
    pub abort_requested: bool,
    /// A canary skips its remaining steps once nothing is in flight.
    #[serde(default)]
    pub promote_full: bool,
    /// It set out to return its nodes, after a failure (auto_rollback or
    /// not: a canary before its promotion always does) or on a canary's
    /// abort: what it left is no operator's choice, the converger finishes
    /// the job.
    #[serde(default)]
    pub returning: bool,
    /// A failure without auto_rollback: its rollback returns the canary
    /// nodes only, switched nodes stay.
    #[serde(default)]
    pub keep_switched: bool,
    pub error: Option<RolloutError>,
    /// Nodes whose return to the previous release failed.
    pub rollback_failures: Vec<RolloutError>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// Command ids are `<prefix>.<n>`; the prefix holds a random part, so
    /// a coordinator whose store was wiped cannot reuse an id an agent
    /// remembers and get an old result replayed.
    pub command_prefix: String,
    pub next_command: u64,
    pub timeline: Vec<TimelineEntry>,
    /// The deployment this rollout is a step of (see `rollout::deployment`);
    /// empty for a deploy of one service.
    #[serde(default)]
    pub deployment: String,
    /// The webhooks of its events, fixed when it is created.
    #[serde(default)]
    pub notify: Vec<NotifyTarget>,
    /// A canary's analysis runs, one per analysis step begun.
    #[serde(default)]
    pub analysis: Vec<crate::analysis::run::AnalysisRun>,
    /// The fresh backups its deploy required (`require_backup`), checked
    /// again by a retry.
    #[serde(default)]
    pub backup_gates: Vec<crate::jobs::recovery::RequireBackup>,
    /// The external load balancer its nodes leave while drained (see
    /// `lb`).
    #[serde(default)]
    pub load_balancer: Option<crate::lb::LoadBalancer>,
    /// A canary on some of the nodes behind `load_balancer`: each step's
    /// weight is the fleet's share, which the balancer's weights give the
    /// canary nodes, whose proxies send all their requests to the canary
    /// (see `rollout::balancer`). Without it the proxies split.
    #[serde(default)]
    pub balancer_split: bool,
    /// The approvals it waits for before it starts (the environment's
    /// `approvals`); `None` when it needs none.
    #[serde(default)]
    pub approval: Option<Approval>,
}

/// A rollout's request for approval: it starts once `required` operators
/// other than its requester approved, and ends aborted when one rejects
/// it or at `expires_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub required: u32,
    pub expires_at_ms: i64,
    pub approvals: Vec<Decision>,
    pub rejected: Option<Decision>,
}

/// An operator's approval or rejection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub by: String,
    pub comment: String,
    pub at_ms: i64,
}

impl Approval {
    pub fn granted(&self) -> bool {
        self.approvals.len() as u32 >= self.required
    }
}

/// What a new rollout is made of; `Rollout::new` sets the rest (pending,
/// no command sent yet, batches from the nodes that need the release).
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub migration: Option<Migration>,
    /// The run-once hooks (`pre_deploy`, `post_deploy`, `on_failure`).
    pub hooks: Vec<Hook>,
    pub id: String,
    pub app: String,
    pub env: String,
    pub service: String,
    pub kind: RolloutKind,
    pub release: StoredRelease,
    pub previous: Option<StoredRelease>,
    pub strategy: Strategy,
    pub nodes: Vec<RolloutNode>,
    pub skipped: Vec<String>,
    pub command_prefix: String,
    pub node_lost_after_ms: u64,
    pub created_by: String,
    pub created_at_ms: i64,
    pub deployment: String,
    pub notify: Vec<NotifyTarget>,
}

/// The hooks grouped by point, each group in the spec's order.
fn hook_runs(hooks: Vec<Hook>) -> Vec<HookRun> {
    let mut runs: Vec<HookRun> = Vec::new();
    for hook in hooks {
        match runs.iter_mut().find(|r| r.at == hook.at) {
            Some(run) => run.hooks.push(hook),
            None => runs.push(HookRun {
                at: hook.at,
                hooks: vec![hook],
                run: TaskRun::default(),
            }),
        }
    }
    runs
}

impl Rollout {
    pub fn new(new: NewRollout) -> Self {
        let targets = new
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Pending)
            .count();
        // A canary's nodes are its first batch; the others follow in the
        // promotion's batches.
        let (batch_size, batches) = match &new.strategy.kind {
            StrategyKind::Rolling(rolling) => {
                let size = rolling.batch.nodes(targets);
                (size, targets.div_ceil(size))
            }
            StrategyKind::Canary(canary) | StrategyKind::BlueGreen(canary) => {
                let canaries = canary.canary_nodes.nodes(targets).min(targets);
                let rest = targets - canaries;
                let size = canary.promotion.batch.nodes(rest);
                (size, usize::from(canaries > 0) + rest.div_ceil(size))
            }
        };
        Rollout {
            id: new.id,
            app: new.app,
            env: new.env,
            service: new.service,
            kind: new.kind,
            state: RolloutState::Pending,
            steps: steps_for(new.migration.as_ref(), &new.hooks),
            migration: new.migration.map(|plan| MigrationRun {
                plan,
                run: TaskRun::default(),
                sent: false,
                summary: String::new(),
                duration_ms: 0,
                schema: None,
            }),
            hooks: hook_runs(new.hooks),
            ending: None,
            held_at_ms: None,
            phase: Phase::Prepare,
            release: new.release,
            previous: new.previous,
            strategy: new.strategy,
            nodes: new.nodes,
            skipped: new.skipped,
            batch_size: batch_size as u32,
            batches: batches as u32,
            deadline_ms: 0,
            paused_at_ms: None,
            lost_grace_until_ms: 0,
            node_lost_after_ms: new.node_lost_after_ms,
            pause_requested: false,
            abort_requested: false,
            promote_full: false,
            returning: false,
            keep_switched: false,
            error: None,
            rollback_failures: Vec::new(),
            created_by: new.created_by,
            created_at_ms: new.created_at_ms,
            updated_at_ms: new.created_at_ms,
            finished_at_ms: None,
            command_prefix: new.command_prefix,
            next_command: 1,
            timeline: Vec::new(),
            deployment: new.deployment,
            notify: new.notify,
            analysis: Vec::new(),
            backup_gates: Vec::new(),
            load_balancer: None,
            balancer_split: false,
            approval: None,
        }
    }

    /// The ids of the commands out: the nodes', the migration's and the
    /// hooks'. The driver keeps delivering exactly these.
    pub fn commands_out(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter_map(|n| n.command_id.as_deref())
            .chain(self.task_runs().filter_map(|t| t.command_id.as_deref()))
    }

    /// Every run-once step's state: the migration's, then the hooks'.
    pub fn task_runs(&self) -> impl Iterator<Item = &TaskRun> {
        self.migration
            .as_ref()
            .map(|m| &m.run)
            .into_iter()
            .chain(self.hooks.iter().map(|h| &h.run))
    }

    pub fn hook_run(&self, at: HookAt) -> Option<&HookRun> {
        self.hooks.iter().find(|h| h.at == at)
    }

    /// Makes a new rollback the fast path (`Step::Return`): its one step
    /// returns the nodes `Strategy::returning_at_once` at a time.
    pub fn return_at_once(&mut self) {
        let targets = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Pending)
            .count();
        self.steps = vec![Step::Return];
        self.phase = Phase::Return;
        self.batch_size = self.strategy.returning_at_once(targets) as u32;
        self.batches = 1;
    }

    /// Makes a new stop or removal a plan of its one step, every node at
    /// once: stopping a service is not done by halves.
    pub fn stop_at_once(&mut self) {
        self.steps = vec![Step::Stop];
        self.phase = Phase::Stop;
        self.batch_size = self.nodes.len().max(1) as u32;
        self.batches = 1;
    }

    /// Whether it is a rollback's fast path.
    pub fn returns_at_once(&self) -> bool {
        self.steps == [Step::Return]
    }

    /// Whether it is a rollback's fast path that returned at least one
    /// node: what it returned to is the operator's choice, current even
    /// where nodes refused it.
    pub fn returned_some(&self) -> bool {
        self.returns_at_once() && self.nodes.iter().any(|n| n.state == NodeState::Switched)
    }

    /// Whether what it set out to do took: it succeeded, or it is a fast
    /// rollback that returned some nodes (its release is current even
    /// where nodes refused it).
    pub fn took(&self) -> bool {
        self.state == RolloutState::Succeeded
            || (self.state == RolloutState::Failed && self.returned_some())
    }

    /// Whether a failure of this rollout returns (or returned) its nodes:
    /// what a failed one left mixed is then no operator's choice. A fast
    /// rollback that returned no node left a mix nobody chose a release
    /// for (some may have switched unseen): the operator decides.
    pub fn rolls_back(&self) -> bool {
        if self.kind.stops() {
            return false;
        }
        match self.returns_at_once() {
            true => self.returned_some(),
            false => self.strategy.auto_rollback || self.returning,
        }
    }

    /// Whether no command ever went out: whatever its state, no node
    /// changed (a request rejected or expired, an abort before the start).
    pub fn sent_nothing(&self) -> bool {
        self.next_command == 1
    }

    /// Whether the converger started it (a convergence, or the stop of a
    /// stopped service on nodes that came back running it): an operator's
    /// rollout of the service goes first.
    pub fn by_converger(&self) -> bool {
        self.kind == RolloutKind::Converge || self.created_by == CONVERGER
    }

    pub fn node(&self, name: &str) -> Option<&RolloutNode> {
        self.nodes.iter().find(|n| n.name == name)
    }
}
