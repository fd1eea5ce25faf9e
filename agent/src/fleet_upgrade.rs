//! The agent's side of a fleet upgrade (`cutover agents upgrade`): the
//! `prepare_agent`, `upgrade_agent` and `commit_agent` commands, and the
//! probation of an agent an upgrade started (see `binaries`): not
//! committed in time, it hands the node back to the agent it came from.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_common::digest::Digest;
use cutover_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::binaries::{self, Installed, Probation, Start};
use crate::handoff::{self, Launch, Reason, Request};
use crate::services::NodeServices;

/// How often a way back that was refused (a command ran) is tried again.
const REVERT_RETRY: Duration = Duration::from_secs(5);

pub struct Upgrades {
    state_dir: PathBuf,
    /// Where handoffs are asked for; `None` for an agent that cannot hand
    /// over (one inside another program).
    requests: Option<mpsc::Sender<Request>>,
    /// This agent's build: the digest of the artifact it was installed
    /// from, "" for a binary installed otherwise.
    build: String,
    /// Until the coordinator commits this agent, or it goes back.
    probation: Mutex<Option<Probation>>,
    committed: CancellationToken,
}

impl Upgrades {
    pub fn new(
        state_dir: PathBuf,
        requests: Option<mpsc::Sender<Request>>,
        start: &Start,
    ) -> Arc<Self> {
        let (build, probation) = match start {
            Start::OnProbation(probation) => {
                (probation.installed.digest.clone(), Some(probation.clone()))
            }
            Start::Plain { build } => (build.clone(), None),
            Start::Exec(installed) => (installed.digest.clone(), None),
        };
        Arc::new(Self {
            state_dir,
            requests,
            build,
            probation: Mutex::new(probation),
            committed: CancellationToken::new(),
        })
    }

    pub fn build(&self) -> &str {
        &self.build
    }

    /// `prepare_agent`: the artifact fetched, verified and unpacked in the
    /// state dir, its binary proven to run here.
    pub async fn prepare(
        &self,
        services: &NodeServices,
        artifact: &pb::Artifact,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<Installed, String> {
        let digest = parse_digest(&artifact.digest)?;
        let dir = binaries::install_dir(&self.state_dir, &digest);
        services
            .unpack_artifact(&artifact.url, &digest, &dir, progress)
            .await
            .map_err(|e| e.to_string())?;
        progress("checking");
        binaries::installed(&dir, &digest)
            .await
            .map_err(|e| e.to_string())
    }

    /// `upgrade_agent`: hands the node to the prepared binary of `digest`
    /// on probation; once the new agent can run and no command runs, just
    /// before this agent lets go of the node. A refusal at any step says
    /// why.
    pub async fn upgrade(&self, digest: &str, probation: Duration) -> Result<String, String> {
        let Some(requests) = &self.requests else {
            return Err("this agent runs inside another program and cannot hand over".into());
        };
        if self.probation.lock().expect("probation lock").is_some() {
            return Err(format!(
                "this agent is itself on probation after an upgrade (build {}); upgrade it once it is committed",
                self.build
            ));
        }
        let parsed = parse_digest(digest)?;
        let dir = binaries::install_dir(&self.state_dir, &parsed);
        if !dir.exists() {
            return Err(format!(
                "agent build {digest} is not prepared on this node; prepare it first"
            ));
        }
        let installed = binaries::installed(&dir, &parsed)
            .await
            .map_err(|e| e.to_string())?;
        let argv: Vec<OsString> = std::env::args_os().collect();
        let previous_argv = argv
            .iter()
            .map(|arg| arg.clone().into_string())
            .collect::<Result<Vec<String>, _>>()
            .map_err(|arg| {
                format!(
                    "this agent's command line holds {arg:?}, which is not UTF-8; it could not be started again"
                )
            })?;
        let previous = handoff::binary_path("self")
            .map_err(|e| format!("cannot tell where this agent's binary is: {e}"))?;
        let probation_record = Probation {
            installed: installed.clone(),
            previous,
            previous_argv,
            previous_build: self.build.clone(),
            until_ms: cutover_common::now_ms()
                .saturating_add(i64::try_from(probation.as_millis()).unwrap_or(i64::MAX)),
        };
        let (reply, answer) = oneshot::channel();
        let request = Request {
            launch: Launch {
                binary: installed.binary.clone(),
                argv,
                probation: Some(probation_record),
            },
            reason: Reason::Upgrade,
            reply: Some(reply),
        };
        let answer = match requests.send(request).await {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err("the agent stopped before the handoff".into())),
            Err(_) => Err("the agent is stopping".into()),
        };
        answer
            .map(|version| format!("agent {version} of build {digest} takes over"))
            .inspect_err(|_| binaries::end_probation(&self.state_dir))
    }

    /// `commit_agent`: this agent (on probation with `digest`) is what the
    /// node runs from now on.
    pub fn commit(&self, digest: &str) -> Result<Installed, String> {
        let mut probation = self.probation.lock().expect("probation lock");
        if probation.is_none() {
            // Committed before (an answer that got lost), or handing the
            // node back.
            return match binaries::current(&self.state_dir) {
                Some(current) if current.digest == digest && self.build == digest => Ok(current),
                _ => Err(format!(
                    "this agent (build {:?}) is not on probation with {digest}: there is nothing to commit",
                    self.build
                )),
            };
        }
        let installed = binaries::commit(&self.state_dir, digest, cutover_common::now_ms())
            .map_err(|e| e.to_string())?;
        *probation = None;
        self.committed.cancel();
        tracing::info!(build = %digest, version = %installed.version, "agent upgrade committed");
        Ok(installed)
    }

