//! The NBD server against a raw-socket client written with our own wire codec: hostile and
//! broken input (each time another client keeps being served and flushed data stays intact),
//! extended headers (which the installed libnbd cannot speak), systemd socket activation over
//! TCP, and the server's client registry.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{nbd_endpoints, pattern, write_file, Daemon, BIN};
use ringblock_transports::nbd::client::{Client, Options};
use ringblock_transports::nbd::wire::{
    Request, SimpleReply, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA,
    CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOSPC, EPERM, FLAG_CAN_MULTI_CONN, FLAG_C_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS, FLAG_READ_ONLY, GREETING_LEN, IHAVEOPT, SIMPLE_REPLY_LEN, STATE_HOLE,
    STATE_ZERO,
};

const IO_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const SMALL_BYTES: u64 = 64 * MIB;

/// The tests' configuration; `nbd_extra` goes into its `[nbd]` section.
fn config(dir: &std::path::Path, nbd_extra: &str) -> String {
    write_file(
        dir,
        "raw.toml",
        &format!(
            "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = 268435456\n\
             [[volume]]\nname = \"small\"\ndevice = \"ram0\"\nsize_bytes = 67108864\n\
             [[volume]]\nname = \"ro\"\ndevice = \"ram0\"\nsize_bytes = 16777216\n\
             [nbd]\nread_only = [\"ro\"]\n{nbd_extra}"
        ),
    )
}

struct Fixture {
    _dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    addr: SocketAddr,
}

impl Fixture {
    fn start() -> Fixture {
        Self::start_with("")
    }

    fn start_with(nbd_extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), nbd_extra);
        let daemon = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0"]);
        let (tcp, _) = nbd_endpoints(&daemon);
        let addr = tcp
            .expect("daemon printed its TCP address")
            .parse()
            .unwrap();
        Fixture {
            _dir: dir,
            daemon: Some(daemon),
            addr,
        }
    }

    fn stop(mut self) {
        let rest = self.daemon.take().unwrap().stop();
        assert!(
            rest.iter().any(|l| l.contains("stopped cleanly")),
            "{rest:?}"
        );
    }
}

/// Options a raw client negotiates.
#[derive(Clone, Copy, Default)]
struct Opts {
    structured: bool,
    extended: bool,
    meta: bool,
}

/// A reply to one request, reassembled.
#[derive(Debug, Default)]
struct Reply {
    error: u32,
    data: Vec<u8>,
    /// (context id, length, status) of block status descriptors.
    extents: Vec<(u32, u64, u64)>,
    chunks: usize,
}

/// The project's client (its framing is the codec's), plus raw access to the socket for the
/// malformed bytes the client would never send.
struct Raw {
    c: Client<TcpStream>,
    size: u64,
    flags: u16,
    base_id: Option<u32>,
    /// Requests sent and not yet answered, by cookie.
    sent: HashMap<u64, Request>,
}

impl Raw {
    fn connect(addr: SocketAddr, export: &str, opts: Opts) -> Raw {
        let options = Options {
            structured: opts.structured,
            extended: opts.extended,
            base_allocation: opts.meta,
            io_timeout: Some(IO_TIMEOUT),
        };
        let c = Client::connect_tcp(addr, export, options)
            .unwrap_or_else(|e| panic!("NBD connect to {addr}, export {export:?}: {e}"));
        let e = c.export();
        Raw {
            size: e.size_bytes,
            flags: e.transmission_flags,
            base_id: e.base_allocation_id,
            c,
            sent: HashMap::new(),
        }
    }

    /// The socket, for bytes the client would never send.
    fn s(&mut self) -> &mut TcpStream {
        self.c.stream_mut()
    }

    fn send(&mut self, flags: u16, kind: u16, offset: u64, length: u64, payload: &[u8]) -> u64 {
        let req = Request {
            flags,
            kind,
            cookie: 0,
            offset,
            length,
        };
        let cookie = self.c.send(req, payload).unwrap();
        self.sent.insert(cookie, req);
        cookie
    }

