//! Adding and removing a volume's peer while the daemon runs (`ringblock replica add|remove`).
//! Each change is kept in the membership file (the configuration stays the operator's) and in
//! the volume's replication record, both durable before the call returns.
//!
//! - **add, on the primary**: the record gains the replica with every region dirty and
//!   `full_sync` set (a new copy gets everything); a set with its link is swapped in and its
//!   connector starts. Refused at `MAX_REPLICAS`, or when the volume's sets are used up.
//! - **add, on a replica copy**: the node becomes one of the copy's peers, so its listener
//!   lets that node in as a primary (a new primary, or this copy joining a volume another
//!   node serves). Nothing is dirty: a replica copy holds no write of its own for it.
//! - **remove, on the primary**: the connector and the link task stop (the task's failure
//!   path marks, flushes and completes every op it holds: no request is left waiting), a set
//!   without the link is swapped in, a new generation starts if the replica was in step (its
//!   copy must never look in step again), and the record drops it.
//! - **remove, on a replica copy**: refused while that node is connected as this copy's
//!   primary (remove this copy on the primary first); otherwise the node may no longer
//!   connect.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ringblock_engine::replication::{NodeId, Role, VolumeReplication, MAX_REPLICAS};

use super::config::{PeerMode, PeerSpec, RuntimeError, DEFAULT_ASYNC_QUEUE_BYTES};
use super::{connector, lock, new_peer, ops, prepare, PeerRuntime, VolumeEntry};
use crate::peer::PeerAddress;

impl PeerRuntime {
    /// Add `node` at `address` as a peer of `volume` (see the module).
    pub fn add_replica(
        &self,
        volume: &str,
        node: NodeId,
        address: PeerAddress,
        mode: PeerMode,
    ) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        if node == shared.node {
            return Err(RuntimeError::Invalid(format!(
                "node {node} is this node; a replica is another node's copy"
            )));
        }
        if entry.peer(node).is_some() {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: node {node} is already one of its peers"
            )));
        }
        let before = entry.replication();
        let primary = before.role() == Role::Primary;
        if before.replicas().len() >= MAX_REPLICAS {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} has {MAX_REPLICAS} replicas, the most a volume may have; \
                 remove one first"
            )));
        }
        if primary && entry.volume.replica_set_changes_left() == 0 {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: {}",
                ringblock_engine::replication::ReplicationError::TooManySetChanges
            )));
        }
        let after = Arc::new(
            before
                .with_replica_added(node, primary)
                .map_err(|e| RuntimeError::Conflict(format!("volume {volume}: {e}")))?,
        );
        let spec = PeerSpec {
            node,
            address,
            mode,
            // The API and the file name no bound: the default one.
            queue_limit_bytes: DEFAULT_ASYNC_QUEUE_BYTES,
        };
        let peer = new_peer(volume, &after, &spec, false)?;
        shared.change_membership(|m| m.record_add(volume, spec.clone()))?;
        swap(&entry, after, |peers| peers.push(peer));
        if let Err(e) = prepare::persist(&shared.engine, "the added replica") {
            // Back to the state before; the membership file follows (a restart would add the
            // node again, with a full sync, which loses nothing).
            swap(&entry, before, |peers| {
                peers.retain(|p| p.spec.node != node)
            });
            let _ = shared.change_membership(|m| m.record_remove(volume, node));
            return Err(e);
        }
        if primary {
            connector::add_peer(shared, &entry, node)?;
        }
        tracing::info!(volume, %node, address = %spec.address, primary, "peer: replica added");
        Ok(if primary {
            format!(
                "volume {volume}: node {node} at {} added; it gets a full sync when it connects",
                spec.address
            )
        } else {
            format!(
                "volume {volume}: node {node} at {} added; it may now connect as this copy's \
                 primary",
                spec.address
            )
        })
    }

    /// Remove `node` from `volume`'s peers (see the module).
    pub fn remove_replica(&self, volume: &str, node: NodeId) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        let peer = ops::peer_of(&entry, node)?;
        let before = entry.replication();
        let primary = before.role() == Role::Primary;
        if !primary && entry.serving_node() == Some(node) {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: node {node} is connected as this copy's primary; remove this \
                 copy there first (`ringblock replica remove {volume} {}` on node {node})",
                shared.node
            )));
        }
        if primary && entry.volume.replica_set_changes_left() == 0 {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: {}",
                ringblock_engine::replication::ReplicationError::TooManySetChanges
            )));
        }
        let after = Arc::new(before.without_replica(node).ok_or_else(|| {
            RuntimeError::Failed(format!("volume {volume}: node {node} has no state"))
        })?);
        // Durable first: from here on a restart drops the node (and its record entry).
        shared.change_membership(|m| m.record_remove(volume, node))?;
        let mut ended = true;
        if primary {
            ended = connector::remove_peer(shared, &entry, node)?;
            // The set of up-to-date replicas changes when it was in step: a link that was up
            // to date started a generation as it failed (and set `since`); one in step that
            // never connected since the start has none yet.
            if peer.replica.since().is_none() && !peer.replica.full_sync() {
                peer.replica.set_since(before.history().current());
                before.start_generation();
            }
        }
        peer.suspended.store(false, Ordering::Release);
        swap(&entry, after, |peers| peers.retain(|p| p.spec.node != node));
        prepare::persist(&shared.engine, "the removed replica")?;
        tracing::info!(volume, %node, primary, "peer: replica removed");
        let late = if ended {
            ""
        } else {
            " (its link task had not ended yet: it completes its writes as it ends)"
        };
        Ok(format!(
            "volume {volume}: node {node} removed; writes no longer go to it{late}"
        ))
    }
}

/// Make `replication` the volume's (runtime, engine) and change the peers to match, under
/// the peers' lock (views see both change together).
fn swap(
    entry: &VolumeEntry,
    replication: Arc<VolumeReplication>,
    change: impl FnOnce(&mut Vec<Arc<super::PeerEntry>>),
) {
    let mut peers = lock(&entry.peers);
    change(&mut peers);
    *lock(&entry.replication) = replication.clone();
    entry.volume.set_replication(Some(replication));
}

/// `text` as a peer mode (`sync`, `async`).
pub fn parse_mode(text: &str) -> Result<PeerMode, RuntimeError> {
    match text {
        "" | "sync" => Ok(PeerMode::Sync),
        "async" => Ok(PeerMode::Async),
        other => Err(RuntimeError::Invalid(format!(
            "mode {other:?} is not sync or async"
        ))),
    }
}
