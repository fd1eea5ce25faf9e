//! What one seed draws: the fleet and which service each node runs, the
//! strategy, each node's faults, the coordinator's crashes and store
//! faults, and what the operator does. Everything the run does comes from
//! here and from seeded generators, never from the wall clock.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::agent::{Faults, Outage};

pub(super) const SERVICES: [&str; 2] = ["web", "api"];
/// The release deployed first, without faults, and the one deployed under
/// them.
pub(super) const FIRST: &str = "1";
pub(super) const SECOND: &str = "2";
/// The registry's heartbeat TTL: a node gone for twice this (or its
/// release's healthy_deadline, 10 s, if longer) counts as lost.
pub(super) const TTL: Duration = Duration::from_secs(5);
/// A short outage; a few can add up to a long one.
const SHORT_OUTAGE: Duration = Duration::from_secs(8);
/// How long a node may be out of reach before its command counts as
/// failed and the node as uncertain: twice the TTL, or the releases'
/// healthy_deadline (10 s) if longer.
pub(super) const LOST_AFTER: Duration = Duration::from_secs(10);

pub(super) struct Node {
    pub labels: BTreeMap<String, String>,
    pub faults: Faults,
}

pub(super) struct Operator {
    pub allow_unreachable: bool,
    /// When each service's second deploy starts, from the faulty phase on.
    pub deploy_at: [Duration; 2],
    /// Pauses the second deploy of a service at, resumes after.
    pub pause: Option<(usize, Duration, Duration)>,
    pub abort: Option<(usize, Duration)>,
    /// A canary's waits for promotion are promoted, after this long at
    /// one (`full`: every remaining step skipped).
    pub promote: Option<(Duration, bool)>,
    /// The second deploy of a service, once it succeeded, is rolled back
    /// after this long (`true`: `--careful`).
    pub rollback: Option<(usize, Duration, bool)>,
    /// Once its second deploy (and rollback) ended, a service is stopped
    /// after this long (`true`: removed), still under faults.
    pub stop: Option<(usize, Duration, bool)>,
    /// The environment asks for an approval of every deploy (see
    /// `Approvals`).
    pub approvals: Option<Approvals>,
}

