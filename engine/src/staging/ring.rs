//! Space in the staging log, a ring of whole blocks: records are appended at the head, and
//! the tail is the oldest record not yet destaged (still needed by recovery). Positions are
//! absolute byte counts that only grow (a device offset is the position modulo the capacity),
//! so "is this record still in the log" is one comparison and a lap is never ambiguous.
//!
//! A record never wraps: one that does not fit before the end of the device is placed at its
//! start, and the end is left as a **pad** (recovery jumps over it). When the log holds no
//! room for a record, the writer waits for destage to move the tail (backpressure): the ring
//! never overwrites a record that has not been destaged.

use super::record::LOG_BLOCK_BYTES;

/// Where a reserved record goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The record's absolute position (its device offset is `position % capacity`).
    pub position: u64,
    /// Bytes of pad left at the end of the device before it (0 when it follows the head).
    pub pad_bytes: u64,
}

/// Why a record cannot be placed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("a {len_bytes}-byte record is not whole {LOG_BLOCK_BYTES}-byte blocks")]
    Unaligned { len_bytes: u64 },
    #[error("a {len_bytes}-byte record does not fit a {capacity_bytes}-byte log")]
    NeverFits { len_bytes: u64, capacity_bytes: u64 },
    /// Not now: destage must free `need_bytes - free_bytes` first.
    #[error("the log needs {need_bytes} bytes and has {free_bytes} free")]
    Full { need_bytes: u64, free_bytes: u64 },
}

/// The ring's positions (see the module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRing {
    capacity_bytes: u64,
    head: u64,
    tail: u64,
}

impl LogRing {
    /// An empty log of `capacity_bytes` (whole blocks, at least two: a record and a pad).
    pub fn new(capacity_bytes: u64) -> Option<LogRing> {
        let block = LOG_BLOCK_BYTES as u64;
        (capacity_bytes.is_multiple_of(block) && capacity_bytes >= 2 * block).then_some(LogRing {
            capacity_bytes,
            head: 0,
            tail: 0,
        })
    }

    /// The ring recovery found: the valid records span `tail..head` (absolute positions).
    pub fn recovered(capacity_bytes: u64, tail: u64, head: u64) -> Option<LogRing> {
        let ring = LogRing::new(capacity_bytes)?;
        (tail <= head && head - tail <= capacity_bytes).then_some(LogRing { head, tail, ..ring })
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn tail(&self) -> u64 {
        self.tail
    }

    pub fn used_bytes(&self) -> u64 {
        self.head - self.tail
    }

    pub fn free_bytes(&self) -> u64 {
        self.capacity_bytes - self.used_bytes()
    }

    /// The device offset of absolute `position`.
    pub fn offset_of(&self, position: u64) -> u64 {
        position % self.capacity_bytes
    }

    /// Place a record of `len_bytes` at the head (after a pad when it would cross the end),
    /// or say why not.
    pub fn reserve(&mut self, len_bytes: u64) -> Result<Placement, RingError> {
        if len_bytes == 0 || !len_bytes.is_multiple_of(LOG_BLOCK_BYTES as u64) {
            return Err(RingError::Unaligned { len_bytes });
        }
        // A record that cannot fit even in an empty ring after a pad never will.
        if len_bytes > self.capacity_bytes - LOG_BLOCK_BYTES as u64 {
            return Err(RingError::NeverFits {
                len_bytes,
                capacity_bytes: self.capacity_bytes,
            });
        }
        let to_end = self.capacity_bytes - self.offset_of(self.head);
        let pad_bytes = if len_bytes > to_end { to_end } else { 0 };
        let need_bytes = pad_bytes + len_bytes;
        if need_bytes > self.free_bytes() {
            return Err(RingError::Full {
                need_bytes,
                free_bytes: self.free_bytes(),
            });
        }
        let position = self.head + pad_bytes;
        self.head = position + len_bytes;
        debug_assert!(self.used_bytes() <= self.capacity_bytes);
        debug_assert!(self.offset_of(position) + len_bytes <= self.capacity_bytes);
        Ok(Placement {
            position,
            pad_bytes,
        })
    }

    /// Everything before absolute `position` is destaged: its space is free again. A position
    /// past the head or before the tail is refused (false).
    pub fn release_to(&mut self, position: u64) -> bool {
        if position < self.tail || position > self.head {
            return false;
        }
        self.tail = position;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: u64 = LOG_BLOCK_BYTES as u64;

    #[test]
    fn a_record_that_would_cross_the_end_starts_over_after_a_pad() {
        let mut ring = LogRing::new(10 * B).unwrap();
        assert_eq!(
            ring.reserve(6 * B),
            Ok(Placement {
                position: 0,
                pad_bytes: 0
            })
        );
        assert!(ring.release_to(6 * B));
        // 4 blocks to the end; a 5-block record goes to the start, after a 4-block pad.
        assert_eq!(
            ring.reserve(5 * B),
            Ok(Placement {
                position: 10 * B,
                pad_bytes: 4 * B
            })
        );
        assert_eq!(ring.offset_of(10 * B), 0);
        assert_eq!((ring.used_bytes(), ring.free_bytes()), (9 * B, B));
        assert_eq!(
            ring.reserve(2 * B),
            Err(RingError::Full {
                need_bytes: 2 * B,
                free_bytes: B
            })
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(LogRing::new(B).is_none());
        assert!(LogRing::new(3 * B + 1).is_none());
        let mut ring = LogRing::new(4 * B).unwrap();
        assert!(matches!(
            ring.reserve(100),
            Err(RingError::Unaligned { .. })
        ));
        assert!(matches!(ring.reserve(0), Err(RingError::Unaligned { .. })));
        assert!(matches!(
            ring.reserve(4 * B),
            Err(RingError::NeverFits { .. })
        ));
        assert!(!ring.release_to(B), "past the head");
        assert!(LogRing::recovered(4 * B, 5 * B, 4 * B).is_none());
        assert!(LogRing::recovered(4 * B, 0, 5 * B).is_none());
    }

    proptest! {
        /// Records placed and released in any order of sizes never overlap a record still in
        /// the log, never cross the device's end, and the space adds up.
        #[test]
        fn placements_never_overlap_live_records(
            cap_blocks in 2u64..64,
            ops in prop::collection::vec((1u64..16, any::<bool>()), 1..200),
        ) {
            let mut ring = LogRing::new(cap_blocks * B).unwrap();
            let mut live: std::collections::VecDeque<(u64, u64)> = Default::default();
            for (blocks, destage) in ops {
                if destage {
                    if let Some((pos, len)) = live.pop_front() {
                        prop_assert!(ring.release_to(pos + len));
                    }
                    continue;
                }
                match ring.reserve(blocks * B) {
                    Ok(p) => {
                        let off = ring.offset_of(p.position);
                        prop_assert!(off + blocks * B <= cap_blocks * B, "crosses the end");
                        for &(pos, len) in &live {
                            // Live records lie in [tail, head): absolute positions never
                            // collide within one capacity.
                            prop_assert!(p.position >= pos + len);
                            prop_assert!(p.position + blocks * B - pos <= cap_blocks * B,
                                "overwrites a live record");
                        }
                        live.push_back((p.position, blocks * B));
                    }
                    Err(RingError::Full { need_bytes, free_bytes }) => {
                        prop_assert!(need_bytes > free_bytes);
                    }
                    Err(RingError::NeverFits { .. }) => prop_assert!(blocks >= cap_blocks),
                    Err(e) => prop_assert!(false, "{e}"),
                }
                prop_assert_eq!(ring.used_bytes() + ring.free_bytes(), cap_blocks * B);
            }
        }
    }
}
