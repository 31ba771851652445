//! The replica link and serve tasks on real io_uring reactors: two engines in one process, a
//! real connection between them (TCP on loopback, where zero-copy sends are used for large
//! payloads, and a Unix socket pair, which refuses them so the link falls back to copying),
//! writes of both sizes (some FUA), trims and a flush on the primary; the replica ends with
//! exactly the primary's data and the link stays up.

#[path = "support/repl.rs"]
mod repl;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repl::link::make_replica;
use repl::request_fua as request;
use ringblock_engine::replication::{
    LinkState, NodeId, ReplicaLink, ReplicaSet, Role, VolumeReplication,
};
use ringblock_engine::{AlignedBuf, Engine, IoBuf, ReactorId, Request, RequestKind, VolumeHandle};
use ringblock_transports::peer::{
    monotonic_clock, LinkOptions, PrimaryLink, ReplicaServe, ReplicatedVolumeId, Seq, ServeOptions,
};

const VOLUME_BYTES: u64 = 16 << 20;

fn engine() -> Engine {
    repl::engine(VOLUME_BYTES, None)
}

/// Run `req` on `handle` and wait for it.
fn run(handle: &VolumeHandle, req: Request) -> Option<IoBuf> {
    repl::link::run_within(handle, req, Duration::from_secs(20))
}

/// Attach one replica to volume "a" of `p` and spawn its link task on `primary_fd`.
fn spawn_link(p: &Engine, primary_fd: OwnedFd, what: &str) -> Arc<ReplicaLink> {
    let volume = p.volume("a").unwrap();
    let replication = Arc::new(
        VolumeReplication::new(
            Role::Primary,
            volume.max_size_bytes(),
            20,
            &[NodeId::new(3).unwrap()],
        )
        .unwrap(),
    );
    volume.set_replication(Some(replication.clone()));
    let link = ReplicaLink::new(replication, 0, ReactorId(0)).unwrap();
    link.set_up_to_date();
    let set = ReplicaSet::new(vec![link.clone()]).unwrap();
    volume.attach_replicas(Some(Arc::new(set))).unwrap();
    let lopts = LinkOptions {
        volume: ReplicatedVolumeId(77),
        send_seq: Seq(0),
        recv_seq: Seq(0),
        window_frames: 64,
        window_bytes: 16 << 20,
        zero_copy: true,
        clock: monotonic_clock(),
        peer: format!("replica over {what}"),
    };
    let task = PrimaryLink::new(primary_fd, p.open("a").unwrap(), link.clone(), lopts);
    p.spawn_task(Some(ReactorId(0)), Box::new(task));
    link
}

fn replicate_over(primary_fd: OwnedFd, replica_fd: OwnedFd, what: &str) {
    let (p, r) = (engine(), engine());
    // A replica that holds nothing yet (an empty history).
    make_replica(&r, Default::default());
    let link = spawn_link(&p, primary_fd, what);
    let id = ReplicatedVolumeId(77);
    let sopts = ServeOptions {
        volume: id,
        send_seq: Seq(0),
        recv_seq: Seq(0),
        max_in_flight: 16,
        clock: monotonic_clock(),
        peer: format!("primary over {what}"),
        primary_node: None,
        primary_history: Default::default(),
        primary_size_bytes: VOLUME_BYTES,
    };
    r.spawn_task(
        Some(ReactorId(0)),
        Box::new(ReplicaServe::new(replica_fd, r.open("a").unwrap(), sopts)),
    );

    let handle = p.open("a").unwrap();
    let mut expect = vec![0u8; VOLUME_BYTES as usize];
    let mut x = 0x1234_5678_9abc_def0u64;
    for i in 0..48u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Large pieces go zero-copy (where the socket can), small ones are copied; one is
        // larger than a frame's payload.
        let len = match i % 3 {
            0 => 4096,
            1 => 256 << 10,
            _ if i == 2 => 1536 << 10,
            _ => 64 << 10,
        };
        let offset = (x % ((VOLUME_BYTES - len) / 4096)) * 4096;
        let fill = (i as u8).wrapping_mul(37) | 1;
        let mut data = AlignedBuf::zeroed(len as usize);
        data.as_mut_slice().fill(fill);
        let req = request(
            RequestKind::Write,
            offset,
            len,
            i % 5 == 0,
            Some(IoBuf::owned(data)),
        );
        run(&handle, req);
        expect[offset as usize..(offset + len) as usize].fill(fill);
        if i % 11 == 10 {
            let trim_at = (x >> 20) % (VOLUME_BYTES / 4096 - 16) * 4096;
            run(
                &handle,
                request(RequestKind::Trim, trim_at, 16 << 10, false, None),
            );
            expect[trim_at as usize..trim_at as usize + (16 << 10)].fill(0);
        }
    }
    run(&handle, request(RequestKind::Flush, 0, 0, false, None));
    assert_eq!(
        link.state(),
        LinkState::UpToDate,
        "{what}: the link stays up"
    );

    let rhandle = r.open("a").unwrap();
    let mut offset = 0;
    while offset < VOLUME_BYTES {
        let len = 1u64 << 20;
        let buf = IoBuf::owned(AlignedBuf::zeroed(len as usize));
        let got = run(
            &rhandle,
            request(RequestKind::Read, offset, len, false, Some(buf)),
        )
        .expect("read buffer");
        assert!(
            got.as_slice() == &expect[offset as usize..(offset + len) as usize],
            "{what}: the replica differs in the MiB at {offset}"
        );
        offset += len;
    }
    drop((handle, rhandle));
    p.shutdown().unwrap();
    r.shutdown().unwrap();
}

#[test]
fn a_replica_over_tcp_gets_every_write() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    replicate_over(OwnedFd::from(client), OwnedFd::from(server), "TCP");
}

#[test]
fn a_replica_over_a_unix_socket_gets_every_write() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    replicate_over(OwnedFd::from(a), OwnedFd::from(b), "a Unix socket");
}

/// Nothing but the link's timer wakes the primary's parked reactor: its heartbeat still goes
/// out (HEARTBEAT_INTERVAL_MS after the link starts), read here straight off the socket.
#[test]
fn an_idle_primary_link_keeps_heartbeating() {
    use ringblock_transports::peer::{decode_frame, Body, Decoded};
    use std::io::Read;

    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let p = engine();
    let link = spawn_link(&p, OwnedFd::from(a), "a silent peer");
    b.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let heartbeat = loop {
        match decode_frame(&got).expect("the link sends valid frames") {
            Decoded::Frame { frame, .. } => break frame.body,
            Decoded::Need(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "no frame from an idle link within 4 s"
        );
        match b.read(&mut chunk) {
            Ok(0) => panic!("the link closed its socket"),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
    };
    assert!(
        matches!(heartbeat, Body::Heartbeat),
        "the first frame of an idle link is a heartbeat, got {heartbeat:?}"
    );
    assert_eq!(
        link.state(),
        LinkState::Resyncing,
        "a peer that never said what it lacks keeps the link resyncing"
    );
    p.shutdown().unwrap();
}
