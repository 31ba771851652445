//! What a reactor's tasks need from its ring: socket ops as a typed enum ([`SocketOp`]), the
//! file table and provided-buffer registrations they use, and their completions. The real
//! io_uring ([`super::uring::UringIo`]) builds exactly the entries a task would build itself;
//! the simulator ([`super::sim::SimIo`]) completes the same ops from a seeded network
//! (`io::sim_net`), so a transport task runs unchanged on both.
//!
//! Ops the simulator cannot model (ublk's `URING_CMD`s) go through [`TaskRing::push_raw`],
//! which only a real ring accepts.

use std::os::fd::RawFd;

use io_uring::squeue;

use super::zero_copy::{SendCounters, NOTIF_USAGE_ZC_COPIED};
use crate::provided::ProvidedBuffers;
use crate::request::Errno;

/// `IORING_CQE_F_BUFFER`: the completion names a provided buffer (its id in the upper 16 bits).
pub const CQE_F_BUFFER: u32 = 1 << 0;
/// `IORING_CQE_F_MORE`: more completions of the same op follow.
pub const CQE_F_MORE: u32 = 1 << 1;
/// `IORING_CQE_F_NOTIF`: a zero-copy send's notification (its buffer is free again).
pub const CQE_F_NOTIF: u32 = 1 << 3;
/// `IORING_CQE_BUFFER_SHIFT`.
pub const CQE_BUFFER_SHIFT: u32 = 16;

/// A socket as a task's ops name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// The plain descriptor.
    Fd(RawFd),
    /// A slot of the ring's file table ([`TaskRing::register_fd`]): each op skips a descriptor
    /// lookup and a reference count.
    Fixed(u32),
}

/// A socket operation of a task. Every send is `MSG_NOSIGNAL`: a peer that went away is an
/// `EPIPE` completion, never a signal.
///
/// The buffers are raw pointers because the ring reads or fills them after the push returns:
/// whoever pushes the op keeps them valid (and a receive's buffer untouched) until its last
/// completion (see [`TaskRing::push`]).
///
/// **Zero-copy sends** ([`Self::SendZc`], [`Self::SendMsgZc`]) complete twice: the result
/// (bytes sent or -errno) flagged [`CQE_F_MORE`], then a notification
/// ([`RingCompletion::is_notification`]) once the kernel no longer reads the pages, which says
/// whether it copied them after all ([`RingCompletion::copied`]). Until that notification the
/// memory is the kernel's: the task keeps it alive and unchanged (hold a reference to the
/// chunk or receive buffer it lies in), even when the result already said every byte went.
/// A ring without zero-copy sends, or a payload under
/// [`super::zero_copy::ZERO_COPY_MIN_BYTES`], goes out as the matching copying op instead:
/// one completion, without `more`. So the rule is one for every send: the memory is free at
/// the op's completion without [`RingCompletion::more`]. Zero-copy needs a TCP (or UDP)
/// socket: on a Unix socket the kernel answers `EOPNOTSUPP` (then still notifies), so a task
/// on one uses [`Self::Send`] / [`Self::SendMsg`].
#[derive(Clone, Copy, Debug)]
pub enum SocketOp {
    /// Receive up to `len` bytes into `buf`. `poll_first`: arm the readiness poll before the
    /// first attempt (`IORING_RECVSEND_POLL_FIRST`), for a socket the last receive emptied.
    Recv {
        socket: Socket,
        buf: *mut u8,
        len: u32,
        poll_first: bool,
    },
    /// A multishot receive: each arrival takes the next buffer of provided-buffer `group`
    /// (a completion with [`RingCompletion::buffer`] and [`RingCompletion::more`]) until the
    /// peer closes, an error, or no buffer is free (`ENOBUFS`), which ends it.
    RecvMulti { socket: Socket, group: u16 },
    /// Send `len` bytes from `buf`.
    Send {
        socket: Socket,
        buf: *const u8,
        len: u32,
    },
    /// `sendmsg` of the iovecs `msg` names (the header, and what it points to, stay valid).
    SendMsg {
        socket: Socket,
        msg: *const libc::msghdr,
    },
    /// Send `len` bytes from `buf` zero-copy (`IORING_OP_SEND_ZC` with
    /// `IORING_SEND_ZC_REPORT_USAGE`); `buf` stays valid and unchanged until the notification.
    SendZc {
        socket: Socket,
        buf: *const u8,
        len: u32,
    },
    /// `sendmsg` zero-copy (`IORING_OP_SENDMSG_ZC`, reporting usage) of the iovecs `msg`
    /// names: a frame header and the pages that follow it, from where they already are. The
    /// header, the iovecs and the memory they name stay valid and unchanged until the
    /// notification.
    SendMsgZc {
        socket: Socket,
        msg: *const libc::msghdr,
    },
}

