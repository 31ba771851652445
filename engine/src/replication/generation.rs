//! Generation histories and how two of them relate, in the spirit of DRBD's data generation
//! UUIDs and crucible's generation numbers.
//!
//! A volume's copy on a node carries the sequence of generations it has lived through, newest
//! last. The primary starts a new generation whenever the set of up-to-date replicas changes
//! (a replica drops out, comes back up to date), and a node starts one when it is promoted or
//! when a split brain is resolved in its favour. A replica that is connected and up to date
//! takes the primary's new generations as they start, so two copies that saw the same writes
//! have the same newest generation, and a copy that stopped following has its last shared
//! generation somewhere in the other's history.
//!
//! [`compare`] decides from the two histories alone what may happen at connect: nothing (in
//! sync), a resync in one direction from the generation they last shared, or nothing without
//! an operator (diverged or unrelated). It never guesses: a generation pushed out of a bounded
//! history makes the copies look unrelated, which is refused, never resynced.

use std::fmt;

use super::ReplicationError;

/// Most generations a history keeps; the oldest is dropped when a new one starts.
pub const MAX_HISTORY: usize = 32;

/// One generation: a random 64-bit id, never 0 (0 means "none" on disk).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationId(u64);

impl GenerationId {
    /// A fresh id from the operating system's random source.
    pub fn random() -> GenerationId {
        use rand::RngCore;
        loop {
            let id = rand::rngs::OsRng.next_u64();
            if id != 0 {
                return GenerationId(id);
            }
        }
    }

    /// The id `raw`, or None for 0.
    pub fn new(raw: u64) -> Option<GenerationId> {
        (raw != 0).then_some(GenerationId(raw))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The generations one copy of a volume lived through, oldest first, newest (current) last.
/// Empty: the copy holds no data of this volume yet (a new replica).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationHistory {
    ids: Vec<GenerationId>,
}

impl GenerationHistory {
    /// The history of a volume created now: one new generation.
    pub fn created() -> GenerationHistory {
        GenerationHistory {
            ids: vec![GenerationId::random()],
        }
    }

    /// A history from ids oldest first (as stored on disk or sent by a peer).
    pub fn from_ids(ids: Vec<GenerationId>) -> Result<GenerationHistory, ReplicationError> {
        if ids.len() > MAX_HISTORY {
            return Err(ReplicationError::HistoryTooLong(ids.len()));
        }
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(ReplicationError::DuplicateGeneration(*id));
            }
        }
        Ok(GenerationHistory { ids })
    }

    pub fn ids(&self) -> &[GenerationId] {
        &self.ids
    }

    pub fn current(&self) -> Option<GenerationId> {
        self.ids.last().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The history is full: the next new generation drops the oldest.
    pub fn is_full(&self) -> bool {
        self.ids.len() == MAX_HISTORY
    }

    pub fn contains(&self, id: GenerationId) -> bool {
        self.ids.contains(&id)
    }

    /// Start a new generation (random id) and return it.
    pub fn start_new(&mut self) -> GenerationId {
        let id = loop {
            let id = GenerationId::random();
            if !self.contains(id) {
                break id;
            }
        };
        self.append(id);
        id
    }

    /// Append `id` (a generation a peer started) as the current generation, dropping the
    /// oldest when full. An id already in the history is refused: the history stays valid.
    pub fn push(&mut self, id: GenerationId) -> Result<(), ReplicationError> {
        if self.contains(id) {
            return Err(ReplicationError::DuplicateGeneration(id));
        }
        self.append(id);
        Ok(())
    }

    fn append(&mut self, id: GenerationId) {
        debug_assert!(!self.contains(id));
        if self.ids.len() == MAX_HISTORY {
            self.ids.remove(0);
        }
        self.ids.push(id);
    }
}

/// How a peer's copy relates to the local one, decided at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// The same current generation (or both empty): nothing to copy.
    InSync,
    /// The peer's current generation is in the local history: the local copy is the sync
    /// source. `since` is the peer's current generation (the last one both shared); the
    /// regions to copy are those the local side marked dirty for the peer since then, or all
    /// of them when it has no bitmap from `since` (see [`resync_scope`]). None: the peer holds
    /// nothing yet, so everything goes.
    PeerBehind { since: Option<GenerationId> },
    /// The mirror: the peer is the sync source.
    LocalBehind { since: Option<GenerationId> },
    /// Both advanced from `common`, their newest shared generation: a split brain. Nothing
    /// moves until an operator discards one side.
    Diverged { common: GenerationId },
    /// No generation in common (different volumes, or the shared one fell out of a bounded
    /// history): refused.
    Unrelated,
}

impl Relation {
    /// The same relation seen from the peer's side.
    pub fn mirror(self) -> Relation {
        match self {
            Relation::PeerBehind { since } => Relation::LocalBehind { since },
            Relation::LocalBehind { since } => Relation::PeerBehind { since },
            other => other,
        }
    }
}

/// How `peer`'s copy relates to `local`'s. Pure: the same histories always give the same
/// answer, and `compare(b, a) == compare(a, b).mirror()`.
pub fn compare(local: &GenerationHistory, peer: &GenerationHistory) -> Relation {
    let (Some(lc), Some(pc)) = (local.current(), peer.current()) else {
        return match (local.is_empty(), peer.is_empty()) {
            (true, true) => Relation::InSync,
            (false, _) => Relation::PeerBehind { since: None },
            (true, false) => Relation::LocalBehind { since: None },
        };
    };
    if lc == pc {
        return Relation::InSync;
    }
    match (local.contains(pc), peer.contains(lc)) {
        // Each has the other's current one as an older generation: the histories disagree on
        // the order of events, so neither can be trusted as the source.
        (true, true) => Relation::Unrelated,
        (true, false) => Relation::PeerBehind { since: Some(pc) },
        (false, true) => Relation::LocalBehind { since: Some(lc) },
        (false, false) => {
            // Histories are ordered, so the newest generation of one side that the other also
            // has is their newest common one, and both sides find the same one; if they do
            // not, the orders disagree and nothing is trusted.
            let newest_common = |a: &GenerationHistory, b: &GenerationHistory| {
                a.ids().iter().rev().find(|id| b.contains(**id)).copied()
            };
            match (newest_common(local, peer), newest_common(peer, local)) {
                (Some(a), Some(b)) if a == b => Relation::Diverged { common: a },
                _ => Relation::Unrelated,
            }
        }
    }
}

/// What a sync source copies to a target that last shared generation `since` with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncScope {
    /// Only the regions in the source's bitmap for this target.
    Bitmap,
    /// Every region: the source tracked nothing for the target from `since` on.
    Full,
}

/// The scope of a resync from `since` (from [`Relation::PeerBehind`]) when the source's bitmap
/// for the target started at `bitmap_since` (the generation the target was last up to date
/// in; None: no bitmap). Only a bitmap that started exactly at `since` covers every write the
/// target lacks: one that started later misses writes, and one that started earlier belongs
/// to another history of the target.
pub fn resync_scope(
    since: Option<GenerationId>,
    bitmap_since: Option<GenerationId>,
) -> ResyncScope {
    match (since, bitmap_since) {
        (Some(s), Some(b)) if s == b => ResyncScope::Bitmap,
        _ => ResyncScope::Full,
    }
}

#[cfg(test)]
#[path = "generation_tests.rs"]
mod tests;
