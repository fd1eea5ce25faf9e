//! Run-once steps: commands run one after the other, each once, on one
//! node that has the release (the migration's checks and migration, the
//! hooks at one point). They are tasks (`RunTask`) under ids the rollout
//! stores before they go out, so a coordinator restarted mid-run resends
//! the same id and the agent runs it once; an agent restarted mid-run
//! answers that how it ended is not known, and the rollout is held for
//! the operator (`retry`: the command again under a new id; `abort`)
//! rather than run it again on its own.
//!
//! What a step does with a failure is its own (`migrate.rs`, `hooks.rs`);
//! this module is what they share: the node, the command out, its output
//! and its deadline.

use cutover_proto::v1 as pb;

use super::commands::hook_env;
use super::{note, Outcome, Send, TaskEnd};
use crate::hooks::HookAt;
use crate::rollout::model::{NodeState, Phase, Rollout, RolloutState, TaskRun};

/// Past its timeout, how long a command may take to answer (preparing the
/// release first, the agent stopping it) before its outcome counts as
/// unknown.
const ANSWER_MARGIN_MS: i64 = 300_000;

/// How long `timeouts` (a step's commands, one after the other) may take
/// in all before the last is overdue: what the step adds to the rollout's
/// progress deadline, so that the deadline never cuts a command short of
/// its own bound.
pub(super) fn budget(timeouts: impl Iterator<Item = u64>) -> i64 {
    timeouts.map(|t| t as i64 + ANSWER_MARGIN_MS).sum()
}
/// What a step keeps of the output, and how many lines go to the
/// timeline.
pub(super) const OUTPUT_TAIL: usize = 8 * 1024;
const TIMELINE_LINES: u32 = 200;
/// Lines of output a failure quotes.
const CAUSE_LINES: usize = 10;

/// A run-once step of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Task {
    Migration,
    Hooks(HookAt),
}

/// One of a step's commands.
pub(super) struct TaskCommand<'a> {
    pub argv: &'a [String],
    pub timeout_ms: u64,
}

impl Task {
    pub(super) fn run(self, r: &Rollout) -> &TaskRun {
        match self {
            Task::Migration => &r.migration.as_ref().expect("a migration").run,
            Task::Hooks(at) => &r.hook_run(at).expect("hooks at this point").run,
        }
    }

    pub(super) fn run_mut(self, r: &mut Rollout) -> &mut TaskRun {
        match self {
            Task::Migration => &mut r.migration.as_mut().expect("a migration").run,
            Task::Hooks(at) => {
                &mut r
                    .hooks
                    .iter_mut()
                    .find(|h| h.at == at)
                    .expect("hooks at this point")
                    .run
            }
        }
    }

    /// The step's `i`th command; `None` past the last.
    pub(super) fn command(self, r: &Rollout, i: usize) -> Option<TaskCommand<'_>> {
        match self {
            Task::Migration => {
                let plan = &r.migration.as_ref()?.plan;
                let argv = plan.commands.get(i).or(plan
                    .schema_command
                    .as_ref()
                    .filter(|_| i == plan.commands.len()))?;
                Some(TaskCommand {
                    argv,
                    timeout_ms: plan.timeout_ms,
                })
            }
            Task::Hooks(at) => r.hook_run(at)?.hooks.get(i).map(|h| TaskCommand {
                argv: &h.command,
                timeout_ms: h.timeout_ms,
            }),
        }
    }

    /// The timeline's name for the step's entries: `<prefix>_started`,
    /// `<prefix>_output`, ...
    pub(super) fn prefix(self) -> String {
        match self {
            Task::Migration => "migration".into(),
            Task::Hooks(at) => at.as_str().into(),
        }
    }

    /// Every step whose command may be out.
    fn all(r: &Rollout) -> impl Iterator<Item = Task> + '_ {
        r.migration
            .as_ref()
            .map(|_| Task::Migration)
            .into_iter()
            .chain(r.hooks.iter().map(|h| Task::Hooks(h.at)))
    }
}

