//! Byte layouts written out from the spec, plus property tests (round trips, prefixes,
//! arbitrary input).

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Handshake layouts.
// ---------------------------------------------------------------------------------------------

#[test]
fn greeting_layout() {
    let g = Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    };
    let mut want = b"NBDMAGICIHAVEOPT".to_vec();
    want.extend_from_slice(&[0x00, 0x03]);
    assert_eq!(g.to_bytes().to_vec(), want);
    assert_eq!(Greeting::decode(&want), Ok((g, 18)));
    assert_eq!(
        Greeting::decode(&want[..17]),
        Err(WireError::Incomplete { needed: 1 })
    );
    let mut bad = want.clone();
    bad[0] = b'X';
    assert!(matches!(
        Greeting::decode(&bad),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn client_flags_checks_offer() {
    let offered = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    let (f, n) = ClientFlags::decode(&[0, 0, 0, 3], offered).unwrap();
    assert_eq!(n, 4);
    assert!(f.fixed_newstyle() && f.no_zeroes());
    let (f, _) = ClientFlags::decode(&[0, 0, 0, 0], offered).unwrap();
    assert!(!f.fixed_newstyle() && !f.no_zeroes());
    // NO_ZEROES not offered.
    assert_eq!(
        ClientFlags::decode(&[0, 0, 0, 2], FLAG_FIXED_NEWSTYLE),
        Err(WireError::UnsupportedClientFlags { flags: 2 })
    );
    // Unknown bit.
    assert_eq!(
        ClientFlags::decode(&[0x80, 0, 0, 1], offered),
        Err(WireError::UnsupportedClientFlags { flags: 0x8000_0001 })
    );
    assert_eq!(
        ClientFlags::decode(&[0, 0], offered),
        Err(WireError::Incomplete { needed: 2 })
    );
}

#[test]
fn option_header_layout_and_limits() {
    let bytes = hex("49484156454F5054 00000007 0000000a");
    assert_eq!(
        OptionHeader {
            option: OPT_GO,
            length: 10
        }
        .to_bytes()
        .to_vec(),
        bytes
    );
    assert_eq!(
        OptionHeader::decode(&bytes),
        Ok((
            OptionHeader {
                option: 7,
                length: 10
            },
            16
        ))
    );
    assert_eq!(
        OptionHeader::decode_frame(&bytes),
        Err(WireError::Incomplete { needed: 10 })
    );

    let max = hex("49484156454F5054 00000001 00010000");
    assert!(OptionHeader::decode(&max).is_ok());
    let big = hex("49484156454F5054 00000001 00010001");
    let err = OptionHeader::decode(&big).unwrap_err();
    assert_eq!(
        err,
        WireError::OptionTooLarge {
            option: 1,
            length: 0x1_0001
        }
    );
    assert_eq!(err.option_reply_type(), Some(REP_ERR_TOO_BIG));

    let bad = hex("49484156454F5055 00000001 00000000");
    let err = OptionHeader::decode(&bad).unwrap_err();
    assert!(matches!(
        err,
        WireError::BadMagic {
            expected: IHAVEOPT,
            ..
        }
    ));
    assert_eq!(err.option_reply_type(), None);
}

#[test]
fn go_payload_layout() {
    // name length 3, "abc", 2 info requests: BLOCK_SIZE, NAME.
    let payload = hex("00000003 616263 0002 0003 0001");
    let opt = ClientOption::parse(OPT_GO, &payload).unwrap();
    let ClientOption::Go(req) = opt else {
        panic!("{opt:?}")
    };
    assert_eq!(req.name, "abc");
    assert_eq!(
        req.requests.iter().collect::<Vec<_>>(),
        vec![INFO_BLOCK_SIZE, INFO_NAME]
    );
    assert!(req.requests.contains(INFO_BLOCK_SIZE));
    assert!(!req.requests.contains(INFO_EXPORT));

    let mut framed = Vec::new();
    InfoRequest::encode_option(&mut framed, OPT_GO, "abc", &[INFO_BLOCK_SIZE, INFO_NAME]);
    assert_eq!(framed[16..], payload[..]);
    let mut again = Vec::new();
    opt.encode(&mut again);
    assert_eq!(again, framed);

    // Default export, no requests.
    let empty = hex("00000000 0000");
    let opt = ClientOption::parse(OPT_INFO, &empty).unwrap();
    assert!(matches!(opt, ClientOption::Info(r) if r.name.is_empty() && r.requests.is_empty()));
}

#[test]
fn go_payload_invalid() {
    let cases: &[&str] = &[
        "",                             // too short
        "000000",                       // too short
        "00000064 616263 0000",         // name length > data - 6
        "00000003 616263",              // missing count
        "00000003 616263 0002 0003",    // count exceeds data
        "00000003 616263 0001 0003 00", // trailing byte
        "00000002 6100 0000",           // NUL in name
        "00000002 c328 0000",           // invalid UTF-8
        "ffffffff 0000",                // huge name length
    ];
    for c in cases {
        let err = ClientOption::parse(OPT_GO, &hex(c)).unwrap_err();
        assert!(
            matches!(err, WireError::InvalidOption { option: OPT_GO, .. }),
            "{c}: {err:?}"
        );
        assert_eq!(err.option_reply_type(), Some(REP_ERR_INVALID));
    }
    // Name longer than 4096 bytes.
    let mut long = Vec::new();
    InfoRequest::encode_option(&mut long, OPT_INFO, &"x".repeat(4097), &[]);
    assert!(ClientOption::parse(OPT_INFO, &long[16..]).is_err());
    let mut ok = Vec::new();
    InfoRequest::encode_option(&mut ok, OPT_INFO, &"x".repeat(4096), &[]);
    assert!(ClientOption::parse(OPT_INFO, &ok[16..]).is_ok());
}

#[test]
fn meta_context_payload_layout() {
    let payload =
        hex("00000002 7364 00000002 0000000f 626173653a616c6c6f636174696f6e 00000005 782d613a62");
    let opt = ClientOption::parse(OPT_SET_META_CONTEXT, &payload).unwrap();
    let ClientOption::SetMetaContext(req) = opt else {
        panic!("{opt:?}")
    };
    assert_eq!(req.export, "sd");
    assert_eq!(req.queries.len(), 2);
    assert_eq!(
        req.queries.iter().collect::<Vec<_>>(),
        vec!["base:allocation", "x-a:b"]
    );

    let mut framed = Vec::new();
    MetaContextRequest::encode_option(
        &mut framed,
        OPT_SET_META_CONTEXT,
        "sd",
        &["base:allocation", "x-a:b"],
    );
    assert_eq!(framed[16..], payload[..]);

    let empty = hex("00000000 00000000");
    let opt = ClientOption::parse(OPT_LIST_META_CONTEXT, &empty).unwrap();
    assert!(matches!(opt, ClientOption::ListMetaContext(r) if r.queries.is_empty()));

    for c in [
        "",
        "00000001",                        // name exceeds data
        "00000000",                        // missing count
        "00000000 00000001",               // count exceeds data
        "00000000 00000001 00000005 6162", // query exceeds data
        "00000000 00000000 00",            // trailing
        "00000000 ffffffff 00000000",      // huge count
    ] {
        let err = ClientOption::parse(OPT_LIST_META_CONTEXT, &hex(c)).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::InvalidOption {
                    option: OPT_LIST_META_CONTEXT,
                    ..
                }
            ),
            "{c}"
        );
    }
}

