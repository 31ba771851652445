use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ringblock_engine::{DeviceConfig, Engine, EngineConfig, VolumeHandle};

use super::*;
use crate::nbd::wire::{
    ExportNameReply, Greeting, InfoRequest, MetaContextRequest, OptionHeader, OptionReply, Request,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, GREETING_LEN, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_NAME, MAX_OPTION_LEN, OPTION_REPLY_HEADER_LEN, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT,
    OPT_PEEK_EXPORT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_BLOCK_SIZE_REQD, REP_ERR_EXT_HEADER_REQD, REP_ERR_POLICY, REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
};

const MIB: u64 = 1 << 20;

/// One engine for every test: a 64 MiB RAM device with volumes `v` (32 MiB) and `ro`.
fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let engine = Engine::start(&EngineConfig {
                devices: vec![DeviceConfig::ram("r", 64 * MIB)],
                cores: vec![0],
                ..Default::default()
            })
            .expect("engine starts");
            engine.create_volume("r", "v", 32 * MIB).expect("volume v");
            engine
                .create_volume("r", "ro", 16 * MIB)
                .expect("volume ro");
            Arc::new(engine)
        })
        .clone()
}

fn export(name: &str, size_bytes: u64, read_only: bool) -> ExportInfo {
    ExportInfo {
        name: name.into(),
        description: format!("test export {name}"),
        size_bytes,
        read_only,
        min_block_bytes: 512,
        preferred_block_bytes: 4096,
        max_block_bytes: 32 << 20,
    }
}

/// Exports with chosen properties, each backed by a real engine volume.
struct TestCatalog {
    engine: Arc<Engine>,
    exports: Vec<(ExportInfo, &'static str)>,
    default: Option<&'static str>,
}

impl ExportCatalog for TestCatalog {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports.iter().map(|(e, _)| e.clone()).collect()
    }
    fn open(&self, name: &str) -> Option<(ExportInfo, VolumeHandle)> {
        let (info, volume) = self.exports.iter().find(|(e, _)| e.name == name)?;
        Some((info.clone(), self.engine.open(volume).ok()?))
    }
    fn default_export(&self) -> Option<String> {
        self.default.map(str::to_string)
    }
}

fn catalog() -> Arc<TestCatalog> {
    let mut odd = export("odd", 32 * MIB, false);
    odd.min_block_bytes = 3;
    odd.preferred_block_bytes = 100;
    odd.max_block_bytes = 10;
    Arc::new(TestCatalog {
        engine: engine(),
        exports: vec![
            (export("v", 32 * MIB, false), "v"),
            (export("ro", 16 * MIB, true), "ro"),
            (odd, "v"),
        ],
        default: Some("v"),
    })
}

/// What the server side saw, plus any bytes the client sent after the handshake.
#[derive(Debug)]
struct Summary {
    export: String,
    size: u64,
    structured: bool,
    extended: bool,
    base: Option<u32>,
    flags: u16,
    leftover: Vec<u8>,
}

type ServerResult = Result<Option<Summary>, String>;

/// An owned view of one option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum R {
    Ack,
    Server(String, String),
    Export(u64, u16),
    Name(String),
    Desc(String),
    Block(u32, u32, u32),
    Meta(u32, String),
    Err(u32),
    Other(u32),
}

struct Client {
    s: UnixStream,
    server: Option<JoinHandle<ServerResult>>,
}

