//! Closed-loop HTTP load for demos and benchmarks:
//! `loadgen --target ADDR [--target ADDR ...] [--connections N] [--path P]
//! [--duration SECS] [--clients N]` (`--clients`: each request from one of N
//! client addresses in turn, in X-Forwarded-For, so a canary's split sees
//! many clients). Runs until the duration ends or SIGTERM/SIGINT, then
//! prints a JSON report (sent, failed, responses by body, p50/p99 ms,
//! requests per second) on stdout.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use cutover_integration_tests::load::Load;

fn usage() -> ! {
    eprintln!("usage: loadgen --target ADDR:PORT [--target ...] [--connections N] [--path /] [--duration SECS] [--clients N]");
    std::process::exit(2);
}

fn main() {
    let mut targets: Vec<SocketAddr> = Vec::new();
    let mut connections = 8;
    let mut path = "/".to_string();
    let mut duration = None;
    let mut clients = 0;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--target" => targets.push(value.parse().unwrap_or_else(|_| usage())),
            "--connections" => connections = value.parse().unwrap_or_else(|_| usage()),
            "--path" => path = value,
            "--clients" => clients = value.parse().unwrap_or_else(|_| usage()),
            "--duration" => {
                duration = Some(Duration::from_secs_f64(
                    value.parse().unwrap_or_else(|_| usage()),
                ))
            }
            _ => usage(),
        }
    }
    if targets.is_empty() || connections == 0 {
        usage();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let shutdown = cutover_common::shutdown::on_signals();
        let load = Load::start_as_clients(targets, &path, connections, clients);
        match duration {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            None => shutdown.cancelled().await,
        }
        let report = load.stop().await;
        let secs = report.elapsed.as_secs_f64();
        let summary = serde_json::json!({
            "sent": report.sent,
            "failed": report.failed,
            "by_body": report.by_body,
            "p50_ms": report.quantile_ms(0.5),
            "p99_ms": report.quantile_ms(0.99),
            "requests_per_second": if secs > 0.0 { report.sent as f64 / secs } else { 0.0 },
            "elapsed_seconds": secs,
            "failures": report.failures,
        });
        println!("{summary}");
    });
}
