//! The scratch copy of a drill: a new dir of its own under the parent it
//! was given (the data dir, the server's log, socket and auth files), a
//! PostgreSQL started on it and stopped again, and the dir removed.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::steps::{failed, Failure, OsUser, Steps};

/// How often a starting server is asked whether its recovery ended.
const POLL: Duration = Duration::from_millis(200);
/// The server log lines a failure quotes.
const LOG_LINES: usize = 5;

pub(super) struct Scratch {
    pub dir: PathBuf,
    pub data: PathBuf,
    /// Set once the server was started here.
    pub port: Option<u16>,
    /// Set by `remove`; otherwise dropping it removes what it can.
    removed: bool,
}

impl Scratch {
    /// A new dir (mode 0700, the user's) under `parent`, a data dir in it.
    pub fn create(parent: &Path, user: &OsUser) -> Result<Self, Failure> {
        let step = "creating the scratch dir";
        if !parent.is_dir() {
            return Err(failed(
                step,
                format!(
                    "{} is not a directory: create it, or name another scratch_parent",
                    parent.display()
                ),
            ));
        }
        let dir = parent.join(format!("cutover-drill-{:016x}", rand::random::<u64>()));
        let data = dir.join("data");
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        let make = |path: &Path| {
            builder
                .create(path)
                .and_then(|()| user.own(path))
                .map_err(|e| failed(step, format!("{}: {e}", path.display())))
        };
        make(&dir)?;
        // From here on, a failure drops it: the dir goes again.
        let scratch = Self {
            dir,
            data,
            port: None,
            removed: false,
        };
        make(&scratch.data)?;
        Ok(scratch)
    }

