//! A seeded simulated network of stream sockets, for tasks on the simulator.
//!
//! A connection is two endpoints and one pipe per direction. A pipe holds at most
//! [`NetOptions::buffer_bytes`] (bytes in transit plus bytes arrived and unread), so a sender
//! blocks once its peer stops reading. A send becomes a segment that arrives after a random
//! delay (segments of a direction arrive in order); a receive or send may move a random
//! shorter count. A cut resets a connection: ops then fail with `ECONNRESET`. A partition
//! between two nodes stops delivery on every link between them until it heals (sends still
//! fill the pipe, then block). Every choice comes from one seeded generator and the network
//! moves only in [`SimNet::tick`], so a run repeats exactly.
//!
//! **Socket identity.** A task owns its socket as an `OwnedFd` it closes on drop. Here that
//! descriptor is one end of a real `socketpair(AF_UNIX)` that never carries data: its number is
//! the socket's key, and the network keeps the other end to notice the close (`POLLHUP`),
//! which it treats as a real close: the peer reads end-of-file after what was sent, or gets a
//! reset when unread bytes were dropped. Nothing else about the descriptor is used.
//!
//! Ops come from reactors' [`super::sim::SimIo`] through [`super::task_ring::TaskRing`]; each
//! ring has a number here, and its completions wait until the ring takes them. Test code drives
//! the other end of a connection with a [`SimStream`].
//!
//! **Zero-copy sends** deliver like sends; their result completion is flagged `more`, and the
//! notification (never "copied") follows 1 to `max_delay_ticks + 1` ticks later, by the seed,
//! so a task's holding of the memory until then is exercised.
//!
//! Memory: endpoints stay listed (without their buffers) until the network is dropped, so a
//! test makes a bounded number of connections.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::types::BufRingEntry;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::task_ring::{
    RingCompletion, Socket, SocketOp, CQE_BUFFER_SHIFT, CQE_F_BUFFER, CQE_F_MORE, CQE_F_NOTIF,
};
use crate::provided::ProvidedBuffers;
use crate::request::Errno;

/// Most fixed file slots one simulated ring hands out.
const MAX_FIXED_SLOTS: u32 = 4096;
/// Most completions one multishot receive posts in a tick.
const MAX_MULTISHOT_PER_TICK: usize = 64;

/// How the network behaves.
#[derive(Clone, Copy, Debug)]
pub struct NetOptions {
    /// Bytes one direction of a connection holds: in transit plus arrived and unread.
    pub buffer_bytes: usize,
    /// Most ticks a segment takes to arrive (each takes 0 to this many after the tick it was
    /// sent in, never overtaking an earlier one).
    pub max_delay_ticks: u64,
    /// Chance, in percent, that a receive or send moves a random shorter count.
    pub short_io_percent: u32,
    /// Chance per tick, in parts per million, that an open connection is cut.
    pub cut_per_million_ticks: u32,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            buffer_bytes: 64 << 10,
            max_delay_ticks: 3,
            short_io_percent: 20,
            cut_per_million_ticks: 0,
        }
    }
}

/// A machine on the network: the endpoints on it share its partitions and crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// The simulated network; clones share it.
#[derive(Clone)]
pub struct SimNet(Arc<Mutex<Net>>);

struct Segment {
    due_tick: u64,
    bytes: Vec<u8>,
}

/// One direction of a connection.
#[derive(Default)]
struct Pipe {
    transit: VecDeque<Segment>,
    transit_bytes: usize,
    arrived: VecDeque<u8>,
    /// Arrival tick of the last segment sent: later ones never arrive before it.
    last_due_tick: u64,
    /// The writer shut down: end-of-file once all it sent has arrived.
    fin_sent: bool,
    fin_arrived: bool,
}

impl Pipe {
    fn held_bytes(&self) -> usize {
        self.transit_bytes + self.arrived.len()
    }
}

struct Conn {
    nodes: [NodeId; 2],
    /// `pipes[s]` carries what endpoint side `s` sends.
    pipes: [Pipe; 2],
    reset: bool,
}

struct Endpoint {
    conn: usize,
    side: usize,
    /// The task's descriptor number (the key), while the socket is open.
    fd: RawFd,
    /// The other end of the key's socketpair: hangs up when the task closes its end.
    watch: Option<OwnedFd>,
    read_shut: bool,
    write_shut: bool,
}

struct PendingOp {
    ring: u32,
    task_id: u32,
    tag: u32,
    endpoint: usize,
    op: SocketOp,
}

