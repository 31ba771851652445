//! Tasks hosted on a reactor: transports run their connections here so that a connection's
//! socket IO goes through the same io_uring as its chunks' device IO, and a request for a chunk
//! this reactor owns is served inline, without crossing cores.
//!
//! A task sees its reactor through [`TaskCtx`]: socket ops on the reactor's ring
//! ([`crate::io::task_ring::TaskRing`]: the real io_uring, or the simulator's network) and the
//! engine parts (submit, read in place, buffers, wake-ups). [`TaskTable`] hosts the tasks of one
//! reactor for the reactor thread's loop and for the simulator alike.

use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::squeue;

use super::ReactorCore;
use crate::buf::IoBuf;
use crate::engine::VolumeHandle;
use crate::ids::ReactorId;
use crate::io::task_ring::TaskRing;
pub use crate::io::task_ring::{RingCompletion, Socket, SocketOp};
use crate::io::Io;
use crate::provided::ProvidedBuffers;
use crate::replication::ReplicaOp;
use crate::request::{Errno, Port, PortWaker, Request};

/// Most ring operations (socket sends/receives…) all tasks of one reactor may have in flight.
pub const MAX_RAW_OPS_PER_REACTOR: usize = 1024;
/// Most tasks one reactor hosts.
pub const MAX_TASKS_PER_REACTOR: usize = 256;

/// A state machine that lives on one reactor thread.
pub trait ReactorTask: Send {
    /// Called every loop iteration; returns how much work was done (0 = nothing to do now).
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize;
    /// A ring operation this task pushed completed (a multishot one may complete many times).
    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion);
    /// The daemon is stopping: finish what is in flight and close.
    fn stop(&mut self, ctx: &mut TaskCtx<'_>);
    /// Something is waiting to be handled (e.g. completions in the task's port). Checked just
    /// before the reactor parks.
    fn has_ready(&self) -> bool;
    /// Done, with no ring operation in flight: the reactor drops the task.
    fn finished(&self) -> bool;
}

/// What a reactor's surroundings give its tasks beside the core: the threaded runtime's mesh
/// ([`super::mesh::Shared`]) or the simulator's stand-in.
pub(crate) trait TaskEnv {
    /// A buffer from reactor `me`'s registered pool, if one is free and `len` fits.
    fn take_buffer(&self, me: ReactorId, len: usize) -> Option<IoBuf>;
    /// A waker for ports of a task on reactor `me`.
    fn port_waker(&self, me: ReactorId) -> PortWaker;
    /// Reactor `me` dropped a finished task: its table entry is free.
    fn task_dropped(&self, me: ReactorId);
}

/// The reactor a task runs on, as [`TaskCtx`] sees it: its ring and the engine parts.
trait TaskHost {
    fn reactor(&self) -> ReactorId;
    fn ring(&mut self) -> &mut dyn TaskRing;
    fn submit(
        &mut self,
        handle: &VolumeHandle,
        req: Request,
        port: &Arc<Port>,
    ) -> Result<(), (Request, Errno)>;
    fn read_in_place(
        &mut self,
        handle: &VolumeHandle,
        offset_bytes: u64,
        len_bytes: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Option<Result<(), Errno>>;
    fn data_epoch(&self) -> u64;
    fn replica_done(&mut self, op: ReplicaOp);
    fn take_buffer(&self, len: usize) -> Option<IoBuf>;
    fn port_waker(&self) -> PortWaker;
}

/// A reactor core and its surroundings, hosting tasks.
struct CoreHost<'a, I: Io + TaskRing> {
    core: &'a mut ReactorCore<I>,
    env: &'a dyn TaskEnv,
}

