//! Transmission phase: requests, simple replies and structured/extended reply chunks (their
//! client-side decoding is in `reply_chunk`).

use super::{
    clamp_str, len_u32, need, Reader, WireError, CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC,
    CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, CMD_READ, CMD_RESIZE, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    EXTENDED_REPLY_HEADER_LEN, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC,
    MAX_BLOCK_STATUS_EXTENTS, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_LEN, REQUEST_MAGIC, SIMPLE_REPLY_LEN,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};

/// Largest data length of one `OFFSET_DATA` chunk (the 32-bit chunk length includes the
/// 8-byte offset).
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;

/// Length a compact (`REPLY_TYPE_BLOCK_STATUS`) descriptor is clamped to when an extent is
/// longer than 32 bits: the largest multiple of 64 KiB, hence of every legal minimum block size.
pub const COMPACT_EXTENT_CLAMP: u32 = 0xffff_0000;

// ---------------------------------------------------------------------------------------------
// Requests.
// ---------------------------------------------------------------------------------------------

/// Known command types, for matching; the request keeps the raw value so unknown commands can
/// still be answered with `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `CMD_READ`.
    Read,
    /// `CMD_WRITE`.
    Write,
    /// `CMD_DISC`.
    Disc,
    /// `CMD_FLUSH`.
    Flush,
    /// `CMD_TRIM`.
    Trim,
    /// `CMD_CACHE`.
    Cache,
    /// `CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `CMD_RESIZE`.
    Resize,
}

impl Command {
    /// Maps a raw command type; `None` for unknown ones.
    pub fn from_raw(kind: u16) -> Option<Self> {
        Some(match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            CMD_RESIZE => Command::Resize,
            _ => return None,
        })
    }

    /// The raw command type.
    pub fn raw(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Resize => CMD_RESIZE,
        }
    }
}

/// A transmission request header, compact or extended (the compact 32-bit length is widened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Raw command type (`CMD_*`); see [`Request::command`].
    pub kind: u16,
    /// Opaque client cookie, echoed in every reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Payload or effect length (see [`Request::payload_len`]).
    pub length: u64,
}

impl Request {
    /// Header size for the negotiated header style.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Decodes a request header (28 bytes compact, 32 extended). The magic must match the
    /// negotiated style; a mismatch is [`WireError::BadMagic`] (hard disconnect).
    ///
    /// Flags and command are not validated here: those errors get an `EINVAL` reply.
    pub fn decode(buf: &[u8], extended: bool) -> Result<(Self, usize), WireError> {
        let (len, expected) = if extended {
            (EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC)
        } else {
            (REQUEST_LEN, REQUEST_MAGIC)
        };
        need(buf, len)?;
        let mut r = Reader::new(buf);
        let magic = r.u32().unwrap_or_default();
        if magic != expected {
            return Err(WireError::BadMagic {
                expected: expected.into(),
                found: magic.into(),
            });
        }
        let flags = r.u16().unwrap_or_default();
        let kind = r.u16().unwrap_or_default();
        let cookie = r.u64().unwrap_or_default();
        let offset = r.u64().unwrap_or_default();
        let length = if extended {
            r.u64().unwrap_or_default()
        } else {
            r.u32().unwrap_or_default().into()
        };
        Ok((
            Request {
                flags,
                kind,
                cookie,
                offset,
                length,
            },
            len,
        ))
    }

    /// Decodes a request and its payload when the whole frame is in `buf`:
    /// `(request, payload, consumed)`. Useful for small payloads; large writes are better
    /// read straight into their own buffer after [`Request::decode`] + [`Request::payload_len`].
    pub fn decode_frame(
        buf: &[u8],
        extended: bool,
        max_payload: u64,
    ) -> Result<(Self, &[u8], usize), WireError> {
        let (req, at) = Self::decode(buf, extended)?;
        let payload = req.payload_len(extended, max_payload)?;
        // The payload is bounded by `max_payload`; refuse what cannot be addressed at all.
        let total = usize::try_from(payload)
            .ok()
            .and_then(|p| p.checked_add(at))
            .ok_or(WireError::PayloadTooLarge {
                length: payload,
                max: max_payload,
            })?;
        need(buf, total)?;
        Ok((req, &buf[at..total], total))
    }

