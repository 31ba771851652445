//! Pure NBD wire codec for the server side (no IO, no unbounded allocation).
//!
//! Implements the message layouts of the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd project, including the `EXTENDED_HEADERS` extension) so the
//! connection state machine never touches raw bytes itself.
//!
//! # Decoding contract
//!
//! Every framed decoder takes the bytes received so far (`&[u8]`, possibly a partially
//! filled receive buffer) and returns either the value plus the number of bytes it consumed,
//! or a [`WireError`]:
//!
//! * [`WireError::Incomplete`] — the buffer holds a valid prefix; read at least `needed`
//!   more bytes and call again. Nothing is consumed.
//! * anything else — a hard protocol error; see [`WireError::option_reply_type`] for the
//!   handshake errors a server can answer instead of disconnecting.
//!
//! Decoders borrow from the buffer (names, queries, payloads are `&[u8]`/`&str` slices), never
//! panic on any input and never allocate. Payload parsers (e.g. [`ClientOption::parse`]) run on
//! an already complete frame, so they report malformed data, never `Incomplete`.
//!
//! # Encoding
//!
//! Encoders append to a `Vec<u8>` (or return fixed arrays for headers that are sent with a
//! separate data buffer, e.g. by `writev`). Server-side string fields are truncated to
//! [`MAX_STRING_LEN`] bytes on a character boundary so a reply can never break the spec's
//! string limit.

mod consts;
mod handshake;
mod reply_chunk;
mod transmission;

#[cfg(test)]
mod tests;

pub use consts::*;
pub use handshake::*;
pub use reply_chunk::*;
pub use transmission::*;

/// The one error type of the codec; the variant tells the server how to react.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is a valid prefix; at least `needed` more bytes are required.
    #[error("incomplete message: at least {needed} more bytes needed")]
    Incomplete {
        /// Minimum number of additional bytes before decoding can make progress.
        needed: usize,
    },
    /// A magic number did not match; the stream is out of sync, so hang up.
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// The magic the decoder expected.
        expected: u64,
        /// What was on the wire.
        found: u64,
    },
    /// The client set flags it does not know or the server did not offer; the spec requires
    /// the server to drop the connection.
    #[error("client flags {flags:#x} are unknown or were not offered")]
    UnsupportedClientFlags {
        /// The full client flags word.
        flags: u32,
    },
    /// An option payload is longer than [`MAX_OPTION_LEN`]. The server either discards
    /// `length` bytes and answers `REP_ERR_TOO_BIG`, or disconnects.
    #[error("option {option} has {length} bytes of data, more than the {max} allowed", max = MAX_OPTION_LEN)]
    OptionTooLarge {
        /// Option code from the header.
        option: u32,
        /// Declared payload length.
        length: u32,
    },
    /// An option payload is malformed; the server answers `REP_ERR_INVALID` (the frame was
    /// fully consumed, negotiation continues). For `OPT_EXPORT_NAME` it must disconnect.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// Option code from the header.
        option: u32,
        /// Human-readable reason, suitable for the error reply's message.
        reason: &'static str,
    },
    /// A request carries a payload longer than the server accepts; hard disconnect (the
    /// payload cannot be skipped without reading it).
    #[error("request payload of {length} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Declared payload length.
        length: u64,
        /// The limit the server passed in.
        max: u64,
    },
    /// A request payload is malformed; the server answers the request with `EINVAL`.
    #[error("invalid request payload: {reason}")]
    InvalidPayload {
        /// Human-readable reason.
        reason: &'static str,
    },
    /// A server-to-client message is malformed (used when decoding replies, e.g. in tests or
    /// a client).
    #[error("invalid reply: {reason}")]
    InvalidReply {
        /// Human-readable reason.
        reason: &'static str,
    },
}

impl WireError {
    /// True when more bytes would let decoding proceed (not a protocol violation).
    pub fn is_incomplete(&self) -> bool {
        matches!(self, WireError::Incomplete { .. })
    }

    /// The option reply error type a server may send instead of disconnecting, if any.
    ///
    /// `None` means the error is fatal to the connection (or not a handshake error).
    pub fn option_reply_type(&self) -> Option<u32> {
        match self {
            WireError::OptionTooLarge { .. } => Some(REP_ERR_TOO_BIG),
            WireError::InvalidOption { .. } => Some(REP_ERR_INVALID),
            _ => None,
        }
    }

    /// The NBD errno a server answers a request with for this error, if it is recoverable.
    pub fn errno(&self) -> Option<u32> {
        match self {
            WireError::InvalidPayload { .. } => Some(EINVAL),
            _ => None,
        }
    }
}

/// `Incomplete` for a message of `total` bytes when `have` are present.
fn incomplete(total: usize, have: usize) -> WireError {
    WireError::Incomplete {
        needed: total.saturating_sub(have).max(1),
    }
}

/// Fails with `Incomplete` unless `buf` holds at least `total` bytes.
fn need(buf: &[u8], total: usize) -> Result<(), WireError> {
    if buf.len() < total {
        Err(incomplete(total, buf.len()))
    } else {
        Ok(())
    }
}

/// Bounds-checked big-endian cursor; every read returns `None` instead of panicking.
#[derive(Debug, Clone)]
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.rest.split_first_chunk::<N>()?;
        self.rest = tail;
        Some(*head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

/// Validates a protocol string: at most [`MAX_STRING_LEN`] bytes, UTF-8, no NUL.
fn wire_str(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    std::str::from_utf8(bytes).map_err(|_| "string is not valid UTF-8")
}

/// Truncates `s` to at most [`MAX_STRING_LEN`] bytes on a character boundary.
fn clamp_str(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Length of a string field that [`clamp_str`] has already bounded.
fn str_len_u32(s: &str) -> u32 {
    // `clamp_str` bounds every server-side string to 4096 bytes; client-side encoders assert.
    u32::try_from(s.len()).expect("string length fits in u32")
}

/// Converts a length to `u32`, panicking with `what` (documented on each encoder) if it does not fit.
fn len_u32(len: usize, what: &str) -> u32 {
    match u32::try_from(len) {
        Ok(v) => v,
        Err(_) => panic!("{what} of {len} bytes does not fit the 32-bit length field"),
    }
}
