//! The JSON API: types (serde + OpenAPI schemas) and handlers.
//!
//! Reads come from the engine's lock-free snapshots. Commands (create, delete, grow) run on
//! tokio's blocking pool: they wait for a reactor to make the metadata durable, and must not
//! hold up the web runtime while they do.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use ringblock_engine::stats::LatencySnapshot;
use ringblock_engine::{validate_volume_name, DeviceState, Engine, Volume};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::stats::{quantile_us, Sample};
use crate::AppState;

// ---------------------------------------------------------------------------------------------
// What the daemon tells the web layer about NBD (the web crate does not depend on transports).

/// NBD facts the API reports: listeners, per-export settings, connected clients.
pub trait NbdStatus: Send + Sync + 'static {
    /// Addresses the NBD server listens on, as printed at start.
    fn listeners(&self) -> Vec<String>;
    /// URIs that reach `export` (one per listener).
    fn export_uris(&self, export: &str) -> Vec<String>;
    fn read_only(&self, export: &str) -> bool;
    /// Clients in the transmission phase now.
    fn clients(&self) -> Vec<NbdClient>;
}

/// A connected NBD client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NbdClient {
    /// Connection number, unique per daemon run.
    pub id: u64,
    /// `ADDR:PORT` for TCP, `unix:pid=…,uid=…` for Unix sockets.
    pub peer: String,
    pub export: String,
    /// The listener it came through.
    pub listener: String,
    /// When it connected (seconds since the Unix epoch).
    pub connected_unix_s: u64,
    pub structured_replies: bool,
    pub extended_headers: bool,
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

// ---------------------------------------------------------------------------------------------
// What the daemon lets the web layer do with ublk (again without depending on transports).

/// The daemon's ublk exports: list, start, stop. `start` and `stop` block on kernel control
/// commands (START_DEV waits for every queue), so the API calls them on the blocking pool.
pub trait UblkControl: Send + Sync + 'static {
    fn list(&self) -> Vec<UblkExport>;
    /// Export `volume` as `/dev/ublkbN`.
    fn start(&self, engine: &Engine, volume: &str) -> Result<UblkExport, UblkControlError>;
    /// Remove the export of `volume` (its in-flight IO completes first).
    fn stop(&self, volume: &str) -> Result<(), UblkControlError>;
    /// Why exports cannot be started here (no driver, no privilege); `None` if they can.
    fn unavailable(&self) -> Option<String>;
}

/// Why a ublk command failed; each kind has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum UblkControlError {
    /// No such volume, or it has no ublk export (404).
    #[error("{0}")]
    NotFound(String),
    /// Already exported, or otherwise in use (409).
    #[error("{0}")]
    Conflict(String),
    /// The volume cannot be exported this way, e.g. its block size (400).
    #[error("{0}")]
    Invalid(String),
    /// No ublk driver, or no privilege to use it (503): the text says what to do.
    #[error("{0}")]
    Unavailable(String),
    /// The kernel or a queue failed (500).
    #[error("{0}")]
    Failed(String),
}

impl From<UblkControlError> for ApiError {
    fn from(e: UblkControlError) -> Self {
        let status = match e {
            UblkControlError::NotFound(_) => StatusCode::NOT_FOUND,
            UblkControlError::Conflict(_) => StatusCode::CONFLICT,
            UblkControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            UblkControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            UblkControlError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A volume exported as a local block device through the kernel's ublk driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UblkExport {
    /// Block device name, e.g. `ublkb0`.
    pub name: String,
    pub dev_id: u32,
    /// e.g. `/dev/ublkb0`.
    pub path: String,
    pub volume: String,
    /// Hardware queues (one per reactor).
    pub queues: u16,
    /// Tags (requests in flight) per queue.
    pub queue_depth: u16,
    pub max_io_bytes: u32,
    /// Reactor serving each queue (index = queue id).
    pub reactors: Vec<u32>,
    /// `live`, `stopping`, `stopped` or `failed: …`.
    pub state: String,
    /// Taken over from a previous daemon (USER_RECOVERY).
    pub recovered: bool,
    /// Driver features granted to the device.
    pub features: Vec<String>,
    /// How request data moves: `user_copy` (USER_COPY: the daemon copies between the request
    /// and the volume, one copy per IO) or `tag_buffer` (the driver copies through per-tag
    /// buffers, two copies per IO).
    #[serde(default)]
    pub copy_mode: String,
    pub stats: UblkExportStats,
}

/// Requests served by a ublk export since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UblkExportStats {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub errors: u64,
    pub in_flight: i64,
}

/// Export a volume as `/dev/ublkbN`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartUblkRequest {
    pub volume: String,
}

