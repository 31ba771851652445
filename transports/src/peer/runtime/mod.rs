//! The peer runtime: what `ringblock serve` starts for replicated volumes.
//!
//! - Each replicated volume gets its replication state ([`prepare`]): the persisted record, or
//!   a new one (a primary's with a fresh generation, a replica's empty), durable before
//!   anything is served.
//! - A primary copy gets one [`ReplicaLink`] per peer behind one `ReplicaSet`, and one
//!   connector thread per link ([`connector`]): connect with backoff, decide, spawn the
//!   `PrimaryLink` task on the link's reactor, learn when it ends ([`watch`]), reconnect.
//! - Every node listens ([`accept`]): a replica copy takes one primary connection per volume
//!   and serves it with a `ReplicaServe` task.
//! - The operator's operations ([`ops`]): promote, demote, suspend, resume, resolve; and
//!   adding and removing a peer at runtime ([`members`]), kept with the suspensions in the
//!   state directory's membership file ([`membership`]) and merged with the configuration at
//!   start.
//!
//! `docs/replication.md` ("Runtime") describes the roles and the operations.

mod accept;
pub mod config;
mod connector;
mod evict;
mod members;
pub mod membership;
mod ops;
mod prepare;
mod verify;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringblock_engine::replication::{NodeId, ReplicaLink, ReplicaState, Role, VolumeReplication};
use ringblock_engine::{Engine, Volume};

pub use config::{
    ExportProbe, ListenAddress, PeerMode, PeerSpec, ReplicatedVolume, RuntimeConfig, RuntimeError,
    RuntimeTiming, DEFAULT_ASYNC_QUEUE_BYTES,
};
pub use members::parse_mode;
pub use membership::parse_address;
pub use prepare::check_unconfigured_records;
pub use verify::{VerifyPeerReport, VerifyReport};

use super::ids::{cluster_id, volume_id};
use super::listener::{ListenerConfig, PeerListener};
use super::{AcceptorConfig, ClusterId, ClusterSecret, ReplicatedVolumeId};
use watch::TaskControl;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every thread of the runtime shares.
pub(super) struct Shared {
    engine: Arc<Engine>,
    node: NodeId,
    cluster: ClusterId,
    secret: ClusterSecret,
    timing: RuntimeTiming,
    exports: Option<ExportProbe>,
    volumes: Vec<Arc<VolumeEntry>>,
    stopping: AtomicBool,
    /// Round robin of link reactors.
    next_reactor: AtomicU32,
    /// Where the runtime's changes to the peers are kept (None: nowhere, tests).
    membership_file: Option<PathBuf>,
    /// What that file holds (changed under a volume's operation lock, then this lock).
    membership: Mutex<membership::Membership>,
}

impl Shared {
    fn volume(&self, name: &str) -> Result<&Arc<VolumeEntry>, RuntimeError> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| RuntimeError::NotFound(format!("no replicated volume named {name}")))
    }
}

impl Shared {
    /// Change the membership file (see [`membership`]) durably; nothing changes when it
    /// cannot be written.
    fn change_membership(
        &self,
        change: impl FnOnce(&mut membership::Membership),
    ) -> Result<(), RuntimeError> {
        let mut current = lock(&self.membership);
        let mut next = current.clone();
        change(&mut next);
        if let Some(path) = &self.membership_file {
            next.store(path)?;
        }
        *current = next;
        Ok(())
    }
}

/// One peer of a volume.
pub(super) struct PeerEntry {
    spec: PeerSpec,
    /// Its state in the volume's replication (shared by every `VolumeReplication` that lists
    /// it).
    replica: Arc<ReplicaState>,
    /// Suspended by the operator (kept in the membership file).
    suspended: AtomicBool,
    /// Link tasks started for it since the runtime started.
    link_starts: AtomicU64,
}

/// A connector thread and what it is told.
pub(super) struct ConnectorControl {
    state: Mutex<ConnectorState>,
    cv: Condvar,
}

#[derive(Default)]
struct ConnectorState {
    stop: bool,
    /// Bumped on every wake-up (suspend, resume, stop).
    wakes: u64,
    /// The link task running now, if any.
    task: Option<Arc<TaskControl>>,
}

impl ConnectorControl {
    fn new() -> Arc<ConnectorControl> {
        Arc::new(ConnectorControl {
            state: Mutex::new(ConnectorState::default()),
            cv: Condvar::new(),
        })
    }

    fn stopped(&self) -> bool {
        lock(&self.state).stop
    }

    /// Wake the thread (it re-reads what it is told) and end its link task, if any.
    fn wake(&self, end_task: bool) {
        let task = {
            let mut s = lock(&self.state);
            s.wakes += 1;
            self.cv.notify_all();
            if end_task {
                s.task.clone()
            } else {
                None
            }
        };
        if let Some(t) = task {
            t.request_end();
        }
    }

    fn stop(&self) {
        lock(&self.state).stop = true;
        self.wake(true);
    }

