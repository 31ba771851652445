//! One ublk queue, served as a task on one reactor.
//!
//! Queue `q` of a device lives on reactor `q % reactors`, so the driver's per-queue daemon (the
//! task that issues the queue's commands) is that reactor's thread, and blk-mq's CPU→queue map
//! sends IO submitted on core `q` to the reactor pinned there.
//!
//! Data moves in one of two ways ([`CopyMode`], fixed when the device is added):
//!
//! - **USER_COPY** (Linux 6.5+, the default where the driver offers it): no tag buffers. A
//!   READ/WRITE becomes an engine request whose data a per-tag [`DataMover`] moves with
//!   `pwrite` (READ: fills the request's pages) or `pread` (WRITE: takes them) on `/dev/ublkcN`
//!   at the position the uapi defines for (queue, tag, offset in the request). The engine calls
//!   it on the reactor that owns each chunk, with that chunk's memory for a RAM/bbram volume: a
//!   request costs **one** copy, between the kernel's pages and the chunk (like a loop device's
//!   page cache copy). Other devices go through a bounce buffer (two copies, as before).
//!   FETCH/COMMIT carry `addr` 0, and every copy is done before COMMIT_AND_FETCH.
//! - **Tag buffers** (older kernels): every tag has its own buffer of `max_io_bytes` in an
//!   anonymous mapping the queue owns; the driver copies WRITE data into it before delivering
//!   the request and copies READ data out of it when we commit. The engine gets a window into
//!   that buffer ([`IoBuf::from_raw_parts`]): one copy each way between the tag buffer and the
//!   engine, one more by the driver.
//!
//! Life of a tag: FETCH_REQ in the ring → a request arrives (CQE, the descriptor array says
//! what) → engine request → completion → COMMIT_AND_FETCH_REQ (result + refetch in one command)
//! → … until the driver aborts the fetch (device stopping: `UBLK_IO_RES_ABORT`).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringblock_engine::io_uring::{opcode, types};
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    Completion, DataMover, Errno, IoBuf, Port, Request, RequestKind, VolumeHandle,
};

use super::sys::{self, IoCmd, IoDesc};
use super::UblkError;

/// How a device's request data moves between the kernel and the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Per-tag buffers the driver copies to/from (two copies per request).
    TagBuffer,
    /// `UBLK_F_USER_COPY`: we `pread`/`pwrite` the request's pages on `/dev/ublkcN` straight
    /// from/to the engine's memory (one copy per request on RAM volumes).
    UserCopy,
}

impl CopyMode {
    /// The mode a device added (or recovered) with driver flags `flags` runs in.
    pub fn of(flags: u64) -> Self {
        if flags & sys::UBLK_F_USER_COPY != 0 {
            CopyMode::UserCopy
        } else {
            CopyMode::TagBuffer
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::TagBuffer => "tag_buffer",
            CopyMode::UserCopy => "user_copy",
        }
    }
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// USER_COPY: moves the data of the request in one tag with `pread`/`pwrite` on `/dev/ublkcN`.
/// Made once per tag; each READ/WRITE in the tag carries a clone of it.
struct TagCopy {
    cdev: Arc<OwnedFd>,
    q_id: u16,
    tag: u16,
    /// Largest request (`max_io_buf_bytes`): offsets past it are refused, never sent.
    max_io_bytes: u64,
}

/// Tries of a `pread`/`pwrite` interrupted by a signal before we give up.
const COPY_EINTR_TRIES: u32 = 8;

impl TagCopy {
    fn pos(&self, offset_in_request: u64, len: usize) -> Result<i64, Errno> {
        let end = offset_in_request
            .checked_add(len as u64)
            .ok_or(Errno::EINVAL)?;
        if end > self.max_io_bytes {
            return Err(Errno::EINVAL);
        }
        sys::user_copy_pos(self.q_id, self.tag, offset_in_request)
            .and_then(|p| i64::try_from(p).ok())
            .ok_or(Errno::EINVAL)
    }

