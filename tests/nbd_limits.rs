//! The NBD server against idle, slow and hostile clients, with raw sockets on loopback: memory
//! a client that never reads its replies can make the daemon hold, connection limits refused
//! with a clear NBD error during the handshake, slow handshakes from one address, idle
//! connections, and `[nbd] allowed_clients`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use common::{nbd_endpoints, pattern, write_file, Daemon};
use ringblock_transports::nbd::client::{
    handshake, request_header, ClientError, Options, Parsed, ReplyFrame, ReplyParser,
};
use ringblock_transports::nbd::wire::{
    ClientOption, ReplyChunk, Request, SimpleReply, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, GREETING_LEN, REP_ERR_POLICY, SIMPLE_REPLY_LEN,
};

const IO_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    addr: SocketAddr,
}

impl Fixture {
    /// A daemon with one RAM device holding volume `v` of `volume_bytes`; `nbd_extra` goes
    /// into its `[nbd]` section.
    fn start(volume_bytes: u64, nbd_extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_file(
            dir.path(),
            "limits.toml",
            &format!(
                "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = {}\n\
                 [[volume]]\nname = \"v\"\ndevice = \"ram0\"\nsize_bytes = {volume_bytes}\n\
                 [nbd]\n{nbd_extra}\n",
                volume_bytes + 64 * MIB
            ),
        );
        let daemon = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0"]);
        let (tcp, _) = nbd_endpoints(&daemon);
        let addr = tcp.expect("daemon printed its address").parse().unwrap();
        Fixture {
            _dir: dir,
            daemon: Some(daemon),
            addr,
        }
    }

    fn pid(&self) -> i32 {
        self.daemon.as_ref().unwrap().pid()
    }

    fn stop(mut self) {
        let rest = self.daemon.take().unwrap().stop();
        assert!(
            rest.iter().any(|l| l.contains("stopped cleanly")),
            "{rest:?}"
        );
    }
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.2 is as local as
/// 127.0.0.1, and lets a test play a second host).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 expected")
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let local = sockaddr(SocketAddrV4::new(from, 0));
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes, alive for the call.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
    let remote = sockaddr(to);
    // SAFETY: as above.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// The handshake with structured replies, then OPT_GO for `v`. Ok: the connection in
/// transmission. Err: the error reply's type and message.
fn negotiate(mut s: TcpStream) -> Result<TcpStream, (u32, String)> {
    let opts = Options {
        structured: true,
        ..Options::default()
    };
    match handshake(&mut s, "v", opts) {
        Ok(_) => Ok(s),
        Err(ClientError::Refused { reply, message, .. }) => Err((reply, message)),
        Err(e) => panic!("handshake: {e}"),
    }
}

fn send(s: &mut TcpStream, kind: u16, cookie: u64, offset: u64, length: u64, payload: &[u8]) {
    let req = Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    };
    let (header, len) = request_header(&req, false).unwrap();
    let mut v = header[..len].to_vec();
    v.extend_from_slice(payload);
    s.write_all(&v).unwrap();
}

/// Read structured replies until every cookie in `want` (cookie -> (offset, length)) is done,
/// in whatever order they come: cookie -> (error, data with holes as zeros).
fn replies(s: &mut TcpStream, want: &HashMap<u64, (u64, u64)>) -> HashMap<u64, (u32, Vec<u8>)> {
    let parser = ReplyParser::new(true, false);
    let mut got: HashMap<u64, (u32, Vec<u8>)> = HashMap::new();
    let mut done = 0;
    let mut buf = Vec::new();
    // Bounded: a reply has at most a chunk per MiB, and a chunk takes at most three reads
    // (magic, header, payload) and one parse.
    for _ in 0..(want.len() * 256 + 16) * 4 {
        if done == want.len() {
            return got;
        }
        let parsed = parser
            .parse(&buf, |cookie| want.get(&cookie).map(|_| 0))
            .unwrap_or_else(|e| panic!("{e} after {done} of {} replies", want.len()));
        let (frame, len) = match parsed {
            Parsed::Incomplete { needed } => {
                let have = buf.len();
                buf.resize(have + needed, 0);
                if let Err(e) = s.read_exact(&mut buf[have..]) {
                    panic!("{e} after {done} of {} replies", want.len());
                }
                continue;
            }
            Parsed::Frame { frame, len } => (frame, len),
        };
        let ReplyFrame::Chunk { cookie, chunk, .. } = frame else {
            panic!("a simple reply to a read: {frame:?}")
        };
        let &(offset, len_bytes) = want
            .get(&cookie)
            .unwrap_or_else(|| panic!("reply to unknown cookie {cookie}"));
        let entry = got
            .entry(cookie)
            .or_insert_with(|| (0, vec![0xee; len_bytes as usize]));
        match chunk {
            ReplyChunk::None => {}
            ReplyChunk::OffsetData { offset: o, data } => {
                let at = (o - offset) as usize;
                entry.1[at..at + data.len()].copy_from_slice(data);
            }
            ReplyChunk::OffsetHole { offset: o, size } => {
                let at = (o - offset) as usize;
                entry.1[at..at + size as usize].fill(0);
            }
            ReplyChunk::Error { error, .. } | ReplyChunk::ErrorOffset { error, .. } => {
                entry.0 = error;
            }
            other => panic!("unexpected chunk {other:?}"),
        }
        if frame.is_last() {
            done += 1;
        }
        buf.drain(..len);
    }
    assert_eq!(done, want.len(), "replies never finished");
    got
}

