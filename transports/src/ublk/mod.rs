//! ublk export: a ringblock volume as a local block device `/dev/ublkbN`.
//!
//! The kernel's ublk driver hands block requests to user space through io_uring commands on
//! `/dev/ublkcN`; we answer them with engine requests. Design:
//!
//! - **Control** (`ctrl`): ADD_DEV / SET_PARAMS / START_DEV / STOP_DEV / DEL_DEV / GET_DEV_INFO /
//!   GET_FEATURES / START+END_USER_RECOVERY through `/dev/ublk-control`, on a private small ring
//!   with 128-byte SQEs, blocking, on the caller's thread (never on a reactor).
//! - **Queues** (`queue`): one ublk hardware queue per reactor; queue `q` is a [`ReactorTask`]
//!   on reactor `q` that keeps FETCH_REQ / COMMIT_AND_FETCH_REQ commands (`UringCmd16`) in that
//!   reactor's ring, so a request submitted on core `q` is served by the reactor pinned to core
//!   `q`, and chunks that reactor owns are served inline.
//! - **Data** ([`CopyMode`]): with `UBLK_F_USER_COPY` (asked for when GET_FEATURES offers it,
//!   unless `[ublk] user_copy = false`), the engine moves each part of a READ/WRITE itself with
//!   `pwrite`/`pread` on `/dev/ublkcN`, on the reactor that owns the chunk and straight from/to
//!   a RAM volume's chunk memory: one copy per request. Without it, per tag `max_io_bytes` of
//!   an anonymous mapping owned by the queue, which the engine gets windows into and the driver
//!   copies data into (WRITE) and out of (READ): two copies. 6.12 has no zero-copy mode that
//!   fits (AUTO_BUF_REG is 6.16+). The mode is a property of the device (its flags), so a
//!   recovered device keeps the one it was created with.
//! - **Recovery**: devices are created with USER_RECOVERY + USER_RECOVERY_REISSUE (when the
//!   kernel offers them) and their id is saved in `<state_dir>/ublk-<volume>.state`. When the
//!   daemon dies, the driver quiesces the device and requeues in-flight IO; a restarted daemon
//!   finds the device by id (and by the marker we keep in its `ublksrv_flags`), runs
//!   START_USER_RECOVERY, fetches on every queue and END_USER_RECOVERY: the host sees a pause.
//!   Only volumes on persistent devices are recovered — a RAM volume's data died with the
//!   daemon, so its stale device is deleted and a new one created instead.
//!
//! [`ReactorTask`]: ringblock_engine::task::ReactorTask

mod ctrl;
mod kernel;
mod leftovers;
mod lifecycle;
mod queue;
pub mod state;
pub mod sys;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringblock_engine::{Engine, Errno};

use ctrl::Control;
pub use ctrl::CONTROL_PATH;
pub use kernel::{probe_kernel, KernelSupport, OPTIONAL_FEATURES, WANTED_FEATURES};
use leftovers::{existing, Existing};
pub use leftovers::{resume_leftovers, Leftover};
use lifecycle::{create, recover, teardown};
use queue::QueueStatus;
pub use queue::{CopyMode, DevStats};
use sys::DevInfo;

/// Default state directory (tmpfs: a ublk device does not survive a reboot either).
pub const DEFAULT_STATE_DIR: &str = "/run/ringblock";
/// Default tags per queue, unless the device profile allows fewer.
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Most tags per queue: every tag keeps one command in its reactor's ring, which all of the
/// reactor's tasks share (`MAX_RAW_OPS_PER_REACTOR`).
pub const MAX_QUEUE_DEPTH: u16 = 512;
/// Default largest request, unless the device profile allows less (buffers: depth × this).
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;
/// Marks devices we created (high half of `ublksrv_flags`; the low half is the volume id).
pub const MARKER: u64 = 0x5242_4c4b << 32; // "RBLK"
/// How long a restarted daemon waits for the old daemon's device to become recoverable.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(30);
/// How long stopping waits for the queues to finish after STOP_DEV.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// The kernel lacks ublk (or we lack the privilege): say what to do.
    #[error("ublk is not available: {0}")]
    NoDriver(String),
    #[error("ublk {what} for device {}: {errno}", dev_name(*dev_id))]
    Command {
        what: &'static str,
        dev_id: u32,
        errno: Errno,
    },
    #[error("{0}")]
    Volume(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Queue(String),
}