    /// Finish one `pread`/`pwrite` result: all of `len` bytes, or an errno. The driver copies
    /// up to the request's end, so a short count means the request is shorter than we were
    /// told: EIO (never a panic on what the kernel says).
    fn done(n: isize, len: usize) -> Result<bool, Errno> {
        if n < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            return if e == libc::EINTR {
                Ok(false)
            } else {
                Err(Errno(e))
            };
        }
        if n as usize != len {
            return Err(Errno::EIO);
        }
        Ok(true)
    }
}

impl DataMover for TagCopy {
    fn copy_out(&self, offset_in_request: u64, src: &[u8]) -> Result<(), Errno> {
        let pos = self.pos(offset_in_request, src.len())?;
        for _ in 0..COPY_EINTR_TRIES {
            // SAFETY: writes from a valid slice; the descriptor lives as long as `self`. The
            // driver checks (queue, tag, offset) against a request it has handed us and not
            // yet seen committed: ours until COMMIT_AND_FETCH, which waits for this request's
            // engine completion, which waits for every part's copy.
            let n =
                unsafe { libc::pwrite(self.cdev.as_raw_fd(), src.as_ptr().cast(), src.len(), pos) };
            if Self::done(n, src.len())? {
                return Ok(());
            }
        }
        Err(Errno(libc::EINTR))
    }

    fn copy_in(&self, offset_in_request: u64, dst: &mut [u8]) -> Result<(), Errno> {
        let pos = self.pos(offset_in_request, dst.len())?;
        for _ in 0..COPY_EINTR_TRIES {
            // SAFETY: reads into a valid, exclusively borrowed slice; as in `copy_out`.
            let n = unsafe {
                libc::pread(
                    self.cdev.as_raw_fd(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    pos,
                )
            };
            if Self::done(n, dst.len())? {
                return Ok(());
            }
        }
        Err(Errno(libc::EINTR))
    }
}

/// Counters of one device, summed over its queues; read by the registry.
#[derive(Debug, Default)]
pub struct DevStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicI64,
}

/// What the control side sees of a queue.
pub struct QueueStatus {
    pub q_id: u16,
    pub reactor: u32,
    /// Tags whose first FETCH_REQ went into the ring.
    pub fetches_posted: AtomicU32,
    /// Tags the driver aborted (device stopped) or that failed.
    pub tags_dead: AtomicU32,
    /// First failure, for the operator.
    pub failure: Mutex<Option<String>>,
    /// The task is gone from its reactor (its ring commands all completed).
    pub finished: AtomicBool,
    /// The control side gave up on the device: post nothing more, finish when quiet.
    stop_requested: AtomicBool,
    /// Wakes the task's reactor (set on the task's first poll).
    waker: Mutex<Option<ringblock_engine::PortWaker>>,
}

impl QueueStatus {
    pub fn new(q_id: u16, reactor: u32) -> Self {
        Self {
            q_id,
            reactor,
            fetches_posted: AtomicU32::new(0),
            tags_dead: AtomicU32::new(0),
            failure: Mutex::new(None),
            finished: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            waker: Mutex::new(None),
        }
    }

    /// Ask the task to post nothing more and finish once its ring commands completed (after
    /// STOP_DEV aborted them), and wake its reactor so it notices.
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::Release);
        if let Some(ringblock_engine::PortWaker::Callback(wake)) =
            &*self.waker.lock().expect("queue waker")
        {
            wake();
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("queue failure").clone()
    }

    fn fail(&self, why: String) {
        let mut f = self.failure.lock().expect("queue failure");
        if f.is_none() {
            tracing::error!(queue = self.q_id, "ublk queue: {why}");
            *f = Some(why);
        }
    }
}

