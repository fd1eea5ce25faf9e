//! The coordinator's backup file (`cutover admin backup`): one snapshot of
//! its store, every table and log, refused whole on restore when it is
//! truncated, altered or from a newer format.
//!
//! Layout: the line `cutover-store-backup`, a header as one line of JSON
//! (format version, coordinator version, when, records per table and log,
//! the content's length and sha256), then the content: per table and per
//! log a section `tag, name, count` and its records, integers big-endian.
//! Binary, because keys and values are bytes (counters are), and one pass
//! writes or reads it.
//!
//! No private key is in it: secrets stay sealed with the master key, and
//! the CA and master key files are backed up with the PKI dir (see
//! `restore`).

pub mod restore;

use std::collections::BTreeMap;

use cutover_common::digest::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::store::backend::{Log, Table};
use crate::store::Snapshot;

/// The first line of every backup file.
const MAGIC: &[u8] = b"cutover-store-backup\n";

/// The format this version writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

const TABLE_SECTION: u8 = b'T';
const LOG_SECTION: u8 = b'L';

/// What a backup file says about itself, before its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    /// The cutover version that wrote it.
    pub coordinator_version: String,
    /// When the snapshot was taken, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// See `Snapshot::last_seq`; the content holds it too, under the
    /// checksum.
    pub last_seq: u64,
    /// Records per table, by table name.
    pub tables: BTreeMap<String, u64>,
    /// Records per log, by log name.
    pub logs: BTreeMap<String, u64>,
    pub content_bytes: u64,
    /// Hex sha256 of the content.
    pub content_sha256: String,
}

/// Why a backup file is refused; the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("it is not a cutover store backup (it does not start with `cutover-store-backup`); pass a file written by `cutover admin backup`")]
    NotABackup,
    #[error("its header is unreadable ({0}): the file is damaged; use an intact copy")]
    BadHeader(String),
    #[error("it is format version {found}, written by cutover {written_by}; this cutover ({ours}) reads up to version {FORMAT_VERSION}: restore with cutover {written_by} or newer")]
    NewerFormat {
        found: u32,
        written_by: String,
        ours: &'static str,
    },
    #[error("it is truncated: its header announces {expected} bytes of content, the file holds {found}; use a complete copy or take the backup again")]
    Truncated { expected: u64, found: u64 },
    #[error("it holds {found} bytes of content, {expected} announced: something was appended; use an intact copy")]
    TrailingBytes { expected: u64, found: u64 },
    #[error("its content does not match the sha256 in its header (damaged or altered); use an intact copy")]
    Checksum,
    #[error("it holds {kind} `{name}`, which this cutover ({ours}) does not know; restore with cutover {written_by}, which wrote it")]
    UnknownName {
        kind: &'static str,
        name: String,
        ours: &'static str,
        written_by: String,
    },
    #[error("its content is malformed at byte {at}: {reason}; use an intact copy")]
    Malformed { at: usize, reason: String },
}

/// This build's version, as headers name it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The backup file of `snapshot`, taken at `created_at_ms`.
pub fn encode(snapshot: &Snapshot, created_at_ms: i64) -> Vec<u8> {
    let mut content = snapshot.last_seq.to_be_bytes().to_vec();
    for (table, rows) in &snapshot.tables {
        section(&mut content, TABLE_SECTION, table.name(), rows.len());
        for (key, value) in rows {
            bytes(&mut content, key);
            bytes(&mut content, value);
        }
    }
    for (log, records) in &snapshot.logs {
        section(&mut content, LOG_SECTION, log.name(), records.len());
        for (seq, record) in records {
            content.extend_from_slice(&seq.to_be_bytes());
            bytes(&mut content, record);
        }
    }
    let count = |n: usize| n as u64;
    let header = Header {
        format_version: FORMAT_VERSION,
        coordinator_version: VERSION.into(),
        created_at_ms,
        last_seq: snapshot.last_seq,
        tables: snapshot
            .tables
            .iter()
            .map(|(t, rows)| (t.name().to_string(), count(rows.len())))
            .collect(),
        logs: snapshot
            .logs
            .iter()
            .map(|(l, records)| (l.name().to_string(), count(records.len())))
            .collect(),
        content_bytes: count(content.len()),
        content_sha256: sha256_hex(&content),
    };
    let mut file = MAGIC.to_vec();
    file.extend(serde_json::to_vec(&header).expect("a header serializes"));
    file.push(b'\n');
    file.extend(content);
    file
}

