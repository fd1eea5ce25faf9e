//! Secrets: values an environment's releases need but nobody should read
//! along the way. Stored encrypted (ChaCha20-Poly1305) under a master key
//! from `master_key_file`; each ciphertext records the id of the key that
//! sealed it and is bound to its environment, name and version, so a value
//! cannot be moved to another secret. Values leave the coordinator only in
//! the activate command to an agent of that environment, over mTLS.
//!
//! The master key file holds one key per line, `<key id> <64 hex digits>`,
//! the first one current. Rotation adds a key in front, re-encrypts every
//! stored value with it, then drops the others: a crash in between leaves a
//! file with both keys, so every record still opens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cutover_common::fsutil::write_atomic;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest as _, Sha256};

use crate::metrics::Metrics;
use crate::store::{SecretRecord, SecretVersion, Store, StoreError};

/// The master key file's name in a PKI dir (`cutover ca init`).
pub const MASTER_KEY: &str = "master.key";

/// Versions kept per secret: a rollback to a release that used an older
/// one still finds its value.
pub const VERSIONS_KEPT: usize = 10;

/// Largest value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// A rotation schedule shorter than this is a typo.
const MIN_ROTATION_MS: u64 = 3_600_000;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("master key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("this coordinator has no master key: set `master_key_file` in its config (`cutover ca init` creates one)")]
    NoMasterKey,
    /// A name the release could not get as its environment variable.
    #[error("secret {0}")]
    BadName(cutover_common::rules::RuleError),
    #[error("environment {0}")]
    BadEnv(String),
    #[error("the value of {0} is {1} bytes; at most {MAX_VALUE_BYTES} are accepted")]
    TooLarge(String, usize),
    #[error("the value of {0} contains a NUL byte, which an environment variable cannot hold")]
    Nul(String),
    #[error("the value of {0} is not UTF-8 text, which an environment variable must be")]
    NotText(String),
    #[error("{0} is to be rotated every {1}; give at least 1h (e.g. 90d), or 0s for no schedule")]
    BadRotation(String, String),
    #[error("no secret {name} in environment {env}; set it with `cutover secret set --env {env} {name}`")]
    Missing { env: String, name: String },
    #[error("secret {name} version {version} in environment {env} is no longer kept (the last {VERSIONS_KEPT} are); deploy with the current version")]
    VersionGone {
        env: String,
        name: String,
        version: u32,
    },
    #[error("secret {name} in environment {env} cannot be opened: {reason}")]
    Corrupt {
        env: String,
        name: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A secret is its release's environment variable of the same name: its
/// name follows that rule.
pub fn validate_name(name: &str) -> Result<(), SecretError> {
    cutover_common::rules::env_var_name(name).map_err(SecretError::BadName)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Clone)]
struct MasterKey {
    id: String,
    key: [u8; 32],
}

impl MasterKey {
    fn generate() -> Self {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the system random source works");
        let id = hex(&Sha256::digest(key)[..8]);
        Self { id, key }
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.key).expect("a 32-byte key"))
    }
}

/// The master keys, current first.
pub struct MasterKeys {
    path: PathBuf,
    keys: Vec<MasterKey>,
}

