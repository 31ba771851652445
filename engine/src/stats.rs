//! Lock-free latency histograms: power-of-two buckets of nanoseconds, each an atomic counter,
//! so reactors record without locks and anyone can snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets: [0, 1ns), [1, 2), [2, 4), ... [2^62, ∞).
pub const LATENCY_BUCKETS: usize = 64;

#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// A copy of a histogram at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySnapshot {
    /// `counts[i]` ops took less than `2^i` ns (and at least `2^(i-1)`).
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl LatencyHistogram {
    pub fn record(&self, ns: u64) {
        let i = (64 - ns.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

impl LatencySnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Upper bound (ns) of the bucket holding quantile `q` (0..=1); 0 if empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return if i >= 63 { u64::MAX } else { 1u64 << i };
            }
        }
        u64::MAX
    }

    /// Bucket upper bounds in ns, for Prometheus-style `le` labels.
    pub fn bucket_bounds_ns() -> impl Iterator<Item = u64> {
        (0..LATENCY_BUCKETS).map(|i| if i >= 63 { u64::MAX } else { 1u64 << i })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let h = LatencyHistogram::default();
        for ns in [0, 1, 3, 1000, 1000, 1000, 1_000_000] {
            h.record(ns);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 7);
        assert_eq!(s.counts[0], 1); // 0
        assert_eq!(s.counts[1], 1); // 1
        assert_eq!(s.counts[2], 1); // 3 in [2,4)
        assert_eq!(s.counts[10], 3); // 1000 in [512,1024)
        assert_eq!(s.quantile_ns(0.5), 1024);
        assert_eq!(s.quantile_ns(1.0), 1 << 20);
        assert_eq!(LatencySnapshot::default().quantile_ns(0.5), 0);
    }
}
