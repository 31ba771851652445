//! Buffer memory of a connection: the cache of large IO buffers, and the server-wide budget
//! every connection publishes what it holds to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringblock_engine::task::TaskCtx;
use ringblock_engine::{AlignedBuf, IoBuf};

use super::{Connection, DEFAULT_BUFFER_BUDGET_BYTES};

/// Bytes of large buffers one connection keeps for reuse.
pub(super) const BUF_CACHE_BYTES: usize = 64 << 20;
/// Requests up to this size use the reactor's registered pool; larger ones the cache.
pub(super) const SMALL_BUF_BYTES: usize = 64 << 10;

/// Large IO buffers kept for reuse: allocating (and faulting in) a fresh megabyte per request
/// costs more than the copy itself.
#[derive(Default)]
pub(super) struct BufCache {
    pub(super) free: Vec<AlignedBuf>,
    pub(super) bytes: usize,
}

impl BufCache {
    /// A buffer of `len` bytes; its contents are whatever was there (callers overwrite all).
    pub(super) fn take(&mut self, len: usize) -> AlignedBuf {
        let class = len.next_power_of_two().max(SMALL_BUF_BYTES);
        match self.free.iter().position(|b| b.capacity() == class) {
            Some(i) => {
                let mut b = self.free.swap_remove(i);
                self.bytes -= b.capacity();
                b.set_len(len);
                b
            }
            None => {
                let mut b = AlignedBuf::zeroed(class);
                b.set_len(len);
                b
            }
        }
    }

    pub(super) fn give(&mut self, buf: AlignedBuf) {
        if buf.capacity() >= SMALL_BUF_BYTES && self.bytes + buf.capacity() <= BUF_CACHE_BYTES {
            self.bytes += buf.capacity();
            self.free.push(buf);
        }
    }
}

/// Reply and request buffer memory of all connections of a server, against one limit.
///
/// Each connection publishes what it holds (requests' buffers in flight, queued replies, its
/// buffer cache, a payload being received) once per reactor pass, not per request. While the
/// total is over the limit, a connection holding more than its fair share (limit / connections)
/// starts no new request until its own replies drain: backpressure, never an error. A
/// connection under its share always proceeds, so a client that never reads its replies cannot
/// starve the others; one held back always has replies or requests of its own in flight, whose
/// completions wake it.
#[derive(Debug)]
pub struct BufferBudget {
    pub(super) limit_bytes: u64,
    pub(super) used_bytes: AtomicU64,
    pub(super) connections: AtomicU64,
}

impl BufferBudget {
    pub fn new(limit_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            limit_bytes: limit_bytes.max(1),
            used_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        })
    }

    /// Bytes the connections hold now (as last published).
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Whether `bytes` is more than one connection's fair share (limit / connections).
    pub(super) fn above_fair_share(&self, bytes: u64) -> bool {
        let connections = self.connections.load(Ordering::Relaxed).max(1);
        bytes.saturating_mul(connections) > self.limit_bytes
    }
}

impl Default for BufferBudget {
    fn default() -> Self {
        Self {
            limit_bytes: DEFAULT_BUFFER_BUDGET_BYTES,
            used_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }
}

impl Connection {
    /// Count this connection's buffers against `budget` (shared by a server's connections).
    pub fn set_budget(&mut self, budget: Arc<BufferBudget>) {
        self.publish(0);
        self.budget.connections.fetch_sub(1, Ordering::Relaxed);
        budget.connections.fetch_add(1, Ordering::Relaxed);
        self.budget = budget;
    }

    /// Buffer memory that drains by itself (requests in flight, replies queued): what the
    /// budget's fair share is measured against.
    pub(super) fn draining_bytes(&self) -> u64 {
        self.reqs.bytes_in_flight + self.send.queued_bytes as u64
    }

    /// Everything this connection holds in buffers, for the budget.
    pub(super) fn held_bytes(&self) -> u64 {
        let fill = self
            .recv
            .fill
            .as_ref()
            .and_then(|f| f.buf.as_ref())
            .map_or(0, IoBuf::len);
        self.draining_bytes() + self.bufs.bytes as u64 + fill as u64
    }

    /// Tell the budget what this connection holds now (an atomic add only when it changed).
    pub(super) fn publish(&mut self, now_bytes: u64) {
        let before = self.published_bytes;
        if now_bytes > before {
            self.budget
                .used_bytes
                .fetch_add(now_bytes - before, Ordering::Relaxed);
        } else if now_bytes < before {
            self.budget
                .used_bytes
                .fetch_sub(before - now_bytes, Ordering::Relaxed);
        }
        self.published_bytes = now_bytes;
    }

    /// The server's buffers are over budget and this connection holds more than its share.
    pub(super) fn over_budget(&self) -> bool {
        if !self.budget.above_fair_share(self.draining_bytes()) {
            return false;
        }
        // What the others published, plus what this connection holds right now.
        let others = self
            .budget
            .used_bytes()
            .saturating_sub(self.published_bytes);
        others + self.held_bytes() > self.budget.limit_bytes
    }

    /// A buffer for `len` bytes of read or write data: from the reactor's pool, else the cache.
    pub(super) fn io_buffer(&mut self, ctx: &mut TaskCtx<'_>, len: usize) -> IoBuf {
        ctx.take_buffer(len)
            .unwrap_or_else(|| IoBuf::owned(self.bufs.take(len)))
    }

    /// Done with an IO buffer: a large owned one goes back to the cache (a pool lease returns
    /// to its pool when dropped).
    pub(super) fn recycle(&mut self, buf: IoBuf) {
        if let Some(buf) = buf.into_owned() {
            self.bufs.give(buf);
        }
    }
}
