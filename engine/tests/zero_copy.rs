//! Zero-copy sends at the ring layer: on this kernel's io_uring (loopback TCP and Unix socket
//! pairs), through a task on a real reactor (counted in its statistics), and through a task on
//! the simulator (held in flight until the notification).

// The workspace's one skip switch (`RINGBLOCK_TESTS_REQUIRED`), shared with the root tests.
#[path = "../../tests/support/required.rs"]
mod required;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringblock_engine::io::sim_net::NodeId;
use ringblock_engine::io::task_ring::TaskRing;
use ringblock_engine::io::uring::{new_wake_fd, RingConfig, UringIo};
use ringblock_engine::io::zero_copy::{SendCounts, ZERO_COPY_MIN_BYTES};
use ringblock_engine::io::Io;
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::task::{ReactorTask, RingCompletion, Socket, SocketOp, TaskCtx};
use ringblock_engine::{DeviceConfig, Engine, EngineConfig, ReactorId};

const PAYLOAD_BYTES: usize = 64 << 10;

fn ring() -> UringIo {
    let config = RingConfig {
        queue_depth: 8,
        max_raw_owners: 4,
        max_raw_ops: 64,
    };
    UringIo::new(&[], config, new_wake_fd().unwrap(), None).unwrap()
}

/// A loopback TCP connection whose sender's buffer takes a whole test send at once.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    let bytes: libc::c_int = 4 << 20;
    // SAFETY: setsockopt reads one c_int from a live stack variable.
    let r = unsafe {
        libc::setsockopt(
            a.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    (a, b)
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt)
        .collect()
}

/// Read `len` bytes from `s` on a thread.
fn read_on_thread(
    mut s: impl Read + Send + 'static,
    len: usize,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).unwrap();
        got
    })
}

/// Reap the ring until `tags` each had their last completion (one without `more`); bounded.
fn reap_until_done(io: &mut UringIo, tags: &[u32]) -> Vec<RingCompletion> {
    let mut all = Vec::new();
    let mut io_done = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let finished = |all: &[RingCompletion]| {
        tags.iter()
            .all(|t| all.iter().any(|c| c.tag == *t && !c.more()))
    };
    while !finished(&all) {
        assert!(Instant::now() < deadline, "completions so far: {all:?}");
        io.poll(&mut io_done).unwrap();
        io.take_completions(&mut out);
        all.extend(out.drain(..).map(|(task, c)| {
            assert_eq!(task, 0);
            c
        }));
        if !finished(&all) {
            io.park(Some(1_000_000)).unwrap();
        }
    }
    all
}

/// A plain buffer and a frame header with its pages, each sent zero-copy over loopback TCP:
/// the bytes arrive, each op completes with its result (flagged `more`) and then its
/// notification, and on loopback the kernel reports the copy it made anyway.
#[test]
fn zero_copy_sends_over_loopback_tcp_complete_twice() {
    let mut io = ring();
    if !io.features().zero_copy_sends {
        return required::skip(
            "zero_copy_sends_over_loopback_tcp_complete_twice",
            io.zero_copy_unavailable().unwrap_or("no reason given"),
        );
    }
    let (a, b) = tcp_pair();
    let buf = pattern(PAYLOAD_BYTES, 1);
    let header = *b"frame-header";
    let pages = pattern(PAYLOAD_BYTES, 2);
    let reader = read_on_thread(b, buf.len() + header.len() + pages.len());
    let socket = Socket::Fd(a.as_raw_fd());
    let send = SocketOp::SendZc {
        socket,
        buf: buf.as_ptr(),
        len: buf.len() as u32,
    };
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: pages.as_ptr() as *mut libc::c_void,
            iov_len: pages.len(),
        },
    ];
    // SAFETY: msghdr is plain old data; all-zero is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    let sendmsg = SocketOp::SendMsgZc { socket, msg: &msg };
    // SAFETY: the buffers, the header and the socket outlive both ops: reap_until_done waits
    // for their notifications. The ring sends the first fully before the second (a stream
    // socket's sends complete in order), so the bytes arrive in push order.
    unsafe {
        TaskRing::push(&mut io, 0, send, 1).unwrap();
        TaskRing::push(&mut io, 0, sendmsg, 2).unwrap();
    }
    let all = reap_until_done(&mut io, &[1, 2]);
    let mut copied = 0;
    for (tag, len) in [(1, buf.len()), (2, header.len() + pages.len())] {
        let mine: Vec<_> = all.iter().filter(|c| c.tag == tag).collect();
        assert_eq!(mine.len(), 2, "tag {tag}: {mine:?}");
        let (result, notification) = (mine[0], mine[1]);
        assert!(!result.is_notification() && result.more(), "{result:?}");
        assert_eq!(result.result, len as i32, "{result:?}");
        assert!(notification.is_notification() && !notification.more());
        // Loopback hands the skb to a local socket, which copies zero-copy pages first.
        assert!(
            notification.copied(),
            "loopback copies anyway: {notification:?}"
        );
        copied += 1;
    }
    let got = reader.join().unwrap();
    let mut want = buf.clone();
    want.extend_from_slice(&header);
    want.extend_from_slice(&pages);
    assert!(got == want, "the bytes arrive whole and in order");
    assert_eq!(
        io.send_counters().snapshot(),
        SendCounts {
            zero_copy: 2,
            kernel_copied: copied,
            ..Default::default()
        }
    );
}

