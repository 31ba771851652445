//! The daemon's replication: the peer runtime started from the checked configuration, and
//! the [`ReplicationControl`] the web layer uses over it (status built from the engine's
//! replication state and the configuration; the operator's commands).

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use ringblock_engine::replication::status::unix_ms;
use ringblock_engine::replication::{NodeId, PeerState, Role};
use ringblock_engine::Engine;
use ringblock_transports::nbd::server::ClientRegistry;
use ringblock_transports::peer::runtime::{
    parse_mode, ExportProbe, ListenAddress, PeerMode, PeerSpec, ReplicatedVolume, RuntimeConfig,
    RuntimeTiming, VerifyReport,
};
use ringblock_transports::peer::{PeerAddress, PeerRuntime, RuntimeError};
use ringblock_web::replication::{
    ByteRange, PeerReplicationStatus, ReplicationControl, ReplicationControlError,
    ReplicationStatus, ResyncStatus, VerifyReplicaStatus, VerifyStatus, VolumeReplicationStatus,
};

use crate::replication::{ReplicaMode, ReplicationConfig, VolumeRole};

/// The NBD server's clients, known once it is up (the runtime starts before it, so that a
/// replica copy has its role before anything could export it).
pub type NbdClients = Arc<OnceLock<Arc<ClientRegistry>>>;

/// The file in the state directory that keeps the replicas added, removed and suspended at
/// runtime (see `ringblock_transports::peer::runtime::membership`).
pub const MEMBERSHIP_FILE: &str = "replication-membership";

/// Start the peer runtime for `cfg`'s replicated volumes.
pub fn start(
    engine: &Arc<Engine>,
    cfg: &ReplicationConfig,
    nbd: NbdClients,
) -> anyhow::Result<Arc<PeerRuntime>> {
    let secret = std::fs::read(&cfg.secret_file)
        .with_context(|| format!("[peer] secret_file {}", cfg.secret_file.display()))?;
    let exports: ExportProbe = Arc::new(move |volume: &str| exported(&nbd, volume));
    let config = RuntimeConfig {
        node: cfg.node_id,
        cluster: cfg.cluster_id.clone(),
        secret,
        listen: ListenAddress::Tcp(cfg.listen),
        volumes: cfg
            .volumes
            .iter()
            .map(|v| ReplicatedVolume {
                name: v.volume.clone(),
                role: match v.role {
                    VolumeRole::Primary => Role::Primary,
                    VolumeRole::Replica => Role::Replica,
                },
                peers: v
                    .replicas
                    .iter()
                    .map(|r| PeerSpec {
                        node: r.node,
                        address: PeerAddress::Tcp(r.address.clone()),
                        mode: match r.mode {
                            ReplicaMode::Sync => PeerMode::Sync,
                            ReplicaMode::Async => PeerMode::Async,
                        },
                        queue_limit_bytes: r.queue_limit_bytes,
                    })
                    .collect(),
            })
            .collect(),
        timing: RuntimeTiming::default(),
        exports: Some(exports),
        membership_file: cfg.state_dir.as_ref().map(|d| d.join(MEMBERSHIP_FILE)),
    };
    let runtime = PeerRuntime::start(engine.clone(), config).map_err(anyhow::Error::msg)?;
    Ok(Arc::new(runtime))
}

/// How `volume` is exported here, if it is (demote is refused then).
fn exported(nbd: &NbdClients, volume: &str) -> Option<String> {
    let clients = nbd.get().map_or(0, |r| {
        r.clients().iter().filter(|c| c.export == volume).count()
    });
    let ublk = ringblock_transports::ublk::find(volume).map(|d| d.path().display().to_string());
    match (clients, ublk) {
        (0, None) => None,
        (0, Some(dev)) => Some(format!("as {dev}")),
        (n, None) => Some(format!("{n} NBD client(s) connected")),
        (n, Some(dev)) => Some(format!("{n} NBD client(s) connected and as {dev}")),
    }
}

/// [`ReplicationControl`] over the running peer runtime.
pub struct RuntimeControl {
    pub runtime: Arc<PeerRuntime>,
    pub config: ReplicationConfig,
}

