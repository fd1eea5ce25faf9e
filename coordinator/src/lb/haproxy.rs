//! HAProxy's runtime API (the `stats socket ... level admin` of its
//! configuration), over TCP or a unix socket: one command per connection
//! (non-interactive mode), its answer read to the end. What cutover asks
//! of it: a server's admin state (ready, drain), its weight, and its
//! current sessions. Names go into commands only checked (`name_ok`).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most an answer may weigh: `show stat` of a large config is tens of
/// KiB.
const MAX_ANSWER_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("cannot reach the HAProxy runtime API at {address}: {cause}; check its `stats socket ... level admin` line and that this host may connect")]
    Connect { address: String, cause: String },
    #[error("the HAProxy runtime API at {address} did not answer `{command}` within {}s; is HAProxy running there with `stats socket ... level admin` (the operator guide's \"Behind a load balancer\")?", .timeout.as_secs())]
    Timeout {
        address: String,
        command: String,
        timeout: Duration,
    },
    #[error("HAProxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    #[error("HAProxy has no server {server} in backend {backend}; name the node's server in the backend (or its label `server_label`)")]
    NoServer { backend: String, server: String },
    #[error("cannot read HAProxy's answer to `{command}`: {cause}")]
    Answer { command: String, cause: String },
    #[error("{0:?} is not an HAProxy backend or server name (letters, digits, - _ . : only); check the spec's backends and the node label that names the server")]
    BadName(String),
}

/// A backend or server name as it may go into a command: anything else
/// (a space, a `;`) would let a node label inject commands of its own.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn checked<'a>(backend: &'a str, server: &'a str) -> Result<(&'a str, &'a str), HaproxyError> {
    for name in [backend, server] {
        if !name_ok(name) {
            return Err(HaproxyError::BadName(name.to_string()));
        }
    }
    Ok((backend, server))
}

/// Where the runtime API listens: `host:port`, or a unix socket's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl Address {
    /// `/run/haproxy/admin.sock` (a path) or `10.0.0.2:9999`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('/') {
            return Ok(Address::Unix(PathBuf::from(text)));
        }
        let port = text
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        match port {
            Some((host, Ok(port))) if !host.is_empty() && port > 0 => Ok(Address::Tcp(text.into())),
            _ => Err(format!(
                "{text:?} is not a runtime API address; give host:port (e.g. \"10.0.0.2:9999\") or a unix socket's absolute path"
            )),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(address) => f.write_str(address),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A server's admin state as cutover sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new requests.
    Ready,
    /// Finishes what it has (and keeps persistent sessions), takes no new
    /// ones.
    Drain,
}

impl AdminState {
    fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
        }
    }
}

/// The runtime API of one HAProxy.
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    address: Address,
    timeout: Duration,
}

impl RuntimeApi {
    pub fn new(address: Address, timeout: Duration) -> Self {
        Self { address, timeout }
    }

