//! The Debian packages (`scripts/package.sh`), built from this run's
//! binaries and installed on this machine with dpkg: the binaries, units,
//! users, directories and modes the operator guide expects, units that
//! `systemd-analyze verify` accepts as installed, the man pages and
//! completions; and a purge that leaves nothing of theirs behind.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use cutover_integration_tests::require_tool;

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{program} {args:?}: {text}");
    text
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn owner(path: &str) -> String {
    let uid = std::fs::metadata(path).unwrap().uid();
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .map_or(uid.to_string(), |u| u.name)
}

/// Purges the packages when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "cutover", "cutover-agent"])
            .output();
    }
}

#[test]
fn the_packages_install_what_the_guide_expects_and_purge_cleanly() {
    require_tool("systemd-analyze", "systemd");
    assert!(
        !Path::new("/etc/cutover").exists() && !Path::new("/usr/bin/cutover").exists(),
        "this machine has a cutover installation already (/etc/cutover or /usr/bin/cutover): the test installs and purges the packages, so run it where none is"
    );
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = tempfile::tempdir().unwrap();
    // The binaries of this run (scripts/test.sh built them).
    let built = run(
        "bash",
        &[
            &workspace.join("scripts/package.sh").display().to_string(),
            "--profile",
            "debug",
            "--no-build",
            "--out",
            &out.path().display().to_string(),
        ],
    );
    let debs: Vec<&str> = built.lines().filter(|l| l.ends_with(".deb")).collect();
    assert_eq!(debs.len(), 2, "{built}");
    let fields = run(
        "dpkg-deb",
        &["-f", debs[0], "Package", "Version", "Depends"],
    );
    assert!(
        fields.contains("Package: cutover\n")
            && fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );

    let _installed = Installed;
    let mut args = vec!["-i"];
    args.extend(&debs);
    run("dpkg", &args);

    // Binaries on the PATH, the units pointed at them.
    let version = run("/usr/bin/cutover", &["--version"]);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    run("/usr/bin/cutover-agent", &["--version"]);
    for (unit, binary) in [
        ("cutover.service", "ExecStart=/usr/bin/cutover server"),
        ("cutover-agent.service", "ExecStart=/usr/bin/cutover-agent"),
    ] {
        let path = format!("/lib/systemd/system/{unit}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(binary) && !text.contains("/usr/local/bin"),
            "{text}"
        );
        run("systemd-analyze", &["verify", &path]);
    }
    // The users and the dirs of the guide, with their modes.
    for user in ["cutover", "cutover-agent"] {
        assert!(
            nix::unistd::User::from_name(user).unwrap().is_some(),
            "{user}"
        );
    }
    assert_eq!(mode("/etc/cutover"), 0o755);
    assert_eq!(
        (owner("/etc/cutover/pki"), mode("/etc/cutover/pki")),
        ("cutover".into(), 0o700)
    );
    let config = "/etc/cutover/coordinator.toml";
    assert_eq!(mode(config), 0o640);
    let group = std::fs::metadata(config).unwrap().gid();
    assert_eq!(
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(group))
            .unwrap()
            .map(|g| g.name),
        Some("cutover".to_string())
    );
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "cutover"]);
    assert!(conffiles.contains(config), "{conffiles}");
    // Man pages and completions from the CLI's definition.
    assert!(Path::new("/usr/share/man/man1/cutover-lock.1.gz").exists());
    let completion =
        std::fs::read_to_string("/usr/share/bash-completion/completions/cutover").unwrap();
    assert!(
        completion.contains("unlock"),
        "the bash completion knows `unlock`"
    );

    // A purge: files, config and what postinst made are gone.
    run("dpkg", &["--purge", "cutover", "cutover-agent"]);
    for gone in [
        "/usr/bin/cutover",
        "/usr/bin/cutover-agent",
        "/lib/systemd/system/cutover.service",
        config,
        "/etc/cutover",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after the purge");
    }
}