fn dev_name(dev_id: u32) -> String {
    if dev_id == u32::MAX {
        "(any)".into()
    } else {
        format!("ublkb{dev_id}")
    }
}

impl UblkError {
    fn errno(&self) -> Option<Errno> {
        match self {
            UblkError::Command { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// How exports are created. `Default` is what the daemon uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkOptions {
    /// Where `ublk-<volume>.state` files live.
    pub state_dir: PathBuf,
    /// Tags per queue; default: the device profile's queue depth, at most 128.
    pub queue_depth: Option<u16>,
    /// Largest request in bytes; default: the profile's max transfer, at most 512 KiB.
    pub max_io_bytes: Option<u32>,
    /// Create devices with USER_RECOVERY and recover existing ones.
    pub recovery: bool,
    /// Create devices with USER_COPY when the driver offers it (one copy per request instead
    /// of two). Off: per-tag buffers the driver copies to/from, as on kernels before 6.5.
    pub user_copy: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            queue_depth: None,
            max_io_bytes: None,
            recovery: true,
            user_copy: true,
        }
    }
}

/// Where an export is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UblkState {
    Live,
    Stopping,
    Stopped,
    /// Stopping failed half way; the message says what is left.
    Failed(String),
}

impl std::fmt::Display for UblkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UblkState::Live => write!(f, "live"),
            UblkState::Stopping => write!(f, "stopping"),
            UblkState::Stopped => write!(f, "stopped"),
            UblkState::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// Counters of one export (see [`DevStats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UblkStats {
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

/// One row of [`registry`]: what the dashboard and `export list` show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkInfo {
    /// Block device name, e.g. `ublkb0`.
    pub name: String,
    pub dev_id: u32,
    /// `/dev/ublkb0`.
    pub path: String,
    pub volume: String,
    pub queues: u16,
    pub queue_depth: u16,
    pub max_io_bytes: u32,
    /// Reactor serving each queue (index = queue id).
    pub reactors: Vec<u32>,
    /// `live`, `stopping`, `stopped` or `failed: …`.
    pub state: String,
    /// This daemon took the device over from a previous one (USER_RECOVERY).
    pub recovered: bool,
    /// Driver features granted to the device.
    pub features: Vec<String>,
    /// How request data moves: `user_copy` or `tag_buffer`.
    pub copy_mode: String,
    pub stats: UblkStats,
}

/// A running export.
pub struct UblkDevice {
    dev_id: u32,
    volume: String,
    info: DevInfo,
    queues: Vec<Arc<QueueStatus>>,
    stats: Arc<DevStats>,
    state: Mutex<UblkState>,
    recovered: bool,
    cdev: Mutex<Option<Arc<OwnedFd>>>,
    state_file: PathBuf,
}

static DEVICES: Mutex<Vec<Arc<UblkDevice>>> = Mutex::new(Vec::new());
/// Serialises control-plane changes (start/stop), so two callers never race on one volume.
static CONTROL_LOCK: Mutex<()> = Mutex::new(());

/// Every export of this daemon, for the dashboard and the API.
pub fn registry() -> Vec<UblkInfo> {
    DEVICES
        .lock()
        .expect("ublk registry")
        .iter()
        .map(|d| d.info())
        .collect()
}

/// The export of `volume`, if any.
pub fn find(volume: &str) -> Option<Arc<UblkDevice>> {
    DEVICES
        .lock()
        .expect("ublk registry")
        .iter()
        .find(|d| d.volume == volume)
        .cloned()
}

impl UblkDevice {
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// `/dev/ublkbN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// How this device's request data moves (from the flags it was created with).
    pub fn copy_mode(&self) -> CopyMode {
        CopyMode::of(self.info.flags)
    }

    pub fn state(&self) -> UblkState {
        self.state.lock().expect("ublk state").clone()
    }

