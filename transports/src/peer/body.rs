//! Typed frames: what each frame type carries, parsed from a checked header and its payload,
//! and encoded back. Decoders trust nothing; encoders trust their caller (a frame built from
//! values that break the rules below is refused by the peer, not by the encoder).
//!
//! Rules beyond the header's (see [`FrameKind`] for what `arg` and `aux` mean):
//! - fields a type does not use are zero, and so are reserved bytes in payloads;
//! - Write and ResyncData carry a non-empty payload of whole sectors ([`SECTOR_BYTES`]) at a
//!   sector-aligned offset, and the range does not overflow;
//! - errnos are 0 (success) or a positive errno below 4096;
//! - region ranges hold at least one region and do not overflow; a verify range holds at most
//!   [`MAX_VERIFY_REGIONS`] and its reply exactly one 4-byte crc32c per region;
//! - handshake payloads have the exact length their history count implies.

use super::auth::{Mac, Nonce, MAC_LEN, NONCE_LEN};
use super::frame::{
    crc32c_of, decode_header, encode_header, FrameFlags, FrameHeader, FrameKind, HEADER_LEN,
};
use super::{
    ClusterId, NodeId, PeerError, RegionIndex, ReplicatedVolumeId, Seq, MAX_HISTORY_LEN,
    MAX_REGION_BYTES, MAX_VERIFY_REGIONS, MIN_REGION_BYTES, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, SECTOR_BYTES,
};

/// Largest errno an acknowledgement may carry (Linux errnos are below 4096).
pub const MAX_ERRNO: u32 = 4095;
/// Bytes of a Hello payload before its history.
pub const HELLO_FIXED_LEN: usize = 80;
/// Bytes of a Challenge payload.
pub const CHALLENGE_LEN: usize = 56;
/// Bytes of a Welcome payload before its history.
pub const WELCOME_FIXED_LEN: usize = 48;

/// A volume's generation ids, oldest first, the current one last: up to [`MAX_HISTORY_LEN`]
/// distinct non-zero ids. Empty: the copy holds no data of the volume yet (a new replica,
/// which needs a full sync). Two nodes compare theirs at connect to decide who resyncs whom.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GenerationHistory(Vec<u64>);

impl GenerationHistory {
    /// Checks the bounds and that ids are non-zero and distinct.
    pub fn new(ids: Vec<u64>) -> Result<GenerationHistory, PeerError> {
        let invalid = |reason| Err(PeerError::InvalidHistory { reason });
        if ids.len() > MAX_HISTORY_LEN {
            return invalid("more than 64 generations");
        }
        if ids.contains(&0) {
            return invalid("generation id 0");
        }
        if ids.iter().enumerate().any(|(i, g)| ids[..i].contains(g)) {
            return invalid("a generation id appears twice");
        }
        Ok(GenerationHistory(ids))
    }

    /// The ids, oldest first.
    pub fn ids(&self) -> &[u64] {
        &self.0
    }

    /// The current generation; None for an empty history.
    pub fn current(&self) -> Option<u64> {
        self.0.last().copied()
    }
}

/// Initiator → acceptor, the first frame of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u8,
    pub version_max: u8,
    pub cluster: ClusterId,
    pub node: NodeId,
    pub nonce: Nonce,
    pub volume_size_bytes: u64,
    pub region_size_bytes: u32,
    pub history: GenerationHistory,
}

/// Acceptor → initiator: the version both speak, who the acceptor is, its nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub version: u8,
    pub node: NodeId,
    pub nonce: Nonce,
}

/// Acceptor → initiator: its proof, and its copy of the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub mac: Mac,
    pub volume_size_bytes: u64,
    pub region_size_bytes: u32,
    pub history: GenerationHistory,
}

macro_rules! wire_code {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant = $value,)* }

        impl $name {
            /// Every code, for tests and fuzzing.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The code with this wire value, if any.
            pub fn from_u32(value: u32) -> Option<$name> {
                $name::ALL.iter().copied().find(|c| *c as u32 == value)
            }
        }
    };
}