fn serve_with(catalog: Arc<dyn ExportCatalog>, cfg: HandshakeConfig) -> Client {
    let (client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let handle = std::thread::spawn(move || {
        let mut s = server;
        match negotiate(&mut s, &*catalog, &cfg) {
            Ok(Some(n)) => {
                // Whatever the client sent after the handshake must still be unread.
                let mut leftover = Vec::new();
                let _ = s.read_to_end(&mut leftover);
                Ok(Some(Summary {
                    export: n.info.name.clone(),
                    size: n.info.size_bytes,
                    structured: n.structured_replies,
                    extended: n.extended_headers,
                    base: n.base_allocation_id,
                    flags: n.transmission_flags,
                    leftover,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("{e:?}")),
        }
    });
    Client {
        s: client,
        server: Some(handle),
    }
}

#[test]
fn refused_clients_get_the_reason_in_every_option_reply() {
    let (mut client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let handle = std::thread::spawn(move || {
        let mut s = server;
        refuse(&mut s, "too many connections (limit 3)").map_err(|e| e.to_string())
    });
    let mut c = Client {
        s: client.try_clone().unwrap(),
        server: None,
    };
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    for option in [OPT_LIST, OPT_GO] {
        if option == OPT_GO {
            c.info(OPT_GO, "v", &[]);
        } else {
            c.raw_option(option, &[]);
        }
        let mut buf = vec![0u8; OPTION_REPLY_HEADER_LEN];
        client.read_exact(&mut buf).unwrap();
        let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
        buf.resize(OPTION_REPLY_HEADER_LEN + len, 0);
        client
            .read_exact(&mut buf[OPTION_REPLY_HEADER_LEN..])
            .unwrap();
        match OptionReply::decode(&buf).unwrap() {
            (o, OptionReply::Error { reply, message }, _) => {
                assert_eq!((o, reply), (option, REP_ERR_POLICY));
                assert_eq!(message, "too many connections (limit 3)");
            }
            other => panic!("{other:?}"),
        }
    }
    c.raw_option(OPT_ABORT, &[]);
    assert_eq!(c.reply(), (OPT_ABORT, R::Ack));
    assert_eq!(handle.join().unwrap(), Ok(()));
    // An EXPORT_NAME client, which cannot be sent an error, is hung up on.
    let (mut client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let handle = std::thread::spawn(move || {
        let mut s = server;
        refuse(&mut s, "full").map_err(|e| e.to_string())
    });
    let mut c = Client {
        s: client.try_clone().unwrap(),
        server: None,
    };
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.raw_option(OPT_EXPORT_NAME, b"v");
    assert_eq!(handle.join().unwrap(), Ok(()));
    drop(c);
    // Closed (a reset, as the name was left unread) without a byte.
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

fn serve() -> Client {
    serve_with(catalog(), HandshakeConfig::default())
}

/// A server past the greeting, with a fixed-newstyle, no-zeroes client.
fn connected() -> Client {
    let mut c = serve();
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c
}

impl Client {
    fn hello(&mut self, flags: u32) {
        let mut g = [0u8; GREETING_LEN];
        self.s.read_exact(&mut g).unwrap();
        let (greeting, _) = Greeting::decode(&g).unwrap();
        assert_eq!(greeting.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.send(&flags.to_be_bytes());
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn raw_option(&mut self, option: u32, data: &[u8]) {
        let mut v = Vec::new();
        OptionHeader {
            option,
            length: data.len() as u32,
        }
        .encode(&mut v);
        v.extend_from_slice(data);
        self.send(&v);
    }

    fn info(&mut self, option: u32, name: &str, infos: &[u16]) {
        let mut v = Vec::new();
        InfoRequest::encode_option(&mut v, option, name, infos);
        self.send(&v);
    }

    fn meta(&mut self, option: u32, export: &str, queries: &[&str]) {
        let mut v = Vec::new();
        MetaContextRequest::encode_option(&mut v, option, export, queries);
        self.send(&v);
    }

    fn reply(&mut self) -> (u32, R) {
        let mut buf = vec![0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut buf).unwrap();
        let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
        buf.resize(OPTION_REPLY_HEADER_LEN + len, 0);
        self.s
            .read_exact(&mut buf[OPTION_REPLY_HEADER_LEN..])
            .unwrap();
        let (option, reply, used) = OptionReply::decode(&buf).unwrap();
        assert_eq!(used, buf.len());
        let r = match reply {
            OptionReply::Ack => R::Ack,
            OptionReply::Server { name, description } => R::Server(name.into(), description.into()),
            OptionReply::InfoExport { size, flags } => R::Export(size, flags),
            OptionReply::InfoName(n) => R::Name(n.into()),
            OptionReply::InfoDescription(d) => R::Desc(d.into()),
            OptionReply::InfoBlockSize(b) => R::Block(b.min, b.preferred, b.max),
            OptionReply::MetaContext { id, name } => R::Meta(id, name.into()),
            OptionReply::Error { reply, .. } => R::Err(reply),
            other => R::Other(other.reply_type()),
        };
        (option, r)
    }

    /// Every reply to one option, up to and including the final ACK or error.
    fn replies(&mut self, option: u32) -> Vec<R> {
        let mut out = Vec::new();
        for _ in 0..64 {
            let (o, r) = self.reply();
            assert_eq!(o, option, "reply for the wrong option: {out:?} {r:?}");
            let last = matches!(r, R::Ack | R::Err(_));
            out.push(r);
            if last {
                return out;
            }
        }
        panic!("no final reply among {out:?}");
    }

    fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        self.s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}");
    }

    /// Close our sending side and collect the server's result.
    fn finish(mut self) -> ServerResult {
        let _ = self.s.shutdown(Shutdown::Write);
        self.server.take().unwrap().join().unwrap()
    }
}

fn go_ok(c: &mut Client, name: &str, infos: &[u16]) -> Vec<R> {
    c.info(OPT_GO, name, infos);
    let r = c.replies(OPT_GO);
    assert_eq!(r.last(), Some(&R::Ack), "{r:?}");
    r
}

#[test]
fn go_sends_export_info_before_ack_and_enters_transmission() {
    let mut c = connected();
    let r = go_ok(&mut c, "", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    let flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_SEND_CACHE
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(
        r,
        vec![
            R::Export(32 * MIB, flags),
            R::Name("v".into()),
            R::Desc("test export v".into()),
            R::Block(512, 4096, 32 << 20),
            R::Ack
        ]
    );
    let s = c.finish().unwrap().unwrap();
    assert_eq!((s.export.as_str(), s.size, s.flags), ("v", 32 * MIB, flags));
    assert!(!s.structured && !s.extended && s.base.is_none());
}

#[test]
fn block_size_is_always_sent_and_name_only_when_asked() {
    let mut c = connected();
    c.info(OPT_INFO, "ro", &[]);
    let r = c.replies(OPT_INFO);
    let ro_flags =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    assert_eq!(
        r,
        vec![
            R::Export(16 * MIB, ro_flags),
            R::Block(512, 4096, 32 << 20),
            R::Ack
        ]
    );
    // Unknown info requests are ignored.
    go_ok(&mut c, "ro", &[77, INFO_BLOCK_SIZE]);
    let s = c.finish().unwrap().unwrap();
    assert_eq!(s.flags, ro_flags);
}

#[test]
fn invalid_catalog_block_sizes_are_repaired() {
    let mut c = connected();
    c.info(OPT_INFO, "odd", &[INFO_BLOCK_SIZE]);
    let r = c.replies(OPT_INFO);
    let R::Block(min, preferred, max) = r[1].clone() else {
        panic!("{r:?}")
    };
    assert!(
        BlockSize {
            min,
            preferred,
            max
        }
        .is_valid(),
        "{min} {preferred} {max}"
    );
    assert_eq!(min, 4);
    drop(c);
}

#[test]
fn unknown_export_is_an_error_reply_for_info_and_go() {
    let mut c = connected();
    c.info(OPT_INFO, "nope", &[]);
    assert_eq!(c.replies(OPT_INFO), vec![R::Err(REP_ERR_UNKNOWN)]);
    c.info(OPT_GO, "nope", &[INFO_BLOCK_SIZE]);
    assert_eq!(c.replies(OPT_GO), vec![R::Err(REP_ERR_UNKNOWN)]);
    // Negotiation continues.
    go_ok(&mut c, "v", &[]);
    assert_eq!(c.finish().unwrap().unwrap().export, "v");

    // No default export: the empty name is unknown too.
    let empty = Arc::new(TestCatalog {
        engine: engine(),
        exports: vec![],
        default: None,
    });
    let mut c = serve_with(empty, HandshakeConfig::default());
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.info(OPT_GO, "", &[]);
    assert_eq!(c.replies(OPT_GO), vec![R::Err(REP_ERR_UNKNOWN)]);
    c.raw_option(OPT_LIST, &[]);
    assert_eq!(c.replies(OPT_LIST), vec![R::Ack]);
    drop(c);
}

#[test]
fn export_name_replies_with_and_without_zeroes() {
    for (flags, len) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        (FLAG_C_FIXED_NEWSTYLE, 134),
        (0, 134),
    ] {
        let mut c = serve();
        c.hello(flags);
        c.raw_option(OPT_EXPORT_NAME, b"ro");
        let mut buf = vec![0u8; len];
        c.s.read_exact(&mut buf).unwrap();
        let (r, _) = ExportNameReply::decode(&buf, len == 10).unwrap();
        assert_eq!(r.size, 16 * MIB);
        assert_ne!(r.flags & FLAG_READ_ONLY, 0);
        assert!(buf[10..].iter().all(|&b| b == 0));
        let s = c.finish().unwrap().unwrap();
        assert_eq!(s.export, "ro");
        assert!(s.leftover.is_empty());
    }
}

#[test]
fn export_name_failures_hang_up() {
    // Unknown export.
    let mut c = connected();
    c.raw_option(OPT_EXPORT_NAME, b"nope");
    c.expect_eof();
    let e = c.finish().unwrap_err();
    assert!(e.contains("ExportNameRefused"), "{e}");
    // Not a valid string.
    let mut c = connected();
    c.raw_option(OPT_EXPORT_NAME, b"a\0b");
    c.expect_eof();
    assert!(c.finish().unwrap_err().contains("ExportNameRefused"));
    // After extended headers.
    let mut c = connected();
    c.raw_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.replies(OPT_EXTENDED_HEADERS), vec![R::Ack]);
    c.raw_option(OPT_EXPORT_NAME, b"v");
    c.expect_eof();
    assert!(c.finish().unwrap_err().contains("extended"));
}

#[test]
fn abort_is_acked_and_ends_cleanly() {
    let mut c = connected();
    // Data on OPT_ABORT is ignored, as the spec asks.
    c.raw_option(OPT_ABORT, b"junk");
    assert_eq!(c.replies(OPT_ABORT), vec![R::Ack]);
    c.expect_eof();
    assert!(c.finish().unwrap().is_none());
}

#[test]
fn clean_and_unclean_ends() {
    // Closing right after the greeting, or between options: a clean end.
    let c = serve();
    assert!(c.finish().unwrap().is_none());
    let mut c = connected();
    c.raw_option(OPT_LIST, &[]);
    c.replies(OPT_LIST);
    assert!(c.finish().unwrap().is_none());
    // Closing in the middle of a header or payload: an error.
    let mut c = connected();
    c.send(&IHAVEOPT.to_be_bytes());
    let e = c.finish().unwrap_err();
    assert!(e.contains("UnexpectedEof"), "{e}");
    let mut c = connected();
    c.send(
        &OptionHeader {
            option: OPT_GO,
            length: 100,
        }
        .to_bytes(),
    );
    c.send(&[0u8; 10]);
    assert!(c.finish().unwrap_err().contains("UnexpectedEof"));
}

#[test]
fn unknown_client_flags_hang_up() {
    for flags in [1u32 << 2, 1 << 31, FLAG_C_FIXED_NEWSTYLE | 0x10] {
        let mut c = serve();
        c.hello(flags);
        c.expect_eof();
        let e = c.finish().unwrap_err();
        assert!(e.contains("UnsupportedClientFlags"), "{e}");
    }
}

#[test]
fn list_names_every_export_then_acks() {
    let mut c = connected();
    c.raw_option(OPT_LIST, &[]);
    assert_eq!(
        c.replies(OPT_LIST),
        vec![
            R::Server("v".into(), "test export v".into()),
            R::Server("ro".into(), "test export ro".into()),
            R::Server("odd".into(), "test export odd".into()),
            R::Ack
        ]
    );
    // OPT_LIST takes no data.
    c.raw_option(OPT_LIST, b"x");
    assert_eq!(c.replies(OPT_LIST), vec![R::Err(REP_ERR_INVALID)]);
    drop(c);
}

#[test]
fn starttls_unknown_and_malformed_options_get_errors() {
    let mut c = connected();
    c.raw_option(OPT_STARTTLS, &[]);
    assert_eq!(c.replies(OPT_STARTTLS), vec![R::Err(REP_ERR_UNSUP)]);
    c.raw_option(OPT_STARTTLS, b"x");
    assert_eq!(c.replies(OPT_STARTTLS), vec![R::Err(REP_ERR_INVALID)]);
    c.raw_option(99, b"some data");
    assert_eq!(c.replies(99), vec![R::Err(REP_ERR_UNSUP)]);
    c.raw_option(OPT_PEEK_EXPORT, &[]);
    assert_eq!(c.replies(OPT_PEEK_EXPORT), vec![R::Err(REP_ERR_UNSUP)]);
    c.raw_option(0xffff_ffff, &[]);
    assert_eq!(c.replies(0xffff_ffff), vec![R::Err(REP_ERR_UNSUP)]);
    // GO whose name length runs past the data.
    c.raw_option(OPT_GO, &[0, 0, 0, 50, b'v', 0, 0]);
    assert_eq!(c.replies(OPT_GO), vec![R::Err(REP_ERR_INVALID)]);
    // INFO with trailing bytes.
    c.raw_option(OPT_INFO, &[0, 0, 0, 1, b'v', 0, 0, 9]);
    assert_eq!(c.replies(OPT_INFO), vec![R::Err(REP_ERR_INVALID)]);
    // A meta context query count larger than the data.
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies(OPT_STRUCTURED_REPLY), vec![R::Ack]);
    c.raw_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 1, b'v', 0, 0, 0, 5]);
    assert_eq!(
        c.replies(OPT_SET_META_CONTEXT),
        vec![R::Err(REP_ERR_INVALID)]
    );
    c.raw_option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(
        c.replies(OPT_STRUCTURED_REPLY),
        vec![R::Err(REP_ERR_INVALID)]
    );
    // And after all that, GO still works.
    go_ok(&mut c, "v", &[INFO_BLOCK_SIZE]);
    assert!(c.finish().unwrap().unwrap().structured);
}

#[test]
fn structured_replies_once_and_df_flag() {
    let mut c = connected();
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies(OPT_STRUCTURED_REPLY), vec![R::Ack]);
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.replies(OPT_STRUCTURED_REPLY),
        vec![R::Err(REP_ERR_INVALID)]
    );
    let r = go_ok(&mut c, "v", &[]);
    let R::Export(_, flags) = r[0] else {
        panic!("{r:?}")
    };
    assert_ne!(flags & FLAG_SEND_DF, 0);
    let s = c.finish().unwrap().unwrap();
    assert!(s.structured && !s.extended);
    assert_eq!(s.flags, flags);
}

#[test]
fn extended_headers_imply_structured_and_refuse_downgrade() {
    let mut c = connected();
    c.raw_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.replies(OPT_EXTENDED_HEADERS), vec![R::Ack]);
    c.raw_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(
        c.replies(OPT_EXTENDED_HEADERS),
        vec![R::Err(REP_ERR_INVALID)]
    );
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.replies(OPT_STRUCTURED_REPLY),
        vec![R::Err(REP_ERR_EXT_HEADER_REQD)]
    );
    c.raw_option(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(
        c.replies(OPT_EXTENDED_HEADERS),
        vec![R::Err(REP_ERR_INVALID)]
    );
    // Meta contexts are allowed with extended headers alone.
    c.meta(OPT_SET_META_CONTEXT, "v", &["base:allocation"]);
    assert_eq!(
        c.replies(OPT_SET_META_CONTEXT),
        vec![
            R::Meta(BASE_ALLOCATION_ID, "base:allocation".into()),
            R::Ack
        ]
    );
    let r = go_ok(&mut c, "v", &[INFO_BLOCK_SIZE]);
    let R::Export(_, flags) = r[0] else {
        panic!("{r:?}")
    };
    assert_ne!(flags & FLAG_SEND_DF, 0);
    let s = c.finish().unwrap().unwrap();
    assert!(s.structured && s.extended);
    assert_eq!(s.base, Some(BASE_ALLOCATION_ID));

    // Structured first, then extended: allowed.
    let mut c = connected();
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies(OPT_STRUCTURED_REPLY), vec![R::Ack]);
    c.raw_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.replies(OPT_EXTENDED_HEADERS), vec![R::Ack]);
    go_ok(&mut c, "v", &[]);
    let s = c.finish().unwrap().unwrap();
    assert!(s.structured && s.extended);
}

