//! Device backends: `file` and `blockdev` (O_DIRECT through io_uring), `ram` (volatile),
//! `bbram` (battery-backed RAM, emulated by a file-backed shared mapping with explicit persist
//! points), `null`, and the `delay` and `fault` wrappers (configured per device, applied by
//! the IO layer's decorators [`crate::io::delay`] and [`crate::io::fault`]).
//!
//! This module holds the configuration and the opened device; [`mem`] the memory of `ram` and
//! `bbram`, [`backing`] opening, creating and locking files and block devices, [`probe`] the
//! read-only checks `check-config` runs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::io::fault::FaultState;
use crate::loader::{DeviceSpec, FormatPolicy, SyncAccess};
use crate::profile::{self, FirmwareProfile};

mod backing;
mod mem;
mod probe;

pub use self::backing::*;
pub use self::mem::*;
pub use self::probe::*;

/// Default chunk size: the unit of allocation and of reactor ownership.
pub const DEFAULT_CHUNK_SIZE_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    File,
    Blockdev,
    Ram,
    Bbram,
    Null,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::File => "file",
            DeviceKind::Blockdev => "blockdev",
            DeviceKind::Ram => "ram",
            DeviceKind::Bbram => "bbram",
            DeviceKind::Null => "null",
        }
    }

    /// Whether data survives a daemon restart.
    pub fn persistent(self) -> bool {
        matches!(
            self,
            DeviceKind::File | DeviceKind::Blockdev | DeviceKind::Bbram
        )
    }
}

/// The `fault` wrapper: fail or slow down chosen IO, for drills and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Byte ranges `[start, end)` of the device where every read and write fails with EIO.
    #[serde(default)]
    pub eio_ranges: Vec<[u64; 2]>,
    /// Fail every Nth write with EIO (0 = never).
    #[serde(default)]
    pub fail_every_nth_write: u64,
    /// Every Nth op waits `spike_us` longer (0 = never).
    #[serde(default)]
    pub spike_every_nth: u64,
    #[serde(default)]
    pub spike_us: u64,
}

/// One `[[device]]` of the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    pub kind: DeviceKind,
    /// Backing file or block device (file, blockdev, bbram).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Size; for `file` and `bbram` the file is created (sparse) with this size if missing.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Builtin profile name (`nvme`, `flash`, `bbram`) or a path to a profile TOML.
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default = "default_chunk_size")]
    pub chunk_size_bytes: u64,
    #[serde(default)]
    pub format: FormatPolicy,
    /// Emulate the profile's latency and bandwidth (the `delay` wrapper).
    #[serde(default)]
    pub emulate_profile_latency: bool,
    #[serde(default)]
    pub fault: Option<FaultConfig>,
}

fn default_chunk_size() -> u64 {
    DEFAULT_CHUNK_SIZE_BYTES
}

impl DeviceConfig {
    /// A RAM device, as the embedded default uses.
    pub fn ram(name: &str, size_bytes: u64) -> Self {
        Self {
            name: name.into(),
            kind: DeviceKind::Ram,
            path: None,
            size_bytes: Some(size_bytes),
            profile: None,
            chunk_size_bytes: DEFAULT_CHUNK_SIZE_BYTES,
            format: FormatPolicy::IfBlank,
            emulate_profile_latency: false,
            fault: None,
        }
    }

    /// The checks of the settings alone (name, chunk size, profile) that opening and probing
    /// share; returns the resolved profile.
    pub(crate) fn check_settings(&self) -> Result<FirmwareProfile, EngineError> {
        let err = |message: String| EngineError::Device {
            device: self.name.clone(),
            message,
        };
        crate::volume::validate_volume_name(&self.name)
            .map_err(|_| err("device name must be 1-128 characters of A-Z a-z 0-9 - _ .".into()))?;
        check_chunk_size(self.chunk_size_bytes).map_err(err)?;
        profile::resolve(self.profile.as_deref().unwrap_or(self.default_profile()))
    }

    fn default_profile(&self) -> &'static str {
        match self.kind {
            DeviceKind::Bbram | DeviceKind::Ram | DeviceKind::Null => "bbram",
            DeviceKind::File | DeviceKind::Blockdev => "nvme",
        }
    }
}

/// How a device is reached.
pub enum Backend {
    /// O_DIRECT file or block device, driven through io_uring.
    Direct {
        file: OwnedFd,
        blockdev: bool,
    },
    Mem(MemRegion),
    Null,
}

/// An opened device, shared by every reactor.
pub struct OpenDevice {
    pub spec: DeviceSpec,
    pub path: Option<PathBuf>,
    pub backend: Backend,
    /// The profile whose service times the delay decorator emulates, if any.
    pub delay: Option<FirmwareProfile>,
    /// The fault decorator's state, shared by every reactor.
    pub fault: Option<Arc<FaultState>>,
    /// This open created the backing file: a failed start removes it again.
    pub created: bool,
}

