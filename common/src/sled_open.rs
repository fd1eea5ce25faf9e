//! Opening a sled database whose lock may still be held for a moment.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long a held lock is waited for.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens `config` at `dir`, waiting up to a few seconds while another
/// process (or this one) still holds its lock: a store closed a moment ago
/// (a restart in place, sled's flusher finishing its last pass) or a
/// predecessor killed with SIGKILL that the kernel has not finished tearing
/// down. A lock still held after that is a real second user, and the error.
pub fn open(config: sled::Config, dir: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + LOCK_WAIT;
    let config = config.path(dir);
    loop {
        match config.open() {
            // sled reports a held lock as an `Other` i/o error.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}