#[test]
fn meta_contexts_need_structured_replies() {
    let mut c = connected();
    c.meta(OPT_LIST_META_CONTEXT, "v", &[]);
    assert_eq!(
        c.replies(OPT_LIST_META_CONTEXT),
        vec![R::Err(REP_ERR_INVALID)]
    );
    c.meta(OPT_SET_META_CONTEXT, "v", &["base:allocation"]);
    assert_eq!(
        c.replies(OPT_SET_META_CONTEXT),
        vec![R::Err(REP_ERR_INVALID)]
    );
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    c.replies(OPT_STRUCTURED_REPLY);
    go_ok(&mut c, "v", &[]);
    // The failed SET selected nothing.
    assert_eq!(c.finish().unwrap().unwrap().base, None);
}

#[test]
fn list_meta_context_queries() {
    let mut c = connected();
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    c.replies(OPT_STRUCTURED_REPLY);
    let base = R::Meta(0, "base:allocation".into());
    for (queries, expect) in [
        (&[][..], vec![base.clone(), R::Ack]),
        (&["base:"][..], vec![base.clone(), R::Ack]),
        (
            &["base:allocation", "base:"][..],
            vec![base.clone(), R::Ack],
        ),
        (&["x-foo:bar", "qemu:dirty-bitmap:a"][..], vec![R::Ack]),
        (&["base:nonesuch", "nocolon"][..], vec![R::Ack]),
    ] {
        c.meta(OPT_LIST_META_CONTEXT, "v", queries);
        assert_eq!(c.replies(OPT_LIST_META_CONTEXT), expect, "{queries:?}");
    }
    c.meta(OPT_LIST_META_CONTEXT, "", &[]);
    assert_eq!(c.replies(OPT_LIST_META_CONTEXT), vec![base, R::Ack]);
    c.meta(OPT_LIST_META_CONTEXT, "nope", &[]);
    assert_eq!(
        c.replies(OPT_LIST_META_CONTEXT),
        vec![R::Err(REP_ERR_UNKNOWN)]
    );
    drop(c);
}

