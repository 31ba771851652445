//! The peer runtime on real engines and real sockets (loopback TCP, or Unix sockets in a
//! temporary directory where both nodes must know each other's address before starting):
//! two engines and two runtimes in one process. Copies in step replicate writes; diverged
//! copies and a wrong secret move nothing and say why; a cut connection comes back; promote,
//! demote and the export refusal of a replica copy.

#[path = "support/repl.rs"]
mod repl;

use std::sync::Arc;
use std::time::{Duration, Instant};

use repl::runtime::{
    address as replica_address, loopback, node, read, record, sync_peer, try_run, wait_for, write,
    SECRET, WAIT,
};
use repl::{request, shutdown};
use ringblock_engine::replication::{GenerationHistory, NodeId, PeerState, Role};
use ringblock_engine::{AlignedBuf, Engine, IoBuf, Port, PortWaker, RequestKind};
use ringblock_transports::nbd::client::{Client, ClientError, Options};
use ringblock_transports::nbd::server::{BoundAddr, NbdServer, ServerConfig};
use ringblock_transports::nbd::wire::REP_ERR_POLICY;
use ringblock_transports::nbd::EngineCatalog;
use ringblock_transports::peer::runtime::{ListenAddress, PeerMode, RuntimeConfig, VolumeView};
use ringblock_transports::peer::{PeerAddress, PeerRuntime, RuntimeError};

const VOLUME_BYTES: u64 = 16 << 20;

fn primary_node() -> NodeId {
    node(0x1111)
}

fn replica_node() -> NodeId {
    node(0x2222)
}

fn engine() -> Arc<Engine> {
    repl::runtime::engine(VOLUME_BYTES)
}

/// Node `node`'s configuration for volume "a" with one sync peer.
fn config(
    node: NodeId,
    role: Role,
    peer: NodeId,
    peer_address: PeerAddress,
    listen: ListenAddress,
    secret: &[u8],
) -> RuntimeConfig {
    let peers = vec![sync_peer(peer, peer_address, 0)];
    repl::runtime::config(node, role, peers, listen, secret)
}

/// The replica's runtime first (on a free port), then the primary's, pointed at it.
fn pair(p: &Arc<Engine>, r: &Arc<Engine>, primary_secret: &[u8]) -> (PeerRuntime, PeerRuntime) {
    pair_in(p, r, primary_secret, |_| {})
}

/// [`pair`], with the primary's configuration adjusted by `adjust`.
fn pair_in(
    p: &Arc<Engine>,
    r: &Arc<Engine>,
    primary_secret: &[u8],
    adjust: impl FnOnce(&mut RuntimeConfig),
) -> (PeerRuntime, PeerRuntime) {
    let unused = PeerAddress::Tcp("127.0.0.1:9".into());
    let replica = PeerRuntime::start(
        r.clone(),
        config(
            replica_node(),
            Role::Replica,
            primary_node(),
            unused,
            loopback(),
            SECRET,
        ),
    )
    .unwrap();
    let mut primary_config = config(
        primary_node(),
        Role::Primary,
        replica_node(),
        replica_address(&replica),
        loopback(),
        primary_secret,
    );
    adjust(&mut primary_config);
    let primary = PeerRuntime::start(p.clone(), primary_config).unwrap();
    (primary, replica)
}

/// Give both copies of "a" a replication record with `primary` and `replica` histories,
/// the primary tracking the replica as up to date (nothing dirty, no full sync pending).
fn records(p: &Engine, r: &Engine, primary: &[u64], replica: &[u64]) {
    let history = |ids: &[u64]| {
        GenerationHistory::from_ids(
            ids.iter()
                .map(|&i| ringblock_engine::replication::GenerationId::new(i).unwrap())
                .collect(),
        )
        .unwrap()
    };
    record(p, Role::Primary, replica_node(), history(primary));
    record(r, Role::Replica, primary_node(), history(replica));
}

fn view(rt: &PeerRuntime) -> VolumeView {
    rt.volume("a").expect("volume a is replicated")
}

/// The runtime's only peer's state and reason.
fn peer_state(rt: &PeerRuntime) -> (PeerState, Option<String>) {
    let v = view(rt);
    let status = &v.replication.replicas()[v.peers[0].1].status;
    (status.state(), status.reason())
}

