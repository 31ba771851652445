//! Opening a device's metadata at start: find the label and the newest valid slot, or format a
//! blank device when allowed. Runs before the reactors start, with plain synchronous IO.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::alloc::ChunkAllocator;
use crate::error::EngineError;
use crate::ids::{ChunkIndex, DeviceId};
use crate::meta::{choose_slot, Label, MetaError, MetaSnapshot, LABEL_BYTES};
use crate::profile::FirmwareProfile;
use crate::replication::VolumeReplication;
use crate::volume::{validate_volume_name, DeviceHealth, DeviceState, Volume};

/// When the daemon may write a fresh label on a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatPolicy {
    /// Only if the device's label area is all zeros (a new file or a wiped disk).
    #[default]
    IfBlank,
    /// Never: a device without a label is an error.
    Never,
    /// Always, destroying what is there (explicit operator request only).
    Always,
}

/// Synchronous access used only while loading.
pub trait SyncAccess {
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    /// The allocated byte ranges of `range` in order (at most `max_ranges`; holes read as
    /// zeros), or None when the backend cannot tell (then all of it may hold data).
    fn allocated_ranges(
        &mut self,
        _range: std::ops::Range<u64>,
        _max_ranges: usize,
    ) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

/// What the loader knows about a device beyond its spec.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The backing file or block device, for messages.
    pub path: Option<std::path::PathBuf>,
    /// Why formatting this device would lose data (its state record says it held volumes):
    /// `format = "if-blank"` then refuses with this message.
    pub format_refusal: Option<String>,
}

/// What the loader needs to know about a device.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub id: DeviceId,
    pub name: String,
    pub kind: String,
    pub size_bytes: u64,
    pub persistent: bool,
    pub profile: FirmwareProfile,
    pub chunk_size_bytes: u64,
    pub format: FormatPolicy,
}

pub struct LoadedDevice {
    pub state: Arc<DeviceState>,
    pub volumes: Vec<Arc<Volume>>,
    pub generation: u64,
    /// The slot holding `generation`.
    pub slot: u64,
    /// This load wrote a fresh label.
    pub formatted: bool,
}

pub fn load_device(
    spec: &DeviceSpec,
    access: &mut dyn SyncAccess,
) -> Result<LoadedDevice, EngineError> {
    load_device_with(spec, access, &LoadOptions::default())
}