#[test]
fn set_meta_context_selects_for_the_same_export_only() {
    let selected = |queries: &[&str], set_on: &str, go_to: &str| {
        let mut c = connected();
        c.raw_option(OPT_STRUCTURED_REPLY, &[]);
        c.replies(OPT_STRUCTURED_REPLY);
        c.meta(OPT_SET_META_CONTEXT, set_on, queries);
        let r = c.replies(OPT_SET_META_CONTEXT);
        go_ok(&mut c, go_to, &[]);
        (r, c.finish().unwrap().unwrap().base)
    };
    let meta = R::Meta(BASE_ALLOCATION_ID, "base:allocation".into());
    assert_eq!(
        selected(&["base:allocation", "x-a:b", "base:allocation"], "v", "v"),
        (vec![meta.clone(), R::Ack], Some(BASE_ALLOCATION_ID))
    );
    // `base:` selects nothing in SET; no queries select nothing.
    assert_eq!(selected(&["base:"], "v", "v"), (vec![R::Ack], None));
    assert_eq!(selected(&[], "v", "v"), (vec![R::Ack], None));
    // The default export by its empty name is the same export as "v".
    assert_eq!(
        selected(&["base:allocation"], "", "v"),
        (vec![meta.clone(), R::Ack], Some(BASE_ALLOCATION_ID))
    );
    // Selected for another export: nothing for this one.
    assert_eq!(
        selected(&["base:allocation"], "ro", "v"),
        (vec![meta, R::Ack], None)
    );
    // Unknown export: an error, and the previous selection is gone.
    let mut c = connected();
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    c.replies(OPT_STRUCTURED_REPLY);
    c.meta(OPT_SET_META_CONTEXT, "v", &["base:allocation"]);
    c.replies(OPT_SET_META_CONTEXT);
    c.meta(OPT_SET_META_CONTEXT, "nope", &["base:allocation"]);
    assert_eq!(
        c.replies(OPT_SET_META_CONTEXT),
        vec![R::Err(REP_ERR_UNKNOWN)]
    );
    go_ok(&mut c, "v", &[]);
    assert_eq!(c.finish().unwrap().unwrap().base, None);
    // OPT_EXPORT_NAME keeps a selection made for the same export.
    let mut c = connected();
    c.raw_option(OPT_STRUCTURED_REPLY, &[]);
    c.replies(OPT_STRUCTURED_REPLY);
    c.meta(OPT_SET_META_CONTEXT, "v", &["base:allocation"]);
    c.replies(OPT_SET_META_CONTEXT);
    c.raw_option(OPT_EXPORT_NAME, b"v");
    let mut buf = [0u8; 10];
    c.s.read_exact(&mut buf).unwrap();
    let s = c.finish().unwrap().unwrap();
    assert_eq!((s.base, s.structured), (Some(BASE_ALLOCATION_ID), true));
}

