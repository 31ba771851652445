//! The primary's side of a replica link, as a reactor task over an established connection.
//!
//! The task drains its [`ReplicaLink`]'s inbox while its [`SendWindow`] has room (bounded in
//! frames and bytes; when full it stops taking ops, and the bounded inbox makes further
//! writes mark the bitmap instead of waiting), sends each op as one frame (a Write's pages
//! straight from the request's buffer), heartbeats when idle, and matches every
//! acknowledgement against the window. A request's replica part is done when its ack
//! arrived *and* the kernel is done with its pages (a zero-copy send's notification).
//!
//! **Failure** (the peer closes or resets, a timeout, an error ack, a protocol error, a
//! Goodbye): the link leaves the fan-out, and every range the replica may lack is marked in
//! its dirty bitmap: ops not acknowledged, and writes acknowledged since the last flush the
//! replica acknowledged (they may sit in its volatile cache). Then a local flush makes the
//! marks durable, and only then are the waiting parts done (as success: the volume goes on,
//! degraded), so a client's flush that waited on this replica never completes before the
//! bitmap that replaces it is on disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use ringblock_engine::replication::{
    GenerationId, LinkMode, LinkState, ReplicaLink, ReplicaOp, ReplicaOpKind,
};
use ringblock_engine::task::{ReactorTask, RingCompletion, Socket, TaskCtx};
use ringblock_engine::{Errno, Port, VolumeHandle};

use super::body::{decode_frame, encode_data_header, encode_frame, Body, Decoded, Frame};
use super::frame::{FrameKind, HEADER_LEN};
use super::io::{Clock, FrameSender, RecvBuf, SendDone};
use super::window::{InboundWindow, SendWindow};

mod failure;
mod resync;
mod verify;
use resync::Resync;

use super::{GoodbyeReason, ReplicatedVolumeId, Seq};

/// Payloads at least this large go with a zero-copy send (when the link may use one); smaller
/// ones are copied, which is cheaper than pinning pages and waiting for a notification (the
/// ring layer's measured threshold, `docs/performance.md`).
pub const ZERO_COPY_MIN_BYTES: usize = ringblock_engine::io::zero_copy::ZERO_COPY_MIN_BYTES;
/// A link sends a heartbeat after this long without sending anything.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1000;
/// A frame not acknowledged after this long fails the link.
pub const ACK_TIMEOUT_MS: u64 = 5000;

/// Frames built and not yet taken by the socket, at most (then ops wait in the inbox).
const MAX_QUEUED_FRAMES: usize = 64;

const TAG_RECV: u32 = 0;
const TAG_SEND: u32 = 1;
const TAG_FLUSH_PORT: u64 = 1;

/// How a link behaves.
#[derive(Clone)]
pub struct LinkOptions {
    /// The replicated volume's cluster-wide id, in every frame.
    pub volume: ReplicatedVolumeId,
    /// The next sequence numbers each way (from the handshake's `Session`).
    pub send_seq: Seq,
    pub recv_seq: Seq,
    /// Bounds of the send window.
    pub window_frames: u32,
    pub window_bytes: u64,
    /// Whether the ring and socket can send without copying (the start-up probe's answer).
    pub zero_copy: bool,
    /// Milliseconds, for heartbeats and timeouts.
    pub clock: Clock,
    /// Name for logs.
    pub peer: String,
}

/// Whether a payload of `len` bytes goes with a zero-copy send.
pub fn use_zero_copy(zero_copy_available: bool, len: usize) -> bool {
    zero_copy_available && len >= ZERO_COPY_MIN_BYTES
}

/// A frame in flight and what it waits for.
struct Pending {
    /// The op it carries (a key of `ops`), if any.
    op: Option<u64>,
    /// The resync piece it carries, if any.
    piece: Option<u64>,
    sent_ms: u64,
    acked: bool,
    /// Its bytes are all handed to the kernel and no notification is outstanding.
    released: bool,
}

/// An op taken from the inbox.
struct OpEntry {
    op: ReplicaOp,
    /// Its frames not yet acknowledged and released.
    frames_left: u32,
}

