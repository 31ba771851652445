//! The write path's fan-out to replicas.
//!
//! A volume may carry a [`ReplicaSet`]: one [`ReplicaLink`] per replica, each served by a task
//! on one reactor (the peer link task in transports). `front::submit` reads the set with one
//! atomic load; a volume without replicas pays nothing more. For each Write, Trim,
//! WriteZeroes and Flush:
//! - an up-to-date **sync** link (DRBD protocol C) gets a [`ReplicaOp`] in its bounded inbox
//!   and the request one more part to wait for; the link task sends it and calls
//!   [`crate::task::TaskCtx::replica_done`] when the replica acknowledged it (a Flush or FUA
//!   write: when it is durable there);
//! - an up-to-date **async** link (DRBD protocol A) gets an op holding a copy of the write's
//!   data, and the request does not wait for it; the copies' bytes are bounded per link
//!   ([`LinkMode::Async`]), and an op that does not fit makes the link fall behind: its range
//!   goes to the dirty bitmap and a resync catches the replica up, instead of queueing more;
//! - a link that is not up to date gets the range marked in its dirty bitmap instead (one
//!   `fetch_or` per 64 regions), so a resync later sends only those regions;
//! - a full inbox never blocks the submitter: that write marks the bitmap and the link falls
//!   behind (its task ends the connection).
//!
//! **Handing over without a lock.** A pusher announces itself (`pushers += 1`), then reads
//! the state, pushes, and leaves (`pushers -= 1`). A link task that fails stores `Behind`
//! first and drains the inbox only once it has seen `pushers == 0` afterwards. Both sides use
//! `SeqCst`, so either the pusher sees `Behind` (and marks the bitmap) or the task sees the
//! pusher and waits for it: no op is left in an inbox nobody drains.
//!
//! **Memory.** A set, once attached, stays allocated until the volume goes (a data path may
//! still read it after a swap). Sets change when the configured replicas change, not when a
//! link reconnects (the link, and its state, outlive connections), so the count of retired
//! sets is bounded by [`MAX_REPLICA_SET_CHANGES`].

use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_queue::ArrayQueue;

use super::bitmap::{DirtyBitmap, RegionIndex};
use super::state::VolumeReplication;
use super::ReplicationError;
use crate::ids::ReactorId;
use crate::request::{InFlight, PortWaker, RequestKind};
use crate::volume::Volume;

/// Ops one link's inbox holds. A link task takes them as its window allows; a full inbox
/// makes the link fall behind rather than stall the volume.
pub const LINK_INBOX_OPS: usize = 1024;
/// Replica sets one volume may be given in its life (each stays allocated, see the module).
pub const MAX_REPLICA_SET_CHANGES: usize = 256;

/// Where a link stands in the fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// Not in the fan-out: writes mark the link's dirty bitmap.
    Behind = 0,
    /// In the fan-out: writes and flushes wait for this replica.
    UpToDate = 1,
    /// In the fan-out while its task resyncs the dirty regions: writes and flushes wait for
    /// this replica, and a write to a region whose resync is in flight also marks it (before
    /// it is pushed), so a region written during its own resync is resynced again.
    Resyncing = 2,
}

/// When a replica's copy of a write counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    /// DRBD protocol C: a write completes once this replica has it too, a Flush or FUA write
    /// once it is durable there.
    Sync,
    /// DRBD protocol A: a write completes after the local copy; a copy of its data waits for
    /// the link, at most `queue_limit_bytes` of them (and [`LINK_INBOX_OPS`] ops). A Flush is
    /// forwarded (so the replica's copy becomes durable in time) but nobody waits for it. A
    /// primary lost with a full queue loses those writes on this replica, which is what
    /// asynchronous means: the replica stays consistent, as of an older point.
    Async { queue_limit_bytes: u64 },
}

/// What a replica op does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaOpKind {
    Write { fua: bool },
    Trim,
    WriteZeroes,
    Flush,
}