    /// Reads the (complete) reply to `cookie`, which must be the next one to arrive.
    fn reply(&mut self, cookie: u64) -> Reply {
        let req = self
            .sent
            .remove(&cookie)
            .expect("a request sent by this client");
        let r = self
            .c
            .receive(cookie, &req)
            .unwrap_or_else(|e| panic!("reply to {req:?}: {e}"));
        Reply {
            error: r.error,
            data: r.data,
            extents: r
                .extents
                .iter()
                .map(|(id, e)| (*id, e.length, e.status))
                .collect(),
            chunks: r.frames,
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let flags = if self.c.export().extended {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        let c = self.send(flags, CMD_WRITE, offset, data.len() as u64, data);
        self.reply(c).error
    }

    fn read(&mut self, offset: u64, len: usize) -> Reply {
        let c = self.send(0, CMD_READ, offset, len as u64, &[]);
        self.reply(c)
    }

    fn simple(&mut self, kind: u16, flags: u16, offset: u64, len: u64) -> Reply {
        let c = self.send(flags, kind, offset, len, &[]);
        self.reply(c)
    }

    fn flush(&mut self) -> u32 {
        self.simple(CMD_FLUSH, 0, 0, 0).error
    }

    /// Waits (bounded) for the server to close the connection.
    fn expect_closed(&mut self) {
        expect_closed(self.s());
    }
}

fn expect_closed(s: &mut TcpStream) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
        assert!(Instant::now() < deadline, "connection not closed in time");
    }
}

/// A well-behaved client on another thread that keeps writing, flushing and verifying its own
/// region until told to stop; returns how many rounds it completed.
fn background_client(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Raw::connect(
            addr,
            "small",
            Opts {
                structured: true,
                ..Default::default()
            },
        );
        let base = 32 * MIB;
        for round in 0..100_000u64 {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let data = pattern(round + 1000, 65536);
            let off = base + (round % 64) * 65536;
            assert_eq!(c.write(off, &data, 0), 0);
            if round % 8 == 0 {
                assert_eq!(c.flush(), 0);
            }
            let r = c.read(off, data.len());
            assert_eq!(r.error, 0);
            assert!(
                r.data == data,
                "background client read back different data at {off}"
            );
            rounds.fetch_add(1, Ordering::Release);
        }
    })
}