/// `approvals = 1` on the environment: the firsts are approved at once,
/// each service's second as its verdict says, an operator's rollback (when
/// `for_rollback`) after a while.
#[derive(Debug, Clone, Copy)]
pub(super) struct Approvals {
    pub for_rollback: bool,
    pub verdicts: [Verdict; 2],
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Verdict {
    Approve(Duration),
    Reject(Duration),
    /// Nobody answers: the request expires (`approval_timeout`).
    Expire,
}

/// The sim environment's `approval_timeout`.
const APPROVAL_TIMEOUT: &str = "1m";

pub(super) struct Coordinator {
    /// Crashes (and restarts) at these times from the faulty phase on.
    pub crashes_at: Vec<Duration>,
    /// Crash points: the coordinator crashes at its nth write (the
    /// coordinator's life, the write).
    pub crash_writes: Option<(usize, u64)>,
    /// Chance that a store write fails.
    pub store_fails: f64,
    /// Leader changes at these times from the faulty phase on: another
    /// coordinator takes the lead while the deposed one still runs, for
    /// `STALE_FOR` or until its first write is refused by the fence.
    pub leader_changes: Vec<Duration>,
}

pub(super) struct Scenario {
    pub nodes: Vec<Node>,
    pub spec: String,
    pub operator: Operator,
    pub coordinator: Coordinator,
    /// Which node's service is changed behind the coordinator's back once
    /// the fleet settled.
    pub drift: (usize, usize),
}

impl Scenario {
    pub fn draw(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let count = rng.random_range(2..=6);
        let nodes = (0..count)
            .map(|i| {
                // Node 0 runs web and node 1 api; the rest one, or both.
                let runs = |s: usize, rng: &mut StdRng| i == s || (i > 1 && rng.random_bool(0.7));
                let mut labels = BTreeMap::from([("env".to_string(), "sim".to_string())]);
                for (s, service) in SERVICES.iter().enumerate() {
                    if runs(s, &mut rng) {
                        labels.insert((*service).to_string(), "yes".to_string());
                    }
                }
                Node {
                    labels,
                    faults: node_faults(&mut rng),
                }
            })
            .collect();
        // Drawn apart, so the seeds found before canaries draw what they
        // drew then.
        let mut canary_rng = StdRng::seed_from_u64(seed ^ 0xca4a_7000_0000_0000);
        let mut background_rng = StdRng::seed_from_u64(seed ^ 0xbac6_9000_0000_0000);
        let mut canary = canary_rng
            .random_bool(0.4)
            .then(|| ("canary", canary(&mut canary_rng, &mut background_rng)));
        // Blue/green, drawn apart too, where no canary was.
        let mut blue_green_rng = StdRng::seed_from_u64(seed ^ 0xb1e9_4ee0_0000_0000);
        if canary.is_none() && blue_green_rng.random_bool(0.3) {
            canary = Some(("blue_green", blue_green(&mut blue_green_rng)));
        }
        let mut spec = spec(
            &mut rng,
            canary.as_ref().map(|(kind, c)| (*kind, c.0.as_str())),
        );
        let canary = canary.map(|(_, c)| c);
        // Drawn apart, so the seeds found before approvals draw what they
        // drew then.
        let mut approval_rng = StdRng::seed_from_u64(seed ^ 0xa990_0fa1_0000_0000);
        let approvals = approval_rng.random_bool(0.25).then(|| {
            let mut verdict = || match approval_rng.random_range(0..6) {
                0 => Verdict::Reject(Duration::from_millis(approval_rng.random_range(0..20_000))),
                1 => Verdict::Expire,
                _ => Verdict::Approve(Duration::from_millis(approval_rng.random_range(0..20_000))),
            };
            let verdicts = [verdict(), verdict()];
            Approvals {
                for_rollback: approval_rng.random_bool(0.5),
                verdicts,
            }
        });
        if let Some(approvals) = &approvals {
            let env = "nodes = { env = \"sim\" }\n";
            let keys = format!(
                "{env}approvals = 1\napprovals_for_rollback = {}\napproval_timeout = \"{APPROVAL_TIMEOUT}\"\n",
                u32::from(approvals.for_rollback)
            );
            spec = spec.replace(env, &keys);
        }
        // Drawn apart again, so canaries drawn before analyses stay.
        let mut analysis_rng = StdRng::seed_from_u64(seed ^ 0xa9a1_5150_0000_0000);
        let mut nodes: Vec<Node> = nodes;
        if let Some(table) = canary.as_ref().and_then(|c| c.2.as_ref()) {
            spec += table;
            // The new release answers one request in ten with a 5xx: its
            // analysis fails, or (too little traffic) has no verdict.
            if analysis_rng.random_bool(0.4) {
                for node in &mut nodes {
                    node.faults.errors = Some(SECOND.to_string());
                }
            }
        }
        // Drawn apart, so the seeds found before rollbacks draw what they
        // drew then: a node whose first release can no longer return, and
        // an operator's rollback.
        let mut rollback_rng = StdRng::seed_from_u64(seed ^ 0x4e70_b4c6_0000_0000);
        for node in &mut nodes {
            if rollback_rng.random_bool(0.05) {
                node.faults.cannot_return = Some(FIRST.to_string());
            }
        }
        let rollback = rollback_rng.random_bool(0.3).then(|| {
            (
                rollback_rng.random_range(0..2),
                Duration::from_millis(rollback_rng.random_range(0..20_000)),
                rollback_rng.random_bool(0.3),
            )
        });
        // Drawn apart too, so every seed before stops draws what it drew.
        let mut stop_rng = StdRng::seed_from_u64(seed ^ 0x5709_0000_0000_0000);
        let stop = stop_rng.random_bool(0.3).then(|| {
            (
                stop_rng.random_range(0..2),
                Duration::from_millis(stop_rng.random_range(0..20_000)),
                stop_rng.random_bool(0.4),
            )
        });
        let operator = Operator {
            approvals,
            rollback,
            stop,
            promote: canary.as_ref().filter(|c| c.1).map(|_| {
                (
                    Duration::from_millis(canary_rng.random_range(0..20_000)),
                    canary_rng.random_bool(0.3),
                )
            }),
            allow_unreachable: rng.random_bool(0.5),
            deploy_at: [
                Duration::from_millis(rng.random_range(0..20_000)),
                Duration::from_millis(rng.random_range(0..20_000)),
            ],
            pause: rng.random_bool(0.15).then(|| {
                let at = Duration::from_millis(rng.random_range(0..30_000));
                (
                    rng.random_range(0..2),
                    at,
                    at + Duration::from_millis(rng.random_range(0..10_000)),
                )
            }),
            abort: rng.random_bool(0.1).then(|| {
                (
                    rng.random_range(0..2),
                    Duration::from_millis(rng.random_range(0..40_000)),
                )
            }),
        };
        let mut crashes_at: Vec<Duration> = (0..rng.random_range(0..3))
            .map(|_| Duration::from_millis(rng.random_range(0..60_000)))
            .collect();
        crashes_at.sort();
        let coordinator = Coordinator {
            crash_writes: rng.random_bool(0.3).then(|| {
                (
                    rng.random_range(0..=crashes_at.len()),
                    rng.random_range(0..80),
                )
            }),
            crashes_at,
            store_fails: if rng.random_bool(0.3) { 0.05 } else { 0.0 },
            leader_changes: leader_changes(seed),
        };
        let drift = (
            rng.random_range(0..count),
            rng.random_range(0..SERVICES.len()),
        );
        Self {
            nodes,
            spec,
            operator,
            coordinator,
            drift,
        }
    }
}

/// Drawn apart from the rest of the seed, so that adding this fault left
/// every other seed's scenario (and the regressions they pin) as it was.
fn leader_changes(seed: u64) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1ead_e5c4_a46e);
    let count = if rng.random_bool(0.4) {
        rng.random_range(1..=2)
    } else {
        0
    };
    let mut at: Vec<Duration> = (0..count)
        .map(|_| Duration::from_millis(rng.random_range(0..60_000)))
        .collect();
    at.sort();
    at
}

