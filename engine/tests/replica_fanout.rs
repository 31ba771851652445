//! The engine's fan-out to replica links, without a peer: which requests take a link op,
//! which mark the replica's dirty bitmap instead, a full inbox, and mover writes.

use std::sync::{Arc, Mutex};

use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::profile;
use ringblock_engine::replication::{
    LinkMode, LinkState, NodeId, RegionIndex, ReplicaLink, ReplicaOpKind, ReplicaSet, Role,
    VolumeReplication,
};
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::{
    AlignedBuf, DataMover, DeviceId, DeviceSpec, Errno, FormatPolicy, IoBuf, Port, PortWaker,
    ReactorId, Request, RequestKind, VolumeId,
};

const CHUNK: u64 = 64 << 10;
const VOLUME_BYTES: u64 = 4 << 20;

fn cluster() -> SimCluster {
    let mut p = profile::builtin("flash").unwrap();
    p.logical_block_size_bytes = 512;
    let spec = DeviceSpec {
        id: DeviceId(0),
        name: "sim0".into(),
        kind: "sim".into(),
        size_bytes: 8 << 20,
        persistent: true,
        profile: p,
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
    };
    let disk = Arc::new(Mutex::new(SimDisk::new(8 << 20, true)));
    let opts = SimOptions {
        reactors: 2,
        queue_depth: 8,
        max_latency_ticks: 2,
    };
    let mut c = SimCluster::start(1, opts, vec![(spec, disk)]).unwrap();
    c.create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
        .unwrap();
    c
}

fn write(offset: u64, len: usize, tag: u64) -> Request {
    Request {
        kind: RequestKind::Write,
        offset_bytes: offset,
        len_bytes: len as u64,
        fua: false,
        buf: Some(IoBuf::owned(AlignedBuf::zeroed(len))),
        mover: None,
        tag,
    }
}

/// A volume of `c` with one sync link (behind), attached.
fn attach(c: &SimCluster) -> Arc<ReplicaLink> {
    attach_mode(c, LinkMode::Sync)
}

/// A volume of `c` with one link in `mode` (behind), attached.
fn attach_mode(c: &SimCluster, mode: LinkMode) -> Arc<ReplicaLink> {
    let volume = c.volume("a").unwrap();
    let replication = Arc::new(
        VolumeReplication::new(
            Role::Primary,
            volume.max_size_bytes(),
            16,
            &[NodeId::new(5).unwrap()],
        )
        .unwrap(),
    );
    volume.set_replication(Some(replication.clone()));
    let link = ReplicaLink::with_mode(replication, 0, ReactorId(0), mode).unwrap();
    let set = ReplicaSet::new(vec![link.clone()]).unwrap();
    volume.attach_replicas(Some(Arc::new(set))).unwrap();
    link
}

#[test]
fn a_behind_link_gets_marks_and_an_up_to_date_one_gets_ops() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let link = attach(&c);
    let port = Port::new(8, PortWaker::None);
    // Behind: the write completes at once and its regions are dirty.
    c.submit(&volume, write(3 << 16, 2 << 16, 1), &port)
        .unwrap();
    c.run_until_idle(10_000);
    let done = port.pop().expect("the write completed");
    assert_eq!(done.result, Ok(()));
    let dirty = &link.replication().replicas()[0].dirty;
    assert!(dirty.is_dirty(RegionIndex(3)) && dirty.is_dirty(RegionIndex(4)));
    assert!(!dirty.is_dirty(RegionIndex(2)) && !dirty.is_dirty(RegionIndex(5)));
    assert_eq!(link.inbox_len(), 0);
    // Up to date: the op waits in the inbox with the request's data, and the request
    // waits for it.
    link.set_up_to_date();
    let mut req = write(0, 4096, 2);
    req.buf.as_mut().unwrap().as_mut_slice().fill(0xA5);
    c.submit(&volume, req, &port).unwrap();
    c.run_until_idle(10_000);
    assert!(port.pop().is_none(), "the write waits for its replica");
    let op = link.pop().expect("an op for the link");
    assert_eq!(op.kind(), ReplicaOpKind::Write { fua: false });
    assert_eq!((op.offset_bytes(), op.len_bytes()), (0, 4096));
    assert!(op.payload().unwrap().iter().all(|&b| b == 0xA5));
    assert!(!dirty.is_dirty(RegionIndex(0)));
    // A flush takes an op too; a read does not.
    let flush = Request::flush(3);
    c.submit(&volume, flush, &port).unwrap();
    let flush_op = link.pop().expect("a flush op");
    assert_eq!(flush_op.kind(), ReplicaOpKind::Flush);
    let mut read = write(0, 4096, 4);
    read.kind = RequestKind::Read;
    c.submit(&volume, read, &port).unwrap();
    c.run_until_idle(10_000);
    assert_eq!(port.pop().map(|c| c.tag), Some(4), "a read does not wait");
    assert!(link.pop().is_none());
    // The ops are held by the test: their requests never complete (as after a crash).
    drop((op, flush_op));
}

