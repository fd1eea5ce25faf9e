//! The node proxy alone, for benchmarks: serves `--listen` and forwards every
//! request to `--upstream`, exactly as the agent's proxy does for an active
//! release. Stops on SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use cutover_agent::proxy::{Proxy, ProxyConfig};

fn arg(name: &str) -> SocketAddr {
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == name {
            if let Some(value) = args.next().and_then(|v| v.parse().ok()) {
                return value;
            }
        }
    }
    eprintln!("usage: proxy-bench --listen ADDR:PORT --upstream ADDR:PORT (worker threads: PROXY_BENCH_THREADS, default 1, 0 for a current-thread runtime)");
    std::process::exit(2);
}

fn main() {
    let listen = arg("--listen");
    let upstream = arg("--upstream");
    let threads = std::env::var("PROXY_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let runtime = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    runtime.block_on(async {
        let shutdown = cutover_common::shutdown::on_signals();
        let proxy = Proxy::bind(ProxyConfig::new("bench", listen), shutdown.clone())
            .await
            .expect("bind the proxy");
        proxy.switch(Some(("bench", upstream)));
        eprintln!("proxy-bench: {listen} -> {upstream}");
        shutdown.cancelled().await;
        proxy.close().await;
    });
}
