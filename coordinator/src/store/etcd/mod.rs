//! The store on an etcd cluster, for coordinators that must outlive their
//! machine: the same tables and logs as the embedded store, as keys under
//! one prefix (`etcd.prefix`), so several installations can share a cluster.
//!
//! Layout: `PREFIX t/TABLE/KEY` for a table's rows, `PREFIX l/LOG/SEQ` (SEQ
//! as 8 big-endian bytes, so key order is sequence order) for log records,
//! `PREFIX seq` for the highest sequence number handed out. A revision is
//! the key's etcd `mod_revision`. Every write is acknowledged by etcd only
//! once a quorum has it on disk, so `Durability::Lazy` is durable too and
//! `flush` has nothing to do.

mod client;

use async_trait::async_trait;
use cutover_proto::etcd::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use cutover_proto::etcd::mvccpb::KeyValue;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::backend::{
    Backend, Durability, Entry, Log, LogFilter, LogRecord, Revision, Snapshot, Swap, Table,
};
use super::{Page, StoreError};
use crate::config::EtcdSettings;
use client::{prefix_end, EtcdClient, Retry, Scan};

mod election;
mod health;
pub use election::{Campaign, Leader, Leadership};
pub use health::{EtcdHealth, MemberHealth};

/// Sequence numbers are reserved from `PREFIX seq` this many at a time, so
/// an append is one write; a restart skips what was left (gaps are allowed).
const SEQ_BLOCK: u64 = 64;

/// etcd refuses a transaction of more operations (`--max-txn-ops`, 128 by
/// default) or bytes (`--max-request-bytes`, 1.5 MiB): a restore writes in
/// batches below both.
const RESTORE_OPS: usize = 100;
const RESTORE_BYTES: usize = 1 << 20;

/// How many log records a prune deletes per request.
const PRUNE_BATCH: i64 = 1000;

pub struct EtcdBackend {
    client: std::sync::Arc<EtcdClient>,
    prefix: Vec<u8>,
    /// A leader's writes hold only while its leader key is the one it
    /// created (see `election.rs`).
    fence: Option<Fence>,
    /// The next sequence number and the end of the reserved block; held
    /// across an append's write so that one coordinator's records land in
    /// sequence order (a reader following a log never skips one).
    seq: Mutex<(u64, u64)>,
}

impl EtcdBackend {
    /// A backend on the cluster `settings` names; connects on first use
    /// (see `EtcdClient::new`).
    pub fn new(settings: &EtcdSettings) -> Result<Self, StoreError> {
        Ok(Self {
            client: std::sync::Arc::new(EtcdClient::new(settings)?),
            prefix: settings.prefix.as_bytes().to_vec(),
            fence: None,
            seq: Mutex::new((0, 0)),
        })
    }

    /// The store as `leadership`'s leader writes it, over the campaign's
    /// own connections: every write is a transaction that also compares the
    /// leader key's creation revision with the leader's token, so a deposed
    /// leader's late write changes nothing; the first one refused ends the
    /// leadership.
    pub fn fenced(settings: &EtcdSettings, leadership: &Leadership) -> Self {
        Self {
            client: leadership.client().clone(),
            prefix: settings.prefix.as_bytes().to_vec(),
            fence: Some(Fence {
                key: leadership.key().to_vec(),
                token: leadership.token,
                lost: leadership.lost.clone(),
            }),
            seq: Mutex::new((0, 0)),
        }
    }

    /// This leader's store as it would be before the leader noticed that it
    /// lost the lead: the fence alone stops its writes.
    #[cfg(test)]
    fn unaware(&self) -> Self {
        Self {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            fence: self.fence.as_ref().map(|fence| Fence {
                key: fence.key.clone(),
                token: fence.token,
                lost: CancellationToken::new(),
            }),
            seq: Mutex::new((0, 0)),
        }
    }