#[test]
fn a_full_inbox_marks_the_whole_volume_and_the_link_falls_behind() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let link = attach(&c);
    let n = ringblock_engine::replication::fanout::LINK_INBOX_OPS;
    let port = Port::new(n + 1, PortWaker::None);
    // Both regions enter the persisted activity log first, so that no write below waits
    // for a metadata round.
    for (tag, offset) in [(0, 0), (1, 1 << 20)] {
        c.submit(&volume, write(offset, 512, tag), &port).unwrap();
    }
    c.run_until_idle(10_000);
    assert_eq!(std::iter::from_fn(|| port.pop()).count(), 2);
    link.replication().replicas()[0].dirty.clear_all();
    link.set_up_to_date();
    for i in 0..n {
        c.submit(&volume, write(0, 512, i as u64), &port).unwrap();
        c.step();
    }
    assert_eq!(link.inbox_len(), n);
    assert_eq!(link.state(), LinkState::UpToDate);
    c.submit(&volume, write(1 << 20, 512, n as u64), &port)
        .unwrap();
    assert_eq!(link.state(), LinkState::Behind);
    c.run_until_idle(10_000);
    // The write that found the inbox full did not wait.
    let done: Vec<u64> = std::iter::from_fn(|| port.pop()).map(|c| c.tag).collect();
    assert_eq!(done, vec![n as u64]);
    let dirty = &link.replication().replicas()[0].dirty;
    assert_eq!(dirty.dirty_regions(), volume.max_size_bytes() >> 16);
}

struct Zeros;

impl DataMover for Zeros {
    fn copy_out(&self, _: u64, _: &[u8]) -> Result<(), Errno> {
        Ok(())
    }
    fn copy_in(&self, _: u64, dst: &mut [u8]) -> Result<(), Errno> {
        dst.fill(0);
        Ok(())
    }
}

#[test]
fn a_replicated_volume_refuses_mover_writes() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let port = Port::new(2, PortWaker::None);
    let mover_write = |tag| Request {
        kind: RequestKind::Write,
        offset_bytes: 0,
        len_bytes: 4096,
        fua: false,
        buf: None,
        mover: Some(Arc::new(Zeros)),
        tag,
    };
    c.submit(&volume, mover_write(1), &port).unwrap();
    c.run_until_idle(10_000);
    assert_eq!(port.pop().map(|c| c.result), Some(Ok(())));
    attach(&c);
    let refused = c.submit(&volume, mover_write(2), &port).map_err(|(_, e)| e);
    assert_eq!(refused, Err(Errno::ENOTSUP));
}

/// Pops a link's ops and acknowledges them at once (a replica that keeps up).
struct AckAll(Arc<ReplicaLink>);

