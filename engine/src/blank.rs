//! Whether a device without a label is really blank, before `format = "if-blank"` writes a
//! fresh label on it. A zeroed label with intact metadata slots or data behind it is a damaged
//! device, not a new one.
//!
//! The scan is bounded: it reads every allocated byte (all of it when the backend cannot say
//! what is allocated) up to [`FULL_SCAN_BYTES`], then only the first 4 KiB of each chunk of the
//! planned layout, at most [`CHUNK_SAMPLES`] of them. On a sparse file (regular files and
//! `bbram` report their extents with `SEEK_DATA`/`SEEK_HOLE`) only allocated extents are
//! visited, at most [`MAX_EXTENTS`] of them, so a new sparse file of any size costs a few
//! system calls.

use crate::loader::SyncAccess;
use crate::meta::{Label, MetaError, MetaSnapshot, LABEL_BYTES};

/// Bytes read in full before the scan falls back to sampling chunk heads.
pub const FULL_SCAN_BYTES: u64 = 64 << 20;
/// Chunk heads sampled after the full-scan budget is spent.
pub const CHUNK_SAMPLES: u64 = 65_536;
/// Allocated extents visited on a sparse file.
pub const MAX_EXTENTS: usize = 65_536;
/// Most bytes of each metadata slot read to decode it (slots of huge devices with small
/// chunks run to gigabytes).
const SLOT_READ_BYTES: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const READ_BYTES: u64 = 1 << 20;

/// What makes the device not blank, for the operator (empty = blank as far as the bounded
/// scan can tell).
pub(crate) fn find_non_blank(
    access: &mut dyn SyncAccess,
    size_bytes: u64,
    plan: &Label,
) -> std::io::Result<Vec<String>> {
    let mut findings = Vec::new();
    for slot in 0..2u64 {
        let offset = plan.slot_offset_bytes(slot);
        if offset + plan.slot_bytes > size_bytes {
            continue;
        }
        // A slot's header and a small payload are at its start; a larger payload read in part
        // fails to decode, which is reported too.
        let mut buf = vec![0u8; plan.slot_bytes.min(SLOT_READ_BYTES) as usize];
        access.read_at(offset, &mut buf)?;
        match MetaSnapshot::decode(&buf) {
            Ok(s) => findings.push(format!(
                "metadata slot {slot} (at byte {offset}) holds generation {} with {} volume(s)",
                s.generation,
                s.volumes.len()
            )),
            Err(MetaError::CorruptSlot(m)) if m != "bad magic" => findings.push(format!(
                "metadata slot {slot} (at byte {offset}) holds ringblock metadata that does not \
                 decode ({m})"
            )),
            Err(_) => {}
        }
    }
    if !findings.is_empty() {
        return Ok(findings); // metadata says enough; its bytes would be the first "data" too
    }
    // Scan only whole 4 KiB blocks (O_DIRECT); a partial last block is not looked at.
    let end = size_bytes / BLOCK * BLOCK;
    let ranges = match access.allocated_ranges(0..end, MAX_EXTENTS)? {
        Some(r) => r,
        None => std::iter::once(0..end).collect(),
    };
    if let Some(at) = first_non_zero(access, &ranges, end, plan)? {
        findings.push(format!("non-zero data at byte {at}"));
    }
    Ok(findings)
}

/// The first non-zero byte found in `ranges` under the scan's bounds.
fn first_non_zero(
    access: &mut dyn SyncAccess,
    ranges: &[std::ops::Range<u64>],
    end: u64,
    plan: &Label,
) -> std::io::Result<Option<u64>> {
    let mut budget = FULL_SCAN_BYTES;
    let mut samples = CHUNK_SAMPLES;
    let mut buf = vec![0u8; READ_BYTES as usize];
    for r in ranges {
        let mut pos = r.start / BLOCK * BLOCK;
        let stop = r.end.div_ceil(BLOCK).saturating_mul(BLOCK).min(end);
        while pos < stop {
            if budget > 0 {
                let n = (stop - pos).min(READ_BYTES).min(budget);
                let n = (n / BLOCK * BLOCK).max(BLOCK).min(stop - pos);
                access.read_at(pos, &mut buf[..n as usize])?;
                if let Some(i) = buf[..n as usize].iter().position(|&b| b != 0) {
                    return Ok(Some(pos + i as u64));
                }
                budget = budget.saturating_sub(n);
                pos += n;
                continue;
            }
            // Sampling: the first block of the chunk holding `pos`, or of the next one.
            if samples == 0 {
                return Ok(None);
            }
            let head = chunk_head_at_or_after(plan, pos);
            if head >= stop {
                break;
            }
            samples -= 1;
            access.read_at(head, &mut buf[..BLOCK as usize])?;
            if let Some(i) = buf[..BLOCK as usize].iter().position(|&b| b != 0) {
                return Ok(Some(head + i as u64));
            }
            pos = head + plan.chunk_size_bytes;
        }
    }
    Ok(None)
}