#[test]
fn oversized_options_are_skipped_or_hang_up() {
    let mut c = connected();
    let big = vec![7u8; (MAX_OPTION_LEN + 1000) as usize];
    c.raw_option(OPT_GO, &big);
    assert_eq!(c.replies(OPT_GO), vec![R::Err(REP_ERR_TOO_BIG)]);
    c.raw_option(OPT_LIST, &[]);
    assert_eq!(c.replies(OPT_LIST).last(), Some(&R::Ack));
    // Larger than the server is willing to skip: hang up without reading it.
    c.send(
        &OptionHeader {
            option: OPT_INFO,
            length: u32::MAX,
        }
        .to_bytes(),
    );
    c.expect_eof();
    assert!(c.finish().unwrap_err().contains("OptionTooLarge"));
    // An oversized OPT_EXPORT_NAME cannot be answered: hang up.
    let mut c = connected();
    c.send(
        &OptionHeader {
            option: OPT_EXPORT_NAME,
            length: MAX_OPTION_LEN + 1,
        }
        .to_bytes(),
    );
    c.expect_eof();
    assert!(c.finish().unwrap_err().contains("OptionTooLarge"));
}

#[test]
fn bad_option_magic_hangs_up() {
    let mut c = connected();
    c.send(&[0x42; 16]);
    c.expect_eof();
    assert!(c.finish().unwrap_err().contains("BadMagic"));
}

