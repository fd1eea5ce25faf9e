//! A real Docker engine and registries for the docker runtime's tests, as
//! `scripts/test.sh` starts them (`scripts/docker-env.sh`): images of the
//! sample app are built `FROM scratch` here and pushed, nothing is pulled
//! from the internet.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

/// Where the engine and the registries are; a test run without them (plain
/// `cargo test`) fails here, saying how to get them.
pub struct DockerEnv {
    pub registry: String,
    pub auth_registry: String,
}

pub fn docker_env() -> DockerEnv {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run the tests with ./scripts/test.sh, which starts a docker engine and the test registries")
        })
    };
    // Checked here so a missing engine fails with its reason, not later as
    // a confusing rollout error.
    docker(&["info", "--format", "{{.ServerVersion}}"]);
    DockerEnv {
        registry: var("CUTOVER_TEST_REGISTRY"),
        auth_registry: var("CUTOVER_TEST_AUTH_REGISTRY"),
    }
}

/// The test registry's login (scripts/docker-env.sh).
pub const AUTH_LOGIN: (&str, &str) = ("cutover", "secret");

/// Runs the docker CLI; panics with its output on failure.
pub fn docker(args: &[&str]) -> String {
    docker_in(None, args)
}

/// The docker CLI with its own config dir (a registry login that must not
/// touch the user's `~/.docker`).
fn docker_in(config: Option<&Path>, args: &[&str]) -> String {
    let mut command = Command::new("docker");
    if let Some(config) = config {
        command.env("DOCKER_CONFIG", config);
    }
    let output = command.args(args).output().expect("run the docker CLI");
    assert!(
        output.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The sample app (`fixtures/sample-app.rs`) as a static binary, built once
/// per source version into the target dir; concurrent tests each build in a
/// temp dir of their own (rustc's intermediate files are named after the
/// crate) and rename, so none sees half a binary.
pub fn sample_app() -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sample-app.rs");
    let text = std::fs::read(&source).expect("read the sample app source");
    let mut hasher = sha2::Sha256::new();
    hasher.update(&text);
    let hash = cutover_common::digest::Digest::from_hasher(hasher).hex()[..12].to_string();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/sample-app")
        .join(hash);
    let binary = dir.join("sample-app");
    if binary.exists() {
        return binary;
    }
    std::fs::create_dir_all(&dir).expect("create the sample app dir");
    let build = tempfile::tempdir_in(&dir).expect("a build dir");
    let temp = build.path().join("sample-app");
    let status = Command::new("rustc")
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
        ])
        .args(["-C", "strip=symbols", "-o"])
        .arg(&temp)
        .arg(&source)
        .status()
        .expect("run rustc");
    assert!(status.success(), "building the static sample app failed");
    std::fs::rename(&temp, &binary).expect("move the sample app in place");
    binary
}

/// Builds an image of the sample app answering `version`, pushes it as
/// `reference` (REGISTRY/REPO:TAG) and returns the digest the registry
/// holds it under. `env` adds `ENV` lines (e.g. BROKEN=1). The local copy
/// is removed again: agents share this engine, and must really pull.
pub fn push_sample_image(reference: &str, version: &str, env: &[(&str, &str)]) -> String {
    let context = tempfile::tempdir().expect("build context");
    std::fs::copy(sample_app(), context.path().join("sample-app")).expect("copy the app");
    // An image of its own for each reference, from the first step on: tests
    // running at once would otherwise build on the same cached intermediate
    // images, and one test (or an agent's pruning) removing its image would
    // pull them from under another's build.
    let mut dockerfile = format!(
        "FROM scratch\nLABEL cutover.test.reference={reference:?}\nCOPY sample-app /sample-app\nENV VERSION={version}\n"
    );
    for (key, value) in env {
        dockerfile.push_str(&format!("ENV {key}={value}\n"));
    }
    dockerfile.push_str("ENTRYPOINT [\"/sample-app\"]\n");
    std::fs::write(context.path().join("Dockerfile"), dockerfile).expect("write the Dockerfile");
    docker(&[
        "build",
        "--quiet",
        "-t",
        reference,
        &context.path().display().to_string(),
    ]);
    // Pushes to the registry that wants a login log in first.
    let registry = cutover_common::registry::registry_of(reference);
    let login = std::env::var("CUTOVER_TEST_AUTH_REGISTRY").is_ok_and(|r| r == registry);
    let config = tempfile::tempdir().expect("docker config dir");
    let config = login.then_some(config.path());
    if login {
        docker_in(
            config,
            &["login", "-u", AUTH_LOGIN.0, "-p", AUTH_LOGIN.1, registry],
        );
    }
    docker_in(config, &["push", "--quiet", reference]);
    let repo_digest = docker(&[
        "inspect",
        "--format",
        "{{range .RepoDigests}}{{println .}}{{end}}",
        reference,
    ]);
    let repo = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
    let digest = repo_digest
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{repo}@")))
        .unwrap_or_else(|| panic!("no digest for {reference} in {repo_digest:?}"))
        .to_string();
    docker(&["rmi", reference]);
    assert!(
        !image_present(&format!("{repo}@{digest}")),
        "the local copy is gone"
    );
    digest
}

/// Whether the engine holds `reference` (e.g. `REPO@sha256:...`).
pub fn image_present(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .expect("run the docker CLI")
        .status
        .success()
}

/// Containers the agent with this node id made (`cutover.node-id` label).
pub fn containers_of(node_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=cutover.node-id={node_id}"),
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// The image (as created, `REPO@sha256:...`) and state of a container.
pub fn container_image_and_state(id: &str) -> (String, String) {
    let out = docker(&[
        "inspect",
        "--format",
        "{{.Config.Image}} {{.State.Status}}",
        id,
    ]);
    let (image, state) = out.split_once(' ').expect("image and state");
    (image.to_string(), state.to_string())
}

/// Removes the containers of these node ids when dropped, so a failed test
/// leaves nothing running on a shared engine.
pub struct ContainerCleanup(pub Vec<String>);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        for node_id in &self.0 {
            for id in containers_of(node_id) {
                let _ = Command::new("docker").args(["rm", "-f", &id]).output();
            }
        }
    }
}
