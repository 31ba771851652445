//! A primary copy's connectors: one thread per replica that connects (with backoff), decides
//! what the link does, runs the link task on the link's reactor until it ends, and starts
//! over. The thread keeps the peer's status: connecting, diverged or suspended with the
//! reason; up to date or behind while a link runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use ringblock_engine::replication::status::unix_ms;
use ringblock_engine::replication::{
    NodeId, PeerState, ReplicaLink, ReplicaSet, ResyncScope, Role, VolumeReplication,
};
use ringblock_engine::ReactorId;

use super::config::{PeerSpec, RuntimeError};
use super::evict::Evictor;
use super::watch::{TaskControl, Watched};
use super::{
    lock, split_brain, ConnectorControl, PeerEntry, PrimaryPeer, PrimarySide, Shared, VolumeEntry,
    SUSPENDED,
};
use crate::peer::convert::{to_wire, wire_node_id};
use crate::peer::{
    connect, decide, monotonic_clock, Backoff, ConnectConfig, InitiatorConfig, LinkDecision,
    LinkOptions, LocalCopy, PeerAddress, PrimaryLink, Session,
};

/// Send window of a link: frames and bytes in flight.
const WINDOW_FRAMES: u32 = 256;
const WINDOW_BYTES: u64 = 32 << 20;

/// Attach a replica set to `entry`'s volume (links behind: writes mark their bitmaps) and
/// start one connector per peer.
pub(super) fn start_primary(
    shared: &Arc<Shared>,
    entry: &Arc<VolumeEntry>,
) -> Result<(), RuntimeError> {
    attach_links(shared, entry)?;
    start_connectors(shared, entry)?;
    let mut evictor = lock(&entry.evictor);
    if evictor.is_none() {
        *evictor = Evictor::start(shared, entry);
    }
    Ok(())
}

/// A new link to `peer` (behind), on the next reactor of the round robin.
fn new_link(
    shared: &Shared,
    entry: &VolumeEntry,
    replication: &Arc<VolumeReplication>,
    peer: &PeerSpec,
) -> Result<Arc<ReplicaLink>, RuntimeError> {
    let node = peer.node;
    let reactors = shared.engine.reactor_count().max(1);
    let reactor = ReactorId(shared.next_reactor.fetch_add(1, Ordering::Relaxed) % reactors);
    let index = replication
        .replicas()
        .iter()
        .position(|r| r.node == node)
        .ok_or_else(|| RuntimeError::Failed(format!("volume {}: no replica {node}", entry.name)))?;
    ReplicaLink::with_mode(replication.clone(), index, reactor, peer.link_mode())
        .ok_or_else(|| RuntimeError::Failed(format!("volume {}: no replica {node}", entry.name)))
}

/// Make writes fan out to `links` (a new set; the volume keeps the old ones).
fn swap_set(entry: &VolumeEntry, links: Vec<Arc<ReplicaLink>>) -> Result<(), RuntimeError> {
    let set = ReplicaSet::new(links)
        .map_err(|e| RuntimeError::Invalid(format!("volume {}: {e}", entry.name)))?;
    entry
        .volume
        .attach_replicas(Some(Arc::new(set)))
        .map_err(|e| RuntimeError::Conflict(format!("volume {}: {e}", entry.name)))
}

/// The first half of [`start_primary`]: from here on every write reaches the replicas'
/// bitmaps, before any connector runs.
pub(super) fn attach_links(shared: &Shared, entry: &VolumeEntry) -> Result<(), RuntimeError> {
    let mut primary = lock(&entry.primary);
    if primary.is_some() {
        return Ok(());
    }
    let replication = entry.replication();
    let mut peers = Vec::new();
    for p in entry.peers() {
        peers.push(PrimaryPeer {
            node: p.spec.node,
            link: new_link(shared, entry, &replication, &p.spec)?,
            control: ConnectorControl::new(),
            thread: None,
        });
    }
    swap_set(entry, peers.iter().map(|p| p.link.clone()).collect())?;
    *primary = Some(PrimarySide { peers });
    Ok(())
}

/// The second half of [`start_primary`]: one connector thread per link.
pub(super) fn start_connectors(
    shared: &Arc<Shared>,
    entry: &Arc<VolumeEntry>,
) -> Result<(), RuntimeError> {
    let mut primary = lock(&entry.primary);
    let Some(side) = primary.as_mut() else {
        return Err(RuntimeError::Failed(format!(
            "volume {}: no replica set attached",
            entry.name
        )));
    };
    for slot in side.peers.iter_mut().filter(|s| s.thread.is_none()) {
        if let Err(e) = spawn_connector(shared, entry, slot) {
            drop(primary);
            stop_primary(shared, entry, true);
            return Err(e);
        }
    }
    Ok(())
}