enum Phase {
    Running,
    /// The link failed: waiting for submitters to leave, ring ops to end, then the flush.
    Failing {
        orphans: Vec<ReplicaOp>,
        flush_sent: bool,
    },
    Done,
}

/// The primary's link task (see the module).
pub struct PrimaryLink {
    fd: OwnedFd,
    socket: Socket,
    handle: VolumeHandle,
    link: Arc<ReplicaLink>,
    opts: LinkOptions,
    window: SendWindow,
    inbound: InboundWindow,
    sender: FrameSender,
    recv: RecvBuf,
    pending: HashMap<u64, Pending>,
    /// Ops taken from the inbox and not done, by id (in the order taken, so the first is the
    /// oldest): a write larger than one frame's payload goes as several frames, and is done
    /// when all of them are.
    ops: BTreeMap<u64, OpEntry>,
    /// Since when ops wait in the inbox while the task holds none (the window is full of
    /// resync pieces), for the lag ([`Self::publish_lag`]).
    inbox_waiting_ns: Option<u64>,
    next_op: u64,
    /// The write being cut into frames, and the bytes of it framed so far.
    cutting: Option<(u64, u64)>,
    /// Why the link cannot go on, found where it cannot fail at once.
    broken: Option<String>,
    /// Regions written since the last Flush was sent, and those written before the newest
    /// Flush not yet acknowledged: the replica may still lose them.
    unflushed: BTreeSet<u64>,
    flushing: BTreeSet<u64>,
    newest_flush: Option<u64>,
    last_send_ms: u64,
    /// Where the failure path's local flush completes (made on the first turn, with the
    /// reactor's waker).
    port: Option<Arc<Port>>,
    waker_set: bool,
    phase: Phase,
    resync: Resync,
    /// The newest generation the replica was told of (the primary's current one when the
    /// link started: the handshake carried it).
    followed: Option<GenerationId>,
    /// `VolumeReplication::history_changes` when the history was last looked at.
    history_seen: u64,
    /// The resync ended: a Flush of the link's own follows, so the resynced regions leave
    /// `unflushed` (otherwise a failure before the first client flush marks them all again).
    flush_after_resync: bool,
    /// The online verify (`verify`): a job handed over, its batch in flight.
    verify: verify::Verify,
}

impl PrimaryLink {
    pub fn new(
        fd: OwnedFd,
        handle: VolumeHandle,
        link: Arc<ReplicaLink>,
        opts: LinkOptions,
    ) -> PrimaryLink {
        let socket = Socket::Fd(fd.as_raw_fd());
        let now = (opts.clock)();
        // Read the counter first: a change after it is seen at the next poll.
        let history_seen = link.replication().history_changes();
        let followed = link.replication().history().current();
        PrimaryLink {
            window: SendWindow::new(opts.send_seq, opts.window_frames, opts.window_bytes),
            inbound: InboundWindow::new(opts.recv_seq),
            sender: FrameSender::new(socket, TAG_SEND),
            recv: RecvBuf::new(socket, TAG_RECV),
            fd,
            socket,
            handle,
            link,
            opts,
            pending: HashMap::new(),
            ops: BTreeMap::new(),
            inbox_waiting_ns: None,
            next_op: 0,
            cutting: None,
            broken: None,
            unflushed: BTreeSet::new(),
            flushing: BTreeSet::new(),
            flush_after_resync: false,
            newest_flush: None,
            last_send_ms: now,
            port: None,
            waker_set: false,
            phase: Phase::Running,
            resync: Resync::new(),
            followed,
            history_seen,
            verify: verify::Verify::default(),
        }
    }

