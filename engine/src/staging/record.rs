//! One record of the staging log, and the scan that recovery runs over a log.
//!
//! A record is one **header block** ([`LOG_BLOCK_BYTES`]) and, for a write, its payload
//! padded to whole blocks, so both the header and the data start block-aligned (the payload
//! can be written straight from the write's buffer with `O_DIRECT`):
//!
//! ```text
//! header block, little-endian:
//!   0  u32 magic "RBSL"       4  u16 version (1)     6  u8 kind        7  u8 reserved (0)
//!   8  u64 sequence number   16  u64 generation     24  u64 volume offset in bytes
//!  32  u32 length in bytes   36  u32 block checksums that follow (ceil(length / 4 KiB))
//!  40  u32 crc32c of the header block with this field zero
//!  44  20 bytes reserved (0)
//!  64  u32 crc32c of each 4 KiB block of the payload (the last one of its bytes only)
//!  ... zero to the end of the block
//! ```
//!
//! The per-block checksums travel with the data: recovery checks them before it replays a
//! record, and destage can keep them with the chunk map (end-to-end checksums). Every byte a
//! scan reads comes from a device that may hold a torn or corrupt record: decoding never
//! panics, bounds every length before using it, and a scan stops at the first record that is
//! not exactly the next one (bad magic, checksum, sequence or payload).

use std::ops::Range;

/// The log's unit: a record starts on a block boundary and fills whole blocks.
pub const LOG_BLOCK_BYTES: usize = 4096;
/// The unit of the payload's checksums.
pub const CHECKSUM_BLOCK_BYTES: usize = 4096;
const HEADER_FIXED_BYTES: usize = 64;
/// Checksums one header block holds, and so the largest payload of one record (a larger
/// write goes as several records).
pub const MAX_CHECKSUMS: usize = (LOG_BLOCK_BYTES - HEADER_FIXED_BYTES) / 4;
pub const MAX_RECORD_PAYLOAD_BYTES: usize = MAX_CHECKSUMS * CHECKSUM_BLOCK_BYTES;

const MAGIC: u32 = u32::from_le_bytes(*b"RBSL");
const VERSION: u16 = 1;
const CRC_AT: usize = 40;

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Data for `offset..+len` (the payload follows the header block).
    Write = 1,
    /// `offset..+len` reads as zeros from here on and needs no space.
    Trim = 2,
    /// `offset..+len` reads as zeros from here on.
    WriteZeroes = 3,
    /// Every record before it was acknowledged to a flush: recovery reports what it drops
    /// after the last one.
    FlushMark = 4,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::WriteZeroes,
            4 => RecordKind::FlushMark,
            _ => return None,
        })
    }

    fn has_payload(self) -> bool {
        self == RecordKind::Write
    }
}

/// A record's header, as written and as decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub seq: u64,
    pub generation: u64,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// A write's per-block checksums (empty for other kinds).
    pub block_crcs: Vec<u32>,
}

/// Why bytes are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{0} bytes is not one header block")]
    HeaderSize(usize),
    #[error("no record here (magic {0:#010x})")]
    Magic(u32),
    #[error("record version {0} is not one this build reads")]
    Version(u16),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("a {kind:?} record of {len} bytes is past the {max}-byte limit")]
    TooLong {
        kind: RecordKind,
        len: u64,
        max: usize,
    },
    #[error("{got} block checksums for a {kind:?} record of {len} bytes (want {want})")]
    Checksums {
        kind: RecordKind,
        len: u32,
        got: u32,
        want: usize,
    },
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("header checksum {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("payload is {got} bytes, the record says {want}")]
    PayloadSize { got: usize, want: usize },
    #[error("payload block {block} checksum {stored:#010x}, computed {computed:#010x}")]
    PayloadChecksum {
        block: usize,
        stored: u32,
        computed: u32,
    },
}

/// The checksums of `data`, one per 4 KiB block (the last of its bytes only).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(CHECKSUM_BLOCK_BYTES)
        .map(crc32c::crc32c)
        .collect()
}

/// Bytes the record takes in the log: its header block and its payload in whole blocks.
pub fn record_len_bytes(header: &RecordHeader) -> u64 {
    let payload = if header.kind.has_payload() {
        (header.len_bytes as usize).div_ceil(LOG_BLOCK_BYTES) * LOG_BLOCK_BYTES
    } else {
        0
    };
    (LOG_BLOCK_BYTES + payload) as u64
}

