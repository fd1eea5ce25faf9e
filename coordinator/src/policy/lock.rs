//! Operators' locks on services (`cutover lock SERVICE --env ENV --reason
//! TEXT`, Kamal's `lock acquire -m`): while someone works on a service by
//! hand, no deploy, rollback, promotion, config change, scaling or retry of
//! it starts, and each refusal says who locked it, when and why. Rollouts
//! under way go on (pause them), and the converger still returns drifted
//! nodes to the current release: a lock stops changes, not repairs. An
//! admin steps past one with `--break-glass --reason TEXT`.

use std::time::Duration;

use crate::store::{ManualLock, Store, StoreError};

/// Why `service` of `env` may not change now, if it is locked.
pub async fn refusal(
    store: &Store,
    env: &str,
    service: &str,
    now_ms: i64,
) -> Result<Option<String>, StoreError> {
    Ok(store
        .rollouts
        .manual_lock(env, service)
        .await?
        .map(|lock| locked(&lock, now_ms)))
}

/// What a refusal says about `lock`.
pub fn locked(lock: &ManualLock, now_ms: i64) -> String {
    let ManualLock {
        env,
        service,
        reason,
        by,
        at_ms,
    } = lock;
    format!(
        "{service} in {env} is locked by {by} since {} ({} ago): {reason:?}; `cutover unlock {service} --env {env}` once that is done, or an admin goes ahead with --break-glass --reason TEXT",
        utc(*at_ms),
        ago(now_ms - at_ms)
    )
}

/// A moment as operators read it in a refusal, to the minute.
pub fn utc(at_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(at_ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|_| format!("{at_ms} ms"))
}

/// A span rounded to what a person reads: seconds under a minute, then
/// minutes.
fn ago(ms: i64) -> String {
    let secs = u64::try_from(ms / 1000).unwrap_or(0);
    let rounded = if secs < 60 { secs } else { secs / 60 * 60 };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_who_when_why_and_the_ways_on() {
        let lock = ManualLock {
            env: "production".into(),
            service: "web".into(),
            reason: "reindexing orders".into(),
            by: "dana".into(),
            at_ms: 1_796_000_000_000,
        };
        let text = locked(
            &lock,
            1_796_000_000_000 + 2 * 3_600_000 + 5 * 60_000 + 7_000,
        );
        assert_eq!(
            text,
            "web in production is locked by dana since 2026-11-30 00:53 UTC (2h 5m ago): \"reindexing orders\"; `cutover unlock web --env production` once that is done, or an admin goes ahead with --break-glass --reason TEXT"
        );
        assert!(locked(&lock, lock.at_ms + 42_000).contains("(42s ago)"));
    }
}
