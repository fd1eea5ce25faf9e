//! `cutover admin restore`: a backup file into an empty store (a data
//! dir's, or an etcd prefix), with the coordinator stopped; and `cutover
//! admin migrate-store`, a stopped coordinator's embedded store copied onto
//! etcd the same way. Offline and explicit rather than a `server` flag:
//! a flag left in a unit file would restore again at every restart, and a
//! restore has to finish (or fail) before anything serves from the dir.
//!
//! The file holds no key, so the restore checks what the restored
//! coordinator will need: every sealed secret opens with the configured
//! master key file (restored from the PKI dir's own backup).

use std::path::{Path, PathBuf};

use super::{decode, encode, BackupError, Header};
use crate::config::{CoordinatorConfig, EtcdSettings, StoreKind};
use crate::secrets::{MasterKeys, SecretError};
use crate::store::backend::Table;
use crate::store::{SecretRecord, Snapshot, Store, StoreError};

/// Where the restore builds the store before it takes its place, so a
/// failed one leaves no `store` behind.
const STAGING: &str = "store.restoring";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read backup file {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("backup file {path} is refused: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: BackupError,
    },
    #[error("data dir {path} is not empty (it holds {entries}); restore only into an empty or absent data dir: stop the coordinator and move the dir aside first")]
    NotEmpty { path: PathBuf, entries: String },
    #[error("data dir {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the backup holds sealed secrets but the config sets no master_key_file: set it to the master key file backed up with the PKI dir")]
    NoMasterKey,
    #[error("the backup's secrets do not open with master key file {path}: {source}; put back the master key file that was current when the backup was taken (it is backed up with the PKI dir, never in the backup)")]
    MasterKey {
        path: PathBuf,
        #[source]
        source: SecretError,
    },
    #[error("the backup's secret {key} is unreadable ({reason}); use an intact backup")]
    SecretRecord { key: String, reason: String },
    #[error("restoring the store into {path} failed: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("etcd prefix {prefix:?} is not empty ({what} holds records); restore only into an empty prefix: choose a new etcd.prefix, or delete the old keys with `etcdctl del --prefix {prefix}` once nothing uses them")]
    EtcdNotEmpty { prefix: String, what: String },
    #[error("restoring the store into etcd (prefix {prefix:?}) failed: {source}; nothing serves from it yet: fix the cause, delete the prefix's keys (`etcdctl del --prefix {prefix}`) and run it again")]
    Etcd {
        prefix: String,
        #[source]
        source: StoreError,
    },
    #[error("{path} holds no embedded store (no `conf` and `db` files): pass the `store` dir inside the old coordinator's data_dir")]
    NoSledStore { path: PathBuf },
    #[error("coordinator.toml sets store = \"sled\": a migration writes to etcd; set store = \"etcd\" and the [etcd] section of the cluster to copy to")]
    NotEtcd,
}

/// Where a restore writes: the embedded store of a data dir, or a prefix
/// of an etcd cluster.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    DataDir(&'a Path),
    Etcd(&'a EtcdSettings),
}

impl<'a> Target<'a> {
    /// The store `config` runs on.
    pub fn of(config: &'a CoordinatorConfig) -> Self {
        match (config.store, &config.etcd) {
            (StoreKind::Etcd, Some(etcd)) => Target::Etcd(etcd),
            _ => Target::DataDir(&config.data_dir),
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Target::DataDir(dir) => dir.display().to_string(),
            Target::Etcd(etcd) => format!(
                "etcd {} (prefix {:?})",
                etcd.endpoints.join(","),
                etcd.prefix
            ),
        }
    }
}

