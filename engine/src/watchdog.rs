//! The device watchdog: a thread that notices device files deleted while in use.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::device::OpenDevice;
use crate::error::EngineError;
use crate::volume::DeviceState;

/// How often the watchdog checks that device files still exist.
pub const WATCHDOG_INTERVAL_MS: u64 = 1000;

/// Notice device files deleted while open: mark the device's health, say so once, loudly.
pub(crate) fn check_backing_files(opens: &[Arc<OpenDevice>], states: &[Arc<DeviceState>]) {
    for (open, state) in opens.iter().zip(states) {
        if open.backing_file_deleted() == Some(true)
            && !state.health.backing_deleted.swap(true, Ordering::AcqRel)
        {
            let path = open.path.as_deref().unwrap_or(std::path::Path::new("?"));
            tracing::error!(
                device = %state.name,
                path = %path.display(),
                "the device's backing file was deleted while in use: nothing written to it \
                 survives a restart, so flushes and FUA writes now fail with EIO. Copy it back \
                 while the daemon runs (from /proc/{}/fd/, the descriptor that links to \
                 '{} (deleted)') and restart",
                std::process::id(),
                path.display()
            );
        }
    }
}

/// A running watchdog: dropping the sender stops the thread.
pub(crate) type Watchdog = (mpsc::Sender<()>, JoinHandle<()>);

/// A thread that checks every [`WATCHDOG_INTERVAL_MS`] that device files still exist; none
/// when no device has a backing file (RAM, null, block devices), so an idle daemon of those
/// never wakes for it.
pub(crate) fn spawn_watchdog(
    opens: Vec<Arc<OpenDevice>>,
    states: Vec<Arc<DeviceState>>,
) -> Result<Option<Watchdog>, EngineError> {
    let (opens, states): (Vec<_>, Vec<_>) = opens
        .into_iter()
        .zip(states)
        .filter(|(open, _)| open.has_backing_file())
        .unzip();
    if opens.is_empty() {
        return Ok(None);
    }
    let (tx, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("device-watchdog".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Duration::from_millis(WATCHDOG_INTERVAL_MS))
            {
                check_backing_files(&opens, &states);
            }
        })
        .map_err(|e| EngineError::Config(format!("cannot spawn the device watchdog: {e}")))?;
    Ok(Some((tx, thread)))
}
