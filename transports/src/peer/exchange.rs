//! Runs a sans-IO handshake machine ([`Initiator`] or [`Acceptor`]) over a blocking stream
//! whose reads and writes time out (the caller's deadline): the listener and the connector
//! share it.
//!
//! It reads exactly the bytes each frame needs ([`Decoded::Need`]), never more, so when the
//! handshake ends the socket is at a frame boundary and the connection task that takes it over
//! misses nothing the peer sent after its last handshake frame. A frame longer than any
//! handshake frame is refused once its header is read: a peer cannot make a handshake buffer
//! a megabyte.

use std::io::{self, Read, Write};

use super::body::{decode_frame, Decoded, Frame, HELLO_FIXED_LEN, WELCOME_FIXED_LEN};
use super::frame::{decode_header, HEADER_LEN};
use super::handshake::{Acceptor, Initiator, Progress, Refusal, Session, Step, VolumeLookup};
use super::{PeerError, MAX_HISTORY_LEN};

/// Longest handshake frame: a Hello or Welcome with the longest history.
pub const MAX_HANDSHAKE_FRAME_BYTES: usize =
    HEADER_LEN + max(HELLO_FIXED_LEN, WELCOME_FIXED_LEN) + 8 * MAX_HISTORY_LEN;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// A handshake machine, as the driver feeds it.
pub(crate) trait Machine {
    fn on_frame(&mut self, frame: &Frame<'_>) -> Step;
    fn on_wire_error(&mut self, error: PeerError) -> Step;
}

impl Machine for Initiator {
    fn on_frame(&mut self, frame: &Frame<'_>) -> Step {
        Initiator::on_frame(self, frame)
    }
    fn on_wire_error(&mut self, error: PeerError) -> Step {
        Initiator::on_wire_error(self, error)
    }
}

impl<L: VolumeLookup> Machine for Acceptor<L> {
    fn on_frame(&mut self, frame: &Frame<'_>) -> Step {
        Acceptor::on_frame(self, frame)
    }
    fn on_wire_error(&mut self, error: PeerError) -> Step {
        Acceptor::on_wire_error(self, error)
    }
}

/// How a handshake over a stream ended without a session.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// A check failed (ours, or the peer's Refuse); the peer got the Refuse frame if any.
    Refused(Refusal),
    /// The peer closed the connection mid-handshake.
    Closed,
    /// A read or write failed or timed out (see [`is_timeout`]).
    Io(io::Error),
}

/// A read or write that timed out, per operation or at the overall deadline.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// Sends `first` (the initiator's Hello), then feeds the peer's frames to `machine` and sends
/// what it answers until the handshake ends. On success, returns the session and the bytes of
/// the machine's last frame *unsent* (the acceptor's Welcome), so the caller can still decide
/// not to establish the connection.
pub(crate) fn run<M: Machine, S: Read + Write>(
    stream: &mut S,
    machine: &mut M,
    first: Option<&[u8]>,
) -> Result<(Session, Option<Vec<u8>>), ExchangeError> {
    if let Some(bytes) = first {
        send(stream, bytes)?;
    }
    let mut buf = Vec::with_capacity(MAX_HANDSHAKE_FRAME_BYTES);
    // A handshake is at most a few frames each way; a machine that neither ends nor asks for
    // another frame would be a bug, so the loop is bounded all the same.
    for _ in 0..MAX_FRAMES_READ {
        let step = match decode_frame(&buf) {
            Ok(Decoded::Need(n)) => match oversized(&buf, n) {
                Some(e) => machine.on_wire_error(e),
                None => {
                    let start = buf.len();
                    buf.resize(start + n, 0);
                    read_exact(stream, &mut buf[start..])?;
                    continue;
                }
            },
            Ok(Decoded::Frame { frame, consumed }) => {
                debug_assert_eq!(consumed, buf.len(), "reads stop at the frame's end");
                let step = machine.on_frame(&frame);
                buf.clear();
                step
            }
            Err(e) => machine.on_wire_error(e),
        };
        match step.progress {
            Progress::Pending => match step.send {
                Some(bytes) => send(stream, &bytes)?,
                None => debug_assert!(false, "a pending handshake always answers"),
            },
            Progress::Established(session) => return Ok((session, step.send)),
            Progress::Refused(refusal) => {
                if let Some(bytes) = step.send {
                    // Best effort: the peer may be gone already, and we are done either way.
                    let _ = stream.write_all(&bytes);
                }
                return Err(ExchangeError::Refused(refusal));
            }
        }
    }
    Err(ExchangeError::Io(io::Error::other(
        "handshake did not end after the most frames a handshake has",
    )))
}

/// Loop turns: a frame takes at most three (header, payload, decode) and a side receives at
/// most two frames; the rest is room.
const MAX_FRAMES_READ: usize = 16;

/// The error for a frame whose header announces more than any handshake frame holds, if it
/// does (`need` more bytes after `buf`).
fn oversized(buf: &[u8], need: usize) -> Option<PeerError> {
    let total = buf.len() + need;
    if total <= MAX_HANDSHAKE_FRAME_BYTES {
        return None;
    }
    // Only a decoded header asks for more than a header's bytes, so the kind is known.
    let kind = buf
        .first_chunk::<HEADER_LEN>()
        .and_then(|head| decode_header(head).ok())
        .map(|(h, _)| h.kind);
    Some(match kind {
        Some(kind) => PeerError::InvalidField {
            kind,
            reason: "longer than any handshake frame",
        },
        None => PeerError::PayloadTooLarge {
            length: u32::try_from(total - HEADER_LEN).unwrap_or(u32::MAX),
        },
    })
}

fn read_exact<S: Read>(stream: &mut S, buf: &mut [u8]) -> Result<(), ExchangeError> {
    match stream.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ExchangeError::Closed),
        Err(e) if is_disconnect(&e) => Err(ExchangeError::Closed),
        Err(e) => Err(ExchangeError::Io(e)),
    }
}

fn send<S: Write>(stream: &mut S, bytes: &[u8]) -> Result<(), ExchangeError> {
    match stream.write_all(bytes) {
        Ok(()) => Ok(()),
        Err(e) if is_disconnect(&e) => Err(ExchangeError::Closed),
        Err(e) => Err(ExchangeError::Io(e)),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::WriteZero
    )
}
