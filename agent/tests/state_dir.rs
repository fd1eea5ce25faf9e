//! What the agent keeps in its state dir: who may read it, and what is
//! pruned from it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cutover_agent::artifacts::{cache_file_name, Digest};
use cutover_agent::runtime::docker::DockerEngine;
use cutover_agent::runtime::ownership::Owner;
use cutover_agent::services::{NodeServices, NodeSettings};
use cutover_agent::state::{self, Journal};
use cutover_common::modes::{mode_of, PRIVATE_DIR, PRIVATE_FILE};
use cutover_common::release::ReleaseSpec;
use cutover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

mod common;

const APP: &str = include_str!("fixtures/app.py");

fn settings(state_dir: &Path, sources: &Path, releases_keep: usize) -> NodeSettings {
    NodeSettings {
        address: "127.0.0.1".parse().unwrap(),
        ports: 20000..=29999,
        state_dir: state_dir.to_path_buf(),
        artifact_ca: None,
        file_artifact_dirs: vec![sources.to_path_buf()],
        log_max_bytes: 1 << 20,
        log_keep: 2,
        releases_keep,
        trusted_networks: Vec::new(),
        inherited: Default::default(),
        owner: Owner::new(
            &state_dir.display().to_string(),
            "test",
            "sha256:test",
            state_dir,
        ),
        // A node id of its own (see `a_release_process_no_record_names_...`).
        docker: DockerEngine::new(
            "unix:///var/run/docker.sock",
            "test",
            &state_dir.display().to_string(),
            Vec::new(),
        ),
    }
}

/// The test app's archive for `version` in `sources` (each version has
/// other bytes, so another digest).
fn archive(sources: &Path, version: &str) -> (PathBuf, Digest) {
    let path = sources.join(format!("app-{version}.tar.gz"));
    common::tar_gz(&path, &[("app.py", APP), ("VERSION", version)]);
    let digest = Digest::of_file(&path).unwrap();
    (path, digest)
}

/// Release `web-<version>` of the test app as the coordinator sends it
/// and the agent checks it, served on `listen`.
fn release(sources: &Path, version: &str, listen: u16) -> (ReleaseSpec, Digest) {
    let (path, digest) = archive(sources, version);
    let http = |path: &str, body: &str| pb::Check {
        probe: Some(pb::check::Probe::Http(pb::HttpProbe {
            path: path.into(),
            body_contains: body.into(),
            ..Default::default()
        })),
        timeout_ms: 1000,
    };
    let release = pb::Release {
        release_id: format!("web-{version}"),
        service: "web".into(),
        version: version.into(),
        artifact: Some(pb::Artifact {
            url: format!("file://{}", path.display()),
            digest: digest.to_string(),
        }),
        command: vec!["python3".into(), "app.py".into()],
        env: [("VERSION".to_string(), version.to_string())].into(),
        kind: Some(pb::release::Kind::Web(pb::WebService {
            listen: format!("127.0.0.1:{listen}"),
            also_listen: Vec::new(),
            health: Some(http("/health", "")),
            health_interval_ms: 100,
            healthy_threshold: 1,
            healthy_deadline_ms: 10_000,
            smoke: vec![http("/", version)],
            drain_timeout_ms: 5_000,
        })),
        stop_grace_ms: 5_000,
        ..Default::default()
    };
    (ReleaseSpec::try_from(&release).unwrap(), digest)
}

fn walk(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            walk(&path, into);
        }
        into.push(path);
    }
}

