//! The agent's durable record of what it runs, in sled: for each service the
//! active release (its full spec, port and process identity) and the one
//! before it. A restarted agent reads it to adopt what still runs. Beside
//! it, per release dir, what retention needs (`ReleaseFiles`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::proxy::cohort::Split;
use crate::runtime::InstanceId;
use crate::service::WebRelease;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("agent store: {0}")]
    Backend(String),
    #[error("agent store record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// What runs for one web service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The proxy's public address; `None` for a worker.
    pub listen: Option<SocketAddr>,
    /// The other addresses it listens on (`also_listen`).
    #[serde(default)]
    pub also_listen: Vec<SocketAddr>,
    /// False while the node is drained for this service; survives restarts,
    /// so an agent restart does not put a node under maintenance back in
    /// rotation.
    pub admitted: bool,
    pub active: Option<ActiveRelease>,
    /// The release the active one replaced: what a rollback goes back to.
    pub previous: Option<String>,
    /// Processes a cutover in progress owns besides the active release: the
    /// candidate being checked, or the old release being drained. An agent
    /// that died mid-cutover stops them on restart, so nothing is orphaned.
    #[serde(default)]
    pub leftovers: Vec<Leftover>,
    /// Release ids this service served, oldest first (bounded): what
    /// retention keeps on disk for fast rollbacks.
    #[serde(default)]
    pub history: Vec<String>,
    /// The release running beside the active one (a canary, a warm
    /// standby), with its split: a restarted agent adopts it and splits
    /// traffic as before.
    #[serde(default)]
    pub side: Option<SideRecord>,
    /// The incident levers of its proxy: a restarted agent applies them
    /// before it accepts a connection.
    #[serde(default)]
    pub levers: crate::proxy::levers::LeverSettings,
    /// The coordinator's generation of those levers (`SetLevers`): older
    /// sets are ignored.
    #[serde(default)]
    pub levers_generation: u64,
}

