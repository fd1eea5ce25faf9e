//! How much memory a release's instance holds, for the heartbeat: a
//! blue/green deploy starts a second copy beside it on every node, and the
//! coordinator refuses one a node has no room for.

use std::path::Path;

use super::InstanceId;

/// Resident memory of `instance` in bytes: for a process, of every process
/// in its group (what it started too); for a container, what its cgroup is
/// charged. `None` when it cannot be read.
pub fn resident_bytes(instance: &InstanceId) -> Option<u64> {
    match instance {
        InstanceId::Process(process) => group_resident_bytes(process.pid),
        InstanceId::Container { container } => container_bytes(container),
    }
}

fn group_resident_bytes(group: u32) -> Option<u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()? as u64;
    let mut pages = 0u64;
    let mut members = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Gone since the listing, or another's: skipped.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state is
        // field 3, the process group 5, the resident pages 24 (proc(5)).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // A zombie holds no memory and is no member any more.
        if fields.first() == Some(&"Z")
            || fields.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(group)
        {
            continue;
        }
        pages += fields
            .get(21)
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        members += 1;
    }
    (members > 0).then_some(pages * page)
}

/// The container's cgroup v2 charge under the systemd or the cgroupfs
/// driver's layout.
fn container_bytes(container: &str) -> Option<u64> {
    [
        format!("/sys/fs/cgroup/system.slice/docker-{container}.scope/memory.current"),
        format!("/sys/fs/cgroup/docker/{container}/memory.current"),
    ]
    .iter()
    .find_map(|path| {
        std::fs::read_to_string(Path::new(path))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::process::ProcessId;

    #[test]
    fn a_process_group_counts_its_members_and_an_unknown_one_reads_none() {
        // This test's own process leads no group of its own in general:
        // start one that does, holding a few MiB.
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "x=$(head -c 8000000 /dev/zero | tr '\\0' a); sleep 30",
            ])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut bytes = 0;
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            bytes = resident_bytes(&InstanceId::Process(ProcessId::of(pid).unwrap())).unwrap();
            if bytes > 8_000_000 {
                break;
            }
        }
        let group = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        // Its sleep is reaped by init, a moment later.
        for _ in 0..50 {
            let gone = InstanceId::Process(ProcessId { pid, start_time: 0 });
            if resident_bytes(&gone).is_none() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(bytes > 8_000_000, "{bytes} bytes for a shell holding 8 MB");
        assert!(bytes < 200_000_000, "{bytes} bytes");
        let gone = InstanceId::Process(ProcessId { pid, start_time: 0 });
        assert_eq!(resident_bytes(&gone), None, "no member left");
        let unknown = InstanceId::Container {
            container: "0".repeat(64),
        };
        assert_eq!(resident_bytes(&unknown), None);
    }
}
