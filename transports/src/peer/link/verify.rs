//! The link's online verify (see `ringblock_engine::replication::verify` for the job, the
//! handoff and why writes racing with a batch never cause a false mismatch).
//!
//! Once the link is up to date it takes the job handed to its `ReplicaLink` and walks the
//! volume in batches of contiguous regions (at most `MAX_VERIFY_BATCH_REGIONS` or
//! `MAX_VERIFY_BATCH_BYTES`, one batch in flight): publish the batch's window, wait for the
//! write barrier, read the regions and sum them ([`RegionSums`]), send a VerifyRequest once
//! every op in the inbox at the barrier is framed (an async replica's writes complete before
//! it has them), and compare the replica's VerifyReply (sent after it applied every frame
//! before the request).
//! Regions writes touched meanwhile go back in a queue and are checked again (at most
//! `MAX_VERIFY_ATTEMPTS` times, then reported busy). With repair, each mismatched region is
//! marked in the replica's dirty bitmap as it is found; at the end the link fails on purpose,
//! so that the connector reconnects and the new link resyncs exactly the dirty bitmap.

use std::collections::VecDeque;
use std::sync::Arc;

use ringblock_engine::replication::status::unix_ms;
use ringblock_engine::replication::verify::{
    MAX_VERIFY_ATTEMPTS, MAX_VERIFY_BATCH_BYTES, MAX_VERIFY_BATCH_REGIONS,
};
use ringblock_engine::replication::{BarrierTicket, RegionIndex, VerifyJob};
use ringblock_engine::task::TaskCtx;

use super::super::body::Body;
use super::super::region_sums::RegionSums;
use super::super::RegionIndex as WireRegion;
use super::resync::ResyncPhase;
use super::{PrimaryLink, ACK_TIMEOUT_MS};

/// A VerifyRequest not answered after this long fails the link (the replica answers after
/// reading at most one batch).
pub const VERIFY_REPLY_TIMEOUT_MS: u64 = 2 * ACK_TIMEOUT_MS;

enum Stage {
    /// The window is published; waiting for the writes before it.
    Barrier(BarrierTicket),
    /// Reading and summing; the request goes once `next_op` reaches `ops_before` (see
    /// [`PrimaryLink::step_verify`]).
    Reading { sums: RegionSums, ops_before: u64 },
    /// The request is sent: the local sums, and when.
    Sent { sums: Vec<u32>, sent_ms: u64 },
}

struct Batch {
    first: u64,
    count: u32,
    /// Batches these regions were in before (touched by writes each time).
    attempt: u8,
    stage: Stage,
}

#[derive(Default)]
pub(super) struct Verify {
    job: Option<Arc<VerifyJob>>,
    /// The next region no batch took yet, and the volume's regions.
    cursor: u64,
    end: u64,
    /// Runs of touched regions to check again: (first, count, attempts so far). They come
    /// from one batch (new regions are taken only when it is empty), so it holds at most
    /// `MAX_VERIFY_BATCH_REGIONS` regions.
    retry: VecDeque<(u64, u32, u8)>,
    batch: Option<Batch>,
    mismatches: u64,
}

impl Verify {
    /// Whether a poll has something to do now.
    pub(super) fn wants_poll(&self) -> bool {
        match self.batch.as_ref().map(|b| &b.stage) {
            Some(Stage::Barrier(_)) => true,
            Some(Stage::Reading { sums, .. }) => sums.ready(),
            Some(Stage::Sent { .. }) => false,
            None => self.job.is_some(),
        }
    }
}

impl PrimaryLink {
    /// One step of the verify: take a job, start, read, send, finish.
    pub(super) fn step_verify(&mut self, ctx: &mut TaskCtx<'_>, now: u64) -> Result<usize, String> {
        if self.resync.phase != ResyncPhase::Done || self.broken.is_some() {
            return Ok(0);
        }
        if self.verify.job.is_none() && !self.take_verify_job() {
            return Ok(0);
        }
        let (shift, size) = (self.region_shift(), self.handle.volume().size_bytes());
        let Some(batch) = self.verify.batch.as_mut() else {
            return Ok(self.next_verify_batch());
        };
        match &mut batch.stage {
            Stage::Barrier(ticket) => {
                if !self.link.replication().barrier.passed(ticket) {
                    return Ok(0);
                }
                let sums = RegionSums::new(batch.first, batch.count, shift, size, ctx.port_waker());
                // Every write that did not see the window completed locally, and its op was
                // pushed before its local part went out: it is in the inbox now or was
                // taken. The ops taken from here on are numbered from `next_op`.
                let ops_before = self.next_op + self.link.inbox_len() as u64;
                batch.stage = Stage::Reading { sums, ops_before };
                Ok(1)
            }
            Stage::Reading { sums, ops_before } => {
                let work = sums.step(ctx, &self.handle)?;
                // The request follows every frame of those ops on the wire (an async op's
                // write completes before the replica has it).
                // Ops are cut one after the other: those before the one being cut are whole.
                let ops_framed = self.next_op >= *ops_before
                    && self.cutting.is_none_or(|(id, _)| id >= *ops_before);
                if !sums.done() || !ops_framed {
                    return Ok(work);
                }
                let sums = sums.sums().to_vec();
                let (first, count) = (batch.first, batch.count);
                batch.stage = Stage::Sent { sums, sent_ms: now };
                self.frame_small(
                    Body::VerifyRequest {
                        first: WireRegion(first),
                        count,
                    },
                    None,
                    now,
                );
                Ok(work + 1)
            }
            Stage::Sent { sent_ms, .. } => {
                if now.saturating_sub(*sent_ms) >= VERIFY_REPLY_TIMEOUT_MS {
                    return Err("no verify reply in time".into());
                }
                Ok(0)
            }
        }
    }

