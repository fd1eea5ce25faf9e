//! The system figures an agent reports with each heartbeat.

use std::path::PathBuf;

use cutover_proto::v1::SystemFigures;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

pub struct Sampler {
    system: System,
    state_dir: PathBuf,
    /// Read once: the OS does not change under a running agent.
    os: String,
}

impl Sampler {
    pub fn new(state_dir: PathBuf) -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            system,
            state_dir,
            os: os_name(),
        }
    }

    /// CPU use is measured between two calls: every sample covers the time
    /// since the previous one, i.e. one heartbeat interval. The disk the
    /// releases take is the services' to measure (after their changes, not
    /// every heartbeat): it comes in as `release_disk_bytes`.
    pub fn sample(&mut self, release_disk_bytes: u64) -> SystemFigures {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let load = System::load_average();
        let (disk_free_bytes, disk_total_bytes) = match nix::sys::statvfs::statvfs(&self.state_dir)
        {
            Ok(stat) => {
                let fragment = stat.fragment_size();
                (stat.blocks_available() * fragment, stat.blocks() * fragment)
            }
            Err(error) => {
                tracing::warn!(%error, dir = %self.state_dir.display(), "cannot stat state dir");
                (0, 0)
            }
        };
        SystemFigures {
            cpu_percent: f64::from(self.system.global_cpu_usage()),
            load_1: load.one,
            load_5: load.five,
            load_15: load.fifteen,
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disk_free_bytes,
            disk_total_bytes,
            uptime_seconds: System::uptime(),
            release_disk_bytes,
            os: self.os.clone(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
        }
    }
}

/// os-release's PRETTY_NAME (or NAME and VERSION), empty where there is
/// none.
fn os_name() -> String {
    let text = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_default();
    pretty_name(&text)
}

fn pretty_name(os_release: &str) -> String {
    let field = |name: &str| {
        os_release.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_string())
        })
    };
    field("PRETTY_NAME")
        .or_else(|| {
            Some(format!(
                "{} {}",
                field("NAME")?,
                field("VERSION").unwrap_or_default()
            ))
        })
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = Sampler::new(dir.path().to_path_buf());
        let _ = sampler.sample(0);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let figures = sampler.sample(4096);
        assert!(figures.memory_total_bytes > 0);
        assert!(figures.memory_used_bytes <= figures.memory_total_bytes);
        assert!(
            figures.disk_total_bytes >= figures.disk_free_bytes && figures.disk_total_bytes > 0
        );
        assert!((0.0..=100.0).contains(&figures.cpu_percent));
        assert!(figures.uptime_seconds > 0);
        assert_eq!(figures.release_disk_bytes, 4096);
        assert!(figures.cpus >= 1);
        // The test machine is a Debian with an os-release.
        assert!(!figures.os.is_empty());
    }

    #[test]
    fn the_os_is_its_pretty_name_or_its_name_and_version() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n";
        assert_eq!(pretty_name(debian), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(pretty_name("NAME=Alpine\nVERSION=3.20\n"), "Alpine 3.20");
        assert_eq!(pretty_name("NAME=Plain\n"), "Plain");
        assert_eq!(pretty_name(""), "");
    }
}
