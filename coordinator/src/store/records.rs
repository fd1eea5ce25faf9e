//! The records the store keeps, domain by domain: plain data, serialized as
//! JSON by the repositories.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::model::StoredRelease;
use crate::spec::Strategy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Unreachable,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Unreachable => "unreachable",
        }
    }
}

/// The last figures a node reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub cpu_percent: f64,
    pub load_1: f64,
    pub load_5: f64,
    pub load_15: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub uptime_seconds: u64,
    /// Disk the node's release dirs and cached artifacts take.
    #[serde(default)]
    pub release_disk_bytes: u64,
    /// The operating system, as os-release names it.
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub cpus: u32,
}

/// A node as the coordinator knows it, kept across coordinator restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// The artifact digest a fleet upgrade installed the agent from; ""
    /// for an agent installed otherwise.
    #[serde(default)]
    pub agent_build: String,
    pub capabilities: Vec<String>,
    pub status: NodeStatus,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
    pub figures: Option<Figures>,
    /// What the node last reported running, service by service.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// When `services` was reported (a heartbeat), unlike `last_seen_ms`,
    /// which a reconnect's hello also moves: a rollout must not take a
    /// report from before a node's switch for a fresh one.
    #[serde(default)]
    pub services_at_ms: i64,
    /// The serial of the certificate the node last connected with: what
    /// `nodes revoke` refuses.
    #[serde(default)]
    pub cert_serial: String,
    /// That certificate's expiry, ms since the epoch; 0 when unknown.
    #[serde(default)]
    pub cert_expires_at_ms: i64,
    /// Common name of the CA of the newest certificate the node holds: the
    /// one it connected with, or one it confirmed installing since.
    #[serde(default)]
    pub cert_ca: String,
    /// sha256 hex of the trust bundle the node confirmed installing; empty
    /// until a renewal on command.
    #[serde(default)]
    pub trust_bundle: String,
}

/// A join token as kept: its secret only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// sha256 of the secret part, hex.
    pub hash: String,
    pub labels: BTreeMap<String, String>,
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// 0: unlimited.
    pub uses: u32,
    pub used: u32,
    /// Nodes that joined with it.
    pub nodes: Vec<String>,
    pub revoked_at_ms: Option<i64>,
}

/// How the newest rollout of a service in an environment ended, of any
/// kind: what the converger reads to tell a fleet an operator chose to
/// leave mixed (an aborted rollout, or a failed one without auto_rollback)
/// from one a partition left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOutcome {
    pub env: String,
    pub service: String,
    pub rollout_id: String,
    pub kind: crate::rollout::model::RolloutKind,
    pub state: crate::rollout::model::RolloutState,
    /// It returns its nodes after a failure (auto_rollback, or a canary
    /// failing before its promotion).
    pub auto_rollback: bool,
    pub at_ms: i64,
    /// It set out to return its nodes to the release before it (a
    /// canary's abort does), or never sent a command (rejected, expired
    /// awaiting approval, aborted before it started): aborted or not, it
    /// left no mix to keep.
    #[serde(default)]
    pub returned: bool,
    /// Ids of the nodes whose agent refused the release they were to
    /// return to (it cannot start there): the converger leaves them on
    /// what they serve until the service's next rollout.
    #[serde(default)]
    pub refused: Vec<String>,
    /// The stop (or removal) the service is under: set by one, kept by
    /// the rollouts after it that did not take (a start that failed and
    /// stopped its nodes again), dropped by one that did (see
    /// `rollout::stopping`).
    #[serde(default)]
    pub stopped: Option<StoppedBy>,
}

/// The rollout that stopped (or removed) a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedBy {
    pub rollout_id: String,
    pub removed: bool,
}

/// The newest CA rotation (`cutover ca rotate`). CAs are named by their
/// common name, which every certificate they sign carries as its issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    pub started_at_ms: i64,
    pub started_by: String,
    pub old_ca: String,
    pub new_ca: String,
    /// When the coordinator moved its own certificate to the new CA and
    /// stopped trusting the old one.
    pub retired_at_ms: Option<i64>,
    /// When every node confirmed the bundle without the old CA.
    pub finished_at_ms: Option<i64>,
}

