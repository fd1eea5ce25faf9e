//! Handing the node over to a new agent process without a refused
//! connection: a planned restart or a binary upgrade (SIGHUP, `systemctl
//! reload cutover-agent`, `cutover-agent upgrade`).
//!
//! The running agent (the predecessor) starts its binary again (the file
//! at its path, a new version after an upgrade) with copies of the
//! proxies' listening sockets (`LISTEN_FDS`, see `listeners`) and the path
//! of a unix socket in its state dir to talk over, one line per step:
//!
//! 1. the successor checks its config and certificate, then says
//!    `prepared VERSION`; one that cannot run never gets further, and the
//!    predecessor carries on as if nothing happened;
//! 2. the predecessor ends its session, waits for its commands in flight,
//!    lets go of the node's state (store, supervisors; the releases run
//!    on) but keeps accepting, and says `released`;
//! 3. the successor opens the state, adopts the releases, serves on the
//!    sockets (both processes accept for a moment) and says `serving PID`;
//! 4. the predecessor makes the successor systemd's main process, stops
//!    accepting, lets its open connections finish (each answer from now
//!    on closes its connection) and exits.
//!
//! Past step 2 the predecessor cannot go back; if the successor fails
//! there, the predecessor's own binary (`/proc/self/exe`, the version that
//! ran) takes over the same way.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use command_fds::CommandFdExt;
use command_fds::FdMapping;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::notify::listener_name;

/// Where the predecessor waits for its successor: set for the successor
/// (not `CUTOVER_AGENT_*`, which is the config's).
pub const HANDOFF_ENV: &str = "CUTOVER_HANDOFF_SOCKET";
/// The unix socket's file in the state dir.
const SOCKET_FILE: &str = "handoff.sock";
/// How long the successor gets to connect and check its config.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the successor waits for the predecessor to let go: it waits
/// for its commands in flight first (`SETTLE_TIMEOUT` in lib.rs, 60 s).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the predecessor waits for the successor to serve: adopting
/// releases may restart crashed ones and wait for their health.
const SERVE_TIMEOUT: Duration = Duration::from_secs(300);
/// The binary that ran this process, also when its file was replaced.
pub const OWN_BINARY: &str = "/proc/self/exe";

/// What a handoff starts: a binary, under which command line, and
/// whether on probation (a fleet upgrade, see `binaries`: recorded when
/// the handoff starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub binary: PathBuf,
    /// `argv[0]` first.
    pub argv: Vec<OsString>,
    pub probation: Option<crate::binaries::Probation>,
}

impl Launch {
    /// `binary` under this process's command line.
    pub fn this_command_line(binary: &Path) -> Self {
        Self {
            binary: binary.to_path_buf(),
            argv: std::env::args_os().collect(),
            probation: None,
        }
    }
}

/// Why a handoff is asked for: a plain one is refused while the agent is
/// on probation (only its way back may start then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Reload,
    Upgrade,
    Revert,
}

/// A handoff asked of the running agent, and where to say whether the new
/// agent can run (its version) or why the handoff was refused.
pub struct Request {
    pub launch: Launch,
    pub reason: Reason,
    pub reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
}