// ---------------------------------------------------------------------------------------------
// Types.

/// Daemon overview (`ringblock status`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusInfo {
    pub version: String,
    pub uptime_s: u64,
    pub reactors: Vec<crate::stats::ReactorRates>,
    pub devices: usize,
    pub devices_unhealthy: usize,
    pub volumes: usize,
    pub nbd_listeners: Vec<String>,
    pub nbd_clients: usize,
    /// ublk exports (`/dev/ublkbN`) now.
    #[serde(default)]
    pub ublk_exports: usize,
    /// Why ublk exports cannot be started on this machine (absent when they can).
    #[serde(default)]
    pub ublk_unavailable: Option<String>,
}

/// IO counters of a volume since the daemon started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct VolumeCounters {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub errors: u64,
}

/// A thin volume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u32,
    pub device: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u64,
    pub allocated_chunks: u64,
    pub allocated_bytes: u64,
    /// Largest size it can grow to on its device.
    pub max_size_bytes: u64,
    /// Exported read-only over NBD.
    pub read_only: bool,
    /// NBD clients connected to it now.
    pub nbd_clients: usize,
    pub counters: VolumeCounters,
    /// Its role and its peers' states, if it is replicated (details: `/api/replication`).
    #[serde(default)]
    pub replication: Option<crate::replication_api::VolumeReplicationBrief>,
}

/// Latency of one kind of operation since start (power-of-two buckets: quantiles are bucket
/// upper bounds).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: Option<f64>,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    /// `buckets[i]`: operations that took less than 2^i ns (and at least 2^(i-1)).
    pub buckets: Vec<u64>,
}

/// A volume's statistics: totals, latency since start, and the last second's rates.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VolumeStatsInfo {
    pub name: String,
    pub counters: VolumeCounters,
    pub read_latency: LatencySummary,
    pub write_latency: LatencySummary,
    pub flush_latency: LatencySummary,
    /// The newest one-second sample (absent until the sampler has seen the volume).
    pub last_second: Option<crate::stats::VolumeRates>,
}

/// A device's firmware profile: its class and the semantics the engine gives it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ProfileInfo {
    pub name: String,
    pub description: String,
    pub logical_block_size_bytes: u32,
    pub physical_block_size_bytes: u32,
    pub max_transfer_bytes: u32,
    pub queue_depth: u32,
    pub volatile_write_cache: bool,
    pub power_loss_protection: bool,
    pub fua: bool,
    pub discard_granularity_bytes: u32,
    pub write_zeroes: bool,
}

/// Health counters of a device.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthInfo {
    /// `ok`; `warning` (the newest metadata slot was invalid at start, see
    /// `metadata_warning`); `errors` (IO errors were seen); `failing` (metadata cannot be
    /// persisted); `error` (the backing file was deleted while in use: flushes fail, nothing
    /// written survives a restart).
    pub status: String,
    pub read_errors: u64,
    pub write_errors: u64,
    pub flush_errors: u64,
    pub metadata_failing: bool,
    /// Why the device was loaded from its older metadata slot, until a metadata write has
    /// rewritten both slots.
    #[serde(default)]
    pub metadata_warning: Option<String>,
    /// The device's backing file was deleted while in use.
    pub backing_deleted: bool,
}

/// A storage device with its geometry, profile and health.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    pub name: String,
    pub id: u32,
    /// file, blockdev, ram, bbram or null.
    pub kind: String,
    pub path: Option<String>,
    /// Data survives a restart.
    pub persistent: bool,
    pub uuid: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u64,
    pub total_chunks: u64,
    pub used_chunks: u64,
    /// Offset of the first data chunk (label and metadata slots come before).
    pub data_offset_bytes: u64,
    pub volumes: Vec<String>,
    pub profile: ProfileInfo,
    pub health: HealthInfo,
}

/// A volume as exported over NBD.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ExportInfo {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub uris: Vec<String>,
    pub clients: usize,
}

/// NBD listeners and exports.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ExportsInfo {
    pub listeners: Vec<String>,
    pub exports: Vec<ExportInfo>,
}

