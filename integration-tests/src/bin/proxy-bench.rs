//! The node proxy alone, for benchmarks: serves `--listen` and forwards every
//! request to `--upstream`, exactly as the agent's proxy does for an active
//! release. With `--split-weight N` it splits the traffic as for a canary
//! at weight N (sticky by the proxy's cookie), the side release at the same
//! upstream: what a split costs per request. With `--throttle-rps N` a
//! throttle lever of N requests a second per client address is in force
//! (set high, it admits every request: what checking it costs). Stops on
//! SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use cutover_agent::proxy::cohort::{Cohorts, Split};
use cutover_agent::proxy::levers::{LeverSettings, ThrottleSettings};
use cutover_agent::proxy::{Proxy, ProxyConfig, RouteSpec};

fn usage() -> ! {
    eprintln!("usage: proxy-bench --listen ADDR:PORT --upstream ADDR:PORT [--split-weight N] [--throttle-rps N] (proxy threads: PROXY_BENCH_THREADS, default 1, 0 for one per core)");
    std::process::exit(2);
}

/// The value of `--name`, if given; a value that does not parse is a
/// usage error.
fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == name {
            return Some(
                args.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage()),
            );
        }
    }
    None
}

fn main() {
    let listen: SocketAddr = arg("--listen").unwrap_or_else(|| usage());
    let upstream: SocketAddr = arg("--upstream").unwrap_or_else(|| usage());
    let split: Option<u32> = arg("--split-weight");
    let throttle: Option<u32> = arg("--throttle-rps");
    let threads = std::env::var("PROXY_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    // The proxy serves on runtimes of its own, as in the agent; this one
    // only sets it up and waits for the signal.
    cutover_agent::proxy::workers::start(threads);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let shutdown = cutover_common::shutdown::on_signals();
        let proxy = Proxy::bind(ProxyConfig::new("bench", listen), shutdown.clone())
            .await
            .expect("bind the proxy");
        match split {
            None => {
                proxy.switch(Some(RouteSpec::all("bench", upstream)));
            }
            Some(weight) => {
                let cohorts = Cohorts::new(Split {
                    weight,
                    ..Default::default()
                })
                .unwrap_or_else(|e| {
                    eprintln!("--split-weight: {e}");
                    std::process::exit(2)
                });
                proxy.split(
                    RouteSpec::all("bench", upstream),
                    RouteSpec::all("canary", upstream),
                    cohorts,
                );
            }
        }
        if let Some(rps) = throttle {
            let levers = LeverSettings {
                throttle: Some(ThrottleSettings {
                    rps,
                    burst: rps,
                    per: "client-ip".into(),
                    path_prefix: String::new(),
                }),
                ..Default::default()
            };
            proxy.levers().set(levers).unwrap_or_else(|e| {
                eprintln!("--throttle-rps: {e}");
                std::process::exit(2)
            });
        }
        eprintln!("proxy-bench: {listen} -> {upstream} (split {split:?}, throttle {throttle:?})");
        shutdown.cancelled().await;
        proxy.close().await;
    });
}
