//! The link's resync on real io_uring reactors: two engines in one process, the primary's
//! link task and the replica's serve task on a real connection.
//!
//! - a full sync of an empty replica: the replica ends equal, took the primary's history,
//!   and where the thin primary holds nothing (and the replica held old data) it got trims,
//!   not megabytes of zeros;
//! - a replica that missed some writes gets only the dirty regions;
//! - writes keep going during the resync and the copies end equal;
//! - a connection cut mid-resync: every region where the copies differ is still dirty, and a
//!   new link finishes the job.

#[path = "support/repl.rs"]
mod repl;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use repl::link::{
    link_options, make_replica, run, serve_options, wait_for, wait_up_to_date, write, REGION_SHIFT,
};
use repl::{request, MIB};
use ringblock_engine::replication::{
    GenerationHistory, LinkMode, LinkState, PeerState, RegionIndex, ReplicaLink,
};
use ringblock_engine::{Engine, ReactorId, RequestKind};
use ringblock_transports::peer::{PrimaryLink, ReplicaServe};

const VOLUME_BYTES: u64 = 32 << 20;

fn engine() -> Engine {
    repl::engine(VOLUME_BYTES, Some(MIB))
}

fn read_all(e: &Engine) -> Vec<u8> {
    repl::link::read_all(e, VOLUME_BYTES)
}

/// Make volume "a" of `p` a primary with one sync replica whose link is behind (writes mark).
fn make_primary(p: &Engine) -> Arc<ReplicaLink> {
    repl::link::make_primary(p, LinkMode::Sync)
}

/// Spawn the link task on `p` and the serve task on `r` over the two ends of a connection.
fn connect(p: &Engine, r: &Engine, link: &Arc<ReplicaLink>, pfd: OwnedFd, rfd: OwnedFd) {
    let lopts = link_options(64, 16 << 20);
    let task = PrimaryLink::new(pfd, p.open("a").unwrap(), link.clone(), lopts);
    p.spawn_task(Some(ReactorId(0)), Box::new(task));
    let sopts = serve_options(link, VOLUME_BYTES);
    let task = ReplicaServe::new(rfd, r.open("a").unwrap(), sopts);
    r.spawn_task(Some(ReactorId(0)), Box::new(task));
}

fn unix_pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = UnixStream::pair().unwrap();
    (OwnedFd::from(a), OwnedFd::from(b))
}

/// Every sector where the copies differ lies in a region dirty for the replica.
fn assert_differences_are_dirty(p: &Engine, r: &Engine, link: &ReplicaLink, what: &str) {
    let (pdata, rdata) = (read_all(p), read_all(r));
    let dirty = &link.replication().replicas()[0].dirty;
    for (i, (a, b)) in pdata.chunks(4096).zip(rdata.chunks(4096)).enumerate() {
        let region = (i as u64 * 4096) >> REGION_SHIFT;
        assert!(
            a == b || dirty.is_dirty(RegionIndex(region)),
            "{what}: page {i} differs but region {region} is clean"
        );
    }
}

#[test]
fn a_full_sync_copies_the_data_trims_the_holes_and_hands_over_the_history() {
    let (p, r) = (engine(), engine());
    let handle = p.open("a").unwrap();
    // Data in 6 of 32 chunks; the rest of the thin primary holds nothing.
    for (i, mib) in [0u64, 3, 4, 9, 20, 31].into_iter().enumerate() {
        write(&handle, mib * MIB, MIB, 0x10 + i as u8);
    }
    let link = make_primary(&p);
    // The replica held other data everywhere (a copy discarded by a resolve).
    let rhandle = r.open("a").unwrap();
    for mib in 0..VOLUME_BYTES / MIB {
        write(&rhandle, mib * MIB, MIB, 0xEE);
    }
    let rreplication = make_replica(&r, GenerationHistory::default());
    let written_before = r
        .volume("a")
        .unwrap()
        .stats
        .write_bytes
        .load(Ordering::Relaxed);
    // A full sync, as the runtime asks for one: the whole bitmap.
    let replica = &link.replication().replicas()[0];
    replica.dirty.mark_bytes(0, VOLUME_BYTES);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    connect(&p, &r, &link, OwnedFd::from(client), OwnedFd::from(server));
    wait_up_to_date(&link);

    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    assert_eq!(replica.status.state(), PeerState::UpToDate);
    assert_eq!((replica.since(), replica.full_sync()), (None, false));
    let progress = replica.status.resync.snapshot(0);
    assert_eq!(progress.done_bytes, VOLUME_BYTES);
    assert_eq!(progress.total_bytes, VOLUME_BYTES);
    // Holes went as trims: the replica wrote only the primary's 6 MiB of data.
    let rvolume = r.volume("a").unwrap();
    let written = rvolume.stats.write_bytes.load(Ordering::Relaxed) - written_before;
    assert_eq!(written, 6 * MIB, "data bytes written by the resync");
    assert_eq!(rvolume.stats.trims.load(Ordering::Relaxed), 26);
    // The replica took the primary's history; it is persisted at its next round.
    wait_for("the replica adopts the primary's history", || {
        rreplication.history() == link.replication().history()
    });
    drop((handle, rhandle));
    p.shutdown().unwrap();
    r.shutdown().unwrap();
}

