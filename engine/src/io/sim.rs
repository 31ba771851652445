//! A deterministic simulated disk with a volatile write cache, driven by a seed.
//!
//! Effects happen when an op *completes* (after a random number of ticks), so completions are
//! reordered. Completed writes sit in a volatile cache until a sync covers them; a crash keeps a
//! random subset of cached writes (in order, some torn at sector granularity) and may apply a
//! torn prefix-free subset of sectors of each write still in flight.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::sim_net::SimNet;
use super::task_ring::{RingCompletion, SocketOp, TaskRing};
use super::zero_copy::{self, SendCounters};
use super::{Io, IoCompletion, IoKind, IoOp};
use crate::ids::DeviceId;
use crate::provided::ProvidedBuffers;
use crate::request::Errno;

/// Granularity at which the simulated disk tears writes.
pub const SIM_SECTOR_BYTES: u64 = 512;

struct CachedWrite {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

/// The state of one simulated disk, shared by every reactor's [`SimIo`].
pub struct SimDisk {
    durable: Vec<u8>,
    volatile_cache: bool,
    cache: Vec<CachedWrite>,
    next_seq: u64,
    /// Writes submitted and not completed: what a crash may tear.
    in_flight: HashMap<u64, (u64, Vec<u8>)>,
    next_in_flight_id: u64,
    eio_ranges: Vec<Range<u64>>,
    /// Like `eio_ranges`, for writes only (not zeroing, reads or syncs).
    write_eio_ranges: Vec<Range<u64>>,
}

impl SimDisk {
    pub fn new(size_bytes: u64, volatile_cache: bool) -> Self {
        Self::from_image(vec![0; size_bytes as usize], volatile_cache)
    }

    /// A disk whose stable contents are `image` (e.g. what survived a crash).
    pub fn from_image(image: Vec<u8>, volatile_cache: bool) -> Self {
        Self {
            durable: image,
            volatile_cache,
            cache: Vec::new(),
            next_seq: 0,
            in_flight: HashMap::new(),
            next_in_flight_id: 0,
            eio_ranges: Vec::new(),
            write_eio_ranges: Vec::new(),
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.durable.len() as u64
    }

    /// The stable image, for formatting before any IO is simulated.
    pub fn crash_free_image_mut(&mut self) -> &mut [u8] {
        assert!(
            self.cache.is_empty() && self.in_flight.is_empty(),
            "direct writes only before IO starts"
        );
        &mut self.durable
    }

    /// Make every op touching `range` fail with EIO.
    pub fn inject_eio(&mut self, range: Range<u64>) {
        self.eio_ranges.push(range);
    }

    /// Make every write (only) touching `range` fail with EIO.
    pub fn inject_write_eio(&mut self, range: Range<u64>) {
        self.write_eio_ranges.push(range);
    }

    /// Stop failing ops.
    pub fn clear_eio(&mut self) {
        self.eio_ranges.clear();
        self.write_eio_ranges.clear();
    }

    /// What a reader sees now: stable contents overlaid with the cache.
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        out.copy_from_slice(&self.durable[offset as usize..end as usize]);
        for w in &self.cache {
            let (ws, we) = (w.offset, w.offset + w.data.len() as u64);
            let (s, e) = (ws.max(offset), we.min(end));
            if s < e {
                out[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&w.data[(s - ws) as usize..(e - ws) as usize]);
            }
        }
    }

    fn hits_eio(&self, offset: u64, len: u64) -> bool {
        self.eio_ranges
            .iter()
            .any(|r| offset < r.end && r.start < offset + len)
    }

    fn hits_write_eio(&self, offset: u64, len: u64) -> bool {
        self.write_eio_ranges
            .iter()
            .any(|r| offset < r.end && r.start < offset + len)
    }

    fn write_cached(&mut self, offset: u64, data: Vec<u8>, fua: bool) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.cache.push(CachedWrite { seq, offset, data });
        if fua || !self.volatile_cache {
            self.persist_before(u64::MAX);
        }
    }

    /// Write back every cached write with a sequence number below `mark`, in order.
    fn persist_before(&mut self, mark: u64) {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.cache)
            .into_iter()
            .partition(|w| w.seq < mark);
        for w in done {
            self.durable[w.offset as usize..w.offset as usize + w.data.len()]
                .copy_from_slice(&w.data);
        }
        self.cache = keep;
    }

    /// Power cut: returns the stable image a restarted daemon finds.
    pub fn crash(&mut self, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut image = std::mem::take(&mut self.durable);
        let apply_sectors =
            |image: &mut Vec<u8>, offset: u64, data: &[u8], rng: &mut ChaCha8Rng, torn: bool| {
                for (i, sector) in data.chunks(SIM_SECTOR_BYTES as usize).enumerate() {
                    if torn && rng.gen_bool(0.5) {
                        continue;
                    }
                    let at = offset as usize + i * SIM_SECTOR_BYTES as usize;
                    image[at..at + sector.len()].copy_from_slice(sector);
                }
            };
        for w in std::mem::take(&mut self.cache) {
            if rng.gen_bool(0.5) {
                let torn = rng.gen_bool(0.3);
                apply_sectors(&mut image, w.offset, &w.data, rng, torn);
            }
        }
        let mut in_flight: Vec<_> = std::mem::take(&mut self.in_flight).into_iter().collect();
        in_flight.sort_by_key(|(id, _)| *id);
        for (_, (offset, data)) in in_flight {
            if rng.gen_bool(0.3) {
                apply_sectors(&mut image, offset, &data, rng, true);
            }
        }
        image
    }
}

