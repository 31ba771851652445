use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::replication::ReplicationError;

fn g(n: u64) -> GenerationId {
    GenerationId::new(n).expect("test ids are not 0")
}

fn h(ids: &[u64]) -> GenerationHistory {
    GenerationHistory::from_ids(ids.iter().map(|&n| g(n)).collect()).unwrap()
}

#[test]
fn the_table() {
    use Relation::*;
    // (local, peer, expected): every row of the DRBD-style decision table.
    let rows: &[(&[u64], &[u64], Relation)] = &[
        // Nothing on either side, or the same current generation.
        (&[], &[], InSync),
        (&[1], &[1], InSync),
        (&[1, 2, 3], &[1, 2, 3], InSync),
        // The same current generation is all that matters (older entries may have been
        // dropped from one bounded history).
        (&[2, 3], &[1, 2, 3], InSync),
        // A new replica (no data): full sync from the side that has data.
        (&[1, 2], &[], PeerBehind { since: None }),
        (&[], &[1, 2], LocalBehind { since: None }),
        // The peer stopped following one or several generations ago.
        (&[1, 2], &[1], PeerBehind { since: Some(g(1)) }),
        (&[1, 2, 3, 4], &[1, 2], PeerBehind { since: Some(g(2)) }),
        // The peer's older history was trimmed: its current generation still decides.
        (&[1, 2, 3], &[2], PeerBehind { since: Some(g(2)) }),
        // The mirror.
        (&[1], &[1, 2], LocalBehind { since: Some(g(1)) }),
        (&[1, 2], &[1, 2, 3, 4], LocalBehind { since: Some(g(2)) }),
        // Both advanced from a common generation: split brain.
        (&[1, 2], &[1, 3], Diverged { common: g(1) }),
        (&[1, 2, 3, 5, 6], &[1, 2, 3, 7], Diverged { common: g(3) }),
        (&[1, 2, 4], &[1, 3], Diverged { common: g(1) }),
        // Nothing in common: different volumes, or the common one fell out of a history.
        (&[1, 2], &[3, 4], Unrelated),
        (&[5], &[6], Unrelated),
        // Histories that disagree on the order of events are not trusted either way.
        (&[1, 2], &[2, 1], Unrelated),
        (&[1, 2, 3], &[2, 1, 4], Unrelated),
    ];
    for (local, peer, expected) in rows {
        let (l, p) = (h(local), h(peer));
        assert_eq!(compare(&l, &p), *expected, "local {local:?} peer {peer:?}");
        assert_eq!(
            compare(&p, &l),
            expected.mirror(),
            "mirror of local {local:?} peer {peer:?}"
        );
    }
}

#[test]
fn resync_scope_needs_a_bitmap_from_exactly_the_common_generation() {
    assert_eq!(resync_scope(Some(g(2)), Some(g(2))), ResyncScope::Bitmap);
    // The bitmap started later: writes between 2 and 3 are not in it.
    assert_eq!(resync_scope(Some(g(2)), Some(g(3))), ResyncScope::Full);
    // No bitmap, or a new replica.
    assert_eq!(resync_scope(Some(g(2)), None), ResyncScope::Full);
    assert_eq!(resync_scope(None, Some(g(2))), ResyncScope::Full);
}

#[test]
fn histories_are_bounded_unique_and_never_hold_zero() {
    assert_eq!(GenerationId::new(0), None);
    let mut hist = GenerationHistory::created();
    let first = hist.current().unwrap();
    assert_ne!(first.get(), 0);
    for _ in 0..MAX_HISTORY {
        let id = hist.start_new();
        assert_eq!(hist.current(), Some(id));
    }
    assert_eq!(hist.ids().len(), MAX_HISTORY);
    assert!(hist.is_full());
    assert!(!hist.contains(first), "the oldest generation is dropped");
    let too_long = (1..=MAX_HISTORY as u64 + 1).map(g).collect();
    assert_eq!(
        GenerationHistory::from_ids(too_long),
        Err(ReplicationError::HistoryTooLong(MAX_HISTORY + 1))
    );
    assert_eq!(
        GenerationHistory::from_ids(vec![g(1), g(2), g(1)]),
        Err(ReplicationError::DuplicateGeneration(g(1)))
    );
    let mut small = h(&[1, 2]);
    assert_eq!(
        small.push(g(1)),
        Err(ReplicationError::DuplicateGeneration(g(1)))
    );
    assert_eq!(small, h(&[1, 2]), "left as it was");
    small.push(g(3)).unwrap();
    assert_eq!(small.current(), Some(g(3)));
}

