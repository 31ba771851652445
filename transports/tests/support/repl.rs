//! Helpers shared by the replication tests on real engines: engine start-up, requests run to
//! completion, waiting for a condition, shutdown; [`runtime`] for the tests that drive whole
//! peer runtimes, [`link`] for the tests that wire a link task and a serve task by hand.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblock_engine::{
    DeviceConfig, Engine, EngineConfig, Errno, IoBuf, Port, PortWaker, Request, RequestKind,
    VolumeHandle,
};

pub const MIB: u64 = 1 << 20;

/// An engine on one core with a 64 MiB RAM device "r" holding volume "a" of `volume_bytes`;
/// `chunk_size_bytes` overrides the device's default chunk size.
pub fn engine(volume_bytes: u64, chunk_size_bytes: Option<u64>) -> Engine {
    let mut device = DeviceConfig::ram("r", 64 << 20);
    if let Some(chunk) = chunk_size_bytes {
        device.chunk_size_bytes = chunk;
    }
    let engine = Engine::start(&EngineConfig {
        devices: vec![device],
        cores: vec![0],
        ..Default::default()
    })
    .unwrap();
    engine.create_volume("r", "a", volume_bytes).unwrap();
    engine
}

/// A request on volume "a" without FUA.
pub fn request(kind: RequestKind, offset: u64, len: u64, buf: Option<IoBuf>) -> Request {
    request_fua(kind, offset, len, false, buf)
}

/// A request on volume "a"; `fua`: it is durable when it completes.
pub fn request_fua(
    kind: RequestKind,
    offset: u64,
    len: u64,
    fua: bool,
    buf: Option<IoBuf>,
) -> Request {
    Request {
        kind,
        offset_bytes: offset,
        len_bytes: len,
        fua,
        buf,
        mover: None,
        tag: 0,
    }
}

