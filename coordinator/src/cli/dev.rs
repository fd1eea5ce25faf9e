//! `cutover dev up|down`: a whole cluster on loopback for development and
//! demos, the `nomad agent -dev` of cutover.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cutover_common::identity::{Identity, Role};
use cutover_common::net::{allocate_port, STABLE_PORTS};
use cutover_common::pki::CertificateAuthority;
use cutover_proto::v1::{ListNodesRequest, NodeStatus};

use super::client::ConnectArgs;

const OPERATOR: &str = "dev";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The registry `--runtime docker` started, stopped last by `dev down`.
const REGISTRY_PID: &str = "registry.pid";

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of agents; agent i serves on 127.0.0.(10+i).
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
    /// Where certificates, configs, state, pid files and logs go.
    #[arg(long, default_value = ".dev")]
    pub dir: PathBuf,
    /// Labels of every agent.
    #[arg(long, default_value = "env=local,role=web")]
    pub labels: String,
    /// "docker" also readies the agents for docker services: a Docker
    /// engine must answer (DOCKER_HOST, else /var/run/docker.sock), and a
    /// registry at --registry is started (Debian's docker-registry) unless
    /// one answers there already.
    #[arg(long, default_value = "process", value_parser = ["process", "docker"])]
    pub runtime: String,
    /// Where `--runtime docker` keeps the images it deploys.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub registry: String,
}

/// The engine's socket, as agents will be told.
fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

/// Asks the engine's `/_ping` over its socket.
fn engine_answers(host: &str) -> Result<()> {
    use std::io::{Read, Write};
    let path = host.trim_start_matches("unix://");
    let mut socket = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("no docker engine at {host}"))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut answer = String::new();
    socket.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.0 200") && !answer.starts_with("HTTP/1.1 200") {
        bail!(
            "the docker engine at {host} answered {:?}",
            answer.lines().next().unwrap_or("")
        );
    }
    Ok(())
}

fn registry_answers(registry: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = registry.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut socket) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {registry}\r\n\r\n");
    let mut answer = String::new();
    socket.write_all(request.as_bytes()).is_ok()
        && socket.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.")
        && answer.contains("Docker-Distribution-Api-Version")
}

/// Makes sure a registry answers at `registry` (a loopback address),
/// starting Debian's `docker-registry` with its storage in the dev dir.
async fn ensure_registry(registry: &str, dir: &Path, logs: &Path) -> Result<()> {
    if registry_answers(registry) {
        return Ok(());
    }
    let addr: std::net::SocketAddr = registry
        .parse()
        .with_context(|| format!("--registry {registry:?}: expected a loopback IP:PORT"))?;
    if !addr.ip().is_loopback() {
        bail!("--registry {registry}: no registry answers there, and dev up only starts one on loopback");
    }
    let binary = ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("no registry answers at --registry and docker-registry is not installed; install it (apt install docker-registry) or start one")?;
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "# written by `cutover dev up`\nversion: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {registry}\n",
            dir.join("registry").display()
        ),
    )?;
    spawn(
        &binary,
        &["serve", &config.display().to_string()],
        &logs.join("registry.log"),
        &dir.join(REGISTRY_PID),
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !registry_answers(registry) {
        if Instant::now() >= deadline {
            bail!(
                "the registry did not come up on {registry}; see {}",
                logs.join("registry.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn parse_labels(text: &str) -> Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("label {pair:?} is not key=value"))?;
            let (key, value) = (k.trim(), v.trim());
            cutover_common::rules::label(key, value)?;
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

/// A free loopback port that stays free across a restart of its owner (see
/// `STABLE_PORTS`); `taken` are ports already handed out.
fn free_port(taken: &[u16]) -> Result<u16> {
    allocate_port([127, 0, 0, 1].into(), &STABLE_PORTS, taken)
        .context("no free port in 30000-32767 on 127.0.0.1 for the local cluster")
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the cutover binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}; build it with `cargo build --bins`",
            name,
            exe.display()
        );
    }
    Ok(path)
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Reads a pid file, returning the pid only if that process is still a
/// cutover binary (pids get reused: never signal a stranger).
fn read_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    // A rebuilt binary shows as "<path> (deleted)".
    let name = exe
        .file_name()?
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        .to_string();
    let ours = ["cutover", "cutover-agent", "docker-registry"].contains(&name.as_str());
    (pid_alive(pid) && !is_zombie(pid) && ours).then_some(pid)
}

/// The pid files of a cluster dir: agents first (the one each agent
/// keeps in its state dir names the process that runs the node after a
/// handoff or an upgrade), the coordinator last.
fn pid_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("agent-") && n.ends_with(".pid"))
        })
        .collect();
    if let Ok(agents) = std::fs::read_dir(dir.join("agents")) {
        files.extend(
            agents
                .filter_map(|e| e.ok().map(|e| e.path().join("agent.pid")))
                .filter(|p| p.exists()),
        );
    }
    files.sort();
    files.push(dir.join("coordinator.pid"));
    files.push(dir.join(REGISTRY_PID));
    Ok(files)
}