/// A zero-copy send's notification, due at a later tick.
struct Notification {
    due_tick: u64,
    ring: u32,
    task_id: u32,
    tag: u32,
}

/// A provided-buffer ring a task registered, as the simulated "kernel" reads it.
struct BufGroup {
    task_id: u32,
    group: u16,
    entries: *const BufRingEntry,
    count: u16,
    /// Entries consumed so far (wrapping), like the kernel's head.
    head: u16,
}

#[derive(Default)]
struct Ring {
    /// (task, slot, descriptor)
    fixed: Vec<(u32, u32, RawFd)>,
    next_slot: u32,
    groups: Vec<BufGroup>,
    next_group: u16,
    done: Vec<(u32, RingCompletion)>,
}

struct Net {
    rng: ChaCha8Rng,
    opts: NetOptions,
    now_tick: u64,
    conns: Vec<Conn>,
    endpoints: Vec<Endpoint>,
    by_fd: BTreeMap<RawFd, usize>,
    partitions: BTreeSet<(NodeId, NodeId)>,
    pending: Vec<PendingOp>,
    /// Zero-copy sends that completed and are not notified yet.
    notifications: Vec<Notification>,
    rings: Vec<Ring>,
}

// SAFETY: the raw pointers (op buffers, provided-buffer rings) belong to tasks that run on the
// thread driving the simulation; the network only dereferences them in `tick`, on that thread,
// under the ops' contracts (valid until their last completion or the ring's release).
unsafe impl Send for Net {}

fn ordered(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

/// A fresh key: one end for the task, the other for the network to watch.
fn key_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    Ok((OwnedFd::from(a), OwnedFd::from(b)))
}