/// [`load_device`] with what the engine knows besides the spec (path, state record).
pub fn load_device_with(
    spec: &DeviceSpec,
    access: &mut dyn SyncAccess,
    opts: &LoadOptions,
) -> Result<LoadedDevice, EngineError> {
    let at = opts
        .path
        .as_ref()
        .map(|p| format!("({}) ", p.display()))
        .unwrap_or_default();
    let dev_err = |message: String| EngineError::Device {
        device: spec.name.clone(),
        message,
    };
    let io_err = |source: std::io::Error| EngineError::DeviceIo {
        device: spec.name.clone(),
        source,
    };
    let meta_err = |source: MetaError| EngineError::Metadata {
        device: spec.name.clone(),
        source,
    };
    crate::device::check_chunk_size(spec.chunk_size_bytes).map_err(dev_err)?;
    if !spec.persistent {
        let label = plan(spec)?;
        return build(spec, label, MetaSnapshot::default(), 0).map(formatted);
    }
    if spec.size_bytes < LABEL_BYTES {
        return Err(dev_err(format!(
            "{at}is {} bytes, too small to hold a ringblock label ({LABEL_BYTES} bytes); \
             refusing to format it. If it shrank (truncated), restore it from a backup",
            spec.size_bytes
        )));
    }
    let mut label_buf = vec![0u8; LABEL_BYTES as usize];
    access.read_at(0, &mut label_buf).map_err(io_err)?;
    let found = Label::decode(&label_buf);
    let format = match (&found, spec.format) {
        (_, FormatPolicy::Always) => true,
        (Err(MetaError::NoLabel), FormatPolicy::IfBlank) => {
            let plan = plan(spec)?;
            let findings =
                crate::blank::find_non_blank(access, spec.size_bytes, &plan).map_err(io_err)?;
            if !findings.is_empty() {
                return Err(dev_err(format!("{at}{}", not_blank_message(&findings))));
            }
            if let Some(why) = &opts.format_refusal {
                return Err(dev_err(format!("{at}is blank, but {why}")));
            }
            true
        }
        (Err(MetaError::NoLabel), FormatPolicy::Never) => {
            return Err(dev_err(
                "has no ringblock label and format = \"never\"".into(),
            ));
        }
        (Err(e), _) => {
            return Err(dev_err(format!(
                "{at}{e}; refusing to overwrite it (set format = \"always\" to reformat)"
            )));
        }
        (Ok(_), _) => false,
    };
    if format {
        let label = plan(spec)?;
        tracing::info!(device = %spec.name, chunks = label.total_chunks, "formatting device");
        let empty = MetaSnapshot::default()
            .encode(label.slot_bytes)
            .map_err(meta_err)?;
        access
            .write_at(label.slot_offset_bytes(0), &empty)
            .map_err(io_err)?;
        // A stale slot 1 from an earlier format could carry a higher generation.
        access
            .write_at(label.slot_offset_bytes(1), &vec![0u8; 4096])
            .map_err(io_err)?;
        access.sync().map_err(io_err)?;
        access.write_at(0, &label.encode()).map_err(io_err)?;
        access.sync().map_err(io_err)?;
        return build(spec, label, MetaSnapshot::default(), 0).map(formatted);
    }
    let label = found.expect("checked above");
    if label.chunk_size_bytes != spec.chunk_size_bytes {
        return Err(dev_err(format!(
            "was formatted with chunk_size_bytes = {}, configuration says {}",
            label.chunk_size_bytes, spec.chunk_size_bytes
        )));
    }
    let data_end = label.data_offset_bytes + u64::from(label.total_chunks) * label.chunk_size_bytes;
    if data_end > spec.size_bytes {
        return Err(dev_err(format!(
            "{at}is {} bytes but its label says it holds {data_end}: the device shrank \
             (a truncated file or a smaller partition). Refusing to open, resize or reformat \
             it: restore the device's full {data_end} bytes (e.g. from a backup) and start again",
            spec.size_bytes
        )));
    }
    let mut slots = [
        vec![0u8; label.slot_bytes as usize],
        vec![0u8; label.slot_bytes as usize],
    ];
    for (i, s) in slots.iter_mut().enumerate() {
        access
            .read_at(label.slot_offset_bytes(i as u64), s)
            .map_err(io_err)?;
    }
    let choice = choose_slot(&slots[0], &slots[1]).map_err(meta_err)?;
    let warning = choice.warning;
    let loaded = build(spec, label, choice.snapshot, choice.slot)?;
    if let Some(warning) = warning {
        tracing::warn!(
            device = %spec.name,
            "{warning}; the next metadata write rewrites both slots"
        );
        loaded.state.health.set_metadata_warning(warning);
        // The next flush round rewrites both slots, which repairs the bad one.
        loaded.state.mark_meta_dirty();
    }
    Ok(loaded)
}

fn formatted(mut l: LoadedDevice) -> LoadedDevice {
    l.formatted = true;
    l
}

/// Why `format = "if-blank"` refuses a device without a label, from what the scan found.
pub(crate) fn not_blank_message(findings: &[String]) -> String {
    format!(
        "has no ringblock label but is not blank: {}. format = \"if-blank\" formats only \
         blank devices, so nothing was changed. If its label was damaged (e.g. the first 4 KiB \
         were overwritten), restore it from a backup; to destroy what is there and start over, \
         set format = \"always\"",
        findings.join("; ")
    )
}

fn plan(spec: &DeviceSpec) -> Result<Label, EngineError> {
    let uuid = rand::random::<u128>();
    Label::plan(uuid, spec.size_bytes, spec.chunk_size_bytes).ok_or_else(|| EngineError::Device {
        device: spec.name.clone(),
        message: format!(
            "is {} bytes, too small to format: with chunk_size_bytes = {} a device needs at \
             least {} bytes (a 4 KiB label, two metadata slots and one chunk)",
            spec.size_bytes,
            spec.chunk_size_bytes,
            crate::device::min_device_bytes(spec.chunk_size_bytes)
        ),
    })
}

