//! Requests from transports, their split into per-chunk parts, and completion delivery.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::buf::IoBuf;
use crate::ids::ChunkIndex;
use crate::replication::{BarrierEntry, VolumeReplication};
use crate::volume::Volume;

/// Errors reported per request, as errno values so transports can map them to their wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);
    pub const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// Moves a Read or Write request's data between the engine and memory the transport does not
/// lend as an [`IoBuf`] (e.g. the kernel's request pages, reached with `pread`/`pwrite` on
/// `/dev/ublkcN` under `UBLK_F_USER_COPY`).
///
/// The engine calls it on the reactor that owns the chunk, once per piece of the request, with
/// `offset_in_request` counting from the request's first byte. For a plain memory device the
/// slice *is* the device's memory for that piece (one copy in all); for other devices it is a
/// bounce buffer filled by (Read) or written to (Write) the device. Pieces of one request are
/// disjoint and may be moved from several reactors at once, in any order. An error fails the
/// request with that errno. Calls never happen after the request's completion was delivered.
pub trait DataMover: Send + Sync + 'static {
    /// Read: `src` holds the request's bytes at `offset_in_request`; move them out.
    fn copy_out(&self, offset_in_request: u64, src: &[u8]) -> Result<(), Errno>;
    /// Write: fill all of `dst` with the request's bytes at `offset_in_request`.
    fn copy_in(&self, offset_in_request: u64, dst: &mut [u8]) -> Result<(), Errno>;
}

impl std::fmt::Debug for dyn DataMover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataMover")
    }
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    /// Every write completed before the flush was submitted becomes durable.
    Flush,
    /// Release the range; reads return zeros afterwards.
    Trim,
    WriteZeroes,
}

/// One IO on a volume, as a transport submits it.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestKind,
    pub offset_bytes: u64,
    /// For Read and Write this must equal the buffer length.
    pub len_bytes: u64,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// Read: destination; Write: source. Returned in the completion.
    pub buf: Option<IoBuf>,
    /// Instead of `buf` (never both): who moves the data (Read/Write only).
    pub mover: Option<Arc<dyn DataMover>>,
    /// Chosen by the submitter; comes back in the completion.
    pub tag: u64,
}

impl Request {
    /// A Flush: every write completed before it is durable when it completes.
    pub fn flush(tag: u64) -> Request {
        Request {
            kind: RequestKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            fua: false,
            buf: None,
            mover: None,
            tag,
        }
    }
}

/// The outcome of a [`Request`].
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), Errno>,
    pub buf: Option<IoBuf>,
}

/// How a port's owner is woken when a completion arrives.
pub enum PortWaker {
    /// The owner polls; nothing to do.
    None,
    /// The owner may be in `std::thread::park`.
    Thread(std::thread::Thread),
    /// Any callback, run on every delivery (e.g. wake a parked reactor).
    Callback(Box<dyn Fn() + Send + Sync>),
}

/// Where a submitter receives completions. Bounded: a submitter must not have more requests in
/// flight than the port holds.
pub struct Port {
    queue: ArrayQueue<Completion>,
    waker: PortWaker,
}

impl Port {
    pub fn new(capacity: usize, waker: PortWaker) -> Arc<Port> {
        assert!(capacity > 0);
        Arc::new(Port {
            queue: ArrayQueue::new(capacity),
            waker,
        })
    }

    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn pop(&self) -> Option<Completion> {
        self.queue.pop()
    }

    pub(crate) fn deliver(&self, c: Completion) {
        // The submitter bounds its in-flight requests by the capacity, so this cannot fail.
        if self.queue.push(c).is_err() {
            panic!("completion port overflow: submitter exceeded its in-flight bound");
        }
        match &self.waker {
            PortWaker::None => {}
            PortWaker::Thread(t) => t.unpark(),
            PortWaker::Callback(f) => f(),
        }
    }
}

/// A request in flight, shared by its parts. Owns the request's buffer; parts hold windows into
/// it that never overlap.
pub(crate) struct InFlight {
    pub volume: Arc<Volume>,
    pub kind: RequestKind,
    pub fua: bool,
    pub tag: u64,
    pub port: Arc<Port>,
    pub remaining: AtomicU32,
    /// First error, as a positive errno; 0 = none.
    pub errno: AtomicI32,
    /// 0: the parts; 1: the trailing flush of a FUA write.
    pub stage: AtomicU32,
    pub submitted: std::time::Instant,
    /// Moves the data of a Read/Write that has no buffer.
    pub mover: Option<Arc<dyn DataMover>>,
    /// A write of a replicated volume counted in flight by its write barrier (see
    /// `replication::barrier`) until it completes.
    pub barrier: std::sync::OnceLock<(Arc<VolumeReplication>, BarrierEntry)>,
    buf: UnsafeCell<Option<IoBuf>>,
}