#[test]
fn a_replica_that_missed_some_writes_gets_only_the_dirty_regions() {
    let (p, r) = (engine(), engine());
    // Both copies start equal.
    for e in [&p, &r] {
        let h = e.open("a").unwrap();
        for mib in 0..VOLUME_BYTES / MIB {
            write(&h, mib * MIB, MIB, mib as u8);
        }
    }
    let link = make_primary(&p);
    let rreplication = make_replica(&r, link.replication().history());
    // The link is behind: these writes only mark.
    let handle = p.open("a").unwrap();
    for (offset, len) in [(5 * MIB + 4096, 8192), (17 * MIB, 3 * MIB), (30 * MIB, 512)] {
        write(&handle, offset, len, 0xAB);
    }
    let replica = &link.replication().replicas()[0];
    let dirty_bytes = replica.dirty.dirty_bytes(VOLUME_BYTES);
    assert_eq!(dirty_bytes, 5 * MIB);
    let (pfd, rfd) = unix_pair();
    connect(&p, &r, &link, pfd, rfd);
    wait_up_to_date(&link);
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    let progress = replica.status.resync.snapshot(0);
    assert_eq!(
        (progress.done_bytes, progress.total_bytes),
        (dirty_bytes, dirty_bytes),
        "only the dirty regions are resynced"
    );
    assert_eq!(rreplication.history(), link.replication().history());
    drop(handle);
    p.shutdown().unwrap();
    r.shutdown().unwrap();
}

#[test]
fn writes_during_the_resync_reach_the_replica_and_the_copies_end_equal() {
    let (p, r) = (Arc::new(engine()), engine());
    let handle = p.open("a").unwrap();
    for mib in 0..VOLUME_BYTES / MIB {
        write(&handle, mib * MIB, MIB, 0x40 + mib as u8);
    }
    let link = make_primary(&p);
    make_replica(&r, GenerationHistory::default());
    link.replication().replicas()[0]
        .dirty
        .mark_bytes(0, VOLUME_BYTES);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let handle = p.open("a").unwrap();
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut n = 0u64;
            while n < 64 || (!stop.load(Ordering::SeqCst) && n < 1000) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = [4096, 65536, 1 << 20][(x % 3) as usize];
                let offset = (x >> 8) % ((VOLUME_BYTES - len) / 4096) * 4096;
                write(&handle, offset, len, (x >> 40) as u8);
                n += 1;
            }
            n
        })
    };
    let (pfd, rfd) = unix_pair();
    connect(&p, &r, &link, pfd, rfd);
    wait_up_to_date(&link);
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes >= 64);
    run(&handle, request(RequestKind::Flush, 0, 0, None));
    assert_eq!(link.state(), LinkState::UpToDate, "the link stays up");
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    drop(handle);
    Arc::try_unwrap(p).ok().unwrap().shutdown().unwrap();
    r.shutdown().unwrap();
}

/// Forwards bytes both ways between `a` and `b`; after `limit` bytes from `a` it cuts both
/// connections (the link fails mid-resync, at a point the test chooses).
fn cutting_proxy(a: UnixStream, b: UnixStream, limit: usize) -> std::thread::JoinHandle<()> {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let (mut from, mut to) = (b2, a2);
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        let (mut from, mut to) = (a, b);
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < limit {
            let want = buf.len().min(limit - sent);
            match from.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    })
}

