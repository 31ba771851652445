//! A small NBD client on top of the wire codec: the one place outside the server that frames
//! NBD messages (the bench's load generator and the tests use it).
//!
//! Two layers:
//!
//! * Pieces with no IO of their own, for callers that drive sockets themselves (the bench's
//!   io_uring load generator): [`handshake`] over any blocking `Read + Write`,
//!   [`encode_request`] into a caller's buffer, and [`ReplyParser`], which parses replies
//!   incrementally from whatever bytes have arrived.
//! * [`Client`]: a blocking client for tests and tools, one request at a time
//!   (`read`/`write`/`flush`/`trim`/`write_zeroes`/`block_status`).
//!
//! Everything the server sends is bounded before it is buffered (option replies by
//! [`MAX_OPTION_LEN`](super::wire::MAX_OPTION_LEN), reply chunks and reads by
//! [`ReplyParser::max_chunk_bytes`]), and a misbehaving server is an error, never a panic.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::wire::{
    Extent, ReplyChunk, Request, WireError, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_PAYLOAD_LEN,
    CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EIO, EXTENDED_REPLY_HEADER_LEN,
    REPLY_TYPE_FLAG_ERROR,
};

mod frame;
mod handshake;

pub use frame::{encode_request, request_header, Parsed, ReplyFrame, ReplyParser};
pub use handshake::{handshake, Export, Options};

use handshake::read_exact;

/// Most reply chunks one request may take (a read of 32 MiB as 4 KiB chunks is 8192).
const MAX_CHUNKS_PER_REPLY: usize = 1 << 16;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (or a read/write timed out).
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("the NBD server closed the connection")]
    Closed,
    /// The server sent bytes the codec rejects (bad magic, malformed reply).
    #[error("the NBD server sent a malformed message: {0}")]
    Wire(#[from] WireError),
    /// The server does not speak fixed newstyle (the only handshake this client knows).
    #[error("not a fixed-newstyle NBD server (handshake flags {flags:#x})")]
    NotFixedNewstyle {
        /// The greeting's handshake flags.
        flags: u16,
    },
    /// The server answered an option with an error reply (e.g. an unknown export).
    #[error("the NBD server refused option {option} (reply {reply:#x}): {message}")]
    Refused {
        /// The option (`OPT_*`).
        option: u32,
        /// The reply type (`REP_ERR_*`).
        reply: u32,
        /// The server's message (may be empty).
        message: String,
    },
    /// The server broke the protocol in a way the codec cannot see (order, cookies, modes).
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(&'static str),
    /// A reply names a cookie with no request in flight.
    #[error("NBD reply for unknown cookie {0}")]
    UnknownCookie(u64),
    /// A request cannot be encoded (too long for compact headers, buffer too small).
    #[error("NBD request cannot be encoded: {0}")]
    InvalidRequest(&'static str),
    /// The server answered a request with an NBD error.
    #[error(
        "NBD command {command} failed with error {errno}{}",
        message_suffix(message)
    )]
    Request {
        /// The command type (`CMD_*`).
        command: u16,
        /// The NBD errno (`EIO`, `EINVAL`, ...).
        errno: u32,
        /// The message of a structured error chunk (may be empty).
        message: String,
    },
}

/// `": message"`, or nothing for an empty message.
fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl ClientError {
    /// The NBD errno when the server answered a request with an error.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Request { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One request's whole reply, reassembled by [`Client::request`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// NBD errno (0: success); with several error chunks, the first.
    pub error: u32,
    /// The message of the first error chunk.
    pub message: String,
    /// A read's data (holes as zeros).
    pub data: Vec<u8>,
    /// Block status descriptors as (context id, extent).
    pub extents: Vec<(u32, Extent)>,
    /// How many frames the reply took.
    pub frames: usize,
}

/// A blocking NBD client: one request at a time on one stream (TCP or Unix).
#[derive(Debug)]
pub struct Client<S: Read + Write> {
    stream: S,
    export: Export,
    parser: ReplyParser,
    next_cookie: u64,
    rbuf: Vec<u8>,
}

impl Client<TcpStream> {
    /// Connects to `addr` (no Nagle delay) and negotiates `export`.
    pub fn connect_tcp(
        addr: impl ToSocketAddrs,
        export: &str,
        opts: Options,
    ) -> Result<Self, ClientError> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(opts.io_timeout)?;
        s.set_write_timeout(opts.io_timeout)?;
        Client::new(s, export, opts)
    }
}

