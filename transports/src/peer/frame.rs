//! The fixed 48-byte frame header: layout, encoding and checked decoding.
//!
//! ```text
//! offset size field
//!  0     4    magic "RBPF"
//!  4     1    protocol version
//!  5     1    frame type (FrameKind)
//!  6     2    flags (FrameFlags; only those the type defines may be set)
//!  8     8    sequence number (per direction)
//! 16     8    volume id
//! 24     8    arg: offset, region or acknowledged sequence, as the type says
//! 32     4    aux: errno, count, code or offset in a region, as the type says
//! 36     4    payload length in bytes (<= MAX_PAYLOAD_BYTES)
//! 40     4    crc32c of the payload
//! 44     4    crc32c of bytes 0..44 of the header
//! ```
//!
//! All integers are little-endian.
//!
//! # Two checksums, not one
//!
//! The header has its own crc32c, and it covers the payload's crc32c. A receiver checks the
//! header before it trusts the payload length, so a corrupted length is caught at once instead
//! of making the receiver wait for (and buffer) up to a megabyte of bytes that never come. The
//! payload's crc32c is computed on its own, over the memory the pages already sit in (possibly
//! several slices, see [`crc32c_of`]), so a sender can checksum and send them without copying
//! them next to the header; the header crc then binds that value to the header. crc32c
//! detects every single-bit error and every burst up to 32 bits in either part.

use super::{
    PeerError, ReplicatedVolumeId, Seq, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 48;
/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"RBPF";
/// Bytes of the header the header crc covers.
const HEADER_CRC_COVERS: usize = 44;

/// The type of a frame: what its `arg`, `aux` and payload mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Initiator → acceptor: versions, cluster, node, volume, generation history, nonce.
    Hello = 1,
    /// Acceptor → initiator: chosen version, acceptor node, acceptor nonce.
    Challenge = 2,
    /// Initiator → acceptor: the initiator's proof (HMAC).
    Response = 3,
    /// Acceptor → initiator: the acceptor's proof and its generation history.
    Welcome = 4,
    /// Either side: the handshake failed (coarse reason in `aux`).
    Refuse = 5,
    /// Volume data at `arg` (byte offset); flag FUA asks for durability before the ack.
    Write = 16,
    /// `arg` = sequence of the Write or ResyncData acknowledged, `aux` = errno (0 = done).
    WriteAck = 17,
    /// Make every acknowledged write durable.
    Flush = 18,
    /// `arg` = sequence of the Flush, `aux` = errno.
    FlushAck = 19,
    /// Liveness probe.
    Heartbeat = 20,
    /// `arg` = sequence of the Heartbeat.
    HeartbeatAck = 21,
    /// Release `aux` bytes at `arg` (byte offset); reads return zeros after. Acknowledged by
    /// WriteAck.
    Trim = 22,
    /// Zero `aux` bytes at `arg` (byte offset). Acknowledged by WriteAck.
    WriteZeroes = 23,
    /// Ask for regions `arg .. arg + aux`.
    ResyncRequest = 32,
    /// Data of region `arg` at byte `aux` within the region; acknowledged by WriteAck.
    ResyncData = 33,
    /// Primary → replica: every region lacking is sent (regions `arg .. arg + aux`, the whole
    /// volume); replica → primary: every region it asks for is asked.
    ResyncDone = 34,
    /// Primary → replica: the primary started generation `arg` (non-zero); the replica
    /// records it durably, then acknowledges with FlushAck.
    Generation = 35,
    /// Ask for the checksums of regions `arg .. arg + aux`.
    VerifyRequest = 48,
    /// crc32c of each of regions `arg .. arg + aux`, 4 bytes each.
    VerifyReply = 49,
    /// The sender closes the connection (reason in `aux`).
    Goodbye = 63,
}

impl FrameKind {
    /// Every frame type, for tests and fuzzing.
    pub const ALL: [FrameKind; 20] = [
        FrameKind::Hello,
        FrameKind::Challenge,
        FrameKind::Response,
        FrameKind::Welcome,
        FrameKind::Refuse,
        FrameKind::Write,
        FrameKind::WriteAck,
        FrameKind::Flush,
        FrameKind::FlushAck,
        FrameKind::Heartbeat,
        FrameKind::HeartbeatAck,
        FrameKind::Trim,
        FrameKind::WriteZeroes,
        FrameKind::ResyncRequest,
        FrameKind::ResyncData,
        FrameKind::ResyncDone,
        FrameKind::Generation,
        FrameKind::VerifyRequest,
        FrameKind::VerifyReply,
        FrameKind::Goodbye,
    ];

