//! IO buffers. An in-flight operation owns its buffer until its completion arrives, so a
//! buffer is always either owned by its user or by exactly one in-flight operation.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment every buffer gets: enough for O_DIRECT on 4Kn devices.
pub const BUF_ALIGN_BYTES: usize = 4096;

/// An owned, zero-initialised, 4096-byte-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to the alignment).
    pub fn zeroed(len: usize) -> Self {
        let capacity = len.max(1).div_ceil(BUF_ALIGN_BYTES) * BUF_ALIGN_BYTES;
        let layout = Layout::from_size_align(capacity, BUF_ALIGN_BYTES).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len, capacity }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Shrink or grow the visible length within the capacity (new bytes are whatever was there).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "set_len {len} beyond capacity {}",
            self.capacity
        );
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees uniqueness.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, BUF_ALIGN_BYTES).expect("layout");
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Something that keeps the memory behind an [`IoBuf`] alive.
pub trait KeepAlive: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> KeepAlive for T {}

enum Keep {
    Owned(AlignedBuf),
    Shared(#[allow(dead_code)] Arc<dyn KeepAlive>),
}

/// The buffer of one IO: either an owned [`AlignedBuf`], or a window into memory that an `Arc`
/// keeps alive (a slice of a larger request split across chunks, a connection's receive
/// buffer). Whoever holds the `IoBuf` may read and write its bytes; windows handed out for one
/// request never overlap.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    keep: Keep,
}

// SAFETY: the window is exclusively ours (see `from_raw_parts`), and the keeper is Send + Sync.
unsafe impl Send for IoBuf {}

impl IoBuf {
    pub fn owned(mut buf: AlignedBuf) -> Self {
        let ptr = NonNull::new(buf.as_mut_ptr()).expect("non-null");
        let len = buf.len();
        Self {
            ptr,
            len,
            keep: Keep::Owned(buf),
        }
    }

    /// A window of `len` bytes at `ptr`, kept alive by `keep`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid while `keep` lives, and no one else may access those bytes
    /// until this `IoBuf` is dropped or returned.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize, keep: Arc<dyn KeepAlive>) -> Self {
        Self {
            ptr: NonNull::new(ptr).expect("IoBuf pointer must not be null"),
            len,
            keep: Keep::Shared(keep),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the window is valid and ours (construction contract).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; &mut self makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The owned buffer back, if this was built with [`IoBuf::owned`].
    pub fn into_owned(self) -> Option<AlignedBuf> {
        match self.keep {
            Keep::Owned(buf) => Some(buf),
            Keep::Shared(_) => None,
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(5000);
        assert_eq!(b.as_mut_ptr() as usize % BUF_ALIGN_BYTES, 0);
        assert_eq!(b.capacity(), 8192);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        let io = IoBuf::owned(b);
        assert_eq!(io.len(), 5000);
        assert_eq!(io.into_owned().unwrap().len(), 5000);
    }
}

/// A reactor's registered buffers: one aligned region cut into `buf_bytes` pieces, registered
/// with the reactor's ring so device IO into them skips pinning pages on every op. Any thread
/// may take a buffer; dropping it gives it back (lock-free).
pub struct RegisteredPool {
    region: std::cell::UnsafeCell<AlignedBuf>,
    buf_bytes: usize,
    count: usize,
    free: crossbeam_queue::ArrayQueue<u32>,
}

// SAFETY: the region is only handed out in disjoint leases (an index is in `free` or leased,
// never both); the pool itself only reads the base pointer.
unsafe impl Sync for RegisteredPool {}
// SAFETY: as above; AlignedBuf is Send.
unsafe impl Send for RegisteredPool {}

struct Lease {
    pool: Arc<RegisteredPool>,
    index: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Cannot fail: each index is pushed back exactly once and capacity is `count`.
        let _ = self.pool.free.push(self.index);
    }
}

impl RegisteredPool {
    pub fn new(count: usize, buf_bytes: usize) -> Arc<Self> {
        assert!(
            count > 0 && count <= u16::MAX as usize && buf_bytes.is_multiple_of(BUF_ALIGN_BYTES)
        );
        let free = crossbeam_queue::ArrayQueue::new(count);
        for i in 0..count as u32 {
            free.push(i).expect("capacity");
        }
        Arc::new(Self {
            region: std::cell::UnsafeCell::new(AlignedBuf::zeroed(count * buf_bytes)),
            buf_bytes,
            count,
            free,
        })
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    fn base(&self) -> *mut u8 {
        // SAFETY: only the base address is read; the bytes are accessed through leases.
        unsafe { (*self.region.get()).as_mut_ptr() }
    }

    /// A buffer of `len` bytes (≤ `buf_bytes`), or None when the pool is empty or `len` too big.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        if len > self.buf_bytes {
            return None;
        }
        let index = self.free.pop()?;
        // SAFETY: index < count, so the window is inside the region.
        let ptr = unsafe { self.base().add(index as usize * self.buf_bytes) };
        let keep: Arc<dyn KeepAlive> = Arc::new(Lease {
            pool: self.clone(),
            index,
        });
        // SAFETY: the lease keeps the pool (and region) alive, and the index is ours alone until
        // the lease drops.
        Some(unsafe { IoBuf::from_raw_parts(ptr, len, keep) })
    }

    /// The registered buffer holding `[ptr, ptr+len)`, if it lies inside one.
    pub fn index_of(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let base = self.base() as usize;
        let p = ptr as usize;
        if p < base || p + len > base + self.count * self.buf_bytes {
            return None;
        }
        let index = (p - base) / self.buf_bytes;
        ((p + len - base).div_ceil(self.buf_bytes) == index + 1 || len == 0).then_some(index as u16)
    }

    /// The iovecs to register with a ring.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // SAFETY: inside the region.
                iov_base: unsafe { self.base().add(i * self.buf_bytes) }.cast(),
                iov_len: self.buf_bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn take_return_and_locate() {
        let pool = RegisteredPool::new(4, 8192);
        let a = pool.take(4096).unwrap();
        assert_eq!(a.as_ptr() as usize % BUF_ALIGN_BYTES, 0);
        assert_eq!(pool.available(), 3);
        let idx = pool.index_of(a.as_ptr(), 4096).unwrap();
        // SAFETY: still inside buffer `idx`.
        assert_eq!(
            pool.index_of(unsafe { a.as_ptr().add(4096) }, 4096),
            Some(idx)
        );
        assert_eq!(
            pool.index_of(a.as_ptr(), 8193),
            None,
            "crossing into the next buffer"
        );
        assert!(pool.take(8193).is_none());
        drop(a);
        assert_eq!(pool.available(), 4);
        let all: Vec<_> = (0..4).map(|_| pool.take(1).unwrap()).collect();
        assert!(pool.take(1).is_none());
        drop(all);
        assert_eq!(pool.available(), 4);
    }
}
