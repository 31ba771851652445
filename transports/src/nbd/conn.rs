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

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringblock_engine::io_uring::{opcode, types};
use ringblock_engine::provided::ProvidedBuffers;
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    AlignedBuf, Engine, Errno, IoBuf, Port, Request, RequestKind, VolumeHandle,
};

use super::wire::{self, Command, Extent, ReplyTarget, SimpleReply, WireError};
use super::Negotiated;

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
/// Receive buffer of a connection that receives one `recv` at a time.
const RECV_BUF_BYTES: usize = 256 << 10;
/// Provided buffers of a connection's multishot receive: as much memory as `RECV_BUF_BYTES`,
/// in pieces, so a few pipelined requests fill one and a burst fills several.
const RX_BUFS: u16 = 16;
const RX_BUF_BYTES: usize = 16 << 10;
const MAX_IOV_PER_SEND: usize = 256;
/// Replies one direct `sendmsg` carries (two iovecs each); more in one receive means another.
const MAX_DIRECT_REPLIES: usize = 64;
const TAG_RECV: u32 = 0;
const TAG_SEND: u32 = 1;
/// `sqe->ioprio` flag of socket sends and receives: arm the poll before the first attempt
/// (`IORING_RECVSEND_POLL_FIRST` in linux/io_uring.h).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// Bytes of large buffers one connection keeps for reuse.
const BUF_CACHE_BYTES: usize = 64 << 20;
/// Requests up to this size use the reactor's registered pool; larger ones the cache.
const SMALL_BUF_BYTES: usize = 64 << 10;

/// Large IO buffers kept for reuse: allocating (and faulting in) a fresh megabyte per request
/// costs more than the copy itself.
#[derive(Default)]
struct BufCache {
    free: Vec<AlignedBuf>,
    bytes: usize,
}

impl BufCache {
    /// A buffer of `len` bytes; its contents are whatever was there (callers overwrite all).
    fn take(&mut self, len: usize) -> AlignedBuf {
        let class = len.next_power_of_two().max(SMALL_BUF_BYTES);
        match self.free.iter().position(|b| b.capacity() == class) {
            Some(i) => {
                let mut b = self.free.swap_remove(i);
                self.bytes -= b.capacity();
                b.set_len(len);
                b
            }
            None => {
                let mut b = AlignedBuf::zeroed(class);
                b.set_len(len);
                b
            }
        }
    }

    fn give(&mut self, buf: AlignedBuf) {
        if buf.capacity() >= SMALL_BUF_BYTES && self.bytes + buf.capacity() <= BUF_CACHE_BYTES {
            self.bytes += buf.capacity();
            self.free.push(buf);
        }
    }
}

/// Reads up to this size that a reactor serves from memory are copied right behind their
/// reply header: the reply goes out as one contiguous piece.
const INLINE_READ_MAX_BYTES: usize = 8 << 10;
/// Reply messages kept for reuse (their header and segment vectors), per connection: at most
/// SPARE_MSGS x SPARE_MSG_BYTES, about 520 KiB.
const SPARE_MSGS: usize = 64;
const SPARE_MSG_BYTES: usize = INLINE_READ_MAX_BYTES + 64;

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

/// Reply and request buffer memory of all connections of a server, against one limit.
///
/// Each connection publishes what it holds (requests' buffers in flight, queued replies, its
/// buffer cache, a payload being received) once per reactor pass, not per request. While the
/// total is over the limit, a connection holding more than its fair share (limit / connections)
/// starts no new request until its own replies drain: backpressure, never an error. A
/// connection under its share always proceeds, so a client that never reads its replies cannot
/// starve the others; one held back always has replies or requests of its own in flight, whose
/// completions wake it.
#[derive(Debug)]
pub struct BufferBudget {
    limit_bytes: u64,
    used_bytes: AtomicU64,
    connections: AtomicU64,
}

impl BufferBudget {
    pub fn new(limit_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            limit_bytes: limit_bytes.max(1),
            used_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        })
    }

    /// Bytes the connections hold now (as last published).
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Whether `bytes` is more than one connection's fair share (limit / connections).
    fn above_fair_share(&self, bytes: u64) -> bool {
        let connections = self.connections.load(Ordering::Relaxed).max(1);
        bytes.saturating_mul(connections) > self.limit_bytes
    }
}

impl Default for BufferBudget {
    fn default() -> Self {
        Self {
            limit_bytes: DEFAULT_BUFFER_BUDGET_BYTES,
            used_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }
}

/// A reply waiting to be sent: header bytes and an optional data buffer, sent as `segs`.
struct OutMsg {
    bytes: Vec<u8>,
    data: Option<IoBuf>,
    /// (is_data, start, len) in send order.
    segs: Vec<(bool, usize, usize)>,
}

impl OutMsg {
    /// Memory the reply holds until it is sent: its header bytes and its whole data buffer
    /// (a read with holes sends less than its buffer holds).
    fn held_bytes(&self) -> usize {
        self.bytes.len() + self.data.as_ref().map_or(0, IoBuf::len)
    }

    fn bytes_only(bytes: Vec<u8>) -> Self {
        let n = bytes.len();
        Self {
            bytes,
            data: None,
            segs: vec![(false, 0, n)],
        }
    }

