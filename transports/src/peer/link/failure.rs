//! A failed link's way out (see the parent module): mark what the replica may lack before
//! leaving the fan-out, wait for submitters and ring ops, flush the marks, then hand every
//! waiting op back.

use std::os::fd::AsRawFd;

use ringblock_engine::replication::{PeerState, ReplicaOpKind};
use ringblock_engine::task::TaskCtx;
use ringblock_engine::{Errno, Port, Request};

use super::{Phase, PrimaryLink, TAG_FLUSH_PORT};

impl PrimaryLink {
    pub(super) fn fail(&mut self, ctx: &mut TaskCtx<'_>, reason: &str) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let volume = self.handle.volume().clone();
        tracing::warn!(volume = %volume.name, peer = %self.opts.peer, "replica link failed: {reason}");
        self.abort_verify(reason);
        // Mark what the replica may lack *before* leaving the fan-out: from then on a
        // client's flush no longer waits for this replica, so the marks must already be
        // there for its metadata round to take.
        let shift = self.region_shift();
        for entry in self.ops.values() {
            if entry.op.kind() != ReplicaOpKind::Flush {
                let op = &entry.op;
                self.link
                    .mark_lacking(&volume, op.offset_bytes(), op.len_bytes());
            }
        }
        let resyncing = self.resync.unacknowledged();
        for r in self
            .unflushed
            .iter()
            .chain(&self.flushing)
            .copied()
            .chain(resyncing)
        {
            self.link.mark_lacking(&volume, r << shift, 1 << shift);
        }
        self.link.fall_behind();
        if self.link.take_dropped_out() {
            // The set of up-to-date replicas changed (here, or when the fan-out found the
            // inbox or an async queue full): a new generation, and the replica's `since` is
            // the one it was last up to date in.
            let replication = self.link.replication();
            let replica = &replication.replicas()[self.link.index()];
            if replica.since().is_none() {
                replica.set_since(replication.history().current());
                replication.start_generation();
            }
            volume.replication_changed();
        }
        // Behind now, so writes mark every region: none is in the resync's hands.
        self.link.resync_regions_clear();
        let replica = &self.link.replication().replicas()[self.link.index()];
        replica.status.set(PeerState::Behind, Some(reason));
        ctx.shutdown(self.fd.as_raw_fd());
        self.sender.clear();
        self.phase = Phase::Failing {
            orphans: Vec::new(),
            flush_sent: false,
        };
    }

    /// The failing link's steps: collect every op, mark what the replica may lack, flush,
    /// then hand the ops back.
    pub(super) fn step_failing(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let volume = self.handle.volume().clone();
        let Phase::Failing {
            orphans,
            flush_sent,
        } = &mut self.phase
        else {
            return 0;
        };
        let mut work = 0;
        // Ops whose pages the kernel may still read wait for their send to end.
        if !self.sender.busy() {
            self.pending.clear();
            self.resync.clear();
            self.cutting = None;
            orphans.extend(std::mem::take(&mut self.ops).into_values().map(|e| e.op));
        }
        if *flush_sent
            || self.sender.busy()
            || self.recv.busy()
            || !self.pending.is_empty()
            || !self.link.pushers_gone()
        {
            return work;
        }
        // No submitter is pushing, and every later one sees the link behind: after this
        // drain no op can reach the inbox (see `replication::fanout`).
        while let Some(op) = self.link.pop() {
            orphans.push(op);
            work += 1;
        }
        // Ops taken from the inbox after the failure (pending ones are marked already).
        for op in orphans.iter() {
            if op.kind() != ReplicaOpKind::Flush {
                self.link
                    .mark_lacking(&volume, op.offset_bytes(), op.len_bytes());
            }
        }
        // Every range the replica may lack is marked (the flush below persists them).
        self.link.note_failure_settled();
        let flush = Request::flush(TAG_FLUSH_PORT);
        let port = self
            .port
            .get_or_insert_with(|| Port::new(1, ctx.port_waker()))
            .clone();
        if let Err((_, e)) = ctx.submit(&self.handle, flush, &port) {
            tracing::error!(volume = %volume.name, "cannot flush the replica's dirty marks: {e}");
            self.finish_orphans(ctx, Err(e));
            return work + 1;
        }
        *flush_sent = true;
        work + 1
    }

    pub(super) fn finish_orphans(&mut self, ctx: &mut TaskCtx<'_>, result: Result<(), Errno>) {
        let Phase::Failing { orphans, .. } = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        // What the replica lacks is in its bitmap now; nothing waits on this link.
        let replica = &self.link.replication().replicas()[self.link.index()];
        replica.status.lag.set_oldest(None);
        for op in orphans {
            if let (Err(e), ReplicaOpKind::Flush) = (result, op.kind()) {
                // The marks that stand for this replica are not durable: the flush fails.
                op.fail(e);
            }
            ctx.replica_done(op);
        }
    }
}
