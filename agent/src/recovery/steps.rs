//! The commands of one backup or drill: run as the cluster's OS user,
//! within the run's deadline, their output streamed as it comes and kept
//! in one transcript whose tail goes into the result.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};
use tokio::sync::mpsc;

use crate::runtime::job::{Ended, Job, Tail};
use crate::runtime::process::{GroupGuard, ProcessRuntime};
use crate::runtime::{release_command, Runtime as _};

/// What a result keeps of the run's output: the end, where a failure
/// explains itself.
const TAIL_BYTES: usize = 16 * 1024;

/// The OS user pgbackrest and PostgreSQL run as. PostgreSQL refuses to run
/// as root, so an agent running as root switches to it for every command
/// (runuser); an agent running as anyone else must be that user.
#[derive(Debug, Clone)]
pub(super) struct OsUser {
    pub name: String,
    uid: Uid,
    gid: Gid,
    switch: bool,
}

impl OsUser {
    pub fn resolve(name: &str) -> Result<Self, String> {
        let user = User::from_name(name)
            .map_err(|e| format!("cannot look up the OS user {name:?}: {e}"))?
            .ok_or_else(|| {
                format!("there is no OS user {name:?} on this node: name the user the cluster runs as (os_user), or install the postgresql package, which creates \"postgres\"")
            })?;
        let me = nix::unistd::geteuid();
        if !me.is_root() && me != user.uid {
            return Err(format!(
                "the agent runs as uid {me}, neither root nor {name:?} (uid {}): run the agent as root, or as {name:?}",
                user.uid
            ));
        }
        Ok(Self {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            switch: me.is_root(),
        })
    }

    /// `program args` as this user runs it.
    pub fn command(&self, program: &str, args: &[String]) -> Vec<String> {
        let mut command = Vec::with_capacity(args.len() + 5);
        if self.switch {
            command.extend(["runuser", "-u", &self.name, "--"].map(String::from));
        }
        command.push(program.to_string());
        command.extend(args.iter().cloned());
        command
    }

    /// Makes `path` this user's (a no-op unless the agent switches users:
    /// otherwise it is the agent's own already).
    pub fn own(&self, path: &Path) -> std::io::Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid.as_raw()), Some(self.gid.as_raw()))?;
        }
        Ok(())
    }
}

/// Why a step did not give what the run needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The run's deadline passed during `step`; what ran was killed.
    TimedOut { step: String, timeout: Duration },
    /// `step` ended badly: `detail` says how (its last output line, or
    /// the error).
    Failed { step: String, detail: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::TimedOut { step, timeout } => write!(
                f,
                "still running at its timeout of {} during {step}; killed",
                humantime::format_duration(*timeout)
            ),
            Failure::Failed { step, detail } => write!(f, "{step} failed: {detail}"),
        }
    }
}

pub(super) fn failed(step: &str, detail: impl Into<String>) -> Failure {
    Failure::Failed {
        step: step.to_string(),
        detail: detail.into(),
    }
}

pub(super) struct Steps {
    pub user: OsUser,
    timeout: Duration,
    deadline: Instant,
    output: mpsc::UnboundedSender<String>,
    transcript: Tail,
}

impl Steps {
    pub fn new(user: OsUser, timeout: Duration, output: mpsc::UnboundedSender<String>) -> Self {
        Self {
            user,
            timeout,
            deadline: Instant::now() + timeout,
            output,
            transcript: Tail::new(TAIL_BYTES),
        }
    }

    /// Gives the steps from here on a bound of their own (a drill's
    /// clean-up runs after its deadline too).
    pub fn rebound(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.deadline = Instant::now() + timeout;
    }

