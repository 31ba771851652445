//! The send path: replies queue as messages of typed segments and go out one send at a time
//! through the ring, gathered into one iovec list; small in-place reads of one receive go out
//! together with one direct `sendmsg` from the device's memory.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use ringblock_engine::task::{RingCompletion, SocketOp, TaskCtx};
use ringblock_engine::IoBuf;

use super::reply::INLINE_READ_MAX_BYTES;
use super::{Connection, State, TAG_SEND};

pub(super) const MAX_IOV_PER_SEND: usize = 256;
/// Replies one direct `sendmsg` carries (two iovecs each); more in one receive means another.
pub(super) const MAX_DIRECT_REPLIES: usize = 64;
/// Reply messages kept for reuse (their header and segment vectors), per connection: at most
/// SPARE_MSGS x SPARE_MSG_BYTES, about 520 KiB.
pub(super) const SPARE_MSGS: usize = 64;
pub(super) const SPARE_MSG_BYTES: usize = INLINE_READ_MAX_BYTES + 64;

/// One piece of a queued reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Segment {
    /// `len` bytes of the message's own `bytes` from `start`: reply headers, and the data of
    /// a small read copied right behind its header.
    Bytes { start: usize, len: usize },
    /// `len` bytes of the message's data buffer from `start`.
    Data { start: usize, len: usize },
}

impl Segment {
    pub(super) fn len(self) -> usize {
        match self {
            Segment::Bytes { len, .. } | Segment::Data { len, .. } => len,
        }
    }
}

/// A reply waiting to be sent: header bytes and an optional data buffer, sent as `segs`.
pub(super) struct OutMsg {
    pub(super) bytes: Vec<u8>,
    pub(super) data: Option<IoBuf>,
    /// In send order.
    pub(super) segs: Vec<Segment>,
}

impl OutMsg {
    /// Memory the reply holds until it is sent: its header bytes and its whole data buffer
    /// (a read with holes sends less than its buffer holds).
    pub(super) fn held_bytes(&self) -> usize {
        self.bytes.len() + self.data.as_ref().map_or(0, IoBuf::len)
    }

    pub(super) fn bytes_only(bytes: Vec<u8>) -> Self {
        let n = bytes.len();
        Self {
            bytes,
            data: None,
            segs: vec![Segment::Bytes { start: 0, len: n }],
        }
    }

    /// Where `seg` starts in memory.
    pub(super) fn seg_ptr(&self, seg: Segment) -> *const u8 {
        match seg {
            Segment::Data { start, len } => {
                let data = self.data.as_ref().expect("data segment has a buffer");
                debug_assert!(start + len <= data.len(), "segment inside the data buffer");
                // SAFETY: start is within the data buffer (replies are built that way).
                unsafe { data.as_ptr().add(start) }
            }
            Segment::Bytes { start, len } => {
                debug_assert!(start + len <= self.bytes.len(), "segment inside the bytes");
                self.bytes[start..].as_ptr()
            }
        }
    }

    /// The message's bytes from `start` to their end are the next segment.
    pub(super) fn push_bytes_from(&mut self, start: usize) {
        let len = self.bytes.len() - start;
        self.segs.push(Segment::Bytes { start, len });
    }
}

/// A small read's reply answered in place during one `feed`: its header, and its data where
/// the device keeps it. Sent with the others at the end of the feed (see `flush_direct`).
pub(super) struct DirectReply {
    pub(super) msg: OutMsg,
    pub(super) data: *const u8,
    pub(super) len: usize,
    /// `TaskCtx::data_epoch` when `data` was kept: it must not have moved when it is sent.
    pub(super) data_epoch: u64,
}

/// The send path's state.
pub(super) struct SendState {
    /// Replies waiting to be sent, in order.
    pub(super) out: VecDeque<OutMsg>,
    /// Memory the replies in `out` hold ([`OutMsg::held_bytes`]), sent or not (a message
    /// leaves when all of it is sent).
    pub(super) queued_bytes: usize,
    /// Position in `out.front()`: (segment index, offset within it).
    pub(super) cursor: (usize, usize),
    pub(super) in_flight: bool,
    pub(super) msghdr: Box<libc::msghdr>,
    pub(super) iov: Vec<libc::iovec>,
    /// Sent messages, emptied, for the next replies: no allocation per read reply.
    pub(super) spare_msgs: Vec<OutMsg>,
    /// Replies of small reads answered in place in the current `feed`, to go out together at
    /// its end with one `sendmsg` straight from the device's memory. Empty outside `feed`.
    pub(super) direct: Vec<DirectReply>,
    /// Scratch iovecs of that `sendmsg`.
    pub(super) direct_iov: Vec<libc::iovec>,
}

