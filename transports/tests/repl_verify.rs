//! The online verify on real io_uring reactors: two engines in one process, the primary's
//! link task and the replica's serve task on a real connection.
//!
//! - regions of the replica's copy changed behind the link's back (written through the
//!   replica's engine) are found, exactly those; a verify with repair marks them, the link
//!   reconnects, the new link resyncs them, and a verify after that finds nothing;
//! - verifies while writes run on the primary report no mismatch (every region is checked
//!   or reported busy), for a sync and an async replica, and the copies are equal at the end.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblock_engine::replication::{
    GenerationHistory, LinkMode, LinkState, NodeId, ReplicaLink, ReplicaSet, Role, VerifyJob,
    VerifyPhase, VerifySnapshot, VolumeReplication,
};
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    AlignedBuf, DeviceConfig, Engine, EngineConfig, IoBuf, Port, PortWaker, ReactorId, Request,
    RequestKind, VolumeHandle,
};
use ringblock_transports::peer::{
    monotonic_clock, LinkOptions, PrimaryLink, ReplicaServe, ReplicatedVolumeId, Seq, ServeOptions,
};

const VOLUME_BYTES: u64 = 32 << 20;
const MIB: u64 = 1 << 20;
const REGION_SHIFT: u8 = 20;
const PRIMARY_NODE: u128 = 1;
const REPLICA_NODE: u128 = 3;

fn engine() -> Engine {
    let mut device = DeviceConfig::ram("r", 64 << 20);
    device.chunk_size_bytes = MIB;
    let engine = Engine::start(&EngineConfig {
        devices: vec![device],
        cores: vec![0],
        ..Default::default()
    })
    .unwrap();
    engine.create_volume("r", "a", VOLUME_BYTES).unwrap();
    engine
}

fn request(kind: RequestKind, offset: u64, len: u64, buf: Option<IoBuf>) -> Request {
    Request {
        kind,
        offset_bytes: offset,
        len_bytes: len,
        fua: false,
        buf,
        mover: None,
        tag: 0,
    }
}

fn run(handle: &VolumeHandle, req: Request) -> Option<IoBuf> {
    let port = Port::new(1, PortWaker::Thread(std::thread::current()));
    handle.submit(req, &port).map_err(|(_, e)| e).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = port.pop() {
            assert_eq!(c.result, Ok(()), "request failed");
            return c.buf;
        }
        assert!(Instant::now() < deadline, "a request never completed");
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

fn write(handle: &VolumeHandle, offset: u64, len: u64, fill: u8) {
    let mut data = AlignedBuf::zeroed(len as usize);
    data.as_mut_slice().fill(fill);
    run(
        handle,
        request(RequestKind::Write, offset, len, Some(IoBuf::owned(data))),
    );
}

fn read_all(e: &Engine) -> Vec<u8> {
    let handle = e.open("a").unwrap();
    let mut out = Vec::with_capacity(VOLUME_BYTES as usize);
    for offset in (0..VOLUME_BYTES).step_by(MIB as usize) {
        let buf = IoBuf::owned(AlignedBuf::zeroed(MIB as usize));
        let got = run(&handle, request(RequestKind::Read, offset, MIB, Some(buf))).unwrap();
        out.extend_from_slice(got.as_slice());
    }
    out
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn make_primary(p: &Engine, mode: LinkMode) -> Arc<ReplicaLink> {
    let volume = p.volume("a").unwrap();
    let replication = Arc::new(
        VolumeReplication::new(
            Role::Primary,
            volume.max_size_bytes(),
            REGION_SHIFT,
            &[NodeId::new(REPLICA_NODE).unwrap()],
        )
        .unwrap(),
    );
    volume.set_replication(Some(replication.clone()));
    let link = ReplicaLink::with_mode(replication, 0, ReactorId(0), mode).unwrap();
    let set = ReplicaSet::new(vec![link.clone()]).unwrap();
    volume.attach_replicas(Some(Arc::new(set))).unwrap();
    link
}

fn make_replica(r: &Engine, history: GenerationHistory) {
    let volume = r.volume("a").unwrap();
    let replication = VolumeReplication::new(
        Role::Replica,
        volume.max_size_bytes(),
        REGION_SHIFT,
        &[NodeId::new(PRIMARY_NODE).unwrap()],
    )
    .unwrap();
    replication.adopt_history(history);
    volume.set_replication(Some(Arc::new(replication)));
}

/// A task that says when the reactor dropped it (a new link may start only then).
struct Watched<T> {
    inner: T,
    ended: Arc<AtomicBool>,
}

impl<T: ReactorTask> ReactorTask for Watched<T> {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        self.inner.poll(ctx)
    }
    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        self.inner.on_ring(ctx, c)
    }
    fn stop(&mut self, ctx: &mut TaskCtx<'_>) {
        self.inner.stop(ctx)
    }
    fn has_ready(&self) -> bool {
        self.inner.has_ready()
    }
    fn finished(&self) -> bool {
        let done = self.inner.finished();
        if done {
            self.ended.store(true, Ordering::SeqCst);
        }
        done
    }
}

