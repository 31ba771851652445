//! The replica's side of a link, as a reactor task over an established connection: it
//! decodes the primary's frames as they arrive (a receive buffer of one largest frame),
//! checks their sequence, submits Write / Trim / WriteZeroes / Flush to the local engine with
//! a bounded number in flight (when full it stops reading: the primary's window fills and it
//! stops sending), and acknowledges each when its completion arrives, in completion order.
//!
//! - A Write with FUA is acknowledged when the engine says it is durable.
//! - A Flush waits until every write received before it completed, then flushes: its ack
//!   covers every write the primary sent before it (the primary relies on that to forget
//!   what the replica might lose).
//! - A bad frame (checksum, field, sequence, a range past the volume) ends the connection
//!   with a Goodbye and a logged reason; nothing of it is written.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{AlignedBuf, Errno, IoBuf, Port, Request, RequestKind, VolumeHandle};

use super::body::{decode_frame, encode_frame, Body, Decoded, Frame};
use super::frame::FrameKind;
use super::io::{Clock, FrameSender, RecvBuf};
use super::window::InboundWindow;
use super::{GoodbyeReason, ReplicatedVolumeId, Seq};

/// The replica ends a connection on which nothing arrived for this long (the primary
/// heartbeats more often).
pub const PEER_SILENCE_MS: u64 =
    3 * super::link::HEARTBEAT_INTERVAL_MS + super::link::ACK_TIMEOUT_MS;

const TAG_RECV: u32 = 0;
const TAG_SEND: u32 = 1;

/// How a replica serves a link.
#[derive(Clone)]
pub struct ServeOptions {
    pub volume: ReplicatedVolumeId,
    /// The next sequence numbers each way (from the handshake's `Session`).
    pub send_seq: Seq,
    pub recv_seq: Seq,
    /// Engine requests in flight at most.
    pub max_in_flight: usize,
    pub clock: Clock,
    pub peer: String,
}

/// The replica's link task (see the module).
pub struct ReplicaServe {
    fd: OwnedFd,
    handle: VolumeHandle,
    opts: ServeOptions,
    inbound: InboundWindow,
    next_seq: Option<Seq>,
    sender: FrameSender,
    recv: RecvBuf,
    port: Option<Arc<Port>>,
    /// Engine requests in flight: the frame's seq and type.
    in_flight: HashMap<u64, FrameKind>,
    /// A Flush that waits for the writes before it.
    held_flush: Option<Seq>,
    last_heard_ms: u64,
    closing: bool,
    /// A Goodbye is queued: shut the socket down once it is sent.
    shutdown_after_send: bool,
}

impl ReplicaServe {
    pub fn new(fd: OwnedFd, handle: VolumeHandle, opts: ServeOptions) -> ReplicaServe {
        let socket = ringblock_engine::task::Socket::Fd(fd.as_raw_fd());
        let now = (opts.clock)();
        ReplicaServe {
            inbound: InboundWindow::new(opts.recv_seq),
            next_seq: Some(opts.send_seq),
            sender: FrameSender::new(socket, TAG_SEND),
            recv: RecvBuf::new(socket, TAG_RECV),
            fd,
            handle,
            opts,
            port: None,
            in_flight: HashMap::new(),
            held_flush: None,
            last_heard_ms: now,
            closing: false,
            shutdown_after_send: false,
        }
    }

    fn send_small(&mut self, body: Body<'_>) -> Result<(), String> {
        let seq = self.next_seq.ok_or("sequence numbers exhausted")?;
        self.next_seq = seq.next();
        let mut bytes = Vec::new();
        encode_frame(&Frame::new(seq, self.opts.volume, body), &mut bytes);
        self.sender
            .enqueue(seq.0, bytes, std::ptr::null(), 0, false);
        Ok(())
    }

    fn ack(&mut self, kind: FrameKind, seq: Seq, result: Result<(), Errno>) -> Result<(), String> {
        let ack_kind = if kind == FrameKind::Flush {
            FrameKind::FlushAck
        } else {
            FrameKind::WriteAck
        };
        self.inbound
            .answered(ack_kind, seq)
            .map_err(|e| e.to_string())?;
        let errno = result.err().map_or(0, |e| e.0.clamp(1, 4095) as u32);
        let body = if ack_kind == FrameKind::FlushAck {
            Body::FlushAck { seq, errno }
        } else {
            Body::WriteAck { seq, errno }
        };
        self.send_small(body)
    }

