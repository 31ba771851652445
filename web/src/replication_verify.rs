//! The online verify of a volume's replicas: `POST /api/volumes/{name}/verify[?repair=true]`
//! starts it on the primary and answers 202 at once; `GET /api/volumes/{name}/verify` shows
//! its progress and, once it ended, its result (the last run's until the next one starts).
//! Both go through `ReplicationControl::start_verify` and `ReplicationControl::verify_status`
//! on the blocking pool.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::replication_api::{control, CommandResult};
use crate::AppState;

/// The last verify of a volume's replicas (running or ended).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyStatus {
    pub volume: String,
    /// A replica's verify is still queued or running.
    pub running: bool,
    /// Regions found different are resynced.
    pub repair: bool,
    /// None: no verify ran since the daemon started.
    pub started_unix_ms: Option<u64>,
    /// When the last replica's verify ended (None while one runs).
    pub finished_unix_ms: Option<u64>,
    pub replicas: Vec<VerifyReplicaStatus>,
}

/// One replica in a [`VerifyStatus`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReplicaStatus {
    /// The replica's node id (32 hex digits).
    pub node: String,
    /// The verify's state: queued, running, done, failed, or skipped.
    pub state: String,
    /// The replica's state now (up-to-date, resyncing, behind, …).
    pub peer_state: String,
    /// Why the replica was not verified (state "skipped").
    pub skipped: Option<String>,
    /// Why the verify ended early (state "failed").
    pub error: Option<String>,
    pub regions_total: u64,
    pub regions_checked: u64,
    pub bytes_checked: u64,
    pub mismatched_regions: u64,
    /// Byte ranges of the mismatched regions (adjacent ones merged; at most 64 listed).
    pub mismatched: Vec<ByteRange>,
    /// Regions writes changed during every attempt: not verified ("could not verify: busy").
    pub busy_regions: u64,
    pub busy: Vec<ByteRange>,
    /// The mismatched regions are marked dirty and resynced (the link reconnects for it).
    pub repaired: bool,
}

/// `len_bytes` bytes at `offset_bytes` of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ByteRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

/// `repair=true|false`, the only query the start takes.
fn repair_flag(query: Option<&str>) -> Result<bool, ApiError> {
    let mut repair = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        repair = match pair {
            "repair=true" | "repair" => true,
            "repair=false" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query {other:?}; the only one is repair=true|false"
                )))
            }
        };
    }
    Ok(repair)
}

/// Start verifying the volume's up-to-date replicas against this primary copy: per-region
/// checksums, compared online while writes go on. Answers 202 at once; `GET` the same path
/// for progress and the result. With `repair=true`, regions that differ are resynced.
#[utoipa::path(post, path = "/api/volumes/{name}/verify", tag = "replication",
    params(("name" = String, Path, description = "volume name"),
        ("repair" = Option<bool>, Query, description = "resync the regions found different")),
    responses(
        (status = 202, description = "started", body = CommandResult),
        (status = 400, description = "an unknown query", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume, or it is not replicated", body = ErrorBody),
        (status = 409, description = "a replica copy here (run it on the primary), no up-to-date replica, or a verify is running", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start_verify(
    State(st): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<(StatusCode, Json<CommandResult>), ApiError> {
    let repair = repair_flag(query.as_deref())?;
    let c = control(&st, &name)?;
    let message = tokio::task::spawn_blocking(move || c.start_verify(&name, repair))
        .await
        .map_err(|e| ApiError::internal(format!("verify failed to start: {e}")))??;
    Ok((StatusCode::ACCEPTED, Json(CommandResult { message })))
}

/// The volume's last verify: running or not, and per replica the regions and bytes checked,
/// the mismatched byte ranges, the regions writes kept busy, and whether it repaired.
#[utoipa::path(get, path = "/api/volumes/{name}/verify", tag = "replication",
    params(("name" = String, Path, description = "volume name")),
    responses(
        (status = 200, body = VerifyStatus),
        (status = 401, body = ErrorBody),
        (status = 404, description = "no such volume, or it is not replicated", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn verify_status(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VerifyStatus>, ApiError> {
    let c = control(&st, &name)?;
    let status = tokio::task::spawn_blocking(move || c.verify_status(&name))
        .await
        .map_err(|e| ApiError::internal(format!("verify status failed: {e}")))??;
    Ok(Json(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_takes_repair_and_nothing_else() {
        assert!(!repair_flag(None).unwrap());
        assert!(!repair_flag(Some("")).unwrap());
        assert!(repair_flag(Some("repair=true")).unwrap());
        assert!(repair_flag(Some("repair")).unwrap());
        assert!(!repair_flag(Some("repair=false")).unwrap());
        assert!(repair_flag(Some("repair=yes")).is_err());
        assert!(repair_flag(Some("force=true")).is_err());
    }
}
