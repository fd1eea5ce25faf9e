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
