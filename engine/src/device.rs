//! Device backends: `file` and `blockdev` (O_DIRECT through io_uring), `ram` (volatile),
//! `bbram` (battery-backed RAM, emulated by a file-backed shared mapping with explicit persist
//! points), `null`, and the `delay` and `fault` wrappers (configured per device).

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::loader::{DeviceSpec, FormatPolicy, SyncAccess};
use crate::meta::{Label, LABEL_BYTES};
use crate::profile::{self, FirmwareProfile};

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
    fn check_settings(&self) -> Result<FirmwareProfile, EngineError> {
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

/// Memory behind a `ram` or `bbram` device. Reactors access disjoint chunk ranges of it.
pub struct MemRegion {
    ptr: NonNull<u8>,
    len: usize,
    /// Keeps a `bbram` backing file open.
    _file: Option<File>,
}

// SAFETY: the mapping lives as long as the region; concurrent access is to disjoint ranges
// (chunk ownership), which the reactors guarantee.
unsafe impl Send for MemRegion {}
// SAFETY: as above.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    fn map(len: usize, file: Option<File>) -> std::io::Result<Self> {
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a fresh mapping; arguments checked by the kernel; failure is MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            _file: file,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, i32> {
        let end = offset.checked_add(len as u64).ok_or(libc::EINVAL)?;
        if end > self.len as u64 {
            return Err(libc::EINVAL);
        }
        Ok(offset as usize)
    }

    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), i32> {
        let at = self.check(offset, out.len())?;
        // SAFETY: in bounds (checked); the range belongs to the caller's chunk.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), i32> {
        let at = self.check(offset, data.len())?;
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len())
        };
        Ok(())
    }

    /// Run `f` on `len` bytes of the region at `offset`, in place (no copy).
    ///
    /// # Safety
    /// Nobody else may read or write those bytes during the call: the caller is the reactor
    /// that owns the chunk holding them, calling synchronously.
    pub unsafe fn with_range<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, i32> {
        let at = self.check(offset, len)?;
        // SAFETY: in bounds (checked) of a mapping that lives as long as `self`; exclusive for
        // the duration of the call by the caller's contract.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), len) };
        Ok(f(slice))
    }

    pub fn zero(&self, offset: u64, len: u64) -> Result<(), i32> {
        let at = self.check(offset, len as usize)?;
        let len = len as usize;
        // Whole pages are given back to the kernel (thin); the edges are cleared by hand.
        let page = 4096;
        let first = at.div_ceil(page) * page;
        let last = (at + len) / page * page;
        if self._file.is_none() && last > first {
            // SAFETY: clearing edges in bounds, then dropping whole private anonymous pages in
            // bounds, which then read as zeros.
            unsafe {
                std::ptr::write_bytes(self.ptr.as_ptr().add(at), 0, first - at);
                std::ptr::write_bytes(self.ptr.as_ptr().add(last), 0, at + len - last);
                libc::madvise(
                    self.ptr.as_ptr().add(first).cast(),
                    last - first,
                    libc::MADV_DONTNEED,
                );
            }
        } else {
            // SAFETY: in bounds.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(at), 0, len) };
        }
        Ok(())
    }

    /// The persist point of `bbram`: make the mapping's contents stable.
    pub fn persist(&self) -> Result<(), i32> {
        if self._file.is_none() {
            return Ok(());
        }
        // SAFETY: the whole mapping, which we own.
        let rc = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, libc::MS_SYNC) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        }
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
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

/// The `fault` wrapper's live state.
pub struct FaultState {
    pub config: FaultConfig,
    pub writes: AtomicU64,
    pub ops: AtomicU64,
}

impl FaultState {
    /// An injected error for this op, if any.
    pub fn inject(&self, offset: u64, len: u64, is_write: bool) -> Option<i32> {
        let hits = self
            .config
            .eio_ranges
            .iter()
            .any(|[s, e]| offset < *e && *s < offset + len.max(1));
        if hits {
            return Some(libc::EIO);
        }
        if is_write && self.config.fail_every_nth_write > 0 {
            let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(self.config.fail_every_nth_write) {
                return Some(libc::EIO);
            }
        }
        None
    }

    pub fn spike_ns(&self) -> u64 {
        if self.config.spike_every_nth == 0 {
            return 0;
        }
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(self.config.spike_every_nth) {
            self.config.spike_us * 1000
        } else {
            0
        }
    }
}

