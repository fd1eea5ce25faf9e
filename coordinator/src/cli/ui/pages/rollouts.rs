//! Rollouts: the recent ones, and one rollout's whole story (its nodes'
//! steps, canary weights and analysis, approvals, timeline) with the
//! actions the operator's role allows, each confirmed first.

use cutover_proto::v1 as pb;
use maud::{html, Markup};

use super::{encode, rel, release_label, state_badge, when, PageError};
use crate::cli::rollout_view::{approval_line, canary_line, error_text};
use crate::cli::ui::feed::Snapshot;
use crate::cli::ui::Ui;

/// A node a rollout is not changing now: done, or not begun.
pub fn at_rest(state: pb::RolloutNodeState) -> bool {
    use pb::RolloutNodeState as N;
    matches!(
        state,
        N::Pending
            | N::Prepared
            | N::Switched
            | N::Unchanged
            | N::RolledBack
            | N::Failed
            | N::Canary
            | N::Stopped
            | N::Unspecified
    )
}

fn done(state: pb::RolloutNodeState) -> bool {
    crate::cli::rollout_view::done_state(state)
}

/// An id as rollouts have them; anything else is not looked up.
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One rollout, from the coordinator.
async fn fetch(ui: &Ui, id: &str) -> Result<pb::Rollout, PageError> {
    if !plausible_id(id) {
        return Err(PageError::not_found(format!(
            "There is no rollout {id}: rollout ids are letters, digits and dashes. The recent rollouts are on the Rollouts page."
        )));
    }
    match ui
        .client()
        .get_rollout(pb::GetRolloutRequest { id: id.to_string() })
        .await
    {
        Ok(rollout) => Ok(rollout.into_inner()),
        Err(status) if status.code() == tonic::Code::NotFound => Err(PageError::not_found(
            format!("There is no rollout {id}. The recent rollouts are on the Rollouts page."),
        )),
        Err(status) => Err(PageError::from_status(status)),
    }
}

pub fn list(snapshot: &Snapshot) -> Markup {
    html! {
        h1 { "Rollouts" }
        @if snapshot.rollouts.is_empty() {
            p.empty { "No rollout yet: `cutover deploy` starts one." }
        } @else {
            table.rollouts {
                thead { tr { th { "Rollout" } th { "Service" } th { "Env" } th { "Kind" } th { "State" } th { "Release" } th { "Nodes" } th { "By" } th { "Started" } } }
                tbody {
                    @for r in &snapshot.rollouts {
                        tr data-rollout=(r.id) data-state=(r.state().as_str()) {
                            td { a href=(rel(&format!("/rollouts/{}", encode(&r.id)))) { (r.id) } }
                            td { (r.service) }
                            td { (r.env) }
                            td { (r.kind) }
                            td { (state_badge(r.state().as_str())) }
                            td { @if let Some(x) = &r.release { (release_label(snapshot, &x.id)) } }
                            td { (r.nodes.iter().filter(|n| done(n.state())).count()) "/" (r.nodes.len()) }
                            td { (r.created_by) }
                            td { (when(r.created_at_ms)) }
                        }
                    }
                }
            }
        }
    }
}

pub async fn render(ui: &Ui, snapshot: &Snapshot, id: &str) -> Result<Markup, PageError> {
    let fetched;
    let rollout = match snapshot.rollout(id) {
        Some(r) => r,
        None => {
            fetched = fetch(ui, id).await?;
            &fetched
        }
    };
    Ok(detail(ui, snapshot, rollout))
}

