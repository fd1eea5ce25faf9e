//! One leader among the coordinators sharing an etcd prefix. The leader key
//! `PREFIX leader` is created on a lease (`LEASE_TTL`) that the leader renews
//! every third of it; its creation revision is the leader's token, which
//! only grows from one leadership to the next. Every write of the leader
//! compares it (`Fence` in `mod.rs`), so a deposed leader's late write
//! changes nothing.
//!
//! A leader stops acting (`Leadership::lost`) before its lease can have run
//! out at etcd: the renewal it counts from is the moment it *sent* the last
//! one etcd confirmed, and it gives up `SAFETY` before that plus the TTL. A
//! follower polls the key and campaigns once it is gone, so the next leader
//! acts within the TTL plus a poll after the last renewal.

use std::sync::Arc;
use std::time::Duration;

use cutover_proto::etcd::etcdserverpb::{
    compare, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{EtcdClient, Retry};
use super::StoreError;
use crate::config::EtcdSettings;

/// How long a leader that stops renewing keeps its key.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// What a leader keeps between its last confirmed renewal plus the TTL and
/// the moment it stops acting: the time a stop takes to reach every task.
const SAFETY: Duration = Duration::from_secs(2);
/// How long a resigning leader waits for etcd to revoke its lease.
const REVOKE_WITHIN: Duration = Duration::from_secs(2);
/// How often a follower looks whether the leader key is gone.
const POLL: Duration = Duration::from_millis(500);

/// A coordinator that wants to lead.
pub struct Campaign {
    client: Arc<EtcdClient>,
    key: Vec<u8>,
    /// Where operators and agents reach it, stored as the key's value.
    identity: String,
    /// The leader this campaign last saw, and since when (unix ms), for a
    /// follower's page and status.
    observed: tokio::sync::watch::Sender<Option<(Leader, i64)>>,
}

/// This coordinator leads until `lost` is cancelled.
pub struct Leadership {
    /// The leader key's creation revision: the fencing token.
    pub token: i64,
    /// Cancelled when the lead is lost (lease not renewed in time, the key
    /// gone or replaced, a write refused by the fence).
    pub lost: CancellationToken,
    key: Vec<u8>,
    lease: i64,
    client: Arc<EtcdClient>,
    renewer: JoinHandle<()>,
}

/// Who leads, as the leader key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub identity: String,
    pub token: i64,
}

impl Campaign {
    pub fn new(settings: &EtcdSettings, identity: &str) -> Result<Self, StoreError> {
        let mut key = settings.prefix.as_bytes().to_vec();
        key.extend_from_slice(b"leader");
        Ok(Self {
            client: Arc::new(EtcdClient::new(settings)?),
            key,
            identity: identity.to_string(),
            observed: tokio::sync::watch::Sender::new(None),
        })
    }

    /// The cluster's members, for a follower's status.
    pub fn health(&self) -> super::EtcdHealth {
        super::EtcdHealth {
            client: self.client.clone(),
        }
    }

    /// The leader as `win` last saw it while following.
    pub fn observed(&self) -> tokio::sync::watch::Receiver<Option<(Leader, i64)>> {
        self.observed.subscribe()
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let response = self
            .client
            .range(
                RangeRequest {
                    key: self.key.clone(),
                    ..RangeRequest::default()
                },
                Retry::Safe,
            )
            .await?;
        Ok(response.kvs.first().map(|kv| Leader {
            identity: String::from_utf8_lossy(&kv.value).into_owned(),
            token: kv.create_revision,
        }))
    }

