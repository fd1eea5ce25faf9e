//! Health and smoke checks against a release: HTTP, TCP connect and exec.
//!
//! A health check gates a release: it must pass `healthy_threshold` times in
//! a row before `healthy_deadline`. A failure report carries the check's last
//! output and the timings, because "unhealthy" alone tells an operator
//! nothing.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::runtime::process::GroupGuard;
use crate::runtime::release_command;

/// Output kept from a check, enough to diagnose, small enough to report.
const MAX_DETAIL: usize = 2048;
/// Response bytes an HTTP check reads (for `body_contains`).
const MAX_BODY: usize = 64 << 10;

// The checks a release names, checked on the way in (see
// `cutover_common::release`); what follows runs them.
pub use cutover_common::release::{Check, HealthGate, Probe};

/// Where a check runs: the release's address, and for exec checks its dir
/// and environment.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passed: bool,
    /// What the check saw: status and body start, exit status and output,
    /// or the connection error.
    pub detail: String,
    pub took: Duration,
}

/// Runs `check` once against `target`, within its timeout.
pub async fn run(check: &Check, target: &Target) -> Outcome {
    let started = Instant::now();
    let result = tokio::time::timeout(check.timeout, probe(check, target)).await;
    let (passed, detail) = match result {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(detail)) => (false, detail),
        Err(_) => (
            false,
            format!(
                "timed out after {}",
                humantime::format_duration(check.timeout)
            ),
        ),
    };
    Outcome {
        passed,
        detail: truncate(detail),
        took: started.elapsed(),
    }
}

async fn probe(check: &Check, target: &Target) -> Result<String, String> {
    match &check.probe {
        Probe::Tcp => TcpStream::connect(target.addr)
            .await
            .map(|_| format!("connected to {}", target.addr))
            .map_err(|e| format!("connect to {}: {e}", target.addr)),
        Probe::Http {
            path,
            expect_status,
            body_contains,
        } => http_probe(target.addr, path, expect_status, body_contains.as_deref()).await,
        Probe::Exec { command } => exec_probe(command, target).await,
    }
}

async fn http_probe(
    addr: SocketAddr,
    path: &str,
    expect_status: &RangeInclusive<u16>,
    body_contains: Option<&str>,
) -> Result<String, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("http handshake with {addr}: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(
            http::header::USER_AGENT,
            concat!("cutover-check/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("invalid check path {path:?}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {}", cutover_common::error_chain(&e)))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    let detail = format!("GET {path}: {status}: {}", body.trim());
    if !expect_status.contains(&status.as_u16()) {
        return Err(format!(
            "{detail} (expected status {}-{})",
            expect_status.start(),
            expect_status.end()
        ));
    }
    if let Some(needle) = body_contains {
        if !body.contains(needle) {
            return Err(format!("{detail} (body lacks {needle:?})"));
        }
    }
    Ok(detail)
}

async fn exec_probe(command: &[String], target: &Target) -> Result<String, String> {
    match exec(command, target).await? {
        (0, detail) => Ok(detail),
        (_, detail) => Err(detail),
    }
}

/// Runs `command` in the release's dir with its environment to its exit:
/// its exit code (-1 when a signal ended it) and what it said (the exit
/// status, then its output); an error when it cannot run.
pub async fn exec(command: &[String], target: &Target) -> Result<(i32, String), String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "exec check has an empty command".to_string())?;
    let child = release_command(program, args, &target.workdir, &target.env)
        .env("PORT", target.addr.port().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its process group goes with it on a timeout (see the guard below).
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    // Its whole group goes when the check ends or times out (the future
    // holding the guard is dropped).
    let _group = child.id().map(GroupGuard);
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let detail = truncate(format!("{}: {}", output.status, text.trim()));
    Ok((output.status.code().unwrap_or(-1), detail))
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" [truncated]");
    }
    text
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthy {
    pub attempts: u32,
    pub took: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check} did not pass {threshold} times in a row within {}: {attempts} attempts, last took {} ms: {}", humantime::format_duration(*.deadline), .last.took.as_millis(), .last.detail)]
pub struct Unhealthy {
    pub check: String,
    pub threshold: u32,
    pub deadline: Duration,
    pub attempts: u32,
    pub last: Outcome,
}

