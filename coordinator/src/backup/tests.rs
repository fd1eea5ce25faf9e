use std::path::{Path, PathBuf};

use super::restore::{restore, RestoreError, Target};
use super::*;
use crate::secrets::{MasterKeys, Secrets};
use crate::store::{AuditRecord, NewEvent, OperatorRecord, Page, Store};

/// A coordinator's store on sled with records of every kind a repository
/// writes here, a secret sealed with `master_key`.
pub(super) struct Source {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub secrets: Secrets,
}

pub(super) async fn source(master_key: &Path) -> Source {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sled(dir.path()).unwrap();
    let secrets = Secrets::new(store.clone(), Some(MasterKeys::load(master_key).unwrap()));
    secrets
        .set("prod", "DB_PASSWORD", b"hunter2", "operator/alice", None)
        .await
        .unwrap();
    store
        .access
        .put_operator(&OperatorRecord::issued_offline("alice"))
        .await
        .unwrap();
    for n in 0..3 {
        store.access.append_audit(audit(n)).await.unwrap();
        store.events.append(event(n)).await.unwrap();
        store.rollouts.next_number().await.unwrap();
    }
    Source {
        dir,
        store,
        secrets,
    }
}

pub(super) fn audit(n: i64) -> AuditRecord {
    AuditRecord {
        seq: 0,
        at_ms: n,
        who: "operator/alice".into(),
        action: "deploy".into(),
        arguments: "{}".into(),
        outcome: "ok".into(),
    }
}

fn event(n: i64) -> NewEvent {
    NewEvent {
        kind: "test",
        node_id: String::new(),
        node_name: String::new(),
        message: format!("event {n}"),
    }
}

pub(super) fn master_key(dir: &Path) -> PathBuf {
    let path = dir.join("master.key");
    MasterKeys::create(&path).unwrap();
    path
}

pub(super) async fn backup_file(store: &Store, dir: &Path) -> PathBuf {
    let path = dir.join("coordinator.backup");
    let snapshot = store.snapshot().await.unwrap();
    std::fs::write(&path, encode(&snapshot, 1_700_000_000_000)).unwrap();
    path
}

#[tokio::test]
async fn a_backup_restores_every_record_and_numbers_go_on_above_it() {
    let work = tempfile::tempdir().unwrap();
    let key = master_key(work.path());
    let source = source(&key).await;
    let file = backup_file(&source.store, work.path()).await;
    let before = source.store.snapshot().await.unwrap();
    let last_audit = source
        .store
        .access
        .audit(0, Page::oldest(0, 100))
        .await
        .unwrap();
    let last_audit = last_audit.last().unwrap().seq;

    let data_dir = work.path().join("data");
    let header = restore(&file, Target::DataDir(&data_dir), Some(&key))
        .await
        .unwrap();
    assert_eq!(header.format_version, FORMAT_VERSION);
    assert_eq!(header.tables["secrets"], 1);
    assert_eq!(header.logs["audit"], 3);
    assert!(!data_dir.join("store.restoring").exists());
    assert_eq!(
        cutover_common::modes::mode_of(&data_dir.join("store")).unwrap(),
        0o700
    );

    let restored = Store::open_sled(&data_dir.join("store")).unwrap();
    let after = restored.snapshot().await.unwrap();
    assert_eq!(after.tables, before.tables);
    assert_eq!(after.logs, before.logs);
    let secrets = Secrets::new(restored.clone(), Some(MasterKeys::load(&key).unwrap()));
    assert_eq!(
        secrets.value("prod", "DB_PASSWORD", 1).await.unwrap(),
        source
            .secrets
            .value("prod", "DB_PASSWORD", 1)
            .await
            .unwrap()
    );
    let seq = restored.access.append_audit(audit(9)).await.unwrap().seq;
    assert!(seq > last_audit, "audit seq {seq} after {last_audit}");
    assert_eq!(restored.rollouts.next_number().await.unwrap(), 4);
}