/// The memory of one queue: the driver's descriptor array (mapped read-only from /dev/ublkcN)
/// and, in [`CopyMode::TagBuffer`], the tags' data buffers. Kept alive by the task and by every
/// IoBuf window handed to the engine.
pub struct QueueMem {
    descs: *const IoDesc,
    descs_bytes: usize,
    /// Null (and `bufs_bytes` 0) in USER_COPY mode: no tag buffers.
    bufs: *mut u8,
    bufs_bytes: usize,
    /// Largest request (`max_io_buf_bytes`), and each tag buffer's size.
    buf_stride: usize,
    depth: u16,
    mode: CopyMode,
}

// SAFETY: the descriptor mapping is only read; each tag's buffer window is used by one party at
// a time (driver, this task, or the engine request holding the window).
unsafe impl Send for QueueMem {}
// SAFETY: as above.
unsafe impl Sync for QueueMem {}

impl QueueMem {
    pub fn new(
        cdev: &OwnedFd,
        q_id: u16,
        depth: u16,
        max_io_bytes: usize,
        mode: CopyMode,
    ) -> Result<Arc<QueueMem>, UblkError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert!(depth > 0 && max_io_bytes > 0 && max_io_bytes.is_multiple_of(page));
        let descs_bytes = sys::cmd_buf_bytes(depth, page);
        // SAFETY: a fresh shared read-only mapping of the queue's descriptor array; checked.
        let descs = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                descs_bytes,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                sys::cmd_buf_offset(q_id, page),
            )
        };
        if descs == libc::MAP_FAILED {
            return Err(UblkError::Io(format!(
                "mmap of queue {q_id}'s descriptors: {}",
                std::io::Error::last_os_error()
            )));
        }
        if mode == CopyMode::UserCopy {
            return Ok(Arc::new(QueueMem {
                descs: descs.cast(),
                descs_bytes,
                bufs: std::ptr::null_mut(),
                bufs_bytes: 0,
                buf_stride: max_io_bytes,
                depth,
                mode,
            }));
        }
        let bufs_bytes = usize::from(depth) * max_io_bytes;
        // SAFETY: a fresh private anonymous mapping (zero pages, committed on first touch).
        let bufs = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bufs_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if bufs == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping what we mapped above.
            unsafe { libc::munmap(descs, descs_bytes) };
            return Err(UblkError::Io(format!(
                "{bufs_bytes} bytes of IO buffers for queue {q_id}: {e}"
            )));
        }
        Ok(Arc::new(QueueMem {
            descs: descs.cast(),
            descs_bytes,
            bufs: bufs.cast(),
            bufs_bytes,
            buf_stride: max_io_bytes,
            depth,
            mode,
        }))
    }

    fn desc(&self, tag: u16) -> IoDesc {
        assert!(tag < self.depth);
        // SAFETY: inside the mapping; the driver wrote it before completing the fetch whose CQE
        // we reaped (the CQ ring's acquire orders it), and does not touch it until we commit.
        unsafe { std::ptr::read_volatile(self.descs.add(usize::from(tag))) }
    }

    /// The `addr` of the tag's FETCH/COMMIT: its buffer, or 0 in USER_COPY mode (required).
    fn buf_addr(&self, tag: u16) -> u64 {
        assert!(tag < self.depth);
        match self.mode {
            CopyMode::TagBuffer => self.bufs as u64 + u64::from(tag) * self.buf_stride as u64,
            CopyMode::UserCopy => 0,
        }
    }

    /// A window of `len` bytes of `tag`'s buffer, kept alive by `mem`.
    ///
    /// # Safety
    /// Only while the tag's request is ours (between its fetch CQE and our commit), one window
    /// per tag at a time.
    unsafe fn window(mem: &Arc<QueueMem>, tag: u16, len: usize) -> IoBuf {
        assert!(len <= mem.buf_stride && mem.mode == CopyMode::TagBuffer);
        let ptr = mem.buf_addr(tag) as *mut u8;
        let keep: Arc<dyn ringblock_engine::buf::KeepAlive> = mem.clone();
        // SAFETY: inside the tag's buffer, alive while `keep` lives; exclusive by contract.
        unsafe { IoBuf::from_raw_parts(ptr, len, keep) }
    }
}

