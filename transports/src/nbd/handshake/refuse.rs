//! Turning a client away during the handshake with a reason it can show its user.

use std::io::{self, Read, Write};

use super::super::wire::{
    OptionHeader, OptionReply, WireError, OPTION_HEADER_LEN, OPT_ABORT, OPT_EXPORT_NAME,
    REP_ERR_POLICY,
};
use super::{error, greet, read_exact_or_eof, HandshakeError};

/// Options a refused client may send (each answered `REP_ERR_POLICY`) before the server
/// hangs up.
pub const MAX_REFUSED_OPTIONS: usize = 8;

/// Turn a client away during the handshake, before anything is negotiated: after the greeting,
/// every option gets `REP_ERR_POLICY` carrying `message` (e.g. "too many connections"), so the
/// client can tell its user why; `OPT_ABORT` gets its ACK, and `OPT_EXPORT_NAME` (which
/// cannot carry an error) a hang-up. At most [`MAX_REFUSED_OPTIONS`] options.
pub fn refuse<S: Read + Write>(stream: &mut S, message: &str) -> Result<(), HandshakeError> {
    if greet(stream)?.is_none() {
        return Ok(());
    }
    let mut out = Vec::with_capacity(64 + message.len());
    for _ in 0..MAX_REFUSED_OPTIONS {
        let mut header = [0u8; OPTION_HEADER_LEN];
        if !read_exact_or_eof(stream, &mut header)? {
            return Ok(());
        }
        let (option, length) = match OptionHeader::decode(&header) {
            Ok((hdr, _)) => (hdr.option, hdr.length),
            Err(WireError::OptionTooLarge { option, length }) => {
                return Err(HandshakeError::OptionTooLarge { option, length })
            }
            Err(e) => return Err(e.into()),
        };
        if option == OPT_EXPORT_NAME {
            return Ok(());
        }
        // `length` <= MAX_OPTION_LEN, checked by the decoder.
        let skipped = io::copy(&mut (&mut *stream).take(u64::from(length)), &mut io::sink())?;
        if skipped != u64::from(length) {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        out.clear();
        if option == OPT_ABORT {
            OptionReply::Ack.encode(option, &mut out);
            stream.write_all(&out)?;
            return Ok(());
        }
        error(REP_ERR_POLICY, message).encode(option, &mut out);
        stream.write_all(&out)?;
        stream.flush()?;
    }
    Ok(())
}
