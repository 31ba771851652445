//! Ctrl-C and SIGTERM while a benchmark runs.
//!
//! The first signal only sets a flag: the run checks it between steps (and the lean client in
//! its loop), returns an error, and every [`crate::procs::Server`] guard's `Drop` stops the
//! process group it started. fio, a child in our own process group, gets the terminal's SIGINT
//! too and ends its run early. A second signal does not wait: the handler kills every registered
//! process group with SIGKILL, removes the registered backing files (they can be gigabytes)
//! and exits (kill, unlink, rmdir and _exit are async-signal-safe).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};

use anyhow::{bail, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Process groups the bench started and has not stopped yet (0 = free slot).
const SLOTS: usize = 32;
static GROUPS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];

/// Files and directories to remove if a second signal ends the process at once (null = free
/// slot). The strings are leaked on purpose: the handler may read them at any time.
const PATH_SLOTS: usize = 16;
static PATHS: [AtomicPtr<libc::c_char>; PATH_SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; PATH_SLOTS];

/// The flag a signal sets (for [`crate::nbd_load::LoadConfig::cancel`]).
pub fn flag() -> &'static AtomicBool {
    &REQUESTED
}

/// Whether Ctrl-C (or SIGTERM) was received.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// An error once Ctrl-C was received: call between steps.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted (Ctrl-C): stopping everything this run started");
    }
    Ok(())
}

/// Remember a process group to kill if a second signal comes. Returns false when every slot
/// is taken (the group is then only stopped by its guard).
pub fn register_group(pgid: i32) -> bool {
    GROUPS.iter().any(|g| {
        g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

pub fn unregister_group(pgid: i32) {
    for g in &GROUPS {
        let _ = g.compare_exchange(pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Remember a file, or a directory that is empty once its registered files are gone, to remove
/// if a second signal ends the process before the guards do. Returns false when every slot is
/// taken.
pub fn register_path(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let ptr = c.into_raw();
    let ok = PATHS.iter().any(|p| {
        p.compare_exchange(
            std::ptr::null_mut(),
            ptr,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_ok()
    });
    if !ok {
        // SAFETY: ptr came from CString::into_raw just above and was not shared.
        drop(unsafe { CString::from_raw(ptr) });
    }
    ok
}

/// Forget every registered path (the files are kept, or already removed by their guards). The
/// strings stay leaked: a signal handler might be reading one right now.
pub fn unregister_paths() {
    for p in &PATHS {
        p.store(std::ptr::null_mut(), Ordering::SeqCst);
    }
}

extern "C" fn on_signal(_sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        for g in &GROUPS {
            let pgid = g.load(Ordering::SeqCst);
            if pgid > 0 {
                // SAFETY: kill is async-signal-safe; a negative pid names the process group.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        // Files first, then the directories that held them.
        for pass in 0..2 {
            for p in &PATHS {
                let path = p.load(Ordering::SeqCst);
                if !path.is_null() {
                    // SAFETY: a NUL-terminated string that is never freed; unlink and rmdir are
                    // async-signal-safe and fail harmlessly on the wrong kind or a missing path.
                    unsafe {
                        if pass == 0 {
                            libc::unlink(path);
                        } else {
                            libc::rmdir(path);
                        }
                    }
                }
            }
        }
        // SAFETY: _exit is async-signal-safe and does not run destructors.
        unsafe { libc::_exit(130) };
    }
    let msg = b"\nringblock-bench: interrupted, stopping what it started (again to kill at once)\n";
    // SAFETY: write is async-signal-safe; the buffer is static.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Install the SIGINT and SIGTERM handlers (once; later calls do nothing).
pub fn install() -> Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is plain data; the handler only touches atomics and calls
        // async-signal-safe functions. No SA_RESTART: blocking waits return EINTR and the
        // callers look at the flag.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_slots_fill_and_free() {
        assert!(register_group(4_000_001));
        assert!(GROUPS.iter().any(|g| g.load(Ordering::SeqCst) == 4_000_001));
        unregister_group(4_000_001);
        assert!(!GROUPS.iter().any(|g| g.load(Ordering::SeqCst) == 4_000_001));
    }

    #[test]
    fn paths_register_and_forget() {
        let registered = || {
            PATHS
                .iter()
                .filter(|p| !p.load(Ordering::SeqCst).is_null())
                .count()
        };
        assert!(register_path(Path::new("/tmp/surely-not-here/device.img")));
        assert_eq!(registered(), 1);
        assert!(!register_path(Path::new("/tmp/nul\0byte")));
        unregister_paths();
        assert_eq!(registered(), 0);
    }
}
