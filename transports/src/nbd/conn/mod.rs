//! The transmission phase of one NBD connection, as a task on a reactor.
//!
//! The socket is read and written through the reactor's io_uring. One multishot `recv` stays
//! armed over a ring of provided buffers, and requests are parsed straight from the buffer
//! each arrival lands in (a partial header waits in `rbuf`; a payload still arriving goes
//! straight into the buffer it will be written from). Re-arming a recv per request cost ~2.5 %
//! of the CPU per request (prep, async poll arming; docs/performance.md).
//! Without kernel support, or with `[nbd] multishot_receive = false`, one `recv` at a time
//! into `rbuf` (after a receive that emptied the socket, the next one arms its poll first).
//! One send at a time gathers every queued reply (headers and data buffers) into one iovec
//! list (`sendmsg`), or a plain `send` when that is one piece.
//!
//! A READ inside one chunk this reactor owns on a memory device is answered on the spot
//! (`TaskCtx::read_in_place`). Up to 8 KiB, when nothing is being sent, its reply waits with
//! the others of the same receive, as a header and a pointer into the device's memory; at the
//! end of the receive (or before a request that changes data starts) one
//! `sendmsg(MSG_DONTWAIT)` sends them all: no copy of ours, no ring send. Against the ring
//! send of copied replies this took 3–7 % off the CPU per IO at 20k IOPS and raised the lean
//! client's QD32 rate by a third or more (docs/performance.md). Otherwise, or for what the socket did not take, the data is copied right
//! behind the reply header so the queued reply is one piece: sent as a header and a separate
//! page-aligned buffer through the ring, the kernel's copy of a 4 KiB reply cost ~4x the CPU
//! (docs/performance.md).
//! Other requests go to the engine: parts for chunks this reactor owns run inline, others on
//! their owners, and completions come back through the connection's port.
//!
//! Measured and rejected earlier: sending every reply with its own direct
//! `sendmsg(MSG_DONTWAIT)` (the ring only when the socket is full) cut fio's QD1 rate by ~15%
//! in 6 of 7 paired runs on a 2-core VM, and a pipelined burst's replies each became a syscall
//! (the lean client at QD32 fell from ~535k to 315k IOPS): one send per receive is the unit.
//! Linking a reply's send to the next receive (no completion for the send, one enter per
//! request): CPU per IO did not move and the reactor woke once per request for the lean client.
//!
//! Copies per 4 KiB request on a RAM volume: READ — the kernel copies from the device's memory
//! into the socket (or, when the reply is queued, RAM is copied behind the reply header first);
//! WRITE — the kernel copies into a receive buffer, we copy the payload into an aligned buffer,
//! the engine copies it into RAM.
//!
//! Bounds: requests in flight, bytes in flight, reply bytes queued (beyond any of them no new
//! request starts, and the receive stops once its buffers are all held), receive buffers,
//! iovecs per send, replies gathered for one direct send.
//!
//! Layout: `recv` (the receive path and request parsing), `requests` (request bookkeeping:
//! tags in flight, the bounds, engine submission and completion), `validate` (the pure checks
//! of a request against its export), `reply` (building replies), `send` (the reply queue,
//! ring sends and the direct send), `buffers` (buffer cache and the server-wide budget).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringblock_engine::provided::ProvidedBuffers;
use ringblock_engine::task::{ReactorTask, RingCompletion, Socket, TaskCtx};
use ringblock_engine::{Engine, Port, VolumeHandle};

use super::wire;
use super::Negotiated;

mod buffers;
mod recv;
mod reply;
mod requests;
mod send;
mod validate;

use buffers::BufCache;
pub use buffers::BufferBudget;
use recv::{RecvState, RECV_BUF_BYTES, RX_BUFS, RX_BUF_BYTES};
use requests::Requests;
use send::SendState;

/// Requests one connection may have in the engine at once.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 256;
/// Payload bytes (reads and writes) one connection may have in flight.
pub const MAX_BYTES_IN_FLIGHT: u64 = 128 << 20;
/// Memory the replies of one connection waiting to be sent may hold (their data buffers whole,
/// holes included, not just the bytes that go on the wire): beyond it, no new requests start
/// until the client reads (a client that pipelines reads and never reads the replies must
/// not grow the daemon's memory without bound).
pub const MAX_QUEUED_REPLY_BYTES: usize = 64 << 20;
/// Default of [`BufferBudget`]'s limit: reply and request buffer memory of all connections.
pub const DEFAULT_BUFFER_BUDGET_BYTES: u64 = 256 << 20;
const TAG_RECV: u32 = 0;
const TAG_SEND: u32 = 1;

