//! When each part of a release log was first seen. The logs have no time
//! per line (a release writes them itself, whether the agent runs or not),
//! so the agent's pass over them (`logs::pass`, every 2 s) appends a
//! checkpoint to an index beside each log: the log's size then, and the
//! time. The bytes between two checkpoints were first seen at the later
//! one, so a line's time is when the agent first saw it: up to ~2 s late
//! while the agent runs, and the time it came back for a line written while
//! it was down.
//!
//! `<log>.idx` holds a header naming the log's generation (which copy of
//! the log it is: each rotation starts a new one, so a reader's position
//! survives rotations), then one `offset time_ms` line per checkpoint. A
//! rotated copy keeps its index (`stdout.log.1.idx`). An index holds at
//! most `MAX_CHECKPOINTS`: past that its older half is thinned, which only
//! ever makes old lines' times later (coarser), never earlier.

use std::io::Write;
use std::path::{Path, PathBuf};

const HEADER: &str = "cutover-log-index 1 generation ";
/// Checkpoints an index keeps: at one per pass, over an hour of a log
/// written to without a pause before the oldest times coarsen.
pub const MAX_CHECKPOINTS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's size when the pass saw it.
    pub offset: u64,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogIndex {
    /// 0 for a log's first copy (or one whose index was lost); then the
    /// rotation's time in ms, and always more than the one before.
    pub generation: u64,
    points: Vec<Checkpoint>,
}

/// Where the index of `log` lives.
pub fn index_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".idx");
    PathBuf::from(name)
}

/// The generation a rotation starts: its time, and past the one before
/// whatever the clock says.
pub fn next_generation(previous: u64, now_ms: i64) -> u64 {
    u64::try_from(now_ms).unwrap_or(0).max(previous + 1)
}

impl LogIndex {
    pub fn new(generation: u64) -> Self {
        Self {
            generation,
            points: Vec::new(),
        }
    }

    /// The index of `log` as written; `None` when it has none (no pass saw
    /// the log yet, or an older agent rotated it). A line torn by a crash
    /// mid-append, and anything after it, is left out.
    pub fn read(log: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read_to_string(index_path(log)) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.split_inclusive('\n');
        let generation = lines
            .next()?
            .strip_suffix('\n')?
            .strip_prefix(HEADER)?
            .parse()
            .ok()?;
        let mut index = Self::new(generation);
        for line in lines {
            let Some((offset, at_ms)) = line.strip_suffix('\n').and_then(|l| l.split_once(' '))
            else {
                break;
            };
            let (Ok(offset), Ok(at_ms)) = (offset.parse(), at_ms.parse()) else {
                break;
            };
            if offset <= index.indexed_len() {
                break;
            }
            index.points.push(Checkpoint { offset, at_ms });
        }
        Some(index)
    }

    fn text(&self) -> String {
        let mut text = format!("{HEADER}{}\n", self.generation);
        for point in &self.points {
            text.push_str(&format!("{} {}\n", point.offset, point.at_ms));
        }
        text
    }

    /// Writes the whole index of `log` (a crash leaves the old one or the
    /// new one).
    pub fn save(&self, log: &Path) -> std::io::Result<()> {
        cutover_common::fsutil::write_atomic(
            &index_path(log),
            self.text().as_bytes(),
            cutover_common::modes::PRIVATE_FILE,
        )
    }

    /// The writer's index of `log`, `size` bytes long now: as written
    /// (an agent that restarted goes on with it), or a new one. A log
    /// shorter than its index says was truncated behind the agent's back
    /// (or a rotation was cut short after its truncate): a new generation.
    pub fn open(log: &Path, size: u64, now_ms: i64) -> std::io::Result<Self> {
        let index = match Self::read(log)? {
            Some(index) if index.indexed_len() <= size => return Ok(index),
            Some(stale) => Self::new(next_generation(stale.generation, now_ms)),
            None => Self::new(0),
        };
        index.save(log)?;
        Ok(index)
    }

    /// Starts the index of `log` over as a new generation (its log was
    /// just truncated).
    pub fn restart(&mut self, log: &Path, now_ms: i64) -> std::io::Result<()> {
        *self = Self::new(next_generation(self.generation, now_ms));
        self.save(log)
    }

    /// Records that `log` was `size` bytes long at `now_ms`, if it grew.
    pub fn checkpoint(&mut self, log: &Path, size: u64, now_ms: i64) -> std::io::Result<()> {
        if size <= self.indexed_len() {
            return Ok(());
        }
        // Never before the last one, should the clock step back.
        let at_ms = self.points.last().map_or(now_ms, |p| p.at_ms.max(now_ms));
        let point = Checkpoint {
            offset: size,
            at_ms,
        };
        self.points.push(point);
        if self.points.len() > MAX_CHECKPOINTS {
            self.thin();
            return self.save(log);
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(cutover_common::modes::PRIVATE_FILE)
            .open(index_path(log))?;
        // One write: a crash tears at most this line, which `read` drops.
        file.write_all(format!("{} {}\n", point.offset, point.at_ms).as_bytes())
    }

    /// Drops every other checkpoint of the older half: the bytes of a
    /// dropped one fall to the next, later one.
    fn thin(&mut self) {
        let half = self.points.len() / 2;
        let newer = self.points.split_off(half);
        self.points = std::mem::take(&mut self.points)
            .into_iter()
            .skip(1)
            .step_by(2)
            .chain(newer)
            .collect();
    }

    /// This index with a last checkpoint at `size` (if past the others):
    /// the index of the copy a rotation made of the log, `size` bytes long.
    pub fn ending_at(&self, size: u64, now_ms: i64) -> Self {
        let mut copy = self.clone();
        if size > copy.indexed_len() {
            let at_ms = copy.points.last().map_or(now_ms, |p| p.at_ms.max(now_ms));
            copy.points.push(Checkpoint {
                offset: size,
                at_ms,
            });
        }
        copy
    }

    /// How much of the log the checkpoints cover.
    pub fn indexed_len(&self) -> u64 {
        self.points.last().map_or(0, |p| p.offset)
    }

    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.points
    }

