//! The raw system calls the io_uring crate does not wrap: io_uring_enter with an extended
//! argument through a registered ring fd, registering the ring fd, and the wake-up eventfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::UringIo;
use crate::error::EngineError;

/// The kernel's `struct io_uring_getevents_arg` (IORING_ENTER_EXT_ARG).
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// The kernel's `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

// The sizes the kernel expects (a mismatch fails the build).
const _: () = assert!(std::mem::size_of::<GeteventsArg>() == 24);
const _: () = assert!(std::mem::size_of::<KernelTimespec>() == 16);

const ENTER_GETEVENTS: u32 = 1 << 0;
const ENTER_EXT_ARG: u32 = 1 << 3;
const ENTER_REGISTERED_RING: u32 = 1 << 4;
const REGISTER_RING_FDS: u32 = 20;

/// Register `ring_fd` in the thread's ring-fd table; returns its index.
pub(super) fn register_ring_fd(ring_fd: RawFd) -> std::io::Result<u32> {
    // struct io_uring_rsrc_update: offset (u32::MAX = any free slot), resv, data (the fd).
    #[repr(C)]
    struct RsrcUpdate {
        offset: u32,
        resv: u32,
        data: u64,
    }
    const _: () = assert!(std::mem::size_of::<RsrcUpdate>() == 16);
    let mut up = RsrcUpdate {
        offset: u32::MAX,
        resv: 0,
        data: ring_fd as u64,
    };
    // SAFETY: io_uring_register reads and writes back one RsrcUpdate, which lives on our stack
    // for the whole call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring_fd,
            REGISTER_RING_FDS,
            &mut up as *mut RsrcUpdate,
            1u32,
        )
    };
    if r != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(up.offset)
}

/// An eventfd a reactor parks on; writing it wakes the reactor.
pub fn new_wake_fd() -> Result<Arc<OwnedFd>, EngineError> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(EngineError::Ring(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Wake whoever parks on `fd`.
pub fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd. EAGAIN (counter full) still wakes.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl UringIo {
    /// io_uring_enter: submit what is queued and wait for `want` completions (at most
    /// `timeout_ns`), through the registered ring index when there is one.
    pub(super) fn enter(&mut self, want: u32, timeout_ns: Option<u64>) -> std::io::Result<usize> {
        let sq = self.ring.submission();
        let to_submit = sq.len() as u32;
        // Deferred task work runs, and overflowed completions are flushed, only with GETEVENTS.
        let mut flags = if want > 0 || sq.taskrun() || sq.cq_overflow() {
            ENTER_GETEVENTS
        } else {
            0
        };
        drop(sq);
        let ts;
        let arg;
        let (arg_ptr, arg_size) = match timeout_ns {
            Some(ns) => {
                ts = KernelTimespec {
                    tv_sec: (ns / 1_000_000_000) as i64,
                    tv_nsec: (ns % 1_000_000_000) as i64,
                };
                arg = GeteventsArg {
                    sigmask: 0,
                    sigmask_sz: 0,
                    min_wait_usec: 0,
                    ts: &ts as *const KernelTimespec as u64,
                };
                flags |= ENTER_EXT_ARG;
                (
                    &arg as *const GeteventsArg as *const libc::c_void,
                    std::mem::size_of::<GeteventsArg>(),
                )
            }
            None => (std::ptr::null(), 0),
        };
        let fd = match self.ring_index {
            Some(i) => {
                flags |= ENTER_REGISTERED_RING;
                libc::c_long::from(i)
            }
            None => libc::c_long::from(self.ring.as_raw_fd()),
        };
        // SAFETY: the ring's SQ entries were pushed under their own safety contracts; `arg`
        // and `ts` live on this stack frame for the whole call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                to_submit,
                want,
                flags,
                arg_ptr,
                arg_size,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}