#[test]
fn a_link_cut_mid_resync_keeps_every_region_dirty_and_a_new_link_finishes() {
    let (p, r) = (engine(), engine());
    let handle = p.open("a").unwrap();
    for mib in 0..VOLUME_BYTES / MIB {
        write(&handle, mib * MIB, MIB, 0x70 + mib as u8);
    }
    let link = make_primary(&p);
    let rreplication = make_replica(&r, GenerationHistory::default());
    let replica = &link.replication().replicas()[0];
    replica.dirty.mark_bytes(0, VOLUME_BYTES);
    // The first connection carries 9 MiB of the 32 and is cut.
    let (p_end, proxy_p) = UnixStream::pair().unwrap();
    let (proxy_r, r_end) = UnixStream::pair().unwrap();
    let proxy = cutting_proxy(proxy_p, proxy_r, 9 << 20);
    connect(&p, &r, &link, OwnedFd::from(p_end), OwnedFd::from(r_end));
    proxy.join().unwrap();
    wait_for("the link fails", || {
        replica.status.state() == PeerState::Behind
    });
    assert_eq!(link.state(), LinkState::Behind);
    // The failing link marks what it cleared and the replica did not acknowledge.
    wait_for("the failed link drains", || link.inbox_len() == 0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(replica.dirty.iter_dirty().next().is_some(), "work is left");
    assert_differences_are_dirty(&p, &r, &link, "after the cut");
    assert!(
        rreplication.history().is_empty(),
        "a replica cut mid-resync does not claim the primary's history"
    );
    // A new connection finishes the resync.
    let (pfd, rfd) = unix_pair();
    connect(&p, &r, &link, pfd, rfd);
    wait_up_to_date(&link);
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    assert_eq!(replica.status.state(), PeerState::UpToDate);
    drop(handle);
    p.shutdown().unwrap();
    r.shutdown().unwrap();
}

#[test]
fn the_replica_asks_for_its_own_dirty_regions_and_follows_new_generations() {
    let (p, r) = (engine(), engine());
    for e in [&p, &r] {
        let h = e.open("a").unwrap();
        for mib in 0..VOLUME_BYTES / MIB {
            write(&h, mib * MIB, MIB, 0x20 + mib as u8);
        }
    }
    let link = make_primary(&p);
    let rreplication = make_replica(&r, link.replication().history());
    // The replica wrote regions 2 and 11..13 on its own (its activity log after a crash,
    // when it was primary): they are dirty for the primary there, and only there.
    let rhandle = r.open("a").unwrap();
    write(&rhandle, 2 * MIB, 4096, 0xDD);
    write(&rhandle, 11 * MIB + 8192, 2 * MIB, 0xDD);
    let own = &rreplication.replicas()[0].dirty;
    own.mark_bytes(2 * MIB, 4096);
    own.mark_bytes(11 * MIB + 8192, 2 * MIB);
    assert_eq!(own.dirty_regions(), 4);
    let replica = &link.replication().replicas()[0];
    assert_eq!(
        replica.dirty.dirty_regions(),
        0,
        "the primary knows of nothing"
    );
    let (pfd, rfd) = unix_pair();
    connect(&p, &r, &link, pfd, rfd);
    wait_up_to_date(&link);
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    assert_eq!(replica.status.resync.snapshot(0).done_bytes, 4 * MIB);
    // At the primary's ResyncDone the replica clears its own marks and sees the primary up
    // to date.
    wait_for("the replica adopts", || {
        rreplication.replicas()[0].status.state() == PeerState::UpToDate
    });
    assert_eq!(
        own.dirty_regions(),
        0,
        "the replica's own marks are cleared"
    );
    // A generation the primary starts reaches the up-to-date replica.
    let before = rreplication.history();
    let g = link.replication().start_generation();
    wait_for("the replica follows the new generation", || {
        rreplication.history().current() == Some(g)
    });
    assert_eq!(rreplication.history(), link.replication().history());
    assert_eq!(
        &rreplication.history().ids()[..before.ids().len()],
        before.ids()
    );
    // Writes go on to the replica.
    let handle = p.open("a").unwrap();
    write(&handle, 7 * MIB, 65536, 0x5A);
    assert_eq!(link.state(), LinkState::UpToDate);
    assert!(
        read_all(&p) == read_all(&r),
        "the replica equals the primary"
    );
    drop((handle, rhandle));
    p.shutdown().unwrap();
    r.shutdown().unwrap();
}
