//! A dirty-region bitmap: one bit per region of a volume, set when a write reaches the local
//! copy but not a replica, cleared when the region is resynced.
//!
//! The bits are atomics, so any reactor marks the regions its chunks' writes touch with one
//! `fetch_or` per 64 regions and no lock, and the device's home reactor snapshots them into
//! the metadata round while writes go on (a bit set during the snapshot is either in it or
//! makes the next round; a bit cleared during it stays set on disk one round longer: the
//! persisted copy is only ever a superset of what is missing).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ReplicationError;

/// Smallest region: one 4 KiB block.
pub const MIN_REGION_SHIFT: u8 = 12;
/// Largest region: 1 TiB.
pub const MAX_REGION_SHIFT: u8 = 40;
/// Default region: 1 MiB.
pub const DEFAULT_REGION_SHIFT: u8 = 20;
/// Most regions one bitmap covers (2 MiB of bits): a volume that needs more must use larger
/// regions.
pub const MAX_REGIONS: u64 = 1 << 24;

/// A region of a volume: byte offset / region size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionIndex(pub u64);

#[derive(Debug)]
pub struct DirtyBitmap {
    region_shift: u8,
    /// Regions covered: the volume's largest possible size, so growing never reallocates.
    regions: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// A clean bitmap for a volume of at most `capacity_bytes`, one bit per `2^region_shift`
    /// bytes.
    pub fn new(capacity_bytes: u64, region_shift: u8) -> Result<DirtyBitmap, ReplicationError> {
        let regions = region_count(capacity_bytes, region_shift)?;
        Ok(DirtyBitmap {
            region_shift,
            regions,
            words: (0..regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    pub fn region_shift(&self) -> u8 {
        self.region_shift
    }

    pub fn region_bytes(&self) -> u64 {
        1 << self.region_shift
    }

    /// Regions covered.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The regions `offset_bytes..offset_bytes + len_bytes` touches (clipped to the bitmap).
    pub fn regions_of(&self, offset_bytes: u64, len_bytes: u64) -> Range<u64> {
        if len_bytes == 0 {
            return 0..0;
        }
        let first = offset_bytes >> self.region_shift;
        let last = offset_bytes.saturating_add(len_bytes - 1) >> self.region_shift;
        first.min(self.regions)..(last + 1).min(self.regions)
    }

    /// Mark every region the byte range touches. True when at least one was clean (the
    /// persisted copy then needs a metadata round).
    pub fn mark_bytes(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.mark_regions(self.regions_of(offset_bytes, len_bytes))
    }

    /// Mark regions `range` (clipped). True when at least one was clean.
    pub fn mark_regions(&self, range: Range<u64>) -> bool {
        let mut newly = false;
        self.for_words(range, |word, mask| {
            newly |= word.fetch_or(mask, Ordering::AcqRel) & mask != mask;
        });
        newly
    }

    /// Clear one region (resynced). True when it was dirty.
    pub fn clear(&self, region: RegionIndex) -> bool {
        if region.0 >= self.regions {
            return false;
        }
        let bit = 1u64 << (region.0 % 64);
        self.words[(region.0 / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Clear every region.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    pub fn is_dirty(&self, region: RegionIndex) -> bool {
        region.0 < self.regions
            && self.words[(region.0 / 64) as usize].load(Ordering::Acquire) & (1 << (region.0 % 64))
                != 0
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: RegionIndex) -> Option<RegionIndex> {
        if from.0 >= self.regions {
            return None;
        }
        let mut w = (from.0 / 64) as usize;
        let mut bits = self.words[w].load(Ordering::Acquire) & (!0u64 << (from.0 % 64));
        loop {
            if bits != 0 {
                let r = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return (r < self.regions).then_some(RegionIndex(r));
            }
            w += 1;
            bits = self.words.get(w)?.load(Ordering::Acquire);
        }
    }

    /// Dirty regions in order.
    pub fn iter_dirty(&self) -> impl Iterator<Item = RegionIndex> + '_ {
        let mut at = Some(RegionIndex(0));
        std::iter::from_fn(move || {
            let r = self.next_dirty(at?)?;
            at = r.0.checked_add(1).map(RegionIndex);
            Some(r)
        })
    }

    pub fn dirty_regions(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Bytes of a volume of `size_bytes` in dirty regions (the last region may be partial).
    pub fn dirty_bytes(&self, size_bytes: u64) -> u64 {
        self.iter_dirty()
            .map(|r| {
                let start = r.0 << self.region_shift;
                size_bytes.saturating_sub(start).min(self.region_bytes())
            })
            .sum()
    }

    /// Dirty regions as runs `start..end`, in order, adjacent regions merged.
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for r in self.iter_dirty() {
            match runs.last_mut() {
                Some(last) if last.end == r.0 => last.end += 1,
                _ => runs.push(r.0..r.0 + 1),
            }
        }
        runs
    }

    /// Call `f(word, mask)` for each word `range` (clipped) touches.
    fn for_words(&self, range: Range<u64>, mut f: impl FnMut(&AtomicU64, u64)) {
        let (start, end) = (range.start, range.end.min(self.regions));
        let mut r = start;
        while r < end {
            let w = r / 64;
            let lo = r % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                !0
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&self.words[w as usize], mask);
            r = w * 64 + hi;
        }
    }
}

/// Regions a bitmap needs for `capacity_bytes`, or why it cannot be made.
pub fn region_count(capacity_bytes: u64, region_shift: u8) -> Result<u64, ReplicationError> {
    if !(MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(&region_shift) {
        return Err(ReplicationError::RegionSize(region_shift));
    }
    let regions = capacity_bytes.div_ceil(1 << region_shift);
    if regions > MAX_REGIONS {
        let needed_bytes = capacity_bytes.div_ceil(MAX_REGIONS).next_power_of_two();
        return Err(ReplicationError::TooManyRegions {
            capacity_bytes,
            region_bytes: 1 << region_shift,
            regions,
            needed_bytes,
        });
    }
    Ok(regions)
}

/// `runs` (sorted, disjoint) merged across the smallest gaps until at most `max_runs` remain:
/// every region of `runs` stays covered, a few clean ones between them join (a resync then
/// copies them too; nothing is ever left out).
pub fn coarsen(mut runs: Vec<Range<u64>>, max_runs: usize) -> Vec<Range<u64>> {
    debug_assert!(max_runs > 0);
    debug_assert!(runs.windows(2).all(|w| w[0].end < w[1].start));
    if runs.len() <= max_runs {
        return runs;
    }
    // The gap size below which every gap is filled, found by sorting the gaps: filling the
    // `len - max_runs` smallest gaps leaves exactly `max_runs` runs (ties broken by position).
    let mut gaps: Vec<(u64, usize)> = runs
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1].start - w[0].end, i))
        .collect();
    gaps.sort_unstable();
    let mut fill = vec![false; runs.len() - 1];
    for &(_, i) in &gaps[..runs.len() - max_runs] {
        fill[i] = true;
    }
    let mut out: Vec<Range<u64>> = Vec::with_capacity(max_runs);
    for (i, run) in runs.drain(..).enumerate() {
        match out.last_mut() {
            Some(last) if fill[i - 1] => last.end = run.end,
            _ => out.push(run),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn limits_are_clear() {
        assert_eq!(
            DirtyBitmap::new(1 << 30, 11).unwrap_err(),
            ReplicationError::RegionSize(11)
        );
        assert!(DirtyBitmap::new(1 << 30, 41).is_err());
        // 2^24 regions of 1 MiB (16 TiB) fit; one byte more does not.
        assert_eq!(region_count(1 << 44, 20), Ok(1 << 24));
        let e = DirtyBitmap::new((1 << 44) + 1, 20).unwrap_err();
        assert!(e.to_string().contains("at least 2097152 bytes"), "{e}");
        let b = DirtyBitmap::new(10 << 20, DEFAULT_REGION_SHIFT).unwrap();
        assert_eq!((b.regions(), b.region_bytes()), (10, 1 << 20));
    }

    #[test]
    fn a_partial_last_region_counts_only_its_bytes() {
        let size = (3 << 20) + 4096;
        let b = DirtyBitmap::new(size, 20).unwrap();
        assert!(b.mark_bytes(size - 1, 1));
        assert!(!b.mark_bytes(size - 4096, 4096), "already dirty");
        assert_eq!(b.dirty_bytes(size), 4096);
        assert!(b.mark_bytes(0, 1));
        assert_eq!(b.dirty_bytes(size), (1 << 20) + 4096);
        // Past the end is ignored, not a panic.
        assert!(!b.mark_bytes(size + (8 << 20), 1 << 20));
        assert!(!b.mark_bytes(u64::MAX - 10, 100));
    }

    #[test]
    fn coarsening_fills_the_smallest_gaps() {
        let runs = vec![0..1, 3..4, 5..6, 20..22];
        assert_eq!(coarsen(runs.clone(), 4), runs);
        assert_eq!(coarsen(runs.clone(), 3), vec![0..1, 3..6, 20..22]);
        assert_eq!(coarsen(runs.clone(), 2), vec![0..6, 20..22]);
        assert_eq!(coarsen(runs, 1), vec![0..22]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mark { offset: u64, len: u64 },
        Clear(u64),
        ClearAll,
    }

    const REGIONS: u64 = 300;
    const SHIFT: u8 = 12;

    fn arb_op() -> impl Strategy<Value = Op> {
        let bytes = REGIONS << SHIFT;
        prop_oneof![
            6 => (0..bytes + 8192, 0u64..(40 << SHIFT))
                .prop_map(|(offset, len)| Op::Mark { offset, len }),
            3 => (0..REGIONS + 2).prop_map(Op::Clear),
            1 => Just(Op::ClearAll),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_set_of_regions(
            ops in proptest::collection::vec(arb_op(), 1..80),
            max_runs in 1usize..6,
        ) {
            // A volume whose last region is partial.
            let size = (REGIONS << SHIFT) - 100;
            let b = DirtyBitmap::new(size, SHIFT).unwrap();
            prop_assert_eq!(b.regions(), REGIONS);
            let mut model = BTreeSet::new();
            for op in &ops {
                match *op {
                    Op::Mark { offset, len } => {
                        let touched: Vec<u64> = if len == 0 {
                            vec![]
                        } else {
                            ((offset >> SHIFT)..=((offset + len - 1) >> SHIFT))
                                .filter(|r| *r < REGIONS)
                                .collect()
                        };
                        let newly = touched.iter().any(|r| !model.contains(r));
                        model.extend(touched);
                        prop_assert_eq!(b.mark_bytes(offset, len), newly);
                    }
                    Op::Clear(r) => {
                        prop_assert_eq!(b.clear(RegionIndex(r)), model.remove(&r));
                    }
                    Op::ClearAll => {
                        b.clear_all();
                        model.clear();
                    }
                }
                let dirty: Vec<u64> = b.iter_dirty().map(|r| r.0).collect();
                prop_assert_eq!(&dirty, &model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(b.dirty_regions(), model.len() as u64);
                let bytes: u64 = model
                    .iter()
                    .map(|r| size.saturating_sub(r << SHIFT).min(1 << SHIFT))
                    .sum();
                prop_assert_eq!(b.dirty_bytes(size), bytes);
                for r in [0, 63, 64, 65, 128, REGIONS - 1] {
                    prop_assert_eq!(b.is_dirty(RegionIndex(r)), model.contains(&r));
                }
                let runs = b.runs();
                let from_runs: BTreeSet<u64> = runs.iter().flat_map(|r| r.clone()).collect();
                prop_assert_eq!(&from_runs, &model);
                prop_assert!(runs.windows(2).all(|w| w[0].end < w[1].start));
                // Coarsened runs cover every dirty region in at most max_runs runs.
                let coarse = coarsen(runs.clone(), max_runs);
                prop_assert!(coarse.len() <= max_runs.max(runs.len().min(max_runs)));
                prop_assert!(model.iter().all(|r| coarse.iter().any(|c| c.contains(r))));
                prop_assert!(coarse.windows(2).all(|w| w[0].end < w[1].start));
            }
        }
    }
}