/// Most release ids remembered per service.
pub const HISTORY_LIMIT: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leftover {
    pub release_id: String,
    /// With the release id, tells this process apart from the active one
    /// when the same release is deployed again.
    #[serde(default)]
    pub port: u16,
    #[serde(alias = "process")]
    pub instance: InstanceId,
    pub stop_signal: String,
    pub stop_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveRelease {
    pub release: WebRelease,
    #[serde(flatten)]
    pub instances: Instances,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideRecord {
    pub release: WebRelease,
    #[serde(flatten)]
    pub instances: Instances,
    pub split: Split,
    /// When the agent drains and stops it by itself (ms since the Unix
    /// epoch); 0: it stays until told.
    #[serde(default)]
    pub retire_at_ms: i64,
}

impl SideRecord {
    /// Its processes as ones to stop.
    pub fn as_leftovers(&self) -> Vec<Leftover> {
        self.instances.leftovers(&self.release)
    }
}

/// One process of a recorded release: the port it listens on (0: a
/// worker) and what runs it, once known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub port: u16,
    pub instance: Option<InstanceId>,
}

/// The processes of a recorded release (`cutover scale`), the first one
/// first. Stored as `instances`, with the first one also as `port` and
/// `instance`, the fields of records from before releases had several: an
/// older agent (an upgrade rolled back) still finds that one.
#[derive(Debug, Clone, PartialEq)]
pub struct Instances(pub Vec<InstanceRecord>);

#[derive(Serialize, Deserialize)]
struct InstancesLayout {
    #[serde(default)]
    port: u16,
    #[serde(default, alias = "process")]
    instance: Option<InstanceId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    instances: Vec<InstanceRecord>,
}

impl Serialize for Instances {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let first = self.0.first();
        InstancesLayout {
            port: first.map_or(0, |f| f.port),
            instance: first.and_then(|f| f.instance.clone()),
            // One process is written as records always were.
            instances: match self.0.len() {
                0 | 1 => Vec::new(),
                _ => self.0.clone(),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Instances {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let layout = InstancesLayout::deserialize(d)?;
        Ok(Self(match layout.instances.is_empty() {
            true => vec![InstanceRecord {
                port: layout.port,
                instance: layout.instance,
            }],
            false => layout.instances,
        }))
    }
}

impl Instances {
    /// One process on `port`.
    pub fn one(port: u16, instance: Option<InstanceId>) -> Self {
        Self(vec![InstanceRecord { port, instance }])
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().map(|i| i.port)
    }

    /// What runs them, as far as known.
    pub fn ids(&self) -> impl Iterator<Item = &InstanceId> {
        self.0.iter().filter_map(|i| i.instance.as_ref())
    }

    /// Those with a known process, as leftovers of `release` to stop.
    pub fn leftovers(&self, release: &WebRelease) -> Vec<Leftover> {
        self.0
            .iter()
            .filter_map(|i| {
                Some(Leftover {
                    release_id: release.release_id.clone(),
                    port: i.port,
                    instance: i.instance.clone()?,
                    stop_signal: release.stop_signal.as_str().to_string(),
                    stop_grace: release.stop_grace,
                })
            })
            .collect()
    }
}

impl ServiceRecord {
    /// Every process the record names: the active release's, the side
    /// release's and the leftovers'.
    pub fn instance_ids(&self) -> Vec<InstanceId> {
        let active = self.active.iter().flat_map(|a| a.instances.ids());
        let side = self.side.iter().flat_map(|s| s.instances.ids());
        active
            .chain(side)
            .cloned()
            .chain(self.leftovers.iter().map(|l| l.instance.clone()))
            .collect()
    }
}

/// What retention knows of one release dir.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseFiles {
    /// The cached artifact ("sha256:<hex>") the dir was unpacked from; none
    /// for a docker release. The artifact stays cached while the dir stays.
    #[serde(default)]
    pub digest: Option<String>,
    /// When its last prepare began, if it has not been activated since: a
    /// rollout may still activate it, so its dir stays (for a while).
    #[serde(default)]
    pub prepared_at_ms: Option<i64>,
}

/// Where `AgentStore::leader_token` lives (the default tree).
const LEADER_TOKEN: &[u8] = b"leader_token";

pub struct AgentStore {
    db: sled::Db,
    services: sled::Tree,
    /// `ReleaseFiles` by release id.
    releases: sled::Tree,
    /// Serializes read-modify-write updates, so concurrent writers (a
    /// cutover, a process tracker) never lose each other's changes.
    writes: std::sync::Mutex<()>,
}

impl AgentStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = cutover_common::sled_open::open(sled::Config::new(), dir).map_err(|e| {
            StoreError::Open {
                path: dir.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        // sled makes its files with the umask's modes; they hold every
        // release's environment, so they are the agent's alone.
        cutover_common::modes::restrict_tree(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            reason: format!("cannot make it private (0700/0600): {e}"),
        })?;
        let services = db.open_tree("services").map_err(backend)?;
        let releases = db.open_tree("releases").map_err(backend)?;
        Ok(Self {
            db,
            services,
            releases,
            writes: std::sync::Mutex::new(()),
        })
    }

    /// The highest fencing token a coordinator's message carried (0:
    /// none), kept across restarts: a coordinator of an older term is
    /// refused also by an agent restarted since it saw the newer one.
    pub fn leader_token(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .get(LEADER_TOKEN)
            .map_err(backend)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, i64::from_be_bytes))
    }

    /// Accepts a message carrying `token` (0: from a single coordinator,
    /// always accepted): a token at least the highest seen is recorded
    /// (durably) and accepted; a lower one is refused with the highest.
    pub fn observe_leader_token(&self, token: i64) -> Result<Result<(), i64>, StoreError> {
        if token == 0 {
            return Ok(Ok(()));
        }
        let _writing = self.writes.lock().expect("store write lock");
        let highest = self.leader_token()?;
        if token < highest {
            return Ok(Err(highest));
        }
        if token > highest {
            self.db
                .insert(LEADER_TOKEN, &token.to_be_bytes())
                .map_err(backend)?;
            self.db.flush().map_err(backend)?;
        }
        Ok(Ok(()))
    }

    pub fn service(&self, name: &str) -> Result<Option<ServiceRecord>, StoreError> {
        self.services
            .get(name.as_bytes())
            .map_err(backend)?
            .map(|value| decode(name, &value))
            .transpose()
    }

    /// Reads the record, lets `change` edit it (returning `None` leaves it
    /// as it is) and writes it back, durably before returning: the agent
    /// acts on what it recorded, so the record must survive a crash.
    pub fn update_service(
        &self,
        name: &str,
        change: impl FnOnce(Option<ServiceRecord>) -> Option<ServiceRecord>,
    ) -> Result<(), StoreError> {
        cutover_common::blocking(|| {
            let _write = self.writes.lock().expect("store write lock");
            let Some(record) = change(self.service(name)?) else {
                return Ok(());
            };
            let value = serde_json::to_vec(&record).expect("service records serialize");
            self.services
                .insert(name.as_bytes(), value)
                .map_err(backend)?;
            self.db.flush().map_err(backend)?;
            Ok(())
        })
    }

    /// Release ports recorded by any service: the serving ones, the side
    /// ones and those of cutovers in progress. A new release must not take one.
    pub fn ports_in_use(&self) -> Result<Vec<u16>, StoreError> {
        let mut ports = Vec::new();
        for name in self.service_names()? {
            if let Some(record) = self.service(&name)? {
                ports.extend(record.active.iter().flat_map(|a| a.instances.ports()));
                ports.extend(record.side.iter().flat_map(|s| s.instances.ports()));
                ports.extend(record.leftovers.iter().map(|l| l.port));
            }
        }
        Ok(ports)
    }

    pub fn remove_service(&self, name: &str) -> Result<(), StoreError> {
        self.services.remove(name.as_bytes()).map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Notes that a prepare of `release_id` begins (from the artifact
    /// `digest`), durably before anything is fetched: a prune running
    /// meanwhile keeps its dir and artifact.
    pub fn note_prepared(
        &self,
        release_id: &str,
        digest: Option<String>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.update_release(release_id, |files| {
            files.digest = digest;
            files.prepared_at_ms = Some(now_ms);
        })
    }

    /// Notes that `release_id` serves now: no rollout waits for it any more.
    pub fn note_activated(&self, release_id: &str) -> Result<(), StoreError> {
        self.update_release(release_id, |files| files.prepared_at_ms = None)
    }

    fn update_release(
        &self,
        release_id: &str,
        change: impl FnOnce(&mut ReleaseFiles),
    ) -> Result<(), StoreError> {
        cutover_common::blocking(|| {
            let _write = self.writes.lock().expect("store write lock");
            let mut files: ReleaseFiles = match self.releases.get(release_id).map_err(backend)? {
                Some(value) => decode(release_id, &value)?,
                None => ReleaseFiles::default(),
            };
            change(&mut files);
            let value = serde_json::to_vec(&files).expect("release records serialize");
            self.releases
                .insert(release_id.as_bytes(), value)
                .map_err(backend)?;
            self.db.flush().map_err(backend)?;
            Ok(())
        })
    }

    /// Every release dir's record, by release id.
    pub fn release_files(&self) -> Result<Vec<(String, ReleaseFiles)>, StoreError> {
        self.releases
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                let id = String::from_utf8_lossy(&key).into_owned();
                let files = decode(&id, &value)?;
                Ok((id, files))
            })
            .collect()
    }

    /// Forgets release records nothing keeps, each only if it is still
    /// what was read: a prepare that noted it meanwhile wins.
    pub fn forget_releases(&self, records: &[(String, ReleaseFiles)]) -> Result<(), StoreError> {
        cutover_common::blocking(|| {
            let _write = self.writes.lock().expect("store write lock");
            for (id, read) in records {
                let current = self.releases.get(id.as_bytes()).map_err(backend)?;
                let unchanged = current
                    .map(|value| decode::<ReleaseFiles>(id, &value))
                    .transpose()?
                    .is_some_and(|current| current == *read);
                if unchanged {
                    self.releases.remove(id.as_bytes()).map_err(backend)?;
                }
            }
            self.db.flush().map_err(backend)?;
            Ok(())
        })
    }

    pub fn service_names(&self) -> Result<Vec<String>, StoreError> {
        self.services
            .iter()
            .keys()
            .map(|key| {
                key.map(|k| String::from_utf8_lossy(&k).into_owned())
                    .map_err(backend)
            })
            .collect()
    }
}

