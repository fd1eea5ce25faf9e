//! The promotion rule (`promotion = { from, min_soak }`): an environment
//! takes only an artifact (or image) digest that has been stable in
//! another one for long enough, whether it comes with `cutover promote` or
//! with a plain deploy of the same digest. A release is stable in an
//! environment while it is current there after a successful rollout; a
//! release it replaced keeps the time it was.

use cutover_proto::v1 as pb;

use super::{show_duration, EnvironmentPolicy};
use crate::rollout::model::StoredRelease;
use crate::store::{ReleaseRecord, ReleaseState, Store, StoreError};

/// The longest a digest was stable in an environment without a break,
/// as one or more of its releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Soak {
    pub release_id: String,
    pub since_ms: i64,
    pub soaked_ms: i64,
}

/// How long `digest` has been stable in the environment whose release
/// history is `history`, at `now_ms`; `None` if it never was. Releases of
/// the same digest that followed each other without a gap (a config-only
/// release, `cutover config set`, changes the environment, not the build)
/// count as one stretch, named after its newest release.
pub fn soak(history: &[ReleaseRecord], digest: &str, now_ms: i64) -> Option<Soak> {
    let mut stretches: Vec<Soak> = history
        .iter()
        .filter(|r| r.release.digest() == digest && r.state == ReleaseState::Stable)
        .filter_map(|r| {
            // Records from before the times were kept: a current one
            // counts from its deploy (its rollout's few minutes too); one
            // replaced since is not known to have soaked.
            let since = match r.current_since_ms {
                0 if r.current => r.deployed_at_ms,
                0 => return None,
                since => since,
            };
            let until = match (r.current, r.current_until_ms) {
                (true, _) => now_ms,
                (false, 0) => return None,
                (false, until) => until,
            };
            Some(Soak {
                release_id: r.release.id().to_string(),
                since_ms: since,
                soaked_ms: (until - since).max(0),
            })
        })
        .collect();
    stretches.sort_by_key(|s| s.since_ms);
    let mut joined: Vec<Soak> = Vec::new();
    for stretch in stretches {
        match joined.last_mut() {
            Some(last) if stretch.since_ms <= last.since_ms + last.soaked_ms => {
                let until =
                    (stretch.since_ms + stretch.soaked_ms).max(last.since_ms + last.soaked_ms);
                last.soaked_ms = until - last.since_ms;
                last.release_id = stretch.release_id;
            }
            _ => joined.push(stretch),
        }
    }
    joined.into_iter().max_by_key(|s| s.soaked_ms)
}

/// The refusal of `release` of `service` in `env` under `policy`'s
/// promotion rule, if it breaks it. The release `env` runs already (a
/// repair, or a change of its environment only) passed the rule when it
/// came.
pub async fn check(
    store: &Store,
    env: &str,
    policy: &EnvironmentPolicy,
    release: &pb::Release,
    now_ms: i64,
) -> Result<Option<String>, StoreError> {
    let Some(rule) = &policy.promotion else {
        return Ok(None);
    };
    let service = release.service.as_str();
    let release = StoredRelease(release.clone());
    let digest = release.digest();
    if let Some(current) = store.releases.current(env, service).await? {
        if current.release.digest() == digest {
            return Ok(None);
        }
    }
    let what = match release.image() {
        "" => format!("artifact {digest}"),
        image => format!("image {image}"),
    };
    let from = &rule.from;
    let min = show_duration(rule.min_soak_ms);
    let history = store.releases.history(from, service).await?;
    let break_glass = "or an admin deploys it now with --break-glass --reason TEXT (audited)";
    Ok(match soak(&history, digest, now_ms) {
        Some(s) if s.soaked_ms >= rule.min_soak_ms as i64 => None,
        Some(s) => Some(format!(
            "{what} of {service} has been stable in {from} for {} (as {}, since {}), under the {min} environment {env} asks for; promote it once it soaked, in {}: `cutover promote {service} --from {from} --to {env} --release {}`; {break_glass}",
            show_duration(s.soaked_ms as u64),
            s.release_id,
            rfc3339(s.since_ms),
            // Rounded up: "in 20m" rather than "in 19m 59s".
            show_duration(
                rule.min_soak_ms
                    .saturating_sub(s.soaked_ms as u64)
                    .div_ceil(1000)
                    * 1000
            ),
            s.release_id,
        )),
        None => Some(format!(
            "{what} of {service} has never been stable in {from}, and environment {env} takes only releases stable there for {min}; deploy it to {from} first, then `cutover promote {service} --from {from} --to {env}`; {break_glass}"
        )),
    })
}