/// A refused agent certificate (`cutover nodes revoke`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub node: String,
    /// The certificate's serial; empty when the node never connected, and
    /// then every certificate of that name is refused.
    pub serial: String,
    pub at_ms: i64,
    pub by: String,
}

/// One service on a node, as its agent last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub release_id: String,
    pub upstream: String,
    pub listen: String,
    pub admitted: bool,
    pub crashes: u32,
    pub last_exit: String,
    pub running: bool,
    #[serde(default)]
    pub healthy: bool,
    #[serde(default)]
    pub health_detail: String,
    #[serde(default)]
    pub traffic: Option<Traffic>,
    /// The release running beside the serving one (a canary, a warm
    /// standby).
    #[serde(default)]
    pub side: Option<SideStatus>,
    /// Resident memory of the serving release; 0: not known.
    #[serde(default)]
    pub memory_bytes: u64,
    /// The incident levers its proxy applies; `None`: a worker, or an
    /// agent without levers.
    #[serde(default)]
    pub levers: Option<cutover_common::levers::LeverSettings>,
    #[serde(default)]
    pub lever_counts: Option<cutover_common::levers::LeverCounts>,
    /// The serving release's queue probe's last pass.
    #[serde(default)]
    pub queues: Option<cutover_common::queues::QueueReport>,
    /// The serving release's processes (`cutover scale`), and how many of
    /// them run and pass their health check; 0 from an agent before scale.
    #[serde(default)]
    pub instances: u32,
    #[serde(default)]
    pub instances_up: u32,
}

impl ServiceStatus {
    /// Whether a side release runs that no rollout is using: one the node
    /// proxy sends part of the requests to, or one nothing retires (a
    /// canary staged by a rollout that lost the node). Outside a rollout
    /// every request goes to the serving release, and a release kept warm
    /// after a switch has its time to stop (or is kept warm on purpose,
    /// -1).
    pub fn stray_side(&self) -> bool {
        self.side
            .as_ref()
            .is_some_and(|side| side.weight > 0 || side.retire_at_ms == 0)
    }
}

/// A service's side release, as its agent last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideStatus {
    pub release_id: String,
    /// Percent of the node's requests it gets.
    pub weight: u32,
    pub running: bool,
    pub healthy: bool,
    pub health_detail: String,
    pub crashes: u32,
    pub last_exit: String,
    pub traffic: Option<Traffic>,
    /// When the agent stops it by itself; 0: not planned; -1: kept warm
    /// until the next deploy replaces it.
    pub retire_at_ms: i64,
    /// Resident memory; 0: not known.
    #[serde(default)]
    pub memory_bytes: u64,
}

impl From<cutover_proto::v1::SideRelease> for SideStatus {
    fn from(side: cutover_proto::v1::SideRelease) -> Self {
        SideStatus {
            release_id: side.release_id,
            weight: side.split.map_or(0, |s| s.weight),
            running: side.running,
            healthy: side.healthy,
            health_detail: side.health_detail,
            crashes: side.crashes,
            last_exit: side.last_exit,
            traffic: side.traffic.map(Traffic::from),
            retire_at_ms: side.retire_at_ms,
            memory_bytes: side.memory_bytes,
        }
    }
}

impl From<SideStatus> for cutover_proto::v1::SideRelease {
    fn from(side: SideStatus) -> Self {
        cutover_proto::v1::SideRelease {
            release_id: side.release_id,
            split: Some(cutover_proto::v1::TrafficSplit {
                weight: side.weight,
                ..Default::default()
            }),
            running: side.running,
            healthy: side.healthy,
            health_detail: side.health_detail,
            crashes: side.crashes,
            last_exit: side.last_exit,
            traffic: side.traffic.map(Into::into),
            retire_at_ms: side.retire_at_ms,
            memory_bytes: side.memory_bytes,
        }
    }
}

impl From<cutover_proto::v1::ReleaseTraffic> for Traffic {
    fn from(t: cutover_proto::v1::ReleaseTraffic) -> Self {
        Traffic {
            release_id: t.release_id,
            requests: t.requests,
            by_class: t.by_class,
            upstream_failures: t.upstream_failures,
            latency_bounds_ms: t.latency_bounds_ms,
            latency_cumulative: t.latency_cumulative,
            latency_sum_us: t.latency_sum_us,
        }
    }
}

