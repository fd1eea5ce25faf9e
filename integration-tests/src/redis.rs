//! A real Redis for the queue tests: one throw-away server per suite run,
//! which `scripts/test.sh` starts (`scripts/redis-env.sh`), and a key
//! prefix of its own for each test, so they run at once. Jobs are pushed
//! in Laravel's queue payload format with `redis-cli`.

use std::process::Command;

/// The test's view of the server: its address and the test's key prefix.
pub struct TestRedis {
    pub address: String,
    pub prefix: String,
}

/// The queue worker the tests deploy (see agent/tests/fixtures).
pub const QUEUE_WORKER: &str = include_str!("../../agent/tests/fixtures/queue_worker.py");

impl TestRedis {
    /// The server `scripts/test.sh` started, with a fresh prefix. A run
    /// without it (plain `cargo test`) fails here, saying how to get one.
    pub fn from_env() -> Self {
        let address = std::env::var("CUTOVER_TEST_REDIS").unwrap_or_else(|_| {
            panic!("CUTOVER_TEST_REDIS is not set: run the tests with ./scripts/test.sh, which starts a throw-away Redis (scripts/redis-env.sh)")
        });
        Self {
            address,
            prefix: format!("t{:08x}_", rand::random::<u32>()),
        }
    }

    /// The key of queue `name`, as Laravel names it.
    pub fn queue_key(&self, name: &str) -> String {
        format!("{}queues:{name}", self.prefix)
    }

    /// Runs `redis-cli ARGS` against the server; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let (host, port) = self.address.rsplit_once(':').expect("HOST:PORT");
        let output = Command::new("redis-cli")
            .args(["-h", host, "-p", port])
            .args(args)
            .output()
            .expect("redis-cli runs (scripts/test.sh installs redis-server)");
        assert!(
            output.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Pushes `count` jobs on queue `name` as Laravel does (RPUSH of its
    /// JSON payload), pushed `age_s` seconds ago by Horizon's "pushedAt",
    /// or without one (plain Laravel) when `None`.
    pub fn push_jobs(&self, name: &str, count: usize, age_s: Option<f64>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let payloads: Vec<String> = (0..count)
            .map(|i| {
                let mut job = serde_json::json!({
                    "uuid": format!("{:032x}", rand::random::<u128>()),
                    "displayName": "App\\Jobs\\SendInvoice",
                    "job": "Illuminate\\Queue\\CallQueuedHandler@call",
                    "maxTries": null,
                    "timeout": null,
                    "data": {"commandName": "App\\Jobs\\SendInvoice", "command": format!("O:20:\"App\\Jobs\\SendInvoice\":1:{{s:5:\"order\";i:{i};}}")},
                    "id": format!("{i}"),
                    "attempts": 0,
                });
                if let Some(age) = age_s {
                    job["pushedAt"] = serde_json::json!(format!("{:.4}", now - age));
                }
                job.to_string()
            })
            .collect();
        let key = self.queue_key(name);
        let mut args = vec!["RPUSH", key.as_str()];
        args.extend(payloads.iter().map(String::as_str));
        self.cli(&args);
    }
}
