//! Devices a previous daemon left behind: take one over, or delete it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblock_engine::{Engine, Errno};

use super::ctrl::Control;
use super::sys::{self, DevInfo};
use super::{
    dev_name, find, start_ublk_export, state, UblkDevice, UblkError, UblkOptions, CONTROL_LOCK,
    RECOVERY_WAIT,
};

pub(super) enum Existing {
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
pub(super) fn existing(
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