#[test]
fn hostile_input_only_costs_the_offending_connection() {
    let f = Fixture::start();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let bg = background_client(f.addr, stop.clone(), rounds.clone());

    // Data written and flushed before any of the abuse.
    let mut good = Raw::connect(f.addr, "small", Opts::default());
    assert_eq!(good.flags & FLAG_HAS_FLAGS, FLAG_HAS_FLAGS);
    assert_eq!(good.size, SMALL_BYTES);
    let keep = pattern(1, 256 << 10);
    assert_eq!(good.write(0, &keep, 0), 0);
    assert_eq!(good.flush(), 0);

    let check = |good: &mut Raw, what: &str| {
        let r = good.read(0, keep.len());
        assert_eq!(r.error, 0, "after {what}");
        assert!(r.data == keep, "data changed after {what}");
        let mut fresh = Raw::connect(
            f.addr,
            "small",
            Opts {
                structured: true,
                ..Default::default()
            },
        );
        let r = fresh.read(0, keep.len());
        assert!(
            r.error == 0 && r.data == keep,
            "a new connection after {what} reads other data"
        );
        fresh.send(0, CMD_DISC, 0, 0, &[]);
        fresh.expect_closed();
    };

    // 1. Wrong request magic: the framing is lost, so the server hangs up.
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    let mut bad = Vec::new();
    Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 4096,
    }
    .encode(false, &mut bad);
    bad[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.s().write_all(&bad).unwrap();
    c.expect_closed();
    check(&mut good, "a wrong request magic");

    // 2. A write whose payload exceeds the maximum: cannot be skipped safely, hang up.
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    c.send(0, CMD_WRITE, 0, 64 * MIB, &[0xee; 4096]);
    c.expect_closed();
    check(&mut good, "an oversized write");

    // 3. An oversized read: an error, or a disconnect — never data.
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    let cookie = c.send(0, CMD_READ, 0, 64 * MIB, &[]);
    let mut hdr = [0u8; SIMPLE_REPLY_LEN];
    match c.s().read_exact(&mut hdr) {
        Ok(()) => {
            let (r, _) = SimpleReply::decode(&hdr).unwrap();
            assert_eq!(r.cookie, cookie);
            assert_ne!(r.error, 0, "64 MiB read above the 32 MiB maximum succeeded");
            let r = c.read(0, 4096);
            assert!(r.error == 0 && r.data == keep[..4096]);
        }
        Err(_) => c.expect_closed(),
    }
    check(&mut good, "an oversized read");

    // 4. Requests past the end and misaligned: error replies, the connection stays.
    for opts in [
        Opts::default(),
        Opts {
            structured: true,
            ..Default::default()
        },
    ] {
        let mut c = Raw::connect(f.addr, "small", opts);
        let size = c.size;
        assert_eq!(c.read(size, 4096).error, EINVAL, "read at the end");
        assert_eq!(
            c.read(size - 4096, 8192).error,
            EINVAL,
            "read across the end"
        );
        assert_eq!(
            c.read(u64::MAX - 4095, 4096).error,
            EINVAL,
            "read at 2^64 - 4096"
        );
        let e = c.write(size, &[1; 4096], 0);
        assert!(e == EINVAL || e == ENOSPC, "write past the end: {e}");
        let e = c.simple(CMD_TRIM, 0, size - 4096, 8192).error;
        assert!(e == EINVAL || e == ENOSPC, "trim across the end: {e}");
        let e = c.simple(CMD_WRITE_ZEROES, 0, u64::MAX - 511, 512).error;
        assert!(e == EINVAL || e == ENOSPC, "zeroes at 2^64 - 512: {e}");
        assert_eq!(c.read(100, 512).error, EINVAL, "misaligned read");
        assert_eq!(c.write(512, &[1; 100], 0), EINVAL, "misaligned write");
        // Unknown command, unknown flag, block status without a selected context.
        assert_eq!(c.simple(42, 0, 0, 4096).error, EINVAL, "unknown command");
        assert_eq!(
            c.simple(CMD_READ, 1 << 12, 0, 4096).error,
            EINVAL,
            "unknown flag"
        );
        assert_eq!(
            c.simple(CMD_BLOCK_STATUS, 0, 0, 4096).error,
            EINVAL,
            "block status without a context"
        );
        if !opts.structured {
            // DF is only for structured replies: refused or ignored, never a broken stream.
            let cookie = c.send(CMD_FLAG_DF, CMD_READ, 0, 4096, &[]);
            let r = c.reply(cookie);
            assert!(
                r.error == EINVAL || (r.error == 0 && r.data == keep[..4096]),
                "DF without structured replies: {}",
                r.error
            );
        }
        let r = c.read(0, 4096);
        assert!(
            r.error == 0 && r.data == keep[..4096],
            "connection unusable after errors"
        );
    }
    check(&mut good, "out-of-range requests");

    // 5. A frame cut short, then the client disappears mid-request.
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    let mut half = Vec::new();
    Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 9,
        offset: 0,
        length: 4096,
    }
    .encode(false, &mut half);
    c.s().write_all(&half[..10]).unwrap();
    drop(c);
    // A write whose payload never fully arrives must not land (even partly).
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    let mut req = Vec::new();
    Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 10,
        offset: 0,
        length: 1 << 20,
    }
    .encode(false, &mut req);
    req.extend_from_slice(&[0xcc; 1000]);
    c.s().write_all(&req).unwrap();
    drop(c);
    check(&mut good, "truncated frames");

    // 6. Garbage during the handshake.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 100][..],
        &[0, 0, 0, 1, 0x49, 0x48][..],
    ] {
        let mut s = TcpStream::connect(f.addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        expect_closed(&mut s);
    }
    // Valid flags, then an option header with a wrong magic.
    let mut s = TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let mut opt = (IHAVEOPT ^ 1).to_be_bytes().to_vec();
    opt.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
    s.write_all(&opt).unwrap();
    expect_closed(&mut s);
    // A client that connects and says nothing does not block others (it times out later).
    let _silent = TcpStream::connect(f.addr).unwrap();
    check(&mut good, "garbage handshakes");

    // 7. DISC drains what is in flight, then closes.
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    let disc_data = pattern(7, 65536);
    let cookie = c.send(
        CMD_FLAG_FUA,
        CMD_WRITE,
        16 * MIB,
        disc_data.len() as u64,
        &disc_data,
    );
    c.send(0, CMD_DISC, 0, 0, &[]);
    assert_eq!(c.reply(cookie).error, 0);
    c.expect_closed();
    let r = good.read(16 * MIB, disc_data.len());
    assert!(
        r.error == 0 && r.data == disc_data,
        "write before DISC lost"
    );

    // 8. Read-only export: writes get EPERM, reads work.
    let mut ro = Raw::connect(
        f.addr,
        "ro",
        Opts {
            structured: true,
            ..Default::default()
        },
    );
    assert_ne!(ro.flags & FLAG_READ_ONLY, 0);
    assert_eq!(ro.write(0, &[1; 4096], 0), EPERM);
    assert_eq!(ro.simple(CMD_TRIM, 0, 0, 4096).error, EPERM);
    assert_eq!(ro.simple(CMD_WRITE_ZEROES, 0, 0, 4096).error, EPERM);
    assert_eq!(ro.read(0, 4096).data, vec![0u8; 4096]);

    check(&mut good, "everything");
    stop.store(true, Ordering::Release);
    bg.join()
        .expect("the concurrent well-behaved client never failed");
    assert!(
        rounds.load(Ordering::Acquire) > 0,
        "the concurrent client made no progress"
    );
    drop(good);
    f.stop();
}

