//! Modes of what a daemon keeps for itself (the agent's state dir, the
//! coordinator's data dir): dirs 0700 and files 0600, set explicitly, since
//! the umask only ever narrows a mode and a daemon started by hand (umask
//! 022) would otherwise leave them world-readable. An agent's release dirs
//! are the exception: their contents keep the modes their archive gave
//! them (executables must stay executable).

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const PRIVATE_DIR: u32 = 0o700;
pub const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` if needed (parents too) and makes it 0700, also when it
/// existed with a wider mode.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(PRIVATE_DIR))
}

/// Creates `path`, which must not exist yet (never a file or symlink
/// someone prepared), as a 0600 file open for writing.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(PRIVATE_FILE))?;
    Ok(file)
}

/// Makes `root` and every dir under it 0700 and every file 0600. Symlinks
/// are neither changed nor followed.
pub fn restrict_tree(root: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        std::fs::set_permissions(root, Permissions::from_mode(PRIVATE_DIR))?;
        for entry in std::fs::read_dir(root)? {
            restrict_tree(&entry?.path())?;
        }
        Ok(())
    } else {
        std::fs::set_permissions(root, Permissions::from_mode(PRIVATE_FILE))
    }
}

/// The permission bits of `path` (not following a symlink).
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_set_whatever_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        std::fs::create_dir_all(root.join("db/blobs")).unwrap();
        std::fs::write(root.join("db/conf"), "x").unwrap();
        std::fs::set_permissions(root.join("db/conf"), Permissions::from_mode(0o666)).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "y").unwrap();
        std::fs::set_permissions(&outside, Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("db/link")).unwrap();
        restrict_tree(&root.join("db")).unwrap();
        assert_eq!(mode_of(&root.join("db")).unwrap(), PRIVATE_DIR);
        assert_eq!(mode_of(&root.join("db/blobs")).unwrap(), PRIVATE_DIR);
        assert_eq!(mode_of(&root.join("db/conf")).unwrap(), PRIVATE_FILE);
        assert_eq!(
            mode_of(&outside).unwrap(),
            0o644,
            "a symlink's target is not touched"
        );

        std::fs::set_permissions(&root, Permissions::from_mode(0o755)).unwrap();
        private_dir(&root).unwrap();
        assert_eq!(mode_of(&root).unwrap(), PRIVATE_DIR);

        let file = root.join("node-id");
        create_private_file(&file).unwrap();
        assert_eq!(mode_of(&file).unwrap(), PRIVATE_FILE);
        assert!(
            create_private_file(&file).is_err(),
            "never an existing file"
        );
    }
}
