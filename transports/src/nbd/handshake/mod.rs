//! Server side of the fixed-newstyle handshake (NBD protocol document, "Handshake" and
//! "Option types", plus the `EXTENDED_HEADERS` extension).
//!
//! [`negotiate`] runs with blocking IO on whatever stream it is given (a socket with read and
//! write timeouts in the server, a Unix socket pair in tests). It reads exactly the bytes of
//! each message and never more, so when it returns [`Negotiated`] the stream is positioned at
//! the first transmission request and can be handed to the transmission phase as is.
//!
//! Limits: at most [`MAX_OPTIONS`] options per connection, each payload at most
//! [`MAX_OPTION_LEN`] bytes; an oversized payload of up to [`MAX_DISCARD_BYTES`] is read,
//! discarded and answered with `REP_ERR_TOO_BIG`, a larger one ends the connection.
//!
//! Block sizes: every `OPT_INFO`/`OPT_GO` success carries `INFO_BLOCK_SIZE` (the export's
//! minimum, preferred and maximum). Our exports have a minimum block size above the spec's
//! default of 1, so the spec allows refusing clients that did not promise to honour it
//! (`REP_ERR_BLOCK_SIZE_REQD` for `OPT_GO`/`OPT_INFO` without an `INFO_BLOCK_SIZE` request, a
//! hard disconnect for `OPT_EXPORT_NAME`). By default we do not refuse them — the spec says
//! servers SHOULD NOT when they can cleanly error misaligned requests, which the transmission
//! phase does (EINVAL) — and [`HandshakeConfig::require_block_size`] turns the refusal on.
//!
//! [`MAX_OPTION_LEN`]: super::wire::MAX_OPTION_LEN

mod options;
mod refuse;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::wire::{
    BlockSize, ClientFlags, ClientOption, Greeting, OptionHeader, OptionReply, WireError,
    CLIENT_FLAGS_LEN, FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES,
    FLAG_READ_ONLY, FLAG_SEND_CACHE, FLAG_SEND_DF, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH,
    FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, OPTION_HEADER_LEN, OPT_EXPORT_NAME,
    REP_ERR_INVALID,
};
use super::{ExportCatalog, ExportInfo, Negotiated};

pub use refuse::{refuse, MAX_REFUSED_OPTIONS};

/// Most options one connection may send before the server hangs up (a denial-of-service
/// guard; real clients send a handful, `nbdinfo --list` about three per export).
pub const MAX_OPTIONS: usize = 1024;
/// Largest oversized option payload that is read and discarded (then answered with
/// `REP_ERR_TOO_BIG`); anything larger is treated as an attack and ends the connection.
pub const MAX_DISCARD_BYTES: u64 = 1 << 20;
/// Context id the server gives `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Handshake flags this server offers.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Server policy for the handshake.
#[derive(Clone, Debug, Default)]
pub struct HandshakeConfig {
    /// FORCEDTLS mode: every option except `OPT_STARTTLS`/`OPT_ABORT` is refused with
    /// `REP_ERR_TLS_REQD` (and `OPT_EXPORT_NAME` disconnects). TLS itself is not implemented
    /// yet (`OPT_STARTTLS` is answered `REP_ERR_UNSUP`), so this is off in practice.
    pub tls_required: bool,
    /// Refuse clients that did not request `INFO_BLOCK_SIZE` for exports whose minimum block
    /// size is above 1 (see the module documentation).
    pub require_block_size: bool,
    /// Set when the server is stopping: further options get `REP_ERR_SHUTDOWN`.
    pub stopping: Option<Arc<AtomicBool>>,
}

impl HandshakeConfig {
    fn stopping(&self) -> bool {
        self.stopping
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Acquire))
    }
}

/// Why a handshake ended without a connection; every variant means "close the socket".
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing failed (client went away, reset, timeout).
    #[error("i/o error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client broke the framing or sent unknown client flags; the spec requires hanging up.
    #[error("protocol violation during handshake: {0}")]
    Protocol(#[from] WireError),
    /// More than [`MAX_OPTIONS`] options.
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// An option payload too large to even skip ([`MAX_DISCARD_BYTES`]).
    #[error("option {option} carries {length} bytes of data, more than the {MAX_DISCARD_BYTES} the server will skip")]
    OptionTooLarge {
        /// Option code.
        option: u32,
        /// Declared payload length.
        length: u32,
    },
    /// `OPT_EXPORT_NAME` cannot report errors: the spec requires hanging up instead.
    #[error("OPT_EXPORT_NAME {name:?} refused: {reason}")]
    ExportNameRefused {
        /// The requested export name (lossy if it was not valid UTF-8).
        name: String,
        /// Why.
        reason: &'static str,
    },
}