fn detail(ui: &Ui, snapshot: &Snapshot, r: &pb::Rollout) -> Markup {
    let total = r.nodes.len();
    let finished = r.nodes.iter().filter(|n| done(n.state())).count();
    let percent = (finished * 100).checked_div(total).unwrap_or(0);
    html! {
        h1 { "Rollout " (r.id) " " (state_badge(r.state().as_str())) }
        p.summary data-rollout-summary {
            (r.kind) " of " strong { (r.service) } " (" (r.app) ") in " strong { (r.env) } ": "
            @if let Some(x) = &r.previous_release { (release_label(snapshot, &x.id)) " → " }
            @if let Some(x) = &r.release { (release_label(snapshot, &x.id)) }
            ", by " (r.created_by) " at " (when(r.created_at_ms))
            @if r.finished_at_ms > 0 { ", ended " (when(r.finished_at_ms)) }
        }
        @if r.state() == pb::RolloutState::Held {
            @if let Some(held) = r.timeline.iter().rev().find(|e| e.kind == "held") {
                p.banner { "Held: " (held.message) " Retry runs the command again; abort ends it." }
            }
        }
        @if r.pause_requested { p.banner { "Pause requested: it stops after the current batch." } }
        @if r.abort_requested { p.banner { "Abort requested." } }
        (actions(ui, r))
        div.progress title=(format!("{finished} of {total} nodes done")) {
            div.bar style=(format!("width:{percent}%")) {}
        }
        p.muted {
            (finished) " of " (total) " nodes done"
            @if matches!(r.phase.as_str(), "batch" | "watch") { " · batch " (r.batch) " of " (r.batches) " (" (r.phase) ")" }
            @if !r.skipped_nodes.is_empty() { " · skipped " (r.skipped_nodes.join(", ")) }
        }
        @if let Some(e) = &r.error { p.banner.bad { "Error: " (error_text(e)) } }
        @for f in &r.rollback_failures { p.banner.bad { "Rollback failed: " (error_text(f)) } }
        @if let Some(line) = approval_line(r) { p.banner { (line) } }
        @if let Some(c) = &r.canary { (canary(c)) }
        @if !r.analysis.is_empty() { (super::super::charts::analysis(&r.analysis)) }
        h2 { "Nodes" }
        table.nodes {
            thead { tr { th { "Node" } th { "State" } th { "Batch" } th { "Serves" } th { "From" } th { "Canary" } th { "Step" } } }
            tbody {
                @for n in &r.nodes {
                    tr data-node=(n.name) data-state=(n.state().as_str()) {
                        td { a href=(rel(&format!("/nodes/{}", encode(&n.name)))) { (n.name) } }
                        td { (state_badge(n.state().as_str())) @if n.refused { " " (state_badge("refused")) } }
                        td { @if n.batch > 0 { (n.batch) } }
                        td { (release_label(snapshot, &n.release)) }
                        td { @if !n.from_release.is_empty() { (release_label(snapshot, &n.from_release)) } }
                        td { @if n.canary { (n.weight) "%" } }
                        td { (n.step) }
                    }
                }
            }
        }
        h2 { "Timeline" }
        ol.timeline {
            @for t in r.timeline.iter().rev() {
                li { time { (when(t.at_ms)) } " " span.kind { (t.kind) } " " @if !t.node.is_empty() { b { (t.node) } " " } (t.message) }
            }
        }
    }
}

fn canary(c: &pb::CanaryStatus) -> Markup {
    html! {
        section.canary {
            h2 { "Canary" }
            p { (canary_line(c)) }
            (super::super::charts::canary_steps(c))
        }
    }
}

/// The actions that apply to the rollout now, if the operator may take
/// them; each asks first.
fn actions(ui: &Ui, r: &pb::Rollout) -> Markup {
    use pb::RolloutState as S;
    if !ui.may_deploy(&r.env) {
        return html! {};
    }
    let awaiting = r.canary.as_ref().is_some_and(|c| c.awaiting_promotion);
    let mut list: Vec<(&str, &str, String)> = Vec::new();
    match r.state() {
        S::Pending | S::Running if !r.pause_requested => list.push((
            "pause",
            "Pause",
            "It stops after the current batch; resume goes on.".into(),
        )),
        S::Paused => list.push((
            "resume",
            "Resume",
            "It goes on from where it paused.".into(),
        )),
        S::Held => list.push((
            "retry",
            "Retry",
            "The command whose outcome is not known runs again.".into(),
        )),
        S::AwaitingApproval if r.created_by != ui.me.name => {
            list.push((
                "approve",
                "Approve",
                "One more approval of this rollout.".into(),
            ));
            list.push((
                "reject",
                "Reject",
                "It ends aborted; nothing changes.".into(),
            ));
        }
        _ => {}
    }
    if awaiting {
        list.push((
            "promote",
            "Promote",
            "The canary goes on to its next step.".into(),
        ));
        list.push((
            "promote-full",
            "Promote fully",
            "Every node switches to the new release now, skipping the remaining steps.".into(),
        ));
    }
    let ends = matches!(
        r.state(),
        S::Succeeded | S::Failed | S::RolledBack | S::Aborted
    );
    if !ends && !r.abort_requested {
        // What an abort does differs by strategy (engine: a canary's
        // returns its traffic, any other stops where it is).
        let what = match r.canary.is_some() {
            true => "Every canary node's traffic returns to the stable release at once.",
            false => "It stops once the nodes mid-cutover finish; nodes already switched keep the new release (a rollback returns them).",
        };
        list.push(("abort", "Abort", what.into()));
    }
    html! {
        div.actions id="actions" {
            @for (action, label, what) in &list {
                form method="post" id=(format!("action-{action}")) action=(rel(&format!("/rollouts/{}/action", encode(&r.id))))
                    data-confirm=(format!("{label} rollout {} of {} in {}? {what}", r.id, r.service, r.env)) {
                    input type="hidden" name="action" value=(action);
                    button type="submit" class=(if *action == "abort" || *action == "reject" { "danger" } else { "" })
                        data-action=(action) { (label) }
                }
            }
        }
    }
}
