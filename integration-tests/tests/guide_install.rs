//! The operator guide's install chapters, run as written: the `sh` blocks of
//! "Install a coordinator" and "Add a node" in docs/operator-guide.md, taken
//! from the markdown, with the machine's paths moved into a scratch root
//! (`/etc/cutover`, `/var/lib`, `/usr/local/bin`, `/etc/systemd/system`),
//! the example names and port on loopback, and the token pasted at the
//! `read` prompt. `useradd` creates the real service users (once per
//! machine), and `systemctl enable --now` runs the installed unit's
//! `ExecStart=` as its `User=` with its `Environment=`, `UMask=` and
//! `StateDirectory=` (the sandbox options need systemd itself; the units
//! are checked by `systemd-analyze verify` in deploy.rs). Then, as those
//! unprivileged users, the coordinator signs and rotates keys and the agent
//! renews onto a new CA, both writing their PKI dirs; and a key the service
//! user cannot read stops the coordinator with an error naming the file,
//! its owner and mode, and the user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cutover_integration_tests::bin;

/// The `sh` blocks of the guide's chapter `heading`, in order.
fn blocks(guide: &str, heading: &str) -> Vec<String> {
    let start = guide
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the guide has no chapter {heading:?}"));
    let chapter = &guide[start + heading.len() + 2..];
    let chapter = &chapter[..chapter.find("\n## ").unwrap_or(chapter.len())];
    chapter
        .split("```sh\n")
        .skip(1)
        .map(|rest| rest[..rest.find("```").expect("a closed block")].to_string())
        .collect()
}

/// What the guide writes for a real machine, and where the test puts it.
struct Moves(Vec<(String, String)>);

impl Moves {
    fn apply(&self, text: &str) -> String {
        self.0
            .iter()
            .fold(text.to_string(), |text, (from, to)| text.replace(from, to))
    }

    /// The same moves as a sed script, for the units `systemctl` reads.
    fn sed(&self) -> String {
        self.0
            .iter()
            .map(|(from, to)| format!("s|{}|{to}|g\n", from.replace('.', "\\.")))
            .collect()
    }
}

/// One machine of the guide (the coordinator's, a node) in the scratch
/// root: its `/etc/cutover`, `/var/lib` and logs.
struct Machine {
    root: PathBuf,
    moves: Moves,
}

const PRELUDE: &str = r#"set -euo pipefail
useradd() { # once per machine: the users outlive the test
  local name="${*: -1}"
  id -u "$name" >/dev/null 2>&1 || command useradd "$@"
}
systemctl() {
  case "$1" in
    daemon-reload) ;;
    enable)
      [ "$2" = --now ] || { echo "only systemctl enable --now is emulated" >&2; return 1; }
      shift 2
      for unit in "$@"; do start_unit "$unit"; done ;;
    *) echo "systemctl $1 is not emulated" >&2; return 1 ;;
  esac
}
start_unit() {
  local text key user state mode umask envs=() cmd=()
  text=$(sed -f "$MACHINE/moves.sed" "$UNITS/$1.service")
  key() { printf '%s\n' "$text" | sed -n "s/^$1=//p"; }
  user=$(key User); state=$(key StateDirectory); mode=$(key StateDirectoryMode); umask=$(key UMask)
  if [ -n "$state" ]; then
    mkdir -p "$VAR/$state" && chown "$user:" "$VAR/$state" && chmod "${mode:-0755}" "$VAR/$state"
  fi
  while builtin read -r line; do [ -n "$line" ] && envs+=("$line"); done < <(key Environment)
  builtin read -r -a cmd <<< "$(key ExecStart)"
  (umask "${umask:-0022}"; exec setsid runuser -u "$user" -- env "${envs[@]}" "${cmd[@]}") \
    > "$MACHINE/$1.log" 2>&1 &
  echo $! > "$MACHINE/$1.pid"
}
read() { # the operator pastes the token `cutover token create` printed
  CUTOVER_JOIN_TOKEN=$(cat "$MACHINE/token")
}
"#;

