//! A replicated volume's replication state in memory, shared by every reactor.
//!
//! Who writes what:
//! - the bitmaps (each replica's dirty regions, the activity log) are atomics: the reactor
//!   that owns a chunk marks the regions a write touches, with no lock, from any reactor;
//! - role, history and each replica's `since` change rarely (a replica drops out or comes
//!   back, a promotion, a resolve) and sit behind small mutexes no data path takes;
//! - the device's home reactor snapshots all of it into every metadata round
//!   ([`VolumeReplication::record`], through `Volume::record`), so whoever changes it only
//!   marks the device's metadata dirty (`Volume::replication_changed`) and a flush makes it
//!   durable.
//!
//! **Replicas added and removed at runtime.** The list of replicas is fixed in one
//! `VolumeReplication`; a change makes a new one ([`VolumeReplication::with_replica_added`],
//! [`VolumeReplication::without_replica`]) that shares everything else with the old one (role,
//! history, activity log, write barrier) and every unchanged replica's state (`Arc`s). A link
//! keeps the `VolumeReplication` it was made with and its index in it, so links made before the
//! change keep working on the same shared state.
//!
//! The rule that keeps a restart from forgetting a write: a region is dirty for a replica (or
//! in the activity log) in a *persisted* round before a write to it can reach the local disk
//! without reaching that replica. The runtime that sends writes to peers enforces it; this
//! type gives it the cheap half (`mark_*` say whether a bit was new, so only the first write
//! to a region waits for a round).

use std::ops::Range;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::barrier::WriteBarrier;
use super::bitmap::{coarsen, DirtyBitmap, RegionIndex};
use super::generation::{GenerationHistory, GenerationId};
use super::record::{
    NodeId, ReplicaRecord, ReplicationRecord, Role, MAX_ACTIVITY_RUNS, MAX_PERSISTED_RUNS,
    MAX_REPLICAS,
};
use super::status::PeerStatus;
use super::ReplicationError;

/// One replica of a volume, as the primary tracks it.
#[derive(Debug)]
pub struct ReplicaState {
    pub node: NodeId,
    since: Mutex<Option<GenerationId>>,
    full_sync: AtomicBool,
    /// Regions this replica lacks.
    pub dirty: DirtyBitmap,
    /// What operators see of this peer (not persisted: every start begins at `Connecting`).
    pub status: PeerStatus,
}

impl ReplicaState {
    /// The generation the replica was last up to date in (None: up to date).
    pub fn since(&self) -> Option<GenerationId> {
        *self.since.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_since(&self, since: Option<GenerationId>) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }

    pub fn full_sync(&self) -> bool {
        self.full_sync.load(Ordering::Acquire)
    }

    pub fn set_full_sync(&self, full: bool) {
        self.full_sync.store(full, Ordering::Release);
    }
}

/// A volume's replication state.
#[derive(Debug)]
pub struct VolumeReplication {
    role: Arc<Mutex<Role>>,
    history: Arc<Mutex<GenerationHistory>>,
    replicas: Vec<Arc<ReplicaState>>,
    /// Regions that may have writes in flight.
    pub activity: Arc<DirtyBitmap>,
    /// Regions of `activity` that a completed metadata round persisted: a write to them goes
    /// straight to the local device (see [`Self::activity_persisted`]).
    activity_persisted: Arc<DirtyBitmap>,
    /// Regions written since the current eviction cycle started (see [`super::evict`]).
    recent: Arc<DirtyBitmap>,
    /// Regions an eviction cycle hands to the next metadata round to drop from the activity
    /// log (the round checks `recent` once more, see [`Self::record`]).
    evicting: Arc<DirtyBitmap>,
    /// Serializes snapshots with the eviction step they include.
    record_lock: Arc<Mutex<()>>,
    /// Writes in flight by epoch: a resync waits on it before it reads (see [`super::barrier`]).
    pub barrier: Arc<WriteBarrier>,
    /// Counts changes of `history`, so a link sees a new generation with one atomic load.
    history_changes: Arc<AtomicU64>,
}

impl VolumeReplication {
    /// A new replicated volume of at most `capacity_bytes`: a fresh history, and every replica
    /// in need of a full sync.
    pub fn new(
        role: Role,
        capacity_bytes: u64,
        region_shift: u8,
        replicas: &[NodeId],
    ) -> Result<VolumeReplication, ReplicationError> {
        let record = ReplicationRecord {
            role,
            region_shift,
            history: GenerationHistory::created(),
            replicas: replicas
                .iter()
                .map(|&node| ReplicaRecord {
                    node,
                    since: None,
                    full_sync: true,
                    dirty: Vec::new(),
                })
                .collect(),
            activity: Vec::new(),
        };
        VolumeReplication::from_record(&record, capacity_bytes)
    }

