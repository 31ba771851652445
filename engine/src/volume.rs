//! Devices' shared state and thin volumes over their chunks.
//!
//! A volume's chunk map is an array of atomics: each entry is written only by the reactor that
//! owns that chunk, and read by anyone (block status, metadata snapshots) without locks.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::alloc::ChunkAllocator;
use crate::ids::{ChunkIndex, DeviceId, PhysChunk, ReactorId, VolumeId};
use crate::meta::{Label, VolumeRecord};
use crate::profile::FirmwareProfile;
use crate::replication::fanout::MAX_REPLICA_SET_CHANGES;
use crate::replication::{ReplicaSet, ReplicationError, VolumeReplication};

/// Map entry of a chunk that has never been written (or was trimmed): reads as zeros.
pub(crate) const UNMAPPED: u32 = u32::MAX;

/// Health counters of a device, updated by reactors, read by anyone.
#[derive(Debug, Default)]
pub struct DeviceHealth {
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub flush_errors: AtomicU64,
    /// Set when metadata could not be persisted; cleared by the next successful persist.
    pub metadata_failing: AtomicBool,
    /// Why the loader did not use the newest metadata slot (one slot was corrupt); cleared
    /// once a metadata round has rewritten both slots.
    metadata_warning: Mutex<Option<String>>,
    /// The backing file was deleted while open: nothing written survives a restart, so every
    /// flush and FUA write fails with EIO from then on. Never cleared.
    pub backing_deleted: AtomicBool,
}