/// A send under the threshold, and every send on a ring without zero-copy (the fallback, on
/// any kernel), go out by copying: one completion, no notification, counted by reason.
#[test]
fn small_and_fallback_sends_copy_with_one_completion() {
    let mut io = ring();
    let (a, b) = tcp_pair();
    let small = pattern(ZERO_COPY_MIN_BYTES - 1, 3);
    let reader = read_on_thread(b, small.len());
    let op = SocketOp::SendZc {
        socket: Socket::Fd(a.as_raw_fd()),
        buf: small.as_ptr(),
        len: small.len() as u32,
    };
    // SAFETY: `small` and the socket outlive the op (reaped below).
    unsafe { TaskRing::push(&mut io, 0, op, 1) }.unwrap();
    let all = reap_until_done(&mut io, &[1]);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].result, small.len() as i32);
    assert!(!all[0].more() && !all[0].is_notification());
    assert_eq!(reader.join().unwrap(), small);

    io.disable_zero_copy_sends("turned off for a test");
    assert!(io.zero_copy_unavailable().is_some());
    // A Unix socket: zero-copy would be refused there, the fallback copies.
    let (c, d) = UnixStream::pair().unwrap();
    let big = pattern(PAYLOAD_BYTES, 4);
    let reader = read_on_thread(d, big.len());
    let op = SocketOp::SendZc {
        socket: Socket::Fd(c.as_raw_fd()),
        buf: big.as_ptr(),
        len: big.len() as u32,
    };
    // SAFETY: as above.
    unsafe { TaskRing::push(&mut io, 0, op, 2) }.unwrap();
    let mut sent = 0;
    for done in reap_until_done(&mut io, &[2]) {
        assert!(!done.more() && !done.is_notification(), "{done:?}");
        sent += done.result;
    }
    // A Unix socket may take less than asked: send the rest as a task would.
    if (sent as usize) < big.len() {
        (&c).write_all(&big[sent as usize..]).unwrap();
    }
    assert_eq!(reader.join().unwrap(), big);
    let counts = io.send_counters().snapshot();
    assert_eq!(
        counts,
        SendCounts {
            copied_small: 1,
            copied_unsupported: 1,
            ..Default::default()
        }
    );
}

/// Unix sockets refuse zero-copy (EOPNOTSUPP), and the kernel still notifies: why a task on a
/// Unix socket sends with the copying ops.
#[test]
fn zero_copy_on_a_unix_socket_is_refused_then_notified() {
    let mut io = ring();
    if !io.features().zero_copy_sends {
        return required::skip(
            "zero_copy_on_a_unix_socket_is_refused_then_notified",
            io.zero_copy_unavailable().unwrap_or("no reason given"),
        );
    }
    let (c, _d) = UnixStream::pair().unwrap();
    let big = pattern(PAYLOAD_BYTES, 5);
    let op = SocketOp::SendZc {
        socket: Socket::Fd(c.as_raw_fd()),
        buf: big.as_ptr(),
        len: big.len() as u32,
    };
    // SAFETY: `big` and the socket outlive the op (reaped below).
    unsafe { TaskRing::push(&mut io, 0, op, 1) }.unwrap();
    let all = reap_until_done(&mut io, &[1]);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0].errno().map(|e| e.0), Some(libc::EOPNOTSUPP));
    assert!(all[0].more() && all[1].is_notification());
}

