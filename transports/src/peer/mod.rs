//! The peer protocol between ringblock nodes that replicate a volume. As pure code: the frame
//! codec ([`frame`], [`body`]), sequencing and in-flight windows ([`window`]), the shared-secret
//! authentication ([`auth`]), the sans-IO handshake state machines ([`handshake`]), what a link
//! does once established ([`decide`], with engine and wire types converted in [`convert`])
//! and when to reconnect ([`backoff`]). Over real sockets: the [`listener`] that accepts peers
//! and [`connect()`], which reaches one; both run the handshake with blocking IO under a
//! deadline and hand over the socket with its [`Session`]. The [`runtime`] puts it all to
//! work for the daemon's replicated volumes.
//!
//! A connection task reads bytes, hands them to [`decode_frame`], feeds the frames to a state
//! machine and sends the bytes it gets back.
//! Every byte from a peer is untrusted; decoders never panic, never allocate more than a
//! bounded amount ([`MAX_PAYLOAD_BYTES`], [`MAX_HISTORY_LEN`]) and report one [`PeerError`].
//!
//! The layout of frames and the handshake are described in `docs/replication.md`.

pub mod auth;
pub mod backoff;
pub mod body;
pub mod connect;
pub mod convert;
pub mod decide;
mod exchange;
pub mod frame;
pub mod handshake;
pub mod ids;
pub(crate) mod io;
pub mod link;
pub mod listener;
mod region_sums;
pub mod runtime;
pub mod serve;
pub mod window;

#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod tests;

pub use auth::{ClusterSecret, Mac, Nonce, MAC_LEN, NONCE_LEN};
pub use backoff::Backoff;
pub use body::{
    checksums, decode_frame, encode_checksums, encode_data_header, encode_frame, Body, Challenge,
    Decoded, Frame, GenerationHistory, GoodbyeReason, Hello, RefuseCode, Welcome,
};
pub use connect::{connect, ConnectConfig, ConnectError, PeerAddress};
pub use decide::{decide, LinkDecision, LinkRefusal, LocalCopy, Tracking};
pub use exchange::MAX_HANDSHAKE_FRAME_BYTES;
pub use frame::{
    crc32c_of, decode_header, encode_header, FrameFlags, FrameHeader, FrameKind, HEADER_LEN,
};
pub use handshake::{
    Acceptor, AcceptorConfig, Initiator, InitiatorConfig, LocalVolume, Progress, Refusal, Session,
    Step, VolumeLookup,
};
pub use io::{monotonic_clock, Clock};
pub use link::{LinkOptions, PrimaryLink};
pub use listener::{Established, ListenerConfig, ListenerCounts, PeerListener};
pub use runtime::{PeerRuntime, RuntimeConfig, RuntimeError};
pub use serve::{ReplicaServe, ServeOptions};
pub use window::{Acked, InboundWindow, SendWindow};

use std::fmt;

/// Protocol versions this build speaks (inclusive). Every frame header carries the version.
pub const PROTOCOL_VERSION_MIN: u8 = 1;
/// See [`PROTOCOL_VERSION_MIN`].
pub const PROTOCOL_VERSION_MAX: u8 = 1;

/// Largest payload of one frame: one 1 MiB chunk of data.
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 20;
/// Largest frame on the wire: header plus the largest payload.
pub const MAX_FRAME_BYTES: usize = HEADER_LEN + MAX_PAYLOAD_BYTES as usize;
/// Data payloads (writes, resync data) and their offsets are whole 512-byte sectors, the
/// smallest logical block a device has: a replica mirrors exactly what a client wrote. Senders
/// that can should still send whole 4 KiB pages, the unit zero-copy sends pin.
pub const SECTOR_BYTES: u32 = 512;
/// Most generation ids a handshake carries (the newest ones).
pub const MAX_HISTORY_LEN: usize = 64;
/// Region sizes (the unit of the dirty bitmap, resync and verify) are powers of two in this
/// range.
pub const MIN_REGION_BYTES: u32 = 4096;
/// See [`MIN_REGION_BYTES`].
pub const MAX_REGION_BYTES: u32 = 1 << 30;
/// Most region checksums one verify reply carries (they fill at most one payload).
pub const MAX_VERIFY_REGIONS: u32 = MAX_PAYLOAD_BYTES / 4;
/// Most acknowledged frames (writes, resync data, flushes, heartbeats) one side may have
/// outstanding; a peer that sends more is hostile.
pub const MAX_WINDOW_FRAMES: u32 = 1024;
/// Most payload bytes of acknowledged frames one side may have outstanding.
pub const MAX_WINDOW_BYTES: u64 = 64 << 20;

macro_rules! peer_id {
    ($(#[$m:meta])* $name:ident($inner:ty), $format:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $format, self.0)
            }
        }
    };
}