/// An opened device, shared by every reactor.
pub struct OpenDevice {
    pub spec: DeviceSpec,
    pub path: Option<PathBuf>,
    pub backend: Backend,
    /// The `delay` wrapper, when emulating the profile.
    pub delay: Option<FirmwareProfile>,
    pub fault: Option<FaultState>,
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
            fault: cfg.fault.clone().map(|config| FaultState {
                config,
                writes: AtomicU64::new(0),
                ops: AtomicU64::new(0),
            }),
            created,
        })
    }

    /// Synchronous access for loading metadata before the reactors start.
    pub fn sync_access(&self) -> impl SyncAccess + '_ {
        DirectAccess { dev: self }
    }

    /// The backing regular file's descriptor (file and bbram devices), for `fstat`.
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

/// What a device is, for telling two configured devices apart: its path with symlinks
/// resolved, and for an existing file its (st_dev, st_ino) (hard links), for a block device
/// its st_rdev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub resolved: PathBuf,
    pub inode: Option<(u64, u64)>,
    pub rdev: Option<u64>,
}

impl DeviceIdentity {
    pub fn same_device(&self, other: &DeviceIdentity) -> bool {
        self.resolved == other.resolved
            || (self.inode.is_some() && self.inode == other.inode)
            || (self.rdev.is_some() && self.rdev == other.rdev)
    }
}

/// What checking a configured device, read-only, learns about it.
#[derive(Clone, Debug, Default)]
pub struct DeviceProbe {
    /// The largest volume the device can hold, when its size is known (configured, or an
    /// existing file's or block device's, or its label's).
    pub capacity_bytes: Option<u64>,
    pub identity: Option<DeviceIdentity>,
}

