//! The link's resync: it copies the regions of the replica's dirty bitmap while new writes go
//! to the replica too (the fan-out's resyncing state marks their regions again).
//!
//! A batch of dirty regions (at most [`MAX_BATCH_REGIONS`] or [`MAX_BATCH_BYTES`]) has its
//! bits cleared, then waits for the volume's write barrier: every write that may have marked
//! them has completed locally. Then each region is read through the engine in pieces of at
//! most one payload (at most [`MAX_READS`] reads and [`MAX_BUFFERED_BYTES`] of buffers at
//! once) and sent as ResyncData; a piece of a thin volume that holds no data is sent as a
//! Trim (the replica may hold old data there: after a resolve, or a full sync of a copy that
//! had data). A region counts as done when all its pieces are acknowledged. If the link
//! fails, every region cleared and not fully acknowledged is marked again.
//!
//! The resync ends when the bitmap is empty, nothing is in flight and the replica said it
//! asked for every region it lacks (its own ResyncDone, after its ResyncRequests): the link
//! sends ResyncDone and is up to date.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use ringblock_engine::replication::{BarrierTicket, PeerState, RegionIndex};
use ringblock_engine::task::TaskCtx;
use ringblock_engine::{AlignedBuf, IoBuf, Port, Request, RequestKind};

use super::super::body::{encode_data_header, Body, Frame};
use super::super::frame::FrameKind;
use super::super::{RegionIndex as WireRegion, MAX_PAYLOAD_BYTES};
use super::{use_zero_copy, Pending, PrimaryLink};

/// Most regions cleared and not yet acknowledged at once.
pub const MAX_BATCH_REGIONS: usize = 64;
/// A batch stops taking regions once it holds this many bytes.
pub const MAX_BATCH_BYTES: u64 = 4 << 20;
/// Most engine reads in flight.
pub const MAX_READS: usize = 16;
/// Most bytes of read buffers held (reading, waiting for the window, or sent and not yet
/// acknowledged and released).
pub const MAX_BUFFERED_BYTES: u64 = 8 << 20;

/// One piece of a region: at most one payload.
struct Piece {
    region: u64,
    offset_bytes: u64,
    len_bytes: u64,
    /// Sent as a Trim: the primary holds no data there.
    unallocated: bool,
    /// The bytes read (None until the read completes, and for a Trim).
    data: Option<IoBuf>,
}

/// Where the resync stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ResyncPhase {
    /// Copying regions.
    Running,
    /// ResyncDone is sent: the link is up to date.
    Done,
}

pub(super) struct Resync {
    pub(super) phase: ResyncPhase,
    /// Where the next scan of the bitmap starts.
    cursor: u64,
    /// Regions cleared and waiting for the write barrier.
    batch: Option<(Vec<u64>, BarrierTicket)>,
    /// Regions cleared and not fully acknowledged: their pieces not yet done.
    regions: BTreeMap<u64, u32>,
    pieces: HashMap<u64, Piece>,
    next_piece: u64,
    /// Pieces to read, in order.
    to_read: VecDeque<u64>,
    reads: usize,
    /// Pieces read (or Trims) waiting for room in the window.
    ready: VecDeque<u64>,
    buffered_bytes: u64,
    /// The replica sent its ResyncDone: it asked for every region it lacks.
    peer_asked_all: bool,
    port: Option<Arc<Port>>,
}

impl Resync {
    pub(super) fn new() -> Resync {
        Resync {
            phase: ResyncPhase::Running,
            cursor: 0,
            batch: None,
            regions: BTreeMap::new(),
            pieces: HashMap::new(),
            next_piece: 0,
            to_read: VecDeque::new(),
            reads: 0,
            ready: VecDeque::new(),
            buffered_bytes: 0,
            peer_asked_all: false,
            port: None,
        }
    }

    /// Regions whose bits are cleared but whose data the replica has not acknowledged.
    pub(super) fn unacknowledged(&self) -> impl Iterator<Item = u64> + '_ {
        let batch = self.batch.iter().flat_map(|(regions, _)| regions.iter());
        self.regions.keys().chain(batch).copied()
    }

    /// Forget the pieces (after a failure, once no send reads their buffers).
    pub(super) fn clear(&mut self) {
        self.pieces.clear();
        self.ready.clear();
        self.to_read.clear();
        self.batch = None;
        self.regions.clear();
        self.buffered_bytes = 0;
    }

    /// Whether the task should be polled again without waiting for an event.
    pub(super) fn wants_poll(&self) -> bool {
        self.phase == ResyncPhase::Running
            && (self.batch.is_some()
                || self.port.as_ref().is_some_and(|p| !p.is_empty())
                || (!self.to_read.is_empty() && self.reads < MAX_READS))
    }
}

