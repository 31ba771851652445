//! Read-only checks of a configured device: settings, sizes, identity and label.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::error::EngineError;
use crate::loader::{FormatPolicy, SyncAccess};
use crate::meta::{Label, LABEL_BYTES};

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
    let capacity_bytes = probe_label(cfg, &path, &mut file, size)?;
    Ok(DeviceProbe {
        capacity_bytes,
        identity,
    })
}

/// What an existing device's label (or its absence) means under `cfg.format`: its capacity
/// once opened, or why it is refused.
fn probe_label(
    cfg: &DeviceConfig,
    path: &Path,
    file: &mut File,
    size: u64,
) -> Result<Option<u64>, EngineError> {
    use std::io::Read;
    let err = |message: String| EngineError::Device {
        device: cfg.name.clone(),
        message,
    };
    let chunk = cfg.chunk_size_bytes;
    let planned = |size: u64| -> Result<Option<u64>, EngineError> {
        check_new_size(size, chunk).map_err(err)?;
        Ok(Label::plan(0, size, chunk).map(|l| u64::from(l.total_chunks) * chunk))
    };
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
                let mut access = ReadOnlyAccess { file: &*file };
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
    Ok(capacity_bytes)
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