/// Runs `check` every `gate.interval` until it passes `healthy_threshold`
/// times in a row (healthy) or `deadline` has passed (unhealthy, with the
/// last outcome).
pub async fn wait(gate: &HealthGate, check: &Check, target: &Target) -> Result<Healthy, Unhealthy> {
    let started = Instant::now();
    let deadline = started + gate.deadline;
    let mut attempts = 0;
    let mut in_a_row = 0;
    loop {
        attempts += 1;
        let outcome = run(check, target).await;
        if outcome.passed {
            in_a_row += 1;
            if in_a_row >= gate.healthy_threshold.max(1) {
                return Ok(Healthy {
                    attempts,
                    took: started.elapsed(),
                });
            }
        } else {
            in_a_row = 0;
        }
        let next = Instant::now() + gate.interval;
        if next > deadline {
            return Err(Unhealthy {
                check: check.describe(),
                threshold: gate.healthy_threshold,
                deadline: gate.deadline,
                attempts,
                last: outcome,
            });
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::processes_mentioning;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP server whose n-th answer is `answers(n)`.
    async fn server(
        answers: impl Fn(u32) -> (u16, &'static str) + Send + Sync + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU32::new(0));
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (status, body) = answers(count.fetch_add(1, Ordering::SeqCst));
                let mut buf = [0u8; 1024];
                let _ = tcp.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    fn target(addr: SocketAddr) -> Target {
        Target {
            addr,
            workdir: std::env::temp_dir(),
            env: vec![("GREETING".into(), "hello".into())],
        }
    }

    fn http(path: &str, body_contains: Option<&str>) -> Check {
        Check {
            probe: Probe::Http {
                path: path.into(),
                expect_status: 200..=299,
                body_contains: body_contains.map(Into::into),
            },
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn http_checks_judge_status_and_body() {
        let addr = server(|n| {
            if n == 0 {
                (503, "warming up")
            } else {
                (200, "ok shop")
            }
        })
        .await;
        let first = run(&http("/health", None), &target(addr)).await;
        assert!(!first.passed);
        assert!(
            first.detail.contains("503") && first.detail.contains("warming up"),
            "{}",
            first.detail
        );
        assert!(
            run(&http("/health", Some("shop")), &target(addr))
                .await
                .passed
        );
        let missing = run(&http("/health", Some("cart")), &target(addr)).await;
        assert!(
            !missing.passed && missing.detail.contains("lacks \"cart\""),
            "{}",
            missing.detail
        );
    }

    #[tokio::test]
    async fn the_gate_needs_consecutive_passes() {
        // pass, fail, pass, pass: with a threshold of 2 the gate opens on the
        // 4th attempt, not the 3rd.
        let addr = server(|n| if n == 1 { (500, "blip") } else { (200, "ok") }).await;
        let gate = HealthGate {
            interval: Duration::from_millis(20),
            healthy_threshold: 2,
            deadline: Duration::from_secs(5),
        };
        let healthy = wait(&gate, &http("/", None), &target(addr)).await.unwrap();
        assert_eq!(healthy.attempts, 4);
    }

    #[tokio::test]
    async fn a_gate_that_never_opens_reports_the_last_output() {
        let addr = server(|_| (500, "database unreachable")).await;
        let gate = HealthGate {
            interval: Duration::from_millis(50),
            healthy_threshold: 1,
            deadline: Duration::from_millis(300),
        };
        let started = Instant::now();
        let error = wait(&gate, &http("/health", None), &target(addr))
            .await
            .unwrap_err();
        // The deadline is the point, so a bound, but a generous one: it only
        // rules out a gate that ignores its deadline and retries a check that
        // never passes for ever (300 ms of deadline vs 20 s).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gate ran {:?} past a 300 ms deadline",
            started.elapsed()
        );
        assert_eq!(error.deadline, Duration::from_millis(300), "{error:?}");
        // It retried rather than giving up on the first failure (at least
        // two attempts even if a slow machine stretches each one).
        assert!(error.attempts >= 2, "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("http GET /health") && text.contains("database unreachable"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn tcp_and_exec_checks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let tcp = Check {
            probe: Probe::Tcp,
            timeout: Duration::from_secs(1),
        };
        assert!(run(&tcp, &target(open)).await.passed);
        drop(listener);
        assert!(!run(&tcp, &target(open)).await.passed);

        // Generous for the checks that must finish (a slow machine may take a
        // while to start sh); the one that must time out gets 500 ms below.
        let exec_within = |script: &str, timeout: Duration| Check {
            probe: Probe::Exec {
                command: vec!["sh".into(), "-c".into(), script.into()],
            },
            timeout,
        };
        let exec = |script: &str| exec_within(script, Duration::from_secs(10));
        let ok = run(&exec("echo $GREETING on $PORT"), &target(open)).await;
        assert!(ok.passed, "{ok:?}");
        assert!(
            ok.detail.contains(&format!("hello on {}", open.port())),
            "{}",
            ok.detail
        );
        let failed = run(&exec("echo queue stalled >&2; exit 3"), &target(open)).await;
        assert!(
            !failed.passed
                && failed.detail.contains("queue stalled")
                && failed.detail.contains('3'),
            "{failed:?}"
        );
        // A grandchild in the background must die with the check.
        let marker = format!("cutover-check-orphan-{}", std::process::id());
        let slow = run(
            &exec_within(
                &format!("sh -c 'sleep 30; : {marker}' & wait"),
                Duration::from_millis(500),
            ),
            &target(open),
        )
        .await;
        assert!(
            !slow.passed && slow.detail.contains("timed out"),
            "{slow:?}"
        );
        // "timed out" is the proof the timeout cut it short; the bound only
        // rules out waiting for the 30 s sleep (500 ms timeout vs 20 s).
        assert!(slow.took < Duration::from_secs(20), "{slow:?}");
        // The kill is asynchronous: wait for the grandchild to be gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !processes_mentioning(&marker).is_empty() {
            assert!(
                Instant::now() < deadline,
                "orphaned grandchild: {:?}",
                processes_mentioning(&marker)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