fn spawn_connector(
    shared: &Arc<Shared>,
    entry: &Arc<VolumeEntry>,
    slot: &mut PrimaryPeer,
) -> Result<(), RuntimeError> {
    let peer = entry.peer(slot.node).ok_or_else(|| {
        RuntimeError::Failed(format!("volume {}: no peer {}", entry.name, slot.node))
    })?;
    let (s, e, c, link) = (
        shared.clone(),
        entry.clone(),
        slot.control.clone(),
        slot.link.clone(),
    );
    let thread = std::thread::Builder::new()
        .name(format!("peer-connect-{}", link.index()))
        .spawn(move || run(&s, &e, &peer, &link, &c))
        .map_err(|err| RuntimeError::Failed(format!("cannot start a connector thread: {err}")))?;
    slot.thread = Some(thread);
    Ok(())
}

/// Stop one peer's connector and its link task (bounded wait): the link's failure path marks
/// what the replica may lack and hands every waiting op back. True when the task ended.
fn stop_peer(shared: &Shared, entry: &VolumeEntry, slot: PrimaryPeer) -> bool {
    slot.control.stop();
    if let Some(t) = slot.thread {
        if t.join().is_err() {
            tracing::error!(volume = %entry.name, "peer: a connector thread panicked");
        }
    }
    match slot.control.task() {
        Some(task) if !task.end_and_wait(shared.timing.stop_wait) => {
            tracing::warn!(volume = %entry.name, node = %slot.node,
                "peer: a link task did not end in time");
            false
        }
        _ => true,
    }
}

/// Stop `entry`'s connectors and their link tasks (bounded waits); with `detach`, the
/// volume's writes stop fanning out (demote). The links' failure paths mark what each
/// replica may lack.
/// Returns whether every link task ended within the wait.
pub(super) fn stop_primary(shared: &Shared, entry: &VolumeEntry, detach: bool) -> bool {
    // First: a cycle's flush must not wait on links being stopped.
    if let Some(evictor) = lock(&entry.evictor).take() {
        evictor.stop();
    }
    let Some(side) = lock(&entry.primary).take() else {
        return true;
    };
    for slot in &side.peers {
        slot.control.stop();
    }
    let mut all_ended = true;
    for slot in side.peers {
        all_ended &= stop_peer(shared, entry, slot);
    }
    if detach {
        if let Err(e) = entry.volume.attach_replicas(None) {
            tracing::error!(volume = %entry.name, "peer: cannot detach the replica set: {e}");
        }
    }
    all_ended
}

/// A primary copy gains peer `node` (already in `entry`'s replication and peers): a link in a
/// new set, and its connector.
pub(super) fn add_peer(
    shared: &Arc<Shared>,
    entry: &Arc<VolumeEntry>,
    node: NodeId,
) -> Result<(), RuntimeError> {
    let mut primary = lock(&entry.primary);
    let Some(side) = primary.as_mut() else {
        return Ok(());
    };
    let peer = entry
        .peer(node)
        .ok_or_else(|| RuntimeError::Failed(format!("volume {}: no peer {node}", entry.name)))?;
    let link = new_link(shared, entry, &entry.replication(), &peer.spec)?;
    let mut links: Vec<_> = side.peers.iter().map(|p| p.link.clone()).collect();
    links.push(link.clone());
    swap_set(entry, links)?;
    side.peers.push(PrimaryPeer {
        node,
        link,
        control: ConnectorControl::new(),
        thread: None,
    });
    let slot = side.peers.last_mut().expect("just pushed");
    spawn_connector(shared, entry, slot)
}

/// A primary copy loses peer `node`: its connector and link task stop (the task's failure
/// path completes every op it holds), then a set without it is swapped in. Writes that read
/// the old set afterwards find the link behind and only mark its (dropped) bitmap. Returns
/// whether the task ended within the wait.
pub(super) fn remove_peer(
    shared: &Shared,
    entry: &VolumeEntry,
    node: NodeId,
) -> Result<bool, RuntimeError> {
    let mut primary = lock(&entry.primary);
    let Some(side) = primary.as_mut() else {
        return Ok(true);
    };
    let Some(at) = side.peers.iter().position(|p| p.node == node) else {
        return Ok(true);
    };
    let links: Vec<_> = side
        .peers
        .iter()
        .filter(|p| p.node != node)
        .map(|p| p.link.clone())
        .collect();
    // The set is checked for room first: a refusal leaves the peer running.
    if entry.volume.replica_set_changes_left() == 0 {
        return Err(RuntimeError::Conflict(format!(
            "volume {}: {}",
            entry.name,
            ringblock_engine::replication::ReplicationError::TooManySetChanges
        )));
    }
    let slot = side.peers.remove(at);
    let ended = stop_peer(shared, entry, slot);
    swap_set(entry, links)?;
    Ok(ended)
}