impl<I: Io + TaskRing> TaskHost for CoreHost<'_, I> {
    fn reactor(&self) -> ReactorId {
        self.core.id
    }

    #[inline]
    fn ring(&mut self) -> &mut dyn TaskRing {
        &mut self.core.io
    }

    #[inline]
    fn submit(
        &mut self,
        handle: &VolumeHandle,
        req: Request,
        port: &Arc<Port>,
    ) -> Result<(), (Request, Errno)> {
        let n = self.core.router.reactors();
        let core = &mut *self.core;
        crate::front::submit(handle.volume(), req, port, n, &mut |to, msg| {
            core.send(to, msg)
        })
    }

    #[inline]
    fn read_in_place(
        &mut self,
        handle: &VolumeHandle,
        offset_bytes: u64,
        len_bytes: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Option<Result<(), Errno>> {
        self.core
            .read_in_place(handle.volume(), offset_bytes, len_bytes, sink)
    }

    fn data_epoch(&self) -> u64 {
        self.core.data_epoch()
    }

    fn replica_done(&mut self, op: ReplicaOp) {
        // An async op's copy goes (and hands its bytes back to the queue's bound) here too.
        if let crate::replication::fanout::OpOrigin::Request(req) = op.origin {
            if req.part_done() {
                self.core.finish_request(req);
            }
        }
    }

    fn take_buffer(&self, len: usize) -> Option<IoBuf> {
        self.env.take_buffer(self.core.id, len)
    }

    fn port_waker(&self) -> PortWaker {
        self.env.port_waker(self.core.id)
    }
}

/// What a task may do on its reactor.
pub struct TaskCtx<'a> {
    host: &'a mut dyn TaskHost,
    task_id: u32,
    raw_in_flight: &'a mut usize,
    /// The soonest any task of this turn asked to be polled again by, in ns from its poll.
    wake_within_ns: &'a mut Option<u64>,
}