impl ringblock_engine::task::ReactorTask for AckAll {
    fn poll(&mut self, ctx: &mut ringblock_engine::task::TaskCtx<'_>) -> usize {
        let mut n = 0;
        while let Some(op) = self.0.pop() {
            ctx.replica_done(op);
            n += 1;
        }
        n
    }
    fn on_ring(
        &mut self,
        _: &mut ringblock_engine::task::TaskCtx<'_>,
        _: ringblock_engine::task::RingCompletion,
    ) {
    }
    fn stop(&mut self, _: &mut ringblock_engine::task::TaskCtx<'_>) {}
    fn has_ready(&self) -> bool {
        self.0.inbox_len() > 0
    }
    fn finished(&self) -> bool {
        false
    }
}

/// The race the write barrier closes, on the simulator: a write to a resyncing link takes an
/// op; a resync that takes its region while the write's local part is in flight holds a
/// ticket that passes only once the write completed; a write to a region the resync holds
/// marks it again, a write elsewhere does not.
#[test]
fn a_resyncing_link_gets_ops_and_the_barrier_waits_for_the_local_write() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let link = attach(&c);
    let port = Port::new(4, PortWaker::None);
    // The regions enter the persisted activity log first: the writes below are dispatched
    // at once, not parked for a metadata round.
    c.submit(&volume, write(3 << 16, 4096, 0), &port).unwrap();
    c.submit(&volume, write(5 << 16, 4096, 0), &port).unwrap();
    c.run_until_idle(10_000);
    assert_eq!(std::iter::from_fn(|| port.pop()).count(), 2);
    let replication = link.replication().clone();
    let dirty = &replication.replicas()[0].dirty;
    dirty.clear_all();
    dirty.mark_regions(3..4);
    link.start_resync();
    assert!(c
        .spawn_task(ReactorId(0), Box::new(AckAll(link.clone())))
        .is_ok());
    c.submit(&volume, write(3 << 16, 8192, 1), &port).unwrap();
    assert_eq!(link.inbox_len(), 1, "a resyncing link takes an op");
    assert_eq!(replication.barrier.in_flight(), 1);
    // The resync takes region 3; the write's local part has not run yet.
    link.resync_region_begins(RegionIndex(3));
    assert!(dirty.clear(RegionIndex(3)));
    let ticket = replication.barrier.ticket();
    assert!(
        !replication.barrier.passed(&ticket),
        "the write is in flight"
    );
    let mut passed_before_done = false;
    while port.is_empty() {
        passed_before_done |= replication.barrier.passed(&ticket);
        c.step();
    }
    assert!(
        !passed_before_done,
        "the ticket passed before the write completed"
    );
    assert_eq!(port.pop().map(|c| (c.tag, c.result)), Some((1, Ok(()))));
    assert!(replication.barrier.passed(&ticket));
    assert_eq!(replication.barrier.in_flight(), 0);
    // Region 3 is in the resync's hands: a write to it marks it again; region 5 is not.
    c.submit(&volume, write(3 << 16, 4096, 2), &port).unwrap();
    c.submit(&volume, write(5 << 16, 4096, 3), &port).unwrap();
    c.run_until_idle(10_000);
    assert_eq!(std::iter::from_fn(|| port.pop()).count(), 2);
    assert!(
        dirty.is_dirty(RegionIndex(3)),
        "written during its own resync"
    );
    assert!(!dirty.is_dirty(RegionIndex(5)), "the op carries it");
    link.resync_region_ends(RegionIndex(3));
    assert_eq!(link.state(), LinkState::Resyncing);
}

#[test]
fn an_async_link_gets_a_copy_and_nobody_waits_for_it() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let link = attach_mode(
        &c,
        LinkMode::Async {
            queue_limit_bytes: 1 << 20,
        },
    );
    let lag = &link.replication().replicas()[0].status.lag;
    link.set_up_to_date();
    let port = Port::new(8, PortWaker::None);
    let mut req = write(0, 8192, 1);
    req.buf.as_mut().unwrap().as_mut_slice().fill(0x3C);
    c.submit(&volume, req, &port).unwrap();
    c.submit(&volume, Request::flush(2), &port).unwrap();
    c.run_until_idle(10_000);
    // Both complete with the link's ops still queued: protocol A.
    let mut tags: Vec<u64> = std::iter::from_fn(|| port.pop()).map(|c| c.tag).collect();
    tags.sort();
    assert_eq!(
        tags,
        [1, 2],
        "neither the write nor the flush waits for the replica"
    );
    assert_eq!(lag.queued_bytes(), 8192, "the copy is charged to the queue");
    // The write waited for its activity-log round, so the flush may come first.
    let mut ops: Vec<_> = std::iter::from_fn(|| link.pop()).collect();
    ops.sort_by_key(|op| op.kind() == ReplicaOpKind::Flush);
    let [op, flush_op] = <[_; 2]>::try_from(ops).expect("the write's op and the flush's");
    assert!(!op.awaited() && op.queued_ns().is_some());
    assert!(
        op.payload().unwrap().iter().all(|&b| b == 0x3C),
        "a copy of the data, valid after the request completed"
    );
    assert_eq!(
        flush_op.kind(),
        ReplicaOpKind::Flush,
        "the flush is forwarded"
    );
    drop(op);
    assert_eq!(lag.queued_bytes(), 0, "a dropped op hands its bytes back");
    assert_eq!(link.replication().replicas()[0].dirty.dirty_regions(), 0);
    drop(flush_op);
}

