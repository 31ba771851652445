//! Socket plumbing shared by the peer tasks: a bounded receive buffer that holds one frame at
//! most, and an in-order frame sender (one ring op at a time, so frames never interleave on
//! the stream) that sends a data frame's pages from where they are: a copying `sendmsg` takes
//! many frames at once, a zero-copy `sendmsg` one frame (header and pages).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ringblock_engine::task::{RingCompletion, Socket, SocketOp, TaskCtx};

use super::MAX_FRAME_BYTES;

/// Most bytes of header-only frames merged into one.
const MAX_BATCH_BYTES: usize = 64 << 10;
/// Most iovecs (two per frame) and bytes one copying send offers.
const MAX_IOVECS: usize = 64;
const MAX_SEND_BYTES: usize = 4 << 20;

/// Milliseconds on a monotonic clock (the simulator gives its ticks).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The real clock: milliseconds since it was made.
pub fn monotonic_clock() -> Clock {
    let start = Instant::now();
    Arc::new(move || start.elapsed().as_millis() as u64)
}

/// Received bytes not yet decoded; never more than one largest frame.
pub(crate) struct RecvBuf {
    socket: Socket,
    tag: u32,
    /// Allocated once and never resized: a receive in flight writes into it.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    in_flight: bool,
    closed: bool,
}

