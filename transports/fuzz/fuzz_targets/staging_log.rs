//! Scans untrusted bytes as recovery scans a staging log: decoding never panics, every record
//! the scan accepts re-encodes to the same header block and its payload matches its
//! checksums, and the valid part ends on a block boundary within the input.
//!
//! The first byte is a mode: with bit 0 set, the first header block's checksum is recomputed
//! before the scan, so the fuzzer reaches the field checks behind it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringblock_engine::staging::*;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut log = rest.to_vec();
    if mode & 1 == 1 && log.len() >= LOG_BLOCK_BYTES {
        log[40..44].fill(0);
        let crc = crc32c::crc32c(&log[..LOG_BLOCK_BYTES]);
        log[40..44].copy_from_slice(&crc.to_le_bytes());
    }
    let _ = decode_header(&log[..log.len().min(LOG_BLOCK_BYTES)]);
    let scanned = scan(&log, 0, u64::from(mode >> 1));
    assert!(scanned.end_bytes as usize <= log.len());
    assert_eq!(scanned.end_bytes % LOG_BLOCK_BYTES as u64, 0);
    for (range, header) in &scanned.records {
        let start = range.start as usize;
        let block = &log[start..start + LOG_BLOCK_BYTES];
        assert_eq!(encode_header(header).expect("a decoded header encodes"), block);
        let payload_at = start + LOG_BLOCK_BYTES;
        let len = if header.kind == RecordKind::Write {
            header.len_bytes as usize
        } else {
            0
        };
        assert!(verify_payload(header, &log[payload_at..payload_at + len]).is_ok());
    }
});
