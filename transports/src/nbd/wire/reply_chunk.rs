//! Reply chunk payload decoding (client side: tests, fuzz, tools).

use super::{
    wire_str, Extent, Reader, WireError, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS_EXT,
    REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
};

/// Block status descriptors borrowed from a chunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors<'a> {
    raw: &'a [u8],
    wide: bool,
}

impl<'a> Descriptors<'a> {
    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.raw.len() / if self.wide { 16 } else { 8 }
    }

    /// Whether there are none (never true for a parsed chunk).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The descriptors, widened to [`Extent`].
    pub fn iter(&self) -> impl Iterator<Item = Extent> + 'a {
        let mut r = Reader::new(self.raw);
        let wide = self.wide;
        std::iter::from_fn(move || {
            if wide {
                Some(Extent {
                    length: r.u64()?,
                    status: r.u64()?,
                })
            } else {
                Some(Extent {
                    length: r.u32()?.into(),
                    status: r.u32()?.into(),
                })
            }
        })
    }
}

/// A parsed structured/extended reply chunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyChunk<'a> {
    /// `REPLY_TYPE_NONE`.
    None,
    /// `REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Export offset of `data`.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Export offset of the hole.
        offset: u64,
        /// Hole size.
        size: u32,
    },
    /// `REPLY_TYPE_BLOCK_STATUS` or `REPLY_TYPE_BLOCK_STATUS_EXT`.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// The descriptors.
        descriptors: Descriptors<'a>,
    },
    /// `REPLY_TYPE_ERROR`.
    Error {
        /// NBD errno.
        error: u32,
        /// Message.
        message: &'a str,
    },
    /// `REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// NBD errno.
        error: u32,
        /// Message.
        message: &'a str,
        /// Offset of the failure.
        offset: u64,
    },
    /// Any other chunk type.
    Unknown {
        /// Chunk type.
        kind: u16,
        /// Raw payload.
        payload: &'a [u8],
    },
}

impl<'a> ReplyChunk<'a> {
    /// Parses a chunk payload of type `kind`, checking the spec's length rules.
    pub fn parse(kind: u16, payload: &'a [u8]) -> Result<Self, WireError> {
        let bad = |reason| WireError::InvalidReply { reason };
        let mut r = Reader::new(payload);
        Ok(match kind {
            REPLY_TYPE_NONE if payload.is_empty() => ReplyChunk::None,
            REPLY_TYPE_NONE => return Err(bad("NONE chunk with payload")),
            REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64().ok_or(bad("OFFSET_DATA shorter than 8 bytes"))?;
                if r.remaining() == 0 {
                    return Err(bad("OFFSET_DATA without data"));
                }
                ReplyChunk::OffsetData {
                    offset,
                    data: r.rest(),
                }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if payload.len() != 12 {
                    return Err(bad("OFFSET_HOLE length is not 12"));
                }
                let offset = r.u64().unwrap_or_default();
                let size = r.u32().unwrap_or_default();
                ReplyChunk::OffsetHole { offset, size }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32().ok_or(bad("BLOCK_STATUS shorter than 4 bytes"))?;
                let raw = r.rest();
                if raw.is_empty() || !raw.len().is_multiple_of(8) {
                    return Err(bad("BLOCK_STATUS length is not 4 + 8*n, n > 0"));
                }
                ReplyChunk::BlockStatus {
                    context_id,
                    descriptors: Descriptors { raw, wide: false },
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let context_id = r
                    .u32()
                    .ok_or(bad("BLOCK_STATUS_EXT shorter than 8 bytes"))?;
                let count = r
                    .u32()
                    .ok_or(bad("BLOCK_STATUS_EXT shorter than 8 bytes"))?;
                let raw = r.rest();
                if raw.is_empty()
                    || !raw.len().is_multiple_of(16)
                    || (raw.len() / 16) as u64 != u64::from(count)
                {
                    return Err(bad(
                        "BLOCK_STATUS_EXT length is not 8 + 16*count, count > 0",
                    ));
                }
                ReplyChunk::BlockStatus {
                    context_id,
                    descriptors: Descriptors { raw, wide: true },
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32().ok_or(bad("error chunk shorter than 6 bytes"))?;
                let len = r.u16().ok_or(bad("error chunk shorter than 6 bytes"))?;
                let msg = r
                    .bytes(len.into())
                    .ok_or(bad("error message exceeds chunk"))?;
                let message = wire_str(msg).map_err(bad)?;
                if kind == REPLY_TYPE_ERROR {
                    if r.remaining() != 0 {
                        return Err(bad("trailing bytes in ERROR chunk"));
                    }
                    ReplyChunk::Error { error, message }
                } else {
                    let offset = r.u64().ok_or(bad("ERROR_OFFSET without offset"))?;
                    if r.remaining() != 0 {
                        return Err(bad("trailing bytes in ERROR_OFFSET chunk"));
                    }
                    ReplyChunk::ErrorOffset {
                        error,
                        message,
                        offset,
                    }
                }
            }
            _ => ReplyChunk::Unknown { kind, payload },
        })
    }
}