    fn seg_ptr(&self, seg: (bool, usize, usize)) -> *const u8 {
        let (is_data, start, _) = seg;
        if is_data {
            // SAFETY: start is within the data buffer (built that way below).
            unsafe {
                self.data
                    .as_ref()
                    .expect("data segment has a buffer")
                    .as_ptr()
                    .add(start)
            }
        } else {
            self.bytes[start..].as_ptr()
        }
    }
}

/// A small read's reply answered in place during one `feed`: its header, and its data where
/// the device keeps it. Sent with the others at the end of the feed (see `flush_direct`).
struct DirectReply {
    msg: OutMsg,
    data: *const u8,
    len: usize,
}

struct Pending {
    cookie: u64,
    offset: u64,
    len: u64,
    cmd: Command,
    flags: u16,
    /// A FUA trim or zero: after it completes, flush.
    then_flush: bool,
    payload_bytes: u64,
    /// TRIM / WRITE_ZEROES longer than the engine takes at once (the kernel's client sends
    /// the whole device in one TRIM) go in parts of at most [`MAX_RANGE_PART_BYTES`]: bytes
    /// of `len` already done.
    done_bytes: u64,
}

/// A request header is in, its payload is still arriving: the payload goes straight into the
/// buffer it will be written from, however it is split across receives.
struct Fill {
    req: wire::Request,
    /// None: the payload is read and dropped (the request is refused, or is not a WRITE).
    buf: Option<IoBuf>,
    /// Payload bytes received so far, and in all.
    have: usize,
    total: usize,
}

/// Where a request's payload is.
enum Payload<'a> {
    /// In received bytes: copied into an IO buffer if the request writes it.
    Bytes(&'a [u8]),
    /// Already in its IO buffer (see [`Fill`]).
    Filled(IoBuf),
}

/// Largest part of a TRIM / WRITE_ZEROES handed to the engine at once.
const MAX_RANGE_PART_BYTES: u64 = ringblock_engine::MAX_REQUEST_BYTES;

impl Pending {
    /// The range of the next engine request for this NBD request.
    fn part(&self, kind: RequestKind) -> (u64, u64) {
        match kind {
            RequestKind::Flush => (self.offset, 0),
            RequestKind::Trim | RequestKind::WriteZeroes => (
                self.offset + self.done_bytes,
                (self.len - self.done_bytes).min(MAX_RANGE_PART_BYTES),
            ),
            RequestKind::Read | RequestKind::Write => (self.offset, self.len),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    /// DISC received, peer gone, or daemon stopping: no new requests, finish the rest.
    Draining,
    /// Framing lost or socket failed: abandon replies, wait for in-flight ops.
    Failed,
}

/// An op on the connection's socket: through the ring's file table when the socket is in it.
macro_rules! on_socket {
    ($conn:expr, $build:expr) => {
        match $conn.socket_slot {
            Some(slot) => $build(types::Fixed(slot)),
            None => $build(types::Fd($conn.fd.as_raw_fd())),
        }
    };
}

pub struct Connection {
    fd: OwnedFd,
    /// The socket's slot in the reactor ring's file table (set on the reactor, if it has one).
    socket_slot: Option<u32>,
    handle: VolumeHandle,
    neg: Negotiated,
    peer: String,
    port: Option<Arc<Port>>,
    state: State,
    shut_down: bool,
    /// Received bytes not taken yet: `rbuf[rstart..rend]`. With one recv at a time, the recv
    /// target; with the multishot receive, only what a provided buffer left over (a partial
    /// header, or what arrived while the bounds held requests back).
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// The multishot receive's buffers, once registered on the reactor; None: one recv at a
    /// time into `rbuf` (no kernel support, or turned off).
    rx: Option<ProvidedBuffers>,
    /// Whether to try the multishot receive.
    multishot: bool,
    /// Provided buffers received while requests were held back, in arrival order:
    /// (buffer id, bytes). Bounded by `RX_BUFS`: the receive stops when all are out.
    held: VecDeque<(u16, usize)>,
    /// A request whose payload is still arriving, straight into its own buffer.
    fill: Option<Fill>,
    /// Replies of small reads answered in place in the current `feed`, to go out together at
    /// its end with one `sendmsg` straight from the device's memory. Empty outside `feed`.
    direct: Vec<DirectReply>,
    /// Scratch iovecs of that `sendmsg`.
    direct_iov: Vec<libc::iovec>,
    recv_in_flight: bool,
    /// Bytes the receive in flight may return; fewer means it emptied the socket.
    recv_asked: usize,
    recv_drained: bool,
    pending: Vec<Option<Pending>>,
    free_tags: Vec<u32>,
    in_flight: usize,
    bytes_in_flight: u64,
    out: VecDeque<OutMsg>,
    /// Memory the replies in `out` hold ([`OutMsg::held_bytes`]), sent or not (a message
    /// leaves when all of it is sent).
    queued_bytes: usize,
    /// The server-wide budget, and what this connection last published to it.
    budget: Arc<BufferBudget>,
    published_bytes: u64,
    /// Position in `out.front()`: (segment index, offset within it).
    out_cursor: (usize, usize),
    send_in_flight: bool,
    msghdr: Box<libc::msghdr>,
    iov: Vec<libc::iovec>,
    bufs: BufCache,
    /// Sent messages, emptied, for the next replies: no allocation per read reply.
    spare_msgs: Vec<OutMsg>,
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

// SAFETY: the raw pointers in msghdr/iov point into buffers this struct owns; the task moves
// to its reactor before any of them is set, and is only touched there afterwards.
unsafe impl Send for Connection {}

/// Serve the transmission phase of a negotiated connection on a reactor (io_uring).
pub fn spawn(
    engine: &Engine,
    stream: OwnedFd,
    negotiated: Negotiated,
    peer: String,
    setup: Setup,
) -> Arc<ConnStats> {
    let mut conn = Connection::new(stream, negotiated, peer);
    conn.multishot = setup.multishot;
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

/// `sendmsg(MSG_DONTWAIT)` of `iov`: the bytes the socket took (0 when it took none or
/// failed; the ring send of what is left reports any error).
fn send_now(fd: std::os::fd::RawFd, iov: &[libc::iovec]) -> usize {
    // SAFETY: msghdr is plain old data; all-zero is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: the iovecs point at memory the caller keeps valid and unchanged for this
    // synchronous call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(n).unwrap_or(0)
}

fn nbd_errno(e: Errno) -> u32 {
    match e.0 {
        libc::EPERM => wire::EPERM,
        libc::EIO => wire::EIO,
        libc::ENOMEM => wire::ENOMEM,
        libc::EINVAL => wire::EINVAL,
        libc::ENOSPC => wire::ENOSPC,
        libc::EOVERFLOW => wire::EOVERFLOW,
        libc::EOPNOTSUPP => wire::ENOTSUP,
        libc::ESHUTDOWN => wire::ESHUTDOWN,
        _ => wire::EIO,
    }
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
            rbuf: Vec::new(),
            rstart: 0,
            rend: 0,
            rx: None,
            multishot: true,
            held: VecDeque::new(),
            fill: None,
            direct: Vec::with_capacity(MAX_DIRECT_REPLIES),
            direct_iov: Vec::with_capacity(2 * MAX_DIRECT_REPLIES),
            recv_in_flight: false,
            recv_asked: 0,
            recv_drained: false,
            pending: Vec::new(),
            free_tags: Vec::new(),
            in_flight: 0,
            bytes_in_flight: 0,
            out: VecDeque::new(),
            queued_bytes: 0,
            budget: {
                let b = Arc::new(BufferBudget::default());
                b.connections.fetch_add(1, Ordering::Relaxed);
                b
            },
            published_bytes: 0,
            out_cursor: (0, 0),
            send_in_flight: false,
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            msghdr: Box::new(unsafe { std::mem::zeroed() }),
            iov: Vec::with_capacity(MAX_IOV_PER_SEND),
            bufs: BufCache::default(),
            spare_msgs: Vec::new(),
            runs: Vec::new(),
            stats: Arc::new(ConnStats::default()),
            busy: false,
            _keep_alive: None,
        }
    }

    fn extended(&self) -> bool {
        self.neg.extended_headers
    }

    /// Count this connection's buffers against `budget` (shared by a server's connections).
    pub fn set_budget(&mut self, budget: Arc<BufferBudget>) {
        self.publish(0);
        self.budget.connections.fetch_sub(1, Ordering::Relaxed);
        budget.connections.fetch_add(1, Ordering::Relaxed);
        self.budget = budget;
    }

    /// Buffer memory that drains by itself (requests in flight, replies queued): what the
    /// budget's fair share is measured against.
    fn draining_bytes(&self) -> u64 {
        self.bytes_in_flight + self.queued_bytes as u64
    }

    /// Everything this connection holds in buffers, for the budget.
    fn held_bytes(&self) -> u64 {
        let fill = self
            .fill
            .as_ref()
            .and_then(|f| f.buf.as_ref())
            .map_or(0, IoBuf::len);
        self.draining_bytes() + self.bufs.bytes as u64 + fill as u64
    }

    /// Tell the budget what this connection holds now (an atomic add only when it changed).
    fn publish(&mut self, now_bytes: u64) {
        let before = self.published_bytes;
        if now_bytes > before {
            self.budget
                .used_bytes
                .fetch_add(now_bytes - before, Ordering::Relaxed);
        } else if now_bytes < before {
            self.budget
                .used_bytes
                .fetch_sub(before - now_bytes, Ordering::Relaxed);
        }
        self.published_bytes = now_bytes;
    }

    /// The server's buffers are over budget and this connection holds more than its share.
    fn over_budget(&self) -> bool {
        if !self.budget.above_fair_share(self.draining_bytes()) {
            return false;
        }
        // What the others published, plus what this connection holds right now.
        let others = self
            .budget
            .used_bytes()
            .saturating_sub(self.published_bytes);
        others + self.held_bytes() > self.budget.limit_bytes
    }

    fn structured(&self) -> bool {
        self.neg.structured_replies || self.neg.extended_headers
    }

    fn fail(&mut self, why: &str) {
        if self.state != State::Failed {
            tracing::info!(peer = %self.peer, export = %self.neg.info.name, "closing connection: {why}");
        }
        self.state = State::Failed;
        self.drop_replies();
        self.shutdown_socket();
    }

    /// Abandon queued replies, unless a send still points into them (then after it completes).
    fn drop_replies(&mut self) {
        if !self.send_in_flight {
            self.out.clear();
            self.queued_bytes = 0;
            self.out_cursor = (0, 0);
        }
    }

    fn shutdown_socket(&mut self) {
        if !self.shut_down {
            // Makes an in-flight recv complete, so the task can finish.
            // SAFETY: shutdown on our own socket.
            unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
            self.shut_down = true;
        }
    }

    // ---- replies -------------------------------------------------------------------------

    fn reply_ok(&mut self, p: &Pending) {
        let mut b = Vec::with_capacity(32);
        if self.extended() {
            self.target(p).encode_none(&mut b);
        } else {
            SimpleReply {
                error: 0,
                cookie: p.cookie,
            }
            .encode(&mut b);
        }
        self.queue(OutMsg::bytes_only(b));
    }

    fn target(&self, p: &Pending) -> ReplyTarget {
        ReplyTarget {
            cookie: p.cookie,
            offset: p.offset,
            extended: self.extended(),
        }
    }

    fn reply_err(&mut self, cookie: u64, offset: u64, cmd_is_read: bool, errno: u32) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut b = Vec::with_capacity(48);
        if self.extended() || (self.structured() && cmd_is_read) {
            let t = ReplyTarget {
                cookie,
                offset,
                extended: self.extended(),
            };
            t.encode_error(&mut b, wire::REPLY_FLAG_DONE, errno, "");
        } else {
            SimpleReply {
                error: errno,
                cookie,
            }
            .encode(&mut b);
        }
        self.queue(OutMsg::bytes_only(b));
    }

    /// Whether a READ can be answered with a single hole chunk: structured replies, no DF
    /// (which asks for data), and nothing allocated in the range.
    fn read_is_hole(&mut self, req: &wire::Request) -> bool {
        if !self.structured()
            || req.flags & wire::CMD_FLAG_DF != 0
            || req.length > u64::from(u32::MAX)
        {
            return false;
        }
        self.handle
            .volume()
            .allocation_runs_into(req.offset, req.length, 1, &mut self.runs);
        self.runs == [(req.length, false)]
    }

    /// Done with an IO buffer: a large owned one goes back to the cache (a pool lease returns
    /// to its pool when dropped).
    fn recycle(&mut self, buf: IoBuf) {
        if let Some(buf) = buf.into_owned() {
            self.bufs.give(buf);
        }
    }

    /// Keep an emptied message for the next reply, within the bounds.
    fn spare_msg(&mut self, mut msg: OutMsg) {
        // Only small ones: a block-status reply's header may be kilobytes.
        if self.spare_msgs.len() < SPARE_MSGS && msg.bytes.capacity() <= SPARE_MSG_BYTES {
            msg.bytes.clear();
            msg.segs.clear();
            msg.data = None;
            self.spare_msgs.push(msg);
        }
    }

    /// An empty message for a reply, reused when one is spare.
    fn new_msg(&mut self, data: Option<IoBuf>) -> OutMsg {
        match self.spare_msgs.pop() {
            Some(mut m) => {
                m.data = data;
                m
            }
            None => OutMsg {
                bytes: Vec::with_capacity(64),
                data,
                segs: Vec::with_capacity(4),
            },
        }
    }

    fn reply_read(&mut self, p: &Pending, data: IoBuf) {
        let len = data.len();
        let mut msg = self.new_msg(Some(data));
        if !self.structured() {
            SimpleReply {
                error: 0,
                cookie: p.cookie,
            }
            .encode(&mut msg.bytes);
            msg.segs.push((false, 0, msg.bytes.len()));
            msg.segs.push((true, 0, len));
            self.queue(msg);
            return;
        }
        let t = self.target(p);
        let mut runs = std::mem::take(&mut self.runs);
        if p.flags & wire::CMD_FLAG_DF != 0 {
            runs.clear();
            runs.push((len as u64, true));
        } else {
            let max_runs = (len as u64 / self.handle.volume().chunk_size_bytes()) as usize + 2;
            self.handle
                .volume()
                .allocation_runs_into(p.offset, p.len, max_runs, &mut runs);
            let covered: u64 = runs.iter().map(|x| x.0).sum();
            if covered < p.len {
                runs.push((p.len - covered, true));
            }
        }
        let mut pos = 0u64;
        let last = runs.len() - 1;
        for (i, &(run_len, allocated)) in runs.iter().enumerate() {
            let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
            let start = msg.bytes.len();
            if allocated {
                t.encode_offset_data_header(&mut msg.bytes, flags, p.offset + pos, run_len as u32);
                msg.segs.push((false, start, msg.bytes.len() - start));
                msg.segs.push((true, pos as usize, run_len as usize));
            } else {
                t.encode_offset_hole(&mut msg.bytes, flags, p.offset + pos, run_len as u32);
                msg.segs.push((false, start, msg.bytes.len() - start));
            }
            pos += run_len;
        }
        self.runs = runs;
        self.queue(msg);
    }

    /// Answer a READ from memory this reactor owns, with no engine request: a small one is
    /// copied straight behind its reply header (one contiguous send), a larger one into an IO
    /// buffer. None when answered; otherwise the buffer to submit the read with.
    fn read_in_place(&mut self, ctx: &mut TaskCtx<'_>, p: &Pending) -> Option<IoBuf> {
        let len = p.len as usize;
        if len <= INLINE_READ_MAX_BYTES {
            let mut msg = self.new_msg(None);
            if self.structured() {
                let t = self.target(p);
                t.encode_offset_data_header(
                    &mut msg.bytes,
                    wire::REPLY_FLAG_DONE,
                    p.offset,
                    len as u32,
                );
            } else {
                SimpleReply {
                    error: 0,
                    cookie: p.cookie,
                }
                .encode(&mut msg.bytes);
            }
            // Nothing being sent: keep a pointer to the data where the device holds it, and
            // send this reply with the others of this receive in one sendmsg at the end of the
            // feed (`flush_direct`): no copy of ours and no ring send to complete.
            let gather = self.may_send_direct() && self.direct.len() < MAX_DIRECT_REPLIES;
            let header_len = msg.bytes.len();
            let mut kept: Option<*const u8> = None;
            let bytes = &mut msg.bytes;
            let done = ctx.read_in_place(&self.handle, p.offset, p.len, &mut |src| {
                if gather && bytes.len() == header_len && src.len() == len {
                    kept = Some(src.as_ptr());
                } else {
                    bytes.extend_from_slice(src)
                }
            });
            match done {
                Some(Err(e)) => {
                    self.spare_msg(msg);
                    self.reply_err(p.cookie, p.offset, true, nbd_errno(e));
                    return None;
                }
                Some(Ok(())) => {
                    self.stats.bytes_read.fetch_add(p.len, Ordering::Relaxed);
                    match kept {
                        Some(data) => {
                            self.direct.push(DirectReply { msg, data, len });
                            if self.direct.len() == MAX_DIRECT_REPLIES {
                                self.flush_direct();
                            }
                        }
                        None => {
                            msg.segs.push((false, 0, msg.bytes.len()));
                            self.queue(msg);
                        }
                    }
                    return None;
                }
                None => {}
            }
            self.spare_msg(msg);
            return done.is_none().then(|| self.io_buffer(ctx, len));
        }
        let mut buf = self.io_buffer(ctx, len);
        let mut at = 0;
        let dst = buf.as_mut_slice();
        let done = ctx.read_in_place(&self.handle, p.offset, p.len, &mut |src| {
            dst[at..at + src.len()].copy_from_slice(src);
            at += src.len();
        });
        match done {
            None => return Some(buf),
            Some(Ok(())) => {
                self.stats.bytes_read.fetch_add(p.len, Ordering::Relaxed);
                self.reply_read(p, buf);
            }
            Some(Err(e)) => {
                self.recycle(buf);
                self.reply_err(p.cookie, p.offset, true, nbd_errno(e));
            }
        }
        None
    }

    /// Whether a reply may go straight to the socket now, ahead of the queued ones: no send in
    /// flight and none of the queue sent yet (the stream is at a reply boundary).
    fn may_send_direct(&self) -> bool {
        self.state == State::Running
            && !self.shut_down
            && !self.send_in_flight
            && self.out_cursor == (0, 0)
    }

    /// Send the replies gathered by `read_in_place`: one `sendmsg(MSG_DONTWAIT)` of each header
    /// and the device's memory behind it. What the socket does not take is copied into queued
    /// replies at the front of the queue, in order, for the ring to send; nothing queued had
    /// started (`may_send_direct`), so the stream stays whole.
    ///
    /// Called at the end of every `feed` and before a request that changes data starts: the
    /// pointers are valid until then (`TaskCtx::read_in_place`).
    fn flush_direct(&mut self) {
        if self.direct.is_empty() {
            return;
        }
        let mut direct = std::mem::take(&mut self.direct);
        if self.state != State::Failed {
            self.send_direct(&mut direct);
        }
        for d in direct.drain(..) {
            self.spare_msg(d.msg);
        }
        self.direct = direct;
    }

    /// `flush_direct`'s send. What the socket did not take moves from `direct` to the front of
    /// the queue; what it took stays in `direct`, for the caller to spare.
    fn send_direct(&mut self, direct: &mut Vec<DirectReply>) {
        self.direct_iov.clear();
        for d in direct.iter() {
            self.direct_iov.push(libc::iovec {
                iov_base: d.msg.bytes.as_ptr() as *mut libc::c_void,
                iov_len: d.msg.bytes.len(),
            });
            self.direct_iov.push(libc::iovec {
                iov_base: d.data as *mut libc::c_void,
                iov_len: d.len,
            });
        }
        // The iovecs point at the headers in `direct` and at device memory that stays valid
        // until `flush_direct` returns (see below).
        let mut sent = send_now(self.fd.as_raw_fd(), &self.direct_iov);
        // The first reply not all sent, and how much of it was.
        let (mut first_unsent, mut first_sent) = (direct.len(), 0);
        for (i, d) in direct.iter().enumerate() {
            let n = d.msg.bytes.len() + d.len;
            if sent < n {
                (first_unsent, first_sent) = (i, sent);
                break;
            }
            sent -= n;
        }
        for d in direct.drain(first_unsent..).rev() {
            let DirectReply { mut msg, data, len } = d;
            // SAFETY: `data` came from `read_in_place` in this feed, and nothing that can
            // change or free it has run since (`flush_direct` runs at the end of the feed or
            // before such a request starts; see `TaskCtx::read_in_place`): `len` bytes, valid.
            msg.bytes
                .extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
            msg.segs.push((false, 0, msg.bytes.len()));
            self.queued_bytes += msg.held_bytes();
            self.out.push_front(msg);
        }
        if first_sent > 0 {
            self.out_cursor = (0, first_sent);
        }
    }

    /// A buffer for `len` bytes of read or write data: from the reactor's pool, else the cache.
    fn io_buffer(&mut self, ctx: &mut TaskCtx<'_>, len: usize) -> IoBuf {
        ctx.take_buffer(len)
            .unwrap_or_else(|| IoBuf::owned(self.bufs.take(len)))
    }

    fn reply_block_status(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u64,
        flags: u16,
        context_id: u32,
    ) {
        let volume = self.handle.volume().clone();
        let max = if flags & wire::CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            1024
        };
        let runs = volume.allocation_runs(offset, len, max);
        let extents: Vec<Extent> = runs
            .iter()
            .map(|&(length, allocated)| Extent {
                length,
                status: if allocated {
                    0
                } else {
                    u64::from(wire::STATE_HOLE | wire::STATE_ZERO)
                },
            })
            .collect();
        let mut b = Vec::with_capacity(32 + extents.len() * 16);
        let t = ReplyTarget {
            cookie,
            offset,
            extended: self.extended(),
        };
        t.encode_block_status(&mut b, wire::REPLY_FLAG_DONE, context_id, &extents);
        self.queue(OutMsg::bytes_only(b));
    }