#[test]
fn simple_options() {
    assert_eq!(
        ClientOption::parse(OPT_EXPORT_NAME, b"disk0"),
        Ok(ClientOption::ExportName("disk0"))
    );
    assert_eq!(
        ClientOption::parse(OPT_EXPORT_NAME, b""),
        Ok(ClientOption::ExportName(""))
    );
    assert!(ClientOption::parse(OPT_EXPORT_NAME, b"a\0").is_err());
    assert_eq!(
        ClientOption::parse(OPT_ABORT, b"ignored"),
        Ok(ClientOption::Abort)
    );
    assert_eq!(ClientOption::parse(OPT_LIST, b""), Ok(ClientOption::List));
    assert_eq!(
        ClientOption::parse(OPT_STARTTLS, b""),
        Ok(ClientOption::StartTls)
    );
    assert_eq!(
        ClientOption::parse(OPT_STRUCTURED_REPLY, b""),
        Ok(ClientOption::StructuredReply)
    );
    assert_eq!(
        ClientOption::parse(OPT_EXTENDED_HEADERS, b""),
        Ok(ClientOption::ExtendedHeaders)
    );
    for o in [
        OPT_LIST,
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
        OPT_EXTENDED_HEADERS,
    ] {
        let err = ClientOption::parse(o, b"x").unwrap_err();
        assert_eq!(err.option_reply_type(), Some(REP_ERR_INVALID));
    }
    assert_eq!(
        ClientOption::parse(OPT_PEEK_EXPORT, b"zz"),
        Ok(ClientOption::Unknown {
            option: OPT_PEEK_EXPORT,
            data: b"zz"
        })
    );
    assert_eq!(
        ClientOption::parse(0xdead, b""),
        Ok(ClientOption::Unknown {
            option: 0xdead,
            data: b""
        })
    );
}

#[test]
fn option_reply_layouts() {
    let head =
        |opt: &str, rep: &str, len: &str| hex(&format!("0003e889045565a9 {opt} {rep} {len}"));
    let enc = |r: OptionReply, opt: u32| {
        let mut v = Vec::new();
        r.encode(opt, &mut v);
        v
    };

    assert_eq!(
        enc(OptionReply::Ack, OPT_GO),
        head("00000007", "00000001", "00000000")
    );

    let mut want = head("00000003", "00000002", "0000000b");
    want.extend_from_slice(&hex("00000003 616263 64657363"));
    assert_eq!(
        enc(
            OptionReply::Server {
                name: "abc",
                description: "desc"
            },
            OPT_LIST
        ),
        want
    );

    let mut want = head("00000006", "00000003", "0000000c");
    want.extend_from_slice(&hex("0000 0000000100000000 012d"));
    let flags =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, 0x012d);
    assert_eq!(
        enc(
            OptionReply::InfoExport {
                size: 1 << 32,
                flags
            },
            OPT_INFO
        ),
        want
    );

    let mut want = head("00000007", "00000003", "00000005");
    want.extend_from_slice(&hex("0001 616263"));
    assert_eq!(enc(OptionReply::InfoName("abc"), OPT_GO), want);

    let mut want = head("00000007", "00000003", "00000004");
    want.extend_from_slice(&hex("0002 6869"));
    assert_eq!(enc(OptionReply::InfoDescription("hi"), OPT_GO), want);

    let mut want = head("00000007", "00000003", "0000000e");
    want.extend_from_slice(&hex("0003 00000200 00001000 02000000"));
    let bs = BlockSize {
        min: 512,
        preferred: 4096,
        max: 32 << 20,
    };
    assert_eq!(enc(OptionReply::InfoBlockSize(bs), OPT_GO), want);

    let mut want = head("0000000a", "00000004", "00000013");
    want.extend_from_slice(&hex("00000001 626173653a616c6c6f636174696f6e"));
    assert_eq!(
        enc(
            OptionReply::MetaContext {
                id: 1,
                name: META_CONTEXT_BASE_ALLOCATION
            },
            OPT_SET_META_CONTEXT
        ),
        want
    );

    let mut want = head("0000002a", "80000001", "00000002");
    want.extend_from_slice(b"no");
    assert_eq!(
        enc(
            OptionReply::Error {
                reply: REP_ERR_UNSUP,
                message: "no"
            },
            42
        ),
        want
    );
    assert_eq!(
        enc(
            OptionReply::Error {
                reply: REP_ERR_UNKNOWN,
                message: ""
            },
            OPT_GO
        ),
        head("00000007", "80000006", "00000000")
    );
}

#[test]
fn option_reply_error_values() {
    let all = [
        REP_ERR_UNSUP,
        REP_ERR_POLICY,
        REP_ERR_INVALID,
        REP_ERR_PLATFORM,
        REP_ERR_TLS_REQD,
        REP_ERR_UNKNOWN,
        REP_ERR_SHUTDOWN,
        REP_ERR_BLOCK_SIZE_REQD,
        REP_ERR_TOO_BIG,
        REP_ERR_EXT_HEADER_REQD,
    ];
    for (i, v) in all.iter().enumerate() {
        assert_eq!(*v, (1u32 << 31) + i as u32 + 1);
    }
}