wire_code!(
    /// Why a handshake was refused, as the peer is told. Coarse on purpose: before the peer has
    /// proved it holds the cluster secret it learns only [`RefuseCode::Version`] or
    /// [`RefuseCode::Denied`]; the exact reason is in our log.
    RefuseCode {
        /// A malformed or unexpected frame.
        Protocol = 1,
        /// No protocol version in common.
        Version = 2,
        /// Wrong cluster, failed proof, or a node talking to itself.
        Denied = 3,
        /// (After the peer proved itself.) This node has no copy of the volume.
        UnknownVolume = 4,
        /// (After the peer proved itself.) The copies' region sizes differ.
        VolumeMismatch = 5,
    }
);

wire_code!(
    /// Why a side closes the connection.
    GoodbyeReason {
        Shutdown = 1,
        Suspended = 2,
        Removed = 3,
        Timeout = 4,
        Protocol = 5,
        Diverged = 6,
    }
);

/// What a frame carries, by type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    Hello(Hello),
    Challenge(Challenge),
    Response(Mac),
    Welcome(Welcome),
    Refuse(RefuseCode),
    Write {
        offset_bytes: u64,
        fua: bool,
        data: &'a [u8],
    },
    WriteAck {
        seq: Seq,
        errno: u32,
    },
    Flush,
    FlushAck {
        seq: Seq,
        errno: u32,
    },
    Heartbeat,
    HeartbeatAck {
        seq: Seq,
    },
    /// Trim (release) or zero `len_bytes` at `offset_bytes`.
    Trim {
        offset_bytes: u64,
        len_bytes: u32,
    },
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u32,
    },
    ResyncRequest {
        first: RegionIndex,
        count: u32,
    },
    ResyncData {
        region: RegionIndex,
        offset_in_region_bytes: u32,
        data: &'a [u8],
    },
    ResyncDone {
        first: RegionIndex,
        count: u32,
    },
    /// The primary started this generation (never 0).
    Generation(u64),
    VerifyRequest {
        first: RegionIndex,
        count: u32,
    },
    /// `checksums` holds one little-endian crc32c per region from `first` on.
    VerifyReply {
        first: RegionIndex,
        checksums: &'a [u8],
    },
    Goodbye(GoodbyeReason),
}

/// One frame: header fields common to all types, and the typed body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub version: u8,
    pub seq: Seq,
    pub volume: ReplicatedVolumeId,
    pub body: Body<'a>,
}

impl<'a> Frame<'a> {
    /// A frame of the newest protocol version.
    pub fn new(seq: Seq, volume: ReplicatedVolumeId, body: Body<'a>) -> Frame<'a> {
        Frame {
            version: PROTOCOL_VERSION_MAX,
            seq,
            volume,
            body,
        }
    }

    /// The header of this frame (its crc fields are filled by [`encode_header`]).
    pub fn header(&self) -> FrameHeader {
        let b = &self.body;
        FrameHeader {
            version: self.version,
            kind: b.kind(),
            flags: b.flags(),
            seq: self.seq,
            volume: self.volume,
            arg: b.arg(),
            aux: b.aux(),
            payload_len: b.payload_len() as u32,
        }
    }
}

/// What the decoder made of the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The bytes are a valid prefix; at least this many more are needed.
    Need(usize),
    /// A whole frame, and the bytes it took from the front of the buffer.
    Frame { frame: Frame<'a>, consumed: usize },
}

/// Decodes the frame at the front of `buf` (which may hold only part of it, or more).
pub fn decode_frame(buf: &[u8]) -> Result<Decoded<'_>, PeerError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Need(HEADER_LEN - buf.len()));
    };
    let (header, payload_crc) = decode_header(head)?;
    let total = HEADER_LEN + header.payload_len as usize;
    if buf.len() < total {
        return Ok(Decoded::Need(total - buf.len()));
    }
    let payload = &buf[HEADER_LEN..total];
    let computed = crc32c::crc32c(payload);
    if computed != payload_crc {
        return Err(PeerError::PayloadChecksum {
            computed,
            found: payload_crc,
        });
    }
    let frame = Frame {
        version: header.version,
        seq: header.seq,
        volume: header.volume,
        body: parse_body(&header, payload)?,
    };
    Ok(Decoded::Frame {
        frame,
        consumed: total,
    })
}

/// Appends the whole frame (header and payload) to `out`.
pub fn encode_frame(frame: &Frame<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    frame.body.write_payload(out);
    let payload = &out[start + HEADER_LEN..];
    debug_assert_eq!(payload.len(), frame.body.payload_len());
    let header = encode_header(&frame.header(), crc32c_of(&[payload]));
    out[start..start + HEADER_LEN].copy_from_slice(&header);
}

