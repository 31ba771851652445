//! On-device metadata: a label written once at format, and two metadata slots, each with a
//! generation number and a crc32c. Every metadata round writes both slots one after the other
//! (see [`choose_slot`]): a torn write of either leaves the other holding every acknowledged
//! change.
//!
//! ```text
//! offset 0                 label (4 KiB)
//! LABEL_BYTES              slot 0 (slot_bytes)
//! LABEL_BYTES + slot_bytes slot 1 (slot_bytes)
//! data_offset_bytes        chunk 0, chunk 1, ... (chunk_size_bytes each)
//! ```
//!
//! Integers are little-endian. The format is explicit rather than serde-derived because it is
//! an on-disk contract that must not shift when a Rust type changes.
//!
//! Versions: the label is version 1. A slot is version 1 (volumes and chunk maps) unless a
//! volume carries a replication record, then version 2 (each volume entry is followed by a
//! flag byte and, when set, the record: [`crate::replication::record`]). A device written by
//! the code that knew only version 1 loads unchanged, and it is written back as version 1 for
//! as long as no volume is replicated, so that code can still read it; the first replication
//! record makes both slots version 2, which that code refuses ("unsupported format version")
//! rather than misreads.

use crate::ids::{ChunkIndex, PhysChunk, VolumeId};
use crate::replication::record::{ReplicationRecord, RECORD_MAX_BYTES};

pub const LABEL_BYTES: u64 = 4096;
const LABEL_MAGIC: &[u8; 8] = b"RBLABEL1";
const SLOT_MAGIC: &[u8; 8] = b"RBMETA01";
/// The label's format version.
pub const LABEL_VERSION: u32 = 1;
/// A slot without replication records (the original format).
pub const SLOT_VERSION_PLAIN: u32 = 1;
/// A slot whose volume entries may carry replication records.
pub const SLOT_VERSION_REPLICATED: u32 = 2;
/// Most volumes one device holds.
pub const MAX_VOLUMES_PER_DEVICE: usize = 256;
/// Longest volume name, in bytes.
pub const MAX_VOLUME_NAME_BYTES: usize = 128;
const SLOT_HEADER_BYTES: usize = 32;
const VOLUME_ENTRY_MAX_BYTES: usize = 4 + 2 + MAX_VOLUME_NAME_BYTES + 8 + 8;
const MAP_ENTRY_BYTES: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("no ringblock label (device is not formatted)")]
    NoLabel,
    #[error("label is corrupt: {0}")]
    CorruptLabel(&'static str),
    #[error("metadata slot is corrupt: {0}")]
    CorruptSlot(String),
    #[error("metadata does not fit its slot ({needed} > {slot} bytes)")]
    TooLarge { needed: usize, slot: u64 },
    #[error("replication record cannot be written: {0}")]
    InvalidRecord(&'static str),
}

/// Written once at format; fixes the device's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub device_uuid: u128,
    pub chunk_size_bytes: u64,
    pub slot_bytes: u64,
    pub data_offset_bytes: u64,
    pub total_chunks: u32,
}

impl Label {
    /// Layout for a device of `device_size_bytes` cut into chunks of `chunk_size_bytes`.
    /// None when not even one data chunk fits.
    pub fn plan(device_uuid: u128, device_size_bytes: u64, chunk_size_bytes: u64) -> Option<Label> {
        assert!(chunk_size_bytes.is_power_of_two() && chunk_size_bytes >= 4096);
        let max_chunks = (device_size_bytes / chunk_size_bytes).min(u32::MAX as u64);
        let slot_bytes = slot_bytes_for(max_chunks);
        let meta_end = LABEL_BYTES + 2 * slot_bytes;
        let data_offset_bytes = meta_end.div_ceil(chunk_size_bytes) * chunk_size_bytes;
        let total_chunks = device_size_bytes.checked_sub(data_offset_bytes)? / chunk_size_bytes;
        if total_chunks == 0 {
            return None;
        }
        Some(Label {
            device_uuid,
            chunk_size_bytes,
            slot_bytes,
            data_offset_bytes,
            total_chunks: total_chunks as u32,
        })
    }

