//! When to try a peer again: bounded exponential backoff with jitter, as pure arithmetic (the
//! caller draws the randomness and sleeps).
//!
//! After the n-th failure in a row the ceiling is `base × 2^(n-1)`, at most `max`; the delay is
//! drawn from the upper half of the ceiling ("equal jitter"), so nodes that lost a peer at the
//! same moment spread their retries, and the delay never falls below half the ceiling. Once the
//! ceiling reaches `max` the state stops changing: a peer that stays down is retried at a
//! bounded rate forever, and nothing grows. A link that lived at least `max` counts as a
//! success and starts over; one that dropped sooner counts as a failure, so a peer that accepts
//! and then drops at once cannot turn the backoff into a reconnect storm.

use std::time::Duration;

/// First ceiling after a failure, by default.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest ceiling, by default.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The reconnect state of one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    /// Failures in a row, counted only while the ceiling still grows.
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX)
    }
}

impl Backoff {
    /// A backoff from `base` up to `max` (at least 1 ms; `max` at least `base`).
    pub fn new(base: Duration, max: Duration) -> Backoff {
        let base_ms = duration_ms(base).max(1);
        Backoff {
            base_ms,
            max_ms: duration_ms(max).max(base_ms),
            failures: 0,
        }
    }

    /// The ceiling of the next delay, in milliseconds.
    pub fn ceiling_ms(&self) -> u64 {
        if self.failures == 0 {
            return 0;
        }
        let doubled = self
            .base_ms
            .checked_shl(self.failures - 1)
            .filter(|c| c >> (self.failures - 1) == self.base_ms);
        doubled.map_or(self.max_ms, |c| c.min(self.max_ms))
    }

    /// An attempt failed: the delay before the next one. `random` is a uniformly random value
    /// from the caller's generator (it picks the point in the upper half of the ceiling).
    pub fn after_failure(&mut self, random: u64) -> Duration {
        if self.failures == 0 || self.ceiling_ms() < self.max_ms {
            self.failures += 1;
        }
        debug_assert!(
            self.failures <= 64,
            "the ceiling reaches max within 64 doublings"
        );
        let ceiling = self.ceiling_ms();
        let half = ceiling / 2;
        let spread = ceiling - half;
        Duration::from_millis(half + random % (spread + 1))
    }

    /// A link that was up ended after `lived`: a long-lived one starts the backoff over; one
    /// that ended sooner than the largest delay counts as a failure. Returns the delay before
    /// the next attempt (zero after a long-lived link).
    pub fn after_link(&mut self, lived: Duration, random: u64) -> Duration {
        if duration_ms(lived) >= self.max_ms {
            self.failures = 0;
            Duration::ZERO
        } else {
            self.after_failure(random)
        }
    }

    /// Failures in a row that still raised the ceiling.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceilings_double_up_to_the_maximum_then_stay() {
        let mut b = Backoff::new(ms(100), ms(1000));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                b.after_failure(0);
                b.ceiling_ms()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        // The state stopped growing once the ceiling reached the maximum.
        assert_eq!(b.failures(), 5);
    }

    #[test]
    fn delays_lie_in_the_upper_half_of_the_ceiling() {
        let mut b = Backoff::new(ms(100), ms(1000));
        assert_eq!(b.after_failure(0), ms(50));
        assert_eq!(b.after_failure(100), ms(200));
        assert_eq!(b.after_failure(101), ms(200 + 101));
    }

    #[test]
    fn a_long_lived_link_starts_over_and_a_short_one_counts_as_a_failure() {
        let mut b = Backoff::new(ms(100), ms(1000));
        for _ in 0..3 {
            b.after_failure(0);
        }
        assert_eq!(b.ceiling_ms(), 400);
        // A peer that accepts and drops at once keeps the backoff growing.
        assert_eq!(b.after_link(ms(10), 0), ms(400));
        assert_eq!(b.ceiling_ms(), 800);
        assert_eq!(b.after_link(ms(1000), 0), Duration::ZERO);
        assert_eq!(b.failures(), 0);
        assert_eq!(b.after_failure(0), ms(50));
    }

    #[test]
    fn degenerate_settings_are_clamped() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.after_failure(1), ms(1));
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert!(huge.after_failure(0) >= Duration::from_millis(u64::MAX / 2));
        assert_eq!(huge.failures(), 1);
        assert_eq!(huge.after_failure(0), huge.after_failure(0));
        assert_eq!(huge.failures(), 1);
    }

    proptest! {
        /// Any number of failures: every delay is within [ceiling/2, ceiling] ≤ max, the
        /// ceiling never shrinks, and the state is bounded.
        #[test]
        fn delays_stay_bounded(base in 1u64..10_000, extra in 0u64..1_000_000,
                               randoms in prop::collection::vec(any::<u64>(), 1..200)) {
            let max = base + extra;
            let mut b = Backoff::new(ms(base), ms(max));
            let mut last_ceiling = 0;
            for r in randoms {
                let d = b.after_failure(r).as_millis() as u64;
                let c = b.ceiling_ms();
                prop_assert!(c >= last_ceiling && c <= max);
                prop_assert!(d >= c / 2 && d <= c, "delay {} ceiling {}", d, c);
                prop_assert!(b.failures() <= 64);
                last_ceiling = c;
            }
        }
    }
}
