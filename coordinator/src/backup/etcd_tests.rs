//! Restores and migrations onto the test etcd cluster (`scripts/etcd-env.sh`).

use super::restore::{migrate, restore, RestoreError, Target};
use super::tests::{backup_file, master_key, source, Source};
use crate::secrets::{MasterKeys, Secrets};
use crate::store::etcd::tests::test_settings;
use crate::store::Store;

/// A prefix no other test (or run) uses.
fn fresh_prefix(dir: &std::path::Path) -> String {
    format!("test{}/", dir.display())
}

#[tokio::test]
async fn a_stopped_coordinators_embedded_store_migrates_onto_etcd_whole() {
    let work = tempfile::tempdir().unwrap();
    let key = master_key(work.path());
    let Source {
        dir,
        store,
        secrets,
    } = source(&key).await;
    let before = store.snapshot().await.unwrap();
    let password = secrets.value("prod", "DB_PASSWORD", 1).await.unwrap();
    // Stopped: the embedded store is opened by one process at a time.
    drop((store, secrets));

    let etcd = test_settings(fresh_prefix(work.path()));
    let header = migrate(dir.path(), &etcd, Some(&key)).await.unwrap();
    assert_eq!(header.tables["secrets"], 1);
    assert_eq!(header.logs["audit"], 3);

    let migrated = Store::open_etcd(&etcd).unwrap();
    let after = migrated.snapshot().await.unwrap();
    assert_eq!(after.tables, before.tables);
    assert_eq!(after.logs, before.logs);
    let secrets = Secrets::new(migrated.clone(), Some(MasterKeys::load(&key).unwrap()));
    assert_eq!(
        secrets.value("prod", "DB_PASSWORD", 1).await.unwrap(),
        password
    );
    // Numbers go on above everything copied.
    assert_eq!(migrated.rollouts.next_number().await.unwrap(), 4);
    let last_audit = before
        .logs
        .iter()
        .flat_map(|(_, records)| records.iter().map(|(seq, _)| *seq))
        .max()
        .unwrap();
    let seq = migrated
        .access
        .append_audit(super::tests::audit(9))
        .await
        .unwrap()
        .seq;
    assert!(seq > last_audit, "audit seq {seq} after {last_audit}");

    // Again onto the same prefix: refused, nothing changed.
    let held = migrated.snapshot().await.unwrap();
    let error = migrate(dir.path(), &etcd, Some(&key)).await.unwrap_err();
    assert!(
        matches!(&error, RestoreError::EtcdNotEmpty { prefix, .. } if *prefix == etcd.prefix),
        "{error}"
    );
    assert!(
        error.to_string().contains("etcdctl del --prefix"),
        "{error}"
    );
    let now = migrated.snapshot().await.unwrap();
    assert_eq!((now.tables, now.logs), (held.tables, held.logs));
}

#[tokio::test]
async fn a_dir_without_a_store_and_secrets_that_do_not_open_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let key = master_key(work.path());
    let etcd = test_settings(fresh_prefix(work.path()));
    let empty = work.path().join("store");
    std::fs::create_dir(&empty).unwrap();
    let error = migrate(&empty, &etcd, Some(&key)).await.unwrap_err();
    assert!(matches!(error, RestoreError::NoSledStore { .. }), "{error}");
    assert!(
        std::fs::read_dir(&empty).unwrap().next().is_none(),
        "no store created there"
    );

    let source = source(&key).await;
    let file = backup_file(&source.store, work.path()).await;
    let other_key = work.path().join("other.key");
    MasterKeys::create(&other_key).unwrap();
    let error = restore(&file, Target::Etcd(&etcd), Some(&other_key))
        .await
        .unwrap_err();
    assert!(matches!(error, RestoreError::MasterKey { .. }), "{error}");
    let store = Store::open_etcd(&etcd).unwrap();
    assert!(
        store
            .snapshot()
            .await
            .unwrap()
            .tables
            .iter()
            .all(|(_, rows)| rows.is_empty()),
        "a refused restore writes nothing"
    );

    // The right key: a backup file restores into the etcd prefix.
    let header = restore(&file, Target::Etcd(&etcd), Some(&key))
        .await
        .unwrap();
    assert_eq!(header.tables["secrets"], 1);
    assert_eq!(
        store.snapshot().await.unwrap().tables,
        source.store.snapshot().await.unwrap().tables
    );
}