/// The step whose command out is `command_id`.
pub(super) fn owner(r: &Rollout, command_id: &str) -> Option<Task> {
    Task::all(r).find(|t| t.run(r).command_id.as_deref() == Some(command_id))
}

/// How many run-once commands are out (at most one at a time).
pub(super) fn in_flight(r: &Rollout) -> usize {
    r.task_runs().filter(|t| t.command_id.is_some()).count()
}

/// After a restart: the commands out, as they were.
pub(super) fn resend(r: &Rollout) -> Vec<Send> {
    Task::all(r)
        .filter(|t| t.run(r).command_id.is_some())
        .map(|t| send(r, t))
        .collect()
}

/// Enters the step on `node` (index in `r.nodes`).
pub(super) fn start(r: &mut Rollout, task: Task, node: usize, now: i64, what: String) {
    let (id, name) = (r.nodes[node].id.clone(), r.nodes[node].name.clone());
    let run = task.run_mut(r);
    run.node_id = id;
    run.node_name = name.clone();
    note(r, now, &format!("{}_started", task.prefix()), &name, what);
}

/// The first node in `r.nodes` whose state `has_release` accepts and that
/// `chosen` (an operator's pick) names, if any.
pub(super) fn pick_node(
    r: &Rollout,
    has_release: impl Fn(NodeState) -> bool,
    chosen: Option<&str>,
) -> Option<usize> {
    r.nodes
        .iter()
        .position(|n| has_release(n.state) && chosen.is_none_or(|c| c == n.name))
}

/// What `run` found.
pub(super) enum Next {
    /// A command is out, or the rollout may not send one now.
    Waiting,
    /// Every command exited 0 (or, for steps that go on after a failure,
    /// ended).
    Done,
}

/// Sends the step's next command unless one is out.
pub(super) fn run(r: &mut Rollout, task: Task, now: i64, sends: &mut Vec<Send>) -> Next {
    let run = task.run(r);
    // A failed rollout's on_failure hooks run whatever its state (rolling
    // back, or failed while paused): it is ending.
    let may_send = matches!(r.state, RolloutState::Running | RolloutState::RollingBack)
        || r.phase == Phase::Hooks(HookAt::OnFailure);
    if run.command_id.is_some() || run.unknown || !may_send {
        return Next::Waiting;
    }
    let Some(timeout_ms) = task.command(r, run.next).map(|c| c.timeout_ms) else {
        return Next::Done;
    };
    let id = format!("{}.{}", r.command_prefix, r.next_command);
    r.next_command += 1;
    r.updated_at_ms = now;
    let run = task.run_mut(r);
    run.command_id = Some(id);
    run.deadline_ms = now + timeout_ms as i64 + ANSWER_MARGIN_MS;
    sends.push(send(r, task));
    Next::Waiting
}

/// The command out, as it is (re)sent.
pub(super) fn send(r: &Rollout, task: Task) -> Send {
    let run = task.run(r);
    let command = task.command(r, run.next).expect("a command out");
    let env = hook_env(r, &r.release, r.previous.as_ref());
    Send {
        node_id: run.node_id.clone(),
        node_name: run.node_name.clone(),
        command: pb::Command {
            command_id: run.command_id.clone().expect("a command out"),
            kind: Some(pb::command::Kind::RunTask(pb::RunTask {
                command: command.argv.to_vec(),
                timeout_ms: command.timeout_ms,
                release: Some(r.release.0.clone()),
                // Filled by the driver on the way out, never stored.
                secret_values: Default::default(),
                env,
            })),
        },
    }
}

pub(super) fn on_output(r: &mut Rollout, task: Task, now: i64, text: &str) {
    let run = task.run_mut(r);
    run.output.push_str(text);
    keep_tail(&mut run.output);
    let node = run.node_name.clone();
    let kind = format!("{}_output", task.prefix());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let run = task.run_mut(r);
        run.lines_noted += 1;
        match run.lines_noted {
            n if n < TIMELINE_LINES => note(r, now, &kind, &node, line.to_string()),
            TIMELINE_LINES => note(
                r,
                now,
                &kind,
                &node,
                format!("(more output left out of the timeline; the last {} KiB are kept with the rollout)", OUTPUT_TAIL / 1024),
            ),
            _ => {}
        }
    }
}

