//! What the daemon lets the web layer see and do with replication, without the web crate
//! depending on transports: the status of every replicated volume and its peers, and the
//! operator's commands (promote, demote, suspend, resume, resolve, add and remove a replica). The daemon's peer runtime
//! implements [`ReplicationControl`]; a daemon without replicated volumes passes `None`.
//!
//! Commands block on metadata rounds (a role or generation change is durable before it is
//! acknowledged), so the API runs them on the blocking pool.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
pub use crate::replication_verify::{ByteRange, VerifyReplicaStatus, VerifyStatus};

/// This node and every replicated volume it holds a copy of.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStatus {
    /// This node's id (32 hex digits).
    pub node_id: String,
    pub node_name: Option<String>,
    pub cluster: String,
    /// Where peers connect.
    pub listen: String,
    pub volumes: Vec<VolumeReplicationStatus>,
}

/// One replicated volume on this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeReplicationStatus {
    pub volume: String,
    /// "primary" (serves clients) or "replica" (follows a primary; not exportable).
    pub role: String,
    /// Current generation (16 hex digits), if the copy has one.
    pub generation: Option<String>,
    /// Generations in the history.
    pub history_len: usize,
    pub region_size_bytes: u64,
    /// Whether the volume may be exported (NBD, ublk) here, and if not why.
    pub exportable: bool,
    pub not_exportable_reason: Option<String>,
    pub peers: Vec<PeerReplicationStatus>,
}

/// One peer of a replicated volume, as this node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerReplicationStatus {
    /// The peer's node id (32 hex digits).
    pub node: String,
    pub address: String,
    /// "sync" or "async".
    pub mode: String,
    /// connecting, up-to-date, behind, resyncing, diverged or suspended.
    pub state: String,
    /// Why it is not up to date (a refusal, a timeout, the operator).
    pub reason: Option<String>,
    pub connected_since_unix_ms: Option<u64>,
    /// Bytes of regions the peer lacks (its dirty bitmap).
    pub dirty_bytes: u64,
    /// Bytes the peer lacks: its dirty regions, and the writes queued for an async peer and
    /// not yet acknowledged (0 on a replica copy).
    pub lag_bytes: u64,
    /// While the peer is connected: how long the oldest write it has not acknowledged has
    /// waited (0 when none waits; a sync peer's writes wait for it, so it does not trail).
    pub lag_ms: Option<u64>,
    /// The resync in progress.
    pub resync: Option<ResyncStatus>,
    /// The most recent resync since the daemon started, running or ended.
    pub last_resync: Option<ResyncStatus>,
}

/// A resync: what it set out to copy, what it copied, and how fast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResyncStatus {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub started_unix_ms: u64,
    /// None while it runs.
    pub finished_unix_ms: Option<u64>,
    pub rate_bytes_per_s: f64,
    pub eta_s: Option<f64>,
}

/// The daemon's replication: status and commands. Each command returns a line for the
/// operator on success (what changed), or why it was refused.
pub trait ReplicationControl: Send + Sync + 'static {
    fn status(&self) -> ReplicationStatus;
    /// Make this node's copy of `volume` the primary. Refused while a reachable peer is
    /// primary for it, unless `force` (disaster recovery: the other side may diverge).
    fn promote(&self, volume: &str, force: bool) -> Result<String, ReplicationControlError>;
    /// Make this node's copy a replica (refused while it is exported).
    fn demote(&self, volume: &str) -> Result<String, ReplicationControlError>;
    /// Stop sending to `node` (writes mark its bitmap) until [`Self::resume`].
    fn suspend(&self, volume: &str, node: &str) -> Result<String, ReplicationControlError>;
    fn resume(&self, volume: &str, node: &str) -> Result<String, ReplicationControlError>;
    /// End a split brain by discarding `discard_node`'s changes since the common generation.
    fn resolve(&self, volume: &str, discard_node: &str) -> Result<String, ReplicationControlError>;
    /// Add `node` at `address` ("host:port") as a peer of `volume`, with `mode` ("sync" or
    /// "async"). On the primary it gets a full sync; on a replica copy it may then connect
    /// as this copy's primary. Kept across restarts in the daemon's state directory.
    fn add_replica(
        &self,
        volume: &str,
        node: &str,
        address: &str,
        mode: &str,
    ) -> Result<String, ReplicationControlError>;
    /// Remove `node` from `volume`'s peers: its link ends (its waiting writes complete) and
    /// writes no longer go to it. Kept across restarts in the daemon's state directory.
    fn remove_replica(&self, volume: &str, node: &str) -> Result<String, ReplicationControlError>;
    /// Start an online verify of `volume`'s up-to-date replicas against this primary copy
    /// (per-region checksums); with `repair`, regions that differ are resynced. Returns at
    /// once; refused on a replica copy (naming the primary) and while one runs.
    fn start_verify(&self, volume: &str, repair: bool) -> Result<String, ReplicationControlError>;
    /// The last verify of `volume`: progress while it runs, then its result.
    fn verify_status(&self, volume: &str) -> Result<VerifyStatus, ReplicationControlError>;
}

/// Why a replication command failed; each kind has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationControlError {
    /// No such replicated volume or peer (404).
    #[error("{0}")]
    NotFound(String),
    /// Refused in the current state, e.g. promote while a peer is primary (409).
    #[error("{0}")]
    Conflict(String),
    /// A request that cannot be right, e.g. an invalid node id (400).
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made durable (500).
    #[error("{0}")]
    Failed(String),
}

impl From<ReplicationControlError> for ApiError {
    fn from(e: ReplicationControlError) -> Self {
        use axum::http::StatusCode;
        let status = match e {
            ReplicationControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ReplicationControlError::Conflict(_) => StatusCode::CONFLICT,
            ReplicationControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ReplicationControlError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}
