//! Per-region crc32c of a volume's regions, read through the engine from a reactor task: the
//! primary's link and the replica's serve task compute the same sums for a verify batch.
//!
//! The regions `first..first + count` are read in pieces of at most one payload (1 MiB),
//! never across a region's end and never past `end_bytes` (the primary's volume size: the
//! replica's copy may be larger). At most [`MAX_SUM_READS`] reads are in flight; each piece's
//! checksum is folded into its region's in offset order (`crc32c_combine`), so pieces may
//! complete in any order and only their checksums are kept. A region past `end_bytes` sums
//! no bytes (0).

use std::collections::BTreeMap;
use std::sync::Arc;

use ringblock_engine::task::TaskCtx;
use ringblock_engine::{AlignedBuf, IoBuf, Port, PortWaker, Request, RequestKind, VolumeHandle};

use super::MAX_PAYLOAD_BYTES;

/// Most reads in flight for one batch.
pub const MAX_SUM_READS: usize = 8;

pub(super) struct RegionSums {
    first: u64,
    shift: u8,
    /// Where the next piece starts, and where the batch ends (bytes).
    next_bytes: u64,
    end_bytes: u64,
    /// Bytes folded into the sums so far (every piece before it is folded).
    folded_bytes: u64,
    /// Pieces read and not yet folded: offset → (crc, len).
    read: BTreeMap<u64, (u32, u64)>,
    reads: usize,
    sums: Vec<u32>,
    port: Arc<Port>,
}

impl RegionSums {
    /// The sums of regions `first..first + count` of a volume of `end_bytes`.
    pub(super) fn new(
        first: u64,
        count: u32,
        shift: u8,
        end_bytes: u64,
        waker: PortWaker,
    ) -> RegionSums {
        let start = (first << shift).min(end_bytes);
        let end = ((first + u64::from(count)) << shift).min(end_bytes);
        RegionSums {
            first,
            shift,
            next_bytes: start,
            end_bytes: end,
            folded_bytes: start,
            read: BTreeMap::new(),
            reads: 0,
            sums: vec![0; count as usize],
            port: Port::new(MAX_SUM_READS + 1, waker),
        }
    }

    /// Collect the reads done and submit more. Err: a read failed or could not be submitted.
    pub(super) fn step(
        &mut self,
        ctx: &mut TaskCtx<'_>,
        handle: &VolumeHandle,
    ) -> Result<usize, String> {
        let mut work = 0;
        while let Some(c) = self.port.pop() {
            self.reads -= 1;
            work += 1;
            let offset = c.tag;
            c.result
                .map_err(|e| format!("cannot read at {offset} to verify: {e}"))?;
            let data = c.buf.as_ref().map_or(&[][..], |b| b.as_slice());
            self.read
                .insert(offset, (crc32c::crc32c(data), data.len() as u64));
        }
        self.fold();
        while self.reads < MAX_SUM_READS && self.next_bytes < self.end_bytes {
            let region_end = ((self.next_bytes >> self.shift) + 1) << self.shift;
            let len = (self.end_bytes.min(region_end) - self.next_bytes)
                .min(u64::from(MAX_PAYLOAD_BYTES));
            let buf = ctx
                .take_buffer(len as usize)
                .unwrap_or_else(|| IoBuf::owned(AlignedBuf::zeroed(len as usize)));
            let req = Request {
                kind: RequestKind::Read,
                offset_bytes: self.next_bytes,
                len_bytes: len,
                fua: false,
                buf: Some(buf),
                mover: None,
                tag: self.next_bytes,
            };
            ctx.submit(handle, req, &self.port)
                .map_err(|(_, e)| format!("cannot read to verify: {e}"))?;
            self.reads += 1;
            self.next_bytes += len;
            work += 1;
        }
        Ok(work)
    }

    /// Fold the pieces that continue the folded prefix into their regions' sums.
    fn fold(&mut self) {
        while let Some((crc, len)) = self.read.remove(&self.folded_bytes) {
            let i = ((self.folded_bytes >> self.shift) - self.first) as usize;
            self.sums[i] = crc32c::crc32c_combine(self.sums[i], crc, len as usize);
            self.folded_bytes += len;
        }
    }

    /// Every byte is read and folded.
    pub(super) fn done(&self) -> bool {
        self.reads == 0 && self.folded_bytes >= self.end_bytes
    }

    /// Whether a poll has something to do now.
    pub(super) fn ready(&self) -> bool {
        !self.port.is_empty() || (self.reads < MAX_SUM_READS && self.next_bytes < self.end_bytes)
    }

    /// The sums, once [`Self::done`].
    pub(super) fn sums(&self) -> &[u32] {
        debug_assert!(self.done());
        &self.sums
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn combining_piece_sums_in_order_is_the_sum_of_the_whole() {
        let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut sum = 0;
        for piece in data.chunks(1 << 20) {
            sum = crc32c::crc32c_combine(sum, crc32c::crc32c(piece), piece.len());
        }
        assert_eq!(sum, crc32c::crc32c(&data));
        assert_eq!(crc32c::crc32c(&[]), 0, "a region with no bytes sums to 0");
    }
}
