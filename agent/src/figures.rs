//! The system figures an agent reports with each heartbeat.

use std::path::PathBuf;

use cutover_proto::v1::SystemFigures;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

pub struct Sampler {
    system: System,
    state_dir: PathBuf,
}

impl Sampler {
    pub fn new(state_dir: PathBuf) -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self { system, state_dir }
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
        }
    }
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
    }
}