/// The header of a data frame (Write, ResyncData, VerifyReply) whose payload is sent from
/// where it already is; other frames are small and go through [`encode_frame`].
pub fn encode_data_header(frame: &Frame<'_>) -> [u8; HEADER_LEN] {
    let crc = match frame.body.data() {
        Some(data) => crc32c_of(&[data]),
        None => {
            let mut payload = Vec::new();
            frame.body.write_payload(&mut payload);
            crc32c_of(&[&payload])
        }
    };
    encode_header(&frame.header(), crc)
}

/// Region checksums as a VerifyReply payload.
pub fn encode_checksums(checksums: &[u32]) -> Vec<u8> {
    checksums.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// The checksums of a VerifyReply payload.
pub fn checksums(payload: &[u8]) -> impl Iterator<Item = u32> + '_ {
    payload
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl Body<'_> {
    /// The frame type of this body.
    pub fn kind(&self) -> FrameKind {
        match self {
            Body::Hello(_) => FrameKind::Hello,
            Body::Challenge(_) => FrameKind::Challenge,
            Body::Response(_) => FrameKind::Response,
            Body::Welcome(_) => FrameKind::Welcome,
            Body::Refuse(_) => FrameKind::Refuse,
            Body::Write { .. } => FrameKind::Write,
            Body::WriteAck { .. } => FrameKind::WriteAck,
            Body::Flush => FrameKind::Flush,
            Body::FlushAck { .. } => FrameKind::FlushAck,
            Body::Heartbeat => FrameKind::Heartbeat,
            Body::HeartbeatAck { .. } => FrameKind::HeartbeatAck,
            Body::Trim { .. } => FrameKind::Trim,
            Body::WriteZeroes { .. } => FrameKind::WriteZeroes,
            Body::ResyncRequest { .. } => FrameKind::ResyncRequest,
            Body::ResyncData { .. } => FrameKind::ResyncData,
            Body::ResyncDone { .. } => FrameKind::ResyncDone,
            Body::Generation(_) => FrameKind::Generation,
            Body::VerifyRequest { .. } => FrameKind::VerifyRequest,
            Body::VerifyReply { .. } => FrameKind::VerifyReply,
            Body::Goodbye(_) => FrameKind::Goodbye,
        }
    }

    fn flags(&self) -> FrameFlags {
        match self {
            Body::Write { fua: true, .. } => FrameFlags::FUA,
            _ => FrameFlags::NONE,
        }
    }

    fn arg(&self) -> u64 {
        match self {
            Body::Write { offset_bytes, .. }
            | Body::Trim { offset_bytes, .. }
            | Body::WriteZeroes { offset_bytes, .. } => *offset_bytes,
            Body::WriteAck { seq, .. }
            | Body::FlushAck { seq, .. }
            | Body::HeartbeatAck { seq } => seq.0,
            Body::ResyncRequest { first, .. }
            | Body::ResyncDone { first, .. }
            | Body::VerifyRequest { first, .. }
            | Body::VerifyReply { first, .. } => first.0,
            Body::ResyncData { region, .. } => region.0,
            Body::Generation(id) => *id,
            _ => 0,
        }
    }

    fn aux(&self) -> u32 {
        match self {
            Body::Hello(h) => h.history.ids().len() as u32,
            Body::Welcome(w) => w.history.ids().len() as u32,
            Body::Refuse(code) => *code as u32,
            Body::WriteAck { errno, .. } | Body::FlushAck { errno, .. } => *errno,
            Body::ResyncRequest { count, .. }
            | Body::ResyncDone { count, .. }
            | Body::VerifyRequest { count, .. } => *count,
            Body::VerifyReply { checksums, .. } => (checksums.len() / 4) as u32,
            Body::ResyncData {
                offset_in_region_bytes,
                ..
            } => *offset_in_region_bytes,
            Body::Goodbye(reason) => *reason as u32,
            Body::Trim { len_bytes, .. } | Body::WriteZeroes { len_bytes, .. } => *len_bytes,
            _ => 0,
        }
    }

    /// The payload sent from where it sits, for the data-carrying types.
    pub fn data(&self) -> Option<&[u8]> {
        match self {
            Body::Write { data, .. } | Body::ResyncData { data, .. } => Some(data),
            Body::VerifyReply { checksums, .. } => Some(checksums),
            _ => None,
        }
    }

    /// Bytes of this body's payload.
    pub fn payload_len(&self) -> usize {
        match self {
            Body::Hello(h) => HELLO_FIXED_LEN + 8 * h.history.ids().len(),
            Body::Challenge(_) => CHALLENGE_LEN,
            Body::Response(_) => MAC_LEN,
            Body::Welcome(w) => WELCOME_FIXED_LEN + 8 * w.history.ids().len(),
            other => other.data().map_or(0, <[u8]>::len),
        }
    }

    fn write_payload(&self, out: &mut Vec<u8>) {
        match self {
            Body::Hello(h) => {
                out.extend_from_slice(&[h.version_min, h.version_max, 0, 0]);
                out.extend_from_slice(&h.region_size_bytes.to_le_bytes());
                out.extend_from_slice(&h.volume_size_bytes.to_le_bytes());
                out.extend_from_slice(&h.cluster.0.to_le_bytes());
                out.extend_from_slice(&h.node.0.to_le_bytes());
                out.extend_from_slice(&h.nonce.0);
                write_history(&h.history, out);
            }
            Body::Challenge(c) => {
                out.extend_from_slice(&[c.version, 0, 0, 0, 0, 0, 0, 0]);
                out.extend_from_slice(&c.node.0.to_le_bytes());
                out.extend_from_slice(&c.nonce.0);
            }
            Body::Response(mac) => out.extend_from_slice(&mac.0),
            Body::Welcome(w) => {
                out.extend_from_slice(&w.mac.0);
                out.extend_from_slice(&w.volume_size_bytes.to_le_bytes());
                out.extend_from_slice(&w.region_size_bytes.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                write_history(&w.history, out);
            }
            other => out.extend_from_slice(other.data().unwrap_or(&[])),
        }
    }
}

fn write_history(history: &GenerationHistory, out: &mut Vec<u8>) {
    for g in history.ids() {
        out.extend_from_slice(&g.to_le_bytes());
    }
}

/// `N` bytes of `p` from `at`; the caller has checked the payload's length.
fn bytes<const N: usize>(p: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&p[at..at + N]);
    a
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes(p, at))
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes(p, at))
}

