use proptest::prelude::*;
use ringblock_engine::replication::{NodeId as EngineNodeId, ReplicaRecord, ResyncScope};

use super::*;
use crate::peer::body::GenerationHistory as WireHistory;
use crate::peer::{NodeId as WireNodeId, ReplicatedVolumeId, Seq};

fn g(n: u64) -> GenerationId {
    GenerationId::new(n).expect("test ids are not 0")
}

fn h(ids: &[u64]) -> GenerationHistory {
    GenerationHistory::from_ids(ids.iter().map(|&n| g(n)).collect()).unwrap()
}

fn session(peer_ids: &[u64]) -> Session {
    Session {
        version: 1,
        volume: ReplicatedVolumeId(1),
        peer_node: WireNodeId(2),
        peer_history: WireHistory::new(peer_ids.to_vec()).unwrap(),
        peer_volume_size_bytes: 1 << 30,
        region_size_bytes: 1 << 20,
        next_send: Seq(2),
        next_recv: Seq(2),
    }
}

fn primary(ids: &[u64], tracking: Option<Tracking>) -> LocalCopy {
    LocalCopy {
        role: Role::Primary,
        history: h(ids),
        tracking,
    }
}

fn replica(ids: &[u64]) -> LocalCopy {
    LocalCopy {
        role: Role::Replica,
        history: h(ids),
        tracking: None,
    }
}

fn tracked(since: Option<u64>, full_sync: bool) -> Option<Tracking> {
    Some(Tracking {
        since: since.map(g),
        full_sync,
    })
}

#[test]
fn in_sync_is_up_to_date_for_either_role() {
    let s = session(&[1, 2]);
    assert_eq!(
        decide(&primary(&[1, 2], tracked(None, false)), &s),
        LinkDecision::UpToDate
    );
    assert_eq!(decide(&replica(&[1, 2]), &s), LinkDecision::UpToDate);
}

#[test]
fn a_primary_resyncs_a_peer_behind_from_its_bitmap_when_it_covers_the_gap() {
    let d = decide(
        &primary(&[1, 2, 3], tracked(Some(2), false)),
        &session(&[1, 2]),
    );
    assert_eq!(
        d,
        LinkDecision::ResyncPeer {
            since: Some(g(2)),
            scope: ResyncScope::Bitmap
        }
    );
}

#[test]
fn a_primary_resyncs_everything_when_its_bitmap_does_not_cover_the_gap() {
    let s = session(&[1, 2]);
    let full = |tracking| match decide(&primary(&[1, 2, 3], tracking), &s) {
        LinkDecision::ResyncPeer { since, scope } => {
            assert_eq!(since, Some(g(2)));
            scope
        }
        other => panic!("expected a resync, got {other:?}"),
    };
    // The bitmap started in another generation, or nothing was tracked, or a full sync is
    // pending anyway.
    assert_eq!(full(tracked(Some(3), false)), ResyncScope::Full);
    assert_eq!(full(tracked(Some(1), false)), ResyncScope::Full);
    assert_eq!(full(tracked(None, false)), ResyncScope::Full);
    assert_eq!(full(tracked(Some(2), true)), ResyncScope::Full);
}

#[test]
fn a_new_replica_gets_a_full_sync() {
    let d = decide(&primary(&[1, 2], tracked(None, true)), &session(&[]));
    assert_eq!(
        d,
        LinkDecision::ResyncPeer {
            since: None,
            scope: ResyncScope::Full
        }
    );
    // And the new replica, seeing the primary's history, waits for it.
    assert_eq!(
        decide(&replica(&[]), &session(&[1, 2])),
        LinkDecision::SyncTarget { since: None }
    );
}

#[test]
fn a_peer_behind_that_is_not_a_replica_here_gets_nothing() {
    assert_eq!(
        decide(&primary(&[1, 2], None), &session(&[1])),
        LinkDecision::Refuse(LinkRefusal::NotAReplica)
    );
}

#[test]
fn a_replica_ahead_of_its_peer_is_never_a_sync_source() {
    assert_eq!(
        decide(&replica(&[1, 2]), &session(&[1])),
        LinkDecision::Refuse(LinkRefusal::ReplicaAhead { since: Some(g(1)) })
    );
}

#[test]
fn a_replica_behind_becomes_a_sync_target() {
    assert_eq!(
        decide(&replica(&[1]), &session(&[1, 2, 3])),
        LinkDecision::SyncTarget { since: Some(g(1)) }
    );
}

