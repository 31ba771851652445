//! Online verification of a replica: the primary's link compares per-region checksums of its
//! copy with the replica's, in batches, while writes go on.
//!
//! **A job** ([`VerifyJob`]) is handed to a link through a one-slot lock-free queue on its
//! [`ReplicaLink`] ([`ReplicaLink::offer_verify`]); the link task takes it, runs it batch
//! after batch, and publishes progress and the result in the job (atomics, and one small
//! mutex touched once per mismatch and at the end), where the runtime reads them.
//!
//! **Writes racing with a batch.** A batch covers at most [`MAX_VERIFY_BATCH_REGIONS`]
//! contiguous regions. Its window (first region, count) is published
//! ([`ReplicaLink::verify_regions_begin`]) before the link takes a write-barrier ticket, and
//! withdrawn ([`ReplicaLink::verify_regions_end`]) once the replica's checksums arrived. A
//! write to the volume counts itself in the barrier, then, before its op is pushed to the
//! link, reads the window and marks the regions it touches in it ("touched"). All of these
//! accesses are `SeqCst`, so for each write either
//! - it read the window before it was published: it entered the barrier before the ticket,
//!   so the ticket passes only once the write completed here, and its op was pushed before
//!   its local part went out. A sync replica acknowledged it before it completed; for an
//!   async one the link sends the request only after every op in its inbox when the ticket
//!   passed. The local read and the replica's checksum both see it; or
//! - it saw the window: it marks its regions before its op is pushed and before its local
//!   part is sent, so a region it may have changed on one side only is touched, and the link
//!   checks it again in a later batch instead of reporting it; or
//! - it read the window after it was withdrawn: its op follows the verify request on the
//!   wire and its local part runs after the local read; neither side saw it.
//!
//! A mark that lands late (from a window already withdrawn) only makes a later batch check a
//! region once more. A region touched in [`MAX_VERIFY_ATTEMPTS`] batches in a row is
//! reported as "busy" (not verified), never as a mismatch.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;

use super::bitmap::RegionIndex;
use super::fanout::ReplicaLink;

/// Most regions one batch (one VerifyRequest) covers: the touched mask is one `u64`.
pub const MAX_VERIFY_BATCH_REGIONS: u32 = 64;
/// A batch stops taking regions once it holds this many bytes (at least one region).
pub const MAX_VERIFY_BATCH_BYTES: u64 = 4 << 20;
/// Batches a region may be touched by writes in before it is reported busy.
pub const MAX_VERIFY_ATTEMPTS: u8 = 4;
/// Byte ranges of mismatched (or busy) regions a job lists; more are counted only.
pub const MAX_LISTED_RANGES: usize = 64;

/// Where a verify job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VerifyPhase {
    /// Handed to the link, not started yet.
    Queued = 0,
    Running = 1,
    /// Every region was checked (or reported busy).
    Done = 2,
    /// Ended early (the link failed, or the job was never taken): see the error.
    Failed = 3,
}

impl VerifyPhase {
    pub fn name(self) -> &'static str {
        match self {
            VerifyPhase::Queued => "queued",
            VerifyPhase::Running => "running",
            VerifyPhase::Done => "done",
            VerifyPhase::Failed => "failed",
        }
    }

    fn from_u8(v: u8) -> VerifyPhase {
        match v {
            0 => VerifyPhase::Queued,
            1 => VerifyPhase::Running,
            2 => VerifyPhase::Done,
            _ => VerifyPhase::Failed,
        }
    }
}

#[derive(Debug, Default)]
struct Detail {
    mismatched: Vec<Range<u64>>,
    busy: Vec<Range<u64>>,
    error: Option<String>,
}

/// One replica's verification (see the module).
#[derive(Debug)]
pub struct VerifyJob {
    repair: bool,
    phase: AtomicU8,
    regions_total: AtomicU64,
    regions_checked: AtomicU64,
    bytes_checked: AtomicU64,
    mismatched_regions: AtomicU64,
    busy_regions: AtomicU64,
    repaired: AtomicBool,
    finished_unix_ms: AtomicU64,
    detail: Mutex<Detail>,
}