    // ---- requests ------------------------------------------------------------------------

    fn alloc_tag(&mut self, p: Pending) -> u32 {
        match self.free_tags.pop() {
            Some(t) => {
                self.pending[t as usize] = Some(p);
                t
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u32
            }
        }
    }

    fn submit(&mut self, ctx: &mut TaskCtx<'_>, p: Pending, kind: RequestKind, buf: Option<IoBuf>) {
        let (cookie, offset, is_read) = (p.cookie, p.offset, p.cmd == Command::Read);
        let (part_offset, len_bytes) = p.part(kind);
        let fua = p.flags & wire::CMD_FLAG_FUA != 0 && kind == RequestKind::Write;
        let payload = p.payload_bytes;
        let tag = self.alloc_tag(p);
        let req = Request {
            kind,
            offset_bytes: part_offset,
            len_bytes,
            fua,
            buf,
            mover: None,
            tag: u64::from(tag),
        };
        let port = self.port.clone().expect("port created on first poll");
        match ctx.submit(&self.handle, req, &port) {
            Ok(()) => {
                self.in_flight += 1;
                self.bytes_in_flight += payload;
            }
            Err((_, e)) => {
                self.pending[tag as usize] = None;
                self.free_tags.push(tag);
                self.reply_err(cookie, offset, is_read, nbd_errno(e));
            }
        }
    }

