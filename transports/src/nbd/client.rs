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
//! [`MAX_OPTION_LEN`], reply chunks by [`ReplyParser::max_chunk_bytes`]), and a misbehaving
//! server is an error, never a panic.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::wire::{
    BlockSize, ClientOption, ExtendedReplyHeader, Extent, Greeting, InfoRequest,
    MetaContextRequest, OptionReply, ReplyChunk, Request, SimpleReply, StructuredReplyHeader,
    WireError, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, EIO, EXTENDED_REPLY_HEADER_LEN, EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING_LEN, INFO_BLOCK_SIZE, MAX_OPTION_LEN,
    META_CONTEXT_BASE_ALLOCATION, OPTION_REPLY_HEADER_LEN, OPT_GO, OPT_SET_META_CONTEXT,
    REPLY_FLAG_DONE, REPLY_TYPE_FLAG_ERROR, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

/// Most option replies the client reads for one option before it gives up on the server.
const MAX_OPTION_REPLIES: usize = 64;
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
    #[error("NBD command {command} failed with error {errno}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Request {
        /// The command type (`CMD_*`).
        command: u16,
        /// The NBD errno (`EIO`, `EINVAL`, ...).
        errno: u32,
        /// The message of a structured error chunk (may be empty).
        message: String,
    },
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

/// What the client negotiates besides the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `OPT_STRUCTURED_REPLY`: reads as data/hole chunks, block status.
    pub structured: bool,
    /// `OPT_EXTENDED_HEADERS` (implies structured replies): 64-bit lengths.
    pub extended: bool,
    /// Select the `base:allocation` context for `CMD_BLOCK_STATUS` (needs structured replies).
    pub base_allocation: bool,
    /// Read and write timeout on the socket ([`Client::connect_tcp`]/[`Client::connect_unix`]).
    pub io_timeout: Option<Duration>,
}

impl Default for Options {
    /// Simple replies, compact headers, a 60 s IO timeout.
    fn default() -> Self {
        Options {
            structured: false,
            extended: false,
            base_allocation: false,
            io_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Export size.
    pub size_bytes: u64,
    /// Transmission flags (`FLAG_*`: read-only, flush, trim, ...).
    pub transmission_flags: u16,
    /// Block size constraints, if the server sent them.
    pub block_size: Option<BlockSize>,
    /// Canonical name, if the server sent it.
    pub name: Option<String>,
    /// Description, if the server sent it.
    pub description: Option<String>,
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended headers are in use.
    pub extended: bool,
    /// The context id of `base:allocation`, if selected.
    pub base_allocation_id: Option<u32>,
}

impl Export {
    /// The parser for this connection's replies.
    pub fn reply_parser(&self) -> ReplyParser {
        ReplyParser::new(self.structured, self.extended)
    }
}

fn read_exact<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<(), ClientError> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(e),
    })
}