/// Check a configured device the way [`OpenDevice::open`] and the loader would refuse it,
/// without creating, writing or locking anything: settings, sizes, and for an existing
/// device its label (read-only).
pub fn probe(cfg: &DeviceConfig) -> Result<DeviceProbe, EngineError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let err = |message: String| EngineError::Device {
        device: cfg.name.clone(),
        message,
    };
    cfg.check_settings()?;
    let chunk = cfg.chunk_size_bytes;
    let planned = |size: u64| -> Result<Option<u64>, EngineError> {
        check_new_size(size, chunk).map_err(err)?;
        Ok(Label::plan(0, size, chunk).map(|l| u64::from(l.total_chunks) * chunk))
    };
    let path = match cfg.kind {
        DeviceKind::Ram | DeviceKind::Null => {
            let size = cfg.size_bytes.ok_or_else(|| {
                err(format!(
                    "kind = \"{}\" needs `size_bytes`",
                    cfg.kind.as_str()
                ))
            })?;
            return Ok(DeviceProbe {
                capacity_bytes: planned(size)?,
                identity: None,
            });
        }
        DeviceKind::File | DeviceKind::Bbram | DeviceKind::Blockdev => cfg
            .path
            .clone()
            .ok_or_else(|| err(format!("kind = \"{}\" needs `path`", cfg.kind.as_str())))?,
    };
    let blockdev = cfg.kind == DeviceKind::Blockdev;
    if blockdev && cfg.size_bytes.is_some() {
        return Err(err(
            "a blockdev's size comes from the device; remove `size_bytes`".into(),
        ));
    }
    let resolved = crate::state_record::resolved_path(&path);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !blockdev => {
            let size = cfg.size_bytes.ok_or_else(|| {
                err(format!(
                    "{}: does not exist (set size_bytes to create it)",
                    path.display()
                ))
            })?;
            return Ok(DeviceProbe {
                capacity_bytes: planned(size)
                    .map_err(|e| err(format!("{}: {}", path.display(), strip_device(&e))))?,
                identity: Some(DeviceIdentity {
                    resolved,
                    inode: None,
                    rdev: None,
                }),
            });
        }
        Err(e) => return Err(err(format!("{}: {e}", path.display()))),
    };
    let is_blk = meta.file_type().is_block_device();
    if blockdev != is_blk || (!is_blk && !meta.file_type().is_file()) {
        return Err(err(format!(
            "{} is {} but kind = \"{}\"",
            path.display(),
            if is_blk {
                "a block device"
            } else if meta.file_type().is_file() {
                "not a block device"
            } else {
                "neither a regular file nor a block device"
            },
            cfg.kind.as_str()
        )));
    }
    let mut file = File::open(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let size = if is_blk {
        blockdev_size(&file).map_err(|e| err(format!("{}: {e}", path.display())))?
    } else {
        meta.len()
    };
    if let (Some(want), false) = (cfg.size_bytes, is_blk) {
        if size < want {
            return Err(err(short_file_message(&path, size, want, chunk)));
        }
    }
    let identity = Some(DeviceIdentity {
        resolved,
        inode: (!is_blk).then(|| (meta.dev(), meta.ino())),
        rdev: is_blk.then(|| meta.rdev()),
    });
    if size < LABEL_BYTES {
        return Err(err(format!(
            "({}) is {size} bytes, too small to hold a ringblock label ({LABEL_BYTES} bytes); \
             refusing to format it. If it shrank (truncated), restore it from a backup",
            path.display()
        )));
    }
    let mut label = vec![0u8; LABEL_BYTES as usize];
    file.read_exact(&mut label)
        .map_err(|e| err(format!("{}: reading the label: {e}", path.display())))?;
    let capacity_bytes = match (Label::decode(&label), cfg.format) {
        (Ok(l), _) if cfg.format != FormatPolicy::Always => {
            if l.chunk_size_bytes != chunk {
                return Err(err(format!(
                    "was formatted with chunk_size_bytes = {}, configuration says {chunk}",
                    l.chunk_size_bytes
                )));
            }
            let data_end = l.data_offset_bytes + u64::from(l.total_chunks) * l.chunk_size_bytes;
            if data_end > size {
                return Err(err(format!(
                    "({}) is {size} bytes but its label says it holds {data_end}: the device \
                     shrank (a truncated file or a smaller partition). Refusing to open, resize \
                     or reformat it: restore the device's full {data_end} bytes (e.g. from a \
                     backup) and start again",
                    path.display()
                )));
            }
            Some(u64::from(l.total_chunks) * chunk)
        }
        (Err(crate::meta::MetaError::NoLabel), FormatPolicy::Never) => {
            return Err(err("has no ringblock label and format = \"never\"".into()));
        }
        (Err(crate::meta::MetaError::NoLabel), FormatPolicy::IfBlank) => {
            let capacity = planned(size)?;
            if let Some(plan) = Label::plan(0, size, chunk) {
                let mut access = ReadOnlyAccess { file: &file };
                let findings = crate::blank::find_non_blank(&mut access, size, &plan)
                    .map_err(|e| err(format!("{}: {e}", path.display())))?;
                if !findings.is_empty() {
                    return Err(err(format!(
                        "({}) {}",
                        path.display(),
                        crate::loader::not_blank_message(&findings)
                    )));
                }
            }
            capacity
        }
        (Err(e), FormatPolicy::IfBlank | FormatPolicy::Never)
            if e != crate::meta::MetaError::NoLabel =>
        {
            return Err(err(format!(
                "({}) {e}; refusing to overwrite it (set format = \"always\" to reformat)",
                path.display()
            )));
        }
        _ => planned(size)?,
    };
    Ok(DeviceProbe {
        capacity_bytes,
        identity,
    })
}