#[test]
fn option_count_is_bounded() {
    let mut c = connected();
    for _ in 0..MAX_OPTIONS {
        c.raw_option(1000, &[]);
        assert_eq!(c.replies(1000), vec![R::Err(REP_ERR_UNSUP)]);
    }
    // The server hangs up without waiting for another option.
    c.expect_eof();
    assert!(c.finish().unwrap_err().contains("TooManyOptions"));
}

#[test]
fn bytes_after_go_are_left_for_the_transmission_phase() {
    let mut c = connected();
    let mut v = Vec::new();
    InfoRequest::encode_option(&mut v, OPT_GO, "v", &[INFO_BLOCK_SIZE]);
    let mut req = Vec::new();
    Request {
        flags: 0,
        kind: 0,
        cookie: 42,
        offset: 0,
        length: 4096,
    }
    .encode(false, &mut req);
    v.extend_from_slice(&req);
    c.send(&v);
    assert_eq!(c.replies(OPT_GO).last(), Some(&R::Ack));
    assert_eq!(c.finish().unwrap().unwrap().leftover, req);
}

#[test]
fn block_size_can_be_required() {
    let cfg = HandshakeConfig {
        require_block_size: true,
        ..Default::default()
    };
    let mut c = serve_with(catalog(), cfg.clone());
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.info(OPT_GO, "v", &[INFO_NAME]);
    assert_eq!(
        c.replies(OPT_GO),
        vec![
            R::Block(512, 4096, 32 << 20),
            R::Err(REP_ERR_BLOCK_SIZE_REQD)
        ]
    );
    c.info(OPT_INFO, "v", &[]);
    assert_eq!(
        c.replies(OPT_INFO).last(),
        Some(&R::Err(REP_ERR_BLOCK_SIZE_REQD))
    );
    go_ok(&mut c, "v", &[INFO_BLOCK_SIZE]);
    assert!(c.finish().unwrap().is_some());
    let mut c = serve_with(catalog(), cfg);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.raw_option(OPT_EXPORT_NAME, b"v");
    c.expect_eof();
    assert!(c.finish().is_err());
}