impl Machine {
    fn new(scratch: &Path, name: &str, common: &[(String, String)]) -> Self {
        let root = scratch.join(name);
        for dir in ["etc", "var/lib", "home"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let mut moves = vec![
            ("/etc/cutover".to_string(), path(&root.join("etc/cutover"))),
            ("/var/lib/".to_string(), path(&root.join("var/lib")) + "/"),
        ];
        moves.extend(common.iter().cloned());
        let machine = Self {
            root,
            moves: Moves(moves),
        };
        std::fs::write(machine.root.join("moves.sed"), machine.moves.sed()).unwrap();
        machine
    }

    /// Runs `block` of the guide here as root, the operator's home in the
    /// scratch root; returns its output, or panics with it.
    fn run(&self, scratch: &Path, block: &str) -> String {
        let script = format!("{PRELUDE}\n{}", self.moves.apply(block));
        let output = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(workspace())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    path(&scratch.join("bin")),
                    std::env::var("PATH").unwrap()
                ),
            )
            .env("HOME", scratch.join("home"))
            .env("MACHINE", &self.root)
            .env("UNITS", scratch.join("systemd"))
            .env("VAR", self.root.join("var/lib"))
            .env_remove("CUTOVER_CLI_CONFIG")
            .output()
            .expect("run bash");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{script}\n---\n{text}");
        text
    }

    fn log(&self, unit: &str) -> String {
        std::fs::read_to_string(self.root.join(format!("{unit}.log"))).unwrap_or_default()
    }

    fn stop(&self, unit: &str) {
        stop(&self.root, unit);
    }
}