fn arb_history() -> impl Strategy<Value = GenerationHistory> {
    // A small alphabet so that histories overlap often.
    proptest::collection::vec(1u64..12, 0..8).prop_map(|mut ids| {
        let mut seen = BTreeSet::new();
        ids.retain(|id| seen.insert(*id));
        h(&ids)
    })
}

/// One side of the simulated pair.
#[derive(Clone, Debug)]
struct Node {
    history: GenerationHistory,
    /// region -> id of the write it holds.
    data: BTreeMap<u8, u64>,
    /// Every write this copy holds (directly or through a resync).
    seen: BTreeSet<u64>,
    primary: bool,
    /// Regions written since the peer was last up to date, and the generation it was last up
    /// to date in: this node's bitmap for the peer.
    bitmap: Option<(Option<GenerationId>, BTreeSet<u8>)>,
}

impl Node {
    /// The first change while apart starts a generation and a bitmap for the peer.
    fn diverge(&mut self) {
        let since = self.history.current();
        self.history.start_new();
        self.bitmap.get_or_insert((since, BTreeSet::new()));
    }
}

#[derive(Clone, Debug)]
enum Event {
    /// A write by node B (else A), if it is primary; to both while connected.
    Write {
        by_b: bool,
        region: u8,
    },
    Disconnect,
    /// Compare histories, resync if one side is behind.
    Reconnect,
    Promote {
        b: bool,
    },
    /// The operator discards one side of a split brain.
    Resolve {
        discard_b: bool,
    },
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (any::<bool>(), 0u8..16).prop_map(|(by_b, region)| Event::Write { by_b, region }),
        2 => Just(Event::Disconnect),
        2 => Just(Event::Reconnect),
        1 => any::<bool>().prop_map(|b| Event::Promote { b }),
        1 => any::<bool>().prop_map(|discard_b| Event::Resolve { discard_b }),
    ]
}

struct Pair {
    nodes: [Node; 2],
    connected: bool,
    /// A node was promoted while the two were apart (since they were last in sync): the only
    /// way both can have written without the other.
    promoted_apart: bool,
    next_write: u64,
}

impl Pair {
    fn new() -> Pair {
        let history = GenerationHistory::created();
        let node = |primary| Node {
            history: history.clone(),
            data: BTreeMap::new(),
            seen: BTreeSet::new(),
            primary,
            bitmap: None,
        };
        Pair {
            nodes: [node(true), node(false)],
            connected: true,
            promoted_apart: false,
            next_write: 1,
        }
    }

