//! Pieces shared by the coordinator, the agent and the tests: configuration
//! loading, the PKI and mTLS plumbing, identities, telemetry, shutdown and
//! reconnect backoff, and the validated release type both sides act on.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod digest;
pub mod fetch;
pub mod fsutil;
pub mod identity;
pub mod levers;
pub mod modes;
pub mod net;
pub mod pki;
pub mod queues;
pub mod registry;
pub mod release;
pub mod rules;
pub mod shutdown;
pub mod sled_open;
pub mod telemetry;
pub mod tls;

/// The version every cutover binary reports (agent hello, build info metric).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The agent protocol agents of this version speak (`Hello.protocol_version`):
/// 2 added fleet upgrades (`upgrade_agent`). A hello without one is 1.
pub const AGENT_PROTOCOL: u32 = 2;
/// The oldest agent protocol this coordinator still speaks: older agents
/// are refused, with what to do.
pub const OLDEST_AGENT_PROTOCOL: u32 = 1;

/// The gRPC metadata key in which a coordinator that follows names the
/// leader, on every call it refuses: an agent moves there (the CLI asks
/// `ServerService.Status`, which names the leader too).
pub const LEADER_METADATA: &str = "cutover-leader";

/// Milliseconds since the Unix epoch, the one timestamp unit on the wire and in
/// the store.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Runs blocking I/O (an fsync, say) from async code. On a multi-thread
/// runtime the worker hands its other tasks to the rest first, so a slow
/// disk does not stall proxied requests; elsewhere it just runs.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// An error and its causes on one line, each cause once: many errors here
/// already quote their cause in their own message, so printing the plain
/// chain would repeat it.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(cause) = current {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        current = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot bind {addr}: {source}")]
    struct Bind {
        addr: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn causes_already_quoted_are_not_repeated() {
        let error = Bind {
            addr: "127.0.0.1:1",
            source: std::io::Error::other("address in use"),
        };
        assert_eq!(
            super::error_chain(&error),
            "cannot bind 127.0.0.1:1: address in use"
        );
    }
}
