//! A release's activate hooks (`pre_activate`, `post_activate`): commands
//! run to their exit in the release's dir with its environment and
//! secrets, as steps of its cutover. A hook that fails (or cannot run)
//! fails the cutover before the switch, so the release it was to replace
//! keeps serving, as after a failed smoke check.

use cutover_common::release::HookPoint;

use super::WebRelease;
use crate::runtime::job::{Ended, Job};
use crate::runtime::process::ProcessRuntime;
use crate::runtime::Runtime as _;

/// What a hook keeps of its output: the end, quoted in a failure.
const TAIL_BYTES: usize = 2 * 1024;

/// Why a hook failed: which one, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookFailure {
    pub at: HookPoint,
    pub command: String,
    pub detail: String,
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} hook ({}) {}",
            self.at.as_str(),
            self.command,
            self.detail
        )
    }
}

/// Whether `release` has hooks at `at`.
pub(super) fn has(release: &WebRelease, at: HookPoint) -> bool {
    release.hooks.iter().any(|h| h.at == at)
}

/// Runs `release`'s hooks at `at`, in order, each to exit 0; `port` is the
/// release's own once it runs (`PORT` in the hooks' environment).
pub(super) async fn run(
    release: &WebRelease,
    at: HookPoint,
    host: std::net::IpAddr,
    port: Option<u16>,
) -> Result<(), HookFailure> {
    for hook in release.hooks.iter().filter(|h| h.at == at) {
        let mut env = release.env.clone();
        env.push(("HOST".into(), host.to_string()));
        if let Some(port) = port {
            env.push(("PORT".into(), port.to_string()));
        }
        env.extend(release.secret_values.values().unwrap_or_default());
        env.extend(release.hook_env.iter().cloned());
        let job = Job {
            name: format!("{} {}", release.release_id, at.as_str()),
            command: hook.command.clone(),
            workdir: release.workdir.clone(),
            env,
            deadline: hook.timeout,
            tail_bytes: TAIL_BYTES,
            output: None,
        };
        let failure = |detail: String| HookFailure {
            at,
            command: hook.command.join(" "),
            detail,
        };
        let completion = ProcessRuntime
            .run_to_completion(&job)
            .await
            .map_err(|e| failure(format!("could not run: {e}")))?;
        let tail = || {
            let lines: Vec<&str> = completion
                .output
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect();
            match lines.len() {
                0 => String::new(),
                n => format!(
                    "; last output: {}",
                    lines[n.saturating_sub(5)..].join(" | ")
                ),
            }
        };
        match &completion.ended {
            Ended::Exited { code: Some(0), .. } => {
                tracing::info!(release = %release.release_id, hook = at.as_str(), took_ms = completion.took.as_millis() as u64, "hook passed");
            }
            Ended::Exited { detail, .. } => {
                return Err(failure(format!("ended with {detail}{}", tail())))
            }
            Ended::DeadlineExceeded => {
                return Err(failure(format!(
                    "was still running after {}; killed{}",
                    humantime::format_duration(hook.timeout),
                    tail()
                )))
            }
        }
    }
    Ok(())
}
