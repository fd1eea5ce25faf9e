//! `StreamLogs` (`cutover logs`): what a service's releases wrote to stdout
//! and stderr, from every node of the environment that runs it (or the one
//! named), merged by the time each node's agent first saw each line. With
//! `follow` the nodes are asked again every second from where their last
//! answer ended: `ReadLogs` carries the cursors, so no command outlives its
//! answer and a lost answer costs nothing but a second read.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use cutover_common::rules;
use cutover_proto::v1 as pb;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::registry::{NodeView, Registry};
use crate::spec::selects;

pub(super) type LogsStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LogsEvent, Status>> + Send>>;

/// What an agent announces when it can answer `ReadLogs`.
pub const READ_LOGS_CAPABILITY: &str = "command.read_logs";
/// How often `follow` asks the nodes for new lines.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How long a node may take to answer one read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of lines asked of a node per read.
const CHUNK_BYTES: u64 = 256 * 1024;
/// Lines handed to a slow caller ahead of it; past that the reads wait.
const CALLER_QUEUE: usize = 256;

impl OperatorApi {
    /// Checked and audited by hand, not through `audited`: the answer is a
    /// stream, and what is audited is who read which logs, never the lines.
    pub(super) async fn handle_stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<LogsStream>, Status> {
        let r = request.get_ref();
        let args = json!({
            "env": r.env, "service": r.service, "node": r.node,
            "release": r.release_id, "since_ms": r.since_ms, "follow": r.follow,
        });
        let env = r.env.clone();
        let caller = self
            .access
            .check(&request, Need::Deploy(&env), "read_logs", &args)
            .await?;
        let started = self.start_logs(request.into_inner()).await;
        let outcome = started.as_ref().map(|_| ()).map_err(Clone::clone);
        self.access
            .audit(&caller, "read_logs", &args, &outcome)
            .await;
        started.map(Response::new)
    }