/// What a [`ZcSender`] saw.
#[derive(Clone, Debug, Default)]
struct Seen {
    zero_copy_sends: Option<bool>,
    /// (tag, is_notification, more, result) of each completion.
    completions: Vec<(u32, bool, bool, i32)>,
    /// Payload references held when each completion arrived (the test holds one).
    holders: Vec<usize>,
}

impl Seen {
    /// Zero-copy sends whose result came and whose notification has not.
    fn awaiting_notification(&self) -> usize {
        let announced = self.completions.iter().filter(|c| !c.1 && c.2).count();
        let notified = self.completions.iter().filter(|c| c.1).count();
        announced - notified
    }
}

/// A task that sends its payload zero-copy (a short send's rest in a further send) and holds
/// it until every op's last completion.
struct ZcSender {
    socket: OwnedFd,
    payload: Option<Arc<Vec<u8>>>,
    /// Bytes the sends took so far; the next send starts here.
    sent: usize,
    /// Ops whose last completion is still to come.
    in_flight: usize,
    next_tag: u32,
    /// A send's result came short: send the rest.
    rest_due: bool,
    seen: Arc<Mutex<Seen>>,
}

impl ZcSender {
    fn new(socket: OwnedFd, payload: Arc<Vec<u8>>, seen: Arc<Mutex<Seen>>) -> Self {
        Self {
            socket,
            payload: Some(payload),
            sent: 0,
            in_flight: 0,
            next_tag: 0,
            rest_due: true,
            seen,
        }
    }
}

impl ReactorTask for ZcSender {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if !self.rest_due {
            return 0;
        }
        self.seen.lock().unwrap().zero_copy_sends = Some(ctx.zero_copy_sends());
        let payload = self
            .payload
            .as_ref()
            .expect("held until the last completion");
        let rest = &payload[self.sent..];
        let op = SocketOp::SendZc {
            socket: Socket::Fd(self.socket.as_raw_fd()),
            buf: rest.as_ptr(),
            len: rest.len() as u32,
        };
        // SAFETY: the payload and the socket are held until every op's last completion.
        unsafe { ctx.push(op, self.next_tag) }.expect("a free ring entry");
        self.next_tag += 1;
        self.in_flight += 1;
        self.rest_due = false;
        1
    }
    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        let mut seen = self.seen.lock().unwrap();
        seen.completions
            .push((c.tag, c.is_notification(), c.more(), c.result));
        seen.holders
            .push(self.payload.as_ref().map_or(0, Arc::strong_count));
        if !c.is_notification() {
            assert!(c.result > 0, "{c:?}");
            self.sent += c.result as usize;
            let len = self.payload.as_ref().map_or(0, |p| p.len());
            self.rest_due = self.sent < len;
        }
        if !c.more() {
            self.in_flight -= 1;
        }
        if self.in_flight == 0 && !self.rest_due {
            // Every op's memory is free again: let the payload go.
            self.payload = None;
        }
    }
    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {}
    fn has_ready(&self) -> bool {
        self.rest_due
    }
    fn finished(&self) -> bool {
        self.payload.is_none()
    }
}