#[test]
fn structured_reads_holes_and_block_status() {
    let f = Fixture::start();
    let mut c = Raw::connect(
        f.addr,
        "small",
        Opts {
            structured: true,
            meta: true,
            ..Default::default()
        },
    );
    assert_ne!(c.flags & FLAG_CAN_MULTI_CONN, 0);
    let base = c.base_id.unwrap();
    // All hole and zero at first.
    let r = c.simple(CMD_BLOCK_STATUS, 0, 0, SMALL_BYTES);
    assert_eq!(r.error, 0);
    assert!(!r.extents.is_empty());
    assert!(
        r.extents
            .iter()
            .all(|&(id, _, st)| id == base && st == u64::from(STATE_HOLE | STATE_ZERO)),
        "{:?}",
        r.extents
    );
    let data = pattern(3, 8192);
    assert_eq!(c.write(MIB, &data, CMD_FLAG_FUA), 0);
    let r = c.simple(CMD_BLOCK_STATUS, 0, 0, 4 * MIB);
    assert_eq!(r.error, 0);
    let mut at = 0;
    let mut saw_data = false;
    for &(_, len, st) in &r.extents {
        if at <= MIB && MIB < at + len {
            assert_eq!(
                st & u64::from(STATE_HOLE),
                0,
                "written range reported as a hole: {:?}",
                r.extents
            );
            saw_data = true;
        }
        at += len;
    }
    assert!(saw_data, "{:?}", r.extents);
    let r = c.simple(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096);
    assert_eq!(r.extents.len(), 1, "REQ_ONE: {:?}", r.extents);
    assert!(r.extents[0].1 <= 4096);
    // A read across data and hole reassembles correctly; DF gives one chunk.
    let r = c.read(MIB - 8192, 24576);
    assert_eq!(r.error, 0);
    assert!(
        r.data[..8192].iter().all(|&b| b == 0)
            && r.data[8192..16384] == data[..]
            && r.data[16384..].iter().all(|&b| b == 0)
    );
    let cookie = c.send(CMD_FLAG_DF, CMD_READ, MIB - 8192, 24576, &[]);
    let r = c.reply(cookie);
    assert_eq!((r.error, r.chunks), (0, 1), "DF read");
    assert!(r.data[8192..16384] == data[..]);
    // Errors arrive as error chunks.
    let r = c.read(SMALL_BYTES, 4096);
    assert_eq!(r.error, EINVAL);
    drop(c);
    f.stop();
}