    /// `call`, unless this is a leader's store whose lead is lost: then
    /// refused at once, also a call already waiting on etcd. A coordinator
    /// that no longer leads stops acting without waiting for a cluster it
    /// may not reach (its writes would be fenced anyway).
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(fence) = &self.fence else {
            return call.await;
        };
        let lost = || StoreError::NotLeading { token: fence.token };
        if fence.lost.is_cancelled() {
            return Err(lost());
        }
        tokio::select! {
            biased;
            _ = fence.lost.cancelled() => Err(lost()),
            result = call => result,
        }
    }

    async fn range(
        &self,
        request: RangeRequest,
        retry: Retry,
    ) -> Result<RangeResponse, StoreError> {
        self.guarded(self.client.range(request, retry)).await
    }

    async fn txn(&self, request: TxnRequest, retry: Retry) -> Result<TxnResponse, StoreError> {
        self.guarded(self.client.txn(request, retry)).await
    }

    async fn range_each(
        &self,
        scan: Scan,
        each: impl FnMut(KeyValue) -> bool,
    ) -> Result<i64, StoreError> {
        self.guarded(self.client.range_each(scan, each)).await
    }

    /// Writes `op` if every `compare` holds (and the fence, for a leader).
    async fn write(
        &self,
        mut compare: Vec<Compare>,
        op: RequestOp,
        retry: Retry,
    ) -> Result<Written, StoreError> {
        let mut failure = Vec::new();
        if let Some(fence) = &self.fence {
            compare.push(fence.holds());
            failure.push(range_op(fence.key.clone()));
        }
        let response = self
            .txn(
                TxnRequest {
                    compare,
                    success: vec![op],
                    failure,
                },
                retry,
            )
            .await?;
        if response.succeeded {
            return Ok(Written::Done(response));
        }
        if let Some(fence) = &self.fence {
            let now = match response.responses.first().and_then(|r| r.response.as_ref()) {
                Some(response_op::Response::ResponseRange(range)) => {
                    range.kvs.first().map_or(0, |kv| kv.create_revision)
                }
                _ => 0,
            };
            if now != fence.token {
                fence.lost.cancel();
                return Err(StoreError::Fenced {
                    token: fence.token,
                    now,
                });
            }
        }
        Ok(Written::Conflict)
    }

    async fn put_key(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        match self
            .write(Vec::new(), put_op(key, value), Retry::Safe)
            .await?
        {
            Written::Done(_) => Ok(()),
            Written::Conflict => Err(unconditional_refused()),
        }
    }

    /// Deletes `key` (up to `range_end`, when not empty); how many went.
    async fn delete_keys(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<usize, StoreError> {
        let op = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key,
                    range_end,
                    ..DeleteRangeRequest::default()
                },
            )),
        };
        match self.write(Vec::new(), op, Retry::Safe).await? {
            Written::Done(response) => Ok(deleted(&response)),
            Written::Conflict => Err(unconditional_refused()),
        }
    }

    fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        for part in parts {
            key.extend_from_slice(part);
        }
        key
    }

    fn table_prefix(&self, table: Table) -> Vec<u8> {
        self.key(&[b"t/", table.name().as_bytes(), b"/"])
    }

    fn row_key(&self, table: Table, key: &[u8]) -> Vec<u8> {
        let mut full = self.table_prefix(table);
        full.extend_from_slice(key);
        full
    }

    fn log_prefix(&self, log: Log) -> Vec<u8> {
        self.key(&[b"l/", log.name().as_bytes(), b"/"])
    }

    fn log_key(&self, log: Log, seq: u64) -> Vec<u8> {
        let mut key = self.log_prefix(log);
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    fn seq_key(&self) -> Vec<u8> {
        self.key(&[b"seq"])
    }

    /// The highest sequence number reserved (at `revision`; 0: now), and
    /// the revision of its key (0: absent).
    async fn reserved(&self, revision: i64) -> Result<(u64, i64), StoreError> {
        let response = self
            .range(
                RangeRequest {
                    key: self.seq_key(),
                    revision,
                    ..RangeRequest::default()
                },
                Retry::Safe,
            )
            .await?;
        match response.kvs.first() {
            None => Ok((0, 0)),
            Some(kv) => Ok((decode_seq(&kv.key, &kv.value)?, kv.mod_revision)),
        }
    }

    /// Moves `PREFIX seq` to at least `at_least + SEQ_BLOCK` (never down),
    /// returning the block `(first, end)` now ours.
    async fn reserve(&self, at_least: u64) -> Result<(u64, u64), StoreError> {
        loop {
            let (reserved, revision) = self.reserved(0).await?;
            let first = reserved.max(at_least) + 1;
            let end = first + SEQ_BLOCK;
            let put = put_op(self.seq_key(), (end - 1).to_string().into_bytes());
            let compare = vec![at_mod_revision(self.seq_key(), revision)];
            if let Written::Done(_) = self.write(compare, put, Retry::Once).await? {
                return Ok((first, end));
            }
            // Another coordinator reserved meanwhile: read again.
        }
    }

    /// Whether any key of the store exists under `prefix`.
    async fn holds(&self, prefix: Vec<u8>) -> Result<bool, StoreError> {
        let end = prefix_end(&prefix);
        let response = self
            .range(
                RangeRequest {
                    key: prefix,
                    range_end: end,
                    count_only: true,
                    ..RangeRequest::default()
                },
                Retry::Safe,
            )
            .await?;
        Ok(response.count > 0)
    }

    /// Every row of `prefix` at `revision`, keys without `prefix`.
    async fn rows_at(
        &self,
        prefix: &[u8],
        revision: i64,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut rows = Vec::new();
        let mut scan = Scan::new(prefix.to_vec(), prefix_end(prefix));
        scan.revision = revision;
        self.range_each(scan, |kv| {
            rows.push((kv.key[prefix.len()..].to_vec(), kv.value));
            true
        })
        .await?;
        Ok(rows)
    }

    /// Writes `ops` in transactions below etcd's limits.
    async fn write_batches(&self, ops: Vec<RequestOp>) -> Result<(), StoreError> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for op in ops {
            let size = op_bytes(&op);
            if !batch.is_empty() && (batch.len() >= RESTORE_OPS || bytes + size > RESTORE_BYTES) {
                self.commit(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
            bytes += size;
            batch.push(op);
        }
        if !batch.is_empty() {
            self.commit(batch).await?;
        }
        Ok(())
    }

    async fn commit(&self, success: Vec<RequestOp>) -> Result<(), StoreError> {
        let mut compare = Vec::new();
        if let Some(fence) = &self.fence {
            compare.push(fence.holds());
        }
        let response = self
            .txn(
                TxnRequest {
                    compare,
                    success,
                    failure: Vec::new(),
                },
                Retry::Safe,
            )
            .await?;
        match (&self.fence, response.succeeded) {
            (Some(fence), false) => {
                fence.lost.cancel();
                Err(StoreError::Fenced {
                    token: fence.token,
                    now: 0,
                })
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    async fn get(&self, table: Table, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let response = self
            .range(
                RangeRequest {
                    key: self.row_key(table, key),
                    ..RangeRequest::default()
                },
                Retry::Safe,
            )
            .await?;
        Ok(response.kvs.into_iter().next().map(|kv| Entry {
            key: key.to_vec(),
            value: kv.value,
            revision: Revision(kv.mod_revision as u64),
        }))
    }

    async fn scan(&self, table: Table, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let table_prefix = self.table_prefix(table);
        let mut start = table_prefix.clone();
        start.extend_from_slice(prefix);
        let end = prefix_end(&start);
        let mut entries = Vec::new();
        self.range_each(Scan::new(start, end), |kv| {
            entries.push(Entry {
                key: kv.key[table_prefix.len()..].to_vec(),
                value: kv.value,
                revision: Revision(kv.mod_revision as u64),
            });
            true
        })
        .await?;
        Ok(entries)
    }

    async fn put(
        &self,
        table: Table,
        key: &[u8],
        value: Vec<u8>,
        _durability: Durability,
    ) -> Result<(), StoreError> {
        self.put_key(self.row_key(table, key), value).await
    }

    async fn delete(
        &self,
        table: Table,
        key: &[u8],
        _durability: Durability,
    ) -> Result<bool, StoreError> {
        Ok(self
            .delete_keys(self.row_key(table, key), Vec::new())
            .await?
            > 0)
    }

    async fn compare_and_put(
        &self,
        table: Table,
        key: &[u8],
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
    ) -> Result<Swap, StoreError> {
        let full = self.row_key(table, key);
        // Absent: a key never created (or deleted since) has mod revision 0.
        let revision = expected.map_or(0, |r| r.0 as i64);
        let op = match value {
            Some(value) => put_op(full.clone(), value),
            None => RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: full.clone(),
                        ..DeleteRangeRequest::default()
                    },
                )),
            },
        };
        let compare = vec![at_mod_revision(full, revision)];
        Ok(match self.write(compare, op, Retry::Once).await? {
            Written::Done(_) => Swap::Done,
            Written::Conflict => Swap::Conflict,
        })
    }

    async fn append(
        &self,
        log: Log,
        record: LogRecord,
        _durability: Durability,
    ) -> Result<u64, StoreError> {
        let mut seq = self.seq.lock().await;
        if seq.0 >= seq.1 {
            *seq = self.reserve(seq.1).await?;
        }
        let number = seq.0;
        self.put_key(self.log_key(log, number), record(number))
            .await?;
        seq.0 += 1;
        Ok(number)
    }

    async fn log_page(
        &self,
        log: Log,
        page: Page,
        keep: LogFilter<'_>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        if page.limit == 0 || page.after_seq == u64::MAX {
            return Ok(Vec::new());
        }
        let start = self.log_key(log, page.after_seq + 1);
        let end = prefix_end(&self.log_prefix(log));
        let mut scan = Scan::new(start, end);
        scan.descending = page.newest;
        let mut records = Vec::new();
        self.range_each(scan, |kv| {
            if keep(&kv.value) {
                records.push(kv.value);
            }
            records.len() < page.limit
        })
        .await?;
        if page.newest {
            records.reverse();
        }
        Ok(records)
    }

    async fn prune_log(&self, log: Log, keep: usize) -> Result<usize, StoreError> {
        let prefix = self.log_prefix(log);
        let end = prefix_end(&prefix);
        let count = self
            .range(
                RangeRequest {
                    key: prefix.clone(),
                    range_end: end.clone(),
                    count_only: true,
                    ..RangeRequest::default()
                },
                Retry::Safe,
            )
            .await?
            .count as usize;
        let mut excess = count.saturating_sub(keep);
        let mut pruned = 0;
        while excess > 0 {
            let batch = (excess as i64).min(PRUNE_BATCH);
            let mut scan = Scan::new(prefix.clone(), end.clone());
            scan.page = batch;
            scan.keys_only = true;
            let mut last = None;
            let mut seen = 0;
            self.range_each(scan, |kv| {
                last = Some(kv.key);
                seen += 1;
                seen < batch
            })
            .await?;
            let Some(mut last) = last else { break };
            last.push(0);
            // Only the oldest: the range ends right after the last of them.
            let deleted = self.delete_keys(prefix.clone(), last).await?;
            if deleted == 0 {
                break;
            }
            pruned += deleted;
            excess = excess.saturating_sub(deleted);
        }
        Ok(pruned)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One revision for every read: etcd's own consistent cut. Taken
        // between appends, and the rest of the reserved block given up, so
        // every number handed out after the cut is above its `last_seq`.
        let revision = {
            let mut seq = self.seq.lock().await;
            let revision = self
                .range(
                    RangeRequest {
                        key: self.seq_key(),
                        count_only: true,
                        ..RangeRequest::default()
                    },
                    Retry::Safe,
                )
                .await?
                .header
                .map_or(0, |h| h.revision);
            seq.0 = seq.1;
            revision
        };
        let mut tables = Vec::new();
        for table in Table::ALL {
            tables.push((
                table,
                self.rows_at(&self.table_prefix(table), revision).await?,
            ));
        }
        let mut logs = Vec::new();
        for log in Log::ALL {
            let records = self
                .rows_at(&self.log_prefix(log), revision)
                .await?
                .into_iter()
                .map(|(key, value)| Ok((decode_log_key(&key)?, value)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            logs.push((log, records));
        }
        let (reserved, _) = self.reserved(revision).await?;
        Ok(Snapshot {
            tables,
            logs,
            last_seq: reserved,
        })
    }

    fn leader_token(&self) -> i64 {
        self.fence.as_ref().map_or(0, |fence| fence.token)
    }

    fn cluster_health(&self) -> Option<EtcdHealth> {
        Some(EtcdHealth {
            client: self.client.clone(),
        })
    }

    async fn restore(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        for table in Table::ALL {
            if self.holds(self.table_prefix(table)).await? {
                return Err(StoreError::NotEmpty {
                    what: format!("table {}", table.name()),
                });
            }
        }
        for log in Log::ALL {
            if self.holds(self.log_prefix(log)).await? {
                return Err(StoreError::NotEmpty {
                    what: format!("log {}", log.name()),
                });
            }
        }
        let mut ops = Vec::new();
        for (table, rows) in snapshot.tables {
            for (key, value) in rows {
                ops.push(put_op(self.row_key(table, &key), value));
            }
        }
        let mut last_seq = snapshot.last_seq;
        for (log, records) in snapshot.logs {
            for (seq, value) in records {
                last_seq = last_seq.max(seq);
                ops.push(put_op(self.log_key(log, seq), value));
            }
        }
        self.write_batches(ops).await?;
        // Appends after the restore number above everything it held.
        let mut seq = self.seq.lock().await;
        *seq = self.reserve(last_seq).await?;
        Ok(())
    }
}

/// A leader's fence: its leader key and the creation revision it had when
/// the leader won (its token).
struct Fence {
    key: Vec<u8>,
    token: i64,
    /// Cancelled by the first write the fence refuses.
    lost: CancellationToken,
}

impl Fence {
    fn holds(&self) -> Compare {
        Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: self.key.clone(),
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::CreateRevision(self.token)),
        }
    }
}

