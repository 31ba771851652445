//! Opening a device's file or block device: creation, the exclusive lock, O_DIRECT
//! alignment, and synchronous access for the loader.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::*;
use crate::error::EngineError;
use crate::loader::SyncAccess;

pub(crate) struct Backing {
    pub(crate) file: File,
    pub(crate) created: bool,
}

/// Open an existing device file or block device (never resizing it), or create a missing
/// `file`/`bbram` file (mode 0600, sparse, `size_bytes` long); then take the device's
/// exclusive lock.
pub(crate) fn open_backing(
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
pub(crate) fn remove_created(path: &Path, file: &File) {
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
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), String> {
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
pub(crate) fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

pub(crate) fn in_use_message(path: &Path, holder: Option<i32>, blockdev: bool) -> String {
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
pub(crate) fn holder_of_path(path: &Path) -> Option<i32> {
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

pub(crate) fn blockdev_size(file: &File) -> std::io::Result<u64> {
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

pub(crate) struct DirectAccess<'a> {
    pub(crate) dev: &'a OpenDevice,
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
            Backend::Mem(m) => m.read(offset_bytes, buf).map_err(std::io::Error::from),
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
            Backend::Mem(m) => m.write(offset_bytes, data).map_err(std::io::Error::from),
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
            Backend::Mem(m) => m.persist().map_err(std::io::Error::from),
            Backend::Null => Ok(()),
        }
    }
}

/// The data (non-hole) extents of an open regular file within `range`, with
/// `SEEK_DATA`/`SEEK_HOLE`; past `max_ranges` extents the rest of `range` counts as data.
pub(crate) fn data_extents(
    fd: i32,
    range: Range<u64>,
    max_ranges: usize,
) -> std::io::Result<Vec<Range<u64>>> {
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
