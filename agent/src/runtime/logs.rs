//! Release logs: a release writes its stdout and stderr straight into files
//! (opened in append mode), not into a pipe held by the agent, so it keeps
//! running and logging when the agent restarts or dies (fail static).
//!
//! Every 2 s the agent passes over each log: it checkpoints its size in the
//! log's index (`log_index`: when each line was first seen, for `cutover
//! logs --since`), and keeps its size capped by copy-and-truncate rotation:
//! past `max_bytes` the file is copied to `<file>.1` (older copies shift up
//! to `<file>.<keep>`, each with its index) and truncated; the release's
//! append-mode writes continue at the new end. Lines written between the
//! copy and the truncate are lost, the same trade logrotate's copytruncate
//! makes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::log_index::{index_path, LogIndex};

pub const STDOUT: &str = "stdout.log";
pub const STDERR: &str = "stderr.log";

/// How often the agent passes over a release's logs: the granularity of
/// the lines' times.
const PASS_EVERY: Duration = Duration::from_secs(2);

/// One pass or one read of release logs at a time, agent-wide: a reader
/// must never see a log half rotated (copied but not yet truncated, or
/// truncated with the old index). Each holds it for one log.
static FILES: Mutex<()> = Mutex::new(());

/// Held while reading a log and its index.
pub(crate) fn hold_files() -> MutexGuard<'static, ()> {
    FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

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

/// `<log>.<n>`: the n-th newest rotated copy.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// One pass over the log at `path`: a checkpoint of its size in its index
/// (`index`: the pass's own copy, opened from disk at the first pass that
/// finds the log), then a rotation if it grew past `max_bytes`. Returns
/// whether it rotated.
pub fn pass(
    path: &Path,
    index: &mut Option<LogIndex>,
    max_bytes: u64,
    keep: u32,
    now_ms: i64,
) -> std::io::Result<bool> {
    let _alone = hold_files();
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let index = match index {
        Some(index) => index,
        None => index.insert(LogIndex::open(path, size, now_ms)?),
    };
    if size < index.indexed_len() {
        // Truncated behind the agent's back: its old checkpoints describe
        // nothing there now.
        index.restart(path, now_ms)?;
    }
    index.checkpoint(path, size, now_ms)?;
    if size <= max_bytes {
        return Ok(false);
    }
    if keep > 0 {
        for n in (1..keep).rev() {
            let (from, to) = (numbered(path, n), numbered(path, n + 1));
            if !from.exists() {
                continue;
            }
            std::fs::rename(&from, &to)?;
            match std::fs::rename(index_path(&from), index_path(&to)) {
                // A copy an older agent made has no index: neither may it
                // keep the one of the copy it replaced.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    remove_if_present(&index_path(&to))?
                }
                renamed => renamed?,
            }
        }
        let copy = numbered(path, 1);
        // Lines written during the copy are in it past the last
        // checkpoint: they were first seen now.
        let copied = std::fs::copy(path, &copy)?;
        index.ending_at(copied, now_ms).save(&copy)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    index.restart(path, now_ms)?;
    Ok(true)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Passes over a release's two logs every 2 s until `stop` fires.
pub async fn keep_rotated(dir: PathBuf, max_bytes: u64, keep: u32, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PASS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut indexes: [Option<LogIndex>; 2] = [None, None];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (file, slot) in [STDOUT, STDERR].into_iter().zip(indexes.iter_mut()) {
            let path = dir.join(file);
            let mut index = slot.take();
            let result = tokio::task::spawn_blocking({
                let path = path.clone();
                move || {
                    let passed = pass(&path, &mut index, max_bytes, keep, cutover_common::now_ms());
                    (index, passed)
                }
            })
            .await;
            match result {
                Ok((index, passed)) => {
                    // After an error the index is read from disk again.
                    *slot = if passed.is_ok() { index } else { None };
                    if let Err(error) = passed {
                        tracing::warn!(%error, log = %path.display(), "cannot index or rotate release log");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, log = %path.display(), "release log pass panicked")
                }
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
        let mut index = None;
        for round in 0..4 {
            for i in 0..30 {
                writeln!(writer, "round {round} line {i:03} {}", "x".repeat(40)).unwrap();
            }
            assert!(pass(&path, &mut index, 1024, 2, 1_000 + round).unwrap());
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
        assert!(!index_path(&numbered(&path, 3)).exists());
        assert!(!pass(&path, &mut index, 1024, 2, 2_000).unwrap());
    }

    #[test]
    fn each_copy_keeps_the_index_of_its_lines_and_the_live_log_starts_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STDERR);
        let mut writer = open_append(&path).unwrap();
        let mut index = None;
        writeln!(writer, "{}", "a".repeat(99)).unwrap();
        assert!(!pass(&path, &mut index, 150, 2, 10_000).unwrap());
        writeln!(writer, "{}", "b".repeat(99)).unwrap();
        assert!(pass(&path, &mut index, 150, 2, 12_000).unwrap());
        writeln!(writer, "{}", "c".repeat(99)).unwrap();
        assert!(!pass(&path, &mut index, 150, 2, 14_000).unwrap());

        let copy = LogIndex::read(&numbered(&path, 1)).unwrap().unwrap();
        assert_eq!(copy.generation, 0);
        assert_eq!(copy.seen_at(0), Some(10_000), "the first line");
        assert_eq!(copy.seen_at(100), Some(12_000), "the second line");
        assert_eq!(copy.indexed_len(), 200, "the whole copy");
        let live = LogIndex::read(&path).unwrap().unwrap();
        assert_eq!(live.generation, 12_000, "started by the rotation");
        assert_eq!(live.seen_at(0), Some(14_000));
        assert_eq!(
            Some(&live),
            index.as_ref(),
            "the pass's copy is what is on disk"
        );

        // The agent restarts: its first pass reopens the index from disk
        // and goes on with it; the next rotation shifts the copies and
        // their indexes together.
        let mut reopened = None;
        writeln!(writer, "{}", "d".repeat(99)).unwrap();
        assert!(pass(&path, &mut reopened, 150, 2, 16_000).unwrap());
        let older = LogIndex::read(&numbered(&path, 2)).unwrap().unwrap();
        assert_eq!(older, copy);
        let newer = LogIndex::read(&numbered(&path, 1)).unwrap().unwrap();
        assert_eq!(newer.generation, 12_000);
        assert_eq!(newer.seen_at(0), Some(14_000));
        assert_eq!(newer.seen_at(100), Some(16_000));
        assert_eq!(reopened.unwrap().generation, 16_000);
    }

    #[test]
    fn a_copy_an_older_agent_made_does_not_inherit_another_copys_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STDOUT);
        std::fs::write(numbered(&path, 2), "old copy 2\n").unwrap();
        LogIndex::new(7).save(&numbered(&path, 2)).unwrap();
        std::fs::write(numbered(&path, 1), "old copy 1, no index\n").unwrap();
        std::fs::write(&path, "x".repeat(200)).unwrap();
        assert!(pass(&path, &mut None, 100, 2, 1_000).unwrap());
        assert!(LogIndex::read(&numbered(&path, 2)).unwrap().is_none());
        assert!(LogIndex::read(&numbered(&path, 1)).unwrap().is_some());
    }
}