    pub fn slot_offset_bytes(&self, slot: u64) -> u64 {
        LABEL_BYTES + slot * self.slot_bytes
    }

    pub fn chunk_offset_bytes(&self, chunk: PhysChunk) -> u64 {
        self.data_offset_bytes + u64::from(chunk.0) * self.chunk_size_bytes
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(LABEL_BYTES as usize);
        b.extend_from_slice(LABEL_MAGIC);
        b.extend_from_slice(&LABEL_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // crc placeholder
        b.extend_from_slice(&self.device_uuid.to_le_bytes());
        b.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        b.extend_from_slice(&self.slot_bytes.to_le_bytes());
        b.extend_from_slice(&self.data_offset_bytes.to_le_bytes());
        b.extend_from_slice(&self.total_chunks.to_le_bytes());
        let crc = crc32c::crc32c(&b[16..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b.resize(LABEL_BYTES as usize, 0);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Label, MetaError> {
        if b.len() < 60 {
            return Err(MetaError::CorruptLabel("short"));
        }
        if &b[0..8] != LABEL_MAGIC {
            return Err(if b[..60].iter().all(|&x| x == 0) {
                MetaError::NoLabel
            } else {
                MetaError::CorruptLabel("bad magic (not a ringblock device?)")
            });
        }
        let mut r = Reader::new(&b[8..60]);
        let version = r.u32()?;
        if version != LABEL_VERSION {
            return Err(MetaError::CorruptLabel("unsupported format version"));
        }
        let crc = r.u32()?;
        if crc != crc32c::crc32c(&b[16..60]) {
            return Err(MetaError::CorruptLabel("checksum mismatch"));
        }
        let label = Label {
            device_uuid: r.u128()?,
            chunk_size_bytes: r.u64()?,
            slot_bytes: r.u64()?,
            data_offset_bytes: r.u64()?,
            total_chunks: r.u32()?,
        };
        if !label.chunk_size_bytes.is_power_of_two()
            || label.chunk_size_bytes < 4096
            || !label.slot_bytes.is_multiple_of(4096)
            || label.data_offset_bytes < LABEL_BYTES + 2 * label.slot_bytes
        {
            return Err(MetaError::CorruptLabel("inconsistent layout"));
        }
        Ok(label)
    }
}

impl Label {
    /// How many replicated volumes this device's slots are sure to hold next to the largest
    /// volume table and chunk map they can have: the runtime refuses to replicate more
    /// volumes of the device than this. A device formatted before replication records existed
    /// has only its slots' rounding slack (often room for none).
    pub fn replication_capacity(&self) -> usize {
        let plain = plain_bytes(u64::from(self.total_chunks)) + MAX_VOLUMES_PER_DEVICE as u64;
        (self.slot_bytes.saturating_sub(plain) / (1 + RECORD_MAX_BYTES) as u64) as usize
    }
}

/// The largest slot without replication records: header, volume count, every volume's entry
/// at its longest, a map entry for every chunk.
fn plain_bytes(max_chunks: u64) -> u64 {
    SLOT_HEADER_BYTES as u64
        + 4
        + (MAX_VOLUMES_PER_DEVICE * VOLUME_ENTRY_MAX_BYTES) as u64
        + max_chunks * MAP_ENTRY_BYTES as u64
}

/// Replication records a new device's slots make room for: one per 16 chunks (so a small
/// device does not give a data chunk to them), at least one, at most one per volume.
fn replication_reserve(max_chunks: u64) -> u64 {
    (max_chunks / 16).clamp(1, MAX_VOLUMES_PER_DEVICE as u64)
}

fn slot_bytes_for(max_chunks: u64) -> u64 {
    // The flag byte of every volume entry, then the reserved records.
    let raw = plain_bytes(max_chunks)
        + MAX_VOLUMES_PER_DEVICE as u64
        + replication_reserve(max_chunks) * (1 + RECORD_MAX_BYTES) as u64;
    raw.div_ceil(4096) * 4096
}

/// One volume as recorded in metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    /// Mapped chunks only; everything else reads as zeros.
    pub mapped: Vec<(ChunkIndex, PhysChunk)>,
    /// Set on a replicated volume (a version 2 slot).
    pub replication: Option<ReplicationRecord>,
}

/// Everything a device's metadata slot holds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetaSnapshot {
    pub generation: u64,
    pub volumes: Vec<VolumeRecord>,
}

impl MetaSnapshot {
    /// The slot version this snapshot is written as: the original one unless a volume is
    /// replicated.
    pub fn version(&self) -> u32 {
        if self.volumes.iter().any(|v| v.replication.is_some()) {
            SLOT_VERSION_REPLICATED
        } else {
            SLOT_VERSION_PLAIN
        }
    }

    /// Serialize into a slot image of exactly `slot_bytes` (zero padded). What does not fit
    /// is an error ([`MetaError::TooLarge`]), never cut short.
    pub fn encode(&self, slot_bytes: u64) -> Result<Vec<u8>, MetaError> {
        let version = self.version();
        let mut p = Vec::new();
        p.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for v in &self.volumes {
            assert!(
                v.name.len() <= MAX_VOLUME_NAME_BYTES,
                "volume name length is validated on create"
            );
            p.extend_from_slice(&v.id.0.to_le_bytes());
            p.extend_from_slice(&(v.name.len() as u16).to_le_bytes());
            p.extend_from_slice(v.name.as_bytes());
            p.extend_from_slice(&v.size_bytes.to_le_bytes());
            p.extend_from_slice(&(v.mapped.len() as u64).to_le_bytes());
            for (c, pc) in &v.mapped {
                p.extend_from_slice(&c.0.to_le_bytes());
                p.extend_from_slice(&pc.0.to_le_bytes());
            }
            if version == SLOT_VERSION_REPLICATED {
                match &v.replication {
                    None => p.push(0),
                    Some(r) => {
                        p.push(1);
                        r.encode(&mut p)?;
                    }
                }
            }
        }
        let needed = SLOT_HEADER_BYTES + p.len();
        if needed as u64 > slot_bytes {
            return Err(MetaError::TooLarge {
                needed,
                slot: slot_bytes,
            });
        }
        let mut b = Vec::with_capacity(slot_bytes as usize);
        b.extend_from_slice(SLOT_MAGIC);
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // crc placeholder
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(p.len() as u64).to_le_bytes());
        b.extend_from_slice(&p);
        let crc = crc32c::crc32c(&b[16..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b.resize(slot_bytes as usize, 0);
        Ok(b)
    }

    /// Parse a slot image. Any inconsistency is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<MetaSnapshot, MetaError> {
        let corrupt = |m: &str| MetaError::CorruptSlot(m.to_string());
        if b.len() < SLOT_HEADER_BYTES || &b[0..8] != SLOT_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let mut h = Reader::new(&b[8..SLOT_HEADER_BYTES]);
        let version = h.u32()?;
        if version != SLOT_VERSION_PLAIN && version != SLOT_VERSION_REPLICATED {
            return Err(corrupt("unsupported format version"));
        }
        let crc = h.u32()?;
        let generation = h.u64()?;
        let payload_len = h.u64()?;
        let end = (SLOT_HEADER_BYTES as u64)
            .checked_add(payload_len)
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| corrupt("payload length past the slot"))? as usize;
        if crc != crc32c::crc32c(&b[16..end]) {
            return Err(corrupt("checksum mismatch"));
        }
        let mut r = Reader::new(&b[SLOT_HEADER_BYTES..end]);
        let count = r.u32()? as usize;
        if count > MAX_VOLUMES_PER_DEVICE {
            return Err(corrupt("too many volumes"));
        }
        let mut volumes = Vec::with_capacity(count);
        for _ in 0..count {
            let id = VolumeId(r.u32()?);
            let name_len = r.u16()? as usize;
            if name_len > MAX_VOLUME_NAME_BYTES {
                return Err(corrupt("volume name too long"));
            }
            let name = String::from_utf8(r.bytes(name_len)?.to_vec())
                .map_err(|_| corrupt("volume name not UTF-8"))?;
            let size_bytes = r.u64()?;
            let mapped_len = r.u64()?;
            if mapped_len > (r.remaining() / MAP_ENTRY_BYTES) as u64 {
                return Err(corrupt("map longer than the slot"));
            }
            let mut mapped = Vec::with_capacity(mapped_len as usize);
            for _ in 0..mapped_len {
                mapped.push((ChunkIndex(r.u64()?), PhysChunk(r.u32()?)));
            }
            let replication = match version {
                SLOT_VERSION_PLAIN => None,
                _ => match r.u8()? {
                    0 => None,
                    1 => Some(ReplicationRecord::decode(&mut r)?),
                    _ => return Err(corrupt("unknown replication flag")),
                },
            };
            volumes.push(VolumeRecord {
                id,
                name,
                size_bytes,
                mapped,
                replication,
            });
        }
        if r.remaining() != 0 {
            return Err(corrupt("trailing bytes"));
        }
        Ok(MetaSnapshot {
            generation,
            volumes,
        })
    }
}

/// Which slot the loader uses, and why it is not simply the newest one when it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotChoice {
    pub slot: u64,
    pub snapshot: MetaSnapshot,
    /// Set when the slots are not as a completed metadata round leaves them (one invalid, or
    /// generations not adjacent): what was found, for the log and the device's health.
    pub warning: Option<String>,
}

