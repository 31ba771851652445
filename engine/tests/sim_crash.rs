//! Crash consistency on the simulated disk, over many seeds: random reads, writes (some FUA),
//! trims, write-zeroes and flushes on two volumes sharing one device; a power cut at a random
//! point; restart from what survived; then check, sector by sector, that
//! - every write acknowledged before a completed FLUSH (or acknowledged with FUA) reads back,
//!   unless a later write replaced it, and
//! - nothing reads back that was never written (each sector decodes to exactly one write).
//!
//! Before the crash, every read must return exactly the last acknowledged data.
//! `RINGBLOCK_SIM_SEEDS=N` runs more seeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::profile;
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::{
    AlignedBuf, DeviceId, DeviceSpec, FormatPolicy, IoBuf, Port, PortWaker, Request, RequestKind,
    Volume, VolumeId,
};

const SECTOR: u64 = 512;
const CHUNK: u64 = 16 * 1024;
const DEVICE_BYTES: u64 = 3 << 20;
const VOLUME_BYTES: u64 = 1 << 20;
const MAX_QD: usize = 8;

/// Sector contents for write `value` at absolute sector `s`: decodable back to `value`.
fn fill_sector(out: &mut [u8], value: u64, s: u64) {
    out[..8].copy_from_slice(&value.to_le_bytes());
    out[8..16].copy_from_slice(&s.to_le_bytes());
    let mut x = value.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ s;
    for b in out[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

/// The write a sector came from (0 = zeros), or an error naming what is wrong with it.
fn decode_sector(data: &[u8], s: u64) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let value = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mut expect = vec![0u8; SECTOR as usize];
    fill_sector(&mut expect, value, s);
    if expect == data {
        Ok(value)
    } else {
        Err(format!(
            "sector {s} holds bytes no write produced (header value {value})"
        ))
    }
}

/// Per-sector history: `vals[0]` is durable for sure; later entries may or may not be.
#[derive(Clone)]
struct SectorLog {
    base: u64,
    vals: Vec<u64>,
    /// Absolute index of the last acknowledged value.
    acked: u64,
}

impl SectorLog {
    fn new(v: u64) -> Self {
        Self {
            base: 0,
            vals: vec![v],
            acked: 0,
        }
    }
}

struct Model {
    sectors: HashMap<(u32, u64), SectorLog>,
}

impl Model {
    fn log(&mut self, vol: u32, s: u64) -> &mut SectorLog {
        self.sectors
            .entry((vol, s))
            .or_insert_with(|| SectorLog::new(0))
    }
}

enum Pending {
    Read {
        vol: u32,
        offset: u64,
        len: u64,
    },
    Write {
        vol: u32,
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush {
        snaps: Vec<((u32, u64), u64)>,
    },
}

struct Workload {
    rng: ChaCha8Rng,
    next_value: u64,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    model: Model,
}

fn spec() -> DeviceSpec {
    let mut p = profile::builtin("flash").unwrap();
    p.logical_block_size_bytes = SECTOR as u32;
    DeviceSpec {
        id: DeviceId(0),
        name: "sim0".into(),
        kind: "sim".into(),
        size_bytes: DEVICE_BYTES,
        persistent: true,
        profile: p,
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
    }
}

fn busy(pending: &HashMap<u64, Pending>, vol: u32, offset: u64, len: u64, is_read: bool) -> bool {
    pending.values().any(|p| match *p {
        Pending::Write {
            vol: v,
            offset: o,
            len: l,
            ..
        } => v == vol && offset < o + l && o < offset + len,
        Pending::Read {
            vol: v,
            offset: o,
            len: l,
        } if !is_read => v == vol && offset < o + l && o < offset + len,
        _ => false,
    })
}

impl Workload {
    /// Issue one random op if the queue has room.
    fn issue(&mut self, cluster: &mut SimCluster, vols: &[Arc<Volume>], port: &Arc<Port>) {
        if self.pending.len() >= MAX_QD {
            return;
        }
        let vi = self.rng.gen_range(0..vols.len());
        let vol = &vols[vi];
        let sectors = VOLUME_BYTES / SECTOR;
        let len_sectors = self.rng.gen_range(1..=(3 * CHUNK / SECTOR)).min(sectors);
        let start = self.rng.gen_range(0..=sectors - len_sectors);
        let (offset, len) = (start * SECTOR, len_sectors * SECTOR);
        let tag = self.next_tag;
        self.next_tag += 1;
        let roll = self.rng.gen_range(0..100);
        let vid = vol.id.0;
        let (req, pending) = if roll < 8 {
            let snaps = self
                .model
                .sectors
                .iter()
                .map(|(k, l)| (*k, l.acked))
                .collect();
            (
                Request {
                    kind: RequestKind::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    fua: false,
                    buf: None,
                    mover: None,
                    tag,
                },
                Pending::Flush { snaps },
            )
        } else if roll < 28 {
            if busy(&self.pending, vid, offset, len, true) {
                return;
            }
            let buf = IoBuf::owned(AlignedBuf::zeroed(len as usize));
            (
                Request {
                    kind: RequestKind::Read,
                    offset_bytes: offset,
                    len_bytes: len,
                    fua: false,
                    buf: Some(buf),
                    mover: None,
                    tag,
                },
                Pending::Read {
                    vol: vid,
                    offset,
                    len,
                },
            )
        } else {
            if busy(&self.pending, vid, offset, len, false) {
                return;
            }
            let kind = match roll {
                28..=33 => RequestKind::Trim,
                34..=39 => RequestKind::WriteZeroes,
                _ => RequestKind::Write,
            };
            let fua = kind == RequestKind::Write && self.rng.gen_bool(0.15);
            let mut data = AlignedBuf::zeroed(len as usize);
            let value = if kind == RequestKind::Write {
                self.next_value += 1;
                for (i, sec) in data.as_mut_slice().chunks_mut(SECTOR as usize).enumerate() {
                    fill_sector(sec, self.next_value, start + i as u64);
                }
                self.next_value
            } else {
                0
            };
            for s in start..start + len_sectors {
                self.model.log(vid, s).vals.push(value);
            }
            let buf = (kind == RequestKind::Write).then(|| IoBuf::owned(data));
            (
                Request {
                    kind,
                    offset_bytes: offset,
                    len_bytes: len,
                    fua,
                    buf,
                    mover: None,
                    tag,
                },
                Pending::Write {
                    vol: vid,
                    offset,
                    len,
                    fua,
                },
            )
        };
        if let Err((_, e)) = cluster.submit(vol, req, port) {
            panic!("submit refused: {e}");
        }
        self.pending.insert(tag, pending);
    }

    fn reap(&mut self, port: &Arc<Port>) {
        while let Some(c) = port.pop() {
            let p = self
                .pending
                .remove(&c.tag)
                .expect("completion for a pending request");
            c.result.unwrap_or_else(|e| panic!("request failed: {e}"));
            match p {
                Pending::Read { vol, offset, .. } => {
                    let buf = c.buf.expect("read returns its buffer");
                    for (i, sec) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
                        let s = offset / SECTOR + i as u64;
                        let got = decode_sector(sec, s).unwrap();
                        let log = self.model.log(vol, s);
                        let want = log.vals[(log.acked - log.base) as usize];
                        assert_eq!(
                            got, want,
                            "volume {vol} sector {s}: read {got}, last acknowledged {want}"
                        );
                    }
                }
                Pending::Write {
                    vol,
                    offset,
                    len,
                    fua,
                } => {
                    for s in offset / SECTOR..(offset + len) / SECTOR {
                        let log = self.model.log(vol, s);
                        log.acked = log.base + log.vals.len() as u64 - 1;
                        if fua {
                            let cut = (log.acked - log.base) as usize;
                            log.vals.drain(..cut);
                            log.base = log.acked;
                        }
                    }
                }
                Pending::Flush { snaps } => {
                    for (k, acked) in snaps {
                        let log = self.model.sectors.get_mut(&k).unwrap();
                        if acked > log.base {
                            log.vals.drain(..(acked - log.base) as usize);
                            log.base = acked;
                        }
                    }
                }
            }
        }
    }
}

/// Read everything back after a restart and check it against the model; the model then starts
/// over from what was read.
fn verify_after_crash(
    cluster: &mut SimCluster,
    vols: &[Arc<Volume>],
    model: &mut Model,
    seed: u64,
    cycle: u32,
) {
    let port = Port::new(4, PortWaker::None);
    for vol in vols {
        let mut offset = 0;
        while offset < VOLUME_BYTES {
            let len = 64 * 1024;
            let buf = IoBuf::owned(AlignedBuf::zeroed(len as usize));
            let req = Request {
                kind: RequestKind::Read,
                offset_bytes: offset,
                len_bytes: len,
                fua: false,
                buf: Some(buf),
                mover: None,
                tag: 0,
            };
            cluster
                .submit(vol, req, &port)
                .unwrap_or_else(|(_, e)| panic!("{e}"));
            cluster.run_until_idle(100_000);
            let c = port.pop().expect("read completed");
            c.result.unwrap();
            let buf = c.buf.unwrap();
            for (i, sec) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
                let s = offset / SECTOR + i as u64;
                let got = decode_sector(sec, s).unwrap_or_else(|e| {
                    panic!("seed {seed} cycle {cycle} volume {}: {e}", vol.name)
                });
                let log = model.log(vol.id.0, s);
                assert!(
                    log.vals.contains(&got),
                    "seed {seed} cycle {cycle} volume {} sector {s}: read value {got}, allowed {:?} (first is durable)",
                    vol.name,
                    log.vals
                );
                *log = SectorLog::new(got);
            }
            offset += len;
        }
    }
}

