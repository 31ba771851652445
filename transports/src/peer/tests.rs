//! Tests of the frame codec and the windows.

use proptest::prelude::*;

use super::*;

/// A header with these raw fields and correct checksums, to reach the checks past the crc.
#[allow(clippy::too_many_arguments)]
fn raw_frame(
    version: u8,
    kind: u8,
    flags: u16,
    seq: u64,
    arg: u64,
    aux: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0..4].copy_from_slice(b"RBPF");
    b[4] = version;
    b[5] = kind;
    b[6..8].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&7u64.to_le_bytes());
    b[24..32].copy_from_slice(&arg.to_le_bytes());
    b[32..36].copy_from_slice(&aux.to_le_bytes());
    b[36..40].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[40..44].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&b[..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(frame, &mut out);
    out
}

fn decode_whole(bytes: &[u8]) -> Result<Frame<'_>, PeerError> {
    match decode_frame(bytes)? {
        Decoded::Frame { frame, consumed } => {
            assert_eq!(consumed, bytes.len());
            Ok(frame)
        }
        Decoded::Need(n) => panic!("a whole frame decoded as needing {n} more bytes"),
    }
}

fn history(ids: &[u64]) -> GenerationHistory {
    GenerationHistory::new(ids.to_vec()).expect("valid history")
}

/// Raw ingredients of a body; [`Spec::body`] turns them into a valid body of each type.
#[derive(Clone, Debug)]
struct Spec {
    variant: usize,
    x: u64,
    y: u32,
    flag: bool,
    data: Vec<u8>,
    history: Vec<u64>,
    nonce: [u8; 32],
    id: u128,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0..FrameKind::ALL.len(),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        (1usize..=4, any::<u8>()),
        prop::collection::hash_set(1..u64::MAX, 0..=MAX_HISTORY_LEN),
        any::<[u8; 32]>(),
        any::<u128>(),
    )
        .prop_map(
            |(variant, x, y, flag, (sectors, fill), ids, nonce, id)| Spec {
                variant,
                x,
                y,
                flag,
                data: (0..sectors * SECTOR_BYTES as usize)
                    .map(|i| fill.wrapping_add(i as u8))
                    .collect(),
                history: ids.into_iter().collect(),
                nonce,
                id,
            },
        )
}

impl Spec {
    fn body(&self) -> Body<'_> {
        let region_size_bytes = 1u32 << (12 + self.y % 19);
        let history = history(&self.history);
        let count = 1 + self.y % 1000;
        let first = RegionIndex(self.x / 2);
        let sectors_offset = self.x / 2 / u64::from(SECTOR_BYTES) * u64::from(SECTOR_BYTES);
        match FrameKind::ALL[self.variant] {
            FrameKind::Hello => Body::Hello(Hello {
                version_min: 1 + (self.y % 4) as u8,
                version_max: 1 + (self.y % 4) as u8 + (self.x % 4) as u8,
                cluster: ClusterId(self.id),
                node: NodeId(self.id.rotate_left(7)),
                nonce: Nonce(self.nonce),
                volume_size_bytes: self.x,
                region_size_bytes,
                history,
            }),
            FrameKind::Challenge => Body::Challenge(Challenge {
                version: PROTOCOL_VERSION_MAX,
                node: NodeId(self.id),
                nonce: Nonce(self.nonce),
            }),
            FrameKind::Response => Body::Response(Mac(self.nonce)),
            FrameKind::Welcome => Body::Welcome(Welcome {
                mac: Mac(self.nonce),
                volume_size_bytes: self.x,
                region_size_bytes,
                history,
            }),
            FrameKind::Refuse => {
                Body::Refuse(RefuseCode::ALL[self.y as usize % RefuseCode::ALL.len()])
            }
            FrameKind::Write => Body::Write {
                offset_bytes: sectors_offset,
                fua: self.flag,
                data: &self.data,
            },
            FrameKind::WriteAck => Body::WriteAck {
                seq: Seq(self.x),
                errno: self.y % 4096,
            },
            FrameKind::Flush => Body::Flush,
            FrameKind::FlushAck => Body::FlushAck {
                seq: Seq(self.x),
                errno: self.y % 4096,
            },
            FrameKind::Heartbeat => Body::Heartbeat,
            FrameKind::HeartbeatAck => Body::HeartbeatAck { seq: Seq(self.x) },
            FrameKind::Trim => Body::Trim {
                offset_bytes: sectors_offset,
                len_bytes: (1 + self.y % 4096) * SECTOR_BYTES,
            },
            FrameKind::WriteZeroes => Body::WriteZeroes {
                offset_bytes: sectors_offset,
                len_bytes: (1 + self.y % 4096) * SECTOR_BYTES,
            },
            FrameKind::ResyncRequest => Body::ResyncRequest { first, count },
            FrameKind::ResyncData => Body::ResyncData {
                region: RegionIndex(self.x),
                offset_in_region_bytes: (self.y % (1 << 20)) / SECTOR_BYTES * SECTOR_BYTES,
                data: &self.data,
            },
            FrameKind::ResyncDone => Body::ResyncDone { first, count },
            FrameKind::Generation => Body::Generation(self.x | 1),
            FrameKind::VerifyRequest => Body::VerifyRequest { first, count },
            FrameKind::VerifyReply => Body::VerifyReply {
                first,
                checksums: &self.data[..4 * (self.data.len() / 512)],
            },
            FrameKind::Goodbye => {
                Body::Goodbye(GoodbyeReason::ALL[self.y as usize % GoodbyeReason::ALL.len()])
            }
        }
    }
}

