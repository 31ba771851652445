//! Handshake phase: greeting, client flags, option requests and option replies.

use super::{
    clamp_str, len_u32, need, str_len_u32, wire_str, Reader, WireError, CLIENT_FLAGS_LEN,
    EXPORT_NAME_REPLY_LEN, EXPORT_NAME_REPLY_ZEROES, GREETING_LEN, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, KNOWN_CLIENT_FLAGS, MAX_OPTION_LEN, NBDMAGIC,
    OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME,
    OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
    OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_FLAG_ERROR, REP_INFO, REP_META_CONTEXT,
    REP_SERVER,
};

// ---------------------------------------------------------------------------------------------
// Greeting and client flags.
// ---------------------------------------------------------------------------------------------

/// The server's opening message (NBDMAGIC, IHAVEOPT, handshake flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES` for this server).
    pub flags: u16,
}

impl Greeting {
    /// The 18 bytes to send right after accepting a connection.
    pub fn to_bytes(&self) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..18].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    /// Appends [`Greeting::to_bytes`] to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Client-side decode (tests, tools); checks both magics.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        need(buf, GREETING_LEN)?;
        let mut r = Reader::new(buf);
        let magic = r.u64().unwrap_or_default();
        if magic != NBDMAGIC {
            return Err(WireError::BadMagic {
                expected: NBDMAGIC,
                found: magic,
            });
        }
        let magic = r.u64().unwrap_or_default();
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let flags = r.u16().unwrap_or_default();
        Ok((Greeting { flags }, GREETING_LEN))
    }
}

/// The client's 32-bit answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    /// Whether the client speaks fixed newstyle (options get replies).
    pub fn fixed_newstyle(self) -> bool {
        self.0 & super::FLAG_C_FIXED_NEWSTYLE != 0
    }

    /// Whether the 124 zero bytes after an `OPT_EXPORT_NAME` reply must be left out.
    pub fn no_zeroes(self) -> bool {
        self.0 & super::FLAG_C_NO_ZEROES != 0
    }

    /// Wire form (client side).
    pub fn to_bytes(self) -> [u8; CLIENT_FLAGS_LEN] {
        self.0.to_be_bytes()
    }

    /// Appends [`ClientFlags::to_bytes`] to `out`.
    pub fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Decodes the client flags and enforces the spec rule that a client may only set known
    /// flags the server offered in `offered` (its handshake flags); otherwise the server must
    /// hang up ([`WireError::UnsupportedClientFlags`]).
    pub fn decode(buf: &[u8], offered: u16) -> Result<(Self, usize), WireError> {
        need(buf, CLIENT_FLAGS_LEN)?;
        let flags = Reader::new(buf).u32().unwrap_or_default();
        // Client flag bits mirror the handshake flag bits of the same position.
        let allowed = KNOWN_CLIENT_FLAGS & u32::from(offered);
        if flags & !allowed != 0 {
            return Err(WireError::UnsupportedClientFlags { flags });
        }
        Ok((ClientFlags(flags), CLIENT_FLAGS_LEN))
    }
}

// ---------------------------------------------------------------------------------------------
// Option requests.
// ---------------------------------------------------------------------------------------------

/// Header of every client option (IHAVEOPT, option code, payload length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`); unknown codes must be answered `REP_ERR_UNSUP`.
    pub option: u32,
    /// Payload length that follows the header.
    pub length: u32,
}

impl OptionHeader {
    /// Wire form (client side).
    pub fn to_bytes(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Appends [`OptionHeader::to_bytes`] to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Decodes the 16-byte header only, so a server can reject an oversized option
    /// ([`WireError::OptionTooLarge`], `length` > [`MAX_OPTION_LEN`]) before buffering it.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        need(buf, OPTION_HEADER_LEN)?;
        let mut r = Reader::new(buf);
        let magic = r.u64().unwrap_or_default();
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = r.u32().unwrap_or_default();
        let length = r.u32().unwrap_or_default();
        if length > MAX_OPTION_LEN {
            return Err(WireError::OptionTooLarge { option, length });
        }
        Ok((OptionHeader { option, length }, OPTION_HEADER_LEN))
    }