#[test]
fn export_name_reply_layout() {
    let r = ExportNameReply {
        size: 0x1234,
        flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
    };
    let mut v = Vec::new();
    r.encode(true, &mut v);
    assert_eq!(v, hex("0000000000001234 0003"));
    assert_eq!(ExportNameReply::decode(&v, true), Ok((r, 10)));
    let mut v = Vec::new();
    r.encode(false, &mut v);
    assert_eq!(v.len(), 134);
    assert!(v[10..].iter().all(|b| *b == 0));
    assert_eq!(ExportNameReply::decode(&v, false), Ok((r, 134)));
    assert_eq!(
        ExportNameReply::decode(&v[..10], false),
        Err(WireError::Incomplete { needed: 124 })
    );
}

#[test]
fn string_truncation() {
    let long = "é".repeat(3000); // 6000 bytes, 2-byte chars
    let mut v = Vec::new();
    OptionReply::InfoDescription(&long).encode(OPT_GO, &mut v);
    let (_, r, n) = OptionReply::decode(&v).unwrap();
    assert_eq!(n, v.len());
    let OptionReply::InfoDescription(d) = r else {
        panic!()
    };
    assert_eq!(d.len(), 4096);
    assert_eq!(d, &long[..4096]);
    let odd = format!("a{long}"); // boundary falls inside a char
    let mut v = Vec::new();
    OptionReply::Error {
        reply: REP_ERR_INVALID,
        message: &odd,
    }
    .encode(1, &mut v);
    let (_, r, _) = OptionReply::decode(&v).unwrap();
    assert!(matches!(r, OptionReply::Error { message, .. } if message.len() == 4095));
}

#[test]
fn block_size_rules() {
    assert!(BlockSize {
        min: 1,
        preferred: 4096,
        max: 32 << 20
    }
    .is_valid());
    assert!(BlockSize {
        min: 4096,
        preferred: 4096,
        max: 4096
    }
    .is_valid());
    assert!(BlockSize {
        min: 512,
        preferred: 512,
        max: u32::MAX
    }
    .is_valid());
    assert!(!BlockSize {
        min: 3,
        preferred: 4096,
        max: 4096
    }
    .is_valid());
    assert!(!BlockSize {
        min: 1 << 17,
        preferred: 1 << 17,
        max: 1 << 17
    }
    .is_valid());
    assert!(!BlockSize {
        min: 1,
        preferred: 256,
        max: 4096
    }
    .is_valid());
    assert!(!BlockSize {
        min: 4096,
        preferred: 2048,
        max: 4096
    }
    .is_valid());
    assert!(!BlockSize {
        min: 512,
        preferred: 4096,
        max: 2048
    }
    .is_valid());
    assert!(!BlockSize {
        min: 0,
        preferred: 4096,
        max: 4096
    }
    .is_valid());
}

// ---------------------------------------------------------------------------------------------
// Transmission layouts.
// ---------------------------------------------------------------------------------------------

#[test]
fn compact_request_layout() {
    let bytes = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
    let (req, n) = Request::decode(&bytes, false).unwrap();
    assert_eq!(n, 28);
    assert_eq!(
        req,
        Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 0x200
        }
    );
    assert_eq!(req.command(), Some(Command::Write));
    assert_eq!(req.payload_len(false, 1 << 20), Ok(0x200));
    assert_eq!(
        req.payload_len(false, 0x1ff),
        Err(WireError::PayloadTooLarge {
            length: 0x200,
            max: 0x1ff
        })
    );
    let mut again = Vec::new();
    req.encode(false, &mut again);
    assert_eq!(again, bytes);

    // Frame: header + payload.
    let mut framed = bytes.clone();
    framed.extend_from_slice(&[0xab; 0x200]);
    framed.extend_from_slice(&[1, 2, 3]); // start of the next request
    assert_eq!(
        Request::decode_frame(&framed[..100], false, 1 << 20),
        Err(WireError::Incomplete {
            needed: 28 + 0x200 - 100
        })
    );
    let (r2, payload, n) = Request::decode_frame(&framed, false, 1 << 20).unwrap();
    assert_eq!((r2, payload.len(), n), (req, 0x200, 28 + 0x200));

    // A READ has no payload even with a length.
    let read = Request {
        kind: CMD_READ,
        length: 1 << 20,
        ..req
    };
    assert_eq!(read.payload_len(false, 0), Ok(0));
    // The extended magic is not accepted in compact mode.
    let mut ext = Vec::new();
    req.encode(true, &mut ext);
    assert_eq!(
        Request::decode(&ext, false),
        Err(WireError::BadMagic {
            expected: 0x2560_9513,
            found: 0x21e4_1c71
        })
    );
}

#[test]
fn extended_request_layout() {
    let bytes = hex("21e41c71 0020 0001 00000000000000ff 0000000000000000 0000000000000010");
    let (req, n) = Request::decode(&bytes, true).unwrap();
    assert_eq!(n, 32);
    assert_eq!(
        req,
        Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            kind: CMD_WRITE,
            cookie: 0xff,
            offset: 0,
            length: 16
        }
    );
    assert_eq!(req.payload_len(true, 16), Ok(16));
    // Without PAYLOAD_LEN, the length is an effect length (64-bit) and nothing follows.
    let zeroes = Request {
        flags: 0,
        kind: CMD_WRITE_ZEROES,
        length: 1 << 40,
        ..req
    };
    assert_eq!(zeroes.payload_len(true, 0), Ok(0));
    let mut v = Vec::new();
    zeroes.encode(true, &mut v);
    assert_eq!(
        v,
        hex("21e41c71 0000 0006 00000000000000ff 0000000000000000 0000010000000000")
    );
    assert_eq!(Request::decode(&v, true), Ok((zeroes, 32)));
    assert!(matches!(
        Request::decode(&bytes, false),
        Err(WireError::BadMagic { .. })
    ));
    assert_eq!(
        Request::decode(&bytes[..31], true),
        Err(WireError::Incomplete { needed: 1 })
    );
}

