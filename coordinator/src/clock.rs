//! The time the coordinator's fleet view and rollouts read. Production
//! reads the wall clock; the rollout simulation reads tokio's time, which
//! under a paused runtime only moves when every task waits, so a seed
//! replays the same schedule at any machine speed.

#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    #[default]
    Wall,
    /// `epoch_ms` plus the tokio time elapsed since `start`.
    #[cfg(test)]
    Virtual {
        epoch_ms: i64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A virtual clock reading `epoch_ms` now (tokio's time, see above).
    #[cfg(test)]
    pub fn virtual_at(epoch_ms: i64) -> Self {
        Clock::Virtual {
            epoch_ms,
            start: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::Wall => cutover_common::now_ms(),
            #[cfg(test)]
            Clock::Virtual { epoch_ms, start } => {
                epoch_ms + i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX)
            }
        }
    }
}
