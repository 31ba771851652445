//! Giving each replicated volume its replication state before anything is served: the record
//! the volume was loaded with (it wins over the configuration), or a new one, checked against
//! the configured peers and the device's room for records, and made durable.

use std::sync::Arc;

use ringblock_engine::replication::{
    GenerationHistory, NodeId, ReplicaRecord, Role, VolumeReplication, MAX_REPLICAS,
};
use ringblock_engine::{Engine, Volume};

use super::config::{ReplicatedVolume, RuntimeError};
use super::membership::Membership;

/// The configured volumes with the peers added and removed at runtime merged in (see
/// [`Membership::merge`]).
pub(super) fn merge_membership(
    volumes: &[ReplicatedVolume],
    membership: &Membership,
) -> Result<Vec<ReplicatedVolume>, RuntimeError> {
    let mut merged = Vec::with_capacity(volumes.len());
    for cfg in volumes {
        let (peers, ignored) = membership.merge(&cfg.name, &cfg.peers);
        for node in ignored {
            tracing::warn!(volume = %cfg.name, %node,
                "peer: node {node} was removed with `ringblock replica remove`; its \
                 [[volume.replica]] entry is ignored (delete it, or `ringblock replica add` the \
                 node again)");
        }
        if peers.len() > MAX_REPLICAS {
            return Err(RuntimeError::Invalid(format!(
                "volume {}: the configuration and the replicas added at runtime make {} \
                 replicas, more than {MAX_REPLICAS}; remove some with `ringblock replica remove`",
                cfg.name,
                peers.len()
            )));
        }
        merged.push(ReplicatedVolume {
            peers,
            ..cfg.clone()
        });
    }
    Ok(merged)
}

/// Region size of a new record: 1 MiB.
pub(super) const DEFAULT_REGION_SHIFT: u8 = 20;

/// The volume's replication state, made or loaded, matching `cfg`'s peers. A recorded peer
/// in `removed` (removed at runtime; the daemon stopped before the record lost it) is dropped
/// from the record. Nothing is persisted here: the caller flushes once for every volume.
/// A primary copy starting writes in a new generation: every replica it last knew up to date
/// is now up to date as of the generation before. Without it, a primary that crashed (its
/// links never failed, so no generation started) and restarts as primary while a replica was
/// promoted would take writes in the generation the promoted copy left: the copies would
/// differ with histories that say one is merely behind, and a resync would overwrite the
/// restarted primary's writes. With it, the two histories diverge and both sides say so. A
/// replica that rejoins resyncs its dirty regions (the activity log a crash folds in) and
/// takes the new generation at the end, as after any failure.
pub(super) fn restart_generation(volume: &str, replication: &VolumeReplication) {
    if replication.role() != Role::Primary {
        return;
    }
    let current = replication.history().current();
    let mut stale = 0;
    for r in replication
        .replicas()
        .iter()
        .filter(|r| r.since().is_none())
    {
        r.set_since(current);
        stale += 1;
    }
    if stale > 0 {
        let id = replication.start_generation();
        tracing::info!(volume, generation = %id, replicas = stale,
            "peer: a restarted primary writes in a new generation until its replicas rejoin");
    }
}