proptest! {
    #[test]
    fn every_frame_type_round_trips(spec in spec(), seq in any::<u64>(), volume in any::<u64>()) {
        let frame = Frame::new(Seq(seq), ReplicatedVolumeId(volume), spec.body());
        let bytes = encode(&frame);
        prop_assert_eq!(bytes.len(), HEADER_LEN + frame.body.payload_len());
        prop_assert_eq!(decode_whole(&bytes), Ok(frame.clone()));
        // The header alone, for a payload sent from where it sits, is the same header.
        prop_assert_eq!(&encode_data_header(&frame)[..], &bytes[..HEADER_LEN]);
        // Every proper prefix asks for exactly the bytes still missing, up to the header first.
        for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            if cut < bytes.len() {
                let need = if cut < HEADER_LEN { HEADER_LEN - cut } else { bytes.len() - cut };
                prop_assert_eq!(decode_frame(&bytes[..cut]), Ok(Decoded::Need(need)));
            }
        }
        // Trailing bytes are left for the next frame.
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        prop_assert_eq!(
            decode_frame(&two),
            Ok(Decoded::Frame { frame, consumed: bytes.len() })
        );
    }

    #[test]
    fn any_single_bit_flip_is_detected(spec in spec(), bit in any::<prop::sample::Index>()) {
        let frame = Frame::new(Seq(3), ReplicatedVolumeId(9), spec.body());
        let mut bytes = encode(&frame);
        let at = bit.index(bytes.len() * 8);
        bytes[at / 8] ^= 1 << (at % 8);
        prop_assert!(decode_frame(&bytes).is_err(), "flip of bit {} went unnoticed", at);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(Decoded::Frame { frame, consumed }) = decode_frame(&bytes) {
            prop_assert_eq!(encode(&frame), bytes[..consumed].to_vec());
        }
    }

    /// Random fields under correct checksums reach every field check; whatever decodes
    /// encodes back to the same bytes (the encoding is canonical).
    #[test]
    fn arbitrary_fields_with_valid_checksums_decode_canonically(
        kind in prop_oneof![Just(0u8), 1u8..=64, any::<u8>()],
        flags in prop_oneof![Just(0u16), Just(1u16), any::<u16>()],
        arg in prop_oneof![Just(0u64), 0u64..4096, any::<u64>()],
        aux in prop_oneof![Just(0u32), 0u32..70, any::<u32>()],
        payload in prop_oneof![
            Just(Vec::new()),
            prop::collection::vec(any::<u8>(), 512),
            prop::collection::vec(any::<u8>(), 0..700),
        ],
    ) {
        let bytes = raw_frame(1, kind, flags, 5, arg, aux, &payload);
        if let Ok(frame) = decode_whole(&bytes) {
            prop_assert_eq!(encode(&frame), bytes);
        }
    }
}