    /// Handle the frames received, while the in-flight bound allows. Err: a protocol error.
    fn on_frames(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), String> {
        while self.in_flight.len() < self.opts.max_in_flight.max(1) && self.held_flush.is_none() {
            let (frame, consumed) = match decode_frame(self.recv.data()) {
                Ok(Decoded::Need(_)) => return Ok(()),
                Err(e) => return Err(format!("bad frame: {e}")),
                Ok(Decoded::Frame { frame, consumed }) => (frame, consumed),
            };
            if frame.volume != self.opts.volume {
                return Err(format!("frame for volume {}", frame.volume));
            }
            self.inbound.accept(&frame).map_err(|e| e.to_string())?;
            let seq = frame.seq;
            let size = self.handle.volume().size_bytes();
            let in_range =
                |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= size);
            let req = match frame.body {
                Body::Write {
                    offset_bytes,
                    fua,
                    data,
                } => {
                    if !in_range(offset_bytes, data.len() as u64) {
                        return Err(format!("write at {offset_bytes} past the volume's end"));
                    }
                    let buf = ctx
                        .take_buffer(data.len())
                        .map(|mut b| {
                            b.as_mut_slice().copy_from_slice(data);
                            b
                        })
                        .unwrap_or_else(|| IoBuf::owned(AlignedBuf::from_slice(data)));
                    Some(request(
                        RequestKind::Write,
                        offset_bytes,
                        data.len() as u64,
                        fua,
                        Some(buf),
                    ))
                }
                Body::Trim {
                    offset_bytes,
                    len_bytes,
                }
                | Body::WriteZeroes {
                    offset_bytes,
                    len_bytes,
                } => {
                    let len = u64::from(len_bytes);
                    if !in_range(offset_bytes, len) {
                        return Err(format!("range at {offset_bytes} past the volume's end"));
                    }
                    let kind = if frame.body.kind() == FrameKind::Trim {
                        RequestKind::Trim
                    } else {
                        RequestKind::WriteZeroes
                    };
                    Some(request(kind, offset_bytes, len, false, None))
                }
                Body::Flush | Body::Heartbeat => None,
                Body::Goodbye(reason) => {
                    tracing::info!(peer = %self.opts.peer, "the primary said goodbye ({reason:?})");
                    self.recv.consume(consumed);
                    self.close(ctx);
                    return Ok(());
                }
                other => return Err(format!("unexpected {:?} frame", other.kind())),
            };
            let kind = frame.body.kind();
            self.recv.consume(consumed);
            match kind {
                FrameKind::Flush => self.held_flush = Some(seq),
                FrameKind::Heartbeat => {
                    self.inbound
                        .answered(FrameKind::HeartbeatAck, seq)
                        .map_err(|e| e.to_string())?;
                    self.send_small(Body::HeartbeatAck { seq })?;
                }
                _ => {}
            }
            if let Some(mut req) = req {
                req.tag = seq.0;
                let port = self
                    .port
                    .as_ref()
                    .expect("port made on the first turn")
                    .clone();
                match ctx.submit(&self.handle, req, &port) {
                    Ok(()) => {
                        self.in_flight.insert(seq.0, kind);
                    }
                    Err((_, e)) => self.ack(kind, seq, Err(e))?,
                }
            }
            self.submit_held_flush(ctx)?;
        }
        Ok(())
    }

    /// Submit the held Flush once every write before it completed.
    fn submit_held_flush(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), String> {
        let Some(seq) = self.held_flush else {
            return Ok(());
        };
        if !self.in_flight.is_empty() {
            return Ok(());
        }
        self.held_flush = None;
        let mut req = request(RequestKind::Flush, 0, 0, false, None);
        req.tag = seq.0;
        let port = self.port.as_ref().expect("port").clone();
        match ctx.submit(&self.handle, req, &port) {
            Ok(()) => {
                self.in_flight.insert(seq.0, FrameKind::Flush);
                Ok(())
            }
            Err((_, e)) => self.ack(FrameKind::Flush, seq, Err(e)),
        }
    }

    fn fail(&mut self, ctx: &mut TaskCtx<'_>, reason: &str) {
        if self.closing {
            return;
        }
        tracing::warn!(
            volume = %self.handle.volume().name,
            peer = %self.opts.peer,
            "replica link closed: {reason}"
        );
        // The Goodbye goes after the frame in flight, if any; the socket shuts down once it
        // is sent (or the send fails).
        self.sender.clear();
        let _ = self.send_small(Body::Goodbye(GoodbyeReason::Protocol));
        self.closing = true;
        self.shutdown_after_send = true;
        self.finish_goodbye(ctx);
    }

    /// Send the Goodbye, then shut the socket down.
    fn finish_goodbye(&mut self, ctx: &mut TaskCtx<'_>) {
        if !self.shutdown_after_send {
            return;
        }
        let sent = match self.sender.pump(ctx) {
            Ok(_) => !self.sender.busy() && self.sender.queued() == 0,
            Err(_) => true,
        };
        if sent {
            self.shutdown_after_send = false;
            ctx.shutdown(self.fd.as_raw_fd());
        }
    }

    fn close(&mut self, ctx: &mut TaskCtx<'_>) {
        self.closing = true;
        self.sender.clear();
        ctx.shutdown(self.fd.as_raw_fd());
    }
}

