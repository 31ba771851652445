//! A volume's replication record as the metadata slot holds it: its role, its generation
//! history, each replica's dirty regions, and the activity log (regions that may have writes
//! in flight, folded into every replica's dirty regions at load).
//!
//! ```text
//! u8 role (1 primary, 2 replica)   u8 region_shift   u8 history_len   u8 replicas
//! u16 activity_runs
//! history_len x u64 generation id (oldest first, never 0)
//! activity_runs x (u32 first region, u32 regions)
//! per replica: u128 node id (never 0), u64 since (0: none), u8 flags (bit 0: full sync),
//!              u16 runs, runs x (u32 first region, u32 regions)
//! ```
//!
//! Runs are sorted, disjoint and not adjacent; every count is bounded, so a record is at most
//! [`RECORD_MAX_BYTES`]. The in-memory bitmaps hold more detail than fits: a snapshot merges
//! the closest runs of a bitmap until [`MAX_PERSISTED_RUNS`] remain (a superset: a restart
//! may resync a few clean regions, never miss a dirty one).

use std::fmt;
use std::ops::Range;

use super::bitmap::{MAX_REGIONS, MAX_REGION_SHIFT, MIN_REGION_SHIFT};
use super::generation::{GenerationHistory, GenerationId, MAX_HISTORY};
use crate::meta::{MetaError, Reader};

/// Most replicas of one volume.
pub const MAX_REPLICAS: usize = 4;
/// Most runs of dirty regions a replica's persisted record holds.
pub const MAX_PERSISTED_RUNS: usize = 64;
/// Most runs of the persisted activity log.
pub const MAX_ACTIVITY_RUNS: usize = 32;
const RUN_BYTES: usize = 8;
const REPLICA_FIXED_BYTES: usize = 16 + 8 + 1 + 2;
/// Largest encoded record.
pub const RECORD_MAX_BYTES: usize = 6
    + MAX_HISTORY * 8
    + MAX_ACTIVITY_RUNS * RUN_BYTES
    + MAX_REPLICAS * (REPLICA_FIXED_BYTES + MAX_PERSISTED_RUNS * RUN_BYTES);

/// A node of the cluster: a random 128-bit id made once per daemon state directory, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u128);

impl NodeId {
    pub fn new(raw: u128) -> Option<NodeId> {
        (raw != 0).then_some(NodeId(raw))
    }

    pub fn get(self) -> u128 {
        self.0
    }
}

/// 32 lowercase hex digits.
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;

    fn from_str(s: &str) -> Result<NodeId, String> {
        let bad = || format!("{s:?} is not a node id (32 hex digits, not all zero)");
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        u128::from_str_radix(s, 16)
            .ok()
            .and_then(NodeId::new)
            .ok_or_else(bad)
    }
}

/// A volume's role on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves clients and sends writes to the replicas.
    Primary,
    /// Receives writes from the primary; serves no client until promoted.
    Replica,
}

/// What the metadata holds about one replica of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub node: NodeId,
    /// The generation the replica was last up to date in: `dirty` counts from there. None:
    /// up to date (nothing dirty).
    pub since: Option<GenerationId>,
    /// Everything must be copied (a new replica, or one whose bitmap does not cover its gap).
    pub full_sync: bool,
    /// Runs of dirty regions, sorted, disjoint, not adjacent.
    pub dirty: Vec<Range<u64>>,
}

/// What the metadata holds about a replicated volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationRecord {
    pub role: Role,
    /// log2 of the region size of every bitmap of the volume.
    pub region_shift: u8,
    pub history: GenerationHistory,
    pub replicas: Vec<ReplicaRecord>,
    /// Regions that may have writes in flight: after a restart they count as dirty for every
    /// replica, since a crash may have left them written here and not there.
    pub activity: Vec<Range<u64>>,
}