#[test]
fn a_primary_behind_refuses_to_be_primary() {
    assert_eq!(
        decide(&primary(&[1], tracked(None, false)), &session(&[1, 2])),
        LinkDecision::Refuse(LinkRefusal::PrimaryBehind { since: Some(g(1)) })
    );
}

#[test]
fn diverged_copies_move_nothing_whatever_the_role() {
    let s = session(&[1, 2, 4]);
    let diverged = LinkDecision::Diverged { common: g(2) };
    assert_eq!(
        decide(&primary(&[1, 2, 3], tracked(Some(2), false)), &s),
        diverged
    );
    assert_eq!(decide(&replica(&[1, 2, 3]), &s), diverged);
}

#[test]
fn unrelated_copies_are_refused() {
    assert_eq!(
        decide(
            &primary(&[1, 2], tracked(Some(1), false)),
            &session(&[3, 4])
        ),
        LinkDecision::Refuse(LinkRefusal::Unrelated)
    );
    assert_eq!(
        decide(&replica(&[1, 2]), &session(&[3, 4])),
        LinkDecision::Refuse(LinkRefusal::Unrelated)
    );
}

#[test]
fn a_peer_history_longer_than_ours_is_judged_by_its_newest_ids() {
    // 64 ids on the wire; we keep 32. Our current generation is among its newest: it is ahead.
    let peer: Vec<u64> = (1..=64).collect();
    assert_eq!(
        decide(&replica(&[40]), &session(&peer)),
        LinkDecision::SyncTarget { since: Some(g(40)) }
    );
    // Our current generation fell out of the ids we keep: unrelated, refused, never guessed.
    assert_eq!(
        decide(&replica(&[10]), &session(&peer)),
        LinkDecision::Refuse(LinkRefusal::Unrelated)
    );
}

#[test]
fn from_record_finds_the_peers_tracking() {
    let node = |n| EngineNodeId::new(n).unwrap();
    let record = ReplicationRecord {
        role: Role::Primary,
        region_shift: 20,
        history: h(&[1, 2]),
        replicas: vec![
            ReplicaRecord {
                node: node(5),
                since: Some(g(1)),
                full_sync: false,
                dirty: vec![0..4, 8..9],
            },
            ReplicaRecord {
                node: node(6),
                since: None,
                full_sync: true,
                dirty: vec![],
            },
        ],
        activity: vec![],
    };
    let copy = LocalCopy::from_record(&record, WireNodeId(5));
    assert_eq!(copy.role, Role::Primary);
    assert_eq!(copy.history, h(&[1, 2]));
    assert_eq!(copy.tracking, tracked(Some(1), false));
    assert_eq!(
        LocalCopy::from_record(&record, WireNodeId(6)).tracking,
        tracked(None, true)
    );
    assert_eq!(
        LocalCopy::from_record(&record, WireNodeId(7)).tracking,
        None
    );
    assert_eq!(
        LocalCopy::from_record(&record, WireNodeId(0)).tracking,
        None
    );
}

/// Two copies that followed one primary for a while, then each went on alone for a few
/// generations (possibly none).
fn two_histories() -> impl Strategy<Value = (Vec<u64>, Vec<u64>)> {
    (0usize..6, 0usize..4, 0usize..4).prop_map(|(shared, a, b)| {
        let common: Vec<u64> = (1..=shared as u64).collect();
        let mut left = common.clone();
        left.extend((0..a as u64).map(|i| 100 + i));
        let mut right = common;
        right.extend((0..b as u64).map(|i| 200 + i));
        (left, right)
    })
}

proptest! {
    /// Both ends decide alone, and their decisions fit: a resync on one end is a sync target on
    /// the other, and anything else is the same kind on both (nothing moves unless both agree).
    #[test]
    fn both_ends_of_a_link_agree((p, r) in two_histories(), bitmap_from in 0u64..8) {
        let tracking = tracked(Some(bitmap_from).filter(|&n| n != 0), false);
        let at_primary = decide(&primary(&p, tracking), &session(&r));
        let at_replica = decide(&replica(&r), &session(&p));
        match (at_primary, at_replica) {
            (LinkDecision::ResyncPeer { since: a, .. }, LinkDecision::SyncTarget { since: b }) => {
                prop_assert_eq!(a, b);
            }
            (LinkDecision::UpToDate, LinkDecision::UpToDate) => {}
            (LinkDecision::Diverged { common: a }, LinkDecision::Diverged { common: b }) => {
                prop_assert_eq!(a, b);
            }
            (LinkDecision::Refuse(_), LinkDecision::Refuse(_)) => {}
            (a, b) => prop_assert!(false, "primary decides {:?}, replica {:?}", a, b),
        }
    }
}
