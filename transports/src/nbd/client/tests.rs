//! The client against the server side of the codec: every message the client sends is decoded
//! by the server's decoders, every reply it parses is built by the server's encoders.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use super::*;
use crate::nbd::wire::{
    BlockSize, ClientFlags, ClientOption, Extent, Greeting, OptionHeader, OptionReply, ReplyTarget,
    SimpleReply, CMD_FLAG_FUA, EINVAL, EPERM, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES,
    FLAG_READ_ONLY, INFO_BLOCK_SIZE, OPT_GO, REPLY_FLAG_DONE, REP_ERR_UNKNOWN, SIMPLE_REPLY_LEN,
    STATE_HOLE, STATE_ZERO,
};

const SIZE_BYTES: u64 = 1 << 20;

/// One option as the server decodes it: (option code, payload).
fn server_option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let (hdr, _) = OptionHeader::decode(&h).unwrap();
    let mut data = vec![0u8; hdr.length as usize];
    s.read_exact(&mut data).unwrap();
    (hdr.option, data)
}

/// A scripted server handshake built from the codec's server-side encoders; returns what the
/// client negotiated: (structured, extended, meta context asked, block sizes asked).
fn server_handshake(s: &mut UnixStream, refuse_go: bool) -> (bool, bool, bool, bool) {
    s.write_all(
        &Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .to_bytes(),
    )
    .unwrap();
    let mut f = [0u8; 4];
    s.read_exact(&mut f).unwrap();
    let (flags, _) = ClientFlags::decode(&f, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).unwrap();
    assert!(flags.fixed_newstyle() && flags.no_zeroes());
    let (mut structured, mut extended, mut meta) = (false, false, false);
    for _ in 0..8 {
        let (option, data) = server_option(s);
        let mut out = Vec::new();
        match ClientOption::parse(option, &data).unwrap() {
            ClientOption::StructuredReply => structured = true,
            ClientOption::ExtendedHeaders => extended = true,
            ClientOption::SetMetaContext(m) => {
                assert_eq!(m.export, "disk");
                assert_eq!(m.queries.iter().collect::<Vec<_>>(), ["base:allocation"]);
                meta = true;
                OptionReply::MetaContext {
                    id: 7,
                    name: "base:allocation",
                }
                .encode(option, &mut out);
            }
            ClientOption::Go(go) => {
                assert_eq!(go.name, "disk");
                if refuse_go {
                    OptionReply::Error {
                        reply: REP_ERR_UNKNOWN,
                        message: "no such export",
                    }
                    .encode(option, &mut out);
                    s.write_all(&out).unwrap();
                    return (structured, extended, meta, false);
                }
                for r in [
                    OptionReply::InfoName("disk"),
                    OptionReply::InfoOther {
                        info: 99,
                        data: b"ignored",
                    },
                    OptionReply::InfoExport {
                        size: SIZE_BYTES,
                        flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
                    },
                    OptionReply::InfoBlockSize(BlockSize {
                        min: 512,
                        preferred: 4096,
                        max: 32 << 20,
                    }),
                    OptionReply::Ack,
                ] {
                    r.encode(option, &mut out);
                }
                s.write_all(&out).unwrap();
                return (
                    structured,
                    extended,
                    meta,
                    go.requests.contains(INFO_BLOCK_SIZE),
                );
            }
            other => panic!("unexpected option {other:?}"),
        }
        OptionReply::Ack.encode(option, &mut out);
        s.write_all(&out).unwrap();
    }
    panic!("no OPT_GO");
}

#[test]
fn handshake_negotiates_what_it_is_asked_for() {
    for (opts, want) in [
        (Options::default(), (false, false, false, true)),
        (
            Options {
                structured: true,
                ..Options::default()
            },
            (true, false, false, true),
        ),
        (
            Options {
                extended: true,
                base_allocation: true,
                ..Options::default()
            },
            (false, true, true, true),
        ),
    ] {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || server_handshake(&mut s, false));
        let export = handshake(&mut c, "disk", opts).unwrap();
        assert_eq!(server.join().unwrap(), want);
        assert_eq!(export.size_bytes, SIZE_BYTES);
        assert_eq!(export.transmission_flags, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
        assert_eq!(export.block_size.map(|b| b.min), Some(512));
        assert_eq!(export.name.as_deref(), Some("disk"));
        assert_eq!(export.structured, opts.structured || opts.extended);
        assert_eq!(export.extended, opts.extended);
        assert_eq!(export.base_allocation_id, opts.base_allocation.then_some(7));
    }
}