#[test]
fn stopping_server_answers_shutdown_but_still_acks_abort() {
    let stopping = Arc::new(AtomicBool::new(false));
    let cfg = HandshakeConfig {
        stopping: Some(stopping.clone()),
        ..Default::default()
    };
    let mut c = serve_with(catalog(), cfg);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.raw_option(OPT_LIST, &[]);
    assert_eq!(c.replies(OPT_LIST).last(), Some(&R::Ack));
    stopping.store(true, Ordering::Release);
    c.info(OPT_GO, "v", &[]);
    assert_eq!(c.replies(OPT_GO), vec![R::Err(REP_ERR_SHUTDOWN)]);
    c.raw_option(OPT_ABORT, &[]);
    assert_eq!(c.replies(OPT_ABORT), vec![R::Ack]);
    assert!(c.finish().unwrap().is_none());
}

#[test]
fn tls_required_refuses_everything_but_starttls_and_abort() {
    let cfg = HandshakeConfig {
        tls_required: true,
        ..Default::default()
    };
    let mut c = serve_with(catalog(), cfg);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.raw_option(OPT_LIST, &[]);
    assert_eq!(c.replies(OPT_LIST), vec![R::Err(REP_ERR_TLS_REQD)]);
    c.info(OPT_GO, "v", &[]);
    assert_eq!(c.replies(OPT_GO), vec![R::Err(REP_ERR_TLS_REQD)]);
    c.raw_option(OPT_STARTTLS, &[]);
    assert_eq!(c.replies(OPT_STARTTLS), vec![R::Err(REP_ERR_UNSUP)]);
    c.raw_option(OPT_EXPORT_NAME, b"v");
    c.expect_eof();
    assert!(c.finish().is_err());
}

