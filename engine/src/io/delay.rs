//! The `delay` wrapper's clock: when a completion of an emulated device is due, and the
//! completions held back until then.
//!
//! The `delay` and `fault` wrappers themselves still run inside `UringIo`, not as decorators
//! of [`super::Io`]: there a device's queue depth counts an op until its completion is
//! scheduled (not released), an injected error takes the delay like any completion, a fault
//! spike adds to the delay's due time, and held completions count in `Io::in_flight`. A
//! decorator has to keep all of that, and take a clock the simulator can drive.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::IoCompletion;
use crate::profile::ServiceTime;

struct Delayed {
    due_ns: u64,
    seq: u64,
    completion: IoCompletion,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ns, self.seq) == (other.due_ns, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_ns, self.seq).cmp(&(other.due_ns, other.seq))
    }
}

/// When an op of the emulated device completes: its transfer waits for the link
/// (`busy_until_ns`, advanced here), its latency and any fault spike overlap with other ops.
pub(crate) fn schedule_delayed(
    busy_until_ns: &mut u64,
    submitted_ns: u64,
    service: ServiceTime,
    spike_ns: u64,
) -> u64 {
    let transfer_end_ns = (*busy_until_ns)
        .max(submitted_ns)
        .saturating_add(service.transfer_ns);
    *busy_until_ns = transfer_end_ns;
    transfer_end_ns
        .saturating_add(service.latency_ns)
        .saturating_add(spike_ns)
}

/// Completions held back until they are due, in due order (then submission order).
#[derive(Default)]
pub(crate) struct DelayQueue {
    heap: BinaryHeap<Reverse<Delayed>>,
    seq: u64,
}

impl DelayQueue {
    /// Hold `completion` back until `due_ns`.
    pub(crate) fn push(&mut self, due_ns: u64, completion: IoCompletion) {
        self.seq += 1;
        self.heap.push(Reverse(Delayed {
            due_ns,
            seq: self.seq,
            completion,
        }));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// When the next completion is due.
    pub(crate) fn next_due_ns(&self) -> Option<u64> {
        self.heap.peek().map(|d| d.0.due_ns)
    }

    /// Move every completion due by `now_ns` to `out`.
    pub(crate) fn release_due(&mut self, now_ns: u64, out: &mut VecDeque<IoCompletion>) {
        while self.heap.peek().is_some_and(|d| d.0.due_ns <= now_ns) {
            let Reverse(d) = self.heap.pop().expect("peeked");
            out.push_back(d.completion);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_latency_overlaps_and_transfers_queue() {
        // 32 reads submitted together on an NVMe-like device: 80 µs latency, 1 µs transfer.
        let service = ServiceTime {
            latency_ns: 80_000,
            transfer_ns: 1_000,
        };
        let mut busy_until_ns = 0;
        let dues: Vec<u64> = (0..32)
            .map(|_| schedule_delayed(&mut busy_until_ns, 0, service, 0))
            .collect();
        // Latencies overlap: the last op finishes after 32 transfers + one latency, not 32 × 81 µs.
        assert_eq!(dues[0], 81_000);
        assert_eq!(dues[31], 32_000 + 80_000);
        assert!(dues.windows(2).all(|w| w[1] - w[0] == 1_000));
        // An idle link does not carry its past: a later op starts at its own submission.
        assert_eq!(
            schedule_delayed(&mut busy_until_ns, 1_000_000, service, 0),
            1_081_000
        );
        // A fault spike delays only its own op.
        assert_eq!(
            schedule_delayed(&mut busy_until_ns, 2_000_000, service, 5_000),
            2_086_000
        );
        assert_eq!(busy_until_ns, 2_001_000);
    }
}
