//! Replication routes: the status of every replicated volume, and the operator's commands
//! (promote, demote, suspend, resume, resolve, add and remove a replica), all through the daemon's
//! [`ReplicationControl`]. Commands wait for metadata rounds, so they run on the blocking pool;
//! so does the status (the runtime may take a lock a command holds).
//!
//! A volume's role and its peers' states also appear in [`crate::api::VolumeInfo`], read
//! straight from the engine's volume (atomics and one small mutex, no call into the runtime).

use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use ringblock_engine::replication::{
    DirtyBitmap, NodeId, RegionIndex, ReplicaState, Role, VolumeReplication,
};
use ringblock_engine::Volume;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::ApiJson;
use crate::error::{ApiError, ErrorBody};
use crate::replication::{ReplicationControl, ReplicationControlError, ReplicationStatus};
use crate::AppState;

/// Make this node's copy the primary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Promote even while a primary is connected for the volume (disaster recovery: both
    /// copies may then take writes, a split brain that `resolve` must end).
    #[serde(default)]
    pub force: bool,
}

/// End a split brain.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// Node id (32 hex digits) whose changes since the common generation are discarded: this
    /// node (its copy is then fully synced from the other side).
    pub discard: String,
}

/// Add a peer (another node's copy) to a replicated volume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddReplicaRequest {
    /// The node's id (32 hex digits; `ringblock check-config` on that node prints it).
    pub node: String,
    /// Where its peer listener is: `host:port` (an IP address or a DNS name).
    pub address: String,
    /// "sync" (default) or "async".
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "sync".into()
}

/// What a command changed, for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandResult {
    pub message: String,
}

/// A volume's replication as its volume listing shows it (from the engine's state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeReplicationBrief {
    /// "primary" or "replica".
    pub role: String,
    pub peers: Vec<PeerBrief>,
}

/// One peer in [`VolumeReplicationBrief`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerBrief {
    /// Node id (32 hex digits).
    pub node: String,
    /// connecting, up-to-date, behind, resyncing, diverged or suspended.
    pub state: String,
    /// Bytes of regions the peer lacks.
    pub dirty_bytes: u64,
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Replica => "replica",
    }
}

/// Dirty regions in `from..to`.
fn count_dirty(bitmap: &DirtyBitmap, from: u64, to: u64) -> u64 {
    let mut n = 0;
    let mut at = from;
    while let Some(r) = bitmap.next_dirty(RegionIndex(at)).filter(|r| r.0 < to) {
        n += 1;
        at = r.0 + 1;
    }
    n
}

/// Bytes of a volume of `size_bytes` in `bitmap`'s dirty regions: like
/// `DirtyBitmap::dirty_bytes`, without walking every dirty region. The bitmap covers the
/// volume's largest size, and a full sync marks all of it, so regions past the volume's end
/// may be dirty and must not count. Whichever side of the end is smaller is walked (word by
/// word, then one step per dirty region); the other side comes from the popcount.
pub fn dirty_bytes(bitmap: &DirtyBitmap, size_bytes: u64) -> u64 {
    let region_bytes = bitmap.region_bytes();
    let regions = bitmap.regions();
    let end = size_bytes.div_ceil(region_bytes).min(regions);
    let within = if end <= regions - end {
        count_dirty(bitmap, 0, end)
    } else {
        bitmap
            .dirty_regions()
            .saturating_sub(count_dirty(bitmap, end, regions))
    };
    let mut bytes = within.saturating_mul(region_bytes);
    // The volume's last region may be partial.
    if end > 0 && bitmap.is_dirty(RegionIndex(end - 1)) {
        let last_len = size_bytes - ((end - 1) << bitmap.region_shift());
        bytes = bytes.saturating_sub(region_bytes.saturating_sub(last_len));
    }
    bytes
}

/// What `peer` lacks, as the API and `/metrics` report it: its dirty bitmap on a primary; 0
/// on a replica copy, which does not track what its primary lacks (the runtime's status says
/// the same).
pub fn peer_dirty_bytes(r: &VolumeReplication, peer: &ReplicaState, size_bytes: u64) -> u64 {
    match r.role() {
        Role::Primary => dirty_bytes(&peer.dirty, size_bytes),
        Role::Replica => 0,
    }
}

/// The brief of a volume's replication state.
pub fn brief(v: &Volume, r: &VolumeReplication) -> VolumeReplicationBrief {
    VolumeReplicationBrief {
        role: role_name(r.role()).into(),
        peers: r
            .replicas()
            .iter()
            .map(|p| PeerBrief {
                node: p.node.to_string(),
                state: p.status.state().name().into(),
                dirty_bytes: peer_dirty_bytes(r, p, v.size_bytes()),
            })
            .collect(),
    }
}