impl From<Traffic> for cutover_proto::v1::ReleaseTraffic {
    fn from(t: Traffic) -> Self {
        cutover_proto::v1::ReleaseTraffic {
            release_id: t.release_id,
            requests: t.requests,
            by_class: t.by_class,
            upstream_failures: t.upstream_failures,
            latency_bounds_ms: t.latency_bounds_ms,
            latency_cumulative: t.latency_cumulative,
            latency_sum_us: t.latency_sum_us,
        }
    }
}

/// What the node proxy counted for the serving release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub release_id: String,
    pub requests: u64,
    /// Responses by status class: 1xx to 5xx.
    pub by_class: Vec<u64>,
    pub upstream_failures: u64,
    pub latency_bounds_ms: Vec<u64>,
    /// Cumulative counts per bound, then +Inf.
    pub latency_cumulative: Vec<u64>,
    pub latency_sum_us: u64,
}

impl Traffic {
    /// The upper bound (ms) of the latency bucket holding quantile `q`;
    /// `None` without requests or when it lies in the +Inf bucket.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        latency_quantile_ms(&self.latency_bounds_ms, &self.latency_cumulative, q)
    }
}

/// The upper bound (ms) of the cumulative histogram bucket that holds
/// quantile `q`; `None` without data or in the +Inf bucket.
pub fn latency_quantile_ms(bounds_ms: &[u64], cumulative: &[u64], q: f64) -> Option<u64> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let bucket = cumulative.iter().position(|count| *count >= rank)?;
    bounds_ms.get(bucket).copied()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Strictly increasing, assigned by the store.
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub node_id: String,
    pub node_name: String,
    pub message: String,
}

/// An event before the store gave it a sequence number.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: &'static str,
    pub node_id: String,
    pub node_name: String,
    pub message: String,
}

/// An operator's access, as `cutover operator create` recorded it. An
/// operator certificate whose name has no record was issued offline with
/// the CA key (`cutover ca issue operator`) and is an admin: whoever holds
/// that key can mint any identity anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub name: String,
    pub role: OperatorRole,
    /// Environments a deployer may change; empty: every one.
    pub envs: Vec<String>,
    pub created_by: String,
    pub created_at_ms: i64,
    /// Set by `operator revoke`: the name is refused from then on, whatever
    /// certificate it presents. Records are never deleted, so a revoked
    /// name cannot fall back to being an (unrecorded) admin.
    pub revoked_at_ms: Option<i64>,
    /// Certificates a renewal replaced, refused until they expire.
    #[serde(default)]
    pub replaced: Vec<ReplacedCertificate>,
}

/// A certificate an operator renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedCertificate {
    pub serial: String,
    pub expires_at_ms: i64,
    /// The serial of the certificate that replaced it.
    #[serde(default)]
    pub by: String,
    /// Refused from now on: set the first time the new one is used.
    #[serde(default)]
    pub retired: bool,
}

impl OperatorRecord {
    /// The record of an admin whose certificate was issued offline with the
    /// CA key, first seen now.
    pub fn issued_offline(name: &str) -> Self {
        Self {
            name: name.to_string(),
            role: OperatorRole::Admin,
            envs: Vec::new(),
            created_by: "ca issue (offline)".into(),
            created_at_ms: cutover_common::now_ms(),
            revoked_at_ms: None,
            replaced: Vec::new(),
        }
    }

    /// Whether the certificate with `serial` was replaced by a renewal
    /// that is in use.
    pub fn refuses(&self, serial: &str) -> bool {
        !serial.is_empty()
            && self
                .replaced
                .iter()
                .any(|c| c.serial == serial && c.retired)
    }

    /// Whether `serial` is a renewed certificate used for the first time.
    pub fn retires_with(&self, serial: &str) -> bool {
        !serial.is_empty() && self.replaced.iter().any(|c| c.by == serial && !c.retired)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    Viewer,
    Deployer,
    Admin,
}

impl OperatorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Deployer => "deployer",
            OperatorRole::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(OperatorRole::Viewer),
            "deployer" => Some(OperatorRole::Deployer),
            "admin" => Some(OperatorRole::Admin),
            _ => None,
        }
    }
}