/// Reads one option reply into `buf` (header first, so an oversized one is refused before its
/// payload is buffered) and decodes it: `(option, reply)`.
fn read_option_reply<'b, S: Read>(
    s: &mut S,
    buf: &'b mut Vec<u8>,
) -> Result<(u32, OptionReply<'b>), ClientError> {
    buf.clear();
    buf.resize(OPTION_REPLY_HEADER_LEN, 0);
    read_exact(s, buf)?;
    match OptionReply::decode(buf) {
        Err(WireError::Incomplete { needed }) if needed <= MAX_OPTION_LEN as usize => {
            let have = buf.len();
            buf.resize(have + needed, 0);
            read_exact(s, &mut buf[have..])?;
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    let (option, reply, _) = OptionReply::decode(buf)?;
    Ok((option, reply))
}

/// Sends an option that takes no data and expects `REP_ACK`.
fn simple_option<S: Read + Write>(s: &mut S, option: ClientOption) -> Result<(), ClientError> {
    let mut out = Vec::new();
    option.encode(&mut out);
    s.write_all(&out)?;
    let mut buf = Vec::new();
    let (answered, reply) = read_option_reply(s, &mut buf)?;
    if answered != option.option() {
        return Err(ClientError::Protocol("option reply for another option"));
    }
    match reply {
        OptionReply::Ack => Ok(()),
        OptionReply::Error { reply, message } => Err(ClientError::Refused {
            option: option.option(),
            reply,
            message: message.to_string(),
        }),
        _ => Err(ClientError::Protocol("unexpected reply to a simple option")),
    }
}

/// The fixed-newstyle handshake on a blocking stream: options as `opts` asks, then `OPT_GO`
/// for `export` (asking for block sizes). On success the stream is in the transmission phase.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    export: &str,
    opts: Options,
) -> Result<Export, ClientError> {
    let mut greeting = [0u8; GREETING_LEN];
    read_exact(s, &mut greeting)?;
    let (greeting, _) = Greeting::decode(&greeting)?;
    if greeting.flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle {
            flags: greeting.flags,
        });
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if greeting.flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;
    if opts.extended {
        simple_option(s, ClientOption::ExtendedHeaders)?;
    } else if opts.structured {
        simple_option(s, ClientOption::StructuredReply)?;
    }
    let structured = opts.structured || opts.extended;
    let mut buf = Vec::new();
    let mut base_allocation_id = None;
    if opts.base_allocation {
        if !structured {
            return Err(ClientError::InvalidRequest(
                "base:allocation needs structured replies",
            ));
        }
        let mut out = Vec::new();
        MetaContextRequest::encode_option(
            &mut out,
            OPT_SET_META_CONTEXT,
            export,
            &[META_CONTEXT_BASE_ALLOCATION],
        );
        s.write_all(&out)?;
        for _ in 0..=MAX_OPTION_REPLIES {
            match read_option_reply(s, &mut buf)?.1 {
                OptionReply::MetaContext { id, name } if name == META_CONTEXT_BASE_ALLOCATION => {
                    base_allocation_id = Some(id);
                }
                OptionReply::MetaContext { .. } => {
                    return Err(ClientError::Protocol(
                        "a meta context the client did not ask for",
                    ))
                }
                OptionReply::Ack if base_allocation_id.is_some() => break,
                OptionReply::Ack => {
                    return Err(ClientError::Protocol(
                        "the server selected no base:allocation",
                    ))
                }
                OptionReply::Error { reply, message } => {
                    return Err(ClientError::Refused {
                        option: OPT_SET_META_CONTEXT,
                        reply,
                        message: message.to_string(),
                    })
                }
                _ => {
                    return Err(ClientError::Protocol(
                        "unexpected reply to SET_META_CONTEXT",
                    ))
                }
            }
        }
    }
    let mut out = Vec::new();
    InfoRequest::encode_option(&mut out, OPT_GO, export, &[INFO_BLOCK_SIZE]);
    s.write_all(&out)?;
    let mut export_info = Export {
        size_bytes: 0,
        transmission_flags: 0,
        block_size: None,
        name: None,
        description: None,
        structured,
        extended: opts.extended,
        base_allocation_id,
    };
    let mut have_size = false;
    for _ in 0..MAX_OPTION_REPLIES {
        let (option, reply) = read_option_reply(s, &mut buf)?;
        if option != OPT_GO {
            return Err(ClientError::Protocol("option reply for another option"));
        }
        match reply {
            OptionReply::InfoExport { size, flags } => {
                export_info.size_bytes = size;
                export_info.transmission_flags = flags;
                have_size = true;
            }
            OptionReply::InfoBlockSize(bs) => export_info.block_size = Some(bs),
            OptionReply::InfoName(n) => export_info.name = Some(n.to_string()),
            OptionReply::InfoDescription(d) => export_info.description = Some(d.to_string()),
            OptionReply::Ack if have_size => return Ok(export_info),
            OptionReply::Ack => {
                return Err(ClientError::Protocol("OPT_GO acked without INFO_EXPORT"))
            }
            OptionReply::Error { reply, message } => {
                return Err(ClientError::Refused {
                    option: OPT_GO,
                    reply,
                    message: message.to_string(),
                })
            }
            // Unknown info types and replies are ignored, as the spec asks.
            _ => {}
        }
    }
    Err(ClientError::Protocol("too many replies to OPT_GO"))
}

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

/// Adds one frame of the reply to `req` to `reply`.
fn absorb(reply: &mut Reply, req: &Request, frame: ReplyFrame) -> Result<(), ClientError> {
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