#[test]
fn a_refused_export_is_an_error_with_the_servers_message() {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || server_handshake(&mut s, true));
    let e = handshake(&mut c, "disk", Options::default()).unwrap_err();
    server.join().unwrap();
    assert!(
        matches!(&e, ClientError::Refused { option: OPT_GO, reply: REP_ERR_UNKNOWN, message }
            if message == "no such export"),
        "{e:?}"
    );
}

#[test]
fn a_server_that_is_not_fixed_newstyle_or_not_nbd_is_refused() {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    s.write_all(&Greeting { flags: 0 }.to_bytes()).unwrap();
    let e = handshake(&mut c, "disk", Options::default()).unwrap_err();
    assert!(
        matches!(e, ClientError::NotFixedNewstyle { flags: 0 }),
        "{e:?}"
    );

    let (mut c, mut s) = UnixStream::pair().unwrap();
    s.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
    let e = handshake(&mut c, "disk", Options::default()).unwrap_err();
    assert!(
        matches!(e, ClientError::Wire(WireError::BadMagic { .. })),
        "{e:?}"
    );

    let (mut c, s) = UnixStream::pair().unwrap();
    drop(s);
    let e = handshake(&mut c, "disk", Options::default()).unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e:?}");
}

#[test]
fn an_oversized_option_reply_is_refused_before_it_is_read() {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        s.write_all(
            &Greeting {
                flags: FLAG_FIXED_NEWSTYLE,
            }
            .to_bytes(),
        )
        .unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).unwrap();
        server_option(&mut s);
        // A header announcing 1 GiB of payload, and no payload.
        let mut out = Vec::new();
        out.extend_from_slice(&crate::nbd::wire::OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&crate::nbd::wire::REP_INFO.to_be_bytes());
        out.extend_from_slice(&(1u32 << 30).to_be_bytes());
        s.write_all(&out).unwrap();
        s
    });
    let e = handshake(&mut c, "disk", Options::default()).unwrap_err();
    assert!(
        matches!(e, ClientError::Wire(WireError::InvalidReply { .. })),
        "{e:?}"
    );
    drop(server.join().unwrap());
}

#[test]
fn encoded_requests_decode_as_the_server_reads_them() {
    for extended in [false, true] {
        let req = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 65536,
        };
        let mut buf = [0xffu8; 64];
        let len = encode_request(&req, extended, &mut buf).unwrap();
        assert_eq!(len, Request::header_len(extended));
        assert_eq!(Request::decode(&buf[..len], extended).unwrap(), (req, len));
        // The same bytes as the codec's own encoder.
        let mut v = Vec::new();
        req.encode(extended, &mut v);
        assert_eq!(&buf[..len], &v[..]);
        let (arr, l2) = request_header(&req, extended).unwrap();
        assert_eq!(&arr[..l2], &v[..]);
    }
    let long = Request {
        kind: CMD_READ,
        length: 1 << 32,
        ..Request::default()
    };
    assert!(matches!(
        encode_request(&long, false, &mut [0u8; 32]),
        Err(ClientError::InvalidRequest(_))
    ));
    assert!(encode_request(&long, true, &mut [0u8; 32]).is_ok());
    assert!(matches!(
        encode_request(&long, true, &mut [0u8; 31]),
        Err(ClientError::InvalidRequest(_))
    ));
}