#[test]
fn copies_in_step_replicate_every_write() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7, 8], &[7, 8]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    assert_eq!(view(&primary).link_starts, vec![1]);
    assert_eq!(view(&replica).primary_connected, Some(primary_node()));
    assert!(view(&primary).replication.replicas()[0]
        .status
        .connected_unix_ms()
        .is_some());
    write(&p, 1 << 20, 64 << 10, 0x5a);
    write(&p, 9 << 20, 4096, 0xa5);
    assert!(read(&r, 1 << 20, 64 << 10).iter().all(|&b| b == 0x5a));
    assert!(read(&r, 9 << 20, 4096).iter().all(|&b| b == 0xa5));
    assert_eq!(peer_state(&primary).0, PeerState::UpToDate);
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn diverged_copies_move_nothing_and_say_so() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7, 8], &[7, 9]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("both sides diverged", || {
        peer_state(&primary).0 == PeerState::Diverged
            && peer_state(&replica).0 == PeerState::Diverged
    });
    let (_, reason) = peer_state(&primary);
    let reason = reason.expect("a reason");
    assert!(
        reason.contains("split brain") && reason.contains("resolve"),
        "{reason}"
    );
    write(&p, 0, 4096, 0x11);
    assert_eq!(view(&primary).link_starts, vec![0]);
    assert_eq!(view(&replica).primary_connected, None);
    assert!(
        read(&r, 0, 4096).iter().all(|&b| b == 0),
        "nothing reached the replica"
    );
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn a_wrong_secret_is_never_established() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair(&p, &r, b"another secret, 32 bytes long!!!");
    wait_for("a refusal in the status", || {
        peer_state(&primary)
            .1
            .is_some_and(|r| r.contains("refused"))
    });
    let (state, reason) = peer_state(&primary);
    assert_eq!(state, PeerState::Connecting, "{reason:?}");
    assert_eq!(view(&primary).link_starts, vec![0]);
    assert_eq!(view(&replica).primary_connected, None);
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn the_primary_reconnects_after_the_replica_restarts() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    write(&p, 2 << 20, 8192, 0x21);
    let ListenAddress::Tcp(bound) = *replica.listening() else {
        panic!("tcp")
    };
    replica.stop();
    drop(replica);
    wait_for("the primary to see the link end", || {
        peer_state(&primary).0 != PeerState::UpToDate
    });
    // Written while the replica is away: marked in its bitmap.
    write(&p, 3 << 20, 4096, 0x22);
    let dirty = view(&primary).replication.replicas()[0]
        .dirty
        .dirty_regions();
    assert!(dirty >= 1, "the missed write is dirty for the replica");
    // The replica comes back on the same address.
    let unused = PeerAddress::Tcp("127.0.0.1:9".into());
    let replica = PeerRuntime::start(
        r.clone(),
        config(
            replica_node(),
            Role::Replica,
            primary_node(),
            unused,
            ListenAddress::Tcp(bound),
            SECRET,
        ),
    )
    .unwrap();
    // The link comes back: it resyncs the dirty region (the resync is the link task's).
    wait_for("a second link", || view(&primary).link_starts[0] >= 2);
    wait_for("the replica behind, resyncing or caught up", || {
        matches!(
            peer_state(&primary).0,
            PeerState::Behind | PeerState::Resyncing | PeerState::UpToDate
        )
    });
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn a_replica_that_was_up_to_date_rejoins_at_once() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    write(&p, 2 << 20, 8192, 0x21);
    let ListenAddress::Tcp(bound) = *replica.listening() else {
        panic!("tcp")
    };
    replica.stop();
    drop(replica);
    wait_for("the primary to see the link end", || {
        peer_state(&primary).0 != PeerState::UpToDate
    });
    let unused = PeerAddress::Tcp("127.0.0.1:9".into());
    let replica = PeerRuntime::start(
        r.clone(),
        config(
            replica_node(),
            Role::Replica,
            primary_node(),
            unused,
            ListenAddress::Tcp(bound),
            SECRET,
        ),
    )
    .unwrap();
    // Nothing was written meanwhile: the bitmap is empty and the link comes back up to date.
    wait_for("the link up to date again", || {
        peer_state(&primary).0 == PeerState::UpToDate && view(&primary).link_starts[0] >= 2
    });
    write(&p, 5 << 20, 4096, 0x33);
    assert!(read(&r, 5 << 20, 4096).iter().all(|&b| b == 0x33));
    assert!(read(&r, 2 << 20, 8192).iter().all(|&b| b == 0x21));
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn a_fresh_replica_is_linked_for_a_full_resync() {
    let (p, r) = (engine(), engine());
    // The primary holds data before it is replicated; the replica holds other bytes.
    write(&p, 0, 1 << 20, 0x31);
    write(&p, 5 << 20, 64 << 10, 0x32);
    write(&r, 2 << 20, 1 << 20, 0xEE);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("a link started", || view(&primary).link_starts[0] >= 1);
    // The link resyncs everything and is up to date; the copies are equal.
    wait_for("the full resync ends", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    let v = view(&primary);
    let rep = &v.replication.replicas()[0];
    assert!(!rep.full_sync() && rep.since().is_none());
    assert!(
        read(&p, 0, VOLUME_BYTES as usize) == read(&r, 0, VOLUME_BYTES as usize),
        "the replica equals the primary"
    );
    wait_for("the replica takes the primary's history", || {
        view(&replica).replication.history() == view(&primary).replication.history()
    });
    write(&p, 9 << 20, 4096, 0xa5);
    assert!(read(&r, 9 << 20, 4096).iter().all(|&b| b == 0xa5));
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn promote_and_demote_switch_the_roles() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, ra) = (dir.path().join("p.sock"), dir.path().join("r.sock"));
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let replica = PeerRuntime::start(
        r.clone(),
        config(
            replica_node(),
            Role::Replica,
            primary_node(),
            PeerAddress::Unix(pa.clone()),
            ListenAddress::Unix(ra.clone()),
            SECRET,
        ),
    )
    .unwrap();
    let primary = PeerRuntime::start(
        p.clone(),
        config(
            primary_node(),
            Role::Primary,
            replica_node(),
            PeerAddress::Unix(ra.clone()),
            ListenAddress::Unix(pa.clone()),
            SECRET,
        ),
    )
    .unwrap();
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    let e = replica.promote("a", false).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Conflict(m) if m.contains("connected as its primary")),
        "{e}"
    );
    assert!(matches!(
        primary.promote("a", false),
        Err(RuntimeError::Conflict(_))
    ));
    assert!(matches!(
        replica.demote("a"),
        Err(RuntimeError::Conflict(_))
    ));
    assert!(matches!(
        primary.promote("b", false),
        Err(RuntimeError::NotFound(_))
    ));
    let history = view(&primary).replication.history();

    // A clean switchover: demote there, promote here.
    primary.demote("a").unwrap();
    assert_eq!(view(&primary).replication.role(), Role::Replica);
    assert_eq!(
        view(&primary).replication.history(),
        history,
        "a clean demote keeps the copies in step"
    );
    wait_for("the old primary's link gone", || {
        view(&replica).primary_connected.is_none()
    });
    replica.promote("a", false).unwrap();
    assert_eq!(view(&replica).replication.role(), Role::Primary);
    assert_eq!(
        view(&replica).replication.history().ids().len(),
        history.ids().len() + 1,
        "a promotion starts a generation"
    );
    wait_for("the new primary links the old one", || {
        view(&replica).link_starts[0] >= 1
    });
    let (state, reason) = peer_state(&replica);
    assert_ne!(state, PeerState::Diverged, "{reason:?}");

    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn a_forced_promote_cuts_the_primary_off() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    replica.promote("a", true).unwrap();
    assert_eq!(view(&replica).replication.role(), Role::Primary);
    assert_eq!(view(&replica).primary_connected, None);
    // Two primaries now, each with a generation the other lacks: the old one completes the
    // handshake, sees the split brain and starts no link; the new one says so too.
    wait_for("the old primary to see the split brain", || {
        let (state, reason) = peer_state(&primary);
        state == PeerState::Diverged && reason.is_some_and(|r| r.contains("split brain"))
    });
    wait_for("the new primary to see the split brain", || {
        peer_state(&replica).0 == PeerState::Diverged
    });
    assert_eq!(view(&primary).link_starts, vec![1]);
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn suspend_and_resume_a_replica() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    primary.suspend("a", replica_node()).unwrap();
    let (state, reason) = peer_state(&primary);
    assert_eq!(state, PeerState::Suspended, "{reason:?}");
    write(&p, 4 << 20, 4096, 0x44);
    assert!(
        view(&primary).replication.replicas()[0]
            .dirty
            .dirty_regions()
            >= 1
    );
    assert!(
        read(&r, 4 << 20, 4096).iter().all(|&b| b == 0),
        "a suspended replica gets nothing"
    );
    assert_eq!(view(&primary).link_starts, vec![1]);
    primary.resume("a", replica_node()).unwrap();
    wait_for("a new link", || view(&primary).link_starts[0] >= 2);
    assert!(matches!(
        replica.suspend("a", primary_node()),
        Err(RuntimeError::Conflict(_))
    ));
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn resolve_discards_this_copy_only() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7, 8], &[7, 9]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("both sides diverged", || {
        peer_state(&primary).0 == PeerState::Diverged
    });
    let e = replica.resolve("a", primary_node()).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Conflict(m) if m.contains("run this on node")),
        "{e}"
    );
    let e = primary.resolve("a", primary_node()).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Conflict(m) if m.contains("demote")),
        "{e}"
    );
    replica.resolve("a", replica_node()).unwrap();
    assert!(view(&replica).replication.history().is_empty());
    // The primary's next attempt finds a copy that holds nothing: a full resync, no split.
    wait_for("a link after the resolve", || {
        view(&primary).link_starts[0] >= 1
    });
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

