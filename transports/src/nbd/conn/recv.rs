//! The receive path: one multishot `recv` over provided buffers (or one `recv` at a time into
//! `rbuf`), and requests parsed straight out of the received bytes, a payload still arriving
//! going straight into the buffer it will be written from.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use ringblock_engine::provided::ProvidedBuffers;
use ringblock_engine::task::{RingCompletion, SocketOp, TaskCtx};
use ringblock_engine::{Errno, IoBuf};

use super::wire::{self, Command, WireError};
use super::{Connection, State, TAG_RECV};

/// Receive buffer of a connection that receives one `recv` at a time.
pub(super) const RECV_BUF_BYTES: usize = 256 << 10;
/// Provided buffers of a connection's multishot receive: as much memory as `RECV_BUF_BYTES`,
/// in pieces, so a few pipelined requests fill one and a burst fills several.
pub(super) const RX_BUFS: u16 = 16;
pub(super) const RX_BUF_BYTES: usize = 16 << 10;

/// A request header is in, its payload is still arriving: the payload goes straight into the
/// buffer it will be written from, however it is split across receives.
pub(super) struct Fill {
    pub(super) req: wire::Request,
    /// None: the payload is read and dropped (the request is refused, or is not a WRITE).
    pub(super) buf: Option<IoBuf>,
    /// Payload bytes received so far, and in all.
    pub(super) have: usize,
    pub(super) total: usize,
}

/// Where a request's payload is.
pub(super) enum Payload<'a> {
    /// In received bytes: copied into an IO buffer if the request writes it.
    Bytes(&'a [u8]),
    /// Already in its IO buffer (see [`Fill`]).
    Filled(IoBuf),
}

/// The receive path's state.
pub(super) struct RecvState {
    /// Received bytes not taken yet: `rbuf[rstart..rend]`. With one recv at a time, the recv
    /// target; with the multishot receive, only what a provided buffer left over (a partial
    /// header, or what arrived while the bounds held requests back).
    pub(super) rbuf: Vec<u8>,
    pub(super) rstart: usize,
    pub(super) rend: usize,
    /// The multishot receive's buffers, once registered on the reactor; None: one recv at a
    /// time into `rbuf` (no kernel support, or turned off).
    pub(super) rx: Option<ProvidedBuffers>,
    /// Whether to try the multishot receive.
    pub(super) multishot: bool,
    /// Provided buffers received while requests were held back, in arrival order:
    /// (buffer id, bytes). Bounded by `RX_BUFS`: the receive stops when all are out.
    pub(super) held: VecDeque<(u16, usize)>,
    /// A request whose payload is still arriving, straight into its own buffer.
    pub(super) fill: Option<Fill>,
    pub(super) in_flight: bool,
    /// Bytes the receive in flight may return; fewer means it emptied the socket.
    pub(super) asked: usize,
    /// The last receive emptied the socket.
    pub(super) drained: bool,
}

impl RecvState {
    pub(super) fn new() -> Self {
        Self {
            rbuf: Vec::new(),
            rstart: 0,
            rend: 0,
            rx: None,
            multishot: true,
            held: VecDeque::new(),
            fill: None,
            in_flight: false,
            asked: 0,
            drained: false,
        }
    }
}

impl Connection {
    /// Take requests from `src`, received bytes in order: finish a payload being filled,
    /// then start every request whose header is in, within the bounds. A payload that is not
    /// all there yet becomes the [`Fill`]. Returns the bytes used; the rest (a partial header,
    /// or all that follows once requests are held back) is for later.
    pub(super) fn feed(&mut self, ctx: &mut TaskCtx<'_>, src: &[u8]) -> usize {
        let used = self.feed_requests(ctx, src);
        self.flush_direct(ctx);
        used
    }

    /// `feed` without the send of the replies gathered on the way.
    pub(super) fn feed_requests(&mut self, ctx: &mut TaskCtx<'_>, src: &[u8]) -> usize {
        let extended = self.extended();
        let max_payload = u64::from(self.neg.info.max_block_bytes);
        let mut at = 0;
        loop {
            if let Some(fill) = &mut self.recv.fill {
                let n = (fill.total - fill.have).min(src.len() - at);
                if let Some(buf) = &mut fill.buf {
                    buf.as_mut_slice()[fill.have..fill.have + n].copy_from_slice(&src[at..at + n]);
                }
                fill.have += n;
                at += n;
                if fill.have < fill.total {
                    return at;
                }
                let fill = self.recv.fill.take().expect("checked above");
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
                self.recv.fill = Some(self.begin_fill(ctx, req, payload));
            }
        }
    }

