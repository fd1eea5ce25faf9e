//! Pieces shared by the coordinator, the agent and the tests: configuration
//! loading, the PKI and mTLS plumbing, identities, telemetry, shutdown and
//! reconnect backoff.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod fsutil;
pub mod identity;
pub mod pki;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// The version every cutover binary reports (agent hello, build info metric).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch, the one timestamp unit on the wire and in
/// the store.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
