//! Test code's end of a simulated connection.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{Net, SimNet};
use crate::request::Errno;

/// Test code's end of a simulated connection: non-blocking reads and writes, like a socket
/// with `O_NONBLOCK`, between ticks.
pub struct SimStream {
    pub(super) net: SimNet,
    pub(super) fd: OwnedFd,
}

impl SimStream {
    fn endpoint(&self, net: &Net) -> Result<usize, Errno> {
        net.by_fd
            .get(&self.fd.as_raw_fd())
            .copied()
            .ok_or(Errno(libc::EBADF))
    }

    /// Send as much of `data` as the connection takes now (possibly less, by the seed).
    /// `EAGAIN` when it takes nothing; `ECONNRESET` after a cut, `EPIPE` after a shutdown.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, Errno> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut net = self.net.lock();
        let id = self.endpoint(&net)?;
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: the iovec names `data`, borrowed for the call.
        match unsafe { net.send(id, &iov) }? {
            0 => Err(Errno(libc::EAGAIN)),
            n => Ok(n),
        }
    }

    /// Read what has arrived (possibly less, by the seed). Ok(0): end-of-file; `EAGAIN`:
    /// nothing yet; `ECONNRESET` after a cut.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, Errno> {
        let mut net = self.net.lock();
        let id = self.endpoint(&net)?;
        if let Some(result) = net.recv_end(id) {
            return if result < 0 {
                Err(Errno(-result))
            } else {
                Ok(0)
            };
        }
        // SAFETY: `out` is valid for its length.
        match unsafe { net.copy_in(id, out.as_mut_ptr(), out.len()) } {
            0 if !out.is_empty() => Err(Errno(libc::EAGAIN)),
            n => Ok(n),
        }
    }

    /// `shutdown(SHUT_RDWR)`: the peer reads end-of-file after what was sent.
    pub fn shutdown(&mut self) {
        self.net.shutdown(self.fd.as_raw_fd());
    }

    /// Reset the connection.
    pub fn cut(&mut self) {
        self.net.cut(self.fd.as_raw_fd());
    }

    /// The key descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
