//! `ReadLogs`: a bounded chunk of a service's release logs, read from where
//! the previous chunk ended (`cutover logs`, whose `--follow` asks again
//! every second).
//!
//! A service's logs are `<state>/logs/<service>/<release>/{stdout,stderr}.log`
//! and their rotated copies. A stream (one log of one release) is read copy
//! after copy, oldest first, and a position in it is a cursor: the copy's
//! generation and an offset, which rotations do not move. Each line comes
//! with the time the agent first saw it (`runtime::log_index`); an answer
//! merges its streams by that time, and holds only lines that nothing left
//! unread in another stream comes before.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cutover_common::rules;
use cutover_proto::v1::{self as pb, LogStream};

use crate::runtime::log_index::LogIndex;
use crate::runtime::logs::{hold_files, STDERR, STDOUT};

/// A longer line comes in pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;
/// What an answer's lines take at most, whatever was asked.
const MAX_ANSWER: u64 = 1 << 20;
/// Releases read when the request names none: the ones written to last.
const MAX_RELEASES: usize = 10;

const STREAMS: [(LogStream, &str); 2] = [(LogStream::Stdout, STDOUT), (LogStream::Stderr, STDERR)];

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the release log {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads what `request` asks of the logs under `logs` (the agent's
/// `<state>/logs`); `now_ms` is the time of lines no pass has seen yet.
pub fn read(logs: &Path, request: &pb::ReadLogs, now_ms: i64) -> Result<pb::LogChunk, ReadError> {
    rules::name(&request.service)
        .map_err(|e| ReadError::Invalid(format!("service: {}", e.message)))?;
    let service_dir = logs.join(&request.service);
    let releases = match request.release_id.as_str() {
        "" => releases(&service_dir)?,
        id => {
            rules::release_id(id).map_err(|e| ReadError::Invalid(e.message))?;
            vec![id.to_string()]
        }
    };
    let cursors: HashMap<(&str, i32), (u64, u64)> = request
        .cursors
        .iter()
        .map(|c| ((c.release_id.as_str(), c.stream), (c.generation, c.offset)))
        .collect();
    let asked = match request.max_bytes {
        0 => MAX_ANSWER,
        n => n.clamp(MAX_LINE as u64, MAX_ANSWER),
    };
    let sources = (releases.len() * STREAMS.len()).max(1) as u64;
    let budget = (asked / sources).max(MAX_LINE as u64);
    let mut reads = Vec::new();
    for release in &releases {
        for (stream, file) in STREAMS {
            let cursor = cursors.get(&(release.as_str(), stream as i32)).copied();
            let live = service_dir.join(release).join(file);
            let read = read_stream(&live, cursor, request.since_ms, budget, now_ms)
                .map_err(|source| ReadError::Io { path: live, source })?;
            if let Some(read) = read {
                reads.push((release.clone(), stream, read));
            }
        }
    }
    Ok(merge(reads))
}

/// The service's releases with logs here, the ones written to last first.
fn releases(service_dir: &Path) -> Result<Vec<String>, ReadError> {
    let io = |source| ReadError::Io {
        path: service_dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(service_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if rules::release_id(&name).is_err() {
            continue;
        }
        let written = STREAMS
            .iter()
            .filter_map(|(_, file)| std::fs::metadata(entry.path().join(file)).ok())
            .filter_map(|meta| meta.modified().ok())
            .max();
        if let Some(written) = written {
            found.push((written, name));
        }
    }
    found.sort_by(|a, b| b.cmp(a));
    Ok(found
        .into_iter()
        .take(MAX_RELEASES)
        .map(|(_, name)| name)
        .collect())
}

/// One copy of a log: a rotated one (with its index) or the live one.
struct Segment {
    path: PathBuf,
    index: Option<LogIndex>,
    generation: u64,
    len: u64,
    live: bool,
}

/// The copies of the log at `live`, oldest first; rotated ones without an
/// index (an older agent's) are left out.
fn segments(live: &Path) -> std::io::Result<Vec<Segment>> {
    let (Some(dir), Some(name)) = (live.parent(), live.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut rotated = Vec::new();
    for entry in entries {
        let entry = entry?;
        let number = entry
            .file_name()
            .to_str()
            .and_then(|f| f.strip_prefix(name)?.strip_prefix('.')?.parse::<u32>().ok());
        let Some(number) = number else { continue };
        let path = entry.path();
        if let Some(index) = LogIndex::read(&path)? {
            let len = std::fs::metadata(&path)?.len();
            let generation = index.generation;
            rotated.push((
                number,
                Segment {
                    path,
                    index: Some(index),
                    generation,
                    len,
                    live: false,
                },
            ));
        }
    }
    rotated.sort_by_key(|(number, _)| std::cmp::Reverse(*number));
    let mut all: Vec<Segment> = rotated.into_iter().map(|(_, s)| s).collect();
    match std::fs::metadata(live) {
        Ok(meta) => {
            let index = LogIndex::read(live)?;
            all.push(Segment {
                path: live.to_path_buf(),
                generation: index.as_ref().map_or(0, |i| i.generation),
                index,
                len: meta.len(),
                live: true,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(all)
}

#[derive(Debug, Clone, Copy)]
struct Position {
    segment: usize,
    offset: u64,
}

/// Where a read starts: at its cursor, or else at the first line seen at
/// or after `since_ms`.
fn start(
    segments: &[Segment],
    cursor: Option<(u64, u64)>,
    since_ms: i64,
) -> std::io::Result<Position> {
    let last = segments.len() - 1;
    if let Some((generation, offset)) = cursor {
        return Ok(
            match segments.iter().position(|s| s.generation == generation) {
                Some(i) if offset <= segments[i].len => Position { segment: i, offset },
                // A live log shorter than the cursor was truncated behind the
                // agent's back: all of it is new.
                Some(i) if segments[i].live => Position {
                    segment: i,
                    offset: 0,
                },
                Some(i) => Position {
                    segment: i,
                    offset: segments[i].len,
                },
                // Rotated away since: from the oldest copy kept.
                None if generation < segments[0].generation => Position {
                    segment: 0,
                    offset: 0,
                },
                None => Position {
                    segment: last,
                    offset: 0,
                },
            },
        );
    }
    for (i, segment) in segments.iter().enumerate() {
        if let Some(offset) = segment
            .index
            .as_ref()
            .and_then(|x| x.offset_since(since_ms))
        {
            return Ok(Position {
                segment: i,
                offset: line_start_from(segment, offset)?,
            });
        }
    }
    // Every line a pass saw came before `since_ms`: what no pass saw yet.
    let segment = &segments[last];
    let indexed = segment.index.as_ref().map_or(0, LogIndex::indexed_len);
    Ok(Position {
        segment: last,
        offset: line_start_from(segment, indexed.min(segment.len))?,
    })
}

/// The start of the first line at or after `offset`: a checkpoint may fall
/// in the middle of a line, which then began before it.
fn line_start_from(segment: &Segment, offset: u64) -> std::io::Result<u64> {
    if offset == 0 {
        return Ok(0);
    }
    let before = read_at(&segment.path, offset - 1, MAX_LINE as u64 + 1)?;
    Ok(match before.iter().position(|b| *b == b'\n') {
        Some(newline) => offset + newline as u64,
        None => offset - 1 + before.len() as u64,
    })
}

fn read_at(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    file.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

#[derive(Debug)]
struct ReadLine {
    time_ms: i64,
    text: String,
    /// The cursor just past it.
    end: (u64, u64),
    /// Seen at or after `since_ms`.
    shown: bool,
}

#[derive(Debug)]
struct StreamRead {
    /// The cursor it started at.
    start: (u64, u64),
    lines: Vec<ReadLine>,
    /// Lines are left to read already: the budget ran out.
    more: bool,
}

/// Reads the stream whose live log is `live`, up to about `budget` bytes;
/// `None` when it has no log.
fn read_stream(
    live: &Path,
    cursor: Option<(u64, u64)>,
    since_ms: i64,
    budget: u64,
    now_ms: i64,
) -> std::io::Result<Option<StreamRead>> {
    let _alone = hold_files();
    let segments = segments(live)?;
    if segments.is_empty() {
        return Ok(None);
    }
    let mut at = start(&segments, cursor, since_ms)?;
    let mut read = StreamRead {
        start: (segments[at.segment].generation, at.offset),
        lines: Vec::new(),
        more: false,
    };
    let mut left = budget;
    loop {
        let segment = &segments[at.segment];
        if at.offset >= segment.len {
            if at.segment + 1 == segments.len() {
                return Ok(Some(read));
            }
            at = Position {
                segment: at.segment + 1,
                offset: 0,
            };
            continue;
        }
        if left == 0 {
            read.more = true;
            return Ok(Some(read));
        }
        let buf = read_at(
            &segment.path,
            at.offset,
            (segment.len - at.offset).min(left),
        )?;
        let whole = at.offset + buf.len() as u64 >= segment.len;
        let mut used = 0;
        while used < buf.len() {
            let rest = &buf[used..];
            let window = &rest[..rest.len().min(MAX_LINE)];
            let len = match window.iter().position(|b| *b == b'\n') {
                Some(newline) => newline + 1,
                None if window.len() == MAX_LINE => MAX_LINE,
                // A rotated copy's last line ends with the copy.
                None if whole && !segment.live => rest.len(),
                None => break,
            };
            let offset = at.offset + used as u64;
            let time_ms = segment
                .index
                .as_ref()
                .and_then(|i| i.seen_at(offset))
                .unwrap_or(now_ms);
            let text = &rest[..len];
            let text = text.strip_suffix(b"\n").unwrap_or(text);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            used += len;
            read.lines.push(ReadLine {
                time_ms,
                text: String::from_utf8_lossy(text).into_owned(),
                end: (segment.generation, offset + len as u64),
                shown: time_ms >= since_ms,
            });
        }
        at.offset += used as u64;
        left -= used as u64;
        if used < buf.len() || buf.is_empty() {
            // An unfinished line: the live log's last (its writer is not
            // done with it), or one the budget cut.
            read.more = !whole && !buf.is_empty();
            return Ok(Some(read));
        }
    }
}

/// The streams' lines in time order, up to the time the least advanced
/// stream with lines left unread reached: nothing it has left comes before.
fn merge(reads: Vec<(String, LogStream, StreamRead)>) -> pb::LogChunk {
    let horizon = reads
        .iter()
        .filter(|(_, _, read)| read.more)
        .filter_map(|(_, _, read)| read.lines.last().map(|l| l.time_ms))
        .min();
    let mut chunk = pb::LogChunk::default();
    for (release_id, stream, read) in reads {
        let taken = read
            .lines
            .iter()
            .take_while(|l| horizon.is_none_or(|h| l.time_ms <= h))
            .count();
        let (generation, offset) = read.lines[..taken].last().map_or(read.start, |l| l.end);
        chunk.more |= read.more || taken < read.lines.len();
        chunk.cursors.push(pb::LogCursor {
            release_id: release_id.clone(),
            stream: stream as i32,
            generation,
            offset,
        });
        chunk.lines.extend(
            read.lines
                .into_iter()
                .take(taken)
                .filter(|l| l.shown)
                .map(|l| pb::ReleaseLogLine {
                    release_id: release_id.clone(),
                    stream: stream as i32,
                    time_ms: l.time_ms,
                    text: l.text,
                }),
        );
    }
    // Stable: lines of one time keep their stream's order.
    chunk.lines.sort_by_key(|l| l.time_ms);
    chunk
}

#[cfg(test)]
#[path = "release_logs_tests.rs"]
mod tests;
