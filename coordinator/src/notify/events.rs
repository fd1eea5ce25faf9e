//! Which webhook events a change of a rollout makes, read from what the
//! engine already records (its timeline and its state), so there is one
//! source of truth for what happened; and the JSON body each one carries.

use serde_json::json;

use super::spec::EventKind;
use crate::rollout::model::{Rollout, RolloutState, TimelineEntry};

/// One thing that happened to a rollout, worth a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub node: String,
    pub message: String,
    pub at_ms: i64,
}

/// The events between `before` and `after` (the same rollout, `after`
/// newer), in the order they happened. A rollout ends with exactly one of
/// succeeded, failed, rolled_back or aborted: the engine's last entry when
/// it ends (the first failure is an entry of the same kind as the failed
/// ending; only the ending counts, or a migration's failure).
pub fn derive(before: &Rollout, after: &Rollout) -> Vec<Event> {
    let new = &after.timeline[before.timeline.len().min(after.timeline.len())..];
    let ended = after.state.is_terminal() && !before.state.is_terminal();
    let (steps, end) = match new.split_last() {
        Some((last, rest)) if ended => (rest, Some(last)),
        _ => (new, None),
    };
    let migration_failed = after
        .error
        .as_ref()
        .is_some_and(|e| e.step.starts_with("migrate"));
    // "resumed" also says a pause was withdrawn before it took effect:
    // only a rollout that was paused resumes.
    let mut paused = before.state == RolloutState::Paused;
    let mut events = Vec::new();
    for entry in steps {
        let kind = match entry.kind.as_str() {
            "started" => EventKind::Started,
            "paused" => {
                paused = true;
                EventKind::Paused
            }
            "resumed" if paused => {
                paused = false;
                EventKind::Resumed
            }
            "migration_started" => EventKind::MigrationStarted,
            "held" => EventKind::Held,
            "break_glass" => EventKind::BreakGlass,
            "awaiting_approval" => EventKind::AwaitingApproval,
            // The engine notes its first failure once, as `error`.
            "failed" if migration_failed => EventKind::MigrationFailed,
            _ => continue,
        };
        events.push(event(kind, entry));
    }
    if let Some(entry) = end {
        let kind = match after.state {
            RolloutState::Succeeded => EventKind::Succeeded,
            RolloutState::RolledBack => EventKind::RolledBack,
            RolloutState::Aborted => EventKind::Aborted,
            _ => EventKind::Failed,
        };
        events.push(event(kind, entry));
    }
    events
}

fn event(kind: EventKind, entry: &TimelineEntry) -> Event {
    Event {
        kind,
        node: entry.node.clone(),
        message: entry.message.clone(),
        at_ms: entry.at_ms,
    }
}

/// The JSON body of `event` of `rollout`, sent as delivery `delivery` (the
/// same id on every attempt: a receiver can drop a repeat).
pub fn body(rollout: &Rollout, event: &Event, delivery: &str) -> Vec<u8> {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(event.at_ms).unwrap_or(0));
    let value = json!({
        "event": event.kind.as_str(),
        "delivery": delivery,
        "at": humantime::format_rfc3339_millis(at).to_string(),
        "app": rollout.app,
        "env": rollout.env,
        "service": rollout.service,
        "rollout": rollout.id,
        "kind": rollout.kind.as_str(),
        "release": rollout.release.id(),
        "version": rollout.release.version(),
        "previous_release": rollout.previous.as_ref().map(|p| p.id()),
        "operator": rollout.created_by,
        "state": event.kind.state(),
        "node": (!event.node.is_empty()).then_some(&event.node),
        "message": event.message,
    });
    serde_json::to_vec(&value).expect("a JSON value serializes")
}

/// What a chat channel reads of a rollout's event: one line.
pub fn rollout_text(rollout: &Rollout, event: &Event) -> String {
    let node = match event.node.as_str() {
        "" => String::new(),
        node => format!(" on {node}"),
    };
    format!(
        "[{env}] {app}/{service}: rollout {id} of {release} {what}{node}: {message}",
        env = rollout.env,
        app = rollout.app,
        service = rollout.service,
        id = rollout.id,
        release = rollout.release.id(),
        what = event.kind.as_str().replace('_', " "),
        message = event.message,
    )
}

/// What happened to a service outside a rollout, for a webhook: a lever
/// set or lifted, or the coordinator's alert about its queues or workers
/// (raised or resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEvent {
    pub kind: EventKind,
    pub app: String,
    pub env: String,
    pub service: String,
    /// Empty: every node of the service.
    pub node: String,
    /// Who set the lever; `coordinator` for an alert.
    pub operator: String,
    pub message: String,
    /// A lever's: how the service's traffic is left by every lever still
    /// set (`maintenance`, `paused`, `throttled` or `serving`); an
    /// alert's: `alerting` or `resolved`.
    pub state: &'static str,
    pub at_ms: i64,
}