    /// Starts PostgreSQL on the restored data: loopback and a socket in the
    /// scratch dir only, archiving off, local connections trusted (the
    /// socket's dir is the user's alone), its log in the scratch dir.
    /// Returns once the server takes connections.
    pub async fn start(&mut self, steps: &mut Steps, bin_dir: &Path) -> Result<(), Failure> {
        let step = "starting the scratch server";
        let hba = self.dir.join("hba.conf");
        let ident = self.dir.join("ident.conf");
        // The restored cluster's own postgresql.conf may live elsewhere
        // (Debian keeps it in /etc): an empty one takes the defaults.
        let conf = self.data.join("postgresql.conf");
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text)
                .and_then(|()| steps.user.own(path))
                .map_err(|e| failed(step, format!("{}: {e}", path.display())))
        };
        write(&hba, "local all all trust\n")?;
        write(&ident, "")?;
        if !conf.exists() {
            write(&conf, "")?;
        }
        let port =
            free_port().map_err(|e| failed(step, format!("no free port on 127.0.0.1: {e}")))?;
        let settings = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={port}"),
            format!("unix_socket_directories={}", self.dir.display()),
            // Never pushes WAL into the repository it came from.
            "archive_mode=off".into(),
            format!("hba_file={}", hba.display()),
            format!("ident_file={}", ident.display()),
            // Only local connections: the original's certificates need not
            // be here; its log goes where the drill reads it.
            "ssl=off".into(),
            "logging_collector=off".into(),
        ];
        let options = settings
            .iter()
            .map(|s| format!("-c {}", shell_quote(s)))
            .collect::<Vec<_>>()
            .join(" ");
        // pg_ctl waits a little longer than the drill may: the drill's own
        // deadline ends it first, and says so.
        let wait = (steps.remaining(step)?.as_secs() + 10).to_string();
        self.port = Some(port);
        let pg_ctl = bin_dir.join("pg_ctl").display().to_string();
        let args = [
            "-D",
            &self.data.display().to_string(),
            "-l",
            &self.log().display().to_string(),
            "-w",
            "-t",
            &wait,
            "-o",
            &options,
            "start",
        ]
        .map(String::from);
        let started = steps.run(step, &pg_ctl, &args).await;
        started.map_err(|failure| self.with_log(failure))
    }

    /// Waits until the server's recovery ended (`pg_is_in_recovery()` is
    /// false), or it stopped, or the deadline passed.
    pub async fn wait_recovered(&self, steps: &mut Steps, psql: &Psql<'_>) -> Result<(), Failure> {
        let step = "waiting for the recovery to end";
        loop {
            steps.remaining(step).map_err(|f| self.with_log(f))?;
            if !self.running() {
                return Err(self.with_log(failed(step, "the scratch server stopped")));
            }
            if let Ok(rows) = psql
                .query(steps, step, "postgres", "select pg_is_in_recovery()")
                .await
            {
                if rows.trim() == "f" {
                    return Ok(());
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the server (if it runs) at once and removes the dir: what
    /// happens after every drill, whatever happened in it.
    pub async fn remove(
        mut self,
        steps: &mut Steps,
        bin_dir: Option<&Path>,
    ) -> Result<(), Failure> {
        let step = "removing the scratch copy";
        if self.running() {
            let stopped = match bin_dir {
                Some(bin_dir) => {
                    let pg_ctl = bin_dir.join("pg_ctl").display().to_string();
                    let args = [
                        "-D",
                        &self.data.display().to_string(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ];
                    steps
                        .run(
                            "stopping the scratch server",
                            &pg_ctl,
                            &args.map(String::from),
                        )
                        .await
                }
                None => Err(failed(step, "no pg_ctl to stop it with")),
            };
            if let Err(failure) = stopped {
                // Still there: the postmaster goes (its children follow it
                // when it is gone).
                steps.say(&format!("{failure}; killing the postmaster"));
                if let Some(pid) = self.postmaster_pid() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        self.removed = true;
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .map_err(std::io::Error::other)
            .and_then(|removed| removed);
        removed.map_err(|e| {
            failed(
                step,
                format!(
                    "cannot remove {}: {e}; remove it by hand",
                    self.dir.display()
                ),
            )
        })
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server runs while its pid file is there (it removes it when it
    /// stops; an immediate stop or a kill leaves it, so the pid is asked).
    fn running(&self) -> bool {
        self.postmaster_pid()
            .is_some_and(|pid| kill(Pid::from_raw(pid), None).is_ok())
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// `failure` with the last lines of the server's log, where a server
    /// that did not come up says why.
    fn with_log(&self, failure: Failure) -> Failure {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        if lines.is_empty() {
            return failure;
        }
        let tail = lines[lines.len().saturating_sub(LOG_LINES)..].join("\n");
        match failure {
            Failure::Failed { step, detail } => Failure::Failed {
                step,
                detail: format!("{detail}; the server log ends:\n{tail}"),
            },
            timed_out @ Failure::TimedOut { .. } => timed_out,
        }
    }
}

/// A drill dropped before its clean-up (the agent stopping mid-drill):
/// the server is told to stop at once (SIGQUIT, without waiting) and the
/// dir is removed.
impl Drop for Scratch {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Some(pid) = self.postmaster_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot remove a drill's scratch copy; remove it by hand");
        }
    }
}

/// psql against the scratch server, as the user, through its socket.
pub(super) struct Psql<'a> {
    pub program: String,
    pub socket_dir: &'a Path,
    pub port: u16,
    pub role: &'a str,
}

impl Psql<'_> {
    /// `sql`'s rows, unaligned and without headers (a line each, values
    /// separated by "|", NULL empty).
    pub async fn query(
        &self,
        steps: &mut Steps,
        step: &str,
        database: &str,
        sql: &str,
    ) -> Result<String, Failure> {
        let args = [
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.socket_dir.display().to_string(),
            "-p",
            &self.port.to_string(),
            "-U",
            self.role,
            "-d",
            database,
            "-c",
            sql,
        ]
        .map(String::from);
        steps.capture(step, &self.program, &args).await
    }
}

/// A port nothing listens on now on 127.0.0.1.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `text` as one word for the shell pg_ctl starts the server through.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn a_setting_stays_one_shell_word() {
        assert_eq!(
            shell_quote("hba_file=/tmp/a b/hba.conf"),
            "'hba_file=/tmp/a b/hba.conf'"
        );
        assert_eq!(shell_quote("x=it's"), r"'x=it'\''s'");
    }
}
