//! `DevCluster`: a cluster of real processes started with `cutover dev
//! up`, as an operator runs it, and what the tests read of it.

use super::*;

/// A cluster of real processes started with `cutover dev up`, stopped with
/// `cutover dev down` when dropped.
pub struct DevCluster {
    pub dir: TempDir,
    env: Vec<(String, String)>,
}

impl DevCluster {
    pub fn up(nodes: u8) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = std::process::Command::new(bin("cutover"))
            .args(["dev", "up", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir.path())
            .output()
            .expect("run cutover dev up");
        assert!(
            output.status.success(),
            "dev up failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let env = std::fs::read_to_string(dir.path().join("env"))
            .expect("dev up writes DIR/env")
            .lines()
            .filter_map(|line| line.strip_prefix("export "))
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { dir, env }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What a shell that sourced DIR/env has: for commands the test runs
    /// itself (e.g. one that keeps running).
    pub fn env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Runs `cutover ARGS` against this cluster, as a shell that sourced
    /// DIR/env would.
    pub fn cutover(&self, args: &[&str]) -> std::process::Output {
        self.cutover_with_input(args, "")
    }

    /// `cutover ARGS` with `input` on its stdin.
    pub fn cutover_with_input(&self, args: &[&str], input: &str) -> std::process::Output {
        let mut command = std::process::Command::new(bin("cutover"));
        command.args(args).envs(self.env());
        output_with_input(command, input)
    }

    /// `cutover deploy` of spec `text` (written to `cutover-VERSION.toml`)
    /// with the test app's archive as `version` to environment `local`,
    /// plus `extra` flags.
    pub fn deploy_spec(&self, text: &str, version: &str, extra: &[&str]) -> std::process::Output {
        let file = self.path(&format!("cutover-{version}.toml"));
        std::fs::write(&file, text).expect("write the spec");
        let (url, _) = app_archive(self.dir.path());
        let archive = url.trim_start_matches("file://").to_string();
        let mut args = vec![
            "deploy",
            "-f",
            file.to_str().expect("a UTF-8 path"),
            "--env",
            "local",
            "--version",
            version,
            "--artifact",
            &archive,
        ];
        args.extend_from_slice(extra);
        self.cutover(&args)
    }

    /// The newest rollout as `cutover rollout status -o json` shows it.
    pub fn newest_rollout(&self) -> serde_json::Value {
        let list = self.cutover(&["rollout", "list", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("rollout list");
        let id = list[0]["id"].as_str().expect("a rollout").to_string();
        let status = self.cutover(&["rollout", "status", &id, "-o", "json"]);
        serde_json::from_slice(&status.stdout).expect("rollout status")
    }

    /// Waits until the coordinator flushed every node record and event it
    /// queued (`cutover_journal_pending` is 0): what it showed so far
    /// survives a SIGKILL from here on.
    pub fn wait_for_journal_flushed(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pending = self.metric("cutover_journal_pending");
            if pending == Some(0.0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the journal did not flush within 20 s (pending {pending:?})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `cutover jobs history JOB --env local -o json`: the job's kept runs,
    /// newest first.
    pub fn job_history(&self, job: &str) -> Vec<serde_json::Value> {
        self.try_job_history(job)
            .unwrap_or_else(|error| panic!("cutover jobs history {job}: {error}"))
    }

    /// The same, the CLI's error as the error: for polling a coordinator
    /// that may be restarting.
    pub fn try_job_history(&self, job: &str) -> Result<Vec<serde_json::Value>, String> {
        let args = [
            "jobs", "history", job, "--env", "local", "--limit", "500", "-o", "json",
        ];
        let out = self.cutover(&args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        match serde_json::from_slice(&out.stdout).expect("history is JSON") {
            serde_json::Value::Array(runs) => Ok(runs),
            other => panic!("history is not a list: {other}"),
        }
    }

    /// The coordinator's metrics page (`CUTOVER_METRICS_URL`).
    pub fn metrics(&self) -> String {
        let url = self
            .env
            .iter()
            .find(|(k, _)| k == "CUTOVER_METRICS_URL")
            .map(|(_, v)| v.clone())
            .expect("dev up exports CUTOVER_METRICS_URL");
        let (addr, path) = url
            .trim_start_matches("http://")
            .split_once('/')
            .expect("a metrics URL with a path");
        http_get(addr, &format!("/{path}"))
    }

    /// The value of one series of the metrics page: `series` is its name
    /// with its labels as the page prints them, e.g.
    /// `cutover_rpo_target_seconds{app="shop",env="local",dataset="db"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    pub fn nodes_json(&self) -> Vec<serde_json::Value> {
        self.try_nodes_json()
            .unwrap_or_else(|error| panic!("cutover nodes failed: {error}"))
    }

    fn try_nodes_json(&self) -> Result<Vec<serde_json::Value>, String> {
        let output = self.cutover(&["nodes", "--output", "json"]);
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let value: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("nodes json parses");
        Ok(value.as_array().expect("an array").clone())
    }

    /// Polls `cutover nodes --output json` until `done` holds; a coordinator
    /// that does not answer yet (restarting) counts as not done.
    pub fn wait_for_nodes(
        &self,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.try_nodes_json();
            if let Ok(nodes) = &nodes {
                if done(nodes) {
                    return nodes.clone();
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "condition not met within {timeout:?}; last answer: {nodes:#?}\n{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every log of the cluster, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.path("logs")) else {
            return out;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("== {}\n", entry.path().display()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// SIGKILLs the coordinator and starts it again with its config, as a
    /// crash and a restart by systemd would.
    pub fn kill_and_restart_coordinator(&self) {
        self.kill_coordinator();
        self.start_coordinator();
    }

    /// SIGKILLs the coordinator and waits until it is gone.
    pub fn kill_coordinator(&self) {
        let pid = self.pid("coordinator.pid");
        sigkill(pid);
        // A process in uninterruptible sleep (an fsync) dies when it returns.
        let deadline = Instant::now() + Duration::from_secs(30);
        while running(pid) {
            assert!(
                Instant::now() < deadline,
                "the coordinator survived SIGKILL for 30s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the coordinator again with the config `dev up` wrote.
    pub fn start_coordinator(&self) {
        let config = self.path("coordinator.toml").display().to_string();
        self.restart(
            "cutover",
            &["server", "--config", &config],
            "coordinator.pid",
            "coordinator.log",
        );
    }

    pub fn pid(&self, pid_file: &str) -> i32 {
        std::fs::read_to_string(self.path(pid_file))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Starts a process of the cluster again with the config `dev up` wrote,
    /// recording its new pid so `dev down` stops it.
    // `dev down` finds the process through the pid file and treats it as
    // stopped once it is a zombie, so the handle is not kept or waited on.
    #[allow(clippy::zombie_processes)]
    pub fn restart(&self, binary: &str, args: &[&str], pid_file: &str, log: &str) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.path("logs").join(log))
            .expect("log file");
        let child = std::process::Command::new(bin(binary))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restart process");
        std::fs::write(self.path(pid_file), format!("{}\n", child.id())).expect("pid file");
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(bin("cutover"))
            .args(["dev", "down", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}

/// Starts the agent of `config` on another state dir (`moved-state`
/// beside `config`), as an agent moved to the unit would: the moved
/// state dir and what the start said on stderr, once it exited with 2.
pub fn start_on_moved_state_dir(config: &Path, state_dir: &Path) -> (PathBuf, String) {
    let moved = config.with_file_name("moved-state");
    let text = std::fs::read_to_string(config)
        .expect("agent config")
        .replace(
            &format!("state_dir = {:?}", state_dir.display().to_string()),
            &format!("state_dir = {:?}", moved.display().to_string()),
        );
    assert!(text.contains("moved-state"), "{text}");
    let moved_config = config.with_file_name("moved.toml");
    std::fs::write(&moved_config, text).expect("write the moved config");
    let refused = std::process::Command::new(bin("cutover-agent"))
        .arg("--config")
        .arg(&moved_config)
        .output()
        .expect("run cutover-agent");
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(2), "{said}");
    (moved, said)
}