/// Start a link and a serve task on a new connection; returns when the link task ended.
fn connect(p: &Engine, r: &Engine, link: &Arc<ReplicaLink>) -> Arc<AtomicBool> {
    let (a, b) = UnixStream::pair().unwrap();
    let id = ReplicatedVolumeId(77);
    let lopts = LinkOptions {
        volume: id,
        send_seq: Seq(0),
        recv_seq: Seq(0),
        // A narrow window for an async replica: ops wait in the inbox, so a verify request
        // framed before them would find differences.
        window_frames: if link.mode() == LinkMode::Sync { 64 } else { 4 },
        window_bytes: if link.mode() == LinkMode::Sync {
            16 << 20
        } else {
            1 << 20
        },
        zero_copy: true,
        clock: monotonic_clock(),
        peer: "replica".into(),
    };
    let ended = Arc::new(AtomicBool::new(false));
    let task = PrimaryLink::new(OwnedFd::from(a), p.open("a").unwrap(), link.clone(), lopts);
    let task = Watched {
        inner: task,
        ended: ended.clone(),
    };
    p.spawn_task(Some(ReactorId(0)), Box::new(task));
    let sopts = ServeOptions {
        volume: id,
        send_seq: Seq(0),
        recv_seq: Seq(0),
        max_in_flight: 16,
        clock: monotonic_clock(),
        peer: "primary".into(),
        primary_node: NodeId::new(PRIMARY_NODE),
        primary_history: link.replication().history(),
        primary_size_bytes: VOLUME_BYTES,
    };
    let task = ReplicaServe::new(OwnedFd::from(b), r.open("a").unwrap(), sopts);
    r.spawn_task(Some(ReactorId(0)), Box::new(task));
    ended
}

fn wait_up_to_date(link: &ReplicaLink) {
    wait_for("the link is up to date", || {
        link.state() == LinkState::UpToDate
    });
}

/// Hand a verify to the link and wait for its end.
fn verify(link: &ReplicaLink, repair: bool) -> VerifySnapshot {
    let job = VerifyJob::new(repair);
    link.offer_verify(job.clone()).unwrap();
    wait_for("the verify ends", || {
        matches!(job.phase(), VerifyPhase::Done | VerifyPhase::Failed)
    });
    job.snapshot()
}

/// Two engines whose copies are equal (every MiB written once), the link up to date.
fn equal_pair(mode: LinkMode) -> (Arc<Engine>, Engine, Arc<ReplicaLink>, Arc<AtomicBool>) {
    let (p, r) = (Arc::new(engine()), engine());
    let link = make_primary(&p, mode);
    make_replica(&r, link.replication().history());
    let ended = connect(&p, &r, &link);
    wait_up_to_date(&link);
    let handle = p.open("a").unwrap();
    for mib in 0..VOLUME_BYTES / MIB {
        write(&handle, mib * MIB, MIB, 0x20 + mib as u8);
    }
    (p, r, link, ended)
}