/// The header block of `header`. Fails when it cannot be one record (too long, or checksums
/// that do not match its length).
pub fn encode_header(header: &RecordHeader) -> Result<Vec<u8>, RecordError> {
    check_lengths(
        header.kind,
        header.len_bytes,
        header.block_crcs.len() as u32,
    )?;
    let mut b = vec![0u8; LOG_BLOCK_BYTES];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6] = header.kind as u8;
    b[8..16].copy_from_slice(&header.seq.to_le_bytes());
    b[16..24].copy_from_slice(&header.generation.to_le_bytes());
    b[24..32].copy_from_slice(&header.offset_bytes.to_le_bytes());
    b[32..36].copy_from_slice(&header.len_bytes.to_le_bytes());
    b[36..40].copy_from_slice(&(header.block_crcs.len() as u32).to_le_bytes());
    for (i, crc) in header.block_crcs.iter().enumerate() {
        let at = HEADER_FIXED_BYTES + 4 * i;
        b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

fn check_lengths(kind: RecordKind, len: u32, crcs: u32) -> Result<(), RecordError> {
    let want = if kind.has_payload() {
        if len as usize > MAX_RECORD_PAYLOAD_BYTES {
            return Err(RecordError::TooLong {
                kind,
                len: u64::from(len),
                max: MAX_RECORD_PAYLOAD_BYTES,
            });
        }
        (len as usize).div_ceil(CHECKSUM_BLOCK_BYTES)
    } else {
        0
    };
    if crcs as usize != want {
        return Err(RecordError::Checksums {
            kind,
            len,
            got: crcs,
            want,
        });
    }
    Ok(())
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Decode and check one header block (bytes from the log: anything may be there).
pub fn decode_header(b: &[u8]) -> Result<RecordHeader, RecordError> {
    if b.len() != LOG_BLOCK_BYTES {
        return Err(RecordError::HeaderSize(b.len()));
    }
    let magic = le32(b, 0);
    if magic != MAGIC {
        return Err(RecordError::Magic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let mut zeroed = b.to_vec();
    zeroed[CRC_AT..CRC_AT + 4].fill(0);
    let (stored, computed) = (le32(b, CRC_AT), crc32c::crc32c(&zeroed));
    if stored != computed {
        return Err(RecordError::HeaderChecksum { stored, computed });
    }
    let kind = RecordKind::from_u8(b[6]).ok_or(RecordError::Kind(b[6]))?;
    let (len_bytes, crcs) = (le32(b, 32), le32(b, 36));
    check_lengths(kind, len_bytes, crcs)?;
    let table_end = HEADER_FIXED_BYTES + 4 * crcs as usize;
    if b[7] != 0 || b[44..HEADER_FIXED_BYTES].iter().any(|&x| x != 0) {
        return Err(RecordError::Reserved);
    }
    if b[table_end..].iter().any(|&x| x != 0) {
        return Err(RecordError::Reserved);
    }
    Ok(RecordHeader {
        kind,
        seq: le64(b, 8),
        generation: le64(b, 16),
        offset_bytes: le64(b, 24),
        len_bytes,
        block_crcs: (0..crcs as usize)
            .map(|i| le32(b, HEADER_FIXED_BYTES + 4 * i))
            .collect(),
    })
}

/// Check a write's payload (its `len_bytes`, without the padding) against its checksums.
pub fn verify_payload(header: &RecordHeader, payload: &[u8]) -> Result<(), RecordError> {
    let want = if header.kind.has_payload() {
        header.len_bytes as usize
    } else {
        0
    };
    if payload.len() != want {
        return Err(RecordError::PayloadSize {
            got: payload.len(),
            want,
        });
    }
    for (block, (data, &stored)) in payload
        .chunks(CHECKSUM_BLOCK_BYTES)
        .zip(&header.block_crcs)
        .enumerate()
    {
        let computed = crc32c::crc32c(data);
        if computed != stored {
            return Err(RecordError::PayloadChecksum {
                block,
                stored,
                computed,
            });
        }
    }
    Ok(())
}

/// Why a scan stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanStop {
    /// The log ends (no room for another header block).
    End,
    /// The bytes at the end are not the next record (a torn or corrupt one, or space never
    /// written): everything from there on is discarded.
    Invalid(RecordError),
    /// A valid record with another sequence number than the next: an older lap of the log.
    Sequence { want: u64, found: u64 },
}

/// What a scan found: the valid records in order (their header and where each sits), where
/// the valid log ends, and why it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub records: Vec<(Range<u64>, RecordHeader)>,
    pub end_bytes: u64,
    pub stop: ScanStop,
}

/// Scan `log` (the log device's bytes from `start_bytes`, a block boundary) for records
/// numbered from `first_seq` on. A record counts only when its header, its sequence number
/// and every payload checksum are right; the scan stops at the first that is not.
pub fn scan(log: &[u8], start_bytes: u64, first_seq: u64) -> Scanned {
    debug_assert_eq!(
        start_bytes % LOG_BLOCK_BYTES as u64,
        0,
        "records are block-aligned"
    );
    let mut records = Vec::new();
    let mut at = start_bytes as usize;
    let mut seq = first_seq;
    let stop = loop {
        let Some(block) = log.get(at..at + LOG_BLOCK_BYTES) else {
            break ScanStop::End;
        };
        let header = match decode_header(block) {
            Ok(h) => h,
            Err(e) => break ScanStop::Invalid(e),
        };
        if header.seq != seq {
            break ScanStop::Sequence {
                want: seq,
                found: header.seq,
            };
        }
        let len = record_len_bytes(&header) as usize;
        let payload_len = if header.kind.has_payload() {
            header.len_bytes as usize
        } else {
            0
        };
        let payload_at = at + LOG_BLOCK_BYTES;
        // The whole record, padding included, lies in the log: a writer never writes one
        // across its end.
        let (Some(payload), true) = (
            log.get(payload_at..payload_at + payload_len),
            at + len <= log.len(),
        ) else {
            break ScanStop::Invalid(RecordError::PayloadSize {
                got: log.len().saturating_sub(payload_at),
                want: len - LOG_BLOCK_BYTES,
            });
        };
        if let Err(e) = verify_payload(&header, payload) {
            break ScanStop::Invalid(e);
        }
        records.push((at as u64..(at + len) as u64, header));
        at += len;
        seq += 1;
    };
    Scanned {
        records,
        end_bytes: at as u64,
        stop,
    }
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