impl ReplicationRecord {
    /// Bytes [`Self::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        6 + self.history.ids().len() * 8
            + self.activity.len() * RUN_BYTES
            + self
                .replicas
                .iter()
                .map(|r| REPLICA_FIXED_BYTES + r.dirty.len() * RUN_BYTES)
                .sum::<usize>()
    }

    /// Append the record to `out`. A record over its bounds is an error, never truncated.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MetaError> {
        self.check_bounds()?;
        out.push(match self.role {
            Role::Primary => 1,
            Role::Replica => 2,
        });
        out.push(self.region_shift);
        out.push(self.history.ids().len() as u8);
        out.push(self.replicas.len() as u8);
        out.extend_from_slice(&(self.activity.len() as u16).to_le_bytes());
        for id in self.history.ids() {
            out.extend_from_slice(&id.get().to_le_bytes());
        }
        encode_runs(&self.activity, out);
        for r in &self.replicas {
            out.extend_from_slice(&r.node.get().to_le_bytes());
            out.extend_from_slice(&r.since.map_or(0, GenerationId::get).to_le_bytes());
            out.push(u8::from(r.full_sync));
            out.extend_from_slice(&(r.dirty.len() as u16).to_le_bytes());
            encode_runs(&r.dirty, out);
        }
        Ok(())
    }

    fn check_bounds(&self) -> Result<(), MetaError> {
        let too_large = || MetaError::TooLarge {
            needed: self.encoded_len(),
            slot: RECORD_MAX_BYTES as u64,
        };
        if self.replicas.len() > MAX_REPLICAS
            || self.activity.len() > MAX_ACTIVITY_RUNS
            || self
                .replicas
                .iter()
                .any(|r| r.dirty.len() > MAX_PERSISTED_RUNS)
        {
            return Err(too_large());
        }
        let runs_ok = |runs: &[Range<u64>]| {
            runs.iter().all(|r| r.start < r.end && r.end <= MAX_REGIONS)
                && runs.windows(2).all(|w| w[0].end < w[1].start)
        };
        if !runs_ok(&self.activity) || !self.replicas.iter().all(|r| runs_ok(&r.dirty)) {
            return Err(MetaError::InvalidRecord(
                "runs of regions must be sorted, disjoint, not adjacent and under 2^24",
            ));
        }
        if !(MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(&self.region_shift) {
            return Err(MetaError::InvalidRecord("region size out of range"));
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if self.replicas[..i].iter().any(|x| x.node == r.node) {
                return Err(MetaError::InvalidRecord("a replica appears twice"));
            }
        }
        Ok(())
    }

    /// Parse a record written by [`Self::encode`]. Anything out of bounds or inconsistent is
    /// an error, never a panic.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<ReplicationRecord, MetaError> {
        let corrupt = |m: &str| MetaError::CorruptSlot(format!("replication record: {m}"));
        let role = match r.u8()? {
            1 => Role::Primary,
            2 => Role::Replica,
            _ => return Err(corrupt("unknown role")),
        };
        let region_shift = r.u8()?;
        if !(MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(&region_shift) {
            return Err(corrupt("region size out of range"));
        }
        let history_len = usize::from(r.u8()?);
        let replica_count = usize::from(r.u8()?);
        let activity_len = usize::from(r.u16()?);
        if history_len > MAX_HISTORY {
            return Err(corrupt("generation history too long"));
        }
        if replica_count > MAX_REPLICAS {
            return Err(corrupt("too many replicas"));
        }
        if activity_len > MAX_ACTIVITY_RUNS {
            return Err(corrupt("activity log too long"));
        }
        let mut ids = Vec::with_capacity(history_len);
        for _ in 0..history_len {
            ids.push(GenerationId::new(r.u64()?).ok_or_else(|| corrupt("generation id 0"))?);
        }
        let history = GenerationHistory::from_ids(ids).map_err(|e| corrupt(&e.to_string()))?;
        let activity = decode_runs(r, activity_len).map_err(corrupt)?;
        let mut replicas: Vec<ReplicaRecord> = Vec::with_capacity(replica_count);
        for _ in 0..replica_count {
            let node = NodeId::new(r.u128()?).ok_or_else(|| corrupt("node id 0"))?;
            if replicas.iter().any(|x| x.node == node) {
                return Err(corrupt("a replica appears twice"));
            }
            let since = GenerationId::new(r.u64()?);
            let full_sync = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(corrupt("unknown replica flags")),
            };
            let runs = usize::from(r.u16()?);
            if runs > MAX_PERSISTED_RUNS {
                return Err(corrupt("too many dirty runs"));
            }
            let dirty = decode_runs(r, runs).map_err(corrupt)?;
            replicas.push(ReplicaRecord {
                node,
                since,
                full_sync,
                dirty,
            });
        }
        Ok(ReplicationRecord {
            role,
            region_shift,
            history,
            replicas,
            activity,
        })
    }
}