// SAFETY: `buf` is only touched by the submitter before any part is sent and by the finisher
// after `remaining` reached zero (an AcqRel decrement orders both against every part).
unsafe impl Sync for InFlight {}

impl InFlight {
    pub fn new(volume: Arc<Volume>, req: &mut Request, port: Arc<Port>) -> Arc<InFlight> {
        Arc::new(InFlight {
            volume,
            kind: req.kind,
            fua: req.fua,
            tag: req.tag,
            port,
            remaining: AtomicU32::new(0),
            errno: AtomicI32::new(0),
            stage: AtomicU32::new(0),
            submitted: std::time::Instant::now(),
            mover: req.mover.take(),
            barrier: std::sync::OnceLock::new(),
            buf: UnsafeCell::new(req.buf.take()),
        })
    }

    /// A window of the request's buffer for one part.
    ///
    /// # Safety
    /// Windows handed out for one request must not overlap, and must be taken before the
    /// parts are sent (no concurrent access to the cell).
    pub unsafe fn window(self: &Arc<Self>, offset: usize, len: usize) -> IoBuf {
        // SAFETY: caller guarantees exclusive access to the cell at this point.
        let buf = unsafe { (*self.buf.get()).as_mut() }.expect("data request has a buffer");
        assert!(offset + len <= buf.len(), "window past the buffer");
        let ptr = buf.as_mut_ptr().add(offset);
        let keep: Arc<dyn crate::buf::KeepAlive> = self.clone();
        // SAFETY: the request owns the memory and outlives the window through `keep`; windows
        // are disjoint by the caller's contract.
        unsafe { IoBuf::from_raw_parts(ptr, len, keep) }
    }

    /// The whole buffer of a Write, read-only, for a replica link to send.
    ///
    /// Sound next to the parts' windows: a Write's parts only read their windows (the device
    /// op or the memory copy reads them), so every access to the bytes while the request is
    /// in flight is a read. The cell itself is written only by [`Self::complete`], which runs
    /// after every part, the link's included, is done; the link must not use the slice after
    /// it reported its part done (`ReplicaOp` is consumed by that call).
    pub fn replica_payload(&self) -> &[u8] {
        debug_assert_eq!(
            self.kind,
            RequestKind::Write,
            "only a Write has data to send"
        );
        debug_assert!(
            self.remaining.load(Ordering::Acquire) > 0,
            "the request is still in flight"
        );
        // SAFETY: see above: no one writes the cell or the bytes until `complete`, which
        // cannot run while the caller's part is outstanding.
        let buf = unsafe { (*self.buf.get()).as_ref() };
        buf.map_or(&[], IoBuf::as_slice)
    }

    pub fn fail(&self, e: Errno) {
        let _ = self
            .errno
            .compare_exchange(0, e.0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Called once per finished part. True when this was the last one.
    pub fn part_done(&self) -> bool {
        let prev = self.remaining.fetch_sub(1, Ordering::AcqRel);
        assert!(prev > 0, "more parts finished than were sent");
        prev == 1
    }

    /// Deliver the completion. Only the finisher of the last part may call this.
    pub fn complete(&self) {
        // SAFETY: every part is done and dropped its window; we are the only accessor.
        let buf = unsafe { (*self.buf.get()).take() };
        let errno = self.errno.load(Ordering::Acquire);
        let result = if errno == 0 {
            Ok(())
        } else {
            Err(Errno(errno))
        };
        let stats = &self.volume.stats;
        if result.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((replication, entry)) = self.barrier.get() {
            replication.barrier.leave(*entry);
        }
        let ns = self.submitted.elapsed().as_nanos() as u64;
        match self.kind {
            RequestKind::Read => stats.read_latency.record(ns),
            RequestKind::Write | RequestKind::WriteZeroes | RequestKind::Trim => {
                stats.write_latency.record(ns)
            }
            RequestKind::Flush => stats.flush_latency.record(ns),
        }
        self.port.deliver(Completion {
            tag: self.tag,
            result,
            buf,
        });
    }
}

/// The piece of a request that touches one chunk, sent to that chunk's owner reactor.
pub(crate) struct Part {
    pub req: Arc<InFlight>,
    pub chunk: ChunkIndex,
    pub offset_in_chunk: u64,
    pub len_bytes: u64,
    /// Where this part starts, counted from the request's first byte.
    pub offset_in_request: u64,
    /// Window into the request's buffer (Read/Write with a buffer), or the bounce buffer of a
    /// Read/Write with a mover while its device op is in flight.
    pub buf: Option<IoBuf>,
}
