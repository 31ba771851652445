//! Peers added and removed at runtime, and suspensions, on real engines and real sockets
//! (loopback TCP): a third copy added (async) while the daemon runs is fully synced and ends
//! equal; a
//! removed copy no longer holds writes back, and no request is left waiting; the membership
//! file keeps both changes, and a suspension, across a restart of the runtime; a replica
//! dropped from the configuration without `replica remove` is still refused.

#[path = "support/repl.rs"]
mod repl;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use repl::runtime::{address, node, read, record, sync_peer, unused, wait_for, write, SECRET};
use repl::shutdown;
use ringblock_engine::replication::{GenerationHistory, GenerationId, PeerState, Role};
use ringblock_engine::Engine;
use ringblock_transports::peer::runtime::{
    PeerMode, RuntimeConfig, VolumeView, DEFAULT_ASYNC_QUEUE_BYTES,
};
use ringblock_transports::peer::{PeerAddress, PeerRuntime, RuntimeError};

const VOLUME_BYTES: u64 = 16 << 20;

const PRIMARY: u128 = 0x1111;
const FIRST: u128 = 0x2222;
const THIRD: u128 = 0x3333;

fn engine() -> Arc<Engine> {
    repl::runtime::engine(VOLUME_BYTES)
}

/// Node `me`'s configuration for volume "a" in `role`, its sync peers on loopback TCP.
fn config(
    me: u128,
    role: Role,
    peers: &[(u128, PeerAddress)],
    membership_file: Option<PathBuf>,
) -> RuntimeConfig {
    let peers = peers
        .iter()
        .map(|(n, address)| sync_peer(node(*n), address.clone(), DEFAULT_ASYNC_QUEUE_BYTES))
        .collect();
    RuntimeConfig {
        membership_file,
        ..repl::runtime::config(node(me), role, peers, repl::runtime::loopback(), SECRET)
    }
}

/// A replica copy of "a" on `engine` that follows `PRIMARY`.
fn replica(engine: &Arc<Engine>, me: u128) -> PeerRuntime {
    PeerRuntime::start(
        engine.clone(),
        config(me, Role::Replica, &[(PRIMARY, unused())], None),
    )
    .unwrap()
}

/// Both copies in step in generation 7 (the primary tracks `FIRST` as up to date).
fn records_in_step(p: &Engine, r: &Engine) {
    let history = GenerationHistory::from_ids(vec![GenerationId::new(7).unwrap()]).unwrap();
    record(p, Role::Primary, node(FIRST), history.clone());
    record(r, Role::Replica, node(PRIMARY), history);
}

fn view(rt: &PeerRuntime) -> VolumeView {
    rt.volume("a").expect("volume a is replicated")
}

/// The state of peer `n` as `rt` sees it.
fn state_of(rt: &PeerRuntime, n: u128) -> Option<PeerState> {
    let v = view(rt);
    let (_, index) = v.peers.iter().find(|(s, _)| s.node == node(n))?;
    Some(v.replication.replicas()[*index].status.state())
}

fn all(engine: &Engine) -> Vec<u8> {
    read(engine, 0, VOLUME_BYTES as usize)
}