/// Dirs under `dir` that are not 0700 and files that are not 0600.
fn not_private(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut all = Vec::new();
    walk(dir, &mut all);
    all.push(dir.to_path_buf());
    all.into_iter()
        .filter(|path| !path.is_symlink())
        .filter_map(|path| {
            let mode = mode_of(&path).unwrap();
            let wanted = if path.is_dir() {
                PRIVATE_DIR
            } else {
                PRIVATE_FILE
            };
            (mode != wanted).then_some((path, mode))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private_whatever_the_umask() {
    // As when the agent is started by hand, outside its systemd unit.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let root = tempfile::tempdir().unwrap();
    let (state, sources) = (root.path().join("state"), root.path().join("sources"));
    std::fs::create_dir_all(&sources).unwrap();
    // What an older agent left, readable by everyone.
    let open = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    std::fs::create_dir_all(state.join("artifacts")).unwrap();
    std::fs::create_dir_all(state.join("logs/web/web-v0")).unwrap();
    let old_archive = state
        .join("artifacts")
        .join(format!("sha256-{}.tar.gz", "ab".repeat(32)));
    std::fs::write(&old_archive, "cached").unwrap();
    let old_log = state.join("logs/web/web-v0/stdout.log");
    std::fs::write(&old_log, "secret in a log").unwrap();
    std::fs::write(
        state.join("node-id"),
        "6f1c2a52-3d0b-4c55-9d43-2f2b1b0c8a11\n",
    )
    .unwrap();
    for (path, mode) in [
        (state.as_path(), 0o755),
        (&state.join("artifacts"), 0o755),
        (&old_archive, 0o644),
        (&old_log, 0o644),
        (&state.join("node-id"), 0o644),
    ] {
        open(path, mode);
    }

    // The agent's start-up, then a prepared release.
    state::node_id(&state).unwrap();
    let mut journal = Journal::open(&state).unwrap();
    journal.record(pb::CommandResult::default()).unwrap();
    let services = NodeServices::open(settings(&state, &sources, 5), CancellationToken::new())
        .await
        .unwrap();
    let (v1, _) = release(&sources, "v1", 1);
    services.prepare(&v1, &|_| {}).await.unwrap();

    assert_eq!(mode_of(&state).unwrap(), PRIVATE_DIR);
    for file in ["node-id", "commands.journal"] {
        assert_eq!(mode_of(&state.join(file)).unwrap(), PRIVATE_FILE, "{file}");
    }
    for dir in ["db", "artifacts", "logs"] {
        assert_eq!(not_private(&state.join(dir)), [], "{dir}");
    }
    assert_eq!(mode_of(&state.join("releases")).unwrap(), PRIVATE_DIR);
    assert_eq!(
        mode_of(&state.join("releases/web-v1/app.py")).unwrap(),
        0o644,
        "a release's own files keep the modes they need to run"
    );
}

/// The release dirs and cached artifacts on the node.
fn on_disk(state: &Path) -> (Vec<String>, Vec<String>) {
    let list = |dir: &str| cutover_agent::retention::list(&state.join(dir));
    (list("releases"), list("artifacts"))
}

fn expected(versions: &[&str], digests: &BTreeMap<String, Digest>) -> (Vec<String>, Vec<String>) {
    let mut archives: Vec<String> = versions
        .iter()
        .map(|v| cache_file_name(&digests[*v]))
        .collect();
    archives.sort();
    let dirs = versions.iter().map(|v| format!("web-{v}")).collect();
    (dirs, archives)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_the_last_releases_and_what_a_rollout_still_needs() {
    let root = tempfile::tempdir().unwrap();
    let (state, sources) = (root.path().join("state"), root.path().join("sources"));
    std::fs::create_dir_all(&sources).unwrap();
    let open = |releases_keep| {
        NodeServices::open(
            settings(&state, &sources, releases_keep),
            CancellationToken::new(),
        )
    };
    let services = open(3).await.unwrap();
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let mut digests = BTreeMap::new();
    for i in 1..=8 {
        let version = format!("v{i}");
        let (release, digest) = release(&sources, &version, port);
        services
            .activate(
                &release,
                false,
                &HashMap::new(),
                &HashMap::new(),
                cutover_agent::service::KeepPrevious::Stop,
                &|_| {},
            )
            .await
            .unwrap();
        digests.insert(version, digest);
    }
    assert_eq!(on_disk(&state), expected(&["v6", "v7", "v8"], &digests));

    // Prepared for a rollout that has not activated it yet: it stays.
    let (v9, digest) = release(&sources, "v9", port);
    services.prepare(&v9, &|_| {}).await.unwrap();
    digests.insert("v9".into(), digest);
    services.prune().await;
    assert_eq!(
        on_disk(&state),
        expected(&["v6", "v7", "v8", "v9"], &digests)
    );
    let measured = ["releases", "artifacts"]
        .iter()
        .map(|dir| cutover_agent::retention::disk_usage(&state.join(dir)))
        .sum::<u64>();
    assert_eq!(services.release_disk_bytes(), measured);
    assert!(measured > 0);

    // At start-up, keeping none of the history: the active and previous
    // releases stay, and the prepared one.
    services.shut_down(false).await;
    drop(services);
    let services = open(0).await.unwrap();
    assert_eq!(on_disk(&state), expected(&["v7", "v8", "v9"], &digests));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client
        .get(format!("http://127.0.0.1:{port}/").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "v8 still serves, from its dir");
    services.shut_down(true).await;
}

/// An agent killed between starting a release and recording it left the
/// process running, labelled as this node's: the next agent stops it. A
/// release process of another node (another agent's state dir on this
/// host) and a process without the label are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_process_no_record_names_is_stopped_at_start() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let start = |label: Option<&str>| {
        let mut command = std::process::Command::new("sleep");
        command.arg("300").process_group(0);
        if let Some(node) = label {
            command.env(cutover_agent::runtime::ownership::NODE_LABEL, node);
        }
        command.spawn().unwrap()
    };
    let state = dir.path().join("state");
    let mut orphan = start(Some(&state.display().to_string()));
    let mut other_node = start(Some("another-node"));
    let mut unlabelled = start(None);
    let services = NodeServices::open(settings(&state, dir.path(), 5), CancellationToken::new())
        .await
        .unwrap();
    let exited = orphan.try_wait().unwrap();
    assert!(exited.is_some(), "the orphan still runs");
    assert!(other_node.try_wait().unwrap().is_none());
    assert!(unlabelled.try_wait().unwrap().is_none());
    for mut child in [other_node, unlabelled] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    drop(services);
}
