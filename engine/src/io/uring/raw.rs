//! Task ops: the socket ops a reactor's tasks push (built here into exactly the entries the
//! tasks used to build themselves), their raw entries (ublk's commands), and the file table
//! slots and provided-buffer groups they use. The ring knows its owners only by number and
//! releases what each registered when told to. Zero-copy sends are probed for when the ring is
//! made ([`probe_zero_copy`]) and routed at push ([`crate::io::zero_copy`]).

use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::user_data::UserData;
use super::UringIo;
use crate::io::task_ring::{RingCompletion, Socket, SocketOp, TaskRing};
use crate::io::zero_copy::{self, SendCounters, SEND_ZC_REPORT_USAGE};
use crate::provided::ProvidedBuffers;
use crate::request::Errno;

/// `sqe->ioprio` flag of socket sends and receives: arm the poll before the first attempt
/// (`IORING_RECVSEND_POLL_FIRST` in linux/io_uring.h).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// Build an op on `socket`, through the ring's file table when it names a slot.
macro_rules! on_socket {
    ($socket:expr, $build:expr) => {
        match $socket {
            Socket::Fixed(slot) => $build(types::Fixed(slot)),
            Socket::Fd(fd) => $build(types::Fd(fd)),
        }
    };
}

/// The ring entry of `op` (without its `user_data`).
#[inline]
fn entry_of(op: SocketOp) -> squeue::Entry {
    match op {
        SocketOp::Recv {
            socket,
            buf,
            len,
            poll_first,
        } => {
            let ioprio = if poll_first {
                IORING_RECVSEND_POLL_FIRST
            } else {
                0
            };
            on_socket!(socket, |fd| opcode::Recv::new(fd, buf, len)
                .ioprio(ioprio)
                .build())
        }
        SocketOp::RecvMulti { socket, group } => {
            on_socket!(socket, |fd| opcode::RecvMulti::new(fd, group).build())
        }
        SocketOp::Send { socket, buf, len } => {
            on_socket!(socket, |fd| opcode::Send::new(fd, buf, len)
                .flags(libc::MSG_NOSIGNAL)
                .build())
        }
        SocketOp::SendMsg { socket, msg } => on_socket!(socket, |fd| opcode::SendMsg::new(fd, msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()),
        SocketOp::SendZc { socket, buf, len } => {
            on_socket!(socket, |fd| opcode::SendZc::new(fd, buf, len)
                .flags(libc::MSG_NOSIGNAL)
                .zc_flags(SEND_ZC_REPORT_USAGE)
                .build())
        }
        SocketOp::SendMsgZc { socket, msg } => {
            on_socket!(socket, |fd| opcode::SendMsgZc::new(fd, msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .ioprio(SEND_ZC_REPORT_USAGE)
                .build())
        }
    }
}

/// Whether `ring` can send zero-copy as [`SocketOp::SendZc`] does; Err says why not.
///
/// Call on a fresh ring, before anything else is in it: the probe's own completions are
/// reaped here.
pub(super) fn probe_zero_copy(ring: &mut IoUring) -> Result<(), String> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("the kernel cannot list its io_uring opcodes ({e})"))?;
    for (code, name) in [
        (opcode::SendZc::CODE, "IORING_OP_SEND_ZC (Linux 6.0)"),
        (opcode::SendMsgZc::CODE, "IORING_OP_SENDMSG_ZC (Linux 6.1)"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel has no {name}"));
        }
    }
    // The opcode probe says nothing of flags. A send on no descriptor fails in preparation
    // (EINVAL) where the usage report is unknown, and only later (EBADF) where it is known.
    let entry = opcode::SendZc::new(types::Fd(-1), std::ptr::null(), 0)
        .zc_flags(SEND_ZC_REPORT_USAGE)
        .build()
        .user_data(UserData::Wake.encode());
    // SAFETY: the entry points at no memory (no buffer, no descriptor).
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| "the fresh ring has no room for the probe".to_string())?;
    let mut result = None;
    let mut notification_due = false;
    // Bounded: the result comes, then at most one notification (announced by `more`).
    while result.is_none() || notification_due {
        ring.submit_and_wait(1)
            .map_err(|e| format!("probing zero-copy sends failed ({e})"))?;
        for cqe in ring.completion() {
            let c = RingCompletion {
                tag: 0,
                result: cqe.result(),
                flags: cqe.flags(),
            };
            if c.is_notification() {
                notification_due = false;
            } else {
                result = Some(c.result);
                notification_due = c.more();
            }
        }
    }
    match result {
        Some(r) if r == -libc::EINVAL => Err(
            "the kernel cannot report zero-copy usage (IORING_SEND_ZC_REPORT_USAGE, Linux 6.2)"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

impl TaskRing for UringIo {
    #[inline]
    unsafe fn push(&mut self, task_id: u32, op: SocketOp, tag: u32) -> Result<(), Errno> {
        // SAFETY: forwarded contract (a SendMsgZc's header is readable).
        let (op, path) = unsafe { zero_copy::route(op, self.features.zero_copy_sends) };
        // SAFETY: forwarded contract.
        unsafe { self.push_task_entry(entry_of(op), task_id, tag) }?;
        if let Some(path) = path {
            self.sends.count(path);
        }
        Ok(())
    }

    unsafe fn push_raw(
        &mut self,
        task_id: u32,
        entry: squeue::Entry,
        tag: u32,
    ) -> Result<(), Errno> {
        // SAFETY: forwarded contract.
        unsafe { self.push_task_entry(entry, task_id, tag) }
    }

    fn register_fd(&mut self, task_id: u32, fd: RawFd) -> Option<u32> {
        self.register_task_fd(task_id, fd)
    }

    unsafe fn register_buffers(&mut self, task_id: u32, bufs: &mut ProvidedBuffers) -> Option<u16> {
        // SAFETY: forwarded contract.
        unsafe { self.register_task_buffers(task_id, bufs) }
    }

    fn zero_copy_sends(&self) -> bool {
        self.features.zero_copy_sends
    }

    fn send_counters(&self) -> &SendCounters {
        &self.sends
    }

    fn release_task_resources(&mut self, task_id: u32) {
        UringIo::release_task_resources(self, task_id)
    }

    #[inline]
    fn take_completions(&mut self, out: &mut Vec<(u32, RingCompletion)>) {
        out.append(&mut self.raw_done);
    }

    #[inline]
    unsafe fn send_now(&mut self, fd: RawFd, iov: &[libc::iovec]) -> usize {
        // SAFETY: msghdr is plain old data; all-zero is an empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: the caller keeps the iovecs' memory valid and unchanged for this synchronous
        // call; the kernel only reads it.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        usize::try_from(n).unwrap_or(0)
    }

    fn shutdown(&mut self, fd: RawFd) {
        // SAFETY: shutdown takes no memory; a bad descriptor is an error return.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

impl UringIo {
    /// Why tasks' zero-copy sends go out by copying on this ring, if they do.
    pub fn zero_copy_unavailable(&self) -> Option<&str> {
        self.zero_copy_unavailable.as_deref()
    }

    /// Count tasks' zero-copy sends in `counters` (the reactor's statistics) from now on.
    pub fn count_sends_in(&mut self, counters: Arc<SendCounters>) {
        self.sends = counters;
    }

    /// Send every zero-copy send by copying, as on a kernel without them (`why` is the
    /// reason reported): the fallback on a kernel that has them, for tests and for the
    /// configuration's `zero_copy_sends = false`.
    pub fn disable_zero_copy_sends(&mut self, why: &str) {
        self.features.zero_copy_sends = false;
        self.zero_copy_unavailable = Some(why.to_string());
    }

    /// Put a task's descriptor in the ring's file table; ops may then name it as
    /// `types::Fixed(slot)`. None when the kernel has no sparse table or all slots are taken:
    /// the task uses the plain descriptor.
    pub(crate) fn register_task_fd(&mut self, task_id: u32, fd: RawFd) -> Option<u32> {
        let slot = self.free_task_files.pop()?;
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(1) => {
                self.task_files.push((task_id, slot));
                Some(slot)
            }
            _ => {
                self.free_task_files.push(slot);
                None
            }
        }
    }

    /// Register a task's provided-buffer ring under a free group id. None when the kernel
    /// cannot (older than 5.19) or every group is taken: the task receives without it.
    ///
    /// # Safety
    /// The ring's memory must stay valid until [`UringIo::release_task_resources`] runs for
    /// this task.
    pub(crate) unsafe fn register_task_buffers(
        &mut self,
        task_id: u32,
        bufs: &mut ProvidedBuffers,
    ) -> Option<u16> {
        let group = self.free_buf_groups.pop()?;
        // SAFETY: forwarded contract; the ring is page aligned with `count` entries.
        let registered = unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                bufs.ring_addr(),
                bufs.count(),
                group,
                0,
            )
        };
        match registered {
            Ok(()) => {
                self.task_buf_groups.push((task_id, group));
                bufs.set_group(group);
                Some(group)
            }
            Err(e) => {
                tracing::debug!("provided buffers unavailable: {e}");
                self.free_buf_groups.push(group);
                None
            }
        }
    }

    /// Drop what a finished task registered: its descriptors from the file table (the table
    /// holds a reference to each file, so its socket only really closes now) and its
    /// provided-buffer rings (before the task, which owns their memory, is dropped).
    pub(crate) fn release_task_resources(&mut self, task_id: u32) {
        let groups: Vec<_> = self
            .task_buf_groups
            .extract_if(.., |(t, _)| *t == task_id)
            .collect();
        for (_, group) in groups {
            match self.ring.submitter().unregister_buf_ring(group) {
                Ok(()) => self.free_buf_groups.push(group),
                // The group stays taken rather than be reused while still registered.
                Err(e) => tracing::warn!("releasing provided-buffer group {group}: {e}"),
            }
        }
        let slots: Vec<_> = self
            .task_files
            .extract_if(.., |(t, _)| *t == task_id)
            .collect();
        for (_, slot) in slots {
            // Updating a slot to -1 empties it; ops still in flight keep their own reference.
            match self.ring.submitter().register_files_update(slot, &[-1]) {
                Ok(_) => self.free_task_files.push(slot),
                // The slot stays taken rather than be reused while still filled.
                Err(e) => tracing::warn!("releasing fixed file slot {slot}: {e}"),
            }
        }
    }

    /// Queue task `task_id`'s ring entry, to come back from [`TaskRing::take_completions`]
    /// with `tag`.
    ///
    /// # Safety
    /// What the entry points to must stay valid until its completion is reaped.
    #[inline]
    unsafe fn push_task_entry(
        &mut self,
        entry: squeue::Entry,
        task_id: u32,
        tag: u32,
    ) -> Result<(), Errno> {
        let entry = entry.user_data(UserData::Task { task_id, tag }.encode());
        // SAFETY: forwarded contract.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.enter(0, None).map_err(|_| Errno(libc::EAGAIN))?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| Errno(libc::EAGAIN))?;
        }
        self.raw_in_flight += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::io::uring::{new_wake_fd, RingConfig};

    #[test]
    fn task_sockets_take_fixed_slots_and_give_them_back() {
        let config = RingConfig {
            queue_depth: 8,
            max_raw_owners: 256,
            max_raw_ops: 1024,
        };
        let mut io = UringIo::new(&[], config, new_wake_fd().unwrap(), None).unwrap();
        if !io.features().task_files {
            return crate::required::skip(
                "task_sockets_take_fixed_slots_and_give_them_back",
                "this kernel has no sparse file table",
            );
        }
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let slots: Vec<u32> = (0..config.max_raw_owners as u32)
            .map(|task| {
                io.register_task_fd(task, a.as_raw_fd())
                    .expect("a free slot")
            })
            .collect();
        let mut distinct = slots.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), slots.len());
        // Full: the next task falls back to its plain descriptor.
        assert_eq!(io.register_task_fd(9999, b.as_raw_fd()), None);
        io.release_task_resources(7);
        assert_eq!(io.register_task_fd(9999, b.as_raw_fd()), Some(slots[7]));

        // The table holds its own reference: a socket released from it really closes, so the
        // peer sees end-of-file.
        let (c, mut d) = std::os::unix::net::UnixStream::pair().unwrap();
        io.release_task_resources(8);
        assert_eq!(io.register_task_fd(42, c.as_raw_fd()), Some(slots[8]));
        drop(c);
        d.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let still_open = std::io::Read::read(&mut d, &mut byte);
        assert!(
            matches!(&still_open, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{still_open:?}"
        );
        io.release_task_resources(42);
        assert_eq!(std::io::Read::read(&mut d, &mut byte).unwrap(), 0);
    }

    /// A zero-copy send through the real ring: the bytes arrive, and the op completes twice,
    /// its result flagged MORE, then its notification. (engine/tests/zero_copy.rs has the
    /// sendmsg form, the fallback and the counters.)
    #[test]
    fn a_zero_copy_send_completes_with_a_notification() {
        use std::io::Read;
        let config = RingConfig {
            queue_depth: 8,
            max_raw_owners: 4,
            max_raw_ops: 16,
        };
        let mut io = UringIo::new(&[], config, new_wake_fd().unwrap(), None).unwrap();
        if !io.features().zero_copy_sends {
            return crate::required::skip(
                "a_zero_copy_send_completes_with_a_notification",
                io.zero_copy_unavailable().unwrap_or("no zero-copy sends"),
            );
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        // At the threshold: smaller sends go out by copying.
        let data: Vec<u8> = (0..zero_copy::ZERO_COPY_MIN_BYTES)
            .map(|i| i as u8)
            .collect();
        let op = SocketOp::SendZc {
            socket: Socket::Fd(sender.as_raw_fd()),
            buf: data.as_ptr(),
            len: data.len() as u32,
        };
        // SAFETY: `data` and the socket outlive the op (we wait for its notification).
        unsafe { TaskRing::push(&mut io, 3, op, 5) }.unwrap();
        let mut done = Vec::new();
        let mut device = Vec::new();
        for _ in 0..1000 {
            crate::io::Io::poll(&mut io, &mut device).unwrap();
            io.take_completions(&mut done);
            if done.iter().any(|(_, c)| !c.more()) {
                break;
            }
            crate::io::Io::park(&mut io, Some(1_000_000)).unwrap();
        }
        let got: Vec<_> = done
            .iter()
            .map(|(task, c)| (*task, c.tag, c.more(), c.is_notification()))
            .collect();
        assert_eq!(got, [(3, 5, true, false), (3, 5, false, true)]);
        assert_eq!(done[0].1.result, data.len() as i32);
        assert_eq!(done[1].1.errno(), None, "a notification carries no error");
        let mut back = vec![0u8; data.len()];
        receiver.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
    }

    /// The entry's bytes, to compare two entries.
    fn sqe_bytes(e: squeue::Entry) -> [u8; 64] {
        const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
        // SAFETY: an Entry is a repr(C) 64-byte SQE, built from zeroes, so every byte is
        // initialised.
        unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(e) }
    }

    /// Every socket op becomes exactly the entry a task built with the io_uring crate itself
    /// (opcode, socket or fixed slot, flags, ioprio), so the real ring behaves as it did.
    #[test]
    fn socket_ops_build_the_entries_tasks_built() {
        let mut byte = 0u8;
        let buf = &mut byte as *mut u8;
        // SAFETY: msghdr is plain old data.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let msg = &msg as *const libc::msghdr;
        for (socket, fd, fixed) in [(Socket::Fd(7), 7, None), (Socket::Fixed(3), 0, Some(3))] {
            let built = |e: fn(types::Fd) -> squeue::Entry,
                         f: fn(types::Fixed) -> squeue::Entry| {
                sqe_bytes(match fixed {
                    Some(slot) => f(types::Fixed(slot)),
                    None => e(types::Fd(fd)),
                })
            };
            let cases: [(SocketOp, [u8; 64]); 7] = [
                (
                    SocketOp::Recv {
                        socket,
                        buf,
                        len: 9,
                        poll_first: false,
                    },
                    built(
                        |fd| {
                            opcode::Recv::new(fd, std::ptr::null_mut(), 9)
                                .ioprio(0)
                                .build()
                        },
                        |fd| {
                            opcode::Recv::new(fd, std::ptr::null_mut(), 9)
                                .ioprio(0)
                                .build()
                        },
                    ),
                ),
                (
                    SocketOp::Recv {
                        socket,
                        buf,
                        len: 9,
                        poll_first: true,
                    },
                    built(
                        |fd| {
                            opcode::Recv::new(fd, std::ptr::null_mut(), 9)
                                .ioprio(1)
                                .build()
                        },
                        |fd| {
                            opcode::Recv::new(fd, std::ptr::null_mut(), 9)
                                .ioprio(1)
                                .build()
                        },
                    ),
                ),
                (
                    SocketOp::RecvMulti { socket, group: 5 },
                    built(
                        |fd| opcode::RecvMulti::new(fd, 5).build(),
                        |fd| opcode::RecvMulti::new(fd, 5).build(),
                    ),
                ),
                (
                    SocketOp::Send {
                        socket,
                        buf,
                        len: 9,
                    },
                    built(
                        |fd| {
                            opcode::Send::new(fd, std::ptr::null(), 9)
                                .flags(libc::MSG_NOSIGNAL)
                                .build()
                        },
                        |fd| {
                            opcode::Send::new(fd, std::ptr::null(), 9)
                                .flags(libc::MSG_NOSIGNAL)
                                .build()
                        },
                    ),
                ),
                (
                    SocketOp::SendMsg { socket, msg },
                    built(
                        |fd| {
                            opcode::SendMsg::new(fd, std::ptr::null())
                                .flags(libc::MSG_NOSIGNAL as u32)
                                .build()
                        },
                        |fd| {
                            opcode::SendMsg::new(fd, std::ptr::null())
                                .flags(libc::MSG_NOSIGNAL as u32)
                                .build()
                        },
                    ),
                ),
                (
                    SocketOp::SendZc {
                        socket,
                        buf,
                        len: 9,
                    },
                    built(
                        |fd| {
                            opcode::SendZc::new(fd, std::ptr::null(), 9)
                                .flags(libc::MSG_NOSIGNAL)
                                .zc_flags(SEND_ZC_REPORT_USAGE)
                                .build()
                        },
                        |fd| {
                            opcode::SendZc::new(fd, std::ptr::null(), 9)
                                .flags(libc::MSG_NOSIGNAL)
                                .zc_flags(SEND_ZC_REPORT_USAGE)
                                .build()
                        },
                    ),
                ),
                (
                    SocketOp::SendMsgZc { socket, msg },
                    built(
                        |fd| {
                            opcode::SendMsgZc::new(fd, std::ptr::null())
                                .flags(libc::MSG_NOSIGNAL as u32)
                                .ioprio(SEND_ZC_REPORT_USAGE)
                                .build()
                        },
                        |fd| {
                            opcode::SendMsgZc::new(fd, std::ptr::null())
                                .flags(libc::MSG_NOSIGNAL as u32)
                                .ioprio(SEND_ZC_REPORT_USAGE)
                                .build()
                        },
                    ),
                ),
            ];
            for (op, mut want) in cases {
                // The pointers differ (a closure cannot capture them): put ours in.
                let addr = match op {
                    SocketOp::SendMsg { msg, .. } | SocketOp::SendMsgZc { msg, .. } => msg as u64,
                    SocketOp::RecvMulti { .. } => 0,
                    _ => buf as u64,
                };
                want[16..24].copy_from_slice(&addr.to_ne_bytes());
                assert_eq!(sqe_bytes(entry_of(op)), want, "{op:?}");
            }
        }
    }
}