#[test]
fn extended_headers_from_a_raw_client() {
    let f = Fixture::start();
    let mut c = Raw::connect(
        f.addr,
        "small",
        Opts {
            structured: false,
            extended: true,
            meta: true,
        },
    );
    let base = c.base_id.unwrap();
    let data = pattern(5, 65536);
    assert_eq!(c.write(4 * MIB, &data, 0), 0);
    assert_eq!(c.flush(), 0);
    let r = c.read(4 * MIB, data.len());
    assert!(r.error == 0 && r.data == data);
    let r = c.simple(CMD_BLOCK_STATUS, 0, 0, SMALL_BYTES);
    assert_eq!(r.error, 0);
    assert!(r.extents.iter().all(|&(id, _, _)| id == base));
    assert!(
        r.extents
            .iter()
            .any(|&(_, _, st)| st & u64::from(STATE_HOLE) == 0),
        "{:?}",
        r.extents
    );
    // 64-bit effect lengths: a trim and a zero over the whole export in one request.
    assert_eq!(c.simple(CMD_WRITE_ZEROES, 0, 0, SMALL_BYTES).error, 0);
    let r = c.read(4 * MIB, 4096);
    assert!(r.error == 0 && r.data.iter().all(|&b| b == 0));
    assert_eq!(c.simple(CMD_TRIM, 0, 0, SMALL_BYTES).error, 0);
    // Errors still arrive, as extended chunks, and the connection stays.
    assert_eq!(c.read(SMALL_BYTES, 4096).error, EINVAL);
    assert_ne!(c.simple(CMD_READ, 0, 0, 1 << 40).error, 0, "a 1 TiB read");
    assert_eq!(c.write(0, &data[..4096], 0), 0);
    drop(c);
    f.stop();
}

/// qemu (9.x/10.x) negotiates extended headers and then sends NBD_CMD_WRITE *without*
/// NBD_CMD_FLAG_PAYLOAD_LEN; qemu's own server accepts that ("client is noncompliant, trace it
/// but proceed"). We must too, or `qemu-io`/`qemu-img` writes fail.
#[test]
fn extended_write_without_payload_flag_like_qemu() {
    let f = Fixture::start();
    let mut c = Raw::connect(
        f.addr,
        "small",
        Opts {
            structured: true,
            extended: true,
            meta: false,
        },
    );
    let data = pattern(11, 65536);
    let cookie = c.send(0, CMD_WRITE, 0, data.len() as u64, &data);
    let r = c.reply(cookie);
    assert_eq!(r.error, 0, "write without PAYLOAD_LEN");
    let r = c.read(0, data.len());
    assert!(r.error == 0 && r.data == data);
    drop(c);
    f.stop();
}

#[test]
fn listen_address_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = common::run(&["serve", "--listen", &addr]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&addr) && err.to_lowercase().contains("in use"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_file(dir.path(), "not-a-socket", "x");
    let (code, _, err) = common::run(&["serve", "--listen", "127.0.0.1:0", "--unix", &file]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

/// systemd-style activation over TCP: the daemon serves the socket it is handed on fd 3 and
/// binds nothing else.
#[test]
fn socket_activation_over_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd exec \"$0\" serve",
        BIN,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener);
    // The socket already listens: connecting works before the daemon is even ready.
    let mut c = Raw::connect(
        addr,
        "",
        Opts {
            structured: true,
            ..Default::default()
        },
    );
    assert_eq!(
        c.size,
        1 << 30,
        "the default export of the default configuration"
    );
    let data = pattern(9, 4096);
    assert_eq!(c.write(0, &data, CMD_FLAG_FUA), 0);
    assert_eq!(c.read(0, 4096).data, data);
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.is_empty(),
        "socket-activated daemon wrote to stdout: {stdout}"
    );
    let listening: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("nbd listening on"))
        .collect();
    assert_eq!(
        listening,
        vec![format!("ringblock: nbd listening on {addr} (socket activation)").as_str()],
        "{stderr}"
    );
    assert!(stderr.contains("ringblock: stopped cleanly"), "{stderr}");
}