/// The links of a primary copy now (empty on a replica copy).
pub(super) fn links(entry: &VolumeEntry) -> Vec<Arc<ReplicaLink>> {
    lock(&entry.primary).as_ref().map_or_else(Vec::new, |s| {
        s.peers.iter().map(|p| p.link.clone()).collect()
    })
}

/// The link to peer `node` of a primary copy now (None on a replica copy, or for a node that
/// is not a peer).
pub(super) fn link_of(entry: &VolumeEntry, node: NodeId) -> Option<Arc<ReplicaLink>> {
    lock(&entry.primary)
        .as_ref()?
        .peers
        .iter()
        .find(|p| p.node == node)
        .map(|p| p.link.clone())
}

/// End the link task to `node`, if one runs, and let its connector re-read its orders.
pub(super) fn wake_peer(
    entry: &VolumeEntry,
    node: NodeId,
    end_task: bool,
) -> Option<Arc<TaskControl>> {
    let primary = lock(&entry.primary);
    let control = primary
        .as_ref()?
        .peers
        .iter()
        .find(|p| p.node == node)?
        .control
        .clone();
    drop(primary);
    let task = control.task();
    control.wake(end_task);
    task.filter(|t| !t.exited())
}

/// How one attempt ended.
enum Attempt {
    /// Not connected, or refused: the reason.
    Failed(String),
    /// Split brain: the reason; retried slowly.
    Diverged(String),
    /// A link task ran for this long.
    Ran(Duration),
}

/// The connector thread of `entry`'s peer number `peer`.
fn run(
    shared: &Shared,
    entry: &VolumeEntry,
    p: &PeerEntry,
    link: &Arc<ReplicaLink>,
    control: &ConnectorControl,
) {
    let status = &p.replica.status;
    let mut backoff = Backoff::new(shared.timing.backoff_base, shared.timing.backoff_max);
    let mut last_reason: Option<String> = None;
    while !control.stopped() && !shared.stopping.load(Ordering::Acquire) {
        if p.suspended.load(Ordering::Acquire) {
            status.set(PeerState::Suspended, Some(SUSPENDED));
            status.set_connected(None);
            control.sleep(Duration::from_secs(3600));
            continue;
        }
        if entry.replication().role() != Role::Primary {
            return;
        }
        let delay = match attempt(shared, entry, p, link, control) {
            Attempt::Failed(reason) => {
                if last_reason.as_deref() != Some(&reason) {
                    tracing::warn!(volume = %entry.name, node = %p.spec.node,
                        address = %p.spec.address, "peer: replica not connected: {reason}");
                }
                status.set(PeerState::Connecting, Some(&reason));
                last_reason = Some(reason);
                backoff.after_failure(rand::rngs::OsRng.next_u64())
            }
            Attempt::Diverged(reason) => {
                if last_reason.as_deref() != Some(&reason) {
                    tracing::error!(volume = %entry.name, node = %p.spec.node, "peer: {reason}");
                }
                status.set(PeerState::Diverged, Some(&reason));
                last_reason = Some(reason);
                shared.timing.diverged_retry
            }
            Attempt::Ran(lived) => {
                last_reason = None;
                let replica = &p.replica;
                let lacking = replica.dirty.dirty_bytes(entry.volume.size_bytes());
                if p.suspended.load(Ordering::Acquire) {
                    // The suspend operation says so.
                } else if lacking > 0 || replica.full_sync() {
                    status.set(
                        PeerState::Behind,
                        Some(&format!(
                            "lacks {lacking} bytes{}; the connection ended, reconnecting",
                            if replica.full_sync() {
                                " (full sync)"
                            } else {
                                ""
                            }
                        )),
                    );
                } else {
                    status.set(
                        PeerState::Connecting,
                        Some("the connection ended; reconnecting"),
                    );
                }
                status.set_connected(None);
                backoff.after_link(lived, rand::rngs::OsRng.next_u64())
            }
        };
        control.sleep(delay);
    }
}

