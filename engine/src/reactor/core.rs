//! The reactor state machine: request parts become device ops on the chunks this reactor
//! owns. A chunk allocated for a write is published in the volume's map only once that first
//! write succeeded: a failed write leaves no chunk behind.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::round::Round;
use super::{FlushWaiter, Msg, Router};
use crate::buf::{AlignedBuf, IoBuf, RegisteredPool};
use crate::ids::{ChunkIndex, DeviceId, PhysChunk, ReactorId, VolumeId};
use crate::io::{Io, IoCompletion, IoKind, IoOp, MemAccess};
use crate::request::{DataMover, Errno, InFlight, Part, RequestKind};
use crate::volume::{chunk_owner, DeviceState, Volume};

/// Most device operations one reactor tracks at once (in the ring or waiting for ring space).
pub const MAX_OPS_PER_REACTOR: usize = 1 << 16;

/// Zeros handed out (to a mover or a sink) for reads of unmapped chunks, a piece at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// `len_bytes` of zeros handed to `f` in pieces of at most [`ZEROS`], each with its offset from
/// the first; stops at the first error.
fn zero_pieces(
    len_bytes: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), Errno>,
) -> Result<(), Errno> {
    let mut done = 0u64;
    // Bounded: len / 64 KiB pieces (a part is at most one chunk).
    while done < len_bytes {
        let n = (len_bytes - done).min(ZEROS.len() as u64);
        f(done, &ZEROS[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// A Read of unmapped space through a mover: zeros, in pieces of [`ZEROS`].
fn copy_out_zeros(
    mover: &dyn DataMover,
    offset_in_request: u64,
    len_bytes: u64,
) -> Result<(), Errno> {
    zero_pieces(len_bytes, |at, zeros| {
        mover.copy_out(offset_in_request + at, zeros)
    })
}

pub(super) enum OpCtx {
    Part(Part),
    ChunkInit {
        volume: Arc<Volume>,
        chunk: ChunkIndex,
        phys: PhysChunk,
    },
    /// The write that allocated `phys`, into the zeroed chunk not yet in the map.
    FirstWrite {
        part: Part,
        phys: PhysChunk,
    },
    Round {
        device: DeviceId,
    },
}

/// What a device's home reactor keeps for it.
pub(crate) struct Home {
    pub device: Arc<DeviceState>,
    pub volumes: Vec<Arc<Volume>>,
    /// Newest generation known durable on the device (in the slot that is not `next_slot`).
    pub generation: u64,
    /// Slot a round writes first (the older one); the other, holding `generation`, second.
    pub next_slot: u64,
    pub(super) waiting: Vec<FlushWaiter>,
    pub(super) round: Option<Round>,
}

impl Home {
    pub fn new(
        device: Arc<DeviceState>,
        volumes: Vec<Arc<Volume>>,
        generation: u64,
        current_slot: u64,
    ) -> Self {
        Self {
            device,
            volumes,
            generation,
            next_slot: current_slot ^ 1,
            waiting: Vec::new(),
            round: None,
        }
    }
}

pub(crate) struct ReactorCore<I: Io> {
    pub id: ReactorId,
    pub io: I,
    pub(super) router: Arc<dyn Router>,
    ops: Vec<Option<OpCtx>>,
    free_tags: Vec<u32>,
    /// Ops that did not fit in the ring, in order.
    blocked: VecDeque<IoOp>,
    /// Messages to other reactors whose inbox was full.
    outbox: VecDeque<(ReactorId, Msg)>,
    /// Chunks being zeroed before their first write; parts that arrive meanwhile wait here.
    initializing: HashMap<(VolumeId, ChunkIndex), Vec<Part>>,
    pub(super) homes: HashMap<DeviceId, Home>,
    completions: Vec<IoCompletion>,
    /// Where bounce buffers for requests with a mover come from (else the heap).
    bounce_pool: Option<Arc<RegisteredPool>>,
    /// Counts what may change or free memory `read_in_place` handed out (a part that is not a
    /// read starts here, a control message): a task that keeps pointers to it checks in debug
    /// builds that this has not moved when it dereferences them ([`Self::data_epoch`]).
    data_epoch: u64,
}

impl<I: Io> ReactorCore<I> {
    pub fn new(id: ReactorId, io: I, router: Arc<dyn Router>, homes: Vec<Home>) -> Self {
        Self {
            id,
            io,
            router,
            ops: Vec::new(),
            free_tags: Vec::new(),
            blocked: VecDeque::new(),
            outbox: VecDeque::new(),
            initializing: HashMap::new(),
            homes: homes.into_iter().map(|h| (h.device.id, h)).collect(),
            completions: Vec::with_capacity(256),
            bounce_pool: None,
            data_epoch: 0,
        }
    }

    /// See the `data_epoch` field: equal values mean memory `read_in_place` handed out
    /// between them is still valid and unchanged.
    pub(crate) fn data_epoch(&self) -> u64 {
        self.data_epoch
    }

    /// Take bounce buffers from `pool` (the reactor's registered pool: device IO into it
    /// skips page pinning) while it has one free that fits.
    pub fn set_bounce_pool(&mut self, pool: Arc<RegisteredPool>) {
        self.bounce_pool = Some(pool);
    }

    /// A buffer for a part whose data a mover brings or takes, when the device cannot be
    /// reached in place. Its bytes are all overwritten before they are used.
    fn bounce(&self, len: usize) -> IoBuf {
        self.bounce_pool
            .as_ref()
            .and_then(|p| p.take(len))
            .unwrap_or_else(|| IoBuf::owned(AlignedBuf::zeroed(len)))
    }

    /// Nothing in flight, nothing queued: safe to park.
    pub fn is_idle(&self) -> bool {
        self.io.in_flight() == 0
            && self.blocked.is_empty()
            && self.outbox.is_empty()
            && self.initializing.is_empty()
    }

    /// Operations tracked right now (for stats).
    pub fn ops_in_flight(&self) -> usize {
        self.ops.len() - self.free_tags.len()
    }

    pub fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Part(part) => self.start_part(part),
            Msg::Flush { device, waiter } => {
                let home = self
                    .homes
                    .get_mut(&device)
                    .expect("flush routed to the device's home reactor");
                home.waiting.push(waiter);
                self.start_round(device);
            }
            Msg::Control { device, control } => {
                self.data_epoch += 1;
                self.control(device, control)
            }
            Msg::Task(_) => unreachable!("tasks are taken by the runtime before the core"),
        }
    }

    /// Submit what is queued, reap completions and act on them. Returns completions handled.
    pub fn poll(&mut self) -> Result<usize, crate::EngineError> {
        self.retry_outbox();
        while let Some(op) = self.blocked.pop_front() {
            if let Err(op) = self.io.push(op) {
                self.blocked.push_front(op);
                break;
            }
        }
        let mut completions = std::mem::take(&mut self.completions);
        self.io.poll(&mut completions)?;
        Ok(self.handle_completions(completions))
    }

    /// Act on completions that are ready without entering the kernel: ops a task's request
    /// just ran inline (a memory device) complete in the same loop turn, so the task sees them
    /// before the ring is entered again.
    pub fn poll_local(&mut self) -> Result<usize, crate::EngineError> {
        let mut completions = std::mem::take(&mut self.completions);
        self.io.poll_local(&mut completions)?;
        Ok(self.handle_completions(completions))
    }

    fn handle_completions(&mut self, mut completions: Vec<IoCompletion>) -> usize {
        let n = completions.len();
        for c in completions.drain(..) {
            self.on_completion(c);
        }
        self.completions = completions;
        n
    }

    fn retry_outbox(&mut self) {
        // Bounded: each message is tried once per poll.
        for _ in 0..self.outbox.len() {
            let (to, msg) = self.outbox.pop_front().expect("len checked");
            if let Err(msg) = self.router.try_send(to, msg) {
                self.outbox.push_back((to, msg));
            }
        }
    }

    pub(crate) fn send(&mut self, to: ReactorId, msg: Msg) {
        if to == self.id {
            self.handle(msg);
        } else if !self.outbox.is_empty() {
            self.outbox.push_back((to, msg));
        } else if let Err(msg) = self.router.try_send(to, msg) {
            self.outbox.push_back((to, msg));
        }
    }

    pub(super) fn submit(
        &mut self,
        device: DeviceId,
        kind: IoKind,
        offset_bytes: u64,
        buf: Option<IoBuf>,
        ctx: OpCtx,
    ) {
        let tag = match self.free_tags.pop() {
            Some(t) => {
                self.ops[t as usize] = Some(ctx);
                t
            }
            None => {
                assert!(
                    self.ops.len() < MAX_OPS_PER_REACTOR,
                    "reactor op table full"
                );
                self.ops.push(Some(ctx));
                (self.ops.len() - 1) as u32
            }
        };
        let op = IoOp {
            device,
            kind,
            offset_bytes,
            buf,
            tag: u64::from(tag),
        };
        if !self.blocked.is_empty() {
            self.blocked.push_back(op);
        } else if let Err(op) = self.io.push(op) {
            self.blocked.push_back(op);
        }
    }

    fn on_completion(&mut self, c: IoCompletion) {
        let tag = c.tag as usize;
        let ctx = self.ops[tag].take().expect("completion for a live op");
        self.free_tags.push(tag as u32);
        match ctx {
            OpCtx::Part(mut part) => {
                let device = &part.req.volume.device;
                if let Err(errno) = c.result {
                    match part.req.kind {
                        RequestKind::Read => {
                            device.health.read_errors.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => device.health.write_errors.fetch_add(1, Ordering::Relaxed),
                    };
                    part.req.fail(errno);
                }
                part.buf = c.buf;
                if let (Some(mover), RequestKind::Read, Ok(_)) =
                    (part.req.mover.as_deref(), part.req.kind, c.result)
                {
                    // The bounced read is here: hand it to the mover, then the buffer goes.
                    let src = part.buf.as_ref().expect("bounced read returns its buffer");
                    if let Err(e) = mover.copy_out(part.offset_in_request, src.as_slice()) {
                        part.req.fail(e);
                    }
                }
                self.finish_part(part);
            }
            OpCtx::ChunkInit {
                volume,
                chunk,
                phys,
            } => {
                let key = (volume.id, chunk);
                let mut waiting = self.initializing.remove(&key).unwrap_or_default();
                debug_assert!(!waiting.is_empty(), "a chunk is allocated for a write");
                let first = waiting.remove(0);
                match c.result {
                    Ok(_) => {
                        // The allocating write goes first, alone: the chunk is mapped only if
                        // it succeeds. Parts that came meanwhile keep waiting behind it.
                        self.initializing.insert(key, waiting);
                        self.start_first_write(first, phys);
                    }
                    Err(errno) => {
                        give_back_new_chunk(&volume, phys);
                        first.req.fail(errno);
                        self.finish_part(first);
                        // The others start over: each write allocates (and fails) on its own.
                        for part in waiting {
                            self.start_part(part);
                        }
                    }
                }
            }
            OpCtx::FirstWrite { mut part, phys } => {
                part.buf = c.buf;
                self.first_write_done(part, phys, c.result.map(|_| ()));
            }
            OpCtx::Round { device } => self.round_step(device, c.result.map(|_| ())),
        }
    }

    pub(super) fn start_part(&mut self, mut part: Part) {
        let volume = part.req.volume.clone();
        let device = &volume.device;
        let key = (volume.id, part.chunk);
        let cs = device.chunk_size_bytes();
        let whole_chunk = part.offset_in_chunk == 0 && part.len_bytes == cs;
        if part.req.kind != RequestKind::Read {
            self.data_epoch += 1;
            if let Some(waiting) = self.initializing.get_mut(&key) {
                waiting.push(part);
                return;
            }
        }
        let mapped = volume.mapping(part.chunk);
        if part.req.mover.is_some()
            && matches!(part.req.kind, RequestKind::Read | RequestKind::Write)
        {
            if let Some(p) = mapped {
                let off = device.label.chunk_offset_bytes(p) + part.offset_in_chunk;
                self.start_moved_part(part, off, None);
                return;
            }
            if part.req.kind == RequestKind::Read {
                let mover = part.req.mover.as_deref().expect("checked");
                if let Err(e) = copy_out_zeros(mover, part.offset_in_request, part.len_bytes) {
                    part.req.fail(e);
                }
                self.finish_part(part);
                return;
            }
            // An unmapped write allocates below, like one with a buffer.
        }
        match (part.req.kind, mapped) {
            (RequestKind::Read, None) => {
                part.buf
                    .as_mut()
                    .expect("read part has a buffer")
                    .as_mut_slice()
                    .fill(0);
                self.finish_part(part);
            }
            (RequestKind::Read, Some(p)) => {
                let off = device.label.chunk_offset_bytes(p) + part.offset_in_chunk;
                let buf = part.buf.take();
                self.submit(device.id, IoKind::Read, off, buf, OpCtx::Part(part));
            }
            (RequestKind::Write, Some(p)) => {
                let off = device.label.chunk_offset_bytes(p) + part.offset_in_chunk;
                let buf = part.buf.take();
                // A device without FUA gets a plain write and a flush after it (below).
                let fua = part.req.fua && device.profile.fua;
                self.submit(
                    device.id,
                    IoKind::Write { fua },
                    off,
                    buf,
                    OpCtx::Part(part),
                );
            }
            (RequestKind::Write, None) => match device.alloc.allocate() {
                None => {
                    part.req.fail(Errno::ENOSPC);
                    self.finish_part(part);
                }
                Some(phys) => {
                    // A reused chunk holds an old volume's bytes: zero it before it is mapped.
                    self.initializing.insert(key, vec![part]);
                    let off = device.label.chunk_offset_bytes(phys);
                    let ctx = OpCtx::ChunkInit {
                        volume: volume.clone(),
                        chunk: key.1,
                        phys,
                    };
                    self.submit(device.id, IoKind::Zero { len_bytes: cs }, off, None, ctx);
                }
            },
            (RequestKind::Trim | RequestKind::WriteZeroes, None) => self.finish_part(part),
            (RequestKind::Trim | RequestKind::WriteZeroes, Some(p)) => {
                if whole_chunk {
                    volume.set_mapping(part.chunk, None);
                    device.alloc.free(p);
                    device.mark_meta_dirty();
                    self.finish_part(part);
                } else {
                    let off = device.label.chunk_offset_bytes(p) + part.offset_in_chunk;
                    let len_bytes = part.len_bytes;
                    self.submit(
                        device.id,
                        IoKind::Zero { len_bytes },
                        off,
                        None,
                        OpCtx::Part(part),
                    );
                }
            }
            (RequestKind::Flush, _) => unreachable!("flushes are not split into parts"),
        }
    }

    /// The write that allocated `phys` (zeroed, not yet mapped), at its place in the chunk.
    fn start_first_write(&mut self, mut part: Part, phys: PhysChunk) {
        let device = part.req.volume.device.clone();
        let off = device.label.chunk_offset_bytes(phys) + part.offset_in_chunk;
        if part.req.mover.is_some() {
            self.start_moved_part(part, off, Some(phys));
            return;
        }
        let buf = part.buf.take();
        // A device without FUA gets a plain write and a flush after it (`finish_part`).
        let fua = part.req.fua && device.profile.fua;
        let ctx = OpCtx::FirstWrite { part, phys };
        self.submit(device.id, IoKind::Write { fua }, off, buf, ctx);
    }

    /// The allocating write of `phys` finished: map the chunk (before the write is answered,
    /// so a read after the answer finds the data) or give the chunk back; then the parts that
    /// waited for the chunk start.
    fn first_write_done(&mut self, part: Part, phys: PhysChunk, result: Result<(), Errno>) {
        let volume = part.req.volume.clone();
        let key = (volume.id, part.chunk);
        match result {
            Ok(()) => {
                volume.set_mapping(part.chunk, Some(phys));
                volume.device.mark_meta_dirty();
            }
            Err(errno) => {
                give_back_new_chunk(&volume, phys);
                part.req.fail(errno);
            }
        }
        self.finish_part(part);
        for waiting in self.initializing.remove(&key).unwrap_or_default() {
            self.start_part(waiting);
        }
    }

    /// A Read/Write part with a mover, on a mapped chunk at device offset `off`: straight
    /// between the mover and the device's memory when it is plain memory, else through a
    /// bounce buffer and a device op (Read: the mover gets the buffer on completion).
    /// `first`: this write allocated that chunk (see [`Self::first_write_done`]).
    fn start_moved_part(&mut self, part: Part, off: u64, first: Option<PhysChunk>) {
        let device_id = part.req.volume.device.id;
        // A device without FUA gets a plain write and a flush after it (`finish_part`).
        let fua = part.req.fua && part.req.volume.device.profile.fua;
        let len = part.len_bytes as usize;
        let oir = part.offset_in_request;
        let mover = part.req.mover.as_deref().expect("moved part has a mover");
        let write = part.req.kind == RequestKind::Write;
        let access = if write {
            MemAccess::Write { fua }
        } else {
            MemAccess::Read
        };
        // A failed copy_in may leave the range half written: a failed write's range holds
        // undefined data, as on any disk.
        let direct = self
            .io
            .with_memory(device_id, off, len, access, &mut |mem| {
                if write {
                    mover.copy_in(oir, mem)
                } else {
                    mover.copy_out(oir, mem)
                }
            });
        let path = if direct.is_some() {
            &part.req.volume.stats.moved_parts_in_place
        } else {
            &part.req.volume.stats.moved_parts_bounced
        };
        path.fetch_add(1, Ordering::Relaxed);
        match (direct, first) {
            (Some(result), Some(phys)) => {
                self.first_write_done(part, phys, result);
            }
            (Some(result), None) => {
                if let Err(errno) = result {
                    part.req.fail(errno);
                }
                self.finish_part(part);
            }
            (None, _) if write => {
                let mut buf = self.bounce(len);
                if let Err(e) = mover.copy_in(oir, buf.as_mut_slice()) {
                    drop(buf);
                    match first {
                        Some(phys) => self.first_write_done(part, phys, Err(e)),
                        None => {
                            part.req.fail(e);
                            self.finish_part(part);
                        }
                    }
                    return;
                }
                let kind = IoKind::Write { fua };
                let ctx = match first {
                    Some(phys) => OpCtx::FirstWrite { part, phys },
                    None => OpCtx::Part(part),
                };
                self.submit(device_id, kind, off, Some(buf), ctx);
            }
            (None, _) => {
                let buf = self.bounce(len);
                self.submit(device_id, IoKind::Read, off, Some(buf), OpCtx::Part(part));
            }
        }
    }

    /// A Read served in place, when it can be: inside one chunk this reactor owns, on a device
    /// that is plain memory (or an unmapped chunk, which reads as zeros). The bytes go straight
    /// to `sink`, in order, in one or more pieces, before this returns: no request, part, op or
    /// completion. None when it cannot be (`sink` was not called): submit a request instead.
    pub(crate) fn read_in_place(
        &mut self,
        volume: &Volume,
        offset_bytes: u64,
        len_bytes: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Option<Result<(), Errno>> {
        let cs = volume.chunk_size_bytes();
        let end = offset_bytes.checked_add(len_bytes)?;
        if len_bytes == 0 || offset_bytes / cs != (end - 1) / cs {
            return None;
        }
        let chunk = ChunkIndex(offset_bytes / cs);
        if chunk_owner(volume.id, chunk, self.router.reactors()) != self.id {
            return None;
        }
        let started = std::time::Instant::now();
        let checked = crate::front::validate_range(
            volume,
            RequestKind::Read,
            offset_bytes,
            len_bytes,
            Some(len_bytes),
        );
        if let Err(e) = checked {
            return Some(Err(e));
        }
        let device = &volume.device;
        let result = match volume.mapping(chunk) {
            None => zero_pieces(len_bytes, |_, zeros| {
                sink(zeros);
                Ok(())
            }),
            Some(p) => {
                let off = device.label.chunk_offset_bytes(p) + offset_bytes % cs;
                let copied = self.io.with_memory(
                    device.id,
                    off,
                    len_bytes as usize,
                    MemAccess::Read,
                    &mut |mem| {
                        sink(mem);
                        Ok(())
                    },
                )?;
                copied.inspect_err(|_| {
                    device.health.read_errors.fetch_add(1, Ordering::Relaxed);
                })
            }
        };
        crate::front::count_accepted(volume, RequestKind::Read, len_bytes);
        if result.is_err() {
            volume.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ns = started.elapsed().as_nanos() as u64;
        volume.stats.read_latency.record(ns);
        Some(result)
    }

    fn finish_part(&mut self, part: Part) {
        let Part { req, buf, .. } = part;
        drop(buf); // the window must be gone before the request can complete
        if !req.part_done() {
            return;
        }
        self.finish_request(req);
    }

    /// Every part of `req` (local and replica) is done: complete it, or start the trailing
    /// flush of a FUA write that needs one.
    pub(crate) fn finish_request(&mut self, req: Arc<InFlight>) {
        let device = &req.volume.device;
        let needs_flush = req.kind == RequestKind::Write
            && req.fua
            && req.errno.load(Ordering::Acquire) == 0
            && req.stage.load(Ordering::Acquire) == 0
            && (device.meta_dirty()
                || !device.profile.fua
                || device.health.backing_deleted.load(Ordering::Acquire));
        if needs_flush {
            // A FUA write into a new chunk is durable only with its chunk's mapping; on a
            // device without FUA only a flush makes it durable.
            req.stage.store(1, Ordering::Release);
            req.remaining.store(1, Ordering::Release);
            let home = device.home_reactor(self.router.reactors());
            let device_id = device.id;
            self.send(
                home,
                Msg::Flush {
                    device: device_id,
                    waiter: FlushWaiter::Request(req),
                },
            );
        } else {
            req.complete();
        }
    }
}

/// A chunk allocated for a write that failed (zeroing it or the write itself): counted as a
/// write error and returned to the allocator at once, since it was never in a map and so never
/// in metadata.
fn give_back_new_chunk(volume: &Volume, phys: PhysChunk) {
    volume
        .device
        .health
        .write_errors
        .fetch_add(1, Ordering::Relaxed);
    volume.device.alloc.release_unpublished(phys);
}