impl PrimaryLink {
    /// Enter the fan-out as resyncing and start the progress at the bitmap's dirty bytes.
    pub(super) fn start_resync(&mut self, ctx: &mut TaskCtx<'_>) {
        self.resync.port = Some(Port::new(MAX_READS + 1, ctx.port_waker()));
        self.link.resync_regions_clear();
        self.link.start_resync();
        let replica = self.replica();
        let size = self.handle.volume().size_bytes();
        replica.status.resync.start(
            replica.dirty.dirty_bytes(size),
            ringblock_engine::replication::status::unix_ms(),
        );
        replica.status.set(PeerState::Resyncing, None);
    }

    fn replica(&self) -> &ringblock_engine::replication::ReplicaState {
        &self.link.replication().replicas()[self.link.index()]
    }

    /// One step of the resync: take a batch, pass its barrier, read, frame, finish.
    pub(super) fn step_resync(&mut self, ctx: &mut TaskCtx<'_>, now: u64) -> Result<usize, String> {
        if self.resync.phase != ResyncPhase::Running {
            return Ok(0);
        }
        let mut work = self.take_batch();
        work += self.pass_barrier();
        work += self.submit_reads(ctx)?;
        work += self.collect_reads()?;
        work += self.frame_pieces(now);
        if self.resync_finished() {
            self.finish_resync();
            work += 1;
        }
        Ok(work)
    }

    /// Clear a batch of dirty regions and take a barrier ticket for it.
    fn take_batch(&mut self) -> usize {
        let r = &self.resync;
        if r.batch.is_some() || !r.to_read.is_empty() || r.regions.len() >= MAX_BATCH_REGIONS {
            return 0;
        }
        let replication = self.link.replication().clone();
        let dirty = &replication.replicas()[self.link.index()].dirty;
        let region_bytes = dirty.region_bytes();
        let mut regions = Vec::new();
        let mut bytes = 0;
        let mut wrapped = false;
        while regions.len() + self.resync.regions.len() < MAX_BATCH_REGIONS
            && bytes < MAX_BATCH_BYTES
        {
            let next = dirty.next_dirty(RegionIndex(self.resync.cursor));
            let Some(region) = next else {
                if wrapped || self.resync.cursor == 0 {
                    break;
                }
                (self.resync.cursor, wrapped) = (0, true);
                continue;
            };
            self.resync.cursor = region.0 + 1;
            // In the resync's hands before the bit goes: a write from now on marks it again.
            self.link.resync_region_begins(region);
            if dirty.clear(region) {
                regions.push(region.0);
                bytes += region_bytes;
            } else {
                self.release_region(region.0);
            }
        }
        if regions.is_empty() {
            return 0;
        }
        // Cleared bits are on disk only at the next metadata round; until the data is
        // acknowledged they are marked again if the link fails.
        let ticket = replication.barrier.ticket();
        self.resync.batch = Some((regions, ticket));
        1
    }

    /// Once the batch's ticket passed, cut its regions into pieces to read or trim.
    fn pass_barrier(&mut self) -> usize {
        let replication = self.link.replication().clone();
        let passed = match &self.resync.batch {
            Some((_, ticket)) => replication.barrier.passed(ticket),
            None => return 0,
        };
        if !passed {
            return 0;
        }
        let Some((regions, _)) = self.resync.batch.take() else {
            return 0;
        };
        let volume = self.handle.volume().clone();
        let size = volume.size_bytes();
        let shift = self.region_shift();
        for region in regions {
            let start = region << shift;
            let end = ((region + 1) << shift).min(size);
            let mut pieces = 0;
            let mut pos = start;
            while pos < end {
                let len = (end - pos).min(u64::from(MAX_PAYLOAD_BYTES));
                // After the barrier: a write that allocated this range and marked the region
                // before its bit was cleared has completed.
                let runs = volume.allocation_runs(pos, len, 2);
                let unallocated = runs.len() == 1 && !runs[0].1;
                let id = self.resync.next_piece;
                self.resync.next_piece += 1;
                self.resync.pieces.insert(
                    id,
                    Piece {
                        region,
                        offset_bytes: pos,
                        len_bytes: len,
                        unallocated,
                        data: None,
                    },
                );
                if unallocated {
                    self.resync.ready.push_back(id);
                } else {
                    self.resync.to_read.push_back(id);
                }
                pieces += 1;
                pos += len;
            }
            // A region past the volume's end has nothing to send. A region written again
            // while its first copy is in flight is in flight twice: counts add up.
            if pieces > 0 {
                *self.resync.regions.entry(region).or_insert(0) += pieces;
            } else {
                self.release_region(region);
            }
        }
        1
    }