    /// A request whose payload has started to arrive: where its bytes go.
    pub(super) fn begin_fill(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        req: wire::Request,
        total: usize,
    ) -> Fill {
        let writes =
            req.command() == Some(Command::Write) && self.validate(&req, Command::Write).is_ok();
        Fill {
            req,
            buf: writes.then(|| self.io_buffer(ctx, total)),
            have: 0,
            total,
        }
    }

    /// The whole payload is in: start the request (unless the connection is going away; it was
    /// never acknowledged, so dropping it loses nothing the client was told is written).
    pub(super) fn finish_fill(&mut self, ctx: &mut TaskCtx<'_>, fill: Fill) {
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
    pub(super) fn feed_waiting(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let mut fed = 0;
        loop {
            if self.recv.rstart < self.recv.rend && !self.held_back() {
                let rbuf = std::mem::take(&mut self.recv.rbuf);
                let used = self.feed(ctx, &rbuf[self.recv.rstart..self.recv.rend]);
                self.recv.rbuf = rbuf;
                self.recv.rstart += used;
                fed += usize::from(used > 0);
                if self.recv.rstart == self.recv.rend {
                    self.recv.rstart = 0;
                    self.recv.rend = 0;
                }
            }
            if self.held_back() {
                return fed;
            }
            let Some((bid, len)) = self.recv.held.pop_front() else {
                return fed;
            };
            self.take_in(ctx, bid, len);
            fed += 1;
        }
    }

    /// Bytes a multishot receive put in provided buffer `bid`: fed straight from the buffer
    /// when nothing older waits, else appended to `rbuf`; then the buffer goes back.
    pub(super) fn take_in(&mut self, ctx: &mut TaskCtx<'_>, bid: u16, len: usize) {
        let Some(rx) = self.recv.rx.take() else {
            return;
        };
        let data = rx.bytes(bid, len);
        if self.recv.rstart == self.recv.rend && !self.held_back() {
            let used = self.feed(ctx, data);
            self.stash(&data[used..]);
        } else {
            self.stash(data);
        }
        let mut rx = rx;
        rx.recycle(bid);
        self.recv.rx = Some(rx);
        if self.recv.rstart < self.recv.rend && !self.held_back() {
            // A header completed by this buffer, or requests it carried past the leftover.
            self.feed_waiting(ctx);
        }
    }

    /// Whether the leftover in `rbuf` holds at least a whole request header: then `feed` can
    /// use it without more bytes, once the bounds allow.
    fn leftover_has_header(&self) -> bool {
        self.recv.rend - self.recv.rstart >= wire::Request::header_len(self.extended())
    }

    /// Keep received bytes that cannot be used yet, after what `rbuf` already holds. Bounded:
    /// a leftover is at most a partial header plus one provided buffer, since buffers that
    /// arrive while requests are held back stay in `held`.
    pub(super) fn stash(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.recv.rstart > 0 {
            self.recv
                .rbuf
                .copy_within(self.recv.rstart..self.recv.rend, 0);
            self.recv.rend -= self.recv.rstart;
            self.recv.rstart = 0;
        }
        let end = self.recv.rend + bytes.len();
        if self.recv.rbuf.len() < end {
            self.recv.rbuf.resize(end.next_power_of_two(), 0);
        }
        self.recv.rbuf[self.recv.rend..end].copy_from_slice(bytes);
        self.recv.rend = end;
    }

    pub(super) fn post_recv(&mut self, ctx: &mut TaskCtx<'_>) -> bool {
        if self.recv.in_flight || self.state != State::Running || self.shut_down {
            return false;
        }
        if self.held_back() {
            return false; // backpressure: stop reading until replies drain
        }
        if let (true, Some(rx)) = (self.recv.multishot, &self.recv.rx) {
            if rx.lent() == rx.count() {
                return false; // every buffer is out (held): nothing to receive into
            }
            let op = SocketOp::RecvMulti {
                socket: self.socket(),
                group: rx.group().expect("registered"),
            };
            // SAFETY: the provided buffers live as long as the task (registered through
            // `register_buffers`), and the task outlives the op (finished() waits for its last
            // completion).
            return match unsafe { ctx.push(op, TAG_RECV) } {
                Ok(()) => {
                    self.recv.in_flight = true;
                    true
                }
                Err(_) => false,
            };
        }
        if self.recv.rend == self.recv.rbuf.len() {
            if self.recv.rstart == 0 {
                return false; // a full buffer of requests held back
            }
            self.recv
                .rbuf
                .copy_within(self.recv.rstart..self.recv.rend, 0);
            self.recv.rend -= self.recv.rstart;
            self.recv.rstart = 0;
        }
        let ptr = self.recv.rbuf[self.recv.rend..].as_mut_ptr();
        let len = (self.recv.rbuf.len() - self.recv.rend) as u32;
        let op = SocketOp::Recv {
            socket: self.socket(),
            buf: ptr,
            len,
            // After a receive that emptied the socket, skip the attempt that would find it empty.
            poll_first: self.recv.drained,
        };
        // SAFETY: without the multishot receive, rbuf is only resized before the first recv (on
        // the first poll, or when falling back), and the task outlives the op (finished()
        // waits).
        match unsafe { ctx.push(op, TAG_RECV) } {
            Ok(()) => {
                self.recv.in_flight = true;
                self.recv.asked = len as usize;
                true
            }
            Err(_) => false,
        }
    }

    /// A completion of the multishot receive: bytes in a provided buffer, or its end.
    pub(super) fn on_multishot_recv(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        if !c.more() {
            self.recv.in_flight = false;
        }
        let Some(bid) = c.buffer() else {
            if c.errno() == Some(Errno(libc::ENOBUFS)) {
                return; // every buffer is held: post_recv re-arms once they come back
            }
            if c.errno() == Some(Errno::EINVAL) && self.stats.requests.load(Ordering::Relaxed) == 0
            {
                // A kernel with provided-buffer rings but no multishot receive (5.19): one
                // recv at a time from now on. The buffers stay registered until the end.
                tracing::debug!(peer = %self.peer, "no multishot receive; one recv at a time");
                self.recv.multishot = false;
                let len = self.recv.rbuf.len().max(RECV_BUF_BYTES);
                self.recv.rbuf.resize(len, 0);
                return;
            }
            if c.result > 0 {
                self.fail("receive completed without its buffer");
            } else {
                self.on_recv_end(c.errno());
            }
            return;
        };
        let rx = self
            .recv
            .rx
            .as_mut()
            .expect("multishot receives into provided buffers");
        rx.take(bid);
        let len = usize::try_from(c.result).unwrap_or(0);
        if self.state != State::Running || len == 0 {
            rx.recycle(bid); // the connection is going away: nothing will read these bytes
        } else if self.held_back() || !self.recv.held.is_empty() || self.leftover_has_header() {
            // A leftover with a whole header in it waits for the bounds, not for more bytes:
            // appending to it would let `rbuf` grow a buffer at a time between two polls.
            self.recv.held.push_back((bid, len));
            // Each held entry is a provided buffer lent out: the receive stops when all are.
            debug_assert!(
                self.recv.held.len() <= usize::from(RX_BUFS),
                "held buffers bound"
            );
        } else {
            self.take_in(ctx, bid, len);
        }
    }

    /// A completion of the one `recv` at a time into `rbuf`.
    pub(super) fn on_recv(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        let result = c.result;
        self.recv.in_flight = false;
        self.recv.drained = result >= 0 && (result as usize) < self.recv.asked;
        if result > 0 {
            self.recv.rend += result as usize;
            debug_assert!(
                self.recv.rend <= self.recv.rbuf.len(),
                "recv stays inside rbuf"
            );
            self.feed_waiting(ctx);
        } else {
            self.on_recv_end(c.errno());
        }
    }

    /// A receive that brought no bytes: the peer closed (no error), or it failed.
    pub(super) fn on_recv_end(&mut self, errno: Option<Errno>) {
        let Some(errno) = errno else {
            if self.state == State::Running {
                tracing::debug!(peer = %self.peer, "peer closed the connection");
                // A client that vanished mid-request: nothing to reply to; finish the rest.
                self.state = State::Draining;
            }
            return;
        };
        if errno.0 != libc::EINTR && errno.0 != libc::EAGAIN {
            self.fail(&format!("recv: {errno}"));
        }
    }
}