/// On the simulator (whose sends may be short), a task's zero-copy sends stay in flight (the
/// task and its payload with them) from each result until its notification a tick or more
/// later; a rest under the threshold goes by copying, with one completion.
#[test]
fn a_task_holds_its_payload_until_the_simulated_notification() {
    let mut short_seeds = 0;
    for seed in 0..20 {
        let mut cluster = SimCluster::start(
            seed,
            SimOptions {
                reactors: 1,
                ..Default::default()
            },
            Vec::new(),
        )
        .unwrap();
        let (net, node) = cluster.net();
        let net = net.clone();
        let (socket, mut client) = net.connect(node, NodeId(1)).unwrap();
        let payload = Arc::new(pattern(2 * ZERO_COPY_MIN_BYTES, 6));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = ZcSender::new(socket, payload.clone(), seen.clone());
        assert!(cluster.spawn_task(ReactorId(0), Box::new(task)).is_ok());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut steps_awaiting = 0;
        for _ in 0..500 {
            cluster.step();
            while let Ok(n) = client.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if seen.lock().unwrap().awaiting_notification() > 0 {
                // Between a result and its notification: in flight, and the payload held.
                steps_awaiting += 1;
                assert!(!cluster.tasks_drained(), "seed {seed}");
                assert_eq!(cluster.tasks(), 1);
                assert_eq!(Arc::strong_count(&payload), 2);
            }
            if cluster.tasks_drained() && got.len() == payload.len() {
                break;
            }
        }
        let s = seen.lock().unwrap().clone();
        assert_eq!(s.zero_copy_sends, Some(true));
        for tag in 0..s.completions.iter().map(|c| c.0 + 1).max().unwrap_or(0) {
            let mine: Vec<_> = s.completions.iter().filter(|c| c.0 == tag).collect();
            match mine[..] {
                // Zero-copy: the result announces the notification, which comes after it.
                [(_, false, true, _), (_, true, false, _)] => {}
                // A rest under the threshold, copied.
                [(_, false, false, n)] => assert!((*n as usize) < ZERO_COPY_MIN_BYTES),
                _ => panic!("seed {seed}, op {tag}: {mine:?}"),
            }
        }
        short_seeds += usize::from(s.completions.iter().any(|c| c.0 > 0));
        // Every completion found the payload still held by the task.
        assert!(s.holders.iter().all(|&h| h == 2), "seed {seed}: {s:?}");
        assert!(
            steps_awaiting >= 1,
            "seed {seed}: notified in the result's own step"
        );
        assert!(cluster.tasks_drained(), "seed {seed}: {s:?}");
        assert_eq!(
            Arc::strong_count(&payload),
            1,
            "the finished task let it go"
        );
        assert!(
            got == *payload,
            "seed {seed}: the bytes arrive whole and in order"
        );
    }
    assert!(short_seeds > 0, "some seed makes a send short");
}

/// One task on a real reactor of an engine started with `zero_copy_sends` sends one payload
/// over loopback TCP; returns what the task saw and the reactor's send statistics (what
/// `/metrics` shows) once the kernel is done with the payload.
fn send_one_payload(zero_copy_sends: Option<bool>, salt: u8) -> (Seen, SendCounts) {
    let engine = Engine::start(&EngineConfig {
        devices: vec![DeviceConfig::ram("r", 64 << 20)],
        cores: vec![0],
        zero_copy_sends,
        ..Default::default()
    })
    .unwrap();
    let (a, b) = tcp_pair();
    let payload = Arc::new(pattern(PAYLOAD_BYTES, salt));
    let reader = read_on_thread(b, payload.len());
    let seen = Arc::new(Mutex::new(Seen::default()));
    engine.spawn_task(
        Some(ReactorId(0)),
        Box::new(ZcSender::new(a.into(), payload.clone(), seen.clone())),
    );
    assert!(reader.join().unwrap() == *payload);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Arc::strong_count(&payload) > 1 {
        assert!(Instant::now() < deadline, "never completed: {seen:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let s = seen.lock().unwrap().clone();
    let counts = engine.reactor_stats()[0].sends;
    engine.shutdown().unwrap();
    (s, counts)
}

/// A task on a real reactor sends zero-copy over loopback TCP; the reactor's statistics count
/// the send and the kernel's copy report.
#[test]
fn a_reactor_counts_its_tasks_zero_copy_sends() {
    let (s, counts) = send_one_payload(None, 7);
    if s.zero_copy_sends != Some(true) {
        assert_eq!(counts.copied_unsupported, 1);
        return required::skip(
            "a_reactor_counts_its_tasks_zero_copy_sends",
            "this kernel has no zero-copy sends (the fallback was counted)",
        );
    }
    let notified = s.completions.iter().filter(|c| c.1).count() as u64;
    assert!(notified >= 1, "{s:?}");
    assert_eq!(counts.zero_copy, notified, "{s:?}");
    // Loopback copies anyway.
    assert_eq!(counts.kernel_copied, notified, "{s:?}");
    assert_eq!(counts.copied_unsupported, 0);
}

/// `zero_copy_sends = Some(false)`: a reactor sends a task's zero-copy send by copying, even on
/// a kernel that has zero-copy sends, and counts it as such.
#[test]
fn zero_copy_sends_turned_off_by_the_configuration_copy() {
    let (s, counts) = send_one_payload(Some(false), 9);
    assert_eq!(s.zero_copy_sends, Some(false), "{s:?}");
    assert_eq!(counts.zero_copy, 0, "{s:?}");
    assert_eq!(counts.copied_unsupported, 1, "{s:?}");
}
