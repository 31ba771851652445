//! Zero-copy sends at the ring layer: the threshold below which a zero-copy send goes out by
//! copying, how a ring routes a [`SocketOp::SendZc`] / [`SocketOp::SendMsgZc`] (zero-copy, or
//! the matching copying op), and the per-reactor counters of both.
//!
//! The fallback is transparent: a ring that cannot send zero-copy (see
//! [`crate::io::uring::UringIo`]'s probe), or a payload under [`ZERO_COPY_MIN_BYTES`], becomes
//! a plain `Send` / `SendMsg` of the same bytes. Its one completion carries no
//! [`super::task_ring::CQE_F_MORE`], so the caller's rule is the same either way: the memory
//! is the kernel's until the op's completion without `more()` arrives.

use std::sync::atomic::{AtomicU64, Ordering};

use super::task_ring::SocketOp;

/// Payloads below this many bytes go out by copying even when a zero-copy send is asked for:
/// below it, pinning the pages and waiting for the notification costs more than the copy it
/// saves. Measured with `ringblock-bench zc-threshold`; the numbers and how the value follows
/// from them are in docs/performance.md ("Zero-copy sends").
pub const ZERO_COPY_MIN_BYTES: usize = 8 << 10;

/// `IORING_SEND_ZC_REPORT_USAGE` (`sqe->ioprio` of a zero-copy send, Linux 6.2): the
/// notification says whether the kernel copied the pages after all.
pub const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result when the kernel copied.
pub const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// How a send that asked for zero-copy went out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPath {
    /// Zero-copy: a result completion flagged `more`, then a notification.
    ZeroCopy,
    /// Copied: the payload is under [`ZERO_COPY_MIN_BYTES`].
    CopiedSmall,
    /// Copied: this ring has no zero-copy sends.
    CopiedUnsupported,
}

/// Counters of one ring's zero-copy sends, readable from any thread.
#[derive(Debug, Default)]
pub struct SendCounters {
    zero_copy: AtomicU64,
    kernel_copied: AtomicU64,
    copied_small: AtomicU64,
    copied_unsupported: AtomicU64,
}

/// A copy of [`SendCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SendCounts {
    /// Sends that went out zero-copy.
    pub zero_copy: u64,
    /// Of those, the ones whose notification said the kernel copied the pages anyway (always,
    /// on loopback).
    pub kernel_copied: u64,
    /// Asked for zero-copy, sent by copying: the payload was under [`ZERO_COPY_MIN_BYTES`].
    pub copied_small: u64,
    /// Asked for zero-copy, sent by copying: the ring has no zero-copy sends.
    pub copied_unsupported: u64,
}

