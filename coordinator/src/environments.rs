//! Which nodes an environment covers is the coordinator's to keep, not
//! each spec's: a deployer limited to staging must not point "staging" at
//! production's nodes, with a deploy or with a job. The first deploy (or
//! `jobs apply`) pins it, only by someone allowed to (an admin or a
//! deployer of every environment); later specs must select the same nodes
//! unless such a caller changes it.

use std::collections::BTreeMap;

use crate::store::{Store, StoreError};

/// Pins (or checks) `env`'s selector: `Ok(Err(why))` when the caller may
/// not.
pub async fn pin(
    store: &Store,
    env: &str,
    selector: &BTreeMap<String, String>,
    may_pin: bool,
    by: &str,
) -> Result<Result<(), String>, StoreError> {
    let pinned = store.releases.environment(env).await?;
    if pinned.as_ref() == Some(selector) {
        return Ok(Ok(()));
    }
    if !may_pin {
        return Ok(Err(match pinned {
            Some(pinned) => format!(
                "environment {env} selects {} on this coordinator, but the spec says {}; only an admin (or a deployer of every environment) can change that",
                show_selector(&pinned),
                show_selector(selector)
            ),
            None => format!(
                "environment {env} has never been deployed: an admin (or a deployer of every environment) deploys it first, which pins the nodes it selects"
            ),
        }));
    }
    store.releases.pin_environment(env, selector).await?;
    tracing::info!(env = %env, selector = %show_selector(selector), by = %by, "environment pinned");
    Ok(Ok(()))
}

pub fn show_selector(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "every node".into();
    }
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