    /// Decodes a whole option frame: the header plus its payload, borrowed from `buf`.
    ///
    /// Returns `Incomplete` until the full payload is present; the third element is the total
    /// number of bytes consumed (header + payload). Feed the payload to [`ClientOption::parse`].
    pub fn decode_frame(buf: &[u8]) -> Result<(Self, &[u8], usize), WireError> {
        let (hdr, at) = Self::decode(buf)?;
        // `length` <= MAX_OPTION_LEN, so this cannot overflow.
        let total = at + hdr.length as usize;
        need(buf, total)?;
        Ok((hdr, &buf[at..total], total))
    }
}

/// The info types requested by `OPT_INFO` / `OPT_GO`, borrowed from the option payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InfoList<'a> {
    /// Big-endian u16 array, always of even length.
    raw: &'a [u8],
}

impl<'a> InfoList<'a> {
    /// Number of requested info types.
    pub fn len(&self) -> usize {
        self.raw.len() / 2
    }

    /// Whether the client asked for no specific information.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The requested info types in client order (may include unknown ones, to be ignored).
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.raw
            .chunks_exact(2)
            .filter_map(|c| c.first_chunk::<2>().map(|a| u16::from_be_bytes(*a)))
    }

    /// Whether `info` (an `INFO_*` value) was requested, e.g. to know if the client promised
    /// to honour block size constraints.
    pub fn contains(&self, info: u16) -> bool {
        self.iter().any(|i| i == info)
    }
}

/// Payload of `OPT_INFO` / `OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name; empty selects the default export.
    pub name: &'a str,
    /// Information the client asks for.
    pub requests: InfoList<'a>,
}

impl InfoRequest<'_> {
    /// Encodes a complete `OPT_INFO`/`OPT_GO` option (header + payload) from plain values
    /// (client side: tests, fuzz seeds, tools).
    ///
    /// # Panics
    /// If `infos` has more than `u16::MAX` entries or the option does not fit a u32 length.
    pub fn encode_option(out: &mut Vec<u8>, option: u32, name: &str, infos: &[u16]) {
        let count = u16::try_from(infos.len()).expect("at most 65535 info requests");
        let len = len_u32(4 + name.len() + 2 + 2 * infos.len(), "option payload");
        OptionHeader {
            option,
            length: len,
        }
        .encode(out);
        out.extend_from_slice(&len_u32(name.len(), "export name").to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for i in infos {
            out.extend_from_slice(&i.to_be_bytes());
        }
    }

    fn parse(option: u32, data: &[u8]) -> Result<InfoRequest<'_>, WireError> {
        let bad = |reason| WireError::InvalidOption { option, reason };
        let mut r = Reader::new(data);
        let name_len = r.u32().ok_or(bad("option data shorter than 6 bytes"))?;
        // Spec: name length MUST be no larger than the option data length - 6.
        if u64::from(name_len) + 6 > data.len() as u64 {
            return Err(bad("export name length exceeds option data"));
        }
        let name = r
            .bytes(name_len as usize)
            .ok_or(bad("export name length exceeds option data"))?;
        let name = wire_str(name).map_err(bad)?;
        let count = r.u16().ok_or(bad("missing information request count"))?;
        let raw = r
            .bytes(2 * usize::from(count))
            .ok_or(bad("information request count exceeds option data"))?;
        if r.remaining() != 0 {
            return Err(bad("trailing bytes after information requests"));
        }
        Ok(InfoRequest {
            name,
            requests: InfoList { raw },
        })
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&str_len_u32(self.name).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        out.extend_from_slice(self.requests.raw);
    }

    fn payload_len(&self) -> usize {
        4 + self.name.len() + 2 + self.requests.raw.len()
    }
}

/// The queries of a meta context option, validated and borrowed from the option payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetaQueries<'a> {
    /// Sequence of (u32 length, string) pairs, all validated.
    raw: &'a [u8],
    count: u32,
}