struct Pending {
    due_tick: u64,
    order: u64,
    op: IoOp,
    sync_mark: u64,
    in_flight_id: Option<u64>,
}

/// One reactor's handle on the simulated disks.
pub struct SimIo {
    disks: HashMap<DeviceId, Arc<Mutex<SimDisk>>>,
    clock: Arc<AtomicU64>,
    rng: ChaCha8Rng,
    pending: Vec<Pending>,
    queue_depth: usize,
    max_latency_ticks: u64,
    next_order: u64,
    /// The network its tasks' sockets are on, and this ring's number there.
    net: Option<(SimNet, u32)>,
    /// Zero-copy sends go out zero-copy (else by copying, as on a kernel without them).
    zero_copy: bool,
    sends: SendCounters,
}

impl SimIo {
    pub fn new(
        disks: HashMap<DeviceId, Arc<Mutex<SimDisk>>>,
        clock: Arc<AtomicU64>,
        seed: u64,
        queue_depth: usize,
        max_latency_ticks: u64,
    ) -> Self {
        assert!(queue_depth > 0 && max_latency_ticks > 0);
        Self {
            disks,
            clock,
            rng: ChaCha8Rng::seed_from_u64(seed),
            pending: Vec::new(),
            queue_depth,
            max_latency_ticks,
            next_order: 0,
            net: None,
            zero_copy: true,
            sends: SendCounters::default(),
        }
    }

    /// Send zero-copy sends by copying, as a ring on a kernel without them does.
    pub fn without_zero_copy(mut self) -> Self {
        self.zero_copy = false;
        self
    }

    /// Host tasks whose sockets are on `net`.
    pub fn with_net(mut self, net: &SimNet) -> Self {
        self.net = Some((net.clone(), net.new_ring()));
        self
    }

    fn complete(&mut self, p: Pending) -> IoCompletion {
        let Pending {
            op,
            sync_mark,
            in_flight_id,
            ..
        } = p;
        let disk = self
            .disks
            .get(&op.device)
            .expect("op on a known device")
            .clone();
        let mut disk = disk.lock().expect("sim disk lock");
        if let Some(id) = in_flight_id {
            disk.in_flight.remove(&id);
        }
        let IoOp {
            kind,
            offset_bytes,
            mut buf,
            tag,
            ..
        } = op;
        let len = match kind {
            IoKind::Read | IoKind::Write { .. } => buf.as_ref().map_or(0, |b| b.len() as u64),
            IoKind::Zero { len_bytes } => len_bytes,
            IoKind::Sync => 0,
        };
        let out_of_range = offset_bytes
            .checked_add(len)
            .is_none_or(|e| e > disk.size_bytes());
        let result = if out_of_range {
            Err(Errno::EINVAL)
        } else if (kind != IoKind::Sync && disk.hits_eio(offset_bytes, len))
            || (matches!(kind, IoKind::Write { .. }) && disk.hits_write_eio(offset_bytes, len))
        {
            Err(Errno::EIO)
        } else {
            match kind {
                IoKind::Read => disk.read(
                    offset_bytes,
                    buf.as_mut().expect("read buffer").as_mut_slice(),
                ),
                IoKind::Write { fua } => disk.write_cached(
                    offset_bytes,
                    buf.as_ref().expect("write buffer").as_slice().to_vec(),
                    fua,
                ),
                IoKind::Zero { len_bytes } => {
                    disk.write_cached(offset_bytes, vec![0; len_bytes as usize], false)
                }
                IoKind::Sync => disk.persist_before(sync_mark),
            }
            Ok(len as u32)
        };
        IoCompletion { tag, result, buf }
    }
}

impl Drop for SimIo {
    fn drop(&mut self) {
        if let Some((net, ring)) = &self.net {
            net.drop_ring(*ring);
        }
    }
}

/// Tasks' socket ops go to the simulated network; ops it cannot model are refused.
impl TaskRing for SimIo {
    unsafe fn push(&mut self, task_id: u32, op: SocketOp, tag: u32) -> Result<(), Errno> {
        let (net, ring) = self.net.as_ref().ok_or(Errno(libc::EOPNOTSUPP))?;
        // SAFETY: forwarded contract (a SendMsgZc's header is readable).
        let (op, path) = unsafe { zero_copy::route(op, self.zero_copy) };
        // SAFETY: forwarded contract.
        unsafe { net.push(*ring, task_id, op, tag) };
        if let Some(path) = path {
            self.sends.count(path);
        }
        Ok(())
    }