#[test]
fn header_checks_report_what_is_wrong() {
    let good = raw_frame(1, FrameKind::Flush as u8, 0, 0, 0, 0, &[]);
    assert!(decode_whole(&good).is_ok());

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        decode_frame(&bad_magic),
        Err(PeerError::BadMagic { .. })
    ));

    let mut corrupt = good.clone();
    corrupt[20] ^= 0x10;
    assert!(matches!(
        decode_frame(&corrupt),
        Err(PeerError::HeaderChecksum { .. })
    ));

    let v2 = raw_frame(2, FrameKind::Flush as u8, 0, 0, 0, 0, &[]);
    assert_eq!(
        decode_frame(&v2),
        Err(PeerError::UnsupportedVersion { found: 2 })
    );
    let v0 = raw_frame(0, FrameKind::Flush as u8, 0, 0, 0, 0, &[]);
    assert_eq!(
        decode_frame(&v0),
        Err(PeerError::UnsupportedVersion { found: 0 })
    );

    let unknown = raw_frame(1, 99, 0, 0, 0, 0, &[]);
    assert_eq!(
        decode_frame(&unknown),
        Err(PeerError::UnknownFrameType { found: 99 })
    );

    let fua_on_flush = raw_frame(1, FrameKind::Flush as u8, 1, 0, 0, 0, &[]);
    assert_eq!(
        decode_frame(&fua_on_flush),
        Err(PeerError::ReservedFlags {
            kind: FrameKind::Flush,
            flags: 1
        })
    );
    let high_bit_on_write = raw_frame(1, FrameKind::Write as u8, 0x8001, 0, 0, 0, &[0; 512]);
    assert_eq!(
        decode_frame(&high_bit_on_write),
        Err(PeerError::ReservedFlags {
            kind: FrameKind::Write,
            flags: 0x8000
        })
    );

    // A length over the maximum is refused from the header alone, before any payload arrives.
    let mut huge = raw_frame(1, FrameKind::Write as u8, 0, 0, 0, 0, &[]);
    huge[36..40].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
    let crc = crc32c::crc32c(&huge[..44]);
    huge[44..48].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        decode_frame(&huge),
        Err(PeerError::PayloadTooLarge {
            length: MAX_PAYLOAD_BYTES + 1
        })
    );

    let mut payload_flip = raw_frame(1, FrameKind::Write as u8, 0, 0, 0, 0, &[0; 512]);
    payload_flip[HEADER_LEN + 100] ^= 4;
    assert!(matches!(
        decode_frame(&payload_flip),
        Err(PeerError::PayloadChecksum { .. })
    ));
}

#[test]
fn the_largest_frame_decodes_and_is_bounded() {
    let data = vec![0xA5u8; MAX_PAYLOAD_BYTES as usize];
    let frame = Frame::new(
        Seq(1),
        ReplicatedVolumeId(2),
        Body::Write {
            offset_bytes: 1 << 30,
            fua: true,
            data: &data,
        },
    );
    let bytes = encode(&frame);
    assert_eq!(bytes.len(), MAX_FRAME_BYTES);
    assert_eq!(decode_whole(&bytes), Ok(frame));
}

/// The field check a frame of `kind` with these fields fails, if any.
fn field_error(kind: FrameKind, flags: u16, arg: u64, aux: u32, payload: &[u8]) -> &'static str {
    match decode_frame(&raw_frame(1, kind as u8, flags, 0, arg, aux, payload)) {
        Err(PeerError::InvalidField { kind: k, reason }) => {
            assert_eq!(k, kind);
            reason
        }
        other => panic!("{kind:?} arg {arg} aux {aux}: expected a field error, got {other:?}"),
    }
}

