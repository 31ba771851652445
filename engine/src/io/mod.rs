//! The IO seam. Reactor logic is written against [`Io`] (device ops) and hosted tasks against
//! [`task_ring::TaskRing`] (socket ops); the real implementation of both drives one io_uring
//! per reactor ([`uring::UringIo`]), the simulated one a seeded model of a disk with a
//! volatile write cache and a seeded network of stream sockets ([`sim::SimIo`],
//! [`sim_net::SimNet`]).

mod delay;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
#[cfg(any(test, feature = "testing"))]
pub mod sim_net;
pub mod task_ring;
pub mod uring;
pub mod zero_copy;

use crate::buf::IoBuf;
use crate::ids::DeviceId;
use crate::request::Errno;

/// What an [`IoOp`] does to its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Read `buf.len()` bytes at `offset_bytes` into `buf`.
    Read,
    /// Write `buf` at `offset_bytes`; `fua` asks for it to be durable on completion.
    Write { fua: bool },
    /// Make every write completed before this op was submitted durable.
    Sync,
    /// Make `len_bytes` at `offset_bytes` read back as zeros (punch/zero range).
    Zero { len_bytes: u64 },
}

/// One device operation. It owns its buffer until its [`IoCompletion`] comes back.
#[derive(Debug)]
pub struct IoOp {
    pub device: DeviceId,
    pub kind: IoKind,
    pub offset_bytes: u64,
    pub buf: Option<IoBuf>,
    /// Chosen by the submitter, returned in the completion.
    pub tag: u64,
}

/// The result of an [`IoOp`]: bytes transferred or a positive errno, and the buffer back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<u32, Errno>,
    pub buf: Option<IoBuf>,
}

/// How [`Io::with_memory`] touches a memory device's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemAccess {
    /// The bytes are read (copied out of the device).
    Read,
    /// The bytes are written; `fua` makes them durable before the call returns.
    Write { fua: bool },
}

/// A reactor's view of its devices. Not thread-safe by design: one per reactor.
pub trait Io {
    /// Queue an op. When the submission side is full the op is handed back; the caller keeps
    /// it and retries after reaping completions.
    fn push(&mut self, op: IoOp) -> Result<(), IoOp>;

    /// Submit queued ops and append every completion that is ready to `out`, without blocking.
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), crate::EngineError>;

    /// Append the completions that are ready without entering the kernel (ops served inline,
    /// such as memory devices, and whatever the ring already holds). Default: [`Io::poll`].
    fn poll_local(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), crate::EngineError> {
        self.poll(out)
    }

    /// Block until a completion is ready, [`Io::wake_fd`] is written, or `timeout_ns` passes.
    fn park(&mut self, timeout_ns: Option<u64>) -> Result<(), crate::EngineError>;

    /// Ops pushed and not yet completed.
    fn in_flight(&self) -> usize;

    /// Run `f` on `len` bytes at `offset_bytes` of `device`'s own memory, synchronously, when
    /// the device is plain memory (`ram`, `bbram`; not wrapped by `delay` or `fault`). `None`
    /// when it is not: the caller goes through a buffer and [`Io::push`] instead.
    ///
    /// Only the reactor that owns the chunk holding the range may call this (chunk ownership
    /// is what makes the access exclusive), and `f` must not keep the slice.
    fn with_memory(
        &mut self,
        device: DeviceId,
        offset_bytes: u64,
        len: usize,
        access: MemAccess,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), Errno>,
    ) -> Option<Result<(), Errno>> {
        let _ = (device, offset_bytes, len, access, f);
        None
    }
}
