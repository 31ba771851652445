//! Building replies: simple or structured (extended) headers, read data as segments of the
//! reply or answered in place from the device's memory, holes, errors and block status.

use std::sync::atomic::Ordering;

use ringblock_engine::task::TaskCtx;
use ringblock_engine::{Errno, IoBuf};

use super::requests::Pending;
use super::send::{DirectReply, OutMsg, Segment, MAX_DIRECT_REPLIES};
use super::wire::{self, Extent, ReplyTarget, SimpleReply};
use super::Connection;

/// Reads up to this size that a reactor serves from memory are copied right behind their
/// reply header: the reply goes out as one contiguous piece.
pub(super) const INLINE_READ_MAX_BYTES: usize = 8 << 10;

pub(super) fn nbd_errno(e: Errno) -> u32 {
    match e.0 {
        libc::EPERM => wire::EPERM,
        libc::EIO => wire::EIO,
        libc::ENOMEM => wire::ENOMEM,
        libc::EINVAL => wire::EINVAL,
        // A quota is a full disk to the client: it may free space and retry.
        libc::ENOSPC | libc::EDQUOT => wire::ENOSPC,
        libc::EOVERFLOW => wire::EOVERFLOW,
        libc::EOPNOTSUPP => wire::ENOTSUP,
        libc::ESHUTDOWN => wire::ESHUTDOWN,
        _ => wire::EIO,
    }
}

impl Connection {
    pub(super) fn reply_ok(&mut self, p: &Pending) {
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

    pub(super) fn target(&self, p: &Pending) -> ReplyTarget {
        ReplyTarget {
            cookie: p.cookie,
            offset: p.offset,
            extended: self.extended(),
        }
    }

    pub(super) fn reply_err(&mut self, cookie: u64, offset: u64, cmd_is_read: bool, errno: u32) {
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
    pub(super) fn read_is_hole(&mut self, req: &wire::Request) -> bool {
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

    /// A READ of a range with nothing allocated: one OFFSET_HOLE chunk.
    pub(super) fn reply_hole(&mut self, req: &wire::Request) {
        let mut b = Vec::with_capacity(48);
        let t = ReplyTarget {
            cookie: req.cookie,
            offset: req.offset,
            extended: self.extended(),
        };
        t.encode_offset_hole(&mut b, wire::REPLY_FLAG_DONE, req.offset, req.length as u32);
        self.queue(OutMsg::bytes_only(b));
    }

    pub(super) fn reply_read(&mut self, p: &Pending, data: IoBuf) {
        let len = data.len();
        let mut msg = self.new_msg(Some(data));
        if !self.structured() {
            SimpleReply {
                error: 0,
                cookie: p.cookie,
            }
            .encode(&mut msg.bytes);
            msg.push_bytes_from(0);
            msg.segs.push(Segment::Data { start: 0, len });
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
                msg.push_bytes_from(start);
                msg.segs.push(Segment::Data {
                    start: pos as usize,
                    len: run_len as usize,
                });
            } else {
                t.encode_offset_hole(&mut msg.bytes, flags, p.offset + pos, run_len as u32);
                msg.push_bytes_from(start);
            }
            pos += run_len;
        }
        self.runs = runs;
        self.queue(msg);
    }

    /// Answer a READ from memory this reactor owns, with no engine request: a small one is
    /// copied straight behind its reply header (one contiguous send), a larger one into an IO
    /// buffer. None when answered; otherwise the buffer to submit the read with.
    pub(super) fn read_in_place(&mut self, ctx: &mut TaskCtx<'_>, p: &Pending) -> Option<IoBuf> {
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
            let gather = self.may_send_direct() && self.send.direct.len() < MAX_DIRECT_REPLIES;
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
                            self.send.direct.push(DirectReply {
                                msg,
                                data,
                                len,
                                data_epoch: ctx.data_epoch(),
                            });
                            if self.send.direct.len() == MAX_DIRECT_REPLIES {
                                self.flush_direct(ctx);
                            }
                        }
                        None => {
                            msg.push_bytes_from(0);
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

    pub(super) fn reply_block_status(
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
}

#[cfg(test)]
mod errno_tests {
    use super::*;

    #[test]
    fn a_full_disk_or_quota_is_enospc_and_the_unknown_is_eio() {
        assert_eq!(nbd_errno(Errno(libc::ENOSPC)), wire::ENOSPC);
        assert_eq!(nbd_errno(Errno(libc::EDQUOT)), wire::ENOSPC);
        assert_eq!(nbd_errno(Errno(libc::EROFS)), wire::EIO);
    }
}
