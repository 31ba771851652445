//! The real [`Io`]: one io_uring per reactor. O_DIRECT files and block devices go through the
//! ring (registered as fixed files); RAM, bbram and null devices complete inline. The `delay`
//! wrapper holds completions until the profile's service time has passed; the `fault` wrapper
//! fails chosen ops.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Io, IoCompletion, IoKind, IoOp, MemAccess};
use crate::buf::{AlignedBuf, RegisteredPool};
use crate::device::{Backend, OpenDevice};
use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::profile::ServiceTime;

const WAKE_TAG: u64 = u64::MAX;
/// Memory alignment we guarantee for O_DIRECT (buffers that miss it are bounced).
const DIRECT_MEM_ALIGN: usize = 512;
/// A short transfer is carried on only from a multiple of this, which O_DIRECT accepts as an
/// offset and a length; anything else is a device fault (EIO).
const SHORT_RETRY_ALIGN: u32 = 512;

struct Slot {
    op: IoOp,
    /// Aligned copy for a buffer whose memory O_DIRECT cannot use.
    bounce: Option<AlignedBuf>,
    submitted_ns: u64,
    /// Bytes already transferred by earlier submissions of a read or write that came back
    /// short; the next submission carries on from there.
    done_bytes: u32,
}

struct Delayed {
    due_ns: u64,
    seq: u64,
    completion: IoCompletion,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ns, self.seq) == (other.due_ns, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_ns, self.seq).cmp(&(other.due_ns, other.seq))
    }
}

/// What the ring was set up with, for the logs and the dashboard.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingFeatures {
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub fixed_files: bool,
    pub registered_buffers: bool,
    pub ext_arg: bool,
    /// The ring's own fd is registered: io_uring_enter skips the fd lookup.
    pub registered_ring: bool,
    /// Tasks' sockets can be fixed files too (a sparse file table).
    pub task_files: bool,
}

/// When an op of the emulated device completes: its transfer waits for the link
/// (`busy_until_ns`, advanced here), its latency and any fault spike overlap with other ops.
fn schedule_delayed(
    busy_until_ns: &mut u64,
    submitted_ns: u64,
    service: ServiceTime,
    spike_ns: u64,
) -> u64 {
    let transfer_end_ns = (*busy_until_ns)
        .max(submitted_ns)
        .saturating_add(service.transfer_ns);
    *busy_until_ns = transfer_end_ns;
    transfer_end_ns
        .saturating_add(service.latency_ns)
        .saturating_add(spike_ns)
}

pub struct UringIo {
    /// Registered with the ring: ops whose buffer lies inside use the fixed opcodes.
    pool: Option<Arc<RegisteredPool>>,
    ring: IoUring,
    features: RingFeatures,
    devices: Vec<Option<Arc<OpenDevice>>>,
    fixed_index: Vec<Option<u32>>,
    per_device_in_flight: Vec<u32>,
    busy_until_ns: Vec<u64>,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    ring_in_flight: usize,
    /// Completions of tasks' raw ops, as (user_data, result, flags).
    raw_done: Vec<(u64, i32, u32)>,
    reap_scratch: Vec<(u64, i32, u32)>,
    raw_in_flight: usize,
    ready: VecDeque<IoCompletion>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    delayed_seq: u64,
    in_flight: usize,
    queue_depth: usize,
    wake_fd: Arc<OwnedFd>,
    wake_armed: bool,
    wake_buf: Box<[u8; 8]>,
    epoch: Instant,
    /// Index of the registered ring fd, passed to io_uring_enter instead of the fd.
    ring_index: Option<u32>,
    /// Free slots of the file table for tasks' descriptors, and who holds the taken ones.
    free_task_files: Vec<u32>,
    task_files: Vec<(u32, u32)>,
    /// Free provided-buffer group ids, and who holds the taken ones.
    free_buf_groups: Vec<u16>,
    task_buf_groups: Vec<(u32, u16)>,
}

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

const ENTER_GETEVENTS: u32 = 1 << 0;
const ENTER_EXT_ARG: u32 = 1 << 3;
const ENTER_REGISTERED_RING: u32 = 1 << 4;
const REGISTER_RING_FDS: u32 = 20;