    /// Tell the status how long the oldest write the replica has not acknowledged waited:
    /// the oldest op held, else the inbox's (async ops carry when they were queued; a sync
    /// replica does not trail, its writes wait for it).
    fn publish_lag(&mut self) {
        let oldest = match self.ops.first_key_value() {
            Some((_, entry)) => {
                self.inbox_waiting_ns = None;
                entry.op.queued_ns()
            }
            None if self.link.inbox_len() > 0 && self.link.mode() != LinkMode::Sync => Some(
                *self
                    .inbox_waiting_ns
                    .get_or_insert_with(ringblock_engine::replication::lag::monotonic_ns),
            ),
            None => {
                self.inbox_waiting_ns = None;
                None
            }
        };
        let replica = &self.link.replication().replicas()[self.link.index()];
        replica.status.lag.set_oldest(oldest);
    }

    fn region_shift(&self) -> u8 {
        self.link.replication().activity.region_shift()
    }

    /// Take ops from the inbox while the window has room, and frame them.
    fn take_ops(&mut self, now: u64) -> usize {
        let mut n = 0;
        while self.sender.queued() < MAX_QUEUED_FRAMES
            && self.window_has_room()
            && self.broken.is_none()
        {
            if let Some((id, done)) = self.cutting {
                self.frame_write_piece(id, done, now);
                continue;
            }
            let Some(op) = self.link.pop() else { break };
            n += 1;
            self.frame_op(op, now);
        }
        if self.pending.is_empty()
            && self.sender.queued() == 0
            && now.saturating_sub(self.last_send_ms) >= HEARTBEAT_INTERVAL_MS
        {
            self.frame_small(Body::Heartbeat, None, now);
        }
        n
    }