/// Random garbage after the greeting never panics or hangs the server: it ends with a
/// result once the client closes.
#[test]
fn garbage_never_panics_or_hangs() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let mut c = serve();
        let mut input = Vec::new();
        // Half the rounds start with valid flags and a valid option header prefix.
        if round % 2 == 0 {
            input.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            input.extend_from_slice(&((next() % 12) as u32).to_be_bytes());
            input.extend_from_slice(&((next() % 64) as u32).to_be_bytes());
        }
        let len = (next() % 200) as usize;
        input.extend((0..len).map(|_| next() as u8));
        let mut reader = c.s.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let _ = c.s.write_all(&input);
        let _ = c.finish();
        drain.join().unwrap();
    }
}

#[test]
fn reply_framing_uses_the_option_reply_magic() {
    // A raw look at one reply: magic, option, type, length.
    let mut c = connected();
    c.raw_option(OPT_ABORT, &[]);
    let mut buf = [0u8; OPTION_REPLY_HEADER_LEN];
    c.s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[0..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    assert_eq!(&buf[8..12], &OPT_ABORT.to_be_bytes());
    assert_eq!(&buf[12..16], &REP_ACK.to_be_bytes());
    assert_eq!(&buf[16..20], &[0, 0, 0, 0]);
    assert!(c.finish().unwrap().is_none());
}
