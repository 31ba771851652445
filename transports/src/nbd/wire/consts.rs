//! Protocol constants, named after the NBD protocol document (`doc/proto.md`) minus
//! the `NBD_` prefix so that the spec can be grepped for any of them.

// ---------------------------------------------------------------------------------------------
// Magic numbers.
// ---------------------------------------------------------------------------------------------

/// First 8 bytes of every server greeting (ASCII `NBDMAGIC`); lets clients detect an NBD server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle greeting magic and prefix of every client option (ASCII `IHAVEOPT`).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every fixed-newstyle option reply, so clients can resynchronise on it.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of a compact (28-byte) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of an extended (32-byte) transmission request, used once extended headers are agreed.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Prefix of a simple (16-byte) reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk (20-byte header).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Prefix of an extended reply chunk (32-byte header).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).
// ---------------------------------------------------------------------------------------------

/// Handshake flag: the server speaks fixed newstyle (options get replies, unknown ones too).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after an `OPT_EXPORT_NAME` reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes after an `OPT_EXPORT_NAME` reply.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this codec knows; anything else must make the server hang up.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent in `INFO_EXPORT` and the `OPT_EXPORT_NAME` reply).
// ---------------------------------------------------------------------------------------------

/// Must always be set; tells the client the other bits are meaningful.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export rejects writes (the server answers them with `EPERM`).
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// The client may send `CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The client may set `CMD_FLAG_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Hint that the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// The client may send `CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// The client may send `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`).
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The client may set `CMD_FLAG_DF` on reads (only with structured/extended replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flush/FUA effects are visible across all connections, so clients may use several.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The client may send `CMD_RESIZE` (experimental `RESIZE` extension).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// The server understands `CMD_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// The client may set `CMD_FLAG_FAST_ZERO` on `CMD_WRITE_ZEROES`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `CMD_BLOCK_STATUS` accepts a payload selecting context ids (extended headers only).
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Option codes.
// ---------------------------------------------------------------------------------------------

/// Legacy "select export and enter transmission"; cannot report errors.
pub const OPT_EXPORT_NAME: u32 = 1;
/// The client ends negotiation (soft disconnect); answered with `REP_ACK`.
pub const OPT_ABORT: u32 = 2;
/// List exports (`REP_SERVER`s then `REP_ACK`).
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension; servers answer `REP_ERR_UNSUP`.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission (the error-capable `OPT_EXPORT_NAME`).
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Enable extended (64-bit length) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types.
// ---------------------------------------------------------------------------------------------

/// Success / end of a reply list.
pub const REP_ACK: u32 = 1;
/// One export in an `OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// One piece of export information for `OPT_INFO` / `OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context for `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit shared by all error replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option unsupported on this platform/build.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must request `INFO_BLOCK_SIZE` before `OPT_GO`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers must be negotiated first (or cannot be downgraded).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------------------------
// Information types (`REP_INFO` payloads and `OPT_INFO`/`OPT_GO` requests).
// ---------------------------------------------------------------------------------------------

/// Export size and transmission flags; mandatory before a successful `REP_ACK`.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints (minimum, preferred, maximum payload).
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Command types.
// ---------------------------------------------------------------------------------------------

/// Read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// Write the payload at `offset`.
pub const CMD_WRITE: u16 = 1;
/// Soft disconnect: drain in-flight requests, then close. No reply.
pub const CMD_DISC: u16 = 2;
/// Persist all completed writes.
pub const CMD_FLUSH: u16 = 3;
/// Discard hint.
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Zero a range without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts (allocation) over a range.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize the export (experimental `RESIZE` extension).
pub const CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------------------------------------
// Command flags.
// ---------------------------------------------------------------------------------------------

/// Force unit access: persist before replying.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `CMD_WRITE_ZEROES` must allocate, not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Don't fragment: at most one content chunk for a read.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `CMD_BLOCK_STATUS`: one extent per context only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `CMD_WRITE_ZEROES`: fail fast with `ENOTSUP` unless zeroing is cheap.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: `length` is a payload length that follows the header.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Structured / extended reply chunks.
// ---------------------------------------------------------------------------------------------

/// Reply flag marking the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type bit shared by all error chunks.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Read data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A range that reads as zeroes, sent without data.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors with 32-bit lengths/flags (compact headers only).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status descriptors with 64-bit lengths/flags (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Error at a given offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------------
// Error values (transmission phase); portable, not the host's errno.
// ---------------------------------------------------------------------------------------------

/// Operation not permitted (e.g. write on a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Out of memory (servers should avoid it).
pub const ENOMEM: u32 = 12;
/// Invalid argument (bad range, alignment, flag or command).
pub const EINVAL: u32 = 22;
/// No space left (thin pool exhausted, write past the end).
pub const ENOSPC: u32 = 28;
/// Value too large (e.g. `CMD_FLAG_DF` read that cannot fit one chunk).
pub const EOVERFLOW: u32 = 75;
/// Not supported (only for `CMD_FLAG_FAST_ZERO`).
pub const ENOTSUP: u32 = 95;
/// Server shutting down; the client must disconnect.
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// `base:allocation` metadata context.
// ---------------------------------------------------------------------------------------------

/// Name of the one metadata context the spec defines.
pub const META_CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` status bit: the extent is unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Sizes and limits.
// ---------------------------------------------------------------------------------------------

/// Longest string (export name, message, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload this codec accepts; longer options get `REP_ERR_TOO_BIG` or a
/// disconnect, so a client cannot make the server buffer arbitrary amounts of handshake data.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most descriptors a block status chunk should carry (spec recommendation).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1 << 20;

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Client flags after the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// `OPT_EXPORT_NAME` reply without the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;
/// Compact request header.
pub const REQUEST_LEN: usize = 28;
/// Extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Extended reply chunk header.
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