/// Cuts `output` to its last `OUTPUT_TAIL` bytes, on a char boundary.
pub(super) fn keep_tail(output: &mut String) {
    if output.len() > OUTPUT_TAIL {
        let cut = output.len() - OUTPUT_TAIL;
        let cut = (cut..output.len())
            .find(|i| output.is_char_boundary(*i))
            .unwrap_or(output.len());
        output.drain(..cut);
    }
}

/// How a command ended, as its step sees it.
pub(super) enum Ended {
    /// Exited 0: the next command is up.
    Passed,
    /// It ran and failed, or could not run: the message says how, with
    /// its last output lines.
    Failed(String),
    /// How it ended is not known; the rollout is held.
    Unknown(String),
}

/// Takes in the answer to the command out; `what` names the command in
/// messages ("the migration", "hook 2 (php artisan ...)").
pub(super) fn on_result(r: &mut Rollout, task: Task, outcome: Outcome, what: &str) -> Ended {
    let run = task.run_mut(r);
    run.command_id = None;
    match outcome {
        Outcome::Task(TaskEnd {
            exit_code: 0,
            timed_out: false,
            ..
        }) => {
            run.next += 1;
            Ended::Passed
        }
        Outcome::Task(end) => {
            let tail = last_lines(&run.output);
            Ended::Failed(format!("{what} ended with {}{tail}", end.detail))
        }
        Outcome::Failed(why) => Ended::Failed(format!("{what} could not run: {why}")),
        Outcome::Succeeded => Ended::Failed(format!(
            "{what}: the node answered without a task result; is the agent older than the coordinator?"
        )),
        Outcome::Unknown(why) => {
            run.unknown = true;
            let node = run.node_name.clone();
            Ended::Unknown(format!(
                "whether {what} finished on {node} is not known ({why})"
            ))
        }
    }
}

/// The step's command out has had no answer past its deadline.
pub(super) fn overdue(r: &Rollout, now: i64) -> Option<(Task, String)> {
    Task::all(r).find_map(|t| {
        let run = t.run(r);
        (run.command_id.is_some() && now >= run.deadline_ms).then(|| {
            (
                t,
                format!("no answer from {} past its timeout", run.node_name),
            )
        })
    })
}

/// Holds the rollout: the command's outcome is not known, and only the
/// operator may decide whether it runs again.
pub(super) fn hold(r: &mut Rollout, now: i64, message: String) {
    if r.error.is_some() {
        // Failing already: the rollback goes on; retrying cannot help.
        note(r, now, "unknown_outcome", "", message);
        return;
    }
    r.state = RolloutState::Held;
    r.held_at_ms = Some(now);
    note(
        r,
        now,
        "held",
        "",
        format!("{message}; check its effect, then `cutover rollout retry {}` runs it again or `cutover rollout abort {}` ends the rollout", r.id, r.id),
    );
}

/// The operator's retry of a held rollout: the command whose outcome was
/// not known goes out again, under a new id.
pub(super) fn retry(r: &mut Rollout, now: i64, by: &str) -> bool {
    let Some(task) = Task::all(r).find(|t| t.run(r).unknown) else {
        return false;
    };
    let run = task.run_mut(r);
    run.unknown = false;
    let node = run.node_name.clone();
    r.state = RolloutState::Running;
    if let Some(at) = r.held_at_ms.take() {
        // Time spent held does not count against the deadline.
        r.deadline_ms += now - at;
    }
    note(
        r,
        now,
        "retried",
        &node,
        format!("{by} retried the {} step", task.prefix().replace('_', " ")),
    );
    true
}

/// The end of the output, to quote in a failure.
pub(super) fn last_lines(output: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "; last output: {}",
        lines[lines.len().saturating_sub(CAUSE_LINES)..].join(" | ")
    )
}
