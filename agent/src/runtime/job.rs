//! Run-to-completion: a command that runs to its exit (a migration, a hook,
//! a scheduled job) rather than a release kept up by a supervisor. It gets
//! a deadline, and what it printed last comes back with how it ended.

use std::path::PathBuf;
use std::time::Duration;

/// A command to run to its exit.
#[derive(Debug, Clone)]
pub struct Job {
    /// What it is, for messages and logs (e.g. "web-v2 migrate").
    pub name: String,
    pub command: Vec<String>,
    /// The unpacked release dir it runs in.
    pub workdir: PathBuf,
    /// Its whole environment besides `PATH` (secrets included).
    pub env: Vec<(String, String)>,
    /// Past this it is killed, with everything it started.
    pub deadline: Duration,
    /// How much of its output (stdout and stderr, as they came) is kept: the
    /// last bytes, where a failure usually explains itself.
    pub tail_bytes: usize,
    /// Where its output goes as it comes, besides the tail (lossy UTF-8,
    /// in chunks as read).
    pub output: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// How a job ended, and the tail of its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub ended: Ended,
    /// The last `tail_bytes` of its output (lossy UTF-8).
    pub output: String,
    pub took: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself: `code` is `None` when a signal ended it;
    /// `detail` says how ("exit status: 3").
    Exited { code: Option<i32>, detail: String },
    /// It was still running at its deadline and was killed.
    DeadlineExceeded,
}

impl Completion {
    /// Exited by itself with status 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.ended, Ended::Exited { code: Some(0), .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {name}: empty command; give the job a command to run")]
    EmptyCommand { name: String },
    #[error("job {name}: cannot start {program:?} in {workdir}: {reason}")]
    Spawn {
        name: String,
        program: String,
        workdir: PathBuf,
        reason: String,
    },
    #[error("job {name}: the {runtime} runtime cannot run jobs to completion yet; run it as a process release")]
    Unsupported { name: String, runtime: &'static str },
}

/// The last `limit` bytes written to it.
#[derive(Debug)]
pub(crate) struct Tail {
    bytes: Vec<u8>,
    limit: usize,
}

impl Tail {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            limit,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(self.limit)..];
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.limit);
        self.bytes.drain(..overflow);
        self.bytes.extend_from_slice(chunk);
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::Tail;

    #[test]
    fn a_tail_keeps_the_last_bytes() {
        let mut tail = Tail::new(5);
        tail.push(b"abc");
        tail.push(b"def");
        assert_eq!(tail.text(), "bcdef");
        tail.push(b"0123456789");
        assert_eq!(tail.text(), "56789");
    }
}