/// Stops a unit the emulated systemctl started on the machine at `root`
/// (its whole process group) and waits for it to be gone.
fn stop(root: &Path, unit: &str) {
    let Ok(pid) = std::fs::read_to_string(root.join(format!("{unit}.pid"))) else {
        return;
    };
    let group = nix::unistd::Pid::from_raw(-pid.trim().parse::<i32>().unwrap());
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while nix::sys::signal::kill(group, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let _ = std::fs::remove_file(root.join(format!("{unit}.pid")));
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cutover ARGS` as the admin the guide made (its credentials in the
/// scratch home).
fn cutover(scratch: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(scratch.join("bin/cutover"))
        .args(args)
        .env("HOME", scratch.join("home"))
        .env_remove("CUTOVER_CLI_CONFIG")
        .output()
        .expect("run cutover");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match done() {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => panic!("{what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Stops every unit at the end, however the test ends.
struct Units(Vec<(PathBuf, &'static str)>);

impl Drop for Units {
    fn drop(&mut self) {
        for (root, unit) in &self.0 {
            stop(root, unit);
        }
    }
}

#[test]
fn the_install_chapters_work_as_written_for_unprivileged_services() {
    let guide = std::fs::read_to_string(workspace().join("docs/operator-guide.md")).unwrap();
    let coordinator_blocks = blocks(&guide, "## Install a coordinator");
    let node_blocks = blocks(&guide, "## Add a node");
    assert_eq!(coordinator_blocks.len(), 1, "{coordinator_blocks:#?}");
    // The token, the join; then the offline way, not run here.
    assert_eq!(node_blocks.len(), 3, "{node_blocks:#?}");

    // Users other than root must reach the scratch root.
    let scratch = tempfile::tempdir().unwrap();
    let scratch = scratch.path();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in ["bin", "systemd", "home"] {
        std::fs::create_dir_all(scratch.join(dir)).unwrap();
    }
    let (grpc, http) = (free_port(), free_port());
    let config = scratch.join("coordinator.toml");
    let common = vec![
        (
            "target/release/cutover-agent".to_string(),
            path(&bin("cutover-agent")),
        ),
        ("target/release/cutover".to_string(), path(&bin("cutover"))),
        (
            "/usr/local/bin/".to_string(),
            path(&scratch.join("bin")) + "/",
        ),
        (
            "/etc/systemd/system/".to_string(),
            path(&scratch.join("systemd")) + "/",
        ),
        ("deploy/config/coordinator.toml".to_string(), path(&config)),
        (
            "coord.example.internal".to_string(),
            "localhost".to_string(),
        ),
        (":7443".to_string(), format!(":{grpc}")),
    ];
    let coordinator = Machine::new(scratch, "coordinator", &common);
    // The config as shipped, with this machine's paths and the test's
    // loopback ports: the "adjust it" of the guide.
    let shipped =
        std::fs::read_to_string(workspace().join("deploy/config/coordinator.toml")).unwrap();
    let adjusted = coordinator
        .moves
        .apply(&shipped)
        .replace(
            &format!("\"0.0.0.0:{grpc}\""),
            &format!("\"127.0.0.1:{grpc}\""),
        )
        .replace("\"127.0.0.1:7480\"", &format!("\"127.0.0.1:{http}\""));
    assert!(
        adjusted.contains(&format!("listen = \"127.0.0.1:{grpc}\"")),
        "{adjusted}"
    );
    std::fs::write(&config, adjusted).unwrap();

    let mut units = Units(Vec::new());
    units.0.push((coordinator.root.clone(), "cutover"));
    let said = coordinator.run(scratch, &coordinator_blocks[0]);
    assert!(said.contains("CA fingerprint"), "{said}");
    let pki = coordinator.root.join("etc/cutover/pki");
    use std::os::unix::fs::MetadataExt;
    let owner = nix::unistd::User::from_name("cutover")
        .unwrap()
        .expect("useradd ran");
    for file in ["ca.key", "master.key", "coordinator.key"] {
        let meta = std::fs::metadata(pki.join(file)).unwrap();
        assert_eq!(meta.uid(), owner.uid.as_raw(), "{file}");
    }
    wait_until(
        "the coordinator answers",
        Duration::from_secs(30),
        || match cutover(scratch, &["nodes"]) {
            (true, _) => Ok(()),
            (false, text) => Err(format!("{text}\n{}", coordinator.log("cutover"))),
        },
    );

    // A node: the token on the operator's machine, the rest on the node.
    let node = Machine::new(scratch, "node", &common);
    let created = node.run(scratch, &node_blocks[0]);
    let token = created
        .split_whitespace()
        .find(|w| w.starts_with("cutover-join."))
        .unwrap_or_else(|| panic!("no token: {created}"));
    let fingerprint = created
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no fingerprint: {created}"));
    std::fs::write(node.root.join("token"), token).unwrap();
    let node = Machine {
        moves: Moves(
            node.moves
                .0
                .iter()
                .cloned()
                .chain([("sha256:...".to_string(), fingerprint.to_string())])
                .collect(),
        ),
        root: node.root,
    };
    std::fs::write(node.root.join("moves.sed"), node.moves.sed()).unwrap();
    units.0.push((node.root.clone(), "cutover-agent"));
    node.run(scratch, &node_blocks[1]);
    let agent_user = nix::unistd::User::from_name("cutover-agent")
        .unwrap()
        .expect("useradd ran");
    let state = node.root.join("var/lib/cutover-agent");
    wait_until("the node is ready", Duration::from_secs(30), || {
        let (ok, text) = cutover(scratch, &["nodes", "-o", "json"]);
        let nodes: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        match ok
            && nodes
                .as_array()
                .is_some_and(|n| n.len() == 1 && n[0]["status"] == "ready")
        {
            true => Ok(()),
            false => Err(format!("{text}\n{}", node.log("cutover-agent"))),
        }
    });
    assert_eq!(
        std::fs::metadata(&state).unwrap().uid(),
        agent_user.uid.as_raw()
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&cutover(scratch, &["nodes", "-o", "json"]).1).unwrap();
    assert_eq!(nodes[0]["labels"]["env"], "production", "{nodes:#}");

    // As the service users, the keys rotate: the coordinator rewrites
    // master.key and writes a new CA in its PKI dir; the agent renews onto
    // it and writes its own.
    let (ok, text) = cutover(scratch, &["secret", "rotate-master-key"]);
    assert!(ok, "{text}\n{}", coordinator.log("cutover"));
    let (ok, text) = cutover(scratch, &["ca", "rotate"]);
    assert!(ok, "{text}\n{}", coordinator.log("cutover"));
    wait_until(
        "the node moves to the new CA",
        Duration::from_secs(90),
        || {
            let (ok, text) = cutover(scratch, &["ca", "status", "-o", "json"]);
            let status: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
            match ok && status["nodes"][0]["moved"] == true {
                true => Ok(()),
                false => Err(format!("{status:#}\n{}", node.log("cutover-agent"))),
            }
        },
    );

    // A key the service user may not read: the coordinator stops and says
    // which file, whose it is, its mode and who asked.
    coordinator.stop("cutover");
    let ca_key = pki.join("ca.key");
    nix::unistd::chown(
        &ca_key,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(0)),
    )
    .unwrap();
    let restart = "systemctl enable --now cutover";
    coordinator.run(scratch, restart);
    wait_until(
        "the coordinator refuses to start",
        Duration::from_secs(15),
        || {
            let log = coordinator.log("cutover");
            match log.contains(&format!(
            "permission denied: the file {} is owned by root:root with mode 0600, and this process runs as cutover",
            ca_key.display()
        )) {
            true => Ok(()),
            false => Err(log),
        }
        },
    );
    drop(units);
}
