//! A promotion without a full sync, on real engines over Unix sockets: after a clean demote
//! of the primary and a promotion of its up-to-date replica, the new primary resyncs the old
//! one from its bitmap (the writes made since the promotion), not the whole volume, and the
//! copies end equal; a region the old primary holds differently (its own dirty regions, as
//! a crash leaves its activity log) is asked for and resynced too.

#[path = "support/repl.rs"]
mod repl;

use std::path::Path;
use std::sync::Arc;

use repl::runtime::{node, read, record, sync_peer, wait_for, write, SECRET};
use repl::{shutdown, MIB};
use ringblock_engine::replication::{
    GenerationHistory, GenerationId, PeerState, ReplicaState, Role,
};
use ringblock_engine::Engine;
use ringblock_transports::peer::runtime::{ListenAddress, DEFAULT_ASYNC_QUEUE_BYTES};
use ringblock_transports::peer::{PeerAddress, PeerRuntime};

const VOLUME_BYTES: u64 = 16 * MIB;
const LEFT: u128 = 0x1111;
const RIGHT: u128 = 0x2222;

fn engine() -> Arc<Engine> {
    repl::runtime::engine(VOLUME_BYTES)
}

/// Node `me`'s runtime on `engine`, listening at `dir/me.sock`, its peer at `dir/peer.sock`.
fn start(engine: &Arc<Engine>, dir: &Path, me: u128, peer: u128, role: Role) -> PeerRuntime {
    let sock = |n: u128| dir.join(format!("{n:x}.sock"));
    let _ = std::fs::remove_file(sock(me));
    let peers = vec![sync_peer(
        node(peer),
        PeerAddress::Unix(sock(peer)),
        DEFAULT_ASYNC_QUEUE_BYTES,
    )];
    let listen = ListenAddress::Unix(sock(me));
    PeerRuntime::start(
        engine.clone(),
        repl::runtime::config(node(me), role, peers, listen, SECRET),
    )
    .unwrap()
}

/// Both copies in step in generation 7, LEFT the primary.
fn records_in_step(left: &Engine, right: &Engine) {
    let history = GenerationHistory::from_ids(vec![GenerationId::new(7).unwrap()]).unwrap();
    record(left, Role::Primary, node(RIGHT), history.clone());
    record(right, Role::Replica, node(LEFT), history);
}

/// `rt`'s only peer.
fn peer(rt: &PeerRuntime) -> Arc<ReplicaState> {
    let v = rt.volume("a").unwrap();
    v.replication.replicas()[v.peers[0].1].clone()
}

fn all(engine: &Engine) -> Vec<u8> {
    read(engine, 0, VOLUME_BYTES as usize)
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