fn node_faults(rng: &mut StdRng) -> Faults {
    let second = || Some(SECOND.to_string());
    let outages = (0..rng.random_range(0..3))
        .map(|_| {
            // Some outages outlast a command's deadline or the time a node
            // may be lost.
            let length = if rng.random_bool(0.15) {
                rng.random_range(20_000..150_000)
            } else {
                rng.random_range(100..SHORT_OUTAGE.as_millis() as u64)
            };
            Outage {
                at: Duration::from_millis(rng.random_range(0..50_000)),
                length: Duration::from_millis(length),
                crash: rng.random_bool(0.4),
            }
        })
        .collect::<Vec<_>>();
    let mut outages = outages;
    outages.sort_by_key(|o| o.at);
    Faults {
        rejects: rng.random_bool(0.08).then(second).flatten(),
        prepare_fails: rng.random_bool(0.05).then(second).flatten(),
        crash_loops: rng.random_bool(0.06).then(|| {
            (
                SECOND.to_string(),
                Duration::from_millis(rng.random_range(0..4_000)),
            )
        }),
        drop_results: if rng.random_bool(0.5) { 0.1 } else { 0.0 },
        outages,
        errors: None,
        cannot_return: None,
    }
}

/// A canary's own keys, whether a step waits for promotion, and the
/// `[analysis.errors]` table its analysis steps (if any) run, and (drawn
/// from `background`) a background analysis from its first weight on.
fn canary(rng: &mut StdRng, background: &mut StdRng) -> (String, bool, Option<String>) {
    let canary_nodes = if rng.random_bool(0.5) {
        rng.random_range(1..=3).to_string()
    } else {
        format!("\"{}%\"", rng.random_range(1..=100))
    };
    let mut steps = Vec::new();
    let mut weight = 0;
    let mut waits = false;
    for _ in 0..rng.random_range(1..=4) {
        if weight < 100 && rng.random_bool(0.6) {
            weight = rng.random_range(weight + 1..=100);
            steps.push(format!("{{ set_weight = {weight} }}"));
        } else if rng.random_bool(0.3) {
            waits = true;
            steps.push("{ pause = {} }".to_string());
        } else if rng.random_bool(0.3) {
            // An inconclusive analysis waits for promotion too.
            waits = true;
            // The proxies measure only a canary that takes requests.
            steps.push(match weight {
                0 => "{ pause = {} }".to_string(),
                _ => "{ analysis = \"errors\" }".to_string(),
            });
        } else {
            steps.push(format!("{{ pause = \"{}s\" }}", rng.random_range(1..=20)));
        }
    }
    let keys = format!(
        "canary_nodes = {canary_nodes}\nsteps = [{}]\nscale_down_delay = \"{}s\"\nabort_scale_down_delay = \"{}s\"\n",
        steps.join(", "),
        rng.random_range(0..=30),
        rng.random_range(0..=30),
    );
    let analysis = steps
        .iter()
        .any(|s| s.contains("analysis"))
        .then(|| analysis_table(rng, true));
    let mut keys = keys;
    let weighted = steps.iter().position(|s| s.contains("set_weight"));
    if let (Some(_), Some(at)) = (&analysis, weighted) {
        if background.random_bool(0.5) {
            keys += &format!(
                "background_analysis = {{ analysis = \"errors\", from_step = {} }}\n",
                at + 1
            );
        }
    }
    (keys, waits, analysis)
}

