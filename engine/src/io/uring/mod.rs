//! The real [`Io`]: one io_uring per reactor. O_DIRECT files and block devices go through the
//! ring (registered as fixed files); RAM, bbram and null devices complete inline. Plain IO:
//! emulated service times and injected faults are decorators above it ([`super::delay`],
//! [`super::fault`]).
//!
//! This layer knows nothing above it: the reactor says what to size the ring for
//! ([`RingConfig`]). Besides device ops, the ring carries the ops of the reactor's tasks
//! ([`raw`]: the real [`super::task_ring::TaskRing`]) and the wake-up read; [`user_data`] is
//! the one encoding that tells them apart.
//! [`sys`] holds the system calls the io_uring crate does not wrap.

mod raw;
mod sys;
mod user_data;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use self::sys::register_ring_fd;
pub use self::sys::{new_wake_fd, wake};
use self::user_data::UserData;
use super::task_ring::RingCompletion;
use super::zero_copy::SendCounters;
use super::{Io, IoCompletion, IoKind, IoOp, MemAccess};
use crate::buf::{AlignedBuf, RegisteredPool};
use crate::device::{Backend, OpenDevice};
use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::request::Errno;

/// Memory alignment we guarantee for O_DIRECT (buffers that miss it are bounced).
const DIRECT_MEM_ALIGN: usize = 512;
/// A short transfer is carried on only from a multiple of this, which O_DIRECT accepts as an
/// offset and a length; anything else is a device fault (EIO).
const SHORT_RETRY_ALIGN: u32 = 512;

struct Slot {
    op: IoOp,
    /// Aligned copy for a buffer whose memory O_DIRECT cannot use.
    bounce: Option<AlignedBuf>,
    /// Bytes already transferred by earlier submissions of a read or write that came back
    /// short; the next submission carries on from there.
    done_bytes: u32,
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
    /// Zero-copy sends with usage reports (`SEND_ZC`, `SENDMSG_ZC`, Linux 6.2).
    pub zero_copy_sends: bool,
}

/// What a ring is sized for: the layer above says how much it will put in at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Device ops in flight at once (1..=4096).
    pub queue_depth: usize,
    /// Owners of raw ops (a reactor's tasks) the ring keeps a file table slot and a
    /// provided-buffer group for, numbered from 0.
    pub max_raw_owners: usize,
    /// Raw ops in flight at once, all owners together.
    pub max_raw_ops: usize,
}

pub struct UringIo {
    /// Registered with the ring: ops whose buffer lies inside use the fixed opcodes.
    pool: Option<Arc<RegisteredPool>>,
    ring: IoUring,
    features: RingFeatures,
    devices: Vec<Option<Arc<OpenDevice>>>,
    fixed_index: Vec<Option<u32>>,
    /// Ops of each device not yet completed: what the profile's queue depth bounds.
    per_device_in_flight: Vec<u32>,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    ring_in_flight: usize,
    /// Completions of tasks' raw ops, with the task that pushed each.
    raw_done: Vec<(u32, RingCompletion)>,
    reap_scratch: Vec<(u64, i32, u32)>,
    raw_in_flight: usize,
    ready: VecDeque<IoCompletion>,
    in_flight: usize,
    queue_depth: usize,
    wake_fd: Arc<OwnedFd>,
    wake_armed: bool,
    wake_buf: Box<[u8; 8]>,
    /// Index of the registered ring fd, passed to io_uring_enter instead of the fd.
    ring_index: Option<u32>,
    /// Free slots of the file table for tasks' descriptors, and who holds the taken ones.
    free_task_files: Vec<u32>,
    task_files: Vec<(u32, u32)>,
    /// Free provided-buffer group ids, and who holds the taken ones.
    free_buf_groups: Vec<u16>,
    task_buf_groups: Vec<(u32, u16)>,
    /// Why zero-copy sends are off, when they are.
    zero_copy_unavailable: Option<String>,
    /// How tasks' zero-copy sends went out.
    sends: Arc<SendCounters>,
}

