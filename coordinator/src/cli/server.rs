//! `cutover server status`: every listed coordinator asked what it is
//! (single, leading, following whom), and the etcd members under them.

use anyhow::Result;
use cutover_proto::v1::server_service_client::ServerServiceClient;
use cutover_proto::v1::{ServerRole, ServerStatusRequest, ServerStatusResponse};
use serde_json::{json, Value};

use super::client::{explain, ConnectArgs};
use super::nodes::{bytes, render_table, rfc3339};

/// One listed coordinator: its answer, or why there is none.
pub struct Answer {
    pub url: String,
    pub status: Result<ServerStatusResponse, String>,
}

/// Asks every coordinator; true when one of them acts (leads, or runs
/// alone), so scripts can check `cutover server status` for a leader.
pub async fn status(connect: &ConnectArgs, json: bool) -> Result<bool> {
    let mut answers = Vec::new();
    for (url, channel) in connect.each_coordinator().await? {
        let status = match channel {
            Ok(channel) => ServerServiceClient::new(channel)
                .status(ServerStatusRequest { store_health: true })
                .await
                .map(|response| response.into_inner())
                .map_err(|status| format!("{:#}", explain(status))),
            Err(error) => Err(error),
        };
        answers.push(Answer { url, status });
    }
    let acting = answers.iter().any(|answer| {
        answer
            .status
            .as_ref()
            .is_ok_and(|s| matches!(s.role(), ServerRole::Leading | ServerRole::Single))
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(&answers))?);
    } else {
        print!("{}", to_table(&answers));
        if !acting {
            println!("\nno listed coordinator leads: nothing deploys or rolls back until one does (check the etcd members above, and the coordinators' logs)");
        }
    }
    Ok(acting)
}

fn role(status: &ServerStatusResponse) -> &'static str {
    status.role().as_str()
}

/// The JSON contract of `cutover server status --output json`.
pub fn to_json(answers: &[Answer]) -> Value {
    let coordinators: Vec<Value> = answers
        .iter()
        .map(|answer| match &answer.status {
            Ok(s) => json!({
                "coordinator": answer.url,
                "identity": s.identity,
                "role": role(s),
                "leader": (!s.leader.is_empty()).then_some(&s.leader),
                "leader_token": s.leader_token,
                "since": (s.since_ms > 0).then(|| rfc3339(s.since_ms as i64)),
                "store": s.store,
                "version": s.version,
            }),
            Err(error) => json!({
                "coordinator": answer.url,
                "role": "unreachable",
                "error": error,
            }),
        })
        .collect();
    let members: Vec<Value> = store_members(answers)
        .iter()
        .map(|m| {
            json!({
                "endpoint": m.endpoint,
                "healthy": m.healthy,
                "version": (!m.version.is_empty()).then_some(&m.version),
                "db_size_bytes": m.db_size_bytes,
                "raft_term": m.raft_term,
                "raft_leader": m.raft_leader,
                "error": (!m.error.is_empty()).then_some(&m.error),
            })
        })
        .collect();
    json!({ "coordinators": coordinators, "store_members": members })
}

/// The etcd members as the first coordinator that asked them saw them.
fn store_members(answers: &[Answer]) -> &[cutover_proto::v1::StoreMember] {
    answers
        .iter()
        .filter_map(|answer| answer.status.as_ref().ok())
        .find(|status| !status.store_members.is_empty())
        .map_or(&[], |status| &status.store_members)
}

pub fn to_table(answers: &[Answer]) -> String {
    let mut rows = vec![[
        "COORDINATOR",
        "ROLE",
        "LEADER",
        "TOKEN",
        "SINCE",
        "STORE",
        "VERSION",
    ]
    .map(String::from)
    .to_vec()];
    for answer in answers {
        rows.push(match &answer.status {
            Ok(s) => vec![
                answer.url.clone(),
                role(s).to_string(),
                if s.leader.is_empty() {
                    "-".into()
                } else {
                    s.leader.clone()
                },
                s.leader_token.to_string(),
                if s.since_ms > 0 {
                    rfc3339(s.since_ms as i64)
                } else {
                    "-".into()
                },
                s.store.clone(),
                s.version.clone(),
            ],
            Err(error) => vec![
                answer.url.clone(),
                format!("unreachable: {error}"),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        });
    }
    let mut out = render_table(&rows);
    let members = store_members(answers);
    if !members.is_empty() {
        let mut rows = vec![[
            "ETCD MEMBER",
            "HEALTH",
            "VERSION",
            "DB SIZE",
            "RAFT TERM",
            "RAFT LEADER",
        ]
        .map(String::from)
        .to_vec()];
        for m in members {
            rows.push(vec![
                m.endpoint.clone(),
                if m.healthy {
                    "healthy".into()
                } else {
                    format!("unhealthy: {}", m.error)
                },
                if m.version.is_empty() {
                    "-".into()
                } else {
                    m.version.clone()
                },
                bytes(m.db_size_bytes),
                m.raft_term.to_string(),
                if m.raft_leader { "yes" } else { "no" }.into(),
            ]);
        }
        out.push('\n');
        out.push_str(&render_table(&rows));
    }
    out
}