/// Parses every frame of `bytes` feeding the parser one byte more at a time, as a receive
/// buffer filling up would: each frame must be reported incomplete until its last byte.
fn parse_all(p: ReplyParser, bytes: &[u8], read_len: usize) -> Vec<String> {
    let mut frames = Vec::new();
    let mut at = 0;
    let mut end = at;
    while at < bytes.len() {
        match p.parse(&bytes[at..end], |_| Some(read_len)).unwrap() {
            Parsed::Incomplete { needed } => {
                assert!(end < bytes.len(), "incomplete at the end of the bytes");
                assert!(needed >= 1 && end + needed <= bytes.len());
                end += 1;
            }
            Parsed::Frame { frame, len } => {
                assert_eq!(at + len, end, "a frame is reported only once complete");
                frames.push(format!("{frame:?}"));
                at += len;
            }
        }
    }
    frames
}

#[test]
fn simple_replies_parse_incrementally_with_their_read_data() {
    let mut bytes = Vec::new();
    SimpleReply {
        error: 0,
        cookie: 1,
    }
    .encode(&mut bytes);
    bytes.extend_from_slice(&[0xab; 8]);
    SimpleReply {
        error: EPERM,
        cookie: 2,
    }
    .encode(&mut bytes);
    let frames = parse_all(ReplyParser::new(false, false), &bytes, 8);
    assert_eq!(
        frames,
        [
            format!(
                "{:?}",
                ReplyFrame::Simple {
                    cookie: 1,
                    error: 0,
                    data: &[0xab; 8]
                }
            ),
            // An error reply carries no data.
            format!(
                "{:?}",
                ReplyFrame::Simple {
                    cookie: 2,
                    error: EPERM,
                    data: &[]
                }
            ),
        ]
    );
}

#[test]
fn structured_and_extended_chunks_parse_as_the_server_encodes_them() {
    for extended in [false, true] {
        let t = ReplyTarget {
            cookie: 9,
            offset: 4096,
            extended,
        };
        let mut bytes = Vec::new();
        t.encode_offset_data(&mut bytes, 0, 4096, &[1, 2, 3]);
        t.encode_offset_hole(&mut bytes, 0, 4099, 5);
        t.encode_block_status(
            &mut bytes,
            0,
            7,
            &[Extent {
                length: 512,
                status: u64::from(STATE_HOLE | STATE_ZERO),
            }],
        );
        t.encode_error(&mut bytes, 0, EINVAL, "bad");
        t.encode_none(&mut bytes);
        let p = ReplyParser::new(true, extended);
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < bytes.len() {
            let Parsed::Frame { frame, len } = p.parse(&bytes[at..], |_| None).unwrap() else {
                panic!("incomplete")
            };
            let ReplyFrame::Chunk {
                cookie,
                request_offset,
                chunk,
                ..
            } = frame
            else {
                panic!("{frame:?}")
            };
            assert_eq!(cookie, 9);
            assert_eq!(request_offset, extended.then_some(4096));
            kinds.push((chunk, frame.is_last()));
            at += len;
        }
        assert_eq!(kinds.len(), 5);
        assert!(matches!(
            kinds[0].0,
            ReplyChunk::OffsetData {
                offset: 4096,
                data: [1, 2, 3]
            }
        ));
        assert!(matches!(
            kinds[1].0,
            ReplyChunk::OffsetHole {
                offset: 4099,
                size: 5
            }
        ));
        assert!(matches!(
            kinds[2].0,
            ReplyChunk::BlockStatus { context_id: 7, .. }
        ));
        assert!(matches!(
            kinds[3].0,
            ReplyChunk::Error {
                error: EINVAL,
                message: "bad"
            }
        ));
        assert_eq!(kinds[4], (ReplyChunk::None, true));
        assert!(kinds[..4].iter().all(|(_, last)| !last));
        assert_eq!(parse_all(p, &bytes, 0).len(), 5);
    }
}