impl SendState {
    pub(super) fn new() -> Self {
        Self {
            out: VecDeque::new(),
            queued_bytes: 0,
            cursor: (0, 0),
            in_flight: false,
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            msghdr: Box::new(unsafe { std::mem::zeroed() }),
            iov: Vec::with_capacity(MAX_IOV_PER_SEND),
            spare_msgs: Vec::new(),
            direct: Vec::with_capacity(MAX_DIRECT_REPLIES),
            direct_iov: Vec::with_capacity(2 * MAX_DIRECT_REPLIES),
        }
    }
}

impl Connection {
    /// Queue a reply to be sent.
    pub(super) fn queue(&mut self, msg: OutMsg) {
        self.send.queued_bytes += msg.held_bytes();
        self.send.out.push_back(msg);
    }

    /// Abandon queued replies, unless a send still points into them (then after it completes).
    pub(super) fn drop_replies(&mut self) {
        if !self.send.in_flight {
            self.send.out.clear();
            self.send.queued_bytes = 0;
            self.send.cursor = (0, 0);
        }
    }

    /// Keep an emptied message for the next reply, within the bounds.
    pub(super) fn spare_msg(&mut self, mut msg: OutMsg) {
        // Only small ones: a block-status reply's header may be kilobytes.
        if self.send.spare_msgs.len() < SPARE_MSGS && msg.bytes.capacity() <= SPARE_MSG_BYTES {
            msg.bytes.clear();
            msg.segs.clear();
            msg.data = None;
            self.send.spare_msgs.push(msg);
        }
    }