impl TaskCtx<'_> {
    pub fn reactor(&self) -> ReactorId {
        self.host.reactor()
    }

    /// Queue a socket op; its completion comes back through [`ReactorTask::on_ring`].
    ///
    /// # Safety
    /// Every buffer, header and file descriptor the op refers to must stay valid until its
    /// last completion arrives (the task owns them and must not drop them earlier).
    #[inline]
    pub unsafe fn push(&mut self, op: SocketOp, tag: u32) -> Result<(), Errno> {
        if *self.raw_in_flight >= MAX_RAW_OPS_PER_REACTOR {
            return Err(Errno(libc::EAGAIN));
        }
        // SAFETY: forwarded contract.
        unsafe { self.host.ring().push(self.task_id, op, tag) }?;
        *self.raw_in_flight += 1;
        Ok(())
    }

    /// Queue a ring entry built by the task (ublk's commands); its completion comes back
    /// through [`ReactorTask::on_ring`]. Only a real ring takes it: the simulator answers
    /// `EOPNOTSUPP`.
    ///
    /// # Safety
    /// Every buffer and file descriptor the entry refers to must stay valid until that
    /// completion arrives (the task owns them and must not drop them earlier).
    pub unsafe fn push_raw(&mut self, entry: squeue::Entry, tag: u32) -> Result<(), Errno> {
        if *self.raw_in_flight >= MAX_RAW_OPS_PER_REACTOR {
            return Err(Errno(libc::EAGAIN));
        }
        // SAFETY: forwarded contract.
        unsafe { self.host.ring().push_raw(self.task_id, entry, tag) }?;
        *self.raw_in_flight += 1;
        Ok(())
    }

    /// Put `fd` (a socket this task owns) in the ring's file table, so the task's ops can name
    /// it as [`Socket::Fixed`]: each op then skips a descriptor lookup and a reference count.
    /// None when the ring cannot: use [`Socket::Fd`]. The slot is released when the reactor
    /// drops the finished task; until then the table holds a reference to the file, so
    /// closing `fd` alone does not close the socket (use [`Self::shutdown`] to end a
    /// connection early).
    pub fn register_fd(&mut self, fd: RawFd) -> Option<u32> {
        self.host.ring().register_fd(self.task_id, fd)
    }

    /// Register `bufs` on this reactor's ring, so receives may name its group
    /// ([`ProvidedBuffers::group`]). None when the ring cannot or every group is taken.
    ///
    /// # Safety
    /// `bufs` must not be dropped before the reactor drops this task (it unregisters the ring
    /// first): the ring reads its entries and writes into its buffers. Moving it is fine; its
    /// memory is on the heap.
    pub unsafe fn register_buffers(&mut self, bufs: &mut ProvidedBuffers) -> Option<u16> {
        // SAFETY: forwarded contract.
        unsafe { self.host.ring().register_buffers(self.task_id, bufs) }
    }

    /// Send `iov` on socket `fd` now, without blocking (`sendmsg(MSG_DONTWAIT)`, outside the
    /// ring). Returns the bytes the socket took (0 when none, or on an error, which a ring
    /// send of the rest then reports).
    ///
    /// # Safety
    /// The iovecs point at readable memory, valid for the call.
    #[inline]
    pub unsafe fn send_now(&mut self, fd: RawFd, iov: &[libc::iovec]) -> usize {
        // SAFETY: forwarded contract.
        unsafe { self.host.ring().send_now(fd, iov) }
    }

    /// This reactor's ring sends [`SocketOp::SendZc`] and [`SocketOp::SendMsgZc`] zero-copy
    /// (from [`crate::io::zero_copy::ZERO_COPY_MIN_BYTES`] on). Either way those ops work: a
    /// ring without zero-copy sends them by copying, with one completion.
    pub fn zero_copy_sends(&mut self) -> bool {
        self.host.ring().zero_copy_sends()
    }

    /// `shutdown(fd, SHUT_RDWR)` on a socket this task owns: its receive in flight completes.
    pub fn shutdown(&mut self, fd: RawFd) {
        self.host.ring().shutdown(fd)
    }

    /// Submit an engine request. Parts for chunks this reactor owns run right now (a RAM read
    /// completes before this returns); the rest go to their owners.
    #[inline]
    pub fn submit(
        &mut self,
        handle: &VolumeHandle,
        req: Request,
        port: &Arc<Port>,
    ) -> Result<(), (Request, Errno)> {
        self.host.submit(handle, req, port)
    }

    /// Read `len_bytes` at `offset_bytes` straight from where the volume keeps them, when this
    /// reactor can serve it at once: the range lies in one chunk this reactor owns, on a memory
    /// device (or not yet written: zeros). The bytes go to `sink`, in order, in one or more
    /// pieces, before this returns; the volume's statistics count it as a request. None when
    /// it cannot be (`sink` untouched): [`TaskCtx::submit`] the read instead.
    ///
    /// The pieces are the device's own memory (or static zeros). They stay valid and
    /// unchanged after this returns until this reactor runs something that can change data:
    /// a request this task or another starts (or submits) that writes, trims or zeroes, a
    /// message or completion the reactor handles. A task may keep pointers to them across
    /// further `read_in_place` calls of its own, and must be done with them before any of
    /// that (the NBD connection sends a receive's replies from them at its end).
    #[inline]
    pub fn read_in_place(
        &mut self,
        handle: &VolumeHandle,
        offset_bytes: u64,
        len_bytes: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Option<Result<(), Errno>> {
        self.host
            .read_in_place(handle, offset_bytes, len_bytes, sink)
    }

    /// Changes whenever something runs on this reactor that may change or free memory
    /// [`Self::read_in_place`] handed out: a task that keeps pointers to it checks (in debug
    /// builds) that this still has the value it read when it kept them.
    pub fn data_epoch(&self) -> u64 {
        self.host.data_epoch()
    }

    /// A replica link's op is done: the replica acknowledged it, or the link failed and
    /// marked its range in the replica's dirty bitmap. Its request completes when its other
    /// parts are done too.
    pub fn replica_done(&mut self, op: ReplicaOp) {
        self.host.replica_done(op)
    }

    /// A buffer from this reactor's registered pool (cheapest for device IO here), if one is
    /// free and `len` fits.
    pub fn take_buffer(&self, len: usize) -> Option<IoBuf> {
        self.host.take_buffer(len)
    }

    /// A waker for ports this task owns: wakes this reactor if it is parked.
    pub fn port_waker(&self) -> PortWaker {
        self.host.port_waker()
    }

    /// Poll this task again within `delay_ns` even when nothing else happens (a heartbeat or
    /// a timeout is due): a parked reactor parks no longer than that. Asked from
    /// [`ReactorTask::poll`], for that poll only: a task that still waits asks again each
    /// poll. The delay is relative so that a task keeps its own clock (the simulator's ticks).
    pub fn wake_within_ns(&mut self, delay_ns: u64) {
        let soonest = self.wake_within_ns.get_or_insert(delay_ns);
        *soonest = (*soonest).min(delay_ns);
    }
}

