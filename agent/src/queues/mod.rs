//! The queue probe of a serving release (its `queues`): every interval, the
//! depth of each of Laravel's Redis queues (waiting, delayed and reserved
//! jobs, and how long the oldest waiting one waits) and the worker's own
//! status command. Reported with the node's state; the coordinator turns it
//! into metrics, alerts and `cutover queues`.

mod resp;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_common::queues::{QueueDepth, QueueProbeSpec, QueueReport};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::resp::{Connection, Reply};
use crate::checks::{exec, Target};
use crate::runtime::supervisor::{ProcessStatus, SecretSlot};

/// The probe's last pass; `None` before the first, or without a probe.
pub type LastQueues = Arc<Mutex<Option<QueueReport>>>;

/// How long one Redis round or one status command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts probing for as long as the guard lives. The password is read
/// from `secrets` at each pass: after an agent restart the values come
/// back from the coordinator later.
pub fn monitor_queues(
    service: &str,
    probe: Option<&QueueProbeSpec>,
    target: Target,
    secrets: SecretSlot,
    process: watch::Receiver<ProcessStatus>,
) -> (LastQueues, DropGuard) {
    let last: LastQueues = Arc::default();
    let stop = CancellationToken::new();
    let Some(probe) = probe.cloned() else {
        return (last, stop.drop_guard());
    };
    let (service, report, token) = (service.to_string(), last.clone(), stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(probe.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pass = tokio::select! {
                _ = token.cancelled() => return,
                pass = probe_once(&probe, &target, &secrets, &process) => pass,
            };
            match (failing, pass.error.is_empty()) {
                (false, false) => {
                    tracing::warn!(%service, error = %pass.error, "cannot read the queues")
                }
                (true, true) => tracing::info!(%service, "the queues can be read again"),
                _ => {}
            }
            failing = !pass.error.is_empty();
            *report.lock().expect("queues lock") = Some(pass);
        }
    });
    (last, stop.drop_guard())
}

async fn probe_once(
    probe: &QueueProbeSpec,
    target: &Target,
    secrets: &SecretSlot,
    process: &watch::Receiver<ProcessStatus>,
) -> QueueReport {
    let now_ms = cutover_common::now_ms();
    let password = match &probe.password_secret {
        None => Ok(None),
        Some(name) => secrets
            .values()
            .unwrap_or_default()
            .into_iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| Some(value))
            .ok_or_else(|| format!("the redis password (secret {name}) is not here yet; the coordinator sends it when the node connects")),
    };
    let read = async {
        match &password {
            Ok(password) => depths(probe, password.as_deref(), now_ms).await,
            Err(error) => Err(error.clone()),
        }
    };
    let (queues, error) = match tokio::time::timeout(REDIS_TIMEOUT, read).await {
        Ok(Ok(queues)) => (queues, String::new()),
        Ok(Err(error)) => (Vec::new(), error),
        Err(_) => (
            Vec::new(),
            format!("redis at {} did not answer within 5s", probe.redis),
        ),
    };
    let (worker_status, worker_detail) = worker_status(probe, target, secrets, process).await;
    QueueReport {
        probed_at_ms: now_ms,
        queues,
        error,
        worker_status,
        worker_detail,
    }
}

/// The depth of every named queue (within `REDIS_TIMEOUT`), with the
/// password from the release's secrets.
async fn read_depths(
    probe: &QueueProbeSpec,
    secrets: &SecretSlot,
    now_ms: i64,
) -> Result<Vec<QueueDepth>, String> {
    let password = match &probe.password_secret {
        None => None,
        Some(name) => Some(
            secrets
                .values()
                .unwrap_or_default()
                .into_iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value)
                .ok_or_else(|| format!("the redis password (secret {name}) is not here yet; the coordinator sends it when the node connects"))?,
        ),
    };
    tokio::time::timeout(REDIS_TIMEOUT, depths(probe, password.as_deref(), now_ms))
        .await
        .map_err(|_| format!("redis at {} did not answer within 5s", probe.redis))?
}

