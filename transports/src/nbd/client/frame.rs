//! Transmission framing without IO: request headers into a caller's buffer, replies parsed
//! incrementally from whatever bytes have arrived (the pieces the bench's io_uring loop uses).

use crate::nbd::wire::{
    ExtendedReplyHeader, ReplyChunk, Request, SimpleReply, StructuredReplyHeader, WireError,
    EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REPLY_FLAG_DONE,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

use super::ClientError;

/// Writes the header of `req` into the front of `out` (28 bytes compact, 32 extended) and
/// returns its length. The caller appends a write's payload.
pub fn encode_request(req: &Request, extended: bool, out: &mut [u8]) -> Result<usize, ClientError> {
    let len = Request::header_len(extended);
    let out = out.get_mut(..len).ok_or(ClientError::InvalidRequest(
        "buffer shorter than a request header",
    ))?;
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    out[0..4].copy_from_slice(&magic.to_be_bytes());
    out[4..6].copy_from_slice(&req.flags.to_be_bytes());
    out[6..8].copy_from_slice(&req.kind.to_be_bytes());
    out[8..16].copy_from_slice(&req.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&req.offset.to_be_bytes());
    if extended {
        out[24..32].copy_from_slice(&req.length.to_be_bytes());
    } else {
        let length = u32::try_from(req.length)
            .map_err(|_| ClientError::InvalidRequest("length over 4 GiB needs extended headers"))?;
        out[24..28].copy_from_slice(&length.to_be_bytes());
    }
    Ok(len)
}

/// A request header as a stack array plus its length (for `extend_from_slice`).
pub fn request_header(
    req: &Request,
    extended: bool,
) -> Result<([u8; EXTENDED_REQUEST_LEN], usize), ClientError> {
    let mut b = [0u8; EXTENDED_REQUEST_LEN];
    let len = encode_request(req, extended, &mut b)?;
    Ok((b, len))
}

/// One reply message parsed from a receive buffer, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFrame<'a> {
    /// A simple reply (always the whole reply); `data` is a successful read's data.
    Simple {
        /// The request's cookie.
        cookie: u64,
        /// NBD errno (0: success).
        error: u32,
        /// Read data (empty for other commands and with structured replies).
        data: &'a [u8],
    },
    /// One structured or extended reply chunk.
    Chunk {
        /// The request's cookie.
        cookie: u64,
        /// Reply flags; `REPLY_FLAG_DONE` marks the last chunk.
        flags: u16,
        /// The request's offset, echoed by extended headers (`None` for structured ones).
        request_offset: Option<u64>,
        /// The parsed chunk.
        chunk: ReplyChunk<'a>,
    },
}

impl ReplyFrame<'_> {
    /// The cookie of the request this frame answers.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyFrame::Simple { cookie, .. } | ReplyFrame::Chunk { cookie, .. } => *cookie,
        }
    }

    /// Whether this frame ends its reply.
    pub fn is_last(&self) -> bool {
        match self {
            ReplyFrame::Simple { .. } => true,
            ReplyFrame::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

/// What [`ReplyParser::parse`] found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole frame, `len` bytes long: consume them and parse again.
    Frame {
        /// The frame.
        frame: ReplyFrame<'a>,
        /// Bytes it took.
        len: usize,
    },
    /// The buffer holds a valid prefix; at least `needed` more bytes are required.
    Incomplete {
        /// Minimum number of additional bytes.
        needed: usize,
    },
}

/// Incremental reply parser for one connection: give it the bytes received so far and it
/// returns the first frame (or how many more bytes it needs). It keeps no state and copies
/// nothing, so a caller can parse in place in its own receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyParser {
    structured: bool,
    extended: bool,
    max_chunk_bytes: u64,
}

impl ReplyParser {
    /// A parser for the modes the handshake agreed on (extended implies structured); chunks
    /// are bounded by 64 MiB (twice the largest request the server accepts).
    pub fn new(structured: bool, extended: bool) -> Self {
        ReplyParser {
            structured: structured || extended,
            extended,
            max_chunk_bytes: 64 << 20,
        }
    }

