//! Agent binaries installed by a fleet upgrade (`cutover agents upgrade`),
//! each unpacked from its artifact into `state_dir/bin/<artifact hex>/`
//! (the unit's /usr/local/bin is read-only to the agent).
//!
//! An upgrade hands the node to such a binary on probation
//! (`bin/probation.json`): the coordinator commits it once the new agent
//! came back healthy (`bin/current.json`), and one not committed in time
//! hands the node back to the agent it came from. An agent started any
//! other way (systemd after a crash, a reboot, a reload) runs the committed
//! binary unless it is itself newer: a restart never returns a node to an
//! older agent, nor to one the coordinator did not confirm.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use cutover_common::digest::Digest;
use serde::{Deserialize, Serialize};

/// The binary's name inside an agent artifact (at its top, or in `bin/`).
pub const BINARY_NAME: &str = "cutover-agent";
const BIN_DIR: &str = "bin";
const CURRENT_FILE: &str = "current.json";
const PROBATION_FILE: &str = "probation.json";
/// Set by an upgrade on the agent it starts: that agent is on probation.
/// Not a `CUTOVER_AGENT_` name: those are configuration.
pub const PROBATION_ENV: &str = "CUTOVER_UPGRADE_PROBATION";
/// Set on the exec of the committed binary, which must not exec again
/// (a binary that is a wrapper execs the one it wraps).
const FROM_CURRENT_ENV: &str = "CUTOVER_FROM_CURRENT_BINARY";

/// An installed agent binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub binary: PathBuf,
    pub version: String,
    /// The digest of the artifact it came from: its build, as the
    /// coordinator names it.
    pub digest: String,
}

/// An upgrade waiting for the coordinator's word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probation {
    pub installed: Installed,
    /// The agent the node came from, started as it was (its binary,
    /// `argv[0]` and arguments), to go back to.
    pub previous: PathBuf,
    pub previous_argv: Vec<String>,
    /// Its build ("" for a binary no upgrade installed).
    pub previous_build: String,
    /// Wall-clock milliseconds: not committed by then, the node goes back.
    pub until_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("artifact {digest} holds no {BINARY_NAME} (at its top or in bin/); put the binary at the top of the archive")]
    Missing { digest: String },
    #[error("{} does not run here ({reason}); it will not be used: check it is built for this machine, and that the agent's state dir is not mounted noexec", .binary.display())]
    DoesNotRun { binary: PathBuf, reason: String },
    #[error("cannot change {}: {source}; the agent's user needs to own its state dir", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

fn bin_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(BIN_DIR)
}

/// Where the binary of the artifact with `digest` is unpacked.
pub fn install_dir(state_dir: &Path, digest: &Digest) -> PathBuf {
    bin_dir(state_dir).join(digest.hex())
}

/// The agent binary in an unpacked artifact, proven to run here.
pub async fn installed(dir: &Path, digest: &Digest) -> Result<Installed, BinaryError> {
    let binary = [dir.join(BINARY_NAME), dir.join("bin").join(BINARY_NAME)]
        .into_iter()
        .find(|path| path.is_file())
        .ok_or_else(|| BinaryError::Missing {
            digest: digest.to_string(),
        })?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&binary)
            .map_err(|source| BinaryError::Io {
                path: binary.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o100 == 0 {
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(mode | 0o700))
                .map_err(|source| BinaryError::Io {
                    path: binary.clone(),
                    source,
                })?;
        }
    }
    let checked = binary.clone();
    let version = tokio::task::spawn_blocking(move || version_of(&checked))
        .await
        .expect("version check panicked")
        .map_err(|reason| BinaryError::DoesNotRun {
            binary: binary.clone(),
            reason,
        })?;
    Ok(Installed {
        binary,
        version,
        digest: digest.to_string(),
    })
}

/// `binary --version`'s version, proving it runs on this machine; or
/// what it said instead.
pub fn version_of(binary: &Path) -> Result<String, String> {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.trim().strip_prefix("cutover-agent ") {
        Some(version) if output.status.success() => Ok(version.to_string()),
        _ => Err(format!(
            "`--version` gave {}: {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read");
            return None;
        }
    };
    serde_json::from_str(&text)
        .inspect_err(|error| tracing::warn!(path = %path.display(), %error, "unreadable, ignored"))
        .ok()
}

fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), BinaryError> {
    let io = |source| BinaryError::Io {
        path: path.to_path_buf(),
        source,
    };
    cutover_common::modes::private_dir(path.parent().expect("bin files have a parent"))
        .map_err(io)?;
    let text = serde_json::to_vec_pretty(value).expect("serializable");
    cutover_common::fsutil::write_atomic(path, &text, cutover_common::modes::PRIVATE_FILE)
        .map_err(io)
}

/// The binary the coordinator committed, if any.
pub fn current(state_dir: &Path) -> Option<Installed> {
    read(&bin_dir(state_dir).join(CURRENT_FILE))
}

pub fn probation(state_dir: &Path) -> Option<Probation> {
    read(&bin_dir(state_dir).join(PROBATION_FILE))
}

