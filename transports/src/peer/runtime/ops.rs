//! The operator's operations on a replicated volume. Each takes the volume's operation lock,
//! and each change is durable (a metadata flush) before it returns.
//!
//! - **promote**: a replica copy becomes the primary: refused while a primary is connected
//!   to it (unless forced: that connection is cut), and for a copy that holds nothing (unless
//!   forced). A new generation starts; then the connectors start.
//! - **demote**: a primary copy becomes a replica: refused while it is exported. Its links
//!   end after a flush; a replica that was up to date and lacks nothing keeps its place in
//!   the history (the generation its link's end started holds no write, and is dropped), so a
//!   clean switchover does not look like a split brain.
//! - **suspend / resume**: a primary stops sending to one replica (its link ends, writes mark
//!   its bitmap) until resumed. Both are kept in the membership file, so a restart keeps a
//!   replica suspended.
//! - **resolve**: after a split brain, this node discards its copy's changes: its history
//!   becomes empty and the primary sends it everything.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ringblock_engine::replication::{GenerationHistory, LinkState, NodeId, PeerState, Role};
use ringblock_engine::{Port, PortWaker, Request};

use super::config::RuntimeError;
use super::{accept, connector, lock, prepare, PeerRuntime, VolumeEntry, SUSPENDED};

/// Longest wait for the flush before a demote.
const DEMOTE_FLUSH_WAIT: Duration = Duration::from_secs(60);