/// A reactor: one pinned thread with its io_uring. Counters since start, plus the last
/// second's busy share.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReactorInfo {
    pub id: u32,
    pub core: Option<usize>,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub parks: u64,
    pub messages: u64,
    pub completions: u64,
    pub ops_in_flight: u64,
    pub parked: bool,
    /// Share of the last second not parked, 0–100 (absent before the first two samples).
    pub busy_percent: Option<f64>,
}

/// Create a thin volume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// 1–128 characters of A–Z a–z 0–9 - _ . (not starting with a dot).
    pub name: String,
    /// Device to place it on.
    pub device: String,
    /// Size: a non-zero multiple of the device's logical block size.
    pub size_bytes: u64,
}

/// Grow a volume online (shrinking is refused).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrowVolumeRequest {
    pub size_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// A JSON body extractor whose rejections are `{"error": …}` with the right status.

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions.

fn counters(v: &Volume) -> VolumeCounters {
    let s = &v.stats;
    VolumeCounters {
        reads: s.reads.load(Relaxed),
        writes: s.writes.load(Relaxed),
        read_bytes: s.read_bytes.load(Relaxed),
        write_bytes: s.write_bytes.load(Relaxed),
        flushes: s.flushes.load(Relaxed),
        trims: s.trims.load(Relaxed),
        errors: s.errors.load(Relaxed),
    }
}

fn volume_info(st: &AppState, v: &Volume, clients: &[NbdClient]) -> VolumeInfo {
    let allocated_chunks = v.allocated_chunks();
    VolumeInfo {
        name: v.name.clone(),
        id: v.id.0,
        device: v.device.name.clone(),
        size_bytes: v.size_bytes(),
        chunk_size_bytes: v.chunk_size_bytes(),
        allocated_chunks,
        allocated_bytes: allocated_chunks * v.chunk_size_bytes(),
        max_size_bytes: v.max_size_bytes(),
        read_only: st.0.nbd.read_only(&v.name),
        nbd_clients: clients.iter().filter(|c| c.export == v.name).count(),
        counters: counters(v),
        replication: v
            .replication()
            .map(|r| crate::replication_api::brief(v, &r)),
    }
}

fn latency(h: &LatencySnapshot) -> LatencySummary {
    let count = h.count();
    LatencySummary {
        count,
        mean_us: (count > 0).then(|| h.sum_ns as f64 / count as f64 / 1000.0),
        p50_us: quantile_us(h, 0.5),
        p90_us: quantile_us(h, 0.9),
        p99_us: quantile_us(h, 0.99),
        p999_us: quantile_us(h, 0.999),
        buckets: h.counts.clone(),
    }
}

pub(crate) fn health(d: &DeviceState) -> HealthInfo {
    let h = &d.health;
    let read_errors = h.read_errors.load(Relaxed);
    let write_errors = h.write_errors.load(Relaxed);
    let flush_errors = h.flush_errors.load(Relaxed);
    let metadata_failing = h.metadata_failing.load(Relaxed);
    let metadata_warning = h.metadata_warning();
    let backing_deleted = h.backing_deleted.load(Relaxed);
    let status = if backing_deleted {
        "error"
    } else if metadata_failing {
        "failing"
    } else if read_errors + write_errors + flush_errors > 0 {
        "errors"
    } else if metadata_warning.is_some() {
        "warning"
    } else {
        "ok"
    };
    HealthInfo {
        status: status.into(),
        read_errors,
        write_errors,
        flush_errors,
        metadata_failing,
        metadata_warning,
        backing_deleted,
    }
}

fn device_info(engine: &Engine, d: &DeviceState, volumes: &[Arc<Volume>]) -> DeviceInfo {
    let p = &d.profile;
    DeviceInfo {
        name: d.name.clone(),
        id: d.id.0,
        kind: d.kind.clone(),
        path: engine.device_path(d.id).map(|p| p.display().to_string()),
        persistent: d.persistent,
        uuid: format!("{:032x}", d.label.device_uuid),
        size_bytes: d.size_bytes,
        chunk_size_bytes: d.chunk_size_bytes(),
        total_chunks: u64::from(d.total_chunks()),
        used_chunks: d.used_chunks(),
        data_offset_bytes: d.label.data_offset_bytes,
        volumes: volumes
            .iter()
            .filter(|v| v.device.id == d.id)
            .map(|v| v.name.clone())
            .collect(),
        profile: ProfileInfo {
            name: p.name.clone(),
            description: p.description.clone(),
            logical_block_size_bytes: p.logical_block_size_bytes,
            physical_block_size_bytes: p.physical_block_size_bytes,
            max_transfer_bytes: p.max_transfer_bytes,
            queue_depth: p.queue_depth,
            volatile_write_cache: p.volatile_write_cache,
            power_loss_protection: p.power_loss_protection,
            fua: p.fua,
            discard_granularity_bytes: p.discard_granularity_bytes,
            write_zeroes: p.write_zeroes,
        },
        health: health(d),
    }
}

