//! Every service on this node, and the commands that change them: prepare,
//! activate, admission, stop. Commands for one service run one at a time;
//! different services do not wait for each other.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cutover_common::fsutil::write_atomic;
use cutover_common::release::{Kind, ReleaseSpec, Source};
use cutover_proto::v1 as pb;
use nix::sys::signal::Signal;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::artifacts::{unpack, ArtifactCache, ArtifactError};
use crate::listeners::Inherited;
use crate::notify;
use crate::proxy::headers::Network;
use crate::proxy::{Proxy, ProxyConfig};
use crate::release_spec::{container_spec, stop_signal as release_stop_signal};
use crate::retention;
use crate::runtime::docker::{DockerEngine, DockerError};
use crate::service::{
    stop_leftovers, CutoverError, Service, ServiceKind, ServiceSettings, WebRelease,
};
use crate::store::{AgentStore, SideRecord, StoreError};
use cutover_common::modes;

mod activation;
mod levers;
mod listening;
mod orphans;
mod removal;

/// Node-wide settings for services, from the agent config.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub address: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub state_dir: PathBuf,
    pub artifact_ca: Option<PathBuf>,
    /// The only dirs `file://` artifacts may come from.
    pub file_artifact_dirs: Vec<PathBuf>,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// Release dirs kept per service (besides the active and previous ones).
    pub releases_keep: usize,
    /// Peers whose forwarding headers the proxies keep.
    pub trusted_networks: Vec<Network>,
    /// Runs docker releases.
    pub docker: DockerEngine,
    /// Listening sockets a previous agent left this one (see `listeners`).
    pub inherited: Arc<Inherited>,
    /// The labels of the release processes it starts.
    pub owner: crate::runtime::ownership::Owner,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid release: {0}")]
    Invalid(String),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Docker(Box<DockerError>),
    #[error(transparent)]
    Cutover(Box<CutoverError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {listen} for service {service}: {source}; {}", cutover_common::net::explain_bind(.listen, .source, "set the service's `listen` (or `also_listen`) in the spec"))]
    Bind {
        service: String,
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("service {service} runs here as {}, and release {release_id} is {}; a service cannot change between the two: `cutover service remove {service}` first, or deploy it under another name", kind_of(*.web), kind_of(!*.web))]
    KindChanged {
        service: String,
        release_id: String,
        /// Whether it runs as a web service now.
        web: bool,
    },
    #[error("no service {0} on this node: it never ran here, or was stopped or removed; `cutover nodes` shows what runs where")]
    UnknownService(String),
    #[error("{0}")]
    Levers(String),
    #[error(transparent)]
    Job(#[from] crate::runtime::job::JobError),
    #[error("cannot use {}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn bind_error(service: &str, listen: SocketAddr, error: std::io::Error) -> ServiceError {
    ServiceError::Bind {
        service: service.to_string(),
        listen,
        source: error,
    }
}

/// Gives systemd a copy of each listening socket of `proxy`, kept across a
/// crash of the agent.
fn keep_listeners(service: &str, proxy: &Proxy) {
    match proxy.listener_fds() {
        Ok(fds) => {
            for (listen, fd) in fds {
                notify::store_listener(listen, &fd);
            }
        }
        Err(error) => {
            tracing::warn!(%service, %error, "cannot copy the listening sockets")
        }
    }
}

fn state_dir_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ServiceError + '_ {
    move |source| ServiceError::StateDir {
        path: path.to_path_buf(),
        source,
    }
}

pub struct NodeServices {
    settings: NodeSettings,
    cache: ArtifactCache,
    store: Arc<AgentStore>,
    /// Stops every proxy listener when the agent shuts down.
    shutdown: CancellationToken,
    services: Mutex<BTreeMap<String, Arc<Mutex<Service>>>>,
    /// The last state of each service, for heartbeats sent while a command
    /// holds the service.
    snapshots: std::sync::Mutex<BTreeMap<String, pb::ServiceState>>,
    /// The open connection to the coordinator, for `coordinator:` artifacts.
    coordinator: std::sync::Mutex<Option<Channel>>,
    /// One prune at a time (activations of different services run at once).
    pruning: Mutex<()>,
    /// What prepares in progress use: a prune leaves it alone.
    in_use: Arc<retention::InUse>,
    /// Bytes release dirs and cached artifacts took when last measured.
    release_disk_bytes: AtomicU64,
    /// The incident levers of each web service's proxy, set without
    /// waiting for a command that holds the service.
    levers: std::sync::Mutex<BTreeMap<String, crate::proxy::LeverHandle>>,
    /// One `set_levers` at a time.
    levers_write: Mutex<()>,
}