enum Written {
    Done(TxnResponse),
    /// A condition of the caller's did not hold; nothing changed.
    Conflict,
}

/// A write whose only condition is the fence was refused although the
/// fence held: etcd broke its contract.
fn unconditional_refused() -> StoreError {
    StoreError::Backend("etcd refused a write that had no condition but the leader's fence, which held; check the etcd cluster's health".into())
}

fn range_op(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key,
            ..RangeRequest::default()
        })),
    }
}

fn deleted(response: &TxnResponse) -> usize {
    match response.responses.first().and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseDeleteRange(delete)) => delete.deleted.max(0) as usize,
        _ => 0,
    }
}

/// The condition "`key` is still at `revision`" (0: absent).
fn at_mod_revision(key: Vec<u8>, revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::ModRevision(revision)),
    }
}

fn put_op(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            ..PutRequest::default()
        })),
    }
}

fn op_bytes(op: &RequestOp) -> usize {
    match &op.request {
        Some(request_op::Request::RequestPut(put)) => put.key.len() + put.value.len() + 16,
        _ => 64,
    }
}

fn decode_seq(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "the sequence counter is not a number".into(),
        })
}

fn decode_log_key(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("a log key of {} bytes, expected 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::conformance::{self, Opener};

    /// The test cluster `scripts/etcd-env.sh` starts (three members, mTLS),
    /// with every key under `prefix`.
    pub(crate) fn test_settings(prefix: String) -> EtcdSettings {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the tests with ./scripts/test.sh, which starts a throw-away etcd cluster (scripts/etcd-env.sh)")
            })
        };
        EtcdSettings {
            endpoints: var("CUTOVER_TEST_ETCD_ENDPOINTS")
                .split(',')
                .map(str::to_string)
                .collect(),
            prefix,
            tls: cutover_common::tls::TlsFiles {
                ca_cert: var("CUTOVER_TEST_ETCD_CA").into(),
                cert: var("CUTOVER_TEST_ETCD_CERT").into(),
                key: var("CUTOVER_TEST_ETCD_KEY").into(),
            },
            server_name: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            advertise: None,
        }
    }

    /// One key prefix per dir: reopening the dir is a coordinator
    /// restarting on the same cluster; every test has its own.
    struct Etcd;

    impl Opener for Etcd {
        fn open(&self, dir: &Path) -> Arc<dyn Backend> {
            let settings = test_settings(format!("test{}/", dir.display()));
            Arc::new(EtcdBackend::new(&settings).expect("etcd settings are valid"))
        }
    }

    conformance::suite!(Etcd, "store::etcd::tests");
}