/// The release of `service` that `cutover promote` takes from `from`: the
/// one named, or the current one; it must be stable there. `Ok(Err(why))`
/// when there is none.
pub async fn source(
    store: &Store,
    from: &str,
    service: &str,
    release_id: Option<&str>,
) -> Result<Result<ReleaseRecord, String>, StoreError> {
    let history = store.releases.history(from, service).await?;
    let listed = format!("`cutover releases {service} --env {from}` lists them");
    let record = match release_id {
        Some(id) => history.into_iter().find(|r| r.release.id() == id),
        None => history.into_iter().find(|r| r.current),
    };
    let Some(record) = record else {
        return Ok(Err(match release_id {
            Some(id) => format!("{service} has no release {id} in environment {from}; {listed}"),
            None => format!(
                "{service} has no current release in environment {from}: deploy it there first, or name one with --release ({listed})"
            ),
        }));
    };
    if record.state != ReleaseState::Stable {
        return Ok(Err(format!(
            "release {} of {service} is {} in environment {from}, not stable: only a release that rolled out there successfully is promoted; {listed}",
            record.release.id(),
            record.state.as_str()
        )));
    }
    Ok(Ok(record))
}

fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, digest: &str, state: ReleaseState, current: bool) -> ReleaseRecord {
        ReleaseRecord {
            app: "shop".into(),
            env: "staging".into(),
            service: "web".into(),
            release: StoredRelease(pb::Release {
                release_id: id.into(),
                service: "web".into(),
                version: "1".into(),
                artifact: Some(pb::Artifact {
                    url: "coordinator:".into(),
                    digest: digest.into(),
                }),
                ..Default::default()
            }),
            state,
            current,
            deployed_by: "alice".into(),
            deployed_at_ms: 1_000,
            rollout_id: "web-1".into(),
            selector: Default::default(),
            strategy: crate::rollout::sim::strategy(),
            note: String::new(),
            migration: None,
            current_since_ms: 0,
            current_until_ms: 0,
            promoted_from: String::new(),
            config: Default::default(),
        }
    }

    #[test]
    fn a_config_change_does_not_restart_the_soak_but_a_break_does() {
        let mut first = record("web-a1", "sha256:a", ReleaseState::Stable, false);
        (first.current_since_ms, first.current_until_ms) = (10_000, 40_000);
        // `cutover config set`: the same build, another release, at once.
        let mut config = record("web-a2", "sha256:a", ReleaseState::Stable, true);
        config.current_since_ms = 40_000;
        let joined = soak(&[config.clone(), first.clone()], "sha256:a", 100_000).unwrap();
        assert_eq!(
            (
                joined.release_id.as_str(),
                joined.since_ms,
                joined.soaked_ms
            ),
            ("web-a2", 10_000, 90_000)
        );
        // Another build ran in between: the stretches stay apart.
        config.current_since_ms = 60_000;
        let apart = soak(&[first, config], "sha256:a", 100_000).unwrap();
        assert_eq!(
            (apart.release_id.as_str(), apart.soaked_ms),
            ("web-a2", 40_000)
        );
    }

    #[test]
    fn a_digest_soaks_while_current_and_keeps_its_time_once_replaced() {
        let mut now = record("web-a", "sha256:a", ReleaseState::Stable, true);
        now.current_since_ms = 10_000;
        assert_eq!(
            soak(&[now.clone()], "sha256:a", 70_000).unwrap().soaked_ms,
            60_000
        );
        assert_eq!(soak(&[now.clone()], "sha256:b", 70_000), None);
        // Replaced after 5 s: it keeps 5 s whatever the time now.
        let mut replaced = now.clone();
        replaced.current = false;
        replaced.current_until_ms = 15_000;
        assert_eq!(
            soak(&[replaced.clone()], "sha256:a", 999_000)
                .unwrap()
                .soaked_ms,
            5_000
        );
        // The same digest as two releases (another environment variable):
        // the longer counts.
        let mut other = now.clone();
        other.release.0.release_id = "web-a2".into();
        other.current_since_ms = 68_000;
        let best = soak(&[other, replaced], "sha256:a", 70_000).unwrap();
        assert_eq!((best.release_id.as_str(), best.soaked_ms), ("web-a", 5_000));
    }

    #[test]
    fn only_a_stable_release_soaks() {
        for state in [
            ReleaseState::Deploying,
            ReleaseState::Failed,
            ReleaseState::RolledBack,
            ReleaseState::Aborted,
            ReleaseState::Reverted,
        ] {
            let mut r = record("web-a", "sha256:a", state, false);
            r.current_since_ms = 1;
            r.current_until_ms = 50_000;
            assert_eq!(soak(&[r], "sha256:a", 70_000), None, "{state:?}");
        }
        // A record from before the times were kept: a current one counts
        // from its deploy, a replaced one not at all.
        let legacy = record("web-a", "sha256:a", ReleaseState::Stable, true);
        assert_eq!(
            soak(std::slice::from_ref(&legacy), "sha256:a", 5_000)
                .unwrap()
                .soaked_ms,
            4_000
        );
        let mut replaced = legacy;
        replaced.current = false;
        assert_eq!(soak(&[replaced], "sha256:a", 5_000), None);
    }
}