impl Request {
    pub fn answer(self, answer: Result<String, String>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(answer);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("cannot start {}: {}", .binary.display(), cutover_common::fsutil::explain_io(.binary, .source))]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot talk to the other agent over {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy the proxies' listening sockets: {0}")]
    Listeners(std::io::Error),
    #[error("the new agent did not connect within {}; is it older than agent handoffs, or stuck? See its log lines", humantime::format_duration(START_TIMEOUT))]
    NoConnection,
    #[error("services changed while the handoff waited ({0}); send SIGHUP again")]
    ServicesChanged(String),
    #[error("the new agent exited before it took over ({status}); see its log lines above")]
    Exited { status: String },
    #[error("the other agent gave no {step} within {}", humantime::format_duration(*.waited))]
    Timeout {
        step: &'static str,
        waited: Duration,
    },
    #[error("the other agent said {said:?} where {step} was expected")]
    Protocol { step: &'static str, said: String },
    #[error("the new agent refused to take over: {0}")]
    Refused(String),
}

/// A line-per-step link between the two agents.
struct Link {
    stream: BufReader<UnixStream>,
    path: PathBuf,
}

impl Link {
    async fn say(&mut self, line: &str) -> Result<(), HandoffError> {
        let path = self.path.clone();
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|source| HandoffError::Socket { path, source })
    }

    /// The next line within `wait`, which must start with `step`; its
    /// rest. End of stream is `None`: the other side is gone.
    async fn expect(
        &mut self,
        step: &'static str,
        wait: Duration,
    ) -> Result<Option<String>, HandoffError> {
        let mut line = String::new();
        let read = tokio::time::timeout(wait, self.stream.read_line(&mut line))
            .await
            .map_err(|_| HandoffError::Timeout { step, waited: wait })?
            .map_err(|source| HandoffError::Socket {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Ok(None);
        }
        let line = line.trim_end();
        if let Some(reason) = line.strip_prefix("failed ") {
            return Err(HandoffError::Refused(reason.to_string()));
        }
        match line.strip_prefix(step) {
            Some(rest) => Ok(Some(rest.trim().to_string())),
            None => Err(HandoffError::Protocol {
                step,
                said: line.to_string(),
            }),
        }
    }
}

/// The successor's side: the agent it takes over from.
pub struct Predecessor {
    link: Link,
}

impl Predecessor {
    /// The predecessor's socket, when this process was started to take
    /// over; removed from the environment (releases must not see it).
    /// Must run before other threads start.
    pub fn from_env() -> Option<PathBuf> {
        let path = std::env::var_os(HANDOFF_ENV)?;
        std::env::remove_var(HANDOFF_ENV);
        Some(PathBuf::from(path))
    }

    pub async fn connect(path: &Path) -> Result<Self, HandoffError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| HandoffError::Socket {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            link: Link {
                stream: BufReader::new(stream),
                path: path.to_path_buf(),
            },
        })
    }

    /// Says this binary can run the config and waits until the
    /// predecessor let go of the node's state.
    pub async fn prepared(&mut self) -> Result<(), HandoffError> {
        self.link
            .say(&format!("prepared {}", cutover_common::VERSION))
            .await?;
        match self.link.expect("released", RELEASE_TIMEOUT).await? {
            Some(_) => Ok(()),
            None => Err(HandoffError::Refused(
                "the old agent went away before it released the node".into(),
            )),
        }
    }

    /// Says this agent serves: the predecessor stops accepting.
    pub async fn serving(mut self) -> Result<(), HandoffError> {
        self.link
            .say(&format!("serving {}", std::process::id()))
            .await
    }

    /// Tells the predecessor why this agent cannot take over (it logs it).
    pub async fn failed(mut self, reason: &str) {
        let _ = self
            .link
            .say(&format!("failed {}", reason.replace('\n', " ")))
            .await;
    }
}

/// The predecessor's side: a new agent process on its way to take over.
pub struct Successor {
    child: tokio::process::Child,
    link: Link,
    pub version: String,
    /// The addresses whose listening sockets it was given, sorted.
    pub listeners: Vec<SocketAddr>,
}

