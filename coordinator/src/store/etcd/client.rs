//! The few etcd v3 calls the store makes (range, put, delete, txn), over
//! mTLS to the cluster's members: a call goes to the member that answered
//! last; a member that cannot be reached sends the next call to another,
//! and a read (or a write that may be repeated) is tried on every member
//! before it fails. Every call has a deadline: etcd without a quorum keeps a
//! request waiting, and a coordinator must say so, not hang.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cutover_common::tls::{self, ChannelOptions, CoordinatorUrl};
use cutover_proto::etcd::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    range_request, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, RangeRequest,
    RangeResponse, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use cutover_proto::etcd::mvccpb::KeyValue;
use tonic::transport::Channel;

use super::super::StoreError;
use crate::config::EtcdSettings;

/// Responses may carry a page of large records (a rollout's timeline); the
/// requests stay under etcd's own limit (`--max-request-bytes`).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Whether a call may be sent again after a failure that leaves unknown
/// whether etcd applied it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// A read, or a write whose repetition changes nothing.
    Safe,
    /// A conditional write or an append: sent once; a failure is returned
    /// (the caller reads again and decides).
    Once,
}

struct Member {
    url: String,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
}

pub(super) struct EtcdClient {
    members: Vec<Member>,
    /// The member calls go to first.
    current: AtomicUsize,
    timeout: Duration,
}

impl EtcdClient {
    /// Channels to every endpoint, dialled on first use: a coordinator
    /// starts while a member is down, and reaches it once it is back.
    pub(super) fn new(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let config = tls::client_config(&settings.tls).map_err(|error| {
            StoreError::Backend(format!(
                "cannot load the etcd client certificate ({}, {}, CA {}): {error}; check etcd.tls in coordinator.toml",
                settings.tls.cert.display(),
                settings.tls.key.display(),
                settings.tls.ca_cert.display()
            ))
        })?;
        let options = ChannelOptions {
            connect_timeout: settings.connect_timeout,
            ..ChannelOptions::default()
        };
        let members = settings
            .endpoints
            .iter()
            .map(|endpoint| {
                let url = CoordinatorUrl::parse(endpoint).map_err(|error| {
                    StoreError::Backend(format!("etcd endpoint {endpoint:?}: {error}"))
                })?;
                let channel = tls::connect_lazy(
                    &url,
                    settings.server_name.as_deref(),
                    config.clone(),
                    &options,
                )
                .map_err(|error| {
                    StoreError::Backend(format!("etcd endpoint {endpoint:?}: {error}"))
                })?;
                Ok(Member {
                    url: endpoint.clone(),
                    kv: KvClient::new(channel.clone())
                        .max_decoding_message_size(MAX_RESPONSE_BYTES)
                        .max_encoding_message_size(MAX_RESPONSE_BYTES),
                    lease: LeaseClient::new(channel.clone()),
                    maintenance: MaintenanceClient::new(channel),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if members.is_empty() {
            return Err(StoreError::Backend(
                "no etcd endpoints: list the cluster's client URLs in etcd.endpoints".into(),
            ));
        }
        Ok(Self {
            members,
            current: AtomicUsize::new(0),
            timeout: settings.request_timeout,
        })
    }

    /// Runs `call` on the current member, and on failure on the others
    /// (each once) when `retry` allows; the error names every member tried.
    async fn call<T, F, Fut>(&self, what: &str, retry: Retry, call: F) -> Result<T, StoreError>
    where
        F: Fn(&Member) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for attempt in 0..self.members.len() {
            let index = (first + attempt) % self.members.len();
            let member = &self.members[index];
            let outcome = tokio::time::timeout(self.timeout, call(member)).await;
            let failure = match outcome {
                Ok(Ok(response)) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) if !reachability(&status) => {
                    // etcd answered and refused: another member would too.
                    return Err(StoreError::Backend(format!(
                        "etcd at {} refused the {what}: {}{}",
                        member.url,
                        status.message(),
                        hint(status.message())
                    )));
                }
                Ok(Err(status)) => format!("{}: {}", member.url, describe(&status)),
                Err(_) => format!(
                    "{}: no answer within {} (no quorum, or the member is cut off)",
                    member.url,
                    humantime::format_duration(self.timeout)
                ),
            };
            tracing::warn!(member = %member.url, %failure, what, "etcd call failed");
            failures.push(failure);
            // The next call starts at the next member either way.
            self.current
                .store((index + 1) % self.members.len(), Ordering::Relaxed);
            if retry == Retry::Once {
                break;
            }
        }
        Err(StoreError::Unavailable(format!(
            "the {what} failed on etcd ({}); check that a majority of the etcd members run and reach each other (etcdctl endpoint health --cluster)",
            failures.join("; ")
        )))
    }

    pub(super) async fn range(
        &self,
        request: RangeRequest,
        retry: Retry,
    ) -> Result<RangeResponse, StoreError> {
        self.call("read", retry, |member| {
            let mut kv = member.kv.clone();
            let request = request.clone();
            async move { kv.range(request).await }
        })
        .await
    }

    pub(super) async fn txn(
        &self,
        request: TxnRequest,
        retry: Retry,
    ) -> Result<TxnResponse, StoreError> {
        self.call("transaction", retry, |member| {
            let mut kv = member.kv.clone();
            let request = request.clone();
            async move { kv.txn(request).await }
        })
        .await
    }

    /// A lease of `ttl` seconds; returns its id and the TTL granted.
    pub(super) async fn grant(&self, ttl: i64) -> Result<(i64, i64), StoreError> {
        let response = self
            .call("lease grant", Retry::Safe, |member| {
                let mut lease = member.lease.clone();
                async move { lease.lease_grant(LeaseGrantRequest { ttl, id: 0 }).await }
            })
            .await?;
        if !response.error.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd refused a lease: {}",
                response.error
            )));
        }
        Ok((response.id, response.ttl))
    }

    /// Renews lease `id` once; returns the TTL it has again (0 or less: it
    /// had expired, nothing was renewed).
    pub(super) async fn keep_alive(&self, id: i64) -> Result<i64, StoreError> {
        self.call("lease renewal", Retry::Safe, |member| {
            let mut lease = member.lease.clone();
            async move {
                // One renewal per stream: a stream would stay on one member
                // and need its own failover.
                let request = tokio_stream::once(LeaseKeepAliveRequest { id });
                let mut responses = lease.lease_keep_alive(request).await?.into_inner();
                match responses.message().await? {
                    Some(response) => Ok(tonic::Response::new(response.ttl)),
                    None => Err(tonic::Status::unavailable(
                        "the lease renewal stream ended without an answer",
                    )),
                }
            }
        })
        .await
    }

    /// Ends lease `id` at once, deleting the keys attached to it.
    pub(super) async fn revoke(&self, id: i64) -> Result<(), StoreError> {
        self.call("lease revocation", Retry::Safe, |member| {
            let mut lease = member.lease.clone();
            async move { lease.lease_revoke(LeaseRevokeRequest { id }).await }
        })
        .await
        .map(drop)
    }

    /// Every member's own status, asked of all at once, each bounded by the
    /// request timeout: the member's endpoint and its answer or why none.
    pub(super) async fn statuses(&self) -> Vec<(String, Result<StatusResponse, String>)> {
        let asks = self.members.iter().map(|member| async move {
            let mut maintenance = member.maintenance.clone();
            let answer =
                tokio::time::timeout(self.timeout, maintenance.status(StatusRequest {})).await;
            let answer = match answer {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) => Err(describe(&status)),
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                )),
            };
            (member.url.clone(), answer)
        });
        futures_util::future::join_all(asks).await
    }

    /// Every key in `[key, range_end)` at one revision (the first page's,
    /// unless `revision` names one), `page` at a time, in key order
    /// (`descending`: reverse), handed to `each` until it returns false.
    /// Returns the revision read at.
    pub(super) async fn range_each(
        &self,
        scan: Scan,
        mut each: impl FnMut(KeyValue) -> bool,
    ) -> Result<i64, StoreError> {
        let mut key = scan.key;
        let mut range_end = scan.range_end;
        let mut revision = scan.revision;
        loop {
            let request = RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: scan.page,
                revision,
                sort_order: if scan.descending {
                    range_request::SortOrder::Descend
                } else {
                    range_request::SortOrder::Ascend
                } as i32,
                sort_target: range_request::SortTarget::Key as i32,
                keys_only: scan.keys_only,
                ..RangeRequest::default()
            };
            let response = self.range(request, Retry::Safe).await?;
            if revision == 0 {
                revision = response.header.as_ref().map_or(0, |h| h.revision);
            }
            let last = response.kvs.last().map(|kv| kv.key.clone());
            for kv in response.kvs {
                if !each(kv) {
                    return Ok(revision);
                }
            }
            match last {
                Some(last) if response.more => {
                    if scan.descending {
                        range_end = last;
                    } else {
                        key = last;
                        key.push(0);
                    }
                }
                _ => return Ok(revision),
            }
        }
    }
}