#[test]
fn command_values() {
    for (k, c) in [
        (0, Command::Read),
        (1, Command::Write),
        (2, Command::Disc),
        (3, Command::Flush),
        (4, Command::Trim),
        (5, Command::Cache),
        (6, Command::WriteZeroes),
        (7, Command::BlockStatus),
        (8, Command::Resize),
    ] {
        assert_eq!(Command::from_raw(k), Some(c));
        assert_eq!(c.raw(), k);
    }
    assert_eq!(Command::from_raw(9), None);
    assert_eq!(
        [
            CMD_FLAG_FUA,
            CMD_FLAG_NO_HOLE,
            CMD_FLAG_DF,
            CMD_FLAG_REQ_ONE,
            CMD_FLAG_FAST_ZERO,
            CMD_FLAG_PAYLOAD_LEN
        ],
        [1, 2, 4, 8, 16, 32]
    );
    assert_eq!(FLAG_BLOCK_STATUS_PAYLOAD, 0x1000);
    assert_eq!(
        [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN],
        [1, 5, 12, 22, 28, 75, 95, 108]
    );
}

#[test]
fn block_status_payload_layout() {
    let p = hex("0000000000100000 00000001 00000002");
    let bs = BlockStatusPayload::parse(&p).unwrap();
    assert_eq!(bs.effect_length, 1 << 20);
    assert_eq!(bs.ids().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(bs.len(), 2);
    let mut v = Vec::new();
    BlockStatusPayload::encode(&mut v, 1 << 20, &[1, 2]);
    assert_eq!(v, p);
    for bad in ["", "00000000", "0000000000000000 01"] {
        let err = BlockStatusPayload::parse(&hex(bad)).unwrap_err();
        assert_eq!(err.errno(), Some(EINVAL));
    }
    assert!(BlockStatusPayload::parse(&hex("0000000000000000"))
        .unwrap()
        .is_empty());
}

#[test]
fn simple_reply_layout() {
    let r = SimpleReply {
        error: EIO,
        cookie: 0x1122_3344_5566_7788,
    };
    assert_eq!(
        r.to_bytes().to_vec(),
        hex("67446698 00000005 1122334455667788")
    );
    assert_eq!(SimpleReply::decode(&r.to_bytes()), Ok((r, 16)));
}

#[test]
fn chunk_layouts_structured() {
    let t = Request {
        cookie: 9,
        offset: 0x4000,
        ..Default::default()
    }
    .reply_target(false);
    assert_eq!(t.header_len(), 20);
    let mut v = Vec::new();
    t.encode_none(&mut v);
    assert_eq!(v, hex("668e33ef 0001 0000 0000000000000009 00000000"));

    let mut v = Vec::new();
    t.encode_offset_data(&mut v, 0, 0x4000, b"abc");
    assert_eq!(
        v,
        hex("668e33ef 0000 0001 0000000000000009 0000000b 0000000000004000 616263")
    );
    let mut h = Vec::new();
    t.encode_offset_data_header(&mut h, 0, 0x4000, 3);
    assert_eq!(h[..], v[..v.len() - 3]);

    let mut v = Vec::new();
    t.encode_offset_hole(&mut v, REPLY_FLAG_DONE, 0x5000, 0x1000);
    assert_eq!(
        v,
        hex("668e33ef 0001 0002 0000000000000009 0000000c 0000000000005000 00001000")
    );

    let mut v = Vec::new();
    t.encode_error(&mut v, REPLY_FLAG_DONE, EPERM, "ro");
    assert_eq!(
        v,
        hex("668e33ef 0001 8001 0000000000000009 00000008 00000001 0002 726f")
    );

    let mut v = Vec::new();
    t.encode_error_offset(&mut v, 0, EIO, "", 0x4200);
    assert_eq!(
        v,
        hex("668e33ef 0000 8002 0000000000000009 0000000e 00000005 0000 0000000000004200")
    );

    let mut v = Vec::new();
    let ext = [
        Extent {
            length: 0x1000,
            status: 0,
        },
        Extent {
            length: 0x3000,
            status: 3,
        },
    ];
    assert_eq!(t.encode_block_status(&mut v, REPLY_FLAG_DONE, 1, &ext), 2);
    assert_eq!(
        v,
        hex("668e33ef 0001 0005 0000000000000009 00000014 00000001 00001000 00000000 00003000 00000003")
    );
}

#[test]
fn chunk_layouts_extended() {
    let t = ReplyTarget {
        cookie: 9,
        offset: 0x4000,
        extended: true,
    };
    assert_eq!(t.header_len(), 32);
    let mut v = Vec::new();
    t.encode_none(&mut v);
    assert_eq!(
        v,
        hex("6e8a278c 0001 0000 0000000000000009 0000000000004000 0000000000000000")
    );

    let mut v = Vec::new();
    t.encode_offset_hole(&mut v, 0, 0x5000, 0x1000);
    assert_eq!(
        v,
        hex("6e8a278c 0000 0002 0000000000000009 0000000000004000 000000000000000c 0000000000005000 00001000")
    );

    let mut v = Vec::new();
    let ext = [Extent {
        length: 1 << 33,
        status: STATE_HOLE as u64 | STATE_ZERO as u64,
    }];
    assert_eq!(t.encode_block_status(&mut v, REPLY_FLAG_DONE, 7, &ext), 1);
    assert_eq!(
        v,
        hex(
            "6e8a278c 0001 0006 0000000000000009 0000000000004000 0000000000000018
             00000007 00000001 0000000200000000 0000000000000003"
        )
    );
}

#[test]
fn compact_block_status_clamps_long_extents() {
    let t = ReplyTarget {
        cookie: 1,
        offset: 0,
        extended: false,
    };
    let ext = [
        Extent {
            length: 4096,
            status: 0x1_0000_0001,
        },
        Extent {
            length: 1 << 33,
            status: 2,
        },
        Extent {
            length: 4096,
            status: 0,
        },
    ];
    let mut v = Vec::new();
    assert_eq!(t.encode_block_status(&mut v, 0, 1, &ext), 2);
    let (h, n) = StructuredReplyHeader::decode(&v).unwrap();
    assert_eq!(h.length, 4 + 16);
    let chunk = ReplyChunk::parse(h.kind, &v[n..]).unwrap();
    let ReplyChunk::BlockStatus { descriptors, .. } = chunk else {
        panic!()
    };
    assert_eq!(
        descriptors.iter().collect::<Vec<_>>(),
        vec![
            Extent {
                length: 4096,
                status: 1
            },
            Extent {
                length: 0xffff_0000,
                status: 2
            }
        ]
    );
}

#[test]
fn block_status_caps_extent_count() {
    let t = ReplyTarget {
        cookie: 1,
        offset: 0,
        extended: false,
    };
    let ext = vec![
        Extent {
            length: 512,
            status: 0
        };
        MAX_BLOCK_STATUS_EXTENTS + 5
    ];
    let mut v = Vec::new();
    assert_eq!(
        t.encode_block_status(&mut v, 0, 1, &ext),
        MAX_BLOCK_STATUS_EXTENTS
    );
    assert_eq!(v.len(), 20 + 4 + 8 * MAX_BLOCK_STATUS_EXTENTS);
}

#[test]
fn reply_chunk_rejects_bad_lengths() {
    for (kind, payload) in [
        (REPLY_TYPE_NONE, "00"),
        (REPLY_TYPE_OFFSET_DATA, "0000000000000000"),
        (REPLY_TYPE_OFFSET_HOLE, "0000000000000000 000000"),
        (REPLY_TYPE_BLOCK_STATUS, "00000001"),
        (REPLY_TYPE_BLOCK_STATUS, "00000001 0000000100"),
        (
            REPLY_TYPE_BLOCK_STATUS_EXT,
            "00000001 00000002 00000000000000010000000000000000",
        ),
        (REPLY_TYPE_ERROR, "00000005 0003 6162"),
        (REPLY_TYPE_ERROR, "00000005 0001 6162"),
        (REPLY_TYPE_ERROR_OFFSET, "00000005 0000"),
    ] {
        assert!(
            ReplyChunk::parse(kind, &hex(payload)).is_err(),
            "{kind} {payload}"
        );
    }
}

#[test]
fn incomplete_needed_values() {
    let mut v = Vec::new();
    MetaContextRequest::encode_option(&mut v, OPT_LIST_META_CONTEXT, "e", &["base:"]);
    assert_eq!(
        OptionHeader::decode_frame(&[]),
        Err(WireError::Incomplete { needed: 16 })
    );
    assert_eq!(
        OptionHeader::decode_frame(&v[..3]),
        Err(WireError::Incomplete { needed: 13 })
    );
    assert_eq!(
        OptionHeader::decode_frame(&v[..20]),
        Err(WireError::Incomplete {
            needed: v.len() - 20
        })
    );
    assert!(WireError::Incomplete { needed: 1 }.is_incomplete());
}

// ---------------------------------------------------------------------------------------------
// Property tests.
// ---------------------------------------------------------------------------------------------

/// Every strict prefix of a valid encoding is `Incomplete` with a sane `needed`.
fn check_prefixes<F>(bytes: &[u8], decode: F) -> Result<(), TestCaseError>
where
    F: Fn(&[u8]) -> Result<usize, WireError>,
{
    prop_assert_eq!(decode(bytes), Ok(bytes.len()));
    for k in 0..bytes.len() {
        match decode(&bytes[..k]) {
            Err(WireError::Incomplete { needed }) => {
                prop_assert!(
                    needed >= 1 && k + needed <= bytes.len(),
                    "k={} needed={}",
                    k,
                    needed
                );
            }
            other => prop_assert!(false, "prefix {} gave {:?}", k, other),
        }
    }
    Ok(())
}

fn wire_string() -> impl Strategy<Value = String> {
    // Printable characters only (no NUL), some multi-byte.
    "[a-zA-Z0-9:_. é€😀-]{0,24}"
}

fn request_strategy() -> impl Strategy<Value = (Request, bool)> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(flags, kind, cookie, offset, length, extended)| {
            let length = if extended {
                length
            } else {
                length & 0xffff_ffff
            };
            (
                Request {
                    flags,
                    kind,
                    cookie,
                    offset,
                    length,
                },
                extended,
            )
        })
}