impl HandshakeError {
    /// Whether this is the client simply going away or being slow (EOF, reset, timeout), as
    /// opposed to a protocol violation worth reporting.
    pub fn is_disconnect(&self) -> bool {
        match self {
            HandshakeError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }
}

/// The transmission flags for `info`, given whether structured (or extended) replies were
/// negotiated.
///
/// Always: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_CACHE`, `CAN_MULTI_CONN` (a flush covers writes
/// completed on every connection). Writable exports add `SEND_FUA`, `SEND_TRIM`,
/// `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO`; read-only ones set `READ_ONLY` instead. `SEND_DF` only
/// with structured replies, as the spec requires.
pub fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    if info.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// The `INFO_BLOCK_SIZE` values for `info`, repaired (with a warning) if the catalog gave
/// values a client would have to reject.
pub fn block_size(info: &ExportInfo) -> BlockSize {
    let bs = BlockSize {
        min: info.min_block_bytes,
        preferred: info.preferred_block_bytes,
        max: info.max_block_bytes,
    };
    if bs.is_valid() {
        return bs;
    }
    let min = info.min_block_bytes.clamp(1, 1 << 16).next_power_of_two();
    let preferred = info
        .preferred_block_bytes
        .clamp(min.max(512), 1 << 30)
        .next_power_of_two();
    let fixed = BlockSize {
        min,
        preferred,
        max: info.max_block_bytes.max(preferred),
    };
    tracing::warn!(export = %info.name, ?bs, ?fixed, "export has invalid block size constraints; advertising repaired values");
    fixed
}

/// Selected metadata contexts: what the last `OPT_SET_META_CONTEXT` chose, for which export.
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

/// What one option asks the loop to do next.
enum Step {
    Continue,
    Abort,
    Go(Negotiated),
}

struct Session<'a, S> {
    stream: &'a mut S,
    catalog: &'a dyn ExportCatalog,
    cfg: &'a HandshakeConfig,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    meta: Option<MetaSelection>,
    /// Replies to the current option, written with one `write_all`.
    out: Vec<u8>,
}

/// Runs the server side of the fixed-newstyle handshake on `stream`.
///
/// Returns `Ok(Some(_))` when the client entered transmission (`OPT_GO` or `OPT_EXPORT_NAME`),
/// `Ok(None)` when it ended the session cleanly (`OPT_ABORT`, or closing the connection between
/// messages), and an error when the connection must be dropped.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn ExportCatalog,
    cfg: &HandshakeConfig,
) -> Result<Option<Negotiated>, HandshakeError> {
    let Some(client) = greet(stream)? else {
        return Ok(None);
    };
    // Clients that do not set FIXED_NEWSTYLE are served fixed newstyle anyway (the spec allows
    // it); a non-fixed client only sends OPT_EXPORT_NAME, which behaves identically.
    let mut session = Session {
        stream,
        catalog,
        cfg,
        no_zeroes: client.no_zeroes(),
        structured: false,
        extended: false,
        meta: None,
        out: Vec::with_capacity(512),
    };
    let mut payload = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; OPTION_HEADER_LEN];
        if !read_exact_or_eof(session.stream, &mut header)? {
            return Ok(None);
        }
        let hdr = match OptionHeader::decode(&header) {
            Ok((hdr, _)) => hdr,
            Err(WireError::OptionTooLarge { option, length }) => {
                session.skip_oversized(option, length)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // `length` <= MAX_OPTION_LEN (64 KiB), checked by the decoder.
        payload.resize(hdr.length as usize, 0);
        session.stream.read_exact(&mut payload)?;
        let option = match ClientOption::parse(hdr.option, &payload) {
            Ok(option) => option,
            Err(_) if hdr.option == OPT_EXPORT_NAME => {
                return Err(HandshakeError::ExportNameRefused {
                    name: String::from_utf8_lossy(&payload).into_owned(),
                    reason: "the name is not a valid NBD string",
                })
            }
            Err(e) => {
                let reply = e.option_reply_type().unwrap_or(REP_ERR_INVALID);
                session.reply(hdr.option, &[error(reply, &e.to_string())])?;
                continue;
            }
        };
        match session.handle(option)? {
            Step::Continue => {}
            Step::Abort => return Ok(None),
            Step::Go(negotiated) => return Ok(Some(negotiated)),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// Send the greeting and read the client's flags; `None` when the client left first.
/// Unknown flags, or NO_ZEROES without our offer, are an error: the server must hang up.
fn greet<S: Read + Write>(stream: &mut S) -> Result<Option<ClientFlags>, HandshakeError> {
    stream.write_all(
        &Greeting {
            flags: SERVER_HANDSHAKE_FLAGS,
        }
        .to_bytes(),
    )?;
    stream.flush()?;
    let mut flags = [0u8; CLIENT_FLAGS_LEN];
    if !read_exact_or_eof(stream, &mut flags)? {
        return Ok(None);
    }
    let (client, _) = ClientFlags::decode(&flags, SERVER_HANDSHAKE_FLAGS)?;
    Ok(Some(client))
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte (a
/// clean end between messages), `UnexpectedEof` if it ended in the middle.
fn read_exact_or_eof<S: Read>(stream: &mut S, buf: &mut [u8]) -> io::Result<bool> {
    let mut have = 0;
    while have < buf.len() {
        match stream.read(&mut buf[have..]) {
            Ok(0) if have == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn error(reply: u32, message: &str) -> OptionReply<'_> {
    OptionReply::Error { reply, message }
}
