//! Unpacking a release's `.tar.gz` into its release dir. An archive may
//! carry only regular files, dirs and links that stay inside the release
//! dir; anything else refuses the whole archive. Setuid, setgid and sticky
//! bits are dropped: a release runs with its agent's rights, never more.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::{io, ArtifactError};
use cutover_common::modes;

/// Setuid, setgid and sticky.
const SPECIAL_BITS: u32 = 0o7000;
/// Symlinks followed while resolving one path before giving up (as Linux).
const MAX_SYMLINK_HOPS: usize = 40;

/// Unpacks a `.tar.gz` into `dest`, which must not exist yet; an existing
/// `dest` is a release unpacked before and is left as it is. Nothing is
/// left behind when the archive is malformed or refused.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), ArtifactError> {
    if dest.exists() {
        return Ok(());
    }
    let parent = dest.parent().expect("release dirs have a parent");
    modes::private_dir(parent).map_err(io(parent))?;
    let nonce: u64 = rand::random();
    let tmp = parent.join(format!(".unpack-{nonce:016x}"));
    if let Err(error) = unpack_into(archive, &tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(error);
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(())
}

fn unpack_into(archive: &Path, root: &Path) -> Result<(), ArtifactError> {
    let malformed = |reason: String| ArtifactError::Unpack {
        archive: archive.to_path_buf(),
        reason,
    };
    let refused = |entry: &Path, reason: String| ArtifactError::Refused {
        archive: archive.to_path_buf(),
        entry: entry.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(archive).map_err(|e| malformed(e.to_string()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    tar.set_preserve_permissions(true);
    tar.set_mask(SPECIAL_BITS);
    std::fs::create_dir(root).map_err(io(root))?;
    let mut symlinks = Vec::new();
    for entry in tar.entries().map_err(|e| malformed(e.to_string()))? {
        let mut entry = entry.map_err(|e| malformed(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| malformed(e.to_string()))?
            .into_owned();
        let Some(relative) = in_tree(&path) else {
            return Err(refused(
                &path,
                "climbs out of the release dir with '..'".into(),
            ));
        };
        let kind = entry.header().entry_type();
        let link = entry
            .link_name()
            .map_err(|e| malformed(e.to_string()))?
            .map(|l| l.into_owned());
        match (kind, &link) {
            (EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse, _) => {}
            (EntryType::Directory, _) => {}
            (EntryType::Symlink, Some(target)) => {
                if target.is_absolute() {
                    return Err(refused(
                        &path,
                        format!(
                            "is a symlink to the absolute path {}: only links inside the release dir are allowed",
                            target.display()
                        ),
                    ));
                }
            }
            (EntryType::Link, Some(target)) => {
                if target.is_absolute() || resolve(root, target).is_none() {
                    return Err(refused(
                        &path,
                        format!(
                            "is a hard link to {}, outside the release dir",
                            target.display()
                        ),
                    ));
                }
            }
            // Metadata for the entries after it; nothing to write.
            (EntryType::XGlobalHeader, _) => continue,
            _ => {
                return Err(refused(
                    &path,
                    format!(
                    "is {}: only regular files, dirs and links inside the release dir are allowed",
                    describe(kind)
                ),
                ))
            }
        }
        if let Some(parent) = relative.parent() {
            if resolve(root, parent).is_none() {
                return Err(refused(
                    &path,
                    "would be written through a symlink that leads outside the release dir".into(),
                ));
            }
        }
        match entry.unpack_in(root) {
            Ok(true) => {}
            Ok(false) => return Err(refused(&path, "would land outside the release dir".into())),
            Err(error) => return Err(malformed(error.to_string())),
        }
        if kind == EntryType::Symlink {
            let target = link.unwrap_or_default();
            if resolve(root, &relative).is_none() {
                return Err(refused(&path, escaping_symlink(&target)));
            }
            symlinks.push((path, relative, target));
        }
    }
    // A later entry can change where an earlier link leads (a dir it goes
    // through, made a link itself): every link is checked again in the
    // finished tree.
    for (path, relative, target) in symlinks {
        if resolve(root, &relative).is_none() {
            return Err(refused(&path, escaping_symlink(&target)));
        }
    }
    Ok(())
}

fn escaping_symlink(target: &Path) -> String {
    format!(
        "is a symlink to {}, which leads outside the release dir",
        target.display()
    )
}

fn describe(kind: EntryType) -> String {
    match kind {
        EntryType::Char => "a character device".into(),
        EntryType::Block => "a block device".into(),
        EntryType::Fifo => "a fifo".into(),
        other => format!("an entry of type {:?}", other.as_byte() as char),
    }
}

/// An entry's path relative to the release dir, as tar unpacks it (a
/// leading '/' or '.' is dropped); `None` if it has a '..'.
fn in_tree(path: &Path) -> Option<PathBuf> {
    let mut relative = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return None,
            Component::Normal(name) => relative.push(name),
        }
    }
    Some(relative)
}

/// One step of a path being resolved.
enum Step {
    Root,
    Up,
    Name(OsString),
}

fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
    path.components().filter_map(|part| match part {
        Component::Prefix(_) | Component::RootDir => Some(Step::Root),
        Component::CurDir => None,
        Component::ParentDir => Some(Step::Up),
        Component::Normal(name) => Some(Step::Name(name.to_owned())),
    })
}

/// Where `path` (relative to `root`) really leads, following the symlinks
/// in the tree as the kernel would, relative to `root`; `None` when it
/// leads outside (through an absolute link, or `..` above `root`) or
/// through too many links. Parts that do not exist (yet) are taken as
/// named: they cannot be links.
fn resolve(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<Step> = steps(path).collect();
    let mut hops = 0;
    while let Some(step) = pending.pop_front() {
        match step {
            Step::Root => return None,
            Step::Up => {
                if !resolved.pop() {
                    return None;
                }
            }
            Step::Name(name) => {
                resolved.push(name);
                if let Ok(target) = std::fs::read_link(root.join(&resolved)) {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return None;
                    }
                    resolved.pop();
                    for step in steps(&target).rev() {
                        pending.push_front(step);
                    }
                }
            }
        }
    }
    Some(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of a crafted archive: path, type, mode, link target, data.
    struct Entry<'a>(&'a str, EntryType, u32, &'a str, &'a str);

    fn file(path: &str, mode: u32) -> Entry<'_> {
        Entry(path, EntryType::Regular, mode, "", "data")
    }

    fn symlink<'a>(path: &'a str, target: &'a str) -> Entry<'a> {
        Entry(path, EntryType::Symlink, 0o777, target, "")
    }

    /// Writes `entries` as a .tar.gz without the checks tar::Builder makes
    /// (it refuses '..'), the way a hostile archive would be made.
    fn craft(dir: &Path, entries: &[Entry]) -> PathBuf {
        let path = dir.join(format!("crafted-{}.tar.gz", rand::random::<u32>()));
        let file = std::fs::File::create(&path).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        for Entry(name, kind, mode, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_mode(*mode);
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, data.as_bytes()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
        path
    }

    /// Unpacks `entries` into a fresh release dir under `dir`.
    fn unpack_crafted(dir: &Path, entries: &[Entry]) -> (Result<(), ArtifactError>, PathBuf) {
        let archive = craft(dir, entries);
        let dest = dir.join("releases/r1");
        (unpack(&archive, &dest), dest)
    }

    /// Asserts a refusal that names `entry` and `what`, without the hint
    /// for archives that do not parse, and that nothing was left behind.
    fn assert_refused(dir: &Path, entries: &[Entry], entry: &str, what: &str) {
        let (result, dest) = unpack_crafted(dir, entries);
        let error = result.expect_err(entry);
        let text = error.to_string();
        assert!(
            matches!(error, ArtifactError::Refused { .. }),
            "{entry}: {text}"
        );
        assert!(
            text.contains(&format!("entry {entry} ")) && text.contains(what),
            "{text}"
        );
        assert!(!text.contains("is it a .tar.gz?"), "{text}");
        assert!(!dest.exists());
        let left: Vec<_> = std::fs::read_dir(dir.join("releases")).unwrap().collect();
        assert!(left.is_empty(), "temp dirs cleaned up: {left:?}");
    }

    #[test]
    fn setuid_setgid_and_sticky_bits_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (result, dest) = unpack_crafted(
            dir.path(),
            &[
                Entry("shared", EntryType::Directory, 0o1777, "", ""),
                file("shared/su", 0o4755),
                file("sg", 0o2750),
                file("plain", 0o640),
            ],
        );
        result.unwrap();
        let mode = |name: &str| modes::mode_of(&dest.join(name)).unwrap();
        assert_eq!(mode("shared"), 0o777);
        assert_eq!(mode("shared/su"), 0o755);
        assert_eq!(mode("sg"), 0o750);
        assert_eq!(mode("plain"), 0o640);
    }

    #[test]
    fn links_inside_the_release_dir_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (result, dest) = unpack_crafted(
            dir.path(),
            &[
                file("app.py", 0o644),
                symlink("bin/run", "../app.py"),
                symlink("current", "."),
                symlink("later", "lib/not-yet"),
                Entry("copy.py", EntryType::Link, 0o644, "app.py", ""),
            ],
        );
        result.unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("bin/run")).unwrap(),
            "data"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("copy.py")).unwrap(),
            "data"
        );
        assert!(dest.join("current/app.py").exists());
    }

    #[test]
    fn devices_fifos_and_unknown_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("releases")).unwrap();
        for (kind, what) in [
            (EntryType::Fifo, "is a fifo"),
            (EntryType::Char, "is a character device"),
            (EntryType::Block, "is a block device"),
            (EntryType::new(b'X'), "of type 'X'"),
        ] {
            assert_refused(
                dir.path(),
                &[
                    file("app.py", 0o644),
                    Entry("dev/thing", kind, 0o666, "", ""),
                ],
                "dev/thing",
                what,
            );
        }
    }

    #[test]
    fn links_that_lead_outside_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("releases")).unwrap();
        let outside = "which leads outside the release dir";
        assert_refused(
            dir.path(),
            &[symlink("passwd", "/etc/passwd")],
            "passwd",
            "absolute path /etc/passwd",
        );
        assert_refused(
            dir.path(),
            &[symlink("up/up", "../../other-release")],
            "up/up",
            outside,
        );
        // Lexically inside, but "here" is the release dir itself.
        assert_refused(
            dir.path(),
            &[symlink("here", "."), symlink("sneaky", "here/../x")],
            "sneaky",
            outside,
        );
        // Inside when made; outside once a later link changes its way.
        assert_refused(
            dir.path(),
            &[symlink("late", "m/x/../.."), symlink("m", ".")],
            "late",
            outside,
        );
        assert_refused(
            dir.path(),
            &[Entry("key", EntryType::Link, 0o644, "../../ca.key", "")],
            "key",
            "hard link to ../../ca.key",
        );
        assert_refused(
            dir.path(),
            &[Entry("key", EntryType::Link, 0o644, "/etc/shadow", "")],
            "key",
            "hard link to /etc/shadow",
        );
    }

    #[test]
    fn malformed_and_escaping_archives_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.tar.gz");
        std::fs::write(&garbage, b"this is not gzip").unwrap();
        let dest = dir.path().join("releases/r1");
        let error = unpack(&garbage, &dest).unwrap_err();
        assert!(matches!(error, ArtifactError::Unpack { .. }), "{error}");
        assert!(error.to_string().ends_with("is it a .tar.gz?"), "{error}");
        assert!(!dest.exists());

        assert_refused(
            dir.path(),
            &[file("../escape", 0o644)],
            "../escape",
            "climbs out of the release dir with '..'",
        );
        assert!(!dir.path().join("releases/escape").exists());
        assert!(!dir.path().join("escape").exists());
    }
}