    /// Runs `command` and returns its answer.
    pub async fn command(&self, command: &str) -> Result<String, HaproxyError> {
        let exchange = async {
            match &self.address {
                Address::Tcp(address) => {
                    let stream = tokio::net::TcpStream::connect(address)
                        .await
                        .map_err(|e| self.unreachable(e))?;
                    exchange(stream, command).await
                }
                Address::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(|e| self.unreachable(e))?;
                    exchange(stream, command).await
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HaproxyError::Timeout {
                address: self.address.to_string(),
                command: command.into(),
                timeout: self.timeout,
            })?
    }

    fn unreachable(&self, error: std::io::Error) -> HaproxyError {
        HaproxyError::Connect {
            address: self.address.to_string(),
            cause: error.to_string(),
        }
    }

    /// Runs a `set` command, which answers nothing when it worked.
    async fn set(&self, backend: &str, server: &str, what: &str) -> Result<(), HaproxyError> {
        let (backend, server) = checked(backend, server)?;
        let command = format!("set server {backend}/{server} {what}");
        let answer = self.command(&command).await?;
        match answer.trim() {
            "" => Ok(()),
            "No such server." => Err(HaproxyError::NoServer {
                backend: backend.into(),
                server: server.into(),
            }),
            other => Err(HaproxyError::Refused {
                command,
                answer: other.into(),
            }),
        }
    }

    pub async fn set_state(
        &self,
        backend: &str,
        server: &str,
        state: AdminState,
    ) -> Result<(), HaproxyError> {
        self.set(backend, server, &format!("state {}", state.as_str()))
            .await
    }

    /// Sets `server`'s weight: 0 to 256 (0 sends it nothing new), or
    /// `None`, back to the weight its configuration gives it.
    pub async fn set_weight(
        &self,
        backend: &str,
        server: &str,
        weight: Option<u32>,
    ) -> Result<(), HaproxyError> {
        let weight = match weight {
            Some(weight) => weight.min(256).to_string(),
            // Relative to the configured (initial) weight.
            None => "100%".to_string(),
        };
        self.set(backend, server, &format!("weight {weight}")).await
    }

    /// The sessions `server` of `backend` has now (`scur`).
    pub async fn sessions(&self, backend: &str, server: &str) -> Result<u64, HaproxyError> {
        let (backend, server) = checked(backend, server)?;
        // Type 4: servers only.
        let command = format!("show stat {backend} 4 -1");
        let answer = self.command(&command).await?;
        current_sessions(&answer, backend, server).map_err(|cause| match cause {
            Refusal::Refused(answer) => HaproxyError::Refused { command, answer },
            Refusal::Unreadable(cause) if cause.is_empty() => HaproxyError::NoServer {
                backend: backend.into(),
                server: server.into(),
            },
            Refusal::Unreadable(cause) => HaproxyError::Answer { command, cause },
        })
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    command: &str,
) -> Result<String, HaproxyError> {
    let failed = |e: std::io::Error| HaproxyError::Answer {
        command: command.into(),
        cause: e.to_string(),
    };
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(failed)?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER_BYTES as u64)
        .read_to_end(&mut answer)
        .await
        .map_err(failed)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

enum Refusal {
    /// HAProxy answered with a message instead of the table.
    Refused(String),
    /// The table was not as expected (empty: the server is not in it).
    Unreadable(String),
}

/// `scur` of `server` in `show stat`'s CSV.
fn current_sessions(answer: &str, backend: &str, server: &str) -> Result<u64, Refusal> {
    let mut lines = answer.lines().filter(|l| !l.trim().is_empty());
    let header = match lines.next().and_then(|h| h.strip_prefix("# ")) {
        Some(header) => header,
        None => return Err(Refusal::Refused(answer.trim().into())),
    };
    let columns: Vec<&str> = header.split(',').collect();
    let at = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(scur)) = (at("pxname"), at("svname"), at("scur")) else {
        return Err(Refusal::Unreadable(
            "no pxname, svname or scur column".into(),
        ));
    };
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.get(px) == Some(&backend) && fields.get(sv) == Some(&server) {
            return fields
                .get(scur)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Refusal::Unreadable(format!("scur of {line:?}")));
        }
    }
    Err(Refusal::Unreadable(String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight
shop_web,node-1,0,0,3,5,,0,0,0,,0,,0,0,0,0,DRAIN,30
shop_web,node-2,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,100
";

    #[test]
    fn sessions_are_read_by_column_name_and_names_are_checked() {
        assert!(name_ok("shop_web") && name_ok("node-1.eu:2"));
        for bad in ["", "x; set server b/s addr 6.6.6.6", "a b", "a/b"] {
            assert!(!name_ok(bad), "{bad}");
        }
        assert!(matches!(
            current_sessions(STAT, "shop_web", "node-1"),
            Ok(3)
        ));
        assert!(matches!(
            current_sessions(STAT, "shop_web", "node-9"),
            Err(Refusal::Unreadable(m)) if m.is_empty()
        ));
    }

    #[test]
    fn an_address_is_host_and_port_or_a_socket_path() {
        assert_eq!(
            Address::parse("10.0.0.2:9999"),
            Ok(Address::Tcp("10.0.0.2:9999".into()))
        );
        assert_eq!(
            Address::parse("/run/haproxy/admin.sock"),
            Ok(Address::Unix("/run/haproxy/admin.sock".into()))
        );
        for bad in ["haproxy", ":9999", "h:0", "h:x", "run/admin.sock"] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }
}
