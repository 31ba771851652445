//! The replica's part of an online verify: a VerifyRequest waits until every request before
//! it completed (frames are served in wire order, so its answer covers every write the
//! primary sent before it), then the regions are read and summed ([`RegionSums`]) and the
//! VerifyReply goes back. No frame after the request is read meanwhile, so none lands
//! before the sums are taken. Nothing is written.

use ringblock_engine::task::TaskCtx;

use super::super::body::{encode_checksums, Body};
use super::super::region_sums::RegionSums;
use super::super::RegionIndex as WireRegion;
use super::ReplicaServe;

/// A VerifyRequest being answered.
pub(super) struct ServeVerify {
    first: u64,
    count: u32,
    /// None until every request before it completed.
    sums: Option<RegionSums>,
}

impl ServeVerify {
    /// Whether a poll has something to do now (reads done, or room for more).
    pub(super) fn ready(&self) -> bool {
        self.sums.as_ref().is_some_and(|s| s.ready())
    }
}

impl ReplicaServe {
    /// The primary asks for the sums of `first..first + count`. Err: past the volume's end,
    /// or a volume not replicated here.
    pub(super) fn on_verify_request(&mut self, first: u64, count: u32) -> Result<(), String> {
        let replication = self
            .replication
            .as_ref()
            .ok_or("verify request for a volume not replicated here")?;
        let shift = replication.activity.region_shift();
        let regions = self.handle.volume().size_bytes().div_ceil(1 << shift);
        if first + u64::from(count) > regions {
            return Err(format!(
                "verify request for regions up to {}, past the volume's end",
                first + u64::from(count)
            ));
        }
        self.verify = Some(ServeVerify {
            first,
            count,
            sums: None,
        });
        Ok(())
    }

    /// Start the reads once every request before the VerifyRequest completed, and answer
    /// once they are summed.
    pub(super) fn step_verify(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), String> {
        let Some(verify) = self.verify.as_mut() else {
            return Ok(());
        };
        if verify.sums.is_none() {
            if !self.in_flight.is_empty() || self.held.is_some() {
                return Ok(());
            }
            let replication = self.replication.as_ref().ok_or("not replicated here")?;
            let shift = replication.activity.region_shift();
            // The primary's size: this copy may be larger, and its sums must cover the same
            // bytes as the primary's.
            let end = self
                .opts
                .primary_size_bytes
                .min(self.handle.volume().size_bytes());
            verify.sums = Some(RegionSums::new(
                verify.first,
                verify.count,
                shift,
                end,
                ctx.port_waker(),
            ));
        }
        let Some(sums) = verify.sums.as_mut() else {
            return Ok(());
        };
        sums.step(ctx, &self.handle)?;
        if !sums.done() {
            return Ok(());
        }
        let payload = encode_checksums(sums.sums());
        let first = verify.first;
        self.verify = None;
        self.send_small(Body::VerifyReply {
            first: WireRegion(first),
            checksums: &payload,
        })
    }
}