pub fn begin_probation(state_dir: &Path, probation: &Probation) -> Result<(), BinaryError> {
    write(&bin_dir(state_dir).join(PROBATION_FILE), probation)
}

/// Forgets the probation (the upgrade did not happen, or is undone).
pub fn end_probation(state_dir: &Path) {
    let path = bin_dir(state_dir).join(PROBATION_FILE);
    if let Err(error) = std::fs::remove_file(&path) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %error, "cannot remove");
        }
    }
}

/// Makes the binary on probation with `digest` the committed one: what
/// every later start runs. Refused once the probation ran out (that
/// agent is handing the node back) or for another build.
pub fn commit(state_dir: &Path, digest: &str, now_ms: i64) -> Result<Installed, BinaryError> {
    let Some(probation) = probation(state_dir) else {
        return match current(state_dir) {
            Some(current) if current.digest == digest => Ok(current),
            _ => Err(BinaryError::Refused(format!(
                "no agent upgrade to {digest} waits for a commit on this node"
            ))),
        };
    };
    if probation.installed.digest != digest {
        return Err(BinaryError::Refused(format!(
            "the agent upgrade on probation here is to {}, not {digest}",
            probation.installed.digest
        )));
    }
    if now_ms >= probation.until_ms {
        return Err(BinaryError::Refused(format!(
            "the probation of agent build {digest} ran out; the node returns to its previous agent"
        )));
    }
    write(&bin_dir(state_dir).join(CURRENT_FILE), &probation.installed)?;
    end_probation(state_dir);
    prune(
        state_dir,
        &[&probation.installed.digest, &probation.previous_build],
    );
    Ok(probation.installed)
}

/// Removes the installed builds but `keep` (digests): the committed one
/// and the one it replaced, to go back to by hand.
fn prune(state_dir: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(bin_dir(state_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let kept = keep
            .iter()
            .any(|digest| digest.strip_prefix("sha256:") == Some(name.as_str()));
        if kept || !entry.path().is_dir() {
            continue;
        }
        if let Err(error) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(path = %entry.path().display(), %error, "cannot remove an old agent build");
        }
    }
}

/// What an agent process is, as it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The committed binary is another one, not older: run that instead.
    Exec(Installed),
    /// Started by an upgrade: the coordinator has yet to commit it.
    OnProbation(Probation),
    /// Runs as it is; its build, if an upgrade installed it.
    Plain { build: String },
}

/// Decides what this process is (see `Start`), from the state dir, the
/// environment its starter set, its own binary and version. Forgets a
/// probation no agent serves any more (its agent crashed or was
/// restarted before the commit) and a committed binary older than this
/// one (a package upgrade went past it).
pub fn at_start(state_dir: &Path, own_binary: &Path, own_version: &str) -> Start {
    let on_probation = std::env::var_os(PROBATION_ENV).is_some();
    let from_current = std::env::var_os(FROM_CURRENT_ENV).is_some();
    let pending = probation(state_dir);
    if on_probation {
        if let Some(probation) = pending {
            return Start::OnProbation(probation);
        }
        tracing::warn!("started as an upgrade with no probation recorded; running as is");
    } else if let Some(pending) = pending {
        tracing::warn!(build = %pending.installed.digest, "the agent upgrade to this build was not committed; it is forgotten");
        end_probation(state_dir);
    }
    let Some(current) = current(state_dir) else {
        return Start::Plain {
            build: String::new(),
        };
    };
    let same_file = |a: &Path, b: &Path| {
        std::fs::canonicalize(a)
            .ok()
            .is_some_and(|a| Some(a) == std::fs::canonicalize(b).ok())
    };
    if from_current || same_file(own_binary, &current.binary) {
        return Start::Plain {
            build: current.digest,
        };
    }
    // Only a binary installed otherwise (a package upgrade) wins by being
    // newer: one of bin/ that is not committed (an agent falling back to
    // itself after its way back failed) never does.
    if !own_binary.starts_with(bin_dir(state_dir)) && newer(own_version, &current.version) {
        tracing::info!(own = own_version, committed = %current.version, "this binary is newer than the committed one; it runs from now on");
        let path = bin_dir(state_dir).join(CURRENT_FILE);
        let _ = std::fs::remove_file(path);
        return Start::Plain {
            build: String::new(),
        };
    }
    if !current.binary.is_file() {
        tracing::warn!(binary = %current.binary.display(), "the committed agent binary is gone; running this one");
        return Start::Plain {
            build: String::new(),
        };
    }
    Start::Exec(current)
}

/// Replaces this process with `installed` (same pid, arguments,
/// environment and open sockets); returns only on failure.
pub fn exec(installed: &Installed) -> std::io::Error {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from(BINARY_NAME));
    std::process::Command::new(&installed.binary)
        .arg0(arg0)
        .args(args)
        .env(FROM_CURRENT_ENV, "1")
        .exec()
}