impl<'a> MetaQueries<'a> {
    /// Number of queries (0 means "all contexts" for LIST, "none" for SET).
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no query was sent.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The query strings in client order.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.raw);
        std::iter::from_fn(move || {
            let len = r.u32()?;
            let s = r.bytes(len as usize)?;
            // Validated in `parse`; the fallback is unreachable.
            Some(std::str::from_utf8(s).unwrap_or_default())
        })
    }
}

/// Payload of `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export the contexts are for.
    pub export: &'a str,
    /// The client's queries (e.g. `base:allocation`, or `base:` as a LIST wildcard).
    pub queries: MetaQueries<'a>,
}

impl MetaContextRequest<'_> {
    /// Encodes a complete meta context option (header + payload) from plain values
    /// (client side: tests, fuzz seeds, tools).
    ///
    /// # Panics
    /// If the option does not fit a u32 length.
    pub fn encode_option(out: &mut Vec<u8>, option: u32, export: &str, queries: &[&str]) {
        let len = 4 + export.len() + 4 + queries.iter().map(|q| 4 + q.len()).sum::<usize>();
        OptionHeader {
            option,
            length: len_u32(len, "option payload"),
        }
        .encode(out);
        out.extend_from_slice(&len_u32(export.len(), "export name").to_be_bytes());
        out.extend_from_slice(export.as_bytes());
        out.extend_from_slice(&len_u32(queries.len(), "query count").to_be_bytes());
        for q in queries {
            out.extend_from_slice(&len_u32(q.len(), "query").to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
    }

    fn parse(option: u32, data: &[u8]) -> Result<MetaContextRequest<'_>, WireError> {
        let bad = |reason| WireError::InvalidOption { option, reason };
        let mut r = Reader::new(data);
        let name_len = r.u32().ok_or(bad("missing export name length"))?;
        let name = r
            .bytes(name_len as usize)
            .ok_or(bad("export name length exceeds option data"))?;
        let export = wire_str(name).map_err(bad)?;
        let count = r.u32().ok_or(bad("missing query count"))?;
        let raw = r.rest();
        // Validate every query up front so iteration is infallible. The loop is bounded by
        // the payload: each query consumes at least 4 bytes.
        let mut q = Reader::new(raw);
        for _ in 0..count {
            let len = q.u32().ok_or(bad("query count exceeds option data"))?;
            let s = q
                .bytes(len as usize)
                .ok_or(bad("query length exceeds option data"))?;
            wire_str(s).map_err(bad)?;
        }
        if q.remaining() != 0 {
            return Err(bad("trailing bytes after queries"));
        }
        Ok(MetaContextRequest {
            export,
            queries: MetaQueries { raw, count },
        })
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&str_len_u32(self.export).to_be_bytes());
        out.extend_from_slice(self.export.as_bytes());
        out.extend_from_slice(&self.queries.count.to_be_bytes());
        out.extend_from_slice(self.queries.raw);
    }

    fn payload_len(&self) -> usize {
        4 + self.export.len() + 4 + self.queries.raw.len()
    }
}

