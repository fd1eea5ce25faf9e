//! Whose a release process is, by labels in its environment: the node id
//! of the agent that started it (`CUTOVER_RELEASE_NODE`) and the node's
//! identity, its name in its installation (`CUTOVER_RELEASE_OWNER`,
//! `name@<CA fingerprint>`), and the agent's state dir
//! (`CUTOVER_RELEASE_STATE_DIR`). A starting agent stops processes of its node
//! id that no record names (killed between a spawn and its record), and
//! refuses to start beside releases of its identity that another state dir
//! holds with no agent running there (the node moved to a new state dir:
//! it would not see them, and its port would stay down).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::process::{stat_field, ProcessId};

pub const NODE_LABEL: &str = "CUTOVER_RELEASE_NODE";
pub const OWNER_LABEL: &str = "CUTOVER_RELEASE_OWNER";
pub const STATE_DIR_LABEL: &str = "CUTOVER_RELEASE_STATE_DIR";
const LABELS: [&str; 3] = [NODE_LABEL, OWNER_LABEL, STATE_DIR_LABEL];

/// The labels an agent gives the processes it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub node_id: String,
    /// `name@<CA fingerprint>` (`identity`).
    pub identity: String,
    pub state_dir: PathBuf,
}

impl Owner {
    pub fn new(node_id: &str, name: &str, ca_fingerprint: &str, state_dir: &Path) -> Self {
        Self {
            node_id: node_id.to_string(),
            identity: identity(name, ca_fingerprint),
            state_dir: state_dir.to_path_buf(),
        }
    }

    pub fn labels(&self) -> [(String, String); 3] {
        [
            (NODE_LABEL.to_string(), self.node_id.clone()),
            (OWNER_LABEL.to_string(), self.identity.clone()),
            (
                STATE_DIR_LABEL.to_string(),
                self.state_dir.display().to_string(),
            ),
        ]
    }

    /// Whether an environment entry is one of these labels (what commands
    /// beside a release, such as its stop command, must not carry).
    pub fn is_label(key: &str) -> bool {
        LABELS.contains(&key)
    }
}

/// A node's identity in its installation.
pub fn identity(name: &str, ca_fingerprint: &str) -> String {
    format!("{name}@{ca_fingerprint}")
}

/// A running process group whose leader carries the labels.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub process: ProcessId,
    /// Its parent's pid (a group a release made of its own is its child).
    pub parent: u32,
    /// `state_dir` is empty for a release started before that label was.
    pub owner: Owner,
}

/// Every labelled process group on this host.
pub fn labelled_groups() -> Vec<Labelled> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_field(pid, 5).and_then(|g| g.parse().ok()) == Some(pid))
        .filter_map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let labels: HashMap<&[u8], &[u8]> = environ
                .split(|&b| b == 0)
                .filter_map(|entry| {
                    let at = entry.iter().position(|&b| b == b'=')?;
                    Some((&entry[..at], &entry[at + 1..]))
                })
                .filter(|(key, _)| LABELS.iter().any(|l| l.as_bytes() == *key))
                .collect();
            let text = |key: &str| {
                labels
                    .get(key.as_bytes())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let owner = Owner {
                node_id: text(NODE_LABEL)?,
                identity: text(OWNER_LABEL).unwrap_or_default(),
                state_dir: text(STATE_DIR_LABEL).unwrap_or_default().into(),
            };
            let process = ProcessId::of(pid).filter(ProcessId::is_alive)?;
            Some(Labelled {
                process,
                parent: stat_field(pid, 4)?.parse().ok()?,
                owner,
            })
        })
        .collect()
}

/// Releases of `identity` that a state dir other than `state_dir` holds,
/// with no agent running there: what this agent would leave unsupervised.
/// Releases without the state dir label (started by an older agent) are
/// not counted: where they belong is not known.
pub fn left_elsewhere(identity: &str, state_dir: &Path) -> Vec<Labelled> {
    labelled_groups()
        .into_iter()
        .filter(|group| group.owner.identity == identity)
        .filter(|group| elsewhere_without_agent(&group.owner.state_dir, state_dir))
        .collect()
}

/// Whether `dir` (a release's recorded state dir) is another state dir
/// than `own`, with no agent running on it.
pub fn elsewhere_without_agent(dir: &Path, own: &Path) -> bool {
    let canonical = |dir: &Path| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    !dir.as_os_str().is_empty()
        && canonical(dir) != canonical(own)
        && crate::handoff::running_agent(&canonical(dir)).is_err()
}