impl OpenDevice {
    /// Open (or, for a `file`/`bbram` path that does not exist, create) a device and take its
    /// exclusive lock. An existing file is never resized.
    pub fn open(id: DeviceId, cfg: &DeviceConfig) -> Result<OpenDevice, EngineError> {
        let err = |message: String| EngineError::Device {
            device: cfg.name.clone(),
            message,
        };
        let profile = cfg.check_settings()?;
        let need_path = || {
            cfg.path
                .clone()
                .ok_or_else(|| err(format!("kind = \"{}\" needs `path`", cfg.kind.as_str())))
        };
        let need_size = || {
            cfg.size_bytes.ok_or_else(|| {
                err(format!(
                    "kind = \"{}\" needs `size_bytes`",
                    cfg.kind.as_str()
                ))
            })
        };
        let mut created = false;
        let (backend, size_bytes, path) = match cfg.kind {
            DeviceKind::Ram => {
                let size = need_size()?;
                check_new_size(size, cfg.chunk_size_bytes).map_err(err)?;
                let region = MemRegion::map(size as usize, None)
                    .map_err(|e| err(format!("cannot map {size} bytes of RAM: {e}")))?;
                (Backend::Mem(region), size, None)
            }
            DeviceKind::Null => {
                let size = need_size()?;
                check_new_size(size, cfg.chunk_size_bytes).map_err(err)?;
                (Backend::Null, size, None)
            }
            DeviceKind::Bbram => {
                let path = need_path()?;
                let backing = open_backing(&cfg.name, &path, cfg, false)?;
                created = backing.created;
                let file = backing.file;
                let size = file
                    .metadata()
                    .map_err(|e| err(format!("{}: {e}", path.display())))?
                    .len();
                let region = match file
                    .try_clone()
                    .and_then(|clone| MemRegion::map(size as usize, Some(clone)))
                {
                    Ok(r) => r,
                    Err(e) => {
                        if created {
                            remove_created(&path, &file);
                        }
                        return Err(err(format!("cannot map {}: {e}", path.display())));
                    }
                };
                drop(file);
                (Backend::Mem(region), size, Some(path))
            }
            DeviceKind::File | DeviceKind::Blockdev => {
                let path = need_path()?;
                let blockdev = cfg.kind == DeviceKind::Blockdev;
                if blockdev && cfg.size_bytes.is_some() {
                    return Err(err(
                        "a blockdev's size comes from the device; remove `size_bytes`".into(),
                    ));
                }
                let backing = open_backing(&cfg.name, &path, cfg, true)?;
                created = backing.created;
                let file = backing.file;
                let checked = (|| {
                    let meta = file
                        .metadata()
                        .map_err(|e| err(format!("{}: {e}", path.display())))?;
                    let is_blk = meta.file_type().is_block_device();
                    if blockdev != is_blk {
                        return Err(err(format!(
                            "{} is {}a block device but kind = \"{}\"",
                            path.display(),
                            if is_blk { "" } else { "not " },
                            cfg.kind.as_str()
                        )));
                    }
                    let size = if is_blk {
                        blockdev_size(&file).map_err(|e| err(format!("{}: {e}", path.display())))?
                    } else {
                        meta.len()
                    };
                    if let Some(align) = dio_alignment(&file) {
                        check_dio_alignment(align, profile.logical_block_size_bytes)
                            .map_err(|m| err(format!("{}: {m}", path.display())))?;
                    }
                    Ok(size)
                })();
                let size = match checked {
                    Ok(size) => size,
                    Err(e) => {
                        if created {
                            remove_created(&path, &file);
                        }
                        return Err(e);
                    }
                };
                (
                    Backend::Direct {
                        file: file.into(),
                        blockdev,
                    },
                    size,
                    Some(path),
                )
            }
        };
        let spec = DeviceSpec {
            id,
            name: cfg.name.clone(),
            kind: cfg.kind.as_str().into(),
            size_bytes,
            persistent: cfg.kind.persistent(),
            profile: profile.clone(),
            chunk_size_bytes: cfg.chunk_size_bytes,
            format: cfg.format,
        };
        Ok(OpenDevice {
            spec,
            path,
            backend,
            delay: cfg.emulate_profile_latency.then_some(profile),
            fault: cfg.fault.clone().map(|c| Arc::new(FaultState::new(c))),
            created,
        })
    }