#[derive(Debug, Clone)]
enum OwnedReply {
    Ack,
    Server(String, String),
    InfoExport(u64, u16),
    InfoName(String),
    InfoDescription(String),
    InfoBlockSize(u32, u32, u32),
    InfoOther(u16, Vec<u8>),
    MetaContext(u32, String),
    Error(u32, String),
    Other(u32, Vec<u8>),
}

impl OwnedReply {
    fn as_reply(&self) -> OptionReply<'_> {
        match self {
            OwnedReply::Ack => OptionReply::Ack,
            OwnedReply::Server(n, d) => OptionReply::Server {
                name: n,
                description: d,
            },
            OwnedReply::InfoExport(size, flags) => OptionReply::InfoExport {
                size: *size,
                flags: *flags,
            },
            OwnedReply::InfoName(s) => OptionReply::InfoName(s),
            OwnedReply::InfoDescription(s) => OptionReply::InfoDescription(s),
            OwnedReply::InfoBlockSize(min, preferred, max) => {
                OptionReply::InfoBlockSize(BlockSize {
                    min: *min,
                    preferred: *preferred,
                    max: *max,
                })
            }
            OwnedReply::InfoOther(info, data) => OptionReply::InfoOther { info: *info, data },
            OwnedReply::MetaContext(id, name) => OptionReply::MetaContext { id: *id, name },
            OwnedReply::Error(reply, message) => OptionReply::Error {
                reply: *reply,
                message,
            },
            OwnedReply::Other(reply, data) => OptionReply::Other {
                reply: *reply,
                data,
            },
        }
    }
}

fn option_reply_strategy() -> impl Strategy<Value = OwnedReply> {
    prop_oneof![
        Just(OwnedReply::Ack),
        (wire_string(), wire_string()).prop_map(|(n, d)| OwnedReply::Server(n, d)),
        (any::<u64>(), any::<u16>()).prop_map(|(s, f)| OwnedReply::InfoExport(s, f)),
        wire_string().prop_map(OwnedReply::InfoName),
        wire_string().prop_map(OwnedReply::InfoDescription),
        (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(a, b, c)| OwnedReply::InfoBlockSize(a, b, c)),
        (4u16.., prop::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(i, d)| OwnedReply::InfoOther(i, d)),
        (any::<u32>(), wire_string()).prop_map(|(i, n)| OwnedReply::MetaContext(i, n)),
        (REP_FLAG_ERROR.., wire_string()).prop_map(|(r, m)| OwnedReply::Error(r, m)),
        (
            5u32..REP_FLAG_ERROR,
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(r, d)| OwnedReply::Other(r, d)),
    ]
}

