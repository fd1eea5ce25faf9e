//! What stays on disk of past releases. Each service keeps its active,
//! side and previous release, anything a cutover in progress owns, and the last
//! `releases_keep` releases it served (fast rollbacks); a release prepared
//! for a rollout but not activated yet stays for `PREPARED_KEEP`, so one
//! prepared for a rollout that was abandoned does not stay forever. A
//! cached artifact stays while a kept release dir came from it. Everything
//! else goes, after each activation and at start-up.
//!
//! A prepare in progress holds its release dir and artifact (`InUse`) from
//! before it looks at the disk: a prune never removes what it is about to
//! use, however their steps interleave.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::artifacts::{cache_file_name, Digest};
use crate::store::{ReleaseFiles, ServiceRecord};

/// How long a prepared release waits for its activation before it can go.
pub const PREPARED_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// In a docker release's dir: the pinned image it runs.
pub const IMAGE_FILE: &str = "image";

/// What a prune renames an entry to before deleting it (a crash may leave
/// one; `remove_leftovers` takes it at start-up).
const PRUNING_PREFIX: &str = ".pruning-";
/// A release dir being unpacked (see `artifacts::unpack`).
const UNPACKING_PREFIX: &str = ".unpack-";

/// What to remove.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Release dirs (release ids).
    pub dirs: Vec<String>,
    /// Cached artifacts (file names in the cache).
    pub archives: Vec<String>,
    /// Release records to forget, as read: nothing keeps their dirs.
    pub forget: Vec<(String, ReleaseFiles)>,
}

/// Decides what goes, from the services' records, the release records, and
/// the release dirs and cached artifacts on disk.
pub fn plan(
    services: &[ServiceRecord],
    files: &[(String, ReleaseFiles)],
    releases_keep: usize,
    now_ms: i64,
    dirs: &[String],
    archives: &[String],
) -> Plan {
    let mut keep = BTreeSet::new();
    for record in services {
        let skip = record.history.len().saturating_sub(releases_keep);
        keep.extend(record.history.iter().skip(skip).cloned());
        keep.extend(record.active.iter().map(|a| a.release.release_id.clone()));
        keep.extend(record.previous.iter().cloned());
        keep.extend(record.leftovers.iter().map(|l| l.release_id.clone()));
        keep.extend(record.side.iter().map(|s| s.release.release_id.clone()));
    }
    let waited_long = now_ms.saturating_sub(PREPARED_KEEP.as_millis() as i64);
    keep.extend(
        files
            .iter()
            .filter(|(_, f)| f.prepared_at_ms.is_some_and(|at| at > waited_long))
            .map(|(id, _)| id.clone()),
    );
    let kept_archives: BTreeSet<String> = files
        .iter()
        .filter(|(id, _)| keep.contains(id))
        .filter_map(|(_, f)| Digest::parse(f.digest.as_deref()?).ok())
        .map(|digest| cache_file_name(&digest))
        .collect();
    Plan {
        dirs: dirs
            .iter()
            .filter(|d| !keep.contains(*d))
            .cloned()
            .collect(),
        archives: archives
            .iter()
            .filter(|a| !kept_archives.contains(*a))
            .cloned()
            .collect(),
        forget: files
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .cloned()
            .collect(),
    }
}