/// Resident memory of a process, in bytes (VmRSS).
fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// Shrink a socket's receive buffer (which also stops its autotuning), so replies the client
/// does not read fill it quickly and wait in the server.
fn small_receive_buffer(s: &TcpStream) {
    let bytes: libc::c_int = 16 << 10;
    // SAFETY: setsockopt on a socket we own, with a c_int option value alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

/// Write `len` bytes of `pattern(seed)` at `offset`, and wait for the reply.
fn write_block(s: &mut TcpStream, cookie: u64, offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let data = pattern(seed, len);
    send(s, CMD_WRITE, cookie, offset, len as u64, &data);
    assert_eq!(write_reply(s, cookie), 0, "write at {offset} failed");
    data
}

/// The simple reply to a write (structured replies are for reads): its error.
fn write_reply(s: &mut TcpStream, cookie: u64) -> u32 {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut b).unwrap();
    let (r, _) = SimpleReply::decode(&b).unwrap();
    assert_eq!(r.cookie, cookie);
    r.error
}

/// Expect the server to close `s` (bounded in time); returns the bytes it sent meanwhile.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("connection not closed: {e}"),
        }
        assert!(Instant::now() < deadline, "connection not closed in time");
    }
}

/// Big reads of a sparse volume (one 1 MiB chunk written in each 32 MiB region, the rest holes)
/// pipelined on twelve connections whose replies are not read: the daemon holds each reply's
/// whole buffer, not just the bytes it sends, so its memory must stay within the server-wide
/// budget (128 MiB here) plus the one request each connection may always start (12 x 32 MiB).
/// Unbounded, the daemon would hold all 2.3 GiB asked for; with only the per-connection bound
/// (64 MiB and one request each), over 1.1 GiB. Then every reply arrives, correct.
#[test]
fn unread_replies_with_holes_keep_daemon_memory_bounded() {
    const REGION: u64 = 32 * MIB;
    const REGIONS: u64 = 4;
    const CONNECTIONS: usize = 12;
    const READS_PER_CONN: u64 = 6;
    // Above `before`: the budget and one request per connection in flight, twice over for
    // what a busy machine lets start before the budget's figures catch up and for the
    // allocator's slack (peaks of 415-512 MiB measured); below either failure above.
    const RSS_GROWTH_LIMIT_BYTES: u64 = 128 * MIB + 2 * CONNECTIONS as u64 * REGION;
    let f = Fixture::start(REGION * REGIONS, "buffer_budget_bytes = 134217728");
    let mut conns: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let s = TcpStream::connect(f.addr).unwrap();
            small_receive_buffer(&s);
            negotiate(s).expect("negotiated")
        })
        .collect();
    let mut blocks = Vec::new();
    for r in 0..REGIONS {
        let offset = r * REGION + MIB;
        blocks.push(write_block(
            &mut conns[0],
            1000 + r,
            offset,
            MIB as usize,
            r + 1,
        ));
    }
    let before = rss_bytes(f.pid());
    let mut wants = Vec::new();
    for c in conns.iter_mut() {
        let mut want = HashMap::new();
        for i in 0..READS_PER_CONN {
            let offset = (i % REGIONS) * REGION;
            send(c, CMD_READ, i + 1, offset, REGION, &[]);
            want.insert(i + 1, (offset, REGION));
        }
        wants.push(want);
    }
    // Watch the daemon's memory until it stops growing (bounded in time).
    let mut peak = 0;
    let (mut last, mut steady_since) = (0, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let rss = rss_bytes(f.pid());
        peak = peak.max(rss);
        if rss.abs_diff(last) > 4 * MIB {
            (last, steady_since) = (rss, Instant::now());
        } else if steady_since.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            peak < before + RSS_GROWTH_LIMIT_BYTES,
            "daemon RSS reached {} MiB (was {} MiB before the reads)",
            peak >> 20,
            before >> 20
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "daemon RSS: {} MiB before the reads, {} MiB at most with them",
        before >> 20,
        peak >> 20
    );
    // Now the clients read: every reply arrives, with the written block and zeros elsewhere.
    let readers: Vec<_> = conns
        .into_iter()
        .zip(wants)
        .map(|(mut c, want)| {
            let blocks = blocks.clone();
            std::thread::spawn(move || {
                let got = replies(&mut c, &want);
                for (cookie, (offset, len)) in want {
                    let (error, data) = &got[&cookie];
                    assert_eq!(*error, 0, "read at {offset} failed");
                    assert_eq!(data.len() as u64, len);
                    let block = &blocks[(offset / REGION) as usize];
                    let (at, end) = (MIB as usize, 2 * MIB as usize);
                    assert!(data[..at].iter().all(|&b| b == 0), "read at {offset}");
                    assert!(data[at..end] == block[..], "read at {offset}");
                    assert!(data[end..].iter().all(|&b| b == 0), "read at {offset}");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    f.stop();
}

/// Idle negotiated connections up to `[nbd] max_connections`; the next client is told "too many
/// connections" in an NBD error reply during its handshake (never acknowledged and then
/// dropped), the connections in place keep working, and once one leaves a newcomer gets in.
#[test]
fn connections_beyond_the_limit_are_refused_in_the_handshake() {
    const LIMIT: usize = 8;
    let f = Fixture::start(64 * MIB, &format!("max_connections = {LIMIT}"));
    let mut idle: Vec<TcpStream> = (0..LIMIT)
        .map(|_| negotiate(TcpStream::connect(f.addr).unwrap()).expect("within the limit"))
        .collect();
    for _ in 0..3 {
        let s = TcpStream::connect(f.addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        match negotiate(s) {
            Ok(_) => panic!("connection {} past the limit was negotiated", LIMIT + 1),
            Err((reply, message)) => {
                assert_eq!(reply, REP_ERR_POLICY, "{message}");
                assert!(
                    message.contains(&format!("too many connections (limit {LIMIT})")),
                    "{message}"
                );
            }
        }
    }
    // The connections in place still serve.
    for (i, s) in idle.iter_mut().enumerate() {
        let cookie = 7 + i as u64;
        send(s, CMD_READ, cookie, 0, 4096, &[]);
        let got = replies(s, &HashMap::from([(cookie, (0, 4096))]));
        assert_eq!(got[&cookie].0, 0);
    }
    // One leaves: a newcomer gets its place (once the server has seen it go).
    drop(idle.pop());
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut s = loop {
        match negotiate(TcpStream::connect(f.addr).unwrap()) {
            Ok(s) => break s,
            Err((reply, message)) => {
                assert_eq!(reply, REP_ERR_POLICY, "{message}");
                assert!(Instant::now() < deadline, "the freed place never came back");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    send(&mut s, CMD_READ, 1, 0, 4096, &[]);
    assert_eq!(replies(&mut s, &HashMap::from([(1, (0, 4096))]))[&1].0, 0);
    drop(idle);
    drop(s);
    f.stop();
}

/// `[nbd] max_connections_per_address`: one host cannot take every place; another still
/// gets in.
#[test]
fn one_address_cannot_take_every_connection() {
    let f = Fixture::start(64 * MIB, "max_connections_per_address = 2");
    let host = Ipv4Addr::new(127, 0, 0, 2);
    let mine: Vec<TcpStream> = (0..2)
        .map(|_| negotiate(connect_from(host, f.addr)).expect("within the per-address limit"))
        .collect();
    match negotiate(connect_from(host, f.addr)) {
        Ok(_) => panic!("a third connection from {host} was negotiated"),
        Err((reply, message)) => {
            assert_eq!(reply, REP_ERR_POLICY, "{message}");
            assert!(
                message.contains("too many connections from 127.0.0.2 (limit 2 per address)"),
                "{message}"
            );
        }
    }
    let mut other = negotiate(connect_from(Ipv4Addr::LOCALHOST, f.addr)).expect("another host");
    send(&mut other, CMD_READ, 1, 0, 4096, &[]);
    assert_eq!(
        replies(&mut other, &HashMap::from([(1, (0, 4096))]))[&1].0,
        0
    );
    drop(mine);
    drop(other);
    f.stop();
}

/// Unfinished handshakes from other hosts (here 127.0.0.2 to 127.0.0.11, 8 or more each: more
/// than the server's handshake table) do not stop a client from 127.0.0.1 from negotiating and
/// doing IO; one that trickles its handshake is cut off at the handshake deadline.
#[test]
fn slow_handshakes_do_not_lock_out_other_clients() {
    let f = Fixture::start(64 * MIB, "handshake_timeout_s = 3");
    let mut slow = Vec::new();
    for host in 2..=11u8 {
        for _ in 0..9 {
            let mut s = connect_from(Ipv4Addr::new(127, 0, 0, host), f.addr);
            // Half of them send a byte of their flags and stall.
            if slow.len() % 2 == 0 {
                let _ = s.write_all(&[0]);
            }
            slow.push(s);
        }
    }
    let s = connect_from(Ipv4Addr::LOCALHOST, f.addr);
    let mut s = negotiate(s).expect("client from 127.0.0.1 negotiated");
    let data = write_block(&mut s, 1, 4096, 4096, 9);
    send(&mut s, CMD_READ, 2, 4096, 4096, &[]);
    let got = replies(&mut s, &HashMap::from([(2, (4096, 4096))]));
    assert!(got[&2].1 == data);
    // A trickling handshake (a byte at a time, never done) is closed at the deadline.
    let mut trickle = connect_from(Ipv4Addr::new(127, 0, 0, 12), f.addr);
    let mut g = [0u8; GREETING_LEN];
    trickle.read_exact(&mut g).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut option = Vec::new();
    ClientOption::List.encode(&mut option);
    let bytes: Vec<u8> = flags.iter().chain(&option).copied().collect();
    // One byte every half second (the read timeout), all but the last: longer than the
    // deadline. Then wait for the close.
    let mut closed = false;
    for &b in &bytes[..bytes.len() - 1] {
        if trickle.write_all(&[b]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match trickle.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Ok(n) => panic!("server answered an unfinished option: {:?}", &buf[..n]),
            Err(_) => {} // timed out: nothing yet
        }
    }
    if !closed {
        trickle.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        read_until_closed(&mut trickle);
        closed = true;
    }
    assert!(closed, "trickling handshake never cut off");
    drop(slow);
    drop(s);
    f.stop();
}

/// With `[nbd] idle_timeout_s`, a connection with nothing to do is closed; one with a request in
/// flight (replies the client has not read yet) is not, and gets every reply.
#[test]
fn idle_connections_close_but_busy_ones_stay() {
    let f = Fixture::start(64 * MIB, "idle_timeout_s = 1");
    let mut idle = negotiate(TcpStream::connect(f.addr).unwrap()).unwrap();
    let busy = TcpStream::connect(f.addr).unwrap();
    small_receive_buffer(&busy);
    let mut busy = negotiate(busy).unwrap();
    let data = pattern(5, MIB as usize);
    send(&mut busy, CMD_WRITE, 1, 0, MIB, &data);
    assert_eq!(write_reply(&mut busy, 1), 0);
    // 32 MiB of replies, far more than the sockets hold: the server waits to send them.
    let want: HashMap<u64, (u64, u64)> = (0..32).map(|i| (100 + i, (0, MIB))).collect();
    for (&cookie, &(offset, len)) in &want {
        send(&mut busy, CMD_READ, cookie, offset, len, &[]);
    }
    // The idle one is closed (bounded wait) without a byte.
    assert!(read_until_closed(&mut idle).is_empty());
    // Well past the idle timeout, the busy one still gets every reply.
    std::thread::sleep(Duration::from_secs(3));
    let got = replies(&mut busy, &want);
    for (cookie, (error, d)) in got {
        assert_eq!(error, 0, "read {cookie}");
        assert!(d == data, "read {cookie} came back different");
    }
    drop(busy);
    f.stop();
}

/// `[nbd] allowed_clients`: a client from elsewhere is closed before the server sends a byte;
/// one from an allowed network is served.
#[test]
fn clients_outside_allowed_clients_are_closed_at_once() {
    let f = Fixture::start(64 * MIB, "allowed_clients = [\"127.0.0.1/32\", \"::1\"]");
    for _ in 0..3 {
        let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), f.addr);
        assert!(read_until_closed(&mut s).is_empty());
    }
    let mut s = negotiate(connect_from(Ipv4Addr::LOCALHOST, f.addr)).expect("allowed client");
    send(&mut s, CMD_READ, 1, 0, 4096, &[]);
    assert_eq!(replies(&mut s, &HashMap::from([(1, (0, 4096))]))[&1].0, 0);
    drop(s);
    f.stop();
}

/// NBD has no authentication of its own: a daemon listening beyond loopback says so at start,
/// on stdout and in its log. Run in a network namespace of its own (`unshare --net`), so the
/// wildcard address it binds reaches nothing beyond this test; no byte is sent to it.
#[test]
fn listening_beyond_loopback_warns() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--net", "--", common::BIN, "serve", "--no-web"])
        .args(["--listen", "0.0.0.0:0", "--listen", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).unwrap());
    let d = Daemon::start_command(cmd);
    let warned: Vec<&String> = d
        .stdout_lines
        .iter()
        .filter(|l| l.starts_with("ringblock: warning: nbd on"))
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "one warning, for 0.0.0.0 only: {:?}",
        d.stdout_lines
    );
    assert!(
        warned[0].contains("0.0.0.0:") && warned[0].contains("no TLS or authentication"),
        "{warned:?}"
    );
    d.stop();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("nbd listens beyond loopback")),
        "{stderr}"
    );
}