#[test]
fn a_replica_copy_is_not_exported() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let server = NbdServer::start(
        r.clone(),
        Arc::new(EngineCatalog {
            engine: r.clone(),
            read_only: vec![],
        }),
        ServerConfig {
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            ..Default::default()
        },
    )
    .unwrap();
    let BoundAddr::Tcp(addr) = server.addrs()[0].clone() else {
        panic!("tcp")
    };
    match Client::connect_tcp(addr, "a", Options::default()) {
        Err(ClientError::Refused { reply, message, .. }) => {
            assert_eq!(reply, REP_ERR_POLICY);
            assert!(message.contains("replica"), "{message}");
        }
        other => panic!("a replica copy was exported: {other:?}"),
    }
    // The primary's copy is exported as usual.
    let pserver = NbdServer::start(
        p.clone(),
        Arc::new(EngineCatalog {
            engine: p.clone(),
            read_only: vec![],
        }),
        ServerConfig {
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            ..Default::default()
        },
    )
    .unwrap();
    let BoundAddr::Tcp(paddr) = pserver.addrs()[0].clone() else {
        panic!("tcp")
    };
    let client = Client::connect_tcp(paddr, "a", Options::default()).expect("primary exports");
    drop(client.disconnect());
    let e = ringblock_transports::ublk::start_ublk_export(&r, "a", &Default::default())
        .err()
        .expect("ublk refuses a replica copy");
    assert!(e.to_string().contains("replica copy"), "{e}");
    server.stop();
    pserver.stop();
    drop((server, pserver));
    shutdown([p, r]);
}

