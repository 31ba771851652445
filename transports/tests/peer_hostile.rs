//! The peer listener and connector over real loopback sockets, against hostile peers: each is
//! refused or disconnected with its reason in the log, gets at most one Refuse frame, nothing
//! is established, and a well-behaved peer still gets through. Also the happy path: both
//! sides agree on the session, and the socket is handed over at a frame boundary.
//!
//! No timing assertions: deadlines are short so tests are quick, and "eventually" is bounded
//! generously.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ringblock_engine::replication::{GenerationId, ResyncScope, Role};
use ringblock_transports::peer::{
    connect, decide, decode_frame, encode_frame, AcceptorConfig, Body, ClusterId, ClusterSecret,
    ConnectConfig, ConnectError, Decoded, Established, Frame, FrameKind, GenerationHistory, Hello,
    InitiatorConfig, LinkDecision, ListenerConfig, LocalCopy, LocalVolume, NodeId, Nonce,
    PeerAddress, PeerListener, Refusal, RefuseCode, ReplicatedVolumeId, Seq, Tracking, HEADER_LEN,
    MAX_PAYLOAD_BYTES,
};

const CLUSTER: ClusterId = ClusterId(0x1ab);
const ACCEPTOR_NODE: NodeId = NodeId(0xa);
const INITIATOR_NODE: NodeId = NodeId(0xb);
const VOLUME: ReplicatedVolumeId = ReplicatedVolumeId(7);
const REGION_BYTES: u32 = 1 << 20;
/// "Eventually", generously: far beyond any deadline the tests set.
const EVENTUALLY: Duration = Duration::from_secs(30);

// ---- log capture -------------------------------------------------------------------------

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// Every test's listener logs here (one global subscriber: listener threads are not the
/// test's thread); tests pick their lines by their listener's address.
fn log() -> &'static Capture {
    static LOG: OnceLock<Capture> = OnceLock::new();
    LOG.get_or_init(|| {
        let capture = Capture(Arc::default());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        capture
    })
}

fn lines_with(needles: &[&str]) -> Vec<String> {
    let bytes = log().0.lock().unwrap().clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) for a log line holding every needle; returns it.
fn wait_for_line(needles: &[&str]) -> String {
    let until = Instant::now() + EVENTUALLY;
    loop {
        if let Some(line) = lines_with(needles).into_iter().next() {
            return line;
        }
        assert!(Instant::now() < until, "no log line with {needles:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) until `done` holds.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + EVENTUALLY;
    while !done() {
        assert!(Instant::now() < until, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- the two sides -----------------------------------------------------------------------

fn secret() -> ClusterSecret {
    ClusterSecret::new(b"the lab cluster's shared secret".to_vec()).unwrap()
}

fn history(ids: &[u64]) -> GenerationHistory {
    GenerationHistory::new(ids.to_vec()).unwrap()
}

const ACCEPTOR_HISTORY: &[u64] = &[1, 2];
const INITIATOR_HISTORY: &[u64] = &[1, 2, 3];

fn initiator(volume: ReplicatedVolumeId) -> InitiatorConfig {
    InitiatorConfig {
        cluster: CLUSTER,
        node: INITIATOR_NODE,
        secret: secret(),
        volume,
        volume_size_bytes: 1 << 30,
        region_size_bytes: REGION_BYTES,
        history: history(INITIATOR_HISTORY),
    }
}

fn connect_config(initiator: InitiatorConfig) -> ConnectConfig {
    let mut c = ConnectConfig::new(initiator);
    c.handshake_deadline = Duration::from_secs(10);
    c
}

struct Node {
    listener: PeerListener,
    /// Its TCP address (unused for a Unix socket listener).
    addr: SocketAddr,
    /// The listener's address as its log lines name it.
    label: String,
    established: Arc<Mutex<Vec<Established>>>,
}

impl Node {
    fn start(tweak: impl FnOnce(&mut ListenerConfig)) -> Node {
        log();
        let mut config = ListenerConfig::new(AcceptorConfig {
            cluster: CLUSTER,
            node: ACCEPTOR_NODE,
            secret: secret(),
        });
        config.tcp = vec!["127.0.0.1:0".parse().unwrap()];
        tweak(&mut config);
        let unix = config.unix.clone();
        let established: Arc<Mutex<Vec<Established>>> = Arc::default();
        let sink = established.clone();
        let listener = PeerListener::start(
            config,
            Arc::new(|v: ReplicatedVolumeId| {
                (v == VOLUME).then(|| LocalVolume {
                    volume_size_bytes: 1 << 30,
                    region_size_bytes: REGION_BYTES,
                    history: history(ACCEPTOR_HISTORY),
                })
            }),
            Arc::new(move |e| sink.lock().unwrap().push(e)),
        )
        .expect("listener starts");
        let addr = listener.tcp_addrs().first().copied();
        let label = match (&addr, &unix) {
            (Some(a), _) => format!("tcp {a}"),
            (None, Some(p)) => format!("unix {}", p.display()),
            (None, None) => unreachable!("the tests listen somewhere"),
        };
        Node {
            label,
            listener,
            addr: addr.unwrap_or_else(|| "0.0.0.0:0".parse().unwrap()),
            established: established.clone(),
        }
    }

    fn established(&self) -> usize {
        self.established.lock().unwrap().len()
    }

    /// Waits for this listener's log line with `needles`.
    fn logged(&self, needles: &[&str]) -> String {
        let mut all = vec![self.label.as_str()];
        all.extend_from_slice(needles);
        wait_for_line(&all)
    }
}

// ---- a raw peer --------------------------------------------------------------------------

fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(EVENTUALLY)).unwrap();
    s
}

/// Everything the listener sends until it closes the connection (bounded).
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("reading until the listener closes: {e}"),
        }
        assert!(
            got.len() < 1 << 16,
            "the listener sends more than a refusal"
        );
    }
}