    fn submit_reads(&mut self, ctx: &mut TaskCtx<'_>) -> Result<usize, String> {
        let mut work = 0;
        while self.resync.reads < MAX_READS {
            let Some(&id) = self.resync.to_read.front() else {
                break;
            };
            let Some(piece) = self.resync.pieces.get(&id) else {
                self.resync.to_read.pop_front();
                continue;
            };
            let len = piece.len_bytes;
            if self.resync.buffered_bytes > 0
                && self.resync.buffered_bytes + len > MAX_BUFFERED_BYTES
            {
                break;
            }
            let buf = ctx
                .take_buffer(len as usize)
                .unwrap_or_else(|| IoBuf::owned(AlignedBuf::zeroed(len as usize)));
            let req = Request {
                kind: RequestKind::Read,
                offset_bytes: piece.offset_bytes,
                len_bytes: len,
                fua: false,
                buf: Some(buf),
                mover: None,
                tag: id,
            };
            let port = self.resync.port.clone().ok_or("resync port not made")?;
            ctx.submit(&self.handle, req, &port)
                .map_err(|(_, e)| format!("cannot read for the resync: {e}"))?;
            self.resync.to_read.pop_front();
            self.resync.reads += 1;
            self.resync.buffered_bytes += len;
            work += 1;
        }
        Ok(work)
    }

    fn collect_reads(&mut self) -> Result<usize, String> {
        let Some(port) = self.resync.port.clone() else {
            return Ok(0);
        };
        let mut work = 0;
        while let Some(c) = port.pop() {
            self.resync.reads -= 1;
            work += 1;
            let piece = self
                .resync
                .pieces
                .get_mut(&c.tag)
                .ok_or("a resync read for no piece")?;
            if let Err(e) = c.result {
                return Err(format!(
                    "cannot read {} bytes at {} for the resync: {e}",
                    piece.len_bytes, piece.offset_bytes
                ));
            }
            piece.data = c.buf;
            self.resync.ready.push_back(c.tag);
        }
        Ok(work)
    }

    /// Frame the pieces ready, while the window has room.
    fn frame_pieces(&mut self, now: u64) -> usize {
        let mut work = 0;
        while self.window_has_room() && self.broken.is_none() {
            let Some(id) = self.resync.ready.pop_front() else {
                break;
            };
            let Some(piece) = self.resync.pieces.get(&id) else {
                continue;
            };
            let shift = self.region_shift();
            let (offset, len) = (piece.offset_bytes, piece.len_bytes);
            let kind = if piece.unallocated {
                FrameKind::Trim
            } else {
                FrameKind::ResyncData
            };
            let payload_len = if piece.unallocated { 0 } else { len as u32 };
            let seq = match self.window.try_reserve(kind, payload_len) {
                Ok(seq) => seq,
                Err(e) => {
                    self.broken = Some(format!("cannot send: {e}"));
                    break;
                }
            };
            if piece.unallocated {
                let body = Body::Trim {
                    offset_bytes: offset,
                    len_bytes: len as u32,
                };
                self.enqueue_small(seq, body);
            } else {
                let data = piece.data.as_ref().map_or(&[][..], |b| b.as_slice());
                debug_assert_eq!(data.len() as u64, len);
                let body = Body::ResyncData {
                    region: WireRegion(piece.region),
                    // A region is at most 1 GiB on the wire (the handshake checked it).
                    offset_in_region_bytes: (offset - (piece.region << shift)) as u32,
                    data,
                };
                let header = encode_data_header(&Frame::new(seq, self.opts.volume, body));
                let zc = use_zero_copy(self.opts.zero_copy, data.len());
                // The buffer stays in `pieces` until the frame is acknowledged and released.
                self.sender
                    .enqueue(seq.0, header.to_vec(), data.as_ptr(), data.len(), zc);
            }
            self.pending.insert(
                seq.0,
                Pending {
                    op: None,
                    piece: Some(id),
                    sent_ms: now,
                    acked: false,
                    released: false,
                },
            );
            work += 1;
        }
        work
    }

