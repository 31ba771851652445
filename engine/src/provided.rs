//! Provided-buffer rings (`IORING_REGISTER_PBUF_RING`, Linux 5.19): a task lends the kernel a
//! ring of equal buffers, and a multishot receive takes the next free one for each arrival.
//! The receive then stays armed across requests instead of being prepared, given a buffer and
//! re-armed for every one (measured on a minimal NBD server: ~2 % of its CPU per request; see
//! docs/performance.md).
//!
//! The task owns the memory and registers it on its reactor with
//! [`crate::task::TaskCtx::register_buffers`]; the reactor unregisters it before it drops the
//! task. A buffer the kernel filled belongs to the task until [`ProvidedBuffers::recycle`]
//! hands it back, so a task that stops recycling stops the receive: once every buffer is out,
//! the multishot receive ends with `ENOBUFS`. That is the backpressure.

use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use crate::buf::AlignedBuf;

/// Most buffers one ring may hold (the kernel's limit).
pub const MAX_PROVIDED_BUFFERS: u16 = 1 << 15;

pub struct ProvidedBuffers {
    /// What the kernel reads: `count` entries of 16 bytes, page aligned; the tail index lives
    /// in entry 0's reserved field.
    ring: AlignedBuf,
    /// The buffers themselves, `count` x `buf_bytes`; reached through `base` only.
    _memory: AlignedBuf,
    /// Base of `_memory`, for slices of one buffer that do not borrow the whole region while the
    /// kernel writes other buffers of it.
    base: *mut u8,
    count: u16,
    buf_bytes: usize,
    /// Entries published to the kernel so far (wrapping).
    tail: u16,
    /// Buffers handed out by the kernel and not recycled yet.
    lent: u16,
    group: Option<u16>,
}

// SAFETY: the raw pointer points into `_memory`, which this struct owns; the ring is used from
// the one thread that hosts the task.
unsafe impl Send for ProvidedBuffers {}

impl ProvidedBuffers {
    /// `count` buffers (a power of two, at most [`MAX_PROVIDED_BUFFERS`]) of `buf_bytes` each,
    /// all available to the kernel once registered.
    pub fn new(count: u16, buf_bytes: usize) -> Self {
        assert!(
            count.is_power_of_two() && count <= MAX_PROVIDED_BUFFERS,
            "provided buffers: count {count} must be a power of two up to {MAX_PROVIDED_BUFFERS}"
        );
        assert!(
            buf_bytes > 0 && u32::try_from(buf_bytes).is_ok(),
            "provided buffers: {buf_bytes} bytes per buffer"
        );
        let ring = AlignedBuf::zeroed(usize::from(count) * std::mem::size_of::<BufRingEntry>());
        let mut memory = AlignedBuf::zeroed(usize::from(count) * buf_bytes);
        let base = memory.as_mut_ptr();
        let mut bufs = Self {
            ring,
            _memory: memory,
            base,
            count,
            buf_bytes,
            tail: 0,
            lent: count,
            group: None,
        };
        for bid in 0..count {
            bufs.push_entry(bid);
        }
        bufs.publish();
        bufs.lent = 0;
        bufs
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// Buffers the kernel filled that have not been recycled.
    pub fn lent(&self) -> u16 {
        self.lent
    }

    /// The group id to name in a receive (`buf_group`), once registered.
    pub fn group(&self) -> Option<u16> {
        self.group
    }

    pub(crate) fn set_group(&mut self, group: u16) {
        self.group = Some(group);
    }

    /// Address of the ring, for registration.
    pub(crate) fn ring_addr(&mut self) -> u64 {
        self.ring.as_mut_ptr() as u64
    }

    /// A completion handed buffer `bid` to the task: note it as lent.
    pub fn take(&mut self, bid: u16) {
        assert!(bid < self.count, "buffer id {bid} of {}", self.count);
        assert!(
            self.lent < self.count,
            "more buffers taken than the ring holds"
        );
        self.lent += 1;
    }

    /// The first `len` bytes of buffer `bid` (which the kernel filled and the task holds).
    pub fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!(
            bid < self.count && len <= self.buf_bytes,
            "buffer {bid}, {len} bytes"
        );
        // SAFETY: the range lies inside `_memory` (checked above); the kernel does not write a
        // buffer between handing it out and its recycling, and `&self` keeps the task from
        // recycling it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.base.add(usize::from(bid) * self.buf_bytes), len) }
    }

    /// Give buffer `bid` back to the kernel for the next arrival.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.count && self.lent > 0, "recycling buffer {bid}");
        self.lent -= 1;
        self.push_entry(bid);
        self.publish();
    }

    fn push_entry(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        let addr = self.base as u64 + (usize::from(bid) * self.buf_bytes) as u64;
        // SAFETY: index < count, so the entry lies inside `ring`; the kernel only reads
        // entries below the published tail, and this one is at or past it.
        let entry = unsafe { &mut *self.ring.as_mut_ptr().cast::<BufRingEntry>().add(index) };
        entry.set_addr(addr);
        entry.set_len(self.buf_bytes as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make the entries pushed so far visible to the kernel.
    fn publish(&mut self) {
        let ring = self.ring.as_mut_ptr().cast::<BufRingEntry>();
        // SAFETY: `ring` is the page-aligned first entry of an initialised ring, so the tail
        // field is inside it and 2-byte aligned; the kernel reads it concurrently, hence the
        // atomic release store after the entries were written.
        unsafe {
            let tail = BufRingEntry::tail(ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_go_round_the_ring() {
        let mut b = ProvidedBuffers::new(4, 4096);
        assert_eq!(b.lent(), 0);
        assert_eq!(b.tail, 4);
        b.take(2);
        b.take(0);
        assert_eq!(b.lent(), 2);
        assert_eq!(b.bytes(2, 10).len(), 10);
        b.recycle(2);
        b.recycle(0);
        assert_eq!(b.lent(), 0);
        assert_eq!(b.tail, 6);
        // Entry 4 & 3 = 0 now names buffer 2, entry 1 buffer 0.
        let ring = b.ring.as_slice();
        let entry = |i: usize| u16::from_ne_bytes([ring[i * 16 + 12], ring[i * 16 + 13]]);
        assert_eq!(entry(0), 2);
        assert_eq!(entry(1), 0);
        assert_eq!(
            u16::from_ne_bytes([ring[14], ring[15]]),
            6,
            "tail published"
        );
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn count_must_be_a_power_of_two() {
        ProvidedBuffers::new(3, 4096);
    }
}