/// Submit `req` on `handle` and wait (at most `limit`, else panic) for its completion.
pub fn submit_and_wait(
    handle: &VolumeHandle,
    req: Request,
    limit: Duration,
) -> Result<Option<IoBuf>, Errno> {
    let port = Port::new(1, PortWaker::Thread(std::thread::current()));
    handle.submit(req, &port).map_err(|(_, e)| e)?;
    let until = Instant::now() + limit;
    loop {
        if let Some(c) = port.pop() {
            return c.result.map(|()| c.buf);
        }
        assert!(Instant::now() < until, "a request never completed");
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Wait for `done`, checking every `poll`; panic after `limit`.
pub fn wait_within(what: &str, limit: Duration, poll: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(poll);
    }
}

/// Shut the engines down; the test must hold the only reference to each.
pub fn shutdown(engines: impl IntoIterator<Item = Arc<Engine>>) {
    for e in engines {
        Arc::try_unwrap(e)
            .ok()
            .expect("only the test holds the engine")
            .shutdown()
            .unwrap();
    }
}

/// Whole peer runtimes on loopback TCP or Unix sockets.
pub mod runtime {
    use std::sync::Arc;
    use std::time::Duration;

    use ringblock_engine::replication::{GenerationHistory, NodeId, Role, VolumeReplication};
    use ringblock_engine::{AlignedBuf, Engine, Errno, IoBuf, Request, RequestKind};
    use ringblock_transports::peer::runtime::{
        ListenAddress, PeerMode, PeerSpec, ReplicatedVolume, RuntimeConfig, RuntimeTiming,
    };
    use ringblock_transports::peer::{PeerAddress, PeerRuntime};

    use super::request;

    pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    /// How long a request or a condition may take.
    pub const WAIT: Duration = Duration::from_secs(30);

    pub fn node(n: u128) -> NodeId {
        NodeId::new(n).unwrap()
    }

    /// [`super::engine`] with the default chunk size, shared with a runtime.
    pub fn engine(volume_bytes: u64) -> Arc<Engine> {
        Arc::new(super::engine(volume_bytes, None))
    }

    /// A sync peer `node` at `address`.
    pub fn sync_peer(node: NodeId, address: PeerAddress, queue_limit_bytes: u64) -> PeerSpec {
        PeerSpec {
            node,
            address,
            mode: PeerMode::Sync,
            queue_limit_bytes,
        }
    }

    /// Node `node`'s configuration: cluster "lab", volume "a" in `role` with `peers`, short
    /// back-offs so reconnects happen within a test, no exports, no membership file.
    pub fn config(
        node: NodeId,
        role: Role,
        peers: Vec<PeerSpec>,
        listen: ListenAddress,
        secret: &[u8],
    ) -> RuntimeConfig {
        RuntimeConfig {
            node,
            cluster: "lab".into(),
            secret: secret.to_vec(),
            listen,
            volumes: vec![ReplicatedVolume {
                name: "a".into(),
                role,
                peers,
            }],
            timing: RuntimeTiming {
                backoff_base: Duration::from_millis(20),
                backoff_max: Duration::from_millis(400),
                diverged_retry: Duration::from_millis(300),
                stop_wait: Duration::from_secs(15),
                evict_interval: Duration::from_millis(200),
            },
            exports: None,
            membership_file: None,
        }
    }

    /// A TCP listener on a free loopback port.
    pub fn loopback() -> ListenAddress {
        ListenAddress::Tcp("127.0.0.1:0".parse().unwrap())
    }

    /// An address nobody listens at (a replica never dials its primary).
    pub fn unused() -> PeerAddress {
        PeerAddress::Tcp("127.0.0.1:9".into())
    }

    /// The address `rt` listens at, for its peers.
    pub fn address(rt: &PeerRuntime) -> PeerAddress {
        match rt.listening() {
            ListenAddress::Tcp(a) => PeerAddress::Tcp(a.to_string()),
            ListenAddress::Unix(p) => PeerAddress::Unix(p.clone()),
        }
    }

    /// Give volume "a" of `engine` a replication record in `role` with one `peer` and
    /// `history`, the peer tracked as up to date (no full sync pending).
    pub fn record(engine: &Engine, role: Role, peer: NodeId, history: GenerationHistory) {
        let v = engine.volume("a").unwrap();
        let state = VolumeReplication::new(role, v.max_size_bytes(), 20, &[peer]).unwrap();
        state.adopt_history(history);
        for rep in state.replicas() {
            rep.set_full_sync(false);
        }
        v.set_replication(Some(Arc::new(state)));
        engine.flush_all().unwrap();
    }

    pub fn wait_for(what: &str, done: impl FnMut() -> bool) {
        super::wait_within(what, WAIT, Duration::from_millis(20), done)
    }

    /// Run `req` on volume "a" of `engine` and wait for it.
    pub fn try_run(engine: &Engine, req: Request) -> Result<Option<IoBuf>, Errno> {
        super::submit_and_wait(&engine.open("a").unwrap(), req, WAIT)
    }

    /// [`try_run`] for a request that must succeed.
    pub fn run(engine: &Engine, req: Request) -> Option<IoBuf> {
        try_run(engine, req).expect("the request succeeds")
    }

    /// Write `len` bytes of `fill` at `offset` and flush.
    pub fn write(engine: &Engine, offset: u64, len: u64, fill: u8) {
        let mut data = AlignedBuf::zeroed(len as usize);
        data.as_mut_slice().fill(fill);
        run(
            engine,
            request(RequestKind::Write, offset, len, Some(IoBuf::owned(data))),
        );
        run(engine, request(RequestKind::Flush, 0, 0, None));
    }

    pub fn read(engine: &Engine, offset: u64, len: usize) -> Vec<u8> {
        let buf = IoBuf::owned(AlignedBuf::zeroed(len));
        run(
            engine,
            request(RequestKind::Read, offset, len as u64, Some(buf)),
        )
        .expect("read buffer")
        .as_slice()
        .to_vec()
    }
}

/// A primary's link task and a replica's serve task wired by hand.
pub mod link {
    use std::sync::Arc;
    use std::time::Duration;

    use ringblock_engine::replication::{
        GenerationHistory, LinkMode, LinkState, NodeId, ReplicaLink, ReplicaSet, Role,
        VolumeReplication,
    };
    use ringblock_engine::VolumeHandle;
    use ringblock_engine::{AlignedBuf, Engine, IoBuf, ReactorId, Request, RequestKind};
    use ringblock_transports::peer::{
        monotonic_clock, LinkOptions, ReplicatedVolumeId, Seq, ServeOptions,
    };

    use super::{request, MIB};

    pub const REGION_SHIFT: u8 = 20;
    pub const PRIMARY_NODE: u128 = 1;
    pub const REPLICA_NODE: u128 = 3;
    pub const VOLUME_ID: ReplicatedVolumeId = ReplicatedVolumeId(77);

    /// Run `req` on `handle`, wait (at most `limit`) for it and check that it succeeded.
    pub fn run_within(handle: &VolumeHandle, req: Request, limit: Duration) -> Option<IoBuf> {
        let result = super::submit_and_wait(handle, req, limit);
        assert!(result.is_ok(), "request failed: {result:?}");
        result.unwrap()
    }

    /// [`run_within`] 30 s.
    pub fn run(handle: &VolumeHandle, req: Request) -> Option<IoBuf> {
        run_within(handle, req, Duration::from_secs(30))
    }

    /// Write `len` bytes of `fill` at `offset` (no flush).
    pub fn write(handle: &VolumeHandle, offset: u64, len: u64, fill: u8) {
        let mut data = AlignedBuf::zeroed(len as usize);
        data.as_mut_slice().fill(fill);
        run(
            handle,
            request(RequestKind::Write, offset, len, Some(IoBuf::owned(data))),
        );
    }

    /// The whole of volume "a" (`volume_bytes`), read a MiB at a time.
    pub fn read_all(e: &Engine, volume_bytes: u64) -> Vec<u8> {
        let handle = e.open("a").unwrap();
        let mut out = Vec::with_capacity(volume_bytes as usize);
        for offset in (0..volume_bytes).step_by(MIB as usize) {
            let buf = IoBuf::owned(AlignedBuf::zeroed(MIB as usize));
            let got = run(&handle, request(RequestKind::Read, offset, MIB, Some(buf)))
                .expect("read buffer");
            out.extend_from_slice(got.as_slice());
        }
        out
    }

    /// Wait for `cond`, failing after a generous deadline (a stuck resync).
    pub fn wait_for(what: &str, cond: impl FnMut() -> bool) {
        super::wait_within(
            what,
            Duration::from_secs(60),
            Duration::from_millis(2),
            cond,
        )
    }

    pub fn wait_up_to_date(link: &ReplicaLink) {
        wait_for("the link is up to date", || {
            link.state() == LinkState::UpToDate
        });
    }

    /// Make volume "a" of `p` a primary with one replica (`REPLICA_NODE`) in `mode` whose link
    /// is behind (writes mark).
    pub fn make_primary(p: &Engine, mode: LinkMode) -> Arc<ReplicaLink> {
        let volume = p.volume("a").unwrap();
        let replication = Arc::new(
            VolumeReplication::new(
                Role::Primary,
                volume.max_size_bytes(),
                REGION_SHIFT,
                &[NodeId::new(REPLICA_NODE).unwrap()],
            )
            .unwrap(),
        );
        volume.set_replication(Some(replication.clone()));
        let link = ReplicaLink::with_mode(replication, 0, ReactorId(0), mode).unwrap();
        let set = ReplicaSet::new(vec![link.clone()]).unwrap();
        volume.attach_replicas(Some(Arc::new(set))).unwrap();
        link
    }

    /// Make volume "a" of `r` a replica of `PRIMARY_NODE` holding `history` (empty: it holds
    /// nothing yet).
    pub fn make_replica(r: &Engine, history: GenerationHistory) -> Arc<VolumeReplication> {
        let volume = r.volume("a").unwrap();
        let replication = VolumeReplication::new(
            Role::Replica,
            volume.max_size_bytes(),
            REGION_SHIFT,
            &[NodeId::new(PRIMARY_NODE).unwrap()],
        )
        .unwrap();
        replication.adopt_history(history);
        let replication = Arc::new(replication);
        volume.set_replication(Some(replication.clone()));
        replication
    }

    /// The link task's options for a window of `window_frames` and `window_bytes`.
    pub fn link_options(window_frames: u32, window_bytes: u64) -> LinkOptions {
        LinkOptions {
            volume: VOLUME_ID,
            send_seq: Seq(0),
            recv_seq: Seq(0),
            window_frames,
            window_bytes,
            zero_copy: true,
            clock: monotonic_clock(),
            peer: "replica".into(),
        }
    }

    /// The serve task's options against `link`'s primary (`PRIMARY_NODE`, its history).
    pub fn serve_options(link: &ReplicaLink, volume_bytes: u64) -> ServeOptions {
        ServeOptions {
            volume: VOLUME_ID,
            send_seq: Seq(0),
            recv_seq: Seq(0),
            max_in_flight: 16,
            clock: monotonic_clock(),
            peer: "primary".into(),
            primary_node: NodeId::new(PRIMARY_NODE),
            primary_history: link.replication().history(),
            primary_size_bytes: volume_bytes,
        }
    }
}