/// The header and the snapshot of a backup file, once every check passed.
pub fn decode(file: &[u8]) -> Result<(Header, Snapshot), BackupError> {
    let header = read_header(file)?;
    let content = &file[file.len() - header.content_bytes as usize..];
    let mut reader = Reader { content, at: 0 };
    let mut snapshot = Snapshot {
        last_seq: reader.u64()?,
        ..Snapshot::default()
    };
    if snapshot.last_seq != header.last_seq {
        return Err(reader.malformed(format!(
            "the content's last sequence number {} is not the header's {}",
            snapshot.last_seq, header.last_seq
        )));
    }
    while !reader.done() {
        let (tag, name, count) = reader.section()?;
        let announced = match tag {
            TABLE_SECTION => header.tables.get(&name),
            _ => header.logs.get(&name),
        };
        if announced != Some(&count) {
            return Err(reader.malformed(format!(
                "section {name} holds {count} records, the header announces {announced:?}"
            )));
        }
        match tag {
            TABLE_SECTION => {
                let table = known(&Table::ALL, |t| t.name(), "table", &name, &header)?;
                let rows = (0..count)
                    .map(|_| Ok((reader.bytes()?, reader.bytes()?)))
                    .collect::<Result<_, BackupError>>()?;
                snapshot.tables.push((table, rows));
            }
            LOG_SECTION => {
                let log = known(&Log::ALL, |l| l.name(), "log", &name, &header)?;
                let records = (0..count)
                    .map(|_| Ok((reader.u64()?, reader.bytes()?)))
                    .collect::<Result<_, BackupError>>()?;
                snapshot.logs.push((log, records));
            }
            other => return Err(reader.malformed(format!("unknown section tag {other:#04x}"))),
        }
    }
    Ok((header, snapshot))
}

/// The header, checked against the content that follows it.
fn read_header(file: &[u8]) -> Result<Header, BackupError> {
    let rest = file.strip_prefix(MAGIC).ok_or(BackupError::NotABackup)?;
    let end = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BackupError::BadHeader("it ends before the header does".into()))?;
    let header: Header =
        serde_json::from_slice(&rest[..end]).map_err(|e| BackupError::BadHeader(e.to_string()))?;
    if header.format_version > FORMAT_VERSION {
        return Err(BackupError::NewerFormat {
            found: header.format_version,
            written_by: header.coordinator_version,
            ours: VERSION,
        });
    }
    let content = &rest[end + 1..];
    let found = content.len() as u64;
    if found < header.content_bytes {
        return Err(BackupError::Truncated {
            expected: header.content_bytes,
            found,
        });
    }
    if found > header.content_bytes {
        return Err(BackupError::TrailingBytes {
            expected: header.content_bytes,
            found,
        });
    }
    if sha256_hex(content) != header.content_sha256 {
        return Err(BackupError::Checksum);
    }
    Ok(header)
}

/// The table or log named `name`; a file from a newer version may hold
/// one this version lacks.
fn known<T: Copy>(
    all: &[T],
    name_of: impl Fn(T) -> &'static str,
    kind: &'static str,
    name: &str,
    header: &Header,
) -> Result<T, BackupError> {
    all.iter()
        .copied()
        .find(|t| name_of(*t) == name)
        .ok_or_else(|| BackupError::UnknownName {
            kind,
            name: name.to_string(),
            ours: VERSION,
            written_by: header.coordinator_version.clone(),
        })
}

fn section(content: &mut Vec<u8>, tag: u8, name: &str, count: usize) {
    content.push(tag);
    content.push(u8::try_from(name.len()).expect("table and log names are short"));
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(&(count as u64).to_be_bytes());
}

fn bytes(content: &mut Vec<u8>, value: &[u8]) {
    let len = u32::try_from(value.len()).expect("a store record is under 4 GiB");
    content.extend_from_slice(&len.to_be_bytes());
    content.extend_from_slice(value);
}

struct Reader<'a> {
    content: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.at == self.content.len()
    }

    fn malformed(&self, reason: String) -> BackupError {
        BackupError::Malformed {
            at: self.at,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], BackupError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.content.len())
            .ok_or_else(|| self.malformed(format!("{n} bytes expected, the content ends")))?;
        let taken = &self.content[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        let bytes = self.take(8)?.try_into().expect("8 bytes taken");
        Ok(u64::from_be_bytes(bytes))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, BackupError> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes taken"));
        Ok(self.take(len as usize)?.to_vec())
    }

    fn section(&mut self) -> Result<(u8, String, u64), BackupError> {
        let tag = self.take(1)?[0];
        let len = self.take(1)?[0] as usize;
        let name = String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| self.malformed("a section name is not UTF-8".into()))?;
        Ok((tag, name, self.u64()?))
    }
}

fn sha256_hex(content: &[u8]) -> String {
    Digest::from_hasher(Sha256::new_with_prefix(content))
        .hex()
        .to_string()
}

#[cfg(test)]
mod etcd_tests;
#[cfg(test)]
mod tests;