    /// Number of payload bytes that follow the header on the wire.
    ///
    /// `CMD_WRITE` always carries `length` bytes. With extended headers, any other request
    /// carries a payload exactly when it sets `CMD_FLAG_PAYLOAD_LEN`. (The extension says a
    /// client MUST set the flag on writes; some clients, qemu among them, do not, and a write's
    /// bytes follow either way, so accepting both keeps the framing.) A payload above
    /// `max_payload` is [`WireError::PayloadTooLarge`]: the spec lets the server hang up rather
    /// than swallow it.
    pub fn payload_len(&self, extended: bool, max_payload: u64) -> Result<u64, WireError> {
        let has_payload =
            self.kind == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if !has_payload {
            return Ok(0);
        }
        if self.length > max_payload {
            return Err(WireError::PayloadTooLarge {
                length: self.length,
                max: max_payload,
            });
        }
        Ok(self.length)
    }

    /// The command, if known.
    pub fn command(&self) -> Option<Command> {
        Command::from_raw(self.kind)
    }

    /// Where replies to this request go (cookie, and request offset for extended headers).
    pub fn reply_target(&self, extended: bool) -> ReplyTarget {
        ReplyTarget {
            cookie: self.cookie,
            offset: self.offset,
            extended,
        }
    }

    /// Appends the header (client side: tests, fuzz, tools).
    ///
    /// # Panics
    /// In compact mode, if `length` does not fit in 32 bits.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            let len = u32::try_from(self.length).expect("compact request length fits in 32 bits");
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

/// Payload of an extended `CMD_BLOCK_STATUS` with `CMD_FLAG_PAYLOAD_LEN`: an effect length and
/// the context ids the client wants answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusPayload<'a> {
    /// The range length the query covers (the header `length` is the payload length).
    pub effect_length: u64,
    /// Big-endian u32 context ids.
    ids: &'a [u8],
}

impl<'a> BlockStatusPayload<'a> {
    /// Parses the payload; a malformed one is [`WireError::InvalidPayload`] (reply `EINVAL`).
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let effect_length = r.u64().ok_or(WireError::InvalidPayload {
            reason: "block status payload shorter than 8 bytes",
        })?;
        let ids = r.rest();
        if !ids.len().is_multiple_of(4) {
            return Err(WireError::InvalidPayload {
                reason: "block status payload is not 8 + 4*n bytes",
            });
        }
        Ok(BlockStatusPayload { effect_length, ids })
    }

    /// Number of context ids.
    pub fn len(&self) -> usize {
        self.ids.len() / 4
    }

    /// Whether no id was listed.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The requested context ids in client order (duplicates are the server's to reject).
    pub fn ids(&self) -> impl Iterator<Item = u32> + 'a {
        self.ids
            .chunks_exact(4)
            .filter_map(|c| c.first_chunk::<4>().map(|a| u32::from_be_bytes(*a)))
    }

    /// Encodes the payload (client side: tests, fuzz, tools).
    pub fn encode(out: &mut Vec<u8>, effect_length: u64, ids: &[u32]) {
        out.extend_from_slice(&effect_length.to_be_bytes());
        for id in ids {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reply headers.
// ---------------------------------------------------------------------------------------------

/// The 16-byte reply used without structured replies (and allowed for payload-less replies
/// with structured replies, never with extended headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD errno (`0` for success).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Wire form; for a successful read the data follows directly.
    pub fn to_bytes(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    /// Appends [`SimpleReply::to_bytes`] to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client-side decode.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        need(buf, SIMPLE_REPLY_LEN)?;
        let mut r = Reader::new(buf);
        let magic = r.u32().unwrap_or_default();
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let error = r.u32().unwrap_or_default();
        let cookie = r.u64().unwrap_or_default();
        Ok((SimpleReply { error, cookie }, SIMPLE_REPLY_LEN))
    }
}

/// Header of a structured reply chunk (after `OPT_STRUCTURED_REPLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length that follows.
    pub length: u32,
}