/// A secret's kept versions, each sealed (see `secrets.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub env: String,
    pub name: String,
    /// Oldest first.
    pub versions: Vec<SecretVersion>,
    /// How often it is to be rotated (`secret set --rotate-every`); 0: no
    /// schedule.
    #[serde(default)]
    pub rotate_every_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: u32,
    pub created_at_ms: i64,
    pub created_by: String,
    /// The master key that sealed it.
    pub key_id: String,
    /// Hex.
    pub nonce: String,
    /// Hex, the AEAD tag included.
    pub ciphertext: String,
}

/// One mutating call, as the audit log keeps it: appended, never changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    /// The caller's identity, e.g. "operator/alice".
    pub who: String,
    /// The RPC, e.g. "deploy".
    pub action: String,
    /// Its arguments as JSON, secrets removed.
    pub arguments: String,
    /// "ok", or "refused: ..." / "failed: ..." with the reason.
    pub outcome: String,
}

/// Where a release stands in its service's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    Deploying,
    Stable,
    Failed,
    RolledBack,
    Aborted,
    /// It was stable; an operator (or a deployment a later service of which
    /// failed) rolled back from it.
    Reverted,
}

impl ReleaseState {
    /// As operators see it: the wire enum's name (see `rollout::states`).
    pub fn as_str(self) -> &'static str {
        cutover_proto::v1::ReleaseState::from(self).as_str()
    }
}

/// One release of a service in an environment, kept for `cutover releases`
/// and as a rollback target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub app: String,
    pub env: String,
    pub service: String,
    pub release: StoredRelease,
    pub state: ReleaseState,
    /// The release the environment's nodes are meant to run: the last one
    /// that rolled out successfully.
    pub current: bool,
    pub deployed_by: String,
    pub deployed_at_ms: i64,
    pub rollout_id: String,
    /// How it was rolled out, reused when rolling back to it.
    pub selector: BTreeMap<String, String>,
    pub strategy: Strategy,
    /// Why its rollout failed, or who rolled back from it.
    #[serde(default)]
    pub note: String,
    /// Its migration, once it ran to exit 0.
    #[serde(default)]
    pub migration: Option<MigrationRecord>,
    /// When it last became current; 0: never (or before this was kept).
    /// With `current_until_ms`, how long it was stable: what a promotion
    /// rule's soak reads.
    #[serde(default)]
    pub current_since_ms: i64,
    /// When another release replaced it; 0 while it is current.
    #[serde(default)]
    pub current_until_ms: i64,
    /// "ENV/RELEASE_ID" of the release it was promoted from; empty: it was
    /// deployed.
    #[serde(default)]
    pub promoted_from: String,
    /// The `cutover config set` overrides in its environment, by key: the
    /// current release's are the ones in force, kept by every deploy (see
    /// `rollout::config`).
    #[serde(default)]
    pub config: BTreeMap<String, ConfigOverride>,
}

/// One key of a service's environment set (or removed) by `cutover config
/// set` rather than by the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigOverride {
    /// The value in force; `None`: the key is removed.
    pub value: Option<String>,
    /// What the spec says (`None`: nothing), for `--reset`.
    pub spec_value: Option<String>,
    pub by: String,
    pub at_ms: i64,
}

/// A migration that ran with a release: what a rollback past it must know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub phase: crate::migration::MigrationPhase,
    pub ran_at_ms: i64,
    pub node: String,
    pub rollout_id: String,
    /// How long the migration ran (it exited 0: a record means it ran).
    #[serde(default)]
    pub duration_ms: u64,
    /// The end of what it printed.
    #[serde(default)]
    pub output: String,
    /// What the spec's `schema_command` printed after it, if it has one.
    #[serde(default)]
    pub schema: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_cumulative_buckets() {
        let bounds = [1, 5, 10];
        // 50 requests under 1 ms, 45 more under 5 ms, 4 under 10, 1 slower.
        let cumulative = [50, 95, 99, 100];
        assert_eq!(latency_quantile_ms(&bounds, &cumulative, 0.5), Some(1));
        assert_eq!(latency_quantile_ms(&bounds, &cumulative, 0.9), Some(5));
        assert_eq!(latency_quantile_ms(&bounds, &cumulative, 0.99), Some(10));
        assert_eq!(latency_quantile_ms(&bounds, &cumulative, 1.0), None, "+Inf");
        assert_eq!(latency_quantile_ms(&bounds, &[0, 0, 0, 0], 0.5), None);
    }
}