/// The JSON body of a service event: the fields of a rollout event that
/// apply (no rollout, release or version), and its `state`.
pub fn service_body(lever: &ServiceEvent, delivery: &str) -> Vec<u8> {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(lever.at_ms).unwrap_or(0));
    let value = json!({
        "event": lever.kind.as_str(),
        "delivery": delivery,
        "at": humantime::format_rfc3339_millis(at).to_string(),
        "app": lever.app,
        "env": lever.env,
        "service": lever.service,
        "operator": lever.operator,
        "state": lever.state,
        "node": (!lever.node.is_empty()).then_some(&lever.node),
        "message": lever.message,
    });
    serde_json::to_vec(&value).expect("a JSON value serializes")
}

pub fn service_text(lever: &ServiceEvent) -> String {
    format!(
        "[{}] {}/{}: {}",
        lever.env, lever.app, lever.service, lever.message
    )
}

/// A Slack (or Mattermost) incoming webhook's body. `&`, `<` and `>` are
/// escaped as Slack asks: an operator's message saying `<!channel>` must
/// not ping the channel.
pub fn slack_body(text: &str) -> Vec<u8> {
    let text = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    serde_json::to_vec(&json!({ "text": text })).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::{Migration, MigrationPhase, When};
    use crate::rollout::engine::{self, Input, Outcome, TaskEnd};
    use crate::rollout::model::NewRollout;
    use crate::rollout::sim;

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind.as_str()).collect()
    }

    /// Feeds `input` to the engine and returns the events of the change.
    fn step(r: &mut Rollout, now: i64, input: Input) -> Vec<Event> {
        let before = r.clone();
        engine::handle(r, now, input);
        derive(&before, r)
    }

    #[test]
    fn a_rollout_starts_pauses_resumes_and_ends_once() {
        let mut r = sim::rollout(2, sim::strategy());
        let started = step(&mut r, 1, Input::Start);
        assert_eq!(kinds(&started), ["started"]);
        assert!(started[0].message.contains("web-v2"), "{started:?}");
        // A pause withdrawn before it took effect is no resume.
        step(&mut r, 2, Input::Pause { by: "alice".into() });
        assert!(step(&mut r, 3, Input::Resume { by: "alice".into() }).is_empty());
        // A pause taking effect between steps, then a resume.
        step(&mut r, 4, Input::Pause { by: "alice".into() });
        let prepared: Vec<Event> = (0..2)
            .flat_map(|i| {
                let id = r.nodes[i].command_id.clone().expect("a prepare out");
                step(
                    &mut r,
                    5,
                    Input::Result {
                        command_id: id,
                        outcome: Outcome::Succeeded,
                    },
                )
            })
            .collect();
        assert_eq!(kinds(&prepared), ["paused"], "{:#?}", r.timeline);
        assert_eq!(r.state, RolloutState::Paused);
        let resumed = step(&mut r, 6, Input::Resume { by: "bob".into() });
        assert_eq!(kinds(&resumed), ["resumed"]);
        assert!(resumed[0].message.contains("bob"));
        let aborted = step(&mut r, 7, Input::Abort { by: "bob".into() });
        // Nodes mid-cutover finish first: the abort ends it once they did.
        let mut all = aborted;
        while !r.state.is_terminal() {
            let out: Vec<String> = r.commands_out().map(str::to_string).collect();
            for id in out {
                all.extend(step(
                    &mut r,
                    8,
                    Input::Result {
                        command_id: id,
                        outcome: Outcome::Succeeded,
                    },
                ));
            }
        }
        assert_eq!(kinds(&all), ["aborted"]);
        assert_eq!(all[0].kind.state(), "aborted");
        // Nothing more once it ended.
        assert!(step(&mut r, 9, Input::Tick { nodes: vec![] }).is_empty());
    }

    #[test]
    fn a_chat_line_says_where_what_and_why() {
        let mut r = sim::rollout(2, sim::strategy());
        let started = step(&mut r, 1, Input::Start);
        let text = rollout_text(&r, &started[0]);
        assert!(
            text.starts_with(&format!(
                "[{}] {}/{}: rollout {} of {} started",
                r.env,
                r.app,
                r.service,
                r.id,
                r.release.id()
            )),
            "{text}"
        );
        assert!(text.ends_with(&started[0].message), "{text}");
    }

    #[test]
    fn a_break_of_glass_it_was_created_with_is_an_event_before_it_starts() {
        let mut r = sim::rollout(2, sim::strategy());
        r.timeline.push(TimelineEntry {
            at_ms: 1,
            kind: "break_glass".into(),
            node: String::new(),
            message: "root broke glass: checkout is down (past: a freeze)".into(),
        });
        let unsaid = Rollout {
            timeline: Vec::new(),
            ..r.clone()
        };
        let created = derive(&unsaid, &r);
        assert_eq!(kinds(&created), ["break_glass"]);
        assert_eq!(created[0].kind.state(), "pending");
        assert!(created[0].message.contains("checkout is down"));
        // Said once: starting it says only that.
        assert_eq!(kinds(&step(&mut r, 2, Input::Start)), ["started"]);
    }

    #[test]
    fn a_failure_is_one_ending_and_a_migrations_failure_says_so_first() {
        let mut r = sim::rollout(1, sim::strategy());
        step(&mut r, 1, Input::Start);
        let id = r.nodes[0].command_id.clone().unwrap();
        let events = step(
            &mut r,
            2,
            Input::Result {
                command_id: id,
                outcome: Outcome::Failed("disk full".into()),
            },
        );
        // The first failure and the rollback's end in one change: one event.
        assert_eq!(kinds(&events), ["rolled_back"], "{:#?}", r.timeline);
        assert!(events[0].message.contains("disk full"), "{events:?}");

        let mut r = sim::rollout(1, sim::strategy());
        r.strategy.auto_rollback = false;
        step(&mut r, 1, Input::Start);
        let id = r.nodes[0].command_id.clone().unwrap();
        let events = step(
            &mut r,
            2,
            Input::Result {
                command_id: id,
                outcome: Outcome::Failed("disk full".into()),
            },
        );
        assert_eq!(kinds(&events), ["failed"]);
        assert_eq!(events[0].kind.state(), "failed");

        let mut r = migrating();
        step(&mut r, 1, Input::Start);
        let id = r.nodes[0].command_id.clone().unwrap();
        let events = step(
            &mut r,
            2,
            Input::Result {
                command_id: id,
                outcome: Outcome::Succeeded,
            },
        );
        assert_eq!(kinds(&events), ["migration_started"]);
        assert_eq!(events[0].node, "node-0");
        let id = r
            .migration
            .as_ref()
            .unwrap()
            .run
            .command_id
            .clone()
            .unwrap();
        let exited = Outcome::Task(TaskEnd {
            exit_code: 1,
            timed_out: false,
            detail: "exit status: 1".into(),
            duration_ms: 10,
        });
        let events = step(
            &mut r,
            3,
            Input::Result {
                command_id: id,
                outcome: exited,
            },
        );
        assert_eq!(kinds(&events), ["migration_failed", "rolled_back"]);
        assert!(events[0].message.contains("exit status: 1"), "{events:?}");
        assert_eq!(events[0].kind.state(), "running");

        // An outcome not known holds the rollout: that is an event of its
        // own, the one an operator must act on.
        let mut r = migrating();
        step(&mut r, 1, Input::Start);
        let id = r.nodes[0].command_id.clone().unwrap();
        let result = |command_id: String, outcome| Input::Result {
            command_id,
            outcome,
        };
        step(&mut r, 2, result(id, Outcome::Succeeded));
        let id = r
            .migration
            .as_ref()
            .unwrap()
            .run
            .command_id
            .clone()
            .unwrap();
        let unknown = Outcome::Unknown("the agent stopped while the task ran".into());
        let events = step(&mut r, 3, result(id, unknown));
        assert_eq!(kinds(&events), ["held"]);
        assert_eq!(events[0].kind.state(), "held");
        assert!(
            events[0].message.contains("cutover rollout retry"),
            "{events:?}"
        );
    }

    /// A one-node rollout whose migration runs before its cutover.
    fn migrating() -> Rollout {
        let r = sim::rollout(1, sim::strategy());
        Rollout::new(NewRollout {
            migration: Some(Migration {
                commands: vec![vec!["migrate".into()]],
                when: When::Before,
                phase: MigrationPhase::Expand,
                timeout_ms: 60_000,
                node: None,
                schema_command: None,
            }),
            hooks: Vec::new(),
            id: r.id,
            app: r.app,
            env: r.env,
            service: r.service,
            kind: r.kind,
            release: r.release,
            previous: r.previous,
            strategy: r.strategy,
            nodes: r.nodes,
            skipped: vec![],
            command_prefix: r.command_prefix,
            node_lost_after_ms: 0,
            created_by: r.created_by,
            created_at_ms: 0,
            deployment: String::new(),
            notify: r.notify,
        })
    }

    #[test]
    fn the_body_names_the_rollout_the_release_and_the_event() {
        let mut r = sim::rollout(1, sim::strategy());
        let events = step(&mut r, 1_700_000_000_123, Input::Start);
        let body: serde_json::Value = serde_json::from_slice(&body(&r, &events[0], "d-1")).unwrap();
        assert_eq!(body["event"], "started");
        assert_eq!(body["delivery"], "d-1");
        assert_eq!(body["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(body["app"], "shop");
        assert_eq!(body["env"], "test");
        assert_eq!(body["service"], "web");
        assert_eq!(body["rollout"], "web-1");
        assert_eq!(body["kind"], "deploy");
        assert_eq!(body["release"], "web-v2-11111111");
        assert_eq!(body["version"], "v2");
        assert_eq!(body["previous_release"], "web-v1-00000000");
        assert_eq!(body["operator"], "sim");
        assert_eq!(body["state"], "running");
        assert_eq!(body["node"], serde_json::Value::Null);
    }
}