#[test]
fn every_field_rule_is_enforced() {
    use FrameKind as K;
    let sector = [0u8; 512];
    // Writes: whole sectors at aligned offsets, no overflow, nothing in aux.
    assert_eq!(field_error(K::Write, 0, 0, 0, &[]), "no data");
    assert_eq!(
        field_error(K::Write, 0, 0, 0, &[0; 100]),
        "data is not whole sectors"
    );
    assert_eq!(
        field_error(K::Write, 0, 100, 0, &sector),
        "offset is not sector-aligned"
    );
    assert_eq!(
        field_error(K::Write, 0, u64::MAX - 511, 0, &sector),
        "offset + length overflows"
    );
    assert_eq!(
        field_error(K::Write, 0, 0, 1, &sector),
        "unused aux field is not zero"
    );
    // Acks: errnos in range, no payload.
    assert_eq!(
        field_error(K::WriteAck, 0, 1, 4096, &[]),
        "errno out of range"
    );
    assert_eq!(
        field_error(K::FlushAck, 0, 1, 0, &[1]),
        "payload on a frame type without one"
    );
    assert_eq!(
        field_error(K::HeartbeatAck, 0, 1, 1, &[]),
        "unused aux field is not zero"
    );
    assert_eq!(
        field_error(K::Flush, 0, 1, 0, &[]),
        "unused arg field is not zero"
    );
    assert_eq!(
        field_error(K::Heartbeat, 0, 0, 1, &[]),
        "unused aux field is not zero"
    );
    // Region ranges.
    assert_eq!(
        field_error(K::ResyncRequest, 0, 0, 0, &[]),
        "empty region range"
    );
    assert_eq!(
        field_error(K::ResyncDone, 0, u64::MAX, 1, &[]),
        "region range overflows"
    );
    assert_eq!(field_error(K::Generation, 0, 0, 0, &[]), "generation id 0");
    assert_eq!(
        field_error(K::Generation, 0, 7, 1, &[]),
        "unused aux field is not zero"
    );
    assert_eq!(
        field_error(K::VerifyRequest, 0, 0, MAX_VERIFY_REGIONS + 1, &[]),
        "region range too long"
    );
    assert_eq!(
        field_error(K::VerifyReply, 0, 0, 2, &[0; 4]),
        "payload is not one checksum per region"
    );
    assert_eq!(
        field_error(K::ResyncData, 0, 0, 256, &sector),
        "offset in region is not sector-aligned"
    );
    assert_eq!(
        field_error(K::ResyncData, 0, 0, MAX_REGION_BYTES, &sector),
        "data runs past the largest region"
    );
    // Codes.
    assert_eq!(field_error(K::Refuse, 0, 0, 99, &[]), "unknown refuse code");
    assert_eq!(
        field_error(K::Goodbye, 0, 0, 0, &[]),
        "unknown goodbye reason"
    );
    // Handshake payloads.
    let hello = encode(&Frame::new(
        Seq(0),
        ReplicatedVolumeId(7),
        Body::Hello(Hello {
            version_min: 1,
            version_max: 1,
            cluster: ClusterId(1),
            node: NodeId(2),
            nonce: Nonce([3; 32]),
            volume_size_bytes: 1 << 30,
            region_size_bytes: 1 << 20,
            history: history(&[5, 6]),
        }),
    ));
    let payload = &hello[HEADER_LEN..];
    assert_eq!(
        field_error(K::Hello, 0, 0, 3, payload),
        "payload length does not match the history count"
    );
    assert_eq!(
        field_error(K::Hello, 0, 0, 2, &payload[..70]),
        "wrong payload length"
    );
    assert_eq!(
        field_error(K::Hello, 0, 1, 2, payload),
        "unused arg field is not zero"
    );
    let mut p = payload.to_vec();
    p[0] = 2; // min 2 > max 1
    assert_eq!(field_error(K::Hello, 0, 0, 2, &p), "empty version range");
    let mut p = payload.to_vec();
    p[2] = 1;
    assert_eq!(
        field_error(K::Hello, 0, 0, 2, &p),
        "reserved bytes are not zero"
    );
    let mut p = payload.to_vec();
    p[4..8].copy_from_slice(&3000u32.to_le_bytes());
    assert_eq!(
        field_error(K::Hello, 0, 0, 2, &p),
        "region size is not a power of two in range"
    );
    let mut p = payload.to_vec();
    p[80..88].copy_from_slice(&6u64.to_le_bytes());
    assert_eq!(
        decode_frame(&raw_frame(1, K::Hello as u8, 0, 0, 0, 2, &p)),
        Err(PeerError::InvalidHistory {
            reason: "a generation id appears twice"
        })
    );
    assert_eq!(
        field_error(K::Challenge, 0, 0, 0, &[0; 55]),
        "wrong payload length"
    );
    let mut challenge = [0u8; 56];
    challenge[0] = 9;
    assert_eq!(
        decode_frame(&raw_frame(1, K::Challenge as u8, 0, 0, 0, 0, &challenge)),
        Err(PeerError::UnsupportedVersion { found: 9 })
    );
    assert_eq!(
        field_error(K::Response, 0, 0, 1, &[0; 32]),
        "unused aux field is not zero"
    );
    let mut welcome = [0u8; 56];
    welcome[40..44].copy_from_slice(&4096u32.to_le_bytes());
    welcome[48] = 1;
    assert!(decode_whole(&raw_frame(1, K::Welcome as u8, 0, 0, 0, 1, &welcome)).is_ok());
    welcome[44] = 1;
    assert_eq!(
        field_error(K::Welcome, 0, 0, 1, &welcome),
        "reserved bytes are not zero"
    );
}