fn strip_device(e: &EngineError) -> String {
    match e {
        EngineError::Device { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Smallest and largest chunk size: a power of two between 4 KiB and 1 GiB.
pub fn check_chunk_size(chunk_size_bytes: u64) -> Result<(), String> {
    if !chunk_size_bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&chunk_size_bytes) {
        return Err(format!(
            "chunk_size_bytes = {chunk_size_bytes} must be a power of two between 4096 and 1 GiB"
        ));
    }
    Ok(())
}

/// The smallest device that holds the label, two metadata slots and one chunk.
pub fn min_device_bytes(chunk_size_bytes: u64) -> u64 {
    // Data starts on a chunk boundary, so the smallest fit is a whole number of chunks; the
    // slots are tens of KiB, so a few steps find it even for 4 KiB chunks.
    (1..=1u64 << 16)
        .map(|k| k * chunk_size_bytes)
        .find(|&size| Label::plan(0, size, chunk_size_bytes).is_some())
        .unwrap_or(u64::MAX)
}

/// Whether a device of `size_bytes` that is yet to be made (a new file, RAM) can hold the
/// label, two metadata slots and one chunk.
pub fn check_new_size(size_bytes: u64, chunk_size_bytes: u64) -> Result<(), String> {
    check_chunk_size(chunk_size_bytes)?;
    if Label::plan(0, size_bytes, chunk_size_bytes).is_none() {
        return Err(format!(
            "size_bytes = {size_bytes} is too small: with chunk_size_bytes = {chunk_size_bytes} \
             a device needs at least {} bytes (a 4 KiB label, two metadata slots and one chunk)",
            min_device_bytes(chunk_size_bytes)
        ));
    }
    Ok(())
}

/// Why an existing regular file shorter than the configured size is refused.
pub fn short_file_message(
    path: &Path,
    have_bytes: u64,
    want_bytes: u64,
    chunk_size_bytes: u64,
) -> String {
    let resize = if have_bytes >= min_device_bytes(chunk_size_bytes) {
        format!("; if {have_bytes} bytes is what you want, set size_bytes = {have_bytes}")
    } else {
        String::new()
    };
    format!(
        "({}) is {have_bytes} bytes but size_bytes = {want_bytes}: an existing device file \
         is never grown or reformatted. If it shrank (truncated, or copied short), restore it \
         from a backup{resize}",
        path.display()
    )
}

struct Backing {
    file: File,
    created: bool,
}

/// Open an existing device file or block device (never resizing it), or create a missing
/// `file`/`bbram` file (mode 0600, sparse, `size_bytes` long); then take the device's
/// exclusive lock.
fn open_backing(
    device: &str,
    path: &Path,
    cfg: &DeviceConfig,
    direct: bool,
) -> Result<Backing, EngineError> {
    let err = |message: String| EngineError::Device {
        device: device.into(),
        message,
    };
    let blockdev = cfg.kind == DeviceKind::Blockdev;
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    let mut flags = 0;
    if direct {
        flags |= libc::O_DIRECT;
    }
    if blockdev {
        // Without O_CREAT, O_EXCL on a block device fails with EBUSY while anyone else holds
        // it exclusively (a mounted file system, another O_EXCL opener).
        flags |= libc::O_EXCL;
    }
    opts.custom_flags(flags);
    let mut opened = opts.open(path);
    if blockdev {
        // A daemon that just exited may hold the device a moment longer (its io_uring's
        // registered files): wait for that, bounded, unless a live holder is known.
        for _ in 0..LOCK_RELEASE_WAIT_MS / LOCK_RETRY_MS {
            match &opened {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let holder = holder_of_path(path);
                    if holder.is_some_and(process_alive)
                        && holder != Some(std::process::id() as i32)
                    {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_MS));
                    opened = opts.open(path);
                }
                _ => break,
            }
        }
    }
    let (file, created) = match opened {
        Ok(f) => {
            let meta = f
                .metadata()
                .map_err(|e| err(format!("{}: {e}", path.display())))?;
            if let (Some(want), true) = (cfg.size_bytes, meta.file_type().is_file()) {
                if meta.len() < want {
                    return Err(err(short_file_message(
                        path,
                        meta.len(),
                        want,
                        cfg.chunk_size_bytes,
                    )));
                }
            }
            (f, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !blockdev => {
            let Some(size) = cfg.size_bytes else {
                return Err(err(format!(
                    "{}: does not exist (set size_bytes to create it)",
                    path.display()
                )));
            };
            check_new_size(size, cfg.chunk_size_bytes)
                .map_err(|m| err(format!("{}: {m}", path.display())))?;
            let f = opts
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(format!("{}: cannot create: {e}", path.display())))?;
            if let Err(e) = f.set_len(size) {
                remove_created(path, &f);
                return Err(err(format!(
                    "{}: cannot size to {size} bytes: {e}",
                    path.display()
                )));
            }
            (f, true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && blockdev => {
            let holder = holder_of_path(path);
            return Err(err(in_use_message(path, holder, true)));
        }
        Err(e) => return Err(err(format!("{}: {e}", path.display()))),
    };
    if let Err(m) = lock_exclusive(&file, path) {
        if created {
            remove_created(path, &file);
        }
        return Err(err(m));
    }
    Ok(Backing { file, created })
}

/// Remove `path` if it still names `file` (which we created).
fn remove_created(path: &Path, file: &File) {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(ours), Ok(now)) = (file.metadata(), std::fs::symlink_metadata(path)) {
        if ours.dev() == now.dev() && ours.ino() == now.ino() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How long to wait for the lock of a holder that has exited (or of an engine of this process
/// that is stopping): an io_uring holds its registered files a little past its owner's end,
/// and the lock with them.
const LOCK_RELEASE_WAIT_MS: u64 = 5000;
const LOCK_RETRY_MS: u64 = 50;

/// Take an exclusive `flock` on the open file: a second daemon (or a second device entry)
/// on the same file is refused. The lock belongs to the open file description, so it lasts
/// as long as the device is open and goes away with the process.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut holder = None;
    for _ in 0..=LOCK_RELEASE_WAIT_MS / LOCK_RETRY_MS {
        // SAFETY: flock on a valid fd; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(format!("{}: cannot lock: {e}", path.display()));
        }
        holder = file
            .metadata()
            .ok()
            .and_then(|m| lock_holder(m.dev(), m.ino()));
        // Our own pid: an engine of this process that is still shutting down (a duplicate
        // [[device]] is refused before anything is opened), so wait for it as well.
        let own = holder == Some(std::process::id() as i32);
        if holder.is_some_and(process_alive) && !own {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(LOCK_RETRY_MS));
    }
    Err(in_use_message(path, holder, false))
}

/// Whether `pid` is a live process (not gone, not a zombie whose files are closed).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

fn in_use_message(path: &Path, holder: Option<i32>, blockdev: bool) -> String {
    let who = match holder {
        Some(pid) => format!("pid {pid}"),
        None if blockdev => {
            "another process (it is mounted or open exclusively; its pid could not be found)".into()
        }
        None => "another process (its pid could not be found)".into(),
    };
    format!(
        "({}) is in use by {who}: two users of one device corrupt each other's data. Stop \
         the other daemon (or remove the duplicate [[device]]) first",
        path.display()
    )
}

/// The pid holding a lock on the file at `path`, if any can be found.
fn holder_of_path(path: &Path) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    lock_holder(m.dev(), m.ino())
}

/// The pid of a process holding a lock on inode (`dev`, `ino`), from `/proc/locks`
/// (`N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END`, major and minor in hex). OFD locks
/// show pid -1: those are skipped.
pub fn lock_holder(dev: u64, ino: u64) -> Option<i32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    text.lines().filter(|l| !l.contains("->")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let pid: i32 = f.get(4)?.parse().ok()?;
        (f.get(5) == Some(&want.as_str()) && pid > 0).then_some(pid)
    })
}

