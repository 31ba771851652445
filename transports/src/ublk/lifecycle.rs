//! Bringing a device up (create, recover) and down (teardown): the control commands, the
//! character device and the queue tasks on the reactors.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringblock_engine::{Engine, Errno, ReactorId, VolumeHandle};

use super::ctrl::Control;
use super::queue::{CopyMode, DevStats, QueueMem, QueueStatus, QueueTask};
use super::sys::{self, DevInfo};
use super::{
    dev_name, state, UblkDevice, UblkError, UblkOptions, UblkState, DEFAULT_MAX_IO_BYTES,
    DEFAULT_QUEUE_DEPTH, DEVICES, MAX_QUEUE_DEPTH, STOP_WAIT,
};

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
pub(super) fn teardown(
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
pub(super) fn create(
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

pub(super) fn recover(
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