/// An async replica: a burst far larger than its queue completes without waiting for it,
/// overflows the queue (the replica falls behind, a new generation starts), and the replica
/// is caught up from the bitmap until both copies are identical.
#[test]
fn an_async_replica_overflows_its_queue_and_catches_up() {
    const WRITES: u64 = 256;
    const LEN: u64 = 64 << 10;
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair_in(&p, &r, SECRET, |c| {
        let peer = &mut c.volumes[0].peers[0];
        peer.mode = PeerMode::Async;
        peer.queue_limit_bytes = LEN;
    });
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    let generations = view(&primary).replication.history().ids().len();
    // Every region in the persisted activity log first, so that no write of the burst
    // waits for a metadata round.
    write(&p, 0, VOLUME_BYTES, 0);
    let handle = p.open("a").unwrap();
    let port = Port::new(WRITES as usize, PortWaker::Thread(std::thread::current()));
    for i in 0..WRITES {
        let mut data = AlignedBuf::zeroed(LEN as usize);
        data.as_mut_slice().fill(i as u8 + 1);
        let req = request(RequestKind::Write, i * LEN, LEN, Some(IoBuf::owned(data)));
        handle.submit(req, &port).map_err(|(_, e)| e).unwrap();
    }
    let mut completed = 0;
    let until = Instant::now() + WAIT;
    while completed < WRITES {
        if let Some(c) = port.pop() {
            assert_eq!(c.result, Ok(()));
            completed += 1;
        } else {
            assert!(Instant::now() < until, "the burst never completed");
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    try_run(&p, request(RequestKind::Flush, 0, 0, None)).expect("flush");
    let v = view(&primary);
    let replica_state = &v.replication.replicas()[v.peers[0].1];
    wait_for("the replica caught up", || {
        peer_state(&primary).0 == PeerState::UpToDate
            && replica_state.dirty.dirty_regions() == 0
            && replica_state.status.lag.queued_bytes() == 0
            && view(&primary).link_starts[0] >= 2
    });
    assert!(
        v.replication.history().ids().len() > generations,
        "falling behind started a generation"
    );
    assert_eq!(
        view(&replica).replication.history().ids(),
        v.replication.history().ids(),
        "the caught-up replica took the primary's history"
    );
    assert!(
        read(&p, 0, VOLUME_BYTES as usize) == read(&r, 0, VOLUME_BYTES as usize),
        "the copies are identical"
    );
    primary.stop();
    replica.stop();
    drop((primary, replica, v));
    shutdown([p, r]);
}

/// Wait for the verify of "a" on `rt` to end, and return its only replica's report.
fn verified(rt: &PeerRuntime) -> ringblock_engine::replication::VerifySnapshot {
    wait_for("the verify ends", || {
        !rt.verify_status("a").unwrap().running
    });
    let report = rt.verify_status("a").unwrap();
    assert!(report.started_unix_ms.is_some() && report.finished_unix_ms.is_some());
    let peer = &report.peers[0];
    assert_eq!(peer.node, replica_node());
    assert_eq!(peer.skipped, None);
    peer.job.clone().expect("the replica was verified")
}

#[test]
fn verify_finds_a_region_changed_on_the_replica_and_repair_resyncs_it() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7, 8], &[7, 8]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    let none = primary.verify_status("a").unwrap();
    assert!(!none.running && none.started_unix_ms.is_none() && none.peers.is_empty());
    for mib in 0..VOLUME_BYTES >> 20 {
        write(&p, mib << 20, 1 << 20, 0x30 + mib as u8);
    }
    // Behind the primary's back: the replica's engine writes region 5 itself.
    write(&r, (5 << 20) + 4096, 4096, 0xEE);
    match replica.start_verify("a", true) {
        Err(RuntimeError::Conflict(m)) => assert!(
            m.contains("run the verify on the primary") && m.contains(&primary_node().to_string()),
            "{m}"
        ),
        other => panic!("a replica copy verifies: {other:?}"),
    }
    primary.start_verify("a", false).unwrap();
    let found = verified(&primary);
    assert_eq!(found.mismatched, vec![5 << 20..6 << 20]);
    assert_eq!((found.regions_checked, found.repaired), (16, false));

    primary.start_verify("a", true).unwrap();
    let repaired = verified(&primary);
    assert_eq!((repaired.mismatched_regions, repaired.repaired), (1, true));
    // The link reconnects and resyncs the region.
    wait_for("the link resynced", || {
        view(&primary).link_starts == vec![2] && peer_state(&primary).0 == PeerState::UpToDate
    });
    assert_eq!(read(&r, 5 << 20, 1 << 20), read(&p, 5 << 20, 1 << 20));
    primary.start_verify("a", false).unwrap();
    let clean = verified(&primary);
    assert_eq!((clean.regions_checked, clean.mismatched_regions), (16, 0));
    primary.stop();
    replica.stop();
    drop((primary, replica));
    shutdown([p, r]);
}

/// The primary's evictor empties the activity log of regions no longer written, once the
/// replica holds them durably; a later write to one puts it back and still reaches the
/// replica.
#[test]
fn the_activity_log_forgets_regions_the_replica_holds() {
    let (p, r) = (engine(), engine());
    records(&p, &r, &[7], &[7]);
    let (primary, replica) = pair(&p, &r, SECRET);
    wait_for("the link up to date", || {
        peer_state(&primary).0 == PeerState::UpToDate
    });
    for i in 0..8u64 {
        write(&p, i << 20, 4096, 0x30 + i as u8);
    }
    let v = view(&primary);
    assert!(v.replication.activity.dirty_regions() > 0);
    wait_for("the evictor to empty the activity log", || {
        v.replication.activity.dirty_regions() == 0
    });
    write(&p, 3 << 20, 4096, 0x77);
    assert!(
        v.replication.activity.dirty_regions() >= 1,
        "the write put its region back"
    );
    assert!(read(&r, 3 << 20, 4096).iter().all(|&b| b == 0x77));
    assert_eq!(peer_state(&primary).0, PeerState::UpToDate);
    primary.stop();
    replica.stop();
    drop((primary, replica, v));
    shutdown([p, r]);
}