/// A parsed client option; borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// `OPT_EXPORT_NAME`: enter transmission with this export (cannot be refused politely).
    ExportName(&'a str),
    /// `OPT_ABORT` (any data is ignored, as the spec asks).
    Abort,
    /// `OPT_LIST`.
    List,
    /// `OPT_STARTTLS`.
    StartTls,
    /// `OPT_INFO`.
    Info(InfoRequest<'a>),
    /// `OPT_GO`.
    Go(InfoRequest<'a>),
    /// `OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest<'a>),
    /// `OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest<'a>),
    /// `OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option; the server answers `REP_ERR_UNSUP`.
    Unknown {
        /// Option code.
        option: u32,
        /// Raw payload.
        data: &'a [u8],
    },
}

impl<'a> ClientOption<'a> {
    /// Parses the payload of a complete option frame (see [`OptionHeader::decode_frame`]).
    ///
    /// Errors are [`WireError::InvalidOption`], to be answered with `REP_ERR_INVALID` (except
    /// for `OPT_EXPORT_NAME`, where the server can only disconnect).
    pub fn parse(option: u32, data: &'a [u8]) -> Result<Self, WireError> {
        let no_data = |v: ClientOption<'a>| {
            if data.is_empty() {
                Ok(v)
            } else {
                Err(WireError::InvalidOption {
                    option,
                    reason: "option takes no data",
                })
            }
        };
        match option {
            OPT_EXPORT_NAME => wire_str(data)
                .map(ClientOption::ExportName)
                .map_err(|reason| WireError::InvalidOption { option, reason }),
            OPT_ABORT => Ok(ClientOption::Abort),
            OPT_LIST => no_data(ClientOption::List),
            OPT_STARTTLS => no_data(ClientOption::StartTls),
            OPT_INFO => InfoRequest::parse(option, data).map(ClientOption::Info),
            OPT_GO => InfoRequest::parse(option, data).map(ClientOption::Go),
            OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
            OPT_LIST_META_CONTEXT => {
                MetaContextRequest::parse(option, data).map(ClientOption::ListMetaContext)
            }
            OPT_SET_META_CONTEXT => {
                MetaContextRequest::parse(option, data).map(ClientOption::SetMetaContext)
            }
            OPT_EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
            _ => Ok(ClientOption::Unknown { option, data }),
        }
    }

    /// The option code, for the option reply header.
    pub fn option(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            ClientOption::Unknown { option, .. } => *option,
        }
    }

    /// Encodes the option with its header (client side: tests, fuzz, tools).
    ///
    /// # Panics
    /// If the payload does not fit a u32 length.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = match self {
            ClientOption::ExportName(name) => name.len(),
            ClientOption::Info(r) | ClientOption::Go(r) => r.payload_len(),
            ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => r.payload_len(),
            ClientOption::Unknown { data, .. } => data.len(),
            _ => 0,
        };
        OptionHeader {
            option: self.option(),
            length: len_u32(len, "option payload"),
        }
        .encode(out);
        match self {
            ClientOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            ClientOption::Info(r) | ClientOption::Go(r) => r.encode_payload(out),
            ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => {
                r.encode_payload(out)
            }
            ClientOption::Unknown { data, .. } => out.extend_from_slice(data),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Option replies.
// ---------------------------------------------------------------------------------------------

/// Block size constraints advertised with `INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest addressable length and alignment.
    pub min: u32,
    /// Size and alignment for efficient IO.
    pub preferred: u32,
    /// Largest payload the server accepts in one request.
    pub max: u32,
}

impl BlockSize {
    /// Whether the values obey the spec's rules (min a power of two ≤ 64 KiB; preferred a
    /// power of two ≥ max(min, 512); max ≥ preferred), so the server never advertises
    /// constraints a client must reject.
    pub fn is_valid(&self) -> bool {
        self.min.is_power_of_two()
            && self.min <= 1 << 16
            && self.preferred.is_power_of_two()
            && self.preferred >= self.min.max(512)
            && self.max >= self.preferred
    }
}