/// A completion of a task's ring op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingCompletion {
    /// The tag the operation was pushed with.
    pub tag: u32,
    /// The CQE's result as the kernel gives it: bytes, or -errno ([`Self::errno`] reads it).
    pub result: i32,
    /// The CQE's flags (`IORING_CQE_F_*`).
    pub flags: u32,
}

impl RingCompletion {
    /// The error, when the operation failed. None for a notification, whose result holds
    /// flags ([`Self::copied`]), not an error.
    pub fn errno(&self) -> Option<Errno> {
        (self.result < 0 && !self.is_notification()).then(|| Errno(self.result.wrapping_neg()))
    }

    /// More completions of this operation will follow: a multishot one is still armed, or a
    /// zero-copy send's notification is still to come. The op is in flight (and its memory
    /// the kernel's) until a completion without it.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled, if any.
    pub fn buffer(&self) -> Option<u16> {
        io_uring::cqueue::buffer_select(self.flags)
    }

    /// A zero-copy send's notification: its memory may be reused. Its [`Self::result`] is
    /// not a byte count (the result completion before it had that).
    pub fn is_notification(&self) -> bool {
        io_uring::cqueue::notif(self.flags)
    }

    /// A zero-copy send's notification saying the kernel copied the pages anyway (loopback,
    /// or a device that cannot send from them), so the send cost a copy after all.
    pub fn copied(&self) -> bool {
        self.is_notification() && (self.result as u32) & NOTIF_USAGE_ZC_COPIED != 0
    }
}

/// The ring a reactor's tasks use, named by task number: ops and registrations are owned by
/// the task that made them and released together when the reactor drops it.
pub trait TaskRing {
    /// Queue task `task_id`'s socket op; its completion comes back from
    /// [`Self::take_completions`] with `tag`. A zero-copy send goes out by copying when the
    /// ring cannot send zero-copy or the payload is small (see [`SocketOp`]); either way it is
    /// counted in [`Self::send_counters`].
    ///
    /// # Safety
    /// Every buffer, header and descriptor the op refers to must stay valid until its last
    /// completion is taken.
    unsafe fn push(&mut self, task_id: u32, op: SocketOp, tag: u32) -> Result<(), Errno>;

    /// Queue an entry the task built itself (ublk's commands). Only a real ring takes it; the
    /// simulator answers `EOPNOTSUPP`.
    ///
    /// # Safety
    /// As for [`Self::push`], for what the entry points to.
    unsafe fn push_raw(
        &mut self,
        task_id: u32,
        entry: squeue::Entry,
        tag: u32,
    ) -> Result<(), Errno>;

    /// Put `fd` (a socket task `task_id` owns) in the ring's file table, so its ops may name
    /// it as [`Socket::Fixed`]. None when there is no free slot: use the plain descriptor.
    fn register_fd(&mut self, task_id: u32, fd: RawFd) -> Option<u32>;