/// A ranged read in pages (see `EtcdClient::range_each`).
pub(super) struct Scan {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0: the current revision.
    pub revision: i64,
    pub page: i64,
    pub descending: bool,
    pub keys_only: bool,
}

impl Scan {
    pub(super) fn new(key: Vec<u8>, range_end: Vec<u8>) -> Self {
        Self {
            key,
            range_end,
            revision: 0,
            page: 256,
            descending: false,
            keys_only: false,
        }
    }
}

/// Whether a failure is about reaching etcd (another member may answer)
/// rather than etcd refusing the request.
fn reachability(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    ) || status.message().contains("leader changed")
        || status.message().contains("no leader")
}

fn describe(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = status.message().to_string();
    let mut source = status.source();
    while let Some(cause) = source {
        // hyper and tonic repeat their cause in their own message.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    if text.is_empty() {
        format!("{:?}", status.code())
    } else {
        text
    }
}

/// What to change for a refusal an operator can fix.
fn hint(message: &str) -> &'static str {
    if message.contains("request is too large") {
        "; a record is larger than etcd's --max-request-bytes (1.5 MiB by default): raise it on every member (docs/operator-guide.md, running on etcd)"
    } else if message.contains("database space exceeded") {
        "; etcd's quota is full: compact and defragment it, or raise --quota-backend-bytes"
    } else if message.contains("permission denied") || message.contains("user name is empty") {
        "; the etcd user of the coordinator's certificate needs read and write on the key prefix"
    } else {
        ""
    }
}

/// The first key after every key that starts with `prefix` (etcd's
/// `range_end` for a prefix): the prefix with its last byte below 0xff
/// raised by one; `\0` (every key) when there is none.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_next_sibling() {
        assert_eq!(
            prefix_end(b"cutover/t/nodes/"),
            b"cutover/t/nodes0".to_vec()
        );
        assert_eq!(prefix_end(&[b'a', 0xff, 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