impl MasterKeys {
    /// Creates a key file with one new key; refuses to overwrite one, which
    /// would make every stored secret unreadable.
    pub fn create(path: &Path) -> Result<(), SecretError> {
        if path.exists() {
            return Err(SecretError::KeyFile {
                path: path.to_path_buf(),
                reason: "exists already; keep it (the secrets are sealed with it)".into(),
            });
        }
        Self {
            path: path.to_path_buf(),
            keys: vec![MasterKey::generate()],
        }
        .write()
    }

    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let bad = |reason: String| SecretError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(cutover_common::fsutil::explain_io(path, &e)))?;
        let mut keys = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let (id, key) = line
                .split_once(' ')
                .ok_or_else(|| bad(format!("line {}: expected `<key id> <hex key>`", n + 1)))?;
            let key: [u8; 32] = unhex(key.trim())
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| bad(format!("line {}: the key is not 64 hex digits", n + 1)))?;
            keys.push(MasterKey {
                id: id.to_string(),
                key,
            });
        }
        if keys.is_empty() {
            return Err(bad("holds no key".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            keys,
        })
    }

    fn write(&self) -> Result<(), SecretError> {
        let text: String = self
            .keys
            .iter()
            .map(|k| format!("{} {}\n", k.id, hex(&k.key)))
            .collect();
        write_atomic(&self.path, text.as_bytes(), 0o600).map_err(|e| SecretError::KeyFile {
            path: self.path.clone(),
            reason: cutover_common::fsutil::explain_io(&self.path, &e),
        })
    }

    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Whether every kept version of `record` opens with these keys: what
    /// a store restored from a backup needs of the key file beside it.
    pub fn opens(&self, record: &SecretRecord) -> Result<(), SecretError> {
        for version in &record.versions {
            let aad = aad(&record.env, &record.name, version.version);
            self.open(version, &aad)
                .map_err(|reason| SecretError::Corrupt {
                    env: record.env.clone(),
                    name: record.name.clone(),
                    reason,
                })?;
        }
        Ok(())
    }

    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> (String, String, String) {
        let key = &self.keys[0];
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut data = plaintext.to_vec();
        key.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .expect("sealing never fails for a valid key");
        (key.id.clone(), hex(&nonce), hex(&data))
    }

    fn open(&self, version: &SecretVersion, aad: &[u8]) -> Result<Vec<u8>, String> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == version.key_id)
            .ok_or_else(|| {
                format!(
                    "it was sealed with master key {}, which the key file no longer holds",
                    version.key_id
                )
            })?;
        let nonce: [u8; 12] = unhex(&version.nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or("its nonce is malformed")?;
        let mut data = unhex(&version.ciphertext).ok_or("its ciphertext is malformed")?;
        let plain = key
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| "authentication failed (wrong key, or the record was altered)")?;
        Ok(plain.to_vec())
    }
}

/// What binds a ciphertext to its place.
fn aad(env: &str, name: &str, version: u32) -> Vec<u8> {
    format!("cutover-secret\0{env}\0{name}\0{version}").into_bytes()
}

/// A secret's name and version, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub versions: Vec<(u32, i64, String)>,
    /// 0: no rotation schedule.
    pub rotate_every_ms: u64,
}

pub struct Secrets {
    store: Store,
    /// Held across a store call (a rotation re-seals every record under
    /// it), so an async lock.
    keys: Option<tokio::sync::Mutex<MasterKeys>>,
    /// Where each secret's age and rotation interval are published.
    metrics: Option<Arc<Metrics>>,
}

impl Secrets {
    pub fn new(store: Store, keys: Option<MasterKeys>) -> Self {
        Self {
            store,
            keys: keys.map(tokio::sync::Mutex::new),
            metrics: None,
        }
    }

    /// Publishes every stored secret's age and rotation interval to
    /// `metrics`, now and as they change.
    pub async fn with_metrics(mut self, metrics: Arc<Metrics>) -> Result<Self, SecretError> {
        for record in self.store.secrets.all().await? {
            publish(&metrics, &record);
        }
        self.metrics = Some(metrics);
        Ok(self)
    }

