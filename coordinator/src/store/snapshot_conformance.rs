//! The snapshot part of the backend contract (instantiated by
//! `conformance::suite!`): a snapshot holds every table and log and loads
//! into an empty backend only, sequence numbers and counters go on above
//! the restored ones, and a snapshot taken while writes go on is one
//! instant of the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::backend::{Backend, Durability, Log, Snapshot, Table};
use super::conformance::Opener;
use super::{Store, StoreError};

/// A record in every table, three in every log (the oldest pruned), a
/// counter at 3.
async fn fill(backend: &Arc<dyn Backend>) {
    for table in Table::ALL {
        let key = format!("{}\0key", table.name());
        backend
            .put(table, key.as_bytes(), b"value".to_vec(), Durability::Lazy)
            .await
            .unwrap();
    }
    for log in Log::ALL {
        for n in 0..3 {
            let record = Box::new(move |seq: u64| format!("{n}@{seq}").into_bytes());
            backend.append(log, record, Durability::Lazy).await.unwrap();
        }
        assert_eq!(backend.prune_log(log, 2).await.unwrap(), 1);
    }
    let store = Store::new(backend.clone());
    for _ in 0..3 {
        store.rollouts.next_number().await.unwrap();
    }
    backend.flush().await.unwrap();
}

fn greatest_seq(snapshot: &Snapshot) -> u64 {
    let seqs = snapshot
        .logs
        .iter()
        .flat_map(|(_, r)| r.iter().map(|(s, _)| *s));
    seqs.max().unwrap_or(0)
}

pub(crate) async fn snapshots_restore_every_table_and_log_into_an_empty_store(
    opener: &impl Opener,
) {
    let (from_dir, to_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = opener.open(from_dir.path());
    fill(&source).await;
    let snapshot = source.snapshot().await.unwrap();

    let tables: Vec<Table> = snapshot.tables.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tables,
        Table::ALL,
        "every table, in the order of Table::ALL"
    );
    for (table, rows) in &snapshot.tables {
        let mut expected = vec![(
            format!("{}\0key", table.name()).into_bytes(),
            b"value".to_vec(),
        )];
        if *table == Table::Counters {
            expected.push((b"rollouts".to_vec(), 3u64.to_be_bytes().to_vec()));
        }
        assert_eq!(rows, &expected, "table {}", table.name());
    }
    let logs: Vec<Log> = snapshot.logs.iter().map(|(l, _)| *l).collect();
    assert_eq!(logs, Log::ALL);
    for (log, records) in &snapshot.logs {
        assert_eq!(records.len(), 2, "log {} as pruned", log.name());
        assert!(records[0].0 < records[1].0, "oldest first");
        assert_eq!(records[1].1, format!("2@{}", records[1].0).into_bytes());
    }
    assert!(snapshot.last_seq >= greatest_seq(&snapshot));
    // What the pruned records had is counted too: their numbers are never
    // handed out again.
    let pruned_seq = {
        let record = Box::new(|seq: u64| seq.to_string().into_bytes());
        source
            .append(Log::Events, record, Durability::Lazy)
            .await
            .unwrap()
    };
    assert!(snapshot.last_seq < pruned_seq);

    {
        let target = opener.open(to_dir.path());
        target.restore(snapshot.clone()).await.unwrap();
        let restored = target.snapshot().await.unwrap();
        assert_eq!(restored.tables, snapshot.tables);
        assert_eq!(restored.logs, snapshot.logs);
        assert!(restored.last_seq >= snapshot.last_seq);
        let refused = target.restore(snapshot.clone()).await.unwrap_err();
        assert!(
            matches!(&refused, StoreError::NotEmpty { what } if what.starts_with("table ")),
            "{refused}"
        );
    }
    // After a reopen (the restored coordinator starting) numbers go on
    // above every one handed out before the snapshot.
    let target = opener.open(to_dir.path());
    let record = Box::new(|seq: u64| seq.to_string().into_bytes());
    let seq = target
        .append(Log::Audit, record, Durability::Durable)
        .await
        .unwrap();
    assert!(seq > snapshot.last_seq, "{seq} after {}", snapshot.last_seq);
    let store = Store::new(target);
    assert_eq!(store.rollouts.next_number().await.unwrap(), 4);
}

pub(crate) async fn a_restore_refuses_a_store_holding_only_log_records(opener: &impl Opener) {
    let dir = tempfile::tempdir().unwrap();
    let backend = opener.open(dir.path());
    let record = Box::new(|_: u64| b"x".to_vec());
    backend
        .append(Log::Audit, record, Durability::Lazy)
        .await
        .unwrap();
    let refused = backend.restore(Snapshot::default()).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::NotEmpty { what } if what == "log audit"),
        "{refused}"
    );
}

/// The writer's three writes per round, in this order: the table a
/// snapshot reads first, the one it reads last, then a log record.
async fn write_round(backend: &dyn Backend, n: u64) {
    let value = n.to_string().into_bytes();
    backend
        .put(Table::Nodes, b"pair", value.clone(), Durability::Lazy)
        .await
        .unwrap();
    backend
        .put(Table::Meta, b"pair", value.clone(), Durability::Lazy)
        .await
        .unwrap();
    let record = Box::new(move |_: u64| value);
    backend
        .append(Log::Audit, record, Durability::Lazy)
        .await
        .unwrap();
}

fn number(bytes: &[u8]) -> u64 {
    String::from_utf8_lossy(bytes).parse().unwrap()
}

/// (first table's n, last table's n, the newest log record's n) of a cut.
fn rounds_seen(snapshot: &Snapshot) -> (u64, u64, u64) {
    let pair = |table: Table| {
        let rows = &snapshot.tables.iter().find(|(t, _)| *t == table).unwrap().1;
        rows.iter()
            .find(|(k, _)| k == b"pair")
            .map_or(0, |(_, v)| number(v))
    };
    let audit = &snapshot
        .logs
        .iter()
        .find(|(l, _)| *l == Log::Audit)
        .unwrap()
        .1;
    let logged = audit.last().map_or(0, |(_, v)| number(v));
    (pair(Table::Nodes), pair(Table::Meta), logged)
}

pub(crate) async fn a_snapshot_is_one_instant_while_writes_go_on(opener: &impl Opener) {
    let dir = tempfile::tempdir().unwrap();
    let backend = opener.open(dir.path());
    // Records in a table read between the two: a read that is not one
    // instant takes long enough there for the writer to get ahead.
    for n in 0..2000u32 {
        let key = n.to_be_bytes();
        backend
            .put(Table::Releases, &key, vec![0; 256], Durability::Lazy)
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (backend, stop) = (backend.clone(), stop.clone());
        async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                write_round(backend.as_ref(), n).await;
            }
            n
        }
    });
    // Distinct cuts: the writer went on while snapshots were taken.
    let mut cuts = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while cuts.len() < 30 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress between snapshots: {cuts:?}"
        );
        let cut = rounds_seen(&backend.snapshot().await.unwrap());
        // At any instant round n is whole, or n+1 is part way: its first
        // table ahead, then its last, then the log. A read that is not one
        // instant sees a later round in a table it read later.
        let (first, last, logged) = cut;
        assert!(
            first >= last && last >= logged && logged + 1 >= first,
            "not one instant: first table at round {first}, last table at {last}, log at {logged}"
        );
        if cuts.last() != Some(&cut) {
            cuts.push(cut);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    let (first, _, _) = rounds_seen(&backend.snapshot().await.unwrap());
    assert_eq!(
        first, rounds,
        "a write that returned is in the next snapshot"
    );
}