/// The start of the first chunk (of the planned layout) at or after `pos`; the label area
/// and metadata slots count as starting at 0.
fn chunk_head_at_or_after(plan: &Label, pos: u64) -> u64 {
    if pos <= LABEL_BYTES.min(plan.data_offset_bytes) {
        return pos;
    }
    if pos <= plan.data_offset_bytes {
        return plan.data_offset_bytes;
    }
    let rel = pos - plan.data_offset_bytes;
    plan.data_offset_bytes + rel.div_ceil(plan.chunk_size_bytes) * plan.chunk_size_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device in memory, optionally reporting extents.
    struct Mem {
        bytes: Vec<u8>,
        extents: Option<Vec<std::ops::Range<u64>>>,
        reads: u64,
    }

    impl SyncAccess for Mem {
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.reads += buf.len() as u64;
            let o = offset as usize;
            buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
            unreachable!("the scan never writes")
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn allocated_ranges(
            &mut self,
            _: std::ops::Range<u64>,
            _: usize,
        ) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
            Ok(self.extents.clone())
        }
    }

    #[test]
    fn zeros_are_blank_and_slots_or_data_are_not() {
        let size = 64 << 20;
        let plan = Label::plan(1, size, 1 << 20).unwrap();
        let mut m = Mem {
            bytes: vec![0; size as usize],
            extents: None,
            reads: 0,
        };
        assert!(find_non_blank(&mut m, size, &plan).unwrap().is_empty());
        // An intact slot behind a zeroed label.
        let slot = MetaSnapshot {
            generation: 7,
            volumes: vec![],
        }
        .encode(plan.slot_bytes)
        .unwrap();
        let off = plan.slot_offset_bytes(1) as usize;
        m.bytes[off..off + slot.len()].copy_from_slice(&slot);
        let f = find_non_blank(&mut m, size, &plan).unwrap();
        assert!(
            f.iter()
                .any(|s| s.contains("slot 1") && s.contains("generation 7")),
            "{f:?}"
        );
        // Data only, in the last chunk.
        let mut m = Mem {
            bytes: vec![0; size as usize],
            extents: None,
            reads: 0,
        };
        m.bytes[size as usize - 5000] = 1;
        let f = find_non_blank(&mut m, size, &plan).unwrap();
        assert_eq!(f, vec![format!("non-zero data at byte {}", size - 5000)]);
    }

    #[test]
    fn extents_bound_what_is_read() {
        let size = 256 << 20;
        let plan = Label::plan(1, size, 1 << 20).unwrap();
        let mut m = Mem {
            bytes: vec![0; size as usize],
            extents: Some(vec![0..4096, (200 << 20)..(200 << 20) + 8192]),
            reads: 0,
        };
        assert!(find_non_blank(&mut m, size, &plan).unwrap().is_empty());
        // Two slots plus the two extents, not the whole device.
        assert!(m.reads <= 2 * plan.slot_bytes + 4096 + 8192, "{}", m.reads);
        m.bytes[(200 << 20) + 100] = 9;
        let f = find_non_blank(&mut m, size, &plan).unwrap();
        assert_eq!(
            f,
            vec![format!("non-zero data at byte {}", (200 << 20) + 100)]
        );
    }

    #[test]
    fn past_the_budget_chunk_heads_are_sampled() {
        let chunk = 1 << 20;
        let size = FULL_SCAN_BYTES + 32 * chunk;
        let plan = Label::plan(1, size, chunk).unwrap();
        let mut m = Mem {
            bytes: vec![0; size as usize],
            extents: None,
            reads: 0,
        };
        // The head of a chunk past the budget is seen; its middle is not (the documented bound).
        let head = plan.chunk_offset_bytes(crate::ids::PhysChunk(
            ((FULL_SCAN_BYTES - plan.data_offset_bytes) / chunk + 10) as u32,
        ));
        m.bytes[(head + chunk / 2) as usize] = 1;
        assert!(find_non_blank(&mut m, size, &plan).unwrap().is_empty());
        m.bytes[(head + 10) as usize] = 1;
        let f = find_non_blank(&mut m, size, &plan).unwrap();
        assert_eq!(f, vec![format!("non-zero data at byte {}", head + 10)]);
    }
}