impl Successor {
    /// Starts `launch` on copies of `listeners`, and waits until it says
    /// it can run (`prepared`).
    pub async fn start(
        launch: &Launch,
        state_dir: &Path,
        listeners: Vec<(SocketAddr, OwnedFd)>,
    ) -> Result<Self, HandoffError> {
        let path = state_dir.join(SOCKET_FILE);
        let socket_error = |source| HandoffError::Socket {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_error(e)),
        }
        let socket = UnixListener::bind(&path).map_err(socket_error)?;
        let mut passed: Vec<SocketAddr> = listeners.iter().map(|(a, _)| *a).collect();
        passed.sort();
        let names: Vec<String> = listeners.iter().map(|(a, _)| listener_name(*a)).collect();
        let mappings: Vec<FdMapping> = listeners
            .into_iter()
            .enumerate()
            .map(|(i, (_, fd))| FdMapping {
                parent_fd: fd,
                child_fd: 3 + i as i32,
            })
            .collect();
        let binary = launch.binary.as_path();
        let mut command = tokio::process::Command::new(binary);
        if let Some(name) = launch.argv.first() {
            command.arg0(name);
        }
        if launch.probation.is_some() {
            command.env(crate::binaries::PROBATION_ENV, "1");
        }
        command
            .args(launch.argv.iter().skip(1))
            .env(HANDOFF_ENV, &path)
            .env("LISTEN_FDS", names.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            // The successor's pid is not known before it runs; and the
            // watchdog is its once it is systemd's main process.
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_PID")
            .kill_on_drop(false);
        command
            .fd_mappings(mappings)
            .expect("fds are mapped to distinct numbers");
        let mut child = command.spawn().map_err(|source| HandoffError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(binary = %binary.display(), pid, "started a new agent to take over");
        let accepted = tokio::select! {
            accepted = tokio::time::timeout(START_TIMEOUT, accept_from(&socket, pid)) => accepted,
            status = child.wait() => {
                let _ = std::fs::remove_file(&path);
                return Err(exited(status));
            }
        };
        let _ = std::fs::remove_file(&path);
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                stop(&mut child).await;
                return Err(HandoffError::Socket { path, source });
            }
            Err(_) => {
                stop(&mut child).await;
                return Err(HandoffError::NoConnection);
            }
        };
        let mut successor = Self {
            child,
            link: Link {
                stream: BufReader::new(stream),
                path,
            },
            version: String::new(),
            listeners: passed,
        };
        match successor.expect("prepared", START_TIMEOUT).await {
            Ok(version) => {
                successor.version = version;
                Ok(successor)
            }
            Err(error) => Err(successor.abort(error).await),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// The next step's line; the child's exit when it is gone.
    async fn expect(&mut self, step: &'static str, wait: Duration) -> Result<String, HandoffError> {
        match self.link.expect(step, wait).await? {
            Some(rest) => Ok(rest),
            None => Err(exited(self.child.wait().await)),
        }
    }

    /// Says the node's state is the successor's now, and waits until it
    /// serves.
    pub async fn released(&mut self) -> Result<(), HandoffError> {
        self.link.say("released").await?;
        self.expect("serving", SERVE_TIMEOUT).await.map(|_| ())
    }

    /// Stops the successor (what it started of its own is its business:
    /// it never got the node's state) and returns `error`.
    pub async fn abort(mut self, error: HandoffError) -> HandoffError {
        stop(&mut self.child).await;
        error
    }
}

/// The connection of process `pid`: another process of the agent's user
/// (a release) connecting first is turned away.
async fn accept_from(socket: &UnixListener, pid: u32) -> std::io::Result<UnixStream> {
    loop {
        let (stream, _) = socket.accept().await?;
        let peer = stream.peer_cred()?.pid();
        if peer == Some(pid as i32) {
            return Ok(stream);
        }
        tracing::warn!(
            ?peer,
            expected = pid,
            "a process other than the new agent connected to the handoff socket; ignoring it"
        );
    }
}

async fn stop(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

fn exited(status: std::io::Result<std::process::ExitStatus>) -> HandoffError {
    HandoffError::Exited {
        status: match status {
            Ok(status) => status.to_string(),
            Err(error) => error.to_string(),
        },
    }
}

/// Where process `pid` (or `self`) was started from: the path a package
/// upgrade puts the new binary at. Its absolute `argv[0]` (a symlink such
/// as `/usr/local/bin/cutover-agent -> /opt/...` stays one), else its
/// `/proc/PID/exe` link, to which the kernel adds " (deleted)" once the
/// file was replaced.
pub fn binary_path(pid: &str) -> std::io::Result<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let argv0 = Path::new(std::ffi::OsStr::from_bytes(argv0));
    if argv0.is_absolute() && argv0 != Path::new(OWN_BINARY) && argv0.exists() {
        return Ok(argv0.to_path_buf());
    }
    let link = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let text = link.to_string_lossy();
    Ok(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(&text).to_string(),
    ))
}

