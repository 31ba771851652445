//! Feeds untrusted bytes through the handshake as the server does: client flags, then a
//! sequence of option frames, each parsed and answered; the answers are decoded back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringblock_transports::nbd::wire::*;

const OFFERED: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// What the server would send for `opt`; returns true when negotiation ends.
fn respond(opt: &ClientOption<'_>, no_zeroes: bool, out: &mut Vec<u8>) -> bool {
    let code = opt.option();
    let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    match opt {
        ClientOption::ExportName(_) => {
            ExportNameReply {
                size: 1 << 30,
                flags,
            }
            .encode(no_zeroes, out);
            return true;
        }
        ClientOption::Abort => {
            OptionReply::Ack.encode(code, out);
            return true;
        }
        ClientOption::List => {
            OptionReply::Server {
                name: "disk",
                description: "a disk",
            }
            .encode(code, out);
            OptionReply::Ack.encode(code, out);
        }
        ClientOption::Info(req) | ClientOption::Go(req) => {
            OptionReply::InfoExport {
                size: 1 << 30,
                flags,
            }
            .encode(code, out);
            for info in req.requests.iter() {
                match info {
                    INFO_NAME => OptionReply::InfoName(req.name).encode(code, out),
                    INFO_DESCRIPTION => OptionReply::InfoDescription(req.name).encode(code, out),
                    INFO_BLOCK_SIZE => OptionReply::InfoBlockSize(BlockSize {
                        min: 512,
                        preferred: 4096,
                        max: 32 << 20,
                    })
                    .encode(code, out),
                    _ => {}
                }
            }
            OptionReply::Ack.encode(code, out);
            return matches!(opt, ClientOption::Go(_));
        }
        ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
            for (id, q) in req.queries.iter().enumerate() {
                OptionReply::MetaContext {
                    id: id as u32,
                    name: q,
                }
                .encode(code, out);
            }
            OptionReply::Ack.encode(code, out);
        }
        ClientOption::StartTls | ClientOption::Unknown { .. } => OptionReply::Error {
            reply: REP_ERR_UNSUP,
            message: "unsupported",
        }
        .encode(code, out),
        ClientOption::StructuredReply | ClientOption::ExtendedHeaders => {
            OptionReply::Ack.encode(code, out)
        }
    }
    false
}

/// Every option reply the server built decodes back to the option it answers.
fn check_replies(out: &[u8], option: u32) {
    let mut at = 0;
    while at < out.len() {
        let (o, _, n) = OptionReply::decode(&out[at..]).expect("server replies decode");
        assert_eq!(o, option);
        at += n;
    }
}

fuzz_target!(|data: &[u8]| {
    let (flags, mut buf) = match ClientFlags::decode(data, OFFERED) {
        Ok((f, n)) => (f, &data[n..]),
        Err(WireError::Incomplete { needed }) => {
            assert!(needed >= 1 && data.len() + needed == CLIENT_FLAGS_LEN);
            return;
        }
        Err(WireError::UnsupportedClientFlags { .. }) => return,
        Err(e) => panic!("unexpected client flags error {e:?}"),
    };
    let mut out = Vec::new();
    loop {
        out.clear();
        match OptionHeader::decode_frame(buf) {
            Ok((hdr, payload, n)) => {
                assert_eq!(n, OPTION_HEADER_LEN + payload.len());
                assert_eq!(hdr.length as usize, payload.len());
                buf = &buf[n..];
                match ClientOption::parse(hdr.option, payload) {
                    Ok(opt) => {
                        assert_eq!(opt.option(), hdr.option);
                        if !matches!(opt, ClientOption::Abort) {
                            let mut again = Vec::new();
                            opt.encode(&mut again);
                            assert_eq!(&again[..OPTION_HEADER_LEN], &hdr.to_bytes()[..]);
                            assert_eq!(&again[OPTION_HEADER_LEN..], payload);
                        }
                        let done = respond(&opt, flags.no_zeroes(), &mut out);
                        if let ClientOption::ExportName(_) = opt {
                            let len = ExportNameReply::wire_len(flags.no_zeroes());
                            assert_eq!(out.len(), len);
                            ExportNameReply::decode(&out, flags.no_zeroes())
                                .expect("reply decodes");
                        } else {
                            check_replies(&out, hdr.option);
                        }
                        if done {
                            return;
                        }
                    }
                    Err(e) => {
                        let reply = e
                            .option_reply_type()
                            .expect("payload errors are answerable");
                        assert_eq!(reply, REP_ERR_INVALID);
                        let message = e.to_string();
                        OptionReply::Error {
                            reply,
                            message: &message,
                        }
                        .encode(hdr.option, &mut out);
                        check_replies(&out, hdr.option);
                    }
                }
            }
            Err(WireError::OptionTooLarge { option, length }) => {
                // The server discards the payload, then answers REP_ERR_TOO_BIG.
                let skip = OPTION_HEADER_LEN + length as usize;
                if buf.len() < skip {
                    return;
                }
                buf = &buf[skip..];
                OptionReply::Error {
                    reply: REP_ERR_TOO_BIG,
                    message: "too big",
                }
                .encode(option, &mut out);
                check_replies(&out, option);
            }
            Err(WireError::Incomplete { needed }) => {
                assert!(needed >= 1);
                return;
            }
            Err(WireError::BadMagic { .. }) => return,
            Err(e) => panic!("unexpected option error {e:?}"),
        }
    }
});