    async fn keys(&self) -> Result<tokio::sync::MutexGuard<'_, MasterKeys>, SecretError> {
        Ok(self
            .keys
            .as_ref()
            .ok_or(SecretError::NoMasterKey)?
            .lock()
            .await)
    }

    /// Stores a new version of `env`/`name`; returns its number. A
    /// `rotate_every` (milliseconds, 0 for none) replaces the secret's
    /// rotation schedule; `None` keeps it.
    pub async fn set(
        &self,
        env: &str,
        name: &str,
        value: &[u8],
        by: &str,
        rotate_every: Option<u64>,
    ) -> Result<u32, SecretError> {
        validate_name(name)?;
        cutover_common::identity::validate_name(env)
            .map_err(|e| SecretError::BadEnv(format!("{env:?}: {e}")))?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretError::TooLarge(name.into(), value.len()));
        }
        if value.contains(&0) {
            return Err(SecretError::Nul(name.into()));
        }
        if std::str::from_utf8(value).is_err() {
            return Err(SecretError::NotText(name.into()));
        }
        if let Some(every) = rotate_every.filter(|ms| (1..MIN_ROTATION_MS).contains(ms)) {
            let shown = humantime::format_duration(std::time::Duration::from_millis(every));
            return Err(SecretError::BadRotation(name.into(), shown.to_string()));
        }
        let keys = self.keys().await?;
        // The next version of what is stored now: two writers never both
        // create the same version.
        let record = self
            .store
            .secrets
            .update(env, name, |current| {
                let mut record = current.unwrap_or(SecretRecord {
                    env: env.to_string(),
                    name: name.to_string(),
                    versions: Vec::new(),
                    rotate_every_ms: 0,
                });
                if let Some(every) = rotate_every {
                    record.rotate_every_ms = every;
                }
                let version = record.versions.last().map_or(1, |v| v.version + 1);
                let (key_id, nonce, ciphertext) = keys.seal(value, &aad(env, name, version));
                record.versions.push(SecretVersion {
                    version,
                    created_at_ms: cutover_common::now_ms(),
                    created_by: by.to_string(),
                    key_id,
                    nonce,
                    ciphertext,
                });
                let excess = record.versions.len().saturating_sub(VERSIONS_KEPT);
                record.versions.drain(..excess);
                Ok::<_, SecretError>(record)
            })
            .await?;
        if let Some(metrics) = &self.metrics {
            publish(metrics, &record);
        }
        Ok(record.versions.last().map_or(0, |v| v.version))
    }

    pub async fn list(&self, env: &str) -> Result<Vec<SecretInfo>, SecretError> {
        Ok(self
            .store
            .secrets
            .list(env)
            .await?
            .into_iter()
            .map(|r| SecretInfo {
                rotate_every_ms: r.rotate_every_ms,
                name: r.name,
                versions: r
                    .versions
                    .into_iter()
                    .map(|v| (v.version, v.created_at_ms, v.created_by))
                    .collect(),
            })
            .collect())
    }

    /// Removes every version; releases that name it can no longer start.
    pub async fn remove(&self, env: &str, name: &str) -> Result<bool, SecretError> {
        validate_name(name)?;
        // Under the key lock: a rotation re-sealing every record must not
        // write this one back.
        let _keys = self.keys().await?;
        let removed = self.store.secrets.delete(env, name).await?;
        if let Some(metrics) = &self.metrics {
            metrics.secrets.set(env, name, None);
        }
        Ok(removed)
    }

    /// The current version of each named secret in `env`.
    pub async fn current(&self, env: &str, name: &str) -> Result<u32, SecretError> {
        self.store
            .secrets
            .get(env, name)
            .await?
            .and_then(|r| r.versions.last().map(|v| v.version))
            .ok_or_else(|| SecretError::Missing {
                env: env.into(),
                name: name.into(),
            })
    }

    /// The values of a release's secrets, by name, to hand to its agent.
    pub async fn values_for(
        &self,
        env: &str,
        refs: &[cutover_proto::v1::SecretRef],
    ) -> Result<std::collections::HashMap<String, String>, SecretError> {
        let mut values = std::collections::HashMap::new();
        for secret in refs {
            let value = self.value(env, &secret.name, secret.version).await?;
            values.insert(secret.name.clone(), value);
        }
        Ok(values)
    }

    /// The current value of `env`/`name`: what signs a webhook, or goes
    /// into an analysis measurement's header.
    pub async fn current_value(&self, env: &str, name: &str) -> Result<String, SecretError> {
        let version = self.current(env, name).await?;
        self.value(env, name, version).await
    }

    /// The value of `env`/`name` at `version`, to hand to an agent.
    pub async fn value(&self, env: &str, name: &str, version: u32) -> Result<String, SecretError> {
        let keys = self.keys().await?;
        let record =
            self.store
                .secrets
                .get(env, name)
                .await?
                .ok_or_else(|| SecretError::Missing {
                    env: env.into(),
                    name: name.into(),
                })?;
        let stored = record
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| SecretError::VersionGone {
                env: env.into(),
                name: name.into(),
                version,
            })?;
        let corrupt = |reason: String| SecretError::Corrupt {
            env: env.into(),
            name: name.into(),
            reason,
        };
        let plain = keys
            .open(stored, &aad(env, name, version))
            .map_err(corrupt)?;
        String::from_utf8(plain).map_err(|_| corrupt("not UTF-8".into()))
    }

    /// A new master key; every stored value re-encrypted with it; the old
    /// keys dropped. Returns the new key's id and how many values were
    /// re-encrypted.
    pub async fn rotate_master_key(&self) -> Result<(String, usize), SecretError> {
        let mut keys = self.keys().await?;
        // Both keys on disk before any record changes, and in memory only
        // once they are: a failed write changes nothing.
        let next = MasterKeys {
            path: keys.path.clone(),
            keys: std::iter::once(MasterKey::generate())
                .chain(keys.keys.iter().cloned())
                .collect(),
        };
        next.write()?;
        *keys = next;
        let mut count = 0;
        for listed in self.store.secrets.all().await? {
            let (env, name) = (listed.env.as_str(), listed.name.as_str());
            // Re-sealed as stored now: a version added in between is kept.
            let resealed = self
                .store
                .secrets
                .update(env, name, |current| {
                    let mut record = current.ok_or_else(|| SecretError::Missing {
                        env: env.into(),
                        name: name.into(),
                    })?;
                    for version in &mut record.versions {
                        let aad = aad(env, name, version.version);
                        let plain =
                            keys.open(version, &aad)
                                .map_err(|reason| SecretError::Corrupt {
                                    env: env.into(),
                                    name: name.into(),
                                    reason,
                                })?;
                        let (key_id, nonce, ciphertext) = keys.seal(&plain, &aad);
                        version.key_id = key_id;
                        version.nonce = nonce;
                        version.ciphertext = ciphertext;
                    }
                    Ok(record)
                })
                .await;
            match resealed {
                Ok(record) => count += record.versions.len(),
                // Removed since the listing: nothing to re-seal.
                Err(SecretError::Missing { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        let mut retired = MasterKeys {
            path: keys.path.clone(),
            keys: vec![keys.keys[0].clone()],
        };
        retired.write()?;
        std::mem::swap(&mut *keys, &mut retired);
        tracing::info!(key_id = %keys.current_id(), values = count, "master key rotated");
        Ok((keys.current_id().to_string(), count))
    }
}

/// A secret's newest version's age and its rotation interval, to metrics.
fn publish(metrics: &Metrics, record: &SecretRecord) {
    let newest = record.versions.last().map(|v| v.created_at_ms);
    metrics.secrets.set(
        &record.env,
        &record.name,
        newest.map(|created| (created, record.rotate_every_ms)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rotation_schedule_survives_a_restart_and_reaches_the_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(MASTER_KEY);
        MasterKeys::create(&key).unwrap();
        let data = dir.path().join("data");
        {
            let store = Store::open_sled(&data).unwrap();
            let secrets = Secrets::new(store.clone(), Some(MasterKeys::load(&key).unwrap()));
            secrets
                .set(
                    "prod",
                    "DB_PASSWORD",
                    b"hunter2",
                    "alice",
                    Some(90 * 86_400_000),
                )
                .await
                .unwrap();
            // A new value keeps the schedule; a short one is refused.
            secrets
                .set("prod", "DB_PASSWORD", b"hunter3", "alice", None)
                .await
                .unwrap();
            let refused = secrets
                .set("prod", "DB_PASSWORD", b"x", "alice", Some(60_000))
                .await
                .unwrap_err();
            assert!(matches!(refused, SecretError::BadRotation(..)), "{refused}");
            secrets
                .set("prod", "APP_KEY", b"base64:k", "alice", None)
                .await
                .unwrap();
            store.flush().await.unwrap();
        }
        // The coordinator starts again: the schedule is read back and
        // published before any secret changes.
        let store = Store::open_sled(&data).unwrap();
        let metrics = Arc::new(Metrics::new());
        let secrets = Secrets::new(store, Some(MasterKeys::load(&key).unwrap()))
            .with_metrics(metrics.clone())
            .await
            .unwrap();
        let listed = secrets.list("prod").await.unwrap();
        let schedule = |name: &str| {
            listed
                .iter()
                .find(|s| s.name == name)
                .map(|s| (s.rotate_every_ms, s.versions.len()))
        };
        assert_eq!(schedule("DB_PASSWORD"), Some((90 * 86_400_000, 2)));
        assert_eq!(schedule("APP_KEY"), Some((0, 1)));
        let text = metrics.render(&[]);
        assert!(
            text.contains(
                "cutover_secret_rotate_every_seconds{env=\"prod\",name=\"DB_PASSWORD\"} 7776000"
            ),
            "{text}"
        );
        assert!(
            !text.contains("cutover_secret_rotate_every_seconds{env=\"prod\",name=\"APP_KEY\"}")
        );
        assert!(text.contains("cutover_secret_age_seconds{env=\"prod\",name=\"APP_KEY\"}"));
        // Removed: gone from the metrics.
        secrets.remove("prod", "APP_KEY").await.unwrap();
        assert!(!metrics.render(&[]).contains("name=\"APP_KEY\""));
    }
}
