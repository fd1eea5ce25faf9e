//! What an environment allows, beyond who may deploy there: the releases
//! it takes (`promotion`: only what soaked in another environment) and
//! when (`freeze` windows). Like the nodes an environment selects
//! (`environments.rs`), the policy is the coordinator's to keep, not each
//! spec's: a deployer must not lift production's rules by sending a spec
//! without them. The first deploy pins it; only an admin changes it.
//! Admins can step past both rules for one deploy (`--break-glass`).
//! `approvals`: a deploy, promotion or rollback there waits until other
//! operators approve it (the engine's `awaiting_approval`).

pub mod freeze;
pub mod lock;
pub mod promotion;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::EnvironmentSpec;
use crate::store::{Store, StoreError};
use freeze::Freeze;

/// `promotion = { from = "staging", min_soak = "30m" }` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionSpec {
    /// The environment a release must have been stable in.
    pub from: String,
    /// For how long; default 0: stable there at all.
    #[serde(default, with = "humantime_serde")]
    pub min_soak: Duration,
}

/// An environment's policy as the coordinator keeps it: the spec's keys,
/// as written, checked when they were pinned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentPolicy {
    #[serde(default)]
    pub promotion: Option<Promotion>,
    #[serde(default)]
    pub freeze: Vec<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub approvals: u32,
    #[serde(default)]
    pub approvals_for_rollback: Option<u32>,
    /// 0: the default (`DEFAULT_APPROVAL_TIMEOUT`).
    #[serde(default)]
    pub approval_timeout_ms: u64,
}

/// How long a request waits for its approvals unless the environment says.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(3600);
/// More approvers than a team has on call is a typo.
const MAX_APPROVALS: u32 = 5;

/// What a rollout needs before it starts: `required` approvals by
/// operators other than its requester within `timeout_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRule {
    pub required: u32,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub from: String,
    pub min_soak_ms: u64,
}

impl EnvironmentPolicy {
    pub fn of(environment: &EnvironmentSpec) -> Self {
        Self {
            promotion: environment.promotion.as_ref().map(|p| Promotion {
                from: p.from.clone(),
                min_soak_ms: p.min_soak.as_millis() as u64,
            }),
            freeze: environment.freeze.clone(),
            timezone: environment.timezone.clone(),
            approvals: environment.approvals,
            approvals_for_rollback: environment.approvals_for_rollback,
            approval_timeout_ms: environment
                .approval_timeout
                .map_or(0, |t| t.as_millis() as u64),
        }
    }

    /// The approvals a deploy (or promotion, or retry) needs; `None`
    /// when it needs none.
    pub fn deploy_approval(&self) -> Option<ApprovalRule> {
        self.approval(self.approvals)
    }

    /// The approvals an operator's rollback needs.
    pub fn rollback_approval(&self) -> Option<ApprovalRule> {
        self.approval(self.approvals_for_rollback.unwrap_or(self.approvals))
    }

    fn approval(&self, required: u32) -> Option<ApprovalRule> {
        let timeout_ms = match self.approval_timeout_ms {
            0 => DEFAULT_APPROVAL_TIMEOUT.as_millis() as u64,
            ms => ms,
        };
        (required > 0).then_some(ApprovalRule {
            required,
            timeout_ms,
        })
    }

    /// The windows, checked (they were when the spec was parsed; a
    /// policy stored by a newer coordinator might not parse here).
    pub fn freeze(&self) -> Result<Freeze, String> {
        Freeze::parse(&self.freeze, self.timezone.as_deref()).map_err(|(k, m)| format!("{k}: {m}"))
    }

