//! The ublk UAPI (`include/uapi/linux/ublk_cmd.h`), the subset ringblock uses, written out by
//! hand. Layouts are `#[repr(C)]` and checked against the kernel's sizes at compile time.
//!
//! Control commands go to `/dev/ublk-control` as `IORING_OP_URING_CMD` on a ring with 128-byte
//! SQEs (the 32-byte [`CtrlCmd`] rides in the SQE's command area); IO commands go to
//! `/dev/ublkcN` on any ring (the 16-byte [`IoCmd`] fits a normal 64-byte SQE).

/// `_IOC(dir, 'u', nr, size)` as the kernel encodes it on x86/arm64/riscv.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn ior(nr: u32, size: u32) -> u32 {
    ioc(IOC_READ, nr, size)
}
const fn iowr(nr: u32, size: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

const CTRL: u32 = std::mem::size_of::<CtrlCmd>() as u32;
const IO: u32 = std::mem::size_of::<IoCmd>() as u32;

// Control commands (ioctl-encoded, the only form new kernels accept for sure).
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(0x04, CTRL);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(0x05, CTRL);
pub const UBLK_U_CMD_START_DEV: u32 = iowr(0x06, CTRL);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(0x07, CTRL);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(0x08, CTRL);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(0x09, CTRL);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(0x13, CTRL);

// IO commands.
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr(0x20, IO);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO);

/// Result of a fetch: a request is waiting in the tag's descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// Result of a fetch when the device is stopping (or the queue is being torn down): no re-fetch.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

pub const UBLKSRV_CMD_BUF_OFFSET: i64 = 0;
/// USER_COPY: file position on `/dev/ublkcN` where requests' data starts (`pread`/`pwrite`).
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
/// USER_COPY position layout: the byte offset in the request takes the low 25 bits, the tag
/// the next 16, the queue id the 12 above (`UBLK_IO_BUF_BITS`, `UBLK_TAG_OFF`/`_BITS`,
/// `UBLK_QID_OFF`/`_BITS` of the 6.12 header).
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
pub const UBLK_QID_BITS: u32 = 12;
pub const UBLK_MAX_QUEUE_DEPTH: u32 = 4096;
/// Largest single IO buffer the driver accepts (`1 << UBLK_IO_BUF_BITS`).
pub const UBLK_IO_BUF_MAX_BYTES: u32 = 1 << 25;
pub const UBLK_MAX_NR_QUEUES: u32 = 4096;

// Feature flags (`ublksrv_ctrl_dev_info.flags`, and what GET_FEATURES reports).
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;

/// Names of the feature bits, for `doctor` and logs.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (UBLK_F_QUIESCE, "QUIESCE"),
    (UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
];

/// The names of the bits set in `flags` (unknown bits as `bitN`).
pub fn feature_names(flags: u64) -> Vec<String> {
    (0..64)
        .filter(|b| flags & (1u64 << b) != 0)
        .map(|b| {
            FEATURE_NAMES
                .iter()
                .find(|(f, _)| *f == 1u64 << b)
                .map_or_else(|| format!("bit{b}"), |(_, n)| (*n).to_string())
        })
        .collect()
}

// Device states (`ublksrv_ctrl_dev_info.state`).
pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

pub fn state_name(state: u16) -> &'static str {
    match state {
        UBLK_S_DEV_DEAD => "dead",
        UBLK_S_DEV_LIVE => "live",
        UBLK_S_DEV_QUIESCED => "quiesced",
        UBLK_S_DEV_FAIL_IO => "fail_io",
        _ => "unknown",
    }
}

// IO operations and flags (`ublksrv_io_desc.op_flags`: op in bits 0-7, flags above).
pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;

pub const UBLK_IO_F_FUA: u32 = 1 << 13;

// Parameters.
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// `struct ublksrv_ctrl_cmd`: the payload of a control command.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// `u16::MAX` when the command is not for one queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// Ours: the driver stores it and hands it back; we mark our devices with it.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, written by the driver into the queue's shared array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
    pub fn flags(&self) -> u32 {
        self.op_flags & !0xff
    }
}

/// `struct ublksrv_io_cmd`: payload of FETCH_REQ / COMMIT_AND_FETCH_REQ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    /// COMMIT: bytes done, or -errno.
    pub result: i32,
    /// The tag's buffer in our address space (the driver copies data to/from it).
    pub addr: u64,
}