/// Counters of one connection, shared with whoever lists clients.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    /// Requests in flight, replies unsent or a request partly received: not idle. Written
    /// only when it changes.
    pub busy: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    /// DISC received, peer gone, or daemon stopping: no new requests, finish the rest.
    Draining,
    /// Framing lost or socket failed: abandon replies, wait for in-flight ops.
    Failed,
}

/// One connection in the transmission phase: a reactor task.
pub struct Connection {
    fd: OwnedFd,
    /// The socket's slot in the reactor ring's file table (set on the reactor, if it has one).
    socket_slot: Option<u32>,
    handle: VolumeHandle,
    neg: Negotiated,
    peer: String,
    port: Option<Arc<Port>>,
    state: State,
    /// The socket is shut down, or is to be at the end of this poll (`shutdown_wanted`).
    shut_down: bool,
    shutdown_wanted: bool,
    /// The receive path.
    recv: RecvState,
    /// Requests in flight.
    reqs: Requests,
    /// The send path.
    send: SendState,
    /// The server-wide budget, and what this connection last published to it.
    budget: Arc<BufferBudget>,
    published_bytes: u64,
    bufs: BufCache,
    /// Scratch for a read's allocation runs.
    runs: Vec<(u64, bool)>,
    stats: Arc<ConnStats>,
    /// Last value stored in `stats.busy`.
    busy: bool,
    _keep_alive: Option<Box<dyn Send>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.publish(0);
        self.budget.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

// SAFETY: the raw pointers in the send path's msghdr/iovecs point into buffers this struct
// owns; the task moves to its reactor before any of them is set, and is only touched there
// afterwards.
unsafe impl Send for Connection {}

/// Serve the transmission phase of a negotiated connection on a reactor (io_uring).
pub fn spawn(
    engine: &Engine,
    stream: OwnedFd,
    negotiated: Negotiated,
    peer: String,
    setup: Setup,
) -> Arc<ConnStats> {
    let mut conn = Connection::new(stream, negotiated, peer).with_multishot(setup.multishot);
    conn.set_budget(setup.budget);
    conn._keep_alive = setup.keep_alive;
    let stats = conn.stats.clone();
    match setup.task_slot {
        Some(slot) => engine.spawn_reserved(slot, Box::new(conn)),
        None => engine.spawn_task(None, Box::new(conn)),
    };
    stats
}

/// How [`spawn`] sets a connection up.
pub struct Setup {
    /// Receive with one multishot `recv` into provided buffers, where the kernel can (else,
    /// and when false, one `recv` at a time).
    pub multishot: bool,
    /// The server's buffer budget, shared by its connections.
    pub budget: Arc<BufferBudget>,
    /// The reactor task slot taken for this connection before its handshake (None: any free).
    pub task_slot: Option<ringblock_engine::TaskSlot>,
    /// Dropped when the connection ends (e.g. its place in the server's connection limits).
    pub keep_alive: Option<Box<dyn Send>>,
}

impl Connection {
    pub fn new(fd: OwnedFd, neg: Negotiated, peer: String) -> Self {
        let handle = neg.handle.clone();
        Self {
            fd,
            socket_slot: None,
            handle,
            neg,
            peer,
            port: None,
            state: State::Running,
            shut_down: false,
            shutdown_wanted: false,
            recv: RecvState::new(),
            reqs: Requests::default(),
            send: SendState::new(),
            budget: {
                let b = Arc::new(BufferBudget::default());
                b.connections.fetch_add(1, Ordering::Relaxed);
                b
            },
            published_bytes: 0,
            bufs: BufCache::default(),
            runs: Vec::new(),
            stats: Arc::new(ConnStats::default()),
            busy: false,
            _keep_alive: None,
        }
    }

    /// Receive with one multishot `recv` into provided buffers where the ring can (the
    /// default), or one `recv` at a time.
    pub fn with_multishot(mut self, multishot: bool) -> Self {
        self.recv.multishot = multishot;
        self
    }

    fn extended(&self) -> bool {
        self.neg.extended_headers
    }

    fn structured(&self) -> bool {
        self.neg.structured_replies || self.neg.extended_headers
    }

