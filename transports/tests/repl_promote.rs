//! A promotion without a full sync, on real engines over Unix sockets: after a clean demote
//! of the primary and a promotion of its up-to-date replica, the new primary resyncs the old
//! one from its bitmap (the writes made since the promotion), not the whole volume, and the
//! copies end equal; a region the old primary holds differently (its own dirty regions, as
//! a crash leaves its activity log) is asked for and resynced too.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblock_engine::replication::{
    GenerationHistory, GenerationId, NodeId, PeerState, ReplicaState, Role, VolumeReplication,
};
use ringblock_engine::{
    AlignedBuf, DeviceConfig, Engine, EngineConfig, IoBuf, Port, PortWaker, Request, RequestKind,
};
use ringblock_transports::peer::runtime::{
    ListenAddress, PeerMode, PeerSpec, ReplicatedVolume, RuntimeConfig, RuntimeTiming,
    DEFAULT_ASYNC_QUEUE_BYTES,
};
use ringblock_transports::peer::{PeerAddress, PeerRuntime};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 16 * MIB;
const WAIT: Duration = Duration::from_secs(30);
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const LEFT: u128 = 0x1111;
const RIGHT: u128 = 0x2222;

fn node(n: u128) -> NodeId {
    NodeId::new(n).unwrap()
}

fn engine() -> Arc<Engine> {
    let engine = Engine::start(&EngineConfig {
        devices: vec![DeviceConfig::ram("r", 64 << 20)],
        cores: vec![0],
        ..Default::default()
    })
    .unwrap();
    engine.create_volume("r", "a", VOLUME_BYTES).unwrap();
    Arc::new(engine)
}

/// Node `me`'s runtime on `engine`, listening at `dir/me.sock`, its peer at `dir/peer.sock`.
fn start(engine: &Arc<Engine>, dir: &Path, me: u128, peer: u128, role: Role) -> PeerRuntime {
    let sock = |n: u128| dir.join(format!("{n:x}.sock"));
    let _ = std::fs::remove_file(sock(me));
    PeerRuntime::start(
        engine.clone(),
        RuntimeConfig {
            node: node(me),
            cluster: "lab".into(),
            secret: SECRET.to_vec(),
            listen: ListenAddress::Unix(sock(me)),
            volumes: vec![ReplicatedVolume {
                name: "a".into(),
                role,
                peers: vec![PeerSpec {
                    node: node(peer),
                    address: PeerAddress::Unix(sock(peer)),
                    mode: PeerMode::Sync,
                    queue_limit_bytes: DEFAULT_ASYNC_QUEUE_BYTES,
                }],
            }],
            timing: RuntimeTiming {
                backoff_base: Duration::from_millis(20),
                backoff_max: Duration::from_millis(400),
                diverged_retry: Duration::from_millis(300),
                stop_wait: Duration::from_secs(15),
                evict_interval: Duration::from_millis(200),
            },
            exports: None,
            membership_file: None,
        },
    )
    .unwrap()
}

/// Both copies in step in generation 7, LEFT the primary.
fn records_in_step(left: &Engine, right: &Engine) {
    let history = GenerationHistory::from_ids(vec![GenerationId::new(7).unwrap()]).unwrap();
    for (engine, role, peer) in [
        (left, Role::Primary, node(RIGHT)),
        (right, Role::Replica, node(LEFT)),
    ] {
        let v = engine.volume("a").unwrap();
        let state = VolumeReplication::new(role, v.max_size_bytes(), 20, &[peer]).unwrap();
        state.adopt_history(history.clone());
        for rep in state.replicas() {
            rep.set_full_sync(false);
        }
        v.set_replication(Some(Arc::new(state)));
        engine.flush_all().unwrap();
    }
}

