//! How far a replica trails the primary: the bytes of writes queued for it and not yet
//! acknowledged (an asynchronous replica's backlog), and how long the oldest of them has
//! waited.
//!
//! The fan-out charges an asynchronous op's bytes before queueing it and refuses when the
//! queue's bound would be passed (the replica then falls behind, see
//! [`super::fanout::LinkMode::Async`]); the op hands its bytes back when it is dropped, sent
//! and acknowledged or not. The link task publishes when its oldest unacknowledged op was
//! queued. The API and `/metrics` read both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A replica's backlog gauge (see the module).
#[derive(Debug, Default)]
pub struct ReplicaLag {
    queued_bytes: AtomicU64,
    /// When the oldest op the replica has not acknowledged was queued, as [`monotonic_ns`]
    /// (0: none waits).
    oldest_queued_ns: AtomicU64,
}

impl ReplicaLag {
    /// Count `bytes` more as queued unless that passes `limit_bytes`. An empty queue takes
    /// one op of any size, so a write larger than the bound still goes (alone).
    pub fn try_charge(&self, bytes: u64, limit_bytes: u64) -> bool {
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > limit_bytes {
            self.release(bytes);
            return false;
        }
        true
    }

    /// `bytes` charged before left the queue.
    pub fn release(&self, bytes: u64) {
        let before = self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "more queued bytes released than charged");
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// The oldest op not acknowledged was queued at `queued_ns` ([`monotonic_ns`]), or none
    /// waits.
    pub fn set_oldest(&self, queued_ns: Option<u64>) {
        self.oldest_queued_ns
            .store(queued_ns.unwrap_or(0), Ordering::Release);
    }

    /// Whether an op waits for the replica's acknowledgement (as its link last said).
    pub fn waiting(&self) -> bool {
        self.oldest_queued_ns.load(Ordering::Acquire) != 0
    }

    /// How long the oldest unacknowledged op has waited, in ms (0 when none waits).
    pub fn oldest_age_ms(&self) -> u64 {
        match self.oldest_queued_ns.load(Ordering::Acquire) {
            0 => 0,
            at => monotonic_ns().saturating_sub(at) / 1_000_000,
        }
    }
}

/// Nanoseconds on a monotonic clock shared by the process, never 0.
pub fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_nanos() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_holds_and_an_empty_queue_takes_one_large_op() {
        let lag = ReplicaLag::default();
        assert!(
            lag.try_charge(100, 64),
            "an empty queue takes one op of any size"
        );
        assert!(!lag.try_charge(1, 64), "past the bound");
        lag.release(100);
        assert!(lag.try_charge(40, 64));
        assert!(lag.try_charge(24, 64), "up to the bound exactly");
        assert!(!lag.try_charge(1, 64));
        assert_eq!(lag.queued_bytes(), 64);
        lag.release(64);
        assert_eq!(lag.queued_bytes(), 0);
    }

    #[test]
    fn the_age_is_zero_without_a_waiting_op() {
        let lag = ReplicaLag::default();
        assert_eq!(lag.oldest_age_ms(), 0);
        lag.set_oldest(Some(monotonic_ns()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            lag.oldest_age_ms() >= 20,
            "a lower bound: the op waited at least that"
        );
        lag.set_oldest(None);
        assert_eq!(lag.oldest_age_ms(), 0);
    }
}