fn request(kind: RequestKind, offset: u64, len: u64, fua: bool, buf: Option<IoBuf>) -> Request {
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

impl ReactorTask for ReplicaServe {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.port.is_none() {
            let cap = self.opts.max_in_flight.max(1) + 1;
            self.port = Some(Port::new(cap, ctx.port_waker()));
        }
        let mut work = 0;
        let port = self.port.clone().expect("port");
        while let Some(c) = port.pop() {
            work += 1;
            let Some(kind) = self.in_flight.remove(&c.tag) else {
                continue;
            };
            if self.closing {
                continue;
            }
            if let Err(e) = self.ack(kind, Seq(c.tag), c.result) {
                self.fail(ctx, &e);
            }
        }
        if self.closing {
            self.finish_goodbye(ctx);
            return work;
        }
        let now = (self.opts.clock)();
        let silent_ms = now.saturating_sub(self.last_heard_ms);
        if silent_ms >= PEER_SILENCE_MS {
            self.fail(ctx, "the primary went silent");
            return work;
        }
        // Poll again when the silence would be too long, even on a parked reactor.
        ctx.wake_within_ns((PEER_SILENCE_MS - silent_ms).saturating_mul(1_000_000));
        let step = self
            .submit_held_flush(ctx)
            .and_then(|()| self.on_frames(ctx))
            .and_then(|()| {
                if self.in_flight.len() < self.opts.max_in_flight.max(1) {
                    self.recv.arm(ctx)?;
                }
                self.sender.pump(ctx).map(|sent| work += usize::from(sent))
            });
        if let Err(e) = step {
            self.fail(ctx, &e);
        }
        work
    }

    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        let result = if c.tag == TAG_RECV {
            self.last_heard_ms = (self.opts.clock)();
            let received = self.recv.on_complete(c);
            if self.closing {
                return; // nothing more is read from a connection being closed
            }
            received.and_then(|()| self.on_frames(ctx))
        } else {
            self.sender.on_complete(c).map(drop)
        };
        match result {
            Err(_) if self.closing => {
                // The Goodbye could not go: shut down anyway.
                if self.shutdown_after_send && !self.sender.busy() {
                    self.shutdown_after_send = false;
                    ctx.shutdown(self.fd.as_raw_fd());
                }
            }
            Err(e) => self.fail(ctx, &e),
            Ok(()) => self.finish_goodbye(ctx),
        }
    }

    fn stop(&mut self, ctx: &mut TaskCtx<'_>) {
        self.fail(ctx, "the daemon is stopping");
    }

    fn has_ready(&self) -> bool {
        self.port.as_ref().is_some_and(|p| !p.is_empty())
    }

    fn finished(&self) -> bool {
        self.closing
            && !self.shutdown_after_send
            && self.in_flight.is_empty()
            && !self.sender.busy()
            && !self.recv.busy()
    }
}
