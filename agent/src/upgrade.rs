//! `cutover-agent upgrade`: has the agent running with a state dir hand its
//! node over to a new process (see `handoff`), after installing a new
//! binary where the running one was started from, and waits for the
//! outcome. Equivalent to `systemctl reload cutover-agent` after a package
//! upgrade, with the outcome on the terminal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::handoff::{Outcome, OUTCOME_FILE};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no agent runs with state dir {state_dir}: {reason}; start it first (systemctl start cutover-agent)")]
    NotRunning { state_dir: PathBuf, reason: String },
    #[error(
        "{binary} is not a cutover-agent binary that runs here ({reason}); nothing was changed"
    )]
    BadBinary { binary: PathBuf, reason: String },
    #[error("cannot install {binary} as {target}: {source}; run this as the user that owns {target} (root for /usr/local/bin)")]
    Install {
        binary: PathBuf,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot signal agent {pid}: {reason}; run this as root or as the agent's user")]
    Signal { pid: i32, reason: String },
    #[error("agent {pid} did not say how the handoff ended within {}; see its log (journalctl -u cutover-agent)", humantime::format_duration(*.waited))]
    NoOutcome { pid: i32, waited: Duration },
}

/// What `upgrade` did.
#[derive(Debug)]
pub struct Upgraded {
    pub old_pid: i32,
    /// The binary installed, when one was given.
    pub installed: Option<Installed>,
    /// Whether the previous binary was put back (the new one did not take
    /// over).
    pub restored: bool,
    pub outcome: Outcome,
}

/// A binary installed over the agent's.
#[derive(Debug)]
pub struct Installed {
    pub target: PathBuf,
    pub version: String,
    /// The binary it replaced, kept beside it until the outcome is known;
    /// `None` when the agent already ran from the given file.
    previous: Option<PathBuf>,
}

impl Installed {
    fn restore(&self) -> Result<bool, UpgradeError> {
        let Some(previous) = &self.previous else {
            return Ok(false);
        };
        std::fs::rename(previous, &self.target).map_err(|source| UpgradeError::Install {
            binary: previous.clone(),
            target: self.target.clone(),
            source,
        })?;
        Ok(true)
    }

    fn forget_previous(&self) {
        if let Some(previous) = &self.previous {
            let _ = std::fs::remove_file(previous);
        }
    }
}

/// Installs `binary` (if given) over the running agent's binary, signals
/// the agent, and waits up to `wait` for how its handoff ended.
pub fn upgrade(
    state_dir: &Path,
    binary: Option<&Path>,
    wait: Duration,
) -> Result<Upgraded, UpgradeError> {
    let not_running = |reason: String| UpgradeError::NotRunning {
        state_dir: state_dir.to_path_buf(),
        reason,
    };
    let pid = crate::handoff::running_agent(state_dir).map_err(not_running)?;
    let installed = match binary {
        Some(binary) => {
            let version = version_of(binary)?;
            let target = crate::handoff::binary_path(&pid.to_string())
                .map_err(|e| not_running(format!("cannot see agent {pid}'s binary: {e}")))?;
            let previous = install(binary, &target)?;
            Some(Installed {
                target,
                version,
                previous,
            })
        }
        None => None,
    };
    let outcome_path = state_dir.join(OUTCOME_FILE);
    let _ = std::fs::remove_file(&outcome_path);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| UpgradeError::Signal {
        pid,
        reason: e.to_string(),
    })?;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(outcome) = std::fs::read_to_string(&outcome_path)
            .ok()
            .and_then(|text| Outcome::parse(&text))
        {
            // A binary that did not take over must not be what the next
            // start (a crash, a reboot) runs: the previous one goes back.
            let restored = match (&installed, &outcome) {
                (Some(installed), Outcome::TookOver { .. }) => {
                    installed.forget_previous();
                    false
                }
                (Some(installed), _) => installed.restore()?,
                (None, _) => false,
            };
            return Ok(Upgraded {
                old_pid: pid,
                installed,
                restored,
                outcome,
            });
        }
        if Instant::now() >= deadline {
            return Err(UpgradeError::NoOutcome { pid, waited: wait });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `binary --version`'s version, proving it runs on this machine.
fn version_of(binary: &Path) -> Result<String, UpgradeError> {
    crate::binaries::version_of(binary).map_err(|reason| UpgradeError::BadBinary {
        binary: binary.to_path_buf(),
        reason,
    })
}

/// Copies `binary` beside `target` and renames it over: the running agent
/// keeps its (now unlinked) file, the next start gets the new one. The
/// replaced file is kept (hard-linked) beside it, to put back.
fn install(binary: &Path, target: &Path) -> Result<Option<PathBuf>, UpgradeError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |source| UpgradeError::Install {
        binary: binary.to_path_buf(),
        target: target.to_path_buf(),
        source,
    };
    if std::fs::canonicalize(binary).ok() == std::fs::canonicalize(target).ok() {
        return Ok(None);
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staged = target.with_file_name(format!(".{name}.new"));
    let previous = target.with_file_name(format!(".{name}.previous"));
    std::fs::copy(binary, &staged).map_err(error)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).map_err(error)?;
    let _ = std::fs::remove_file(&previous);
    std::fs::hard_link(target, &previous).map_err(error)?;
    std::fs::rename(&staged, target).map_err(error)?;
    Ok(Some(previous))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PID_FILE;

    #[test]
    fn outcomes_read_back_as_written() {
        for outcome in [
            Outcome::TookOver {
                pid: 42,
                version: "0.2.0".into(),
            },
            Outcome::Refused("the new agent exited (exit status: 3)".into()),
            Outcome::FellBack {
                pid: 43,
                version: "0.1.0".into(),
                why: "the new agent exited (exit status: 4)".into(),
            },
            Outcome::Failed("no agent could take over".into()),
        ] {
            let dir = tempfile::tempdir().unwrap();
            crate::handoff::report(dir.path(), &outcome);
            let text = std::fs::read_to_string(dir.path().join(OUTCOME_FILE)).unwrap();
            assert_eq!(Outcome::parse(&text), Some(outcome));
        }
        assert_eq!(Outcome::parse("garbage"), None);
    }

    #[test]
    fn a_state_dir_without_a_running_agent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = upgrade(dir.path(), None, Duration::from_secs(1)).unwrap_err();
        assert!(
            error.to_string().contains("no agent runs with state dir"),
            "{error}"
        );
        // A pid file left by an agent that is gone (this test's own pid is
        // not an agent's).
        std::fs::write(
            dir.path().join(PID_FILE),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let error = upgrade(dir.path(), None, Duration::from_secs(1)).unwrap_err();
        assert!(
            error.to_string().contains("not a running cutover-agent"),
            "{error}"
        );
    }
}