/// The generation in a slot's header when its magic and version are right (its checksum may
/// still be wrong): to name it in a warning, never to trust it.
pub fn header_generation(b: &[u8]) -> Option<u64> {
    if b.len() < SLOT_HEADER_BYTES || &b[0..8] != SLOT_MAGIC {
        return None;
    }
    let mut h = Reader::new(&b[8..SLOT_HEADER_BYTES]);
    let version = h.u32().ok()?;
    (version == SLOT_VERSION_PLAIN || version == SLOT_VERSION_REPLICATED).then_some(())?;
    h.u32().ok()?;
    h.u64().ok()
}

/// Choose the slot to load. Every metadata round writes the older slot (generation g+1),
/// syncs, then the newer one (g+2), syncs, and only then acknowledges: after a round both slots
/// hold its change, and a crash mid-round leaves the other slot with everything acknowledged.
/// So:
/// - both valid, adjacent generations: the newer (the normal case);
/// - both valid, generations further apart: the newer. Generations only grow, so the newer
///   was written last; the older is stale (its write was lost in a failed round, or the slot
///   was restored from elsewhere) and loading it would be a rollback. Worth a warning.
/// - both valid, the same generation: no writer does that. Same contents: either; different:
///   refused, since nothing tells which is newer.
/// - one invalid: the valid one, with a warning naming both generations and the reason,
///   unless the invalid slot was never written (all-zero header next to a freshly formatted
///   generation 0). Nothing acknowledged is lost when the device was written this way.
/// - both invalid: the metadata is lost, an error (never a silent reformat).
pub fn choose_slot(slot0: &[u8], slot1: &[u8]) -> Result<SlotChoice, MetaError> {
    let decoded = [MetaSnapshot::decode(slot0), MetaSnapshot::decode(slot1)];
    let raw = [slot0, slot1];
    match decoded {
        [Ok(a), Ok(b)] => {
            if a.generation == b.generation {
                if a != b {
                    return Err(MetaError::CorruptSlot(format!(
                        "both slots claim generation {} with different contents; cannot tell \
                         which is newer",
                        a.generation
                    )));
                }
                return Ok(SlotChoice {
                    slot: 0,
                    snapshot: a,
                    warning: None,
                });
            }
            let (slot, newer, older) = if b.generation > a.generation {
                (1, b, a.generation)
            } else {
                (0, a, b.generation)
            };
            let warning = (newer.generation - older != 1).then(|| {
                format!(
                    "metadata slots hold generations {} (slot {slot}) and {older} (slot {}), \
                     which are not adjacent; using the newer",
                    newer.generation,
                    slot ^ 1
                )
            });
            Ok(SlotChoice {
                slot,
                snapshot: newer,
                warning,
            })
        }
        [Err(e0), Err(e1)] => Err(MetaError::CorruptSlot(format!(
            "both slots are invalid (slot 0: {e0}; slot 1: {e1})"
        ))),
        [a, b] => {
            let (slot, snapshot, err) = match (a, b) {
                (Ok(s), Err(e)) => (0u64, s, e),
                (Err(e), Ok(s)) => (1, s, e),
                _ => unreachable!("one valid, one invalid"),
            };
            let bad = raw[(slot ^ 1) as usize];
            let never_written = snapshot.generation == 0
                && bad.len() >= SLOT_HEADER_BYTES
                && bad[..SLOT_HEADER_BYTES].iter().all(|&x| x == 0);
            let warning = (!never_written).then(|| {
                let bad_generation = header_generation(bad)
                    .map_or("header unreadable".to_string(), |g| {
                        format!("generation {g}")
                    });
                format!(
                    "metadata slot {} ({bad_generation}) is invalid ({err}); using slot {slot} \
                     (generation {})",
                    slot ^ 1,
                    snapshot.generation
                )
            });
            Ok(SlotChoice {
                slot,
                snapshot,
                warning,
            })
        }
    }
}