fn backend(error: sled::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checks::HealthGate;
    use crate::service::DEFAULT_DRAIN_TIMEOUT;

    #[test]
    fn a_coordinator_of_an_older_term_is_refused_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = AgentStore::open(&dir.path().join("db")).unwrap();
            assert_eq!(store.leader_token().unwrap(), 0);
            assert_eq!(store.observe_leader_token(7).unwrap(), Ok(()));
            assert_eq!(
                store.observe_leader_token(7).unwrap(),
                Ok(()),
                "the same term"
            );
            assert_eq!(store.observe_leader_token(12).unwrap(), Ok(()));
            assert_eq!(store.observe_leader_token(7).unwrap(), Err(12));
            // A single coordinator (no election) is never refused.
            assert_eq!(store.observe_leader_token(0).unwrap(), Ok(()));
        }
        let store = AgentStore::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.leader_token().unwrap(), 12);
        assert_eq!(store.observe_leader_token(11).unwrap(), Err(12));
    }

    /// A release as the store records it.
    pub(crate) fn release(id: &str, drain_timeout: Duration) -> WebRelease {
        WebRelease {
            release_id: id.into(),
            command: vec!["./run".into()],
            workdir: format!("/var/lib/cutover-agent/releases/{id}").into(),
            env: Vec::new(),
            health: None,
            gate: HealthGate {
                interval: Duration::from_secs(1),
                healthy_threshold: 1,
                deadline: Duration::from_secs(60),
            },
            smoke: Vec::new(),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_grace: Duration::from_secs(10),
            min_healthy_time: Duration::ZERO,
            stop_command: Vec::new(),
            stop_timeout: Duration::ZERO,
            drain_timeout,
            container: None,
            secrets: Vec::new(),
            secret_values: Default::default(),
            hooks: Vec::new(),
            hook_env: Vec::new(),
            queues: None,
            instances: 1,
        }
    }

    #[test]
    fn a_release_noted_prepared_again_is_not_forgotten_by_a_prune_that_read_it_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = AgentStore::open(&dir.path().join("db")).unwrap();
        store.note_prepared("web-v1", None, 1).unwrap();
        store.note_prepared("web-v2", None, 1).unwrap();
        let read = store.release_files().unwrap();
        // A new prepare of v1 between the prune's read and its forget.
        store.note_prepared("web-v1", None, 2).unwrap();
        store.forget_releases(&read).unwrap();
        let left = store.release_files().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, "web-v1");
        assert_eq!(left[0].1.prepared_at_ms, Some(2));
        store.note_activated("web-v1").unwrap();
        assert_eq!(store.release_files().unwrap()[0].1.prepared_at_ms, None);
    }

    #[test]
    fn records_from_before_releases_carried_their_drain_timeout_still_read() {
        let record = ServiceRecord {
            listen: Some("127.0.0.1:8080".parse().unwrap()),
            also_listen: Vec::new(),
            admitted: true,
            active: Some(ActiveRelease {
                release: release("web-v1", Duration::from_millis(200)),
                instances: Instances::one(20001, None),
            }),
            previous: None,
            leftovers: Vec::new(),
            history: vec!["web-v1".into()],
            side: None,
            levers: Default::default(),
            levers_generation: 0,
        };
        let written = serde_json::to_vec(&record).unwrap();
        let read: ServiceRecord = decode("web", &written).unwrap();
        assert_eq!(read, record, "a release keeps its own drain timeout");

        // The old shape: one drain timeout per service, none per release.
        let mut old: serde_json::Value = serde_json::from_slice(&written).unwrap();
        old["active"]["release"]
            .as_object_mut()
            .unwrap()
            .remove("drain_timeout");
        old["drain_timeout"] = serde_json::json!({ "secs": 3, "nanos": 0 });
        // And from before side releases.
        old.as_object_mut().unwrap().remove("side");
        let read: ServiceRecord = decode("web", old.to_string().as_bytes()).unwrap();
        let active = read.active.unwrap();
        assert_eq!(active.release.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    }

    #[test]
    fn several_instances_are_stored_and_the_first_also_as_records_had_it() {
        let pid = |pid: u32| {
            Some(InstanceId::Process(crate::runtime::process::ProcessId {
                pid,
                start_time: 7,
            }))
        };
        let active = ActiveRelease {
            release: release("web-v1", Duration::from_secs(1)),
            instances: Instances(vec![
                InstanceRecord {
                    port: 20001,
                    instance: pid(11),
                },
                InstanceRecord {
                    port: 20002,
                    instance: None,
                },
                InstanceRecord {
                    port: 20003,
                    instance: pid(13),
                },
            ]),
        };
        let written = serde_json::to_value(&active).unwrap();
        // What an agent from before `cutover scale` reads: the first one.
        assert_eq!(written["port"], 20001);
        assert_eq!(written["instance"], serde_json::to_value(pid(11)).unwrap());
        let read: ActiveRelease = serde_json::from_value(written).unwrap();
        assert_eq!(read, active);
        let leftovers = read.instances.leftovers(&read.release);
        let ports: Vec<u16> = leftovers.iter().map(|l| l.port).collect();
        assert_eq!(ports, [20001, 20003], "a process not yet known is not one");

        // One process is written as before, without `instances`.
        let one = ActiveRelease {
            release: release("web-v1", Duration::from_secs(1)),
            instances: Instances::one(20001, pid(11)),
        };
        let written = serde_json::to_value(&one).unwrap();
        assert!(written.get("instances").is_none(), "{written}");
        // And a record of the oldest shape (`process`) still reads.
        let mut old = written.clone();
        let instance = old.as_object_mut().unwrap().remove("instance").unwrap();
        old["process"] = instance;
        let read: ActiveRelease = serde_json::from_value(old).unwrap();
        assert_eq!(read, one);
    }
}