    /// In how many ms the next heartbeat or acknowledgement timeout is due, if one is: a
    /// parked reactor must poll the link by then even when nothing else happens.
    fn next_timer_ms(&self, now: u64) -> Option<u64> {
        let ack = self.window.oldest().and_then(|oldest| {
            let sent = self.pending.get(&oldest.seq.0)?.sent_ms;
            Some(ACK_TIMEOUT_MS.saturating_sub(now.saturating_sub(sent)))
        });
        // A heartbeat goes only when nothing is unacknowledged or queued (see `take_ops`).
        let heartbeat = (self.pending.is_empty() && self.sender.queued() == 0)
            .then(|| HEARTBEAT_INTERVAL_MS.saturating_sub(now.saturating_sub(self.last_send_ms)));
        match (ack, heartbeat) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        }
    }

    /// Whether the window has room for the largest op (checked before popping, since a
    /// popped op cannot go back), and one frame more for a heartbeat.
    fn window_has_room(&self) -> bool {
        let frames = self.window.in_flight_frames() + 1 < self.opts.window_frames.max(2);
        let bytes = self.window.in_flight_bytes() + u64::from(super::MAX_PAYLOAD_BYTES)
            <= self
                .opts
                .window_bytes
                .max(u64::from(super::MAX_PAYLOAD_BYTES));
        frames && bytes
    }

    fn frame_op(&mut self, op: ReplicaOp, now: u64) {
        let (offset, len) = (op.offset_bytes(), op.len_bytes());
        self.note_written(op.kind(), offset, len);
        let kind = op.kind();
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, OpEntry { op, frames_left: 0 });
        let body = match kind {
            ReplicaOpKind::Write { .. } => {
                self.cutting = Some((id, 0));
                return self.frame_write_piece(id, 0, now);
            }
            ReplicaOpKind::Trim | ReplicaOpKind::WriteZeroes => {
                // Requests are at most 64 MiB: the length fits the frame's 32 bits.
                debug_assert!(len <= u64::from(u32::MAX));
                let len_bytes = len as u32;
                if kind == ReplicaOpKind::Trim {
                    Body::Trim {
                        offset_bytes: offset,
                        len_bytes,
                    }
                } else {
                    Body::WriteZeroes {
                        offset_bytes: offset,
                        len_bytes,
                    }
                }
            }
            ReplicaOpKind::Flush => Body::Flush,
        };
        self.frame_small(body, Some(id), now);
    }

    /// Frame the next piece (at most one payload) of write `id`, `done` bytes of it framed.
    fn frame_write_piece(&mut self, id: u64, done: u64, now: u64) {
        let Some(entry) = self.ops.get_mut(&id) else {
            self.cutting = None;
            return;
        };
        let ReplicaOpKind::Write { fua } = entry.op.kind() else {
            self.cutting = None;
            return;
        };
        let data = entry.op.payload().unwrap_or(&[]);
        let piece_len = (data.len() as u64 - done).min(u64::from(super::MAX_PAYLOAD_BYTES));
        let piece = &data[done as usize..(done + piece_len) as usize];
        let seq = match self.window.try_reserve(FrameKind::Write, piece_len as u32) {
            Ok(seq) => seq,
            Err(e) => {
                // Room was checked first; only an exhausted sequence space gets here.
                self.broken = Some(format!("cannot send: {e}"));
                return;
            }
        };
        let body = Body::Write {
            offset_bytes: entry.op.offset_bytes() + done,
            fua,
            data: piece,
        };
        let header = encode_data_header(&Frame::new(seq, self.opts.volume, body));
        let zc = use_zero_copy(self.opts.zero_copy, piece.len());
        // The pages stay valid until the frame is reported sent: the op (and its request)
        // stays in `ops` until every frame of it is acknowledged and released.
        self.sender
            .enqueue(seq.0, header.to_vec(), piece.as_ptr(), piece.len(), zc);
        entry.frames_left += 1;
        let done = done + piece_len;
        self.cutting = (done < data.len() as u64).then_some((id, done));
        self.pending.insert(
            seq.0,
            Pending {
                op: Some(id),
                piece: None,
                sent_ms: now,
                acked: false,
                released: false,
            },
        );
    }

    fn frame_small(&mut self, body: Body<'_>, op: Option<u64>, now: u64) {
        let kind = body.kind();
        let seq = match self.window.try_reserve(kind, 0) {
            Ok(seq) => seq,
            Err(e) => {
                // Room was checked first; only an exhausted sequence space gets here.
                self.broken = Some(format!("cannot send: {e}"));
                return;
            }
        };
        if let Some(entry) = op.and_then(|id| self.ops.get_mut(&id)) {
            entry.frames_left += 1;
        }
        if kind == FrameKind::Flush {
            // Everything written so far is covered once this flush is acknowledged.
            self.flushing.append(&mut self.unflushed);
            self.newest_flush = Some(seq.0);
        }
        if kind.ack_kind().is_some() {
            self.pending.insert(
                seq.0,
                Pending {
                    op,
                    piece: None,
                    sent_ms: now,
                    acked: false,
                    released: false,
                },
            );
        }
        self.enqueue_small(seq, body);
    }

    /// Queue a frame without payload.
    fn enqueue_small(&mut self, seq: Seq, body: Body<'_>) {
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        encode_frame(&Frame::new(seq, self.opts.volume, body), &mut bytes);
        self.sender
            .enqueue(seq.0, bytes, std::ptr::null(), 0, false);
    }

    /// Tell the replica of every generation the primary started since the last one it was
    /// told of (it records each durably before acknowledging).
    fn follow_generations(&mut self, now: u64) {
        let changes = self.link.replication().history_changes();
        if changes == self.history_seen {
            return;
        }
        let history = self.link.replication().history();
        let Some(current) = history.current() else {
            self.history_seen = changes;
            return;
        };
        if self.followed == Some(current) {
            self.history_seen = changes;
            return;
        }
        let ids = history.ids();
        let from = self
            .followed
            .and_then(|f| ids.iter().position(|&g| g == f))
            .map_or(ids.len() - 1, |at| at + 1);
        for &id in &ids[from..] {
            if !self.window_has_room() || self.broken.is_some() {
                return;
            }
            self.frame_small(Body::Generation(id.get()), None, now);
            self.followed = Some(id);
        }
        self.history_seen = changes;
    }

    fn note_written(&mut self, kind: ReplicaOpKind, offset: u64, len: u64) {
        if kind == ReplicaOpKind::Flush {
            return;
        }
        let shift = self.region_shift();
        let (first, last) = (offset >> shift, (offset + len.max(1) - 1) >> shift);
        self.unflushed.extend(first..=last);
    }

    /// Frames that arrived: acknowledgements, heartbeats, a Goodbye.
    fn on_frames(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), String> {
        loop {
            let (kind, ack_seq, errno, consumed) = match decode_frame(self.recv.data()) {
                Ok(Decoded::Need(_)) => return Ok(()),
                Err(e) => return Err(format!("bad frame from the replica: {e}")),
                Ok(Decoded::Frame { frame, consumed }) => {
                    if frame.volume != self.opts.volume {
                        return Err(format!("frame for volume {}", frame.volume));
                    }
                    self.inbound.accept(&frame).map_err(|e| e.to_string())?;
                    match frame.body {
                        Body::WriteAck { seq, errno } => {
                            (FrameKind::WriteAck, seq, errno, consumed)
                        }
                        Body::FlushAck { seq, errno } => {
                            (FrameKind::FlushAck, seq, errno, consumed)
                        }
                        Body::HeartbeatAck { seq } => (FrameKind::HeartbeatAck, seq, 0, consumed),
                        Body::Goodbye(reason) => {
                            return Err(format!("the replica said goodbye ({reason:?})"))
                        }
                        Body::ResyncRequest { first, count } => {
                            self.recv.consume(consumed);
                            self.on_resync_request(first.0, count)?;
                            continue;
                        }
                        Body::ResyncDone { .. } => {
                            self.recv.consume(consumed);
                            self.on_peer_resync_done()?;
                            continue;
                        }
                        Body::VerifyReply { first, checksums } => {
                            let sums: Vec<u32> = super::body::checksums(checksums).collect();
                            self.recv.consume(consumed);
                            self.on_verify_reply(first.0, &sums)?;
                            continue;
                        }
                        other => {
                            return Err(format!("unexpected {:?} from the replica", other.kind()))
                        }
                    }
                }
            };
            self.recv.consume(consumed);
            self.window.ack(kind, ack_seq).map_err(|e| e.to_string())?;
            if errno != 0 {
                return Err(format!(
                    "the replica failed frame {ack_seq}: {}",
                    Errno(errno as i32)
                ));
            }
            if kind == FrameKind::FlushAck && self.newest_flush == Some(ack_seq.0) {
                self.flushing.clear();
                self.newest_flush = None;
            }
            let Some(p) = self.pending.get_mut(&ack_seq.0) else {
                return Err(format!("ack {ack_seq} for a frame not pending"));
            };
            p.acked = true;
            self.retire(ctx, ack_seq.0);
        }
    }

    /// Retire the frame once it is acknowledged and its pages are released; hand back its op
    /// when that was the op's last frame.
    fn retire(&mut self, ctx: &mut TaskCtx<'_>, seq: u64) {
        if !self
            .pending
            .get(&seq)
            .is_some_and(|p| p.acked && p.released)
        {
            return;
        }
        let Some(p) = self.pending.remove(&seq) else {
            return;
        };
        if let Some(piece) = p.piece {
            self.piece_done(piece);
        }
        let Some(id) = p.op else {
            return;
        };
        let Some(entry) = self.ops.get_mut(&id) else {
            return;
        };
        entry.frames_left -= 1;
        let cut_whole = self.cutting.is_none_or(|(c, _)| c != id);
        if entry.frames_left == 0 && cut_whole {
            if let Some(entry) = self.ops.remove(&id) {
                if entry.op.kind() == ReplicaOpKind::Flush {
                    // Acknowledged (a failing link hands its ops back elsewhere).
                    self.link.note_flush_acked();
                }
                ctx.replica_done(entry.op);
            }
        }
    }
}