/// The tasks one reactor hosts, and their ring operations in flight.
pub(crate) struct TaskTable {
    tasks: Vec<Option<Box<dyn ReactorTask>>>,
    raw_in_flight: usize,
    /// Scratch for the completed ring ops of one loop turn.
    raw_done: Vec<(u32, RingCompletion)>,
    /// Every task has been told to stop.
    stop_sent: bool,
    /// The soonest wake-up the tasks asked for in the last [`Self::poll_all`].
    wake_within_ns: Option<u64>,
}

impl TaskTable {
    pub(crate) fn new() -> Self {
        Self {
            tasks: Vec::new(),
            raw_in_flight: 0,
            raw_done: Vec::new(),
            stop_sent: false,
            wake_within_ns: None,
        }
    }

    /// Put `task` in a free entry; handed back when all [`MAX_TASKS_PER_REACTOR`] are taken.
    pub(crate) fn insert(
        &mut self,
        task: Box<dyn ReactorTask>,
    ) -> Result<(), Box<dyn ReactorTask>> {
        match self.tasks.iter().position(Option::is_none) {
            Some(i) => self.tasks[i] = Some(task),
            None if self.tasks.len() < MAX_TASKS_PER_REACTOR => self.tasks.push(Some(task)),
            None => return Err(task),
        }
        Ok(())
    }

    /// Hand the tasks' completed ring operations to them. Returns how many.
    pub(crate) fn dispatch_ring<I: Io + TaskRing>(
        &mut self,
        core: &mut ReactorCore<I>,
        env: &dyn TaskEnv,
    ) -> usize {
        core.io.take_completions(&mut self.raw_done);
        let n = self.raw_done.len();
        for (task_id, c) in self.raw_done.drain(..) {
            // A multishot op, or a zero-copy send before its notification, stays in flight
            // until its last completion.
            if !c.more() {
                debug_assert!(
                    self.raw_in_flight > 0,
                    "a task's ring completion with none in flight"
                );
                self.raw_in_flight -= 1;
            }
            if let Some(Some(task)) = self.tasks.get_mut(task_id as usize) {
                let mut host = CoreHost {
                    core: &mut *core,
                    env,
                };
                // Only a poll's wake-up request counts (the turn's poll follows).
                let mut ignored = None;
                let mut ctx = TaskCtx {
                    host: &mut host,
                    task_id,
                    raw_in_flight: &mut self.raw_in_flight,
                    wake_within_ns: &mut ignored,
                };
                task.on_ring(&mut ctx, c);
            }
        }
        n
    }

    /// Poll every task (telling each to stop, once, when `stopping`) and drop the finished
    /// ones. Returns the work they did.
    pub(crate) fn poll_all<I: Io + TaskRing>(
        &mut self,
        core: &mut ReactorCore<I>,
        env: &dyn TaskEnv,
        stopping: bool,
    ) -> usize {
        let mut work = 0;
        self.wake_within_ns = None;
        for (i, slot) in self.tasks.iter_mut().enumerate() {
            let Some(task) = slot else { continue };
            let mut host = CoreHost {
                core: &mut *core,
                env,
            };
            let mut ctx = TaskCtx {
                host: &mut host,
                task_id: i as u32,
                raw_in_flight: &mut self.raw_in_flight,
                wake_within_ns: &mut self.wake_within_ns,
            };
            if stopping && !self.stop_sent {
                task.stop(&mut ctx);
            }
            work += task.poll(&mut ctx);
            if task.finished() {
                // Unregister first: the task owns the memory of its provided buffers.
                core.io.release_task_resources(i as u32);
                *slot = None;
                env.task_dropped(core.id);
            }
        }
        self.stop_sent |= stopping;
        work
    }

    /// The soonest a task asked to be polled again by ([`TaskCtx::wake_within_ns`]) in the
    /// last [`Self::poll_all`], in ns from then.
    pub(crate) fn wake_within_ns(&self) -> Option<u64> {
        self.wake_within_ns
    }

    /// No task left, and none of their ring operations in flight.
    pub(crate) fn is_drained(&self) -> bool {
        self.tasks.iter().all(Option::is_none) && self.raw_in_flight == 0
    }

    /// Tasks in the table.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn len(&self) -> usize {
        self.tasks.iter().flatten().count()
    }

    /// Some task has something waiting to be handled.
    pub(crate) fn any_ready(&self) -> bool {
        self.tasks.iter().flatten().any(|t| t.has_ready())
    }
}