fn spawn(binary: &Path, args: &[&str], log: &Path, pid_file: &Path) -> Result<u32> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        // Own process group: the cluster outlives the shell that started it
        // and a Ctrl-C there does not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    std::fs::write(pid_file, format!("{}\n", child.id()))?;
    Ok(child.id())
}

pub async fn up(args: UpArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > 200 {
        bail!("--nodes must be between 1 and 200 (agent i uses 127.0.0.(10+i))");
    }
    let labels = parse_labels(&args.labels)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    if pid_files(&dir)?.iter().any(|f| read_pid(f).is_some()) {
        bail!(
            "a cluster is already running in {}; stop it with `cutover dev down --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    let server_bin = std::env::current_exe()?;
    let agent_bin = sibling_binary("cutover-agent")?;
    let pki = dir.join("pki");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let docker = args.runtime == "docker";
    let docker_host = docker_host();
    if docker {
        engine_answers(&docker_host).context(
            "--runtime docker needs a running Docker engine: start dockerd (or set DOCKER_HOST); scripts/demo.sh --runtime docker starts one",
        )?;
        ensure_registry(&args.registry, &dir, &logs).await?;
    }

    let ca = match CertificateAuthority::load_dir(&pki) {
        Ok(ca) => ca,
        Err(_) => CertificateAuthority::init_dir(&pki, &[])?,
    };
    let master_key = pki.join(cutover_coordinator::secrets::MASTER_KEY);
    if !master_key.exists() {
        cutover_coordinator::secrets::MasterKeys::create(&master_key)?;
    }
    let operator = Identity::new(Role::Operator, OPERATOR)?;
    ca.issue_client(&operator, 365)?
        .write(&pki, &format!("operator-{OPERATOR}"))?;

    let grpc_port = free_port(&[])?;
    let http_port = free_port(&[grpc_port])?;
    let coordinator_url = format!("https://127.0.0.1:{grpc_port}");
    let coordinator_config = dir.join("coordinator.toml");
    std::fs::write(
        &coordinator_config,
        format!(
            "# written by `cutover dev up`\n\
             data_dir = {data:?}\n\
             listen = \"127.0.0.1:{grpc_port}\"\n\
             http_listen = \"127.0.0.1:{http_port}\"\n\
             heartbeat_interval = \"1s\"\n\
             heartbeat_ttl = \"5s\"\n\
             shutdown_grace = \"5s\"\n\
             # signs certificates for `cutover operator create`\n\
             ca_key = {ca_key:?}\n\
             # seals secrets at rest\n\
             master_key_file = {master_key:?}\n\
             [tls]\n\
             ca_cert = {ca:?}\n\
             cert = {cert:?}\n\
             key = {key:?}\n",
            data = dir.join("coordinator").display().to_string(),
            ca_key = pki.join(cutover_common::pki::CA_KEY).display().to_string(),
            master_key = master_key.display().to_string(),
            ca = pki.join("ca.crt").display().to_string(),
            cert = pki.join("coordinator.crt").display().to_string(),
            key = pki.join("coordinator.key").display().to_string(),
        ),
    )?;
    spawn(
        &server_bin,
        &[
            "server",
            "--config",
            &coordinator_config.display().to_string(),
        ],
        &logs.join("coordinator.log"),
        &dir.join("coordinator.pid"),
    )?;

    // `--artifact file://...` in a local cluster: the usual temp dir, the
    // cluster's dir and where the operator works.
    let mut file_artifact_dirs = vec![std::env::temp_dir().display().to_string()];
    file_artifact_dirs.push(dir.display().to_string());
    if let Ok(cwd) = std::env::current_dir() {
        file_artifact_dirs.push(cwd.display().to_string());
    }
    let mut label_lines = String::new();
    for (k, v) in &labels {
        writeln!(label_lines, "{k} = {v:?}")?;
    }
    for i in 1..=args.nodes {
        let name = format!("node-{i}");
        let identity = Identity::new(Role::Agent, &name)?;
        let stem = format!("agent-{name}");
        ca.issue_client(&identity, 365)?.write(&pki, &stem)?;
        let config_path = dir.join(format!("agent-{i}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "# written by `cutover dev up`\n\
                 coordinator = {coordinator_url:?}\n\
                 state_dir = {state:?}\n\
                 name = {name:?}\n\
                 address = \"127.0.0.{addr}\"\n\
                                  reconnect_max = \"5s\"\n\
                                  # `dev down` takes the apps down with the agents\n\
                 stop_services_on_shutdown = true\n\
                 # a local cluster reads file:// artifacts from here\n\
                 file_artifact_dirs = {file_dirs:?}\n\
                 docker_host = {docker_host:?}\n\
                 [tls]\n\
                 ca_cert = {ca:?}\n\
                 cert = {cert:?}\n\
                 key = {key:?}\n\
                 [labels]\n{label_lines}",
                state = dir.join("agents").join(&name).display().to_string(),
                file_dirs = file_artifact_dirs,
                addr = 10 + u16::from(i),
                ca = pki.join("ca.crt").display().to_string(),
                cert = pki.join(format!("{stem}.crt")).display().to_string(),
                key = pki.join(format!("{stem}.key")).display().to_string(),
            ),
        )?;
        spawn(
            &agent_bin,
            &["--config", &config_path.display().to_string()],
            &logs.join(format!("agent-{i}.log")),
            &dir.join(format!("agent-{i}.pid")),
        )?;
    }

    let env_file = dir.join("env");
    std::fs::write(
        &env_file,
        format!(
            "# source this file to point `cutover` at the local cluster\n\
             export CUTOVER_COORDINATOR={coordinator_url}\n\
             export CUTOVER_CA_CERT={}\n\
             export CUTOVER_CERT={}\n\
             export CUTOVER_KEY={}\n\
                          export CUTOVER_METRICS_URL=http://127.0.0.1:{http_port}/metrics\n{docker_lines}",
            pki.join("ca.crt").display(),
            pki.join(format!("operator-{OPERATOR}.crt")).display(),
            pki.join(format!("operator-{OPERATOR}.key")).display(),
            docker_lines = if docker {
                format!(
                    "export DOCKER_HOST={docker_host}\nexport CUTOVER_DEV_REGISTRY={}\n",
                    args.registry
                )
            } else {
                String::new()
            },
        ),
    )?;

    let connect = ConnectArgs {
        coordinator: Some(coordinator_url.clone()),
        server_name: None,
        ca_cert: Some(pki.join("ca.crt")),
        cert: Some(pki.join(format!("operator-{OPERATOR}.crt"))),
        key: Some(pki.join(format!("operator-{OPERATOR}.key"))),
        cli_config: None,
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_error = String::from("no answer yet");
    loop {
        if Instant::now() >= deadline {
            bail!(
                "the cluster in {} did not become ready within {}s ({last_error}); see the logs in {}, and stop it with `cutover dev down --dir {}`",
                dir.display(),
                READY_TIMEOUT.as_secs(),
                logs.display(),
                dir.display()
            );
        }
        if read_pid(&dir.join("coordinator.pid")).is_none() {
            bail!(
                "the coordinator exited during start-up; see {}",
                logs.join("coordinator.log").display()
            );
        }
        match connect.operator_client().await {
            Ok(mut client) => match client.list_nodes(ListNodesRequest {}).await {
                Ok(response) => {
                    let ready = response
                        .into_inner()
                        .nodes
                        .iter()
                        .filter(|n| {
                            n.status == NodeStatus::Ready as i32
                                && n.connected
                                && n.figures.is_some()
                        })
                        .count();
                    if ready >= usize::from(args.nodes) {
                        break;
                    }
                    last_error = format!("{ready} of {} nodes ready", args.nodes);
                }
                Err(status) => last_error = status.message().to_string(),
            },
            Err(error) => last_error = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "local cluster up in {}: coordinator {coordinator_url}, {} nodes ready\n\
         point this shell at it:  source {}\n\
         stop it:                 cutover dev down --dir {}",
        dir.display(),
        args.nodes,
        env_file.display(),
        dir.display()
    );
    if docker {
        println!(
            "docker: engine {docker_host}; push images to {} and deploy them with --image",
            args.registry
        );
    }
    Ok(())
}

/// Stops agents first, then the coordinator (so agents do not log a burst of
/// reconnects), each with SIGTERM and a bounded wait before SIGKILL.
pub fn down(dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("{} does not exist: nothing to stop", dir.display());
    }
    let mut stopped = 0;
    for pid_file in pid_files(dir)? {
        if let Some(pid) = read_pid(&pid_file) {
            stop_process(pid, Duration::from_secs(10));
            stopped += 1;
        }
        if pid_file.starts_with(dir.join("agents")) {
            continue;
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    println!(
        "stopped {stopped} processes of the cluster in {}",
        dir.display()
    );
    Ok(())
}

fn stop_process(pid: i32, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    let target = nix::unistd::Pid::from_raw(pid);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !pid_alive(pid) || is_zombie(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(target, Signal::SIGKILL);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
