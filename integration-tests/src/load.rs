//! A small closed-loop HTTP/1.1 load generator: `connections` keep-alive
//! clients spread over the targets, each sending `GET path` back to back and
//! counting every failure a user would see (connection refused or reset, a
//! cut response, a status other than 2xx). Used by the zero-downtime tests,
//! the demo and the benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub failed: u64,
    /// Responses by body (the sample app answers with its version).
    pub by_body: BTreeMap<String, u64>,
    /// The first few failures, for the test's message.
    pub failures: Vec<String>,
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64 / 1000.0
    }

    fn merge(&mut self, other: LoadReport) {
        self.sent += other.sent;
        self.failed += other.failed;
        for (body, n) in other.by_body {
            *self.by_body.entry(body).or_default() += n;
        }
        for f in other.failures {
            if self.failures.len() < 10 {
                self.failures.push(f);
            }
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

pub struct Load {
    stop: CancellationToken,
    started: Instant,
    workers: Vec<tokio::task::JoinHandle<LoadReport>>,
    live: Arc<Mutex<(u64, u64)>>,
}

impl Load {
    pub fn start(targets: Vec<SocketAddr>, path: &str, connections: usize) -> Self {
        Self::start_as_clients(targets, path, connections, 0)
    }

    /// The same, each request from one of `clients` client addresses in
    /// turn (X-Forwarded-For, as a load balancer in front sets it; the
    /// node proxies trust it from loopback), so a canary's split sees many
    /// clients; 0: every request from the connection's own address.
    pub fn start_as_clients(
        targets: Vec<SocketAddr>,
        path: &str,
        connections: usize,
        clients: usize,
    ) -> Self {
        assert!(!targets.is_empty(), "load needs a target");
        let stop = CancellationToken::new();
        let live = Arc::new(Mutex::new((0, 0)));
        let workers = (0..connections)
            .map(|i| {
                let target = targets[i % targets.len()];
                let stop = stop.clone();
                let live = live.clone();
                let path = path.to_string();
                let clients = Clients {
                    count: clients,
                    first: i,
                    step: connections,
                };
                tokio::spawn(async move { client(target, path, clients, stop, live).await })
            })
            .collect();
        Self {
            stop,
            started: Instant::now(),
            workers,
            live,
        }
    }

    /// Requests sent and failed so far.
    pub fn progress(&self) -> (u64, u64) {
        *self.live.lock().expect("load lock")
    }

    /// Waits until `more` requests beyond `from` were sent (what a pause
    /// used to stand for, which a slow machine may fill with few requests);
    /// returns how many were sent by then. Panics after 30 s, saying `what`.
    pub async fn wait_for_sent(&self, from: u64, more: u64, what: &str) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (sent, _) = self.progress();
            if sent >= from + more {
                return sent;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {} requests {what}",
                sent.saturating_sub(from)
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> LoadReport {
        self.stop.cancel();
        let mut report = LoadReport::default();
        for worker in self.workers {
            if let Ok(part) = worker.await {
                report.merge(part);
            }
        }
        report.elapsed = self.started.elapsed();
        report
    }
}

/// Which client addresses one worker's requests come from: `first`, then
/// every `step`th, of `count` (none when 0).
struct Clients {
    count: usize,
    first: usize,
    step: usize,
}

impl Clients {
    /// The forwarding header of request `n`, if any.
    fn header(&self, n: usize) -> String {
        if self.count == 0 {
            return String::new();
        }
        let i = (self.first + n * self.step) % self.count;
        format!(
            "X-Forwarded-For: 10.{}.{}.{}\r\n",
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255
        )
    }
}

async fn client(
    target: SocketAddr,
    path: String,
    clients: Clients,
    stop: CancellationToken,
    live: Arc<Mutex<(u64, u64)>>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut connection: Option<BufReader<TcpStream>> = None;
    let mut n = 0;
    while !stop.is_cancelled() {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: cutover-load\r\n{}\r\n",
            clients.header(n)
        );
        n += 1;
        let started = Instant::now();
        let attempt = async {
            if connection.is_none() {
                let stream = TcpStream::connect(target)
                    .await
                    .map_err(|e| format!("connect {target}: {e}"))?;
                stream.set_nodelay(true).ok();
                connection = Some(BufReader::new(stream));
            }
            let conn = connection.as_mut().expect("connected");
            conn.get_mut()
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            read_response(conn).await
        };
        // A request that hangs is a failure a user would see, and must not
        // keep the load from stopping.
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(REQUEST_TIMEOUT, attempt) => {
                outcome.unwrap_or_else(|_| Err(format!("no response within {REQUEST_TIMEOUT:?}")))
            }
            _ = stop.cancelled() => break,
        };
        report.sent += 1;
        match outcome {
            Ok((status, body, keep_alive)) if (200..300).contains(&status) => {
                report
                    .latencies_us
                    .push(started.elapsed().as_micros() as u64);
                *report.by_body.entry(body).or_default() += 1;
                if !keep_alive {
                    connection = None;
                }
                live.lock().expect("load lock").0 += 1;
            }
            Ok((status, body, _)) => {
                fail(
                    &mut report,
                    &live,
                    format!("{target}: status {status}: {}", body.trim()),
                );
                connection = None;
            }
            Err(error) => {
                fail(&mut report, &live, format!("{target}: {error}"));
                connection = None;
                // Do not spin on a port that refuses.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    report
}

fn fail(report: &mut LoadReport, live: &Mutex<(u64, u64)>, message: String) {
    report.failed += 1;
    if report.failures.len() < 10 {
        report.failures.push(message);
    }
    let mut live = live.lock().expect("load lock");
    live.0 += 1;
    live.1 += 1;
}

/// Reads one response: status, body (Content-Length or chunked) and
/// whether the connection stays open.
async fn read_response(conn: &mut BufReader<TcpStream>) -> Result<(u16, String, bool), String> {
    let mut line = String::new();
    if conn
        .read_line(&mut line)
        .await
        .map_err(|e| format!("read: {e}"))?
        == 0
    {
        return Err("connection closed before the response".into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = true;
    loop {
        line.clear();
        if conn
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("connection closed in the headers".into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => keep_alive = !value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)
                .await
                .map_err(|e| format!("read: {e}"))?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk)
                .await
                .map_err(|e| format!("cut chunk: {e}"))?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        conn.read_exact(&mut body)
            .await
            .map_err(|e| format!("cut body: {e}"))?;
    } else {
        conn.read_to_end(&mut body)
            .await
            .map_err(|e| format!("read: {e}"))?;
        keep_alive = false;
    }
    Ok((
        status,
        String::from_utf8_lossy(&body).into_owned(),
        keep_alive,
    ))
}
