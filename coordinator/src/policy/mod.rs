//! What an environment allows, beyond who may deploy there: the releases
//! it takes (`promotion`: only what soaked in another environment) and
//! when (`freeze` windows). Like the nodes an environment selects
//! (`environments.rs`), the policy is the coordinator's to keep, not each
//! spec's: a deployer must not lift production's rules by sending a spec
//! without them. The first deploy pins it; only an admin changes it.
//! Admins can step past both rules for one deploy (`--break-glass`).

pub mod freeze;
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
        }
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
        format!("{promotion}, {freeze}")
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

/// "30m", "1h 30m", "0s".
pub fn show_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}