#[derive(Debug, Clone)]
enum OwnedOption {
    ExportName(String),
    Simple(u32),
    Info(u32, String, Vec<u16>),
    Meta(u32, String, Vec<String>),
    Unknown(u32, Vec<u8>),
}

fn client_option_strategy() -> impl Strategy<Value = OwnedOption> {
    prop_oneof![
        wire_string().prop_map(OwnedOption::ExportName),
        prop::sample::select(vec![
            OPT_ABORT,
            OPT_LIST,
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            OPT_EXTENDED_HEADERS
        ])
        .prop_map(OwnedOption::Simple),
        (
            prop::sample::select(vec![OPT_INFO, OPT_GO]),
            wire_string(),
            prop::collection::vec(any::<u16>(), 0..8)
        )
            .prop_map(|(o, n, i)| OwnedOption::Info(o, n, i)),
        (
            prop::sample::select(vec![OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT]),
            wire_string(),
            prop::collection::vec(wire_string(), 0..6)
        )
            .prop_map(|(o, n, q)| OwnedOption::Meta(o, n, q)),
        (
            prop_oneof![Just(OPT_PEEK_EXPORT), 12u32..],
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(o, d)| OwnedOption::Unknown(o, d)),
    ]
}

impl OwnedOption {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OwnedOption::ExportName(n) => ClientOption::ExportName(n).encode(out),
            OwnedOption::Simple(o) => OptionHeader {
                option: *o,
                length: 0,
            }
            .encode(out),
            OwnedOption::Info(o, n, i) => InfoRequest::encode_option(out, *o, n, i),
            OwnedOption::Meta(o, n, q) => {
                let q: Vec<&str> = q.iter().map(String::as_str).collect();
                MetaContextRequest::encode_option(out, *o, n, &q)
            }
            OwnedOption::Unknown(o, d) => ClientOption::Unknown {
                option: *o,
                data: d,
            }
            .encode(out),
        }
    }

    fn check(&self, parsed: &ClientOption<'_>) -> Result<(), TestCaseError> {
        match (self, parsed) {
            (OwnedOption::ExportName(n), ClientOption::ExportName(p)) => prop_assert_eq!(n, p),
            (OwnedOption::Simple(o), p) => prop_assert_eq!(*o, p.option()),
            (OwnedOption::Info(o, n, i), ClientOption::Info(r) | ClientOption::Go(r)) => {
                prop_assert_eq!(*o, parsed.option());
                prop_assert_eq!(n, r.name);
                prop_assert_eq!(i, &r.requests.iter().collect::<Vec<_>>());
                prop_assert_eq!(i.len(), r.requests.len());
            }
            (
                OwnedOption::Meta(o, n, q),
                ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r),
            ) => {
                prop_assert_eq!(*o, parsed.option());
                prop_assert_eq!(n, r.export);
                prop_assert_eq!(q, &r.queries.iter().map(String::from).collect::<Vec<_>>());
                prop_assert_eq!(q.len(), r.queries.len());
            }
            (OwnedOption::Unknown(o, d), ClientOption::Unknown { option, data }) => {
                prop_assert_eq!(o, option);
                prop_assert_eq!(&d[..], *data);
            }
            (want, got) => prop_assert!(false, "{:?} parsed as {:?}", want, got),
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum OwnedChunk {
    None,
    OffsetData(u16, u64, Vec<u8>),
    OffsetHole(u16, u64, u32),
    Error(u16, u32, String),
    ErrorOffset(u16, u32, String, u64),
    BlockStatus(u16, u32, Vec<(u64, u64)>),
}

fn chunk_strategy() -> impl Strategy<Value = OwnedChunk> {
    let flags = prop_oneof![Just(0u16), Just(REPLY_FLAG_DONE)];
    prop_oneof![
        Just(OwnedChunk::None),
        (
            flags.clone(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(f, o, d)| OwnedChunk::OffsetData(f, o, d)),
        (flags.clone(), any::<u64>(), 1u32..).prop_map(|(f, o, s)| OwnedChunk::OffsetHole(f, o, s)),
        (flags.clone(), 1u32.., wire_string()).prop_map(|(f, e, m)| OwnedChunk::Error(f, e, m)),
        (flags.clone(), 1u32.., wire_string(), any::<u64>())
            .prop_map(|(f, e, m, o)| OwnedChunk::ErrorOffset(f, e, m, o)),
        (
            flags,
            any::<u32>(),
            prop::collection::vec((1u64..1 << 40, any::<u64>()), 1..16)
        )
            .prop_map(|(f, c, e)| OwnedChunk::BlockStatus(f, c, e)),
    ]
}

/// (flags, kind, cookie, offset) of a chunk header of either style.
type ChunkFields = (u16, u16, u64, u64);

/// Decodes one chunk of either style: (header fields, payload, consumed).
fn decode_chunk(buf: &[u8], extended: bool) -> Result<(ChunkFields, &[u8], usize), WireError> {
    let (flags, kind, cookie, offset, len, at) = if extended {
        let (h, at) = ExtendedReplyHeader::decode(buf)?;
        (h.flags, h.kind, h.cookie, h.offset, h.length, at)
    } else {
        let (h, at) = StructuredReplyHeader::decode(buf)?;
        (h.flags, h.kind, h.cookie, 0, u64::from(h.length), at)
    };
    let total = at + usize::try_from(len).map_err(|_| WireError::InvalidReply { reason: "len" })?;
    if buf.len() < total {
        return Err(WireError::Incomplete {
            needed: total - buf.len(),
        });
    }
    Ok(((flags, kind, cookie, offset), &buf[at..total], total))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn greeting_round_trip(flags in any::<u16>()) {
        let g = Greeting { flags };
        let b = g.to_bytes();
        prop_assert_eq!(Greeting::decode(&b), Ok((g, 18)));
        check_prefixes(&b, |b| Greeting::decode(b).map(|(_, n)| n))?;
    }

    #[test]
    fn client_flags_round_trip(flags in 0u32..4) {
        let b = ClientFlags(flags).to_bytes();
        prop_assert_eq!(ClientFlags::decode(&b, 3), Ok((ClientFlags(flags), 4)));
        check_prefixes(&b, |b| ClientFlags::decode(b, 3).map(|(_, n)| n))?;
    }

    #[test]
    fn client_option_round_trip(opt in client_option_strategy()) {
        let mut bytes = Vec::new();
        opt.encode(&mut bytes);
        let (hdr, payload, n) = OptionHeader::decode_frame(&bytes).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(hdr.length as usize, payload.len());
        let parsed = ClientOption::parse(hdr.option, payload).unwrap();
        opt.check(&parsed)?;
        let mut again = Vec::new();
        parsed.encode(&mut again);
        prop_assert_eq!(&again, &bytes);
        check_prefixes(&bytes, |b| OptionHeader::decode_frame(b).map(|(_, _, n)| n))?;
        // Any truncation of the payload (with a consistent header) is invalid, never a panic
        // and never `Incomplete`.
        for k in 0..payload.len() {
            if let Err(e) = ClientOption::parse(hdr.option, &payload[..k]) {
                prop_assert!(matches!(e, WireError::InvalidOption { .. }), "{:?}", e);
            }
        }
    }

    #[test]
    fn option_stream(opts in prop::collection::vec(client_option_strategy(), 0..6)) {
        // Options back to back in one buffer, parsed as a server would.
        let mut bytes = Vec::new();
        for o in &opts {
            o.encode(&mut bytes);
        }
        let mut at = 0;
        for o in &opts {
            let (hdr, payload, n) = OptionHeader::decode_frame(&bytes[at..]).unwrap();
            o.check(&ClientOption::parse(hdr.option, payload).unwrap())?;
            at += n;
        }
        prop_assert_eq!(at, bytes.len());
    }

    #[test]
    fn option_reply_round_trip(reply in option_reply_strategy(), option in any::<u32>()) {
        let r = reply.as_reply();
        let mut bytes = Vec::new();
        r.encode(option, &mut bytes);
        prop_assert_eq!(OptionReply::decode(&bytes), Ok((option, r, bytes.len())));
        check_prefixes(&bytes, |b| OptionReply::decode(b).map(|(_, _, n)| n))?;
    }

    #[test]
    fn export_name_reply_round_trip(size in any::<u64>(), flags in any::<u16>(), nz in any::<bool>()) {
        let r = ExportNameReply { size, flags };
        let mut bytes = Vec::new();
        r.encode(nz, &mut bytes);
        prop_assert_eq!(bytes.len(), ExportNameReply::wire_len(nz));
        prop_assert_eq!(ExportNameReply::decode(&bytes, nz), Ok((r, bytes.len())));
        check_prefixes(&bytes, |b| ExportNameReply::decode(b, nz).map(|(_, n)| n))?;
    }

    #[test]
    fn request_round_trip((req, extended) in request_strategy()) {
        let mut bytes = Vec::new();
        req.encode(extended, &mut bytes);
        prop_assert_eq!(bytes.len(), Request::header_len(extended));
        prop_assert_eq!(Request::decode(&bytes, extended), Ok((req, bytes.len())));
        check_prefixes(&bytes, |b| Request::decode(b, extended).map(|(_, n)| n))?;
        // The other header style never accepts it.
        let other = Request::decode(&bytes, !extended);
        let rejected = matches!(other, Err(WireError::BadMagic { .. }) | Err(WireError::Incomplete { .. }));
        prop_assert!(rejected, "{:?}", other);
        let t = req.reply_target(extended);
        prop_assert_eq!((t.cookie, t.offset, t.extended), (req.cookie, req.offset, extended));
    }

    #[test]
    fn request_stream(reqs in prop::collection::vec((any::<u16>(), 0u16..10, any::<u64>(), any::<u64>(), 0u64..64), 0..8), extended in any::<bool>()) {
        // Requests with payloads back to back, framed by payload_len as a server would.
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for (flags, kind, cookie, offset, length) in reqs {
            let r = Request { flags, kind, cookie, offset, length };
            r.encode(extended, &mut bytes);
            let p = r.payload_len(extended, u64::MAX).unwrap();
            bytes.extend_from_slice(&vec![kind as u8; p as usize]);
            want.push((r, p));
        }
        let mut at = 0;
        for (r, p) in want {
            let (got, payload, n) = Request::decode_frame(&bytes[at..], extended, 64).unwrap();
            prop_assert_eq!(got, r);
            prop_assert_eq!(payload.len() as u64, p);
            prop_assert!(payload.iter().all(|b| *b == r.kind as u8));
            at += n;
        }
        prop_assert_eq!(at, bytes.len());
    }

    #[test]
    fn block_status_payload_round_trip(effect in any::<u64>(), ids in prop::collection::vec(any::<u32>(), 0..16)) {
        let mut bytes = Vec::new();
        BlockStatusPayload::encode(&mut bytes, effect, &ids);
        let p = BlockStatusPayload::parse(&bytes).unwrap();
        prop_assert_eq!(p.effect_length, effect);
        prop_assert_eq!(p.ids().collect::<Vec<_>>(), ids);
    }

    #[test]
    fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let r = SimpleReply { error, cookie };
        let b = r.to_bytes();
        prop_assert_eq!(SimpleReply::decode(&b), Ok((r, 16)));
        check_prefixes(&b, |b| SimpleReply::decode(b).map(|(_, n)| n))?;
    }

    #[test]
    fn reply_headers_round_trip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u64>()) {
        let s = StructuredReplyHeader { flags, kind, cookie, length: length as u32 };
        let b = s.to_bytes();
        prop_assert_eq!(StructuredReplyHeader::decode(&b), Ok((s, 20)));
        check_prefixes(&b, |b| StructuredReplyHeader::decode(b).map(|(_, n)| n))?;
        let e = ExtendedReplyHeader { flags, kind, cookie, offset, length };
        let b = e.to_bytes();
        prop_assert_eq!(ExtendedReplyHeader::decode(&b), Ok((e, 32)));
        check_prefixes(&b, |b| ExtendedReplyHeader::decode(b).map(|(_, n)| n))?;
    }

    #[test]
    fn chunk_round_trip(chunk in chunk_strategy(), cookie in any::<u64>(), offset in any::<u64>(), extended in any::<bool>()) {
        let t = ReplyTarget { cookie, offset, extended };
        let mut bytes = Vec::new();
        let want_flags = match &chunk {
            OwnedChunk::None => { t.encode_none(&mut bytes); REPLY_FLAG_DONE }
            OwnedChunk::OffsetData(f, o, d) => { t.encode_offset_data(&mut bytes, *f, *o, d); *f }
            OwnedChunk::OffsetHole(f, o, s) => { t.encode_offset_hole(&mut bytes, *f, *o, *s); *f }
            OwnedChunk::Error(f, e, m) => { t.encode_error(&mut bytes, *f, *e, m); *f }
            OwnedChunk::ErrorOffset(f, e, m, o) => { t.encode_error_offset(&mut bytes, *f, *e, m, *o); *f }
            OwnedChunk::BlockStatus(f, c, e) => {
                let ext: Vec<Extent> = e.iter().map(|&(length, status)| Extent { length, status }).collect();
                let n = t.encode_block_status(&mut bytes, *f, *c, &ext);
                let cut = e.iter().position(|x| x.0 > u64::from(u32::MAX)).map_or(e.len(), |i| i + 1);
                prop_assert_eq!(n, if extended { e.len() } else { cut });
                *f
            }
        };
        let ((flags, kind, c, o), payload, n) = decode_chunk(&bytes, extended).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(n - payload.len(), t.header_len());
        prop_assert_eq!((flags, c), (want_flags, cookie));
        prop_assert_eq!(o, if extended { offset } else { 0 });
        let parsed = ReplyChunk::parse(kind, payload).unwrap();
        match (&chunk, parsed) {
            (OwnedChunk::None, ReplyChunk::None) => {}
            (OwnedChunk::OffsetData(_, o, d), ReplyChunk::OffsetData { offset, data }) => {
                prop_assert_eq!((*o, &d[..]), (offset, data));
            }
            (OwnedChunk::OffsetHole(_, o, s), ReplyChunk::OffsetHole { offset, size }) => {
                prop_assert_eq!((*o, *s), (offset, size));
            }
            (OwnedChunk::Error(_, e, m), ReplyChunk::Error { error, message }) => {
                prop_assert_eq!((*e, m.as_str()), (error, message));
            }
            (OwnedChunk::ErrorOffset(_, e, m, o), ReplyChunk::ErrorOffset { error, message, offset }) => {
                prop_assert_eq!((*e, m.as_str(), *o), (error, message, offset));
            }
            (OwnedChunk::BlockStatus(_, c, e), ReplyChunk::BlockStatus { context_id, descriptors }) => {
                prop_assert_eq!(*c, context_id);
                prop_assert_eq!(kind, if extended { REPLY_TYPE_BLOCK_STATUS_EXT } else { REPLY_TYPE_BLOCK_STATUS });
                let got: Vec<(u64, u64)> = descriptors.iter().map(|x| (x.length, x.status)).collect();
                if extended {
                    prop_assert_eq!(&got, e);
                } else {
                    // Compact: stops after the first extent that needs clamping; status narrowed.
                    for (g, w) in got.iter().zip(e) {
                        let len = u32::try_from(w.0).unwrap_or(COMPACT_EXTENT_CLAMP);
                        prop_assert_eq!(*g, (u64::from(len), w.1 & 0xffff_ffff));
                    }
                    let cut = e.iter().position(|x| x.0 > u64::from(u32::MAX)).map_or(e.len(), |i| i + 1);
                    prop_assert_eq!(got.len(), cut);
                }
            }
            (want, got) => prop_assert!(false, "{:?} parsed as {:?}", want, got),
        }
        check_prefixes(&bytes, |b| decode_chunk(b, extended).map(|x| x.2))?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), code in any::<u32>(), kind in any::<u16>()) {
        let _ = Greeting::decode(&bytes);
        let _ = ClientFlags::decode(&bytes, 3);
        let _ = OptionHeader::decode(&bytes);
        let _ = OptionHeader::decode_frame(&bytes);
        for o in [code, OPT_EXPORT_NAME, OPT_INFO, OPT_GO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_LIST] {
            if let (Ok(opt), false) = (ClientOption::parse(o, &bytes), o == OPT_ABORT) {
                // Whatever parses re-encodes to the same payload.
                let mut v = Vec::new();
                opt.encode(&mut v);
                prop_assert_eq!(&v[16..], &bytes[..]);
            }
        }
        let _ = OptionReply::decode(&bytes);
        let _ = OptionReply::parse(code, &bytes);
        let _ = ExportNameReply::decode(&bytes, false);
        for ext in [false, true] {
            if let Ok((r, n)) = Request::decode(&bytes, ext) {
                let mut v = Vec::new();
                r.encode(ext, &mut v);
                prop_assert_eq!(&v[..], &bytes[..n]);
            }
            let _ = Request::decode_frame(&bytes, ext, 1 << 20);
        }
        let _ = BlockStatusPayload::parse(&bytes);
        let _ = SimpleReply::decode(&bytes);
        let _ = StructuredReplyHeader::decode(&bytes);
        let _ = ExtendedReplyHeader::decode(&bytes);
        if let Ok(ReplyChunk::BlockStatus { descriptors, .. }) = ReplyChunk::parse(kind, &bytes) {
            prop_assert!(!descriptors.is_empty());
            prop_assert_eq!(descriptors.iter().count(), descriptors.len());
        }
    }

    #[test]
    fn arbitrary_magic_prefixed_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..128), which in 0usize..4) {
        // Random data behind a valid magic reaches deeper code paths than pure noise.
        let mut bytes = match which {
            0 => IHAVEOPT.to_be_bytes().to_vec(),
            1 => OPTION_REPLY_MAGIC.to_be_bytes().to_vec(),
            2 => REQUEST_MAGIC.to_be_bytes().to_vec(),
            _ => EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec(),
        };
        bytes.extend_from_slice(&tail);
        if let Ok((hdr, payload, _)) = OptionHeader::decode_frame(&bytes) {
            let _ = ClientOption::parse(hdr.option, payload);
            let _ = ClientOption::parse(hdr.option % 12, payload);
        }
        let _ = OptionReply::decode(&bytes);
        let _ = Request::decode_frame(&bytes, false, 1 << 16);
        let _ = Request::decode_frame(&bytes, true, 1 << 16);
    }
}