impl ReactorTask for PrimaryLink {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if !self.waker_set {
            self.link.set_waker(ctx.port_waker());
            self.port = Some(Port::new(1, ctx.port_waker()));
            self.waker_set = true;
            self.start_resync(ctx);
        }
        let now = (self.opts.clock)();
        let mut work = 0;
        if matches!(self.phase, Phase::Running) {
            if let Some(reason) = self.broken.take() {
                self.fail(ctx, &reason);
            } else if self.link.state() == LinkState::Behind {
                self.fail(ctx, "the link fell behind (its inbox was full)");
            } else if let Some(oldest) = self.window.oldest() {
                let sent = self.pending.get(&oldest.seq.0).map_or(now, |p| p.sent_ms);
                if now.saturating_sub(sent) >= ACK_TIMEOUT_MS {
                    self.fail(ctx, "no acknowledgement in time");
                }
            }
        }
        match self.phase {
            Phase::Running => {
                work += self.take_ops(now);
                self.follow_generations(now);
                match self.step_resync(ctx, now) {
                    Ok(n) => work += n,
                    Err(e) => self.fail(ctx, &e),
                }
                match self.step_verify(ctx, now) {
                    Ok(n) => work += n,
                    Err(e) => self.fail(ctx, &e),
                }
                if self.flush_after_resync && self.window_has_room() {
                    self.flush_after_resync = false;
                    self.frame_small(Body::Flush, None, now);
                    work += 1;
                }
                if let Err(e) = self.recv.arm(ctx) {
                    self.fail(ctx, &format!("cannot receive: {e}"));
                }
                match self.sender.pump(ctx) {
                    Ok(true) => {
                        self.last_send_ms = now;
                        work += 1;
                    }
                    Ok(false) => {}
                    Err(e) => self.fail(ctx, &format!("cannot send: {e}")),
                }
                if let Some(ms) = self.next_timer_ms(now) {
                    ctx.wake_within_ns(ms.saturating_mul(1_000_000));
                }
                self.publish_lag();
            }
            Phase::Failing { .. } => work += self.step_failing(ctx),
            Phase::Done => {}
        }
        if let Some(c) = self.port.as_ref().and_then(|p| p.pop()) {
            self.finish_orphans(ctx, c.result);
            work += 1;
        }
        work
    }

    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        match c.tag {
            TAG_RECV => match self.recv.on_complete(c) {
                Ok(()) => {
                    if let Err(e) = self.on_frames(ctx) {
                        self.fail(ctx, &e);
                    }
                }
                Err(e) => self.fail(ctx, &e),
            },
            _ => match self.sender.on_complete(c) {
                Ok(done) => {
                    for SendDone { seq } in done {
                        if let Some(p) = self.pending.get_mut(&seq) {
                            p.released = true;
                        }
                        self.retire(ctx, seq);
                    }
                }
                Err(e) => self.fail(ctx, &e),
            },
        }
    }

    fn stop(&mut self, ctx: &mut TaskCtx<'_>) {
        let mut bytes = Vec::new();
        if let Ok(seq) = self.window.try_reserve(FrameKind::Goodbye, 0) {
            let frame = Frame::new(
                seq,
                self.opts.volume,
                Body::Goodbye(GoodbyeReason::Shutdown),
            );
            encode_frame(&frame, &mut bytes);
            // SAFETY: `bytes` is valid for the call.
            unsafe {
                ctx.send_now(
                    self.fd.as_raw_fd(),
                    &[libc::iovec {
                        iov_base: bytes.as_ptr() as *mut libc::c_void,
                        iov_len: bytes.len(),
                    }],
                )
            };
        }
        self.fail(ctx, "the daemon is stopping");
    }

    fn has_ready(&self) -> bool {
        // A failing link keeps its reactor turning until its flush is out: it waits for
        // submitters to leave, which wakes nobody.
        let failing = matches!(
            self.phase,
            Phase::Failing {
                flush_sent: false,
                ..
            }
        );
        let resync = matches!(self.phase, Phase::Running) && self.resync.wants_poll();
        let verify = matches!(self.phase, Phase::Running)
            && self.resync.phase == resync::ResyncPhase::Done
            && (self.verify.wants_poll() || self.link.verify_offered());
        failing
            || resync
            || verify
            || self.port.as_ref().is_some_and(|p| !p.is_empty())
            || self.link.inbox_len() > 0
    }

    fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done) && !self.sender.busy() && !self.recv.busy()
    }
}

impl std::fmt::Debug for PrimaryLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryLink")
            .field("socket", &self.socket)
            .field("peer", &self.opts.peer)
            .finish()
    }
}
