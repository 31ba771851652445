//! Sequencing and in-flight windows, per direction.
//!
//! Every frame a side sends takes the next sequence number of its direction. Acknowledged
//! frames (see [`FrameKind::ack_kind`]) also take room in a window bounded in frames and bytes
//! until their acknowledgement comes back; acknowledgements may come in any order (a replica
//! completes writes on several reactors), but each must match an outstanding frame of the type
//! it answers. The sender keeps a [`SendWindow`]; the receiver checks the peer against the
//! protocol's bounds with an [`InboundWindow`], so a peer can never make it hold more work than
//! [`MAX_WINDOW_FRAMES`] and [`MAX_WINDOW_BYTES`].

use std::collections::VecDeque;

use super::body::Frame;
use super::frame::FrameKind;
use super::{PeerError, Seq, MAX_PAYLOAD_BYTES, MAX_WINDOW_BYTES, MAX_WINDOW_FRAMES};

/// An acknowledged frame that was outstanding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    pub seq: Seq,
    pub kind: FrameKind,
    pub payload_len: u32,
}

/// Outstanding acknowledged frames, in sequence order, bounded in count and bytes.
#[derive(Debug)]
struct Ledger {
    entries: VecDeque<Acked>,
    bytes: u64,
    max_frames: u32,
    max_bytes: u64,
}

impl Ledger {
    fn new(max_frames: u32, max_bytes: u64) -> Ledger {
        // A window always admits one frame of the largest payload, so it cannot stall forever.
        let max_frames = max_frames.clamp(1, MAX_WINDOW_FRAMES);
        let max_bytes = max_bytes.clamp(u64::from(MAX_PAYLOAD_BYTES), MAX_WINDOW_BYTES);
        Ledger {
            entries: VecDeque::with_capacity(max_frames as usize),
            bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    fn fits(&self, payload_len: u32) -> bool {
        (self.entries.len() as u32) < self.max_frames
            && self.bytes + u64::from(payload_len) <= self.max_bytes
    }

    fn push(&mut self, entry: Acked) {
        debug_assert!(self.fits(entry.payload_len));
        debug_assert!(self.entries.back().is_none_or(|e| e.seq < entry.seq));
        self.bytes += u64::from(entry.payload_len);
        self.entries.push_back(entry);
    }

    fn remove(&mut self, ack_kind: FrameKind, seq: Seq) -> Result<Acked, PeerError> {
        let unexpected = PeerError::UnexpectedAck { ack_kind, seq };
        let at = self
            .entries
            .binary_search_by_key(&seq, |e| e.seq)
            .map_err(|_| unexpected.clone())?;
        if self.entries[at].kind.ack_kind() != Some(ack_kind) {
            return Err(unexpected);
        }
        let entry = self.entries.remove(at).ok_or(unexpected)?;
        self.bytes -= u64::from(entry.payload_len);
        Ok(entry)
    }

    fn frames(&self) -> u32 {
        self.entries.len() as u32
    }
}

/// Our side of a direction: hands out sequence numbers and bounds what is in flight.
#[derive(Debug)]
pub struct SendWindow {
    next: Option<Seq>,
    ledger: Ledger,
}

impl SendWindow {
    /// A window whose next frame is `next` (the handshake took the first ones), holding at most
    /// `max_frames` acknowledged frames and `max_bytes` payload bytes in flight (clamped to the
    /// protocol's bounds).
    pub fn new(next: Seq, max_frames: u32, max_bytes: u64) -> SendWindow {
        SendWindow {
            next: Some(next),
            ledger: Ledger::new(max_frames, max_bytes),
        }
    }

    /// The sequence number for the next frame, of type `kind` with `payload_len` bytes. An
    /// acknowledged type takes room in the window until [`SendWindow::ack`]; when there is
    /// none the caller waits for acknowledgements (for an async replica: falls behind).
    pub fn try_reserve(&mut self, kind: FrameKind, payload_len: u32) -> Result<Seq, PeerError> {
        let seq = self.next.ok_or(PeerError::SequenceExhausted)?;
        if kind.ack_kind().is_some() {
            if !self.ledger.fits(payload_len) {
                return Err(PeerError::WindowFull {
                    frames: self.ledger.frames(),
                    bytes: self.ledger.bytes,
                });
            }
            self.ledger.push(Acked {
                seq,
                kind,
                payload_len,
            });
        }
        self.next = seq.next();
        Ok(seq)
    }

    /// Takes the acknowledgement (of type `ack_kind`) of frame `seq` off the window.
    pub fn ack(&mut self, ack_kind: FrameKind, seq: Seq) -> Result<Acked, PeerError> {
        self.ledger.remove(ack_kind, seq)
    }

    /// Acknowledged frames in flight.
    pub fn in_flight_frames(&self) -> u32 {
        self.ledger.frames()
    }

    /// Payload bytes of acknowledged frames in flight.
    pub fn in_flight_bytes(&self) -> u64 {
        self.ledger.bytes
    }

    /// The oldest frame still waiting for its acknowledgement (for timeouts).
    pub fn oldest(&self) -> Option<Acked> {
        self.ledger.entries.front().copied()
    }
}

/// The peer's direction: frames must come in sequence, and the peer may not have more
/// acknowledged frames outstanding than the protocol allows.
#[derive(Debug)]
pub struct InboundWindow {
    expected: Option<Seq>,
    ledger: Ledger,
}

impl InboundWindow {
    /// Expects `expected` next (the handshake took the first ones).
    pub fn new(expected: Seq) -> InboundWindow {
        InboundWindow {
            expected: Some(expected),
            ledger: Ledger::new(MAX_WINDOW_FRAMES, MAX_WINDOW_BYTES),
        }
    }

    /// Checks that `frame` is the next in sequence and, if it wants an acknowledgement, that
    /// the peer stays within the window; the frame then counts as outstanding until
    /// [`InboundWindow::answered`].
    pub fn accept(&mut self, frame: &Frame<'_>) -> Result<(), PeerError> {
        let expected = self.expected.ok_or(PeerError::SequenceExhausted)?;
        if frame.seq != expected {
            return Err(PeerError::OutOfSequence {
                expected,
                found: frame.seq,
            });
        }
        let kind = frame.body.kind();
        let payload_len = frame.body.payload_len() as u32;
        if kind.ack_kind().is_some() {
            if !self.ledger.fits(payload_len) {
                return Err(PeerError::WindowExceeded {
                    frames: self.ledger.frames() + 1,
                    bytes: self.ledger.bytes + u64::from(payload_len),
                });
            }
            self.ledger.push(Acked {
                seq: frame.seq,
                kind,
                payload_len,
            });
        }
        self.expected = expected.next();
        Ok(())
    }

    /// We are sending the acknowledgement (of type `ack_kind`) of the peer's frame `seq`.
    pub fn answered(&mut self, ack_kind: FrameKind, seq: Seq) -> Result<Acked, PeerError> {
        self.ledger.remove(ack_kind, seq)
    }

    /// The peer's frames we have not acknowledged yet.
    pub fn outstanding_frames(&self) -> u32 {
        self.ledger.frames()
    }
}