impl Drop for QueueMem {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `new` with these sizes and nothing refers to them
        // any more (every window and the task are gone).
        unsafe {
            libc::munmap(self.descs as *mut libc::c_void, self.descs_bytes);
            if !self.bufs.is_null() {
                libc::munmap(self.bufs.cast(), self.bufs_bytes);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    /// Our next command for the tag is not in the ring yet: the first FETCH (`None`) or a
    /// COMMIT_AND_FETCH with this result.
    Pending(Option<i32>),
    /// FETCH or COMMIT_AND_FETCH in the ring: the driver owns the tag.
    InRing,
    /// The engine serves the tag's request.
    Serving {
        op: u8,
        len_bytes: u32,
        then_flush: bool,
    },
    /// Aborted by the driver (device stopping) or failed: never used again.
    Dead,
}

pub struct QueueTask {
    q_id: u16,
    cdev: Arc<OwnedFd>,
    mem: Arc<QueueMem>,
    status: Arc<QueueStatus>,
    stats: Arc<DevStats>,
    handle: VolumeHandle,
    port: Option<Arc<Port>>,
    tags: Vec<Tag>,
    /// USER_COPY: each tag's data mover (empty in tag-buffer mode).
    movers: Vec<Arc<dyn DataMover>>,
    /// Tags whose next command did not fit in the ring, oldest first.
    waiting: VecDeque<u16>,
    in_ring: usize,
    in_engine: usize,
    dead: usize,
    stopping: bool,
}

impl QueueTask {
    pub fn new(
        q_id: u16,
        cdev: Arc<OwnedFd>,
        mem: Arc<QueueMem>,
        status: Arc<QueueStatus>,
        stats: Arc<DevStats>,
        handle: VolumeHandle,
    ) -> Self {
        let depth = mem.depth;
        let movers = match mem.mode {
            CopyMode::UserCopy => (0..depth)
                .map(|tag| {
                    Arc::new(TagCopy {
                        cdev: cdev.clone(),
                        q_id,
                        tag,
                        max_io_bytes: mem.buf_stride as u64,
                    }) as Arc<dyn DataMover>
                })
                .collect(),
            CopyMode::TagBuffer => Vec::new(),
        };
        Self {
            q_id,
            cdev,
            mem,
            status,
            stats,
            handle,
            port: None,
            tags: vec![Tag::Pending(None); usize::from(depth)],
            movers,
            waiting: (0..depth).collect(),
            in_ring: 0,
            in_engine: 0,
            dead: 0,
            stopping: false,
        }
    }

    /// Put the tag's pending command into the ring. False when the ring is full.
    fn push(&mut self, ctx: &mut TaskCtx<'_>, tag: u16) -> bool {
        let Tag::Pending(commit) = self.tags[usize::from(tag)] else {
            unreachable!("only pending tags are pushed");
        };
        let (op, result) = match commit {
            None => (sys::UBLK_U_IO_FETCH_REQ, 0),
            Some(r) => (sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, r),
        };
        let cmd = IoCmd {
            q_id: self.q_id,
            tag,
            result,
            addr: self.mem.buf_addr(tag),
        };
        let entry = opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), op)
            .cmd(cmd.to_bytes())
            .build();
        // SAFETY: the command refers to /dev/ublkcN (self.cdev) and the tag's buffer (self.mem);
        // both live as long as this task, and the reactor keeps the task until every ring op
        // completed (`finished` checks in_ring).
        match unsafe { ctx.push_raw(entry, u32::from(tag)) } {
            Ok(()) => {
                self.tags[usize::from(tag)] = Tag::InRing;
                self.in_ring += 1;
                if commit.is_none() {
                    self.status.fetches_posted.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Queue the tag's command behind any that wait, or push it now.
    fn post(&mut self, ctx: &mut TaskCtx<'_>, tag: u16) {
        if self.stopping {
            return; // pending forever: a restarted daemon gets the request reissued
        }
        if !self.waiting.is_empty() || !self.push(ctx, tag) {
            self.waiting.push_back(tag);
        }
    }

    fn flush_waiting(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let mut n = 0;
        // Bounded by the queue depth.
        while let Some(&tag) = self.waiting.front() {
            if self.stopping || !self.push(ctx, tag) {
                break;
            }
            self.waiting.pop_front();
            n += 1;
        }
        n
    }

    /// Done with the tag's request: commit `result` (bytes done, or the error) and refetch.
    fn finish(&mut self, ctx: &mut TaskCtx<'_>, tag: u16, result: Result<i32, Errno>) {
        // The kernel takes bytes or -errno: the one place an Errno becomes that.
        let result = result.unwrap_or_else(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            -e.0
        });
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.tags[usize::from(tag)] = Tag::Pending(Some(result));
        self.post(ctx, tag);
    }

    /// A request arrived in `tag`: turn it into an engine request.
    fn start(&mut self, ctx: &mut TaskCtx<'_>, tag: u16) {
        let d = self.mem.desc(tag);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let offset_bytes = d.start_sector << 9;
        let len_bytes = u64::from(d.nr_sectors) << 9;
        let relaxed = Ordering::Relaxed;
        let (kind, fua, then_flush) = match d.op() {
            sys::UBLK_IO_OP_READ => {
                self.stats.reads.fetch_add(1, relaxed);
                self.stats.read_bytes.fetch_add(len_bytes, relaxed);
                (RequestKind::Read, false, false)
            }
            sys::UBLK_IO_OP_WRITE => {
                self.stats.writes.fetch_add(1, relaxed);
                self.stats.write_bytes.fetch_add(len_bytes, relaxed);
                (
                    RequestKind::Write,
                    d.flags() & sys::UBLK_IO_F_FUA != 0,
                    false,
                )
            }
            sys::UBLK_IO_OP_FLUSH => {
                self.stats.flushes.fetch_add(1, relaxed);
                (RequestKind::Flush, false, false)
            }
            sys::UBLK_IO_OP_DISCARD => {
                self.stats.discards.fetch_add(1, relaxed);
                (
                    RequestKind::Trim,
                    false,
                    d.flags() & sys::UBLK_IO_F_FUA != 0,
                )
            }
            // NOUNMAP asks to keep the range allocated; the engine may unmap whole chunks
            // instead, which reads back as the same zeros (only provisioning differs).
            sys::UBLK_IO_OP_WRITE_ZEROES => {
                self.stats.write_zeroes.fetch_add(1, relaxed);
                (
                    RequestKind::WriteZeroes,
                    false,
                    d.flags() & sys::UBLK_IO_F_FUA != 0,
                )
            }
            _ => {
                self.finish(ctx, tag, Err(Errno::ENOTSUP));
                return;
            }
        };
        let (buf, mover) = match kind {
            RequestKind::Read | RequestKind::Write => {
                if len_bytes == 0 || len_bytes > self.mem.buf_stride as u64 {
                    self.finish(ctx, tag, Err(Errno::EINVAL));
                    return;
                }
                match self.mem.mode {
                    CopyMode::UserCopy => (None, Some(self.movers[usize::from(tag)].clone())),
                    // SAFETY: the request is ours until we commit; one window per tag.
                    CopyMode::TagBuffer => (
                        Some(unsafe { QueueMem::window(&self.mem, tag, len_bytes as usize) }),
                        None,
                    ),
                }
            }
            _ => (None, None),
        };
        self.tags[usize::from(tag)] = Tag::Serving {
            op: d.op(),
            len_bytes: len_bytes as u32,
            then_flush,
        };
        let len = if kind == RequestKind::Flush {
            0
        } else {
            len_bytes
        };
        self.submit(ctx, tag, kind, offset_bytes, len, fua, buf, mover);
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        tag: u16,
        kind: RequestKind,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
        buf: Option<IoBuf>,
        mover: Option<Arc<dyn DataMover>>,
    ) {
        let req = Request {
            kind,
            offset_bytes,
            len_bytes,
            fua,
            buf,
            mover,
            tag: u64::from(tag),
        };
        let port = self.port.clone().expect("port made on first poll");
        match ctx.submit(&self.handle, req, &port) {
            Ok(()) => self.in_engine += 1,
            Err((_, e)) => self.finish(ctx, tag, Err(e)),
        }
    }

    fn on_completion(&mut self, ctx: &mut TaskCtx<'_>, c: Completion) {
        self.in_engine -= 1;
        drop(c.buf); // our window; the tag buffer itself stays
        let tag = c.tag as u16;
        let Tag::Serving {
            op,
            len_bytes,
            then_flush,
        } = self.tags[usize::from(tag)]
        else {
            unreachable!("completion for a tag that is not being served");
        };
        match c.result {
            Err(e) => self.finish(ctx, tag, Err(e)),
            Ok(()) if then_flush => {
                self.tags[usize::from(tag)] = Tag::Serving {
                    op,
                    len_bytes,
                    then_flush: false,
                };
                self.submit(ctx, tag, RequestKind::Flush, 0, 0, false, None, None);
            }
            Ok(()) => {
                let done = match op {
                    sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => len_bytes as i32,
                    _ => 0,
                };
                self.finish(ctx, tag, Ok(done));
            }
        }
    }
}

impl ReactorTask for QueueTask {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.port.is_none() {
            self.port = Some(Port::new(self.tags.len(), ctx.port_waker()));
            *self.status.waker.lock().expect("queue waker") = Some(ctx.port_waker());
            tracing::debug!(queue = self.q_id, reactor = %ctx.reactor(), depth = self.tags.len(), "ublk queue on reactor");
        }
        if !self.stopping && self.status.stop_requested.load(Ordering::Acquire) {
            self.stopping = true;
        }
        let mut work = 0;
        let port = self.port.clone().expect("port");
        // Bounded: the port holds at most `depth` completions.
        while let Some(c) = port.pop() {
            self.on_completion(ctx, c);
            work += 1;
        }
        work + self.flush_waiting(ctx)
    }

    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        let (tag, result) = (c.tag as u16, c.result);
        assert_eq!(
            self.tags[usize::from(tag)],
            Tag::InRing,
            "CQE for tag {tag}"
        );
        self.in_ring -= 1;
        match result {
            sys::UBLK_IO_RES_OK => self.start(ctx, tag),
            sys::UBLK_IO_RES_ABORT => {
                self.tags[usize::from(tag)] = Tag::Dead;
                self.dead += 1;
                self.status.tags_dead.fetch_add(1, Ordering::Relaxed);
            }
            r => {
                self.tags[usize::from(tag)] = Tag::Dead;
                self.dead += 1;
                self.status.tags_dead.fetch_add(1, Ordering::Relaxed);
                self.status.fail(format!(
                    "tag {tag}: command failed: {} (result {r})",
                    std::io::Error::from_raw_os_error(-r)
                ));
            }
        }
    }

    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {
        // The daemon stops: the control side stops the device first (its fetches abort). If it
        // did not, requests we hold stay with the driver and are reissued to the next daemon
        // (USER_RECOVERY_REISSUE).
        self.stopping = true;
    }

    fn has_ready(&self) -> bool {
        self.port.as_ref().is_some_and(|p| !p.is_empty())
            || (!self.waiting.is_empty() && !self.stopping)
    }

    fn finished(&self) -> bool {
        self.in_ring == 0 && self.in_engine == 0 && (self.dead == self.tags.len() || self.stopping)
    }
}

impl Drop for QueueTask {
    fn drop(&mut self) {
        self.status.finished.store(true, Ordering::Release);
    }
}