/// The frames in `bytes`, by kind and refuse code.
fn frames(mut bytes: &[u8]) -> Vec<(FrameKind, Option<RefuseCode>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match decode_frame(bytes).expect("the listener sends valid frames") {
            Decoded::Frame { frame, consumed } => {
                let code = match frame.body {
                    Body::Refuse(c) => Some(c),
                    _ => None,
                };
                out.push((frame.body.kind(), code));
                bytes = &bytes[consumed..];
            }
            Decoded::Need(_) => panic!("a partial frame before the close"),
        }
    }
    out
}

/// Sends `bytes` as a fresh connection and checks that the listener answers with exactly one
/// Refuse frame carrying `code`, then closes.
fn refused_with(node: &Node, bytes: &[u8], code: RefuseCode) {
    let mut s = raw(node.addr);
    s.write_all(bytes).expect("send");
    let answer = read_to_close(&mut s);
    assert_eq!(frames(&answer), [(FrameKind::Refuse, Some(code))]);
}

fn hello(version_min: u8, version_max: u8) -> Hello {
    Hello {
        version_min,
        version_max,
        cluster: CLUSTER,
        node: INITIATOR_NODE,
        nonce: Nonce([9; 32]),
        volume_size_bytes: 1 << 30,
        region_size_bytes: REGION_BYTES,
        history: history(INITIATOR_HISTORY),
    }
}

fn encode(seq: u64, body: Body<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&Frame::new(Seq(seq), VOLUME, body), &mut out);
    out
}

/// Recomputes the header crc after a field was changed, so only that field is wrong.
fn reseal(frame: &mut [u8]) {
    let crc = crc32c::crc32c(&frame[..44]);
    frame[44..48].copy_from_slice(&crc.to_le_bytes());
}

// ---- the happy path ----------------------------------------------------------------------