fn build(
    spec: &DeviceSpec,
    label: Label,
    snapshot: MetaSnapshot,
    slot: u64,
) -> Result<LoadedDevice, EngineError> {
    let corrupt = |m: String| EngineError::Device {
        device: spec.name.clone(),
        message: format!("corrupt metadata: {m}"),
    };
    let state = Arc::new(DeviceState {
        id: spec.id,
        name: spec.name.clone(),
        kind: spec.kind.clone(),
        size_bytes: spec.size_bytes,
        alloc: ChunkAllocator::new(label.total_chunks),
        label,
        profile: spec.profile.clone(),
        persistent: spec.persistent,
        meta_version: AtomicU64::new(0),
        persisted_version: AtomicU64::new(0),
        health: DeviceHealth::default(),
    });
    let mut volumes = Vec::new();
    let mut ids = HashSet::new();
    for rec in snapshot.volumes {
        // A crafted slot must not put control characters into logs and terminals: the name
        // is shown only escaped until it passes the same check as names from the API.
        if let Err(e) = validate_volume_name(&rec.name) {
            return Err(corrupt(format!("volume id {}: {e}", rec.id)));
        }
        if !ids.insert(rec.id) {
            return Err(corrupt(format!("volume id {} appears twice", rec.id)));
        }
        let volume = Volume::new(rec.id, rec.name.clone(), state.clone(), rec.size_bytes);
        if rec.size_bytes > volume.max_size_bytes() {
            return Err(corrupt(format!(
                "volume {} is larger than its device",
                rec.name
            )));
        }
        let chunks = rec.size_bytes.div_ceil(state.chunk_size_bytes());
        for (c, p) in rec.mapped {
            if c.0 >= chunks {
                return Err(corrupt(format!(
                    "volume {} maps chunk {c} past its end",
                    rec.name
                )));
            }
            if !state.alloc.claim(p) {
                return Err(corrupt(format!(
                    "chunk {p} is mapped twice or out of range"
                )));
            }
            volume.set_mapping(ChunkIndex(c.0), Some(p));
        }
        if let Some(r) = &rec.replication {
            let state = VolumeReplication::from_record(r, volume.max_size_bytes())
                .map_err(|e| corrupt(format!("volume {}: replication record: {e}", rec.name)))?;
            volume.load_replication(Arc::new(state));
        }
        volumes.push(Arc::new(volume));
    }
    Ok(LoadedDevice {
        state,
        volumes,
        generation: snapshot.generation,
        slot,
        formatted: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{PhysChunk, VolumeId};
    use crate::meta::VolumeRecord;

    /// A device image in memory.
    struct MemAccess(Vec<u8>);

    impl SyncAccess for MemAccess {
        fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let at = offset_bytes as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> std::io::Result<()> {
            let at = offset_bytes as usize;
            self.0[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn spec() -> DeviceSpec {
        DeviceSpec {
            id: DeviceId(0),
            name: "d0".into(),
            kind: "file".into(),
            size_bytes: 8 << 20,
            persistent: true,
            profile: crate::profile::builtin("flash").unwrap(),
            chunk_size_bytes: 1 << 20,
            format: FormatPolicy::IfBlank,
        }
    }

    /// A formatted device whose slots hold `slot0` and `slot1` (None: left as formatted).
    fn device_with(slot0: Option<&MetaSnapshot>, slot1: Option<&MetaSnapshot>) -> MemAccess {
        let spec = spec();
        let mut access = MemAccess(vec![0; spec.size_bytes as usize]);
        let label = load_device(&spec, &mut access).unwrap().state.label.clone();
        for (i, s) in [slot0, slot1].into_iter().enumerate() {
            if let Some(s) = s {
                let image = s.encode(label.slot_bytes).unwrap();
                access
                    .write_at(label.slot_offset_bytes(i as u64), &image)
                    .unwrap();
            }
        }
        access
    }

    fn volume(name: &str) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId(1),
            name: name.into(),
            size_bytes: 1 << 20,
            mapped: vec![(ChunkIndex(0), PhysChunk(0))],
            replication: None,
        }
    }

    #[test]
    fn a_volume_name_from_disk_is_checked_and_shown_escaped() {
        let evil = "x\u{1b}[2J\nINFO fake log line";
        let snapshot = MetaSnapshot {
            generation: 3,
            volumes: vec![volume(evil)],
        };
        let mut access = device_with(Some(&snapshot), None);
        let e = load_device(&spec(), &mut access).err().expect("refused");
        let msg = e.to_string();
        assert!(msg.contains("corrupt metadata"), "{msg}");
        assert!(
            !msg.contains('\u{1b}') && !msg.contains('\n'),
            "the raw name reached the message: {msg:?}"
        );
        assert!(msg.contains(&format!("{evil:?}")), "{msg}");
        // Names the API would refuse are refused from disk too.
        for bad in ["", ".hidden", "a b", "a/b"] {
            let snapshot = MetaSnapshot {
                generation: 3,
                volumes: vec![volume(bad)],
            };
            let mut access = device_with(Some(&snapshot), None);
            assert!(
                load_device(&spec(), &mut access).is_err(),
                "{bad:?} accepted"
            );
        }
        let snapshot = MetaSnapshot {
            generation: 3,
            volumes: vec![volume("good-name_1.0")],
        };
        let mut access = device_with(Some(&snapshot), None);
        assert_eq!(load_device(&spec(), &mut access).unwrap().volumes.len(), 1);
    }

    #[test]
    fn a_device_written_by_the_version_1_code_loads_and_takes_a_replication_record() {
        use crate::meta::tests::{unhex, V1_LABEL_HEX, V1_SLOT_HEX};
        use crate::replication::{NodeId, Role};
        let mut access = MemAccess(vec![0; spec().size_bytes as usize]);
        access.write_at(0, &unhex(V1_LABEL_HEX)).unwrap();
        let label = Label::decode(&access.0[..4096]).unwrap();
        // Both slots as a completed round leaves them (the same generation twice is the one
        // case the fixture's single slot can stand for).
        for slot in 0..2 {
            access
                .write_at(label.slot_offset_bytes(slot), &unhex(V1_SLOT_HEX))
                .unwrap();
        }
        let l = load_device(&spec(), &mut access).unwrap();
        assert_eq!((l.slot, l.generation, l.formatted), (0, 7, false));
        assert!(!l.state.meta_dirty(), "loading alone rewrites nothing");
        let names: Vec<_> = l.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["old-vol", "empty"]);
        assert!(l.volumes.iter().all(|v| v.replication().is_none()));
        let vol = &l.volumes[0];
        assert_eq!(vol.mapping(ChunkIndex(2)), Some(PhysChunk(0)));
        // Replicate it: the metadata becomes dirty, and the next round's snapshot (what
        // round.rs writes) carries the record into a version 2 slot.
        let node = NodeId::new(5).unwrap();
        let state =
            VolumeReplication::new(Role::Primary, vol.max_size_bytes(), 20, &[node]).unwrap();
        state.mark_dirty(&[node], 1 << 20, 4096);
        vol.set_replication(Some(Arc::new(state)));
        assert!(l.state.meta_dirty());
        let snapshot = MetaSnapshot {
            generation: 8,
            volumes: l.volumes.iter().map(|v| v.record()).collect(),
        };
        assert_eq!(snapshot.version(), crate::meta::SLOT_VERSION_REPLICATED);
        let image = snapshot.encode(label.slot_bytes).unwrap();
        access.write_at(label.slot_offset_bytes(1), &image).unwrap();
        let again = load_device(&spec(), &mut access).unwrap();
        assert_eq!((again.slot, again.generation), (1, 8));
        let rep = again.volumes[0].replication().expect("record loaded");
        let history = vol.replication().unwrap().history();
        assert_eq!(rep.history(), history);
        assert!(rep
            .replica(node)
            .unwrap()
            .dirty
            .is_dirty(crate::replication::RegionIndex(1)));
        assert!(again.volumes[1].replication().is_none());
        // A record that does not fit its volume is corrupt metadata, not a silent drop.
        let mut bad = snapshot.clone();
        let rec = bad.volumes[0].replication.as_mut().unwrap();
        rec.replicas[0].dirty = std::iter::once(1 << 20..(1 << 20) + 1).collect();
        bad.generation = 9;
        access
            .write_at(
                label.slot_offset_bytes(0),
                &bad.encode(label.slot_bytes).unwrap(),
            )
            .unwrap();
        let e = load_device(&spec(), &mut access).err().expect("refused");
        assert!(e.to_string().contains("replication record"), "{e}");
    }

    #[test]
    fn a_fallback_is_recorded_in_health_and_schedules_a_rewrite() {
        let older = MetaSnapshot {
            generation: 4,
            volumes: vec![volume("a")],
        };
        let newer = MetaSnapshot {
            generation: 5,
            volumes: vec![volume("a")],
        };
        let mut access = device_with(Some(&older), Some(&newer));
        let l = load_device(&spec(), &mut access).unwrap();
        assert_eq!((l.slot, l.generation), (1, 5));
        assert_eq!(l.state.health.metadata_warning(), None);
        assert!(!l.state.meta_dirty());
        // Corrupt the newest slot's payload.
        let at = l.state.label.slot_offset_bytes(1) + 40;
        access.0[at as usize] ^= 0x20;
        let l = load_device(&spec(), &mut access).unwrap();
        assert_eq!((l.slot, l.generation), (0, 4));
        let w = l.state.health.metadata_warning().expect("warning recorded");
        assert!(
            w.contains("generation 5") && w.contains("generation 4"),
            "{w}"
        );
        assert!(
            l.state.meta_dirty(),
            "the next round must rewrite both slots"
        );
    }
}
