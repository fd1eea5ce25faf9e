//! Release logs: a release writes its stdout and stderr straight into files
//! (opened in append mode), not into a pipe held by the agent, so it keeps
//! running and logging when the agent restarts or dies (fail static).
//!
//! Size caps are kept by copy-and-truncate rotation from the agent's side:
//! past `max_bytes` the file is copied to `<file>.1` (older copies shift up
//! to `<file>.<keep>`) and truncated; the release's append-mode writes
//! continue at the new end. Lines written between the copy and the truncate
//! are lost, the same trade logrotate's copytruncate makes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub const STDOUT: &str = "stdout.log";
pub const STDERR: &str = "stderr.log";

/// How often the agent checks a release's log sizes.
const ROTATE_EVERY: Duration = Duration::from_secs(2);

/// Opens (creating) a log file for a release to append to; logs are the
/// agent's alone (see `cutover_common::modes`).
pub fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        cutover_common::modes::private_dir(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(cutover_common::modes::PRIVATE_FILE)
        .open(path)
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Rotates `path` if it grew past `max_bytes`; returns whether it did.
pub fn rotate_if_needed(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<bool> {
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max_bytes {
        return Ok(false);
    }
    if keep > 0 {
        for n in (1..keep).rev() {
            let from = numbered(path, n);
            if from.exists() {
                std::fs::rename(&from, numbered(path, n + 1))?;
            }
        }
        std::fs::copy(path, numbered(path, 1))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// Keeps a release's two logs within their caps until `stop` fires.
pub async fn keep_rotated(dir: PathBuf, max_bytes: u64, keep: u32, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ROTATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for file in [STDOUT, STDERR] {
            let path = dir.join(file);
            let result = tokio::task::spawn_blocking({
                let path = path.clone();
                move || rotate_if_needed(&path, max_bytes, keep)
            })
            .await;
            if let Ok(Err(error)) = result {
                tracing::warn!(%error, log = %path.display(), "cannot rotate release log");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotation_caps_size_and_count_while_the_writer_keeps_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STDOUT);
        // The writer keeps its append-mode handle across rotations, as a
        // release does.
        let mut writer = open_append(&path).unwrap();
        for round in 0..4 {
            for i in 0..30 {
                writeln!(writer, "round {round} line {i:03} {}", "x".repeat(40)).unwrap();
            }
            assert!(rotate_if_needed(&path, 1024, 2).unwrap());
        }
        writeln!(writer, "after the last rotation").unwrap();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(
            size(&path) < 100,
            "truncated, then only the new line: {}",
            size(&path)
        );
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("after the last rotation"));
        assert!(std::fs::read_to_string(numbered(&path, 1))
            .unwrap()
            .contains("round 3 line 029"));
        assert!(std::fs::read_to_string(numbered(&path, 2))
            .unwrap()
            .contains("round 2 line 029"));
        assert!(!numbered(&path, 3).exists(), "only `keep` old files");
        assert!(!rotate_if_needed(&path, 1024, 2).unwrap());
    }
}