/// The `[analysis.errors]` table analysis steps run: a success rate, and
/// (`relative`) a latency relative to stable.
fn analysis_table(rng: &mut StdRng, relative: bool) -> String {
    let condition = match relative {
        true => "canary_success_rate >= 0.95 and canary_p99 <= 2 * stable_p99",
        false => "canary_success_rate >= 0.95",
    };
    format!(
        r#"
[[analysis.errors.metrics]]
name = "success"
condition = "{condition}"
interval = "{}s"
count = {}
failure_limit = {}
inconclusive_limit = {}
min_requests = {}
"#,
        rng.random_range(1..=5),
        // Above either limit, which the spec requires.
        rng.random_range(2..=4),
        rng.random_range(0..=1),
        rng.random_range(0..=1),
        if rng.random_bool(0.3) { 100_000 } else { 0 },
    )
}

/// Blue/green's own keys, whether it waits for promotion, and its
/// `[analysis.errors]` table, as `canary` draws them.
fn blue_green(rng: &mut StdRng) -> (String, bool, Option<String>) {
    let mut keys = String::new();
    let mut waits = true;
    if rng.random_bool(0.5) {
        waits = false;
        keys += &format!("auto_promote_after = \"{}s\"\n", rng.random_range(1..=20));
    }
    let mut analysed = false;
    // Only after the switch: before it, the proxies see testers alone.
    for key in ["post_promotion_analysis"] {
        if rng.random_bool(0.3) {
            analysed = true;
            keys += &format!("{key} = \"errors\"\n");
        }
    }
    keys += &format!(
        "keep_warm = {}\nscale_down_delay = \"{}s\"\nabort_scale_down_delay = \"{}s\"\n",
        rng.random_range(0..=1),
        rng.random_range(0..=30),
        rng.random_range(0..=30),
    );
    // An analysis that is inconclusive waits for promotion too.
    let analysis = analysed.then(|| analysis_table(rng, false));
    (keys, waits || analysed, analysis)
}

/// The app's spec: both services on every node labelled for them, one
/// strategy drawn from the seed: rolling, or another kind (`plan`: its kind
/// and its own keys), a canary promoted in rolling's batches, blue/green
/// switching every node at once (no batch written).
fn spec(rng: &mut StdRng, plan: Option<(&str, &str)>) -> String {
    let batch = if rng.random_bool(0.5) {
        rng.random_range(1..=3).to_string()
    } else {
        format!("\"{}%\"", rng.random_range(1..=100))
    };
    let max_unavailable = rng.random_range(0..=1);
    let min_healthy_time = rng.random_range(0..=2);
    let auto_rollback = rng.random_bool(0.8);
    let (kind, plan_keys) = plan.unwrap_or(("rolling", ""));
    let batches = match kind {
        "blue_green" => String::new(),
        _ => format!("batch = {batch}\nmax_unavailable = {max_unavailable}\n"),
    };
    let mut spec = String::from("app = \"shop\"\n");
    for (i, service) in SERVICES.iter().enumerate() {
        spec += &format!(
            r#"
[services.{service}]
command = ["app"]
listen = ":1808{i}"
nodes = {{ {service} = "yes" }}
drain_timeout = "2s"
stop_grace = "1s"

[services.{service}.health]
path = "/health"
interval = "1s"
healthy_threshold = 2
healthy_deadline = "10s"
"#
        );
    }
    spec += &format!(
        r#"
[strategy]
kind = "{kind}"
{plan_keys}{batches}min_healthy_time = "{min_healthy_time}s"
progress_deadline = "10m"
auto_rollback = {auto_rollback}

[environments.sim]
nodes = {{ env = "sim" }}
"#
    );
    spec
}