fn membership_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_third_copy_added_at_runtime_is_fully_synced_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("replication-membership");
    let (p, r1, r3) = (engine(), engine(), engine());
    records_in_step(&p, &r1);
    write(&p, 0, 1 << 20, 0x31);
    write(&r1, 0, 1 << 20, 0x31);
    // The new copy holds other bytes: the full sync must replace them.
    write(&r3, 3 << 20, 1 << 20, 0xEE);
    let first = replica(&r1, FIRST);
    let third = replica(&r3, THIRD);
    let cfg = config(
        PRIMARY,
        Role::Primary,
        &[(FIRST, address(&first))],
        Some(file.clone()),
    );
    let primary = PeerRuntime::start(p.clone(), cfg.clone()).unwrap();
    wait_for("the first replica up to date", || {
        state_of(&primary, FIRST) == Some(PeerState::UpToDate)
    });
    write(&p, 6 << 20, 256 << 10, 0x36);

    // Refusals first: this node, a peer already there, an unknown volume.
    for (n, want) in [(PRIMARY, "this node"), (FIRST, "already")] {
        let e = primary
            .add_replica("a", node(n), address(&third), PeerMode::Sync)
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    assert!(matches!(
        primary.add_replica("b", node(THIRD), address(&third), PeerMode::Sync),
        Err(RuntimeError::NotFound(_))
    ));
    let history = view(&primary).replication.history();
    primary
        .add_replica("a", node(THIRD), address(&third), PeerMode::Async)
        .unwrap();
    // Durable before the call returned: the record lists it, lacking everything.
    let record = p.volume("a").unwrap().replication().unwrap().record();
    let added = record
        .replicas
        .iter()
        .find(|r| r.node == node(THIRD))
        .expect("the record lists the new replica");
    assert!(added.full_sync && !added.dirty.is_empty());
    assert!(membership_text(&file).contains(&format!("add\ta\t{}", node(THIRD))));
    assert_eq!(
        view(&primary).replication.history(),
        history,
        "adding a copy changes no generation"
    );
    wait_for("the third copy up to date", || {
        state_of(&primary, THIRD) == Some(PeerState::UpToDate)
    });
    assert!(all(&p) == all(&r3), "the third copy equals the primary");
    // Both replicas now hold every write.
    write(&p, 9 << 20, 4096, 0xa5);
    // The sync replica has it when the write completes; the async one soon after.
    assert!(read(&r1, 9 << 20, 4096).iter().all(|&b| b == 0xa5));
    wait_for("the async copy to get the write", || {
        read(&r3, 9 << 20, 4096).iter().all(|&b| b == 0xa5)
    });

    // A restart of the runtime (same configuration, which does not list the third copy)
    // keeps it: the membership file says it was added.
    primary.stop();
    drop(primary);
    let primary = PeerRuntime::start(p.clone(), cfg).unwrap();
    assert_eq!(view(&primary).peers.len(), 2);
    wait_for("the third copy up to date again", || {
        state_of(&primary, THIRD) == Some(PeerState::UpToDate)
    });
    write(&p, 10 << 20, 4096, 0xa6);
    wait_for("the async copy to get the write", || {
        read(&r3, 10 << 20, 4096).iter().all(|&b| b == 0xa6)
    });
    for rt in [primary, first, third] {
        rt.stop();
    }
    shutdown(vec![p, r1, r3]);
}

#[test]
fn a_removed_copy_no_longer_holds_writes_and_stays_removed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("replication-membership");
    let (p, r1) = (engine(), engine());
    records_in_step(&p, &r1);
    let first = replica(&r1, FIRST);
    let listed = config(
        PRIMARY,
        Role::Primary,
        &[(FIRST, address(&first))],
        Some(file.clone()),
    );
    // A replica dropped from the configuration without `replica remove` is refused.
    let dropped = config(PRIMARY, Role::Primary, &[], Some(file.clone()));
    let e = PeerRuntime::start(p.clone(), dropped.clone()).unwrap_err();
    assert!(e.to_string().contains("ringblock replica remove"), "{e}");

    let primary = PeerRuntime::start(p.clone(), listed.clone()).unwrap();
    wait_for("the replica up to date", || {
        state_of(&primary, FIRST) == Some(PeerState::UpToDate)
    });
    let generations = view(&primary).replication.history().ids().len();
    // Writes run while the replica is removed: every one completes (the link's waiting ops
    // go through its failure path), none is left waiting.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) || n < 8 {
                write(&p, (n % 12) << 20, 64 << 10, (n % 255 + 1) as u8);
                n += 1;
            }
            n
        })
    };
    wait_for("writes reaching the replica", || {
        read(&r1, 0, 4096).iter().any(|&b| b != 0)
    });
    let message = primary.remove_replica("a", node(FIRST)).unwrap();
    assert!(message.contains("removed"), "{message}");
    stop.store(true, Ordering::Release);
    let written = writer.join().expect("every write completed");
    assert!(written >= 8);
    let v = view(&primary);
    assert!(v.peers.is_empty());
    assert!(v.replication.replicas().is_empty());
    assert!(
        v.replication.history().ids().len() > generations,
        "an up-to-date replica left: a new generation"
    );
    let record = p.volume("a").unwrap().replication().unwrap().record();
    assert!(record.replicas.is_empty(), "the record dropped it");
    assert!(membership_text(&file).contains(&format!("remove\ta\t{}", node(FIRST))));
    // Writes no longer go to it.
    write(&p, 14 << 20, 4096, 0x5a);
    assert!(read(&r1, 14 << 20, 4096).iter().all(|&b| b == 0));
    assert!(matches!(
        primary.remove_replica("a", node(FIRST)),
        Err(RuntimeError::NotFound(_))
    ));

    // Restarts keep it removed, whether the configuration still lists it or not.
    for cfg in [listed, dropped] {
        primary.stop();
        let restarted = PeerRuntime::start(p.clone(), cfg).unwrap();
        assert!(view(&restarted).peers.is_empty());
        write(&p, 15 << 20, 4096, 0x5b);
        assert!(read(&r1, 15 << 20, 4096).iter().all(|&b| b == 0));
        restarted.stop();
    }
    primary.stop();
    drop(primary);
    first.stop();
    drop(first);
    shutdown(vec![p, r1]);
}

