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
        let low = self.min.as_millis() as u64;
        let high = (ceiling.as_millis() as u64).max(low);
        Duration::from_millis(rand::rng().random_range(low..=high))
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
    fn delays_grow_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(2)));
        // After many attempts the window is the whole [min, max] range; with 8
        // draws at least one lands in its upper half unless the jitter is broken.
        assert!(delays[4..].iter().any(|d| *d > Duration::from_millis(800)));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