/// Register `ring_fd` in the thread's ring-fd table; returns its index.
fn register_ring_fd(ring_fd: RawFd) -> std::io::Result<u32> {
    // struct io_uring_rsrc_update: offset (u32::MAX = any free slot), resv, data (the fd).
    #[repr(C)]
    struct RsrcUpdate {
        offset: u32,
        resv: u32,
        data: u64,
    }
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
    /// Build a ring for `devices` (indexed by device id). Call on the thread that will use it,
    /// and keep it there: the ring is set up single-issuer when the kernel allows, and its
    /// registered fd lives in this thread's ring-fd table.
    pub fn new(
        devices: &[Arc<OpenDevice>],
        queue_depth: usize,
        wake_fd: Arc<OwnedFd>,
        pool: Option<Arc<RegisteredPool>>,
    ) -> Result<Self, EngineError> {
        assert!((1..=4096).contains(&queue_depth));
        // Device ops, the wake read and tasks' raw ops all fit at once: the CQ (twice the SQ)
        // can never overflow.
        let entries = (queue_depth as u32 + 1 + crate::task::MAX_RAW_OPS_PER_REACTOR as u32)
            .next_power_of_two();
        let mut features = RingFeatures::default();
        let ring = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            // The kernel flags pending deferred completions in the SQ ring, so a polling
            // reactor knows when to enter (with GETEVENTS) and when not to.
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(r) => {
                features.single_issuer = true;
                features.defer_taskrun = true;
                r
            }
            Err(_) => match IoUring::builder().setup_coop_taskrun().build(entries) {
                Ok(r) => r,
                Err(_) => IoUring::new(entries).map_err(EngineError::Ring)?,
            },
        };
        features.ext_arg = ring.params().is_feature_ext_arg();
        let max_id = devices
            .iter()
            .map(|d| d.spec.id.0 as usize)
            .max()
            .map_or(0, |m| m + 1);
        let mut by_id: Vec<Option<Arc<OpenDevice>>> = vec![None; max_id];
        let mut fixed_index = vec![None; max_id];
        let mut fds: Vec<RawFd> = Vec::new();
        for d in devices {
            let i = d.spec.id.0 as usize;
            if let Backend::Direct { file, .. } = &d.backend {
                fixed_index[i] = Some(fds.len() as u32);
                fds.push(file.as_raw_fd());
            }
            by_id[i] = Some(d.clone());
        }
        // One file table: the devices first, then a slot for each task a reactor may host
        // (their sockets), filled in as tasks arrive. A fixed file saves a descriptor lookup
        // and a reference count on every op.
        let task_slots = crate::task::MAX_TASKS_PER_REACTOR as u32;
        let table = fds.len() as u32 + task_slots;
        let sparse = ring
            .submitter()
            .register_files_sparse(table)
            .and_then(|()| {
                if fds.is_empty() {
                    return Ok(());
                }
                match ring.submitter().register_files_update(0, &fds) {
                    Ok(n) if n == fds.len() => Ok(()),
                    Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
                    Err(e) => Err(e),
                }
            });
        let mut free_task_files = Vec::new();
        match sparse {
            Ok(()) => {
                features.fixed_files = !fds.is_empty();
                features.task_files = true;
                free_task_files = (fds.len() as u32..table).rev().collect();
            }
            Err(e) if !fds.is_empty() => {
                let _ = ring.submitter().unregister_files();
                match ring.submitter().register_files(&fds) {
                    Ok(()) => features.fixed_files = true,
                    Err(e2) => {
                        tracing::debug!(
                            "fixed files unavailable ({e}, {e2}); using plain descriptors"
                        );
                        fixed_index.iter_mut().for_each(|f| *f = None);
                    }
                }
            }
            Err(e) => tracing::debug!("no sparse file table ({e}); tasks use plain descriptors"),
        }
        let ring_index = match register_ring_fd(ring.as_raw_fd()) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::debug!("ring fd not registered ({e}); enter with the plain fd");
                None
            }
        };
        features.registered_ring = ring_index.is_some();
        let pool = pool.filter(|p| {
            let iovecs = p.iovecs();
            // SAFETY: the pool's region outlives the ring (we hold an Arc to it).
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!(
                        "registered buffers unavailable ({e}); device IO pins pages per op"
                    );
                    false
                }
            }
        });
        features.registered_buffers = pool.is_some();
        Ok(Self {
            pool,
            ring,
            features,
            per_device_in_flight: vec![0; max_id],
            busy_until_ns: vec![0; max_id],
            devices: by_id,
            fixed_index,
            slots: Vec::with_capacity(queue_depth),
            free_slots: Vec::new(),
            ring_in_flight: 0,
            raw_done: Vec::new(),
            reap_scratch: Vec::new(),
            raw_in_flight: 0,
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            delayed_seq: 0,
            in_flight: 0,
            queue_depth,
            wake_fd,
            wake_armed: false,
            wake_buf: Box::new([0; 8]),
            epoch: Instant::now(),
            ring_index,
            free_task_files,
            task_files: Vec::new(),
            free_buf_groups: (0..crate::task::MAX_TASKS_PER_REACTOR as u16)
                .rev()
                .collect(),
            task_buf_groups: Vec::new(),
        })
    }

    /// io_uring_enter: submit what is queued and wait for `want` completions (at most
    /// `timeout_ns`), through the registered ring index when there is one.
    fn enter(&mut self, want: u32, timeout_ns: Option<u64>) -> std::io::Result<usize> {
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
        bufs: &mut crate::provided::ProvidedBuffers,
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

    /// Queue a task's ring op (user_data carries the raw bit, the task and its tag).
    ///
    /// # Safety
    /// What the entry points to must stay valid until its completion is reaped.
    pub(crate) unsafe fn push_raw(&mut self, entry: squeue::Entry) -> Result<(), ()> {
        // SAFETY: forwarded contract.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.enter(0, None).map_err(|_| ())?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| ())?;
        }
        self.raw_in_flight += 1;
        Ok(())
    }

    /// Hand over completed raw ops.
    pub(crate) fn take_raw(&mut self, out: &mut Vec<(u64, i32, u32)>) {
        out.append(&mut self.raw_done);
    }

    pub fn features(&self) -> RingFeatures {
        self.features
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Where a finished op goes: straight to `ready`, or held back by the delay wrapper.
    fn finish(
        &mut self,
        device: &OpenDevice,
        kind: IoKind,
        len: u64,
        submitted_ns: u64,
        c: IoCompletion,
    ) {
        let i = device.spec.id.0 as usize;
        self.per_device_in_flight[i] -= 1;
        let spike_ns = device.fault.as_ref().map_or(0, |f| f.spike_ns());
        let service = match (&device.delay, kind) {
            (Some(p), IoKind::Read) => p.read_service(len),
            (Some(p), IoKind::Write { .. } | IoKind::Zero { .. }) => p.write_service(len),
            // Charged even without a volatile cache: the command still travels to the device.
            (Some(p), IoKind::Sync) => ServiceTime {
                latency_ns: p.flush_delay_ns(),
                transfer_ns: 0,
            },
            (None, _) => ServiceTime {
                latency_ns: 0,
                transfer_ns: 0,
            },
        };
        if service.total_ns() == 0 && spike_ns == 0 {
            self.ready.push_back(c);
            return;
        }
        // Transfers share the device's bandwidth one after another; latencies (and fault
        // spikes) overlap, up to the profile's queue depth which `push_on` enforces.
        let due_ns = schedule_delayed(&mut self.busy_until_ns[i], submitted_ns, service, spike_ns);
        self.delayed_seq += 1;
        self.delayed.push(Reverse(Delayed {
            due_ns,
            seq: self.delayed_seq,
            completion: c,
        }));
    }

    fn run_inline(device: &OpenDevice, op: &mut IoOp) -> Result<u32, i32> {
        let len = match op.kind {
            IoKind::Zero { len_bytes } => len_bytes,
            _ => op.buf.as_ref().map_or(0, |b| b.len() as u64),
        };
        match (&device.backend, op.kind) {
            (Backend::Mem(m), IoKind::Read) => m.read(
                op.offset_bytes,
                op.buf.as_mut().ok_or(libc::EINVAL)?.as_mut_slice(),
            ),
            (Backend::Mem(m), IoKind::Write { fua }) => {
                m.write(
                    op.offset_bytes,
                    op.buf.as_ref().ok_or(libc::EINVAL)?.as_slice(),
                )?;
                if fua {
                    m.persist()?;
                }
                Ok(())
            }
            (Backend::Mem(m), IoKind::Zero { len_bytes }) => m.zero(op.offset_bytes, len_bytes),
            (Backend::Mem(m), IoKind::Sync) => m.persist(),
            (Backend::Null, IoKind::Read) => {
                op.buf.as_mut().ok_or(libc::EINVAL)?.as_mut_slice().fill(0);
                Ok(())
            }
            (Backend::Null, _) => Ok(()),
            (Backend::Direct { .. }, _) => unreachable!("direct ops go through the ring"),
        }
        .map(|()| len as u32)
    }

    fn build_sqe(&self, device: &OpenDevice, slot: &mut Slot, tag: u64) -> squeue::Entry {
        let (file, blockdev) = match &device.backend {
            Backend::Direct { file, blockdev } => (file.as_raw_fd(), *blockdev),
            _ => unreachable!("only direct devices use the ring"),
        };
        let fixed = self.fixed_index[device.spec.id.0 as usize];
        let op = &mut slot.op;
        macro_rules! with_fd {
            ($b:expr) => {
                match fixed {
                    Some(i) => $b(types::Fixed(i)),
                    None => $b(types::Fd(file)),
                }
            };
        }
        let (ptr, len) = match (&mut slot.bounce, &mut op.buf) {
            (Some(b), _) => (b.as_mut_ptr(), b.len() as u32),
            (None, Some(b)) => (b.as_mut_ptr(), b.len() as u32),
            (None, None) => (std::ptr::null_mut(), 0),
        };
        // A resubmission after a short transfer: the rest of the buffer, further on the device.
        let done = slot.done_bytes.min(len);
        debug_assert!(done == 0 || matches!(op.kind, IoKind::Read | IoKind::Write { .. }));
        // SAFETY: done <= len, so the pointer stays inside (or one past) the same buffer.
        let ptr = unsafe { ptr.add(done as usize) };
        let len = len - done;
        let device_offset = op.offset_bytes + u64::from(done);
        // A buffer inside the registered pool skips per-op page pinning.
        let fixed_buf = self
            .pool
            .as_ref()
            .and_then(|p| p.index_of(ptr, len as usize));
        let flags_for = |fua: bool| if fua { libc::RWF_DSYNC } else { 0 };
        let entry = match (op.kind, fixed_buf) {
            (IoKind::Read, Some(i)) => with_fd!(|fd| opcode::ReadFixed::new(fd, ptr, len, i)
                .offset(device_offset)
                .build()),
            (IoKind::Write { fua }, Some(i)) => {
                with_fd!(|fd| opcode::WriteFixed::new(fd, ptr as *const u8, len, i)
                    .offset(device_offset)
                    .rw_flags(flags_for(fua))
                    .build())
            }
            (IoKind::Read, None) => with_fd!(|fd| opcode::Read::new(fd, ptr, len)
                .offset(device_offset)
                .build()),
            (IoKind::Write { fua }, None) => {
                with_fd!(|fd| opcode::Write::new(fd, ptr as *const u8, len)
                    .offset(device_offset)
                    .rw_flags(flags_for(fua))
                    .build())
            }
            (IoKind::Sync, _) => with_fd!(|fd| opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            (IoKind::Zero { len_bytes }, _) => {
                // Files: punch a hole (reads zeros, frees space). Block devices: zero the range.
                let mode = if blockdev {
                    libc::FALLOC_FL_ZERO_RANGE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                with_fd!(|fd| opcode::Fallocate::new(fd, len_bytes)
                    .offset(op.offset_bytes)
                    .mode(mode)
                    .build())
            }
        };
        entry.user_data(tag)
    }

    fn reap_ring(&mut self) {
        let mut done = std::mem::take(&mut self.reap_scratch);
        done.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        for &(tag, res, flags) in &done {
            if tag == WAKE_TAG {
                self.wake_armed = false;
                continue;
            }
            if tag & crate::task::RAW_BIT != 0 {
                // A multishot op stays in flight until its last completion.
                if !io_uring::cqueue::more(flags) {
                    self.raw_in_flight -= 1;
                }
                self.raw_done.push((tag, res, flags));
                continue;
            }
            let mut slot = self.slots[tag as usize]
                .take()
                .expect("completion for a live slot");
            let expected = match slot.op.kind {
                IoKind::Read | IoKind::Write { .. } => {
                    slot.op.buf.as_ref().map_or(0, |b| b.len() as i64)
                }
                _ => -1,
            };
            let done = i64::from(slot.done_bytes) + i64::from(res.max(0));
            if res > 0 && done < expected && done % i64::from(SHORT_RETRY_ALIGN) == 0 {
                // A short transfer (a file system that ran out of space mid-write stops at
                // the last block it could allocate): submit the rest, whose result is the real
                // error (ENOSPC) or success. Bounded: every resubmission moved bytes.
                slot.done_bytes = done as u32;
                self.resubmit(tag, slot);
                continue;
            }
            self.free_slots.push(tag as u32);
            self.ring_in_flight -= 1;
            let Slot {
                mut op,
                bounce,
                submitted_ns,
                ..
            } = slot;
            let result = if res < 0 {
                Err(-res)
            } else if expected >= 0 && done != expected {
                // A short transfer inside the device's bounds means the device misbehaved.
                Err(libc::EIO)
            } else {
                Ok(done.max(0) as u32)
            };
            if let (Ok(_), IoKind::Read, Some(b)) = (result, op.kind, &bounce) {
                op.buf
                    .as_mut()
                    .expect("read buffer")
                    .as_mut_slice()
                    .copy_from_slice(b.as_slice());
            }
            // Moved out and back rather than cloned: no shared refcount traffic per op.
            let di = op.device.0 as usize;
            let device = self.devices[di].take().expect("device");
            let len = expected.max(0) as u64;
            let kind = op.kind;
            let c = IoCompletion {
                tag: op.tag,
                result,
                buf: op.buf.take(),
            };
            self.finish(&device, kind, len, submitted_ns, c);
            self.devices[di] = Some(device);
        }
        done.clear();
        self.reap_scratch = done;
    }

    /// Put a short-transferred op's remainder back into the ring, under the same tag.
    fn resubmit(&mut self, tag: u64, mut slot: Slot) {
        let di = slot.op.device.0 as usize;
        let device = self.devices[di].clone().expect("device of a live op");
        let sqe = self.build_sqe(&device, &mut slot, tag);
        self.slots[tag as usize] = Some(slot);
        // SAFETY: as in `push_on`: the SQE points into the slot's buffer, which the slot owns
        // until its completion is reaped.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            if let Err(e) = self.enter(0, None) {
                tracing::warn!("io_uring submit: {e}");
            }
        }
    }

    fn release_due(&mut self) {
        if self.delayed.is_empty() {
            return;
        }
        let now = self.now_ns();
        while self.delayed.peek().is_some_and(|d| d.0.due_ns <= now) {
            let Reverse(d) = self.delayed.pop().expect("peeked");
            self.ready.push_back(d.completion);
        }
    }

    fn arm_wake(&mut self) -> bool {
        if self.wake_armed {
            return true;
        }
        let read = opcode::Read::new(
            types::Fd(self.wake_fd.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_TAG);
        // SAFETY: wake_buf is boxed and lives as long as self; the read is reaped (or the ring
        // closed) before self is dropped.
        if unsafe { self.ring.submission().push(&read) }.is_err() {
            return false;
        }
        self.wake_armed = true;
        true
    }
    fn push_on(&mut self, device: &OpenDevice, mut op: IoOp) -> Result<(), IoOp> {
        let i = device.spec.id.0 as usize;
        if self.per_device_in_flight[i] >= device.spec.profile.queue_depth {
            return Err(op);
        }
        let len = match op.kind {
            IoKind::Zero { len_bytes } => len_bytes,
            _ => op.buf.as_ref().map_or(0, |b| b.len() as u64),
        };
        // The clock is only needed by the delay and fault wrappers.
        let now = if device.delay.is_some() || device.fault.is_some() {
            self.now_ns()
        } else {
            0
        };
        self.in_flight += 1;
        self.per_device_in_flight[i] += 1;
        let is_write = matches!(op.kind, IoKind::Write { .. } | IoKind::Zero { .. });
        if let Some(errno) = device.fault.as_ref().and_then(|f| {
            (op.kind != IoKind::Sync)
                .then(|| f.inject(op.offset_bytes, len, is_write))
                .flatten()
        }) {
            let kind = op.kind;
            let c = IoCompletion {
                tag: op.tag,
                result: Err(errno),
                buf: op.buf.take(),
            };
            self.finish(device, kind, len, now, c);
            return Ok(());
        }
        if !matches!(device.backend, Backend::Direct { .. }) {
            let result = Self::run_inline(device, &mut op);
            let kind = op.kind;
            let c = IoCompletion {
                tag: op.tag,
                result,
                buf: op.buf.take(),
            };
            self.finish(device, kind, len, now, c);
            return Ok(());
        }
        let bounce = op
            .buf
            .as_ref()
            .filter(|b| !(b.as_ptr() as usize).is_multiple_of(DIRECT_MEM_ALIGN))
            .map(|b| {
                let mut a = AlignedBuf::zeroed(b.len());
                if matches!(op.kind, IoKind::Write { .. }) {
                    a.as_mut_slice().copy_from_slice(b.as_slice());
                }
                a
            });
        let tag = match self.free_slots.pop() {
            Some(t) => t,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let mut slot = Slot {
            op,
            bounce,
            submitted_ns: now,
            done_bytes: 0,
        };
        let sqe = self.build_sqe(device, &mut slot, u64::from(tag));
        self.slots[tag as usize] = Some(slot);
        // SAFETY: the SQE points into the slot's buffer (or bounce buffer), which the slot owns
        // until the completion is reaped; slots are never dropped while in the ring.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // The SQ is sized above the queue depth, so this only means "submit what is queued".
            if let Err(e) = self.enter(0, None) {
                tracing::warn!("io_uring submit: {e}");
            }
        }
        self.ring_in_flight += 1;
        // A device that serves requests in arrival order (virtio-blk under a VM) idles while
        // a whole loop turn's worth of ops waits to be submitted at once; small groups keep it
        // fed. 0 = submit once per turn (fewest system calls).
        let batch = device.spec.profile.submit_batch as usize;
        if batch > 0 && self.ring.submission().len() >= batch {
            if let Err(e) = self.enter(0, None) {
                tracing::warn!("io_uring submit: {e}");
            }
        }
        Ok(())
    }
}

impl Io for UringIo {
    fn push(&mut self, mut op: IoOp) -> Result<(), IoOp> {
        if self.in_flight >= self.queue_depth {
            return Err(op);
        }
        let di = op.device.0 as usize;
        // Moved out and back rather than cloned: no shared refcount traffic per op.
        let Some(device) = self.devices.get_mut(di).and_then(Option::take) else {
            self.in_flight += 1;
            self.ready.push_back(IoCompletion {
                tag: op.tag,
                result: Err(libc::ENODEV),
                buf: op.buf.take(),
            });
            return Ok(());
        };
        let result = self.push_on(&device, op);
        self.devices[di] = Some(device);
        result
    }
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let sq_pending = !self.ring.submission().is_empty();
        let enter = if self.features.defer_taskrun {
            // Deferred completions run only inside io_uring_enter(GETEVENTS), which `submit`
            // asks for when the kernel has set the taskrun flag: enter exactly then (or to
            // submit), not on every spin.
            sq_pending || self.ring.submission().taskrun()
        } else {
            sq_pending || self.ring_in_flight > 0 || self.raw_in_flight > 0
        };
        if enter {
            match self.enter(0, None) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(EngineError::Ring(e)),
            }
        }
        self.poll_local(out)
    }

    fn poll_local(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        self.reap_ring();
        self.release_due();
        self.in_flight -= self.ready.len();
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn park(&mut self, timeout_ns: Option<u64>) -> Result<(), EngineError> {
        if !self.ready.is_empty() || !self.raw_done.is_empty() {
            return Ok(());
        }
        let delay_ns = self
            .delayed
            .peek()
            .map(|d| d.0.due_ns.saturating_sub(self.now_ns()));
        let wait_ns = match (timeout_ns, delay_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if wait_ns == Some(0) {
            return Ok(());
        }
        if !self.arm_wake() {
            return Ok(());
        }
        let res = match wait_ns {
            Some(ns) if self.features.ext_arg => self.enter(1, Some(ns)),
            _ => self.enter(1, None),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(EngineError::Ring(e)),
        }?;
        // No drain needed: the armed ring read of the eventfd consumes its counter when a
        // wake arrives, and is re-armed at the next park.
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn with_memory(
        &mut self,
        device: DeviceId,
        offset_bytes: u64,
        len: usize,
        access: MemAccess,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), i32>,
    ) -> Option<Result<(), i32>> {
        let d = self.devices.get(device.0 as usize)?.as_ref()?;
        // The wrappers shape each op (latency, injected errors): such devices take the op path.
        if d.delay.is_some() || d.fault.is_some() {
            return None;
        }
        let Backend::Mem(m) = &d.backend else {
            return None;
        };
        // SAFETY: the trait's contract: we run on the reactor that owns the chunk holding this
        // range, synchronously. Only that reactor reads, writes, allocates or unmaps the chunk
        // (a whole-chunk TRIM that frees it runs on this same thread, so not during this call),
        // and a volume is deleted only with no IO in flight; so no one else touches these
        // bytes, and the chunk cannot be freed or given to another volume while `f` runs.
        let result = unsafe { m.with_range(offset_bytes, len, f) }.and_then(|r| r);
        Some(match (result, access) {
            (Ok(()), MemAccess::Write { fua: true }) => m.persist(),
            (r, _) => r,
        })
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // Buffers in the ring belong to the kernel until their completions arrive: wait for
        // them (bounded: each round reaps at least one) before the slots are freed.
        if self.wake_armed {
            wake(&self.wake_fd);
        }
        let mut rounds = 0;
        while (self.ring_in_flight > 0 || self.raw_in_flight > 0 || self.wake_armed)
            && rounds < 100_000
        {
            let _ = self.enter(1, None);
            self.reap_ring();
            rounds += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_sockets_take_fixed_slots_and_give_them_back() {
        let mut io = UringIo::new(&[], 8, new_wake_fd().unwrap(), None).unwrap();
        if !io.features().task_files {
            eprintln!("skipped: this kernel has no sparse file table");
            return;
        }
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let slots: Vec<u32> = (0..crate::task::MAX_TASKS_PER_REACTOR as u32)
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

    #[test]
    fn emulated_latency_overlaps_and_transfers_queue() {
        // 32 reads submitted together on an NVMe-like device: 80 µs latency, 1 µs transfer.
        let service = ServiceTime {
            latency_ns: 80_000,
            transfer_ns: 1_000,
        };
        let mut busy_until_ns = 0;
        let dues: Vec<u64> = (0..32)
            .map(|_| schedule_delayed(&mut busy_until_ns, 0, service, 0))
            .collect();
        // Latencies overlap: the last op finishes after 32 transfers + one latency, not 32 × 81 µs.
        assert_eq!(dues[0], 81_000);
        assert_eq!(dues[31], 32_000 + 80_000);
        assert!(dues.windows(2).all(|w| w[1] - w[0] == 1_000));
        // An idle link does not carry its past: a later op starts at its own submission.
        assert_eq!(
            schedule_delayed(&mut busy_until_ns, 1_000_000, service, 0),
            1_081_000
        );
        // A fault spike delays only its own op.
        assert_eq!(
            schedule_delayed(&mut busy_until_ns, 2_000_000, service, 5_000),
            2_086_000
        );
        assert_eq!(busy_until_ns, 2_001_000);
    }
}