fn encode_runs(runs: &[Range<u64>], out: &mut Vec<u8>) {
    for run in runs {
        // check_bounds keeps every run under MAX_REGIONS (2^24): both fit in u32.
        out.extend_from_slice(&(run.start as u32).to_le_bytes());
        out.extend_from_slice(&((run.end - run.start) as u32).to_le_bytes());
    }
}

fn decode_runs(r: &mut Reader<'_>, n: usize) -> Result<Vec<Range<u64>>, &'static str> {
    let mut runs: Vec<Range<u64>> = Vec::with_capacity(n);
    for _ in 0..n {
        let start = u64::from(r.u32().map_err(|_| "truncated")?);
        let len = u64::from(r.u32().map_err(|_| "truncated")?);
        if len == 0 || start + len > MAX_REGIONS {
            return Err("a run of regions is empty or too long");
        }
        if runs.last().is_some_and(|last| last.end >= start) {
            return Err("runs of regions out of order");
        }
        runs.push(start..start + len);
    }
    Ok(runs)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_runs(max: usize) -> impl Strategy<Value = Vec<Range<u64>>> {
        proptest::collection::vec((1u64..1000, 1u64..50), 0..max).prop_map(|steps| {
            let mut at = 0;
            steps
                .into_iter()
                .map(|(gap, len)| {
                    let start = at + gap;
                    at = start + len;
                    start..start + len
                })
                .collect()
        })
    }

    pub(crate) fn arb_record() -> impl Strategy<Value = ReplicationRecord> {
        let replica = (
            1u128..u128::MAX,
            0u64..5,
            any::<bool>(),
            arb_runs(MAX_PERSISTED_RUNS + 1),
        );
        (
            any::<bool>(),
            MIN_REGION_SHIFT..=MAX_REGION_SHIFT,
            proptest::collection::btree_set(1u64.., 0..=MAX_HISTORY),
            proptest::collection::vec(replica, 0..=MAX_REPLICAS),
            arb_runs(MAX_ACTIVITY_RUNS + 1),
        )
            .prop_map(|(primary, region_shift, ids, replicas, activity)| {
                let mut seen = std::collections::BTreeSet::new();
                ReplicationRecord {
                    role: if primary {
                        Role::Primary
                    } else {
                        Role::Replica
                    },
                    region_shift,
                    history: GenerationHistory::from_ids(
                        ids.into_iter().filter_map(GenerationId::new).collect(),
                    )
                    .unwrap(),
                    replicas: replicas
                        .into_iter()
                        .filter(|r| seen.insert(r.0))
                        .map(|(node, since, full_sync, dirty)| ReplicaRecord {
                            node: NodeId::new(node).unwrap(),
                            since: GenerationId::new(since),
                            full_sync,
                            dirty,
                        })
                        .collect(),
                    activity,
                }
            })
    }

    /// Records within every bound.
    pub(crate) fn arb_valid_record() -> impl Strategy<Value = ReplicationRecord> {
        arb_record().prop_map(|mut r| {
            r.activity.truncate(MAX_ACTIVITY_RUNS);
            for x in &mut r.replicas {
                x.dirty.truncate(MAX_PERSISTED_RUNS);
            }
            r
        })
    }

    #[test]
    fn node_ids_parse_strictly() {
        let id: NodeId = "000000000000000000000000000000ff".parse().unwrap();
        assert_eq!(id.get(), 255);
        assert_eq!(id.to_string(), "000000000000000000000000000000ff");
        for bad in [
            "",
            "ff",
            &"0".repeat(32),
            &"g".repeat(32),
            &"f".repeat(33),
            "+0000000000000000000000000000001",
        ] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_largest_record_is_bounded() {
        let runs = |n: u64| (0..n).map(|i| 2 * i..2 * i + 1).collect::<Vec<_>>();
        let rec = ReplicationRecord {
            role: Role::Primary,
            region_shift: 20,
            history: GenerationHistory::from_ids(
                (1..=MAX_HISTORY as u64)
                    .filter_map(GenerationId::new)
                    .collect(),
            )
            .unwrap(),
            replicas: (1..=MAX_REPLICAS as u128)
                .map(|n| ReplicaRecord {
                    node: NodeId::new(n).unwrap(),
                    since: GenerationId::new(3),
                    full_sync: false,
                    dirty: runs(MAX_PERSISTED_RUNS as u64),
                })
                .collect(),
            activity: runs(MAX_ACTIVITY_RUNS as u64),
        };
        let mut out = Vec::new();
        rec.encode(&mut out).unwrap();
        assert_eq!(out.len(), RECORD_MAX_BYTES);
        assert_eq!(rec.encoded_len(), RECORD_MAX_BYTES);
        let mut over = rec.clone();
        over.replicas[0].dirty = runs(MAX_PERSISTED_RUNS as u64 + 1);
        assert!(matches!(
            over.encode(&mut Vec::new()),
            Err(MetaError::TooLarge { .. })
        ));
        // Nothing is written that would not decode the same.
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 5..4;
        let bad_runs: [Vec<Range<u64>>; 3] = [
            vec![0..2, 2..3],
            std::iter::once(empty).collect(),
            std::iter::once(MAX_REGIONS..MAX_REGIONS + 1).collect(),
        ];
        for bad in bad_runs {
            let mut r = rec.clone();
            r.activity = bad;
            assert!(matches!(
                r.encode(&mut Vec::new()),
                Err(MetaError::InvalidRecord(_))
            ));
        }
        let mut r = rec.clone();
        r.replicas[1].node = r.replicas[0].node;
        assert!(matches!(
            r.encode(&mut Vec::new()),
            Err(MetaError::InvalidRecord(_))
        ));
        let mut r = rec;
        r.region_shift = 50;
        assert!(matches!(
            r.encode(&mut Vec::new()),
            Err(MetaError::InvalidRecord(_))
        ));
    }

    proptest! {
        #[test]
        fn roundtrip_or_refused(rec in arb_record()) {
            let mut out = Vec::new();
            let within = rec.activity.len() <= MAX_ACTIVITY_RUNS
                && rec.replicas.iter().all(|r| r.dirty.len() <= MAX_PERSISTED_RUNS);
            match rec.encode(&mut out) {
                Ok(()) => {
                    prop_assert!(within);
                    prop_assert_eq!(out.len(), rec.encoded_len());
                    let mut r = Reader::new(&out);
                    prop_assert_eq!(ReplicationRecord::decode(&mut r).unwrap(), rec);
                    prop_assert_eq!(r.remaining(), 0);
                }
                Err(e) => {
                    prop_assert!(!within);
                    let is_too_large = matches!(e, MetaError::TooLarge { .. });
                    prop_assert!(is_too_large);
                }
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = ReplicationRecord::decode(&mut Reader::new(&bytes));
        }
    }
}