    /// When the byte at `offset` was first seen: the time of the first
    /// checkpoint past it; `None` past the last one (no pass saw it yet).
    pub fn seen_at(&self, offset: u64) -> Option<i64> {
        let first_past = self.points.partition_point(|p| p.offset <= offset);
        self.points.get(first_past).map(|p| p.at_ms)
    }

    /// Where the bytes first seen at or after `since_ms` start; `None` when
    /// every checkpointed byte was seen before it.
    pub fn offset_since(&self, since_ms: i64) -> Option<u64> {
        let first = self.points.partition_point(|p| p.at_ms < since_ms);
        match first {
            n if n == self.points.len() => None,
            0 => Some(0),
            n => Some(self.points[n - 1].offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64, at_ms: i64) -> Checkpoint {
        Checkpoint { offset, at_ms }
    }

    #[test]
    fn checkpoints_map_offsets_to_when_they_were_first_seen_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let mut index = LogIndex::open(&log, 0, 1_000).unwrap();
        assert_eq!(index.generation, 0, "a log's first copy");
        index.checkpoint(&log, 100, 2_000).unwrap();
        index.checkpoint(&log, 100, 4_000).unwrap(); // did not grow: nothing
        index.checkpoint(&log, 250, 6_000).unwrap();
        assert_eq!(index.checkpoints(), &[at(100, 2_000), at(250, 6_000)]);
        assert_eq!(index.seen_at(0), Some(2_000));
        assert_eq!(index.seen_at(99), Some(2_000));
        assert_eq!(index.seen_at(100), Some(6_000));
        assert_eq!(index.seen_at(250), None, "not seen by a pass yet");
        assert_eq!(index.offset_since(0), Some(0));
        assert_eq!(index.offset_since(2_000), Some(0));
        assert_eq!(index.offset_since(2_001), Some(100));
        assert_eq!(index.offset_since(6_000), Some(100));
        assert_eq!(index.offset_since(6_001), None);
    }

    #[test]
    fn an_index_reopens_as_written_after_a_restart_and_a_torn_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        std::fs::write(&log, "x".repeat(300)).unwrap();
        let mut index = LogIndex::open(&log, 300, 1_000).unwrap();
        index.restart(&log, 5_000).unwrap();
        index.checkpoint(&log, 100, 6_000).unwrap();
        index.checkpoint(&log, 300, 8_000).unwrap();
        // The agent restarts: the same generation and checkpoints.
        let reopened = LogIndex::open(&log, 300, 9_000).unwrap();
        assert_eq!(reopened, index);
        assert_eq!(reopened.generation, 5_000);

        // A crash in the middle of an append: the torn line is left out.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(index_path(&log))
            .unwrap();
        file.write_all(b"400 10").unwrap();
        assert_eq!(LogIndex::read(&log).unwrap().unwrap(), index);

        // Truncated behind the agent's back: a new generation, empty.
        let after = LogIndex::open(&log, 50, 10_000).unwrap();
        assert_eq!(after.generation, 10_000);
        assert!(after.checkpoints().is_empty());
        assert_eq!(LogIndex::read(&log).unwrap().unwrap(), after);
        assert_eq!(next_generation(10_000, 3), 10_001, "never backwards");
    }

    #[test]
    fn an_index_stays_bounded_and_thinning_only_makes_times_later() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let mut index = LogIndex::open(&log, 0, 0).unwrap();
        let passes = MAX_CHECKPOINTS as u64 * 3;
        for n in 1..=passes {
            index.checkpoint(&log, n * 10, n as i64 * 2_000).unwrap();
        }
        assert!(index.checkpoints().len() <= MAX_CHECKPOINTS);
        assert_eq!(LogIndex::read(&log).unwrap().unwrap(), index, "on disk too");
        for offset in (0..passes * 10).step_by(7) {
            let exact = (offset / 10 + 1) as i64 * 2_000;
            let kept = index.seen_at(offset).unwrap();
            assert!(kept >= exact, "byte {offset}: {kept} before {exact}");
        }
        // The newest stay exact.
        assert_eq!(index.seen_at(passes * 10 - 1), Some(passes as i64 * 2_000));
    }

    #[test]
    fn times_never_go_back_when_the_clock_does() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let mut index = LogIndex::open(&log, 0, 0).unwrap();
        index.checkpoint(&log, 10, 5_000).unwrap();
        index.checkpoint(&log, 20, 3_000).unwrap();
        assert_eq!(index.checkpoints(), &[at(10, 5_000), at(20, 5_000)]);
        let copy = index.ending_at(30, 1_000);
        assert_eq!(copy.checkpoints().last(), Some(&at(30, 5_000)));
    }
}
