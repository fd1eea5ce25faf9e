//! systemd's side of the agent's protocol with its service manager, for
//! tests on a machine without systemd: the notify socket (`NOTIFY_SOCKET`)
//! that takes the agent's `READY=1`, `WATCHDOG=1`, `MAINPID=` and the
//! listening sockets it stores (`FDSTORE=1`, with the fds), and the start
//! of an agent with the stored sockets (`LISTEN_FDS`, `LISTEN_PID`), as
//! systemd restarts a crashed service. What is not run: systemd itself
//! (its unit parsing, restart timing, `NotifyAccess=` checks).

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// One notification: its `KEY=value` lines, and the fds it carried.
#[derive(Debug)]
pub struct Notification {
    pub fields: BTreeMap<String, String>,
    pub at: Instant,
}

#[derive(Default)]
struct Received {
    notifications: Vec<Notification>,
    /// The file descriptor store, by `FDNAME`.
    store: BTreeMap<String, OwnedFd>,
}

pub struct FakeSystemd {
    pub socket: PathBuf,
    received: Arc<Mutex<Received>>,
}

impl FakeSystemd {
    /// Listens on a notify socket in `dir`.
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join("notify.sock");
        let _ = std::fs::remove_file(&socket);
        let datagrams = UnixDatagram::bind(&socket).expect("bind the notify socket");
        let received: Arc<Mutex<Received>> = Arc::default();
        let sink = received.clone();
        std::thread::spawn(move || loop {
            let mut bytes = [0u8; 4096];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let Ok(message) = rustix::net::recvmsg(
                &datagrams,
                &mut [std::io::IoSliceMut::new(&mut bytes)],
                &mut control,
                RecvFlags::empty(),
            ) else {
                return;
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            for part in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = part {
                    fds.extend(rights);
                }
            }
            let text = String::from_utf8_lossy(&bytes[..message.bytes]).into_owned();
            let fields: BTreeMap<String, String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut received = sink.lock().expect("notify lock");
            if fields.contains_key("FDSTORE") {
                let name = fields.get("FDNAME").cloned().unwrap_or_default();
                // systemd keeps one per name here: the agent stores each
                // socket under its address.
                if let Some(fd) = fds.pop() {
                    received.store.insert(name, fd);
                }
            }
            if fields.contains_key("FDSTOREREMOVE") {
                if let Some(name) = fields.get("FDNAME") {
                    received.store.remove(name);
                }
            }
            received.notifications.push(Notification {
                fields,
                at: Instant::now(),
            });
        });
        Self { socket, received }
    }

    /// The environment of a service under this manager.
    pub fn env(&self, watchdog: Option<Duration>) -> Vec<(String, String)> {
        let mut env = vec![(
            "NOTIFY_SOCKET".to_string(),
            self.socket.display().to_string(),
        )];
        if let Some(period) = watchdog {
            env.push(("WATCHDOG_USEC".to_string(), period.as_micros().to_string()));
        }
        env
    }

    /// How many notifications set `key` (to `value`, when given).
    pub fn count(&self, key: &str, value: Option<&str>) -> usize {
        self.received
            .lock()
            .expect("notify lock")
            .notifications
            .iter()
            .filter(|n| {
                n.fields
                    .get(key)
                    .is_some_and(|v| value.is_none_or(|w| v == w))
            })
            .count()
    }

    /// The values of `key` in the notifications that set it, in order.
    pub fn values(&self, key: &str) -> Vec<String> {
        self.received
            .lock()
            .expect("notify lock")
            .notifications
            .iter()
            .filter_map(|n| n.fields.get(key).cloned())
            .collect()
    }

    /// Waits until a notification sets `key` to `value` (any value: None).
    pub fn wait_for(&self, key: &str, value: Option<&str>, within: Duration) {
        let deadline = Instant::now() + within;
        while self.count(key, value) == 0 {
            assert!(
                Instant::now() < deadline,
                "no {key}={} notification within {within:?}; got {:?}",
                value.unwrap_or("*"),
                self.received.lock().expect("notify lock").notifications
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The names in the file descriptor store.
    pub fn stored(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("notify lock")
            .store
            .keys()
            .cloned()
            .collect()
    }

    /// Starts `command` as systemd restarts a service with stored fds:
    /// copies of them from fd 3 on, `LISTEN_FDS`, `LISTEN_FDNAMES` and
    /// `LISTEN_PID` (the pid it runs as: a shell sets it, then execs).
    pub fn start_with_store(
        &self,
        program: &Path,
        args: &[&str],
        watchdog: Option<Duration>,
    ) -> std::process::Command {
        let received = self.received.lock().expect("notify lock");
        let names: Vec<String> = received.store.keys().cloned().collect();
        let mappings: Vec<FdMapping> = received
            .store
            .values()
            .enumerate()
            .map(|(i, fd)| FdMapping {
                parent_fd: fd.try_clone().expect("dup a stored fd"),
                child_fd: 3 + i as i32,
            })
            .collect();
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .env("LISTEN_FDS", names.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .envs(self.env(watchdog));
        command.fd_mappings(mappings).expect("distinct fd numbers");
        command
    }
}