impl Client<UnixStream> {
    /// Connects to the Unix socket at `path` and negotiates `export`.
    pub fn connect_unix(path: &Path, export: &str, opts: Options) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(opts.io_timeout)?;
        s.set_write_timeout(opts.io_timeout)?;
        Client::new(s, export, opts)
    }
}

impl<S: Read + Write> Client<S> {
    /// Runs the handshake on a connected stream (its timeouts are the caller's).
    pub fn new(mut stream: S, export: &str, opts: Options) -> Result<Self, ClientError> {
        let export = handshake(&mut stream, export, opts)?;
        Ok(Client {
            stream,
            parser: export.reply_parser(),
            export,
            next_cookie: 1,
            rbuf: Vec::new(),
        })
    }

    /// What the handshake agreed on.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// The stream, e.g. to send bytes the client would never send.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Ends the client, keeping the stream.
    pub fn into_stream(self) -> S {
        self.stream
    }

    /// Sends one request (header plus `payload`, which follows a write or, with extended
    /// headers, a request flagged `CMD_FLAG_PAYLOAD_LEN`); returns its cookie.
    pub fn send(&mut self, mut req: Request, payload: &[u8]) -> Result<u64, ClientError> {
        req.cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let (header, len) = request_header(&req, self.export.extended)?;
        let mut out = Vec::with_capacity(len + payload.len());
        out.extend_from_slice(&header[..len]);
        out.extend_from_slice(payload);
        self.stream.write_all(&out)?;
        Ok(req.cookie)
    }

    /// Reads the whole reply to the request `req` sent with `cookie`, which must be the next
    /// reply on the stream (a reply to another cookie is [`ClientError::UnknownCookie`]).
    /// Reads exactly the reply's bytes, so the stream stays at a frame boundary.
    ///
    /// A read longer than [`ReplyParser::max_chunk_bytes`] gets no buffer: its error reply
    /// arrives as usual, data for it is a [`ClientError::Protocol`] error (a test may ask the
    /// server for 1 TiB to see it refuse; the client never allocates that).
    pub fn receive(&mut self, cookie: u64, req: &Request) -> Result<Reply, ClientError> {
        let max = self.parser.max_chunk_bytes();
        // What follows a successful simple reply: the whole length, buffered or not.
        let read_len = match req.kind {
            CMD_READ => usize::try_from(req.length).unwrap_or(usize::MAX),
            _ => 0,
        };
        let mut reply = Reply {
            data: vec![0; if req.length <= max { read_len } else { 0 }],
            ..Reply::default()
        };
        // One frame's bytes at most: a header and a bounded payload.
        let max_frame = (max as usize).saturating_add(EXTENDED_REPLY_HEADER_LEN);
        self.rbuf.clear();
        for _ in 0..MAX_CHUNKS_PER_REPLY {
            let parsed = self
                .parser
                .parse(&self.rbuf, |c| (c == cookie).then_some(read_len))?;
            let (frame, len) = match parsed {
                Parsed::Incomplete { needed } => {
                    let have = self.rbuf.len();
                    if have.saturating_add(needed) > max_frame {
                        return Err(ClientError::Protocol(
                            "a reply larger than the client's bound",
                        ));
                    }
                    self.rbuf.resize(have + needed, 0);
                    read_exact(&mut self.stream, &mut self.rbuf[have..])?;
                    continue;
                }
                Parsed::Frame { frame, len } => (frame, len),
            };
            if frame.cookie() != cookie {
                return Err(ClientError::UnknownCookie(frame.cookie()));
            }
            reply.frames += 1;
            let last = frame.is_last();
            absorb(&mut reply, req, frame)?;
            self.rbuf.drain(..len);
            if last {
                return Ok(reply);
            }
        }
        Err(ClientError::Protocol("a reply of too many chunks"))
    }

    /// Sends `req` and reads its reply; an NBD error is in [`Reply::error`], not an `Err`.
    pub fn request(&mut self, req: Request, payload: &[u8]) -> Result<Reply, ClientError> {
        let cookie = self.send(req, payload)?;
        self.receive(cookie, &req)
    }

