//! The submission side: validate a request, split it at chunk boundaries and send each part to
//! the reactor that owns its chunk.

use std::sync::Arc;

use crate::ids::{ChunkIndex, ReactorId};
use crate::reactor::{FlushWaiter, Msg};
use crate::replication::fanout;
use crate::request::{Errno, InFlight, Part, Port, Request, RequestKind};
use crate::volume::{chunk_owner, Volume};

/// Largest single request, in bytes (bounds buffers and part counts).
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// Why a request was refused before any IO.
pub fn validate(volume: &Volume, req: &Request) -> Result<(), Errno> {
    if volume_deleted(volume) {
        return Err(Errno::ESHUTDOWN);
    }
    let has_data = matches!(req.kind, RequestKind::Read | RequestKind::Write);
    if req.mover.is_some() && (!has_data || req.buf.is_some()) {
        // A mover is the data of a Read/Write, instead of a buffer.
        return Err(Errno::EINVAL);
    }
    let data_len = match (&req.buf, &req.mover) {
        (Some(b), None) => Some(b.len() as u64),
        (None, Some(_)) => Some(req.len_bytes),
        _ => None,
    };
    validate_range(volume, req.kind, req.offset_bytes, req.len_bytes, data_len)
}

fn volume_deleted(volume: &Volume) -> bool {
    volume.deleted.load(std::sync::atomic::Ordering::Acquire)
}

/// The checks of [`validate`] on a request's parts: `data_len` is the length of the buffer
/// (or mover) of a Read/Write, which must equal `len_bytes`.
pub(crate) fn validate_range(
    volume: &Volume,
    kind: RequestKind,
    offset_bytes: u64,
    len_bytes: u64,
    data_len: Option<u64>,
) -> Result<(), Errno> {
    if volume_deleted(volume) {
        return Err(Errno::ESHUTDOWN);
    }
    if kind == RequestKind::Flush {
        return Ok(());
    }
    if len_bytes > MAX_REQUEST_BYTES {
        return Err(Errno::EINVAL);
    }
    let end = offset_bytes.checked_add(len_bytes).ok_or(Errno::EINVAL)?;
    if end > volume.size_bytes() {
        return Err(if kind == RequestKind::Read {
            Errno::EINVAL
        } else {
            Errno::ENOSPC
        });
    }
    if matches!(kind, RequestKind::Read | RequestKind::Write) {
        let block = u64::from(volume.device.profile.logical_block_size_bytes);
        if data_len != Some(len_bytes) {
            return Err(Errno::EINVAL);
        }
        if !offset_bytes.is_multiple_of(block) || !len_bytes.is_multiple_of(block) {
            return Err(Errno::EINVAL);
        }
    }
    Ok(())
}

/// Count a request the engine accepted in its volume's statistics.
pub(crate) fn count_accepted(volume: &Volume, kind: RequestKind, len_bytes: u64) {
    let stats = &volume.stats;
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    match kind {
        RequestKind::Read => {
            stats.reads.fetch_add(1, relaxed);
            stats.read_bytes.fetch_add(len_bytes, relaxed);
        }
        RequestKind::Write => {
            stats.writes.fetch_add(1, relaxed);
            stats.write_bytes.fetch_add(len_bytes, relaxed);
        }
        RequestKind::Flush => {
            stats.flushes.fetch_add(1, relaxed);
        }
        RequestKind::Trim | RequestKind::WriteZeroes => {
            stats.trims.fetch_add(1, relaxed);
        }
    }
}