/// What O_DIRECT IO on a file needs, as the kernel reports it (`statx` with
/// `STATX_DIOALIGN`, Linux 6.1+ on file systems and block devices that tell).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlignment {
    /// Alignment of user memory; 0 = O_DIRECT is not supported on this file.
    pub mem_bytes: u32,
    /// Alignment of file offsets and lengths; 0 = not supported.
    pub offset_bytes: u32,
}

/// The file's O_DIRECT alignment, or None when the kernel or file system does not report it.
pub fn dio_alignment(file: &File) -> Option<DioAlignment> {
    // SAFETY: statx is plain old data; all-zero is a valid value for the kernel to overwrite.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd, an empty path with AT_EMPTY_PATH (the fd itself), and a buffer the
    // kernel fills.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some(DioAlignment {
        mem_bytes: stx.stx_dio_mem_align,
        offset_bytes: stx.stx_dio_offset_align,
    })
}

/// Whether IO at the profile's logical block size, from our 4096-byte-aligned buffers, meets
/// the file's O_DIRECT alignment; else what to change.
pub fn check_dio_alignment(align: DioAlignment, logical_block_bytes: u32) -> Result<(), String> {
    if align.mem_bytes == 0 || align.offset_bytes == 0 {
        return Err("the file system does not support O_DIRECT on this file".into());
    }
    if align.offset_bytes > logical_block_bytes {
        return Err(format!(
            "O_DIRECT needs offsets aligned to {} bytes, but the profile's \
             logical_block_size_bytes is {logical_block_bytes}: use a profile with \
             logical_block_size_bytes >= {}",
            align.offset_bytes, align.offset_bytes
        ));
    }
    if align.mem_bytes as usize > crate::buf::BUF_ALIGN_BYTES {
        return Err(format!(
            "O_DIRECT needs memory aligned to {} bytes; ringblock aligns buffers to {}",
            align.mem_bytes,
            crate::buf::BUF_ALIGN_BYTES
        ));
    }
    Ok(())
}

fn blockdev_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

struct DirectAccess<'a> {
    dev: &'a OpenDevice,
}

