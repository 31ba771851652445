//! Tasks hosted on a reactor: transports run their connections here so that a connection's
//! socket IO goes through the same io_uring as its chunks' device IO, and a request for a chunk
//! this reactor owns is served inline, without crossing cores.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::squeue;

use super::mesh::Shared;
use super::ReactorCore;
use crate::engine::VolumeHandle;
use crate::ids::ReactorId;
pub use crate::io::uring::RingCompletion;
use crate::io::ReactorIo;
use crate::provided::ProvidedBuffers;
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

/// What a task may do on its reactor.
pub struct TaskCtx<'a> {
    pub(crate) core: &'a mut ReactorCore<ReactorIo>,
    pub(crate) shared: &'a Arc<Shared>,
    pub(crate) task_id: u32,
    pub(crate) raw_in_flight: &'a mut usize,
}

impl TaskCtx<'_> {
    pub fn reactor(&self) -> ReactorId {
        self.core.id
    }

    /// Queue a ring operation; its completion comes back through [`ReactorTask::on_ring`].
    ///
    /// # Safety
    /// Every buffer and file descriptor the entry refers to must stay valid until that
    /// completion arrives (the task owns them and must not drop them earlier).
    pub unsafe fn push_raw(&mut self, entry: squeue::Entry, tag: u32) -> Result<(), Errno> {
        if *self.raw_in_flight >= MAX_RAW_OPS_PER_REACTOR {
            return Err(Errno(libc::EAGAIN));
        }
        // SAFETY: forwarded contract.
        unsafe { self.core.io.push_raw(entry, self.task_id, tag) }
            .map_err(|()| Errno(libc::EAGAIN))?;
        *self.raw_in_flight += 1;
        Ok(())
    }

    /// Put `fd` (a socket this task owns) in the ring's file table, so the task's ops can name
    /// it as `io_uring::types::Fixed(slot)`: each op then skips a descriptor lookup and a
    /// reference count. None when the kernel cannot: use the plain descriptor. The slot is
    /// released when the reactor drops the finished task; until then the table holds a
    /// reference to the file, so closing `fd` alone does not close the socket (use
    /// `shutdown(2)` to end a connection early).
    pub fn register_fd(&mut self, fd: std::os::fd::RawFd) -> Option<u32> {
        self.core.io.register_task_fd(self.task_id, fd)
    }

    /// Register `bufs` on this reactor's ring, so receives may name its group
    /// ([`ProvidedBuffers::group`]). None when the kernel cannot or every group is taken.
    ///
    /// # Safety
    /// `bufs` must not be dropped before the reactor drops this task (it unregisters the ring
    /// first): the kernel reads its ring and writes into its buffers. Moving it is fine; its
    /// memory is on the heap.
    pub unsafe fn register_buffers(&mut self, bufs: &mut ProvidedBuffers) -> Option<u16> {
        // SAFETY: forwarded contract.
        unsafe { self.core.io.register_task_buffers(self.task_id, bufs) }
    }

    /// Submit an engine request. Parts for chunks this reactor owns run right now (a RAM read
    /// completes before this returns); the rest go to their owners.
    pub fn submit(
        &mut self,
        handle: &VolumeHandle,
        req: Request,
        port: &Arc<Port>,
    ) -> Result<(), (Request, Errno)> {
        let n = self.shared.reactors.len() as u32;
        let core = &mut *self.core;
        crate::front::submit(handle.volume(), req, port, n, &mut |to, msg| {
            core.send(to, msg)
        })
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
    pub fn read_in_place(
        &mut self,
        handle: &VolumeHandle,
        offset_bytes: u64,
        len_bytes: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Option<Result<(), Errno>> {
        self.core
            .read_in_place(handle.volume(), offset_bytes, len_bytes, sink)
    }

    /// Changes whenever something runs on this reactor that may change or free memory
    /// [`Self::read_in_place`] handed out: a task that keeps pointers to it checks (in debug
    /// builds) that this still has the value it read when it kept them.
    pub fn data_epoch(&self) -> u64 {
        self.core.data_epoch()
    }

    /// A buffer from this reactor's registered pool (cheapest for device IO here), if one is
    /// free and `len` fits.
    pub fn take_buffer(&self, len: usize) -> Option<crate::buf::IoBuf> {
        self.shared.reactors[self.core.id.0 as usize].pool_take(len)
    }

    /// A waker for ports this task owns: wakes this reactor if it is parked.
    pub fn port_waker(&self) -> PortWaker {
        let shared = self.shared.clone();
        let me = self.core.id.0 as usize;
        PortWaker::Callback(Box::new(move || shared.wake_if_parked(me)))
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
}

impl TaskTable {
    pub(crate) fn new() -> Self {
        Self {
            tasks: Vec::new(),
            raw_in_flight: 0,
            raw_done: Vec::new(),
            stop_sent: false,
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
    pub(crate) fn dispatch_ring(
        &mut self,
        core: &mut ReactorCore<ReactorIo>,
        shared: &Arc<Shared>,
    ) -> usize {
        core.io.take_raw(&mut self.raw_done);
        let n = self.raw_done.len();
        for (task_id, c) in self.raw_done.drain(..) {
            // A multishot op stays in flight until its last completion.
            if !c.more() {
                debug_assert!(
                    self.raw_in_flight > 0,
                    "a task's ring completion with none in flight"
                );
                self.raw_in_flight -= 1;
            }
            if let Some(Some(task)) = self.tasks.get_mut(task_id as usize) {
                let mut ctx = TaskCtx {
                    core: &mut *core,
                    shared,
                    task_id,
                    raw_in_flight: &mut self.raw_in_flight,
                };
                task.on_ring(&mut ctx, c);
            }
        }
        n
    }

    /// Poll every task (telling each to stop, once, when `stopping`) and drop the finished
    /// ones. Returns the work they did.
    pub(crate) fn poll_all(
        &mut self,
        core: &mut ReactorCore<ReactorIo>,
        shared: &Arc<Shared>,
        stopping: bool,
    ) -> usize {
        let mut work = 0;
        for (i, slot) in self.tasks.iter_mut().enumerate() {
            let Some(task) = slot else { continue };
            let mut ctx = TaskCtx {
                core: &mut *core,
                shared,
                task_id: i as u32,
                raw_in_flight: &mut self.raw_in_flight,
            };
            if stopping && !self.stop_sent {
                task.stop(&mut ctx);
            }
            work += task.poll(&mut ctx);
            if task.finished() {
                // Unregister first: the task owns the memory of its provided buffers.
                core.io.release_task_resources(i as u32);
                *slot = None;
                shared.reactors[core.id.0 as usize]
                    .task_slots_used
                    .fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.stop_sent |= stopping;
        work
    }

    /// No task left, and none of their ring operations in flight.
    pub(crate) fn is_drained(&self) -> bool {
        self.tasks.iter().all(Option::is_none) && self.raw_in_flight == 0
    }

    /// Some task has something waiting to be handled.
    pub(crate) fn any_ready(&self) -> bool {
        self.tasks.iter().flatten().any(|t| t.has_ready())
    }
}
