//! What the agent keeps in its state dir: its node id and the journal of
//! recent command results.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use cutover_common::fsutil::write_atomic;
use cutover_proto::v1::{CommandJournal, CommandResult};
use prost::Message;

use cutover_common::modes;

const NODE_ID_FILE: &str = "node-id";
const JOURNAL_FILE: &str = "commands.journal";
/// Results kept for replay; far more than one reconnect can leave in flight.
const JOURNAL_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state dir {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({reason}); move it away to start fresh (a node id file lost means the node registers anew)")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes a state file an older agent (or another umask) left readable by
/// others 0600.
fn restrict(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    let private = std::fs::Permissions::from_mode(modes::PRIVATE_FILE);
    std::fs::set_permissions(path, private).map_err(io(path))
}

/// Reads the node id, creating and persisting one on first start. Creates
/// the state dir too, or narrows it to 0700 if it exists (see `modes`).
pub fn node_id(state_dir: &Path) -> Result<String, StateError> {
    modes::private_dir(state_dir).map_err(io(state_dir))?;
    let path = state_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            restrict(&path)?;
            let id = text.trim();
            uuid::Uuid::parse_str(id).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            write_atomic(&path, format!("{id}\n").as_bytes(), modes::PRIVATE_FILE)
                .map_err(io(&path))?;
            Ok(id)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Results of the last commands, persisted so a restarted agent still knows
/// what it already did.
pub struct Journal {
    path: PathBuf,
    results: VecDeque<CommandResult>,
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let path = state_dir.join(JOURNAL_FILE);
        let results = match std::fs::read(&path) {
            Ok(bytes) => {
                restrict(&path)?;
                CommandJournal::decode(bytes.as_slice())
                    .map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                    .results
                    .into()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(Self { path, results })
    }

    pub fn get(&self, command_id: &str) -> Option<&CommandResult> {
        self.results
            .iter()
            .rev()
            .find(|r| r.command_id == command_id)
    }

    pub fn record(&mut self, result: CommandResult) -> Result<(), StateError> {
        self.results.push_back(result);
        while self.results.len() > JOURNAL_CAPACITY {
            self.results.pop_front();
        }
        let bytes = CommandJournal {
            results: self.results.iter().cloned().collect(),
        }
        .encode_to_vec();
        write_atomic(&self.path, &bytes, modes::PRIVATE_FILE).map_err(io(&self.path))
    }

    /// The most recent ids, newest last, for the hello.
    pub fn recent_ids(&self, limit: usize) -> Vec<String> {
        let skip = self.results.len().saturating_sub(limit);
        self.results
            .iter()
            .skip(skip)
            .map(|r| r.command_id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_id(dir.path()).unwrap();
        assert_eq!(node_id(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join(NODE_ID_FILE), "garbage").unwrap();
        assert!(matches!(
            node_id(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn journal_persists_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        for i in 0..(JOURNAL_CAPACITY + 5) {
            journal
                .record(CommandResult {
                    command_id: format!("c{i}"),
                    ..Default::default()
                })
                .unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        assert!(journal.get("c0").is_none());
        assert!(journal.get(&format!("c{}", JOURNAL_CAPACITY + 4)).is_some());
        assert_eq!(
            journal.recent_ids(2),
            vec![
                format!("c{}", JOURNAL_CAPACITY + 3),
                format!("c{}", JOURNAL_CAPACITY + 4)
            ]
        );
    }
}
