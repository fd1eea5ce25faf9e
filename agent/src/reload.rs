//! The agent's side of a reload (SIGHUP, `cutover-agent upgrade`): serving
//! until a successor is ready and nothing runs, then handing the node's
//! state and listening sockets over to it, or falling back to this
//! agent's own binary when it fails past the point of return.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_common::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::handoff::{self, HandoffError, Launch, Outcome, Reason, Request, Successor, OWN_BINARY};
use crate::proxy;
use crate::{binaries, notify};
use crate::{Agent, HANDOFF_LINGER, SETTLE_TIMEOUT};

impl Agent {
    /// Sessions, one after the other, until `shutdown` (`None`) or a
    /// successor is ready to take over (asked for on `handoffs`) and no
    /// command runs. The session goes on while the successor starts and
    /// while commands finish (heartbeats keep the node's jobs and rollouts
    /// going): one that cannot run, or a node that stays busy, changes
    /// nothing.
    pub(crate) async fn serve_until_reload(
        &mut self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        mut handoffs: Option<&mut mpsc::Receiver<Request>>,
    ) -> Option<(Successor, Reason)> {
        let executor = self.executor.clone();
        let upgrades = self.upgrades.clone();
        let state_dir = self.config.state_dir.clone();
        type Starting = (
            tokio::task::JoinHandle<Result<Successor, HandoffError>>,
            Request,
        );
        let mut starting: Option<Starting> = None;
        let mut waiting: Option<(Successor, Request, Instant)> = None;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            let round = self.session_round(shutdown, backoff);
            tokio::pin!(round);
            loop {
                let idle = starting.is_none() && waiting.is_none();
                let asked = async {
                    match handoffs.as_deref_mut() {
                        Some(requests) => requests.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let started = async {
                    match starting.as_mut() {
                        Some((task, _)) => task.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = &mut round => break,
                    Some(request) = asked, if idle => {
                        let allowed = upgrades.allows(request.reason).and_then(|()| match &request.launch.probation {
                            Some(probation) => binaries::begin_probation(&state_dir, probation).map_err(|e| e.to_string()),
                            None => Ok(()),
                        });
                        if let Err(why) = allowed {
                            tracing::warn!(reason = %why, "handoff refused");
                            handoff::report(&state_dir, &Outcome::Refused(why.clone()));
                            request.answer(Err(why));
                            continue;
                        }
                        notify::reloading();
                        let (services, state_dir, launch) = (executor.services().clone(), state_dir.clone(), request.launch.clone());
                        let task = tokio::spawn(async move {
                            let listeners = services.listener_fds().await.map_err(HandoffError::Listeners)?;
                            Successor::start(&launch, &state_dir, listeners).await
                        });
                        starting = Some((task, request));
                    }
                    started = started => {
                        let Some((_, request)) = starting.take() else { continue };
                        let started = started.unwrap_or_else(|error| Err(HandoffError::Refused(format!("the handoff task failed: {error}"))));
                        match started {
                            Ok(successor) => {
                                tracing::info!(pid = successor.pid(), version = %successor.version, "the new agent can run; handing over once no command runs");
                                waiting = Some((successor, request, Instant::now() + SETTLE_TIMEOUT));
                            }
                            Err(error) => {
                                let reason = request.reason;
                                request.answer(Err(error.to_string()));
                                refused(&state_dir, &error, reason, handoffs.as_deref_mut());
                            }
                        }
                    }
                    _ = poll.tick(), if waiting.is_some() => {
                        let busy = executor.in_flight();
                        let Some((successor, request, deadline)) = waiting.take() else { continue };
                        let reason = request.reason;
                        if busy.is_empty() {
                            // Said while the session is still open (its end
                            // may cut the answer short).
                            request.answer(Ok(successor.version.clone()));
                            return Some((successor, reason));
                        }
                        if Instant::now() < deadline {
                            waiting = Some((successor, request, deadline));
                            continue;
                        }
                        let error = successor.abort(HandoffError::Refused(format!(
                            "commands {} still ran after {}",
                            busy.join(", "),
                            humantime::format_duration(SETTLE_TIMEOUT)
                        ))).await;
                        request.answer(Err(error.to_string()));
                        refused(&state_dir, &error, reason, handoffs.as_deref_mut());
                    }
                }
            }
        }
    }

    /// Waits (within `SETTLE_TIMEOUT`) for the commands in flight to end;
    /// the ones still running.
    pub(crate) async fn settle(&self) -> Vec<String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let busy = self.executor.in_flight();
            if busy.is_empty() || Instant::now() >= deadline {
                return busy;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What differs between the proxies now and the listening sockets the
    /// successor was given (a deploy added a service meanwhile): it would
    /// find the new port taken.
    pub(crate) async fn listeners_changed(&self, successor: &Successor) -> Option<String> {
        let now = self.executor.services().listen_addresses().await;
        (now != successor.listeners).then(|| {
            let added: Vec<String> = now
                .iter()
                .filter(|a| !successor.listeners.contains(a))
                .map(|a| a.to_string())
                .collect();
            format!("a service now listens on {}", added.join(", "))
        })
    }

    /// Lets go of the node's state for `successor`, keeping the proxies
    /// accepting until it serves, then drains them. A successor that fails
    /// now is replaced by this agent's own binary: there is no way back.
    /// The watchdog (`pings`) goes on until another process is systemd's
    /// main one.
    pub(crate) async fn hand_over(
        self,
        mut successor: Successor,
        pings: CancellationToken,
    ) -> Result<(), HandoffError> {
        let state_dir = self.config.state_dir.clone();
        let services = self.executor.services().clone();
        let proxies = services.shut_down(false).await;
        // The store closes with the last handle to the services: the
        // successor opens it next.
        drop(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&services) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(services);
        let outcome = match successor.released().await {
            Ok(()) => Outcome::TookOver {
                pid: successor.pid(),
                version: successor.version.clone(),
            },
            Err(error) => {
                let error = successor.abort(error).await;
                tracing::error!(%error, "the new agent failed after this one let go of the node; handing over to this agent's own binary");
                match fall_back(&state_dir, &proxies).await {
                    Ok((pid, version)) => Outcome::FellBack {
                        pid,
                        version,
                        why: error.to_string(),
                    },
                    Err(fallback) => Outcome::Failed(format!("{error}; then {fallback}")),
                }
            }
        };
        handoff::report(&state_dir, &outcome);
        if !matches!(outcome, Outcome::Failed(_)) {
            pings.cancel();
        }
        let mut draining = tokio::task::JoinSet::new();
        for proxy in proxies {
            draining.spawn(proxy.hand_off(HANDOFF_LINGER));
        }
        draining.join_all().await;
        match outcome {
            Outcome::Failed(why) => Err(HandoffError::Refused(why)),
            _ => Ok(()),
        }
    }
}

/// A handoff that changed nothing: said, an upgrade's probation
/// forgotten, and the requests that came in meanwhile turned away (a
/// SIGHUP during a handoff is that handoff).
pub(crate) fn refused(
    state_dir: &std::path::Path,
    error: &HandoffError,
    reason: Reason,
    handoffs: Option<&mut mpsc::Receiver<Request>>,
) {
    handoff::report(state_dir, &Outcome::Refused(error.to_string()));
    if reason == Reason::Upgrade {
        binaries::end_probation(state_dir);
    }
    if let Some(requests) = handoffs {
        while let Ok(request) = requests.try_recv() {
            request.answer(Err(format!(
                "another handoff was refused just before: {error}"
            )));
        }
    }
}

/// The handoff to this agent's own binary, on the proxies' sockets, after
/// a successor failed past the point of return: its pid and version.
async fn fall_back(
    state_dir: &std::path::Path,
    proxies: &[proxy::Proxy],
) -> Result<(u32, String), HandoffError> {
    let mut listeners = Vec::new();
    for proxy in proxies {
        listeners.extend(proxy.listener_fds().map_err(HandoffError::Listeners)?);
    }
    let launch = Launch::this_command_line(OWN_BINARY.as_ref());
    let mut own = Successor::start(&launch, state_dir, listeners).await?;
    match own.released().await {
        Ok(()) => Ok((own.pid(), own.version.clone())),
        Err(error) => Err(own.abort(error).await),
    }
}