#[test]
fn a_full_async_queue_marks_only_the_write_and_the_link_falls_behind() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let link = attach_mode(
        &c,
        LinkMode::Async {
            queue_limit_bytes: 3 * 4096,
        },
    );
    let port = Port::new(16, PortWaker::None);
    link.set_up_to_date();
    // Four writes in four regions: three fit the queue, the fourth does not.
    for i in 0..4u64 {
        c.submit(&volume, write(i << 16, 4096, i), &port).unwrap();
    }
    c.run_until_idle(10_000);
    assert_eq!(
        std::iter::from_fn(|| port.pop()).count(),
        4,
        "every write completes"
    );
    assert_eq!(link.state(), LinkState::Behind);
    assert!(
        link.take_dropped_out(),
        "the task is told to start a generation"
    );
    assert!(!link.take_dropped_out(), "once");
    let dirty = &link.replication().replicas()[0].dirty;
    assert_eq!(dirty.dirty_regions(), 1, "only the write that did not fit");
    assert!(dirty.is_dirty(RegionIndex(3)));
    assert_eq!(link.inbox_len(), 3);
    // Behind: later writes mark their range and queue nothing.
    c.submit(&volume, write(5 << 16, 4096, 9), &port).unwrap();
    c.run_until_idle(10_000);
    assert_eq!(port.pop().map(|c| c.tag), Some(9));
    assert!(dirty.is_dirty(RegionIndex(5)));
    assert_eq!(link.inbox_len(), 3);
    let lag = &link.replication().replicas()[0].status.lag;
    assert_eq!(lag.queued_bytes(), 3 * 4096);
    while link.pop().is_some() {}
    assert_eq!(lag.queued_bytes(), 0);
}

#[test]
fn a_set_waits_for_its_sync_links_only() {
    let mut c = cluster();
    let volume = c.volume("a").unwrap();
    let replication = Arc::new(
        VolumeReplication::new(
            Role::Primary,
            volume.max_size_bytes(),
            16,
            &[NodeId::new(5).unwrap(), NodeId::new(6).unwrap()],
        )
        .unwrap(),
    );
    volume.set_replication(Some(replication.clone()));
    let sync = ReplicaLink::new(replication.clone(), 0, ReactorId(0)).unwrap();
    let async_mode = LinkMode::Async {
        queue_limit_bytes: 1 << 20,
    };
    let asynchronous = ReplicaLink::with_mode(replication, 1, ReactorId(1), async_mode).unwrap();
    let set = ReplicaSet::new(vec![sync.clone(), asynchronous.clone()]).unwrap();
    assert_eq!(set.sync_links(), 1);
    volume.attach_replicas(Some(Arc::new(set))).unwrap();
    sync.set_up_to_date();
    asynchronous.set_up_to_date();
    let port = Port::new(8, PortWaker::None);
    c.submit(&volume, write(0, 4096, 1), &port).unwrap();
    c.run_until_idle(10_000);
    assert!(port.pop().is_none(), "the write waits for the sync replica");
    let async_op = asynchronous.pop().expect("the async replica's copy");
    drop(async_op);
    assert!(port.pop().is_none(), "the async op is nobody's part");
    assert!(
        sync.pop().is_some_and(|op| op.awaited()),
        "the sync replica's op"
    );
    // Acknowledged by the sync replica, the write completes.
    assert!(c
        .spawn_task(ReactorId(0), Box::new(AckAll(sync.clone())))
        .is_ok());
    c.submit(&volume, write(4096, 4096, 2), &port).unwrap();
    c.run_until_idle(10_000);
    assert_eq!(port.pop().map(|c| (c.tag, c.result)), Some((2, Ok(()))));
    assert_eq!(
        asynchronous.inbox_len(),
        1,
        "its copy waits for the async link"
    );
}