/// The consumption gate of a new release (`queues.gate`): over the gate's
/// window (read five times, at least a second apart) the jobs waiting in
/// its queues must not grow by more than a tenth (at least 5 jobs), unless
/// at some read none wait. The old release runs on meanwhile, so this
/// catches a release that takes no jobs while they come in faster than the
/// old one clears them, not one merely slower than the old. Queues it
/// cannot read fail it: a gate that cannot look does not let through.
pub async fn consuming(
    probe: &QueueProbeSpec,
    secrets: &SecretSlot,
    window: std::time::Duration,
) -> Result<(), String> {
    let read = || async {
        let depths = read_depths(probe, secrets, cutover_common::now_ms()).await?;
        Ok::<u64, String>(depths.iter().map(|d| d.waiting).sum())
    };
    let step = (window / 5).max(Duration::from_secs(1)).min(window);
    let first = read().await?;
    let mut last = first;
    let mut waited = Duration::ZERO;
    while last > 0 && waited < window {
        let pause = step.min(window - waited);
        tokio::time::sleep(pause).await;
        waited += pause;
        last = read().await?;
    }
    let tolerance = (first / 10).max(5);
    if last == 0 || last <= first + tolerance {
        return Ok(());
    }
    Err(format!(
        "the jobs waiting in queues {} went from {first} to {last} in {} while it ran: it does not seem to take jobs",
        probe.names.join(", "),
        humantime::format_duration(waited)
    ))
}

/// The depth of every named queue, read in one round trip.
async fn depths(
    probe: &QueueProbeSpec,
    password: Option<&str>,
    now_ms: i64,
) -> Result<Vec<QueueDepth>, String> {
    let mut redis = Connection::open(&probe.redis, password, probe.db, REDIS_TIMEOUT).await?;
    let keys: Vec<[String; 3]> = probe
        .names
        .iter()
        .map(|name| {
            let key = format!("{}queues:{name}", probe.prefix);
            [
                key.clone(),
                format!("{key}:delayed"),
                format!("{key}:reserved"),
            ]
        })
        .collect();
    let mut commands: Vec<Vec<&[u8]>> = Vec::new();
    for [waiting, delayed, reserved] in &keys {
        commands.push(vec![b"LLEN", waiting.as_bytes()]);
        commands.push(vec![b"ZCARD", delayed.as_bytes()]);
        commands.push(vec![b"ZCARD", reserved.as_bytes()]);
        // Laravel pushes on the right and pops on the left.
        commands.push(vec![b"LINDEX", waiting.as_bytes(), b"0"]);
    }
    let replies = redis.pipeline(&commands).await?;
    let count = |reply: &Reply| match reply {
        Reply::Integer(n) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    Ok(probe
        .names
        .iter()
        .zip(replies.chunks(4))
        .map(|(name, r)| QueueDepth {
            name: name.clone(),
            waiting: count(&r[0]),
            delayed: count(&r[1]),
            reserved: count(&r[2]),
            oldest_age_ms: match &r[3] {
                Reply::Bulk(Some(payload)) => {
                    pushed_at_ms(payload).map_or(-1, |pushed| now_ms.saturating_sub(pushed).max(0))
                }
                _ => -1,
            },
        })
        .collect())
}

/// A job payload's push time (Horizon's "pushedAt", seconds since the
/// epoch with a fraction, as a string or a number), in ms.
fn pushed_at_ms(payload: &[u8]) -> Option<i64> {
    let job: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let seconds = match &job["pushedAt"] {
        serde_json::Value::String(text) => text.parse::<f64>().ok()?,
        serde_json::Value::Number(n) => n.as_f64()?,
        _ => return None,
    };
    Some((seconds * 1000.0) as i64)
}

/// The status command's exit code and output, or without one, whether the
/// worker's process runs (0) or not (2).
async fn worker_status(
    probe: &QueueProbeSpec,
    target: &Target,
    secrets: &SecretSlot,
    process: &watch::Receiver<ProcessStatus>,
) -> (i32, String) {
    // Horizon's status command speaks for every Horizon on the same Redis:
    // this node's worker is up only if its own process runs too.
    if process.borrow().instance.is_none() {
        return (2, "the worker's process does not run".into());
    }
    if probe.status_command.is_empty() {
        return (0, "the worker's process runs".into());
    }
    // With the release's secrets as they are now: after an agent restart
    // they come back from the coordinator after the probe started.
    let mut target = target.clone();
    target.env.extend(secrets.values().unwrap_or_default());
    match tokio::time::timeout(STATUS_TIMEOUT, exec(&probe.status_command, &target)).await {
        Ok(Ok((code, output))) => (code, output),
        Ok(Err(error)) => (-1, error),
        Err(_) => (-1, "the status command did not end within 30s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_time_is_read_as_horizon_and_laravel_write_it() {
        assert_eq!(
            pushed_at_ms(br#"{"uuid":"x","pushedAt":"1700000000.25"}"#),
            Some(1_700_000_000_250)
        );
        assert_eq!(
            pushed_at_ms(br#"{"pushedAt":1700000001}"#),
            Some(1_700_000_001_000)
        );
        assert_eq!(pushed_at_ms(br#"{"uuid":"x"}"#), None);
        assert_eq!(pushed_at_ms(b"not json"), None);
    }
}