#[tokio::test]
async fn a_data_dir_with_anything_in_it_is_refused_and_left_alone() {
    let work = tempfile::tempdir().unwrap();
    let key = master_key(work.path());
    let source = source(&key).await;
    let file = backup_file(&source.store, work.path()).await;
    let data_dir = work.path().join("data");
    std::fs::create_dir_all(data_dir.join("artifacts")).unwrap();

    let error = restore(&file, Target::DataDir(&data_dir), Some(&key))
        .await
        .unwrap_err();
    assert!(matches!(error, RestoreError::NotEmpty { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&data_dir.display().to_string()) && message.contains("artifacts"),
        "{message}"
    );
    let left: Vec<_> = std::fs::read_dir(&data_dir).unwrap().collect();
    assert_eq!(left.len(), 1, "nothing added");

    // An empty dir that exists is fine.
    std::fs::remove_dir(data_dir.join("artifacts")).unwrap();
    restore(&file, Target::DataDir(&data_dir), Some(&key))
        .await
        .unwrap();
}

#[tokio::test]
async fn secrets_that_the_master_key_does_not_open_refuse_the_restore() {
    let work = tempfile::tempdir().unwrap();
    let key = master_key(work.path());
    let source = source(&key).await;
    let file = backup_file(&source.store, work.path()).await;
    let other = tempfile::tempdir().unwrap();
    let other_key = master_key(other.path());
    let data_dir = work.path().join("data");

    let error = restore(&file, Target::DataDir(&data_dir), Some(&other_key))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, RestoreError::MasterKey { .. }), "{message}");
    assert!(
        message.contains(&other_key.display().to_string()) && message.contains("DB_PASSWORD"),
        "{message}"
    );
    let error = restore(&file, Target::DataDir(&data_dir), None)
        .await
        .unwrap_err();
    assert!(matches!(error, RestoreError::NoMasterKey), "{error}");
    assert!(!data_dir.exists(), "a refused restore creates nothing");
}

#[tokio::test]
async fn a_damaged_file_is_refused_naming_it_and_why() {
    let work = tempfile::tempdir().unwrap();
    let key = master_key(work.path());
    let source = source(&key).await;
    let file = backup_file(&source.store, work.path()).await;
    let whole = std::fs::read(&file).unwrap();
    let data_dir = work.path().join("data");

    let refused = |bytes: Vec<u8>| {
        let (file, data_dir, key) = (file.clone(), data_dir.clone(), key.clone());
        async move {
            std::fs::write(&file, bytes).unwrap();
            let error = restore(&file, Target::DataDir(&data_dir), Some(&key))
                .await
                .unwrap_err();
            assert!(
                error.to_string().contains(&file.display().to_string()),
                "{error}"
            );
            assert!(!data_dir.exists(), "a refused restore creates nothing");
            match error {
                RestoreError::File { source, .. } => source,
                other => panic!("not refused as a file: {other}"),
            }
        }
    };
    let truncated = refused(whole[..whole.len() - 10].to_vec()).await;
    assert!(
        matches!(truncated, BackupError::Truncated { .. }),
        "{truncated}"
    );
    let mut flipped = whole.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let flipped = refused(flipped).await;
    assert!(matches!(flipped, BackupError::Checksum), "{flipped}");
    let mut longer = whole.clone();
    longer.push(0);
    let longer = refused(longer).await;
    assert!(
        matches!(longer, BackupError::TrailingBytes { .. }),
        "{longer}"
    );
    let other = refused(b"PK\x03\x04 a zip file".to_vec()).await;
    assert!(matches!(other, BackupError::NotABackup), "{other}");
    let header_cut = refused(whole[..MAGIC.len() + 20].to_vec()).await;
    assert!(
        matches!(header_cut, BackupError::BadHeader(_)),
        "{header_cut}"
    );
    let newer = String::from_utf8_lossy(&whole).replacen(
        &format!("\"format_version\":{FORMAT_VERSION}"),
        "\"format_version\":99",
        1,
    );
    let newer = refused(newer.into_bytes()).await;
    assert!(
        matches!(newer, BackupError::NewerFormat { found: 99, .. }),
        "{newer}"
    );
}

#[tokio::test]
async fn a_table_this_version_does_not_know_is_refused_by_name() {
    let snapshot = Snapshot {
        tables: vec![(Table::Meta, vec![(b"k".to_vec(), b"v".to_vec())])],
        logs: Vec::new(),
        last_seq: 7,
    };
    let file = encode(&snapshot, 0);
    let (header, decoded) = decode(&file).unwrap();
    assert_eq!(decoded, snapshot);
    assert_eq!(header.last_seq, 7);
    // The same file as a newer version with a `jobz` table would write it
    // (a name of the same length keeps every offset), checksum and all.
    let mut header = read_header(&file).unwrap();
    let content = String::from_utf8_lossy(&file[file.len() - header.content_bytes as usize..])
        .replace("meta", "jobz")
        .into_bytes();
    header.content_sha256 = sha256_hex(&content);
    header.tables = [("jobz".to_string(), 1)].into();
    let mut renamed = MAGIC.to_vec();
    renamed.extend(serde_json::to_vec(&header).unwrap());
    renamed.push(b'\n');
    renamed.extend(content);
    let error = decode(&renamed).unwrap_err();
    match &error {
        BackupError::UnknownName { kind, name, .. } => {
            assert_eq!((*kind, name.as_str()), ("table", "jobz"));
        }
        other => panic!("{other}"),
    }
}