fn find_volume(st: &AppState, name: &str) -> Result<Arc<Volume>, ApiError> {
    st.0.engine
        .volume(name)
        .ok_or_else(|| ApiError::not_found(format!("volume {name}: no such volume")))
}

/// Run an engine command on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ringblock_engine::EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("engine command failed: {e}")))?
        .map_err(ApiError::from)
}

// ---------------------------------------------------------------------------------------------
// Handlers. Paths and methods here must match `routes.rs` (a test checks).

/// Daemon overview.
#[utoipa::path(get, path = "/api/status", tag = "daemon",
    responses((status = 200, body = StatusInfo), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn status(State(st): State<AppState>) -> Json<StatusInfo> {
    let e = &st.0.engine;
    let sample = st.latest();
    Json(StatusInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: st.0.started.elapsed().as_secs(),
        reactors: sample.reactors.clone(),
        devices: e.devices().len(),
        devices_unhealthy: e
            .devices()
            .iter()
            .filter(|d| health(d).status != "ok")
            .count(),
        volumes: e.volumes().len(),
        nbd_listeners: st.0.nbd.listeners(),
        nbd_clients: st.0.nbd.clients().len(),
        ublk_exports: st.0.ublk.list().len(),
        ublk_unavailable: st.0.ublk.unavailable(),
    })
}