pub(crate) fn control(
    st: &AppState,
    volume: &str,
) -> Result<Arc<dyn ReplicationControl>, ApiError> {
    if st.0.engine.volume(volume).is_none() {
        return Err(ApiError::not_found(format!(
            "volume {volume}: no such volume"
        )));
    }
    st.0.replication.clone().ok_or_else(|| {
        ApiError::not_found(format!(
            "volume {volume}: not replicated (this daemon has no replicated volume)"
        ))
    })
}

fn node_id(text: &str) -> Result<NodeId, ApiError> {
    NodeId::from_str(text).map_err(|e| {
        ApiError::bad_request(format!(
            "{e}; peers are named by node id (`ringblock check-config` on that node prints it)"
        ))
    })
}

/// Run a command of the control on the blocking pool.
async fn run(
    c: Arc<dyn ReplicationControl>,
    f: impl FnOnce(&dyn ReplicationControl) -> Result<String, ReplicationControlError> + Send + 'static,
) -> Result<Json<CommandResult>, ApiError> {
    let message = tokio::task::spawn_blocking(move || f(c.as_ref()))
        .await
        .map_err(|e| ApiError::internal(format!("replication command failed: {e}")))??;
    Ok(Json(CommandResult { message }))
}

/// The control's status (on the blocking pool), or an empty one without a control.
pub(crate) async fn current_status(st: &AppState) -> Result<ReplicationStatus, ApiError> {
    match st.0.replication.clone() {
        None => Ok(ReplicationStatus::default()),
        Some(c) => tokio::task::spawn_blocking(move || c.status())
            .await
            .map_err(|e| ApiError::internal(format!("replication status failed: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers. Paths and methods here must match `routes.rs` (a test checks).

/// This node, and every replicated volume with its peers: state, dirty and unacknowledged
/// bytes, resync progress. `volumes` is empty on a daemon without replicated volumes.
#[utoipa::path(get, path = "/api/replication", tag = "replication",
    responses((status = 200, body = ReplicationStatus), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn status(State(st): State<AppState>) -> Result<Json<ReplicationStatus>, ApiError> {
    current_status(&st).await.map(Json)
}

/// Make this node's copy of the volume the primary; returns once the new role and generation
/// are durable. Refused while a primary is connected for the volume, unless `force`.
#[utoipa::path(post, path = "/api/volumes/{name}/promote", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    request_body = PromoteRequest,
    responses(
        (status = 200, body = CommandResult),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume, or it is not replicated", body = ErrorBody),
        (status = 409, description = "a primary is connected for the volume (use force), or it is primary already", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn promote(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<PromoteRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = control(&st, &name)?;
    run(c, move |c| c.promote(&name, req.force)).await
}

/// Make this node's copy of the volume a replica; refused while it is exported.
#[utoipa::path(post, path = "/api/volumes/{name}/demote", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    responses(
        (status = 200, body = CommandResult),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume, or it is not replicated", body = ErrorBody),
        (status = 409, description = "exported (NBD clients connected or a ublk export): disconnect the clients first", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn demote(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = control(&st, &name)?;
    run(c, move |c| c.demote(&name)).await
}

/// Stop sending writes to a peer: they only mark its dirty bitmap until `resume`.
#[utoipa::path(post, path = "/api/volumes/{name}/replicas/{node}/suspend", tag = "replication",
    params(("name" = String, Path, description = "volume name"),
        ("node" = String, Path, description = "the peer's node id (32 hex digits)")),
    responses(
        (status = 200, body = CommandResult),
        (status = 400, description = "not a node id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume or peer", body = ErrorBody),
        (status = 409, description = "refused in the peer's state", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn suspend(
    State(st): State<AppState>,
    Path((name, node)): Path<(String, String)>,
) -> Result<Json<CommandResult>, ApiError> {
    let node = node_id(&node)?.to_string();
    let c = control(&st, &name)?;
    run(c, move |c| c.suspend(&name, &node)).await
}

/// Send to a suspended peer again: it resyncs what it missed, then follows every write.
#[utoipa::path(post, path = "/api/volumes/{name}/replicas/{node}/resume", tag = "replication",
    params(("name" = String, Path, description = "volume name"),
        ("node" = String, Path, description = "the peer's node id (32 hex digits)")),
    responses(
        (status = 200, body = CommandResult),
        (status = 400, description = "not a node id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume or peer", body = ErrorBody),
        (status = 409, description = "refused in the peer's state", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(
    State(st): State<AppState>,
    Path((name, node)): Path<(String, String)>,
) -> Result<Json<CommandResult>, ApiError> {
    let node = node_id(&node)?.to_string();
    let c = control(&st, &name)?;
    run(c, move |c| c.resume(&name, &node)).await
}

/// End a split brain: discard the named node's changes since the common generation. Only the
/// node whose copy is discarded does it (naming the other node is refused with where to run
/// it); its copy is then fully synced from the other side.
#[utoipa::path(post, path = "/api/volumes/{name}/resolve", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    request_body = ResolveRequest,
    responses(
        (status = 200, body = CommandResult),
        (status = 400, description = "malformed body or not a node id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume or peer", body = ErrorBody),
        (status = 409, description = "no split brain to resolve, or run it on the other node", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resolve(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ResolveRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let discard = node_id(&req.discard)?.to_string();
    let c = control(&st, &name)?;
    run(c, move |c| c.resolve(&name, &discard)).await
}

/// Add a peer to the volume. On the primary the record gains it with every region dirty
/// (durable before the answer) and its connector starts: it gets a full sync. On a replica
/// copy the node may then connect as its primary. Kept across restarts (in the daemon's state
/// directory, not the configuration file).
#[utoipa::path(post, path = "/api/volumes/{name}/replicas", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    request_body = AddReplicaRequest,
    responses(
        (status = 200, body = CommandResult),
        (status = 400, description = "malformed body, not a node id, an address that is not host:port, a mode that is not sync or async, or this node", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume, or it is not replicated", body = ErrorBody),
        (status = 409, description = "already a peer, the volume has the most replicas it may have, or its replica sets are used up", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn add_replica(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AddReplicaRequest>,
) -> Result<Json<CommandResult>, ApiError> {
    let node = node_id(&req.node)?.to_string();
    let c = control(&st, &name)?;
    run(c, move |c| {
        c.add_replica(&name, &node, &req.address, &req.mode)
    })
    .await
}

/// Remove a peer from the volume: its link ends (the writes it held complete), writes no
/// longer wait for it, and the record drops it (a new generation if it was up to date). On a
/// replica copy, refused while that node is connected as its primary. Kept across restarts.
#[utoipa::path(delete, path = "/api/volumes/{name}/replicas/{node}", tag = "replication",
    params(("name" = String, Path, description = "volume name"),
        ("node" = String, Path, description = "the peer's node id (32 hex digits)")),
    responses(
        (status = 200, body = CommandResult),
        (status = 400, description = "not a node id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume or peer", body = ErrorBody),
        (status = 409, description = "the node is connected as this copy's primary, or the volume's replica sets are used up", body = ErrorBody),
        (status = 500, description = "the change could not be made durable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_replica(
    State(st): State<AppState>,
    Path((name, node)): Path<(String, String)>,
) -> Result<Json<CommandResult>, ApiError> {
    let node = node_id(&node)?.to_string();
    let c = control(&st, &name)?;
    run(c, move |c| c.remove_replica(&name, &node)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bytes_counts_the_volume_only_and_its_last_region_partially() {
        // 10 regions of 1 MiB over a 9.5 MiB volume, then 100 regions over 9.5 MiB (most of
        // the bitmap past the end) and over 90.5 MiB (the end near the top): both walks.
        for (regions, size) in [
            (10u64, (9u64 << 20) + (512 << 10)),
            (100, (9 << 20) + (512 << 10)),
            (100, (90 << 20) + (512 << 10)),
        ] {
            let b = DirtyBitmap::new(regions << 20, 20).unwrap();
            let end = size.div_ceil(1 << 20);
            assert_eq!(dirty_bytes(&b, size), 0);
            b.mark_regions(0..2);
            assert_eq!(dirty_bytes(&b, size), 2 << 20);
            b.mark_regions(end - 1..end);
            assert_eq!(dirty_bytes(&b, size), (2 << 20) + (512 << 10));
            // A full sync marks the whole bitmap, past the volume's end too.
            b.mark_regions(0..regions);
            assert_eq!(dirty_bytes(&b, size), size, "{regions} regions");
            assert_eq!(dirty_bytes(&b, size), b.dirty_bytes(size));
            assert_eq!(dirty_bytes(&b, 0), 0);
        }
    }
}