/// Removes what `at_start` read from the environment, for releases not
/// to see it. Must run before other threads start.
pub fn clear_env() {
    std::env::remove_var(PROBATION_ENV);
    std::env::remove_var(FROM_CURRENT_ENV);
}

/// Whether version `a` is newer than `b` (dotted numbers, compared as
/// numbers; a pre-release suffix after `-` counts as older).
pub fn newer(a: &str, b: &str) -> bool {
    fn parts(version: &str) -> (Vec<u64>, bool) {
        let (numbers, pre) = match version.split_once('-') {
            Some((numbers, _)) => (numbers, true),
            None => (version, false),
        };
        let numbers = numbers.split('.').map(|n| n.parse().unwrap_or(0)).collect();
        (numbers, pre)
    }
    let (a, a_pre) = parts(a);
    let (b, b_pre) = parts(b);
    match a.cmp(&b) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => b_pre && !a_pre,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(dir: &Path, name: &str, version: &str) -> Installed {
        let binary = dir.join(name);
        std::fs::write(&binary, "").unwrap();
        Installed {
            binary,
            version: version.into(),
            digest: format!("sha256:{name}"),
        }
    }

    fn probation_of(installed: Installed, until_ms: i64) -> Probation {
        Probation {
            installed,
            previous: "/usr/local/bin/cutover-agent".into(),
            previous_argv: vec!["cutover-agent".into(), "--config".into(), "a.toml".into()],
            previous_build: "sha256:bb".into(),
            until_ms,
        }
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert!(newer("0.10.0", "0.9.1"));
        assert!(newer("1.0.0", "1.0.0-rc1"));
        assert!(!newer("1.0.0-rc1", "1.0.0"));
        assert!(!newer("0.1.0", "0.1.0"));
        assert!(!newer("0.1.0", "0.2.0"));
    }

    #[test]
    fn a_commit_needs_its_probation_in_time_and_survives_a_reread() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let new = installed(state, "new", "0.1.0");
        assert!(
            commit(state, &new.digest, 0).is_err(),
            "nothing on probation"
        );
        begin_probation(state, &probation_of(new.clone(), 1_000)).unwrap();
        assert!(commit(state, "sha256:other", 10).is_err(), "another build");
        assert!(commit(state, &new.digest, 1_000).is_err(), "ran out");
        for old in ["aa", "bb"] {
            std::fs::create_dir_all(bin_dir(state).join(old)).unwrap();
        }
        assert_eq!(commit(state, &new.digest, 999).unwrap(), new);
        assert!(
            !bin_dir(state).join("aa").exists(),
            "an older build is pruned"
        );
        assert!(
            bin_dir(state).join("bb").exists(),
            "the replaced build is kept"
        );
        assert_eq!(current(state), Some(new.clone()));
        assert_eq!(probation(state), None);
        // Said again (a coordinator that lost the answer): the same.
        assert_eq!(commit(state, &new.digest, 5_000).unwrap(), new);
    }

    #[test]
    fn a_start_runs_the_committed_binary_unless_newer_and_forgets_a_stale_probation() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let package = installed(state, "package", "0.1.0");
        assert_eq!(
            at_start(state, &package.binary, "0.1.0"),
            Start::Plain {
                build: String::new()
            }
        );
        let committed = installed(state, "committed", "0.1.0");
        write(&bin_dir(state).join(CURRENT_FILE), &committed).unwrap();
        assert_eq!(
            at_start(state, &package.binary, "0.1.0"),
            Start::Exec(committed.clone())
        );
        assert_eq!(
            at_start(state, &committed.binary, "0.1.0"),
            Start::Plain {
                build: committed.digest.clone()
            }
        );
        // Not started by the upgrade (a crash, a reboot): the probation
        // is over, the committed binary runs.
        let pending = installed(state, "pending", "0.1.0");
        begin_probation(state, &probation_of(pending, i64::MAX)).unwrap();
        assert_eq!(
            at_start(state, &package.binary, "0.1.0"),
            Start::Exec(committed.clone())
        );
        assert_eq!(probation(state), None);
        // A binary of bin/ that is not the committed one never wins by
        // being newer.
        std::fs::create_dir_all(bin_dir(state).join("cc")).unwrap();
        let uncommitted = bin_dir(state).join("cc").join(BINARY_NAME);
        std::fs::write(&uncommitted, "").unwrap();
        assert_eq!(
            at_start(state, &uncommitted, "0.2.0"),
            Start::Exec(committed.clone())
        );
        // The committed binary gone: this one runs.
        let kept = committed.binary.with_extension("kept");
        std::fs::rename(&committed.binary, &kept).unwrap();
        assert_eq!(
            at_start(state, &package.binary, "0.1.0"),
            Start::Plain {
                build: String::new()
            }
        );
        std::fs::rename(&kept, &committed.binary).unwrap();
        // A package upgrade past the committed binary wins.
        assert_eq!(
            at_start(state, &package.binary, "0.2.0"),
            Start::Plain {
                build: String::new()
            }
        );
        assert_eq!(current(state), None);
    }
}