#[test]
fn generation_history_bounds() {
    // Empty: a new copy with no data yet.
    let empty = GenerationHistory::new(vec![]).expect("an empty history is valid");
    assert_eq!(empty.current(), None);
    assert!(GenerationHistory::new(vec![0]).is_err());
    assert!(GenerationHistory::new(vec![4, 4]).is_err());
    let longest: Vec<u64> = (1..=MAX_HISTORY_LEN as u64).collect();
    let h = GenerationHistory::new(longest.clone()).expect("64 ids fit");
    assert_eq!(h.current(), Some(64));
    let mut too_long = longest;
    too_long.push(1000);
    assert_eq!(
        GenerationHistory::new(too_long),
        Err(PeerError::InvalidHistory {
            reason: "more than 64 generations"
        })
    );
}

#[test]
fn crc_of_slices_is_crc_of_their_concatenation() {
    let whole: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let (a, rest) = whole.split_at(4096);
    let (b, c) = rest.split_at(3);
    assert_eq!(crc32c_of(&[a, b, c]), crc32c::crc32c(&whole));
    assert_eq!(crc32c_of(&[]), crc32c::crc32c(&[]));
}

#[test]
fn verify_checksums_round_trip() {
    let sums = [1u32, 0xdead_beef, 0];
    let payload = encode_checksums(&sums);
    let frame = Frame::new(
        Seq(0),
        ReplicatedVolumeId(1),
        Body::VerifyReply {
            first: RegionIndex(10),
            checksums: &payload,
        },
    );
    let bytes = encode(&frame);
    let Body::VerifyReply {
        first,
        checksums: c,
    } = decode_whole(&bytes).expect("decodes").body
    else {
        panic!("not a verify reply");
    };
    assert_eq!(first, RegionIndex(10));
    assert_eq!(checksums(c).collect::<Vec<_>>(), sums);
}

fn write_frame(seq: u64, data: &[u8]) -> Frame<'_> {
    Frame::new(
        Seq(seq),
        ReplicatedVolumeId(1),
        Body::Write {
            offset_bytes: 0,
            fua: false,
            data,
        },
    )
}