    /// Register `bufs` for multishot receives of task `task_id`; sets and returns its group.
    /// None when it cannot: the task receives one `Recv` at a time.
    ///
    /// # Safety
    /// `bufs`' memory must stay valid until [`Self::release_task_resources`] runs for the task.
    unsafe fn register_buffers(&mut self, task_id: u32, bufs: &mut ProvidedBuffers) -> Option<u16>;

    /// The ring sends [`SocketOp::SendZc`] and [`SocketOp::SendMsgZc`] zero-copy (from
    /// [`super::zero_copy::ZERO_COPY_MIN_BYTES`] on); false: it sends them by copying.
    fn zero_copy_sends(&self) -> bool;

    /// How this ring's zero-copy sends went out.
    fn send_counters(&self) -> &SendCounters;

    /// Drop what task `task_id` registered (file slots, buffer groups), before the task and
    /// the memory it owns are dropped.
    fn release_task_resources(&mut self, task_id: u32);

    /// Append the completed ops, each with the task that pushed it.
    fn take_completions(&mut self, out: &mut Vec<(u32, RingCompletion)>);

    /// Send what `iov` holds on `fd` now, without blocking and outside the ring
    /// (`sendmsg(MSG_DONTWAIT)`). Returns the bytes taken: 0 when the socket took none or
    /// failed (a ring send of the rest reports any error).
    ///
    /// # Safety
    /// The iovecs point at readable memory, valid for the call.
    unsafe fn send_now(&mut self, fd: RawFd, iov: &[libc::iovec]) -> usize;

    /// `shutdown(fd, SHUT_RDWR)`: a receive in flight completes (with end-of-file), the peer
    /// sees end-of-file after what was sent.
    fn shutdown(&mut self, fd: RawFd);
}

/// A device-op decorator ([`super::delay::Delayed`], [`super::fault::Faulty`]) leaves socket
/// ops alone: it hands them to the ring below.
macro_rules! task_ring_passes_through {
    ($ty:ty, $($bounds:tt)*) => {
        impl<$($bounds)*> TaskRing for $ty {
            #[inline]
            unsafe fn push(&mut self, task_id: u32, op: SocketOp, tag: u32) -> Result<(), Errno> {
                // SAFETY: forwarded contract.
                unsafe { TaskRing::push(&mut **self, task_id, op, tag) }
            }
            unsafe fn push_raw(
                &mut self,
                task_id: u32,
                entry: squeue::Entry,
                tag: u32,
            ) -> Result<(), Errno> {
                // SAFETY: forwarded contract.
                unsafe { (**self).push_raw(task_id, entry, tag) }
            }
            fn register_fd(&mut self, task_id: u32, fd: RawFd) -> Option<u32> {
                (**self).register_fd(task_id, fd)
            }
            unsafe fn register_buffers(
                &mut self,
                task_id: u32,
                bufs: &mut ProvidedBuffers,
            ) -> Option<u16> {
                // SAFETY: forwarded contract.
                unsafe { (**self).register_buffers(task_id, bufs) }
            }
            fn zero_copy_sends(&self) -> bool {
                (**self).zero_copy_sends()
            }
            fn send_counters(&self) -> &SendCounters {
                (**self).send_counters()
            }
            fn release_task_resources(&mut self, task_id: u32) {
                (**self).release_task_resources(task_id)
            }
            #[inline]
            fn take_completions(&mut self, out: &mut Vec<(u32, RingCompletion)>) {
                (**self).take_completions(out)
            }
            #[inline]
            unsafe fn send_now(&mut self, fd: RawFd, iov: &[libc::iovec]) -> usize {
                // SAFETY: forwarded contract.
                unsafe { (**self).send_now(fd, iov) }
            }
            fn shutdown(&mut self, fd: RawFd) {
                (**self).shutdown(fd)
            }
        }
    };
}

task_ring_passes_through!(super::delay::Delayed<I, C>, I: super::Io + TaskRing, C: super::delay::Clock);
task_ring_passes_through!(super::fault::Faulty<I>, I: super::Io + TaskRing);
