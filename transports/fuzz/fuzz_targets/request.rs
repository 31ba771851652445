//! Parses a stream of transmission requests (compact or extended, chosen by the first byte)
//! as the server does, builds the replies it would send and decodes them back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringblock_transports::nbd::wire::*;

const MAX_PAYLOAD: u64 = 1 << 16;

/// Decodes the chunk at the start of `buf`: (flags, kind, cookie, offset, payload, consumed).
fn decode_chunk(buf: &[u8], extended: bool) -> (u16, u16, u64, u64, &[u8], usize) {
    let (flags, kind, cookie, offset, len, at) = if extended {
        let (h, at) = ExtendedReplyHeader::decode(buf).expect("extended header");
        (h.flags, h.kind, h.cookie, h.offset, h.length as usize, at)
    } else {
        let (h, at) = StructuredReplyHeader::decode(buf).expect("structured header");
        (h.flags, h.kind, h.cookie, 0, h.length as usize, at)
    };
    (flags, kind, cookie, offset, &buf[at..at + len], at + len)
}

/// Builds the chunks a server could send for `req` and checks that they decode back.
fn reply(req: &Request, payload: &[u8], extended: bool) {
    let t = req.reply_target(extended);
    let mut out = Vec::new();
    let data = &payload[..payload.len().min(64)];
    let message: String = String::from_utf8_lossy(payload).replace('\0', "");
    let extents = [
        Extent {
            length: req.length / 2 + 1,
            status: u64::from(STATE_HOLE),
        },
        Extent {
            length: req.length.max(1),
            status: u64::from(req.flags) << 31,
        },
    ];
    match req.command() {
        Some(Command::Read) => {
            if !data.is_empty() {
                t.encode_offset_data(&mut out, 0, req.offset, data);
            }
            t.encode_offset_hole(&mut out, 0, req.offset, (req.length as u32).max(1));
            t.encode_error_offset(&mut out, 0, EIO, &message, req.offset);
            t.encode_none(&mut out);
        }
        Some(Command::BlockStatus) => {
            t.encode_block_status(&mut out, REPLY_FLAG_DONE, req.cookie as u32, &extents);
        }
        _ => t.encode_error(&mut out, REPLY_FLAG_DONE, EINVAL, &message),
    }
    let mut at = 0;
    while at < out.len() {
        let (_, kind, cookie, offset, chunk, n) = decode_chunk(&out[at..], extended);
        assert_eq!(cookie, req.cookie);
        if extended {
            assert_eq!(offset, req.offset);
        }
        match ReplyChunk::parse(kind, chunk).expect("server chunks are valid") {
            ReplyChunk::OffsetData { data: d, .. } => assert_eq!(d, data),
            ReplyChunk::Error { message: m, .. } | ReplyChunk::ErrorOffset { message: m, .. } => {
                assert!(message.starts_with(m) && m.len() <= MAX_STRING_LEN);
            }
            ReplyChunk::BlockStatus { descriptors, .. } => {
                let got: Vec<Extent> = descriptors.iter().collect();
                if extended {
                    assert_eq!(got, extents);
                } else {
                    assert!(!got.is_empty() && got.len() <= extents.len());
                }
            }
            _ => {}
        }
        at += n;
    }
    let simple = SimpleReply {
        error: EIO,
        cookie: req.cookie,
    };
    assert_eq!(
        SimpleReply::decode(&simple.to_bytes()),
        Ok((simple, SIMPLE_REPLY_LEN))
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut buf)) = data.split_first() else {
        return;
    };
    let extended = mode & 1 != 0;
    loop {
        let (req, n) = match Request::decode(buf, extended) {
            Ok(v) => v,
            Err(WireError::Incomplete { needed }) => {
                assert_eq!(buf.len() + needed, Request::header_len(extended));
                return;
            }
            Err(WireError::BadMagic { .. }) => return,
            Err(e) => panic!("unexpected request error {e:?}"),
        };
        assert_eq!(n, Request::header_len(extended));
        let mut again = Vec::new();
        req.encode(extended, &mut again);
        assert_eq!(&again[..], &buf[..n]);

        let len = match req.payload_len(extended, MAX_PAYLOAD) {
            Ok(len) => len,
            Err(WireError::PayloadTooLarge { .. }) => return, // hard disconnect
            Err(e) => panic!("unexpected payload error {e:?}"),
        };
        let (req2, payload, total) = match Request::decode_frame(buf, extended, MAX_PAYLOAD) {
            Ok(v) => v,
            Err(WireError::Incomplete { needed }) => {
                assert_eq!(buf.len() + needed, n + len as usize);
                return;
            }
            Err(e) => panic!("frame error after a good header: {e:?}"),
        };
        assert_eq!(req2, req);
        assert_eq!(payload.len() as u64, len);
        if req.command() == Some(Command::BlockStatus) && len > 0 {
            if let Ok(p) = BlockStatusPayload::parse(payload) {
                assert_eq!(8 + 4 * p.len() as u64, len);
                assert_eq!(p.ids().count(), p.len());
            }
        }
        reply(&req, payload, extended);
        if req.command() == Some(Command::Disc) {
            return;
        }
        buf = &buf[total..];
    }
});