#[test]
fn send_window_bounds_frames_and_bytes_and_matches_acks() {
    let mut w = SendWindow::new(Seq(2), 3, 2 << 20);
    let a = w.try_reserve(FrameKind::Write, 1 << 20).expect("room");
    let hb = w
        .try_reserve(FrameKind::WriteAck, 0)
        .expect("acks take no room");
    let b = w.try_reserve(FrameKind::Write, 1 << 20).expect("room");
    assert_eq!((a, hb, b), (Seq(2), Seq(3), Seq(4)));
    // Bytes are full (2 MiB), frames are not.
    assert_eq!(
        w.try_reserve(FrameKind::Write, 512),
        Err(PeerError::WindowFull {
            frames: 2,
            bytes: 2 << 20
        })
    );
    let f = w
        .try_reserve(FrameKind::Flush, 0)
        .expect("a flush carries no bytes");
    assert_eq!(
        w.try_reserve(FrameKind::Heartbeat, 0),
        Err(PeerError::WindowFull {
            frames: 3,
            bytes: 2 << 20
        })
    );
    // Acks in any order; each must match an outstanding frame of its type.
    assert_eq!(
        w.ack(FrameKind::FlushAck, b),
        Err(PeerError::UnexpectedAck {
            ack_kind: FrameKind::FlushAck,
            seq: b
        })
    );
    assert_eq!(
        w.ack(FrameKind::WriteAck, hb),
        Err(PeerError::UnexpectedAck {
            ack_kind: FrameKind::WriteAck,
            seq: hb
        })
    );
    let acked = w.ack(FrameKind::WriteAck, b).expect("outstanding");
    assert_eq!(acked.payload_len, 1 << 20);
    assert!(w.ack(FrameKind::WriteAck, b).is_err(), "a duplicate ack");
    assert_eq!(w.oldest().map(|e| e.seq), Some(a));
    assert_eq!((w.in_flight_frames(), w.in_flight_bytes()), (2, 1 << 20));
    w.ack(FrameKind::FlushAck, f).expect("outstanding flush");
    w.ack(FrameKind::WriteAck, a).expect("outstanding write");
    assert_eq!((w.in_flight_frames(), w.in_flight_bytes()), (0, 0));
    assert_eq!(w.try_reserve(FrameKind::Write, 4096), Ok(Seq(6)));
    assert!(w.ack(FrameKind::WriteAck, Seq(99)).is_err(), "never sent");
}

#[test]
fn send_window_stops_at_the_end_of_the_sequence_space() {
    let mut w = SendWindow::new(Seq(u64::MAX), 8, 1 << 20);
    assert_eq!(w.try_reserve(FrameKind::Heartbeat, 0), Ok(Seq(u64::MAX)));
    assert_eq!(
        w.try_reserve(FrameKind::Heartbeat, 0),
        Err(PeerError::SequenceExhausted)
    );
}

#[test]
fn inbound_window_checks_sequence_and_bounds_the_peer() {
    let data = vec![0u8; 1 << 20];
    let mut w = InboundWindow::new(Seq(2));
    assert_eq!(
        w.accept(&write_frame(3, &data)),
        Err(PeerError::OutOfSequence {
            expected: Seq(2),
            found: Seq(3)
        })
    );
    w.accept(&write_frame(2, &data)).expect("in sequence");
    assert_eq!(
        w.accept(&write_frame(2, &data)),
        Err(PeerError::OutOfSequence {
            expected: Seq(3),
            found: Seq(2)
        }),
        "a duplicate"
    );
    let max_in_flight = MAX_WINDOW_BYTES >> 20;
    for seq in 3..2 + max_in_flight {
        w.accept(&write_frame(seq, &data))
            .expect("within the window");
    }
    assert_eq!(w.outstanding_frames() as u64, max_in_flight);
    let over = 2 + max_in_flight;
    assert!(matches!(
        w.accept(&write_frame(over, &data)),
        Err(PeerError::WindowExceeded { .. })
    ));
    // Answering one makes room again.
    w.answered(FrameKind::WriteAck, Seq(5))
        .expect("outstanding");
    assert!(w.answered(FrameKind::WriteAck, Seq(5)).is_err());
    w.accept(&write_frame(over, &data)).expect("room again");
}
