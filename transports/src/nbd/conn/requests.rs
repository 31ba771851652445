//! Request bookkeeping: a request's journey from its header to the engine and back (tags of
//! requests in flight, the bounds that hold new ones back, long ranges in parts, FUA).

use std::sync::atomic::Ordering;

use ringblock_engine::task::TaskCtx;
use ringblock_engine::{AlignedBuf, IoBuf, Request, RequestKind};

use super::recv::Payload;
use super::reply::nbd_errno;
use super::validate::validate;
use super::wire::{self, Command};
use super::{
    Connection, State, MAX_BYTES_IN_FLIGHT, MAX_QUEUED_REPLY_BYTES, MAX_REQUESTS_IN_FLIGHT,
};

pub(super) struct Pending {
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) cmd: Command,
    pub(super) flags: u16,
    /// A FUA trim or zero: after it completes, flush.
    pub(super) then_flush: bool,
    pub(super) payload_bytes: u64,
    /// TRIM / WRITE_ZEROES longer than the engine takes at once (the kernel's client sends
    /// the whole device in one TRIM) go in parts of at most [`MAX_RANGE_PART_BYTES`]: bytes
    /// of `len` already done.
    pub(super) done_bytes: u64,
}

/// Largest part of a TRIM / WRITE_ZEROES handed to the engine at once.
pub(super) const MAX_RANGE_PART_BYTES: u64 = ringblock_engine::MAX_REQUEST_BYTES;

impl Pending {
    /// The range of the next engine request for this NBD request.
    pub(super) fn part(&self, kind: RequestKind) -> (u64, u64) {
        match kind {
            RequestKind::Flush => (self.offset, 0),
            RequestKind::Trim | RequestKind::WriteZeroes => {
                debug_assert!(self.done_bytes < self.len, "a part is left to do");
                (
                    self.offset + self.done_bytes,
                    (self.len - self.done_bytes).min(MAX_RANGE_PART_BYTES),
                )
            }
            RequestKind::Read | RequestKind::Write => (self.offset, self.len),
        }
    }
}

/// Requests in the engine: a tag per request, reused.
#[derive(Default)]
pub(super) struct Requests {
    /// By tag; None: the tag is free (and in `free_tags`).
    pub(super) pending: Vec<Option<Pending>>,
    pub(super) free_tags: Vec<u32>,
    pub(super) in_flight: usize,
    /// Payload bytes of the requests in flight.
    pub(super) bytes_in_flight: u64,
}

impl Connection {
    pub(super) fn alloc_tag(&mut self, p: Pending) -> u32 {
        match self.reqs.free_tags.pop() {
            Some(t) => {
                self.reqs.pending[t as usize] = Some(p);
                t
            }
            None => {
                self.reqs.pending.push(Some(p));
                (self.reqs.pending.len() - 1) as u32
            }
        }
    }

    pub(super) fn submit(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        p: Pending,
        kind: RequestKind,
        buf: Option<IoBuf>,
    ) {
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
                self.reqs.in_flight += 1;
                self.reqs.bytes_in_flight += payload;
                // The port has room for this many completions.
                debug_assert!(
                    self.reqs.in_flight <= MAX_REQUESTS_IN_FLIGHT,
                    "in-flight bound"
                );
                self.debug_assert_tags();
            }
            Err((_, e)) => {
                self.reqs.pending[tag as usize] = None;
                self.reqs.free_tags.push(tag);
                self.reply_err(cookie, offset, is_read, nbd_errno(e));
            }
        }
    }

    /// Every tag is either free or a request in flight.
    fn debug_assert_tags(&self) {
        debug_assert_eq!(
            self.reqs.in_flight + self.reqs.free_tags.len(),
            self.reqs.pending.len(),
            "tags: in flight + free = all"
        );
    }

    /// [`validate`] against this connection's export as it is now.
    pub(super) fn validate(&self, req: &wire::Request, cmd: Command) -> Result<(), u32> {
        validate(req, cmd, &self.neg.info, self.handle.volume().size_bytes())
    }

    /// Whether requests are held back: no new ones start (bounds reached, or not running).
    pub(super) fn held_back(&self) -> bool {
        self.state != State::Running
            || self.reqs.in_flight >= MAX_REQUESTS_IN_FLIGHT
            || self.reqs.bytes_in_flight >= MAX_BYTES_IN_FLIGHT
            || self.send.queued_bytes >= MAX_QUEUED_REPLY_BYTES
            || self.over_budget()
    }

    pub(super) fn start(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        req: wire::Request,
        payload: Payload<'_>,
    ) {
        let Some(cmd) = req.command() else {
            self.reply_err(req.cookie, req.offset, false, wire::EINVAL);
            return;
        };
        if cmd != Command::Read {
            // It may change data that gathered replies point at: send those first.
            self.flush_direct(ctx);
        }
        if cmd == Command::Disc {
            tracing::debug!(peer = %self.peer, "client disconnects");
            self.state = State::Draining;
            return;
        }
        if let Err(errno) = self.validate(&req, cmd) {
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
            Command::Read => self.start_read(ctx, &req, p),
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
                    // Allocated zeros are written from a buffer (never fast, at most the max
                    // block size: `validate`).
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

    /// A READ: a hole answered at once, data in memory this reactor owns answered in place,
    /// else an engine read.
    fn start_read(&mut self, ctx: &mut TaskCtx<'_>, req: &wire::Request, mut p: Pending) {
        if self.read_is_hole(req) {
            // Thin volume, nothing written there: one OFFSET_HOLE chunk, no engine IO, no
            // buffer to fill with zeros. (A concurrent write may or may not be seen, as with
            // any read racing a write.)
            self.stats
                .bytes_read
                .fetch_add(req.length, Ordering::Relaxed);
            self.reply_hole(req);
            return;
        }
        p.payload_bytes = req.length;
        let Some(buf) = self.read_in_place(ctx, &p) else {
            return; // answered
        };
        self.submit(ctx, p, RequestKind::Read, Some(buf));
    }

    pub(super) fn on_engine_completion(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        c: ringblock_engine::Completion,
    ) {
        let tag = c.tag as u32;
        let p = self.reqs.pending[tag as usize]
            .take()
            .expect("completion for a pending request");
        self.reqs.free_tags.push(tag);
        self.reqs.in_flight -= 1;
        self.reqs.bytes_in_flight -= p.payload_bytes;
        self.debug_assert_tags();
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
}