#[test]
fn a_connector_and_the_listener_agree_on_the_session() {
    let node = Node::start(|_| {});
    let (fd, session) = connect(
        &PeerAddress::from(node.addr),
        &connect_config(initiator(VOLUME)),
    )
    .expect("the handshake succeeds");
    eventually("the listener hands the connection on", || {
        node.established() == 1
    });
    let theirs = node.established.lock().unwrap().pop().unwrap();
    // Each side learned the other's identity and history; the rest is the same on both.
    assert_eq!(session.peer_node, ACCEPTOR_NODE);
    assert_eq!(theirs.session.peer_node, INITIATOR_NODE);
    assert_eq!(session.peer_history, history(ACCEPTOR_HISTORY));
    assert_eq!(theirs.session.peer_history, history(INITIATOR_HISTORY));
    assert_eq!(session.volume, theirs.session.volume);
    assert_eq!(session.version, theirs.session.version);
    assert_eq!(session.region_size_bytes, theirs.session.region_size_bytes);
    assert_eq!(session.next_send, theirs.session.next_recv);
    assert_eq!(session.next_recv, theirs.session.next_send);
    assert_eq!(node.listener.connections(), 1);

    // The sockets are at a frame boundary: a frame sent now arrives whole, in sequence.
    let mut ours = TcpStream::from(fd);
    ours.write_all(&encode(session.next_send.0, Body::Heartbeat))
        .unwrap();
    let mut their_stream = TcpStream::from(theirs.fd);
    their_stream.set_read_timeout(Some(EVENTUALLY)).unwrap();
    let mut got = vec![0u8; HEADER_LEN];
    their_stream.read_exact(&mut got).unwrap();
    let Decoded::Frame { frame, .. } = decode_frame(&got).unwrap() else {
        panic!("a heartbeat has no payload");
    };
    assert_eq!(frame.body, Body::Heartbeat);
    assert_eq!(frame.seq, theirs.session.next_recv);

    // Both ends decide alone what the link does, and the decisions fit: the initiator, primary
    // and one generation ahead, resyncs the acceptor from the bitmap it kept since then.
    let g = |n| GenerationId::new(n).unwrap();
    let engine_history = |ids: &[u64]| {
        ringblock_engine::replication::GenerationHistory::from_ids(
            ids.iter().map(|&n| g(n)).collect(),
        )
        .unwrap()
    };
    let primary = LocalCopy {
        role: Role::Primary,
        history: engine_history(INITIATOR_HISTORY),
        tracking: Some(Tracking {
            since: Some(g(2)),
            full_sync: false,
        }),
    };
    let replica = LocalCopy {
        role: Role::Replica,
        history: engine_history(ACCEPTOR_HISTORY),
        tracking: None,
    };
    assert_eq!(
        decide(&primary, &session),
        LinkDecision::ResyncPeer {
            since: Some(g(2)),
            scope: ResyncScope::Bitmap
        }
    );
    assert_eq!(
        decide(&replica, &theirs.session),
        LinkDecision::SyncTarget { since: Some(g(2)) }
    );

    // The connection's place is given back when the runtime lets go of it.
    drop(theirs.permit);
    assert_eq!(node.listener.connections(), 0);
    node.logged(&["connection established"]);
}

#[test]
fn the_listener_and_connector_work_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("ringblock-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("peer.sock");
    let node = Node::start(|c| {
        c.tcp.clear();
        c.unix = Some(path.clone());
    });
    let (_fd, session) = connect(
        &PeerAddress::Unix(path.clone()),
        &connect_config(initiator(VOLUME)),
    )
    .expect("the handshake succeeds");
    assert_eq!(session.peer_node, ACCEPTOR_NODE);
    eventually("established", || node.established() == 1);
    node.listener.stop();
    assert!(!path.exists(), "the listener removes its socket file");
    let _ = std::fs::remove_dir(&dir);
}

// ---- hostile peers -----------------------------------------------------------------------

// Each case has its own listener: refusals of one kind are logged at most once a second.