    /// Take the job handed over, if any, and start it.
    fn take_verify_job(&mut self) -> bool {
        let Some(job) = self.link.take_verify() else {
            return false;
        };
        let shift = self.region_shift();
        let end = self.handle.volume().size_bytes().div_ceil(1 << shift);
        if !job.begin(end) {
            return false; // ended before it was taken
        }
        tracing::info!(volume = %self.handle.volume().name, peer = %self.opts.peer,
            repair = job.repair(), "verify started");
        self.verify = Verify {
            job: Some(job),
            end,
            ..Verify::default()
        };
        true
    }

    /// Start the next batch: touched regions first, then the next regions in order; at the
    /// end, finish the job.
    fn next_verify_batch(&mut self) -> usize {
        let region_bytes = 1u64 << self.region_shift();
        let v = &mut self.verify;
        let (first, count, attempt) = if let Some(retry) = v.retry.pop_front() {
            retry
        } else if v.cursor < v.end {
            let by_bytes = (MAX_VERIFY_BATCH_BYTES / region_bytes).max(1);
            let count = (v.end - v.cursor)
                .min(u64::from(MAX_VERIFY_BATCH_REGIONS))
                .min(by_bytes) as u32;
            let first = v.cursor;
            v.cursor += u64::from(count);
            (first, count, 0)
        } else {
            self.finish_verify();
            return 1;
        };
        // Published before the ticket: a write either sees it or the ticket waits for it.
        self.link.verify_regions_begin(RegionIndex(first), count);
        let ticket = self.link.replication().barrier.ticket();
        self.verify.batch = Some(Batch {
            first,
            count,
            attempt,
            stage: Stage::Barrier(ticket),
        });
        1
    }

    /// The replica's checksums of `first..first + sums.len()`.
    pub(super) fn on_verify_reply(&mut self, first: u64, remote: &[u32]) -> Result<(), String> {
        let batch = match self.verify.batch.take() {
            Some(b) if b.first == first && b.count as usize == remote.len() => b,
            other => {
                self.verify.batch = other;
                return Err(format!("unexpected verify reply for region {first}"));
            }
        };
        let Stage::Sent { sums, .. } = &batch.stage else {
            return Err(format!(
                "verify reply for region {first} before its request"
            ));
        };
        let touched = self.link.verify_regions_end();
        let Some(job) = self.verify.job.clone() else {
            return Ok(());
        };
        let volume = self.handle.volume().clone();
        let size = volume.size_bytes();
        let shift = self.region_shift();
        let mut run: Option<(u64, u32)> = None;
        for (i, (&local, &replica)) in sums.iter().zip(remote).enumerate() {
            let region = first + i as u64;
            let start = region << shift;
            let end = ((region + 1) << shift).min(size);
            if touched & (1 << i) != 0 {
                if batch.attempt + 1 >= MAX_VERIFY_ATTEMPTS {
                    job.busy(start..end);
                } else {
                    match &mut run {
                        Some((f, n)) if *f + u64::from(*n) == region => *n += 1,
                        _ => {
                            if let Some((f, n)) = run.take() {
                                self.verify.retry.push_back((f, n, batch.attempt + 1));
                            }
                            run = Some((region, 1));
                        }
                    }
                }
                continue;
            }
            job.checked(end - start);
            if local != replica {
                job.mismatch(start..end);
                self.verify.mismatches += 1;
                self.link.replication().replicas()[self.link.index()]
                    .status
                    .add_verify_mismatch();
                tracing::warn!(volume = %volume.name, peer = %self.opts.peer,
                    offset_bytes = start, len_bytes = end - start, "verify: region differs");
                if job.repair() {
                    self.link.mark_lacking(&volume, start, end - start);
                }
            }
        }
        if let Some((f, n)) = run {
            self.verify.retry.push_back((f, n, batch.attempt + 1));
        }
        Ok(())
    }

    /// Every region is checked. With repair and mismatches, the link fails on purpose: the
    /// next link resyncs the regions marked.
    fn finish_verify(&mut self) {
        let Some(job) = self.verify.job.take() else {
            return;
        };
        let repaired = job.repair() && self.verify.mismatches > 0;
        let s = job.snapshot();
        tracing::info!(volume = %self.handle.volume().name, peer = %self.opts.peer,
            regions = s.regions_checked, mismatched = s.mismatched_regions,
            busy = s.busy_regions, repaired, "verify finished");
        job.finish(repaired, unix_ms());
        if repaired {
            self.broken = Some(format!(
                "verify found {} mismatched regions; reconnecting to resync them",
                self.verify.mismatches
            ));
        }
    }

    /// The link fails: the job (running or handed over) ends with `reason`.
    pub(super) fn abort_verify(&mut self, reason: &str) {
        if self.verify.batch.take().is_some() {
            self.link.verify_regions_end();
        }
        let now = unix_ms();
        if let Some(job) = self.verify.job.take() {
            job.fail(&format!("the link failed: {reason}"), now);
        }
        while let Some(job) = self.link.take_verify() {
            job.fail(&format!("the link failed: {reason}"), now);
        }
    }
}
