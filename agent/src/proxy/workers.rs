//! The proxy's own runtimes: one current-thread tokio runtime per core the
//! agent may use, each on a thread of its own, shared by every proxy of the
//! process. Client connections are accepted and served there, apart from
//! the agent's control plane (its command stream, heartbeats and health
//! checks stay on the agent's runtime): a busy proxy never delays a
//! heartbeat, and a current-thread runtime handles the requests that are
//! ready in one batch, without the work-stealing wake-ups of a
//! multi-thread runtime.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::runtime::Handle;

static WORKERS: OnceLock<Vec<Handle>> = OnceLock::new();

thread_local! {
    /// The index of the proxy runtime this thread runs (0 on any other).
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Starts the proxy's runtimes: `threads` of them, or with 0 one per core
/// the process may run on (its CPU affinity). Only the first call (or the
/// first proxy, with the default) starts them; returns how many run.
pub fn start(threads: usize) -> usize {
    WORKERS.get_or_init(|| spawn(threads)).len()
}

/// The runtimes, started with the default if nobody started them.
pub(super) fn handles() -> &'static [Handle] {
    WORKERS.get_or_init(|| spawn(0))
}

/// The index of the runtime the caller runs on.
pub(super) fn current() -> usize {
    CURRENT.get()
}

fn spawn(threads: usize) -> Vec<Handle> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    (0..threads)
        .map(|i| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("proxy-{i}"))
                .build()
                .expect("the proxy's runtime");
            let handle = runtime.handle().clone();
            // The threads live as long as the process: every task on them
            // (accept loops, client connections) ends with its proxy.
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    CURRENT.set(i);
                    runtime.block_on(std::future::pending::<()>())
                })
                .expect("a thread for the proxy's runtime");
            handle
        })
        .collect()
}