fn u128_at(p: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(bytes(p, at))
}

/// A checked header with its payload, and the rules its fields follow.
struct Fields<'h, 'a> {
    h: &'h FrameHeader,
    p: &'a [u8],
}

impl<'a> Fields<'_, 'a> {
    fn check(&self, ok: bool, reason: &'static str) -> Result<(), PeerError> {
        if ok {
            Ok(())
        } else {
            Err(PeerError::InvalidField {
                kind: self.h.kind,
                reason,
            })
        }
    }

    /// No payload; `arg` and `aux` zero unless the type uses them.
    fn bare(&self, arg_used: bool, aux_used: bool) -> Result<(), PeerError> {
        self.check(arg_used || self.h.arg == 0, "unused arg field is not zero")?;
        self.check(aux_used || self.h.aux == 0, "unused aux field is not zero")?;
        self.check(self.p.is_empty(), "payload on a frame type without one")
    }

    fn errno(&self) -> Result<u32, PeerError> {
        self.check(self.h.aux <= MAX_ERRNO, "errno out of range")?;
        Ok(self.h.aux)
    }

    /// Regions `arg .. arg + aux`: at least one, at most `max`, no overflow.
    fn regions(&self, max: u32) -> Result<(RegionIndex, u32), PeerError> {
        let h = self.h;
        self.check(h.aux >= 1, "empty region range")?;
        self.check(h.aux <= max, "region range too long")?;
        self.check(
            h.arg.checked_add(u64::from(h.aux)).is_some(),
            "region range overflows",
        )?;
        Ok((RegionIndex(h.arg), h.aux))
    }

    /// A non-empty payload of whole sectors.
    fn sectors(&self) -> Result<&'a [u8], PeerError> {
        self.check(!self.p.is_empty(), "no data")?;
        self.check(
            self.p.len().is_multiple_of(SECTOR_BYTES as usize),
            "data is not whole sectors",
        )?;
        Ok(self.p)
    }

    fn code<T>(&self, code: Option<T>, reason: &'static str) -> Result<T, PeerError> {
        self.bare(false, true)?;
        code.ok_or(PeerError::InvalidField {
            kind: self.h.kind,
            reason,
        })
    }
}

