//! Recovery and queues: each data set's RPO/RTO verdict with its last
//! backup and restore drill, and the queues' depth and workers as their
//! nodes last read them.

use cutover_proto::v1 as pb;
use maud::{html, Markup};

use super::{state_badge, when, PageError};
use crate::cli::ui::depths::QueueDepths;
use crate::cli::ui::feed::Snapshot;
use crate::cli::ui::Ui;

fn span(ms: u64) -> String {
    match ms {
        0 => "-".into(),
        ms => humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string(),
    }
}

fn run_cell(run: Option<&pb::JobRun>) -> Markup {
    html! {
        @match run {
            Some(run) => { (when(run.started_ms)) " on " (run.node) }
            None => span.muted { "none" },
        }
    }
}

pub async fn render(ui: &Ui, snapshot: &Snapshot) -> Result<Markup, PageError> {
    let datasets = ui
        .client()
        .get_recovery_status(pb::GetRecoveryStatusRequest::default())
        .await
        .map_err(PageError::from_status)?
        .into_inner()
        .datasets;
    let queues = &snapshot.queues;
    Ok(html! {
        h1 { "Recovery" }
        @if datasets.is_empty() {
            p.empty { "No data set has a backup job: a `[jobs]` entry with `backup` in the spec adds one." }
        } @else {
            table.recovery {
                thead { tr { th { "Data set" } th { "Env" } th { "Verdict" } th { "RPO" } th { "Data age" } th { "RTO" } th { "Last backup" } th { "Last drill" } th { "Why" } } }
                tbody {
                    @for d in &datasets {
                        tr data-dataset=(d.dataset) data-verdict=(d.verdict) {
                            td { (d.app) "/" (d.dataset) }
                            td { (d.env) }
                            td { (state_badge(&d.verdict)) }
                            td { (span(d.rpo_ms)) }
                            td { (span(d.backup_age_ms.max(0) as u64)) }
                            td { (span(d.rto_ms)) }
                            td { (run_cell(d.last_backup.as_ref())) @if let Some(f) = &d.failed_backup { br; span.badge.bad { "failed " (when(f.started_ms)) } } }
                            td { (run_cell(d.last_drill.as_ref())) }
                            td { (d.reasons.join("; ")) }
                        }
                    }
                }
            }
        }
        h1 { "Queues" }
        @if queues.queues.is_empty() {
            p.empty { "No service probes its queues: `[services.NAME.queues]` in the spec adds a probe." }
        } @else {
            table.queues {
                thead { tr { th { "Queue" } th { "Service" } th { "Waiting" } th { "Depth while this dashboard ran" } th { "Delayed" } th { "Reserved" } th { "Oldest wait" } th { "Read" } } }
                tbody {
                    @for q in &queues.queues {
                        @let over = q.max_depth > 0 && q.waiting > q.max_depth;
                        tr data-queue=(q.queue) {
                            td { (q.queue) }
                            td { (q.service) " in " (q.env) }
                            td class=[over.then_some("bad")] {
                                (q.waiting) @if q.max_depth > 0 { span.muted { " / " (q.max_depth) } }
                            }
                            td { (super::super::charts::depth_history(snapshot.depths.of(&QueueDepths::key(q)), q.max_depth)) }
                            td { (q.delayed) }
                            td { (q.reserved) }
                            td { @if q.oldest_age_ms >= 0 { (span(q.oldest_age_ms as u64)) } @else { "-" } }
                            td { (when(q.probed_at_ms)) " on " (q.node) }
                        }
                    }
                }
            }
        }
        @if !queues.workers.is_empty() {
            h2 { "Workers" }
            table.workers {
                thead { tr { th { "Service" } th { "Node" } th { "State" } th { "Detail" } } }
                tbody {
                    @for w in &queues.workers {
                        tr {
                            td { (w.service) " in " (w.env) }
                            td { (w.node) }
                            td { (state_badge(if w.up { "healthy" } else { "down" })) }
                            td { (w.detail) " " (w.probe_error) }
                        }
                    }
                }
            }
        }
    })
}