impl SimNet {
    pub fn new(seed: u64, opts: NetOptions) -> Self {
        assert!(opts.buffer_bytes > 0, "a pipe holds at least one byte");
        SimNet(Arc::new(Mutex::new(Net {
            rng: ChaCha8Rng::seed_from_u64(seed),
            opts,
            now_tick: 0,
            conns: Vec::new(),
            endpoints: Vec::new(),
            by_fd: BTreeMap::new(),
            partitions: BTreeSet::new(),
            pending: Vec::new(),
            notifications: Vec::new(),
            rings: Vec::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        // A panic elsewhere in a test leaves nothing half-changed that matters here.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Advance one tick: notice closed sockets, cut connections the seed picks, deliver due
    /// segments over links that are up, and complete every op that can complete.
    pub fn tick(&self) {
        self.lock().tick();
    }

    /// Ticks so far.
    pub fn now_tick(&self) -> u64 {
        self.lock().now_tick
    }

    /// A connection between two sockets a task (or [`Self::stream`]) will own: `a` on node
    /// `node_a`, `b` on `node_b`.
    pub fn socket_pair(
        &self,
        node_a: NodeId,
        node_b: NodeId,
    ) -> std::io::Result<(OwnedFd, OwnedFd)> {
        let (task_a, watch_a) = key_pair()?;
        let (task_b, watch_b) = key_pair()?;
        let mut net = self.lock();
        let conn = net.conns.len();
        net.conns.push(Conn {
            nodes: [node_a, node_b],
            pipes: [Pipe::default(), Pipe::default()],
            reset: false,
        });
        for (side, (task, watch)) in [(&task_a, watch_a), (&task_b, watch_b)]
            .into_iter()
            .enumerate()
        {
            let fd = task.as_raw_fd();
            // A number in use again: whoever had it closed it and the close is not noticed
            // yet; it is now.
            if let Some(old) = net.by_fd.get(&fd).copied() {
                net.close_endpoint(old);
            }
            let id = net.endpoints.len();
            net.endpoints.push(Endpoint {
                conn,
                side,
                fd,
                watch: Some(watch),
                read_shut: false,
                write_shut: false,
            });
            net.by_fd.insert(fd, id);
        }
        Ok((task_a, task_b))
    }

    /// A connection from a client on `client` to a task on `server`: the task's socket, and
    /// the client's end for the test to drive.
    pub fn connect(&self, server: NodeId, client: NodeId) -> std::io::Result<(OwnedFd, SimStream)> {
        let (task, other) = self.socket_pair(server, client)?;
        Ok((task, self.stream(other)))
    }

    /// Drive the socket `fd` from test code.
    pub fn stream(&self, fd: OwnedFd) -> SimStream {
        SimStream {
            net: self.clone(),
            fd,
        }
    }

    /// Stop delivery between `a` and `b` (both ways) until [`Self::heal`].
    pub fn partition(&self, a: NodeId, b: NodeId) {
        self.lock().partitions.insert(ordered(a, b));
    }

    pub fn heal(&self, a: NodeId, b: NodeId) {
        self.lock().partitions.remove(&ordered(a, b));
    }

    pub fn heal_all(&self) {
        self.lock().partitions.clear();
    }

    /// Reset the connection of socket `fd` (as a peer's RST would).
    pub fn cut(&self, fd: RawFd) {
        let mut net = self.lock();
        if let Some(&e) = net.by_fd.get(&fd) {
            let conn = net.endpoints[e].conn;
            net.reset(conn);
        }
    }

    /// `node` lost power: every connection with an end on it is reset.
    pub fn crash_node(&self, node: NodeId) {
        let mut net = self.lock();
        let hit: Vec<usize> = (0..net.conns.len())
            .filter(|&c| net.conns[c].nodes.contains(&node))
            .collect();
        for c in hit {
            net.reset(c);
        }
    }

    /// Sockets still open (not closed by their owner).
    pub fn open_sockets(&self) -> usize {
        self.lock().by_fd.len()
    }

    /// Ops pushed and not completed: zero-copy sends count until their notification.
    pub fn pending_ops(&self) -> usize {
        let net = self.lock();
        net.pending.len() + net.notifications.len()
    }

    /// A new ring (a reactor's [`super::sim::SimIo`]); released by [`Self::drop_ring`].
    pub(crate) fn new_ring(&self) -> u32 {
        let mut net = self.lock();
        net.rings.push(Ring::default());
        (net.rings.len() - 1) as u32
    }

    /// The ring's reactor is gone (a crash): forget its ops, registrations and completions.
    pub(crate) fn drop_ring(&self, ring: u32) {
        let mut net = self.lock();
        net.pending.retain(|p| p.ring != ring);
        net.notifications.retain(|n| n.ring != ring);
        net.rings[ring as usize] = Ring::default();
    }

    /// [`super::task_ring::TaskRing::push`] of ring `ring`.
    ///
    /// # Safety
    /// As there: what the op points to stays valid until its last completion is taken.
    pub(crate) unsafe fn push(&self, ring: u32, task_id: u32, op: SocketOp, tag: u32) {
        let mut net = self.lock();
        let socket = match op {
            SocketOp::Recv { socket, .. }
            | SocketOp::RecvMulti { socket, .. }
            | SocketOp::Send { socket, .. }
            | SocketOp::SendMsg { socket, .. }
            | SocketOp::SendZc { socket, .. }
            | SocketOp::SendMsgZc { socket, .. } => socket,
        };
        match net.resolve(ring, task_id, socket) {
            Some(endpoint) => net.pending.push(PendingOp {
                ring,
                task_id,
                tag,
                endpoint,
                op,
            }),
            None => net.rings[ring as usize].done.push((
                task_id,
                RingCompletion {
                    tag,
                    result: -libc::EBADF,
                    flags: 0,
                },
            )),
        }
    }

    pub(crate) fn register_fd(&self, ring: u32, task_id: u32, fd: RawFd) -> Option<u32> {
        let mut net = self.lock();
        net.by_fd.get(&fd)?;
        let r = &mut net.rings[ring as usize];
        if r.next_slot == MAX_FIXED_SLOTS {
            return None;
        }
        let slot = r.next_slot;
        r.next_slot += 1;
        r.fixed.push((task_id, slot, fd));
        Some(slot)
    }

    /// # Safety
    /// `bufs`' ring and memory stay valid until [`Self::release_task`] for the task.
    pub(crate) unsafe fn register_buffers(
        &self,
        ring: u32,
        task_id: u32,
        bufs: &mut ProvidedBuffers,
    ) -> Option<u16> {
        let mut net = self.lock();
        let r = &mut net.rings[ring as usize];
        let group = r.next_group;
        r.next_group = r.next_group.checked_add(1)?;
        r.groups.push(BufGroup {
            task_id,
            group,
            entries: bufs.ring_addr() as *const BufRingEntry,
            count: bufs.count(),
            head: 0,
        });
        bufs.set_group(group);
        Some(group)
    }

    pub(crate) fn release_task(&self, ring: u32, task_id: u32) {
        let mut net = self.lock();
        let r = &mut net.rings[ring as usize];
        r.fixed.retain(|&(t, _, _)| t != task_id);
        r.groups.retain(|g| g.task_id != task_id);
    }

    pub(crate) fn take_completions(&self, ring: u32, out: &mut Vec<(u32, RingCompletion)>) {
        out.append(&mut self.lock().rings[ring as usize].done);
    }

    /// # Safety
    /// The iovecs point at readable memory.
    pub(crate) unsafe fn send_now(&self, fd: RawFd, iov: &[libc::iovec]) -> usize {
        let mut net = self.lock();
        let Some(&e) = net.by_fd.get(&fd) else {
            return 0;
        };
        // SAFETY: forwarded contract.
        unsafe { net.send(e, iov) }.unwrap_or(0)
    }

    pub(crate) fn shutdown(&self, fd: RawFd) {
        let mut net = self.lock();
        if let Some(&e) = net.by_fd.get(&fd) {
            net.shutdown(e);
        }
    }
}

impl Net {
    fn tick(&mut self) {
        self.now_tick += 1;
        self.notify_due();
        self.notice_closes();
        if self.opts.cut_per_million_ticks > 0 {
            for c in 0..self.conns.len() {
                if !self.conns[c].reset
                    && self.rng.gen_range(0..1_000_000) < self.opts.cut_per_million_ticks
                {
                    self.reset(c);
                }
            }
        }
        for c in 0..self.conns.len() {
            let (a, b) = (self.conns[c].nodes[0], self.conns[c].nodes[1]);
            if a != b && self.partitions.contains(&ordered(a, b)) {
                continue;
            }
            let now = self.now_tick;
            for pipe in &mut self.conns[c].pipes {
                while pipe.transit.front().is_some_and(|s| s.due_tick <= now) {
                    let seg = pipe.transit.pop_front().expect("checked");
                    pipe.transit_bytes -= seg.bytes.len();
                    pipe.arrived.extend(seg.bytes);
                }
                if pipe.fin_sent && pipe.transit.is_empty() {
                    pipe.fin_arrived = true;
                }
            }
        }
        let ops = std::mem::take(&mut self.pending);
        for p in ops {
            if !self.progress(&p) {
                self.pending.push(p);
            }
        }
    }

    /// Post the zero-copy notifications due by now (each a tick or more after its result).
    fn notify_due(&mut self) {
        let now = self.now_tick;
        let due: Vec<Notification> = self
            .notifications
            .extract_if(.., |n| n.due_tick <= now)
            .collect();
        for n in due {
            self.rings[n.ring as usize].done.push((
                n.task_id,
                RingCompletion {
                    tag: n.tag,
                    result: 0,
                    flags: CQE_F_NOTIF,
                },
            ));
        }
    }

    /// Endpoints whose owner closed its descriptor since the last tick.
    fn notice_closes(&mut self) {
        let mut polls = Vec::new();
        let mut ids = Vec::new();
        for (id, e) in self.endpoints.iter().enumerate() {
            if let Some(w) = &e.watch {
                polls.push(libc::pollfd {
                    fd: w.as_fd().as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                });
                ids.push(id);
            }
        }
        if polls.is_empty() {
            return;
        }
        // SAFETY: `polls` is a valid array of pollfd for the call; timeout 0 never blocks.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return;
        }
        for (p, id) in polls.iter().zip(ids) {
            if p.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
                self.close_endpoint(id);
            }
        }
    }

    /// The owner closed endpoint `id`: like `close(2)` of a socket, a FIN to the peer, or a
    /// reset when bytes it never read are thrown away.
    fn close_endpoint(&mut self, id: usize) {
        let e = &mut self.endpoints[id];
        if e.watch.take().is_none() {
            return;
        }
        if self.by_fd.get(&e.fd) == Some(&id) {
            self.by_fd.remove(&e.fd);
        }
        let (conn, side) = (e.conn, e.side);
        self.shutdown(id);
        self.pending.retain(|p| p.endpoint != id);
        if !self.conns[conn].pipes[1 - side].arrived.is_empty() {
            self.reset(conn);
        }
        let both_closed = self
            .endpoints
            .iter()
            .filter(|e| e.conn == conn)
            .all(|e| e.watch.is_none());
        if both_closed {
            self.conns[conn].pipes = [Pipe::default(), Pipe::default()];
        }
    }

    fn reset(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        c.reset = true;
        for p in &mut c.pipes {
            *p = Pipe::default();
        }
    }

    fn shutdown(&mut self, id: usize) {
        let e = &mut self.endpoints[id];
        e.read_shut = true;
        e.write_shut = true;
        let (conn, side) = (e.conn, e.side);
        self.conns[conn].pipes[side].fin_sent = true;
    }

    /// The endpoint a task's op names.
    fn resolve(&self, ring: u32, task_id: u32, socket: Socket) -> Option<usize> {
        let fd = match socket {
            Socket::Fd(fd) => fd,
            Socket::Fixed(slot) => {
                self.rings[ring as usize]
                    .fixed
                    .iter()
                    .find(|&&(t, s, _)| t == task_id && s == slot)?
                    .2
            }
        };
        self.by_fd.get(&fd).copied()
    }

    /// How many of `n` bytes an op moves: all, or (by the seed) a random shorter count.
    fn pick(&mut self, n: usize) -> usize {
        if n > 1 && self.rng.gen_range(0..100) < self.opts.short_io_percent {
            self.rng.gen_range(1..=n)
        } else {
            n
        }
    }

    /// Move up to `len` arrived bytes of endpoint `id` to `out` (which may be shorter).
    ///
    /// # Safety
    /// `out` is valid for `len` bytes of writes.
    unsafe fn copy_in(&mut self, id: usize, out: *mut u8, len: usize) -> usize {
        let (conn, side) = (self.endpoints[id].conn, self.endpoints[id].side);
        let avail = self.conns[conn].pipes[1 - side].arrived.len().min(len);
        let n = self.pick(avail);
        let pipe = &mut self.conns[conn].pipes[1 - side];
        for (i, b) in pipe.arrived.drain(..n).enumerate() {
            // SAFETY: i < n <= len, inside `out` (forwarded contract).
            unsafe { out.add(i).write(b) };
        }
        n
    }

    /// What a receive on endpoint `id` finds when nothing has arrived: None (wait), or its
    /// final result (0: end-of-file).
    fn recv_end(&self, id: usize) -> Option<i32> {
        let e = &self.endpoints[id];
        let c = &self.conns[e.conn];
        if c.reset {
            Some(-libc::ECONNRESET)
        } else if !c.pipes[1 - e.side].arrived.is_empty() {
            None
        } else if e.read_shut || c.pipes[1 - e.side].fin_arrived {
            Some(0)
        } else {
            None
        }
    }

    /// Send what `iov` holds from endpoint `id`, as much as its pipe has room for. Ok(0):
    /// no room (wait).
    ///
    /// # Safety
    /// The iovecs point at readable memory.
    unsafe fn send(&mut self, id: usize, iov: &[libc::iovec]) -> Result<usize, Errno> {
        let (conn, side) = (self.endpoints[id].conn, self.endpoints[id].side);
        let peer_closed = self
            .endpoints
            .iter()
            .any(|e| e.conn == conn && e.side != side && e.watch.is_none());
        if self.conns[conn].reset {
            return Err(Errno(libc::ECONNRESET));
        }
        if self.endpoints[id].write_shut || peer_closed {
            return Err(Errno(libc::EPIPE));
        }
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let room = self
            .opts
            .buffer_bytes
            .saturating_sub(self.conns[conn].pipes[side].held_bytes());
        let n = self.pick(total.min(room));
        if n == 0 {
            return Ok(0);
        }
        let mut bytes = Vec::with_capacity(n);
        for v in iov {
            let take = v.iov_len.min(n - bytes.len());
            // SAFETY: the iovec names `iov_len` readable bytes (forwarded contract).
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, take)
            });
            if bytes.len() == n {
                break;
            }
        }
        let delay = self.rng.gen_range(0..=self.opts.max_delay_ticks);
        let now = self.now_tick;
        let pipe = &mut self.conns[conn].pipes[side];
        let due_tick = (now + delay).max(pipe.last_due_tick);
        pipe.last_due_tick = due_tick;
        pipe.transit_bytes += n;
        pipe.transit.push_back(Segment { due_tick, bytes });
        Ok(n)
    }