#[test]
fn a_peer_without_a_common_version_is_refused() {
    let node = Node::start(|_| {});
    // The Hello offers only version 2.
    refused_with(
        &node,
        &encode(0, Body::Hello(hello(2, 2))),
        RefuseCode::Version,
    );
    node.logged(&["handshake refused", "no common protocol version"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_frame_of_another_protocol_version_is_refused() {
    let node = Node::start(|_| {});
    let mut frame = encode(0, Body::Hello(hello(1, 1)));
    frame[4] = 2;
    reseal(&mut frame);
    refused_with(&node, &frame[..HEADER_LEN], RefuseCode::Version);
    node.logged(&["handshake refused", "unsupported protocol version 2"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused_and_told_only_denied() {
    let node = Node::start(|_| {});
    let mut config = initiator(VOLUME);
    config.secret = ClusterSecret::new(b"another cluster's secret!".to_vec()).unwrap();
    let err = connect(&PeerAddress::from(node.addr), &connect_config(config))
        .expect_err("a wrong secret is refused");
    assert_eq!(
        err.refusal(),
        Some(&Refusal::PeerRefused(RefuseCode::Denied))
    );
    node.logged(&["handshake refused", "proof does not verify"]);
    assert_eq!(node.established(), 0);
    assert_eq!(node.listener.counts().refused, 1);
}

#[test]
fn a_peer_of_another_cluster_is_refused_and_told_only_denied() {
    let node = Node::start(|_| {});
    let mut config = initiator(VOLUME);
    config.cluster = ClusterId(0xbad);
    let err = connect(&PeerAddress::from(node.addr), &connect_config(config))
        .expect_err("another cluster is refused");
    assert_eq!(
        err.refusal(),
        Some(&Refusal::PeerRefused(RefuseCode::Denied))
    );
    node.logged(&["handshake refused", "peer belongs to cluster"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_peer_asking_for_an_unknown_volume_is_told_after_it_proved_itself() {
    let node = Node::start(|_| {});
    let err = connect(
        &PeerAddress::from(node.addr),
        &connect_config(initiator(ReplicatedVolumeId(99))),
    )
    .expect_err("no copy of volume 99 here");
    assert_eq!(
        err.refusal(),
        Some(&Refusal::PeerRefused(RefuseCode::UnknownVolume))
    );
    node.logged(&["handshake refused", "no copy of volume 99 on this node"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_frame_with_a_bad_payload_checksum_is_refused() {
    let node = Node::start(|_| {});
    let mut frame = encode(0, Body::Hello(hello(1, 1)));
    frame[HEADER_LEN + 20] ^= 0x10;
    refused_with(&node, &frame, RefuseCode::Protocol);
    node.logged(&["handshake refused", "payload checksum mismatch"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_frame_with_a_bad_header_checksum_is_refused() {
    let node = Node::start(|_| {});
    let mut frame = encode(0, Body::Hello(hello(1, 1)));
    frame[20] ^= 0x01;
    refused_with(&node, &frame[..HEADER_LEN], RefuseCode::Protocol);
    node.logged(&["handshake refused", "header checksum mismatch"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_length_field_over_the_maximum_is_refused_from_the_header_alone() {
    let node = Node::start(|_| {});
    let mut frame = encode(0, Body::Hello(hello(1, 1)));
    frame[36..40].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
    reseal(&mut frame);
    refused_with(&node, &frame[..HEADER_LEN], RefuseCode::Protocol);
    node.logged(&["handshake refused", "exceeds the maximum"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_frame_longer_than_any_handshake_frame_is_refused_from_its_header() {
    let node = Node::start(|_| {});
    // A valid header of a megabyte Write: more than any handshake frame, refused before a
    // byte of its payload is awaited.
    let data = vec![0u8; MAX_PAYLOAD_BYTES as usize];
    let frame = encode(
        0,
        Body::Write {
            offset_bytes: 0,
            fua: false,
            data: &data,
        },
    );
    refused_with(&node, &frame[..HEADER_LEN], RefuseCode::Protocol);
    node.logged(&["handshake refused", "longer than any handshake frame"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_first_frame_out_of_sequence_is_refused() {
    let node = Node::start(|_| {});
    refused_with(
        &node,
        &encode(1, Body::Hello(hello(1, 1))),
        RefuseCode::Protocol,
    );
    node.logged(&["handshake refused", "expected 0, found 1"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_replayed_hello_is_refused() {
    let node = Node::start(|_| {});
    // A replayed Hello where the Response belongs: the Challenge comes, then the Refuse.
    let mut s = raw(node.addr);
    let first = encode(0, Body::Hello(hello(1, 1)));
    s.write_all(&first).unwrap();
    let mut challenge = vec![0u8; HEADER_LEN + 56];
    s.read_exact(&mut challenge).unwrap();
    assert_eq!(frames(&challenge), [(FrameKind::Challenge, None)]);
    s.write_all(&first).unwrap();
    assert_eq!(
        frames(&read_to_close(&mut s)),
        [(FrameKind::Refuse, Some(RefuseCode::Protocol))]
    );
    node.logged(&["handshake refused", "expected 1, found 0"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn garbage_is_refused() {
    let node = Node::start(|_| {});
    let garbage: Vec<u8> = (0..HEADER_LEN as u8).map(|i| i.wrapping_mul(37)).collect();
    refused_with(&node, &garbage, RefuseCode::Protocol);
    node.logged(&["handshake refused", "bad magic"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_data_frame_in_place_of_the_hello_is_refused() {
    let node = Node::start(|_| {});
    refused_with(&node, &encode(0, Body::Heartbeat), RefuseCode::Protocol);
    node.logged(&["handshake refused", "while waiting for Hello"]);
    assert_eq!(node.established(), 0);
}

#[test]
fn a_silent_peer_is_dropped_at_the_deadline() {
    let node = Node::start(|c| c.handshake_deadline = Duration::from_millis(200));
    let mut s = raw(node.addr);
    assert_eq!(read_to_close(&mut s), b"", "dropped, told nothing");
    node.logged(&["handshake deadline passed"]);
    assert_eq!(node.listener.counts().timed_out, 1);
    eventually("the handshake slot is free", || {
        node.listener.handshakes() == 0
    });
    assert_eq!(node.established(), 0);
}

#[test]
fn a_peer_trickling_bytes_is_dropped_at_the_deadline_too() {
    // Each byte arrives well within the per-read timeout; only the deadline ends it.
    let node = Node::start(|c| {
        c.handshake_deadline = Duration::from_millis(300);
        c.io_timeout = Duration::from_secs(10);
    });
    let mut s = raw(node.addr);
    let frame = encode(0, Body::Hello(hello(1, 1)));
    for byte in frame.iter().take(HEADER_LEN - 1) {
        if s.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    node.logged(&["handshake deadline passed"]);
    assert_eq!(read_to_close(&mut s), b"");
    assert_eq!(node.established(), 0);
}

#[test]
fn a_flood_of_silent_connections_does_not_lock_out_a_real_peer() {
    let node = Node::start(|c| {
        c.max_handshakes = 4;
        c.max_handshakes_per_address = 4;
        c.handshake_deadline = Duration::from_secs(2);
    });
    let flood: Vec<TcpStream> = (0..16).map(|_| raw(node.addr)).collect();
    eventually("the listener took every flood connection", || {
        node.listener.counts().accepted >= 16
    });
    // The cut-off handshakes wind down; the newest four stay, silent, until their deadline.
    eventually("only the table's handshakes are left", || {
        node.listener.handshakes() == 4
    });
    // From the same address: the flood's handshakes are all older, so they are cut off first.
    connect(
        &PeerAddress::from(node.addr),
        &connect_config(initiator(VOLUME)),
    )
    .expect("a real peer gets through");
    eventually("established", || node.established() == 1);
    node.logged(&["cutting off the oldest unfinished handshake"]);
    // Every flood connection ends, told nothing, and none was established.
    for mut s in flood {
        assert_eq!(read_to_close(&mut s), b"");
    }
    assert_eq!(node.established(), 1);
    assert!(node.listener.counts().cut_off >= 12);
}

/// A TCP connection to `to` from 127.0.0.2: another address than the well-behaved peer's.
fn connect_from_other_address(to: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let SocketAddr::V4(to) = to else {
        unreachable!("the listener is on 127.0.0.1")
    };
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let from = sockaddr([127, 0, 0, 2], 0);
    // SAFETY: `from` is a valid sockaddr_in of `len` bytes that outlives the call.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&from as *const libc::sockaddr_in).cast(),
            len,
        )
    })?;
    let to = sockaddr(to.ip().octets(), to.port());
    // SAFETY: as for bind.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&to as *const libc::sockaddr_in).cast(),
            len,
        )
    })?;
    Ok(TcpStream::from(fd))
}

#[test]
fn a_continuous_flood_from_one_address_only_churns_its_own_slots() {
    let node = Node::start(|c| {
        c.max_handshakes = 8;
        c.max_handshakes_per_address = 2;
        c.handshake_deadline = Duration::from_secs(2);
    });
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let addr = node.addr;
        std::thread::spawn(move || {
            // Bounded: at most 400 connections, each held until the end.
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) && held.len() < 400 {
                if let Ok(s) = connect_from_other_address(addr) {
                    held.push(s);
                }
            }
            held.len()
        })
    };
    eventually("the flood is under way", || {
        node.listener.counts().cut_off >= 10
    });
    for _ in 0..5 {
        connect(
            &PeerAddress::from(node.addr),
            &connect_config(initiator(VOLUME)),
        )
        .expect("a real peer gets through while the flood goes on");
    }
    stop.store(true, Ordering::Relaxed);
    let flooded = flooder.join().unwrap();
    assert!(flooded >= 10);
    eventually("established", || node.established() == 5);
    node.logged(&["peer=127.0.0.2", "cutting off the oldest"]);
    assert_eq!(node.listener.counts().established, 5);
}

#[test]
fn connections_beyond_the_limit_are_closed_before_they_are_established() {
    let node = Node::start(|c| c.max_connections = 1);
    let addr = PeerAddress::from(node.addr);
    let config = connect_config(initiator(VOLUME));
    let _first = connect(&addr, &config).expect("the first connection");
    eventually("established", || node.established() == 1);
    let err = connect(&addr, &config).expect_err("the second is one too many");
    assert!(matches!(err, ConnectError::Closed { .. }), "{err}");
    node.logged(&["too many peer connections", "limit=1"]);
    assert_eq!(node.listener.counts().over_limit, 1);
    assert_eq!(node.established(), 1);
    // Once the runtime lets go of the first, there is room again.
    node.established.lock().unwrap().clear();
    connect(&addr, &config).expect("room again");
    eventually("established again", || node.established() == 1);
}

#[test]
fn stopping_the_listener_cuts_off_handshakes_in_progress() {
    let node = Node::start(|c| c.handshake_deadline = Duration::from_secs(60));
    let mut silent: Vec<TcpStream> = (0..3).map(|_| raw(node.addr)).collect();
    eventually("three handshakes in progress", || {
        node.listener.handshakes() == 3
    });
    node.listener.stop();
    assert_eq!(
        node.listener.handshakes(),
        0,
        "stop waits for their threads"
    );
    for s in &mut silent {
        assert_eq!(read_to_close(s), b"");
    }
    assert_eq!(node.established(), 0);
}

// ---- the connector's errors --------------------------------------------------------------

#[test]
fn the_connector_gives_up_at_its_deadline_on_a_silent_listener() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = connect_config(initiator(VOLUME));
    config.handshake_deadline = Duration::from_millis(200);
    let err = connect(&PeerAddress::from(silent.local_addr().unwrap()), &config)
        .expect_err("nobody answers");
    assert!(
        matches!(err, ConnectError::HandshakeTimeout { .. }),
        "{err}"
    );
}

#[test]
fn the_connector_reports_a_closed_port_as_an_io_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = connect(&PeerAddress::from(addr), &connect_config(initiator(VOLUME)))
        .expect_err("nobody listens");
    match err {
        ConnectError::Io { source, .. } => {
            assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused)
        }
        other => panic!("expected a refused connection, got {other}"),
    }
}

#[test]
fn the_connector_refuses_an_acceptor_that_does_not_prove_itself() {
    // A fake acceptor that answers the Hello with a Challenge, then a Welcome with a bogus
    // proof: the connector refuses it and tells it so.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        s.set_read_timeout(Some(EVENTUALLY)).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut read_frame = |s: &mut TcpStream| {
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            let len = u32::from_le_bytes(head[36..40].try_into().unwrap()) as usize;
            s.read_exact(&mut buf[..len]).unwrap();
        };
        read_frame(&mut s);
        let challenge = ringblock_transports::peer::Challenge {
            version: 1,
            node: ACCEPTOR_NODE,
            nonce: Nonce([1; 32]),
        };
        s.write_all(&encode(0, Body::Challenge(challenge))).unwrap();
        read_frame(&mut s);
        let welcome = ringblock_transports::peer::Welcome {
            mac: ringblock_transports::peer::Mac([0; 32]),
            volume_size_bytes: 1 << 30,
            region_size_bytes: REGION_BYTES,
            history: history(ACCEPTOR_HISTORY),
        };
        s.write_all(&encode(1, Body::Welcome(welcome))).unwrap();
        read_to_close(&mut s)
    });
    let err = connect(&PeerAddress::from(addr), &connect_config(initiator(VOLUME)))
        .expect_err("a bogus proof");
    assert_eq!(err.refusal(), Some(&Refusal::BadProof));
    let told = server.join().unwrap();
    assert_eq!(
        frames(&told),
        [(FrameKind::Refuse, Some(RefuseCode::Denied))]
    );
}