    /// On probation: once it runs out uncommitted, hands the node back to
    /// the agent this one came from (again, while a command keeps the
    /// handoff from happening). Returns at once otherwise.
    pub async fn watch_probation(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(until_ms) = self
            .probation
            .lock()
            .expect("probation lock")
            .as_ref()
            .map(|p| p.until_ms)
        else {
            return;
        };
        let left = u64::try_from(until_ms.saturating_sub(cutover_common::now_ms())).unwrap_or(0);
        tracing::info!(build = %self.build, left_ms = left, "on probation until the coordinator commits this agent");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.committed.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(left)) => {}
        }
        // Taken, and its file removed, under the lock a commit takes: one
        // or the other.
        let probation = {
            let mut held = self.probation.lock().expect("probation lock");
            let Some(probation) = held.take() else {
                return;
            };
            binaries::end_probation(&self.state_dir);
            probation
        };
        let Some(requests) = &self.requests else {
            return;
        };
        tracing::warn!(build = %self.build, previous = %probation.previous.display(), "not committed in time; handing the node back to the previous agent");
        loop {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                launch: Launch {
                    binary: probation.previous.clone(),
                    argv: probation.previous_argv.iter().map(OsString::from).collect(),
                    probation: None,
                },
                reason: Reason::Revert,
                reply: Some(reply),
            };
            if requests.send(request).await.is_err() {
                return;
            }
            match answer.await {
                Ok(Ok(version)) => {
                    tracing::info!(%version, "the previous agent can run; it takes over");
                    return;
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "the previous agent cannot take over; trying again")
                }
                Err(_) => return,
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REVERT_RETRY) => {}
            }
        }
    }

    /// Whether `reason` may start a handoff now: on probation, only the
    /// way back may (or the upgrade it is would be lost).
    pub fn allows(&self, reason: Reason) -> Result<(), String> {
        let on_probation = self.probation.lock().expect("probation lock").is_some();
        match reason {
            Reason::Reload | Reason::Upgrade if on_probation => Err(format!(
                "this agent is on probation after an upgrade (build {}) until the coordinator commits it or it hands the node back; reload it after that",
                self.build
            )),
            _ => Ok(()),
        }
    }
}

fn parse_digest(digest: &str) -> Result<Digest, String> {
    Digest::parse(digest).map_err(|e| format!("agent artifact digest {digest:?}: {e}"))
}

pub fn binary_output(installed: &Installed) -> pb::command_result::Output {
    pb::command_result::Output::AgentBinary(pb::AgentBinary {
        digest: installed.digest.clone(),
        version: installed.version.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_probation(state_dir: &std::path::Path, until_ms: i64) -> Probation {
        let probation = Probation {
            installed: Installed {
                binary: state_dir.join("bin/aa/cutover-agent"),
                version: "0.1.0".into(),
                digest: "sha256:aa".into(),
            },
            previous: "/usr/local/bin/cutover-agent".into(),
            previous_argv: vec!["cutover-agent".into(), "--config".into(), "a.toml".into()],
            previous_build: String::new(),
            until_ms,
        };
        binaries::begin_probation(state_dir, &probation).unwrap();
        probation
    }

    #[tokio::test]
    async fn uncommitted_the_agent_hands_the_node_back_and_a_late_commit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let probation = on_probation(dir.path(), cutover_common::now_ms() + 100);
        let (requests, mut asked) = mpsc::channel(4);
        let upgrades = Upgrades::new(
            dir.path().to_path_buf(),
            Some(requests),
            &Start::OnProbation(probation.clone()),
        );
        assert!(
            upgrades.allows(Reason::Reload).is_err(),
            "no reload on probation"
        );
        assert!(upgrades
            .upgrade("sha256:bb", Duration::from_secs(1))
            .await
            .is_err());
        tokio::spawn(upgrades.clone().watch_probation(CancellationToken::new()));
        let request = tokio::time::timeout(Duration::from_secs(5), asked.recv())
            .await
            .expect("asked to hand back in time")
            .unwrap();
        assert_eq!(request.reason, Reason::Revert);
        assert_eq!(request.launch.binary, probation.previous);
        assert_eq!(request.launch.argv.len(), 3);
        assert_eq!(request.launch.probation, None);
        assert_eq!(binaries::probation(dir.path()), None, "forgotten");
        assert!(upgrades.commit("sha256:aa").is_err(), "too late");
        assert_eq!(binaries::current(dir.path()), None);
        request.answer(Ok("0.1.0".into()));
    }

    #[tokio::test]
    async fn a_commit_in_time_stops_the_way_back_and_may_be_said_again() {
        let dir = tempfile::tempdir().unwrap();
        let probation = on_probation(dir.path(), cutover_common::now_ms() + 300);
        let (requests, mut asked) = mpsc::channel(4);
        let upgrades = Upgrades::new(
            dir.path().to_path_buf(),
            Some(requests),
            &Start::OnProbation(probation.clone()),
        );
        let watch = tokio::spawn(upgrades.clone().watch_probation(CancellationToken::new()));
        assert!(upgrades.commit("sha256:bb").is_err(), "another build");
        assert_eq!(upgrades.commit("sha256:aa").unwrap(), probation.installed);
        assert_eq!(upgrades.commit("sha256:aa").unwrap(), probation.installed);
        watch.await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(asked.try_recv().is_err(), "no way back once committed");
        assert_eq!(binaries::current(dir.path()), Some(probation.installed));
        assert!(upgrades.allows(Reason::Reload).is_ok());
    }
}
