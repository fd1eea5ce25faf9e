//! The docker runtime's engine side: pulling images by digest and running,
//! watching, signalling and removing release containers through the Docker
//! Engine API on the local socket.
//!
//! The agent supervises containers itself (restart policy `no`), exactly as
//! it supervises processes: the supervisor in `supervisor.rs` drives both
//! (through `container.rs`), this module only speaks to the engine.

use std::collections::HashMap;
use std::net::IpAddr;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::auth::DockerCredentials;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use cutover_common::registry::{registry_of, RegistryCredential};
use tokio_stream::StreamExt;

/// The oldest engine API the agent speaks (Docker 20.10, Debian 12's
/// `docker.io`); newer engines accept it, so no version negotiation is
/// needed before the first call.
const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// How long one engine call may take, pulls excepted (they stream).
const ENGINE_TIMEOUT_SECS: u64 = 120;

pub const LABEL_SERVICE: &str = "cutover.service";
pub const LABEL_RELEASE: &str = "cutover.release";
pub const LABEL_NODE: &str = "cutover.node";
/// The agent's node id (unique per state dir): what orphan cleanup matches,
/// so two agents sharing an engine never touch each other's containers.
pub const LABEL_NODE_ID: &str = "cutover.node-id";
/// The agent identity (`name@CA fingerprint`) and state dir that started
/// the container: how an agent on another state dir finds it (see
/// `ownership`).
pub const LABEL_OWNER: &str = "cutover.owner";
pub const LABEL_STATE_DIR: &str = "cutover.state-dir";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the docker engine at {host}: {reason}; is dockerd running, and may the agent's user use its socket (root, or the docker group)?")]
    Unreachable { host: String, reason: String },
    #[error("permission denied on the docker socket {host}: add the agent's user to the docker group or run the agent as root")]
    PermissionDenied { host: String },
    #[error("image {image} not found in its registry: {message}; check its name and tag (`image` in the spec, or --image)")]
    ImageNotFound { image: String, message: String },
    #[error("the registry refused access to image {image}: {message}; check the credentials for {registry} in the agent config")]
    AuthRefused {
        image: String,
        registry: String,
        message: String,
    },
    #[error("no space left for image {image}: {message}; free disk space on the node (docker image prune) and retry")]
    DiskFull { image: String, message: String },
    #[error("pulling image {image} failed: {message}; can the node reach its registry?")]
    Pull { image: String, message: String },
    #[error("docker engine refused to {action}: {message}; `journalctl -u docker` on the node says more")]
    Engine { action: String, message: String },
}

/// What a release container needs besides its image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    pub host_network: bool,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub init: bool,
    pub service: String,
}

/// A handle on the local engine, shared by every service of the agent. The
/// client is made on first use, so an agent on a node without docker runs
/// process releases as before and only docker releases fail, clearly.
#[derive(Clone)]
pub struct DockerEngine {
    host: String,
    node: String,
    node_id: String,
    credentials: Arc<Vec<RegistryCredential>>,
    client: Arc<Mutex<Option<Docker>>>,
    /// The owner labels of the containers it creates.
    owner: Option<(String, String)>,
}

impl std::fmt::Debug for DockerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerEngine")
            .field("host", &self.host)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl PartialEq for DockerEngine {
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host && self.node == other.node
    }
}

impl DockerEngine {
    /// `host` is a socket path or `unix://` URL.
    pub fn new(
        host: &str,
        node: &str,
        node_id: &str,
        credentials: Vec<RegistryCredential>,
    ) -> Self {
        Self {
            host: host.to_string(),
            node: node.to_string(),
            node_id: node_id.to_string(),
            credentials: Arc::new(credentials),
            client: Arc::new(Mutex::new(None)),
            owner: None,
        }
    }

    /// Labels the containers it creates with `owner`'s identity and state
    /// dir.
    pub fn with_owner(mut self, owner: &crate::runtime::ownership::Owner) -> Self {
        self.owner = Some((
            owner.identity.clone(),
            owner.state_dir.display().to_string(),
        ));
        self
    }

    fn client(&self) -> Result<Docker, DockerError> {
        let mut client = self.client.lock().expect("docker client lock");
        if let Some(client) = client.as_ref() {
            return Ok(client.clone());
        }
        let path = self.host.trim_start_matches("unix://");
        let made = Docker::connect_with_unix(path, ENGINE_TIMEOUT_SECS, &API_VERSION)
            .map_err(|e| self.classify(e, "connect"))?;
        *client = Some(made.clone());
        Ok(made)
    }