fn run_seed(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let opts = SimOptions {
        reactors: rng.gen_range(1..=3),
        queue_depth: rng.gen_range(2..=32),
        max_latency_ticks: rng.gen_range(1..=12),
    };
    let mut disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster = SimCluster::start(seed, opts, vec![(spec(), disk.clone())]).unwrap();
    let mut vols = vec![
        cluster
            .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
            .unwrap(),
        cluster
            .create_volume(DeviceId(0), VolumeId(2), "b", VOLUME_BYTES)
            .unwrap(),
    ];
    let mut w = Workload {
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0xABCD),
        next_value: 0,
        next_tag: 0,
        pending: HashMap::new(),
        model: Model {
            sectors: HashMap::new(),
        },
    };
    let port = Port::new(MAX_QD, PortWaker::None);
    for cycle in 0..3 {
        let ops: u32 = w.rng.gen_range(200..1200);
        for _ in 0..ops {
            w.issue(&mut cluster, &vols, &port);
            cluster.step();
            w.reap(&port);
        }
        // Power cut with requests in flight; what was never acknowledged may or may not be there.
        w.pending.clear();
        let images = cluster.crash(&[(spec(), disk.clone())], seed * 7 + u64::from(cycle));
        disk = Arc::new(Mutex::new(SimDisk::from_image(
            images.into_iter().next().unwrap(),
            true,
        )));
        cluster = SimCluster::start(
            seed + 1000 * u64::from(cycle + 1),
            opts,
            vec![(spec(), disk.clone())],
        )
        .unwrap_or_else(|e| panic!("seed {seed}: restart failed: {e}"));
        vols = vec![
            cluster.volume("a").expect("volume a survives"),
            cluster.volume("b").expect("volume b survives"),
        ];
        while let Some(_stale) = port.pop() {}
        verify_after_crash(&mut cluster, &vols, &mut w.model, seed, cycle);
    }
}