    unsafe fn push_raw(
        &mut self,
        _task_id: u32,
        _entry: io_uring::squeue::Entry,
        _tag: u32,
    ) -> Result<(), Errno> {
        Err(Errno(libc::EOPNOTSUPP))
    }

    fn register_fd(&mut self, task_id: u32, fd: std::os::fd::RawFd) -> Option<u32> {
        let (net, ring) = self.net.as_ref()?;
        net.register_fd(*ring, task_id, fd)
    }

    unsafe fn register_buffers(&mut self, task_id: u32, bufs: &mut ProvidedBuffers) -> Option<u16> {
        let (net, ring) = self.net.as_ref()?;
        // SAFETY: forwarded contract.
        unsafe { net.register_buffers(*ring, task_id, bufs) }
    }

    fn zero_copy_sends(&self) -> bool {
        self.zero_copy
    }

    fn send_counters(&self) -> &SendCounters {
        &self.sends
    }

    fn release_task_resources(&mut self, task_id: u32) {
        if let Some((net, ring)) = &self.net {
            net.release_task(*ring, task_id);
        }
    }

    fn take_completions(&mut self, out: &mut Vec<(u32, RingCompletion)>) {
        if let Some((net, ring)) = &self.net {
            net.take_completions(*ring, out);
        }
    }

    unsafe fn send_now(&mut self, fd: std::os::fd::RawFd, iov: &[libc::iovec]) -> usize {
        match &self.net {
            // SAFETY: forwarded contract.
            Some((net, _)) => unsafe { net.send_now(fd, iov) },
            None => 0,
        }
    }

    fn shutdown(&mut self, fd: std::os::fd::RawFd) {
        if let Some((net, _)) = &self.net {
            net.shutdown(fd);
        }
    }
}

impl Io for SimIo {
    fn push(&mut self, op: IoOp) -> Result<(), IoOp> {
        if self.pending.len() >= self.queue_depth {
            return Err(op);
        }
        let disk = self
            .disks
            .get(&op.device)
            .expect("op on a known device")
            .clone();
        let mut disk = disk.lock().expect("sim disk lock");
        let sync_mark = disk.next_seq;
        let in_flight_id = match op.kind {
            IoKind::Write { .. } | IoKind::Zero { .. } => {
                let id = disk.next_in_flight_id;
                disk.next_in_flight_id += 1;
                let data = match (op.kind, &op.buf) {
                    (IoKind::Zero { len_bytes }, _) => vec![0; len_bytes as usize],
                    (_, Some(b)) => b.as_slice().to_vec(),
                    (_, None) => Vec::new(),
                };
                let in_range = op
                    .offset_bytes
                    .checked_add(data.len() as u64)
                    .is_some_and(|e| e <= disk.size_bytes());
                if in_range {
                    disk.in_flight.insert(id, (op.offset_bytes, data));
                }
                Some(id)
            }
            _ => None,
        };
        drop(disk);
        let due_tick =
            self.clock.load(Ordering::Relaxed) + self.rng.gen_range(1..=self.max_latency_ticks);
        let order = self.next_order;
        self.next_order += 1;
        self.pending.push(Pending {
            due_tick,
            order,
            op,
            sync_mark,
            in_flight_id,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), crate::EngineError> {
        let now = self.clock.load(Ordering::Relaxed);
        let mut ready: Vec<Pending> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].due_tick <= now {
                ready.push(self.pending.swap_remove(i));
            } else {
                i += 1;
            }
        }
        ready.sort_by_key(|p| (p.due_tick, p.order));
        for p in ready {
            let c = self.complete(p);
            out.push(c);
        }
        Ok(())
    }

    fn park(&mut self, _timeout_ns: Option<u64>) -> Result<(), crate::EngineError> {
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn has_room(&self, _device: DeviceId) -> bool {
        self.pending.len() < self.queue_depth
    }
}

/// Simulated nanoseconds per tick of the simulator's clock, as the delay decorator reads it.
pub const SIM_TICK_NS: u64 = 10_000;

/// The simulator's tick clock, in nanoseconds ([`SIM_TICK_NS`] per tick).
pub struct SimClock {
    ticks: Arc<AtomicU64>,
}

impl SimClock {
    pub fn new(ticks: Arc<AtomicU64>) -> Self {
        Self { ticks }
    }
}

impl super::delay::Clock for SimClock {
    fn now_ns(&self) -> u64 {
        self.ticks
            .load(Ordering::Relaxed)
            .saturating_mul(SIM_TICK_NS)
    }
}
