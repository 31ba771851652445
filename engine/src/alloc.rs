//! Lock-free allocator of a device's data chunks, shared by every reactor.
//!
//! A freed chunk is not reusable at once: it sits in quarantine until the metadata that records
//! the free is durable. Otherwise a crash could bring back metadata mapping the chunk to its old
//! volume while another volume had already written its own data there.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::ids::PhysChunk;

const BITS: usize = 64;

#[derive(Debug)]
pub struct ChunkAllocator {
    total_chunks: u32,
    /// Bit set = chunk in use (or quarantined).
    used: Box<[AtomicU64]>,
    /// Bit set = chunk freed but its free not yet persisted.
    quarantine: Box<[AtomicU64]>,
    /// Where the next search starts, to spread allocations and keep them cheap.
    hint_word: AtomicUsize,
    used_count: AtomicU64,
}

/// Quarantined chunks captured before a metadata snapshot; released once it is durable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QuarantineSnapshot {
    words: Vec<u64>,
}

impl ChunkAllocator {
    pub fn new(total_chunks: u32) -> Self {
        let words = (total_chunks as usize).div_ceil(BITS);
        let used: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        // Bits past the end are permanently "used" so the search never returns them.
        if !(total_chunks as usize).is_multiple_of(BITS) {
            let tail = !0u64 << (total_chunks as usize % BITS);
            used[words - 1].store(tail, Ordering::Relaxed);
        }
        Self {
            total_chunks,
            used,
            quarantine: (0..words).map(|_| AtomicU64::new(0)).collect(),
            hint_word: AtomicUsize::new(0),
            used_count: AtomicU64::new(0),
        }
    }

    pub fn total_chunks(&self) -> u32 {
        self.total_chunks
    }

    /// Chunks in use, including quarantined ones.
    pub fn used_chunks(&self) -> u64 {
        self.used_count.load(Ordering::Relaxed)
    }

    /// Mark a chunk used while loading metadata. Returns false if it was already used
    /// (two volumes claiming one chunk: corrupt metadata).
    pub fn claim(&self, chunk: PhysChunk) -> bool {
        if chunk.0 >= self.total_chunks {
            return false;
        }
        let (w, bit) = (chunk.0 as usize / BITS, 1u64 << (chunk.0 as usize % BITS));
        let prev = self.used[w].fetch_or(bit, Ordering::AcqRel);
        if prev & bit == 0 {
            self.used_count.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Take a free chunk, or None when the device is full.
    pub fn allocate(&self) -> Option<PhysChunk> {
        let words = self.used.len();
        let start = self.hint_word.load(Ordering::Relaxed) % words.max(1);
        for i in 0..words {
            let w = (start + i) % words;
            let mut cur = self.used[w].load(Ordering::Acquire);
            // Bounded: each failed CAS means another allocator took a bit of this word.
            while cur != !0u64 {
                let bit_index = (!cur).trailing_zeros() as usize;
                let bit = 1u64 << bit_index;
                match self.used[w].compare_exchange_weak(
                    cur,
                    cur | bit,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        self.hint_word.store(w, Ordering::Relaxed);
                        self.used_count.fetch_add(1, Ordering::Relaxed);
                        let chunk = (w * BITS + bit_index) as u32;
                        debug_assert!(chunk < self.total_chunks);
                        return Some(PhysChunk(chunk));
                    }
                    Err(actual) => cur = actual,
                }
            }
        }
        None
    }

    /// Give back a chunk that was allocated but never published in any map (its
    /// initialisation failed): it can be reused at once.
    pub fn release_unpublished(&self, chunk: PhysChunk) {
        let (w, bit) = (chunk.0 as usize / BITS, 1u64 << (chunk.0 as usize % BITS));
        let prev = self.used[w].fetch_and(!bit, Ordering::AcqRel);
        assert!(prev & bit != 0, "releasing free chunk {chunk}");
        self.used_count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Free a chunk whose unmapping is not yet durable: quarantined until [`Self::release`].
    pub fn free(&self, chunk: PhysChunk) {
        let (w, bit) = (chunk.0 as usize / BITS, 1u64 << (chunk.0 as usize % BITS));
        assert!(
            self.used[w].load(Ordering::Acquire) & bit != 0,
            "freeing free chunk {chunk}"
        );
        let prev = self.quarantine[w].fetch_or(bit, Ordering::AcqRel);
        assert!(prev & bit == 0, "double free of chunk {chunk}");
    }

    /// Capture the quarantine. Call *before* snapshotting the maps, so every captured free is
    /// reflected in the snapshot.
    pub fn snapshot_quarantine(&self) -> QuarantineSnapshot {
        QuarantineSnapshot {
            words: self
                .quarantine
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
        }
    }

    /// The metadata written after `snap` is durable: its quarantined chunks become free.
    pub fn release(&self, snap: &QuarantineSnapshot) {
        for (w, &bits) in snap.words.iter().enumerate() {
            if bits == 0 {
                continue;
            }
            self.quarantine[w].fetch_and(!bits, Ordering::AcqRel);
            let prev = self.used[w].fetch_and(!bits, Ordering::AcqRel);
            assert_eq!(prev & bits, bits, "quarantined chunk not marked used");
            self.used_count
                .fetch_sub(u64::from(bits.count_ones()), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn allocates_every_chunk_once_then_full() {
        let a = ChunkAllocator::new(130);
        let got: HashSet<u32> = (0..130).map(|_| a.allocate().unwrap().0).collect();
        assert_eq!(got.len(), 130);
        assert!(got.iter().all(|&c| c < 130));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn quarantine_holds_until_release() {
        let a = ChunkAllocator::new(1);
        let c = a.allocate().unwrap();
        a.free(c);
        assert_eq!(a.allocate(), None, "quarantined chunk must not be reused");
        let snap = a.snapshot_quarantine();
        a.release(&snap);
        assert_eq!(a.allocate(), Some(c));
    }

    proptest! {
        /// Model check: the allocator never hands out a chunk that is in use or quarantined.
        #[test]
        fn never_double_allocates(total in 1u32..300, ops in proptest::collection::vec(0u8..4, 0..600)) {
            let a = ChunkAllocator::new(total);
            let mut in_use: Vec<PhysChunk> = Vec::new();
            let mut quarantined: HashSet<u32> = HashSet::new();
            let mut outstanding: Option<(QuarantineSnapshot, HashSet<u32>)> = None;
            for op in ops {
                match op {
                    0 | 1 => match a.allocate() {
                        Some(c) => {
                            prop_assert!(!in_use.contains(&c) && !quarantined.contains(&c.0));
                            in_use.push(c);
                        }
                        None => prop_assert_eq!(in_use.len() + quarantined.len(), total as usize),
                    },
                    2 => if let Some(c) = in_use.pop() { a.free(c); quarantined.insert(c.0); },
                    // Persist rounds are serialized per device: one snapshot outstanding.
                    _ => match outstanding.take() {
                        Some((s, q)) => {
                            a.release(&s);
                            for c in q { quarantined.remove(&c); }
                        }
                        None => outstanding = Some((a.snapshot_quarantine(), quarantined.clone())),
                    },
                }
                prop_assert_eq!(a.used_chunks(), (in_use.len() + quarantined.len()) as u64);
            }
        }
    }
}