    /// An empty message for a reply, reused when one is spare.
    pub(super) fn new_msg(&mut self, data: Option<IoBuf>) -> OutMsg {
        match self.send.spare_msgs.pop() {
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

    /// Whether a reply may go straight to the socket now, ahead of the queued ones: no send in
    /// flight and none of the queue sent yet (the stream is at a reply boundary).
    pub(super) fn may_send_direct(&self) -> bool {
        self.state == State::Running
            && !self.shut_down
            && !self.send.in_flight
            && self.send.cursor == (0, 0)
    }

    /// Send the replies gathered by `read_in_place`: one `sendmsg(MSG_DONTWAIT)` of each header
    /// and the device's memory behind it. What the socket does not take is copied into queued
    /// replies at the front of the queue, in order, for the ring to send; nothing queued had
    /// started (`may_send_direct`), so the stream stays whole.
    ///
    /// Called at the end of every `feed` and before a request that changes data starts: the
    /// pointers are valid until then (`TaskCtx::read_in_place`).
    pub(super) fn flush_direct(&mut self, ctx: &mut TaskCtx<'_>) {
        if self.send.direct.is_empty() {
            return;
        }
        debug_assert!(
            self.send
                .direct
                .iter()
                .all(|d| d.data_epoch == ctx.data_epoch()),
            "memory read in place changed or freed before its reply was sent"
        );
        let mut direct = std::mem::take(&mut self.send.direct);
        if self.state != State::Failed {
            self.send_direct(ctx, &mut direct);
        }
        for d in direct.drain(..) {
            self.spare_msg(d.msg);
        }
        self.send.direct = direct;
    }

    /// `flush_direct`'s send. What the socket did not take moves from `direct` to the front of
    /// the queue; what it took stays in `direct`, for the caller to spare.
    pub(super) fn send_direct(&mut self, ctx: &mut TaskCtx<'_>, direct: &mut Vec<DirectReply>) {
        self.send.direct_iov.clear();
        for d in direct.iter() {
            self.send.direct_iov.push(libc::iovec {
                iov_base: d.msg.bytes.as_ptr() as *mut libc::c_void,
                iov_len: d.msg.bytes.len(),
            });
            self.send.direct_iov.push(libc::iovec {
                iov_base: d.data as *mut libc::c_void,
                iov_len: d.len,
            });
        }
        // The iovecs point at the headers in `direct` and at device memory that stays valid
        // until `flush_direct` returns (see below).
        // The stream is at a reply boundary (`may_send_direct` held when these were gathered,
        // and nothing sends within a feed): these replies may go ahead of the queue.
        debug_assert!(
            !self.send.in_flight && self.send.cursor == (0, 0),
            "direct send at a reply boundary"
        );
        // SAFETY: the iovecs point at the headers in `direct` and at device memory valid until
        // `flush_direct` returns (above).
        let mut sent = unsafe { ctx.send_now(self.fd.as_raw_fd(), &self.send.direct_iov) };
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
            let DirectReply {
                mut msg, data, len, ..
            } = d;
            // SAFETY: `data` came from `read_in_place` in this feed, and nothing that can
            // change or free it has run since (`flush_direct` runs at the end of the feed or
            // before such a request starts; see `TaskCtx::read_in_place`): `len` bytes, valid.
            msg.bytes
                .extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
            msg.push_bytes_from(0);
            self.send.queued_bytes += msg.held_bytes();
            self.send.out.push_front(msg);
        }
        if first_sent > 0 {
            self.send.cursor = (0, first_sent);
        }
    }

    pub(super) fn post_send(&mut self, ctx: &mut TaskCtx<'_>) -> bool {
        if self.send.in_flight || self.send.out.is_empty() || self.state == State::Failed {
            return false;
        }
        self.send.iov.clear();
        let (mut seg_i, mut seg_off) = self.send.cursor;
        'msgs: for msg in self.send.out.iter() {
            for &seg in &msg.segs[seg_i..] {
                if self.send.iov.len() == MAX_IOV_PER_SEND {
                    break 'msgs;
                }
                let len = seg.len();
                if len > seg_off {
                    // SAFETY: seg_off < len keeps the pointer inside the segment.
                    let base = unsafe { msg.seg_ptr(seg).add(seg_off) };
                    self.send.iov.push(libc::iovec {
                        iov_base: base as *mut libc::c_void,
                        iov_len: len - seg_off,
                    });
                }
                seg_off = 0;
            }
            seg_i = 0;
        }
        if self.send.iov.is_empty() {
            return false;
        }
        let socket = self.socket();
        let op = if let [one] = self.send.iov[..] {
            // One piece (a reply with its data behind the header): a plain send, which spares
            // the kernel importing a message header and an iovec.
            SocketOp::Send {
                socket,
                buf: one.iov_base as *const u8,
                len: one.iov_len as u32,
            }
        } else {
            self.send.msghdr.msg_iov = self.send.iov.as_mut_ptr();
            self.send.msghdr.msg_iovlen = self.send.iov.len() as _;
            SocketOp::SendMsg {
                socket,
                msg: &*self.send.msghdr as *const libc::msghdr,
            }
        };
        // SAFETY: msghdr is boxed, iov is not touched while a send is in flight, and the queued
        // messages it (or a plain send's pointer) points into are only popped after the
        // completion.
        match unsafe { ctx.push(op, TAG_SEND) } {
            Ok(()) => {
                self.send.in_flight = true;
                true
            }
            Err(_) => false,
        }
    }

    /// A completion of the ring send.
    pub(super) fn on_send(&mut self, c: RingCompletion) {
        self.send.in_flight = false;
        match c.errno() {
            _ if self.state == State::Failed => self.drop_replies(),
            None => self.on_sent(c.result as usize),
            Some(errno) if errno.0 == libc::EINTR || errno.0 == libc::EAGAIN => {}
            Some(errno) => self.fail(&format!("send: {errno}")),
        }
    }

    pub(super) fn on_sent(&mut self, mut n: usize) {
        // Advance the cursor over `n` bytes, popping whole messages (their buffers are freed).
        while n > 0 {
            let Some(msg) = self.send.out.front() else {
                break;
            };
            let (seg_i, seg_off) = self.send.cursor;
            let len = msg.segs[seg_i].len();
            let left = len - seg_off;
            if n < left {
                self.send.cursor = (seg_i, seg_off + n);
                return;
            }
            n -= left;
            if seg_i + 1 == msg.segs.len() {
                let mut msg = self.send.out.pop_front().expect("front exists");
                self.send.queued_bytes -= msg.held_bytes();
                debug_assert!(
                    !self.send.out.is_empty() || self.send.queued_bytes == 0,
                    "queued bytes are those of the queue"
                );
                if let Some(buf) = msg.data.take() {
                    self.recycle(buf);
                }
                self.spare_msg(msg);
                self.send.cursor = (0, 0);
            } else {
                self.send.cursor = (seg_i + 1, 0);
            }
        }
    }
}