/// The pid of the agent running with `state_dir` (its pid file names a
/// live cutover-agent), or why there is none.
pub fn running_agent(state_dir: &Path) -> Result<i32, String> {
    let path = state_dir.join(crate::PID_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot read {}: {e}; run this as root or as the agent's user",
            path.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} holds {:?}, not a pid", path.display(), text.trim()))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let alive = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
    // By its binary's name: one that took over as `/proc/self/exe` has
    // `exe` as its command name.
    let agent = alive
        && binary_path(&pid.to_string()).is_ok_and(|binary| {
            binary
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("cutover-agent"))
        });
    if agent {
        Ok(pid)
    } else {
        Err(format!(
            "{} names pid {pid}, which is not a running cutover-agent",
            path.display()
        ))
    }
}

/// The file in the state dir where the predecessor writes how its last
/// handoff ended, one line, for `cutover-agent upgrade` to wait for.
pub const OUTCOME_FILE: &str = "handoff.outcome";

/// How a handoff ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Agent `pid`, of `version`, runs the node now.
    TookOver { pid: u32, version: String },
    /// The new agent failed after this one let go of the node; agent
    /// `pid`, of this one's binary and `version`, took over instead.
    FellBack {
        pid: u32,
        version: String,
        why: String,
    },
    /// Nothing changed: this agent carries on.
    Refused(String),
    /// No agent could take over; this one exits for its service manager
    /// to start one.
    Failed(String),
}

impl Outcome {
    fn line(&self) -> String {
        match self {
            Outcome::TookOver { pid, version } => format!("took-over {pid} {version}"),
            Outcome::FellBack { pid, version, why } => format!("fell-back {pid} {version} {why}"),
            Outcome::Refused(why) => format!("refused {why}"),
            Outcome::Failed(why) => format!("failed {why}"),
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        let (kind, rest) = line.trim().split_once(' ')?;
        match kind {
            "took-over" => {
                let (pid, version) = rest.split_once(' ')?;
                Some(Outcome::TookOver {
                    pid: pid.parse().ok()?,
                    version: version.to_string(),
                })
            }
            "fell-back" => {
                let mut parts = rest.splitn(3, ' ');
                Some(Outcome::FellBack {
                    pid: parts.next()?.parse().ok()?,
                    version: parts.next()?.to_string(),
                    why: parts.next().unwrap_or_default().to_string(),
                })
            }
            "refused" => Some(Outcome::Refused(rest.to_string())),
            "failed" => Some(Outcome::Failed(rest.to_string())),
            _ => None,
        }
    }
}

/// Tells systemd, the log and the outcome file how a handoff ended.
pub fn report(state_dir: &Path, outcome: &Outcome) {
    match outcome {
        Outcome::TookOver { pid, version } => {
            crate::notify::reloaded(Some(*pid));
            tracing::info!(successor = pid, %version, "the new agent serves; this one drains its connections and exits");
        }
        Outcome::FellBack { pid, version, why } => {
            crate::notify::reloaded(Some(*pid));
            tracing::error!(successor = pid, %version, error = %why, "the new agent failed after this one let go of the node; this agent's own binary took over instead");
        }
        Outcome::Refused(why) => {
            crate::notify::reloaded(None);
            tracing::error!(error = %why, "handoff refused; this agent carries on, send SIGHUP again later");
        }
        Outcome::Failed(why) => {
            crate::notify::stopping();
            tracing::error!(error = %why, "no agent could take over; exiting for the service manager to restart one");
        }
    }
    let path = state_dir.join(OUTCOME_FILE);
    let line = format!("{}\n", outcome.line().replace('\n', " "));
    if let Err(error) = cutover_common::fsutil::write_atomic(
        &path,
        line.as_bytes(),
        cutover_common::modes::PRIVATE_FILE,
    ) {
        tracing::warn!(%error, path = %path.display(), "cannot record how the handoff ended");
    }
}

/// SIGHUP, as requests to hand over to `binary` (the path this agent was
/// started from, where a package upgrade puts the new one).
pub fn on_reload_signal(binary: PathBuf, requests: tokio::sync::mpsc::Sender<Request>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; reloads will not work");
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "handing over to a new agent process");
            // The agent drops those waiting after a refused handoff (a
            // SIGHUP during a handoff is that handoff).
            let _ = requests.try_send(Request {
                launch: Launch::this_command_line(&binary),
                reason: Reason::Reload,
                reply: None,
            });
        }
    });
}
