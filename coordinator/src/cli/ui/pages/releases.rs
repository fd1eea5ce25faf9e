//! Releases: a service's kept releases in an environment, newest first,
//! with their migrations, who deployed them and from where, and a rollback
//! to any of them for an operator who may deploy there.

use cutover_proto::v1 as pb;
use maud::{html, Markup};

use super::{decode, encode, rel, release_label, state_badge, when, PageError};
use crate::cli::ui::feed::Snapshot;
use crate::cli::ui::Ui;

/// `/releases?env=ENV&service=SERVICE`; both empty: the list of services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleasesQuery {
    pub env: String,
    pub service: String,
}

impl ReleasesQuery {
    pub fn parse(query: &str) -> Self {
        let mut q = Self::default();
        for (key, value) in query.split('&').filter_map(|p| p.split_once('=')) {
            match key {
                "env" => q.env = decode(value),
                "service" => q.service = decode(value),
                _ => {}
            }
        }
        q
    }

    pub fn address(&self) -> String {
        match self.env.is_empty() && self.service.is_empty() {
            true => "/releases".into(),
            false => format!(
                "/releases?env={}&service={}",
                encode(&self.env),
                encode(&self.service)
            ),
        }
    }

    pub fn title(&self) -> String {
        match self.env.is_empty() && self.service.is_empty() {
            true => "Releases".into(),
            false => format!("Releases of {} in {}", self.service, self.env),
        }
    }
}

pub async fn render(ui: &Ui, snapshot: &Snapshot, q: &ReleasesQuery) -> Result<Markup, PageError> {
    if q.env.is_empty() || q.service.is_empty() {
        return Ok(index(snapshot));
    }
    let releases = ui
        .client()
        .list_releases(pb::ListReleasesRequest {
            env: q.env.clone(),
            service: q.service.clone(),
        })
        .await
        .map_err(PageError::from_status)?
        .into_inner()
        .releases;
    if releases.is_empty() {
        return Err(PageError::not_found(format!(
            "{} has no release in environment {}. The Releases page lists the services that have one.",
            q.service, q.env
        )));
    }
    let may = ui.may_deploy(&q.env);
    Ok(html! {
        h1 { "Releases of " (q.service) " in " (q.env) }
        table.releases {
            thead { tr { th { "Release" } th { "State" } th { "Deployed" } th { "Rollout" } th { "Migration" } th { "Note" } @if may { th {} } } }
            tbody {
                @for r in &releases {
                    @let info = r.release.clone().unwrap_or_default();
                    tr id=(format!("release-{}", info.id)) data-release=(info.id) class=[r.current.then_some("current")] {
                        td { (release_label(snapshot, &info.id)) br; span.muted { (info.id) } }
                        td { (state_badge(r.state().as_str())) @if r.current { " " span.badge.ok { "current" } } }
                        td {
                            (r.deployed_by) br; span.muted { (when(r.deployed_at_ms)) }
                            @if !r.promoted_from.is_empty() { br; span.muted { "promoted from " (r.promoted_from) } }
                        }
                        td { @if !r.rollout_id.is_empty() { a href=(rel(&format!("/rollouts/{}", encode(&r.rollout_id)))) { (r.rollout_id) } } }
                        td {
                            @if !r.migration_phase.is_empty() {
                                (r.migration_phase) " at " (when(r.migrated_at_ms)) " (" (r.migration_duration_ms) " ms)"
                                @if !r.migration_output.is_empty() { details { summary { "output" } pre { (r.migration_output) } } }
                            }
                        }
                        td { (r.note) }
                        @if may {
                            td {
                                @if !r.current {
                                    form method="post" id=(format!("rollback-{}", info.id)) action=(rel("/releases/rollback"))
                                        data-confirm=(format!("Roll {} in {} back to {} ({})? Its nodes switch to it, health-checked, as `cutover rollback --to` does.", q.service, q.env, info.version, info.id)) {
                                        input type="hidden" name="env" value=(q.env);
                                        input type="hidden" name="service" value=(q.service);
                                        input type="hidden" name="to" value=(info.id);
                                        button type="submit" data-action="rollback" { "Roll back to this" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

fn index(snapshot: &Snapshot) -> Markup {
    html! {
        h1 { "Releases" }
        @if snapshot.fleet.is_empty() {
            p.empty { "No service has a release yet: `cutover deploy` makes the first." }
        }
        ul.services {
            @for s in &snapshot.fleet {
                li {
                    a href=(rel(&ReleasesQuery { env: s.env.clone(), service: s.service.clone() }.address())) {
                        (s.service) " in " (s.env)
                    }
                    " " @if let Some(r) = &s.release { (release_label(snapshot, &r.id)) }
                }
            }
        }
    }
}