fn control_error(e: RuntimeError) -> ReplicationControlError {
    match e {
        RuntimeError::NotFound(m) => ReplicationControlError::NotFound(m),
        RuntimeError::Conflict(m) => ReplicationControlError::Conflict(m),
        RuntimeError::Invalid(m) => ReplicationControlError::Invalid(m),
        RuntimeError::Failed(m) => ReplicationControlError::Failed(m),
    }
}

fn node(text: &str) -> Result<NodeId, ReplicationControlError> {
    text.trim().parse::<NodeId>().map_err(|e| {
        ReplicationControlError::Invalid(format!("{text:?} is not a node id (32 hex digits): {e}"))
    })
}

impl ReplicationControl for RuntimeControl {
    fn status(&self) -> ReplicationStatus {
        let now = unix_ms();
        let volumes = self
            .runtime
            .volumes()
            .into_iter()
            .map(|v| {
                let r = &v.replication;
                let role = r.role();
                let history = r.history();
                let peers = v
                    .peers
                    .iter()
                    .map(|(spec, index)| {
                        let replica = &r.replicas()[*index];
                        let state = replica.status.state();
                        let (lag_bytes, lag_ms) = lag(role, state, replica, v.size_bytes);
                        PeerReplicationStatus {
                            node: spec.node.to_string(),
                            address: spec.address.to_string(),
                            mode: spec.mode.name().into(),
                            state: state.name().into(),
                            reason: replica.status.reason(),
                            connected_since_unix_ms: replica.status.connected_unix_ms(),
                            // A replica copy does not track what its primary lacks.
                            dirty_bytes: if role == Role::Primary {
                                replica.dirty.dirty_bytes(v.size_bytes)
                            } else {
                                0
                            },
                            lag_bytes,
                            lag_ms,
                            resync: (state == PeerState::Resyncing)
                                .then(|| resync_status(&replica.status.resync, now)),
                            last_resync: replica
                                .status
                                .resync
                                .ever_started()
                                .then(|| resync_status(&replica.status.resync, now)),
                        }
                    })
                    .collect();
                let replica_reason = (role == Role::Replica).then(|| {
                    "a replica copy: its primary serves it (promote it here to export it)"
                        .to_string()
                });
                VolumeReplicationStatus {
                    volume: v.name.clone(),
                    role: match role {
                        Role::Primary => "primary".into(),
                        Role::Replica => "replica".into(),
                    },
                    generation: history.current().map(|g| format!("{:016x}", g.get())),
                    history_len: history.ids().len(),
                    region_size_bytes: 1u64 << r.activity.region_shift(),
                    exportable: replica_reason.is_none(),
                    not_exportable_reason: replica_reason,
                    peers,
                }
            })
            .collect();
        ReplicationStatus {
            node_id: self.config.node_id.to_string(),
            node_name: self.config.node_name.clone(),
            cluster: self.config.cluster_id.clone(),
            listen: self.runtime.listening().to_string(),
            volumes,
        }
    }

    fn promote(&self, volume: &str, force: bool) -> Result<String, ReplicationControlError> {
        self.runtime.promote(volume, force).map_err(control_error)
    }

    fn demote(&self, volume: &str) -> Result<String, ReplicationControlError> {
        self.runtime.demote(volume).map_err(control_error)
    }

    fn suspend(&self, volume: &str, node_id: &str) -> Result<String, ReplicationControlError> {
        self.runtime
            .suspend(volume, node(node_id)?)
            .map_err(control_error)
    }

    fn resume(&self, volume: &str, node_id: &str) -> Result<String, ReplicationControlError> {
        self.runtime
            .resume(volume, node(node_id)?)
            .map_err(control_error)
    }

    fn resolve(&self, volume: &str, discard: &str) -> Result<String, ReplicationControlError> {
        self.runtime
            .resolve(volume, node(discard)?)
            .map_err(control_error)
    }