impl PeerRuntime {
    /// Make this node's copy of `volume` the primary (see the module).
    pub fn promote(&self, volume: &str, force: bool) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        let replication = &entry.replication();
        if replication.role() == Role::Primary {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} is already the primary here"
            )));
        }
        // The primary this copy followed since the runtime started (its connection may have
        // ended): the one peer whose differences this copy can bound (see below).
        let followed = lock(&entry.serving).as_ref().map(|s| s.node);
        if let Some(node) = entry.serving_node() {
            if !force {
                return Err(RuntimeError::Conflict(format!(
                    "volume {volume}: node {node} is connected as its primary; demote it there \
                     first, or promote with force (the copies may then diverge)"
                )));
            }
            tracing::warn!(volume, %node, "peer: forced promote; cutting the primary's connection");
            if !accept::end_serving(shared, &entry) {
                return Err(RuntimeError::Failed(format!(
                    "volume {volume}: the primary's connection did not end in time; try again"
                )));
            }
        }
        if replication.history().is_empty() && !force {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: this copy holds nothing yet (its first sync never finished); \
                 promote with force to serve it empty"
            )));
        }
        // Writes mark the replicas' bitmaps from the moment the role is durable: the set is
        // attached first (nothing is exported yet, so nothing is written meanwhile).
        connector::attach_links(shared, &entry)?;
        let before = replication.history();
        let tracking: Vec<_> = replication
            .replicas()
            .iter()
            .map(|r| (r.since(), r.full_sync()))
            .collect();
        replication.set_role(Role::Primary);
        let generation = replication.start_generation();
        for r in replication.replicas() {
            track_after_promotion(r, followed, before.current());
            r.status.set(PeerState::Connecting, None);
        }
        entry.volume.replication_changed();
        if let Err(e) = prepare::persist(&shared.engine, "the promotion") {
            let _ = connector::stop_primary(shared, &entry, true);
            replication.set_role(Role::Replica);
            replication.adopt_history(before);
            for (r, (since, full)) in replication.replicas().iter().zip(tracking) {
                r.set_since(since);
                r.set_full_sync(full);
            }
            return Err(e);
        }
        connector::start_connectors(shared, &entry)?;
        tracing::info!(volume, %generation, force, "peer: promoted to primary");
        Ok(format!(
            "volume {volume} is now the primary here (generation {generation})"
        ))
    }

    /// Make this node's copy of `volume` a replica (see the module).
    pub fn demote(&self, volume: &str) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        let replication = &entry.replication();
        if replication.role() == Role::Replica {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} is already a replica here"
            )));
        }
        if let Some(how) = shared.exports.as_ref().and_then(|probe| probe(volume)) {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} is exported ({how}); disconnect the clients first"
            )));
        }
        flush_volume(shared, &entry)?;
        let history = replication.history();
        let links = connector::links(&entry);
        // A link's index is into the replication it was made with (peers added or removed
        // since make new ones): take its replica's state from there.
        let clean: Vec<_> = links
            .iter()
            .filter(|l| l.state() == LinkState::UpToDate)
            .map(|l| l.replication().replicas()[l.index()].clone())
            .collect();
        let ended = connector::stop_primary(shared, &entry, true);
        replication.set_role(Role::Replica);
        // The links' ends started generations no write went into (nothing is exported): a
        // replica that was up to date and lacks nothing stays in step with this copy.
        let replicas = replication.replicas();
        let all_clean =
            ended && !clean.is_empty() && clean.iter().all(|r| r.dirty.dirty_regions() == 0);
        if all_clean {
            replication.adopt_history(history);
            for r in &clean {
                r.set_since(None);
            }
        }
        for r in replicas {
            r.status.set(PeerState::Connecting, None);
            r.status.set_connected(None);
        }
        entry.volume.replication_changed();
        prepare::persist(&shared.engine, "the demotion")?;
        tracing::info!(volume, "peer: demoted to replica");
        Ok(format!("volume {volume} is now a replica here"))
    }

    /// Stop sending to `node` until [`Self::resume`] (see the module).
    pub fn suspend(&self, volume: &str, node: NodeId) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        let peer = peer_of(&entry, node)?;
        if entry.replication().role() != Role::Primary {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} is a replica here; suspend its replicas on the primary"
            )));
        }
        if peer.suspended.load(Ordering::Acquire) {
            return Ok(format!(
                "volume {volume}: node {node} was already suspended"
            ));
        }
        // Durable first: a restart keeps the replica suspended from now on.
        shared.change_membership(|m| m.record_suspended(volume, node, true))?;
        peer.suspended.store(true, Ordering::Release);
        let status = &peer.replica.status;
        if let Some(task) = connector::wake_peer(&entry, node, true) {
            if !task.wait_exit(shared.timing.stop_wait) {
                return Err(RuntimeError::Failed(format!(
                    "volume {volume}: the link to node {node} did not end in time"
                )));
            }
        }
        status.set(PeerState::Suspended, Some(SUSPENDED));
        status.set_connected(None);
        prepare::persist(&shared.engine, "the suspended replica's marks")?;
        tracing::info!(volume, %node, "peer: replica suspended");
        Ok(format!(
            "volume {volume}: node {node} suspended; writes mark its bitmap until resume"
        ))
    }

    pub fn resume(&self, volume: &str, node: NodeId) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        let peer = peer_of(&entry, node)?;
        if !peer.suspended.load(Ordering::Acquire) {
            return Ok(format!("volume {volume}: node {node} was not suspended"));
        }
        shared.change_membership(|m| m.record_suspended(volume, node, false))?;
        peer.suspended.store(false, Ordering::Release);
        peer.replica
            .status
            .set(PeerState::Connecting, Some("resumed by the operator"));
        connector::wake_peer(&entry, node, false);
        tracing::info!(volume, %node, "peer: replica resumed");
        Ok(format!("volume {volume}: node {node} resumed"))
    }

    /// Discard `discard`'s changes since the split (see the module).
    pub fn resolve(&self, volume: &str, discard: NodeId) -> Result<String, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        if discard != shared.node {
            let peer = peer_of(&entry, discard)?;
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: node {discard} discards its own copy: run this on node {} \
                 (at {})",
                discard, peer.spec.address
            )));
        }
        let replication = &entry.replication();
        if replication.role() != Role::Replica {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} is the primary here; demote it before discarding this copy"
            )));
        }
        if let Some(node) = entry.serving_node() {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: node {node} is connected as its primary and the copies agree; \
                 there is nothing to resolve"
            )));
        }
        replication.adopt_history(GenerationHistory::default());
        for r in replication.replicas() {
            r.status.set(
                PeerState::Connecting,
                Some("copy discarded; waiting for a full sync"),
            );
        }
        entry.volume.replication_changed();
        prepare::persist(&shared.engine, "the discarded history")?;
        tracing::warn!(
            volume,
            "peer: this copy's changes are discarded; the primary sends everything"
        );
        Ok(format!(
            "volume {volume}: this copy is discarded; the primary sends it everything when it \
             connects"
        ))
    }
}