peer_id!(
    /// A cluster of nodes that share one secret; peers of another cluster are refused.
    ClusterId(u128),
    "{:032x}"
);
peer_id!(
    /// A node, persistent across restarts.
    NodeId(u128),
    "{:032x}"
);
peer_id!(
    /// A replicated volume, the same on every node that holds a copy (the engine's own
    /// `VolumeId` is local to one daemon).
    ReplicatedVolumeId(u64),
    "{}"
);
peer_id!(
    /// A frame's number in its direction: 0 for the first frame a side sends, then +1 each.
    Seq(u64),
    "{}"
);
peer_id!(
    /// A region of a volume (byte offset / region size): the unit of resync and verify.
    RegionIndex(u64),
    "{}"
);

impl Seq {
    /// The sequence number after this one; `None` after `u64::MAX` (never reached in practice,
    /// but a peer's value is checked, not trusted).
    pub fn next(self) -> Option<Seq> {
        self.0.checked_add(1).map(Seq)
    }
}

/// Everything that can go wrong with peer frames; the variant says what to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The first bytes are not the peer protocol's magic: not a ringblock peer, or the stream
    /// lost its framing.
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    /// A frame carries a protocol version this build does not speak.
    #[error("unsupported protocol version {found} (this node speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX})")]
    UnsupportedVersion { found: u8 },
    /// The header's crc32c does not match: the header was corrupted.
    #[error("header checksum mismatch: computed {computed:#010x}, frame says {found:#010x}")]
    HeaderChecksum { computed: u32, found: u32 },
    /// The payload's crc32c does not match: the payload was corrupted.
    #[error("payload checksum mismatch: computed {computed:#010x}, frame says {found:#010x}")]
    PayloadChecksum { computed: u32, found: u32 },
    /// The frame type byte names no frame type.
    #[error("unknown frame type {found}")]
    UnknownFrameType { found: u8 },
    /// Flags outside those the frame type defines are set.
    #[error("{kind:?} frame has reserved flag bits {flags:#06x} set")]
    ReservedFlags { kind: FrameKind, flags: u16 },
    /// The payload is longer than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {length} bytes exceeds the maximum of {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge { length: u32 },
    /// A field holds a value its frame type forbids (wrong payload length, misaligned offset,
    /// a range that overflows, reserved bytes not zero, ...).
    #[error("invalid {kind:?} frame: {reason}")]
    InvalidField {
        kind: FrameKind,
        reason: &'static str,
    },
    /// A generation history is empty, too long, or holds a zero or repeated id.
    #[error("invalid generation history: {reason}")]
    InvalidHistory { reason: &'static str },
    /// A frame arrived with another sequence number than the next one in its direction:
    /// lost, duplicated, replayed or reordered.
    #[error("frame out of sequence: expected {expected}, found {found}")]
    OutOfSequence { expected: Seq, found: Seq },
    /// An acknowledgement names a sequence number that is not outstanding (never sent, acked
    /// already, or of a frame acked by another type of acknowledgement).
    #[error("{ack_kind:?} for sequence {seq} matches no outstanding frame")]
    UnexpectedAck { ack_kind: FrameKind, seq: Seq },
    /// Our own send window is full; wait for acknowledgements (not a protocol error).
    #[error("send window full: {frames} frames, {bytes} bytes in flight")]
    WindowFull { frames: u32, bytes: u64 },
    /// The peer has more unacknowledged frames or bytes outstanding than the protocol allows.
    #[error("peer exceeds the in-flight window: {frames} frames, {bytes} bytes")]
    WindowExceeded { frames: u32, bytes: u64 },
    /// The sequence space is used up (2^64 frames); the connection must be re-established.
    #[error("sequence numbers exhausted")]
    SequenceExhausted,
    /// The cluster secret is shorter than [`auth::MIN_SECRET_BYTES`].
    #[error("cluster secret of {length} bytes is too short (at least {min} bytes)", min = auth::MIN_SECRET_BYTES)]
    WeakSecret { length: usize },
    /// The operating system's random number generator failed.
    #[error("cannot draw a nonce from the OS random number generator: {reason}")]
    Random { reason: String },
}

/// A peer's TCP connection on which sent data stays unacknowledged this long is aborted by the
/// kernel (`TCP_USER_TIMEOUT`): the link's own acknowledgement timeout.
pub const TCP_USER_TIMEOUT_MS: u32 = link::ACK_TIMEOUT_MS as u32;

/// Set [`TCP_USER_TIMEOUT_MS`] on a peer's socket. Without it a peer cut off by the network
/// keeps the connection retransmitting for many minutes, and with it the pages of every
/// zero-copy send still queued: the kernel reports them free only once the connection ends,
/// and the client writes those pages belong to cannot complete until then. With it, the
/// kernel drops the connection (and the queue) soon after the link gave up on the peer.
pub(crate) fn abort_when_unacknowledged(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let ms: libc::c_uint = TCP_USER_TIMEOUT_MS;
    // SAFETY: a valid socket fd, and an option value of the size the kernel expects for
    // TCP_USER_TIMEOUT (an unsigned int), living across the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::warn!(
            "peer: cannot set TCP_USER_TIMEOUT: {}",
            std::io::Error::last_os_error()
        );
    }
}
