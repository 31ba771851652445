//! A primary copy's connectors: one thread per replica that connects (with backoff), decides
//! what the link does, runs the link task on the link's reactor until it ends, and starts
//! over. The thread keeps the peer's status: connecting, diverged or suspended with the
//! reason; up to date or behind while a link runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use ringblock_engine::replication::status::unix_ms;
use ringblock_engine::replication::{PeerState, ReplicaLink, ReplicaSet, ResyncScope, Role};
use ringblock_engine::ReactorId;

use super::config::RuntimeError;
use super::evict::Evictor;
use super::watch::{TaskControl, Watched};
use super::{lock, split_brain, ConnectorControl, PeerEntry, PrimarySide, Shared, VolumeEntry};
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

/// The first half of [`start_primary`]: from here on every write reaches the replicas'
/// bitmaps, before any connector runs.
pub(super) fn attach_links(shared: &Shared, entry: &VolumeEntry) -> Result<(), RuntimeError> {
    let mut primary = lock(&entry.primary);
    if primary.is_some() {
        return Ok(());
    }
    let reactors = shared.engine.reactor_count().max(1);
    let mut links = Vec::with_capacity(entry.peers.len());
    for p in &entry.peers {
        let reactor = ReactorId(shared.next_reactor.fetch_add(1, Ordering::Relaxed) % reactors);
        let link = ReplicaLink::with_mode(
            entry.replication.clone(),
            p.index,
            reactor,
            p.spec.link_mode(),
        )
        .ok_or_else(|| {
            RuntimeError::Failed(format!("volume {}: no replica {}", entry.name, p.index))
        })?;
        links.push(link);
    }
    let set = ReplicaSet::new(links.clone())
        .map_err(|e| RuntimeError::Invalid(format!("volume {}: {e}", entry.name)))?;
    entry
        .volume
        .attach_replicas(Some(Arc::new(set)))
        .map_err(|e| RuntimeError::Failed(format!("volume {}: {e}", entry.name)))?;
    *primary = Some(PrimarySide {
        links,
        controls: Vec::new(),
        threads: Vec::new(),
    });
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
    if !side.threads.is_empty() {
        return Ok(());
    }
    for (peer, link) in side.links.clone().into_iter().enumerate() {
        let control = ConnectorControl::new();
        let (s, e, c) = (shared.clone(), entry.clone(), control.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("peer-connect-{peer}"))
            .spawn(move || run(&s, &e, peer, &link, &c));
        match spawned {
            Ok(t) => {
                side.controls.push(control);
                side.threads.push(t);
            }
            Err(err) => {
                drop(primary);
                stop_primary(shared, entry, true);
                return Err(RuntimeError::Failed(format!(
                    "cannot start a connector thread: {err}"
                )));
            }
        }
    }
    Ok(())
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
    let mut all_ended = true;
    for c in &side.controls {
        c.stop();
    }
    for t in side.threads {
        if t.join().is_err() {
            tracing::error!(volume = %entry.name, "peer: a connector thread panicked");
        }
    }
    for c in &side.controls {
        if let Some(task) = c.task() {
            if !task.end_and_wait(shared.timing.stop_wait) {
                all_ended = false;
                tracing::warn!(volume = %entry.name, "peer: a link task did not end in time");
            }
        }
    }
    if detach {
        if let Err(e) = entry.volume.attach_replicas(None) {
            tracing::error!(volume = %entry.name, "peer: cannot detach the replica set: {e}");
        }
    }
    drop(side.links);
    all_ended
}

/// The links of a primary copy now (empty on a replica copy).
pub(super) fn links(entry: &VolumeEntry) -> Vec<Arc<ReplicaLink>> {
    lock(&entry.primary)
        .as_ref()
        .map_or_else(Vec::new, |s| s.links.clone())
}

/// End the link task to `peer`, if one runs, and let its connector re-read its orders.
pub(super) fn wake_peer(
    entry: &VolumeEntry,
    peer: usize,
    end_task: bool,
) -> Option<Arc<TaskControl>> {
    let primary = lock(&entry.primary);
    let control = primary.as_ref()?.controls.get(peer)?.clone();
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
    peer: usize,
    link: &Arc<ReplicaLink>,
    control: &ConnectorControl,
) {
    let p = &entry.peers[peer];
    let status = &entry.replication.replicas()[p.index].status;
    let mut backoff = Backoff::new(shared.timing.backoff_base, shared.timing.backoff_max);
    let mut last_reason: Option<String> = None;
    while !control.stopped() && !shared.stopping.load(Ordering::Acquire) {
        if p.suspended.load(Ordering::Acquire) {
            status.set(PeerState::Suspended, Some("suspended by the operator"));
            status.set_connected(None);
            control.sleep(Duration::from_secs(3600));
            continue;
        }
        if entry.replication.role() != Role::Primary {
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
                let replica = &entry.replication.replicas()[p.index];
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
    let replication = &entry.replication;
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
    let status = &replication.replicas()[p.index].status;
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
    let replica = &entry.replication.replicas()[p.index];
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