    /// Check a request against the export; None if it may go ahead, else the NBD errno.
    fn check(&self, req: &wire::Request, cmd: Command) -> Option<u32> {
        let info = &self.neg.info;
        let size = self.handle.volume().size_bytes();
        let known = wire::CMD_FLAG_FUA
            | wire::CMD_FLAG_NO_HOLE
            | wire::CMD_FLAG_DF
            | wire::CMD_FLAG_REQ_ONE
            | wire::CMD_FLAG_FAST_ZERO
            | wire::CMD_FLAG_PAYLOAD_LEN;
        if req.flags & !known != 0 {
            return Some(wire::EINVAL);
        }
        let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
        if writes && info.read_only {
            return Some(wire::EPERM);
        }
        let ranged = matches!(
            cmd,
            Command::Read
                | Command::Write
                | Command::Trim
                | Command::WriteZeroes
                | Command::Cache
                | Command::BlockStatus
        );
        if !ranged {
            return None;
        }
        if req.length == 0 {
            return Some(wire::EINVAL);
        }
        let end = req.offset.checked_add(req.length);
        if end.is_none_or(|e| e > size) {
            return Some(if writes { wire::ENOSPC } else { wire::EINVAL });
        }
        let min = u64::from(info.min_block_bytes.max(1));
        let needs_alignment = matches!(
            cmd,
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes | Command::Cache
        );
        if needs_alignment && (!req.offset.is_multiple_of(min) || !req.length.is_multiple_of(min)) {
            return Some(wire::EINVAL);
        }
        if matches!(cmd, Command::Read | Command::Write)
            && req.length > u64::from(info.max_block_bytes)
        {
            return Some(
                if cmd == Command::Read && req.flags & wire::CMD_FLAG_DF != 0 {
                    wire::EOVERFLOW
                } else {
                    wire::EINVAL
                },
            );
        }
        None
    }

