//! The operator's online verify of a primary copy's replicas: `start_verify` hands one
//! [`VerifyJob`] to each up-to-date link (the link task runs it, see `link/verify.rs`) and
//! returns at once; `verify_status` reports the last run's progress and result. A replica
//! copy refuses (the primary's link does the work, and nothing on a replica copy is ever
//! overwritten from here); a replica that is not up to date is reported as skipped with its
//! state.

use std::sync::Arc;

use ringblock_engine::replication::status::unix_ms;
use ringblock_engine::replication::{
    LinkState, NodeId, PeerState, Role, VerifyJob, VerifyPhase, VerifySnapshot,
};

use super::config::RuntimeError;
use super::{connector, lock, PeerRuntime, VolumeEntry};

/// A run: when it started and, per peer, its job or why it was skipped.
pub(super) struct VerifyRun {
    started_unix_ms: u64,
    repair: bool,
    peers: Vec<(NodeId, Result<Arc<VerifyJob>, String>)>,
}

impl VerifyRun {
    fn running(&self) -> bool {
        self.peers.iter().any(|(_, j)| {
            j.as_ref()
                .is_ok_and(|j| matches!(j.phase(), VerifyPhase::Queued | VerifyPhase::Running))
        })
    }
}

/// The last verify of a volume, as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub volume: String,
    pub running: bool,
    pub repair: bool,
    /// None: no verify ran since the daemon started.
    pub started_unix_ms: Option<u64>,
    /// When the last replica's job ended (None while one runs).
    pub finished_unix_ms: Option<u64>,
    pub peers: Vec<VerifyPeerReport>,
}

/// One replica in a [`VerifyReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyPeerReport {
    pub node: NodeId,
    /// The peer's state now.
    pub peer_state: PeerState,
    /// Why it was not verified.
    pub skipped: Option<String>,
    pub job: Option<VerifySnapshot>,
}

impl PeerRuntime {
    /// Start verifying `volume`'s up-to-date replicas (see the module); with `repair`, the
    /// regions found different are resynced.
    pub fn start_verify(&self, volume: &str, repair: bool) -> Result<String, RuntimeError> {
        let entry = self.shared.volume(volume)?.clone();
        let _ops = lock(&entry.ops);
        if entry.replication().role() != Role::Primary {
            let primary = entry
                .serving_node()
                .map_or_else(|| "its primary".to_string(), |n| format!("node {n}"));
            return Err(RuntimeError::Conflict(format!(
                "volume {volume} is a replica copy here; run the verify on the primary, {primary}"
            )));
        }
        let mut last = lock(&entry.verify);
        if last.as_ref().is_some_and(VerifyRun::running) {
            return Err(RuntimeError::Conflict(format!(
                "a verify of volume {volume} is running; `ringblock replica verify` shows it"
            )));
        }
        let peers_now = entry.peers();
        let mut peers = Vec::with_capacity(peers_now.len());
        for peer in &peers_now {
            let status = &peer.replica.status;
            let job = match connector::link_of(&entry, peer.spec.node) {
                Some(link) if link.state() == LinkState::UpToDate => {
                    let job = VerifyJob::new(repair);
                    link.offer_verify(job.clone())
                        .map(|()| job)
                        .map_err(|_| "a verify is already handed to its link".to_string())
                }
                _ => Err(format!(
                    "not verified: the replica is {} (only an up-to-date replica is verified)",
                    status.state()
                )),
            };
            peers.push((peer.spec.node, job));
        }
        let started = peers.iter().filter(|(_, j)| j.is_ok()).count();
        let skipped = peers.len() - started;
        *last = Some(VerifyRun {
            started_unix_ms: unix_ms(),
            repair,
            peers,
        });
        tracing::info!(volume, repair, started, skipped, "peer: verify started");
        if started == 0 {
            return Err(RuntimeError::Conflict(format!(
                "volume {volume}: no replica is up to date; nothing to verify"
            )));
        }
        Ok(format!(
            "volume {volume}: verifying {started} replica(s){}{}",
            if skipped > 0 {
                format!(", {skipped} skipped")
            } else {
                String::new()
            },
            if repair {
                "; regions that differ are resynced"
            } else {
                ""
            }
        ))
    }

    /// The last verify of `volume` (running or ended).
    pub fn verify_status(&self, volume: &str) -> Result<VerifyReport, RuntimeError> {
        let entry = self.shared.volume(volume)?.clone();
        let last = lock(&entry.verify);
        let Some(run) = last.as_ref() else {
            return Ok(VerifyReport {
                volume: volume.to_string(),
                running: false,
                repair: false,
                started_unix_ms: None,
                finished_unix_ms: None,
                peers: Vec::new(),
            });
        };
        let now = unix_ms();
        let peers: Vec<VerifyPeerReport> = run
            .peers
            .iter()
            .map(|(node, job)| {
                let (peer_state, link_behind) = peer_now(&entry, *node);
                match job {
                    Ok(job) => {
                        if job.phase() == VerifyPhase::Queued && link_behind {
                            // Its link went down before taking it.
                            job.fail("the link went down before the verify started", now);
                        }
                        VerifyPeerReport {
                            node: *node,
                            peer_state,
                            skipped: None,
                            job: Some(job.snapshot()),
                        }
                    }
                    Err(reason) => VerifyPeerReport {
                        node: *node,
                        peer_state,
                        skipped: Some(reason.clone()),
                        job: None,
                    },
                }
            })
            .collect();
        let running = run.running();
        let finished_unix_ms = (!running)
            .then(|| {
                peers
                    .iter()
                    .filter_map(|p| p.job.as_ref()?.finished_unix_ms)
                    .max()
            })
            .flatten();
        Ok(VerifyReport {
            volume: volume.to_string(),
            running,
            repair: run.repair,
            started_unix_ms: Some(run.started_unix_ms),
            finished_unix_ms,
            peers,
        })
    }
}

/// Peer `node`'s state now, and whether its link is out of the fan-out (or gone: the peer
/// was removed).
fn peer_now(entry: &VolumeEntry, node: NodeId) -> (PeerState, bool) {
    let state = entry
        .peer(node)
        .map_or(PeerState::Connecting, |p| p.replica.status.state());
    let behind = connector::link_of(entry, node).is_none_or(|l| l.state() == LinkState::Behind);
    (state, behind)
}