impl SyncAccess for DirectAccess<'_> {
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match &self.dev.backend {
            Backend::Direct { file, .. } => {
                // O_DIRECT needs aligned memory: bounce through an aligned buffer.
                let mut tmp = crate::buf::AlignedBuf::zeroed(buf.len());
                let n = nix::sys::uio::pread(file, tmp.as_mut_slice(), offset_bytes as i64)?;
                if n != buf.len() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "short read",
                    ));
                }
                buf.copy_from_slice(tmp.as_slice());
                Ok(())
            }
            Backend::Mem(m) => m
                .read(offset_bytes, buf)
                .map_err(std::io::Error::from_raw_os_error),
            Backend::Null => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> std::io::Result<()> {
        match &self.dev.backend {
            Backend::Direct { file, .. } => {
                let tmp = crate::buf::AlignedBuf::from_slice(data);
                let n = nix::sys::uio::pwrite(file, tmp.as_slice(), offset_bytes as i64)?;
                if n != data.len() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "short write",
                    ));
                }
                Ok(())
            }
            Backend::Mem(m) => m
                .write(offset_bytes, data)
                .map_err(std::io::Error::from_raw_os_error),
            Backend::Null => Ok(()),
        }
    }

    fn allocated_ranges(
        &mut self,
        range: Range<u64>,
        max_ranges: usize,
    ) -> std::io::Result<Option<Vec<Range<u64>>>> {
        match self.dev.regular_file_fd() {
            Some(fd) => data_extents(fd.as_raw_fd(), range, max_ranges).map(Some),
            None => Ok(None),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match &self.dev.backend {
            Backend::Direct { file, .. } => {
                nix::unistd::fdatasync(file.as_raw_fd()).map_err(std::io::Error::from)
            }
            Backend::Mem(m) => m.persist().map_err(std::io::Error::from_raw_os_error),
            Backend::Null => Ok(()),
        }
    }
}

/// Reads through a plain read-only descriptor, for checking a configuration.
struct ReadOnlyAccess<'a> {
    file: &'a File,
}

impl SyncAccess for ReadOnlyAccess<'_> {
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset_bytes)
    }

    fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only access"))
    }

    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn allocated_ranges(
        &mut self,
        range: Range<u64>,
        max_ranges: usize,
    ) -> std::io::Result<Option<Vec<Range<u64>>>> {
        if !self.file.metadata()?.file_type().is_file() {
            return Ok(None);
        }
        data_extents(self.file.as_raw_fd(), range, max_ranges).map(Some)
    }
}

/// The data (non-hole) extents of an open regular file within `range`, with
/// `SEEK_DATA`/`SEEK_HOLE`; past `max_ranges` extents the rest of `range` counts as data.
fn data_extents(fd: i32, range: Range<u64>, max_ranges: usize) -> std::io::Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        if out.len() == max_ranges {
            out.push(pos..range.end);
            break;
        }
        // SAFETY: lseek on a valid fd moves only that description's offset, which nothing
        // else uses (all IO on it is positioned).
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data at or after `pos`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= range.end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(range.end);
        out.push(data..hole);
        pos = hole;
    }
    Ok(out)
}

/// Ranges of a device's bytes, for fault configuration from code.
pub fn eio_range(range: Range<u64>) -> [u64; 2] {
    [range.start, range.end]
}

#[cfg(test)]
mod dio_tests {
    use super::*;

    #[test]
    fn alignment_checks() {
        let a = |mem_bytes, offset_bytes| DioAlignment {
            mem_bytes,
            offset_bytes,
        };
        assert_eq!(check_dio_alignment(a(512, 512), 512), Ok(()));
        assert_eq!(check_dio_alignment(a(4, 512), 4096), Ok(()));
        let e = check_dio_alignment(a(512, 4096), 512).unwrap_err();
        assert!(
            e.contains("aligned to 4096") && e.contains(">= 4096"),
            "{e}"
        );
        let e = check_dio_alignment(a(8192, 512), 4096).unwrap_err();
        assert!(e.contains("memory aligned to 8192"), "{e}");
        let e = check_dio_alignment(a(0, 0), 4096).unwrap_err();
        assert!(e.contains("does not support O_DIRECT"), "{e}");
    }

    #[test]
    fn a_real_file_reports_its_alignment_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        // Kernels before 6.1, and file systems that do not say, report nothing: then the
        // device opens as before. Where it is reported, 4096-byte blocks from 4096-byte
        // aligned memory must pass (every built-in profile uses them).
        if let Some(align) = dio_alignment(&f) {
            assert!(align.offset_bytes.is_power_of_two(), "{align:?}");
            assert_eq!(check_dio_alignment(align, 4096), Ok(()), "{align:?}");
        }
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