/// Split `req` and hand its messages to `send`. On refusal the request (with its buffer) comes
/// back with the errno.
pub(crate) fn submit(
    volume: &Arc<Volume>,
    mut req: Request,
    port: &Arc<Port>,
    reactors: u32,
    send: &mut dyn FnMut(ReactorId, Msg),
) -> Result<(), (Request, Errno)> {
    if let Err(e) = validate(volume, &req) {
        return Err((req, e));
    }
    // One atomic load: a volume without replicas takes no other step of the fan-out.
    let replicas = match volume.replica_set() {
        Some(set) if req.kind != RequestKind::Read && !set.links().is_empty() => Some(set),
        _ => None,
    };
    if replicas.is_some() && req.mover.is_some() {
        // The link sends a write's pages from the request's buffer; a mover has none.
        tracing::warn!(volume = %volume.name, "a replicated volume takes no mover writes");
        return Err((req, Errno::ENOTSUP));
    }
    count_accepted(volume, req.kind, req.len_bytes);
    let kind = req.kind;
    let (offset, len) = (req.offset_bytes, req.len_bytes);
    let inflight = InFlight::new(volume.clone(), &mut req, port.clone());
    if let Some(set) = replicas.filter(|_| writes_data(kind)) {
        let replication = set.links()[0].replication();
        // Counted by the write barrier before the fan-out marks any bit, until it completes:
        // a resync that cleared a bit this write marked waits for it before reading the
        // region. Before the activity log is tested: an eviction cycle retires a region's
        // persisted bit, then waits for every write that entered before (see
        // `replication::evict`).
        let entry = replication.barrier.enter();
        let fresh = inflight.barrier.set((replication.clone(), entry)).is_ok();
        debug_assert!(fresh, "a request enters the barrier once");
        replication.note_write(offset, len);
        if len > 0 && !replication.activity_persisted(offset, len) {
            // The write-ahead rule: the regions enter the activity log in memory, then
            // the write waits for a round that starts afterwards (it persists them). The
            // metadata is marked dirty even when another write set the bits, so that
            // round writes metadata rather than only syncing data.
            replication.begin_activity(offset, len);
            volume.replication_changed();
            let device = &volume.device;
            let parked = ParkedWrite {
                inflight,
                offset_bytes: offset,
                len_bytes: len,
                reactors,
            };
            send(
                device.home_reactor(reactors),
                Msg::Flush {
                    device: device.id,
                    waiter: FlushWaiter::Activity(parked),
                },
            );
            return Ok(());
        }
    }
    dispatch(volume, inflight, replicas, offset, len, reactors, send);
    Ok(())
}

fn writes_data(kind: RequestKind) -> bool {
    matches!(
        kind,
        RequestKind::Write | RequestKind::Trim | RequestKind::WriteZeroes
    )
}

/// A write of a replicated volume that waits on the device's home reactor for the metadata
/// round that puts its regions in the persisted activity log. It holds no window yet: its
/// parts are made when it is released.
pub(crate) struct ParkedWrite {
    inflight: Arc<InFlight>,
    offset_bytes: u64,
    len_bytes: u64,
    reactors: u32,
}

/// The round a [`ParkedWrite`] waited for ended with `result`: on success its regions are in
/// the persisted activity log and it goes on like any write; a failed round fails it, before
/// any byte reached a device or a replica.
pub(crate) fn release_parked(
    parked: ParkedWrite,
    result: Result<(), Errno>,
    send: &mut dyn FnMut(ReactorId, Msg),
) {
    let ParkedWrite {
        inflight,
        offset_bytes,
        len_bytes,
        reactors,
    } = parked;
    let volume = inflight.volume.clone();
    if let Err(e) = result {
        inflight.fail(e);
        inflight.complete();
        return;
    }
    // A set swapped in meanwhile shares the volume's replication state.
    let replicas = volume.replica_set().filter(|s| !s.links().is_empty());
    if let Some(set) = replicas {
        set.links()[0]
            .replication()
            .activity_durable(offset_bytes, len_bytes);
    }
    dispatch(
        &volume,
        inflight,
        replicas,
        offset_bytes,
        len_bytes,
        reactors,
        send,
    );
}