/// List volumes.
#[utoipa::path(get, path = "/api/volumes", tag = "volumes",
    responses((status = 200, body = [VolumeInfo]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_volumes(State(st): State<AppState>) -> Json<Vec<VolumeInfo>> {
    let clients = st.0.nbd.clients();
    Json(
        st.0.engine
            .volumes()
            .iter()
            .map(|v| volume_info(&st, v, &clients))
            .collect(),
    )
}

/// Create a thin volume; returns once its metadata is durable.
#[utoipa::path(post, path = "/api/volumes", tag = "volumes",
    request_body = CreateVolumeRequest,
    responses(
        (status = 201, body = VolumeInfo),
        (status = 400, description = "bad name, size or device", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 409, description = "a volume with this name exists, or the device is full of volumes", body = ErrorBody),
        (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_volume(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> Result<(StatusCode, Json<VolumeInfo>), ApiError> {
    validate_volume_name(&req.name).map_err(ApiError::bad_request)?;
    if req.size_bytes == 0 {
        return Err(ApiError::bad_request("size_bytes must be greater than 0"));
    }
    if !st.0.engine.devices().iter().any(|d| d.name == req.device) {
        let names: Vec<&str> =
            st.0.engine
                .devices()
                .iter()
                .map(|d| d.name.as_str())
                .collect();
        return Err(ApiError::bad_request(format!(
            "no device named {:?} (devices: {})",
            req.device,
            names.join(", ")
        )));
    }
    if st.0.engine.volume(&req.name).is_some() {
        return Err(ApiError::conflict(format!(
            "volume {}: a volume with this name exists",
            req.name
        )));
    }
    let engine = st.0.engine.clone();
    let v = blocking(move || engine.create_volume(&req.device, &req.name, req.size_bytes)).await?;
    Ok((StatusCode::CREATED, Json(volume_info(&st, &v, &[]))))
}

/// One volume.
#[utoipa::path(get, path = "/api/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_volume(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let v = find_volume(&st, &name)?;
    Ok(Json(volume_info(&st, &v, &st.0.nbd.clients())))
}

/// Delete a volume and give its chunks back to the device. Refused while it is open (an NBD
/// client is connected to it).
#[utoipa::path(delete, path = "/api/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "in use", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_volume(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    find_volume(&st, &name)?;
    let engine = st.0.engine.clone();
    blocking(move || engine.delete_volume(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Grow a volume online.
#[utoipa::path(post, path = "/api/volumes/{name}/grow", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = GrowVolumeRequest,
    responses(
        (status = 200, body = VolumeInfo),
        (status = 400, description = "smaller than now, misaligned, or too large", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn grow_volume(
    State(st): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<GrowVolumeRequest>,
) -> Result<Json<VolumeInfo>, ApiError> {
    find_volume(&st, &name)?;
    let engine = st.0.engine.clone();
    let n = name.clone();
    blocking(move || engine.grow_volume(&n, req.size_bytes)).await?;
    let v = find_volume(&st, &name)?;
    Ok(Json(volume_info(&st, &v, &st.0.nbd.clients())))
}

/// A volume's statistics.
#[utoipa::path(get, path = "/api/volumes/{name}/stats", tag = "stats",
    params(("name" = String, Path, description = "volume name")),
    responses((status = 200, body = VolumeStatsInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn volume_stats(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeStatsInfo>, ApiError> {
    let v = find_volume(&st, &name)?;
    let last_second = st.latest().volumes.iter().find(|r| r.name == name).cloned();
    Ok(Json(VolumeStatsInfo {
        name: v.name.clone(),
        counters: counters(&v),
        read_latency: latency(&v.stats.read_latency.snapshot()),
        write_latency: latency(&v.stats.write_latency.snapshot()),
        flush_latency: latency(&v.stats.flush_latency.snapshot()),
        last_second,
    }))
}

/// Devices with profile, geometry and health.
#[utoipa::path(get, path = "/api/devices", tag = "devices",
    responses((status = 200, body = [DeviceInfo]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_devices(State(st): State<AppState>) -> Json<Vec<DeviceInfo>> {
    let e = &st.0.engine;
    let volumes = e.volumes();
    Json(
        e.devices()
            .iter()
            .map(|d| device_info(e, d, &volumes))
            .collect(),
    )
}

/// NBD listeners and exports (every volume is exported).
#[utoipa::path(get, path = "/api/exports", tag = "nbd",
    responses((status = 200, body = ExportsInfo), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_exports(State(st): State<AppState>) -> Json<ExportsInfo> {
    let clients = st.0.nbd.clients();
    let nbd = &st.0.nbd;
    Json(ExportsInfo {
        listeners: nbd.listeners(),
        exports: st
            .0
            .engine
            .volumes()
            .iter()
            .map(|v| ExportInfo {
                name: v.name.clone(),
                size_bytes: v.size_bytes(),
                read_only: nbd.read_only(&v.name),
                uris: nbd.export_uris(&v.name),
                clients: clients.iter().filter(|c| c.export == v.name).count(),
            })
            .collect(),
    })
}

/// Connected NBD clients.
#[utoipa::path(get, path = "/api/clients", tag = "nbd",
    responses((status = 200, body = [NbdClient]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_clients(State(st): State<AppState>) -> Json<Vec<NbdClient>> {
    Json(st.0.nbd.clients())
}

/// ublk exports: volumes served as local block devices `/dev/ublkbN`.
#[utoipa::path(get, path = "/api/ublk", tag = "ublk",
    responses((status = 200, body = [UblkExport]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_ublk(State(st): State<AppState>) -> Json<Vec<UblkExport>> {
    Json(st.0.ublk.list())
}

/// Export a volume as `/dev/ublkbN` through the kernel's ublk driver; returns once the device
/// is live. The daemon keeps serving when ublk is unavailable (503 says why).
#[utoipa::path(post, path = "/api/ublk", tag = "ublk",
    request_body = StartUblkRequest,
    responses(
        (status = 201, body = UblkExport),
        (status = 400, description = "malformed body, or the volume cannot be exported through ublk", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 409, description = "the volume is already exported through ublk", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 500, description = "the kernel refused or a queue failed", body = ErrorBody),
        (status = 503, description = "no ublk driver, or no privilege to use it (the reason says what to do)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start_ublk(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<StartUblkRequest>,
) -> Result<(StatusCode, Json<UblkExport>), ApiError> {
    find_volume(&st, &req.volume)?;
    if let Some(e) =
        st.0.ublk
            .list()
            .into_iter()
            .find(|e| e.volume == req.volume)
    {
        return Err(ApiError::conflict(format!(
            "volume {} is already exported as {}",
            req.volume, e.path
        )));
    }
    let (engine, ublk) = (st.0.engine.clone(), st.0.ublk.clone());
    let export = tokio::task::spawn_blocking(move || ublk.start(&engine, &req.volume))
        .await
        .map_err(|e| ApiError::internal(format!("ublk start failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(export)))
}

/// Stop the ublk export of a volume: `/dev/ublkbN` goes away once its in-flight IO completes.
#[utoipa::path(delete, path = "/api/ublk/{volume}", tag = "ublk",
    params(("volume" = String, Path, description = "volume name")),
    responses(
        (status = 204, description = "stopped and removed"),
        (status = 401, body = ErrorBody),
        (status = 403, description = "bad Host or Origin", body = ErrorBody),
        (status = 404, description = "no such volume, or it has no ublk export", body = ErrorBody),
        (status = 500, description = "the kernel refused or a queue did not finish", body = ErrorBody),
        (status = 503, description = "no ublk driver, or no privilege to use it", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stop_ublk(
    State(st): State<AppState>,
    Path(volume): Path<String>,
) -> Result<StatusCode, ApiError> {
    find_volume(&st, &volume)?;
    if !st.0.ublk.list().iter().any(|e| e.volume == volume) {
        return Err(ApiError::not_found(format!(
            "volume {volume} has no ublk export"
        )));
    }
    let ublk = st.0.ublk.clone();
    tokio::task::spawn_blocking(move || ublk.stop(&volume))
        .await
        .map_err(|e| ApiError::internal(format!("ublk stop failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

/// Reactors (one per core): counters since start and the last second's busy share.
#[utoipa::path(get, path = "/api/reactors", tag = "stats",
    responses((status = 200, body = [ReactorInfo]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_reactors(State(st): State<AppState>) -> Json<Vec<ReactorInfo>> {
    let sample = st.latest();
    Json(
        st.0.engine
            .reactor_stats()
            .into_iter()
            .map(|r| ReactorInfo {
                busy_percent: (sample.seq > 1)
                    .then(|| sample.reactors.iter().find(|x| x.id == r.id))
                    .flatten()
                    .map(|x| x.busy_percent),
                id: r.id,
                core: r.core,
                busy_ns: r.busy_ns,
                idle_ns: r.idle_ns,
                parks: r.parks,
                messages: r.messages,
                completions: r.completions,
                ops_in_flight: r.ops_in_flight,
                parked: r.parked,
            })
            .collect(),
    )
}

/// The newest one-second sample of rates (the same JSON as each SSE `stats` event).
#[utoipa::path(get, path = "/api/stats", tag = "stats",
    responses((status = 200, body = Sample), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn latest_stats(State(st): State<AppState>) -> Json<Sample> {
    Json((*st.latest()).clone())
}

/// Server-sent events: a `stats` event (a [`Sample`] as JSON) once a second, preceded by the
/// last two minutes of samples so charts fill at once. Read it with `fetch()` (the token goes
/// in the `Authorization` header; `EventSource` cannot send it).
#[utoipa::path(get, path = "/api/events", tag = "stats",
    responses(
        (status = 200, description = "`text/event-stream` of `event: stats` with a Sample as data", content_type = "text/event-stream", body = String),
        (status = 401, body = ErrorBody),
        (status = 503, description = "too many SSE streams open; retry after `Retry-After` seconds", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(State(st): State<AppState>) -> Response {
    let Some(sse_slot) = st.sse_slot() else {
        return crate::error::sse_streams_full();
    };
    let mut rx = st.0.samples.subscribe();
    // Everything up to the current sample comes from the history; live ones after it.
    rx.borrow_and_update();
    let history: Vec<Arc<Sample>> =
        st.0.history
            .lock()
            .expect("history")
            .iter()
            .cloned()
            .collect();
    // A sample published between the subscription and the history read is in both: skip it.
    let last = history.last().map_or(0, |s| s.seq);
    let live = stream::unfold((rx, last), |(mut rx, mut last)| async move {
        loop {
            rx.changed().await.ok()?;
            let s = rx.borrow_and_update().clone();
            if s.seq > last {
                last = s.seq;
                return Some((s, (rx, last)));
            }
        }
    });
    let events = stream::iter(history).chain(live).map(move |s| {
        let _held_while_streaming = &sse_slot;
        Ok::<_, Infallible>(stats_event(&s))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn stats_event(s: &Sample) -> Event {
    Event::default()
        .event("stats")
        .id(s.seq.to_string())
        .data(serde_json::to_string(s).unwrap_or_else(|_| "{}".into()))
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "daemon",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn metrics(State(st): State<AppState>) -> Response {
    let replication = match crate::replication_api::current_status(&st).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("metrics without replication lag: {}", e.message);
            None
        }
    };
    let text = crate::metrics::render(
        &st.0.engine,
        &st.0.nbd.clients(),
        st.0.started.elapsed(),
        replication.as_ref(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Seconds since the Unix epoch of a `SystemTime` (0 before 1970).
pub fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