impl RecvBuf {
    pub(crate) fn new(socket: Socket, tag: u32) -> RecvBuf {
        RecvBuf {
            socket,
            tag,
            buf: vec![0u8; MAX_FRAME_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            in_flight: false,
            closed: false,
        }
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(self.start + n <= self.end);
        self.start += n;
    }

    pub(crate) fn busy(&self) -> bool {
        self.in_flight
    }

    /// Start a receive unless one is in flight, the peer closed, or the buffer is full (a
    /// whole largest frame the owner has not consumed yet: it arms again once it has).
    pub(crate) fn arm(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), String> {
        if self.in_flight || self.closed || !self.make_room() {
            return Ok(());
        }
        let op = SocketOp::Recv {
            socket: self.socket,
            // SAFETY (pointer arithmetic): `end` is within the buffer.
            buf: unsafe { self.buf.as_mut_ptr().add(self.end) },
            len: (self.buf.len() - self.end) as u32,
            poll_first: false,
        };
        // SAFETY: the buffer lives in the task and is neither moved (boxed) nor touched at
        // `end..` until the completion; the task outlives its ops.
        match unsafe { ctx.push(op, self.tag) } {
            Ok(()) => {
                self.in_flight = true;
                Ok(())
            }
            Err(e) if e.0 == libc::EAGAIN => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Move the undecoded bytes to the front when they reach the end. False when the buffer
    /// is still full: a receive of zero bytes would return 0 at once, which reads as the
    /// peer's close (and, where it does not, never completes).
    fn make_room(&mut self) -> bool {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        self.end < self.buf.len()
    }

    /// The receive completed: Ok with new bytes, or why the connection ended.
    pub(crate) fn on_complete(&mut self, c: RingCompletion) -> Result<(), String> {
        self.in_flight = false;
        match c.result {
            n if n > 0 => {
                self.end += n as usize;
                Ok(())
            }
            0 => {
                self.closed = true;
                Err("the peer closed the connection".into())
            }
            _ => {
                self.closed = true;
                Err(format!(
                    "receive failed: {}",
                    c.errno().map_or(String::new(), |e| e.to_string())
                ))
            }
        }
    }
}

/// A frame waiting for the socket: its header (or the whole small frame) and the pages of
/// its payload, which the owner keeps valid until [`SendDone`] names the frame.
struct OutFrame {
    seq: u64,
    /// Header-only frames queued right after this one, sent with it (their bytes are
    /// appended to `head`): acks go out many at a time.
    also: Vec<u64>,
    head: Vec<u8>,
    payload: *const u8,
    payload_len: usize,
    zero_copy: bool,
    /// Bytes of head then payload the socket took.
    sent: usize,
}

// SAFETY: `payload` points into memory the task owns (a request's buffer it holds); the task
// moves between threads only as a whole.
unsafe impl Send for OutFrame {}

enum Op {
    Idle,
    Copy,
    /// A zero-copy send: waiting for its result, then for its notification.
    ZeroCopy {
        result_seen: bool,
        error: Option<String>,
    },
}

/// A frame is fully sent and the kernel no longer reads its pages.
pub(crate) struct SendDone {
    pub seq: u64,
}

impl OutFrame {
    fn total(&self) -> usize {
        self.head.len() + self.payload_len
    }
}

/// Sends frames in order, one ring op at a time; a copying send takes several frames at once.
pub(crate) struct FrameSender {
    socket: Socket,
    tag: u32,
    queue: VecDeque<OutFrame>,
    op: Op,
    /// Frames at the front of the queue the op in flight reads (they must not change).
    op_frames: usize,
    /// The socket refused a zero-copy send: payloads are copied from then on.
    zero_copy_refused: bool,
    /// Stable storage a `sendmsg` op points to.
    iov: Box<[libc::iovec; MAX_IOVECS]>,
    msg: Box<libc::msghdr>,
}

// SAFETY: the iovec and msghdr pointers point into this sender's own boxes or into frames
// whose memory the owner keeps valid.
unsafe impl Send for FrameSender {}

impl FrameSender {
    pub(crate) fn new(socket: Socket, tag: u32) -> FrameSender {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        FrameSender {
            socket,
            tag,
            queue: VecDeque::new(),
            op: Op::Idle,
            op_frames: 0,
            zero_copy_refused: false,
            iov: Box::new([empty; MAX_IOVECS]),
            // SAFETY: an all-zero msghdr is a valid empty one.
            msg: Box::new(unsafe { std::mem::zeroed() }),
        }
    }

    /// Queue a frame. The payload (`payload_len` bytes at `payload`) stays valid until the
    /// frame is reported done.
    pub(crate) fn enqueue(
        &mut self,
        seq: u64,
        head: Vec<u8>,
        payload: *const u8,
        payload_len: usize,
        zero_copy: bool,
    ) {
        let idle_back = self.queue.len() > self.op_frames;
        if let Some(back) = self.queue.back_mut().filter(|_| idle_back) {
            let small = back.payload_len == 0 && payload_len == 0 && back.sent == 0;
            if small && back.head.len() + head.len() <= MAX_BATCH_BYTES {
                back.head.extend_from_slice(&head);
                back.also.push(seq);
                return;
            }
        }
        self.queue.push_back(OutFrame {
            seq,
            also: Vec::new(),
            head,
            payload,
            payload_len,
            zero_copy: zero_copy && payload_len > 0 && !self.zero_copy_refused,
            sent: 0,
        });
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A ring op is in flight (the kernel may read a frame's pages).
    pub(crate) fn busy(&self) -> bool {
        !matches!(self.op, Op::Idle)
    }

    /// Forget the frames no op reads (after a failure; their pages are never read).
    pub(crate) fn clear(&mut self) {
        self.queue.truncate(self.op_frames);
    }

    /// Start sending the next bytes, if no op is in flight. True when an op was pushed.
    pub(crate) fn pump(&mut self, ctx: &mut TaskCtx<'_>) -> Result<bool, String> {
        if self.busy() {
            return Ok(false);
        }
        let Some(f) = self.queue.front() else {
            return Ok(false);
        };
        let zero_copy = f.zero_copy;
        let (iovs, frames) = self.gather();
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = iovs;
        let (op, next) = if zero_copy {
            // One frame, its header and pages in one op; the ring copies instead when it
            // cannot send zero-copy or the payload is small, with one completion then.
            let op = SocketOp::SendMsgZc {
                socket: self.socket,
                msg: &*self.msg,
            };
            let next = Op::ZeroCopy {
                result_seen: false,
                error: None,
            };
            (op, next)
        } else {
            let op = SocketOp::SendMsg {
                socket: self.socket,
                msg: &*self.msg,
            };
            (op, Op::Copy)
        };
        // SAFETY: the header and iovecs live in boxes of this sender, the frames' heads in
        // the queue (neither changed nor dropped while their op is in flight: `op_frames`),
        // the payloads with the owner until their frame is reported done.
        match unsafe { ctx.push(op, self.tag) } {
            Ok(()) => {
                self.op = next;
                self.op_frames = frames;
                Ok(true)
            }
            Err(e) if e.0 == libc::EAGAIN => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Fill the iovecs with what the next send takes: the front frame's rest alone when it
    /// goes zero-copy, else frames from the front up to the next zero-copy one. Returns the
    /// iovecs and frames.
    fn gather(&mut self) -> (usize, usize) {
        let (mut n, mut frames, mut bytes) = (0, 0, 0);
        for (i, f) in self.queue.iter().enumerate() {
            let stop = if i == 0 {
                false
            } else {
                f.zero_copy || self.queue[0].zero_copy
            };
            if stop || n + 2 > MAX_IOVECS || bytes >= MAX_SEND_BYTES {
                break;
            }
            let left = f.total() - f.sent;
            debug_assert!(left > 0, "a queued frame with nothing left to send");
            let head_at = f.sent.min(f.head.len());
            let head_left = f.head.len() - head_at;
            if head_left > 0 {
                self.iov[n] = libc::iovec {
                    iov_base: f.head[head_at..].as_ptr() as *mut libc::c_void,
                    iov_len: head_left,
                };
                n += 1;
            }
            let payload_left = left - head_left;
            if payload_left > 0 {
                let at = f.payload_len - payload_left;
                self.iov[n] = libc::iovec {
                    // SAFETY (pointer arithmetic): `at` is within the payload.
                    iov_base: unsafe { f.payload.add(at) } as *mut libc::c_void,
                    iov_len: payload_left,
                };
                n += 1;
            }
            frames += 1;
            bytes += left;
        }
        (n, frames)
    }

    /// A completion of the sender's op: the frames now done, or why the connection failed.
    pub(crate) fn on_complete(&mut self, c: RingCompletion) -> Result<Vec<SendDone>, String> {
        let mut took = match &mut self.op {
            Op::Idle => return Err("a send completion with no send in flight".into()),
            Op::Copy => {
                self.op = Op::Idle;
                self.op_frames = 0;
                if c.result <= 0 {
                    return Err(send_error(c));
                }
                c.result as usize
            }
            Op::ZeroCopy { result_seen, error } => {
                if !*result_seen && !c.is_notification() {
                    *result_seen = true;
                    if c.result == -libc::EOPNOTSUPP {
                        // This socket cannot send without copying (a Unix socket): from now
                        // on every payload is copied.
                        self.zero_copy_refused = true;
                        for f in &mut self.queue {
                            f.zero_copy = false;
                        }
                    } else if c.result < 0 {
                        *error = Some(send_error(c));
                    } else if let Some(f) = self.queue.front_mut() {
                        f.sent += c.result as usize;
                    }
                    if c.more() {
                        return Ok(Vec::new()); // the notification follows
                    }
                }
                let error = error.take();
                self.op = Op::Idle;
                self.op_frames = 0;
                if let Some(e) = error {
                    return Err(e);
                }
                0
            }
        };
        let mut done = Vec::new();
        while let Some(f) = self.queue.front_mut() {
            let take = took.min(f.total() - f.sent);
            f.sent += take;
            took -= take;
            if f.sent < f.total() {
                break;
            }
            done.push(SendDone { seq: f.seq });
            done.extend(f.also.iter().map(|&seq| SendDone { seq }));
            self.queue.pop_front();
        }
        debug_assert_eq!(took, 0, "the socket took more than was offered");
        Ok(done)
    }
}

fn send_error(c: RingCompletion) -> String {
    match c.errno() {
        Some(e) => format!("send failed: {e}"),
        None => "the socket took nothing".into(),
    }
}

#[cfg(test)]
mod tests;
