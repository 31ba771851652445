//! The IO seam. Reactor logic is written against [`Io`] (device ops) and hosted tasks against
//! [`task_ring::TaskRing`] (socket ops). Two leaves implement both: the real one drives one
//! io_uring per reactor ([`uring::UringIo`]), the simulated one a seeded model of a disk with a
//! volatile write cache and a seeded network of stream sockets ([`sim::SimIo`],
//! [`sim_net::SimNet`]). Two decorators stack on either
//! leaf, each acting only on the devices configured for it and passing other devices' ops
//! straight through:
//!
//! - [`fault::Faulty`] fails chosen ops with EIO before they reach the leaf;
//! - [`delay::Delayed`] holds each completion until the emulated device would have finished
//!   it (the firmware profile's service time, plus fault spikes), by a [`delay::Clock`] the
//!   simulator can drive.
//!
//! The order is fixed, delay over fault over leaf (a reactor's `ReactorIo`): an injected
//! error waits like any completion, and a spike adds to the due time.

pub mod delay;
pub mod fault;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
#[cfg(any(test, feature = "testing"))]
pub mod sim_net;
pub mod task_ring;
#[cfg(test)]
mod test_io;
pub mod uring;
pub mod zero_copy;

use std::sync::Arc;

use self::delay::{Clock, DelayModel, Delayed, MonotonicClock};
use self::fault::Faulty;
use self::uring::UringIo;
use crate::buf::IoBuf;
use crate::device::OpenDevice;
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

    /// Whether [`Io::push`] takes an op for `device` now (it hands it back when the reactor's
    /// or the device's queue is full). A decorator that settles an op itself asks first, so
    /// the op is refused exactly where the leaf would refuse it.
    fn has_room(&self, device: DeviceId) -> bool;

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

/// A reactor's IO: its ring under the fault and delay decorators of the devices that have
/// them.
pub(crate) type ReactorIo = Delayed<Faulty<UringIo>, MonotonicClock>;

/// Stack the fault and delay decorators `devices` ask for over `leaf`. `queue_depth` bounds
/// the ops in flight at once, completions held back by the delay included.
pub(crate) fn decorate<I: Io, C: Clock>(
    leaf: I,
    clock: C,
    queue_depth: usize,
    devices: &[Arc<OpenDevice>],
) -> Delayed<Faulty<I>, C> {
    let faults = devices
        .iter()
        .filter_map(|d| Some((d.spec.id, d.fault.clone()?)));
    let delays = devices
        .iter()
        .filter_map(|d| Some((d.spec.id, DelayModel::of(d)?)));
    Delayed::new(Faulty::new(leaf, faults), clock, queue_depth, delays)
}