    /// Framing lost or the socket failed: abandon the replies and close; in-flight requests
    /// still complete before the task ends.
    fn fail(&mut self, why: &str) {
        if self.state != State::Failed {
            tracing::info!(peer = %self.peer, export = %self.neg.info.name, "closing connection: {why}");
        }
        self.state = State::Failed;
        self.drop_replies();
        self.shutdown_socket();
    }

    /// First poll on the reactor: the port for engine completions, the socket in the ring's
    /// file table, and the receive buffers.
    fn arrive(&mut self, ctx: &mut TaskCtx<'_>) {
        self.port = Some(Port::new(MAX_REQUESTS_IN_FLIGHT, ctx.port_waker()));
        self.socket_slot = ctx.register_fd(self.fd.as_raw_fd());
        if self.recv.multishot {
            let mut rx = ProvidedBuffers::new(RX_BUFS, RX_BUF_BYTES);
            // SAFETY: `rx` lives in `self.recv.rx` until the reactor drops this task.
            if unsafe { ctx.register_buffers(&mut rx) }.is_some() {
                self.recv.rx = Some(rx);
            } else {
                self.recv.multishot = false;
            }
        }
        if !self.recv.multishot {
            self.recv.rbuf = vec![0; RECV_BUF_BYTES];
        }
        tracing::debug!(peer = %self.peer, export = %self.neg.info.name, reactor = %ctx.reactor(), fixed_file = ?self.socket_slot, multishot = self.recv.multishot, "connection on reactor");
    }

    /// The connection's socket, as its ring ops name it: through the ring's file table when
    /// the socket is in it.
    fn socket(&self) -> Socket {
        match self.socket_slot {
            Some(slot) => Socket::Fixed(slot),
            None => Socket::Fd(self.fd.as_raw_fd()),
        }
    }

    /// Shut the socket down (at the end of this poll, where the ring is at hand): that makes
    /// an in-flight recv complete, so the task can finish.
    fn shutdown_socket(&mut self) {
        if !self.shut_down {
            self.shut_down = true;
            self.shutdown_wanted = true;
        }
    }
}

impl ReactorTask for Connection {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.port.is_none() {
            self.arrive(ctx);
        }
        debug_assert!(
            self.send.direct.is_empty(),
            "replies gathered only within a feed"
        );
        let mut work = 0;
        // Bounded: the port holds at most MAX_REQUESTS_IN_FLIGHT completions.
        while let Some(c) = self.port.as_ref().and_then(|p| p.pop()) {
            self.on_engine_completion(ctx, c);
            work += 1;
        }
        if self.state == State::Running {
            work += self.feed_waiting(ctx);
        }
        if self.post_recv(ctx) {
            work += 1;
        }
        if self.post_send(ctx) {
            work += 1;
        }
        if self.state == State::Draining
            && self.reqs.in_flight == 0
            && self.send.out.is_empty()
            && !self.send.in_flight
        {
            self.shutdown_socket();
        }
        if std::mem::take(&mut self.shutdown_wanted) {
            ctx.shutdown(self.fd.as_raw_fd());
        }
        if self.bufs.bytes > 0 && self.budget.used_bytes() > self.budget.limit_bytes {
            // Spare buffers are the first memory to give back when the server is over budget.
            self.bufs = BufCache::default();
        }
        self.publish(self.held_bytes());
        let busy = self.reqs.in_flight > 0
            || !self.send.out.is_empty()
            || self.send.in_flight
            || self.recv.fill.is_some()
            || self.recv.rstart < self.recv.rend
            || !self.recv.held.is_empty();
        if busy != self.busy {
            self.busy = busy;
            self.stats.busy.store(busy, Ordering::Relaxed);
        }
        work
    }

    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        match c.tag {
            TAG_RECV if self.recv.multishot => self.on_multishot_recv(ctx, c),
            TAG_RECV => self.on_recv(ctx, c),
            TAG_SEND => self.on_send(c),
            tag => unreachable!("unknown ring tag {tag}"),
        }
    }

    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {
        if self.state == State::Running {
            self.state = State::Draining;
        }
    }

    fn has_ready(&self) -> bool {
        self.port.as_ref().is_some_and(|p| !p.is_empty())
    }

    fn finished(&self) -> bool {
        let quiet = self.reqs.in_flight == 0 && !self.recv.in_flight && !self.send.in_flight;
        match self.state {
            State::Running => false,
            State::Draining => quiet && self.send.out.is_empty() && self.shut_down,
            State::Failed => quiet,
        }
    }
}