    fn run(&mut self, e: &Event) -> Result<(), TestCaseError> {
        match *e {
            Event::Write { by_b, region } => {
                let w = usize::from(by_b);
                if !self.nodes[w].primary {
                    return Ok(());
                }
                let id = self.next_write;
                self.next_write += 1;
                let targets: &[usize] = if self.connected { &[0, 1] } else { &[w] };
                for &t in targets {
                    self.nodes[t].data.insert(region, id);
                    self.nodes[t].seen.insert(id);
                }
                if !self.connected {
                    let n = &mut self.nodes[w];
                    if n.bitmap.is_none() {
                        n.diverge();
                    }
                    n.bitmap.as_mut().expect("set above").1.insert(region);
                }
            }
            Event::Disconnect => self.connected = false,
            Event::Reconnect if !self.connected => self.reconnect()?,
            Event::Reconnect => {}
            Event::Promote { b } => {
                let (p, o) = (usize::from(b), usize::from(!b));
                if self.nodes[p].primary {
                    return Ok(());
                }
                self.nodes[p].primary = true;
                if self.connected {
                    // A switchover: both follow the new generation.
                    self.nodes[o].primary = false;
                    let id = self.nodes[p].history.start_new();
                    self.nodes[o].history.push(id).unwrap();
                } else {
                    self.nodes[p].diverge();
                    self.promoted_apart = true;
                }
            }
            Event::Resolve { discard_b } => {
                if self.connected {
                    return Ok(());
                }
                let rel = compare(&self.nodes[0].history, &self.nodes[1].history);
                let Relation::Diverged { common } = rel else {
                    return Ok(());
                };
                let (victim, survivor) = (usize::from(discard_b), usize::from(!discard_b));
                // Regions either side changed since the common generation.
                let bitmaps: Vec<_> = self.nodes.iter().map(|n| n.bitmap.clone()).collect();
                let regions = match (&bitmaps[0], &bitmaps[1]) {
                    (Some((s0, r0)), Some((s1, r1)))
                        if *s0 == Some(common) && *s1 == Some(common) =>
                    {
                        Some(r0.union(r1).copied().collect::<BTreeSet<u8>>())
                    }
                    _ => None,
                };
                self.copy(survivor, victim, regions.as_ref())?;
                self.nodes[victim].primary = false;
                let id = self.nodes[survivor].history.start_new();
                self.nodes[victim].history.push(id).unwrap();
                self.synced();
            }
        }
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), TestCaseError> {
        let rel = compare(&self.nodes[0].history, &self.nodes[1].history);
        prop_assert_eq!(
            compare(&self.nodes[1].history, &self.nodes[0].history),
            rel.mirror()
        );
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        match rel {
            Relation::InSync => {
                prop_assert_eq!(&a.seen, &b.seen, "in sync but the writes differ");
                self.synced();
            }
            Relation::PeerBehind { since } | Relation::LocalBehind { since } => {
                let (src, dst) = match rel {
                    Relation::PeerBehind { .. } => (0, 1),
                    _ => (1, 0),
                };
                let (s, d) = (&self.nodes[src], &self.nodes[dst]);
                prop_assert!(
                    d.seen.is_subset(&s.seen),
                    "the sync target holds writes the source lacks: {:?} behind {:?}",
                    d.seen,
                    s.seen
                );
                let regions = match s.bitmap.as_ref() {
                    Some((b, regions)) if resync_scope(since, *b) == ResyncScope::Bitmap => {
                        Some(regions.clone())
                    }
                    _ => None,
                };
                self.copy(src, dst, regions.as_ref())?;
                self.nodes[dst].primary = false;
                self.nodes[dst].history = self.nodes[src].history.clone();
                self.synced();
            }
            Relation::Diverged { .. } | Relation::Unrelated => {
                let full = a.history.is_full() || b.history.is_full();
                prop_assert!(
                    self.promoted_apart || (full && rel == Relation::Unrelated),
                    "{rel:?} without a promotion while apart"
                );
            }
        }
        Ok(())
    }

    /// Copy `regions` (None: everything) from `src` to `dst`; afterwards they must be equal.
    fn copy(
        &mut self,
        src: usize,
        dst: usize,
        regions: Option<&BTreeSet<u8>>,
    ) -> Result<(), TestCaseError> {
        let source = self.nodes[src].clone();
        let target = &mut self.nodes[dst];
        match regions {
            Some(regions) => {
                for r in regions {
                    match source.data.get(r) {
                        Some(v) => target.data.insert(*r, *v),
                        None => target.data.remove(r),
                    };
                }
            }
            None => target.data = source.data.clone(),
        }
        prop_assert_eq!(&target.data, &source.data, "the resync missed a region");
        target.seen = source.seen;
        Ok(())
    }

    fn synced(&mut self) {
        self.connected = true;
        self.promoted_apart = false;
        for n in &mut self.nodes {
            n.bitmap = None;
        }
    }
}

proptest! {
    #[test]
    fn compare_is_symmetric(a in arb_history(), b in arb_history()) {
        prop_assert_eq!(compare(&b, &a), compare(&a, &b).mirror());
        prop_assert_eq!(compare(&a, &a), Relation::InSync);
    }

    /// Two copies start equal and live through random events; at every reconnect the
    /// comparison must send data only from a copy that holds every write of the other, name a
    /// split brain only when one happened, and a bitmap resync must leave them equal.
    #[test]
    fn simulated_histories_classify_correctly(
        events in proptest::collection::vec(arb_event(), 1..60)
    ) {
        let mut pair = Pair::new();
        for e in &events {
            pair.run(e)?;
        }
        if !pair.connected {
            pair.reconnect()?;
        }
    }
}
