//! The one place where the engine's replication types and the wire's turn into each other: node
//! ids, and generation histories (what a copy of a volume persists, and what a handshake
//! carries).
//!
//! The two histories are separate types on purpose: the wire's is bounded by the protocol
//! ([`MAX_HISTORY_LEN`] ids, checked when a frame is decoded), the engine's by its metadata
//! record ([`MAX_HISTORY`] ids). The wire allows more than this build keeps, so a later build
//! may keep longer histories; a longer history from a peer is cut to its newest [`MAX_HISTORY`]
//! ids, exactly as the engine drops its own oldest ones. A generation that falls out that way
//! can make two copies look unrelated, which is refused, never resynced on a guess.

use ringblock_engine::replication::generation::MAX_HISTORY;
use ringblock_engine::replication::{
    GenerationHistory as EngineHistory, GenerationId, NodeId as EngineNodeId,
};

use super::body::GenerationHistory as WireHistory;
use super::{NodeId as WireNodeId, PeerError, MAX_HISTORY_LEN};

const _: () = assert!(
    MAX_HISTORY <= MAX_HISTORY_LEN,
    "every engine history fits a handshake"
);

/// A node id from the wire as the engine names nodes; None for 0, which names no node.
pub fn node_id(node: WireNodeId) -> Option<EngineNodeId> {
    EngineNodeId::new(node.0)
}

/// This node's id as the handshake carries it.
pub fn wire_node_id(node: EngineNodeId) -> WireNodeId {
    WireNodeId(node.get())
}

/// The history a handshake carries for this copy.
pub fn to_wire(history: &EngineHistory) -> Result<WireHistory, PeerError> {
    WireHistory::new(history.ids().iter().map(|id| id.get()).collect())
}

/// A peer's history as the engine compares it: its newest [`MAX_HISTORY`] ids.
pub fn from_wire(history: &WireHistory) -> Result<EngineHistory, PeerError> {
    let ids = history.ids();
    let newest = &ids[ids.len().saturating_sub(MAX_HISTORY)..];
    let ids = newest
        .iter()
        .map(|&raw| {
            GenerationId::new(raw).ok_or(PeerError::InvalidHistory {
                reason: "generation id 0",
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    EngineHistory::from_ids(ids).map_err(|_| PeerError::InvalidHistory {
        reason: "a generation id appears twice",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(ids: &[u64]) -> EngineHistory {
        EngineHistory::from_ids(ids.iter().map(|&n| GenerationId::new(n).unwrap()).collect())
            .unwrap()
    }

    #[test]
    fn round_trips_every_engine_history() {
        for ids in [&[][..], &[7], &[1, 2, 3]] {
            let h = engine(ids);
            let wire = to_wire(&h).expect("fits the wire");
            assert_eq!(wire.ids(), ids);
            assert_eq!(from_wire(&wire).expect("valid"), h);
        }
        let full: Vec<u64> = (1..=MAX_HISTORY as u64).collect();
        let h = engine(&full);
        assert_eq!(from_wire(&to_wire(&h).unwrap()).unwrap(), h);
    }

    #[test]
    fn node_ids_convert_and_zero_names_no_node() {
        let node = EngineNodeId::new(0xabc).unwrap();
        assert_eq!(node_id(wire_node_id(node)), Some(node));
        assert_eq!(node_id(WireNodeId(0)), None);
    }

    #[test]
    fn a_longer_peer_history_keeps_its_newest_ids() {
        let ids: Vec<u64> = (1..=MAX_HISTORY_LEN as u64).collect();
        let wire = WireHistory::new(ids.clone()).unwrap();
        let h = from_wire(&wire).unwrap();
        assert_eq!(h.ids().len(), MAX_HISTORY);
        assert_eq!(
            h.current().map(GenerationId::get),
            Some(MAX_HISTORY_LEN as u64)
        );
        let kept: Vec<u64> = h.ids().iter().map(|g| g.get()).collect();
        assert_eq!(kept, ids[MAX_HISTORY_LEN - MAX_HISTORY..]);
    }
}
