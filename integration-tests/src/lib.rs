//! Test harnesses for cutover.
//!
//! [`Cluster`] runs a coordinator and agents in this process (quickwit's
//! sandbox style): pre-bound `127.0.0.1:0` listeners, a temp dir per node,
//! certificates from a fresh CA. [`bin`] and friends drive the real binaries
//! for end-to-end cases (hyperqueue and garage style).
#![forbid(unsafe_code)]

pub mod canary;
pub mod cli;
pub mod docker;
pub mod haproxy;
pub mod load;
pub mod netns;
pub mod pg;
pub mod pgbackrest;
pub mod redis;
pub mod systemd;

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
use cutover_coordinator::config::{CoordinatorConfig, Limits};
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
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(300),
            heartbeat_ttl: Duration::from_secs(2),
            agent_cert_lifetime: Duration::from_secs(7 * 24 * 3600),
            keepalive: Limits::default().keepalive_interval,
        }
    }
}

pub fn coordinator_config(files: TlsFiles, data_dir: &Path, tuning: &Tuning) -> CoordinatorConfig {
    // The test PKI keeps its key beside its certificate.
    let ca_key = files.ca_cert.with_file_name(cutover_common::pki::CA_KEY);
    CoordinatorConfig {
        data_dir: data_dir.to_path_buf(),
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
    let config = tls::client_config(files)?;
    connect_with(url, config).await
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

pub fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
}

/// Whether `pid` is still running; a zombie has stopped, whoever reaps it.
pub fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub fn field<'a>(node: &'a serde_json::Value, key: &str) -> &'a str {
    node[key].as_str().unwrap_or_default()
}

/// GETs `/` until the node's proxy answers 200 and returns that answer: it
/// is down while its agent is, and answers 502 until a release the agent
/// restarts serves again.
pub async fn get_when_up(public: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no connection");
    loop {
        if let Ok(stream) = std::net::TcpStream::connect(public) {
            drop(stream);
            last = http_get(public, "/");
            if last.starts_with("HTTP/1.1 200") {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the proxy on {public} did not serve again; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long `http_get` waits to connect, and then for the whole answer: a
/// proxy or app that hangs fails the test instead of holding it forever.
const HTTP_GET_DEADLINE: Duration = Duration::from_secs(30);

/// One plain HTTP/1.1 GET (blocking, `Connection: close`); the raw answer.
/// Panics, naming the address, when it cannot connect or answer within
/// `HTTP_GET_DEADLINE`.
pub fn http_get(addr: &str, path: &str) -> String {
    http_get_with(addr, path, &[])
}

/// `http_get` with extra request `headers` (a cookie, a forwarded address).
pub fn http_get_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let socket: std::net::SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("http_get: {addr:?} is not an address: {e}"));
    let mut stream = std::net::TcpStream::connect_timeout(&socket, HTTP_GET_DEADLINE)
        .unwrap_or_else(|e| panic!("http_get: cannot connect to {addr}: {e}"));
    stream.set_read_timeout(Some(HTTP_GET_DEADLINE)).unwrap();
    stream.set_write_timeout(Some(HTTP_GET_DEADLINE)).unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    // One write: a request in several small segments waits out the peer's
    // delayed ACK (40 ms) behind Nagle's algorithm.
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("http_get: cannot send to {addr}: {e}"));
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap_or_else(|e| {
        panic!("http_get {addr}{path}: no whole answer within {HTTP_GET_DEADLINE:?}: {e}")
    });
    response
}

/// The test web app (see agent/tests/fixtures/app.py).
pub const APP: &str = include_str!("../../agent/tests/fixtures/app.py");
/// The test queue worker (see agent/tests/fixtures/worker.py).
pub const WORKER: &str = include_str!("../../agent/tests/fixtures/worker.py");

/// Packs the test app and worker as a release artifact; returns its file
/// URL and digest.
pub fn app_archive(dir: &Path) -> (String, String) {
    let path = archive(dir, "app.tar.gz", &[("app.py", APP), ("worker.py", WORKER)]);
    let digest = Digest::of_file(&path).unwrap().to_string();
    (format!("file://{}", path.display()), digest)
}

/// Writes `files` as `dir/name`, a .tar.gz; returns its path.
pub fn archive(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

/// A release of the test app as the coordinator sends it: health on
/// /health, a smoke check that the body names the version.
pub fn web_release(
    version: &str,
    listen_port: u16,
    artifact: &(String, String),
    env: &[(&str, &str)],
) -> pb::Release {
    let mut vars: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.insert("VERSION".into(), version.into());
    pb::Release {
        release_id: format!("web-{version}"),
        service: "web".into(),
        version: version.into(),
        artifact: Some(pb::Artifact {
            url: artifact.0.clone(),
            digest: artifact.1.clone(),
        }),
        command: vec!["python3".into(), "app.py".into()],
        env: vars,
        kind: Some(pb::release::Kind::Web(pb::WebService {
            listen: format!(":{listen_port}"),
            health: Some(pb::Check {
                probe: Some(pb::check::Probe::Http(pb::HttpProbe {
                    path: "/health".into(),
                    ..Default::default()
                })),
                timeout_ms: 1000,
            }),
            health_interval_ms: 100,
            healthy_threshold: 2,
            healthy_deadline_ms: 2000,
            smoke: vec![pb::Check {
                probe: Some(pb::check::Probe::Http(pb::HttpProbe {
                    path: "/".into(),
                    status_min: 200,
                    status_max: 200,
                    body_contains: version.into(),
                })),
                timeout_ms: 1000,
            }],
            drain_timeout_ms: 5000,
        })),
        stop_signal: String::new(),
        stop_grace_ms: 5000,
        ..Default::default()
    }
}

pub fn activate(id: &str, release: pb::Release) -> pb::Command {
    pb::Command {
        command_id: id.into(),
        kind: Some(command::Kind::Activate(pb::ActivateRelease {
            release: Some(release),
            drain_first: false,
            secret_values: Default::default(),
            hook_env: Default::default(),
            keep_previous_ms: 0,
            keep_previous_warm: false,
        })),
    }
}

/// The body of a raw HTTP response.
pub fn body(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or_default()
}

/// `command`'s output, run with `input` on its stdin.
pub fn output_with_input(mut command: std::process::Command, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the command");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("the command's output")
}

/// What the test app answers at `/env-sha256/NAME` for a variable whose
/// value is `value`: its SHA-256, in hex.
pub fn sha256_hex(value: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The app spec the rollout tests deploy: the test app (`app_archive`) as
/// service `web` on `port` of every node labelled env=test, in environment
/// `test`. `extra_env` lands in the release's environment (`KEY = "value"`
/// lines), `strategy` is the strategy table's body.
pub fn web_spec(port: u16, extra_env: &str, strategy: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
drain_timeout = "2s"
stop_grace = "2s"
[services.web.env]
{extra_env}
[services.web.health]
path = "/health"
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "3s"
[[services.web.smoke]]
path = "/"
expect_status = 200

[strategy]
{strategy}

[environments.test]
nodes = {{ env = "test" }}
"#
    )
}

/// The app spec the real-binary tests deploy on a `DevCluster`: the test
/// app (`app_archive`) as service `web` on `port` of every node of
/// environment `local`, serving `version`; `strategy` is the strategy
/// table's body and `tail` is appended (hooks, a migration, webhooks).
pub fn dev_spec(port: u16, version: &str, strategy: &str, tail: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.env]
GREETING = "hello"
VERSION = "{version}"
[services.web.health]
path = "/health"
interval = "100ms"

[strategy]
{strategy}

[environments.local]
nodes = {{ env = "local" }}
{tail}
"#
    )
}