    /// The frame type with this wire value, if any.
    pub fn from_u8(value: u8) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|k| *k as u8 == value)
    }

    /// Flags this frame type may carry.
    pub fn allowed_flags(self) -> FrameFlags {
        match self {
            FrameKind::Write => FrameFlags::FUA,
            _ => FrameFlags::NONE,
        }
    }

    /// The acknowledgement that answers a frame of this type, if it is acknowledged. Only
    /// acknowledged frames take room in an in-flight window.
    pub fn ack_kind(self) -> Option<FrameKind> {
        match self {
            FrameKind::Write | FrameKind::ResyncData | FrameKind::Trim | FrameKind::WriteZeroes => {
                Some(FrameKind::WriteAck)
            }
            FrameKind::Flush | FrameKind::Generation => Some(FrameKind::FlushAck),
            FrameKind::Heartbeat => Some(FrameKind::HeartbeatAck),
            _ => None,
        }
    }

    /// True for the frames of the handshake.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            FrameKind::Hello
                | FrameKind::Challenge
                | FrameKind::Response
                | FrameKind::Welcome
                | FrameKind::Refuse
        )
    }
}

/// The header's flag bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrameFlags(pub u16);

impl FrameFlags {
    /// No flags.
    pub const NONE: FrameFlags = FrameFlags(0);
    /// Write: durable on the replica before it acknowledges (forced unit access).
    pub const FUA: FrameFlags = FrameFlags(1);

    /// True when every bit of `other` is set here.
    pub fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A frame header as decoded: every field checked against the header crc and the rules that do
/// not depend on the frame type's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u8,
    pub kind: FrameKind,
    pub flags: FrameFlags,
    pub seq: Seq,
    pub volume: ReplicatedVolumeId,
    /// Offset, region or acknowledged sequence (see [`FrameKind`]).
    pub arg: u64,
    /// Errno, count, code or offset in a region (see [`FrameKind`]).
    pub aux: u32,
    pub payload_len: u32,
}

/// crc32c over several slices as if they were one, so a payload scattered over pages is
/// checksummed where it sits.
pub fn crc32c_of(parts: &[&[u8]]) -> u32 {
    parts
        .iter()
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

/// The header bytes of a frame whose payload has crc32c `payload_crc`; the payload itself is
/// sent separately (its own iovec) from wherever it is.
pub fn encode_header(header: &FrameHeader, payload_crc: u32) -> [u8; HEADER_LEN] {
    debug_assert!(header.payload_len <= MAX_PAYLOAD_BYTES);
    debug_assert!(header.flags.0 & !header.kind.allowed_flags().0 == 0);
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4] = header.version;
    b[5] = header.kind as u8;
    b[6..8].copy_from_slice(&header.flags.0.to_le_bytes());
    b[8..16].copy_from_slice(&header.seq.0.to_le_bytes());
    b[16..24].copy_from_slice(&header.volume.0.to_le_bytes());
    b[24..32].copy_from_slice(&header.arg.to_le_bytes());
    b[32..36].copy_from_slice(&header.aux.to_le_bytes());
    b[36..40].copy_from_slice(&header.payload_len.to_le_bytes());
    b[40..44].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b[..HEADER_CRC_COVERS]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u16_at(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Decodes and checks a header; returns it with the payload's expected crc32c.
///
/// Checked in this order: magic (a stream out of framing), header crc (corruption), version,
/// frame type, flags, payload length. Type-specific rules on `arg`, `aux` and the payload are
/// checked when the body is parsed.
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<(FrameHeader, u32), PeerError> {
    if b[0..4] != MAGIC {
        return Err(PeerError::BadMagic {
            found: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        });
    }
    let computed = crc32c::crc32c(&b[..HEADER_CRC_COVERS]);
    let found = u32_at(b, 44);
    if computed != found {
        return Err(PeerError::HeaderChecksum { computed, found });
    }
    let version = b[4];
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
        return Err(PeerError::UnsupportedVersion { found: version });
    }
    let kind = FrameKind::from_u8(b[5]).ok_or(PeerError::UnknownFrameType { found: b[5] })?;
    let flags = FrameFlags(u16_at(b, 6));
    let reserved = flags.0 & !kind.allowed_flags().0;
    if reserved != 0 {
        return Err(PeerError::ReservedFlags {
            kind,
            flags: reserved,
        });
    }
    let payload_len = u32_at(b, 36);
    if payload_len > MAX_PAYLOAD_BYTES {
        return Err(PeerError::PayloadTooLarge {
            length: payload_len,
        });
    }
    let header = FrameHeader {
        version,
        kind,
        flags,
        seq: Seq(u64_at(b, 8)),
        volume: ReplicatedVolumeId(u64_at(b, 16)),
        arg: u64_at(b, 24),
        aux: u32_at(b, 32),
        payload_len,
    };
    Ok((header, u32_at(b, 40)))
}
