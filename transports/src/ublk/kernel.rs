//! What the running kernel offers for ublk (`ringblock doctor`).

use super::ctrl::{Control, CONTROL_PATH};
use super::queue::CopyMode;
use super::sys;

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