/// One request's share for one replica: what to send, and the request to answer when the
/// replica acknowledged it. Hand it back through
/// [`crate::task::TaskCtx::replica_done`] exactly once; dropping it leaves its request
/// waiting forever (only a crash may).
pub struct ReplicaOp {
    pub(crate) origin: OpOrigin,
    kind: ReplicaOpKind,
    offset_bytes: u64,
    len_bytes: u64,
}

/// Who waits for a replica op.
pub(crate) enum OpOrigin {
    /// A sync link's part of a client request: the request completes after it.
    Request(Arc<InFlight>),
    /// An async link's own copy: nobody waits; its bytes are charged to the replica's
    /// [`super::lag::ReplicaLag`] until it is dropped.
    Copy(AsyncCopy),
}

/// An async op's data and its charge on the queue's bound.
pub(crate) struct AsyncCopy {
    data: Box<[u8]>,
    queued_ns: u64,
    replication: Arc<VolumeReplication>,
    index: usize,
    charged_bytes: u64,
}

impl Drop for AsyncCopy {
    fn drop(&mut self) {
        self.replication.replicas()[self.index]
            .status
            .lag
            .release(self.charged_bytes);
    }
}

impl std::fmt::Debug for ReplicaOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaOp")
            .field("kind", &self.kind)
            .field("offset_bytes", &self.offset_bytes)
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

impl ReplicaOp {
    pub fn kind(&self) -> ReplicaOpKind {
        self.kind
    }

    pub fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Fail the request with `e` (for a Flush whose replica part cannot be made good). An
    /// async op has no request: nothing waits for it to fail.
    pub fn fail(&self, e: crate::request::Errno) {
        if let OpOrigin::Request(req) = &self.origin {
            req.fail(e);
        }
    }

    /// Whether a client request waits for this op (a sync link's op).
    pub fn awaited(&self) -> bool {
        matches!(self.origin, OpOrigin::Request(_))
    }

    /// When an async op was queued ([`super::lag::monotonic_ns`]); None for a sync op.
    pub fn queued_ns(&self) -> Option<u64> {
        match &self.origin {
            OpOrigin::Request(_) => None,
            OpOrigin::Copy(c) => Some(c.queued_ns),
        }
    }

    /// A Write's data, read-only (None for other kinds): a sync op's from the request's own
    /// buffer, an async op's from its copy. It stays valid and unchanged for as long as the
    /// op is held: the request completes (and hands its buffer back) only after this op is
    /// done, and a copy lives as long as the op.
    pub fn payload(&self) -> Option<&[u8]> {
        match self.kind {
            ReplicaOpKind::Write { .. } => {
                let data = match &self.origin {
                    OpOrigin::Request(req) => req.replica_payload(),
                    OpOrigin::Copy(c) => &c.data,
                };
                debug_assert_eq!(data.len() as u64, self.len_bytes);
                Some(data)
            }
            _ => None,
        }
    }
}

/// A link's state as an eviction cycle compares it before and after its flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStanding {
    pub state: LinkState,
    pub transitions: u64,
    pub failure_settled: bool,
}

/// One replica's link, shared by the submit path (any reactor) and its task.
pub struct ReplicaLink {
    replication: Arc<VolumeReplication>,
    /// The replica's index in `replication.replicas()`.
    index: usize,
    reactor: ReactorId,
    mode: LinkMode,
    state: AtomicU8,
    /// Set when the link leaves the fan-out from up to date, until its task takes it (and
    /// starts a new generation: the set of up-to-date replicas changed).
    dropped_out: AtomicBool,
    /// Counts every change of `state`: an eviction cycle sees whether the link stayed put.
    transitions: AtomicU64,
    /// Flush ops pushed, and those the replica acknowledged (in push order: the link sends
    /// and the replica answers in order), for an eviction cycle's wait.
    flushes_pushed: AtomicU64,
    flushes_acked: AtomicU64,
    /// False from falling behind until its task marked everything the replica may lack.
    failure_settled: AtomicBool,
    pushers: AtomicU32,
    inbox: ArrayQueue<ReplicaOp>,
    waker: OnceLock<PortWaker>,
    /// Regions the link's resync cleared and the replica has not acknowledged yet: a write
    /// to one of them while resyncing marks it again (see [`LinkState::Resyncing`]).
    in_resync: DirtyBitmap,
    /// The online verify's handoff and the window of its batch in flight (`super::verify`).
    pub(super) verify: super::verify::LinkVerify,
}