    /// As messages quote it.
    pub fn describe(&self) -> String {
        let promotion = match &self.promotion {
            Some(p) => format!(
                "promotion from {} after {}",
                p.from,
                show_duration(p.min_soak_ms)
            ),
            None => "no promotion rule".into(),
        };
        let freeze = match self.freeze.as_slice() {
            [] => "no freeze window".to_string(),
            windows => format!(
                "freeze {} ({})",
                windows
                    .iter()
                    .map(|w| format!("{w:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.timezone.as_deref().unwrap_or("UTC")
            ),
        };
        let approvals = match (self.approvals, self.rollback_approval()) {
            (0, None) => "no approvals".to_string(),
            (n, rollback) => format!(
                "{n} approvals ({} for a rollback) within {}",
                rollback.map_or(0, |r| r.required),
                show_duration(
                    self.deploy_approval()
                        .or(rollback)
                        .map_or(0, |r| r.timeout_ms)
                )
            ),
        };
        format!("{promotion}, {freeze}, {approvals}")
    }
}

/// Whether `caller` may deploy with `policy` in `env`: `Ok(Some(policy))`
/// when it is to be pinned (the deploy goes ahead), `Ok(None)` when it is
/// the one pinned, `Err(why)` when the caller may not change it. Nothing
/// is written here, so a deploy refused later changes nothing.
pub async fn check_pin(
    store: &Store,
    env: &str,
    policy: &EnvironmentPolicy,
    is_admin: bool,
) -> Result<Result<Option<EnvironmentPolicy>, String>, StoreError> {
    let pinned = store.releases.policy(env).await?;
    let same = match &pinned {
        Some(pinned) => pinned == policy,
        None => *policy == EnvironmentPolicy::default(),
    };
    if same {
        return Ok(Ok(None));
    }
    if !is_admin {
        return Ok(Err(format!(
            "environment {env} has {} on this coordinator, but the spec says {}; only an admin changes an environment's policy: ask one to deploy this spec, or put the keys back as they were",
            pinned.unwrap_or_default().describe(),
            policy.describe()
        )));
    }
    Ok(Ok(Some(policy.clone())))
}

/// Stores a policy `check_pin` allowed.
pub async fn pin(
    store: &Store,
    env: &str,
    policy: &EnvironmentPolicy,
    by: &str,
) -> Result<(), StoreError> {
    store.releases.put_policy(env, policy).await?;
    tracing::info!(env = %env, policy = %policy.describe(), by = %by, "environment policy pinned");
    Ok(())
}

/// The refusal of a deploy or promotion to `env` at `now_ms`, if a freeze
/// window runs then.
pub fn frozen(env: &str, policy: &EnvironmentPolicy, now_ms: i64) -> Option<String> {
    let freeze = match policy.freeze() {
        Ok(freeze) => freeze,
        Err(e) => {
            return Some(format!(
                "environment {env} has freeze windows this coordinator cannot read ({e}); an admin deploys a spec with valid ones"
            ))
        }
    };
    let now = jiff::Timestamp::from_millisecond(now_ms).ok()?;
    let frozen = freeze.frozen_at(now)?;
    Some(format!(
        "environment {env} is frozen: window {:?} ({}) runs until {}; deploy after that, or an admin deploys now with --break-glass --reason TEXT (a rollback is never frozen)",
        frozen.window,
        freeze.timezone(),
        freeze.show(frozen.until)
    ))
}

/// An environment's approval keys: a count a team can meet, and a
/// timeout long enough for someone to answer.
pub fn check_approvals(env: &EnvironmentSpec) -> Result<(), (String, String)> {
    for (key, count) in [
        ("approvals", Some(env.approvals)),
        ("approvals_for_rollback", env.approvals_for_rollback),
    ] {
        if count.is_some_and(|n| n > MAX_APPROVALS) {
            return Err((
                key.into(),
                format!(
                    "is {}, more than {MAX_APPROVALS}: that many operators other than the requester rarely answer in time; set 1 or 2",
                    count.unwrap_or_default()
                ),
            ));
        }
    }
    if let Some(timeout) = env.approval_timeout {
        if env.approvals == 0 && env.approvals_for_rollback.unwrap_or(0) == 0 {
            return Err((
                "approval_timeout".into(),
                "is set but nothing needs an approval: set approvals = 1 too, or remove it".into(),
            ));
        }
        if timeout < Duration::from_secs(60) || timeout > Duration::from_secs(7 * 24 * 3600) {
            return Err((
                "approval_timeout".into(),
                format!(
                    "is {}; it must be between 1m and 7d",
                    humantime::format_duration(timeout)
                ),
            ));
        }
    }
    Ok(())
}

/// The timeline note of an admin's break of glass: who, why, and the
/// refusals it stepped past (`in_the_way`).
pub fn break_glass_note(by: &str, reason: &str, in_the_way: &[String]) -> (String, String) {
    let skipped = match in_the_way {
        [] => "nothing was in the way".to_string(),
        refusals => format!("past: {}", refusals.join("; ")),
    };
    (
        "break_glass".to_string(),
        format!("{by} broke glass: {reason} ({skipped})"),
    )
}

/// "30m", "1h 30m", "0s".
pub fn show_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::AppSpec;

    fn production(keys: &str) -> Result<EnvironmentPolicy, String> {
        let text = format!(
            "app = \"shop\"\n[services.web]\ncommand = [\"./web\"]\nlisten = \":8080\"\nhealth = {{ path = \"/up\" }}\n[environments.production]\nnodes = {{ env = \"production\" }}\n{keys}\n"
        );
        let spec = AppSpec::parse(&text, "cutover.toml").map_err(|e| e.to_string())?;
        Ok(EnvironmentPolicy::of(
            spec.environment("cutover.toml", "production").unwrap(),
        ))
    }

    #[test]
    fn approvals_default_to_the_same_for_rollbacks_and_an_hour() {
        let policy = production("approvals = 2").unwrap();
        let rule = ApprovalRule {
            required: 2,
            timeout_ms: 3_600_000,
        };
        assert_eq!(policy.deploy_approval(), Some(rule));
        assert_eq!(policy.rollback_approval(), Some(rule));
        let policy =
            production("approvals = 1\napprovals_for_rollback = 0\napproval_timeout = \"15m\"")
                .unwrap();
        assert_eq!(policy.deploy_approval().unwrap().timeout_ms, 900_000);
        assert_eq!(policy.rollback_approval(), None);
        assert!(policy
            .describe()
            .ends_with("1 approvals (0 for a rollback) within 15m"));
        let none = production("").unwrap();
        assert_eq!(none.deploy_approval(), None);
        assert!(none.describe().ends_with("no approvals"));
    }

    #[test]
    fn approval_keys_that_cannot_work_are_refused_by_name() {
        for (keys, key, says) in [
            ("approvals = 6", "approvals", "more than 5"),
            (
                "approvals_for_rollback = 9",
                "approvals_for_rollback",
                "more than 5",
            ),
            (
                "approval_timeout = \"30m\"",
                "approval_timeout",
                "nothing needs an approval",
            ),
            (
                "approvals = 1\napproval_timeout = \"10s\"",
                "approval_timeout",
                "between 1m and 7d",
            ),
            (
                "approvals = 1\napproval_timeout = \"8d\"",
                "approval_timeout",
                "between 1m and 7d",
            ),
        ] {
            let error = production(keys).unwrap_err();
            assert!(
                error.contains(key) && error.contains(says),
                "{keys}: {error}"
            );
        }
    }
}
