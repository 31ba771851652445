//! The online verify on real io_uring reactors: two engines in one process, the primary's
//! link task and the replica's serve task on a real connection.
//!
//! - regions of the replica's copy changed behind the link's back (written through the
//!   replica's engine) are found, exactly those; a verify with repair marks them, the link
//!   reconnects, the new link resyncs them, and a verify after that finds nothing;
//! - verifies while writes run on the primary report no mismatch (every region is checked
//!   or reported busy), for a sync and an async replica, and the copies are equal at the end.

#[path = "support/repl.rs"]
mod repl;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use repl::link::{
    link_options, make_primary, make_replica, serve_options, wait_for, wait_up_to_date, write,
};
use repl::MIB;
use ringblock_engine::replication::{
    LinkMode, LinkState, ReplicaLink, VerifyJob, VerifyPhase, VerifySnapshot,
};
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{Engine, ReactorId};
use ringblock_transports::peer::{PrimaryLink, ReplicaServe};

const VOLUME_BYTES: u64 = 32 << 20;

fn engine() -> Engine {
    repl::engine(VOLUME_BYTES, Some(MIB))
}

fn read_all(e: &Engine) -> Vec<u8> {
    repl::link::read_all(e, VOLUME_BYTES)
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
    // A narrow window for an async replica: ops wait in the inbox, so a verify request
    // framed before them would find differences.
    let lopts = if link.mode() == LinkMode::Sync {
        link_options(64, 16 << 20)
    } else {
        link_options(4, 1 << 20)
    };
    let ended = Arc::new(AtomicBool::new(false));
    let task = PrimaryLink::new(OwnedFd::from(a), p.open("a").unwrap(), link.clone(), lopts);
    let task = Watched {
        inner: task,
        ended: ended.clone(),
    };
    p.spawn_task(Some(ReactorId(0)), Box::new(task));
    let sopts = serve_options(link, VOLUME_BYTES);
    let task = ReplicaServe::new(OwnedFd::from(b), r.open("a").unwrap(), sopts);
    r.spawn_task(Some(ReactorId(0)), Box::new(task));
    ended
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