#[test]
fn acknowledged_flushed_writes_survive_crashes() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    for seed in 0..seeds {
        run_seed(seed);
    }
}

#[test]
fn eio_is_reported_and_other_ranges_keep_working() {
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster =
        SimCluster::start(1, SimOptions::default(), vec![(spec(), disk.clone())]).unwrap();
    let vol = cluster
        .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
        .unwrap();
    let port = Port::new(4, PortWaker::None);
    let write = |cluster: &mut SimCluster, offset: u64| {
        let buf = IoBuf::owned(AlignedBuf::from_slice(&[7u8; 4096]));
        let req = Request {
            kind: RequestKind::Write,
            offset_bytes: offset,
            len_bytes: 4096,
            fua: false,
            buf: Some(buf),
            mover: None,
            tag: offset,
        };
        cluster
            .submit(&vol, req, &port)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
        cluster.run_until_idle(10_000);
        port.pop().unwrap().result
    };
    assert_eq!(write(&mut cluster, 0), Ok(()));
    // Every data chunk fails from now on: the next new chunk's initialisation hits EIO.
    let dev = cluster.device(DeviceId(0)).unwrap();
    disk.lock()
        .unwrap()
        .inject_eio(dev.label.data_offset_bytes + CHUNK..DEVICE_BYTES);
    let failed = write(&mut cluster, 5 * CHUNK);
    assert_eq!(failed, Err(ringblock_engine::Errno::EIO));
    assert!(
        dev.health
            .write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        write(&mut cluster, 4096),
        Ok(()),
        "the healthy chunk keeps working"
    );
}