#[test]
fn verify_finds_exactly_the_corrupted_regions_and_repair_resyncs_them() {
    let (p, r, link, ended) = equal_pair(LinkMode::Sync);
    let clean = verify(&link, false);
    assert_eq!(clean.phase, VerifyPhase::Done, "{:?}", clean.error);
    assert_eq!((clean.regions_total, clean.regions_checked), (32, 32));
    assert_eq!(clean.bytes_checked, VOLUME_BYTES);
    assert_eq!((clean.mismatched_regions, clean.busy_regions), (0, 0));

    // Behind the link's back: 4 KiB in region 3, all of region 4, 512 bytes at the end of
    // region 17.
    let rhandle = r.open("a").unwrap();
    write(&rhandle, 3 * MIB + 8192, 4096, 0xEE);
    write(&rhandle, 4 * MIB, MIB, 0xEE);
    write(&rhandle, 18 * MIB - 512, 512, 0xEE);
    let found = verify(&link, false);
    assert_eq!(found.phase, VerifyPhase::Done, "{:?}", found.error);
    assert_eq!(found.regions_checked, 32);
    assert_eq!(found.mismatched_regions, 3);
    assert_eq!(found.mismatched, vec![3 * MIB..5 * MIB, 17 * MIB..18 * MIB]);
    assert!(!found.repaired);
    assert_eq!(
        link.state(),
        LinkState::UpToDate,
        "a verify alone changes nothing"
    );
    let replica = &link.replication().replicas()[0];
    assert_eq!(replica.status.verify_mismatches(), 3);

    let repaired = verify(&link, true);
    assert_eq!(repaired.mismatched_regions, 3);
    assert!(repaired.repaired);
    for region in [3, 4, 17] {
        assert!(
            replica
                .dirty
                .is_dirty(ringblock_engine::replication::RegionIndex(region)),
            "region {region} is marked for the resync"
        );
    }
    // The link fails on purpose; a new one resyncs the marked regions.
    wait_for("the link task ends", || ended.load(Ordering::SeqCst));
    let _ended = connect(&p, &r, &link);
    wait_up_to_date(&link);
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    let again = verify(&link, false);
    assert_eq!(again.phase, VerifyPhase::Done);
    assert_eq!((again.regions_checked, again.mismatched_regions), (32, 0));
    drop(rhandle);
    Arc::try_unwrap(p).ok().unwrap().shutdown().unwrap();
    r.shutdown().unwrap();
}

#[test]
fn verifies_under_concurrent_writes_report_no_false_mismatch() {
    verify_under_writes(LinkMode::Sync);
}

/// An async replica's writes complete before it has them: the request waits for every op
/// queued before its barrier.
#[test]
fn verifies_of_an_async_replica_under_concurrent_writes_report_no_false_mismatch() {
    verify_under_writes(LinkMode::Async {
        queue_limit_bytes: 256 << 20,
    });
}

fn verify_under_writes(mode: LinkMode) {
    let (p, r, link, _ended) = equal_pair(mode);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop, link) = (p.clone(), stop.clone(), link.clone());
        std::thread::spawn(move || {
            let handle = p.open("a").unwrap();
            let lag = &link.replication().replicas()[0].status.lag;
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = [4096, 65536, 1 << 20, 2 << 20][(x % 4) as usize];
                let offset = (x >> 8) % ((VOLUME_BYTES - len) / 4096) * 4096;
                write(&handle, offset, len, (x >> 40) as u8);
                n += 1;
                // An async replica's queue is bounded: keep it from overflowing (the link
                // would fall behind and end the verify).
                while lag.queued_bytes() > 8 << 20 && !stop.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
            }
            n
        })
    };
    let mut busy = 0;
    for round in 0..5 {
        let s = verify(&link, false);
        assert_eq!(s.phase, VerifyPhase::Done, "round {round}: {:?}", s.error);
        assert_eq!(s.mismatched_regions, 0, "round {round}: {:?}", s.mismatched);
        assert_eq!(s.regions_checked + s.busy_regions, 32, "round {round}");
        busy += s.busy_regions;
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    eprintln!("{writes} writes during 5 verifies; {busy} regions busy");
    assert_eq!(link.state(), LinkState::UpToDate, "the link stays up");
    // The verify's request follows every write before it: then the replica has them all.
    let s = verify(&link, false);
    assert_eq!((s.regions_checked, s.mismatched_regions), (32, 0));
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    Arc::try_unwrap(p).ok().unwrap().shutdown().unwrap();
    r.shutdown().unwrap();
}