impl StructuredReplyHeader {
    /// Wire form, for sending with a separate payload buffer.
    pub fn to_bytes(&self) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Appends [`StructuredReplyHeader::to_bytes`] to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client-side decode of the header only.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        need(buf, STRUCTURED_REPLY_HEADER_LEN)?;
        let mut r = Reader::new(buf);
        let magic = r.u32().unwrap_or_default();
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let flags = r.u16().unwrap_or_default();
        let kind = r.u16().unwrap_or_default();
        let cookie = r.u64().unwrap_or_default();
        let length = r.u32().unwrap_or_default();
        Ok((
            StructuredReplyHeader {
                flags,
                kind,
                cookie,
                length,
            },
            STRUCTURED_REPLY_HEADER_LEN,
        ))
    }
}

/// Header of an extended reply chunk (after `OPT_EXTENDED_HEADERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedReplyHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (echoed, whatever the chunk describes).
    pub offset: u64,
    /// Payload length that follows.
    pub length: u64,
}

impl ExtendedReplyHeader {
    /// Wire form, for sending with a separate payload buffer.
    pub fn to_bytes(&self) -> [u8; EXTENDED_REPLY_HEADER_LEN] {
        let mut b = [0u8; EXTENDED_REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Appends [`ExtendedReplyHeader::to_bytes`] to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client-side decode of the header only.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        need(buf, EXTENDED_REPLY_HEADER_LEN)?;
        let mut r = Reader::new(buf);
        let magic = r.u32().unwrap_or_default();
        if magic != EXTENDED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                expected: EXTENDED_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let flags = r.u16().unwrap_or_default();
        let kind = r.u16().unwrap_or_default();
        let cookie = r.u64().unwrap_or_default();
        let offset = r.u64().unwrap_or_default();
        let length = r.u64().unwrap_or_default();
        Ok((
            ExtendedReplyHeader {
                flags,
                kind,
                cookie,
                offset,
                length,
            },
            EXTENDED_REPLY_HEADER_LEN,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Reply chunk builders.
// ---------------------------------------------------------------------------------------------

/// One block status descriptor (the compact form narrows it to 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extent {
    /// Extent length in bytes; must be nonzero.
    pub length: u64,
    /// Context-defined status flags (`STATE_*` for `base:allocation`).
    pub status: u64,
}

/// Addresses the chunks of one reply: the request's cookie and offset, and whether extended
/// headers were negotiated. Its builders pick the right header so server code is the same
/// for structured and extended replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTarget {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (only sent in extended headers).
    pub offset: u64,
    /// Use 32-byte extended headers instead of 20-byte structured ones.
    pub extended: bool,
}

impl ReplyTarget {
    /// Size of the chunk header this target writes.
    pub fn header_len(&self) -> usize {
        if self.extended {
            EXTENDED_REPLY_HEADER_LEN
        } else {
            STRUCTURED_REPLY_HEADER_LEN
        }
    }

    /// Appends a chunk header for a payload of `payload_len` bytes that the caller sends next.
    pub fn encode_header(&self, out: &mut Vec<u8>, flags: u16, kind: u16, payload_len: u32) {
        if self.extended {
            ExtendedReplyHeader {
                flags,
                kind,
                cookie: self.cookie,
                offset: self.offset,
                length: payload_len.into(),
            }
            .encode(out);
        } else {
            StructuredReplyHeader {
                flags,
                kind,
                cookie: self.cookie,
                length: payload_len,
            }
            .encode(out);
        }
    }

    /// Appends the empty final chunk (`REPLY_TYPE_NONE` with `REPLY_FLAG_DONE`).
    pub fn encode_none(&self, out: &mut Vec<u8>) {
        self.encode_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    }

    /// Appends an `OFFSET_DATA` header and its 8-byte offset; the caller sends `data_len`
    /// bytes of data next (zero-copy reads).
    ///
    /// # Panics
    /// If `data_len` exceeds [`MAX_OFFSET_DATA_LEN`] (split such reads into several chunks).
    pub fn encode_offset_data_header(
        &self,
        out: &mut Vec<u8>,
        flags: u16,
        offset: u64,
        data_len: u32,
    ) {
        assert!(
            data_len <= MAX_OFFSET_DATA_LEN,
            "OFFSET_DATA chunk of {data_len} bytes is too long"
        );
        self.encode_header(out, flags, REPLY_TYPE_OFFSET_DATA, data_len + 8);
        out.extend_from_slice(&offset.to_be_bytes());
    }

    /// Appends a complete `OFFSET_DATA` chunk including `data`.
    ///
    /// # Panics
    /// If `data` is longer than [`MAX_OFFSET_DATA_LEN`].
    pub fn encode_offset_data(&self, out: &mut Vec<u8>, flags: u16, offset: u64, data: &[u8]) {
        self.encode_offset_data_header(out, flags, offset, len_u32(data.len(), "OFFSET_DATA"));
        out.extend_from_slice(data);
    }

    /// Appends an `OFFSET_HOLE` chunk. The hole size is 32 bits even with extended headers
    /// (the spec keeps it so); larger holes take several chunks. `size` must be nonzero.
    pub fn encode_offset_hole(&self, out: &mut Vec<u8>, flags: u16, offset: u64, size: u32) {
        self.encode_header(out, flags, REPLY_TYPE_OFFSET_HOLE, 12);
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&size.to_be_bytes());
    }

    /// Appends an `ERROR` chunk; `error` is a nonzero NBD errno, `message` (truncated to
    /// 4096 bytes) is shown to the user.
    pub fn encode_error(&self, out: &mut Vec<u8>, flags: u16, error: u32, message: &str) {
        let message = clamp_str(message);
        // At most 4096 bytes, so both casts are lossless.
        self.encode_header(out, flags, REPLY_TYPE_ERROR, 6 + message.len() as u32);
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message.as_bytes());
    }

    /// Appends an `ERROR_OFFSET` chunk: like [`ReplyTarget::encode_error`], pinned to the
    /// export offset where the error happened.
    pub fn encode_error_offset(
        &self,
        out: &mut Vec<u8>,
        flags: u16,
        error: u32,
        message: &str,
        offset: u64,
    ) {
        let message = clamp_str(message);
        self.encode_header(
            out,
            flags,
            REPLY_TYPE_ERROR_OFFSET,
            14 + message.len() as u32,
        );
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message.as_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
    }

    /// Appends the block status chunk for one metadata context: `BLOCK_STATUS_EXT` with
    /// extended headers, `BLOCK_STATUS` otherwise. Returns how many descriptors were written.
    ///
    /// At most [`MAX_BLOCK_STATUS_EXTENTS`] are sent. In the compact form an extent longer
    /// than 32 bits is clamped to [`COMPACT_EXTENT_CLAMP`] and ends the list (the spec lets a
    /// server describe less than asked), and status bits above 32 are dropped (the compact
    /// form cannot carry them).
    ///
    /// # Panics
    /// If `extents` is empty (a status chunk needs at least one descriptor).
    pub fn encode_block_status(
        &self,
        out: &mut Vec<u8>,
        flags: u16,
        context_id: u32,
        extents: &[Extent],
    ) -> usize {
        assert!(
            !extents.is_empty(),
            "a block status chunk needs at least one extent"
        );
        let extents = &extents[..extents.len().min(MAX_BLOCK_STATUS_EXTENTS)];
        if self.extended {
            let n = extents.len();
            // n <= 2^20, so 8 + 16n and n fit in u32.
            self.encode_header(out, flags, REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * n as u32);
            out.extend_from_slice(&context_id.to_be_bytes());
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for e in extents {
                out.extend_from_slice(&e.length.to_be_bytes());
                out.extend_from_slice(&e.status.to_be_bytes());
            }
            n
        } else {
            let n = extents
                .iter()
                .position(|e| e.length > u64::from(u32::MAX))
                .map_or(extents.len(), |i| i + 1);
            self.encode_header(out, flags, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n as u32);
            out.extend_from_slice(&context_id.to_be_bytes());
            for e in &extents[..n] {
                let length = u32::try_from(e.length).unwrap_or(COMPACT_EXTENT_CLAMP);
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(&(e.status as u32).to_be_bytes());
            }
            n
        }
    }
}