    fn complete(&mut self, p: &PendingOp, result: i32, flags: u32) {
        self.rings[p.ring as usize].done.push((
            p.task_id,
            RingCompletion {
                tag: p.tag,
                result,
                flags,
            },
        ));
    }

    /// Move op `p` on; true when it is done (its last completion posted).
    fn progress(&mut self, p: &PendingOp) -> bool {
        match p.op {
            SocketOp::Recv { buf, len, .. } => {
                // As the kernel's, a receive of no bytes returns 0 at once.
                let end = (len == 0).then_some(0);
                if let Some(result) = end.or_else(|| self.recv_end(p.endpoint)) {
                    self.complete(p, result, 0);
                    return true;
                }
                // SAFETY: the op's buffer is valid for `len` bytes until it completes (the
                // pusher's contract).
                let n = unsafe { self.copy_in(p.endpoint, buf, len as usize) };
                if n == 0 {
                    return false;
                }
                self.complete(p, n as i32, 0);
                true
            }
            SocketOp::RecvMulti { group, .. } => self.progress_multishot(p, group),
            SocketOp::Send { buf, len, .. } | SocketOp::SendZc { buf, len, .. } => {
                let iov = [libc::iovec {
                    iov_base: buf as *mut libc::c_void,
                    iov_len: len as usize,
                }];
                // SAFETY: the op's buffer is valid until its last completion.
                self.progress_send(p, &iov)
            }
            SocketOp::SendMsg { msg, .. } | SocketOp::SendMsgZc { msg, .. } => {
                // SAFETY: the header and its iovecs are valid until the op completes.
                let iov = unsafe {
                    let m = &*msg;
                    if m.msg_iovlen == 0 {
                        &[][..]
                    } else {
                        std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen)
                    }
                };
                self.progress_send(p, iov)
            }
        }
    }

    /// A send: done once the pipe took some of it (or it failed). A zero-copy one completes
    /// as the kernel's does: a result flagged `MORE`, then its notification, a tick or more
    /// later (by the seed).
    fn progress_send(&mut self, p: &PendingOp, iov: &[libc::iovec]) -> bool {
        // SAFETY: forwarded from `progress`.
        let result = match unsafe { self.send(p.endpoint, iov) } {
            Ok(0) if iov.iter().any(|v| v.iov_len > 0) => return false,
            Ok(n) => n as i32,
            Err(e) => -e.0,
        };
        let zero_copy = matches!(p.op, SocketOp::SendZc { .. } | SocketOp::SendMsgZc { .. });
        if !zero_copy {
            self.complete(p, result, 0);
            return true;
        }
        // As the kernel does once a zero-copy send was prepared: the result says more
        // follows, whatever it is, and the notification comes later.
        self.complete(p, result, CQE_F_MORE);
        let due_tick = self.now_tick + self.rng.gen_range(1..=self.opts.max_delay_ticks + 1);
        self.notifications.push(Notification {
            due_tick,
            ring: p.ring,
            task_id: p.task_id,
            tag: p.tag,
        });
        true
    }

    /// Arrivals into the next free buffers of `group`, one completion each, until nothing is
    /// left, no buffer is free (`ENOBUFS` ends the receive) or the connection ends.
    fn progress_multishot(&mut self, p: &PendingOp, group: u16) -> bool {
        for _ in 0..MAX_MULTISHOT_PER_TICK {
            if let Some(result) = self.recv_end(p.endpoint) {
                self.complete(p, result, 0);
                return true;
            }
            let (conn, side) = (
                self.endpoints[p.endpoint].conn,
                self.endpoints[p.endpoint].side,
            );
            if self.conns[conn].pipes[1 - side].arrived.is_empty() {
                return false;
            }
            let Some(g) = self.rings[p.ring as usize]
                .groups
                .iter_mut()
                .find(|g| g.task_id == p.task_id && g.group == group)
            else {
                self.complete(p, -libc::ENOBUFS, 0);
                return true;
            };
            // SAFETY: the ring stays valid while registered (`register_buffers`' contract);
            // the tail is entry 0's reserved field, published with a release store.
            let tail = unsafe {
                (*(BufRingEntry::tail(g.entries) as *const AtomicU16)).load(Ordering::Acquire)
            };
            if tail == g.head {
                self.complete(p, -libc::ENOBUFS, 0);
                return true;
            }
            // SAFETY: head & (count - 1) is inside the ring of `count` entries.
            let entry = unsafe { &*g.entries.add(usize::from(g.head & (g.count - 1))) };
            g.head = g.head.wrapping_add(1);
            let (addr, len, bid) = (entry.addr(), entry.len(), entry.bid());
            // SAFETY: the entry names a buffer of the task's, `len` bytes, which the task does
            // not touch until this completion hands it over.
            let n = unsafe { self.copy_in(p.endpoint, addr as *mut u8, len as usize) };
            let flags = CQE_F_BUFFER | (u32::from(bid) << CQE_BUFFER_SHIFT) | CQE_F_MORE;
            self.complete(p, n as i32, flags);
        }
        false
    }
}

mod stream;
pub use stream::SimStream;

#[cfg(test)]
mod tests;