    /// Changes the bound on one chunk's payload (a larger one is a protocol error).
    pub fn with_max_chunk_bytes(mut self, max: u64) -> Self {
        self.max_chunk_bytes = max;
        self
    }

    /// The bound on one chunk's payload.
    pub fn max_chunk_bytes(&self) -> u64 {
        self.max_chunk_bytes
    }

    /// Parses the frame at the front of `buf`. A simple reply does not say how much data
    /// follows it, so `read_len(cookie)` tells: the data length of a successful simple reply
    /// for that request (0 for anything but a read), or `None` if no such request is in flight
    /// ([`ClientError::UnknownCookie`]).
    pub fn parse<'a>(
        &self,
        buf: &'a [u8],
        read_len: impl FnOnce(u64) -> Option<usize>,
    ) -> Result<Parsed<'a>, ClientError> {
        let Some(magic) = buf.first_chunk::<4>().map(|m| u32::from_be_bytes(*m)) else {
            return Ok(Parsed::Incomplete {
                needed: 4 - buf.len(),
            });
        };
        let incomplete = |e: WireError| match e {
            WireError::Incomplete { needed } => Ok(Parsed::Incomplete { needed }),
            e => Err(ClientError::Wire(e)),
        };
        let (cookie, flags, kind, request_offset, length, at) = match magic {
            SIMPLE_REPLY_MAGIC => {
                if self.extended {
                    return Err(ClientError::Protocol("simple reply after extended headers"));
                }
                let (r, at) = match SimpleReply::decode(buf) {
                    Ok(v) => v,
                    Err(e) => return incomplete(e),
                };
                let data_len = read_len(r.cookie).ok_or(ClientError::UnknownCookie(r.cookie))?;
                // Structured replies carry read data in chunks, never after a simple reply.
                let data_len = if r.error == 0 && !self.structured {
                    data_len
                } else {
                    0
                };
                let len = at
                    .checked_add(data_len)
                    .ok_or(ClientError::Protocol("read data longer than memory"))?;
                if buf.len() < len {
                    return Ok(Parsed::Incomplete {
                        needed: len - buf.len(),
                    });
                }
                let frame = ReplyFrame::Simple {
                    cookie: r.cookie,
                    error: r.error,
                    data: &buf[at..len],
                };
                return Ok(Parsed::Frame { frame, len });
            }
            STRUCTURED_REPLY_MAGIC => {
                if !self.structured || self.extended {
                    return Err(ClientError::Protocol(
                        "structured reply chunk not negotiated",
                    ));
                }
                let (h, at) = match StructuredReplyHeader::decode(buf) {
                    Ok(v) => v,
                    Err(e) => return incomplete(e),
                };
                (h.cookie, h.flags, h.kind, None, u64::from(h.length), at)
            }
            EXTENDED_REPLY_MAGIC => {
                if !self.extended {
                    return Err(ClientError::Protocol("extended reply chunk not negotiated"));
                }
                let (h, at) = match ExtendedReplyHeader::decode(buf) {
                    Ok(v) => v,
                    Err(e) => return incomplete(e),
                };
                (h.cookie, h.flags, h.kind, Some(h.offset), h.length, at)
            }
            found => {
                return Err(ClientError::Wire(WireError::BadMagic {
                    expected: SIMPLE_REPLY_MAGIC.into(),
                    found: found.into(),
                }))
            }
        };
        if length > self.max_chunk_bytes {
            return Err(ClientError::Protocol(
                "reply chunk larger than the client's bound",
            ));
        }
        // Bounded by `max_chunk_bytes` above.
        let len = at + length as usize;
        if buf.len() < len {
            return Ok(Parsed::Incomplete {
                needed: len - buf.len(),
            });
        }
        let chunk = ReplyChunk::parse(kind, &buf[at..len])?;
        let frame = ReplyFrame::Chunk {
            cookie,
            flags,
            request_offset,
            chunk,
        };
        Ok(Parsed::Frame { frame, len })
    }
}
