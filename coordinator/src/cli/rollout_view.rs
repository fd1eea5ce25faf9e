//! How a rollout reads: the live progress view, the end-of-watch summary,
//! `rollout status` as text, and the JSON of `--output json`.

use serde_json::{json, Value};

use cutover_proto::v1 as pb;

use super::nodes::{render_table, rfc3339};

pub(super) fn done_state(state: pb::RolloutNodeState) -> bool {
    use pb::RolloutNodeState as N;
    matches!(state, N::Switched | N::Unchanged | N::RolledBack)
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The live view: a bar of nodes done, the batch, each node's step.
pub(super) fn progress(r: &pb::Rollout) -> String {
    let done = r.nodes.iter().filter(|n| done_state(n.state())).count();
    let total = r.nodes.len();
    let batch = match r.phase.as_str() {
        "batch" | "watch" => format!("batch {}/{} ({})", r.batch, r.batches, r.phase),
        phase => phase.to_string(),
    };
    let batch = match (r.canary.as_ref(), approval_line(r)) {
        (_, Some(approval)) => approval,
        (Some(canary), None) if r.phase == "canary" => canary_line(canary),
        _ => batch,
    };
    let mut out = format!(
        "rollout {} {} -> {}  {}\n{} {done}/{total} nodes  {batch}\n",
        r.id,
        r.service,
        r.release.as_ref().map_or("", |x| x.id.as_str()),
        r.state().as_str(),
        bar(done, total, 30),
    );
    for n in &r.nodes {
        let step = if n.step.is_empty() {
            String::new()
        } else {
            format!(" ({})", n.step)
        };
        let target = r.release.as_ref().map_or("", |x| x.id.as_str());
        let serves = if n.release.is_empty() {
            "-"
        } else {
            &n.release
        };
        // Mid-cutover the node still serves its old release: say where it
        // is going, not only where it is.
        let release = if n.state() == pb::RolloutNodeState::Activating && n.release != target {
            format!("{serves} -> {target}")
        } else {
            serves.to_string()
        };
        let weight = match n.canary {
            true => format!(" [canary {}%]", n.weight),
            false => String::new(),
        };
        let refused = match n.refused {
            true => " [refused the release: stays]",
            false => "",
        };
        out.push_str(&format!(
            "  {:<16} {:<13} {release}{weight}{refused}{step}\n",
            n.name,
            n.state().as_str()
        ));
    }
    out
}

/// Where a canary is: its step, its weight, what it waits for.
pub(super) fn canary_line(c: &pb::CanaryStatus) -> String {
    let step = match c.step as usize {
        0 => "starting".to_string(),
        n if n > c.steps.len() => "promoted".to_string(),
        n => format!("step {n}/{}: {}", c.steps.len(), c.steps[n - 1]),
    };
    let wait = if c.awaiting_promotion {
        " (waiting for `cutover rollout promote`)".to_string()
    } else if c.pause_until_ms > 0 {
        format!(" (until {})", rfc3339(c.pause_until_ms))
    } else {
        String::new()
    };
    format!(
        "canary {step}{wait}, weight {}% on {} canary nodes ({:.1}% of the fleet)",
        c.weight,
        c.canary_nodes.len(),
        c.fleet_weight
    )
}

/// A rollout awaiting approval: how many it has, who may give them, until
/// when; `None` for any other.
pub(super) fn approval_line(r: &pb::Rollout) -> Option<String> {
    let approval = r.approval.as_ref()?;
    if r.state() != pb::RolloutState::AwaitingApproval {
        return None;
    }
    let by: Vec<&str> = approval.approvals.iter().map(|a| a.by.as_str()).collect();
    let so_far = match by.as_slice() {
        [] => String::new(),
        by => format!(" (by {})", by.join(", ")),
    };
    Some(format!(
        "awaiting approval: {} of {}{so_far}; another operator runs `cutover approve {}` (or reject) before {}",
        approval.approvals.len(),
        approval.required,
        r.id,
        rfc3339(approval.expires_at_ms)
    ))
}

/// The approval story of a rollout that asked for one.
fn approval_lines(approval: &pb::ApprovalStatus) -> String {
    let mut out = format!(
        "approval  {} required, expires {}\n",
        approval.required,
        rfc3339(approval.expires_at_ms)
    );
    let decisions = approval
        .approvals
        .iter()
        .map(|d| ("approved", d))
        .chain(approval.rejected.iter().map(|d| ("rejected", d)));
    for (what, d) in decisions {
        let comment = match d.comment.as_str() {
            "" => String::new(),
            comment => format!(": {comment}"),
        };
        out.push_str(&format!(
            "          {what} by {} at {}{comment}\n",
            d.by,
            rfc3339(d.at_ms)
        ));
    }
    out
}

pub(super) fn summary(r: &pb::Rollout) -> String {
    let took = (r.finished_at_ms.max(r.updated_at_ms) - r.created_at_ms) as f64 / 1000.0;
    let mut text = format!("rollout {} {} in {took:.1}s", r.id, r.state().as_str());
    if let Some(canary) = r.canary.as_ref().filter(|c| c.awaiting_promotion) {
        text = format!(
            "rollout {} {}: {}; promote with `cutover rollout promote {}` (or abort)",
            r.id,
            r.state().as_str(),
            canary_line(canary),
            r.id
        );
    }
    if let Some(approval) = approval_line(r) {
        text = format!("rollout {} {approval}", r.id);
    }
    if let Some(e) = &r.error {
        text.push_str(&format!("\n  cause: {}", error_text(e)));
    }
    for f in &r.rollback_failures {
        text.push_str(&format!("\n  rollback failed: {}", error_text(f)));
    }
    if r.state() == pb::RolloutState::Held {
        if let Some(held) = r.timeline.iter().rev().find(|e| e.kind == "held") {
            text.push_str(&format!("\n  held: {}", held.message));
        }
    }
    text
}

pub(super) fn error_text(e: &pb::RolloutError) -> String {
    if e.node.is_empty() {
        format!("{}: {}", e.step, e.message)
    } else {
        format!("node {}, step {}: {}", e.node, e.step, e.message)
    }
}

/// `cutover rollout status`: the whole story of one rollout.
pub(super) fn describe(r: &pb::Rollout) -> String {
    let release =
        |x: &Option<pb::ReleaseInfo>| x.as_ref().map_or("-".to_string(), |x| x.id.clone());
    let mut out = format!(
        "rollout   {}\nkind      {}\nstate     {}{}{}\nservice   {} ({} in {})\nrelease   {}\nprevious  {}\nbatches   {} of {} nodes\nby        {} at {}\n",
        r.id,
        r.kind,
        r.state().as_str(),
        if r.pause_requested { " (pause requested)" } else { "" },
        if r.abort_requested { " (abort requested)" } else { "" },
        r.service,
        r.app,
        r.env,
        release(&r.release),
        release(&r.previous_release),
        r.batches,
        r.batch_size,
        r.created_by,
        rfc3339(r.created_at_ms),
    );
    if let Some(e) = &r.error {
        out.push_str(&format!("error     {}\n", error_text(e)));
    }
    for f in &r.rollback_failures {
        out.push_str(&format!("rollback  {}\n", error_text(f)));
    }
    if !r.skipped_nodes.is_empty() {
        out.push_str(&format!("skipped   {}\n", r.skipped_nodes.join(", ")));
    }
    if let Some(approval) = &r.approval {
        out.push_str(&approval_lines(approval));
    }
    if let Some(canary) = &r.canary {
        out.push_str(&format!("canary    {}\n", canary_line(canary)));
        out.push_str(&format!("steps     {}\n", canary.steps.join(", ")));
    }
    for run in &r.analysis {
        out.push_str(&analysis_lines(run));
    }
    let mut rows = vec![[
        "NODE", "STATE", "BATCH", "RELEASE", "FROM", "CANARY", "STEP",
    ]
    .map(String::from)
    .to_vec()];
    rows.extend(r.nodes.iter().map(|n| {
        vec![
            n.name.clone(),
            n.state().as_str().to_string(),
            if n.batch == 0 {
                "-".into()
            } else {
                n.batch.to_string()
            },
            n.release.clone(),
            n.from_release.clone(),
            match n.canary {
                true => format!("{}%", n.weight),
                false => "-".into(),
            },
            n.step.clone(),
        ]
    }));
    out.push('\n');
    out.push_str(&render_table(&rows));
    out.push_str("\ntimeline\n");
    for t in &r.timeline {
        out.push_str(&format!(
            "  {} {:<18} {}\n",
            rfc3339(t.at_ms),
            t.kind,
            t.message
        ));
    }
    out
}

/// "analysis  errors (step 3) failed: ..." and a line per metric with its
/// samples' outcomes and the last sample's values.
fn analysis_lines(run: &pb::AnalysisRun) -> String {
    let at = match run.step {
        0 => "background".to_string(),
        step => format!("step {step}"),
    };
    let mut out = format!("analysis  {} ({at}) {}", run.name, run.state);
    if !run.summary.is_empty() {
        out.push_str(&format!(": {}", run.summary));
    }
    out.push('\n');
    for m in &run.metrics {
        let outcomes: Vec<&str> = m.samples.iter().map(|s| s.outcome.as_str()).collect();
        out.push_str(&format!(
            "  {} ({}, `{}`) {}: {} of {} samples{}",
            m.name,
            m.provider,
            m.condition,
            m.state,
            m.samples.len(),
            m.count,
            match outcomes.is_empty() {
                true => String::new(),
                false => format!(" [{}]", outcomes.join(" ")),
            }
        ));
        if let Some(last) = m.samples.last() {
            // What the condition reads, and the traffic it was read on.
            let mut values: Vec<(&String, &f64)> = last
                .values
                .iter()
                .filter(|(k, _)| m.condition.contains(k.as_str()) || k.ends_with("_requests"))
                .collect();
            values.sort_by(|a, b| a.0.cmp(b.0));
            let values: Vec<String> = values
                .iter()
                .map(|(k, v)| {
                    let v = format!("{v:.4}");
                    format!("{k}={}", v.trim_end_matches('0').trim_end_matches('.'))
                })
                .collect();
            out.push_str(&format!("; last: {}", values.join(" ")));
            if !last.note.is_empty() {
                out.push_str(&format!(" ({})", last.note));
            }
        }
        out.push('\n');
    }
    out
}

fn analysis_json(run: &pb::AnalysisRun) -> Value {
    json!({
        "step": run.step,
        "background": run.step == 0,
        "name": run.name,
        "state": run.state,
        "started_at": rfc3339(run.started_at_ms),
        "summary": run.summary,
        "metrics": run.metrics.iter().map(|m| json!({
            "name": m.name,
            "provider": m.provider,
            "condition": m.condition,
            "state": m.state,
            "count": m.count,
            "failure_limit": m.failure_limit,
            "inconclusive_limit": m.inconclusive_limit,
            "samples": m.samples.iter().map(|s| json!({
                "at": rfc3339(s.at_ms),
                "outcome": s.outcome,
                "values": s.values,
                "note": s.note,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn release_json(x: &pb::ReleaseInfo) -> Value {
    let instances = x.instances.max(1);
    if x.image.is_empty() {
        json!({"id": x.id, "version": x.version, "digest": x.digest, "instances": instances})
    } else {
        json!({"id": x.id, "version": x.version, "digest": x.digest, "image": x.image, "instances": instances})
    }
}

fn error_json(e: &pb::RolloutError) -> Value {
    json!({"node": e.node, "step": e.step, "message": e.message})
}

/// The JSON contract of a rollout (`--output json`).
pub fn to_json(r: &pb::Rollout) -> Value {
    let time = |ms: i64| {
        if ms == 0 {
            Value::Null
        } else {
            Value::String(rfc3339(ms))
        }
    };
    json!({
        "id": r.id,
        "app": r.app,
        "env": r.env,
        "service": r.service,
        "kind": r.kind,
        "state": r.state().as_str(),
        "release": r.release.as_ref().map(release_json),
        "previous_release": r.previous_release.as_ref().map(release_json),
        "nodes": r.nodes.iter().map(|n| json!({
            "name": n.name,
            "id": n.id,
            "state": n.state().as_str(),
            "release": n.release,
            "from_release": n.from_release,
            "batch": if n.batch == 0 { Value::Null } else { Value::from(n.batch) },
            "step": n.step,
            "canary": n.canary,
            "weight": n.canary.then_some(n.weight),
            "refused": n.refused,
        })).collect::<Vec<_>>(),
        "canary": r.canary.as_ref().map(|c| json!({
            "steps": c.steps,
            "step": c.step,
            "weight": c.weight,
            "fleet_weight": c.fleet_weight,
            "canary_nodes": c.canary_nodes,
            "awaiting_promotion": c.awaiting_promotion,
            "pause_until": (c.pause_until_ms > 0).then(|| rfc3339(c.pause_until_ms)),
            "promoted": c.promoted,
        })),
        "analysis": r.analysis.iter().map(analysis_json).collect::<Vec<_>>(),
        "approval": r.approval.as_ref().map(|a| {
            let decision = |d: &pb::ApprovalDecision| json!({
                "by": d.by,
                "comment": d.comment,
                "at": rfc3339(d.at_ms),
            });
            json!({
                "required": a.required,
                "approvals": a.approvals.iter().map(decision).collect::<Vec<_>>(),
                "rejected": a.rejected.as_ref().map(decision),
                "expires_at": rfc3339(a.expires_at_ms),
            })
        }),
        "error": r.error.as_ref().map(error_json),
        "rollback_failures": r.rollback_failures.iter().map(error_json).collect::<Vec<_>>(),
        "phase": r.phase,
        "batch": r.batch,
        "batches": r.batches,
        "batch_size": r.batch_size,
        "skipped_nodes": r.skipped_nodes,
        "pause_requested": r.pause_requested,
        "abort_requested": r.abort_requested,
        "created_by": r.created_by,
        "deployment": (!r.deployment.is_empty()).then_some(&r.deployment),
        "created_at": time(r.created_at_ms),
        "updated_at": time(r.updated_at_ms),
        "finished_at": time(r.finished_at_ms),
        "timeline": r.timeline.iter().map(|t| json!({
            "at": rfc3339(t.at_ms),
            "kind": t.kind,
            "node": t.node,
            "message": t.message,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_analysis_shows_its_verdict_and_the_values_its_condition_read() {
        let run = pb::AnalysisRun {
            step: 2,
            name: "errors".into(),
            state: "failed".into(),
            summary: "metric success (proxy) failed".into(),
            metrics: vec![pb::AnalysisMetric {
                name: "success".into(),
                provider: "proxy".into(),
                condition: "canary_success_rate >= 0.99".into(),
                state: "failed".into(),
                count: 3,
                samples: vec![pb::AnalysisSample {
                    outcome: "failed".into(),
                    values: [
                        ("canary_success_rate".to_string(), 0.9),
                        ("canary_requests".to_string(), 120.0),
                        ("stable_p99".to_string(), 25.0),
                    ]
                    .into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            analysis_lines(&run),
            "analysis  errors (step 2) failed: metric success (proxy) failed\n  success (proxy, `canary_success_rate >= 0.99`) failed: 1 of 3 samples [failed]; last: canary_requests=120 canary_success_rate=0.9\n"
        );
    }
}