/// [`choose_slot`] without the warning: the slot and its snapshot.
pub fn pick_slot(slot0: &[u8], slot1: &[u8]) -> Result<(u64, MetaSnapshot), MetaError> {
    choose_slot(slot0, slot1).map(|c| (c.slot, c.snapshot))
}

/// Reads little-endian fields; running out is a corrupt slot, never a panic.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.b.len()
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], MetaError> {
        if self.b.len() < n {
            return Err(MetaError::CorruptSlot("truncated".into()));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, MetaError> {
        Ok(self.bytes(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, MetaError> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub(crate) fn u128(&mut self) -> Result<u128, MetaError> {
        Ok(u128::from_le_bytes(
            self.bytes(16)?.try_into().expect("16 bytes"),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::replication::record::tests::arb_valid_record;
    use proptest::prelude::*;

    fn arb_snapshot() -> impl Strategy<Value = MetaSnapshot> {
        let vol = (
            any::<u32>(),
            "[a-z0-9_-]{1,40}",
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u32>()), 0..50),
            proptest::option::weighted(0.3, arb_valid_record()),
        )
            .prop_map(|(id, name, size_bytes, m, replication)| VolumeRecord {
                id: VolumeId(id),
                name,
                size_bytes,
                mapped: m
                    .into_iter()
                    .map(|(c, p)| (ChunkIndex(c), PhysChunk(p)))
                    .collect(),
                replication,
            });
        (any::<u64>(), proptest::collection::vec(vol, 0..8)).prop_map(|(generation, volumes)| {
            MetaSnapshot {
                generation,
                volumes,
            }
        })
    }

    #[test]
    fn label_plan_and_roundtrip() {
        let l = Label::plan(7, 1 << 30, 1 << 20).unwrap();
        assert!(l.data_offset_bytes >= LABEL_BYTES + 2 * l.slot_bytes);
        assert_eq!(l.data_offset_bytes % (1 << 20), 0);
        assert!(l.data_offset_bytes + u64::from(l.total_chunks) * (1 << 20) <= 1 << 30);
        assert_eq!(Label::decode(&l.encode()).unwrap(), l);
        assert_eq!(Label::decode(&[0u8; 4096]), Err(MetaError::NoLabel));
        assert!(
            Label::plan(7, 1 << 20, 1 << 20).is_none(),
            "no room for data"
        );
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_falls_back() {
        let a = MetaSnapshot {
            generation: 4,
            volumes: vec![],
        };
        let b = MetaSnapshot {
            generation: 5,
            volumes: vec![],
        };
        let ea = a.encode(8192).unwrap();
        let mut eb = b.encode(8192).unwrap();
        assert_eq!(pick_slot(&ea, &eb).unwrap().1.generation, 5);
        eb[20] ^= 1; // torn
        assert_eq!(pick_slot(&ea, &eb).unwrap(), (0, a));
    }

    fn snap(generation: u64, names: &[&str]) -> MetaSnapshot {
        MetaSnapshot {
            generation,
            volumes: names
                .iter()
                .enumerate()
                .map(|(i, n)| VolumeRecord {
                    id: VolumeId(i as u32 + 1),
                    name: n.to_string(),
                    size_bytes: 1 << 20,
                    mapped: vec![],
                    replication: None,
                })
                .collect(),
        }
    }

    #[test]
    fn fallback_names_both_generations_and_the_reason() {
        let older = snap(6, &["a"]).encode(8192).unwrap();
        let mut newer = snap(7, &["a"]).encode(8192).unwrap();
        newer[40] ^= 1; // payload byte: the header (generation 7) stays readable
        let c = choose_slot(&older, &newer).unwrap();
        assert_eq!((c.slot, c.snapshot.generation), (0, 6));
        let w = c.warning.unwrap();
        assert!(
            w.contains("slot 1 (generation 7)")
                && w.contains("checksum mismatch")
                && w.contains("slot 0 (generation 6)"),
            "{w}"
        );
        newer[0] ^= 1; // magic: the header is unreadable
        let w = choose_slot(&newer, &older).unwrap().warning.unwrap();
        assert!(
            w.contains("slot 0 (header unreadable)") && w.contains("slot 1 (generation 6)"),
            "{w}"
        );
    }

    #[test]
    fn fresh_format_is_no_fallback_but_a_zeroed_slot_later_is() {
        let blank = vec![0u8; 8192];
        let fresh = snap(0, &[]).encode(8192).unwrap();
        assert_eq!(choose_slot(&fresh, &blank).unwrap().warning, None);
        let later = snap(9, &["a"]).encode(8192).unwrap();
        let w = choose_slot(&blank, &later).unwrap().warning.unwrap();
        assert!(w.contains("slot 0 (header unreadable)"), "{w}");
    }

    #[test]
    fn slot_generations_decide_safely() {
        let g = |n: u64, names: &[&str]| snap(n, names).encode(8192).unwrap();
        // Adjacent: the newer, quietly.
        let c = choose_slot(&g(8, &["a"]), &g(9, &[])).unwrap();
        assert_eq!((c.slot, c.snapshot.generation, c.warning), (1, 9, None));
        // Not adjacent: still the newer (the older is stale), with a warning.
        let c = choose_slot(&g(12, &[]), &g(9, &["a"])).unwrap();
        assert_eq!((c.slot, c.snapshot.generation), (0, 12));
        assert!(c.warning.unwrap().contains("not adjacent"));
        // The same generation: fine if identical, refused if not.
        let c = choose_slot(&g(5, &["a"]), &g(5, &["a"])).unwrap();
        assert_eq!((c.snapshot.generation, c.warning), (5, None));
        let e = choose_slot(&g(5, &["a"]), &g(5, &["b"])).unwrap_err();
        assert!(e.to_string().contains("cannot tell which is newer"), "{e}");
        // Both invalid: an error naming both reasons.
        let e = choose_slot(&[0u8; 64], &[1u8; 64]).unwrap_err();
        assert!(e.to_string().contains("slot 0: ") && e.to_string().contains("slot 1: "));
    }

    /// A device's label and metadata slot 0 as the code that knew only version 1 wrote them
    /// (two volumes, generation 7), to the end of the slot's payload.
    pub(crate) const V1_LABEL_HEX: &str =
        "52424c4142454c31010000007e60bc337766554433221100efcdab89674523010000100000000000\
        00a0000000000000000010000000000007000000";
    pub(crate) const V1_SLOT_HEX: &str =
        "52424d455441303101000000387c00bc070000000000000054000000000000000200000001000000\
        07006f6c642d766f6c0000300000000000020000000000000000000000000000000200000002000000\
        0000000000000000020000000500656d70747900001000000000000000000000000000";

    pub(crate) fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    fn replicated(rec: &MetaSnapshot) -> MetaSnapshot {
        use crate::replication::{GenerationHistory, NodeId, ReplicaRecord, Role};
        let mut rec = rec.clone();
        rec.volumes[0].replication = Some(ReplicationRecord {
            role: Role::Primary,
            region_shift: 20,
            history: GenerationHistory::created(),
            replicas: vec![ReplicaRecord {
                node: NodeId::new(9).unwrap(),
                since: None,
                full_sync: true,
                dirty: std::iter::once(1..3).collect(),
            }],
            activity: vec![],
        });
        rec
    }

    #[test]
    fn a_version_1_slot_loads_and_stays_version_1_until_a_volume_is_replicated() {
        let label = Label::decode(&unhex(V1_LABEL_HEX)).unwrap();
        let mut slot = unhex(V1_SLOT_HEX);
        slot.resize(label.slot_bytes as usize, 0);
        let snap = MetaSnapshot::decode(&slot).unwrap();
        assert_eq!(snap.generation, 7);
        let names: Vec<_> = snap.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["old-vol", "empty"]);
        assert_eq!(
            snap.volumes[0].mapped,
            [(ChunkIndex(0), PhysChunk(2)), (ChunkIndex(2), PhysChunk(0))]
        );
        assert!(snap.volumes.iter().all(|v| v.replication.is_none()));
        // Written back unchanged: byte for byte what the old code wrote.
        assert_eq!(snap.version(), SLOT_VERSION_PLAIN);
        assert_eq!(snap.encode(label.slot_bytes).unwrap(), slot);
        // A replication record makes it version 2, which the old code's check refuses.
        let rep = replicated(&snap);
        let image = rep.encode(label.slot_bytes).unwrap();
        assert_eq!(header_generation(&image), Some(7));
        assert_eq!(&image[8..12], &SLOT_VERSION_REPLICATED.to_le_bytes());
        assert_eq!(MetaSnapshot::decode(&image).unwrap(), rep);
        // This old 8 MiB device has room for no guaranteed record, a new one for one.
        assert_eq!(label.replication_capacity(), 0);
        let new = Label::plan(1, 8 << 20, 1 << 20).unwrap();
        assert!(new.replication_capacity() >= 1);
        assert_eq!(new.data_offset_bytes, label.data_offset_bytes);
    }

    #[test]
    fn new_layouts_reserve_room_for_replication_records() {
        for (size, chunk) in [
            (8u64 << 20, 1u64 << 20),
            (1 << 30, 1 << 20),
            (64 << 30, 1 << 20),
            (1 << 30, 4096),
        ] {
            let l = Label::plan(1, size, chunk).unwrap();
            let reserved = replication_reserve(size / chunk) as usize;
            assert!(l.replication_capacity() >= reserved, "{size} {chunk}");
            // The worst case fits: every volume at its longest, every chunk mapped, the
            // reserved records at their largest.
            assert!(
                plain_bytes(u64::from(l.total_chunks))
                    + MAX_VOLUMES_PER_DEVICE as u64
                    + reserved as u64 * (1 + RECORD_MAX_BYTES) as u64
                    <= l.slot_bytes
            );
        }
        // The default 1 GiB RAM device keeps its data where it was.
        let l = Label::plan(1, (1 << 30) + (64 << 20), 1 << 20).unwrap();
        assert_eq!(l.data_offset_bytes, 1 << 20);
    }

    #[test]
    fn a_record_that_does_not_fit_is_an_error_not_a_truncation() {
        let snap = replicated(&snap(3, &["a"]));
        let needed = snap
            .encode(1 << 20)
            .unwrap()
            .iter()
            .rposition(|&b| b != 0)
            .unwrap();
        match snap.encode(4096.min(needed as u64)) {
            Err(MetaError::TooLarge { needed: n, slot }) => assert!(n as u64 > slot),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn snapshot_roundtrip(s in arb_snapshot()) {
            let e = s.encode(1 << 20).unwrap();
            prop_assert_eq!(MetaSnapshot::decode(&e).unwrap(), s);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = MetaSnapshot::decode(&bytes);
            let _ = Label::decode(&bytes);
        }

        #[test]
        fn any_bit_flip_is_detected(s in arb_snapshot(), flip in any::<proptest::sample::Index>()) {
            let mut e = s.encode(1 << 20).unwrap();
            let used = 32 + u64::from_le_bytes(e[24..32].try_into().unwrap()) as usize;
            let i = flip.index(used);
            e[i] ^= 0x10;
            prop_assert!(MetaSnapshot::decode(&e).is_err());
        }
    }
}
