//! Small file helpers with the durability and permissions a daemon needs.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` so that a crash leaves either the old file or the
/// new one, never a torn mix: write a sibling temp file, fsync it, rename it
/// over, fsync the directory. `mode` applies to the new file (e.g. 0o600 for
/// keys).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    // A fresh, unpredictable temp name opened with create_new: never a file
    // (or symlink) someone prepared, and the mode is ours from the start.
    let nonce: u64 = rand::random();
    let tmp = dir.join(format!(".{}.{nonce:016x}.tmp", file_name.to_string_lossy()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set exactly what was asked.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error);
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// An I/O error on `path` as whoever runs the process needs it: for a
/// refused access, the file (or the directory in the way) with its owner
/// and mode, and the user this process runs as, so the fix (a chown, a
/// chmod, another user) is plain; for a read-only file system, the systemd
/// sandbox that usually makes it so. Other errors as they are.
pub fn explain_io(path: &Path, error: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;

    let me = nix::unistd::geteuid();
    let user = user_name(me.as_raw());
    match error.raw_os_error() {
        Some(code) if code == nix::libc::EROFS => {
            return format!(
                "{error}: {} is read-only for this process (under systemd, `ProtectSystem=strict` makes it so: list its directory in `ReadWritePaths=` of the unit)",
                path.display()
            )
        }
        Some(code) if code == nix::libc::EACCES || code == nix::libc::EPERM => {}
        _ => return error.to_string(),
    }
    // The nearest of the path and its directories this process can see:
    // the file itself, or the directory that keeps it out.
    let seen = path
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .find_map(|p| std::fs::metadata(p).ok().map(|m| (p, m)));
    let Some((at, meta)) = seen else {
        return format!("{error} (this process runs as {user})");
    };
    let owner = user_name(meta.uid());
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
        .ok()
        .flatten()
        .map_or_else(|| meta.gid().to_string(), |g| g.name);
    let kind = if meta.is_dir() { "directory" } else { "file" };
    format!(
        "permission denied: the {kind} {} is owned by {owner}:{group} with mode {:04o}, and this process runs as {user}; give {user} access (e.g. `chown -R {user}: {}`, as the operator guide's install does), or run as a user who has it",
        at.display(),
        meta.mode() & 0o7777,
        at.display()
    )
}

/// A user's name, or its uid when it has none.
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_access_names_owner_mode_and_user() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ca.key");
        std::fs::write(&key, "key").unwrap();
        let denied = std::io::Error::from_raw_os_error(nix::libc::EACCES);
        let text = explain_io(&key, &denied);
        let user = user_name(nix::unistd::geteuid().as_raw());
        assert!(
            text.starts_with(&format!(
                "permission denied: the file {} is owned by ",
                key.display()
            )) && text.contains(&format!("this process runs as {user}"))
                && text.contains(&format!("`chown -R {user}: {}`", key.display())),
            "{text}"
        );
        // A file that is not there: the directory that would hold it.
        let missing = dir.path().join("new/ca.crt");
        let text = explain_io(&missing, &denied);
        assert!(
            text.contains(&format!("the directory {} is owned", dir.path().display())),
            "{text}"
        );
        let read_only = std::io::Error::from_raw_os_error(nix::libc::EROFS);
        assert!(explain_io(&key, &read_only).contains("ReadWritePaths="));
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(explain_io(&key, &gone), gone.to_string());
    }
}