/// A server reply during option haggling; encoded with the option it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// `REP_ACK`: success / end of list.
    Ack,
    /// `REP_SERVER`: one export for `OPT_LIST`.
    Server {
        /// Export name as accepted by `OPT_GO`.
        name: &'a str,
        /// Human-readable description (may be empty).
        description: &'a str,
    },
    /// `REP_INFO` / `INFO_EXPORT`: mandatory before a successful `REP_ACK` to INFO/GO.
    InfoExport {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`FLAG_*`).
        flags: u16,
    },
    /// `REP_INFO` / `INFO_NAME`: canonical export name.
    InfoName(&'a str),
    /// `REP_INFO` / `INFO_DESCRIPTION`.
    InfoDescription(&'a str),
    /// `REP_INFO` / `INFO_BLOCK_SIZE`.
    InfoBlockSize(BlockSize),
    /// `REP_INFO` with an info type this codec does not know.
    InfoOther {
        /// Info type.
        info: u16,
        /// Raw info payload.
        data: &'a [u8],
    },
    /// `REP_META_CONTEXT`: a context and its id (id 0 for LIST replies).
    MetaContext {
        /// Context id used in block status chunks.
        id: u32,
        /// Context name, e.g. `base:allocation`.
        name: &'a str,
    },
    /// Any `REP_ERR_*` reply, with an optional human-readable message.
    Error {
        /// Reply type; must have `REP_FLAG_ERROR` set.
        reply: u32,
        /// Message (may be empty).
        message: &'a str,
    },
    /// A non-error reply type this codec does not know.
    Other {
        /// Reply type.
        reply: u32,
        /// Raw payload.
        data: &'a [u8],
    },
}

impl<'a> OptionReply<'a> {
    /// The `REP_*` reply type on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::InfoExport { .. }
            | OptionReply::InfoName(_)
            | OptionReply::InfoDescription(_)
            | OptionReply::InfoBlockSize(_)
            | OptionReply::InfoOther { .. } => REP_INFO,
            OptionReply::MetaContext { .. } => REP_META_CONTEXT,
            OptionReply::Error { reply, .. } | OptionReply::Other { reply, .. } => *reply,
        }
    }

    /// Appends the reply (header + payload) answering `option` to `out`.
    ///
    /// String fields are truncated to [`super::MAX_STRING_LEN`] bytes.
    ///
    /// # Panics
    /// If raw `data` of `InfoOther`/`Other` does not fit a u32 length.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let header = |out: &mut Vec<u8>, len: usize| {
            out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&option.to_be_bytes());
            out.extend_from_slice(&self.reply_type().to_be_bytes());
            out.extend_from_slice(&len_u32(len, "option reply").to_be_bytes());
        };
        match *self {
            OptionReply::Ack => header(out, 0),
            OptionReply::Server { name, description } => {
                let (name, description) = (clamp_str(name), clamp_str(description));
                header(out, 4 + name.len() + description.len());
                out.extend_from_slice(&str_len_u32(name).to_be_bytes());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(description.as_bytes());
            }
            OptionReply::InfoExport { size, flags } => {
                header(out, 12);
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            OptionReply::InfoName(s) | OptionReply::InfoDescription(s) => {
                let info = if matches!(self, OptionReply::InfoName(_)) {
                    INFO_NAME
                } else {
                    INFO_DESCRIPTION
                };
                let s = clamp_str(s);
                header(out, 2 + s.len());
                out.extend_from_slice(&info.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            OptionReply::InfoBlockSize(bs) => {
                header(out, 14);
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&bs.min.to_be_bytes());
                out.extend_from_slice(&bs.preferred.to_be_bytes());
                out.extend_from_slice(&bs.max.to_be_bytes());
            }
            OptionReply::InfoOther { info, data } => {
                header(out, 2 + data.len());
                out.extend_from_slice(&info.to_be_bytes());
                out.extend_from_slice(data);
            }
            OptionReply::MetaContext { id, name } => {
                let name = clamp_str(name);
                header(out, 4 + name.len());
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => {
                let message = clamp_str(message);
                header(out, message.len());
                out.extend_from_slice(message.as_bytes());
            }
            OptionReply::Other { data, .. } => {
                header(out, data.len());
                out.extend_from_slice(data);
            }
        }
    }

    /// Client-side decode of one option reply frame: `(option, reply, consumed)`.
    ///
    /// Replies longer than [`MAX_OPTION_LEN`] are rejected as [`WireError::InvalidReply`].
    pub fn decode(buf: &'a [u8]) -> Result<(u32, OptionReply<'a>, usize), WireError> {
        need(buf, OPTION_REPLY_HEADER_LEN)?;
        let mut r = Reader::new(buf);
        let magic = r.u64().unwrap_or_default();
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        let option = r.u32().unwrap_or_default();
        let reply = r.u32().unwrap_or_default();
        let length = r.u32().unwrap_or_default();
        if length > MAX_OPTION_LEN {
            return Err(WireError::InvalidReply {
                reason: "option reply too large",
            });
        }
        let total = OPTION_REPLY_HEADER_LEN + length as usize;
        need(buf, total)?;
        let data = &buf[OPTION_REPLY_HEADER_LEN..total];
        Ok((option, Self::parse(reply, data)?, total))
    }

    /// Parses a reply payload of type `reply`.
    pub fn parse(reply: u32, data: &'a [u8]) -> Result<Self, WireError> {
        let bad = |reason| WireError::InvalidReply { reason };
        let mut r = Reader::new(data);
        Ok(match reply {
            REP_ACK if data.is_empty() => OptionReply::Ack,
            REP_ACK => return Err(bad("REP_ACK with data")),
            REP_SERVER => {
                let len = r.u32().ok_or(bad("REP_SERVER shorter than 4 bytes"))?;
                let name = r
                    .bytes(len as usize)
                    .ok_or(bad("REP_SERVER name exceeds reply"))?;
                OptionReply::Server {
                    name: wire_str(name).map_err(bad)?,
                    description: wire_str(r.rest()).map_err(bad)?,
                }
            }
            REP_INFO => {
                let info = r.u16().ok_or(bad("REP_INFO shorter than 2 bytes"))?;
                match info {
                    INFO_EXPORT => {
                        if data.len() != 12 {
                            return Err(bad("INFO_EXPORT length is not 12"));
                        }
                        let size = r.u64().unwrap_or_default();
                        let flags = r.u16().unwrap_or_default();
                        OptionReply::InfoExport { size, flags }
                    }
                    INFO_NAME => OptionReply::InfoName(wire_str(r.rest()).map_err(bad)?),
                    INFO_DESCRIPTION => {
                        OptionReply::InfoDescription(wire_str(r.rest()).map_err(bad)?)
                    }
                    INFO_BLOCK_SIZE => {
                        if data.len() != 14 {
                            return Err(bad("INFO_BLOCK_SIZE length is not 14"));
                        }
                        OptionReply::InfoBlockSize(BlockSize {
                            min: r.u32().unwrap_or_default(),
                            preferred: r.u32().unwrap_or_default(),
                            max: r.u32().unwrap_or_default(),
                        })
                    }
                    _ => OptionReply::InfoOther {
                        info,
                        data: r.rest(),
                    },
                }
            }
            REP_META_CONTEXT => {
                let id = r
                    .u32()
                    .ok_or(bad("REP_META_CONTEXT shorter than 4 bytes"))?;
                OptionReply::MetaContext {
                    id,
                    name: wire_str(r.rest()).map_err(bad)?,
                }
            }
            _ if reply & REP_FLAG_ERROR != 0 => OptionReply::Error {
                reply,
                message: wire_str(data).map_err(bad)?,
            },
            _ => OptionReply::Other { reply, data },
        })
    }
}

/// The reply to `OPT_EXPORT_NAME` (no option reply header; no way to signal errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
}

impl ExportNameReply {
    /// Wire length: 10 bytes, plus 124 zero bytes unless the client set `FLAG_C_NO_ZEROES`.
    pub fn wire_len(no_zeroes: bool) -> usize {
        if no_zeroes {
            EXPORT_NAME_REPLY_LEN
        } else {
            EXPORT_NAME_REPLY_LEN + EXPORT_NAME_REPLY_ZEROES
        }
    }

    /// Appends the reply, with the zero padding unless `no_zeroes` was negotiated.
    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES]);
        }
    }

    /// Client-side decode; the padding is skipped without being checked.
    pub fn decode(buf: &[u8], no_zeroes: bool) -> Result<(Self, usize), WireError> {
        let total = Self::wire_len(no_zeroes);
        need(buf, total)?;
        let mut r = Reader::new(buf);
        let size = r.u64().unwrap_or_default();
        let flags = r.u16().unwrap_or_default();
        Ok((ExportNameReply { size, flags }, total))
    }
}