impl From<CutoverError> for ServiceError {
    fn from(error: CutoverError) -> Self {
        ServiceError::Cutover(Box::new(error))
    }
}

impl From<DockerError> for ServiceError {
    fn from(error: DockerError) -> Self {
        ServiceError::Docker(Box::new(error))
    }
}

fn kind_of(web: bool) -> &'static str {
    match web {
        true => "a web service (with `listen`)",
        false => "a worker (without `listen`)",
    }
}

impl NodeServices {
    /// Opens the agent store and brings back every service it records (see
    /// `Service::recover`).
    pub async fn open(
        settings: NodeSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, ServiceError> {
        let store = Arc::new(AgentStore::open(&settings.state_dir.join("db"))?);
        // Private, also when an older agent (or umask) left them open to
        // others; the files of releases keep their modes, logs do not.
        let (releases, logs) = (
            settings.state_dir.join("releases"),
            settings.state_dir.join("logs"),
        );
        modes::private_dir(&releases).map_err(state_dir_error(&releases))?;
        retention::remove_leftovers(&releases);
        modes::private_dir(&logs)
            .and_then(|()| modes::restrict_tree(&logs))
            .map_err(state_dir_error(&logs))?;
        let cache = ArtifactCache::open(
            settings.state_dir.join("artifacts"),
            settings.artifact_ca.as_deref(),
            &settings.file_artifact_dirs,
        )?;
        retention::remove_leftovers(cache.dir());
        let node = Self {
            settings,
            cache,
            store,
            shutdown,
            services: Mutex::new(BTreeMap::new()),
            snapshots: std::sync::Mutex::new(BTreeMap::new()),
            coordinator: std::sync::Mutex::new(None),
            pruning: Mutex::new(()),
            in_use: Arc::default(),
            release_disk_bytes: AtomicU64::new(0),
            levers: std::sync::Mutex::new(BTreeMap::new()),
            levers_write: Mutex::new(()),
        };
        for name in node.store.service_names()? {
            let Some(record) = node.store.service(&name)? else {
                continue;
            };
            if record.active.is_none() {
                // Nothing serves, but a first cutover or a stop may have been
                // cut short: what it left must not run on unsupervised (nor
                // a side release, which runs beside a serving one only).
                let mut leftovers = record.leftovers;
                leftovers.extend(record.side.iter().flat_map(SideRecord::as_leftovers));
                if !leftovers.is_empty() || record.side.is_some() {
                    stop_leftovers(&name, &leftovers, &node.settings.docker).await;
                    node.store.update_service(&name, |current| {
                        let mut record = current?;
                        record.leftovers.clear();
                        record.side = None;
                        Some(record)
                    })?;
                }
                continue;
            }
            // One service that cannot come back must not keep the others
            // (and the agent) down: it is logged and left out.
            let listens: Vec<SocketAddr> = record
                .listen
                .iter()
                .chain(&record.also_listen)
                .copied()
                .collect();
            match node.bind(&name, &listens).await {
                Ok(service) => {
                    node.remember(&service);
                    let service = crate::service::shared(service, node.shutdown.clone());
                    node.services.lock().await.insert(name, service);
                }
                Err(error) => {
                    // Its socket, inherited or not, is closed: systemd must
                    // not keep it, clients would wait on it for nothing.
                    for listen in listens {
                        notify::forget_listener(listen);
                    }
                    tracing::error!(service = %name, %error, "cannot bring the service back")
                }
            }
        }
        // A port whose service went away while no agent ran is free again.
        node.settings.inherited.close_unclaimed();
        node.remove_orphan_containers().await;
        node.stop_orphan_processes().await;
        node.prune().await;
        Ok(node)
    }

    /// Brings up a service: its proxy on `listens` (none for a worker) and
    /// whatever the store says it ran.
    async fn bind(&self, name: &str, listens: &[SocketAddr]) -> Result<Service, ServiceError> {
        let kind = match listens.split_first() {
            Some((&listen, also)) => {
                let mut config = ProxyConfig::new(name, listen);
                config.trusted_networks = self.settings.trusted_networks.clone();
                let inherited = self.settings.inherited.take(listen);
                let proxy = Proxy::bind_or_inherit(config, self.shutdown.clone(), inherited)
                    .await
                    .map_err(|e| bind_error(name, listen, e))?;
                self.listen_also(name, &proxy, also).await?;
                keep_listeners(name, &proxy);
                ServiceKind::Web(proxy)
            }
            None => ServiceKind::Worker,
        };
        let settings = ServiceSettings {
            name: name.to_string(),
            address: self.settings.address,
            ports: self.settings.ports.clone(),
            log_root: self.release_logs().join(name),
            log_max_bytes: self.settings.log_max_bytes,
            log_keep: self.settings.log_keep,
            docker: self.settings.docker.clone(),
            owner: self.settings.owner.clone(),
        };
        let service = Service::recover(settings, kind, self.store.clone()).await?;
        if let Some(proxy) = service.proxy() {
            self.levers
                .lock()
                .expect("levers lock")
                .insert(name.to_string(), proxy.levers());
        }
        // Clients that waited in the backlog of an inherited socket meet
        // the release the service serves, not a 502 of a proxy without
        // routes.
        if let Some(proxy) = service.proxy() {
            proxy.start_accepting();
        }
        Ok(service)
    }

    fn remember(&self, service: &Service) {
        let state = service.state();
        self.snapshots
            .lock()
            .expect("snapshots lock")
            .insert(state.service.clone(), state);
    }

    /// The `prepare` command: fetches, verifies and unpacks a release for a
    /// cutover to come; returns it ready to start.
    pub async fn prepare(
        &self,
        release: &ReleaseSpec,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<WebRelease, ServiceError> {
        let ready = self.make_ready(release, progress).await;
        self.measure_disk().await;
        ready
    }

    /// Fetches, verifies and unpacks a release (pulls its image); returns
    /// it ready to start. It stays on disk until activated, or for
    /// `retention::PREPARED_KEEP`.
    pub(crate) async fn make_ready(
        &self,
        release: &ReleaseSpec,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<WebRelease, ServiceError> {
        let (container, artifact_digest) = match &release.source {
            Source::Container(container) => {
                (Some(container_spec(container, &release.service)), None)
            }
            Source::Artifact { digest, .. } => (None, Some(digest)),
        };
        let (health, gate, smoke, min_healthy_time, drain_timeout) = match &release.kind {
            Kind::Web(web) => (
                Some(web.health.clone()),
                web.gate.clone(),
                web.smoke.clone(),
                Duration::ZERO,
                web.drain_timeout,
            ),
            // A worker has no proxy, nothing to drain.
            Kind::Worker(worker) => (
                worker.health.clone(),
                worker.gate.clone(),
                Vec::new(),
                worker.min_healthy_time,
                Duration::ZERO,
            ),
        };
        let secrets: Vec<String> = release.secrets.iter().map(|s| s.name.clone()).collect();
        let mut stop_signal = match release.stop_signal {
            None => Signal::SIGTERM,
            Some(name) => release_stop_signal(name, "stop_signal")?,
        };
        let workdir = self
            .settings
            .state_dir
            .join("releases")
            .join(&release.release_id);
        // Held before the disk is looked at, noted (for prunes after an agent
        // restart) before anything lands on it: a prune keeps it either way.
        let _held = self.in_use.hold(
            [
                Some(workdir.clone()),
                artifact_digest.map(|digest| self.cache.path_for(digest)),
            ]
            .into_iter()
            .flatten()
            .collect(),
        );
        self.store.note_prepared(
            &release.release_id,
            artifact_digest.map(ToString::to_string),
            cutover_common::now_ms(),
        )?;
        match &release.source {
            Source::Container(container) => {
                progress("pulling");
                self.settings
                    .docker
                    .pull(&container.image, progress)
                    .await?;
                // Without a stop signal in the spec, the image's own (its
                // STOPSIGNAL, e.g. SIGQUIT for nginx) is the one it expects.
                if release.stop_signal.is_none() {
                    let image_signal = self
                        .settings
                        .docker
                        .image_stop_signal(&container.image)
                        .await;
                    if let Some(signal) = image_signal {
                        stop_signal = release_stop_signal(
                            &signal,
                            &format!(
                                "image {} stops with a signal the agent does not send (set the service's stop_signal to override it)",
                                container.image
                            ),
                        )?;
                    }
                }
                // The release dir holds only the image's name: retention
                // prunes docker releases like any other, and their images
                // with them.
                modes::private_dir(&workdir)
                    .and_then(|()| {
                        write_atomic(
                            &workdir.join(retention::IMAGE_FILE),
                            container.image.as_bytes(),
                            modes::PRIVATE_FILE,
                        )
                    })
                    .map_err(|e| {
                        ServiceError::Invalid(format!(
                            "cannot record the release in {}: {e}",
                            workdir.display()
                        ))
                    })?;
            }
            Source::Artifact { url, digest } => {
                self.unpack_artifact(url, digest, &workdir, progress)
                    .await?;
            }
        }
        Ok(WebRelease {
            release_id: release.release_id.clone(),
            command: release.command.clone(),
            workdir,
            env: release.env.clone(),
            health,
            gate,
            smoke,
            stop_signal,
            stop_grace: release.stop_grace,
            min_healthy_time,
            stop_command: release.stop_command.clone(),
            stop_timeout: release.stop_timeout,
            drain_timeout,
            container,
            secrets,
            secret_values: Default::default(),
            hooks: release.hooks.clone(),
            hook_env: Vec::new(),
            queues: release.queues.clone(),
            instances: release.instances,
        })
    }

    /// Removes the release dirs and cached artifacts nothing keeps (see
    /// `retention`), and the images only removed docker releases ran; then
    /// measures what is left.
    pub async fn prune(&self) {
        let _one_at_a_time = self.pruning.lock().await;
        let releases = self.settings.state_dir.join("releases");
        let cache = self.cache.dir().to_path_buf();
        // The release records are read before the services': an activation
        // records its release active before it clears its prepared note.
        let (dirs, archives, mut images) = {
            let (releases, cache) = (releases.clone(), cache.clone());
            tokio::task::spawn_blocking(move || {
                let images = retention::release_images(&releases);
                (retention::list(&releases), retention::list(&cache), images)
            })
            .await
            .expect("prune listing panicked")
        };
        let read = || -> Result<_, StoreError> {
            let files = self.store.release_files()?;
            let mut services = Vec::new();
            for name in self.store.service_names()? {
                services.extend(self.store.service(&name)?);
            }
            Ok((files, services))
        };
        let (files, services) = match read() {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(%error, "cannot read what the releases need; nothing pruned");
                return;
            }
        };
        let plan = retention::plan(
            &services,
            &files,
            self.settings.releases_keep,
            cutover_common::now_ms(),
            &dirs,
            &archives,
        );
        let in_use = self.in_use.clone();
        let (removed, forget) = tokio::task::spawn_blocking(move || {
            in_use.remove_unused(&cache, &plan.archives);
            (in_use.remove_unused(&releases, &plan.dirs), plan.forget)
        })
        .await
        .expect("prune task panicked");
        if let Err(error) = self.store.forget_releases(&forget) {
            tracing::warn!(%error, "cannot forget pruned releases");
        }
        let mut unused = std::collections::BTreeSet::new();
        for release in &removed {
            tracing::info!(%release, "pruned release dir");
            unused.extend(images.remove(release));
        }
        // An image a kept release (or any of its own) still names stays.
        let kept: std::collections::BTreeSet<String> = images.into_values().collect();
        for image in unused.difference(&kept) {
            self.settings.docker.remove_image(image).await;
        }
        self.measure_disk().await;
    }

    /// Measures the disk release dirs and cached artifacts take, for
    /// heartbeats.
    async fn measure_disk(&self) {
        let dirs = [
            self.settings.state_dir.join("releases"),
            self.cache.dir().to_path_buf(),
        ];
        let used = tokio::task::spawn_blocking(move || {
            dirs.iter().map(|d| retention::disk_usage(d)).sum()
        })
        .await
        .expect("disk usage task panicked");
        self.release_disk_bytes.store(used, Ordering::Relaxed);
    }

    /// Bytes release dirs and cached artifacts took when last measured
    /// (after each prepare, prune and at start-up).
    pub fn release_disk_bytes(&self) -> u64 {
        self.release_disk_bytes.load(Ordering::Relaxed)
    }

    /// Where releases log: `<dir>/<service>/<release id>/`.
    pub fn release_logs(&self) -> PathBuf {
        self.settings.state_dir.join("logs")
    }

    /// The node's address, where its releases listen.
    pub fn address(&self) -> std::net::IpAddr {
        self.settings.address
    }

    /// Where plain tasks (scheduled jobs without a release) run: the
    /// agent's own, private dir, made on first use.
    pub(crate) fn jobs_dir(&self) -> Result<std::path::PathBuf, ServiceError> {
        let dir = self.settings.state_dir.join("jobs");
        modes::private_dir(&dir).map_err(state_dir_error(&dir))?;
        Ok(dir)
    }

    /// The open connection to the coordinator, if any.
    /// The artifact with `digest` (cached, else fetched from `url` and
    /// verified), unpacked at `dest`; one unpacked there before is kept.
    pub async fn unpack_artifact(
        &self,
        url: &str,
        digest: &cutover_common::digest::Digest,
        dest: &std::path::Path,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<(), ServiceError> {
        progress("fetching");
        let archive = self.cache.fetch(url, digest, self.coordinator()).await?;
        progress("unpacking");
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || unpack(&archive, &dest))
            .await
            .expect("unpack task panicked")?;
        Ok(())
    }

    pub fn coordinator(&self) -> Option<Channel> {
        self.coordinator.lock().expect("coordinator lock").clone()
    }

    /// See `AgentStore::observe_leader_token`.
    pub fn observe_leader_token(&self, token: i64) -> Result<Result<(), i64>, StoreError> {
        self.store.observe_leader_token(token)
    }

    pub fn set_coordinator(&self, channel: Option<Channel>) {
        *self.coordinator.lock().expect("coordinator lock") = channel;
    }

    /// Asks the coordinator for the secrets of every serving and side
    /// release that needs them and lacks them (the agent restarted: they were in memory
    /// only). Their supervisors (re)start them with the values from then on.
    pub async fn fetch_pending_secrets(&self) {
        let Some(channel) = self.coordinator() else {
            return;
        };
        let services: Vec<(String, Arc<Mutex<Service>>)> = self
            .services
            .lock()
            .await
            .iter()
            .map(|(name, service)| (name.clone(), service.clone()))
            .collect();
        let mut pending = Vec::new();
        for (name, service) in services {
            let releases = service.lock().await.pending_secrets();
            pending.extend(releases.into_iter().map(|release| (name.clone(), release)));
        }
        for (name, (release_id, names, slot)) in pending {
            let mut client =
                cutover_proto::v1::agent_service_client::AgentServiceClient::new(channel.clone());
            let request = pb::FetchSecretsRequest {
                service: name.clone(),
                release_id: release_id.clone(),
            };
            match client.fetch_secrets(request).await {
                Ok(response) => {
                    let mut values = response.into_inner().values;
                    let mut missing = Vec::new();
                    let found: Vec<(String, String)> = names
                        .iter()
                        .filter_map(|secret| match values.remove(secret) {
                            Some(value) => Some((secret.clone(), value)),
                            None => {
                                missing.push(secret.clone());
                                None
                            }
                        })
                        .collect();
                    if missing.is_empty() {
                        slot.fill(found);
                        tracing::info!(service = %name, release = %release_id, "secrets fetched again; the release can start");
                    } else {
                        tracing::error!(service = %name, release = %release_id, ?missing, "the coordinator sent no value for these secrets");
                    }
                }
                Err(status) => {
                    tracing::error!(service = %name, release = %release_id, error = %status.message(), "cannot fetch the release's secrets")
                }
            }
        }
    }

    async fn service(&self, name: &str) -> Result<Arc<Mutex<Service>>, ServiceError> {
        self.services
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| ServiceError::UnknownService(name.to_string()))
    }

    /// Admits or drains one service, or every service when `service` is empty.
    pub async fn set_admission(&self, service: &str, admitted: bool) -> Result<(), ServiceError> {
        let targets: Vec<_> = if service.is_empty() {
            self.services.lock().await.values().cloned().collect()
        } else {
            vec![self.service(service).await?]
        };
        for target in targets {
            let target = target.lock().await;
            target.set_admitted(admitted)?;
            self.remember(&target);
        }
        Ok(())
    }

    /// The state of every service, without waiting for running commands.
    pub fn state(&self) -> Vec<pb::ServiceState> {
        let services = match self.services.try_lock() {
            Ok(services) => services.values().cloned().collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        for service in services {
            if let Ok(service) = service.try_lock() {
                self.remember(&service);
            }
        }
        let mut states: Vec<pb::ServiceState> = self
            .snapshots
            .lock()
            .expect("snapshots lock")
            .values()
            .cloned()
            .collect();
        self.fill_levers(&mut states);
        states
    }

    /// Agent shutdown: stops supervising every release, leaving it running
    /// for the next agent to adopt, or, with `stop`, draining and stopping
    /// it first. Returns the proxies, still accepting, for the caller to
    /// close or hand off.
    pub async fn shut_down(&self, stop: bool) -> Vec<Proxy> {
        let services = std::mem::take(&mut *self.services.lock().await);
        let mut proxies = Vec::new();
        for (name, service) in services {
            match removal::sole(service).await {
                Ok(mut service) => {
                    if stop && service.stop().await.is_some() {
                        tracing::info!(service = %name, "stopped the service on shutdown");
                    }
                    proxies.extend(service.release().await);
                }
                // Its proxy ends with the agent's shutdown signal.
                Err(_) => {
                    tracing::warn!(service = %name, "a command still holds the service on shutdown")
                }
            }
        }
        proxies
    }

    /// The addresses the proxies listen on, sorted.
    pub async fn listen_addresses(&self) -> Vec<SocketAddr> {
        let services: Vec<_> = self.services.lock().await.values().cloned().collect();
        let mut addresses = Vec::new();
        for service in services {
            addresses.extend(
                service
                    .lock()
                    .await
                    .proxy()
                    .map(Proxy::listens)
                    .unwrap_or_default(),
            );
        }
        addresses.sort();
        addresses
    }

    /// Copies of the proxies' listening sockets, for a successor agent.
    pub async fn listener_fds(&self) -> std::io::Result<Vec<(SocketAddr, std::os::fd::OwnedFd)>> {
        let services: Vec<_> = self.services.lock().await.values().cloned().collect();
        let mut fds = Vec::new();
        for service in services {
            if let Some(proxy) = service.lock().await.proxy() {
                fds.extend(proxy.listener_fds()?);
            }
        }
        Ok(fds)
    }
}

/// The environment entries of a release's secrets, from the values the
/// coordinator sent with the command.
pub(crate) fn secret_env(
    names: &[String],
    values: &std::collections::HashMap<String, String>,
) -> Result<Vec<(String, String)>, ServiceError> {
    names
        .iter()
        .map(|name| {
            let value = values.get(name).ok_or_else(|| {
                ServiceError::Invalid(format!("the coordinator sent no value for secret {name}"))
            })?;
            Ok((name.clone(), value.clone()))
        })
        .collect()
}