#[test]
fn full_device_reports_enospc_and_trim_frees_space_after_flush() {
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster = SimCluster::start(2, SimOptions::default(), vec![(spec(), disk)]).unwrap();
    let dev = cluster.device(DeviceId(0)).unwrap();
    let size = u64::from(dev.total_chunks()) * CHUNK;
    let a = cluster
        .create_volume(DeviceId(0), VolumeId(1), "a", size)
        .unwrap();
    let b = cluster
        .create_volume(DeviceId(0), VolumeId(2), "b", size)
        .unwrap();
    let port = Port::new(4, PortWaker::None);
    let run =
        |cluster: &mut SimCluster, vol: &Arc<Volume>, kind: RequestKind, offset: u64, len: u64| {
            let buf = (kind == RequestKind::Write)
                .then(|| IoBuf::owned(AlignedBuf::from_slice(&vec![1u8; len as usize])));
            let req = Request {
                kind,
                offset_bytes: offset,
                len_bytes: len,
                fua: false,
                buf,
                mover: None,
                tag: 0,
            };
            cluster
                .submit(vol, req, &port)
                .unwrap_or_else(|(_, e)| panic!("{e}"));
            cluster.run_until_idle(100_000);
            port.pop().unwrap().result
        };
    for c in 0..u64::from(dev.total_chunks()) {
        assert_eq!(
            run(&mut cluster, &a, RequestKind::Write, c * CHUNK, 4096),
            Ok(())
        );
    }
    assert_eq!(
        run(&mut cluster, &b, RequestKind::Write, 0, 4096),
        Err(ringblock_engine::Errno::ENOSPC)
    );
    assert_eq!(
        run(&mut cluster, &a, RequestKind::Trim, 0, 4 * CHUNK),
        Ok(())
    );
    assert_eq!(
        run(&mut cluster, &b, RequestKind::Write, 0, 4096),
        Err(ringblock_engine::Errno::ENOSPC),
        "freed chunks stay quarantined until a flush"
    );
    assert_eq!(run(&mut cluster, &a, RequestKind::Flush, 0, 0), Ok(()));
    assert_eq!(run(&mut cluster, &b, RequestKind::Write, 0, 4096), Ok(()));
    assert_eq!(a.allocated_chunks(), u64::from(dev.total_chunks()) - 4);
}