/// The server's registry lists connected clients and forgets them once they leave.
#[test]
fn client_registry_follows_connections() {
    use ringblock_engine::{DeviceConfig, Engine, EngineConfig};
    use ringblock_transports::nbd::server::{BoundAddr, NbdServer, ServerConfig};
    use ringblock_transports::nbd::EngineCatalog;

    let engine = Engine::start(&EngineConfig {
        devices: vec![DeviceConfig::ram("r", 64 << 20)],
        cores: vec![0],
        ..Default::default()
    })
    .unwrap();
    engine.create_volume("r", "v", 32 << 20).unwrap();
    let engine = Arc::new(engine);
    let catalog = Arc::new(EngineCatalog {
        engine: engine.clone(),
        read_only: vec![],
    });
    let server = NbdServer::start(
        engine.clone(),
        catalog,
        ServerConfig {
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            ..Default::default()
        },
    )
    .unwrap();
    let BoundAddr::Tcp(addr) = server.addrs()[0].clone() else {
        panic!()
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let clients = server.clients();
            if clients.len() == n {
                return clients;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} clients, have {clients:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(server.clients().is_empty());
    let mut a = Raw::connect(
        addr,
        "v",
        Opts {
            structured: true,
            ..Default::default()
        },
    );
    let b = Raw::connect(
        addr,
        "",
        Opts {
            extended: true,
            ..Default::default()
        },
    );
    let clients = wait_for(2);
    assert!(
        clients
            .iter()
            .all(|c| c.export == "v" && c.peer.starts_with("127.0.0.1:")),
        "{clients:?}"
    );
    assert!(clients.iter().any(|c| c.extended_headers));
    assert_eq!(a.write(0, &[7; 4096], 0), 0);
    let clients = server.clients();
    assert!(
        clients
            .iter()
            .any(|c| c.requests >= 1 && c.bytes_written >= 4096),
        "{clients:?}"
    );
    drop(b);
    wait_for(1);
    a.send(0, CMD_DISC, 0, 0, &[]);
    a.expect_closed();
    wait_for(0);
    server.stop();
    drop(server);
    let engine = Arc::try_unwrap(engine)
        .ok()
        .expect("a stopped server releases the engine");
    engine.shutdown().unwrap();
}

/// A client that pipelines far more read data than the socket holds and reads nothing for a
/// while: the server's sends find the socket full and wait in the ring, other clients keep being
/// served meanwhile, and every reply arrives intact once the client reads again.
#[test]
fn replies_wait_for_a_client_that_stops_reading() {
    let f = Fixture::start();
    let structured = Opts {
        structured: true,
        ..Default::default()
    };
    let mut c = Raw::connect(f.addr, "small", structured);
    let data = pattern(77, 4 * MIB as usize);
    for (i, part) in data.chunks(MIB as usize).enumerate() {
        assert_eq!(c.write(i as u64 * MIB, part, 0), 0);
    }
    // 48 MiB of replies outstanding, far above the socket buffers of both ends.
    let reads: Vec<(u64, u64)> = (0..48u64)
        .map(|i| {
            let off = (i % 4) * MIB;
            (c.send(0, CMD_READ, off, MIB, &[]), off)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let other = background_client(f.addr, stop.clone(), rounds.clone());
    // Progress of the other client is what proves the reactor is not stuck on this socket.
    let deadline = Instant::now() + IO_TIMEOUT;
    while rounds.load(Ordering::Acquire) < 20 {
        assert!(
            Instant::now() < deadline,
            "another client stalled while one stopped reading"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for (cookie, off) in reads {
        let r = c.reply(cookie);
        assert_eq!(r.error, 0);
        let at = off as usize;
        assert!(
            r.data[..] == data[at..at + MIB as usize],
            "read at {off} came back different"
        );
    }
    stop.store(true, Ordering::Release);
    other.join().unwrap();
    drop(c);
    f.stop();
}

/// Send `bytes` in awkward pieces (single bytes, a header cut in two, more than one receive
/// buffer), pausing now and then so the server sees the pieces apart.
fn trickle(s: &mut TcpStream, bytes: &[u8]) {
    const PIECES: [usize; 8] = [1, 1, 5, 27, 4093, 1, 16 * 1024 + 7, 70_000];
    let (mut at, mut i) = (0, 0);
    while at < bytes.len() {
        let n = PIECES[i % PIECES.len()].min(bytes.len() - at);
        s.write_all(&bytes[at..at + n]).unwrap();
        at += n;
        i += 1;
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Read one simple reply per entry of `data_len` (cookie -> bytes of data its success
/// carries), in whatever order they come: cookie -> (error, data).
fn simple_replies(
    s: &mut TcpStream,
    data_len: &std::collections::HashMap<u64, usize>,
) -> std::collections::HashMap<u64, (u32, Vec<u8>)> {
    let mut got = std::collections::HashMap::new();
    for _ in 0..data_len.len() {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        s.read_exact(&mut b).unwrap();
        let (r, _) = SimpleReply::decode(&b).unwrap();
        let len = *data_len
            .get(&r.cookie)
            .unwrap_or_else(|| panic!("reply to unknown cookie {}", r.cookie));
        let mut data = vec![0u8; if r.error == 0 { len } else { 0 }];
        s.read_exact(&mut data).unwrap();
        assert!(
            got.insert(r.cookie, (r.error, data)).is_none(),
            "two replies to cookie {}",
            r.cookie
        );
    }
    got
}

fn encode_request(out: &mut Vec<u8>, kind: u16, cookie: u64, offset: u64, length: u64) {
    Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    }
    .encode(false, out);
}

/// Reads answered from the device's memory are sent together at the end of a receive, from
/// that memory, so a request behind them in the same receive that changes data must not run
/// before they are sent. NBD would let a read racing a write see either; ringblock runs one
/// connection's requests to a chunk in order, so a read sees what was there at its place in
/// the stream (a write that must first allocate its chunk finishes later), and a TRIM that
/// frees its chunk and a WRITE elsewhere that may be given the freed space never leak into it.
#[test]
fn reads_in_one_receive_answer_what_was_there_before_later_writes() {
    let f = Fixture::start();
    let mut c = Raw::connect(f.addr, "small", Opts::default());
    let chunk = MIB;
    let zeros = vec![0u8; 4096];
    for round in 0..8u64 {
        // A: written before; B: a chunk never written, which a write allocates.
        let a = (2 + 2 * round) * chunk + 8192;
        let b = (3 + 2 * round) * chunk + 8192;
        let old = pattern(70 + round, 4096);
        let same = pattern(90 + round, 4096);
        let elsewhere = pattern(110 + round, 4096);
        assert_eq!(c.write(a, &old, 0), 0);

        let mut frame = Vec::new();
        let mut data_len = std::collections::HashMap::new();
        let mut push = |kind, cookie, off, len, payload: Option<&[u8]>| {
            encode_request(&mut frame, kind, cookie, off, len);
            frame.extend_from_slice(payload.unwrap_or_default());
            data_len.insert(cookie, if kind == CMD_READ { len as usize } else { 0 });
        };
        push(CMD_READ, 1, a, 4096, None);
        push(CMD_WRITE, 2, a, 4096, Some(&same));
        push(CMD_READ, 3, a, 4096, None);
        push(CMD_TRIM, 4, a - 8192, chunk, None);
        push(CMD_WRITE, 5, b, 4096, Some(&elsewhere));
        push(CMD_READ, 6, a, 4096, None);
        push(CMD_READ, 7, b, 4096, None);
        // One write: the requests arrive in as few receives as the socket allows.
        c.s().write_all(&frame).unwrap();
        let replies = simple_replies(c.s(), &data_len);
        assert!(replies.values().all(|r| r.0 == 0), "{replies:?}");
        let got = |cookie| &replies[&cookie].1;
        assert!(
            *got(1) == old,
            "round {round}: read 1 sees the write behind it"
        );
        assert!(
            *got(3) == same,
            "round {round}: read 3 misses the write before it"
        );
        assert!(
            *got(6) == zeros,
            "round {round}: read 6 misses the trim before it"
        );
        // Behind a write that allocates a chunk, still in flight: either is right.
        assert!(
            *got(7) == elsewhere || *got(7) == zeros,
            "round {round}: read 7"
        );
        // Settled: the trim and the write are done.
        assert!(
            c.read(a, 4096).data == zeros,
            "round {round}: A after the trim"
        );
        assert!(c.read(b, 4096).data == elsewhere, "round {round}: B");
    }
    drop(c);
    f.stop();
}

/// However the network cuts the request stream, requests come out whole: a byte at a time,
/// odd pieces, hundreds of requests in one piece, a payload twelve times a receive buffer.
/// And a client that pipelines more replies than the server queues (64 MiB) before reading
/// any is held back, not dropped. Both receive modes: the multishot receive into provided
/// buffers (the default) and one recv at a time.
#[test]
fn requests_split_anywhere_in_both_receive_modes() {
    for multishot in [true, false] {
        let f = Fixture::start_with(&format!("multishot_receive = {multishot}\n"));
        let mut c = Raw::connect(f.addr, "small", Opts::default());
        c.s().set_nodelay(true).unwrap();
        let mode = if multishot { "multishot" } else { "one recv" };

        // A write of 3 MiB + 512 bytes, in pieces.
        let big_at = 4096u64;
        let big = pattern(5 + u64::from(multishot), 3 * MIB as usize + 512);
        let mut frame = Vec::new();
        encode_request(&mut frame, CMD_WRITE, 1, big_at, big.len() as u64);
        frame.extend_from_slice(&big);
        trickle(c.s(), &frame);
        let replies = simple_replies(c.s(), &[(1, 0)].into());
        assert_eq!(replies[&1].0, 0, "{mode}: big write");

        // Writes of 512 B to 4.5 KiB and reads of the big write, pipelined, in pieces, while
        // replies are read as they come.
        let mut frame = Vec::new();
        let mut data_len = std::collections::HashMap::new();
        let mut writes = Vec::new();
        for i in 0..400u64 {
            let cookie = 100 + i;
            if i % 2 == 0 {
                let off = 8 * MIB + i * 8192;
                let data = pattern(cookie, 512 * (1 + i as usize % 9));
                encode_request(&mut frame, CMD_WRITE, cookie, off, data.len() as u64);
                frame.extend_from_slice(&data);
                data_len.insert(cookie, 0);
                writes.push((off, data));
            } else {
                let off = big_at + (i * 4096) % (3 * MIB);
                encode_request(&mut frame, CMD_READ, cookie, off, 4096);
                data_len.insert(cookie, 4096);
            }
        }
        let mut w = c.s().try_clone().unwrap();
        let writer = std::thread::spawn(move || trickle(&mut w, &frame));
        let replies = simple_replies(c.s(), &data_len);
        writer.join().unwrap();
        for i in (1..400u64).step_by(2) {
            let (error, data) = &replies[&(100 + i)];
            let at = ((i * 4096) % (3 * MIB)) as usize;
            assert_eq!(*error, 0, "{mode}: read {i}");
            assert!(data[..] == big[at..at + 4096], "{mode}: read {i} differs");
        }
        assert!(replies.values().all(|r| r.0 == 0), "{mode}: an error reply");
        for (off, data) in &writes {
            let r = c.read(*off, data.len());
            assert_eq!(r.error, 0);
            assert!(
                r.data == *data,
                "{mode}: write at {off} read back different"
            );
        }

        // 20 000 reads (~80 MiB of replies) sent before any reply is read.
        let n = 20_000u64;
        let mut frame = Vec::new();
        let mut data_len = std::collections::HashMap::new();
        for i in 0..n {
            let cookie = 10_000 + i;
            encode_request(
                &mut frame,
                CMD_READ,
                cookie,
                big_at + (i % 700) * 4096,
                4096,
            );
            data_len.insert(cookie, 4096);
        }
        let mut w = c.s().try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&frame).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        let replies = simple_replies(c.s(), &data_len);
        writer.join().unwrap();
        for i in 0..n {
            let (error, data) = &replies[&(10_000 + i)];
            let at = ((i % 700) * 4096) as usize;
            assert_eq!(*error, 0, "{mode}: pipelined read {i}");
            assert!(
                data[..] == big[at..at + 4096],
                "{mode}: pipelined read {i} differs"
            );
        }
        assert_eq!(c.flush(), 0);
        drop(c);
        f.stop();
    }
}