#[test]
fn replies_outside_the_negotiated_mode_are_protocol_errors() {
    let simple = SimpleReply {
        error: 0,
        cookie: 1,
    }
    .to_bytes();
    let mut structured = Vec::new();
    ReplyTarget {
        cookie: 1,
        offset: 0,
        extended: false,
    }
    .encode_none(&mut structured);
    let mut extended = Vec::new();
    ReplyTarget {
        cookie: 1,
        offset: 0,
        extended: true,
    }
    .encode_none(&mut extended);
    let err = |p: ReplyParser, b: &[u8]| p.parse(b, |_| Some(0)).unwrap_err();
    assert!(matches!(
        err(ReplyParser::new(true, true), &simple),
        ClientError::Protocol(_)
    ));
    assert!(matches!(
        err(ReplyParser::new(false, false), &structured),
        ClientError::Protocol(_)
    ));
    assert!(matches!(
        err(ReplyParser::new(true, true), &structured),
        ClientError::Protocol(_)
    ));
    assert!(matches!(
        err(ReplyParser::new(true, false), &extended),
        ClientError::Protocol(_)
    ));
    assert!(matches!(
        err(ReplyParser::new(false, false), b"garbage!"),
        ClientError::Wire(WireError::BadMagic { .. })
    ));
    // A simple reply to no request in flight.
    assert!(matches!(
        ReplyParser::new(false, false).parse(&simple, |_| None),
        Err(ClientError::UnknownCookie(1))
    ));
    // A chunk larger than the bound is refused from its header alone.
    let mut big = Vec::new();
    ReplyTarget {
        cookie: 1,
        offset: 0,
        extended: false,
    }
    .encode_offset_data_header(&mut big, 0, 0, 1 << 20);
    let p = ReplyParser::new(true, false).with_max_chunk_bytes(4096);
    assert!(matches!(
        p.parse(&big, |_| None),
        Err(ClientError::Protocol(_))
    ));
    assert_eq!(simple.len(), SIMPLE_REPLY_LEN);
}

/// Answers one request per entry of `answers` on the transmission phase: each answer builds
/// the reply bytes from the decoded request and its payload.
type Answer = Box<dyn FnOnce(&Request, &[u8], &mut Vec<u8>) + Send>;

fn serve_requests(
    opts: Options,
    answers: Vec<Answer>,
) -> (Client<UnixStream>, thread::JoinHandle<()>) {
    let (c, mut s) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        server_handshake(&mut s, false);
        for answer in answers {
            let mut h = vec![0u8; Request::header_len(opts.extended)];
            s.read_exact(&mut h).unwrap();
            let (req, _) = Request::decode(&h, opts.extended).unwrap();
            let mut payload = vec![0u8; req.payload_len(opts.extended, 1 << 20).unwrap() as usize];
            s.read_exact(&mut payload).unwrap();
            let mut out = Vec::new();
            answer(&req, &payload, &mut out);
            s.write_all(&out).unwrap();
        }
        // The client's CMD_DISC.
        let mut h = vec![0u8; Request::header_len(opts.extended)];
        s.read_exact(&mut h).unwrap();
        assert_eq!(Request::decode(&h, opts.extended).unwrap().0.kind, CMD_DISC);
    });
    (Client::new(c, "disk", opts).unwrap(), server)
}

