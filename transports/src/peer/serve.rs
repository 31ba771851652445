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
//! - A data frame (Write, ResyncData, Trim, WriteZeroes) whose range overlaps a request
//!   still in flight waits until that one completed: overlapping frames land in wire order.
//! - The resync (`resync`): at start the replica asks for its own dirty regions for this
//!   primary, ResyncData is written like a Write, ResyncDone adopts the primary's history,
//!   and a Generation is recorded durably before it is acknowledged.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use ringblock_engine::replication::{GenerationHistory, NodeId, PeerState, VolumeReplication};
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
    /// The primary's node id (its dirty regions here are asked for at start), if known.
    pub primary_node: Option<NodeId>,
    /// The primary's generation history from the handshake: adopted, with every Generation
    /// received since, when the primary's ResyncDone arrives.
    pub primary_history: GenerationHistory,
    /// The primary's volume size (from the handshake): a verify sums the same bytes as it.
    pub primary_size_bytes: u64,
}

/// A frame that waits for every request before it to complete, then flushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Flush,
    Generation(u64),
    ResyncDone,
}

mod resync;
mod verify;

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
    /// Engine requests in flight: the frame's seq, type and byte range.
    in_flight: HashMap<u64, (FrameKind, Range<u64>)>,
    /// A Flush, Generation or ResyncDone that waits for the writes before it.
    held: Option<(Seq, Held)>,
    replication: Option<Arc<VolumeReplication>>,
    /// The primary's history as known here: adopted at its ResyncDone.
    primary_history: GenerationHistory,
    /// The primary's ResyncDone arrived: this copy follows its generations.
    adopted: bool,
    /// The ResyncRequests and ResyncDone of the start are queued.
    asked: bool,
    last_heard_ms: u64,
    closing: bool,
    /// A Goodbye is queued: shut the socket down once it is sent.
    shutdown_after_send: bool,
    /// A VerifyRequest being answered: no frame after it is read until it is.
    verify: Option<verify::ServeVerify>,
}

