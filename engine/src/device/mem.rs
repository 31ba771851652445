//! Memory behind `ram` and `bbram` devices.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use crate::request::Errno;

/// Memory behind a `ram` or `bbram` device. Reactors access disjoint chunk ranges of it.
pub struct MemRegion {
    ptr: NonNull<u8>,
    len: usize,
    /// Keeps a `bbram` backing file open.
    pub(crate) _file: Option<File>,
}

// SAFETY: the mapping lives as long as the region; concurrent access is to disjoint ranges
// (chunk ownership), which the reactors guarantee.
unsafe impl Send for MemRegion {}
// SAFETY: as above.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    pub(crate) fn map(len: usize, file: Option<File>) -> std::io::Result<Self> {
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a fresh mapping; arguments checked by the kernel; failure is MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            _file: file,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, Errno> {
        let end = offset.checked_add(len as u64).ok_or(Errno::EINVAL)?;
        if end > self.len as u64 {
            return Err(Errno::EINVAL);
        }
        Ok(offset as usize)
    }

    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Errno> {
        let at = self.check(offset, out.len())?;
        // SAFETY: in bounds (checked); the range belongs to the caller's chunk.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let at = self.check(offset, data.len())?;
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len())
        };
        Ok(())
    }

    /// Run `f` on `len` bytes of the region at `offset`, in place (no copy).
    ///
    /// # Safety
    /// Nobody else may read or write those bytes during the call: the caller is the reactor
    /// that owns the chunk holding them, calling synchronously.
    pub unsafe fn with_range<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, Errno> {
        let at = self.check(offset, len)?;
        // SAFETY: in bounds (checked) of a mapping that lives as long as `self`; exclusive for
        // the duration of the call by the caller's contract.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), len) };
        Ok(f(slice))
    }

    pub fn zero(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let at = self.check(offset, len as usize)?;
        let len = len as usize;
        // Whole pages are given back to the kernel (thin); the edges are cleared by hand.
        let page = 4096;
        let first = at.div_ceil(page) * page;
        let last = (at + len) / page * page;
        if self._file.is_none() && last > first {
            // SAFETY: clearing edges in bounds, then dropping whole private anonymous pages in
            // bounds, which then read as zeros.
            unsafe {
                std::ptr::write_bytes(self.ptr.as_ptr().add(at), 0, first - at);
                std::ptr::write_bytes(self.ptr.as_ptr().add(last), 0, at + len - last);
                libc::madvise(
                    self.ptr.as_ptr().add(first).cast(),
                    last - first,
                    libc::MADV_DONTNEED,
                );
            }
        } else {
            // SAFETY: in bounds.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(at), 0, len) };
        }
        Ok(())
    }

    /// The persist point of `bbram`: make the mapping's contents stable.
    pub fn persist(&self) -> Result<(), Errno> {
        if self._file.is_none() {
            return Ok(());
        }
        // SAFETY: the whole mapping, which we own.
        let rc = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ))
        }
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
