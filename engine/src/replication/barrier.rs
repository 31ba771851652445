//! The write barrier a resync waits on before it reads a region.
//!
//! **The race it closes.** A write marks its regions in a replica's dirty bitmap when it is
//! fanned out, before its local parts reach the device. A resync clears a region's bit and
//! then reads the region locally to send it. Were the read to run while such a write's local
//! part is still in flight, it would send the old data, and the bit that stood for the write
//! is already clear: the replica would lack the write for good. So a resync clears its bits,
//! then waits until every write that may have marked them has completed, then reads.
//!
//! **How.** Writes of a replicated volume count themselves in flight under the current epoch
//! (two counters, by the epoch's parity) from before they mark any bit until they complete. A
//! resync takes a [`BarrierTicket`] after clearing its bits and polls it from its task: the
//! ticket moves the epoch on once, and is passed once every write of the epochs up to the
//! one it saw has left. No lock and no blocking: a write costs two atomic increments (and a
//! re-read of the epoch), one decrement when it completes.
//!
//! The epoch moves from `e` to `e + 1` only when epoch `e - 1` has drained (its counter is
//! `(e + 1) % 2`, about to take the new epoch's writes), so after that move every epoch up to
//! `e - 1` has drained. A ticket taken at epoch `r` is therefore passed when the epoch is at
//! least `r + 2`, or at `r + 1` with epoch `r`'s counter at zero.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Counts the writes in flight of one replicated volume by epoch parity (see the module).
#[derive(Debug, Default)]
pub struct WriteBarrier {
    epoch: AtomicU64,
    in_flight: [AtomicU64; 2],
}

/// A write counted in flight; hand it back to [`WriteBarrier::leave`] when it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarrierEntry(u8);

/// A resync's wait for the writes in flight when it was taken (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarrierTicket {
    taken_at: u64,
}

impl WriteBarrier {
    /// Count a write in flight, before it marks any bit.
    pub fn enter(&self) -> BarrierEntry {
        loop {
            let epoch = self.epoch.load(SeqCst);
            let parity = (epoch % 2) as usize;
            self.in_flight[parity].fetch_add(1, SeqCst);
            // The epoch may have moved between the load and the increment: then this write
            // would count under a parity a ticket no longer waits on. Count again.
            if self.epoch.load(SeqCst) == epoch {
                return BarrierEntry(parity as u8);
            }
            self.in_flight[parity].fetch_sub(1, SeqCst);
        }
    }

    /// The write counted by `entry` completed (its local parts are on the device).
    pub fn leave(&self, entry: BarrierEntry) {
        let prev = self.in_flight[entry.0 as usize].fetch_sub(1, SeqCst);
        debug_assert!(prev > 0, "a write left the barrier twice");
    }

    /// A ticket for the writes in flight now: take it after clearing the bits to resync.
    pub fn ticket(&self) -> BarrierTicket {
        BarrierTicket {
            taken_at: self.epoch.load(SeqCst),
        }
    }

    /// Whether every write in flight when `ticket` was taken has completed. Moves the epoch
    /// on when it may; call it again (from the task's next poll) until it says true.
    pub fn passed(&self, ticket: &BarrierTicket) -> bool {
        let r = ticket.taken_at;
        let epoch = self.epoch.load(SeqCst);
        if epoch >= r + 2 {
            return true;
        }
        if epoch == r {
            // Epoch r - 1 must have drained before its counter takes epoch r + 1's writes.
            if self.in_flight[((r + 1) % 2) as usize].load(SeqCst) != 0 {
                return false;
            }
            // Another ticket may move it first: either way it is at least r + 1 now.
            let _ = self.epoch.compare_exchange(r, r + 1, SeqCst, SeqCst);
            return self.passed(ticket);
        }
        debug_assert_eq!(epoch, r + 1);
        self.in_flight[(r % 2) as usize].load(SeqCst) == 0
    }

    /// Writes counted in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> u64 {
        self.in_flight[0].load(SeqCst) + self.in_flight[1].load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn a_ticket_waits_for_the_writes_before_it_and_not_after() {
        let b = WriteBarrier::default();
        let early = b.enter();
        let ticket = b.ticket();
        assert!(!b.passed(&ticket), "a write in flight before the ticket");
        let late = b.enter();
        assert!(!b.passed(&ticket));
        b.leave(early);
        assert!(b.passed(&ticket), "a later write does not hold the ticket");
        b.leave(late);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn tickets_of_two_resyncs_each_wait_for_their_own_writes() {
        let b = WriteBarrier::default();
        let w0 = b.enter();
        let t0 = b.ticket();
        assert!(!b.passed(&t0)); // moves the epoch to 1
        let w1 = b.enter();
        let t1 = b.ticket();
        assert!(
            !b.passed(&t1),
            "w0 has not drained: the epoch cannot move on"
        );
        b.leave(w0);
        assert!(b.passed(&t0));
        assert!(!b.passed(&t1), "w1 is still in flight");
        b.leave(w1);
        assert!(b.passed(&t1));
        assert!(b.passed(&t0), "a passed ticket stays passed");
    }

    /// The race of the module, with threads: each write takes a number, marks it (the
    /// bitmap), then completes (its local part); the resync clears the marks, takes a ticket,
    /// and once it passes, every write whose mark it cleared must have completed.
    #[test]
    fn no_write_that_marked_before_the_clear_is_still_running_when_the_ticket_passes() {
        const WRITERS: usize = 2;
        const ROUNDS: usize = 300;
        let b = Arc::new(WriteBarrier::default());
        let slots = |_| (0..WRITERS).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        let (marked, completed) = (Arc::new(slots(())), Arc::new(slots(())));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (b, marked, completed, stop) =
                    (b.clone(), marked.clone(), completed.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(SeqCst) {
                        n += 1;
                        let entry = b.enter();
                        marked[i].store(n, SeqCst);
                        for _ in 0..(n % 7) * 2000 {
                            std::hint::spin_loop(); // the local write in flight
                        }
                        completed[i].store(n, SeqCst);
                        b.leave(entry);
                        if n.is_multiple_of(16) {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for _ in 0..ROUNDS {
            // Let the writers run until one of them marked again.
            while marked.iter().all(|m| m.load(SeqCst) == 0) {
                std::thread::yield_now();
            }
            let cleared: Vec<u64> = marked.iter().map(|m| m.swap(0, SeqCst)).collect();
            let ticket = b.ticket();
            while !b.passed(&ticket) {
                std::thread::yield_now();
            }
            for (i, &n) in cleared.iter().enumerate() {
                assert!(
                    completed[i].load(SeqCst) >= n,
                    "write {n} of writer {i} marked before the clear and is still running"
                );
            }
        }
        stop.store(true, SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(b.in_flight(), 0);
    }
}