impl DeviceHealth {
    pub fn metadata_warning(&self) -> Option<String> {
        self.metadata_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_metadata_warning(&self, warning: String) {
        *self
            .metadata_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(warning);
    }

    /// Clear the warning; returns what it said, if it was set.
    pub(crate) fn clear_metadata_warning(&self) -> Option<String> {
        self.metadata_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// What every reactor knows about one device.
#[derive(Debug)]
pub struct DeviceState {
    pub id: DeviceId,
    pub name: String,
    pub kind: String,
    pub size_bytes: u64,
    pub label: Label,
    pub profile: FirmwareProfile,
    /// Whether data survives a daemon restart (file, blockdev, bbram) or not (ram, null).
    pub persistent: bool,
    pub(crate) alloc: ChunkAllocator,
    /// Bumped on every change that metadata records (map entries, volume table).
    pub(crate) meta_version: AtomicU64,
    pub(crate) persisted_version: AtomicU64,
    pub health: DeviceHealth,
}

impl DeviceState {
    pub fn chunk_size_bytes(&self) -> u64 {
        self.label.chunk_size_bytes
    }

    pub fn total_chunks(&self) -> u32 {
        self.label.total_chunks
    }

    pub fn used_chunks(&self) -> u64 {
        self.alloc.used_chunks()
    }

    /// The reactor that persists this device's metadata and serialises its flush rounds.
    pub fn home_reactor(&self, reactors: u32) -> ReactorId {
        ReactorId(self.id.0 % reactors)
    }

    pub(crate) fn mark_meta_dirty(&self) {
        self.meta_version.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn meta_dirty(&self) -> bool {
        self.meta_version.load(Ordering::Acquire) != self.persisted_version.load(Ordering::Acquire)
    }
}

/// Per-volume IO counters, for the dashboard and metrics.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub errors: AtomicU64,
    /// Parts of mover requests on mapped chunks, by path: copied straight between the mover
    /// and the device's memory, or through a bounce buffer and a device op.
    pub moved_parts_in_place: AtomicU64,
    pub moved_parts_bounced: AtomicU64,
    /// Submission to completion, per kind.
    pub read_latency: crate::stats::LatencyHistogram,
    pub write_latency: crate::stats::LatencyHistogram,
    pub flush_latency: crate::stats::LatencyHistogram,
}

/// A thin volume: a size and a map from its chunks to device chunks.
#[derive(Debug)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub device: Arc<DeviceState>,
    size_bytes: AtomicU64,
    /// Sized for the whole device so growing never reallocates (a volume is never larger).
    map: Box<[AtomicU32]>,
    pub stats: VolumeStats,
    /// Set once deletion starts; new requests are refused.
    pub(crate) deleted: AtomicBool,
    pub(crate) open_handles: AtomicU32,
    /// Set on a replicated volume. The mutex guards only attaching and detaching; a data
    /// path takes the `Arc` once (per connection or per reactor turn) and works on its
    /// atomics (see `replication::state`).
    replication: Mutex<Option<Arc<VolumeReplication>>>,
    /// The replicas writes fan out to (null: none), read with one atomic load on the write
    /// path. Points into an `Arc` held by `replica_sets` for as long as the volume lives.
    replica_set: AtomicPtr<ReplicaSet>,
    /// Every set ever attached (see `replication::fanout` on why they stay).
    replica_sets: Mutex<Vec<Arc<ReplicaSet>>>,
}

impl Volume {
    /// Handles open on the volume (clients, tasks): it cannot be deleted while any is.
    pub fn open_handles(&self) -> u32 {
        self.open_handles.load(Ordering::Acquire)
    }

    pub(crate) fn new(
        id: VolumeId,
        name: String,
        device: Arc<DeviceState>,
        size_bytes: u64,
    ) -> Self {
        let capacity = device.total_chunks() as usize;
        Self {
            id,
            name,
            map: (0..capacity).map(|_| AtomicU32::new(UNMAPPED)).collect(),
            device,
            size_bytes: AtomicU64::new(size_bytes),
            stats: VolumeStats::default(),
            deleted: AtomicBool::new(false),
            open_handles: AtomicU32::new(0),
            replication: Mutex::new(None),
            replica_set: AtomicPtr::new(std::ptr::null_mut()),
            replica_sets: Mutex::new(Vec::new()),
        }
    }

    /// The volume's replication state, if it is replicated.
    pub fn replication(&self) -> Option<Arc<VolumeReplication>> {
        self.replication
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Make the volume replicated (Some) or not (None). The change reaches the device's
    /// metadata with the next flush.
    pub fn set_replication(&self, replication: Option<Arc<VolumeReplication>>) {
        *self.replication.lock().unwrap_or_else(|e| e.into_inner()) = replication;
        self.replication_changed();
    }

    /// The replicas writes fan out to, if any: one atomic load.
    #[inline]
    pub fn replica_set(&self) -> Option<&ReplicaSet> {
        let ptr = self.replica_set.load(Ordering::Acquire);
        // SAFETY: a non-null pointer comes from an `Arc` that `replica_sets` keeps until the
        // volume is dropped, which outlives `&self`.
        unsafe { ptr.as_ref() }
    }

    /// Make writes fan out to `set` (None: to no replica). Requests already submitted keep
    /// the set they saw. A volume takes at most `MAX_REPLICA_SET_CHANGES` sets in its life.
    pub fn attach_replicas(&self, set: Option<Arc<ReplicaSet>>) -> Result<(), ReplicationError> {
        let mut sets = self.replica_sets.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = match set {
            Some(set) => {
                if sets.len() >= MAX_REPLICA_SET_CHANGES {
                    return Err(ReplicationError::TooManySetChanges);
                }
                let ptr = Arc::as_ptr(&set).cast_mut();
                sets.push(set);
                ptr
            }
            None => std::ptr::null_mut(),
        };
        self.replica_set.store(ptr, Ordering::Release);
        Ok(())
    }

    /// How many more sets [`Self::attach_replicas`] takes in the volume's life.
    pub fn replica_set_changes_left(&self) -> usize {
        let sets = self.replica_sets.lock().unwrap_or_else(|e| e.into_inner());
        MAX_REPLICA_SET_CHANGES.saturating_sub(sets.len())
    }

    /// The loader's: the state as the metadata holds it (nothing to persist).
    pub(crate) fn load_replication(&self, replication: Arc<VolumeReplication>) {
        *self.replication.lock().unwrap_or_else(|e| e.into_inner()) = Some(replication);
    }

    /// Something in the replication state changed (a bit newly set, a generation, a role):
    /// the next flush persists it.
    pub fn replication_changed(&self) {
        self.device.mark_meta_dirty();
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn set_size_bytes(&self, size_bytes: u64) {
        self.size_bytes.store(size_bytes, Ordering::Release);
    }

    pub fn chunk_size_bytes(&self) -> u64 {
        self.device.chunk_size_bytes()
    }

    /// Largest size any volume on this device may have.
    pub fn max_size_bytes(&self) -> u64 {
        self.map.len() as u64 * self.chunk_size_bytes()
    }

    pub(crate) fn mapping(&self, chunk: ChunkIndex) -> Option<PhysChunk> {
        let v = self.map.get(chunk.0 as usize)?.load(Ordering::Acquire);
        (v != UNMAPPED).then_some(PhysChunk(v))
    }

    /// Only the chunk's owner reactor (or the loader before reactors start) may call this.
    pub(crate) fn set_mapping(&self, chunk: ChunkIndex, phys: Option<PhysChunk>) {
        self.map[chunk.0 as usize].store(phys.map_or(UNMAPPED, |p| p.0), Ordering::Release);
    }

    /// Chunks that hold data.
    pub fn allocated_chunks(&self) -> u64 {
        let chunks = self.size_bytes().div_ceil(self.chunk_size_bytes()) as usize;
        self.map[..chunks.min(self.map.len())]
            .iter()
            .filter(|e| e.load(Ordering::Relaxed) != UNMAPPED)
            .count() as u64
    }

    /// "Data or zero" for a byte range: runs of (length, allocated) covering
    /// `offset_bytes..offset_bytes+len_bytes` (clipped to the volume), at most `max_runs`.
    pub fn allocation_runs(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        max_runs: usize,
    ) -> Vec<(u64, bool)> {
        let mut runs = Vec::new();
        self.allocation_runs_into(offset_bytes, len_bytes, max_runs, &mut runs);
        runs
    }

    /// [`Self::allocation_runs`] into a vector the caller reuses (cleared first): the data
    /// path asks this for every read.
    pub fn allocation_runs_into(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        max_runs: usize,
        runs: &mut Vec<(u64, bool)>,
    ) {
        runs.clear();
        let cs = self.chunk_size_bytes();
        let end = offset_bytes
            .saturating_add(len_bytes)
            .min(self.size_bytes());
        let mut pos = offset_bytes;
        while pos < end {
            let chunk = ChunkIndex(pos / cs);
            let chunk_end = ((chunk.0 + 1) * cs).min(end);
            let allocated = self.mapping(chunk).is_some();
            match runs.last_mut() {
                Some((len, a)) if *a == allocated => *len += chunk_end - pos,
                _ => {
                    if runs.len() == max_runs {
                        break;
                    }
                    runs.push((chunk_end - pos, allocated));
                }
            }
            pos = chunk_end;
        }
    }

    pub(crate) fn record(&self) -> VolumeRecord {
        let chunks = self.size_bytes().div_ceil(self.chunk_size_bytes()) as usize;
        let mapped = self.map[..chunks.min(self.map.len())]
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let v = e.load(Ordering::Acquire);
                (v != UNMAPPED).then_some((ChunkIndex(i as u64), PhysChunk(v)))
            })
            .collect();
        VolumeRecord {
            id: self.id,
            name: self.name.clone(),
            size_bytes: self.size_bytes(),
            mapped,
            replication: self.replication().map(|r| r.record()),
        }
    }

    /// The reactor that owns `chunk` of this volume.
    pub fn owner(&self, chunk: ChunkIndex, reactors: u32) -> ReactorId {
        chunk_owner(self.id, chunk, reactors)
    }
}

/// Spread a volume's chunks over reactors; consecutive chunks land on different reactors so a
/// sequential stream uses them all.
pub fn chunk_owner(volume: VolumeId, chunk: ChunkIndex, reactors: u32) -> ReactorId {
    debug_assert!(reactors > 0);
    let mixed = u64::from(volume.0).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ chunk.0;
    ReactorId((mixed % u64::from(reactors)) as u32)
}

/// Build a new volume after checking what an operator may get wrong.
pub(crate) fn checked_new_volume(
    id: VolumeId,
    name: &str,
    device: Arc<DeviceState>,
    size_bytes: u64,
) -> Result<Volume, crate::EngineError> {
    let err = |message: String| crate::EngineError::Volume {
        volume: name.to_string(),
        kind: crate::VolumeErrorKind::Invalid,
        message,
    };
    validate_volume_name(name).map_err(err)?;
    let block = u64::from(device.profile.logical_block_size_bytes);
    if size_bytes == 0 || !size_bytes.is_multiple_of(block) {
        return Err(err(format!(
            "size {size_bytes} bytes must be a non-zero multiple of the device block size {block}"
        )));
    }
    let max = u64::from(device.total_chunks()) * device.chunk_size_bytes();
    if size_bytes > max {
        return Err(err(format!(
            "size {size_bytes} bytes is larger than device {} can hold ({max} bytes after metadata)",
            device.name
        )));
    }
    Ok(Volume::new(id, name.to_string(), device, size_bytes))
}

/// Names appear in NBD export names, URLs and metadata: keep them plain.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= crate::meta::MAX_VOLUME_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "volume name {name:?} must be 1-{} characters of A-Z a-z 0-9 - _ . and not start with a dot",
            crate::meta::MAX_VOLUME_NAME_BYTES
        ))
    }
}
