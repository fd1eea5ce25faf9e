//! Test harnesses for cutover.
//!
//! [`Cluster`] runs a coordinator and agents in this process (quickwit's
//! sandbox style): pre-bound `127.0.0.1:0` listeners, a temp dir per node,
//! certificates from a fresh CA. [`bin`] and friends drive the real binaries
//! for end-to-end cases (hyperqueue and garage style).
#![forbid(unsafe_code)]

pub mod browser;
pub mod canary;
pub mod cli;
pub mod coordinators;
mod dev_cluster;
pub mod docker;
pub mod etcd;
mod fixtures;
pub mod haproxy;
pub mod load;
pub mod netns;
pub mod pg;
pub mod pgbackrest;
pub mod redis;
pub mod systemd;

pub use dev_cluster::*;
pub use fixtures::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_agent::artifacts::Digest;
use cutover_agent::config::AgentConfig;
use cutover_agent::Agent;
use cutover_common::identity::{Identity, Role};
use cutover_common::pki::CertificateAuthority;
use cutover_common::telemetry::LogFormat;
use cutover_common::tls::{self, ChannelOptions, CoordinatorUrl, TlsFiles};
use cutover_coordinator::config::{CoordinatorConfig, EtcdSettings, Limits, StoreKind};
use cutover_coordinator::Coordinator;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb, command, ListNodesRequest, Node, NodeStatus};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A CA in a temp dir that issues whatever identities a test needs.
pub struct Pki {
    dir: TempDir,
    ca: CertificateAuthority,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::init_dir(dir.path(), &[]).expect("ca init");
        cutover_coordinator::secrets::MasterKeys::create(
            &dir.path().join(cutover_coordinator::secrets::MASTER_KEY),
        )
        .expect("master key");
        Self { dir, ca }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn coordinator_files(&self) -> TlsFiles {
        TlsFiles::in_dir(self.dir.path(), "coordinator")
    }

    /// Issues (or re-issues) a client certificate for `role`/`name`.
    pub fn client_files(&self, role: Role, name: &str) -> TlsFiles {
        self.client_files_for(role, name, Duration::from_secs(30 * 86_400))
    }

    /// Where the files of `role`/`name` are (whether issued or not).
    pub fn files_of(&self, role: Role, name: &str) -> TlsFiles {
        let stem = format!("{role}-{name}");
        TlsFiles::in_dir(&self.dir.path().join(&stem), &stem)
    }

    /// The files of `role`/`name`, issued now unless they exist: an agent
    /// started again keeps what it has (renewed, or from a rotated CA).
    pub fn existing_or_new(&self, role: Role, name: &str) -> TlsFiles {
        let files = self.files_of(role, name);
        if files.cert.exists() {
            files
        } else {
            self.client_files(role, name)
        }
    }

    /// The same, living only `lifetime` (it starts 5 minutes in the past).
    /// Each identity gets a dir of its own with its own copy of the CA, as
    /// on a real node: what it trusts changes only when it is told.
    pub fn client_files_for(&self, role: Role, name: &str, lifetime: Duration) -> TlsFiles {
        let files = self.files_of(role, name);
        let stem = format!("{role}-{name}");
        let dir = files.cert.parent().expect("in a dir").to_path_buf();
        let identity = Identity::new(role, name).expect("valid name");
        self.ca
            .issue_client_for(&identity, lifetime)
            .expect("issue")
            .write(&dir, &stem)
            .expect("write pair");
        std::fs::copy(
            self.dir.path().join(cutover_common::pki::CA_CERT),
            dir.join(cutover_common::pki::CA_CERT),
        )
        .expect("copy the CA");
        files
    }
}

/// Coordinator settings a test may tighten.
/// The test coordinators' shutdown grace: a drain past it is cut short.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct Tuning {
    pub heartbeat_interval: Duration,
    pub heartbeat_ttl: Duration,
    /// Lifetime of renewed agent certificates.
    pub agent_cert_lifetime: Duration,
    /// HTTP/2 ping interval and timeout on the coordinator's connections:
    /// how soon it drops a session to a partitioned node.
    pub keepalive: Duration,
    /// The coordinator's store on this etcd cluster instead of its data
    /// dir (`etcd::settings`).
    pub etcd: Option<EtcdSettings>,
    /// The coordinator's `limits.max_message_bytes`.
    pub max_message_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(300),
            heartbeat_ttl: Duration::from_secs(2),
            agent_cert_lifetime: Duration::from_secs(7 * 24 * 3600),
            keepalive: Limits::default().keepalive_interval,
            etcd: None,
            max_message_bytes: Limits::default().max_message_bytes,
        }
    }
}