    /// Waits until this coordinator leads; `None` if `shutdown` came first.
    /// A store that cannot be reached is waited out (a follower has nothing
    /// else to do). A leader not seen for a whole lease TTL is forgotten:
    /// whoever led then has stopped acting by now (it cannot renew either),
    /// so a follower says nobody leads rather than send callers to it.
    pub async fn win(self, shutdown: &CancellationToken) -> Option<Leadership> {
        let mut followed: Option<Leader> = None;
        let mut seen = Instant::now();
        loop {
            match self.try_once().await {
                Ok(Ok(leadership)) => return Some(leadership),
                Ok(Err(leader)) => {
                    seen = Instant::now();
                    if followed.as_ref() != Some(&leader) {
                        tracing::info!(leader = %leader.identity, token = leader.token, "following");
                        self.observed
                            .send_replace(Some((leader.clone(), cutover_common::now_ms())));
                        followed = Some(leader);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot campaign for the lead yet");
                    if followed.is_some() && seen.elapsed() >= LEASE_TTL {
                        tracing::warn!(
                            "no leader confirmed for a lease TTL: following nobody until etcd answers"
                        );
                        self.observed.send_replace(None);
                        followed = None;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Takes the lead if nobody has it: the leader that holds it otherwise.
    async fn try_once(&self) -> Result<Result<Leadership, Leader>, StoreError> {
        if let Some(leader) = self.leader().await? {
            return Ok(Err(leader));
        }
        // Counted from before the grant: etcd's expiry is later.
        let granted_at = Instant::now();
        let (lease, ttl) = self.client.grant(LEASE_TTL.as_secs() as i64).await?;
        let create = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: self.key.clone(),
                value: self.identity.clone().into_bytes(),
                lease,
                ..PutRequest::default()
            })),
        };
        let read = RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: self.key.clone(),
                ..RangeRequest::default()
            })),
        };
        let absent = Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: self.key.clone(),
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
        };
        let outcome = self
            .client
            .txn(
                TxnRequest {
                    compare: vec![absent],
                    success: vec![create],
                    failure: vec![read],
                },
                Retry::Once,
            )
            .await;
        let response = match outcome {
            Ok(response) => response,
            Err(error) => {
                let _ = self.client.revoke(lease).await;
                return Err(error);
            }
        };
        if !response.succeeded {
            // Another coordinator was quicker.
            let _ = self.client.revoke(lease).await;
            let leader = match response.responses.first().and_then(|r| r.response.as_ref()) {
                Some(response_op::Response::ResponseRange(range)) => {
                    range.kvs.first().map(|kv| Leader {
                        identity: String::from_utf8_lossy(&kv.value).into_owned(),
                        token: kv.create_revision,
                    })
                }
                _ => None,
            };
            return Ok(Err(leader.unwrap_or(Leader {
                identity: "(gone again)".into(),
                token: 0,
            })));
        }
        let token = response.header.map_or(0, |h| h.revision);
        let lost = CancellationToken::new();
        let renewer = tokio::spawn(renew(
            self.client.clone(),
            self.key.clone(),
            lease,
            token,
            granted_at + Duration::from_secs(ttl.max(0) as u64),
            lost.clone(),
        ));
        tracing::info!(token, identity = %self.identity, "leading");
        Ok(Ok(Leadership {
            token,
            lost,
            key: self.key.clone(),
            lease,
            client: self.client.clone(),
            renewer,
        }))
    }
}

impl Leadership {
    pub(super) fn key(&self) -> &[u8] {
        &self.key
    }

    pub(super) fn client(&self) -> &Arc<EtcdClient> {
        &self.client
    }

    /// The cluster's members, for the leader's status.
    pub fn health(&self) -> super::EtcdHealth {
        super::EtcdHealth {
            client: self.client.clone(),
        }
    }

    /// Gives the lead up at once (a shutdown): the lease is revoked, which
    /// deletes the leader key, so a follower takes over without waiting for
    /// the TTL. Bounded: a coordinator cut off from etcd follows (and
    /// answers) again without waiting for it; the lease then runs out.
    pub async fn resign(self) {
        self.lost.cancel();
        let _ = self.renewer.await;
        match tokio::time::timeout(REVOKE_WITHIN, self.client.revoke(self.lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not revoke the leader lease; another coordinator leads once it expires")
            }
            Err(_) => tracing::warn!(
                within = %humantime::format_duration(REVOKE_WITHIN),
                "etcd did not answer the lease revocation; another coordinator leads once it expires"
            ),
        }
    }
}