    /// Synchronous access for loading metadata before the reactors start.
    pub fn sync_access(&self) -> impl SyncAccess + '_ {
        DirectAccess { dev: self }
    }

    /// The backing regular file's descriptor (file and bbram devices), for `fstat`.
    /// Whether a regular file backs this device (`file`, `bbram`): one that can be deleted
    /// while open.
    pub fn has_backing_file(&self) -> bool {
        self.regular_file_fd().is_some()
    }

    fn regular_file_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match &self.backend {
            Backend::Direct {
                file,
                blockdev: false,
            } => Some(file.as_fd()),
            Backend::Mem(m) => m._file.as_ref().map(|f| f.as_fd()),
            _ => None,
        }
    }

    /// Whether the backing file was deleted while open (`st_nlink == 0`): what is written to
    /// it from then on is gone at the next restart. None for devices without a backing file
    /// or when `fstat` fails.
    pub fn backing_file_deleted(&self) -> Option<bool> {
        let fd = self.regular_file_fd()?;
        nix::sys::stat::fstat(fd.as_raw_fd())
            .ok()
            .map(|st| st.st_nlink == 0)
    }

    /// Remove the backing file if this open created it (after a failed start), and only if
    /// the path still names the file we created.
    pub fn remove_if_created(&self) {
        let (true, Some(path)) = (self.created, &self.path) else {
            return;
        };
        let Some(fd) = self.regular_file_fd() else {
            return;
        };
        if let Ok(ours) = nix::sys::stat::fstat(fd.as_raw_fd()) {
            if let Ok(now) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::MetadataExt;
                if now.dev() == ours.st_dev && now.ino() == ours.st_ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;
    use crate::meta::Label;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn file_cfg(path: &Path, size_bytes: Option<u64>) -> DeviceConfig {
        DeviceConfig {
            name: "d0".into(),
            kind: DeviceKind::File,
            path: Some(path.to_path_buf()),
            size_bytes,
            profile: None,
            chunk_size_bytes: DEFAULT_CHUNK_SIZE_BYTES,
            format: FormatPolicy::IfBlank,
            emulate_profile_latency: false,
            fault: None,
        }
    }

    fn open_err(cfg: &DeviceConfig) -> String {
        match OpenDevice::open(DeviceId(0), cfg) {
            Ok(_) => panic!("{cfg:?} opened"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_existing_file_shorter_than_configured_is_refused_not_grown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        for have in [0u64, 30 << 10, 100 << 20] {
            std::fs::File::create(&path).unwrap().set_len(have).unwrap();
            let e = open_err(&file_cfg(&path, Some(128 << 20)));
            assert!(
                e.contains("d0")
                    && e.contains(&path.display().to_string())
                    && e.contains(&format!("is {have} bytes"))
                    && e.contains("size_bytes = 134217728")
                    && e.contains("restore"),
                "{e}"
            );
            assert_eq!(std::fs::metadata(&path).unwrap().len(), have, "never grown");
        }
    }

    #[test]
    fn too_small_sizes_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        for size in [0u64, 4096, 1 << 20] {
            let e = open_err(&file_cfg(&path, Some(size)));
            assert!(
                e.contains(&format!("size_bytes = {size} is too small"))
                    && e.contains("needs at least"),
                "{e}"
            );
            assert!(!path.exists(), "size {size} left a file behind");
        }
        let min = min_device_bytes(DEFAULT_CHUNK_SIZE_BYTES);
        assert!(Label::plan(0, min, DEFAULT_CHUNK_SIZE_BYTES).is_some());
        assert!(Label::plan(0, min - 4096, DEFAULT_CHUNK_SIZE_BYTES).is_none());
    }

    #[test]
    fn new_device_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.img");
        let d = OpenDevice::open(DeviceId(0), &file_cfg(&file, Some(8 << 20))).unwrap();
        assert!(d.created);
        let bb = dir.path().join("b.img");
        let mut cfg = file_cfg(&bb, Some(8 << 20));
        cfg.kind = DeviceKind::Bbram;
        let b = OpenDevice::open(DeviceId(1), &cfg).unwrap();
        for p in [&file, &bb] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        drop((d, b));
    }

    #[test]
    fn a_device_open_twice_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let first = OpenDevice::open(DeviceId(0), &file_cfg(&path, Some(8 << 20))).unwrap();
        let e = open_err(&file_cfg(&path, Some(8 << 20)));
        assert!(
            e.contains(&format!("is in use by pid {}", std::process::id())),
            "{e}"
        );
        let mut cfg = file_cfg(&path, None);
        cfg.kind = DeviceKind::Bbram;
        assert!(open_err(&cfg).contains("in use by pid"));
        drop(first);
        OpenDevice::open(DeviceId(0), &file_cfg(&path, Some(8 << 20))).unwrap();
    }

    #[test]
    fn probe_refuses_foreign_short_and_duplicate_devices_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("foreign.img");
        std::fs::write(&foreign, vec![0xAB; 8 << 20]).unwrap();
        let e = probe(&file_cfg(&foreign, None)).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite"), "{e}");
        let blank = dir.path().join("blank.img");
        std::fs::File::create(&blank)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let p = probe(&file_cfg(&blank, Some(64 << 20))).unwrap();
        assert!(p.capacity_bytes.unwrap() > 32 << 20);
        let e = probe(&file_cfg(&blank, Some(128 << 20)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("never grown"), "{e}");
        // A symlink and a hard link name the same device.
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&blank, &link).unwrap();
        let hard = dir.path().join("hard.img");
        std::fs::hard_link(&blank, &hard).unwrap();
        let id = |p: &Path| {
            probe(&file_cfg(p, Some(8 << 20)))
                .unwrap()
                .identity
                .unwrap()
        };
        assert!(id(&blank).same_device(&id(&link)));
        assert!(id(&blank).same_device(&id(&hard)));
        assert!(!id(&blank).same_device(&id(&foreign.with_file_name("new.img"))));
        // Nothing was created or changed.
        assert!(!dir.path().join("new.img").exists());
        assert_eq!(std::fs::metadata(&blank).unwrap().len(), 64 << 20);
    }
}