/// A copy of a job's progress and result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifySnapshot {
    pub phase: VerifyPhase,
    pub repair: bool,
    pub regions_total: u64,
    pub regions_checked: u64,
    pub bytes_checked: u64,
    pub mismatched_regions: u64,
    /// Byte ranges of mismatched regions (adjacent ones merged), at most
    /// [`MAX_LISTED_RANGES`].
    pub mismatched: Vec<Range<u64>>,
    /// Regions writes kept touching: not verified.
    pub busy_regions: u64,
    pub busy: Vec<Range<u64>>,
    /// The mismatched regions are marked dirty and the link resyncs them.
    pub repaired: bool,
    pub error: Option<String>,
    pub finished_unix_ms: Option<u64>,
}

/// Add `range` to `list`, merged with the last one when adjacent (dropped when the list is
/// full: it is counted only).
fn push_range(list: &mut Vec<Range<u64>>, range: Range<u64>) {
    if let Some(last) = list.last_mut().filter(|l| l.end == range.start) {
        last.end = range.end;
    } else if list.len() < MAX_LISTED_RANGES {
        list.push(range);
    }
}

impl VerifyJob {
    pub fn new(repair: bool) -> Arc<VerifyJob> {
        Arc::new(VerifyJob {
            repair,
            phase: AtomicU8::new(VerifyPhase::Queued as u8),
            regions_total: AtomicU64::new(0),
            regions_checked: AtomicU64::new(0),
            bytes_checked: AtomicU64::new(0),
            mismatched_regions: AtomicU64::new(0),
            busy_regions: AtomicU64::new(0),
            repaired: AtomicBool::new(false),
            finished_unix_ms: AtomicU64::new(0),
            detail: Mutex::new(Detail::default()),
        })
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark the mismatched regions dirty (the link then resyncs them).
    pub fn repair(&self) -> bool {
        self.repair
    }

    pub fn phase(&self) -> VerifyPhase {
        VerifyPhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// The link starts the job over `regions_total` regions. False if it ended meanwhile
    /// (failed before it was taken): the link drops it.
    pub fn begin(&self, regions_total: u64) -> bool {
        self.regions_total.store(regions_total, Ordering::Relaxed);
        self.phase
            .compare_exchange(
                VerifyPhase::Queued as u8,
                VerifyPhase::Running as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// A region of `bytes` was compared (equal or not).
    pub fn checked(&self, bytes: u64) {
        self.regions_checked.fetch_add(1, Ordering::Relaxed);
        self.bytes_checked.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The region at `range` (bytes) differs on the replica.
    pub fn mismatch(&self, range: Range<u64>) {
        self.mismatched_regions.fetch_add(1, Ordering::Relaxed);
        push_range(&mut self.detail().mismatched, range);
    }

    /// The region at `range` (bytes) was written during every attempt: not verified.
    pub fn busy(&self, range: Range<u64>) {
        self.busy_regions.fetch_add(1, Ordering::Relaxed);
        push_range(&mut self.detail().busy, range);
    }

    /// Every region is done; `repaired`: the mismatched ones are marked for a resync.
    pub fn finish(&self, repaired: bool, now_unix_ms: u64) {
        self.repaired.store(repaired, Ordering::Relaxed);
        self.finished_unix_ms
            .store(now_unix_ms.max(1), Ordering::Relaxed);
        self.phase.store(VerifyPhase::Done as u8, Ordering::Release);
    }

    /// The job ends early with `reason` (no effect on a job already done or failed).
    pub fn fail(&self, reason: &str, now_unix_ms: u64) {
        let mut detail = self.detail();
        let phase = self.phase();
        if matches!(phase, VerifyPhase::Done | VerifyPhase::Failed) {
            return;
        }
        detail.error = Some(reason.to_string());
        self.finished_unix_ms
            .store(now_unix_ms.max(1), Ordering::Relaxed);
        self.phase
            .store(VerifyPhase::Failed as u8, Ordering::Release);
    }

    pub fn snapshot(&self) -> VerifySnapshot {
        let detail = self.detail();
        VerifySnapshot {
            phase: self.phase(),
            repair: self.repair,
            regions_total: self.regions_total.load(Ordering::Relaxed),
            regions_checked: self.regions_checked.load(Ordering::Relaxed),
            bytes_checked: self.bytes_checked.load(Ordering::Relaxed),
            mismatched_regions: self.mismatched_regions.load(Ordering::Relaxed),
            mismatched: detail.mismatched.clone(),
            busy_regions: self.busy_regions.load(Ordering::Relaxed),
            busy: detail.busy.clone(),
            repaired: self.repaired.load(Ordering::Relaxed),
            error: detail.error.clone(),
            finished_unix_ms: match self.finished_unix_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(ms),
            },
        }
    }
}

/// A link's verify state shared with the write path (a field of [`ReplicaLink`]).
#[derive(Debug)]
pub(super) struct LinkVerify {
    /// The batch in flight: `first << 8 | count`, 0 when none.
    window: AtomicU64,
    /// Regions of the window writes touched, bit `i` for region `first + i`.
    touched: AtomicU64,
    region_shift: u8,
    /// The job handed over and not yet taken.
    handoff: ArrayQueue<Arc<VerifyJob>>,
}

impl LinkVerify {
    pub(super) fn new(region_shift: u8) -> LinkVerify {
        LinkVerify {
            window: AtomicU64::new(0),
            touched: AtomicU64::new(0),
            region_shift,
            handoff: ArrayQueue::new(1),
        }
    }
}

/// Bits of the window `first..first + count` that regions `lo..=hi` touch.
fn touched_bits(first: u64, count: u64, lo: u64, hi: u64) -> u64 {
    let (a, b) = (lo.max(first), hi.min(first + count - 1));
    if a > b {
        return 0;
    }
    let bits = b - a + 1;
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1 << bits) - 1
    };
    mask << (a - first)
}

impl ReplicaLink {
    /// Hand `job` to the link task; Err(job) when one is already waiting.
    pub fn offer_verify(&self, job: Arc<VerifyJob>) -> Result<(), Arc<VerifyJob>> {
        self.verify.handoff.push(job)
    }

    /// The job handed over, for the link task.
    pub fn take_verify(&self) -> Option<Arc<VerifyJob>> {
        self.verify.handoff.pop()
    }

    /// Whether a job waits to be taken.
    pub fn verify_offered(&self) -> bool {
        !self.verify.handoff.is_empty()
    }

    /// A batch over `first..first + count` starts (before its barrier ticket): from now
    /// until [`Self::verify_regions_end`], writes to it are recorded.
    pub fn verify_regions_begin(&self, first: RegionIndex, count: u32) {
        debug_assert!((1..=MAX_VERIFY_BATCH_REGIONS).contains(&count));
        debug_assert!(first.0 < 1 << 48, "region indexes are below 2^24");
        self.verify.touched.store(0, Ordering::SeqCst);
        self.verify
            .window
            .store(first.0 << 8 | u64::from(count), Ordering::SeqCst);
    }

    /// The batch's answer arrived: stop recording, and return the touched mask (bit `i` for
    /// region `first + i`).
    pub fn verify_regions_end(&self) -> u64 {
        self.verify.window.store(0, Ordering::SeqCst);
        self.verify.touched.swap(0, Ordering::SeqCst)
    }

    /// A write (trim, write-zeroes) of `offset_bytes..+len_bytes` is about to be pushed to
    /// this link: mark the regions of the batch in flight it touches (see the module).
    pub(super) fn note_verify_write(&self, offset_bytes: u64, len_bytes: u64) {
        let window = self.verify.window.load(Ordering::SeqCst);
        if window == 0 {
            return;
        }
        let (first, count) = (window >> 8, window & 0xff);
        let shift = self.verify.region_shift;
        let lo = offset_bytes >> shift;
        let hi = offset_bytes.saturating_add(len_bytes.max(1) - 1) >> shift;
        let bits = touched_bits(first, count, lo, hi);
        if bits != 0 {
            self.verify.touched.fetch_or(bits, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ReactorId;
    use crate::replication::{NodeId, Role, VolumeReplication};

    fn link() -> Arc<ReplicaLink> {
        let replication = Arc::new(
            VolumeReplication::new(Role::Primary, 256 << 20, 20, &[NodeId::new(5).unwrap()])
                .unwrap(),
        );
        ReplicaLink::new(replication, 0, ReactorId(0)).unwrap()
    }

    #[test]
    fn touched_bits_cover_the_overlap_only() {
        assert_eq!(touched_bits(10, 4, 0, 9), 0);
        assert_eq!(touched_bits(10, 4, 14, 20), 0);
        assert_eq!(touched_bits(10, 4, 9, 10), 0b1);
        assert_eq!(touched_bits(10, 4, 12, 30), 0b1100);
        assert_eq!(touched_bits(0, 64, 0, 100), u64::MAX);
        assert_eq!(touched_bits(0, 64, 63, 63), 1 << 63);
    }

    #[test]
    fn writes_mark_the_window_they_touch_and_only_while_it_is_open() {
        let l = link();
        l.note_verify_write(0, 1 << 20);
        l.verify_regions_begin(RegionIndex(8), 4);
        // Region 7 and the first half of region 8.
        l.note_verify_write(7 << 20, (1 << 20) + 4096);
        // Past the window.
        l.note_verify_write(12 << 20, 4096);
        // The last byte of region 11.
        l.note_verify_write((12 << 20) - 512, 512);
        assert_eq!(l.verify_regions_end(), 0b1001);
        // Withdrawn: nothing is recorded, and the next batch starts clean.
        l.note_verify_write(8 << 20, 4096);
        l.verify_regions_begin(RegionIndex(8), 4);
        assert_eq!(l.verify_regions_end(), 0);
    }

    #[test]
    fn the_handoff_holds_one_job() {
        let l = link();
        assert!(!l.verify_offered());
        l.offer_verify(VerifyJob::new(false)).unwrap();
        assert!(l.offer_verify(VerifyJob::new(true)).is_err());
        let job = l.take_verify().unwrap();
        assert!(!job.repair() && l.take_verify().is_none());
    }

    #[test]
    fn a_job_reports_merged_bounded_ranges_and_ends_once() {
        let job = VerifyJob::new(true);
        assert!(job.begin(1000));
        assert!(!job.begin(1000), "started twice");
        for r in 0..200u64 {
            job.checked(1 << 20);
            // Regions 0, 1, 2 adjacent, then every other one.
            if r < 3 || r % 2 == 0 {
                job.mismatch(r << 20..(r + 1) << 20);
            }
        }
        job.busy(500 << 20..501 << 20);
        let s = job.snapshot();
        assert_eq!((s.regions_checked, s.bytes_checked), (200, 200 << 20));
        assert_eq!(s.mismatched_regions, 101);
        assert_eq!(s.mismatched[0], 0..3 << 20, "adjacent regions merge");
        assert_eq!(s.mismatched[1], 4 << 20..5 << 20);
        assert_eq!(s.mismatched.len(), MAX_LISTED_RANGES);
        assert_eq!((s.busy_regions, s.busy.len()), (1, 1));
        job.finish(true, 7);
        job.fail("too late", 8);
        let s = job.snapshot();
        assert_eq!(s.phase, VerifyPhase::Done);
        assert_eq!(
            (s.repaired, s.error, s.finished_unix_ms),
            (true, None, Some(7))
        );
    }

    #[test]
    fn a_job_failed_before_it_was_taken_is_not_started() {
        let job = VerifyJob::new(false);
        job.fail("the link went down", 3);
        assert!(!job.begin(10));
        let s = job.snapshot();
        assert_eq!(s.phase, VerifyPhase::Failed);
        assert_eq!(s.error.as_deref(), Some("the link went down"));
    }

    /// Threads write numbered values to random regions (marking before "pushing" and
    /// counting themselves in the barrier, as the fan-out does) while a verifier opens
    /// windows, waits for its ticket, snapshots the regions, then closes the window: every
    /// region that changed between the snapshot and the close is touched.
    #[test]
    fn every_region_changed_after_the_barrier_is_touched() {
        use std::sync::atomic::AtomicBool;
        const REGIONS: usize = 16;
        let l = link();
        let values: Arc<Vec<AtomicU64>> =
            Arc::new((0..REGIONS).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let (l, values, stop) = (l.clone(), values.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = t;
                    while !stop.load(Ordering::Relaxed) {
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let r = (n >> 33) as usize % REGIONS;
                        let barrier = &l.replication().barrier;
                        let entry = barrier.enter();
                        l.note_verify_write((r as u64) << 20, 4096);
                        values[r].fetch_add(1, Ordering::SeqCst);
                        barrier.leave(entry);
                    }
                })
            })
            .collect();
        let mut touched_seen = 0;
        for _ in 0..300 {
            l.verify_regions_begin(RegionIndex(0), REGIONS as u32);
            let barrier = &l.replication().barrier;
            let ticket = barrier.ticket();
            while !barrier.passed(&ticket) {
                std::hint::spin_loop();
            }
            let before: Vec<u64> = values.iter().map(|v| v.load(Ordering::SeqCst)).collect();
            std::thread::yield_now();
            let after: Vec<u64> = values.iter().map(|v| v.load(Ordering::SeqCst)).collect();
            let touched = l.verify_regions_end();
            for r in 0..REGIONS {
                if before[r] != after[r] {
                    assert!(touched & (1 << r) != 0, "region {r} changed untouched");
                }
            }
            touched_seen += touched.count_ones();
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(touched_seen > 0, "the writers never raced with a window");
    }
}