#[test]
fn blocking_requests_reassemble_simple_and_structured_replies() {
    let simple: Vec<Answer> = vec![
        Box::new(|req, payload, out| {
            assert_eq!(
                (req.kind, req.offset, payload),
                (CMD_WRITE, 512, &b"abcd"[..])
            );
            SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode(out);
        }),
        Box::new(|req, _, out| {
            SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode(out);
            out.extend_from_slice(&b"abcd"[..req.length as usize]);
        }),
        Box::new(|req, _, out| {
            assert_eq!(req.kind, CMD_FLUSH);
            SimpleReply {
                error: EPERM,
                cookie: req.cookie,
            }
            .encode(out);
        }),
    ];
    let (mut c, server) = serve_requests(Options::default(), simple);
    c.write(512, b"abcd", 0).unwrap();
    assert_eq!(c.read(512, 4).unwrap(), b"abcd");
    let e = c.flush().unwrap_err();
    assert_eq!(e.errno(), Some(EPERM), "{e}");
    c.disconnect();
    server.join().unwrap();

    for extended in [false, true] {
        let opts = Options {
            structured: true,
            extended,
            base_allocation: true,
            ..Options::default()
        };
        let answers: Vec<Answer> = vec![
            Box::new(move |req, payload, out| {
                assert_eq!(req.kind, CMD_WRITE);
                assert_eq!(req.flags & CMD_FLAG_PAYLOAD_LEN != 0, extended);
                assert_eq!(payload, [7u8; 8]);
                req.reply_target(extended).encode_none(out);
            }),
            // A read as data, a hole, data: reassembled in place.
            Box::new(move |req, _, out| {
                let t = req.reply_target(extended);
                t.encode_offset_data(out, 0, req.offset + 6, &[2, 2]);
                t.encode_offset_hole(out, 0, req.offset + 2, 4);
                t.encode_offset_data(out, REPLY_FLAG_DONE, req.offset, &[1, 1]);
            }),
            Box::new(move |req, _, out| {
                let t = req.reply_target(extended);
                let e = [
                    Extent {
                        length: 4096,
                        status: 0,
                    },
                    Extent {
                        length: 8192,
                        status: u64::from(STATE_HOLE | STATE_ZERO),
                    },
                ];
                t.encode_block_status(out, REPLY_FLAG_DONE, 7, &e);
            }),
            Box::new(move |req, _, out| {
                req.reply_target(extended).encode_error(
                    out,
                    REPLY_FLAG_DONE,
                    EINVAL,
                    "out of range",
                );
            }),
            // Data outside the request is the server's error, not a panic.
            Box::new(move |req, _, out| {
                req.reply_target(extended).encode_offset_data(
                    out,
                    REPLY_FLAG_DONE,
                    req.offset + 1,
                    &[0; 8],
                );
            }),
        ];
        let (mut c, server) = serve_requests(opts, answers);
        c.write(0, &[7; 8], 0).unwrap();
        assert_eq!(c.read(8192, 8).unwrap(), [1, 1, 0, 0, 0, 0, 2, 2]);
        let extents = c.block_status(0, 12288).unwrap();
        assert_eq!(extents.len(), 2);
        assert_eq!(extents[1].status, u64::from(STATE_HOLE | STATE_ZERO));
        let e = c.trim(1 << 40, 4096).unwrap_err();
        assert!(
            matches!(&e, ClientError::Request { command: CMD_TRIM, errno: EINVAL, message }
                if message == "out of range"),
            "{e:?}"
        );
        let e = c.read(0, 8).unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
        c.disconnect();
        server.join().unwrap();
    }
}

#[test]
fn base_allocation_without_structured_replies_is_refused_by_the_client() {
    let (mut c, mut s) = UnixStream::pair().unwrap();
    s.write_all(
        &Greeting {
            flags: FLAG_FIXED_NEWSTYLE,
        }
        .to_bytes(),
    )
    .unwrap();
    let opts = Options {
        base_allocation: true,
        ..Options::default()
    };
    let e = handshake(&mut c, "disk", opts).unwrap_err();
    assert!(matches!(e, ClientError::InvalidRequest(_)), "{e:?}");
}

#[test]
fn a_huge_read_is_never_buffered() {
    let huge = Request {
        kind: CMD_READ,
        offset: 0,
        length: 1 << 40,
        ..Request::default()
    };
    // The server refuses it: the error arrives, nothing was allocated for 1 TiB.
    let opts = Options {
        extended: true,
        ..Options::default()
    };
    let answers: Vec<Answer> = vec![Box::new(|req, _, out| {
        req.reply_target(true)
            .encode_error(out, REPLY_FLAG_DONE, EINVAL, "too big");
    })];
    let (mut c, server) = serve_requests(opts, answers);
    let r = c.request(huge, &[]).unwrap();
    assert_eq!((r.error, r.data.len()), (EINVAL, 0));
    c.disconnect();
    server.join().unwrap();
    // A server that claims success and starts sending data is stopped at the bound.
    let answers: Vec<Answer> = vec![Box::new(|req, _, out| {
        SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode(out);
    })];
    let (mut c, server) = serve_requests(Options::default(), answers);
    let big = Request {
        length: 1 << 31,
        ..huge
    };
    let cookie = c.send(big, &[]).unwrap();
    let e = c.receive(cookie, &big).unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e:?}");
    let e = c.read(0, 128 << 20).unwrap_err();
    assert!(matches!(e, ClientError::InvalidRequest(_)), "{e:?}");
    c.disconnect();
    server.join().unwrap();
}
