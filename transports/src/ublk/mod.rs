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
mod queue;
pub mod state;
pub mod sys;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringblock_engine::{Engine, Errno, ReactorId, VolumeHandle};

pub use ctrl::CONTROL_PATH;
pub use queue::{CopyMode, DevStats};
use queue::{QueueMem, QueueStatus, QueueTask};
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

use ctrl::Control;

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

enum Existing {
    /// START_USER_RECOVERY succeeded: fetch on every queue, then END_USER_RECOVERY.
    Recovering(DevInfo),
    /// A stale device of ours was deleted; its id is free again.
    Deleted,
    /// Nothing (left) to take over.
    None,
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Look at the device a previous daemon recorded for this volume and decide what to do.
fn existing(
    ctl: &mut Control,
    st: &state::ExportState,
    marker: u64,
    recoverable: bool,
) -> Result<Existing, UblkError> {
    let id = st.dev_id;
    let me = std::process::id() as i32;
    let deadline = Instant::now() + RECOVERY_WAIT;
    let mut logged = false;
    // Bounded by RECOVERY_WAIT.
    loop {
        let info = match ctl.dev_info(id) {
            Ok(i) => i,
            Err(e) if e.errno() == Some(Errno(libc::ENODEV)) => return Ok(Existing::None),
            Err(e) => return Err(e),
        };
        if info.ublksrv_flags != marker || st.marker != marker {
            tracing::warn!(
                device = %dev_name(id),
                volume = %st.volume,
                "the recorded ublk device belongs to something else now; leaving it alone"
            );
            return Ok(Existing::None);
        }
        let state = info.state;
        if !logged {
            tracing::info!(device = %dev_name(id), volume = %st.volume, state = sys::state_name(state), old_pid = info.ublksrv_pid, recoverable, "found the ublk device of a previous daemon");
            logged = true;
        }
        match state {
            sys::UBLK_S_DEV_LIVE if info.ublksrv_pid != me && pid_alive(info.ublksrv_pid) => {
                // Maybe the old daemon is still exiting; a live one keeps it.
                if Instant::now() >= deadline {
                    return Err(UblkError::InUse(format!(
                        "{} (volume {}) is served by running process {}",
                        dev_name(id),
                        st.volume,
                        info.ublksrv_pid
                    )));
                }
            }
            sys::UBLK_S_DEV_LIVE
                if info.flags & sys::UBLK_F_USER_RECOVERY != 0
                    && recoverable
                    && info.ublksrv_pid != me =>
            {
                // Its daemon is gone; the driver is quiescing it.
            }
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO
                if recoverable && info.flags & sys::UBLK_F_USER_RECOVERY != 0 =>
            {
                match ctl.start_user_recovery(id) {
                    Ok(()) => return Ok(Existing::Recovering(info)),
                    // The old daemon's /dev/ublkcN is not released yet.
                    Err(e) if e.errno() == Some(Errno(libc::EBUSY)) => {}
                    Err(e) => return Err(e),
                }
            }
            _ => {
                if recoverable {
                    tracing::warn!(device = %dev_name(id), state = sys::state_name(state), "ublk device cannot be recovered; deleting it");
                } else {
                    tracing::warn!(device = %dev_name(id), volume = %st.volume, "the volume's data did not survive the restart (not on a persistent device): deleting the old ublk device");
                }
                delete_stale(ctl, id)?;
                return Ok(Existing::Deleted);
            }
        }
        if Instant::now() >= deadline {
            return Err(UblkError::Io(format!(
                "{} stays {} for {RECOVERY_WAIT:?}; cannot recover it",
                dev_name(id),
                sys::state_name(state)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn delete_stale(ctl: &mut Control, id: u32) -> Result<(), UblkError> {
    if let Err(e) = ctl.stop_dev(id) {
        tracing::debug!("stop of stale device: {e}");
    }
    match ctl.del_dev(id) {
        Err(e) if e.errno() != Some(Errno(libc::ENODEV)) => Err(e),
        _ => Ok(()),
    }
}

fn open_cdev(dev_id: u32) -> Result<Arc<OwnedFd>, UblkError> {
    let path = format!("/dev/ublkc{dev_id}");
    let c = std::ffi::CString::new(path.clone()).expect("no NUL");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Bounded: udev may need a moment to create the node.
    loop {
        // SAFETY: open(2) of a NUL-terminated path; checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we own.
            return Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) || Instant::now() >= deadline {
            return Err(UblkError::Io(format!("open {path}: {e}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel gives a single-queue disk mq-deadline; requests to ringblock need no reordering
/// (the engine has its own queues, and RAM/NVMe-class devices none), and the elevator costs a
/// lock and CPU per request: use `none`, as for NVMe. Best effort (udev rules may differ).
fn set_scheduler_none(dev_id: u32) {
    let path = format!("/sys/block/ublkb{dev_id}/queue/scheduler");
    if let Err(e) = std::fs::write(&path, "none") {
        tracing::debug!("{path}: {e}");
    }
}

/// Map every queue's memory and host its task on its reactor.
fn spawn_queues(
    engine: &Engine,
    cdev: &Arc<OwnedFd>,
    handle: &VolumeHandle,
    info: &DevInfo,
    stats: &Arc<DevStats>,
) -> Result<Vec<Arc<QueueStatus>>, UblkError> {
    let n = engine.reactor_count();
    let mut mems = Vec::new();
    for q in 0..info.nr_hw_queues {
        mems.push(QueueMem::new(
            cdev,
            q,
            info.queue_depth,
            info.max_io_buf_bytes as usize,
            CopyMode::of(info.flags),
        )?);
    }
    let mut queues = Vec::new();
    for (q, mem) in mems.into_iter().enumerate() {
        let q = q as u16;
        let reactor = u32::from(q) % n;
        let status = Arc::new(QueueStatus::new(q, reactor));
        let task = QueueTask::new(
            q,
            cdev.clone(),
            mem,
            status.clone(),
            stats.clone(),
            handle.clone(),
        );
        engine.spawn_task(Some(ReactorId(reactor)), Box::new(task));
        queues.push(status);
    }
    Ok(queues)
}

fn queue_failure(queues: &[Arc<QueueStatus>]) -> Option<String> {
    queues
        .iter()
        .find_map(|q| q.failure().map(|f| format!("queue {}: {f}", q.q_id)))
}

/// STOP_DEV, wait for the queues, close /dev/ublkcN, DEL_DEV.
fn teardown(
    ctl: &mut Control,
    dev_id: u32,
    queues: &[Arc<QueueStatus>],
    cdev: Option<Arc<OwnedFd>>,
) -> Result<(), UblkError> {
    let stopped = ctl.stop_dev(dev_id);
    for q in queues {
        q.request_stop();
    }
    let deadline = Instant::now() + STOP_WAIT;
    // Bounded by STOP_WAIT.
    while !queues.iter().all(|q| q.finished.load(Ordering::Acquire)) {
        if Instant::now() >= deadline {
            let left: Vec<u16> = queues
                .iter()
                .filter(|q| !q.finished.load(Ordering::Acquire))
                .map(|q| q.q_id)
                .collect();
            return Err(UblkError::Queue(format!(
                "{}: queues {left:?} did not finish within {STOP_WAIT:?} after STOP_DEV ({stopped:?}); device not deleted",
                dev_name(dev_id)
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(cdev); // the tasks dropped theirs: /dev/ublkcN is closed now
    stopped?;
    ctl.del_dev(dev_id)
}

fn build_params(handle: &VolumeHandle, info: &DevInfo) -> Result<sys::Params, UblkError> {
    let vol = handle.volume();
    let profile = &vol.device.profile;
    let shift = |bytes: u32| bytes.trailing_zeros() as u8;
    let logical = profile.logical_block_size_bytes;
    let physical = profile.physical_block_size_bytes.max(logical);
    if logical > 4096 {
        return Err(UblkError::Volume(format!(
            "volume {}: logical block size {logical} is larger than a page; ublk cannot expose it",
            vol.name
        )));
    }
    let size = vol.size_bytes();
    let chunk = vol.chunk_size_bytes();
    let max_trim = ringblock_engine::MAX_REQUEST_BYTES.min(u64::from(u32::MAX) << 9) >> 9;
    Ok(sys::Params {
        len: std::mem::size_of::<sys::Params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ParamBasic {
            // FLUSH is what makes writes (and the chunk maps behind them) durable, on every
            // device kind: always advertise a volatile cache, and FUA.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift(logical),
            physical_bs_shift: shift(physical),
            io_opt_shift: shift(physical),
            io_min_shift: shift(physical),
            max_sectors: info.max_io_buf_bytes >> 9,
            // Requests never straddle a chunk, so each goes to one owner reactor.
            chunk_sectors: if chunk.is_power_of_two() && (chunk >> 9) <= u64::from(u32::MAX) {
                (chunk >> 9) as u32
            } else {
                0
            },
            dev_sectors: size >> 9,
            virt_boundary_mask: 0,
        },
        discard: sys::ParamDiscard {
            discard_alignment: 0,
            discard_granularity: profile.discard_granularity_bytes.max(physical),
            max_discard_sectors: max_trim as u32,
            max_write_zeroes_sectors: max_trim as u32,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..sys::Params::default()
    })
}

#[allow(clippy::too_many_arguments)]
fn create(
    engine: &Engine,
    mut ctl: Control,
    handle: VolumeHandle,
    features: Option<u64>,
    marker: u64,
    want_id: Option<u32>,
    opts: &UblkOptions,
    state_file: PathBuf,
) -> Result<Arc<UblkDevice>, UblkError> {
    let vol = handle.volume().clone();
    let profile = &vol.device.profile;
    let depth = opts
        .queue_depth
        .unwrap_or_else(|| profile.queue_depth.min(u32::from(DEFAULT_QUEUE_DEPTH)) as u16)
        .clamp(1, MAX_QUEUE_DEPTH);
    let max_io = opts
        .max_io_bytes
        .unwrap_or_else(|| profile.max_transfer_bytes.min(DEFAULT_MAX_IO_BYTES))
        .min(sys::UBLK_IO_BUF_MAX_BYTES)
        / 4096
        * 4096;
    let max_io = max_io.max(4096);
    let mut flags = sys::UBLK_F_CMD_IOCTL_ENCODE;
    if opts.recovery {
        flags |= sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;
    }
    if let Some(f) = features {
        flags &= f;
        // Only when the driver says it has it: an unknown flag fails ADD_DEV on old kernels.
        if opts.user_copy {
            flags |= f & sys::UBLK_F_USER_COPY;
        }
    }
    let queues_n = engine.reactor_count().min(sys::UBLK_MAX_NR_QUEUES) as u16;
    let mut info = DevInfo {
        nr_hw_queues: queues_n,
        queue_depth: depth,
        max_io_buf_bytes: max_io,
        dev_id: want_id.unwrap_or(u32::MAX),
        flags,
        ublksrv_flags: marker,
        ..DevInfo::default()
    };
    match ctl.add_dev(&mut info) {
        Err(e) if e.errno() == Some(Errno(libc::EEXIST)) && want_id.is_some() => {
            info.dev_id = u32::MAX;
            ctl.add_dev(&mut info)?;
        }
        r => r?,
    }
    let id = info.dev_id;
    if opts.recovery && info.flags & sys::UBLK_F_USER_RECOVERY_REISSUE == 0 {
        tracing::warn!(device = %dev_name(id), "the kernel did not grant USER_RECOVERY_REISSUE: IO in flight when the daemon dies fails instead of being reissued");
    }
    let st = state::ExportState {
        volume: vol.name.clone(),
        dev_id: id,
        marker,
    };
    let result = (|| {
        state::save(&state_file, &st).map_err(|e| {
            UblkError::Io(format!(
                "cannot write ublk state file {}: {e}",
                state_file.display()
            ))
        })?;
        let mut params = build_params(&handle, &info)?;
        ctl.set_params(id, &mut params)?;
        let cdev = open_cdev(id)?;
        let stats = Arc::new(DevStats::default());
        let queues = spawn_queues(engine, &cdev, &handle, &info, &stats)?;
        let started = ctl.start_dev(id, std::process::id() as i32, &|| {
            queue_failure(&queues).is_some()
        });
        if let Err(e) = started {
            let why = queue_failure(&queues).map_or(e.to_string(), |q| format!("{e} ({q})"));
            let _ = teardown(&mut ctl, id, &queues, Some(cdev));
            return Err(UblkError::Queue(why));
        }
        Ok((cdev, stats, queues))
    })();
    let (cdev, stats, queues) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = ctl.stop_dev(id);
            let _ = ctl.del_dev(id);
            state::remove(&state_file);
            return Err(e);
        }
    };
    set_scheduler_none(id);
    let dev = Arc::new(UblkDevice {
        dev_id: id,
        volume: vol.name.clone(),
        info,
        queues,
        stats,
        state: Mutex::new(UblkState::Live),
        recovered: false,
        cdev: Mutex::new(Some(cdev)),
        state_file,
    });
    tracing::info!(device = %dev.path().display(), volume = %vol.name, queues = info.nr_hw_queues, depth = info.queue_depth, max_io_bytes = info.max_io_buf_bytes, copy = %dev.copy_mode(), features = ?sys::feature_names(info.flags), "ublk export started");
    DEVICES.lock().expect("ublk registry").push(dev.clone());
    Ok(dev)
}

fn recover(
    engine: &Engine,
    mut ctl: Control,
    handle: VolumeHandle,
    info: DevInfo,
    state_file: PathBuf,
) -> Result<Arc<UblkDevice>, UblkError> {
    let id = info.dev_id;
    let vol = handle.volume().clone();
    if let Ok(p) = ctl.params(id) {
        let dev_bytes = p.basic.dev_sectors << 9;
        if dev_bytes != vol.size_bytes() {
            tracing::warn!(device = %dev_name(id), dev_bytes, volume_bytes = vol.size_bytes(), "the recovered device keeps its old size");
        }
    }
    let cdev = open_cdev(id)?;
    let stats = Arc::new(DevStats::default());
    let queues = spawn_queues(engine, &cdev, &handle, &info, &stats)?;
    if let Err(e) = ctl.end_user_recovery(id, std::process::id() as i32, &|| {
        queue_failure(&queues).is_some()
    }) {
        let why = queue_failure(&queues).map_or(e.to_string(), |q| format!("{e} ({q})"));
        let _ = teardown(&mut ctl, id, &queues, Some(cdev));
        state::remove(&state_file);
        return Err(UblkError::Queue(format!(
            "recovery of {}: {why}",
            dev_name(id)
        )));
    }
    let info = ctl.dev_info(id).unwrap_or(info);
    let dev = Arc::new(UblkDevice {
        dev_id: id,
        volume: vol.name.clone(),
        info,
        queues,
        stats,
        state: Mutex::new(UblkState::Live),
        recovered: true,
        cdev: Mutex::new(Some(cdev)),
        state_file,
    });
    tracing::info!(device = %dev.path().display(), volume = %vol.name, queues = info.nr_hw_queues, depth = info.queue_depth, copy = %dev.copy_mode(), "ublk export recovered from the previous daemon");
    DEVICES.lock().expect("ublk registry").push(dev.clone());
    Ok(dev)
}

/// What became of a device a previous daemon left behind (see [`resume_leftovers`]).
pub enum Leftover {
    /// Taken over: the export continues (it was started at runtime, e.g. through the API).
    Recovered(Arc<UblkDevice>),
    /// Deleted (`ublkbN`): its volume is gone, or recovery is off.
    Deleted {
        volume: String,
        device: String,
    },
    Failed {
        volume: String,
        error: UblkError,
    },
}

/// Deal with the devices a previous daemon left for volumes not in `configured` (exports it
/// had started at runtime; their state files are in `opts.state_dir`): with recovery on and the
/// volume still there, take the device over like a configured export; otherwise delete it, since
/// a quiesced device would hold its host's IO forever. Call after the configured exports start.
pub fn resume_leftovers(engine: &Engine, opts: &UblkOptions, configured: &[&str]) -> Vec<Leftover> {
    let Ok(entries) = std::fs::read_dir(&opts.state_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, state::ExportState)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ublk-") && n.ends_with(".state"))
        })
        .filter_map(|p| state::load(&p).map(|st| (p, st)))
        .filter(|(_, st)| !configured.contains(&st.volume.as_str()) && find(&st.volume).is_none())
        .collect();
    found.sort_by_key(|(_, st)| st.dev_id);
    let mut out = Vec::new();
    for (path, st) in found {
        if opts.recovery && engine.volume(&st.volume).is_some() {
            match start_ublk_export(engine, &st.volume, opts) {
                Ok(dev) => out.push(Leftover::Recovered(dev)),
                Err(error) => out.push(Leftover::Failed {
                    volume: st.volume.clone(),
                    error,
                }),
            }
            continue;
        }
        let _g = CONTROL_LOCK.lock().expect("ublk control lock");
        let mut ctl = match Control::open() {
            Ok(c) => c,
            Err(error) => {
                out.push(Leftover::Failed {
                    volume: st.volume.clone(),
                    error,
                });
                continue;
            }
        };
        let me = std::process::id() as i32;
        match ctl.dev_info(st.dev_id) {
            Ok(info)
                if info.ublksrv_flags == st.marker
                    && (info.ublksrv_pid == me || !pid_alive(info.ublksrv_pid)) =>
            {
                tracing::warn!(device = %dev_name(st.dev_id), volume = %st.volume, "deleting the ublk device a previous daemon left (volume gone or recovery off)");
                match delete_stale(&mut ctl, st.dev_id) {
                    Ok(()) => {
                        state::remove(&path);
                        out.push(Leftover::Deleted {
                            volume: st.volume.clone(),
                            device: dev_name(st.dev_id),
                        });
                    }
                    Err(error) => out.push(Leftover::Failed {
                        volume: st.volume.clone(),
                        error,
                    }),
                }
            }
            // Someone else's device now, or its daemon still runs: leave it.
            Ok(_) => state::remove(&path),
            Err(e) if e.errno() == Some(Errno(libc::ENODEV)) => state::remove(&path),
            Err(error) => out.push(Leftover::Failed {
                volume: st.volume.clone(),
                error,
            }),
        }
    }
    out
}

/// What the running kernel offers for ublk (for `ringblock doctor`).
#[derive(Clone, Debug)]
pub struct KernelSupport {
    /// `/dev/ublk-control` exists.
    pub control_present: bool,
    /// `/sys/module/ublk_drv` exists (loaded, or built in).
    pub module_loaded: bool,
    /// GET_FEATURES result, or why it could not be read.
    pub features: Result<u64, String>,
}

/// Features ringblock uses, and what is lost without each.
pub const WANTED_FEATURES: &[(u64, &str)] = &[
    (
        sys::UBLK_F_USER_RECOVERY,
        "a daemon restart keeps /dev/ublkbN (without it the device disappears when the daemon dies)",
    ),
    (
        sys::UBLK_F_USER_RECOVERY_REISSUE,
        "IO in flight when the daemon dies is reissued (without it that IO fails)",
    ),
    (
        sys::UBLK_F_CMD_IOCTL_ENCODE,
        "ioctl-encoded commands (ringblock sends only these)",
    ),
];

/// Features ringblock could use later; their absence costs speed, not function.
pub const OPTIONAL_FEATURES: &[(u64, &str)] = &[
    (
        sys::UBLK_F_AUTO_BUF_REG,
        "zero-copy via auto buffer registration (6.16+); without it the driver copies data",
    ),
    (
        sys::UBLK_F_UPDATE_SIZE,
        "online resize of /dev/ublkbN after a volume grows",
    ),
    (
        sys::UBLK_F_QUIESCE,
        "quiesce for a planned daemon upgrade without a kill",
    ),
];

impl KernelSupport {
    /// The copy mode new exports get on this kernel (with the default `[ublk] user_copy`).
    pub fn copy_mode(&self) -> Option<CopyMode> {
        self.features
            .as_ref()
            .ok()
            .map(|f| CopyMode::of(f & sys::UBLK_F_USER_COPY))
    }

    /// Wanted features the driver lacks (empty when features are unknown).
    pub fn missing(&self) -> Vec<(u64, &'static str)> {
        match self.features {
            Ok(f) => WANTED_FEATURES
                .iter()
                .filter(|(bit, _)| f & bit == 0)
                .copied()
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Look at the kernel: driver present, features.
pub fn probe_kernel() -> KernelSupport {
    let control_present = std::path::Path::new(CONTROL_PATH).exists();
    let module_loaded = std::path::Path::new("/sys/module/ublk_drv").exists();
    let features = if control_present {
        Control::open()
            .and_then(|mut c| c.features())
            .map_err(|e| e.to_string())
    } else {
        Err(format!("{CONTROL_PATH} is missing"))
    };
    KernelSupport {
        control_present,
        module_loaded,
        features,
    }
}
