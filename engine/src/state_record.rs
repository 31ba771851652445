//! The daemon's own record of each persistent device, kept in its state directory: the
//! device's path, label uuid and how many volumes it held. It outlives the device file, so a
//! device that comes back blank or missing (deleted, replaced by an empty file) is noticed:
//! formatting it with `format = "if-blank"` would silently drop every volume it held.
//!
//! One file per device path, `device-<hash of the path>.toml`, written atomically (a temporary
//! file, fsync, rename, fsync of the directory) with mode 0600.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the state directory remembers of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device's name in the configuration when last written.
    pub name: String,
    /// The device's path (symlinks resolved).
    pub path: PathBuf,
    /// The label's device uuid, hex.
    pub uuid: String,
    /// How many volumes the device held.
    pub volumes: u64,
}

/// Records are small; a larger file is not ours.
const MAX_RECORD_BYTES: u64 = 64 << 10;

/// `path` with symlinks resolved; for a path that does not exist (yet), its directory
/// resolved and the file name kept. The key of a device's record and of duplicate detection.
pub fn resolved_path(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// The record file for the device at `path` (already resolved).
pub fn record_file(state_dir: &Path, resolved: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in resolved.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state_dir.join(format!("device-{h:016x}.toml"))
}

/// The record for the device at `resolved`, if there is one (a record of another path that
/// happens to share the file name is ignored).
pub fn read(state_dir: &Path, resolved: &Path) -> Result<Option<(PathBuf, DeviceRecord)>, String> {
    let file = record_file(state_dir, resolved);
    let meta = match std::fs::metadata(&file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("device state record {}: {e}", file.display())),
    };
    if meta.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "device state record {} is {} bytes, larger than a record can be: remove it",
            file.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("device state record {}: {e}", file.display()))?;
    let rec: DeviceRecord = toml::from_str(&text).map_err(|e| {
        format!(
            "device state record {} is damaged ({}): remove it if the device is fine",
            file.display(),
            e.message()
        )
    })?;
    Ok((rec.path == resolved).then_some((file, rec)))
}

/// Write `rec` atomically as the record of its path.
pub fn write(state_dir: &Path, rec: &DeviceRecord) -> std::io::Result<PathBuf> {
    // Private like the token beside it: the records name every device path.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)?;
    let file = record_file(state_dir, &rec.path);
    let tmp = file.with_extension("toml.tmp");
    let text = toml::to_string(rec).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &file)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_other_paths_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let dev = resolved_path(&dir.path().join("missing.img"));
        assert!(dev.is_absolute());
        assert_eq!(read(dir.path(), &dev).unwrap(), None);
        let rec = DeviceRecord {
            name: "d0".into(),
            path: dev.clone(),
            uuid: format!("{:032x}", 7u128),
            volumes: 3,
        };
        let file = write(dir.path(), &rec).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read(dir.path(), &dev).unwrap(), Some((file.clone(), rec)));
        // A record whose path differs (a hash collision, a hand edit) is not this device's.
        let other = DeviceRecord {
            name: "d0".into(),
            path: "/elsewhere".into(),
            uuid: "0".into(),
            volumes: 1,
        };
        std::fs::write(&file, toml::to_string(&other).unwrap()).unwrap();
        assert_eq!(read(dir.path(), &dev).unwrap(), None);
        std::fs::write(&file, "garbage = [").unwrap();
        assert!(read(dir.path(), &dev).unwrap_err().contains("damaged"));
    }
}
