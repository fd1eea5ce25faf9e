//! An environment's policy at deploy time, on a clock fixed where the
//! test says: freeze windows in their zone, the promotion rule's soak,
//! who may pin or change the policy, and that a refused deploy pins
//! nothing. No node is enrolled, so a deploy the policy lets through ends
//! at `NoNodes`: the first check after it.

use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::model::StoredRelease;
use super::{DeployRequest, RolloutError, Rollouts};
use crate::clock::Clock;
use crate::images::ImageResolver;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::secrets::Secrets;
use crate::store::memory::MemoryBackend;
use crate::store::{ReleaseRecord, ReleaseState, Store};

const SPEC: &str = r#"
app = "shop"

[services.web]
command = ["./web"]
listen = "127.0.0.1:8080"
health = { path = "/up" }

[environments.staging]
nodes = { env = "staging" }

[environments.production]
nodes = { env = "production" }
promotion = { from = "staging", min_soak = "30m" }
freeze = ["Fri 16:00 - Mon 08:00", "2026-12-20 - 2027-01-02"]
timezone = "Europe/Berlin"
"#;

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// Milliseconds of civil time `civil` in Berlin.
fn berlin(civil: &str) -> i64 {
    let dt: jiff::civil::DateTime = civil.parse().unwrap();
    dt.to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
        .unwrap()
        .timestamp()
        .as_millisecond()
}

struct Coordinator {
    rollouts: Arc<Rollouts>,
    store: Store,
    now_ms: i64,
    _dir: tempfile::TempDir,
}

/// A coordinator whose clock reads `now_ms`, over `store`.
async fn coordinator(store: Store, now_ms: i64) -> Coordinator {
    let journal = Journal::start(store.clone(), Default::default());
    let registry = Registry::load(store.clone(), journal, Duration::from_secs(10))
        .await
        .unwrap()
        .with_clock(Clock::virtual_at(now_ms));
    let dir = tempfile::tempdir().unwrap();
    let rollouts = Rollouts::new(
        store.clone(),
        Arc::new(registry),
        Arc::new(Metrics::new()),
        Arc::new(crate::artifacts::ArtifactStore::open(dir.path().to_path_buf(), 1 << 20).unwrap()),
        Arc::new(ImageResolver::new(None, vec![]).unwrap()),
        Arc::new(Secrets::new(store.clone(), None)),
        CancellationToken::new(),
    );
    Coordinator {
        rollouts,
        store,
        now_ms,
        _dir: dir,
    }
}

fn request(env: &str, spec: &str, admin: bool) -> DeployRequest {
    DeployRequest {
        spec_text: spec.to_string(),
        spec_file: "cutover.toml".into(),
        env: env.into(),
        service: Some("web".into()),
        version: "1.2.0".into(),
        artifact: Some(pb::Artifact {
            url: "https://artifacts.example/web.tar.gz".into(),
            digest: DIGEST.into(),
        }),
        image: None,
        allow_unreachable: false,
        skip_migrate: false,
        skip_backup_gate: false,
        migrate_node: None,
        by: if admin { "root" } else { "dana" }.into(),
        may_pin_environments: true,
        may_set_policy: admin,
        break_glass: None,
        promoted_from: None,
    }
}

async fn deploy(c: &Coordinator, request: DeployRequest) -> RolloutError {
    match c.rollouts.deploy(request).await {
        Ok(_) => panic!("no node is enrolled: nothing can start"),
        Err(error) => error,
    }
}

/// `DIGEST` current in staging since `minutes` before `c`'s now.
async fn stable_in_staging(c: &Coordinator, minutes: i64) {
    c.store
        .releases
        .put(&ReleaseRecord {
            app: "shop".into(),
            env: "staging".into(),
            service: "web".into(),
            release: StoredRelease(pb::Release {
                release_id: "web-1.2.0-0badcafe".into(),
                service: "web".into(),
                version: "1.2.0".into(),
                artifact: Some(pb::Artifact {
                    url: "https://artifacts.example/web.tar.gz".into(),
                    digest: DIGEST.into(),
                }),
                ..Default::default()
            }),
            state: ReleaseState::Stable,
            current: true,
            deployed_by: "dana".into(),
            deployed_at_ms: c.now_ms - minutes * 60_000 - 60_000,
            rollout_id: "web-1".into(),
            selector: [("env".to_string(), "staging".to_string())].into(),
            strategy: crate::rollout::sim::strategy(),
            note: String::new(),
            migration: None,
            current_since_ms: c.now_ms - minutes * 60_000,
            current_until_ms: 0,
            promoted_from: String::new(),
            config: Default::default(),
        })
        .await
        .unwrap();
}

