//! Who leads: `cutover_leading` is 1 on the coordinator that acts (the
//! elected leader on etcd, or a single coordinator) and 0 on a follower;
//! `cutover_leader_token` is the leader's fencing token as this coordinator
//! knows it (0 without an election), so a change of leader shows as a
//! change of the highest token; `cutover_leading_since_timestamp_seconds`
//! is when this coordinator's term began.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Default)]
pub struct LeadershipMetrics {
    leading: Gauge,
    token: Gauge,
    since: Gauge,
}

impl LeadershipMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "leading",
            "1 on the coordinator that acts (the elected leader, or a single coordinator), 0 on a follower",
            self.leading.clone(),
        );
        registry.register(
            "leader_token",
            "The leader's fencing token as this coordinator knows it (0 without an election)",
            self.token.clone(),
        );
        registry.register(
            "leading_since_timestamp_seconds",
            "When this coordinator's term began (0 while it follows)",
            self.since.clone(),
        );
    }

    /// This coordinator acts from `since_ms` on, with `token`.
    pub fn leading(&self, token: i64, since_ms: i64) {
        self.leading.set(1);
        self.token.set(token);
        self.since.set(since_ms / 1000);
    }

    /// This coordinator follows the leader of `token` (0: none known).
    pub fn following(&self, token: i64) {
        self.leading.set(0);
        self.token.set(token);
        self.since.set(0);
    }
}