    /// Whether requests are held back: no new ones start (bounds reached, or not running).
    fn held_back(&self) -> bool {
        self.state != State::Running
            || self.in_flight >= MAX_REQUESTS_IN_FLIGHT
            || self.bytes_in_flight >= MAX_BYTES_IN_FLIGHT
            || self.queued_bytes >= MAX_QUEUED_REPLY_BYTES
            || self.over_budget()
    }

    /// Queue a reply to be sent.
    fn queue(&mut self, msg: OutMsg) {
        self.queued_bytes += msg.held_bytes();
        self.out.push_back(msg);
    }

    /// Take requests from `src`, received bytes in order: finish a payload being filled,
    /// then start every request whose header is in, within the bounds. A payload that is not
    /// all there yet becomes the [`Fill`]. Returns the bytes used; the rest (a partial header,
    /// or all that follows once requests are held back) is for later.
    fn feed(&mut self, ctx: &mut TaskCtx<'_>, src: &[u8]) -> usize {
        let used = self.feed_requests(ctx, src);
        self.flush_direct();
        used
    }

    /// `feed` without the send of the replies gathered on the way.
    fn feed_requests(&mut self, ctx: &mut TaskCtx<'_>, src: &[u8]) -> usize {
        let extended = self.extended();
        let max_payload = u64::from(self.neg.info.max_block_bytes);
        let mut at = 0;
        loop {
            if let Some(fill) = &mut self.fill {
                let n = (fill.total - fill.have).min(src.len() - at);
                if let Some(buf) = &mut fill.buf {
                    buf.as_mut_slice()[fill.have..fill.have + n].copy_from_slice(&src[at..at + n]);
                }
                fill.have += n;
                at += n;
                if fill.have < fill.total {
                    return at;
                }
                let fill = self.fill.take().expect("checked above");
                self.finish_fill(ctx, fill);
            }
            // Bounded by the bytes in `src` and by the in-flight limits.
            if self.held_back() {
                return at;
            }
            let avail = &src[at..];
            let (req, header) = match wire::Request::decode(avail, extended) {
                Ok(x) => x,
                Err(WireError::Incomplete { .. }) => return at,
                Err(e) => {
                    self.fail(&format!("framing lost: {e}"));
                    return at;
                }
            };
            let payload = match req.payload_len(extended, max_payload) {
                // Bounded by the max block size, so it fits a usize.
                Ok(n) => n as usize,
                Err(e) => {
                    self.fail(&format!("framing lost: {e}"));
                    return at;
                }
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if avail.len() - header >= payload {
                at += header + payload;
                self.start(ctx, req, Payload::Bytes(&avail[header..header + payload]));
            } else {
                at += header;
                self.fill = Some(self.begin_fill(ctx, req, payload));
            }
        }
    }

    /// A request whose payload has started to arrive: where its bytes go.
    fn begin_fill(&mut self, ctx: &mut TaskCtx<'_>, req: wire::Request, total: usize) -> Fill {
        let writes =
            req.command() == Some(Command::Write) && self.check(&req, Command::Write).is_none();
        Fill {
            req,
            buf: writes.then(|| self.io_buffer(ctx, total)),
            have: 0,
            total,
        }
    }

    /// The whole payload is in: start the request (unless the connection is going away; it was
    /// never acknowledged, so dropping it loses nothing the client was told is written).
    fn finish_fill(&mut self, ctx: &mut TaskCtx<'_>, fill: Fill) {
        if self.state != State::Running {
            if let Some(buf) = fill.buf {
                self.recycle(buf);
            }
            return;
        }
        let payload = match fill.buf {
            Some(buf) => Payload::Filled(buf),
            None => Payload::Bytes(&[]),
        };
        self.start(ctx, fill.req, payload);
    }

    /// Feed what is waiting: the leftover in `rbuf`, then provided buffers held back.
    fn feed_waiting(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let mut fed = 0;
        loop {
            if self.rstart < self.rend && !self.held_back() {
                let rbuf = std::mem::take(&mut self.rbuf);
                let used = self.feed(ctx, &rbuf[self.rstart..self.rend]);
                self.rbuf = rbuf;
                self.rstart += used;
                fed += usize::from(used > 0);
                if self.rstart == self.rend {
                    self.rstart = 0;
                    self.rend = 0;
                }
            }
            if self.held_back() {
                return fed;
            }
            let Some((bid, len)) = self.held.pop_front() else {
                return fed;
            };
            self.take_in(ctx, bid, len);
            fed += 1;
        }
    }

    /// Bytes a multishot receive put in provided buffer `bid`: fed straight from the buffer
    /// when nothing older waits, else appended to `rbuf`; then the buffer goes back.
    fn take_in(&mut self, ctx: &mut TaskCtx<'_>, bid: u16, len: usize) {
        let Some(rx) = self.rx.take() else { return };
        let data = rx.bytes(bid, len);
        if self.rstart == self.rend && !self.held_back() {
            let used = self.feed(ctx, data);
            self.stash(&data[used..]);
        } else {
            self.stash(data);
        }
        let mut rx = rx;
        rx.recycle(bid);
        self.rx = Some(rx);
        if self.rstart < self.rend && !self.held_back() {
            // A header completed by this buffer, or requests it carried past the leftover.
            self.feed_waiting(ctx);
        }
    }

    /// Keep received bytes that cannot be used yet, after what `rbuf` already holds. Bounded:
    /// a leftover is at most a partial header plus one provided buffer, since buffers that
    /// arrive while requests are held back stay in `held`.
    fn stash(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let end = self.rend + bytes.len();
        if self.rbuf.len() < end {
            self.rbuf.resize(end.next_power_of_two(), 0);
        }
        self.rbuf[self.rend..end].copy_from_slice(bytes);
        self.rend = end;
    }

    fn start(&mut self, ctx: &mut TaskCtx<'_>, req: wire::Request, payload: Payload<'_>) {
        let Some(cmd) = req.command() else {
            self.reply_err(req.cookie, req.offset, false, wire::EINVAL);
            return;
        };
        if cmd != Command::Read {
            // It may change data that gathered replies point at: send those first.
            self.flush_direct();
        }
        if cmd == Command::Disc {
            tracing::debug!(peer = %self.peer, "client disconnects");
            self.state = State::Draining;
            return;
        }
        if let Some(errno) = self.check(&req, cmd) {
            self.reply_err(req.cookie, req.offset, cmd == Command::Read, errno);
            return;
        }
        let fua = req.flags & wire::CMD_FLAG_FUA != 0;
        let mut p = Pending {
            cookie: req.cookie,
            offset: req.offset,
            len: req.length,
            cmd,
            flags: req.flags,
            then_flush: false,
            payload_bytes: 0,
            done_bytes: 0,
        };
        match cmd {
            Command::Read => {
                if self.read_is_hole(&req) {
                    // Thin volume, nothing written there: one OFFSET_HOLE chunk, no engine IO,
                    // no buffer to fill with zeros. (A concurrent write may or may not be seen,
                    // as with any read racing a write.)
                    self.stats
                        .bytes_read
                        .fetch_add(req.length, Ordering::Relaxed);
                    let mut b = Vec::with_capacity(48);
                    let t = ReplyTarget {
                        cookie: req.cookie,
                        offset: req.offset,
                        extended: self.extended(),
                    };
                    t.encode_offset_hole(
                        &mut b,
                        wire::REPLY_FLAG_DONE,
                        req.offset,
                        req.length as u32,
                    );
                    self.queue(OutMsg::bytes_only(b));
                    return;
                }
                p.payload_bytes = req.length;
                let Some(buf) = self.read_in_place(ctx, &p) else {
                    return; // answered
                };
                self.submit(ctx, p, RequestKind::Read, Some(buf));
            }
            Command::Write => {
                p.payload_bytes = req.length;
                self.stats
                    .bytes_written
                    .fetch_add(req.length, Ordering::Relaxed);
                let buf = match payload {
                    Payload::Filled(buf) => buf,
                    Payload::Bytes(data) => {
                        let mut buf = self.io_buffer(ctx, data.len());
                        buf.as_mut_slice().copy_from_slice(data);
                        buf
                    }
                };
                self.submit(ctx, p, RequestKind::Write, Some(buf));
            }
            Command::Flush => self.submit(ctx, p, RequestKind::Flush, None),
            Command::Trim => {
                p.then_flush = fua;
                self.submit(ctx, p, RequestKind::Trim, None);
            }
            Command::WriteZeroes => {
                if req.flags & wire::CMD_FLAG_NO_HOLE != 0 {
                    if req.flags & wire::CMD_FLAG_FAST_ZERO != 0 {
                        // Allocated zeros mean writing them: not fast.
                        self.reply_err(req.cookie, req.offset, false, wire::ENOTSUP);
                        return;
                    }
                    if req.length > u64::from(self.neg.info.max_block_bytes) {
                        self.reply_err(req.cookie, req.offset, false, wire::EINVAL);
                        return;
                    }
                    p.payload_bytes = req.length;
                    let buf = IoBuf::owned(AlignedBuf::zeroed(req.length as usize));
                    self.submit(ctx, p, RequestKind::Write, Some(buf));
                } else {
                    p.then_flush = fua;
                    self.submit(ctx, p, RequestKind::WriteZeroes, None);
                }
            }
            Command::Cache => {
                // Data is already where the engine serves it from; nothing to prefetch.
                let p = Pending {
                    payload_bytes: 0,
                    ..p
                };
                self.reply_ok(&p);
            }
            Command::BlockStatus => match (self.neg.base_allocation_id, self.structured()) {
                (Some(id), true) => {
                    self.reply_block_status(req.cookie, req.offset, req.length, req.flags, id)
                }
                _ => self.reply_err(req.cookie, req.offset, false, wire::EINVAL),
            },
            Command::Resize | Command::Disc => {
                self.reply_err(req.cookie, req.offset, false, wire::EINVAL)
            }
        }
    }

    fn on_engine_completion(&mut self, ctx: &mut TaskCtx<'_>, c: ringblock_engine::Completion) {
        let tag = c.tag as u32;
        let p = self.pending[tag as usize]
            .take()
            .expect("completion for a pending request");
        self.free_tags.push(tag);
        self.in_flight -= 1;
        self.bytes_in_flight -= p.payload_bytes;
        if self.state == State::Failed {
            return;
        }
        // A long TRIM / WRITE_ZEROES goes in parts: after each part, the next one.
        let range_kind = match p.cmd {
            Command::Trim => Some(RequestKind::Trim),
            Command::WriteZeroes if p.payload_bytes == 0 => Some(RequestKind::WriteZeroes),
            _ => None,
        };
        let mut p = p;
        if let (Ok(()), Some(kind)) = (&c.result, range_kind) {
            if p.done_bytes < p.len {
                p.done_bytes += p.part(kind).1;
                if p.done_bytes < p.len {
                    self.submit(ctx, p, kind, None);
                    return;
                }
            }
        }
        match c.result {
            Err(e) => self.reply_err(p.cookie, p.offset, p.cmd == Command::Read, nbd_errno(e)),
            Ok(()) if p.then_flush => {
                let next = Pending {
                    then_flush: false,
                    payload_bytes: 0,
                    ..p
                };
                self.submit(ctx, next, RequestKind::Flush, None);
            }
            Ok(()) if p.cmd == Command::Read => {
                self.stats.bytes_read.fetch_add(p.len, Ordering::Relaxed);
                self.reply_read(&p, c.buf.expect("read completion returns its buffer"));
            }
            Ok(()) => {
                if let Some(buf) = c.buf {
                    self.recycle(buf);
                }
                self.reply_ok(&p)
            }
        }
    }

    // ---- socket --------------------------------------------------------------------------

    fn post_recv(&mut self, ctx: &mut TaskCtx<'_>) -> bool {
        if self.recv_in_flight || self.state != State::Running || self.shut_down {
            return false;
        }
        if self.held_back() {
            return false; // backpressure: stop reading until replies drain
        }
        if let (true, Some(rx)) = (self.multishot, &self.rx) {
            if rx.lent() == rx.count() {
                return false; // every buffer is out (held): nothing to receive into
            }
            let group = rx.group().expect("registered");
            let entry = on_socket!(self, |fd| opcode::RecvMulti::new(fd, group).build());
            // SAFETY: the provided buffers live as long as the task (registered through
            // `register_buffers`), and the task outlives the op (finished() waits for its last
            // completion).
            return match unsafe { ctx.push_raw(entry, TAG_RECV) } {
                Ok(()) => {
                    self.recv_in_flight = true;
                    true
                }
                Err(_) => false,
            };
        }
        if self.rend == self.rbuf.len() {
            if self.rstart == 0 {
                return false; // a full buffer of requests held back
            }
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let ptr = self.rbuf[self.rend..].as_mut_ptr();
        let len = (self.rbuf.len() - self.rend) as u32;
        // After a receive that emptied the socket, skip the attempt that would find it empty.
        let ioprio = if self.recv_drained {
            IORING_RECVSEND_POLL_FIRST
        } else {
            0
        };
        let entry = on_socket!(self, |fd| opcode::Recv::new(fd, ptr, len)
            .ioprio(ioprio)
            .build());
        // SAFETY: without the multishot receive, rbuf is only resized before the first recv (on
        // the first poll, or when falling back), and the task outlives the op (finished()
        // waits).
        match unsafe { ctx.push_raw(entry, TAG_RECV) } {
            Ok(()) => {
                self.recv_in_flight = true;
                self.recv_asked = len as usize;
                true
            }
            Err(_) => false,
        }
    }

    fn post_send(&mut self, ctx: &mut TaskCtx<'_>) -> bool {
        if self.send_in_flight || self.out.is_empty() || self.state == State::Failed {
            return false;
        }
        self.iov.clear();
        let (mut seg_i, mut seg_off) = self.out_cursor;
        'msgs: for msg in self.out.iter() {
            for &seg in &msg.segs[seg_i..] {
                if self.iov.len() == MAX_IOV_PER_SEND {
                    break 'msgs;
                }
                let (_, _, len) = seg;
                if len > seg_off {
                    // SAFETY: seg_off < len keeps the pointer inside the segment.
                    let base = unsafe { msg.seg_ptr(seg).add(seg_off) };
                    self.iov.push(libc::iovec {
                        iov_base: base as *mut libc::c_void,
                        iov_len: len - seg_off,
                    });
                }
                seg_off = 0;
            }
            seg_i = 0;
        }
        if self.iov.is_empty() {
            return false;
        }
        let entry = if let [one] = self.iov[..] {
            // One piece (a reply with its data behind the header): a plain send, which spares
            // the kernel importing a message header and an iovec.
            let (ptr, len) = (one.iov_base as *const u8, one.iov_len as u32);
            on_socket!(self, |fd| opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build())
        } else {
            self.msghdr.msg_iov = self.iov.as_mut_ptr();
            self.msghdr.msg_iovlen = self.iov.len() as _;
            let msghdr = &*self.msghdr as *const libc::msghdr;
            on_socket!(self, |fd| opcode::SendMsg::new(fd, msghdr)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build())
        };
        // SAFETY: msghdr is boxed, iov is not touched while a send is in flight, and the queued
        // messages it (or a plain send's pointer) points into are only popped after the
        // completion.
        match unsafe { ctx.push_raw(entry, TAG_SEND) } {
            Ok(()) => {
                self.send_in_flight = true;
                true
            }
            Err(_) => false,
        }
    }

    /// A completion of the multishot receive: bytes in a provided buffer, or its end.
    fn on_multishot_recv(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        if !c.more() {
            self.recv_in_flight = false;
        }
        let Some(bid) = c.buffer() else {
            if c.result == -libc::ENOBUFS {
                return; // every buffer is held: post_recv re-arms once they come back
            }
            if c.result == -libc::EINVAL && self.stats.requests.load(Ordering::Relaxed) == 0 {
                // A kernel with provided-buffer rings but no multishot receive (5.19): one
                // recv at a time from now on. The buffers stay registered until the end.
                tracing::debug!(peer = %self.peer, "no multishot receive; one recv at a time");
                self.multishot = false;
                let len = self.rbuf.len().max(RECV_BUF_BYTES);
                self.rbuf.resize(len, 0);
                return;
            }
            if c.result > 0 {
                self.fail("receive completed without its buffer");
            } else {
                self.on_recv_end(c.result);
            }
            return;
        };
        let rx = self
            .rx
            .as_mut()
            .expect("multishot receives into provided buffers");
        rx.take(bid);
        let len = usize::try_from(c.result).unwrap_or(0);
        if self.state != State::Running || len == 0 {
            rx.recycle(bid); // the connection is going away: nothing will read these bytes
        } else if self.held_back() || !self.held.is_empty() {
            self.held.push_back((bid, len));
        } else {
            self.take_in(ctx, bid, len);
        }
    }

    /// A receive that brought no bytes: the peer closed (0), or it failed (-errno).
    fn on_recv_end(&mut self, result: i32) {
        if result == 0 {
            if self.state == State::Running {
                tracing::debug!(peer = %self.peer, "peer closed the connection");
                // A client that vanished mid-request: nothing to reply to; finish the rest.
                self.state = State::Draining;
            }
        } else if result != -libc::EINTR && result != -libc::EAGAIN {
            self.fail(&format!(
                "recv: {}",
                std::io::Error::from_raw_os_error(-result)
            ));
        }
    }

    fn on_sent(&mut self, mut n: usize) {
        // Advance the cursor over `n` bytes, popping whole messages (their buffers are freed).
        while n > 0 {
            let Some(msg) = self.out.front() else { break };
            let (seg_i, seg_off) = self.out_cursor;
            let (_, _, len) = msg.segs[seg_i];
            let left = len - seg_off;
            if n < left {
                self.out_cursor = (seg_i, seg_off + n);
                return;
            }
            n -= left;
            if seg_i + 1 == msg.segs.len() {
                let mut msg = self.out.pop_front().expect("front exists");
                self.queued_bytes -= msg.held_bytes();
                if let Some(buf) = msg.data.take() {
                    self.recycle(buf);
                }
                self.spare_msg(msg);
                self.out_cursor = (0, 0);
            } else {
                self.out_cursor = (seg_i + 1, 0);
            }
        }
    }
}

impl ReactorTask for Connection {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.port.is_none() {
            self.port = Some(Port::new(MAX_REQUESTS_IN_FLIGHT, ctx.port_waker()));
            self.socket_slot = ctx.register_fd(self.fd.as_raw_fd());
            if self.multishot {
                let mut rx = ProvidedBuffers::new(RX_BUFS, RX_BUF_BYTES);
                // SAFETY: `rx` lives in `self.rx` until the reactor drops this task.
                if unsafe { ctx.register_buffers(&mut rx) }.is_some() {
                    self.rx = Some(rx);
                } else {
                    self.multishot = false;
                }
            }
            if !self.multishot {
                self.rbuf = vec![0; RECV_BUF_BYTES];
            }
            tracing::debug!(peer = %self.peer, export = %self.neg.info.name, reactor = %ctx.reactor(), fixed_file = ?self.socket_slot, multishot = self.multishot, "connection on reactor");
        }
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
            && self.in_flight == 0
            && self.out.is_empty()
            && !self.send_in_flight
        {
            self.shutdown_socket();
        }
        if self.bufs.bytes > 0 && self.budget.used_bytes() > self.budget.limit_bytes {
            // Spare buffers are the first memory to give back when the server is over budget.
            self.bufs = BufCache::default();
        }
        self.publish(self.held_bytes());
        let busy = self.in_flight > 0
            || !self.out.is_empty()
            || self.send_in_flight
            || self.fill.is_some()
            || self.rstart < self.rend
            || !self.held.is_empty();
        if busy != self.busy {
            self.busy = busy;
            self.stats.busy.store(busy, Ordering::Relaxed);
        }
        work
    }

    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        let result = c.result;
        match c.tag {
            TAG_RECV if self.multishot => self.on_multishot_recv(ctx, c),
            TAG_RECV => {
                self.recv_in_flight = false;
                self.recv_drained = result >= 0 && (result as usize) < self.recv_asked;
                if result > 0 {
                    self.rend += result as usize;
                    self.feed_waiting(ctx);
                } else {
                    self.on_recv_end(result);
                }
            }
            TAG_SEND => {
                self.send_in_flight = false;
                if self.state == State::Failed {
                    self.drop_replies();
                } else if result >= 0 {
                    self.on_sent(result as usize);
                } else if result != -libc::EINTR && result != -libc::EAGAIN {
                    self.fail(&format!(
                        "send: {}",
                        std::io::Error::from_raw_os_error(-result)
                    ));
                }
            }
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
        let quiet = self.in_flight == 0 && !self.recv_in_flight && !self.send_in_flight;
        match self.state {
            State::Running => false,
            State::Draining => quiet && self.out.is_empty() && self.shut_down,
            State::Failed => quiet,
        }
    }
}
