//! Staged write-back: a write lands in battery-backed RAM, is appended to a log device as a
//! [`record`], and is destaged in sequence order to the volume's own device. This module holds
//! the parts that touch no device yet: the log's record format and the scan recovery runs.

pub mod record;
pub mod ring;

pub use record::{
    decode_header, encode_header, record_len_bytes, scan, verify_payload, RecordError,
    RecordHeader, RecordKind, ScanStop, Scanned, LOG_BLOCK_BYTES, MAX_RECORD_PAYLOAD_BYTES,
};
pub use ring::{LogRing, Placement, RingError};
