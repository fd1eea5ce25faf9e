//! The event log (what happened to the fleet) and the audit log (who asked
//! for what): both read-only here, newest or oldest first, paged by sequence.

use cutover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::OperatorApi;
use crate::access::Need;
use crate::store::{AuditRecord, EventRecord, Page};

fn event_to_pb(e: EventRecord) -> pb::Event {
    pb::Event {
        seq: e.seq,
        at_ms: e.at_ms,
        kind: e.kind,
        node_id: e.node_id,
        node_name: e.node_name,
        message: e.message,
    }
}

fn audit_to_pb(e: AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: e.seq,
        at_ms: e.at_ms,
        who: e.who,
        action: e.action,
        arguments: e.arguments,
        outcome: e.outcome,
    }
}

impl OperatorApi {
    pub(super) async fn handle_list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        self.access
            .check(
                &request,
                Need::Read,
                "list_events",
                &serde_json::Value::Null,
            )
            .await?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let events = self
            .registry
            .events(Page {
                after_seq: request.after_seq,
                limit,
                newest: request.newest,
            })
            .await?
            .into_iter()
            .map(event_to_pb)
            .collect();
        Ok(Response::new(pb::ListEventsResponse { events }))
    }

    pub(super) async fn handle_list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.access
            .check(&request, Need::Read, "list_audit", &serde_json::Value::Null)
            .await?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n => n.min(100_000) as usize,
        };
        let entries = self
            .registry
            .store()
            .access
            .audit(
                r.since_ms,
                Page {
                    after_seq: r.after_seq,
                    limit,
                    newest: r.newest,
                },
            )
            .await?
            .into_iter()
            .map(audit_to_pb)
            .collect();
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }
}