impl IoCmd {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

impl CtrlCmd {
    pub fn to_bytes(self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_params` as of 6.12 (basic, discard, devt, zoned). Newer kernels append more
/// types; the driver copies `min(len, its size)`, so this prefix works on both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
}

/// Bytes of a queue's descriptor array the driver lets us map (depth descriptors, page-rounded).
pub fn cmd_buf_bytes(depth: u16, page_bytes: usize) -> usize {
    (usize::from(depth) * std::mem::size_of::<IoDesc>()).div_ceil(page_bytes) * page_bytes
}

/// mmap offset of queue `q`'s descriptor array on `/dev/ublkcN`: each queue gets room for
/// [`UBLK_MAX_QUEUE_DEPTH`] descriptors, page-rounded.
pub fn cmd_buf_offset(q: u16, page_bytes: usize) -> i64 {
    let per_queue = (UBLK_MAX_QUEUE_DEPTH as usize * std::mem::size_of::<IoDesc>())
        .div_ceil(page_bytes)
        * page_bytes;
    UBLKSRV_CMD_BUF_OFFSET + (usize::from(q) * per_queue) as i64
}

/// USER_COPY: the `/dev/ublkcN` file position of byte `offset` of request (`q_id`, `tag`).
/// `None` when a field does not fit its bits (the driver would read another request).
pub fn user_copy_pos(q_id: u16, tag: u16, offset: u64) -> Option<u64> {
    if u32::from(q_id) >> UBLK_QID_BITS != 0 || offset >> UBLK_IO_BUF_BITS != 0 {
        return None;
    }
    Some(
        UBLKSRV_IO_BUF_OFFSET
            + (u64::from(q_id) << UBLK_QID_OFF)
            + (u64::from(tag) << UBLK_TAG_OFF)
            + offset,
    )
}

// The layouts match the kernel's (sizes and offsets from <linux/ublk_cmd.h>, x86_64): a
// mismatch fails the build.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<CtrlCmd>() == 32);
    assert!(size_of::<DevInfo>() == 64);
    assert!(size_of::<IoDesc>() == 24);
    assert!(size_of::<IoCmd>() == 16);
    assert!(size_of::<ParamBasic>() == 32);
    assert!(size_of::<ParamDiscard>() == 20);
    assert!(size_of::<ParamDevt>() == 16);
    assert!(size_of::<ParamZoned>() == 32);
    assert!(size_of::<Params>() == 112);
    assert!(offset_of!(Params, discard) == 40);
    assert!(offset_of!(DevInfo, flags) == 24);
    assert!(offset_of!(DevInfo, ublksrv_flags) == 32);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_encodings_match_the_kernel() {
        // Values from a C program including <linux/ublk_cmd.h> (x86_64).
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn mmap_offsets() {
        assert_eq!(cmd_buf_offset(0, 4096), 0);
        assert_eq!(cmd_buf_offset(1, 4096), 4096 * 24);
        assert_eq!(cmd_buf_bytes(128, 4096), 4096);
        assert_eq!(cmd_buf_bytes(256, 4096), 8192);
    }

    #[test]
    fn user_copy_positions() {
        // ublk_pos_to_hwq/tag/buf_off of the 6.12 driver, inverted.
        assert_eq!(user_copy_pos(0, 0, 0), Some(0x8000_0000));
        assert_eq!(user_copy_pos(0, 1, 0), Some(0x8000_0000 + (1 << 25)));
        assert_eq!(user_copy_pos(1, 0, 0), Some(0x8000_0000 + (1 << 41)));
        assert_eq!(
            user_copy_pos(3, 127, 4096),
            Some(0x8000_0000 + (3 << 41) + (127 << 25) + 4096)
        );
        let max = user_copy_pos(4095, u16::MAX, (1 << 25) - 1).unwrap();
        assert!(max < i64::MAX as u64, "fits pread's off_t");
        assert_eq!(user_copy_pos(4096, 0, 0), None);
        assert_eq!(user_copy_pos(0, 0, 1 << 25), None);
    }

    #[test]
    fn names() {
        assert_eq!(
            feature_names(UBLK_F_USER_RECOVERY | (1 << 40)),
            vec!["USER_RECOVERY".to_string(), "bit40".to_string()]
        );
    }
}