    /// Turns a bollard error into one that says what to do.
    fn classify(&self, error: bollard::errors::Error, action: &str) -> DockerError {
        use bollard::errors::Error as E;
        let text = error.to_string();
        match error {
            E::SocketNotFoundError(_) | E::HyperResponseError { .. } | E::IOError { .. } => {
                if text.contains("ermission denied") {
                    DockerError::PermissionDenied {
                        host: self.host.clone(),
                    }
                } else {
                    DockerError::Unreachable {
                        host: self.host.clone(),
                        reason: text,
                    }
                }
            }
            E::DockerResponseServerError { message, .. } => DockerError::Engine {
                action: action.to_string(),
                message,
            },
            _ => DockerError::Engine {
                action: action.to_string(),
                message: text,
            },
        }
    }

    fn credentials_for(&self, image: &str) -> Option<DockerCredentials> {
        let registry = registry_of(image);
        self.credentials
            .iter()
            .find(|c| c.registry == registry)
            .map(|c| DockerCredentials {
                username: Some(c.username.clone()),
                password: Some(c.password.clone()),
                serveraddress: Some(c.registry.clone()),
                ..DockerCredentials::default()
            })
    }

    /// Whether the engine has `image` already (a pinned digest never
    /// changes, so a present image needs no pull).
    async fn has_image(&self, image: &str) -> Result<bool, DockerError> {
        match self.client()?.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(error) => Err(self.classify(error, "inspect an image")),
        }
    }

    /// The image's own stop signal (its `STOPSIGNAL`), if it sets one.
    pub async fn image_stop_signal(&self, image: &str) -> Option<String> {
        let info = self.client().ok()?.inspect_image(image).await.ok()?;
        info.config?.stop_signal.filter(|s| !s.is_empty())
    }

    /// Pulls `image` (pinned by digest), reading the whole progress stream:
    /// any error item in it fails the pull. `progress` hears a summary (layers
    /// and bytes) at most once a second.
    pub async fn pull(
        &self,
        image: &str,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<(), DockerError> {
        if self.has_image(image).await? {
            progress("image present");
            return Ok(());
        }
        let client = self.client()?;
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = client.create_image(Some(options), None, self.credentials_for(image));
        let mut layers: HashMap<String, (i64, i64, bool)> = HashMap::new();
        let mut last_report = Instant::now();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| self.pull_error(image, e))?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(self.pull_failure(image, detail));
            }
            let (Some(id), Some(status)) = (info.id, info.status) else {
                continue;
            };
            // "Pulling from REPO" names the reference, not a layer.
            if status.starts_with("Pulling from") {
                continue;
            }
            let layer = layers.entry(id).or_insert((0, 0, false));
            match status.as_str() {
                "Downloading" => {
                    if let Some(detail) = info.progress_detail {
                        layer.0 = detail.current.unwrap_or(layer.0);
                        layer.1 = detail.total.unwrap_or(layer.1);
                    }
                }
                "Pull complete" | "Already exists" | "Download complete" => {
                    layer.0 = layer.1;
                    layer.2 = status != "Download complete" || layer.2;
                }
                _ => {}
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                progress(&describe_pull(&layers));
            }
        }
        progress(&describe_pull(&layers));
        // A stream that ended without an error item but left no image (an
        // engine that closed it early) is a failure too.
        if !self.has_image(image).await? {
            return Err(DockerError::Pull {
                image: image.to_string(),
                message: "the pull ended but the engine has no such image".into(),
            });
        }
        tracing::info!(%image, layers = layers.len(), "image pulled");
        Ok(())
    }

    fn pull_error(&self, image: &str, error: bollard::errors::Error) -> DockerError {
        use bollard::errors::Error as E;
        match error {
            E::DockerStreamError { error } => self.pull_failure(image, error),
            E::DockerResponseServerError { message, .. } => self.pull_failure(image, message),
            other => self.classify(other, "pull an image"),
        }
    }

    fn pull_failure(&self, image: &str, message: String) -> DockerError {
        let lower = message.to_lowercase();
        let image = image.to_string();
        if lower.contains("unauthorized")
            || lower.contains("authentication required")
            || lower.contains("denied")
            || lower.contains("no basic auth credentials")
        {
            DockerError::AuthRefused {
                registry: registry_of(&image).to_string(),
                image,
                message,
            }
        } else if lower.contains("not found") || lower.contains("manifest unknown") {
            DockerError::ImageNotFound { image, message }
        } else if lower.contains("no space left") {
            DockerError::DiskFull { image, message }
        } else {
            DockerError::Pull { image, message }
        }
    }

    /// Creates and starts a release container publishing `port` on
    /// `address` (bridge) or sharing the node's network (host). The agent
    /// supervises it: restart policy `no`, logs rotated by the engine.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        name: &str,
        spec: &ContainerSpec,
        command: &[String],
        env: &[(String, String)],
        address: IpAddr,
        port: u16,
        logs: (u64, u32),
    ) -> Result<String, DockerError> {
        let client = self.client()?;
        let env: Vec<String> = env
            .iter()
            .map(|(k, v)| match (k.as_str(), spec.host_network) {
                // In its own network namespace the container must listen on
                // all of its addresses; the engine publishes the node side.
                ("HOST", false) => "HOST=0.0.0.0".to_string(),
                _ => format!("{k}={v}"),
            })
            .collect();
        let mut labels = HashMap::from([
            (LABEL_SERVICE.to_string(), spec.service.clone()),
            (LABEL_RELEASE.to_string(), name.to_string()),
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_NODE_ID.to_string(), self.node_id.clone()),
        ]);
        if let Some((identity, state_dir)) = &self.owner {
            labels.insert(LABEL_OWNER.to_string(), identity.clone());
            labels.insert(LABEL_STATE_DIR.to_string(), state_dir.clone());
        }
        let published = (port != 0 && !spec.host_network).then(|| format!("{port}/tcp"));
        let host_config = HostConfig {
            network_mode: Some(if spec.host_network { "host" } else { "bridge" }.into()),
            port_bindings: published.as_ref().map(|p| {
                HashMap::from([(
                    p.clone(),
                    Some(vec![PortBinding {
                        host_ip: Some(address.to_string()),
                        host_port: Some(port.to_string()),
                    }]),
                )])
            }),
            memory: (spec.memory_bytes > 0).then_some(spec.memory_bytes as i64),
            nano_cpus: (spec.cpus > 0.0).then_some((spec.cpus * 1e9) as i64),
            init: spec.init.then_some(true),
            // The agent restarts a crashed release itself, with backoff and
            // a crash count; the engine restarting it too would race that.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), logs.0.to_string()),
                    ("max-file".to_string(), (logs.1 + 1).to_string()),
                ])),
            }),
            ..HostConfig::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!command.is_empty()).then(|| command.to_vec()),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: published.map(|p| vec![p]),
            host_config: Some(host_config),
            ..ContainerCreateBody::default()
        };
        let container_name = format!("{name}-{}", random_suffix());
        let options = CreateContainerOptionsBuilder::default()
            .name(&container_name)
            .build();
        let created = client
            .create_container(Some(options), body)
            .await
            .map_err(|e| self.classify(e, &format!("create container {container_name}")))?;
        if let Err(error) = client.start_container(&created.id, None).await {
            self.remove(&created.id).await;
            return Err(self.classify(error, &format!("start container {container_name}")));
        }
        tracing::info!(release = %name, container = %short(&created.id), image = %spec.image, "container started");
        Ok(created.id)
    }

    /// Waits for the container to stop and says how it ended.
    pub async fn wait(&self, id: &str) -> String {
        let Ok(client) = self.client() else {
            return "the docker engine is unreachable".into();
        };
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut stream = client.wait_container(id, Some(options));
        match stream.next().await {
            Some(Ok(response)) => format!("exit status: {}", response.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, error })) => {
                if error.is_empty() {
                    format!("exit status: {code}")
                } else {
                    format!("exit status: {code} ({error})")
                }
            }
            Some(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })) => "the container is gone".into(),
            Some(Err(error)) => {
                // The engine went away (restart, crash): poll until the
                // container is known to be down, never report it down early.
                tracing::warn!(container = %short(id), %error, "waiting on the container failed, polling it");
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Ok(false) = self.running(id).await {
                        return "exited while the engine was unreachable".into();
                    }
                }
            }
            None => "the engine ended the wait".into(),
        }
    }

    /// Whether the container exists and runs; an unreachable engine is an
    /// error, not "no".
    pub async fn running(&self, id: &str) -> Result<bool, DockerError> {
        match self.client()?.inspect_container(id, None).await {
            Ok(info) => Ok(info.state.and_then(|s| s.running).unwrap_or(false)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(error) => Err(self.classify(error, "inspect a container")),
        }
    }

    pub async fn signal(&self, id: &str, signal: &str) {
        let Ok(client) = self.client() else { return };
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        if let Err(error) = client.kill_container(id, Some(options)).await {
            // 409: not running any more, the expected case after an exit.
            tracing::debug!(container = %short(id), %signal, %error, "signalling the container failed");
        }
    }

    /// Kills (if it still runs) and removes the container.
    pub async fn remove(&self, id: &str) {
        let Ok(client) = self.client() else { return };
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match client.remove_container(id, Some(options)).await {
            Ok(()) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(error) => {
                tracing::warn!(container = %short(id), %error, "cannot remove the container")
            }
        }
    }

    /// Removes an image no kept release uses; one a container still uses
    /// (another service, an operator's) is left, as the engine refuses it.
    pub async fn remove_image(&self, image: &str) {
        let Ok(client) = self.client() else { return };
        match client
            .remove_image(
                image,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_) => tracing::info!(%image, "pruned image"),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                message,
            }) => tracing::debug!(%image, %message, "image left in place"),
            Err(error) => tracing::warn!(%image, %error, "cannot prune image"),
        }
    }

    /// Runs `command` inside the container (a stop command), up to `timeout`.
    pub async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<i64, DockerError> {
        let client = self.client()?;
        let config = bollard::models::ExecConfig {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            ..bollard::models::ExecConfig::default()
        };
        let exec = client
            .create_exec(id, config)
            .await
            .map_err(|e| self.classify(e, "run a command in the container"))?;
        client
            .start_exec(
                &exec.id,
                Some(bollard::exec::StartExecOptions {
                    detach: true,
                    ..bollard::exec::StartExecOptions::default()
                }),
            )
            .await
            .map_err(|e| self.classify(e, "run a command in the container"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let state = client
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| self.classify(e, "inspect a command in the container"))?;
            if state.running != Some(true) {
                return Ok(state.exit_code.unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return Err(DockerError::Engine {
                    action: "finish the command in time".into(),
                    message: format!(
                        "still running after {}",
                        humantime::format_duration(timeout)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Containers this node's agents made, by id, with their release label.
    pub async fn node_containers(&self) -> Result<Vec<(String, String)>, DockerError> {
        self.labelled(
            &format!("{LABEL_NODE_ID}={}", self.node_id),
            true,
            LABEL_RELEASE,
        )
        .await
    }

    /// The running containers agents of `identity` started, by id, with
    /// the state dir of the agent that did.
    pub async fn running_of(&self, identity: &str) -> Result<Vec<(String, String)>, DockerError> {
        self.labelled(&format!("{LABEL_OWNER}={identity}"), false, LABEL_STATE_DIR)
            .await
    }

    /// Containers with label `filter` (stopped ones too with `all`), by id,
    /// with their `label`; those without it are left out.
    async fn labelled(
        &self,
        filter: &str,
        all: bool,
        label: &str,
    ) -> Result<Vec<(String, String)>, DockerError> {
        let options = ListContainersOptionsBuilder::default()
            .all(all)
            .filters(&HashMap::from([(
                "label".to_string(),
                vec![filter.to_string()],
            )]))
            .build();
        let listed = self
            .client()?
            .list_containers(Some(options))
            .await
            .map_err(|e| self.classify(e, "list containers"))?;
        Ok(listed
            .into_iter()
            .filter_map(|c| {
                let value = c.labels?.get(label)?.clone();
                Some((c.id?, value))
            })
            .collect())
    }
}

/// "2/5 layers, 12.3 of 40.0 MiB"
fn describe_pull(layers: &HashMap<String, (i64, i64, bool)>) -> String {
    let done = layers.values().filter(|l| l.2).count();
    let current: i64 = layers.values().map(|l| l.0).sum();
    let total: i64 = layers.values().map(|l| l.1).sum();
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    format!(
        "pulling: {done}/{} layers, {:.1} of {:.1} MiB",
        layers.len(),
        mib(current),
        mib(total)
    )
}

fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The 12-character id docker shows.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_failures_say_what_went_wrong() {
        let engine = DockerEngine::new("/nonexistent.sock", "n1", "id-1", Vec::new());
        let image = "127.0.0.1:5000/shop@sha256:00";
        assert!(matches!(
            engine.pull_failure(image, "manifest unknown: manifest unknown".into()),
            DockerError::ImageNotFound { .. }
        ));
        let refused = engine.pull_failure(image, "unauthorized: authentication required".into());
        assert!(refused.to_string().contains("127.0.0.1:5000"), "{refused}");
        assert!(matches!(
            engine.pull_failure(
                image,
                "write /var/lib/docker/x: no space left on device".into()
            ),
            DockerError::DiskFull { .. }
        ));
    }

    #[tokio::test]
    async fn a_missing_engine_is_a_clear_error() {
        let engine = DockerEngine::new("unix:///nonexistent/docker.sock", "n1", "id-1", Vec::new());
        let error = engine.pull("shop@sha256:00", &|_| {}).await.unwrap_err();
        assert!(error.to_string().contains("is dockerd running"), "{error}");
    }
}
