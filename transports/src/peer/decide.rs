//! What a link does once its handshake is through: decided at connect, from the two copies'
//! generation histories and this node's role, before any data moves.
//!
//! The relation of the two histories is the engine's [`compare`] (the DRBD-style table in
//! `docs/replication.md`); this module only adds who acts on it. Both ends of a link decide on
//! their own, and the decisions fit together: the side a relation names as the sync source
//! resyncs the other only if it is the primary, and the side that is behind becomes a sync
//! target only if it is a replica. A primary that is behind, or a replica that is ahead, is
//! refused on both ends: an operator decides (promote, demote), never the link.
//!
//! | relation | this node primary | this node replica |
//! |---|---|---|
//! | `InSync` | up to date | up to date |
//! | `PeerBehind` | resync the peer (bitmap or full) | refused: replica ahead |
//! | `LocalBehind` | refused: primary behind | sync target |
//! | `Diverged` | diverged, nothing moves | diverged, nothing moves |
//! | `Unrelated` | refused | refused |

use ringblock_engine::replication::{
    compare, resync_scope, GenerationHistory, GenerationId, Relation, ReplicationRecord,
    ResyncScope, Role, VolumeReplication,
};

use super::convert::{from_wire, node_id};
use super::{NodeId, PeerError, Session};

/// What this node tracks for the peer as its sync source (from the volume's replication
/// record): when the peer's dirty bitmap started, and whether it needs everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracking {
    /// The generation the peer was last up to date in (None: up to date, nothing dirty).
    pub since: Option<GenerationId>,
    /// Everything must be copied, whatever the bitmap says.
    pub full_sync: bool,
}

/// This node's copy of a volume, as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCopy {
    pub role: Role,
    pub history: GenerationHistory,
    /// None: the peer is not one of this volume's replicas here.
    pub tracking: Option<Tracking>,
}

impl LocalCopy {
    /// From the persisted record, for a link to `peer` (the session's peer node).
    pub fn from_record(record: &ReplicationRecord, peer: NodeId) -> LocalCopy {
        let peer = node_id(peer);
        LocalCopy {
            role: record.role,
            history: record.history.clone(),
            tracking: record
                .replicas
                .iter()
                .find(|r| Some(r.node) == peer)
                .map(|r| Tracking {
                    since: r.since,
                    full_sync: r.full_sync,
                }),
        }
    }

    /// From the live in-memory state, for a link to `peer` (the session's peer node).
    pub fn from_state(state: &VolumeReplication, peer: NodeId) -> LocalCopy {
        LocalCopy {
            role: state.role(),
            history: state.history(),
            tracking: node_id(peer)
                .and_then(|p| state.replica(p))
                .map(|r| Tracking {
                    since: r.since(),
                    full_sync: r.full_sync(),
                }),
        }
    }
}

/// What the link does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkDecision {
    /// The same current generation: writes are replicated from now on.
    UpToDate,
    /// This node (the primary) is the sync source: copy what the peer lacks since `since`
    /// (None: the peer holds nothing), the dirty bitmap or everything, then up to date.
    ResyncPeer {
        since: Option<GenerationId>,
        scope: ResyncScope,
    },
    /// This node (a replica) lacks writes since `since`: the peer resyncs it; it serves
    /// nothing meanwhile.
    SyncTarget { since: Option<GenerationId> },
    /// Split brain: both advanced from `common`. Nothing moves until an operator resolves it.
    Diverged { common: GenerationId },
    /// Nothing moves and the link is closed; the reason is logged.
    Refuse(LinkRefusal),
}

/// Why a link is refused after a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefusal {
    #[error(
        "this node is primary but the peer has newer generations (we stopped at {since:?}): \
         refusing to act as primary for this volume; demote it here or promote the peer"
    )]
    PrimaryBehind { since: Option<GenerationId> },
    #[error(
        "this replica has generations the peer lacks (the peer stopped at {since:?}): a replica \
         is never a sync source; promote it or discard its copy"
    )]
    ReplicaAhead { since: Option<GenerationId> },
    #[error("the peer lacks writes but is not a replica of this volume here")]
    NotAReplica,
    #[error("the copies share no generation (another volume, or their common history fell out of the bounded histories)")]
    Unrelated,
    #[error("the peer's generation history is invalid: {0}")]
    BadHistory(PeerError),
}

/// What a link established with `session` does, from this node's `local` copy.
pub fn decide(local: &LocalCopy, session: &Session) -> LinkDecision {
    match from_wire(&session.peer_history) {
        Ok(peer) => decide_histories(local, &peer),
        Err(e) => LinkDecision::Refuse(LinkRefusal::BadHistory(e)),
    }
}

/// [`decide`] on the peer's history in the engine's form.
pub fn decide_histories(local: &LocalCopy, peer: &GenerationHistory) -> LinkDecision {
    match (compare(&local.history, peer), local.role) {
        (Relation::InSync, _) => LinkDecision::UpToDate,
        (Relation::PeerBehind { since }, Role::Primary) => match local.tracking {
            None => LinkDecision::Refuse(LinkRefusal::NotAReplica),
            Some(t) => LinkDecision::ResyncPeer {
                since,
                scope: if t.full_sync {
                    ResyncScope::Full
                } else {
                    resync_scope(since, t.since)
                },
            },
        },
        (Relation::PeerBehind { since }, Role::Replica) => {
            LinkDecision::Refuse(LinkRefusal::ReplicaAhead { since })
        }
        (Relation::LocalBehind { since }, Role::Primary) => {
            LinkDecision::Refuse(LinkRefusal::PrimaryBehind { since })
        }
        (Relation::LocalBehind { since }, Role::Replica) => LinkDecision::SyncTarget { since },
        (Relation::Diverged { common }, _) => LinkDecision::Diverged { common },
        (Relation::Unrelated, _) => LinkDecision::Refuse(LinkRefusal::Unrelated),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