/// The names in `dir`, sorted, but for temp names (a leading '.'): an
/// unpack or download in progress, cleaned up by its own.
pub fn list(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Images of the docker releases under `dir`, by release id.
pub fn release_images(dir: &Path) -> BTreeMap<String, String> {
    list(dir)
        .into_iter()
        .filter_map(|name| {
            let image = std::fs::read_to_string(dir.join(&name).join(IMAGE_FILE)).ok()?;
            Some((name, image))
        })
        .collect()
}

/// Paths (release dirs, cached artifacts) prepares in progress are using,
/// with how many use each.
#[derive(Default)]
pub struct InUse(Mutex<BTreeMap<PathBuf, usize>>);

/// Holds paths in use until dropped.
pub struct Held {
    in_use: Arc<InUse>,
    paths: Vec<PathBuf>,
}

impl InUse {
    /// Marks `paths` in use until the returned guard drops.
    pub fn hold(self: &Arc<Self>, paths: Vec<PathBuf>) -> Held {
        let mut held = self.0.lock().expect("in-use lock");
        for path in &paths {
            *held.entry(path.clone()).or_default() += 1;
        }
        Held {
            in_use: self.clone(),
            paths,
        }
    }

    /// Removes `names` (dirs or files) from `dir` unless in use; returns
    /// those removed. Each is renamed aside while the in-use list is locked
    /// (so a prepare that holds it after that finds it gone, never half
    /// gone), then deleted.
    pub fn remove_unused(&self, dir: &Path, names: &[String]) -> Vec<String> {
        let aside: Vec<(String, PathBuf)> = {
            let held = self.0.lock().expect("in-use lock");
            names
                .iter()
                .filter(|name| !held.contains_key(&dir.join(name)))
                .filter_map(|name| {
                    let aside = dir.join(format!("{PRUNING_PREFIX}{name}"));
                    match std::fs::rename(dir.join(name), &aside) {
                        Ok(()) => Some((name.clone(), aside)),
                        Err(error) => {
                            tracing::warn!(%error, %name, dir = %dir.display(), "cannot prune");
                            None
                        }
                    }
                })
                .collect()
        };
        for (_, path) in &aside {
            if let Err(error) = remove_any(path) {
                tracing::warn!(%error, path = %path.display(), "cannot delete a pruned entry");
            }
        }
        aside.into_iter().map(|(name, _)| name).collect()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.in_use.0.lock().expect("in-use lock");
        for path in &self.paths {
            if let Some(count) = held.get_mut(path) {
                *count -= 1;
                if *count == 0 {
                    held.remove(path);
                }
            }
        }
    }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Removes what an agent that died while pruning or unpacking left in
/// `dir`. Only at start-up, when nothing else is at work there.
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PRUNING_PREFIX) || name.starts_with(UNPACKING_PREFIX) {
            if let Err(error) = remove_any(&entry.path()) {
                tracing::warn!(%error, %name, "cannot remove a leftover");
            }
        }
    }
}