impl UringIo {
    /// Build a ring for `devices` (indexed by device id). Call on the thread that will use it,
    /// and keep it there: the ring is set up single-issuer when the kernel allows, and its
    /// registered fd lives in this thread's ring-fd table.
    pub fn new(
        devices: &[Arc<OpenDevice>],
        config: RingConfig,
        wake_fd: Arc<OwnedFd>,
        pool: Option<Arc<RegisteredPool>>,
    ) -> Result<Self, EngineError> {
        let RingConfig {
            queue_depth,
            max_raw_owners,
            max_raw_ops,
        } = config;
        assert!((1..=4096).contains(&queue_depth));
        assert!(max_raw_owners <= usize::from(u16::MAX));
        // Device ops, the wake read and tasks' raw ops all fit at once: the CQ (twice the SQ)
        // never overflows, even when every raw op is a zero-copy send (two completions each).
        let entries = (queue_depth as u32 + 1 + max_raw_ops as u32).next_power_of_two();
        let mut features = RingFeatures::default();
        let mut ring = match IoUring::builder()
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
        let zero_copy = raw::probe_zero_copy(&mut ring);
        features.zero_copy_sends = zero_copy.is_ok();
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
        let task_slots = max_raw_owners as u32;
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
            devices: by_id,
            fixed_index,
            slots: Vec::with_capacity(queue_depth),
            free_slots: Vec::new(),
            ring_in_flight: 0,
            raw_done: Vec::new(),
            reap_scratch: Vec::new(),
            raw_in_flight: 0,
            ready: VecDeque::new(),
            in_flight: 0,
            queue_depth,
            wake_fd,
            wake_armed: false,
            wake_buf: Box::new([0; 8]),
            ring_index,
            free_task_files,
            task_files: Vec::new(),
            free_buf_groups: (0..max_raw_owners as u16).rev().collect(),
            task_buf_groups: Vec::new(),
            zero_copy_unavailable: zero_copy.err(),
            sends: Arc::default(),
        })
    }

    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// A device op is done: it no longer counts against its device's queue depth.
    fn finish(&mut self, device_index: usize, c: IoCompletion) {
        debug_assert!(
            self.per_device_in_flight[device_index] > 0,
            "a completion on device {device_index} with none in flight"
        );
        self.per_device_in_flight[device_index] -= 1;
        self.ready.push_back(c);
    }

    fn run_inline(device: &OpenDevice, op: &mut IoOp) -> Result<u32, Errno> {
        let len = match op.kind {
            IoKind::Zero { len_bytes } => len_bytes,
            _ => op.buf.as_ref().map_or(0, |b| b.len() as u64),
        };
        match (&device.backend, op.kind) {
            (Backend::Mem(m), IoKind::Read) => m.read(
                op.offset_bytes,
                op.buf.as_mut().ok_or(Errno::EINVAL)?.as_mut_slice(),
            ),
            (Backend::Mem(m), IoKind::Write { fua }) => {
                m.write(
                    op.offset_bytes,
                    op.buf.as_ref().ok_or(Errno::EINVAL)?.as_slice(),
                )?;
                if fua {
                    m.persist()?;
                }
                Ok(())
            }
            (Backend::Mem(m), IoKind::Zero { len_bytes }) => m.zero(op.offset_bytes, len_bytes),
            (Backend::Mem(m), IoKind::Sync) => m.persist(),
            (Backend::Null, IoKind::Read) => {
                op.buf.as_mut().ok_or(Errno::EINVAL)?.as_mut_slice().fill(0);
                Ok(())
            }
            (Backend::Null, _) => Ok(()),
            (Backend::Direct { .. }, _) => unreachable!("direct ops go through the ring"),
        }
        .map(|()| len as u32)
    }

    fn build_sqe(&self, device: &OpenDevice, slot: &mut Slot, tag: u32) -> squeue::Entry {
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
        entry.user_data(UserData::Device { slot: tag }.encode())
    }

    fn reap_ring(&mut self) {
        let mut done = std::mem::take(&mut self.reap_scratch);
        done.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        for &(user_data, res, flags) in &done {
            let tag = match UserData::decode(user_data) {
                UserData::Device { slot } => slot,
                UserData::Wake => {
                    self.wake_armed = false;
                    continue;
                }
                UserData::Task { task_id, tag } => {
                    let c = RingCompletion {
                        tag,
                        result: res,
                        flags,
                    };
                    // A multishot op, or a zero-copy send before its notification, stays in
                    // flight until its last completion.
                    if !c.more() {
                        debug_assert!(
                            self.raw_in_flight > 0,
                            "a raw completion with none in flight"
                        );
                        self.raw_in_flight -= 1;
                    }
                    if c.copied() {
                        self.sends.count_kernel_copied();
                    }
                    self.raw_done.push((task_id, c));
                    continue;
                }
            };
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
            self.free_slots.push(tag);
            self.ring_in_flight -= 1;
            let Slot { mut op, bounce, .. } = slot;
            // The one place a ring result's -errno becomes an Errno.
            let result = if res < 0 {
                Err(Errno(-res))
            } else if expected >= 0 && done != expected {
                // A short transfer inside the device's bounds means the device misbehaved.
                Err(Errno::EIO)
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
            let c = IoCompletion {
                tag: op.tag,
                result,
                buf: op.buf.take(),
            };
            self.finish(op.device.0 as usize, c);
        }
        done.clear();
        self.reap_scratch = done;
    }

    /// Put a short-transferred op's remainder back into the ring, under the same tag.
    fn resubmit(&mut self, tag: u32, mut slot: Slot) {
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
        .user_data(UserData::Wake.encode());
        // SAFETY: wake_buf is boxed and lives as long as self; the read is reaped (or the ring
        // closed) before self is dropped.
        if unsafe { self.ring.submission().push(&read) }.is_err() {
            return false;
        }
        self.wake_armed = true;
        true
    }
    /// Every op accepted by `push` and not yet handed out is in exactly one place: the ring
    /// (one taken slot each) or the ready queue.
    fn debug_check_counts(&self) {
        debug_assert_eq!(
            self.ring_in_flight,
            self.slots.len() - self.free_slots.len(),
            "ops in the ring vs taken slots"
        );
        debug_assert_eq!(
            self.in_flight,
            self.ring_in_flight + self.ready.len(),
            "ops in flight vs ring + ready"
        );
    }

    fn push_on(&mut self, device: &OpenDevice, mut op: IoOp) -> Result<(), IoOp> {
        let i = device.spec.id.0 as usize;
        if self.per_device_in_flight[i] >= device.spec.profile.queue_depth {
            return Err(op);
        }
        self.in_flight += 1;
        self.per_device_in_flight[i] += 1;
        if !matches!(device.backend, Backend::Direct { .. }) {
            let result = Self::run_inline(device, &mut op);
            let c = IoCompletion {
                tag: op.tag,
                result,
                buf: op.buf.take(),
            };
            self.finish(i, c);
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
            done_bytes: 0,
        };
        let sqe = self.build_sqe(device, &mut slot, tag);
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
        self.debug_check_counts();
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
                result: Err(Errno(libc::ENODEV)),
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
        debug_assert!(
            self.in_flight >= self.ready.len(),
            "more completions than ops"
        );
        self.in_flight -= self.ready.len();
        out.extend(self.ready.drain(..));
        self.debug_check_counts();
        Ok(())
    }

    fn park(&mut self, timeout_ns: Option<u64>) -> Result<(), EngineError> {
        if !self.ready.is_empty() || !self.raw_done.is_empty() {
            return Ok(());
        }
        if timeout_ns == Some(0) {
            return Ok(());
        }
        if !self.arm_wake() {
            return Ok(());
        }
        let res = match timeout_ns {
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

    fn has_room(&self, device: DeviceId) -> bool {
        self.in_flight < self.queue_depth
            && match self.devices.get(device.0 as usize) {
                Some(Some(d)) => {
                    self.per_device_in_flight[device.0 as usize] < d.spec.profile.queue_depth
                }
                // Answered at once with ENODEV.
                _ => true,
            }
    }

    fn with_memory(
        &mut self,
        device: DeviceId,
        offset_bytes: u64,
        len: usize,
        access: MemAccess,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), Errno>,
    ) -> Option<Result<(), Errno>> {
        let d = self.devices.get(device.0 as usize)?.as_ref()?;
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