    /// Sleep `delay`, or until woken or stopped.
    fn sleep(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut s = lock(&self.state);
        let wakes = s.wakes;
        while !s.stop && s.wakes == wakes {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn set_task(&self, task: Option<Arc<TaskControl>>) {
        lock(&self.state).task = task;
    }

    fn task(&self) -> Option<Arc<TaskControl>> {
        lock(&self.state).task.clone()
    }
}

/// A primary copy's moving parts: one per peer.
pub(super) struct PrimarySide {
    peers: Vec<PrimaryPeer>,
}

/// One peer's link and connector on a primary copy.
pub(super) struct PrimaryPeer {
    node: NodeId,
    link: Arc<ReplicaLink>,
    control: Arc<ConnectorControl>,
    /// The connector thread, once started.
    thread: Option<JoinHandle<()>>,
}

/// A replica copy's live primary connection.
pub(super) struct Serving {
    node: NodeId,
    control: Arc<TaskControl>,
}

/// One replicated volume.
pub(super) struct VolumeEntry {
    name: String,
    id: ReplicatedVolumeId,
    volume: Arc<Volume>,
    /// Swapped when a peer is added or removed (the volume's own pointer too).
    replication: Mutex<Arc<VolumeReplication>>,
    peers: Mutex<Vec<Arc<PeerEntry>>>,
    /// Serializes the operator's operations on this volume.
    ops: Mutex<()>,
    primary: Mutex<Option<PrimarySide>>,
    serving: Mutex<Option<Serving>>,
    /// The activity-log evictor of a primary copy.
    evictor: Mutex<Option<evict::Evictor>>,
    /// The last online verify (`verify`).
    verify: Mutex<Option<verify::VerifyRun>>,
}

impl VolumeEntry {
    fn replication(&self) -> Arc<VolumeReplication> {
        lock(&self.replication).clone()
    }

    fn peers(&self) -> Vec<Arc<PeerEntry>> {
        lock(&self.peers).clone()
    }

    fn peer(&self, node: NodeId) -> Option<Arc<PeerEntry>> {
        lock(&self.peers)
            .iter()
            .find(|p| p.spec.node == node)
            .cloned()
    }

    /// The node of the primary connected to this replica copy now, if any.
    fn serving_node(&self) -> Option<NodeId> {
        lock(&self.serving)
            .as_ref()
            .filter(|s| !s.control.exited())
            .map(|s| s.node)
    }
}

/// What operators and tests see of one replicated volume.
#[derive(Clone, Debug)]
pub struct VolumeView {
    pub name: String,
    pub id: ReplicatedVolumeId,
    pub size_bytes: u64,
    pub replication: Arc<VolumeReplication>,
    /// The configured peers, each with its index in `replication.replicas()`.
    pub peers: Vec<(PeerSpec, usize)>,
    /// On a replica copy: the primary connected now.
    pub primary_connected: Option<NodeId>,
    /// Per peer (same order): link tasks started since the runtime started.
    pub link_starts: Vec<u64>,
    /// Per peer (same order): suspended by the operator.
    pub suspended: Vec<bool>,
}

/// The running peer runtime (see the module).
pub struct PeerRuntime {
    shared: Arc<Shared>,
    listener: Mutex<Option<PeerListener>>,
    listening: ListenAddress,
    stopped: AtomicBool,
}

impl std::fmt::Debug for PeerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerRuntime")
            .field("node", &self.shared.node)
            .field("listening", &self.listening)
            .finish_non_exhaustive()
    }
}

impl PeerRuntime {
    /// Give every replicated volume its state (durable), listen, and start the primaries'
    /// connectors.
    pub fn start(engine: Arc<Engine>, config: RuntimeConfig) -> Result<PeerRuntime, RuntimeError> {
        let secret = ClusterSecret::new(config.secret.clone())
            .map_err(|e| RuntimeError::Invalid(format!("[peer] secret_file: {e}")))?;
        let membership = match &config.membership_file {
            Some(path) => membership::Membership::load(path)?,
            None => membership::Membership::default(),
        };
        let volumes_cfg = prepare::merge_membership(&config.volumes, &membership)?;
        let found = prepare::check_capacity(&engine, &volumes_cfg)?;
        let mut volumes = Vec::with_capacity(found.len());
        for (cfg, volume) in volumes_cfg.iter().zip(found) {
            let removed = membership.removed_of(&cfg.name);
            let replication = prepare::replication_for(&volume, cfg, &removed)?;
            prepare::restart_generation(&cfg.name, &replication);
            let suspended = membership.suspended_of(&cfg.name);
            let peers = cfg
                .peers
                .iter()
                .map(|p| new_peer(&cfg.name, &replication, p, suspended.contains(&p.node)))
                .collect::<Result<Vec<_>, RuntimeError>>()?;
            volumes.push(Arc::new(VolumeEntry {
                name: cfg.name.clone(),
                id: volume_id(&config.cluster, &cfg.name),
                volume,
                replication: Mutex::new(replication),
                peers: Mutex::new(peers),
                ops: Mutex::new(()),
                primary: Mutex::new(None),
                serving: Mutex::new(None),
                evictor: Mutex::new(None),
                verify: Mutex::new(None),
            }));
        }
        prepare::persist(&engine, "the volumes' replication records")?;
        let shared = Arc::new(Shared {
            engine,
            node: config.node,
            cluster: cluster_id(&config.cluster),
            secret,
            timing: config.timing.clone(),
            exports: config.exports.clone(),
            volumes,
            stopping: AtomicBool::new(false),
            next_reactor: AtomicU32::new(0),
            membership_file: config.membership_file.clone(),
            membership: Mutex::new(membership),
        });
        let listener = start_listener(&shared, &config.listen)?;
        let listening = match (&config.listen, listener.tcp_addrs().first()) {
            (ListenAddress::Tcp(_), Some(bound)) => ListenAddress::Tcp(*bound),
            (other, _) => other.clone(),
        };
        let runtime = PeerRuntime {
            shared,
            listener: Mutex::new(Some(listener)),
            listening,
            stopped: AtomicBool::new(false),
        };
        for entry in &runtime.shared.volumes {
            if entry.replication().role() == Role::Primary {
                if let Err(e) = connector::start_primary(&runtime.shared, entry) {
                    runtime.stop();
                    return Err(e);
                }
            }
        }
        Ok(runtime)
    }