/// Bytes allocated on disk under `path`, as `du` counts them; symlinks are
/// not followed.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let inside: u64 = std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0);
    own + inside
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ActiveRelease, Leftover};

    const DAY_MS: i64 = 24 * 3600 * 1000;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn archive(n: u8) -> String {
        cache_file_name(&Digest::parse(&digest(n)).unwrap())
    }

    fn files(id: &str, n: u8, prepared_at_ms: Option<i64>) -> (String, ReleaseFiles) {
        let files = ReleaseFiles {
            digest: Some(digest(n)),
            prepared_at_ms,
        };
        (id.to_string(), files)
    }

    fn service(history: &[&str], active: Option<&str>, previous: Option<&str>) -> ServiceRecord {
        ServiceRecord {
            listen: None,
            also_listen: Vec::new(),
            admitted: true,
            active: active.map(|id| ActiveRelease {
                release: crate::store::tests::release(id, Duration::ZERO),
                instances: crate::store::Instances::one(20000, None),
            }),
            previous: previous.map(str::to_string),
            leftovers: Vec::new(),
            history: history.iter().map(|s| s.to_string()).collect(),
            side: None,
            levers: Default::default(),
            levers_generation: 0,
        }
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_last_releases_the_active_previous_and_in_flight_ones_stay() {
        let now = 100 * DAY_MS;
        // Rolled back to v2: the active and previous ones are not among
        // the last of the history.
        let mut record = service(&["v1", "v2", "v3", "v4", "v5"], Some("v2"), Some("v1"));
        record.history.push("v2".into());
        record.leftovers.push(Leftover {
            release_id: "v3".into(),
            port: 20001,
            instance: crate::runtime::InstanceId::Container {
                container: "c".into(),
            },
            stop_signal: "SIGTERM".into(),
            stop_grace: Duration::from_secs(1),
        });
        let files: Vec<_> = (1..=5).map(|n| files(&format!("v{n}"), n, None)).collect();
        let dirs = names(&["v1", "v2", "v3", "v4", "v5"]);
        let archives: Vec<String> = (1..=5).map(archive).collect();
        let plan = plan(&[record], &files, 0, now, &dirs, &archives);
        assert_eq!(plan.dirs, ["v4", "v5"]);
        assert_eq!(plan.archives, [archive(4), archive(5)]);
        assert_eq!(plan.forget, [files[3].clone(), files[4].clone()]);
    }

    #[test]
    fn a_prepared_release_stays_a_week_and_its_artifact_with_it() {
        let now = 100 * DAY_MS;
        let record = service(&["v1"], Some("v1"), None);
        let files = [
            files("v1", 1, None),
            files("v2", 2, Some(now - DAY_MS)),
            files("v3", 3, Some(now - 8 * DAY_MS)),
        ];
        let dirs = names(&["v1", "v2", "v3", "unknown"]);
        // One archive no record names (cached by an older agent).
        let archives: Vec<String> = [1, 2, 3, 9].into_iter().map(archive).collect();
        let plan = plan(&[record], &files, 3, now, &dirs, &archives);
        assert_eq!(plan.dirs, ["v3", "unknown"]);
        assert_eq!(plan.archives, [archive(3), archive(9)]);
        assert_eq!(plan.forget, [files[2].clone()]);
    }

    #[test]
    fn the_side_release_and_its_artifact_stay() {
        // A canary staged but never served: in no history.
        let mut record = service(&["v1"], Some("v1"), None);
        record.side = Some(crate::store::SideRecord {
            release: crate::store::tests::release("v2", Duration::ZERO),
            instances: crate::store::Instances::one(20001, None),
            split: Default::default(),
            retire_at_ms: 0,
        });
        let files = [files("v1", 1, None), files("v2", 2, None)];
        let plan = plan(
            &[record],
            &files,
            0,
            0,
            &names(&["v1", "v2"]),
            &[archive(1), archive(2)],
        );
        assert_eq!(plan.dirs, Vec::<String>::new());
        assert_eq!(plan.archives, Vec::<String>::new());
    }

    #[test]
    fn a_shared_artifact_stays_while_any_kept_release_came_from_it() {
        let record = service(&["a", "b"], Some("b"), None);
        let files = [files("a", 7, None), files("b", 7, None)];
        let plan = plan(&[record], &files, 0, 0, &names(&["a", "b"]), &[archive(7)]);
        assert_eq!((plan.dirs, plan.archives), (names(&["a"]), Vec::new()));
    }

    #[test]
    fn what_a_prepare_holds_is_not_removed_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["r1", "r2"] {
            std::fs::create_dir_all(dir.path().join(name).join("sub")).unwrap();
        }
        std::fs::write(dir.path().join("a.tar.gz"), "x").unwrap();
        let in_use = Arc::new(InUse::default());
        let held = in_use.hold(vec![dir.path().join("r1"), dir.path().join("a.tar.gz")]);
        let also = in_use.hold(vec![dir.path().join("r1")]);
        let all = names(&["r1", "r2", "a.tar.gz"]);
        assert_eq!(in_use.remove_unused(dir.path(), &all), ["r2"]);
        drop(held);
        assert_eq!(in_use.remove_unused(dir.path(), &all), ["a.tar.gz"]);
        drop(also);
        assert_eq!(in_use.remove_unused(dir.path(), &all), ["r1"]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_of_a_dead_agent_go_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".pruning-r1", ".unpack-0123", "r2"] {
            std::fs::create_dir_all(dir.path().join(name).join("sub")).unwrap();
        }
        remove_leftovers(dir.path());
        assert_eq!(list(dir.path()), ["r2"]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn disk_usage_counts_files_and_dirs_but_not_link_targets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("r1")).unwrap();
        std::fs::write(dir.path().join("r1/big"), vec![1u8; 64 << 10]).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("huge"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("r1/link")).unwrap();
        let used = disk_usage(dir.path());
        assert!((64 << 10..1 << 20).contains(&used), "{used}");
        assert_eq!(disk_usage(&dir.path().join("missing")), 0);
    }
}