#[test]
fn a_replica_copy_lets_an_added_primary_in_and_refuses_to_drop_a_connected_one() {
    let (p, r1) = (engine(), engine());
    // The replica copy lists another node only; the operator adds the primary at runtime.
    let first = PeerRuntime::start(
        r1.clone(),
        config(FIRST, Role::Replica, &[(THIRD, unused())], None),
    )
    .unwrap();
    let primary = PeerRuntime::start(
        p.clone(),
        config(PRIMARY, Role::Primary, &[(FIRST, address(&first))], None),
    )
    .unwrap();
    write(&p, 0, 64 << 10, 0x17);
    // Not a configured peer of the replica copy: the connection is refused after the
    // handshake, before anything is served.
    wait_for("a connection attempt", || {
        view(&primary).link_starts[0] >= 1
    });
    assert!(read(&r1, 0, 4096).iter().all(|&b| b == 0));
    first
        .add_replica("a", node(PRIMARY), unused(), PeerMode::Sync)
        .unwrap();
    wait_for("the primary let in and up to date", || {
        state_of(&primary, FIRST) == Some(PeerState::UpToDate)
    });
    assert!(all(&p) == all(&r1));
    let e = first.remove_replica("a", node(PRIMARY)).unwrap_err();
    assert!(
        matches!(&e, RuntimeError::Conflict(m) if m.contains("connected as this copy's primary")),
        "{e}"
    );
    // The other way round: the primary drops it, then the replica copy drops the primary.
    primary.remove_replica("a", node(FIRST)).unwrap();
    wait_for("the connection gone", || {
        view(&first).primary_connected.is_none()
    });
    first.remove_replica("a", node(PRIMARY)).unwrap();
    assert_eq!(view(&first).peers.len(), 1);
    for rt in [primary, first] {
        rt.stop();
    }
    shutdown(vec![p, r1]);
}

#[test]
fn a_suspension_survives_a_restart_until_resume() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("replication-membership");
    let (p, r1) = (engine(), engine());
    records_in_step(&p, &r1);
    let first = replica(&r1, FIRST);
    let cfg = config(
        PRIMARY,
        Role::Primary,
        &[(FIRST, address(&first))],
        Some(file.clone()),
    );
    let primary = PeerRuntime::start(p.clone(), cfg.clone()).unwrap();
    wait_for("the replica up to date", || {
        state_of(&primary, FIRST) == Some(PeerState::UpToDate)
    });
    primary.suspend("a", node(FIRST)).unwrap();
    assert!(membership_text(&file).contains(&format!("suspend\ta\t{}", node(FIRST))));
    primary.stop();
    drop(primary);

    let primary = PeerRuntime::start(p.clone(), cfg.clone()).unwrap();
    assert_eq!(view(&primary).suspended, vec![true]);
    wait_for("the status says suspended", || {
        state_of(&primary, FIRST) == Some(PeerState::Suspended)
    });
    write(&p, 4 << 20, 4096, 0x44);
    assert!(
        read(&r1, 4 << 20, 4096).iter().all(|&b| b == 0),
        "a suspended replica gets nothing after a restart"
    );
    assert_eq!(view(&primary).link_starts, vec![0]);
    primary.resume("a", node(FIRST)).unwrap();
    assert!(!membership_text(&file).contains("suspend"));
    wait_for("the replica up to date after resume", || {
        state_of(&primary, FIRST) == Some(PeerState::UpToDate)
    });
    assert!(read(&r1, 4 << 20, 4096).iter().all(|&b| b == 0x44));
    primary.stop();
    drop(primary);
    // Resumed for good: a restart links it at once.
    let primary = PeerRuntime::start(p.clone(), cfg).unwrap();
    assert_eq!(view(&primary).suspended, vec![false]);
    wait_for("linked after the restart", || {
        view(&primary).link_starts[0] >= 1
    });
    for rt in [primary, first] {
        rt.stop();
    }
    shutdown(vec![p, r1]);
}

#[test]
fn a_damaged_membership_file_stops_the_start_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("replication-membership");
    std::fs::write(&file, "ringblock-replication-membership 1\nadd\ta\n").unwrap();
    let p = engine();
    let e = PeerRuntime::start(
        p.clone(),
        config(PRIMARY, Role::Primary, &[(FIRST, unused())], Some(file)),
    )
    .unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("line 2") && e.contains("ringblock replica"),
        "{e}"
    );
    shutdown(vec![p]);
}