    /// Where peers connect (with the real port when port 0 was asked for).
    pub fn listening(&self) -> &ListenAddress {
        &self.listening
    }

    pub fn node(&self) -> NodeId {
        self.shared.node
    }

    /// Every replicated volume, as operators see it.
    pub fn volumes(&self) -> Vec<VolumeView> {
        self.shared.volumes.iter().map(|e| view(e)).collect()
    }

    /// One replicated volume.
    pub fn volume(&self, name: &str) -> Option<VolumeView> {
        self.shared.volume(name).ok().map(|e| view(e))
    }

    /// Stop: the listener, then every connector and task (bounded waits). Idempotent.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(l) = lock(&self.listener).take() {
            l.stop();
        }
        for entry in &self.shared.volumes {
            connector::stop_primary(&self.shared, entry, false);
            accept::end_serving(&self.shared, entry);
        }
        tracing::info!("peer: runtime stopped");
    }
}

impl Drop for PeerRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

fn view(e: &VolumeEntry) -> VolumeView {
    // Under the peers' lock: the replication and the peers agree (both change under it).
    let peers = lock(&e.peers);
    let replication = e.replication();
    let index = |p: &PeerEntry| {
        let at = replication
            .replicas()
            .iter()
            .position(|r| r.node == p.spec.node);
        debug_assert!(at.is_some(), "every peer has a state in the replication");
        at.unwrap_or_default()
    };
    VolumeView {
        name: e.name.clone(),
        id: e.id,
        size_bytes: e.volume.size_bytes(),
        peers: peers.iter().map(|p| (p.spec.clone(), index(p))).collect(),
        replication,
        primary_connected: e.serving_node(),
        link_starts: peers
            .iter()
            .map(|p| p.link_starts.load(Ordering::Relaxed))
            .collect(),
        suspended: peers
            .iter()
            .map(|p| p.suspended.load(Ordering::Relaxed))
            .collect(),
    }
}

/// The runtime's entry for peer `spec` of `volume`, whose state `replication` holds.
fn new_peer(
    volume: &str,
    replication: &VolumeReplication,
    spec: &PeerSpec,
    suspended: bool,
) -> Result<Arc<PeerEntry>, RuntimeError> {
    let replica = replication
        .replica(spec.node)
        .cloned()
        .ok_or_else(|| RuntimeError::Failed(format!("volume {volume}: peer {} lost", spec.node)))?;
    Ok(Arc::new(PeerEntry {
        spec: spec.clone(),
        replica,
        suspended: AtomicBool::new(suspended),
        link_starts: AtomicU64::new(0),
    }))
}

/// The status reason of a suspended peer.
pub(super) const SUSPENDED: &str = "suspended by the operator";

fn start_listener(shared: &Arc<Shared>, at: &ListenAddress) -> Result<PeerListener, RuntimeError> {
    let mut cfg = ListenerConfig::new(AcceptorConfig {
        cluster: shared.cluster,
        node: super::convert::wire_node_id(shared.node),
        secret: shared.secret.clone(),
    });
    match at {
        ListenAddress::Tcp(a) => cfg.tcp = vec![*a],
        ListenAddress::Unix(p) => {
            cfg.tcp = Vec::new();
            cfg.unix = Some(p.clone());
        }
    }
    let lookup = accept::lookup(shared);
    let on_established = accept::on_established(shared);
    PeerListener::start(cfg, lookup, on_established)
        .map_err(|e| RuntimeError::Failed(format!("peer listener: {e}")))
}

/// What a split brain of `volume` with `node` says to the operator (log and status).
pub(super) fn split_brain(
    node: &str,
    volume: &str,
    common: ringblock_engine::replication::GenerationId,
) -> String {
    format!(
        "split brain: this copy and node {node}'s both went on after generation {common}; \
         nothing moves until `ringblock replica resolve {volume} --discard NODE` runs on the \
         node whose changes are dropped (demoted first if it is a primary)"
    )
}