    /// [`Client::request`] with an NBD error turned into [`ClientError::Request`].
    fn command(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Reply, ClientError> {
        let req = Request {
            flags,
            kind,
            cookie: 0,
            offset,
            length,
        };
        let reply = self.request(req, payload)?;
        if reply.error != 0 {
            return Err(ClientError::Request {
                command: kind,
                errno: reply.error,
                message: reply.message,
            });
        }
        Ok(reply)
    }

    /// `CMD_READ` of `length` bytes at `offset` (at most [`ReplyParser::max_chunk_bytes`]).
    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, ClientError> {
        if u64::from(length) > self.parser.max_chunk_bytes() {
            return Err(ClientError::InvalidRequest(
                "read longer than the client buffers",
            ));
        }
        Ok(self.command(CMD_READ, 0, offset, length.into(), &[])?.data)
    }

    /// `CMD_WRITE` of `data` at `offset` with command flags `flags` (e.g. `CMD_FLAG_FUA`).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), ClientError> {
        // The extension asks writes to carry the payload flag with extended headers.
        let flags = if self.export.extended {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        self.command(CMD_WRITE, flags, offset, data.len() as u64, data)
            .map(drop)
    }

    /// `CMD_FLUSH`.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.command(CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }

    /// `CMD_TRIM` of `length` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, length: u64) -> Result<(), ClientError> {
        self.command(CMD_TRIM, 0, offset, length, &[]).map(drop)
    }

    /// `CMD_WRITE_ZEROES` of `length` bytes at `offset` with `flags` (e.g. `CMD_FLAG_NO_HOLE`).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        flags: u16,
    ) -> Result<(), ClientError> {
        self.command(CMD_WRITE_ZEROES, flags, offset, length, &[])
            .map(drop)
    }

    /// `CMD_BLOCK_STATUS` over `length` bytes at `offset`: the `base:allocation` extents
    /// (negotiate [`Options::base_allocation`]).
    pub fn block_status(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>, ClientError> {
        let id = self
            .export
            .base_allocation_id
            .ok_or(ClientError::InvalidRequest(
                "base:allocation was not negotiated",
            ))?;
        let reply = self.command(CMD_BLOCK_STATUS, 0, offset, length, &[])?;
        Ok(reply
            .extents
            .into_iter()
            .filter(|(c, _)| *c == id)
            .map(|(_, e)| e)
            .collect())
    }

    /// Sends `CMD_DISC` (best effort: the server drains and closes) and ends the client.
    pub fn disconnect(mut self) -> S {
        let req = Request {
            kind: CMD_DISC,
            ..Request::default()
        };
        let _ = self.send(req, &[]);
        self.stream
    }
}

/// Adds one frame of the reply to `req` to `reply`: for clients that pipeline requests and
/// parse replies themselves with [`ReplyParser`] ([`Client::receive`] uses it too).
pub fn absorb(reply: &mut Reply, req: &Request, frame: ReplyFrame) -> Result<(), ClientError> {
    let set_error = |reply: &mut Reply, error: u32, message: &str| {
        if reply.error == 0 {
            reply.error = error;
            reply.message = message.to_string();
        }
    };
    match frame {
        ReplyFrame::Simple { error, data, .. } => {
            set_error(reply, error, "");
            if !data.is_empty() {
                reply
                    .data
                    .get_mut(..)
                    .filter(|d| d.len() == data.len())
                    .ok_or(ClientError::Protocol("read data of another length"))?
                    .copy_from_slice(data);
            }
        }
        ReplyFrame::Chunk {
            request_offset,
            chunk,
            ..
        } => {
            if request_offset.is_some_and(|o| o != req.offset) {
                return Err(ClientError::Protocol(
                    "extended reply echoes another offset",
                ));
            }
            // Where a data or hole chunk lands in the read buffer, checked against the request.
            let place = |offset: u64, len: usize| {
                offset
                    .checked_sub(req.offset)
                    .and_then(|at| usize::try_from(at).ok())
                    .and_then(|at| Some(at..at.checked_add(len)?))
                    .filter(|r| req.kind == CMD_READ && r.end <= reply.data.len())
                    .ok_or(ClientError::Protocol("read chunk outside the request"))
            };
            match chunk {
                ReplyChunk::None => {}
                ReplyChunk::OffsetData { offset, data } => {
                    let r = place(offset, data.len())?;
                    reply.data[r].copy_from_slice(data);
                }
                ReplyChunk::OffsetHole { offset, size } => {
                    let r = place(offset, size as usize)?;
                    reply.data[r].fill(0);
                }
                ReplyChunk::BlockStatus {
                    context_id,
                    descriptors,
                } => reply
                    .extents
                    .extend(descriptors.iter().map(|e| (context_id, e))),
                ReplyChunk::Error { error, message }
                | ReplyChunk::ErrorOffset { error, message, .. } => {
                    set_error(reply, error, message)
                }
                // Unknown error types fail the request; other unknown types may be ignored
                // (the spec's rules).
                ReplyChunk::Unknown { kind, payload } if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
                    let error = payload
                        .first_chunk::<4>()
                        .map_or(EIO, |e| u32::from_be_bytes(*e));
                    set_error(reply, error.max(1), "")
                }
                ReplyChunk::Unknown { .. } => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
