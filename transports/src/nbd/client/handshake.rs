//! The fixed-newstyle handshake over a blocking stream.

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use crate::nbd::wire::{
    BlockSize, ClientOption, Greeting, InfoRequest, MetaContextRequest, OptionReply, WireError,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, GREETING_LEN,
    INFO_BLOCK_SIZE, MAX_OPTION_LEN, META_CONTEXT_BASE_ALLOCATION, OPTION_REPLY_HEADER_LEN, OPT_GO,
    OPT_SET_META_CONTEXT,
};

use super::{ClientError, ReplyParser};

/// Most option replies the client reads for one option before it gives up on the server.
const MAX_OPTION_REPLIES: usize = 64;

/// What the client negotiates besides the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `OPT_STRUCTURED_REPLY`: reads as data/hole chunks, block status.
    pub structured: bool,
    /// `OPT_EXTENDED_HEADERS` (implies structured replies): 64-bit lengths.
    pub extended: bool,
    /// Select the `base:allocation` context for `CMD_BLOCK_STATUS` (needs structured replies).
    pub base_allocation: bool,
    /// Read and write timeout on the socket, set by [`super::Client::connect_tcp`] and
    /// [`super::Client::connect_unix`].
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

pub(super) fn read_exact<S: Read>(s: &mut S, buf: &mut [u8]) -> Result<(), ClientError> {
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