fn attempt(
    shared: &Shared,
    entry: &VolumeEntry,
    p: &PeerEntry,
    link: &Arc<ReplicaLink>,
    control: &ConnectorControl,
) -> Attempt {
    let replication = &entry.replication();
    let history = match to_wire(&replication.history()) {
        Ok(h) => h,
        Err(e) => return Attempt::Failed(format!("this copy's history: {e}")),
    };
    let region_size_bytes = 1u32 << replication.activity.region_shift();
    let config = ConnectConfig::new(InitiatorConfig {
        cluster: shared.cluster,
        node: wire_node_id(shared.node),
        secret: shared.secret.clone(),
        volume: entry.id,
        volume_size_bytes: entry.volume.size_bytes(),
        region_size_bytes,
        history,
    });
    let (fd, session) = match connect(&p.spec.address, &config) {
        Ok(c) => c,
        Err(e) => return Attempt::Failed(e.to_string()),
    };
    if let Some(reason) = wrong_peer(entry, p, &session) {
        return Attempt::Failed(reason);
    }
    let decision = decide(
        &LocalCopy::from_state(replication, session.peer_node),
        &session,
    );
    let scope = match decision {
        LinkDecision::UpToDate => None,
        LinkDecision::ResyncPeer { scope, .. } => Some(scope),
        LinkDecision::Diverged { common } => {
            return Attempt::Diverged(split_brain(&p.spec.node.to_string(), &entry.name, common))
        }
        LinkDecision::Refuse(r) => return Attempt::Failed(format!("link refused: {r}")),
        LinkDecision::SyncTarget { .. } => {
            return Attempt::Failed("link refused: a primary is never a sync target".into())
        }
    };
    let status = &p.replica.status;
    if control.stopped() || p.suspended.load(Ordering::Acquire) {
        return Attempt::Failed("told to stop while connecting".into());
    }
    let handle = match shared.engine.open(&entry.name) {
        Ok(h) => h,
        Err(e) => return Attempt::Failed(format!("cannot open the volume: {e}")),
    };
    if let Err(reason) = prepare_link(shared, entry, p, scope) {
        return Attempt::Failed(reason);
    }
    status.set_connected(Some(unix_ms()));
    let opts = LinkOptions {
        volume: entry.id,
        send_seq: session.next_send,
        recv_seq: session.next_recv,
        window_frames: WINDOW_FRAMES,
        window_bytes: WINDOW_BYTES,
        zero_copy: matches!(p.spec.address, PeerAddress::Tcp(_)),
        clock: monotonic_clock(),
        peer: format!("node {} at {}", p.spec.node, p.spec.address),
    };
    let task_control = Arc::new(TaskControl::new(None));
    let started = Instant::now();
    control.set_task(Some(task_control.clone()));
    p.link_starts.fetch_add(1, Ordering::Relaxed);
    let task = Watched::new(
        PrimaryLink::new(fd, handle, link.clone(), opts),
        task_control.clone(),
    );
    shared
        .engine
        .spawn_task(Some(link.reactor()), Box::new(task));
    tracing::info!(volume = %entry.name, node = %p.spec.node, reactor = link.reactor().0,
        up_to_date = status.state() == PeerState::UpToDate, "peer: replica link started");
    // Until the task ends, or the connector is told to stop or suspend.
    loop {
        if task_control.wait_exit(Duration::from_millis(200)) {
            break;
        }
        if control.stopped()
            || p.suspended.load(Ordering::Acquire)
            || shared.stopping.load(Ordering::Acquire)
        {
            if !task_control.end_and_wait(shared.timing.stop_wait) {
                tracing::warn!(volume = %entry.name, node = %p.spec.node,
                    "peer: the link task did not end in time");
            }
            break;
        }
    }
    control.set_task(None);
    Attempt::Ran(started.elapsed())
}

/// The session's peer is the configured node, and its copy is large enough.
fn wrong_peer(entry: &VolumeEntry, p: &PeerEntry, session: &Session) -> Option<String> {
    if session.peer_node != wire_node_id(p.spec.node) {
        return Some(format!(
            "the peer at {} is node {}, not node {} as configured",
            p.spec.address, session.peer_node, p.spec.node
        ));
    }
    let ours = entry.volume.size_bytes();
    (session.peer_volume_size_bytes < ours).then(|| {
        format!(
            "the peer's copy is {} bytes, smaller than this one ({ours} bytes): grow it there",
            session.peer_volume_size_bytes
        )
    })
}

/// Before a link task moves data: a full resync marks the whole bitmap (durably).
fn prepare_link(
    shared: &Shared,
    entry: &VolumeEntry,
    p: &PeerEntry,
    scope: Option<ResyncScope>,
) -> Result<(), String> {
    let replica = &p.replica;
    if scope == Some(ResyncScope::Full) {
        let newly = replica.dirty.mark_bytes(0, entry.volume.max_size_bytes());
        let flagged = !replica.full_sync();
        replica.set_full_sync(true);
        if newly || flagged {
            entry.volume.replication_changed();
            super::prepare::persist(&shared.engine, "the full-sync marks")
                .map_err(|e| e.to_string())?;
        }
    }
    // The link task enters the fan-out as resyncing, copies what the bitmap holds (nothing,
    // for a replica that lacks nothing) and then declares itself up to date.
    let dirty_bytes = replica.dirty.dirty_bytes(entry.volume.size_bytes());
    replica.status.set(
        PeerState::Resyncing,
        Some(&format!("starting a resync of {dirty_bytes} bytes")),
    );
    Ok(())
}