    /// A piece's frame is acknowledged and released: count it, and its region once whole.
    pub(super) fn piece_done(&mut self, id: u64) {
        let Some(piece) = self.resync.pieces.remove(&id) else {
            return;
        };
        if !piece.unallocated {
            self.resync.buffered_bytes -= piece.len_bytes;
        }
        let replica = &self.link.replication().replicas()[self.link.index()];
        replica.status.resync.add_done(piece.len_bytes);
        // The replica may still lose it from its cache until it acknowledges a flush.
        self.unflushed.insert(piece.region);
        if let Some(left) = self.resync.regions.get_mut(&piece.region) {
            *left -= 1;
            if *left == 0 {
                self.resync.regions.remove(&piece.region);
                self.release_region(piece.region);
            }
        }
    }

    /// `region` leaves the resync's hands unless another copy of it is in flight or cleared
    /// and waiting for the barrier (a write to it must still mark it).
    fn release_region(&self, region: u64) {
        let r = &self.resync;
        let batched = r.batch.as_ref().is_some_and(|(b, _)| b.contains(&region));
        if !batched && !r.regions.contains_key(&region) {
            self.link.resync_region_ends(RegionIndex(region));
        }
    }

    fn resync_finished(&self) -> bool {
        let r = &self.resync;
        r.peer_asked_all
            && r.batch.is_none()
            && r.regions.is_empty()
            && r.pieces.is_empty()
            && r.reads == 0
            && self.replica().dirty.next_dirty(RegionIndex(0)).is_none()
    }

    /// Every region is sent and acknowledged: ResyncDone, and the link is up to date. A write
    /// that still marks a region now (it saw the link resyncing) was pushed after its mark,
    /// so its op follows every resync frame on the wire; its bit only costs a region more in
    /// a later resync.
    fn finish_resync(&mut self) {
        if !self.link.finish_resync() {
            // A full inbox put the link behind: the next poll fails it.
            return;
        }
        let replication = self.link.replication().clone();
        let regions = replication
            .activity
            .regions_of(0, self.handle.volume().size_bytes());
        let count = (regions.end - regions.start).clamp(1, u64::from(u32::MAX)) as u32;
        let seq = match self.window.try_reserve(FrameKind::ResyncDone, 0) {
            Ok(seq) => seq,
            Err(e) => {
                self.broken = Some(format!("cannot send: {e}"));
                return;
            }
        };
        self.enqueue_small(
            seq,
            Body::ResyncDone {
                first: WireRegion(0),
                count,
            },
        );
        self.resync.phase = ResyncPhase::Done;
        self.flush_after_resync = true;
        let replica = &replication.replicas()[self.link.index()];
        replica.set_since(None);
        replica.set_full_sync(false);
        replica
            .status
            .resync
            .finish(ringblock_engine::replication::status::unix_ms());
        replica.status.set(PeerState::UpToDate, None);
        self.handle.volume().replication_changed();
        tracing::info!(
            volume = %self.handle.volume().name,
            peer = %self.opts.peer,
            "replica up to date"
        );
    }

    /// The replica asks for `first..first + count` (its own dirty regions for this primary).
    pub(super) fn on_resync_request(&mut self, first: u64, count: u32) -> Result<(), String> {
        if self.resync.phase != ResyncPhase::Running || self.resync.peer_asked_all {
            return Err("a resync request after the replica's ResyncDone".into());
        }
        let replica = self.replica();
        let end = first + u64::from(count);
        if end > replica.dirty.regions() {
            return Err(format!(
                "resync request for regions up to {end}, past the end"
            ));
        }
        if replica.dirty.mark_regions(first..end) {
            let bytes = u64::from(count) * replica.dirty.region_bytes();
            replica.status.resync.add_total(bytes);
            self.handle.volume().replication_changed();
        }
        self.resync.cursor = self.resync.cursor.min(first);
        Ok(())
    }

    pub(super) fn on_peer_resync_done(&mut self) -> Result<(), String> {
        if self.resync.peer_asked_all {
            return Err("a second ResyncDone from the replica".into());
        }
        self.resync.peer_asked_all = true;
        Ok(())
    }
}
