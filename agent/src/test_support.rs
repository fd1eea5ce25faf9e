//! Helpers for the unit tests of this crate.

/// Command lines of live processes that contain `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(needle))
        .collect()
}

/// A node's services in `dir` (state under `dir/state`), on 127.0.0.1,
/// with nothing running.
pub async fn node_services(dir: &std::path::Path) -> crate::services::NodeServices {
    use crate::services::{NodeServices, NodeSettings};
    use tokio_util::sync::CancellationToken;
    NodeServices::open(
        NodeSettings {
            address: "127.0.0.1".parse().unwrap(),
            ports: 20000..=29999,
            state_dir: dir.join("state"),
            artifact_ca: None,
            file_artifact_dirs: Vec::new(),
            log_max_bytes: 1 << 20,
            log_keep: 2,
            releases_keep: 5,
            trusted_networks: Vec::new(),
            inherited: Default::default(),
            owner: crate::runtime::ownership::Owner::new(
                &dir.display().to_string(),
                "test",
                "sha256:test",
                dir,
            ),
            // Its own node id: the open stops release processes
            // labelled with it that it has no record of.
            docker: crate::runtime::docker::DockerEngine::new(
                "unix:///var/run/docker.sock",
                "test",
                &dir.display().to_string(),
                Vec::new(),
            ),
        },
        CancellationToken::new(),
    )
    .await
    .unwrap()
}