    /// The state a loaded record describes, for a volume of at most `capacity_bytes`. The
    /// activity log is folded into every replica's dirty regions (a crash may have left its
    /// regions written here and not there) and starts empty.
    pub fn from_record(
        record: &ReplicationRecord,
        capacity_bytes: u64,
    ) -> Result<VolumeReplication, ReplicationError> {
        if record.replicas.len() > MAX_REPLICAS {
            return Err(ReplicationError::TooManyReplicas(record.replicas.len()));
        }
        let bitmap = || DirtyBitmap::new(capacity_bytes, record.region_shift);
        let activity = bitmap()?;
        let check = |runs: &[Range<u64>], b: &DirtyBitmap| match runs.last() {
            Some(last) if last.end > b.regions() => Err(ReplicationError::PastEnd {
                end: last.end,
                regions: b.regions(),
            }),
            _ => Ok(()),
        };
        check(&record.activity, &activity)?;
        let mut replicas = Vec::with_capacity(record.replicas.len());
        for r in &record.replicas {
            let dirty = bitmap()?;
            check(&r.dirty, &dirty)?;
            for run in r.dirty.iter().chain(&record.activity) {
                dirty.mark_regions(run.clone());
            }
            replicas.push(Arc::new(ReplicaState {
                node: r.node,
                since: Mutex::new(r.since),
                full_sync: AtomicBool::new(r.full_sync),
                dirty,
                status: PeerStatus::default(),
            }));
        }
        Ok(VolumeReplication {
            role: Arc::new(Mutex::new(record.role)),
            history: Arc::new(Mutex::new(record.history.clone())),
            replicas,
            activity: Arc::new(activity),
            activity_persisted: Arc::new(bitmap()?),
            recent: Arc::new(bitmap()?),
            evicting: Arc::new(bitmap()?),
            record_lock: Arc::new(Mutex::new(())),
            barrier: Arc::new(WriteBarrier::default()),
            history_changes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The same state with `replicas` in place of the list (see the module).
    fn with_replicas(&self, replicas: Vec<Arc<ReplicaState>>) -> VolumeReplication {
        VolumeReplication {
            role: self.role.clone(),
            history: self.history.clone(),
            replicas,
            activity: self.activity.clone(),
            activity_persisted: self.activity_persisted.clone(),
            recent: self.recent.clone(),
            evicting: self.evicting.clone(),
            record_lock: self.record_lock.clone(),
            barrier: self.barrier.clone(),
            history_changes: self.history_changes.clone(),
        }
    }

    /// This state with one more replica, `node`: it lacks everything (every region dirty,
    /// `full_sync` set) when `lacks_all`, else nothing. Refused when `node` is already one
    /// or the volume has `MAX_REPLICAS`.
    pub fn with_replica_added(
        &self,
        node: NodeId,
        lacks_all: bool,
    ) -> Result<VolumeReplication, ReplicationError> {
        if self.replica(node).is_some() {
            return Err(ReplicationError::DuplicateReplica(node));
        }
        if self.replicas.len() >= MAX_REPLICAS {
            return Err(ReplicationError::TooManyReplicas(self.replicas.len() + 1));
        }
        let shift = self.activity.region_shift();
        let dirty = DirtyBitmap::new(self.activity.regions() << shift, shift)?;
        if lacks_all {
            dirty.mark_regions(0..dirty.regions());
        }
        let mut replicas = self.replicas.clone();
        replicas.push(Arc::new(ReplicaState {
            node,
            since: Mutex::new(None),
            full_sync: AtomicBool::new(lacks_all),
            dirty,
            status: PeerStatus::default(),
        }));
        Ok(self.with_replicas(replicas))
    }

    /// This state without replica `node` (None when it is not one).
    pub fn without_replica(&self, node: NodeId) -> Option<VolumeReplication> {
        self.replica(node)?;
        let replicas = self
            .replicas
            .iter()
            .filter(|r| r.node != node)
            .cloned()
            .collect();
        Some(self.with_replicas(replicas))
    }

    /// What the next metadata round persists: a consistent-enough snapshot (each bitmap read
    /// once; a bit set meanwhile is in it or marks the metadata dirty again), with runs merged
    /// to their bounds. Regions an eviction cycle queued leave the activity log first, unless
    /// a write marked them since (see [`super::evict`]).
    pub fn record(&self) -> ReplicationRecord {
        let _serial = self.record_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.drop_evicted();
        ReplicationRecord {
            role: self.role(),
            region_shift: self.activity.region_shift(),
            history: self.history(),
            replicas: self
                .replicas
                .iter()
                .map(|r| ReplicaRecord {
                    node: r.node,
                    since: r.since(),
                    full_sync: r.full_sync(),
                    dirty: coarsen(r.dirty.runs(), MAX_PERSISTED_RUNS),
                })
                .collect(),
            activity: coarsen(self.activity.runs(), MAX_ACTIVITY_RUNS),
        }
    }

    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_role(&self, role: Role) {
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
    }

    pub fn history(&self) -> GenerationHistory {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Start a new generation (the set of up-to-date replicas changed, a promotion, a
    /// resolve) and return it.
    pub fn start_generation(&self) -> GenerationId {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let id = history.start_new();
        self.history_changes.fetch_add(1, Ordering::AcqRel);
        id
    }

    /// Changes whenever the history does (a cheap test before reading it).
    pub fn history_changes(&self) -> u64 {
        self.history_changes.load(Ordering::Acquire)
    }

    /// Take `history` as this copy's own (a sync target adopts its source's at the end of a
    /// resync).
    pub fn adopt_history(&self, history: GenerationHistory) {
        *self.history.lock().unwrap_or_else(|e| e.into_inner()) = history;
        self.history_changes.fetch_add(1, Ordering::AcqRel);
    }

    pub fn replicas(&self) -> &[Arc<ReplicaState>] {
        &self.replicas
    }

    pub fn replica(&self, node: NodeId) -> Option<&Arc<ReplicaState>> {
        self.replicas.iter().find(|r| r.node == node)
    }

    /// Mark `offset_bytes..+len_bytes` dirty for every replica in `lacking`. True when a bit
    /// was new (the persisted copy needs a round).
    pub fn mark_dirty(&self, lacking: &[NodeId], offset_bytes: u64, len_bytes: u64) -> bool {
        let mut newly = false;
        for r in self.replicas.iter().filter(|r| lacking.contains(&r.node)) {
            newly |= r.dirty.mark_bytes(offset_bytes, len_bytes);
        }
        newly
    }

    /// True when every region of `offset_bytes..+len_bytes` is in the persisted activity
    /// log: a write there may reach the local device at once (one bit test per region).
    pub fn activity_persisted(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.activity_persisted
            .regions_of(offset_bytes, len_bytes)
            .all(|r| self.activity_persisted.is_dirty(RegionIndex(r)))
    }

    /// Put `offset_bytes..+len_bytes` in the activity log in memory. The caller then marks
    /// the metadata dirty and waits for a round that starts afterwards: that round's record
    /// holds these regions (only an eviction cycle clears activity bits, and never a recent
    /// region's).
    pub fn begin_activity(&self, offset_bytes: u64, len_bytes: u64) {
        self.activity.mark_bytes(offset_bytes, len_bytes);
    }

    /// A metadata round that started after [`Self::begin_activity`] for this range completed:
    /// the range is in the persisted activity log.
    pub fn activity_durable(&self, offset_bytes: u64, len_bytes: u64) {
        debug_assert!(
            self.activity
                .regions_of(offset_bytes, len_bytes)
                .all(|r| self.activity.is_dirty(RegionIndex(r))),
            "only regions in the activity log become persisted"
        );
        self.activity_persisted.mark_bytes(offset_bytes, len_bytes);
    }

    /// A write to `offset_bytes..+len_bytes` entered the write barrier: its regions are
    /// recent for the current eviction cycle. Called before the write tests the persisted
    /// activity log (the order [`super::evict`] relies on).
    pub fn note_write(&self, offset_bytes: u64, len_bytes: u64) {
        let regions = self.recent.regions_of(offset_bytes, len_bytes);
        if !regions
            .clone()
            .all(|r| self.recent.is_dirty(RegionIndex(r)))
        {
            self.recent.mark_regions(regions);
        }
        fence(Ordering::SeqCst);
    }

    /// An eviction cycle starts: no region is recent.
    pub fn start_eviction_cycle(&self) {
        self.recent.clear_all();
        fence(Ordering::SeqCst);
    }

    /// Regions in the persisted activity log that no write entered the barrier for since the
    /// cycle started.
    pub fn eviction_candidates(&self) -> Vec<RegionIndex> {
        self.activity
            .iter_dirty()
            .filter(|&r| self.activity_persisted.is_dirty(r) && !self.recent.is_dirty(r))
            .collect()
    }

    /// Writes to `regions` from now on wait for a metadata round (they put the region back).
    pub fn retire_persisted(&self, regions: &[RegionIndex]) {
        for &r in regions {
            self.activity_persisted.clear(r);
        }
        fence(Ordering::SeqCst);
    }

    /// Hand `regions` to the next metadata round to drop, those still not recent. Returns
    /// how many were queued.
    pub fn queue_eviction(&self, regions: &[RegionIndex]) -> usize {
        let mut queued = 0;
        for &r in regions.iter().filter(|&&r| !self.recent.is_dirty(r)) {
            self.evicting.mark_regions(r.0..r.0 + 1);
            queued += 1;
        }
        queued
    }

    /// The round's part of an eviction: each queued region leaves the activity log unless a
    /// write marked it recent. The clear comes before the test: a write that marks `recent`
    /// after the test marks the activity log after the clear (in that order), and one that
    /// marked it before is seen and put back, so no snapshot misses a write's region.
    fn drop_evicted(&self) {
        let queued: Vec<RegionIndex> = self.evicting.iter_dirty().collect();
        for r in queued {
            self.evicting.clear(r);
            if self.activity_persisted.is_dirty(r) {
                // Persisted again by a write's round since the cycle retired it.
                continue;
            }
            self.activity.clear(r);
            fence(Ordering::SeqCst);
            if self.recent.is_dirty(r) {
                self.activity.mark_regions(r.0..r.0 + 1);
            }
        }
    }

    /// A region was resynced to `node`.
    pub fn resynced(&self, node: NodeId, region: RegionIndex) -> bool {
        self.replica(node).is_some_and(|r| r.dirty.clear(region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128) -> NodeId {
        NodeId::new(n).unwrap()
    }

    /// A volume whose regions 0..4 (of 1 MiB) are in the persisted activity log.
    fn with_activity() -> VolumeReplication {
        let v = VolumeReplication::new(Role::Primary, 1 << 30, 20, &[node(1)]).unwrap();
        v.begin_activity(0, 4 << 20);
        v.activity_durable(0, 4 << 20);
        v
    }

    fn in_log(v: &VolumeReplication) -> Vec<u64> {
        v.record().activity.iter().flat_map(|r| r.clone()).collect()
    }

    #[test]
    fn an_idle_region_leaves_the_activity_log_and_a_write_there_waits_again() {
        let v = with_activity();
        v.start_eviction_cycle();
        v.note_write(2 << 20, 4096);
        let candidates = v.eviction_candidates();
        assert_eq!(
            candidates,
            [RegionIndex(0), RegionIndex(1), RegionIndex(3)],
            "a region written this cycle stays"
        );
        v.retire_persisted(&candidates);
        assert!(
            !v.activity_persisted(0, 4096),
            "a write there now waits for a round"
        );
        assert!(v.activity_persisted(2 << 20, 4096));
        assert_eq!(v.queue_eviction(&candidates), 3);
        assert_eq!(in_log(&v), [2], "the round drops the queued regions");
        assert_eq!(v.activity.dirty_regions(), 1);
    }

    #[test]
    fn a_region_written_after_it_was_queued_stays_in_the_log() {
        let v = with_activity();
        v.start_eviction_cycle();
        let candidates = v.eviction_candidates();
        v.retire_persisted(&candidates);
        // A write after the candidates were taken: it marked its region recent before it
        // tested the (retired) persisted bit, so it parks and puts the region back.
        v.note_write(1 << 20, 4096);
        v.begin_activity(1 << 20, 4096);
        assert_eq!(
            v.queue_eviction(&candidates),
            3,
            "a recent region is not queued"
        );
        // One written after it was queued, before the round: the round keeps it.
        v.note_write(3 << 20, 4096);
        assert_eq!(in_log(&v), [1, 3]);
    }

    #[test]
    fn a_region_not_yet_persisted_is_no_candidate() {
        let v = with_activity();
        v.begin_activity(8 << 20, 4096);
        v.start_eviction_cycle();
        assert!(!v.eviction_candidates().contains(&RegionIndex(8)));
    }

    #[test]
    fn a_snapshot_reloads_as_a_superset_with_the_activity_folded_in() {
        let v = VolumeReplication::new(Role::Primary, 1 << 30, 20, &[node(1), node(2)]).unwrap();
        assert!(v
            .replicas()
            .iter()
            .all(|r| r.full_sync() && r.since().is_none()));
        let g0 = v.history().current().unwrap();
        let g1 = v.start_generation();
        v.replica(node(1)).unwrap().set_since(Some(g0));
        v.replica(node(1)).unwrap().set_full_sync(false);
        // Many scattered dirty regions: more runs than persist.
        for i in 0..200u64 {
            assert!(v.mark_dirty(&[node(1)], (i * 3) << 20, 1));
        }
        assert!(!v.mark_dirty(&[node(1)], 0, 4096), "already dirty");
        v.activity.mark_regions(1000..1002);
        let rec = v.record();
        assert_eq!(rec.history.current(), Some(g1));
        assert_eq!(rec.replicas[0].dirty.len(), MAX_PERSISTED_RUNS);
        let mut bytes = Vec::new();
        rec.encode(&mut bytes).unwrap();
        let back = VolumeReplication::from_record(&rec, 1 << 30).unwrap();
        let r1 = back.replica(node(1)).unwrap();
        assert_eq!(r1.since(), Some(g0));
        for i in 0..200u64 {
            assert!(r1.dirty.is_dirty(RegionIndex(i * 3)));
        }
        // The activity log counts as dirty for every replica after a restart.
        for r in back.replicas() {
            assert!(r.dirty.is_dirty(RegionIndex(1000)) && r.dirty.is_dirty(RegionIndex(1001)));
        }
        assert_eq!(back.activity.dirty_regions(), 0);
        assert!(back.resynced(node(1), RegionIndex(3)));
        assert!(!back.resynced(node(1), RegionIndex(3)));
    }

    #[test]
    fn a_replica_added_or_removed_shares_everything_else() {
        let v = VolumeReplication::new(Role::Primary, 1 << 30, 20, &[node(1)]).unwrap();
        v.replica(node(1)).unwrap().set_full_sync(false);
        let added = v.with_replica_added(node(2), true).unwrap();
        let new = added.replica(node(2)).unwrap();
        assert!(new.full_sync() && new.dirty.dirty_regions() == 1024);
        assert_eq!(
            added.with_replica_added(node(2), true).unwrap_err(),
            ReplicationError::DuplicateReplica(node(2))
        );
        // The same replica state, history, activity log and barrier as before.
        assert!(Arc::ptr_eq(&v.replicas()[0], &added.replicas()[0]));
        let g = added.start_generation();
        assert_eq!(v.history().current(), Some(g));
        assert_ne!(v.history_changes(), 0);
        v.activity.mark_regions(5..6);
        assert!(added.activity.is_dirty(RegionIndex(5)));
        assert!(Arc::ptr_eq(&v.barrier, &added.barrier));
        let rec = added.record();
        assert_eq!(rec.replicas.len(), 2);
        assert!(rec.replicas[1].full_sync && rec.replicas[1].dirty.first() == Some(&(0..1024)));
        let removed = added.without_replica(node(1)).unwrap();
        assert_eq!(removed.record().replicas.len(), 1);
        assert!(removed.without_replica(node(1)).is_none());
        let full = (3..=5).try_fold(added, |acc, n| acc.with_replica_added(node(n), false));
        assert_eq!(
            full.unwrap_err(),
            ReplicationError::TooManyReplicas(MAX_REPLICAS + 1)
        );
    }

    #[test]
    fn a_record_that_does_not_fit_the_volume_is_refused() {
        let v = VolumeReplication::new(Role::Replica, 1 << 30, 20, &[node(1)]).unwrap();
        let mut rec = v.record();
        rec.replicas[0].dirty = std::iter::once(1020..1025).collect();
        assert_eq!(
            VolumeReplication::from_record(&rec, 1 << 30).unwrap_err(),
            ReplicationError::PastEnd {
                end: 1025,
                regions: 1024
            }
        );
        rec.replicas[0].dirty.clear();
        assert!(matches!(
            VolumeReplication::from_record(&rec, 1 << 50),
            Err(ReplicationError::TooManyRegions { .. })
        ));
    }
}