fn parse_body<'a>(h: &FrameHeader, p: &'a [u8]) -> Result<Body<'a>, PeerError> {
    let f = Fields { h, p };
    Ok(match h.kind {
        FrameKind::Hello | FrameKind::Challenge | FrameKind::Response | FrameKind::Welcome => {
            f.check(h.arg == 0, "unused arg field is not zero")?;
            parse_handshake(h, p)?
        }
        FrameKind::Refuse => {
            Body::Refuse(f.code(RefuseCode::from_u32(h.aux), "unknown refuse code")?)
        }
        FrameKind::Goodbye => {
            Body::Goodbye(f.code(GoodbyeReason::from_u32(h.aux), "unknown goodbye reason")?)
        }
        FrameKind::Write | FrameKind::ResyncData => parse_data(&f)?,
        FrameKind::Trim | FrameKind::WriteZeroes => {
            f.bare(true, true)?;
            let sector = u64::from(SECTOR_BYTES);
            f.check(h.aux != 0, "empty range")?;
            f.check(
                h.aux.is_multiple_of(SECTOR_BYTES),
                "length is not whole sectors",
            )?;
            f.check(h.arg.is_multiple_of(sector), "offset is not sector-aligned")?;
            f.check(
                h.arg.checked_add(u64::from(h.aux)).is_some(),
                "offset + length overflows",
            )?;
            let (offset_bytes, len_bytes) = (h.arg, h.aux);
            if h.kind == FrameKind::Trim {
                Body::Trim {
                    offset_bytes,
                    len_bytes,
                }
            } else {
                Body::WriteZeroes {
                    offset_bytes,
                    len_bytes,
                }
            }
        }
        FrameKind::WriteAck => {
            f.bare(true, true)?;
            Body::WriteAck {
                seq: Seq(h.arg),
                errno: f.errno()?,
            }
        }
        FrameKind::FlushAck => {
            f.bare(true, true)?;
            Body::FlushAck {
                seq: Seq(h.arg),
                errno: f.errno()?,
            }
        }
        FrameKind::Flush => f.bare(false, false).map(|_| Body::Flush)?,
        FrameKind::Heartbeat => f.bare(false, false).map(|_| Body::Heartbeat)?,
        FrameKind::HeartbeatAck => {
            f.bare(true, false)?;
            Body::HeartbeatAck { seq: Seq(h.arg) }
        }
        FrameKind::ResyncRequest => {
            f.bare(true, true)?;
            let (first, count) = f.regions(u32::MAX)?;
            Body::ResyncRequest { first, count }
        }
        FrameKind::ResyncDone => {
            f.bare(true, true)?;
            let (first, count) = f.regions(u32::MAX)?;
            Body::ResyncDone { first, count }
        }
        FrameKind::Generation => {
            f.bare(true, false)?;
            f.check(h.arg != 0, "generation id 0")?;
            Body::Generation(h.arg)
        }
        FrameKind::VerifyRequest => {
            f.bare(true, true)?;
            let (first, count) = f.regions(MAX_VERIFY_REGIONS)?;
            Body::VerifyRequest { first, count }
        }
        FrameKind::VerifyReply => {
            let (first, count) = f.regions(MAX_VERIFY_REGIONS)?;
            f.check(
                p.len() == 4 * count as usize,
                "payload is not one checksum per region",
            )?;
            Body::VerifyReply {
                first,
                checksums: p,
            }
        }
    })
}

/// Write and ResyncData: sectors of data at a sector-aligned place.
fn parse_data<'a>(f: &Fields<'_, 'a>) -> Result<Body<'a>, PeerError> {
    let h = f.h;
    let data = f.sectors()?;
    if h.kind == FrameKind::Write {
        f.check(h.aux == 0, "unused aux field is not zero")?;
        f.check(
            h.arg.is_multiple_of(u64::from(SECTOR_BYTES)),
            "offset is not sector-aligned",
        )?;
        f.check(
            h.arg.checked_add(data.len() as u64).is_some(),
            "offset + length overflows",
        )?;
        return Ok(Body::Write {
            offset_bytes: h.arg,
            fua: h.flags.contains(FrameFlags::FUA),
            data,
        });
    }
    debug_assert_eq!(h.kind, FrameKind::ResyncData);
    f.check(
        h.aux.is_multiple_of(SECTOR_BYTES),
        "offset in region is not sector-aligned",
    )?;
    f.check(
        u64::from(h.aux) + data.len() as u64 <= u64::from(MAX_REGION_BYTES),
        "data runs past the largest region",
    )?;
    Ok(Body::ResyncData {
        region: RegionIndex(h.arg),
        offset_in_region_bytes: h.aux,
        data,
    })
}

