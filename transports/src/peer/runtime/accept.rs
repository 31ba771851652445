//! The listening side: which volumes a peer may connect for, and what an established
//! connection becomes (one `ReplicaServe` task per replica copy, from a configured peer, while
//! the permit is held). A primary copy completes the handshake too, so that two primaries of
//! one volume (a forced promotion during a partition) both see the split brain, and then
//! refuses the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ringblock_engine::replication::status::unix_ms;
use ringblock_engine::replication::{PeerState, Role};

use super::watch::{TaskControl, Watched};
use super::{lock, split_brain, Serving, Shared, VolumeEntry};
use crate::peer::convert::{from_wire, node_id, to_wire};
use crate::peer::listener::{OnEstablished, SharedLookup};
use crate::peer::{
    decide, monotonic_clock, Established, LinkDecision, LocalCopy, LocalVolume, ReplicaServe,
    ReplicatedVolumeId, ServeOptions,
};

/// Engine requests a replica's serve task keeps in flight.
const SERVE_IN_FLIGHT: usize = 32;

/// The copies this node holds, as the handshake tells them (only to a peer that proved it
/// holds the cluster secret).
pub(super) fn lookup(shared: &Arc<Shared>) -> SharedLookup {
    let shared = Arc::downgrade(shared);
    Arc::new(move |id: ReplicatedVolumeId| {
        let shared = shared.upgrade()?;
        let entry = shared.volumes.iter().find(|v| v.id == id)?;
        Some(LocalVolume {
            volume_size_bytes: entry.volume.size_bytes(),
            region_size_bytes: 1u32 << entry.replication().activity.region_shift(),
            history: to_wire(&entry.replication().history()).ok()?,
        })
    })
}

pub(super) fn on_established(shared: &Arc<Shared>) -> OnEstablished {
    let shared = Arc::downgrade(shared);
    Arc::new(move |est: Established| {
        if let Some(shared) = shared.upgrade() {
            if let Err(reason) = serve(&shared, est) {
                tracing::warn!("peer: connection closed: {reason}");
            }
        }
    })
}

/// Decide what `est` does and start its serve task; on refusal the connection closes (its
/// socket and permit are dropped) and the reason is returned for the log.
fn serve(shared: &Shared, est: Established) -> Result<(), String> {
    if shared.stopping.load(Ordering::Acquire) {
        return Err("the runtime is stopping".into());
    }
    let session = &est.session;
    let entry = shared
        .volumes
        .iter()
        .find(|v| v.id == session.volume)
        .ok_or_else(|| format!("volume {} is not replicated here", session.volume))?;
    let Some(peer) = node_id(session.peer_node).and_then(|n| entry.peer(n)) else {
        return Err(format!(
            "volume {}: node {} is not one of its configured peers",
            entry.name, session.peer_node
        ));
    };
    let status = &peer.replica.status;
    let _ops = lock(&entry.ops);
    let replication = entry.replication();
    let decision = decide(
        &LocalCopy::from_state(&replication, session.peer_node),
        session,
    );
    let diverged = |common| {
        let reason = split_brain(&peer.spec.node.to_string(), &entry.name, common);
        status.set(PeerState::Diverged, Some(&reason));
        reason
    };
    if replication.role() != Role::Replica {
        if let LinkDecision::Diverged { common } = decision {
            let reason = diverged(common);
            tracing::error!(volume = %entry.name, node = %peer.spec.node, "peer: {reason}");
            return Err(reason);
        }
        return Err(format!(
            "volume {}: this copy is the primary; node {} may not connect as one",
            entry.name, peer.spec.node
        ));
    }
    let mut serving = lock(&entry.serving);
    if let Some(live) = serving.as_ref().filter(|s| !s.control.exited()) {
        return Err(format!(
            "volume {}: node {} is already connected as its primary; refusing a second \
             primary connection from node {}",
            entry.name, live.node, peer.spec.node
        ));
    }
    match decision {
        LinkDecision::UpToDate => status.set(PeerState::UpToDate, None),
        LinkDecision::SyncTarget { .. } => status.set(
            PeerState::Resyncing,
            Some("this copy lacks writes; the primary resyncs it"),
        ),
        LinkDecision::Diverged { common } => return Err(diverged(common)),
        LinkDecision::Refuse(r) => {
            let reason = format!("volume {}: link refused: {r}", entry.name);
            status.set(PeerState::Connecting, Some(&reason));
            return Err(reason);
        }
        LinkDecision::ResyncPeer { .. } => {
            return Err("a replica is never a sync source".into());
        }
    }
    let handle = shared
        .engine
        .open(&entry.name)
        .map_err(|e| format!("volume {}: cannot open: {e}", entry.name))?;
    status.set_connected(Some(unix_ms()));
    let opts = ServeOptions {
        volume: entry.id,
        send_seq: session.next_send,
        recv_seq: session.next_recv,
        max_in_flight: SERVE_IN_FLIGHT,
        clock: monotonic_clock(),
        peer: format!("node {} at {}", peer.spec.node, est.peer),
        primary_node: Some(peer.spec.node),
        // Adopted at the end of the resync (with the generations the primary sends since).
        primary_history: from_wire(&session.peer_history)
            .map_err(|e| format!("volume {}: the primary's history: {e}", entry.name))?,
        primary_size_bytes: session.peer_volume_size_bytes,
    };
    let replica = peer.replica.clone();
    let permit = est.permit;
    let on_exit = Box::new(move || {
        // The connection's place among the listener's connections goes with the task.
        drop(permit);
        let status = &replica.status;
        status.set_connected(None);
        if status.state() != PeerState::Diverged {
            status.set(
                PeerState::Connecting,
                Some("the primary's connection ended"),
            );
        }
    });
    let control = Arc::new(TaskControl::new(Some(on_exit)));
    *serving = Some(Serving {
        node: peer.spec.node,
        control: control.clone(),
    });
    let task = Watched::new(ReplicaServe::new(est.fd, handle, opts), control);
    let reactor = shared.engine.spawn_task(None, Box::new(task));
    tracing::info!(volume = %entry.name, node = %peer.spec.node, reactor = reactor.0,
        "peer: serving the primary's link");
    Ok(())
}

/// End the serve task of `entry`, if one runs (bounded wait).
pub(super) fn end_serving(shared: &Shared, entry: &VolumeEntry) -> bool {
    let control = lock(&entry.serving).take().map(|s| s.control);
    match control {
        Some(c) if !c.exited() => {
            let ended = c.end_and_wait(shared.timing.stop_wait);
            if !ended {
                tracing::warn!(volume = %entry.name, "peer: the serve task did not end in time");
            }
            ended
        }
        _ => true,
    }
}