    pub fn info(&self) -> UblkInfo {
        let s = &self.stats;
        let r = Ordering::Relaxed;
        UblkInfo {
            name: format!("ublkb{}", self.dev_id),
            dev_id: self.dev_id,
            path: self.path().display().to_string(),
            volume: self.volume.clone(),
            queues: self.info.nr_hw_queues,
            queue_depth: self.info.queue_depth,
            max_io_bytes: self.info.max_io_buf_bytes,
            reactors: self.queues.iter().map(|q| q.reactor).collect(),
            state: self.state().to_string(),
            recovered: self.recovered,
            features: sys::feature_names(self.info.flags),
            copy_mode: self.copy_mode().to_string(),
            stats: UblkStats {
                reads: s.reads.load(r),
                writes: s.writes.load(r),
                read_bytes: s.read_bytes.load(r),
                write_bytes: s.write_bytes.load(r),
                flushes: s.flushes.load(r),
                discards: s.discards.load(r),
                write_zeroes: s.write_zeroes.load(r),
                errors: s.errors.load(r),
                in_flight: s.in_flight.load(r),
            },
        }
    }

    /// Remove `/dev/ublkbN` (its in-flight IO completes first) and delete the device.
    pub fn stop(&self) -> Result<(), UblkError> {
        let _g = CONTROL_LOCK.lock().expect("ublk control lock");
        self.stop_locked()
    }

    fn stop_locked(&self) -> Result<(), UblkError> {
        *self.state.lock().expect("ublk state") = UblkState::Stopping;
        let result = Control::open().and_then(|mut ctl| {
            let cdev = self.cdev.lock().expect("ublk cdev").take();
            teardown(&mut ctl, self.dev_id, &self.queues, cdev)
        });
        match &result {
            Ok(()) => {
                state::remove(&self.state_file);
                *self.state.lock().expect("ublk state") = UblkState::Stopped;
                tracing::info!(device = %self.path().display(), volume = %self.volume, "ublk export stopped");
            }
            Err(e) => *self.state.lock().expect("ublk state") = UblkState::Failed(e.to_string()),
        }
        DEVICES
            .lock()
            .expect("ublk registry")
            .retain(|d| d.dev_id != self.dev_id);
        result
    }
}

/// Stop the export of `volume`.
pub fn stop_ublk_export(volume: &str) -> Result<(), UblkError> {
    let dev = find(volume)
        .ok_or_else(|| UblkError::Volume(format!("volume {volume} has no ublk export")))?;
    dev.stop()
}

/// Whether this process can use the ublk driver now: `/dev/ublk-control` opens. The error
/// (`NoDriver` when the module is missing or we lack the privilege) says what to do.
pub fn check_driver() -> Result<(), UblkError> {
    Control::open().map(drop)
}

/// Stop every export (daemon shutdown: before the engine stops, since the queues live on its
/// reactors). Returns the failures.
pub fn stop_all() -> Vec<(String, UblkError)> {
    let devices: Vec<_> = DEVICES.lock().expect("ublk registry").clone();
    devices
        .into_iter()
        .filter_map(|d| d.stop().err().map(|e| (d.volume.clone(), e)))
        .collect()
}

/// Export `volume` as `/dev/ublkbN`, or take over the device a previous daemon left for it.
pub fn start_ublk_export(
    engine: &Engine,
    volume: &str,
    opts: &UblkOptions,
) -> Result<Arc<UblkDevice>, UblkError> {
    let _g = CONTROL_LOCK.lock().expect("ublk control lock");
    if let Some(d) = find(volume) {
        return Err(UblkError::InUse(format!(
            "volume {volume} is already exported as {}",
            d.path().display()
        )));
    }
    let handle = engine
        .open(volume)
        .map_err(|e| UblkError::Volume(e.to_string()))?;
    if let Some(reason) = crate::replica_guard::export_refusal(handle.volume()) {
        return Err(UblkError::Volume(reason));
    }
    let mut ctl = Control::open()?;
    let features = match ctl.features() {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("ublk: cannot read driver features ({e}); asking for what we need");
            None
        }
    };
    let marker = MARKER | u64::from(handle.volume().id.0);
    let state_file = state::path(&opts.state_dir, volume);
    let mut want_id = None;
    if let Some(st) = state::load(&state_file).filter(|s| s.volume == volume) {
        let recoverable = opts.recovery && handle.volume().device.persistent;
        match existing(&mut ctl, &st, marker, recoverable)? {
            Existing::Recovering(info) => {
                return recover(engine, ctl, handle, info, state_file);
            }
            Existing::Deleted => want_id = Some(st.dev_id),
            Existing::None => {}
        }
    }
    create(
        engine, ctl, handle, features, marker, want_id, opts, state_file,
    )
}