    fn add_replica(
        &self,
        volume: &str,
        node_id: &str,
        address: &str,
        mode: &str,
    ) -> Result<String, ReplicationControlError> {
        let node = node(node_id)?;
        crate::replication::check_address(address)
            .map_err(|e| ReplicationControlError::Invalid(format!("address {address:?} {e}")))?;
        let mode = parse_mode(mode).map_err(control_error)?;
        self.runtime
            .add_replica(volume, node, PeerAddress::Tcp(address.to_string()), mode)
            .map_err(control_error)
    }

    fn remove_replica(
        &self,
        volume: &str,
        node_id: &str,
    ) -> Result<String, ReplicationControlError> {
        self.runtime
            .remove_replica(volume, node(node_id)?)
            .map_err(control_error)
    }

    fn start_verify(&self, volume: &str, repair: bool) -> Result<String, ReplicationControlError> {
        self.runtime
            .start_verify(volume, repair)
            .map_err(control_error)
    }

    fn verify_status(&self, volume: &str) -> Result<VerifyStatus, ReplicationControlError> {
        let report = self.runtime.verify_status(volume).map_err(control_error)?;
        Ok(verify_status(&report))
    }
}

/// A verify report as the API shows it.
fn verify_status(report: &VerifyReport) -> VerifyStatus {
    let ranges = |list: &[std::ops::Range<u64>]| {
        list.iter()
            .map(|r| ByteRange {
                offset_bytes: r.start,
                len_bytes: r.end - r.start,
            })
            .collect()
    };
    VerifyStatus {
        volume: report.volume.clone(),
        running: report.running,
        repair: report.repair,
        started_unix_ms: report.started_unix_ms,
        finished_unix_ms: report.finished_unix_ms,
        replicas: report
            .peers
            .iter()
            .map(|p| {
                let mut r = VerifyReplicaStatus {
                    node: p.node.to_string(),
                    state: "skipped".into(),
                    peer_state: p.peer_state.name().into(),
                    skipped: p.skipped.clone(),
                    ..VerifyReplicaStatus::default()
                };
                if let Some(j) = &p.job {
                    r.state = j.phase.name().into();
                    r.error = j.error.clone();
                    r.regions_total = j.regions_total;
                    r.regions_checked = j.regions_checked;
                    r.bytes_checked = j.bytes_checked;
                    r.mismatched_regions = j.mismatched_regions;
                    r.mismatched = ranges(&j.mismatched);
                    r.busy_regions = j.busy_regions;
                    r.busy = ranges(&j.busy);
                    r.repaired = j.repaired;
                }
                r
            })
            .collect(),
    }
}

/// A resync's progress as the API shows it.
/// What a primary's replica trails by: the bytes it lacks (its dirty regions and, for an async
/// replica, the writes queued for it) and, while it is connected, how long the oldest write
/// it has not acknowledged has waited. A replica copy tracks neither.
fn lag(
    role: Role,
    state: PeerState,
    replica: &ringblock_engine::replication::ReplicaState,
    size_bytes: u64,
) -> (u64, Option<u64>) {
    if role != Role::Primary {
        return (0, None);
    }
    let bytes = replica.dirty.dirty_bytes(size_bytes) + replica.status.lag.queued_bytes();
    let connected = matches!(state, PeerState::UpToDate | PeerState::Resyncing);
    (bytes, connected.then(|| replica.status.lag.oldest_age_ms()))
}

