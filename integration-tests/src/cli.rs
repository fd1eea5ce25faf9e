//! The `cutover` binary as an operator runs it in the tests: with a CLI
//! config of their own (the admin's, or a deployer's created the way the
//! operator guide says), never the machine's.

use std::path::{Path, PathBuf};

use cutover_common::identity::Role;
use serde_json::Value;

use std::time::Duration;

use crate::{app_archive, archive, bin, output_with_input, spawn_agent, Cluster, Tuning, APP};

pub struct Cli {
    /// The coordinator's URL.
    pub coordinator: String,
    /// Where configs, specs and credentials go.
    pub dir: PathBuf,
}

impl Cli {
    /// `cutover ARGS` as the operator whose CLI config is `config`.
    pub fn run(&self, config: &Path, args: &[&str]) -> (bool, String) {
        self.run_with_input(config, args, "")
    }

    /// `run` with `input` on stdin (a secret's value).
    pub fn run_with_input(&self, config: &Path, args: &[&str], input: &str) -> (bool, String) {
        let mut command = std::process::Command::new(bin("cutover"));
        command
            .arg("--cli-config")
            .arg(config)
            .args(args)
            .env_remove("CUTOVER_CLI_CONFIG")
            .env("HOME", "/nonexistent");
        let output = output_with_input(command, input);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// `cutover deploy -f SPEC --env ENV --version VERSION --artifact
    /// ARTIFACT EXTRA...` as `config`'s operator.
    pub fn deploy(
        &self,
        config: &Path,
        spec: &str,
        env: &str,
        version: &str,
        artifact: &str,
        extra: &[&str],
    ) -> (bool, String) {
        let mut args = vec!["deploy", "-f", spec, "--env", env];
        args.extend(["--version", version, "--artifact", artifact]);
        args.extend_from_slice(extra);
        self.run(config, &args)
    }

    /// The CLI of `cluster` in `dir`, with the admin's config (root).
    pub fn as_admin(cluster: &Cluster, dir: &Path) -> (Cli, PathBuf) {
        let cli = Cli {
            coordinator: cluster.url(),
            dir: dir.to_path_buf(),
        };
        let root = cluster.pki.client_files(Role::Operator, "root");
        let admin = cli.config_file("root.toml", &root);
        (cli, admin)
    }

    /// A CLI config `name` in `dir` that reaches `coordinator` (one URL or
    /// a comma-separated list) with the credentials `files`.
    pub fn config_file(&self, name: &str, files: &cutover_common::tls::TlsFiles) -> PathBuf {
        self.config_file_expecting(name, files, None)
    }

    /// `config_file` expecting `server_name` in the coordinators'
    /// certificate (one dialled at an address it does not name).
    pub fn config_file_expecting(
        &self,
        name: &str,
        files: &cutover_common::tls::TlsFiles,
        server_name: Option<&str>,
    ) -> PathBuf {
        let path = self.dir.join(name);
        let server_name = server_name
            .map(|name| format!("server_name = {name:?}\n"))
            .unwrap_or_default();
        std::fs::write(
            &path,
            format!(
                "coordinator = {:?}\n{server_name}ca_cert = {:?}\ncert = {:?}\nkey = {:?}\n",
                self.coordinator,
                files.ca_cert.display().to_string(),
                files.cert.display().to_string(),
                files.key.display().to_string()
            ),
        )
        .unwrap();
        path
    }

    /// A deployer of `env` created by the admin, the way the operator
    /// guide says; returns their CLI config.
    pub fn operator(&self, admin: &Path, name: &str, env: &str) -> PathBuf {
        let out = self.dir.join(name);
        let (ok, text) = self.run(
            admin,
            &[
                "operator",
                "create",
                name,
                "--role",
                "deployer",
                "--env",
                env,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(ok, "{text}");
        out.join("cli.toml")
    }

    pub fn json(&self, config: &Path, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let (ok, text) = self.run(config, &all);
        assert!(ok, "{args:?}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }
}

/// A cluster of one agent per `(name, env)`, labelled `env=ENV`, once
/// every one is connected and has reported its figures.
pub async fn cluster_of(nodes: &[(&str, &str)]) -> Cluster {
    cluster_tuned(nodes, Tuning::default()).await
}

/// `cluster_of` with a coordinator tuned (on etcd, say).
pub async fn cluster_tuned(nodes: &[(&str, &str)], tuning: Tuning) -> Cluster {
    let mut cluster = Cluster::start(0, tuning).await;
    for (name, env) in nodes {
        let mut config = cluster.agent_config(name);
        config.labels = [("env".to_string(), env.to_string())].into();
        let agent = spawn_agent(config).await;
        cluster.agents.push(agent);
    }
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| {
            n.len() == nodes.len() && n.iter().all(|n| n.connected && n.figures.is_some())
        })
        .await;
    cluster
}

/// Two builds of the test app in `dir`: `app.tar.gz` and `app-v2.tar.gz`
/// (the same app, another digest), as artifact paths.
pub fn two_builds(dir: &Path) -> (String, String) {
    app_archive(dir);
    let v1 = dir.join("app.tar.gz").display().to_string();
    let v2 = archive(
        dir,
        "app-v2.tar.gz",
        &[("app.py", &format!("{APP}\n# v2\n"))],
    );
    (v1, v2.display().to_string())
}