/// What each of the first `nodes` dev nodes serves on `port` at `/` (the
/// test app's VERSION).
pub fn versions(port: u16, nodes: u8) -> Vec<String> {
    (0..nodes)
        .map(|i| body(&http_get(&format!("127.0.0.{}:{port}", 11 + i), "/")).to_string())
        .collect()
}

/// A process's output as text, for messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A deploy of `spec` to environment test with the artifact `(url, digest)`.
pub fn deploy_request(
    spec: String,
    version: &str,
    artifact: &(String, String),
) -> pb::DeployRequest {
    pb::DeployRequest {
        spec,
        spec_file: "cutover.toml".into(),
        env: "test".into(),
        service: String::new(),
        version: version.into(),
        artifact: Some(pb::Artifact {
            url: artifact.0.clone(),
            digest: artifact.1.clone(),
        }),
        image: String::new(),
        ..Default::default()
    }
}

/// Whether a rollout has ended.
pub fn ended(rollout: &pb::Rollout) -> bool {
    use pb::RolloutState as R;
    matches!(
        rollout.state(),
        R::Succeeded | R::Failed | R::RolledBack | R::Aborted
    )
}

/// Polls rollout `id` until `done` holds; panics with the rollout after
/// `timeout`.
pub async fn wait_for_rollout(
    client: &mut OperatorServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    done: impl Fn(&pb::Rollout) -> bool,
) -> pb::Rollout {
    let deadline = Instant::now() + timeout;
    loop {
        let rollout = client
            .get_rollout(pb::GetRolloutRequest { id: id.into() })
            .await
            .expect("get rollout")
            .into_inner();
        if done(&rollout) {
            return rollout;
        }
        assert!(
            Instant::now() < deadline,
            "rollout not as expected within {timeout:?}: {rollout:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}