/// Fan `inflight` out to the replicas and send its parts to the reactors owning its chunks.
fn dispatch(
    volume: &Arc<Volume>,
    inflight: Arc<InFlight>,
    replicas: Option<&crate::replication::ReplicaSet>,
    offset: u64,
    len: u64,
    reactors: u32,
    send: &mut dyn FnMut(ReactorId, Msg),
) {
    let kind = inflight.kind;
    // The invariant of the write-ahead rule: no write of a replicated volume reaches the
    // local device (or a replica) for a region not in the activity log, which a round
    // persisted when the write tested it (an eviction cycle may retire the persisted bit
    // since, but clears the region from the log only after this write completed).
    debug_assert!(
        replicas.is_none_or(|set| !writes_data(kind)
            || set.links()[0]
                .replication()
                .activity
                .regions_of(offset, len)
                .all(|r| set.links()[0]
                    .replication()
                    .activity
                    .is_dirty(crate::replication::RegionIndex(r)))),
        "a replicated write is sent before its activity log entry is persisted"
    );
    debug_assert!(
        replicas.is_none_or(|_| !writes_data(kind) || inflight.barrier.get().is_some()),
        "a replicated write is counted by the write barrier"
    );
    // Each sync link of the set is one more part; `fan_out` ends those of links that take no
    // op. An async link's op is its own: nobody waits for it.
    let links = replicas.map_or(0, |set| set.sync_links());
    let fan_out = |inflight: &Arc<InFlight>| {
        if let Some(set) = replicas {
            fanout::fan_out(set, volume, inflight, offset, len);
        }
    };
    if kind == RequestKind::Flush {
        inflight
            .remaining
            .store(1 + links, std::sync::atomic::Ordering::Release);
        fan_out(&inflight);
        let device = &volume.device;
        send(
            device.home_reactor(reactors),
            Msg::Flush {
                device: device.id,
                waiter: FlushWaiter::Request(inflight),
            },
        );
        return;
    }
    if len == 0 {
        inflight.complete();
        return;
    }
    let cs = volume.chunk_size_bytes();
    let first = offset / cs;
    let last = (offset + len - 1) / cs;
    let parts = (last - first + 1) as u32;
    inflight
        .remaining
        .store(parts + links, std::sync::atomic::Ordering::Release);
    let has_buf =
        matches!(kind, RequestKind::Read | RequestKind::Write) && inflight.mover.is_none();
    // The part of chunk `c`, holding `req`. Every window is taken before any part is sent,
    // and before the fan-out hands the buffer to links (which only read it).
    let make_part = |c: u64, req: Arc<InFlight>| {
        let start = (c * cs).max(offset);
        let end = ((c + 1) * cs).min(offset + len);
        let buf = has_buf.then(|| {
            // SAFETY: [start, end) ranges of distinct chunks are disjoint, and every window is
            // taken (here, by the callers below) before any part is sent.
            unsafe { req.window((start - offset) as usize, (end - start) as usize) }
        });
        let part = Part {
            req,
            chunk: ChunkIndex(c),
            offset_in_chunk: start - c * cs,
            len_bytes: end - start,
            offset_in_request: start - offset,
            buf,
        };
        (chunk_owner(volume.id, ChunkIndex(c), reactors), part)
    };
    if parts == 1 {
        // The common case (a request inside one chunk): no list of parts, and the part takes
        // over the submitter's reference to the request.
        let (to, part) = make_part(first, inflight);
        fan_out(&part.req);
        send(to, Msg::Part(part));
        return;
    }
    let ready: Vec<_> = (first..=last)
        .map(|c| make_part(c, inflight.clone()))
        .collect();
    // The windows taken above (the SAFETY of `make_part`): in order, disjoint, and together
    // exactly the request.
    debug_assert!(
        ready.first().is_some_and(|(_, p)| p.offset_in_request == 0)
            && ready.windows(2).all(|w| {
                w[0].1.offset_in_request + w[0].1.len_bytes == w[1].1.offset_in_request
            })
            && ready.iter().map(|(_, p)| p.len_bytes).sum::<u64>() == len,
        "part windows overlap or leave gaps"
    );
    fan_out(&inflight);
    drop(inflight);
    for (to, part) in ready {
        send(to, Msg::Part(part));
    }
}
