//! Health of a release beyond its gate: staying up for a while after it
//! starts, and being checked for as long as it serves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::release::WebRelease;
use crate::checks::{self, Outcome, Target};
use crate::runtime::supervisor::{ProcessStatus, Supervisor};

/// The last health check of a serving release.
pub(super) type LastHealth = Arc<Mutex<Option<Outcome>>>;

/// Waits `time` while the release's process stays up without a crash;
/// the error says how it went down.
pub(super) async fn stays_up(supervisor: &Supervisor, time: Duration) -> Result<(), String> {
    if time.is_zero() {
        return Ok(());
    }
    let mut status = supervisor.watch();
    let end = tokio::time::sleep(time);
    tokio::pin!(end);
    loop {
        {
            let now = status.borrow_and_update();
            if now.crashes > 0 || now.instance.is_none() {
                return Err(now.last_exit.clone().unwrap_or_else(|| "it exited".into()));
            }
        }
        tokio::select! {
            _ = &mut end => return Ok(()),
            changed = status.changed() => if changed.is_err() {
                return Err("its supervision ended".into());
            }
        }
    }
}

/// Keeps checking a process of a serving release with its health check,
/// every gate interval (at least a second): a release that turns unhealthy
/// after its cutover shows in heartbeats and `cutover nodes`. `up` says
/// whether the proxy may send the process requests: lowered as soon as it
/// is down (`status`) or fails a check, raised by the next pass.
pub(super) fn monitor_health(
    service: &str,
    release: &WebRelease,
    target: Target,
    up: Arc<AtomicBool>,
    mut status: watch::Receiver<ProcessStatus>,
) -> (LastHealth, DropGuard) {
    let health: LastHealth = Arc::default();
    let stop = CancellationToken::new();
    // Without a check, a process is up while it runs.
    let check = release.health.clone();
    let every = release.gate.interval.max(Duration::from_secs(1));
    let (service, release_id, last) = (
        service.to_string(),
        release.release_id.clone(),
        health.clone(),
    );
    let token = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let running = status.borrow_and_update().instance.is_some();
                    // A check raises it again (a restarted process must
                    // pass one first); without one, running is enough.
                    if !running || check.is_none() {
                        up.store(running, Ordering::Relaxed);
                    }
                    continue;
                }
                _ = tick.tick(), if check.is_some() => {}
            }
            let Some(check) = &check else { continue };
            let outcome = checks::run(check, &target).await;
            let running = status.borrow().instance.is_some();
            up.store(outcome.passed && running, Ordering::Relaxed);
            let was = last
                .lock()
                .expect("health lock")
                .as_ref()
                .map(|o: &Outcome| o.passed);
            match (was, outcome.passed) {
                (Some(true) | None, false) => {
                    tracing::warn!(%service, release = %release_id, detail = %outcome.detail, "serving release is unhealthy")
                }
                (Some(false), true) => {
                    tracing::info!(%service, release = %release_id, "serving release is healthy again")
                }
                _ => {}
            }
            *last.lock().expect("health lock") = Some(outcome);
        }
    });
    (health, stop.drop_guard())
}
