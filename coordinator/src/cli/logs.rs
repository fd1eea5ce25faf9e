//! `cutover events` and `cutover audit`: the newest entries of a log, and
//! with `--follow` every entry after them as it comes.

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::explain;
use super::nodes::{render_table, rfc3339};

/// How often `--follow` asks for new entries.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How long `--follow` waits for one answer before asking again.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Only events after this sequence number, oldest first.
    #[arg(long)]
    pub after: Option<u64>,
    /// How many events: the newest ones (or the first after `--after`).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Keep printing new events as they happen (JSON: one object a line).
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only entries this recent, e.g. "1h", "7d".
    #[arg(long)]
    pub since: Option<humantime::Duration>,
    /// How many entries: the newest ones.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Keep printing new entries as they are written (JSON: one object a line).
    #[arg(long, short)]
    pub follow: bool,
}

/// One log's shape: how its records print.
trait Entry {
    fn seq(&self) -> u64;
    fn header() -> Vec<String>;
    fn row(&self) -> Vec<String>;
    fn json(&self) -> Value;
}

impl Entry for pb::Event {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn header() -> Vec<String> {
        ["SEQ", "AT", "KIND", "MESSAGE"].map(String::from).to_vec()
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            rfc3339(self.at_ms),
            self.kind.clone(),
            self.message.clone(),
        ]
    }
    fn json(&self) -> Value {
        json!({
            "seq": self.seq, "at": rfc3339(self.at_ms), "kind": self.kind,
            "node_id": self.node_id, "node": self.node_name, "message": self.message,
        })
    }
}

impl Entry for pb::AuditEntry {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn header() -> Vec<String> {
        ["SEQ", "AT", "WHO", "ACTION", "OUTCOME", "ARGUMENTS"]
            .map(String::from)
            .to_vec()
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            rfc3339(self.at_ms),
            self.who.clone(),
            self.action.clone(),
            self.outcome.clone(),
            self.arguments.clone(),
        ]
    }
    fn json(&self) -> Value {
        json!({
            "seq": self.seq,
            "at": rfc3339(self.at_ms),
            "who": self.who,
            "action": self.action,
            "arguments": serde_json::from_str::<Value>(&self.arguments).unwrap_or(Value::Null),
            "outcome": self.outcome,
        })
    }
}

pub async fn events(
    client: &mut OperatorServiceClient<Channel>,
    args: EventsArgs,
    json: bool,
) -> Result<()> {
    let fetch = |after_seq: u64, newest: bool| {
        let mut client = client.clone();
        let limit = args.limit;
        async move {
            let request = pb::ListEventsRequest {
                after_seq,
                limit,
                newest,
            };
            Ok(client
                .list_events(request)
                .await
                .map_err(explain)?
                .into_inner()
                .events)
        }
    };
    show(fetch, args.after, args.follow, json).await
}

pub async fn audit(
    client: &mut OperatorServiceClient<Channel>,
    args: AuditArgs,
    json: bool,
) -> Result<()> {
    let since_ms = args.since.map_or(0, |since| {
        let since: Duration = since.into();
        cutover_common::now_ms() - since.as_millis() as i64
    });
    let fetch = |after_seq: u64, newest: bool| {
        let mut client = client.clone();
        let limit = args.limit;
        async move {
            let request = pb::ListAuditRequest {
                since_ms,
                limit,
                after_seq,
                newest,
            };
            Ok(client
                .list_audit(request)
                .await
                .map_err(explain)?
                .into_inner()
                .entries)
        }
    };
    show(fetch, None, args.follow, json).await
}

/// Prints the first page (the newest entries, or the oldest after `after`),
/// then, following, every newer entry in order.
async fn show<T, F, Fut>(fetch: F, after: Option<u64>, follow: bool, json: bool) -> Result<()>
where
    T: Entry,
    F: Fn(u64, bool) -> Fut,
    Fut: Future<Output = Result<Vec<T>>>,
{
    let first = fetch(after.unwrap_or(0), after.is_none()).await?;
    if !follow {
        if json {
            let all: Vec<Value> = first.iter().map(Entry::json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            print_rows(&first, true);
        }
        return Ok(());
    }
    let mut last = first.last().map_or(after.unwrap_or(0), Entry::seq);
    print_follow(&first, json, true);
    // One Ctrl-C handler for the whole follow, raced against every wait
    // and every call: a call hanging on a lost connection still ends.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let next = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            next = tokio::time::timeout(CALL_TIMEOUT, fetch(last, false)) => next,
        };
        // A coordinator restarting or out of reach for a moment is waited
        // for, said once per failure on stderr.
        match next {
            Ok(Ok(next)) => {
                if let Some(entry) = next.last() {
                    last = entry.seq();
                }
                print_follow(&next, json, false);
            }
            Ok(Err(error)) => eprintln!("warning: {error:#}; retrying"),
            Err(_) => eprintln!("warning: no answer within {CALL_TIMEOUT:?}; retrying"),
        }
    }
}

fn print_follow<T: Entry>(entries: &[T], json: bool, header: bool) {
    if json {
        for entry in entries {
            println!("{}", entry.json());
        }
    } else {
        print_rows(entries, header);
    }
}

fn print_rows<T: Entry>(entries: &[T], header: bool) {
    let mut rows: Vec<Vec<String>> = header.then(T::header).into_iter().collect();
    rows.extend(entries.iter().map(Entry::row));
    if !rows.is_empty() {
        print!("{}", render_table(&rows));
    }
}