/// `rt`'s only peer.
fn peer(rt: &PeerRuntime) -> Arc<ReplicaState> {
    let v = rt.volume("a").unwrap();
    v.replication.replicas()[v.peers[0].1].clone()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(engine: &Engine, req: Request) -> Option<IoBuf> {
    let handle = engine.open("a").unwrap();
    let port = Port::new(1, PortWaker::Thread(std::thread::current()));
    handle.submit(req, &port).map_err(|(_, e)| e).unwrap();
    let until = Instant::now() + WAIT;
    loop {
        if let Some(c) = port.pop() {
            c.result.expect("the request succeeds");
            return c.buf;
        }
        assert!(Instant::now() < until, "a request never completed");
        std::thread::park_timeout(Duration::from_millis(10));
    }
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

fn write(engine: &Engine, offset: u64, len: u64, fill: u8) {
    let mut data = AlignedBuf::zeroed(len as usize);
    data.as_mut_slice().fill(fill);
    run(
        engine,
        request(RequestKind::Write, offset, len, Some(IoBuf::owned(data))),
    );
    run(engine, request(RequestKind::Flush, 0, 0, None));
}

fn all(engine: &Engine) -> Vec<u8> {
    let buf = IoBuf::owned(AlignedBuf::zeroed(VOLUME_BYTES as usize));
    run(
        engine,
        request(RequestKind::Read, 0, VOLUME_BYTES, Some(buf)),
    )
    .expect("read buffer")
    .as_slice()
    .to_vec()
}

fn shutdown(engines: Vec<Arc<Engine>>) {
    for e in engines {
        Arc::try_unwrap(e)
            .ok()
            .expect("only the test holds the engine")
            .shutdown()
            .unwrap();
    }
}

/// LEFT primary and RIGHT replica up to date with 4 MiB written; LEFT demoted cleanly,
/// RIGHT promoted while LEFT's runtime is stopped (so nothing reaches LEFT until it starts
/// again). Returns the engines and RIGHT's runtime.
fn switch_over(dir: &Path) -> (Arc<Engine>, Arc<Engine>, PeerRuntime) {
    let (left, right) = (engine(), engine());
    records_in_step(&left, &right);
    let replica = start(&right, dir, RIGHT, LEFT, Role::Replica);
    let primary = start(&left, dir, LEFT, RIGHT, Role::Primary);
    wait_for("the link up to date", || {
        peer(&primary).status.state() == PeerState::UpToDate
    });
    write(&left, 0, 4 * MIB, 0x31);
    primary.demote("a").unwrap();
    primary.stop();
    wait_for("the old primary's link gone", || {
        replica.volume("a").unwrap().primary_connected.is_none()
    });
    replica.promote("a", false).unwrap();
    let p = peer(&replica);
    assert!(
        !p.full_sync() && p.since().is_some(),
        "the primary this copy followed is tracked from its last generation"
    );
    (left, right, replica)
}

#[test]
fn a_clean_switchover_resyncs_only_what_the_new_primary_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right, primary) = switch_over(dir.path());
    // Written on the new primary while the old one is away: one region.
    write(&right, 8 * MIB, MIB, 0x42);
    let old = start(&left, dir.path(), LEFT, RIGHT, Role::Replica);
    wait_for("the old primary up to date", || {
        peer(&primary).status.state() == PeerState::UpToDate
    });
    let s = peer(&primary).status.resync.snapshot(0);
    assert_eq!(
        (s.total_bytes, s.done_bytes),
        (MIB, MIB),
        "only the region written since the promotion is resynced (not {VOLUME_BYTES} bytes)"
    );
    assert!(all(&left) == all(&right), "the copies are equal");
    for rt in [old, primary] {
        rt.stop();
    }
    shutdown(vec![left, right]);
}

#[test]
fn the_old_primarys_own_dirty_regions_are_asked_for_and_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let (left, right, primary) = switch_over(dir.path());
    write(&right, 8 * MIB, MIB, 0x42);
    // What a crash of the old primary leaves: a region it wrote and the new one does not
    // hold, in its dirty bitmap for it (the loader folds the activity log in).
    write(&left, 12 * MIB, 64 << 10, 0x99);
    let own = left.volume("a").unwrap().replication().unwrap();
    let for_right = &own.replica(node(RIGHT)).unwrap().dirty;
    assert_eq!(for_right.dirty_regions(), 0, "a clean demote left nothing");
    for_right.mark_bytes(12 * MIB, 64 << 10);
    assert!(all(&left) != all(&right));
    let old = start(&left, dir.path(), LEFT, RIGHT, Role::Replica);
    wait_for("the old primary up to date", || {
        peer(&primary).status.state() == PeerState::UpToDate
    });
    let s = peer(&primary).status.resync.snapshot(0);
    assert_eq!(
        (s.total_bytes, s.done_bytes),
        (2 * MIB, 2 * MIB),
        "the new primary's region and the one the old primary asked for"
    );
    assert!(all(&left) == all(&right), "the copies are equal");
    for rt in [old, primary] {
        rt.stop();
    }
    shutdown(vec![left, right]);
}