impl SendCounters {
    /// One send went out by `path`.
    #[inline]
    pub(crate) fn count(&self, path: SendPath) {
        let c = match path {
            SendPath::ZeroCopy => &self.zero_copy,
            SendPath::CopiedSmall => &self.copied_small,
            SendPath::CopiedUnsupported => &self.copied_unsupported,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A zero-copy send's notification said the kernel copied.
    #[inline]
    pub(crate) fn count_kernel_copied(&self) {
        self.kernel_copied.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SendCounts {
        SendCounts {
            zero_copy: self.zero_copy.load(Ordering::Relaxed),
            kernel_copied: self.kernel_copied.load(Ordering::Relaxed),
            copied_small: self.copied_small.load(Ordering::Relaxed),
            copied_unsupported: self.copied_unsupported.load(Ordering::Relaxed),
        }
    }
}

/// The op a ring puts in for `op`, and how it goes out when it asked for zero-copy (None for
/// every other op, which passes through unchanged). `zero_copy`: the ring can send zero-copy.
///
/// # Safety
/// A [`SocketOp::SendMsgZc`]'s header and its iovec array are readable (the push contract).
#[inline]
pub(crate) unsafe fn route(op: SocketOp, zero_copy: bool) -> (SocketOp, Option<SendPath>) {
    match op {
        SocketOp::SendZc { socket, buf, len } => {
            let path = path_for(zero_copy, len as usize);
            let op = match path {
                SendPath::ZeroCopy => op,
                _ => SocketOp::Send { socket, buf, len },
            };
            (op, Some(path))
        }
        SocketOp::SendMsgZc { socket, msg } => {
            // SAFETY: forwarded contract.
            let len = unsafe { msg_len(msg) };
            let path = path_for(zero_copy, len);
            let op = match path {
                SendPath::ZeroCopy => op,
                _ => SocketOp::SendMsg { socket, msg },
            };
            (op, Some(path))
        }
        _ => (op, None),
    }
}

fn path_for(zero_copy: bool, len: usize) -> SendPath {
    if !zero_copy {
        SendPath::CopiedUnsupported
    } else if len < ZERO_COPY_MIN_BYTES {
        SendPath::CopiedSmall
    } else {
        SendPath::ZeroCopy
    }
}

/// Bytes a `msghdr`'s iovecs name.
///
/// # Safety
/// `msg` and its iovec array are readable.
unsafe fn msg_len(msg: *const libc::msghdr) -> usize {
    // SAFETY: forwarded contract.
    let m = unsafe { &*msg };
    if m.msg_iov.is_null() || m.msg_iovlen == 0 {
        return 0;
    }
    // SAFETY: forwarded contract: the array has msg_iovlen entries.
    let iov = unsafe { std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen) };
    iov.iter()
        .fold(0usize, |sum, v| sum.saturating_add(v.iov_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::task_ring::Socket;

    fn msg_of(iov: &mut [libc::iovec]) -> libc::msghdr {
        // SAFETY: msghdr is plain old data; all-zero is an empty header.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        m.msg_iov = iov.as_mut_ptr();
        m.msg_iovlen = iov.len() as _;
        m
    }

    #[test]
    fn small_and_unsupported_sends_copy_and_the_rest_go_zero_copy() {
        let data = vec![7u8; 2 * ZERO_COPY_MIN_BYTES];
        let socket = Socket::Fd(3);
        let zc = |len: usize| SocketOp::SendZc {
            socket,
            buf: data.as_ptr(),
            len: len as u32,
        };
        let cases = [
            (ZERO_COPY_MIN_BYTES, true, SendPath::ZeroCopy),
            (ZERO_COPY_MIN_BYTES - 1, true, SendPath::CopiedSmall),
            (ZERO_COPY_MIN_BYTES, false, SendPath::CopiedUnsupported),
        ];
        for (len, supported, want) in cases {
            // SAFETY: no SendMsgZc here.
            let (op, path) = unsafe { route(zc(len), supported) };
            assert_eq!(path, Some(want), "{len} bytes, supported {supported}");
            let zero_copy = matches!(op, SocketOp::SendZc { .. });
            assert_eq!(zero_copy, want == SendPath::ZeroCopy);
            match op {
                SocketOp::SendZc { len: l, .. } | SocketOp::Send { len: l, .. } => {
                    assert_eq!(l as usize, len)
                }
                other => panic!("{other:?}"),
            }
        }
        // Other ops pass through untouched.
        let plain = SocketOp::Send {
            socket,
            buf: data.as_ptr(),
            len: 5,
        };
        // SAFETY: not a SendMsgZc.
        assert!(matches!(
            unsafe { route(plain, true) },
            (SocketOp::Send { len: 5, .. }, None)
        ));
    }

    #[test]
    fn a_message_counts_every_iovec_against_the_threshold() {
        let header = [0u8; 64];
        let pages = vec![0u8; ZERO_COPY_MIN_BYTES];
        let mut iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: pages.as_ptr() as *mut libc::c_void,
                iov_len: pages.len() - header.len(),
            },
        ];
        let msg = msg_of(&mut iov);
        let op = SocketOp::SendMsgZc {
            socket: Socket::Fd(3),
            msg: &msg,
        };
        // SAFETY: `msg` and `iov` live across the call.
        let (out, path) = unsafe { route(op, true) };
        assert_eq!(path, Some(SendPath::ZeroCopy));
        assert!(matches!(out, SocketOp::SendMsgZc { .. }));
        iov[1].iov_len -= 1;
        let msg = msg_of(&mut iov);
        let op = SocketOp::SendMsgZc {
            socket: Socket::Fd(3),
            msg: &msg,
        };
        // SAFETY: as above.
        let (out, path) = unsafe { route(op, true) };
        assert_eq!(path, Some(SendPath::CopiedSmall));
        assert!(matches!(out, SocketOp::SendMsg { .. }));
    }

    #[test]
    fn counters_count_each_path() {
        let c = SendCounters::default();
        c.count(SendPath::ZeroCopy);
        c.count(SendPath::ZeroCopy);
        c.count_kernel_copied();
        c.count(SendPath::CopiedSmall);
        c.count(SendPath::CopiedUnsupported);
        c.count(SendPath::CopiedUnsupported);
        c.count(SendPath::CopiedUnsupported);
        assert_eq!(
            c.snapshot(),
            SendCounts {
                zero_copy: 2,
                kernel_copied: 1,
                copied_small: 1,
                copied_unsupported: 3,
            }
        );
    }
}