impl ReplicaServe {
    pub fn new(fd: OwnedFd, handle: VolumeHandle, opts: ServeOptions) -> ReplicaServe {
        let socket = ringblock_engine::task::Socket::Fd(fd.as_raw_fd());
        let now = (opts.clock)();
        let replication = handle.volume().replication();
        let primary_history = opts.primary_history.clone();
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
            held: None,
            replication,
            primary_history,
            adopted: false,
            asked: false,
            last_heard_ms: now,
            closing: false,
            shutdown_after_send: false,
            verify: None,
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
        let ack_kind = if matches!(kind, FrameKind::Flush | FrameKind::Generation) {
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
        while self.in_flight.len() < self.opts.max_in_flight.max(1)
            && self.held.is_none()
            && self.verify.is_none()
        {
            let (frame, consumed) = match decode_frame(self.recv.data()) {
                Ok(Decoded::Need(_)) => return Ok(()),
                Err(e) => return Err(format!("bad frame: {e}")),
                Ok(Decoded::Frame { frame, consumed }) => (frame, consumed),
            };
            if frame.volume != self.opts.volume {
                return Err(format!("frame for volume {}", frame.volume));
            }
            let range = self.data_range(&frame.body)?;
            if self
                .in_flight
                .values()
                .any(|(_, r)| r.start < range.end && range.start < r.end)
            {
                // Overlapping frames land in wire order: wait for the one in flight.
                return Ok(());
            }
            self.inbound.accept(&frame).map_err(|e| e.to_string())?;
            let seq = frame.seq;
            let req = match frame.body {
                Body::Goodbye(reason) => {
                    tracing::info!(peer = %self.opts.peer, "the primary said goodbye ({reason:?})");
                    self.recv.consume(consumed);
                    self.close(ctx);
                    return Ok(());
                }
                Body::VerifyRequest { first, count } => {
                    self.recv.consume(consumed);
                    self.on_verify_request(first.0, count)?;
                    self.step_verify(ctx)?;
                    continue;
                }
                Body::Flush | Body::Heartbeat | Body::Generation(_) | Body::ResyncDone { .. } => {
                    None
                }
                ref body => Some(self.engine_request(ctx, body, range.clone())?),
            };
            let kind = frame.body.kind();
            let held = match frame.body {
                Body::Flush => Some(Held::Flush),
                Body::Generation(id) => Some(Held::Generation(id)),
                Body::ResyncDone { .. } => Some(Held::ResyncDone),
                _ => None,
            };
            self.recv.consume(consumed);
            if let Some(held) = held {
                self.held = Some((seq, held));
            }
            if kind == FrameKind::Heartbeat {
                self.inbound
                    .answered(FrameKind::HeartbeatAck, seq)
                    .map_err(|e| e.to_string())?;
                self.send_small(Body::HeartbeatAck { seq })?;
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
                        self.in_flight.insert(seq.0, (kind, range));
                    }
                    Err((_, e)) => self.ack(kind, seq, Err(e))?,
                }
            }
            self.submit_held(ctx)?;
        }
        Ok(())
    }

    /// The engine request a data frame (Write, ResyncData, Trim, WriteZeroes) asks for at
    /// `range`; Err for a range past the volume's end or a frame the primary does not send.
    fn engine_request(
        &self,
        ctx: &TaskCtx<'_>,
        body: &Body<'_>,
        range: Range<u64>,
    ) -> Result<Request, String> {
        if range.end > self.handle.volume().size_bytes() {
            return Err(format!("range at {} past the volume's end", range.start));
        }
        let len = range.end - range.start;
        let write = |data: &[u8], fua: bool| {
            let buf = ctx
                .take_buffer(data.len())
                .map(|mut b| {
                    b.as_mut_slice().copy_from_slice(data);
                    b
                })
                .unwrap_or_else(|| IoBuf::owned(AlignedBuf::from_slice(data)));
            request(RequestKind::Write, range.start, len, fua, Some(buf))
        };
        Ok(match *body {
            Body::Write { data, fua, .. } => write(data, fua),
            Body::ResyncData { data, .. } => write(data, false),
            Body::Trim { .. } => request(RequestKind::Trim, range.start, len, false, None),
            Body::WriteZeroes { .. } => {
                request(RequestKind::WriteZeroes, range.start, len, false, None)
            }
            ref other => return Err(format!("unexpected {:?} frame", other.kind())),
        })
    }

    /// The byte range a data frame writes (empty for other frames). Err: a ResyncData on a
    /// volume that is not replicated here, or whose range overflows.
    fn data_range(&self, body: &Body<'_>) -> Result<Range<u64>, String> {
        let (offset, len) = match *body {
            Body::Write {
                offset_bytes, data, ..
            } => (offset_bytes, data.len() as u64),
            Body::Trim {
                offset_bytes,
                len_bytes,
            }
            | Body::WriteZeroes {
                offset_bytes,
                len_bytes,
            } => (offset_bytes, u64::from(len_bytes)),
            Body::ResyncData {
                region,
                offset_in_region_bytes,
                data,
            } => {
                let shift = self
                    .replication
                    .as_ref()
                    .ok_or("resync data for a volume not replicated here")?
                    .activity
                    .region_shift();
                let offset = region
                    .0
                    .checked_mul(1 << shift)
                    .filter(|o| o >> shift == region.0)
                    .and_then(|o| o.checked_add(u64::from(offset_in_region_bytes)))
                    .ok_or("resync data past the volume's end")?;
                (offset, data.len() as u64)
            }
            _ => return Ok(0..0),
        };
        let end = offset.checked_add(len).ok_or("range overflows")?;
        Ok(offset..end)
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
        self.set_status(PeerState::Behind, Some(reason));
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
        self.set_status(PeerState::Behind, Some("the primary said goodbye"));
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
            let Some((kind, _)) = self.in_flight.remove(&c.tag) else {
                continue;
            };
            if self.closing {
                continue;
            }
            if kind == FrameKind::ResyncDone {
                // Not acknowledged: the adopted history is durable, or the link ends.
                if let Err(e) = c.result {
                    self.fail(ctx, &format!("cannot persist the adopted history: {e}"));
                }
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
        if !self.asked {
            self.asked = true;
            if let Err(e) = self.ask_for_own_dirty_regions() {
                self.fail(ctx, &e);
                return work;
            }
        }
        let step = self
            .submit_held(ctx)
            .and_then(|()| self.step_verify(ctx))
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
            || (!self.closing && self.verify.as_ref().is_some_and(|v| v.ready()))
    }

    fn finished(&self) -> bool {
        self.closing
            && !self.shutdown_after_send
            && self.in_flight.is_empty()
            && !self.sender.busy()
            && !self.recv.busy()
    }
}