    async fn start_logs(&self, r: pb::StreamLogsRequest) -> Result<LogsStream, Status> {
        for (what, name) in [("environment", &r.env), ("service", &r.service)] {
            rules::name(name)
                .map_err(|e| Status::invalid_argument(format!("{what} {name:?}: {}", e.message)))?;
        }
        if !r.node.is_empty() {
            rules::name(&r.node).map_err(|e| {
                Status::invalid_argument(format!("node {:?}: {}", r.node, e.message))
            })?;
        }
        if !r.release_id.is_empty() {
            rules::release_id(&r.release_id).map_err(|e| Status::invalid_argument(e.message))?;
        }
        if r.since_ms < 0 {
            return Err(Status::invalid_argument(format!(
                "since_ms {} is before 1970; give a time in ms since the Unix epoch, or 0 for every kept line",
                r.since_ms
            )));
        }
        let history = self.rollouts.release_history(&r.env, &r.service).await?;
        if history.is_empty() {
            return Err(Status::not_found(format!(
                "{} has no release in {}; check both names (`cutover releases {} --env {}` lists a service's releases)",
                r.service, r.env, r.service, r.env
            )));
        }
        // The nodes any kept release (or the one named) was rolled out to.
        let selectors: Vec<&BTreeMap<String, String>> = history
            .iter()
            .filter(|h| r.release_id.is_empty() || h.release.id() == r.release_id)
            .map(|h| &h.selector)
            .collect();
        if selectors.is_empty() {
            return Err(Status::not_found(format!(
                "{} in {} has no kept release {:?}; `cutover releases {} --env {}` lists them",
                r.service, r.env, r.release_id, r.service, r.env
            )));
        }
        let (nodes, left_out) = pick_nodes(&self.registry.list(), &selectors, &r)?;
        tracing::info!(service = %r.service, env = %r.env, ?nodes, follow = r.follow, "streaming release logs");
        let (tx, rx) = mpsc::channel(CALLER_QUEUE);
        for notice in left_out {
            let _ = tx.try_send(Ok(notice_event(notice)));
        }
        let feeds = nodes.into_iter().map(Feed::new).collect();
        let read = pb::ReadLogs {
            service: r.service,
            release_id: r.release_id,
            since_ms: r.since_ms,
            cursors: Vec::new(),
            max_bytes: CHUNK_BYTES,
        };
        tokio::spawn(pump(
            self.registry.clone(),
            read,
            feeds,
            r.follow,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

fn notice_event(notice: String) -> pb::LogsEvent {
    pb::LogsEvent {
        kind: Some(pb::logs_event::Kind::Notice(notice)),
    }
}

/// The nodes to read from: those the selectors pick (or the one named)
/// that are connected and can read logs; and why each other one is left
/// out. Refused when none is left.
fn pick_nodes(
    views: &[NodeView],
    selectors: &[&BTreeMap<String, String>],
    r: &pb::StreamLogsRequest,
) -> Result<(Vec<String>, Vec<String>), Status> {
    let candidates: Vec<&NodeView> = views
        .iter()
        .filter(|v| selectors.iter().any(|s| selects(s, &v.record.labels)))
        .filter(|v| r.node.is_empty() || v.record.name == r.node)
        .collect();
    if candidates.is_empty() {
        return Err(Status::failed_precondition(match r.node.as_str() {
            "" => format!(
                "no node runs {} in {}; `cutover nodes` shows each node's labels",
                r.service, r.env
            ),
            node => format!(
                "node {node} does not run {} in {}; `cutover nodes` shows each node's labels (or leave --node out)",
                r.service, r.env
            ),
        }));
    }
    let (mut nodes, mut left_out) = (Vec::new(), Vec::new());
    for view in candidates {
        let record = &view.record;
        if !view.connected {
            left_out.push(format!(
                "node {} is not connected: its logs are left out",
                record.name
            ));
        } else if !record
            .capabilities
            .iter()
            .any(|c| c == READ_LOGS_CAPABILITY)
        {
            left_out.push(format!(
                "node {} runs agent {}, which cannot read logs: its logs are left out until its agent is upgraded",
                record.name, record.agent_version
            ));
        } else {
            nodes.push(record.name.clone());
        }
    }
    if nodes.is_empty() {
        return Err(Status::failed_precondition(format!(
            "no node can send the logs of {} in {}: {}",
            r.service,
            r.env,
            left_out.join("; ")
        )));
    }
    Ok((nodes, left_out))
}

/// One node's lines on their way to the caller.
struct Feed {
    node: String,
    /// Where its next read goes on.
    cursors: Vec<pb::LogCursor>,
    /// Read, not handed out yet.
    lines: VecDeque<pb::ReleaseLogLine>,
    /// To be asked before its lines can be merged on: its last answer was
    /// full, or `follow` asks again.
    due: bool,
    /// Its last read failed (said once, until it answers again).
    failing: bool,
}

impl Feed {
    fn new(node: String) -> Self {
        Self {
            node,
            cursors: Vec::new(),
            lines: VecDeque::new(),
            due: true,
            failing: false,
        }
    }
}

/// The oldest line of all feeds, unless a feed with nothing read must be
/// asked first (what it has may come before).
fn next_line(feeds: &mut [Feed]) -> Option<pb::LogLine> {
    if feeds.iter().any(|f| f.due && f.lines.is_empty()) {
        return None;
    }
    // The first of equally old lines: feeds keep the order they came in.
    let feed = feeds
        .iter_mut()
        .filter(|f| !f.lines.is_empty())
        .min_by_key(|f| f.lines[0].time_ms)?;
    let line = feed.lines.pop_front()?;
    Some(pb::LogLine {
        node: feed.node.clone(),
        release_id: line.release_id,
        stream: line.stream,
        time_ms: line.time_ms,
        text: line.text,
    })
}

/// Reads the feeds' nodes and hands their lines to the caller in time
/// order until every node is read to its end (or, following, until the
/// caller goes away or the coordinator stops).
async fn pump(
    registry: Arc<Registry>,
    read: pb::ReadLogs,
    mut feeds: Vec<Feed>,
    follow: bool,
    tx: mpsc::Sender<Result<pb::LogsEvent, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        let asks: Vec<_> = feeds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.due && f.lines.is_empty())
            .map(|(i, f)| {
                let ask = pb::ReadLogs {
                    cursors: f.cursors.clone(),
                    ..read.clone()
                };
                let (registry, node) = (registry.clone(), f.node.clone());
                (
                    i,
                    tokio::spawn(async move { read_chunk(&registry, &node, ask).await }),
                )
            })
            .collect();
        for (i, ask) in asks {
            let answer = tokio::select! {
                answer = ask => answer.unwrap_or_else(|e| Err(format!("the read failed: {e}"))),
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return stopping(&tx).await,
            };
            let feed = &mut feeds[i];
            match answer {
                Ok(chunk) => {
                    feed.lines.extend(chunk.lines);
                    feed.cursors = chunk.cursors;
                    feed.due = chunk.more;
                    if std::mem::take(&mut feed.failing) {
                        let back = format!("node {} answers again", feed.node);
                        if tx.send(Ok(notice_event(back))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    feed.due = false;
                    if !std::mem::replace(&mut feed.failing, true) {
                        let again = if follow {
                            "; asking again every second"
                        } else {
                            ""
                        };
                        let notice =
                            format!("node {}: cannot read its logs: {error}{again}", feed.node);
                        tracing::warn!(node = %feed.node, %error, "cannot read release logs");
                        if tx.send(Ok(notice_event(notice))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        while let Some(line) = next_line(&mut feeds) {
            let event = pb::LogsEvent {
                kind: Some(pb::logs_event::Kind::Line(line)),
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        if feeds.iter().any(|f| f.due) {
            continue;
        }
        if !follow {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => return stopping(&tx).await,
        }
        for feed in &mut feeds {
            feed.due = true;
        }
    }
}

async fn stopping(tx: &mpsc::Sender<Result<pb::LogsEvent, Status>>) {
    let _ = tx
        .send(Err(Status::unavailable(
            "the coordinator is stopping; run the command again once it is back",
        )))
        .await;
}

/// One `ReadLogs` round trip to `node`.
async fn read_chunk(
    registry: &Registry,
    node: &str,
    read: pb::ReadLogs,
) -> Result<pb::LogChunk, String> {
    let command = pb::Command {
        command_id: format!("logs.{}", uuid::Uuid::new_v4()),
        kind: Some(pb::command::Kind::ReadLogs(read)),
    };
    let pending = registry
        .send_command(node, command)
        .map_err(|e| e.to_string())?;
    let result = pending
        .wait(READ_TIMEOUT, |_| {})
        .await
        .map_err(|e| e.to_string())?;
    match (pb::CommandStatus::try_from(result.status), result.output) {
        (Ok(pb::CommandStatus::Succeeded), Some(pb::command_result::Output::Logs(chunk))) => {
            Ok(chunk)
        }
        (Ok(pb::CommandStatus::Rejected), _) => Err(format!(
            "its agent cannot read logs ({}); upgrade it",
            result.message
        )),
        _ => Err(result.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NodeRecord, NodeStatus};

    fn view(name: &str, env: &str, connected: bool, capabilities: &[&str]) -> NodeView {
        NodeView {
            record: NodeRecord {
                id: format!("id-{name}"),
                name: name.into(),
                address: "127.0.0.1".into(),
                labels: [("env".to_string(), env.to_string())].into(),
                agent_version: "0.1.0".into(),
                agent_build: String::new(),
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
                status: NodeStatus::Ready,
                registered_at_ms: 0,
                last_seen_ms: 0,
                figures: None,
                services: Vec::new(),
                services_at_ms: 0,
                cert_serial: String::new(),
                cert_expires_at_ms: 0,
                cert_ca: String::new(),
                trust_bundle: String::new(),
            },
            connected,
            heartbeat_age: Duration::ZERO,
            revoked: false,
        }
    }

    fn request(node: &str) -> pb::StreamLogsRequest {
        pb::StreamLogsRequest {
            env: "prod".into(),
            service: "web".into(),
            node: node.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nodes_of_the_environment_are_read_and_each_one_left_out_says_why() {
        let prod: BTreeMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        let views = [
            view("a", "prod", true, &[READ_LOGS_CAPABILITY]),
            view("b", "prod", false, &[READ_LOGS_CAPABILITY]),
            view("c", "prod", true, &["command.ping"]),
            view("d", "staging", true, &[READ_LOGS_CAPABILITY]),
        ];
        let (nodes, left_out) = pick_nodes(&views, &[&prod], &request("")).unwrap();
        assert_eq!(nodes, ["a"]);
        assert_eq!(left_out.len(), 2);
        assert!(
            left_out[0].contains("node b is not connected"),
            "{left_out:?}"
        );
        assert!(left_out[1].contains("node c runs agent 0.1.0, which cannot read logs"));

        let (nodes, left_out) = pick_nodes(&views, &[&prod], &request("a")).unwrap();
        assert_eq!((nodes, left_out.len()), (vec!["a".to_string()], 0));

        // An older agent alone: refused at once, not left to hang.
        let refused = pick_nodes(&views, &[&prod], &request("c")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("cannot read logs"),
            "{}",
            refused.message()
        );
        let refused = pick_nodes(&views, &[&prod], &request("d")).unwrap_err();
        assert!(
            refused
                .message()
                .starts_with("node d does not run web in prod"),
            "{}",
            refused.message()
        );
    }

    fn line(time_ms: i64, text: &str) -> pb::ReleaseLogLine {
        pb::ReleaseLogLine {
            release_id: "web-v1".into(),
            stream: pb::LogStream::Stdout as i32,
            time_ms,
            text: text.into(),
        }
    }

    fn feed(node: &str, lines: &[(i64, &str)], due: bool) -> Feed {
        Feed {
            lines: lines.iter().map(|(t, text)| line(*t, text)).collect(),
            due,
            ..Feed::new(node.into())
        }
    }

    #[test]
    fn lines_merge_by_time_and_wait_for_a_node_that_may_have_older_ones() {
        let mut feeds = vec![
            feed("a", &[(1, "a1"), (5, "a5")], false),
            feed("b", &[(3, "b3")], true),
        ];
        let mut out = Vec::new();
        while let Some(line) = next_line(&mut feeds) {
            out.push(format!("{} {}", line.node, line.text));
        }
        assert_eq!(out, ["a a1", "b b3"], "b must be asked again before a5");
        feeds[1].lines.push_back(line(4, "b4"));
        feeds[1].lines.push_back(line(5, "b5"));
        feeds[1].due = false;
        while let Some(line) = next_line(&mut feeds) {
            out.push(format!("{} {}", line.node, line.text));
        }
        assert_eq!(out, ["a a1", "b b3", "b b4", "a a5", "b b5"]);
    }
}