pub(super) fn replication_for(
    volume: &Volume,
    cfg: &ReplicatedVolume,
    removed: &[NodeId],
) -> Result<Arc<VolumeReplication>, RuntimeError> {
    let peers: Vec<NodeId> = cfg.peers.iter().map(|p| p.node).collect();
    let Some(existing) = volume.replication() else {
        let state = VolumeReplication::new(
            cfg.role,
            volume.max_size_bytes(),
            DEFAULT_REGION_SHIFT,
            &peers,
        )
        .map_err(|e| RuntimeError::Invalid(format!("volume {}: {e}", cfg.name)))?;
        if cfg.role == Role::Replica {
            // A new replica holds nothing: the primary sees it behind since nothing and
            // sends everything.
            state.adopt_history(GenerationHistory::default());
        }
        let state = Arc::new(state);
        volume.set_replication(Some(state.clone()));
        tracing::info!(volume = %cfg.name, role = ?cfg.role, "peer: new replication record");
        return Ok(state);
    };
    if existing.role() != cfg.role {
        let command = match existing.role() {
            Role::Primary => "ringblock volume demote",
            Role::Replica => "ringblock volume promote",
        };
        tracing::warn!(volume = %cfg.name, configured = ?cfg.role, recorded = ?existing.role(),
            "peer: the volume's persisted role differs from the configuration; the persisted \
             role applies (change it with `{command}`)");
    }
    let recorded: Vec<NodeId> = existing.replicas().iter().map(|r| r.node).collect();
    if let Some(gone) = recorded
        .iter()
        .find(|n| !peers.contains(n) && !removed.contains(n))
    {
        return Err(RuntimeError::Invalid(format!(
            "volume {name}: its replication record tracks node {gone}, which the configuration \
             no longer lists as a replica; a replica is removed with `ringblock replica remove \
             {name} {gone}` (it stops the link and drops the node from the record): put the \
             [[volume.replica]] entry back, start the daemon and run that command",
            name = cfg.name
        )));
    }
    let added: Vec<NodeId> = peers
        .iter()
        .copied()
        .filter(|n| !recorded.contains(n))
        .collect();
    let dropped: Vec<NodeId> = recorded
        .iter()
        .copied()
        .filter(|n| removed.contains(n))
        .collect();
    if added.is_empty() && dropped.is_empty() {
        return Ok(existing);
    }
    // Nothing is served yet (no set attached, no write in flight): rebuilding the state from
    // its record with the new replicas added loses nothing. A new replica needs everything.
    let mut record = existing.record();
    // A removed replica that was in step leaves the set of up-to-date replicas: a new
    // generation (as `replica remove` starts), so its copy never looks in step again.
    let in_step_dropped = record
        .replicas
        .iter()
        .any(|r| dropped.contains(&r.node) && r.since.is_none());
    record.replicas.retain(|r| !dropped.contains(&r.node));
    if in_step_dropped && record.role == Role::Primary {
        record.history.start_new();
    }
    for &node in &added {
        record.replicas.push(ReplicaRecord {
            node,
            since: None,
            full_sync: true,
            dirty: Vec::new(),
        });
    }
    let state = VolumeReplication::from_record(&record, volume.max_size_bytes())
        .map_err(|e| RuntimeError::Invalid(format!("volume {}: {e}", cfg.name)))?;
    let state = Arc::new(state);
    volume.set_replication(Some(state.clone()));
    tracing::info!(volume = %cfg.name, added = ?added, removed = ?dropped,
        "peer: the volume's record follows its replicas");
    Ok(state)
}

/// Every configured volume exists, and no device gets more replicated volumes than its
/// metadata slots are sure to hold.
pub(super) fn check_capacity(
    engine: &Engine,
    volumes: &[ReplicatedVolume],
) -> Result<Vec<Arc<Volume>>, RuntimeError> {
    let mut found = Vec::with_capacity(volumes.len());
    for cfg in volumes {
        let v = engine.volume(&cfg.name).ok_or_else(|| {
            RuntimeError::NotFound(format!("replicated volume {} does not exist", cfg.name))
        })?;
        found.push(v);
    }
    for d in engine.devices() {
        let on_device: Vec<&str> = found
            .iter()
            .filter(|v| v.device.id == d.id)
            .map(|v| v.name.as_str())
            .collect();
        let capacity = d.label.replication_capacity();
        if on_device.len() > capacity {
            return Err(RuntimeError::Invalid(format!(
                "device {} holds {} replicated volumes ({}) but its metadata has room for {} \
                 replication records; move volumes to a device formatted by this build, or \
                 replicate fewer of them",
                d.name,
                on_device.len(),
                on_device.join(", "),
                capacity
            )));
        }
    }
    Ok(found)
}

/// Flush every device: the replication state's changes are durable when this returns.
pub(super) fn persist(engine: &Engine, what: &str) -> Result<(), RuntimeError> {
    engine
        .flush_all()
        .map_err(|e| RuntimeError::Failed(format!("cannot make {what} durable: {e}")))
}

/// A volume that carries a replication record but is not configured as replicated: serving
/// it as a plain volume would leave its record (and a replica's role) behind silently.
pub fn check_unconfigured_records(
    engine: &Engine,
    configured: &[&str],
) -> Result<(), RuntimeError> {
    for v in engine.volumes() {
        if v.replication().is_some() && !configured.contains(&v.name.as_str()) {
            return Err(RuntimeError::Invalid(format!(
                "volume {} has a replication record but no [[volume.replica]] in the \
                 configuration; removing replication from a volume is not supported in this \
                 build: put its [[volume.replica]] entries back",
                v.name
            )));
        }
    }
    Ok(())
}