/// What a new primary tracks for replica `r` (see `docs/replication.md`, "Promotion").
///
/// The primary this copy followed until it was promoted (`followed`, in this runtime), if it
/// is still at this copy's last generation `current` when it comes back, differs from this
/// copy only in: the writes made here from now on (the attached set marks them in its
/// bitmap), and the regions of its own activity log and dirty bitmap for this copy (writes in
/// flight when it stopped), which it asks for as a sync target. So its bitmap starts at
/// `current`: a resync of those regions, not of everything. Any other replica at `current`
/// may lack writes that were in flight to it when the old primary crashed, and nothing here
/// names their regions: it gets a full sync, as does every replica after a restart of this
/// runtime (the primary it followed is not known then).
fn track_after_promotion(
    r: &ringblock_engine::replication::ReplicaState,
    followed: Option<NodeId>,
    current: Option<ringblock_engine::replication::GenerationId>,
) {
    if current.is_some() && followed == Some(r.node) {
        r.set_since(current);
        r.set_full_sync(false);
    } else {
        r.set_full_sync(true);
    }
}

pub(super) fn peer_of(
    entry: &VolumeEntry,
    node: NodeId,
) -> Result<std::sync::Arc<super::PeerEntry>, RuntimeError> {
    entry.peer(node).ok_or_else(|| {
        RuntimeError::NotFound(format!(
            "volume {}: node {node} is not one of its peers",
            entry.name
        ))
    })
}

/// Flush the volume through the engine: the up-to-date replicas hold every write durably
/// when this returns.
pub(super) fn flush_volume(
    shared: &super::Shared,
    entry: &VolumeEntry,
) -> Result<(), RuntimeError> {
    let handle = shared
        .engine
        .open(&entry.name)
        .map_err(|e| RuntimeError::Failed(format!("volume {}: {e}", entry.name)))?;
    let port = Port::new(1, PortWaker::Thread(std::thread::current()));
    let req = Request::flush(0);
    handle
        .submit(req, &port)
        .map_err(|(_, e)| RuntimeError::Failed(format!("volume {}: flush: {e}", entry.name)))?;
    let until = std::time::Instant::now() + DEMOTE_FLUSH_WAIT;
    loop {
        if let Some(c) = port.pop() {
            return c
                .result
                .map_err(|e| RuntimeError::Failed(format!("volume {}: flush: {e}", entry.name)));
        }
        if std::time::Instant::now() >= until {
            return Err(RuntimeError::Failed(format!(
                "volume {}: the flush did not complete within {} s",
                entry.name,
                DEMOTE_FLUSH_WAIT.as_secs()
            )));
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use ringblock_engine::replication::{GenerationId, Role, VolumeReplication};

    use super::*;

    #[test]
    fn only_the_followed_primary_is_tracked_from_the_last_generation() {
        let (a, b) = (NodeId::new(1).unwrap(), NodeId::new(2).unwrap());
        let g = GenerationId::new(9);
        let state = VolumeReplication::new(Role::Replica, 1 << 30, 20, &[a, b]).unwrap();
        for r in state.replicas() {
            r.set_full_sync(false);
            track_after_promotion(r, Some(a), g);
        }
        let (ra, rb) = (state.replica(a).unwrap(), state.replica(b).unwrap());
        assert_eq!((ra.since(), ra.full_sync()), (g, false));
        assert!(
            rb.full_sync(),
            "another replica may lack an in-flight write"
        );
        // Not known (a restart since), or no generation: everyone gets a full sync.
        for (followed, current) in [(None, g), (Some(a), None)] {
            ra.set_full_sync(false);
            track_after_promotion(ra, followed, current);
            assert!(ra.full_sync());
        }
    }
}
