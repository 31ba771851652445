use super::*;
use proptest::prelude::*;

/// A log of `writes` (offset, data) as records numbered from `first_seq`, and their headers.
fn log_of(writes: &[(u64, Vec<u8>)], first_seq: u64) -> (Vec<u8>, Vec<RecordHeader>) {
    let mut log = Vec::new();
    let mut headers = Vec::new();
    for (i, (offset, data)) in writes.iter().enumerate() {
        let header = RecordHeader {
            kind: RecordKind::Write,
            seq: first_seq + i as u64,
            generation: 9,
            offset_bytes: *offset,
            len_bytes: data.len() as u32,
            block_crcs: block_crcs(data),
        };
        log.extend(encode_header(&header).unwrap());
        let mut padded = data.clone();
        padded.resize(data.len().div_ceil(LOG_BLOCK_BYTES) * LOG_BLOCK_BYTES, 0);
        log.extend(padded);
        assert_eq!(
            log.len() as u64 % LOG_BLOCK_BYTES as u64,
            0,
            "records fill whole blocks"
        );
        headers.push(header);
    }
    (log, headers)
}

fn writes() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    prop::collection::vec(
        (
            0u64..1 << 30,
            prop::collection::vec(any::<u8>(), 1..3 * CHECKSUM_BLOCK_BYTES),
        ),
        1..6,
    )
}

#[test]
fn every_kind_round_trips_and_lengths_are_checked() {
    for kind in [
        RecordKind::Write,
        RecordKind::Trim,
        RecordKind::WriteZeroes,
        RecordKind::FlushMark,
    ] {
        let data = vec![7u8; 5000];
        let header = RecordHeader {
            kind,
            seq: 3,
            generation: 1,
            offset_bytes: 1 << 20,
            len_bytes: if kind == RecordKind::FlushMark {
                0
            } else {
                5000
            },
            block_crcs: if kind == RecordKind::Write {
                block_crcs(&data)
            } else {
                Vec::new()
            },
        };
        let block = encode_header(&header).unwrap();
        assert_eq!(decode_header(&block), Ok(header.clone()));
        let want = if kind == RecordKind::Write { 3 } else { 1 };
        assert_eq!(record_len_bytes(&header), want * LOG_BLOCK_BYTES as u64);
    }
    let too_long = RecordHeader {
        kind: RecordKind::Write,
        seq: 0,
        generation: 0,
        offset_bytes: 0,
        len_bytes: MAX_RECORD_PAYLOAD_BYTES as u32 + 1,
        block_crcs: vec![0; MAX_CHECKSUMS + 1],
    };
    assert!(matches!(
        encode_header(&too_long),
        Err(RecordError::TooLong { .. })
    ));
    let wrong_count = RecordHeader {
        block_crcs: vec![0; 2],
        len_bytes: 100,
        ..too_long
    };
    assert!(matches!(
        encode_header(&wrong_count),
        Err(RecordError::Checksums {
            want: 1,
            got: 2,
            ..
        })
    ));
}

#[test]
fn a_scan_stops_at_a_torn_payload_a_stale_lap_and_the_end() {
    let data: Vec<(u64, Vec<u8>)> = (0..4u64)
        .map(|i| (i << 20, vec![i as u8 + 1; 6000]))
        .collect();
    let (log, headers) = log_of(&data, 10);
    let whole = scan(&log, 0, 10);
    assert_eq!(whole.stop, ScanStop::End);
    assert_eq!(whole.end_bytes, log.len() as u64);
    let got: Vec<_> = whole.records.iter().map(|(_, h)| h.clone()).collect();
    assert_eq!(got, headers);
    // A byte of record 2's payload flipped: records 0 and 1 stand, the log ends before 2.
    let mut torn = log.clone();
    let at = whole.records[2].0.start as usize + LOG_BLOCK_BYTES + 4100;
    torn[at] ^= 0x40;
    let s = scan(&torn, 0, 10);
    assert_eq!(s.records.len(), 2);
    assert_eq!(s.end_bytes, whole.records[2].0.start);
    assert!(matches!(
        s.stop,
        ScanStop::Invalid(RecordError::PayloadChecksum { block: 1, .. })
    ));
    // Record 3 is a lap older (another sequence number): the log ends before it.
    let (stale, _) = log_of(&data[3..], 2);
    let mut lapped = log[..whole.records[3].0.start as usize].to_vec();
    lapped.extend(stale);
    let s = scan(&lapped, 0, 10);
    assert_eq!(s.records.len(), 3);
    assert_eq!(s.stop, ScanStop::Sequence { want: 13, found: 2 });
    // Cut in the middle of a payload: the record is not there.
    let s = scan(&log[..whole.records[1].0.start as usize + 5000], 0, 10);
    assert_eq!(s.records.len(), 1);
    assert!(matches!(
        s.stop,
        ScanStop::Invalid(RecordError::PayloadSize { .. })
    ));
    // Never-written space after the last record reads as no record.
    let mut zeros = log.clone();
    zeros.extend(vec![0u8; 2 * LOG_BLOCK_BYTES]);
    assert!(matches!(
        scan(&zeros, 0, 10).stop,
        ScanStop::Invalid(RecordError::Magic(0))
    ));
}

proptest! {
    #[test]
    fn records_round_trip_through_a_scan(writes in writes(), first in 0u64..1 << 40) {
        let (log, headers) = log_of(&writes, first);
        let s = scan(&log, 0, first);
        prop_assert_eq!(s.stop, ScanStop::End);
        let got: Vec<_> = s.records.into_iter().map(|(_, h)| h).collect();
        prop_assert_eq!(got, headers);
    }

    #[test]
    fn any_flipped_bit_is_caught(writes in writes(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (mut log, headers) = log_of(&writes, 0);
        let whole = scan(&log, 0, 0);
        let at = pick.index(log.len()) as u64;
        log[at as usize] ^= 1 << bit;
        let s = scan(&log, 0, 0);
        // The record the byte belongs to, and whether it is padding after a payload.
        let hit = whole.records.iter().position(|(r, _)| r.contains(&at)).unwrap();
        let (range, header) = &whole.records[hit];
        let padding = at >= range.start + LOG_BLOCK_BYTES as u64 + u64::from(header.len_bytes);
        if padding {
            prop_assert_eq!(s.records.len(), headers.len(), "padding is no data");
        } else {
            prop_assert_eq!(s.records.len(), hit, "the damaged record and all after it go");
            prop_assert!(!matches!(s.stop, ScanStop::End));
        }
        for (i, (_, h)) in s.records.iter().enumerate() {
            prop_assert_eq!(h, &headers[i]);
        }
    }

    #[test]
    fn decoding_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2 * LOG_BLOCK_BYTES)) {
        let _ = decode_header(&bytes);
        let mut block = bytes.clone();
        block.resize(LOG_BLOCK_BYTES, 0);
        block[0..4].copy_from_slice(b"RBSL");
        block[4] = 1;
        let _ = decode_header(&block);
        let _ = scan(&bytes, 0, 0);
    }
}