impl std::fmt::Debug for ReplicaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaLink")
            .field("index", &self.index)
            .field("reactor", &self.reactor)
            .field("state", &self.state())
            .finish()
    }
}

impl ReplicaLink {
    /// The sync link to replica `index` of `replication`, served by a task on `reactor`. It
    /// starts behind; whoever brings the replica up to date says so
    /// ([`Self::set_up_to_date`]).
    pub fn new(
        replication: Arc<VolumeReplication>,
        index: usize,
        reactor: ReactorId,
    ) -> Option<Arc<ReplicaLink>> {
        ReplicaLink::with_mode(replication, index, reactor, LinkMode::Sync)
    }

    /// [`Self::new`] for a link in `mode`.
    pub fn with_mode(
        replication: Arc<VolumeReplication>,
        index: usize,
        reactor: ReactorId,
        mode: LinkMode,
    ) -> Option<Arc<ReplicaLink>> {
        let dirty = &replication.replicas().get(index)?.dirty;
        let in_resync = DirtyBitmap::new(
            dirty.regions() << dirty.region_shift(),
            dirty.region_shift(),
        )
        .ok()?;
        let region_shift = dirty.region_shift();
        Some(Arc::new(ReplicaLink {
            replication,
            index,
            reactor,
            mode,
            state: AtomicU8::new(LinkState::Behind as u8),
            dropped_out: AtomicBool::new(false),
            transitions: AtomicU64::new(0),
            flushes_pushed: AtomicU64::new(0),
            flushes_acked: AtomicU64::new(0),
            failure_settled: AtomicBool::new(true),
            pushers: AtomicU32::new(0),
            inbox: ArrayQueue::new(LINK_INBOX_OPS),
            waker: OnceLock::new(),
            in_resync,
            verify: super::verify::LinkVerify::new(region_shift),
        }))
    }

    /// The reactor whose task serves this link.
    pub fn reactor(&self) -> ReactorId {
        self.reactor
    }