fn resync_status(
    progress: &ringblock_engine::replication::ResyncProgress,
    now_unix_ms: u64,
) -> ResyncStatus {
    let s = progress.snapshot(now_unix_ms);
    ResyncStatus {
        total_bytes: s.total_bytes,
        done_bytes: s.done_bytes,
        started_unix_ms: s.started_unix_ms,
        finished_unix_ms: s.finished_unix_ms,
        rate_bytes_per_s: s.rate_bytes_per_s,
        eta_s: s.eta_s,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ringblock_engine::{DeviceConfig, EngineConfig};

    use super::*;
    use crate::replication::{Replica, VolumeReplicas};

    #[test]
    fn status_and_commands_over_a_running_replica_copy() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("cluster.secret");
        std::fs::write(&secret_file, "a secret of at least sixteen bytes").unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let engine = Arc::new(
            Engine::start(&EngineConfig {
                devices: vec![DeviceConfig::ram("d", 64 << 20)],
                cores: vec![0],
                ..Default::default()
            })
            .unwrap(),
        );
        engine.create_volume("d", "v", 1 << 20).unwrap();
        let other: NodeId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let config = ReplicationConfig {
            node_id: "00000000000000000000000000000001".parse().unwrap(),
            node_name: Some("left".into()),
            cluster_id: "lab".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            secret_file,
            volumes: vec![VolumeReplicas {
                volume: "v".into(),
                role: VolumeRole::Replica,
                replicas: vec![Replica {
                    node: other,
                    address: "127.0.0.1:9".into(),
                    mode: ReplicaMode::Sync,
                    queue_limit_bytes: 0,
                }],
            }],
            state_dir: None,
        };
        let runtime = start(&engine, &config, NbdClients::default()).unwrap();
        let control = RuntimeControl {
            runtime: runtime.clone(),
            config,
        };
        let s = control.status();
        assert_eq!(s.cluster, "lab");
        assert!(
            s.listen.starts_with("127.0.0.1:") && !s.listen.ends_with(":0"),
            "{}",
            s.listen
        );
        let v = &s.volumes[0];
        assert_eq!((v.volume.as_str(), v.role.as_str()), ("v", "replica"));
        assert_eq!(
            (v.generation.as_deref(), v.history_len),
            (None, 0),
            "a new replica holds nothing"
        );
        assert!(!v.exportable && v.not_exportable_reason.is_some());
        assert_eq!(v.region_size_bytes, 1 << 20);
        assert_eq!(v.peers[0].node, other.to_string());
        assert_eq!(v.peers[0].state, "connecting");
        // Commands map the runtime's refusals to their HTTP kinds.
        assert!(matches!(
            control.promote("v", false),
            Err(ReplicationControlError::Conflict(_))
        ));
        assert!(matches!(
            control.promote("w", false),
            Err(ReplicationControlError::NotFound(_))
        ));
        assert!(matches!(
            control.suspend("v", "nope"),
            Err(ReplicationControlError::Invalid(_))
        ));
        assert!(matches!(
            control.resolve("v", &other.to_string()),
            Err(ReplicationControlError::Conflict(m)) if m.contains("run this on node")
        ));
        control.promote("v", true).unwrap();
        let v = &control.status().volumes[0];
        assert_eq!(v.role, "primary");
        assert!(v.exportable && v.generation.is_some());
        // The peer is unreachable: its bitmap is marked only when a link decides on a full
        // sync.
        assert_eq!(v.peers[0].dirty_bytes, 0);
        control.demote("v").unwrap();
        assert_eq!(control.status().volumes[0].role, "replica");
        // Adding and removing a peer: the address and mode are checked here.
        let third = "00000000000000000000000000000003";
        for (address, mode) in [("nowhere", "sync"), ("127.0.0.1:9", "fast")] {
            assert!(matches!(
                control.add_replica("v", third, address, mode),
                Err(ReplicationControlError::Invalid(_))
            ));
        }
        control
            .add_replica("v", third, "127.0.0.1:9", "async")
            .unwrap();
        assert!(matches!(
            control.add_replica("v", third, "127.0.0.1:9", "sync"),
            Err(ReplicationControlError::Conflict(_))
        ));
        let v = &control.status().volumes[0];
        assert_eq!(v.peers.len(), 2);
        assert_eq!(
            (v.peers[1].node.as_str(), v.peers[1].mode.as_str()),
            (third, "async")
        );
        control.remove_replica("v", third).unwrap();
        assert!(matches!(
            control.remove_replica("v", third),
            Err(ReplicationControlError::NotFound(_))
        ));
        assert_eq!(control.status().volumes[0].peers.len(), 1);
        runtime.stop();
        drop((control, runtime));
        Arc::try_unwrap(engine)
            .ok()
            .expect("the runtime let go of the engine")
            .shutdown()
            .unwrap();
    }
}