fn new_store() -> Store {
    Store::new(Arc::new(MemoryBackend::new()))
}

#[tokio::test]
async fn a_freeze_window_refuses_deploys_in_its_zone_until_it_ends() {
    // Friday 2026-12-04, 17:00 in Berlin: inside "Fri 16:00 - Mon 08:00".
    let c = coordinator(new_store(), berlin("2026-12-04T17:00")).await;
    stable_in_staging(&c, 60).await;
    let RolloutError::Frozen(message) = deploy(&c, request("production", SPEC, true)).await else {
        panic!("a deploy inside the window is refused");
    };
    assert!(
        message.contains(
            "\"Fri 16:00 - Mon 08:00\" (Europe/Berlin) runs until Mon 2026-12-07 08:00 CET"
        ),
        "{message}"
    );
    assert!(message.contains("--break-glass --reason TEXT"), "{message}");
    assert_eq!(
        c.store.releases.policy("production").await.unwrap(),
        None,
        "a refused deploy pins nothing"
    );
    // An admin breaks glass: the freeze is no longer in the way.
    let mut glass = request("production", SPEC, true);
    glass.break_glass = Some("checkout is down".into());
    assert!(matches!(
        deploy(&c, glass).await,
        RolloutError::NoNodes { .. }
    ));

    // 15:59 the same Friday: open (the window is Berlin's 16:00, 15:00 UTC).
    let c = coordinator(new_store(), berlin("2026-12-04T15:59")).await;
    stable_in_staging(&c, 60).await;
    let error = deploy(&c, request("production", SPEC, true)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
    // Monday 08:00: thawed. Christmas Eve: the dated window.
    for (at, frozen) in [("2026-12-07T08:00", false), ("2026-12-24T10:00", true)] {
        let c = coordinator(new_store(), berlin(at)).await;
        stable_in_staging(&c, 60).await;
        let error = deploy(&c, request("production", SPEC, true)).await;
        assert_eq!(
            matches!(error, RolloutError::Frozen(_)),
            frozen,
            "{at}: {error}"
        );
    }
    // Staging has no window: it deploys on a Friday evening.
    let c = coordinator(new_store(), berlin("2026-12-04T17:00")).await;
    let error = deploy(&c, request("staging", SPEC, true)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
}

#[tokio::test]
async fn production_takes_only_a_digest_that_soaked_in_staging() {
    let tuesday = berlin("2026-12-08T10:00");
    let c = coordinator(new_store(), tuesday).await;
    let RolloutError::NotPromoted(message) = deploy(&c, request("production", SPEC, true)).await
    else {
        panic!("a digest staging never ran is refused");
    };
    assert!(
        message.contains(&format!(
            "artifact {DIGEST} of web has never been stable in staging"
        )),
        "{message}"
    );
    assert!(
        message.contains("`cutover promote web --from staging --to production`"),
        "{message}"
    );

    stable_in_staging(&c, 10).await;
    let RolloutError::NotPromoted(message) = deploy(&c, request("production", SPEC, true)).await
    else {
        panic!("10 minutes of the 30 are not enough");
    };
    assert!(
        message.contains("has been stable in staging for 10m (as web-1.2.0-0badcafe"),
        "{message}"
    );
    assert!(
        message.contains("under the 30m environment production asks for"),
        "{message}"
    );
    assert!(message.contains("in 20m"), "{message}");
    assert!(
        message.contains(
            "`cutover promote web --from staging --to production --release web-1.2.0-0badcafe`"
        ),
        "{message}"
    );
    let mut glass = request("production", SPEC, true);
    glass.break_glass = Some("a fix for the checkout".into());
    assert!(matches!(
        deploy(&c, glass).await,
        RolloutError::NoNodes { .. }
    ));

    let c = coordinator(new_store(), tuesday).await;
    stable_in_staging(&c, 31).await;
    let error = deploy(&c, request("production", SPEC, true)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
}

#[tokio::test]
async fn only_an_admin_sets_or_lifts_an_environments_policy() {
    let c = coordinator(new_store(), berlin("2026-12-08T10:00")).await;
    stable_in_staging(&c, 60).await;
    let RolloutError::EnvironmentPinned(message) =
        deploy(&c, request("production", SPEC, false)).await
    else {
        panic!("a deployer does not set a policy");
    };
    assert!(
        message.contains(
            "environment production has no promotion rule, no freeze window, no approvals on this coordinator"
        ),
        "{message}"
    );
    assert!(message.contains("only an admin changes"), "{message}");
    // The admin's deploy pins it, though no node takes it.
    let error = deploy(&c, request("production", SPEC, true)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
    let pinned = c
        .store
        .releases
        .policy("production")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pinned.freeze.len(), 2);
    // A deployer's spec without the freeze is refused; the same spec goes.
    let lifted = SPEC.replace(
        "freeze = [\"Fri 16:00 - Mon 08:00\", \"2026-12-20 - 2027-01-02\"]\n",
        "",
    );
    let RolloutError::EnvironmentPinned(message) =
        deploy(&c, request("production", &lifted, false)).await
    else {
        panic!("a deployer does not lift a freeze");
    };
    assert!(
        message.contains("freeze \"Fri 16:00 - Mon 08:00\""),
        "{message}"
    );
    let error = deploy(&c, request("production", SPEC, false)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
    // Staging's (empty) policy needs nobody.
    let error = deploy(&c, request("staging", SPEC, false)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
}

#[tokio::test]
async fn a_locked_service_takes_no_deploy_rollback_or_scale_until_unlocked() {
    use super::{RollbackRequest, ScaleChange};
    use crate::store::ManualLock;

    let c = coordinator(new_store(), berlin("2026-12-07T10:00")).await;
    stable_in_staging(&c, 60).await;
    // The release before, to roll back to.
    let mut before = c
        .store
        .releases
        .current("staging", "web")
        .await
        .unwrap()
        .unwrap();
    before.release.0.release_id = "web-1.1.0-0ddba11".into();
    before.current = false;
    before.deployed_at_ms -= 3_600_000;
    c.store.releases.put(&before).await.unwrap();

    let lock = ManualLock {
        env: "staging".into(),
        service: "web".into(),
        reason: "reindexing orders".into(),
        by: "erin".into(),
        at_ms: c.now_ms - 10 * 60_000,
    };
    assert_eq!(c.store.rollouts.put_manual_lock(&lock).await.unwrap(), None);
    let second = ManualLock {
        by: "dana".into(),
        ..lock.clone()
    };
    assert_eq!(
        c.store.rollouts.put_manual_lock(&second).await.unwrap(),
        Some(lock.clone()),
        "a second lock is refused with the first"
    );

    let rollback = |break_glass: Option<&str>| RollbackRequest {
        env: "staging".into(),
        service: "web".into(),
        to: None,
        allow_unreachable: false,
        force: false,
        ignore_schema: None,
        by: "dana".into(),
        deployment: String::new(),
        careful: false,
        break_glass: break_glass.map(Into::into),
    };
    let scale = ScaleChange {
        env: "staging".into(),
        service: "web".into(),
        instances: 2,
        by: "dana".into(),
        allow_unreachable: false,
        break_glass: None,
    };
    let refusals = [
        deploy(&c, request("staging", SPEC, false)).await,
        c.rollouts.rollback(rollback(None)).await.err().unwrap(),
        c.rollouts.scale(scale).await.err().unwrap(),
    ];
    for error in refusals {
        let RolloutError::ManuallyLocked(message) = error else {
            panic!("a locked service is refused: {error}");
        };
        assert!(
            message.starts_with("web in staging is locked by erin since 2026-12-07 08:50 UTC (10m ago): \"reindexing orders\"; `cutover unlock web --env staging`"),
            "{message}"
        );
    }
    // An admin breaks glass: the lock is no longer in the way.
    let mut glass = request("staging", SPEC, true);
    glass.break_glass = Some("checkout is down".into());
    assert!(matches!(
        deploy(&c, glass).await,
        RolloutError::NoNodes { .. }
    ));
    let error = c
        .rollouts
        .rollback(rollback(Some("checkout is down")))
        .await;
    assert!(
        matches!(error, Err(RolloutError::NoNodes { .. })),
        "{:?}",
        error.err()
    );

    // Unlocked: the same deploy goes past it.
    assert_eq!(
        c.store
            .rollouts
            .remove_manual_lock("staging", "web")
            .await
            .unwrap(),
        Some(lock)
    );
    assert_eq!(c.store.rollouts.manual_locks("").await.unwrap(), vec![]);
    let error = deploy(&c, request("staging", SPEC, false)).await;
    assert!(matches!(error, RolloutError::NoNodes { .. }), "{error}");
    let error = c.rollouts.rollback(rollback(None)).await;
    assert!(
        matches!(error, Err(RolloutError::NoNodes { .. })),
        "{:?}",
        error.err()
    );
}