    pub fn replication(&self) -> &Arc<VolumeReplication> {
        &self.replication
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn mode(&self) -> LinkMode {
        self.mode
    }

    pub fn state(&self) -> LinkState {
        match self.state.load(Ordering::SeqCst) {
            s if s == LinkState::UpToDate as u8 => LinkState::UpToDate,
            s if s == LinkState::Resyncing as u8 => LinkState::Resyncing,
            _ => LinkState::Behind,
        }
    }

    /// In the fan-out (up to date or resyncing): writes wait for this replica.
    pub fn in_fan_out(&self) -> bool {
        self.state() != LinkState::Behind
    }

    /// The replica has every write: from now on writes wait for it.
    pub fn set_up_to_date(&self) {
        debug_assert!(
            self.in_fan_out() || self.inbox.is_empty(),
            "a behind link's inbox is drained"
        );
        self.state
            .store(LinkState::UpToDate as u8, Ordering::SeqCst);
        self.transitions.fetch_add(1, Ordering::SeqCst);
    }

    /// Enter the fan-out to resync: writes go to the replica and mark its bitmap.
    pub fn start_resync(&self) {
        debug_assert!(
            self.in_fan_out() || self.inbox.is_empty(),
            "a behind link's inbox is drained"
        );
        self.state
            .store(LinkState::Resyncing as u8, Ordering::SeqCst);
        self.transitions.fetch_add(1, Ordering::SeqCst);
    }

    /// The resync is done: from resyncing to up to date. False when the link fell behind
    /// meanwhile (a full inbox): it stays behind, and its task fails the connection.
    pub fn finish_resync(&self) -> bool {
        let done = self
            .state
            .compare_exchange(
                LinkState::Resyncing as u8,
                LinkState::UpToDate as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        if done {
            self.transitions.fetch_add(1, Ordering::SeqCst);
        }
        done
    }

    /// Leave the fan-out. Returns whether it was up to date (not merely resyncing), which
    /// [`Self::take_dropped_out`] also reports later. The task drains the inbox only once
    /// [`Self::pushers_gone`] says so.
    pub fn fall_behind(&self) -> bool {
        let was = self.state.swap(LinkState::Behind as u8, Ordering::SeqCst);
        if was != LinkState::Behind as u8 {
            self.failure_settled.store(false, Ordering::SeqCst);
            self.transitions.fetch_add(1, Ordering::SeqCst);
        }
        let was_up_to_date = was == LinkState::UpToDate as u8;
        if was_up_to_date {
            self.dropped_out.store(true, Ordering::SeqCst);
        }
        was_up_to_date
    }

    /// The failing task marked everything the replica may lack (its held ops, its unflushed
    /// writes, the inbox's orphans): from now on the dirty bitmap alone says what it lacks.
    pub fn note_failure_settled(&self) {
        self.failure_settled.store(true, Ordering::SeqCst);
    }

    /// The replica acknowledged a Flush op taken from the inbox.
    pub fn note_flush_acked(&self) {
        self.flushes_acked.fetch_add(1, Ordering::SeqCst);
    }

    /// Where the link stands, for an eviction cycle (see [`super::evict`]).
    pub fn standing(&self) -> LinkStanding {
        LinkStanding {
            state: self.state(),
            transitions: self.transitions.load(Ordering::SeqCst),
            failure_settled: self.failure_settled.load(Ordering::SeqCst),
        }
    }

    /// Flush ops pushed so far, and those acknowledged.
    pub fn flushes(&self) -> (u64, u64) {
        (
            self.flushes_pushed.load(Ordering::SeqCst),
            self.flushes_acked.load(Ordering::SeqCst),
        )
    }

    /// Whether the link left the fan-out from up to date since the last call: the task's
    /// failure path starts the new generation then, whoever made the link fall behind (its
    /// own failure, or the fan-out finding its inbox or queue full).
    pub fn take_dropped_out(&self) -> bool {
        self.dropped_out.swap(false, Ordering::SeqCst)
    }

    /// No submitter is between reading the state and pushing (see the module).
    pub fn pushers_gone(&self) -> bool {
        self.pushers.load(Ordering::SeqCst) == 0
    }

    /// The task's wake-up, set once from its first turn ([`crate::task::TaskCtx::port_waker`]).
    pub fn set_waker(&self, waker: PortWaker) {
        let _ = self.waker.set(waker);
    }

    /// The next op, for the link task.
    pub fn pop(&self) -> Option<ReplicaOp> {
        self.inbox.pop()
    }

    pub fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    /// Mark `offset_bytes..+len_bytes` as lacking on this replica; the next metadata round
    /// persists it if a bit was new.
    pub fn mark_lacking(&self, volume: &Volume, offset_bytes: u64, len_bytes: u64) {
        let replica = &self.replication.replicas()[self.index];
        if replica.dirty.mark_bytes(offset_bytes, len_bytes) {
            volume.replication_changed();
        }
    }

    /// The resync is about to clear `region`'s dirty bit and send it: from now until
    /// [`Self::resync_region_ends`], a write to it marks it again.
    pub fn resync_region_begins(&self, region: RegionIndex) {
        self.in_resync.mark_regions(region.0..region.0 + 1);
        // Pairs with the fence in `try_push`: a write either sees this bit, or was counted by
        // the write barrier before the resync's ticket (so the read waits for it).
        fence(Ordering::SeqCst);
    }

    /// The replica acknowledged every copy of `region` the resync sent.
    pub fn resync_region_ends(&self, region: RegionIndex) {
        self.in_resync.clear(region);
    }

    /// The resync stops (the link failed or starts over): no region is in flight.
    pub fn resync_regions_clear(&self) {
        self.in_resync.clear_all();
    }

    /// Mark a range a write touches while the link resyncs, if a region of it is in the
    /// resync's hands: a copy read before this write completed may reach the replica after
    /// it, so the region goes again. Other regions need no mark: a dirty one is sent later
    /// (after this write completed, the barrier), a resynced one was acknowledged before
    /// this op is sent. The progress counts the regions newly dirty.
    fn mark_resyncing(&self, volume: &Volume, offset_bytes: u64, len_bytes: u64) {
        fence(Ordering::SeqCst);
        let in_resync = self.in_resync.regions_of(offset_bytes, len_bytes);
        if !in_resync
            .clone()
            .any(|r| self.in_resync.is_dirty(RegionIndex(r)))
        {
            return;
        }
        let replica = &self.replication.replicas()[self.index];
        if replica.dirty.mark_bytes(offset_bytes, len_bytes) {
            volume.replication_changed();
            let regions = replica.dirty.regions_of(offset_bytes, len_bytes);
            let bytes = (regions.end - regions.start) * replica.dirty.region_bytes();
            replica.status.resync.add_total(bytes);
        }
    }

    /// Push `op` if the link is in the fan-out and its inbox has room; else hand it back.
    /// While resyncing, a write to a region the resync holds marks it first, so the region
    /// goes again after this op (see [`Self::mark_resyncing`]).
    fn try_push(&self, op: ReplicaOp, volume: &Volume) -> Result<(), ReplicaOp> {
        self.pushers.fetch_add(1, Ordering::SeqCst);
        if op.kind != ReplicaOpKind::Flush {
            // Before the push: a verify batch over this range checks it again.
            self.note_verify_write(op.offset_bytes, op.len_bytes);
        }
        let flush = op.kind == ReplicaOpKind::Flush;
        let pushed = match self.state() {
            LinkState::Behind => Err(op),
            LinkState::UpToDate => self.inbox.push(op),
            LinkState::Resyncing => {
                if !flush {
                    self.mark_resyncing(volume, op.offset_bytes, op.len_bytes);
                }
                self.inbox.push(op)
            }
        };
        if flush && pushed.is_ok() {
            self.flushes_pushed.fetch_add(1, Ordering::SeqCst);
        }
        self.pushers.fetch_sub(1, Ordering::SeqCst);
        if pushed.is_ok() {
            match self.waker.get() {
                Some(PortWaker::Thread(t)) => t.unpark(),
                Some(PortWaker::Callback(f)) => f(),
                Some(PortWaker::None) | None => {}
            }
        }
        pushed
    }
}

/// The replicas a volume writes to.
#[derive(Debug, Default)]
pub struct ReplicaSet {
    links: Vec<Arc<ReplicaLink>>,
    /// Links in [`LinkMode::Sync`]: each is one more part of every request.
    sync_links: u32,
}

impl ReplicaSet {
    pub fn new(links: Vec<Arc<ReplicaLink>>) -> Result<ReplicaSet, ReplicationError> {
        if links.len() > super::MAX_REPLICAS {
            return Err(ReplicationError::TooManyReplicas(links.len()));
        }
        let sync_links = links.iter().filter(|l| l.mode == LinkMode::Sync).count() as u32;
        Ok(ReplicaSet { links, sync_links })
    }

    pub fn links(&self) -> &[Arc<ReplicaLink>] {
        &self.links
    }

    /// How many links a request waits for (if they take its op).
    pub fn sync_links(&self) -> u32 {
        self.sync_links
    }
}

/// Fan `req` (its kind, range and FUA flag) out to `set`: called by `front::submit` before
/// any local part is sent. `req.remaining` must already count one extra part per sync link
/// of the set ([`ReplicaSet::sync_links`]); the parts of links that take no op are done here.
pub(crate) fn fan_out(
    set: &ReplicaSet,
    volume: &Volume,
    req: &Arc<InFlight>,
    offset_bytes: u64,
    len_bytes: u64,
) {
    let kind = match req.kind {
        RequestKind::Write => ReplicaOpKind::Write { fua: req.fua },
        RequestKind::Trim => ReplicaOpKind::Trim,
        RequestKind::WriteZeroes => ReplicaOpKind::WriteZeroes,
        RequestKind::Flush => ReplicaOpKind::Flush,
        RequestKind::Read => unreachable!("reads are not replicated"),
    };
    for link in &set.links {
        match link.mode {
            LinkMode::Sync => fan_out_sync(link, volume, req, kind, offset_bytes, len_bytes),
            LinkMode::Async { queue_limit_bytes } => fan_out_async(
                link,
                volume,
                req,
                kind,
                (offset_bytes, len_bytes),
                queue_limit_bytes,
            ),
        }
    }
}

fn fan_out_sync(
    link: &ReplicaLink,
    volume: &Volume,
    req: &Arc<InFlight>,
    kind: ReplicaOpKind,
    offset_bytes: u64,
    len_bytes: u64,
) {
    let op = ReplicaOp {
        origin: OpOrigin::Request(req.clone()),
        kind,
        offset_bytes,
        len_bytes,
    };
    let Err(op) = link.try_push(op, volume) else {
        return;
    };
    if link.in_fan_out() {
        // The inbox is full: this replica cannot keep up. It falls behind (its task ends the
        // connection) instead of stalling the volume. Which of its acknowledged writes it has
        // not flushed yet only its task knows, and a flush may complete before the task marks
        // them: mark the whole volume first (a full resync after an overload, never a missed
        // region).
        link.mark_lacking(volume, 0, volume.max_size_bytes());
        link.fall_behind();
        tracing::warn!(
            volume = %volume.name,
            replica = link.index,
            "replica inbox full; the replica falls behind"
        );
    }
    if kind != ReplicaOpKind::Flush {
        link.mark_lacking(volume, offset_bytes, len_bytes);
    }
    drop(op);
    let last = req.part_done();
    debug_assert!(!last, "local parts are counted and not yet sent");
}

/// Queue a copy for an async link, or mark the range when the link is behind or its queue
/// is full (then it falls behind). Nobody waits: the request has no part for this link.
fn fan_out_async(
    link: &ReplicaLink,
    volume: &Volume,
    req: &Arc<InFlight>,
    kind: ReplicaOpKind,
    (offset_bytes, len_bytes): (u64, u64),
    queue_limit_bytes: u64,
) {
    let queued = link.in_fan_out()
        && match async_copy(link, req, kind, len_bytes, queue_limit_bytes) {
            Some(copy) => {
                let op = ReplicaOp {
                    origin: OpOrigin::Copy(copy),
                    kind,
                    offset_bytes,
                    len_bytes,
                };
                link.try_push(op, volume).is_ok()
            }
            None => false,
        };
    if queued {
        return;
    }
    if link.in_fan_out() {
        // The queue is full: the replica falls behind and is caught up from the bitmap. Only
        // this op's range needs a mark here: no client flush waits for an async replica, so
        // what it may lack besides (ops its task holds, writes it has not flushed) its task
        // marks when it fails, and a crash of this node finds it in the activity log.
        link.fall_behind();
        tracing::warn!(
            volume = %volume.name,
            replica = link.index,
            "asynchronous replica's queue full; the replica falls behind"
        );
    }
    if kind != ReplicaOpKind::Flush {
        link.mark_lacking(volume, offset_bytes, len_bytes);
    }
}

/// An async op's copy of `req`'s data, charged to the link's queue; None when the queue is
/// full.
fn async_copy(
    link: &ReplicaLink,
    req: &Arc<InFlight>,
    kind: ReplicaOpKind,
    len_bytes: u64,
    queue_limit_bytes: u64,
) -> Option<AsyncCopy> {
    let charged_bytes = match kind {
        ReplicaOpKind::Write { .. } => len_bytes,
        _ => 0,
    };
    let lag = &link.replication.replicas()[link.index].status.lag;
    if !lag.try_charge(charged_bytes, queue_limit_bytes) {
        return None;
    }
    let data: Box<[u8]> = match kind {
        ReplicaOpKind::Write { .. } => req.replica_payload().into(),
        _ => Box::default(),
    };
    Some(AsyncCopy {
        data,
        queued_ns: super::lag::monotonic_ns(),
        replication: link.replication.clone(),
        index: link.index,
        charged_bytes,
    })
}
