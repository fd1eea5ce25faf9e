//! The docker runtime: a release runs as a container of its pinned image,
//! driven by the same supervisor as a process group; the engine calls are
//! `docker.rs`'s.

use nix::sys::signal::Signal;

use super::docker::{short, DockerEngine};
use super::job::{Completion, Job, JobError};
use super::supervisor::{ContainerLaunch, ProcessError, ProcessSpec};
use super::{BoxFuture, Instance, InstanceId, Runtime};

/// Runs releases as containers, as `launch` says.
pub struct ContainerRuntime {
    launch: ContainerLaunch,
}

impl ContainerRuntime {
    pub fn new(launch: ContainerLaunch) -> Self {
        Self { launch }
    }
}

/// A release's container.
pub(super) struct Container {
    engine: DockerEngine,
    id: String,
}

impl Container {
    /// The recorded container, if it still runs; one stopped but still
    /// there is removed, so a restart starts clean.
    pub(super) async fn adopt(engine: &DockerEngine, id: String) -> Option<Self> {
        match engine.running(&id).await {
            Ok(true) => Some(Self {
                engine: engine.clone(),
                id,
            }),
            Ok(false) => {
                engine.remove(&id).await;
                None
            }
            Err(error) => {
                tracing::error!(container = %short(&id), %error, "cannot check the release's container");
                None
            }
        }
    }
}

impl Runtime for ContainerRuntime {
    fn start<'a>(
        &'a self,
        spec: &'a ProcessSpec,
        env: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, ProcessError>> {
        Box::pin(async move {
            let launch = &self.launch;
            let id = launch
                .engine
                .run(
                    &spec.name,
                    &launch.spec,
                    &spec.command,
                    env,
                    launch.address,
                    launch.port,
                    (spec.log_max_bytes, spec.log_keep),
                )
                .await
                .map_err(|source| ProcessError::Container {
                    name: spec.name.clone(),
                    source: Box::new(source),
                })?;
            let container: Box<dyn Instance> = Box::new(Container {
                engine: launch.engine.clone(),
                id,
            });
            Ok(container)
        })
    }

    fn run_to_completion<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Completion, JobError>> {
        Box::pin(std::future::ready(Err(JobError::Unsupported {
            name: job.name.clone(),
            runtime: "docker",
        })))
    }
}

impl Instance for Container {
    fn id(&self) -> InstanceId {
        InstanceId::Container {
            container: self.id.clone(),
        }
    }

    fn signal(&self, signal: Signal) -> BoxFuture<'_, ()> {
        Box::pin(self.engine.signal(&self.id, signal.as_str()))
    }

    fn clear(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.engine.remove(&self.id))
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        Box::pin(self.engine.wait(&self.id))
    }

    fn run_stop_command<'a>(&'a self, spec: &'a ProcessSpec) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match self
                .engine
                .exec(&self.id, &spec.stop_command, spec.stop_timeout)
                .await
            {
                Ok(0) => {}
                Ok(code) => tracing::warn!(release = %spec.name, code, "stop command failed"),
                Err(error) => {
                    tracing::warn!(release = %spec.name, %error, "cannot run the stop command")
                }
            }
        })
    }
}