pub fn coordinator_config(files: TlsFiles, data_dir: &Path, tuning: &Tuning) -> CoordinatorConfig {
    // The test PKI keeps its key beside its certificate.
    let ca_key = files.ca_cert.with_file_name(cutover_common::pki::CA_KEY);
    CoordinatorConfig {
        data_dir: data_dir.to_path_buf(),
        store: match tuning.etcd {
            Some(_) => StoreKind::Etcd,
            None => StoreKind::Sled,
        },
        etcd: tuning.etcd.clone(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        tls: files,
        heartbeat_interval: tuning.heartbeat_interval,
        heartbeat_ttl: tuning.heartbeat_ttl,
        shutdown_grace: SHUTDOWN_GRACE,
        log_format: LogFormat::Text,
        limits: Limits {
            keepalive_interval: tuning.keepalive,
            keepalive_timeout: tuning.keepalive,
            max_message_bytes: tuning.max_message_bytes,
            ..Limits::default()
        },
        registries: Vec::new(),
        registry_ca: None,
        master_key_file: Some(ca_key.with_file_name(cutover_coordinator::secrets::MASTER_KEY)),
        ca_key: Some(ca_key),
        agent_cert_lifetime: tuning.agent_cert_lifetime,
    }
}

pub struct TestAgent {
    pub name: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl TestAgent {
    /// Stops the agent the way a crash would: its task is dropped mid-flight
    /// and its connection closes without a goodbye.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A `cutover-agent` process started by a test.
pub struct AgentProcess {
    pub child: std::process::Child,
    pub state_dir: PathBuf,
    /// Whether dropping this also kills the agent's releases (test hygiene);
    /// a simulated crash must leave them running.
    reap_releases: bool,
}

impl AgentProcess {
    /// SIGKILL, and reaped: as sudden as a crash gets. The releases keep
    /// running, as they would on a real node.
    pub fn kill(mut self) {
        self.reap_releases = false;
        self.kill_agents();
    }

    /// The pid of the agent that runs the node now: the one started, or
    /// the one it handed over to (`agent.pid` in the state dir).
    pub fn pid(&self) -> i32 {
        std::fs::read_to_string(self.state_dir.join(cutover_agent::PID_FILE))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(self.child.id() as i32)
    }

    fn kill_agents(&mut self) {
        let current = self.pid();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if current != self.child.id() as i32 {
            sigkill(current);
        }
    }

    pub fn release_pids(&self) -> Vec<u32> {
        release_pids(&self.state_dir)
    }
}

/// Pids of the release processes of the agent with `state_dir`, whether or
/// not that agent runs: their working directory is a release dir under it.
pub fn release_pids(state_dir: &Path) -> Vec<u32> {
    release_processes(state_dir)
        .into_values()
        .flatten()
        .collect()
}

/// The release processes (not zombies) working in a release dir
/// (`.../releases/<release id>/...`) anywhere under `root`, by release id.
pub fn release_processes(root: &Path) -> std::collections::BTreeMap<String, Vec<u32>> {
    let mut by_release: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let (Ok(cwd), Ok(stat)) = (
            std::fs::read_link(entry.path().join("cwd")),
            std::fs::read_to_string(entry.path().join("stat")),
        ) else {
            continue;
        };
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        let Ok(inside) = cwd.strip_prefix(root) else {
            continue;
        };
        let mut parts = inside.iter().map(|p| p.to_string_lossy().into_owned());
        if !zombie && parts.any(|p| p == "releases") {
            if let Some(release) = parts.next() {
                by_release.entry(release).or_default().push(pid);
            }
        }
    }
    for pids in by_release.values_mut() {
        pids.sort_unstable();
    }
    by_release
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill_agents();
        if !self.reap_releases {
            return;
        }
        // Releases outlive their agent by design; a test must not leave any.
        for pid in self.release_pids() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

pub struct Cluster {
    pub pki: Pki,
    pub tuning: Tuning,
    pub coordinator: Option<Coordinator>,
    pub grpc_addr: std::net::SocketAddr,
    pub agents: Vec<TestAgent>,
    data_dir: TempDir,
    state_root: TempDir,
}

impl Cluster {
    /// A coordinator and `agents` agents named node-1.., all in-process.
    pub async fn start(agents: usize, tuning: Tuning) -> Self {
        Self::start_on([127, 0, 0, 1].into(), agents, tuning).await
    }

    /// The same, with the coordinator listening on `ip` (0.0.0.0 for
    /// agents in network namespaces of their own).
    /// A cluster whose `agents` agents are all connected and ready.
    pub async fn start_ready(agents: usize, tuning: Tuning) -> Self {
        let cluster = Self::start(agents, tuning).await;
        cluster
            .wait_for_nodes(Duration::from_secs(10), |n| {
                n.len() == agents && n.iter().all(ready)
            })
            .await;
        cluster
    }

    pub async fn start_on(ip: std::net::IpAddr, agents: usize, tuning: Tuning) -> Self {
        let pki = Pki::new();
        let data_dir = tempfile::tempdir().expect("temp dir");
        // A stable port: the restart tests bind it again.
        let port = cutover_common::net::allocate_port(ip, &cutover_common::net::STABLE_PORTS, &[])
            .expect("a free port");
        let grpc = TcpListener::bind((ip, port)).await.expect("bind grpc");
        let grpc_addr = grpc.local_addr().expect("addr");
        let coordinator = start_coordinator(&pki, data_dir.path(), &tuning, grpc).await;
        let mut cluster = Self {
            pki,
            tuning,
            coordinator: Some(coordinator),
            grpc_addr,
            agents: Vec::new(),
            data_dir,
            state_root: tempfile::tempdir().expect("temp dir"),
        };
        for i in 1..=agents {
            let agent = cluster.start_agent(&format!("node-{i}")).await;
            cluster.agents.push(agent);
        }
        cluster
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.grpc_addr.ip(), self.grpc_addr.port())
            .replace("0.0.0.0", "127.0.0.1")
    }

    pub fn agent_config(&self, name: &str) -> AgentConfig {
        // node-N serves on 127.0.0.(10+N), whichever way it was started and
        // however often; other names take the next free slot.
        let index = 10
            + name
                .strip_prefix("node-")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(self.agents.len() + 1);
        AgentConfig {
            coordinator: self.url(),
            server_name: None,
            state_dir: self.state_root.path().join(name),
            name: Some(name.to_string()),
            address: Some(format!("127.0.0.{index}").parse().expect("ip")),
            labels: [("env".to_string(), "test".to_string())].into(),
            tls: self.pki.existing_or_new(Role::Agent, name),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(2),
            max_message_bytes: 4 << 20,
            log_format: LogFormat::Text,
            port_range: 20000..=29999,
            artifact_ca: None,
            // Tests make their file:// artifacts in temp dirs.
            file_artifact_dirs: vec![std::env::temp_dir()],
            release_log_max_bytes: 1 << 20,
            release_log_files: 2,
            releases_keep: 5,
            proxy_trusted_networks: Vec::new(),
            proxy_threads: 0,
            stop_services_on_shutdown: false,
            docker_host: cutover_agent::config::default_docker_host(),
            registries: Vec::new(),
            certificate_check_interval: Duration::from_secs(600),
        }
    }

    /// Starts an agent (reusing its state dir, hence its node id, if it ran
    /// before).
    pub async fn start_agent(&self, name: &str) -> TestAgent {
        spawn_agent(self.agent_config(name)).await
    }

    /// Starts the real `cutover-agent` binary as node `name`, connected to
    /// this in-process coordinator. Its state dir is the same one an
    /// in-process agent of that name would use.
    pub fn spawn_agent_binary(&self, name: &str) -> AgentProcess {
        self.spawn_agent_binary_on(name, None)
    }

    /// The same, inside `host`'s network namespace when given: it dials the
    /// coordinator through the host's link and serves on the host's address.
    pub fn spawn_agent_binary_on(&self, name: &str, host: Option<&netns::NetHost>) -> AgentProcess {
        let (path, state_dir) = self.agent_config_file(name, host);
        let mut command = match host {
            Some(host) => host.command(&bin("cutover-agent")),
            None => std::process::Command::new(bin("cutover-agent")),
        };
        command.arg("--config").arg(&path);
        self.start_agent_process(name, &mut command, state_dir)
    }

    /// Runs `command`, an agent for node `name` however started, with its
    /// output appended to the node's log.
    pub fn start_agent_process(
        &self,
        name: &str,
        command: &mut std::process::Command,
        state_dir: PathBuf,
    ) -> AgentProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_root.path().join(format!("{name}.log")))
            .expect("agent log");
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start cutover-agent");
        AgentProcess {
            child,
            state_dir,
            reap_releases: true,
        }
    }

    /// The node's agent log so far.
    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_root.path().join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// Writes node `name`'s agent config file (to run inside `host` when
    /// given); its path, and the agent's state dir.
    pub fn agent_config_file(
        &self,
        name: &str,
        host: Option<&netns::NetHost>,
    ) -> (PathBuf, PathBuf) {
        let config = self.agent_config(name);
        let path = self.state_root.path().join(format!("{name}.toml"));
        let (coordinator, address, server_name) = match host {
            Some(host) => (
                format!("https://{}:{}", host.gateway, self.grpc_addr.port()),
                std::net::IpAddr::from(host.address),
                // The test CA's server certificate names localhost.
                "server_name = \"localhost\"\n",
            ),
            None => (
                config.coordinator.clone(),
                config.address.expect("test agents have an address"),
                "",
            ),
        };
        let text = format!(
            "coordinator = {:?}\n{server_name}state_dir = {:?}\nname = {name:?}\naddress = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\nfile_artifact_dirs = {:?}\n[labels]\nenv = \"test\"\n[tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n",
            coordinator,
            config.state_dir.display().to_string(),
            address,
            config
                .file_artifact_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>(),
            config.tls.ca_cert.display().to_string(),
            config.tls.cert.display().to_string(),
            config.tls.key.display().to_string(),
        );
        std::fs::write(&path, text).expect("agent config");
        (path, config.state_dir)
    }

    /// Sends `command` to `node` through the coordinator and waits for its
    /// result, collecting the progress steps on the way.
    pub async fn run_command(
        &self,
        node: &str,
        command: cutover_proto::v1::Command,
    ) -> (cutover_proto::v1::CommandResult, Vec<String>) {
        self.run_command_within(node, command, Duration::from_secs(60))
            .await
    }

    /// The same, for a command that may take longer (a benchmark's backup).
    pub async fn run_command_within(
        &self,
        node: &str,
        command: cutover_proto::v1::Command,
        wait: Duration,
    ) -> (cutover_proto::v1::CommandResult, Vec<String>) {
        let registry = &self
            .coordinator
            .as_ref()
            .expect("coordinator runs")
            .registry;
        let pending = registry
            .send_command(node, command)
            .expect("the node takes commands");
        let mut steps = Vec::new();
        let result = pending
            .wait(wait, |p| steps.push(p.step))
            .await
            .expect("a result");
        (result, steps)
    }

    /// Sends `command` to `node` through the coordinator without waiting
    /// for its result (which the coordinator then ignores).
    pub fn send_command(&self, node: &str, command: cutover_proto::v1::Command) {
        let registry = &self
            .coordinator
            .as_ref()
            .expect("coordinator runs")
            .registry;
        drop(
            registry
                .send_command(node, command)
                .expect("the node takes commands"),
        );
    }

    /// Stops the coordinator gracefully.
    pub async fn stop_coordinator(&mut self) {
        if let Some(coordinator) = self.coordinator.take() {
            coordinator.stop().await.expect("coordinator stops cleanly");
        }
    }

    /// The coordinator's data dir (its store is `store` in it).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Starts a new coordinator on the same address and data dir.
    pub async fn restart_coordinator(&mut self) {
        self.stop_coordinator().await;
        // The agents know this address: the same port again, waited for
        // while the stopped server's socket lets go of it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let grpc = loop {
            match TcpListener::bind(self.grpc_addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot bind {} again: {error}", self.grpc_addr),
            }
        };
        self.coordinator =
            Some(start_coordinator(&self.pki, self.data_dir.path(), &self.tuning, grpc).await);
    }

    /// The coordinator's /metrics now.
    pub fn metrics(&self) -> String {
        let coordinator = self.coordinator.as_ref().expect("the coordinator runs");
        http_get(&coordinator.http_addr.to_string(), "/metrics")
    }

    /// The value of counter `cutover_<name>_total` on the coordinator's
    /// /metrics now.
    pub fn counter(&self, name: &str) -> u64 {
        let metrics = self.metrics();
        let prefix = format!("cutover_{name}_total ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix}in /metrics")) as u64
    }

    /// Waits until counter `name` grew by `by` from now: positive evidence
    /// that a periodic pass (a rollout's tick, the converger) had its chance,
    /// before a test asserts that it changed nothing.
    pub async fn wait_for_counter(&self, name: &str, by: u64, timeout: Duration) {
        let start = self.counter(name);
        let deadline = Instant::now() + timeout;
        while self.counter(name) < start + by {
            assert!(
                Instant::now() < deadline,
                "cutover_{name}_total did not grow by {by} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn operator(&self) -> OperatorServiceClient<Channel> {
        let files = self.pki.client_files(Role::Operator, "tester");
        operator_client(&self.url(), &files)
            .await
            .expect("operator connects")
    }

    /// Polls the node list until `done` holds, or panics with the last list.
    pub async fn wait_for_nodes(
        &self,
        timeout: Duration,
        done: impl Fn(&[Node]) -> bool,
    ) -> Vec<Node> {
        let mut client = self.operator().await;
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = client
                .list_nodes(ListNodesRequest {})
                .await
                .expect("list nodes")
                .into_inner()
                .nodes;
            if done(&nodes) {
                return nodes;
            }
            if Instant::now() >= deadline {
                panic!("condition not met within {timeout:?}; nodes: {nodes:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    /// In-process agents leave their releases running when dropped (fail
    /// static); a finished test must not, so their process groups go.
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.state_root.path()) else {
            return;
        };
        for entry in entries.flatten() {
            for pid in release_pids(&entry.path()) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

async fn start_coordinator(
    pki: &Pki,
    data_dir: &Path,
    tuning: &Tuning,
    grpc: TcpListener,
) -> Coordinator {
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let config = coordinator_config(pki.coordinator_files(), data_dir, tuning);
    Coordinator::start(config, grpc, http, CancellationToken::new())
        .await
        .expect("coordinator starts")
}

pub async fn spawn_agent(config: AgentConfig) -> TestAgent {
    let name = config.name.clone().expect("test agents are named");
    let state_dir = config.state_dir.clone();
    let shutdown = CancellationToken::new();
    let agent = Agent::new(config, shutdown.clone(), Default::default())
        .await
        .expect("agent config is valid");
    let node_id = agent.node_id().to_string();
    // No handoffs in process (`Startup::handoffs` is unset): it never fails.
    let task = tokio::spawn(async move {
        agent
            .run()
            .await
            .expect("an agent without handoffs ends cleanly")
    });
    TestAgent {
        name,
        node_id,
        state_dir,
        shutdown,
        task,
    }
}

pub async fn operator_client(
    url: &str,
    files: &TlsFiles,
) -> Result<OperatorServiceClient<Channel>, tls::TlsError> {
    operator_client_expecting(url, files, None).await
}

/// `operator_client`, expecting `server_name` in the coordinator's
/// certificate instead of the URL's host.
pub async fn operator_client_expecting(
    url: &str,
    files: &TlsFiles,
    server_name: Option<&str>,
) -> Result<OperatorServiceClient<Channel>, tls::TlsError> {
    let url = CoordinatorUrl::parse(url)?;
    let config = tls::client_config(files)?;
    let connection = tls::connect(&url, server_name, config, &ChannelOptions::default()).await?;
    Ok(OperatorServiceClient::new(connection))
}

/// Connects with an arbitrary rustls client config (e.g. one without a
/// client certificate, to check the refusal).
pub async fn connect_with(
    url: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<OperatorServiceClient<Channel>, tls::TlsError> {
    let url = CoordinatorUrl::parse(url)?;
    let connection = tls::connect(&url, None, config, &ChannelOptions::default()).await?;
    Ok(OperatorServiceClient::new(connection))
}

pub fn ready(node: &Node) -> bool {
    node.status == NodeStatus::Ready as i32 && node.connected
}

pub fn find<'a>(nodes: &'a [Node], name: &str) -> Option<&'a Node> {
    nodes.iter().find(|n| n.name == name)
}

/// A built binary of this workspace (`cargo build --bins` first; the test
/// script does).
/// Fails the test, saying how to get it, when `tool` is not installed: a
/// check that skips itself where its tool is missing proves nothing.
pub fn require_tool(tool: &str, package: &str) {
    assert!(
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok(),
        "{tool} is not installed; scripts/test.sh installs it (Debian package {package})"
    );
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (scripts/test.sh does)",
        path.display()
    );
    path
}
