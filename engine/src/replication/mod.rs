//! Replication state that survives restarts, and the pure decisions made from it: generation
//! histories and how two copies relate ([`generation`]), dirty-region bitmaps ([`bitmap`]),
//! the record a metadata slot holds ([`record`]) and the shared in-memory state a volume
//! carries ([`state`]). Nothing here touches a socket or a ring: the peer runtime builds on it.

pub mod barrier;
pub mod bitmap;
pub mod evict;
pub mod fanout;
pub mod generation;
pub mod lag;
pub mod record;
pub mod state;
pub mod status;
pub mod verify;

pub use barrier::{BarrierEntry, BarrierTicket, WriteBarrier};
pub use bitmap::{DirtyBitmap, RegionIndex};
pub use evict::{run_cycle, CycleOutcome, EvictHost, EvictTiming};
pub use fanout::{
    LinkMode, LinkStanding, LinkState, ReplicaLink, ReplicaOp, ReplicaOpKind, ReplicaSet,
};
pub use generation::{
    compare, resync_scope, GenerationHistory, GenerationId, Relation, ResyncScope,
};
pub use lag::ReplicaLag;
pub use record::{NodeId, ReplicaRecord, ReplicationRecord, Role, MAX_REPLICAS};
pub use state::{ReplicaState, VolumeReplication};
pub use status::{PeerState, PeerStatus, ResyncProgress, ResyncSnapshot};
pub use verify::{VerifyJob, VerifyPhase, VerifySnapshot};

/// Why replication state cannot be built as asked (from a record on disk or from a request).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    #[error("a generation history holds at most {max} generations, not {0}", max = generation::MAX_HISTORY)]
    HistoryTooLong(usize),
    #[error("generation {0} appears twice in one history")]
    DuplicateGeneration(GenerationId),
    #[error("region size 2^{0} bytes is outside 4 KiB..1 TiB (a power of two in that range)")]
    RegionSize(u8),
    #[error(
        "{capacity_bytes} bytes in regions of {region_bytes} bytes are {regions} regions, more \
         than a dirty bitmap tracks ({max}): use regions of at least {needed_bytes} bytes",
        max = bitmap::MAX_REGIONS
    )]
    TooManyRegions {
        capacity_bytes: u64,
        region_bytes: u64,
        regions: u64,
        needed_bytes: u64,
    },
    #[error("dirty regions up to {end} lie past the volume's {regions} regions")]
    PastEnd { end: u64, regions: u64 },
    #[error("node {0} is already one of the volume's replicas")]
    DuplicateReplica(NodeId),
    #[error("{0} replicas are more than a volume may have ({MAX_REPLICAS})")]
    TooManyReplicas(usize),
    #[error(
        "the volume's replica set changed {} times; restart the daemon to change it again",
        fanout::MAX_REPLICA_SET_CHANGES
    )]
    TooManySetChanges,
}
