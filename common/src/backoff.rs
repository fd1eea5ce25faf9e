//! Jittered exponential backoff for reconnect loops.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling) keeps
//! thousands of agents that lost the same coordinator from reconnecting in
//! lockstep when it comes back.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call widens the window.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(2u32.saturating_pow(self.attempt))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
    }

    /// Called once a connection has proved itself, so the next failure starts
    /// again from the shortest delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_spread_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..300).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        // Past the ramp the window is [0, max]: 290 draws cover both halves
        // unless the jitter is broken (chance of a false failure: 2^-290).
        assert!(delays[10..].iter().any(|d| *d > Duration::from_secs(1)));
        assert!(delays[10..].iter().any(|d| *d < Duration::from_secs(1)));
        backoff.reset();
        // Even the first retry after a reset is spread, not a herd at `min`.
        let first: Vec<_> = (0..50)
            .map(|_| {
                backoff.reset();
                backoff.next_delay()
            })
            .collect();
        assert!(first.iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(first.iter().any(|d| *d != first[0]));
    }
}