/// Restores backup `file` into `target` (an absent or empty data dir, an
/// empty etcd prefix), checking its secrets against `master_key_file`;
/// returns the file's header.
pub async fn restore(
    file: &Path,
    target: Target<'_>,
    master_key_file: Option<&Path>,
) -> Result<Header, RestoreError> {
    let bytes = std::fs::read(file).map_err(|source| RestoreError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let (header, snapshot) = decode(&bytes).map_err(|source| RestoreError::File {
        path: file.to_path_buf(),
        source,
    })?;
    load_checked(snapshot, target, master_key_file).await?;
    tracing::info!(target = %target.describe(), file = %file.display(), "store restored");
    Ok(header)
}

/// Copies the embedded store in `sled_dir` (its coordinator stopped) onto
/// the etcd prefix of `etcd`, which must be empty, checking the secrets as
/// a restore does; returns what was copied, as a backup's header says it.
pub async fn migrate(
    sled_dir: &Path,
    etcd: &EtcdSettings,
    master_key_file: Option<&Path>,
) -> Result<Header, RestoreError> {
    // Opening a missing dir would create an empty store and copy nothing.
    if !sled_dir.join("conf").is_file() || !sled_dir.join("db").is_file() {
        return Err(RestoreError::NoSledStore {
            path: sled_dir.to_path_buf(),
        });
    }
    let failed = |source| RestoreError::Store {
        path: sled_dir.to_path_buf(),
        source,
    };
    let snapshot = {
        let source = Store::open_sled(sled_dir).map_err(failed)?;
        source.snapshot().await.map_err(failed)?
    };
    // The header a backup of it would carry: the counts to report.
    let (header, snapshot) = decode(&encode(&snapshot, cutover_common::now_ms()))
        .expect("a snapshot encoded here decodes");
    load_checked(snapshot, Target::Etcd(etcd), master_key_file).await?;
    tracing::info!(from = %sled_dir.display(), prefix = %etcd.prefix, "store migrated to etcd");
    Ok(header)
}

/// What restore and migrate share: the target must be empty and the
/// secrets must open before anything is written.
async fn load_checked(
    snapshot: Snapshot,
    target: Target<'_>,
    master_key_file: Option<&Path>,
) -> Result<(), RestoreError> {
    match target {
        Target::DataDir(data_dir) => {
            ensure_empty(data_dir)?;
            check_secrets(&snapshot, master_key_file)?;
            load_data_dir(data_dir, snapshot).await
        }
        Target::Etcd(etcd) => {
            check_secrets(&snapshot, master_key_file)?;
            load_etcd(etcd, snapshot).await
        }
    }
}

/// Builds the store beside its place and renames it in: a failed restore
/// leaves no `store` behind.
async fn load_data_dir(data_dir: &Path, snapshot: Snapshot) -> Result<(), RestoreError> {
    let data_dir_error = |source| RestoreError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    cutover_common::modes::private_dir(data_dir).map_err(data_dir_error)?;
    let staging = data_dir.join(STAGING);
    let loaded = load(&staging, snapshot).await;
    if let Err(error) = loaded {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    std::fs::rename(&staging, data_dir.join("store")).map_err(data_dir_error)?;
    std::fs::File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(data_dir_error)
}

/// Writes `snapshot` under the etcd prefix, which must hold nothing.
async fn load_etcd(etcd: &EtcdSettings, snapshot: Snapshot) -> Result<(), RestoreError> {
    let prefix = etcd.prefix.clone();
    let failed = |source| RestoreError::Etcd {
        prefix: prefix.clone(),
        source,
    };
    let store = Store::open_etcd(etcd).map_err(failed)?;
    match store.restore(snapshot).await {
        Ok(()) => Ok(()),
        Err(StoreError::NotEmpty { what }) => Err(RestoreError::EtcdNotEmpty {
            prefix: prefix.clone(),
            what,
        }),
        Err(error) => Err(failed(error)),
    }
}

/// Writes `snapshot` into a new store at `dir`, durable, closed again.
async fn load(dir: &Path, snapshot: Snapshot) -> Result<(), RestoreError> {
    let failed = |source| RestoreError::Store {
        path: dir.to_path_buf(),
        source,
    };
    cutover_common::modes::private_dir(dir).map_err(|source| RestoreError::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let store = Store::open_sled(dir).map_err(failed)?;
    store.restore(snapshot).await.map_err(failed)?;
    store.flush().await.map_err(failed)?;
    drop(store);
    // The files sled made got the umask's modes; the store is private.
    cutover_common::modes::restrict_tree(dir).map_err(|source| RestoreError::DataDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Refuses a data dir with anything in it: a restore never merges.
fn ensure_empty(data_dir: &Path) -> Result<(), RestoreError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(RestoreError::DataDir {
                path: data_dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    Err(RestoreError::NotEmpty {
        path: data_dir.to_path_buf(),
        entries: names.join(", "),
    })
}

/// Every sealed secret of `snapshot` opens with the key file.
fn check_secrets(snapshot: &Snapshot, master_key_file: Option<&Path>) -> Result<(), RestoreError> {
    let rows = snapshot
        .tables
        .iter()
        .filter(|(table, _)| *table == Table::Secrets)
        .flat_map(|(_, rows)| rows);
    let records = rows
        .map(|(key, value)| {
            serde_json::from_slice::<SecretRecord>(value).map_err(|e| RestoreError::SecretRecord {
                key: String::from_utf8_lossy(key).replace('\0', "/"),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if records.is_empty() {
        return Ok(());
    }
    let path = master_key_file.ok_or(RestoreError::NoMasterKey)?;
    let refused = |source| RestoreError::MasterKey {
        path: path.to_path_buf(),
        source,
    };
    let keys = MasterKeys::load(path).map_err(refused)?;
    records
        .iter()
        .try_for_each(|record| keys.opens(record))
        .map_err(refused)
}