fn parse_region_size(kind: FrameKind, region_size_bytes: u32) -> Result<u32, PeerError> {
    let ok = region_size_bytes.is_power_of_two()
        && (MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&region_size_bytes);
    if ok {
        Ok(region_size_bytes)
    } else {
        Err(PeerError::InvalidField {
            kind,
            reason: "region size is not a power of two in range",
        })
    }
}

/// The history after a fixed part of `fixed` bytes; the header's aux is its length.
fn parse_history(h: &FrameHeader, p: &[u8], fixed: usize) -> Result<GenerationHistory, PeerError> {
    let count = h.aux as usize;
    if count > MAX_HISTORY_LEN || p.len() != fixed + 8 * count {
        return Err(PeerError::InvalidField {
            kind: h.kind,
            reason: "payload length does not match the history count",
        });
    }
    let ids = p[fixed..].chunks_exact(8).map(|c| u64_at(c, 0)).collect();
    GenerationHistory::new(ids)
}

fn parse_handshake<'a>(h: &FrameHeader, p: &[u8]) -> Result<Body<'a>, PeerError> {
    let kind = h.kind;
    fn invalid<T>(kind: FrameKind, reason: &'static str) -> Result<T, PeerError> {
        Err(PeerError::InvalidField { kind, reason })
    }
    let fixed_len = |len: usize| {
        if p.len() == len {
            Ok(())
        } else {
            invalid(kind, "wrong payload length")
        }
    };
    match kind {
        FrameKind::Hello => {
            if p.len() < HELLO_FIXED_LEN {
                return invalid(kind, "wrong payload length");
            }
            let (version_min, version_max) = (p[0], p[1]);
            if version_min == 0 || version_min > version_max {
                return invalid(kind, "empty version range");
            }
            if p[2..4] != [0, 0] {
                return invalid(kind, "reserved bytes are not zero");
            }
            Ok(Body::Hello(Hello {
                version_min,
                version_max,
                region_size_bytes: parse_region_size(kind, u32_at(p, 4))?,
                volume_size_bytes: u64_at(p, 8),
                cluster: ClusterId(u128_at(p, 16)),
                node: NodeId(u128_at(p, 32)),
                nonce: Nonce(bytes::<NONCE_LEN>(p, 48)),
                history: parse_history(h, p, HELLO_FIXED_LEN)?,
            }))
        }
        FrameKind::Challenge => {
            if h.aux != 0 {
                return invalid(kind, "unused aux field is not zero");
            }
            fixed_len(CHALLENGE_LEN)?;
            if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&p[0]) {
                return Err(PeerError::UnsupportedVersion { found: p[0] });
            }
            if p[1..8].iter().any(|b| *b != 0) {
                return invalid(kind, "reserved bytes are not zero");
            }
            Ok(Body::Challenge(Challenge {
                version: p[0],
                node: NodeId(u128_at(p, 8)),
                nonce: Nonce(bytes::<NONCE_LEN>(p, 24)),
            }))
        }
        FrameKind::Response => {
            if h.aux != 0 {
                return invalid(kind, "unused aux field is not zero");
            }
            fixed_len(MAC_LEN)?;
            Ok(Body::Response(Mac(bytes::<MAC_LEN>(p, 0))))
        }
        _ => {
            if p.len() < WELCOME_FIXED_LEN {
                return invalid(kind, "wrong payload length");
            }
            if p[44..48] != [0; 4] {
                return invalid(kind, "reserved bytes are not zero");
            }
            Ok(Body::Welcome(Welcome {
                mac: Mac(bytes::<MAC_LEN>(p, 0)),
                volume_size_bytes: u64_at(p, 32),
                region_size_bytes: parse_region_size(kind, u32_at(p, 40))?,
                history: parse_history(h, p, WELCOME_FIXED_LEN)?,
            }))
        }
    }
}
