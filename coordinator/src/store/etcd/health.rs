//! The etcd cluster as each member sees itself, for `cutover server status`:
//! a member is healthy when it answers, knows a raft leader and reports no
//! alarm (a full disk, a corrupt database).

use std::sync::Arc;

use super::client::EtcdClient;

/// Asks the members a coordinator's store talks to.
#[derive(Clone)]
pub struct EtcdHealth {
    pub(super) client: Arc<EtcdClient>,
}

/// One member's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    pub endpoint: String,
    pub version: String,
    pub db_size_bytes: u64,
    pub raft_term: u64,
    /// This member is the raft leader.
    pub raft_leader: bool,
    /// Why it is not healthy; `None` when it is.
    pub error: Option<String>,
}

impl EtcdHealth {
    /// Every member, in the order of `etcd.endpoints`.
    pub async fn members(&self) -> Vec<MemberHealth> {
        self.client
            .statuses()
            .await
            .into_iter()
            .map(|(endpoint, answer)| match answer {
                Ok(status) => {
                    let own_id = status.header.as_ref().map_or(0, |h| h.member_id);
                    let error = if status.leader == 0 {
                        Some("no raft leader: the member cannot reach a majority".to_string())
                    } else if !status.errors.is_empty() {
                        Some(status.errors.join("; "))
                    } else {
                        None
                    };
                    MemberHealth {
                        endpoint,
                        version: status.version,
                        db_size_bytes: status.db_size.max(0) as u64,
                        raft_term: status.raft_term,
                        raft_leader: status.leader != 0 && status.leader == own_id,
                        error,
                    }
                }
                Err(error) => MemberHealth {
                    endpoint,
                    version: String::new(),
                    db_size_bytes: 0,
                    raft_term: 0,
                    raft_leader: false,
                    error: Some(error),
                },
            })
            .collect()
    }
}