    /// What is left of the deadline; a timeout failure of `step` when
    /// nothing is.
    pub fn remaining(&self, step: &str) -> Result<Duration, Failure> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out(step));
        }
        Ok(left)
    }

    fn timed_out(&self, step: &str) -> Failure {
        Failure::TimedOut {
            step: step.to_string(),
            timeout: self.timeout,
        }
    }

    /// A line of the agent's own in the output (and the transcript).
    pub fn say(&mut self, line: &str) {
        let line = format!("{line}\n");
        self.transcript.push(line.as_bytes());
        let _ = self.output.send(line);
    }

    pub fn tail(&self) -> String {
        self.transcript.text()
    }

    /// Runs `program args` as the user to its exit, its output streamed;
    /// fails unless it exits 0.
    pub async fn run(&mut self, step: &str, program: &str, args: &[String]) -> Result<(), Failure> {
        let deadline = self.remaining(step)?;
        let command = self.user.command(program, args);
        self.say(&format!("$ {}", command.join(" ")));
        let job = Job {
            name: format!("recovery {step}"),
            command,
            workdir: "/".into(),
            env: Vec::new(),
            deadline,
            tail_bytes: TAIL_BYTES,
            output: Some(self.output.clone()),
        };
        let completion = ProcessRuntime
            .run_to_completion(&job)
            .await
            .map_err(|e| failed(step, e.to_string()))?;
        self.transcript.push(completion.output.as_bytes());
        match completion.ended {
            Ended::Exited { code: Some(0), .. } => Ok(()),
            Ended::Exited { detail, .. } => Err(failed(
                step,
                format!("{detail}: {}", last_line(&completion.output)),
            )),
            Ended::DeadlineExceeded => Err(self.timed_out(step)),
        }
    }

    /// Runs `program args` as the user to its exit and returns what it
    /// wrote to stdout (a JSON document, a query's rows); its stderr goes
    /// to the transcript. Fails unless it exits 0, with stderr's last line.
    pub async fn capture(
        &mut self,
        step: &str,
        program: &str,
        args: &[String],
    ) -> Result<String, Failure> {
        let deadline = self.remaining(step)?;
        let command = self.user.command(program, args);
        let (program, args) = command.split_first().expect("a command has a program");
        let child = release_command(program, args, Path::new("/"), &[])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(step, format!("cannot start {program}: {e}")))?;
        // Whatever it started goes with it, at the deadline too.
        let _group = child.id().map(GroupGuard);
        let output = match tokio::time::timeout(deadline, child.wait_with_output()).await {
            Ok(output) => {
                output.map_err(|e| failed(step, format!("waiting for {program}: {e}")))?
            }
            Err(_) => return Err(self.timed_out(step)),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        self.transcript.push(stderr.as_bytes());
        if !output.status.success() {
            return Err(failed(step, format!("{}: {}", output.status, why(&stderr))));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Why a command failed: its first error line (psql follows it with
/// the query and a caret), else its last line.
fn why(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|line| {
            ["ERROR:", "FATAL:", "error:"]
                .iter()
                .any(|e| line.contains(e))
        })
        .unwrap_or_else(|| last_line(text))
}

/// The last line with something on it: where a command says why it failed.
pub(super) fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("(no output)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_skips_blank_ones() {
        assert_eq!(last_line("a\nERROR: boom\n\n  \n"), "ERROR: boom");
        assert_eq!(last_line(""), "(no output)");
        let psql = "ERROR:  relation \"t\" does not exist\nLINE 1: select * from t\n                      ^\n";
        assert_eq!(why(psql), "ERROR:  relation \"t\" does not exist");
        assert_eq!(why("a\nb\n"), "b");
    }

    #[tokio::test]
    async fn a_step_past_the_deadline_is_killed_and_says_where() {
        let me = User::from_uid(nix::unistd::geteuid()).unwrap().unwrap();
        let user = OsUser::resolve(&me.name).unwrap();
        let (output, _lines) = mpsc::unbounded_channel();
        let mut steps = Steps::new(user, Duration::from_millis(300), output);
        let started = Instant::now();
        let failure = steps
            .run("sleeping", "sleep", &["30".into()])
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            failure.to_string(),
            "still running at its timeout of 300ms during sleeping; killed"
        );
        let failure = steps.capture("next", "true", &[]).await.unwrap_err();
        assert!(matches!(failure, Failure::TimedOut { .. }), "{failure:?}");
    }
}
