//! The control path: `/dev/ublk-control` driven through a small private io_uring with 128-byte
//! SQEs, one command at a time, blocking. Runs on the caller's thread (daemon start-up, the API),
//! never on a reactor: commands like START_DEV wait for the queues, which the reactors serve.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ringblock_engine::Errno;

use super::sys::{self, CtrlCmd, DevInfo, Params};
use super::UblkError;

pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// How long one control command may take before it is cancelled (START_DEV and
/// END_USER_RECOVERY wait for every queue to fetch; TCG guests are slow).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT_SLICE: Duration = Duration::from_millis(100);
const CANCEL_TAG: u64 = u64::MAX;

pub struct Control {
    fd: OwnedFd,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

/// A control command failed: which one and the errno.
fn cmd_err(what: &'static str, dev_id: u32, errno: Errno) -> UblkError {
    UblkError::Command {
        what,
        dev_id,
        errno,
    }
}

impl Control {
    /// Open `/dev/ublk-control` and a private ring for it.
    pub fn open() -> Result<Control, UblkError> {
        let path = std::ffi::CString::new(CONTROL_PATH).expect("no NUL");
        // SAFETY: plain open(2) of a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    UblkError::NoDriver(format!(
                        "{CONTROL_PATH} is missing: the ublk_drv kernel module is not loaded (modprobe ublk_drv; needs Linux 6.0+, recovery 6.0+)"
                    ))
                }
                Some(libc::EACCES) | Some(libc::EPERM) => UblkError::NoDriver(format!(
                    "{CONTROL_PATH}: permission denied (ublk needs root / CAP_SYS_ADMIN)"
                )),
                _ => UblkError::Io(format!("open {CONTROL_PATH}: {e}")),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|e| UblkError::Io(format!("io_uring for ublk control: {e}")))?;
        Ok(Control { fd, ring })
    }

    /// Run one command; returns the CQE result (>= 0) or the errno. `buf` is what `addr`
    /// points to (must stay valid: it is borrowed for the whole call).
    fn run(&mut self, op: u32, cmd: CtrlCmd, buf: Option<&mut [u8]>) -> Result<i32, Errno> {
        self.run_watched(op, cmd, buf, &|| false)
    }

    /// [`Control::run`], giving up (cancelling the command) as soon as `give_up` says so.
    fn run_watched(
        &mut self,
        op: u32,
        mut cmd: CtrlCmd,
        buf: Option<&mut [u8]>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<i32, Errno> {
        if let Some(b) = buf {
            cmd.addr = b.as_mut_ptr() as u64;
            cmd.len = b.len() as u16;
        }
        let entry = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), op)
            .cmd(cmd.to_bytes())
            .build()
            .user_data(0);
        // SAFETY: the command's buffer (if any) is borrowed by this call, which only returns
        // once the command completed (or was cancelled and its completion reaped).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| Errno(libc::EBUSY))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut cancelled = false;
        // Bounded: each round waits at most WAIT_SLICE, and after the deadline the command is
        // cancelled (io_uring interrupts the worker that waits in the driver).
        loop {
            let ts = types::Timespec::from(WAIT_SLICE);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
                Err(e) => return Err(Errno(e.raw_os_error().unwrap_or(libc::EIO))),
            }
            let mut result = None;
            for cqe in self.ring.completion() {
                if cqe.user_data() == 0 {
                    result = Some(cqe.result());
                }
            }
            if let Some(r) = result {
                return if r < 0 { Err(Errno(-r)) } else { Ok(r) };
            }
            if !cancelled && (Instant::now() >= deadline || give_up()) {
                let cancel = opcode::AsyncCancel::new(0).build().user_data(CANCEL_TAG);
                // SAFETY: the cancel carries no buffers.
                let _ = unsafe { self.ring.submission().push(&cancel.into()) };
                cancelled = true;
            }
        }
    }

    fn dev_cmd(dev_id: u32) -> CtrlCmd {
        CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        }
    }

    /// Features the driver supports (UBLK_U_CMD_GET_FEATURES, Linux 6.5+).
    pub fn features(&mut self) -> Result<u64, UblkError> {
        let mut out = [0u8; 8];
        self.run(
            sys::UBLK_U_CMD_GET_FEATURES,
            Self::dev_cmd(u32::MAX),
            Some(&mut out),
        )
        .map_err(|e| cmd_err("GET_FEATURES", u32::MAX, e))?;
        Ok(u64::from_ne_bytes(out))
    }

    /// Add a device; `info` comes back with the id and the flags the driver granted.
    pub fn add_dev(&mut self, info: &mut DevInfo) -> Result<(), UblkError> {
        let mut cmd = Self::dev_cmd(info.dev_id);
        cmd.queue_id = u16::MAX;
        self.run(sys::UBLK_U_CMD_ADD_DEV, cmd, Some(as_bytes_mut(info)))
            .map_err(|e| cmd_err("ADD_DEV", info.dev_id, e))?;
        Ok(())
    }

    pub fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo, UblkError> {
        let mut info = DevInfo::default();
        self.run(
            sys::UBLK_U_CMD_GET_DEV_INFO,
            Self::dev_cmd(dev_id),
            Some(as_bytes_mut(&mut info)),
        )
        .map_err(|e| cmd_err("GET_DEV_INFO", dev_id, e))?;
        Ok(info)
    }

    pub fn set_params(&mut self, dev_id: u32, params: &mut Params) -> Result<(), UblkError> {
        params.len = std::mem::size_of::<Params>() as u32;
        self.run(
            sys::UBLK_U_CMD_SET_PARAMS,
            Self::dev_cmd(dev_id),
            Some(as_bytes_mut(params)),
        )
        .map_err(|e| cmd_err("SET_PARAMS", dev_id, e))?;
        Ok(())
    }

    pub fn params(&mut self, dev_id: u32) -> Result<Params, UblkError> {
        let mut params = Params {
            len: std::mem::size_of::<Params>() as u32,
            ..Params::default()
        };
        self.run(
            sys::UBLK_U_CMD_GET_PARAMS,
            Self::dev_cmd(dev_id),
            Some(as_bytes_mut(&mut params)),
        )
        .map_err(|e| cmd_err("GET_PARAMS", dev_id, e))?;
        Ok(params)
    }

    /// Waits until every queue fetched all its tags, then creates `/dev/ublkbN`.
    pub fn start_dev(
        &mut self,
        dev_id: u32,
        pid: i32,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), UblkError> {
        let mut cmd = Self::dev_cmd(dev_id);
        cmd.data[0] = pid as u64;
        self.run_watched(sys::UBLK_U_CMD_START_DEV, cmd, None, give_up)
            .map_err(|e| cmd_err("START_DEV", dev_id, e))?;
        Ok(())
    }

    /// Removes `/dev/ublkbN` (waits for its IO) and aborts the queues' fetches.
    pub fn stop_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.run(sys::UBLK_U_CMD_STOP_DEV, Self::dev_cmd(dev_id), None)
            .map_err(|e| cmd_err("STOP_DEV", dev_id, e))?;
        Ok(())
    }

    /// Deletes the device; waits until `/dev/ublkcN` is closed by everyone.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.run(sys::UBLK_U_CMD_DEL_DEV, Self::dev_cmd(dev_id), None)
            .map_err(|e| cmd_err("DEL_DEV", dev_id, e))?;
        Ok(())
    }

    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.run(
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            Self::dev_cmd(dev_id),
            None,
        )
        .map_err(|e| cmd_err("START_USER_RECOVERY", dev_id, e))?;
        Ok(())
    }

    /// Waits until every queue fetched all its tags, then un-quiesces the device.
    pub fn end_user_recovery(
        &mut self,
        dev_id: u32,
        pid: i32,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), UblkError> {
        let mut cmd = Self::dev_cmd(dev_id);
        cmd.data[0] = pid as u64;
        self.run_watched(sys::UBLK_U_CMD_END_USER_RECOVERY, cmd, None, give_up)
            .map_err(|e| cmd_err("END_USER_RECOVERY", dev_id, e))?;
        Ok(())
    }
}

/// The bytes of a plain-old-data UAPI struct, for the kernel to read or fill.
fn as_bytes_mut<T: Copy>(v: &mut T) -> &mut [u8] {
    // SAFETY: T is one of the #[repr(C)] UAPI structs: plain integers, any byte pattern valid.
    unsafe { std::slice::from_raw_parts_mut((v as *mut T).cast::<u8>(), std::mem::size_of::<T>()) }
}