/// Renews the lease every third of its TTL for as long as the lead is
/// held; cancels `lost` once the lead cannot be proven.
async fn renew(
    client: Arc<EtcdClient>,
    key: Vec<u8>,
    lease: i64,
    token: i64,
    mut valid_until: Instant,
    lost: CancellationToken,
) {
    let every = LEASE_TTL / 3;
    let mut wait = every;
    loop {
        let give_up = valid_until.checked_sub(SAFETY).unwrap_or_else(Instant::now);
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(give_up) => {
                tracing::error!(lease, "the leader lease could not be renewed in time: no longer leading");
                lost.cancel();
                return;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        let sent = Instant::now();
        let renewed = tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(give_up) => continue,
            renewed = client.keep_alive(lease) => renewed,
        };
        match renewed {
            Ok(ttl) if ttl > 0 => {
                valid_until = sent + Duration::from_secs(ttl as u64);
                wait = every;
            }
            Ok(_) => {
                tracing::error!(lease, "the leader lease had expired: no longer leading");
                lost.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "leader lease renewal failed; retrying");
                wait = POLL;
                continue;
            }
        }
        // The key itself: an operator may have deleted it, or a new
        // leader replaced it after an expiry this process did not see.
        let read = client
            .range(
                RangeRequest {
                    key: key.clone(),
                    ..RangeRequest::default()
                },
                Retry::Safe,
            )
            .await;
        if let Ok(response) = read {
            let now = response.kvs.first().map_or(0, |kv| kv.create_revision);
            if now != token {
                tracing::error!(
                    token,
                    now,
                    "the leader key is no longer this coordinator's: no longer leading"
                );
                lost.cancel();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::backend::{Backend, Durability, Swap, Table};
    use crate::store::etcd::tests::test_settings;
    use crate::store::{EtcdBackend, StoreError};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_at_a_time_and_a_deposed_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let settings = test_settings(format!("test{}/", dir.path().display()));
        let shutdown = CancellationToken::new();
        let first = Campaign::new(&settings, "https://one:7443")
            .unwrap()
            .win(&shutdown)
            .await
            .unwrap();
        let observer = Campaign::new(&settings, "https://observer:7443").unwrap();
        assert_eq!(
            observer.leader().await.unwrap(),
            Some(Leader {
                identity: "https://one:7443".into(),
                token: first.token
            })
        );
        let second = tokio::spawn({
            let settings = settings.clone();
            let shutdown = shutdown.clone();
            async move {
                Campaign::new(&settings, "https://two:7443")
                    .unwrap()
                    .win(&shutdown)
                    .await
                    .unwrap()
            }
        });
        let leading = EtcdBackend::fenced(&settings, &first);
        leading
            .put(Table::Meta, b"k", b"one".to_vec(), Durability::Durable)
            .await
            .unwrap();
        // Past a renewal: the follower still follows.
        tokio::time::sleep(LEASE_TTL / 2).await;
        assert!(!second.is_finished(), "two leaders at once");
        assert!(!first.lost.is_cancelled());

        // The first one goes (its key is deleted under it, as an expiry
        // would): it notices within a renewal, the second one leads with a
        // greater token, and the first one's writes change nothing.
        let deleted = observer
            .client
            .txn(
                TxnRequest {
                    compare: Vec::new(),
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(
                            cutover_proto::etcd::etcdserverpb::DeleteRangeRequest {
                                key: observer.key.clone(),
                                ..Default::default()
                            },
                        )),
                    }],
                    failure: Vec::new(),
                },
                Retry::Safe,
            )
            .await
            .unwrap();
        assert!(deleted.succeeded);
        let second = tokio::time::timeout(LEASE_TTL, second)
            .await
            .expect("the follower takes over")
            .unwrap();
        assert!(second.token > first.token);
        tokio::time::timeout(LEASE_TTL, first.lost.cancelled())
            .await
            .expect("the deposed leader notices");

        // Noticed, it stops at once: nothing reaches etcd.
        let refused = leading
            .put(Table::Meta, b"k", b"late".to_vec(), Durability::Durable)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::NotLeading { token } if token == first.token),
            "{refused}"
        );
        assert!(matches!(
            leading.get(Table::Meta, b"k").await,
            Err(StoreError::NotLeading { .. })
        ));
        // The same leader's store as it would be had it not noticed yet (its
        // lost signal detached): etcd's fence refuses its writes, and the
        // first refusal is its notice.
        let unaware = leading.unaware();
        let refused = unaware
            .put(Table::Meta, b"k", b"late".to_vec(), Durability::Durable)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::Fenced { token, now } if token == first.token && now == second.token),
            "{refused}"
        );
        assert!(matches!(
            unaware.get(Table::Meta, b"k").await,
            Err(StoreError::NotLeading { .. })
        ));
        let stale = EtcdBackend::new(&settings)
            .unwrap()
            .get(Table::Meta, b"k")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stale.value, b"one");
        let refused = leading
            .unaware()
            .compare_and_put(
                Table::Meta,
                b"k",
                Some(stale.revision),
                Some(b"late".to_vec()),
            )
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Fenced { .. }), "{refused}");

        let now_leading = Arc::new(EtcdBackend::fenced(&settings, &second));
        assert_eq!(
            now_leading
                .compare_and_put(
                    Table::Meta,
                    b"k",
                    Some(stale.revision),
                    Some(b"two".to_vec())
                )
                .await
                .unwrap(),
            Swap::Done
        );
        // A resignation hands the lead over at once (no TTL to wait).
        let third = tokio::spawn({
            let settings = settings.clone();
            let shutdown = shutdown.clone();
            async move {
                Campaign::new(&settings, "https://three:7443")
                    .unwrap()
                    .win(&shutdown)
                    .await
                    .unwrap()
            }
        });
        let resigned = Instant::now();
        second.resign().await;
        let third = tokio::time::timeout(LEASE_TTL, third)
            .await
            .unwrap()
            .unwrap();
        assert!(
            resigned.elapsed() < LEASE_TTL / 2,
            "took over {:?} after a resignation",
            resigned.elapsed()
        );
        third.resign().await;
        drop(first);
    }
}
