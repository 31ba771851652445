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
use ringblock_engine::sim_check::{decode_sector, fill_sector, SectorLog};
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
            (Request::flush(tag), Pending::Flush { snaps })
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
                self.model.log(vid, s).push(value);
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
                        log.ack_newest();
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

// ---------------------------------------------------------------------------------------------
// Metadata durability: volume creates and deletes and chunk-allocating writes, each checked
// after a power cut at a random point, and after corrupting either metadata slot.

/// Small volumes, so that many fit and allocating writes are frequent.
const META_VOLUME_BYTES: u64 = 4 * CHUNK;
const META_MAX_VOLUMES: usize = 8;

/// What the engine acknowledged, and what is still in flight (may or may not survive).
#[derive(Default)]
struct MetaModel {
    /// Create acknowledged, delete not started: must exist after a restart.
    live: HashMap<String, Arc<Volume>>,
    /// Create sent, not answered yet.
    creating: Vec<(String, ringblock_engine::sim_cluster::ControlReply)>,
    /// Delete sent, not answered yet.
    deleting: Vec<(String, ringblock_engine::sim_cluster::ControlReply)>,
    /// Delete acknowledged: must not exist after a restart (names are never reused).
    deleted: Vec<String>,
    /// Writes acknowledged, not yet covered by a completed flush: (volume, chunk) -> value.
    acked: HashMap<(String, u64), u64>,
    /// Writes covered by a completed flush (or FUA): must read back while the volume lives.
    durable: HashMap<(String, u64), u64>,
    /// In-flight requests: tag -> (volume, Some((chunk, value)) for a write, None for a flush
    /// with the acknowledged writes it covers).
    pending: HashMap<u64, MetaPending>,
    next_id: u32,
    next_tag: u64,
    next_value: u64,
}

enum MetaPending {
    Write {
        volume: String,
        chunk: u64,
        value: u64,
        fua: bool,
    },
    Flush {
        volume: String,
        covers: Vec<((String, u64), u64)>,
    },
}

fn meta_block(value: u64) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(4096);
    for (i, sec) in b.as_mut_slice().chunks_mut(SECTOR as usize).enumerate() {
        fill_sector(sec, value, i as u64);
    }
    b
}

impl MetaModel {
    fn busy(&self, name: &str) -> bool {
        self.pending.values().any(|p| match p {
            MetaPending::Write { volume, .. } | MetaPending::Flush { volume, .. } => volume == name,
        })
    }

    /// One random step of the workload: create, delete, allocating write or flush.
    fn issue(&mut self, rng: &mut ChaCha8Rng, cluster: &mut SimCluster, port: &Arc<Port>) {
        let roll = rng.gen_range(0..100);
        let names: Vec<String> = {
            let mut n: Vec<String> = self.live.keys().cloned().collect();
            n.sort();
            n
        };
        if roll < 20 && self.live.len() + self.creating.len() < META_MAX_VOLUMES {
            self.next_id += 1;
            let name = format!("v{}", self.next_id);
            let (_, reply) = cluster
                .begin_create_volume(
                    DeviceId(0),
                    VolumeId(self.next_id),
                    &name,
                    META_VOLUME_BYTES,
                )
                .unwrap();
            self.creating.push((name, reply));
        } else if roll < 35 && !names.is_empty() {
            let name = &names[rng.gen_range(0..names.len())];
            if self.busy(name) {
                return;
            }
            let volume = self.live.remove(name).unwrap();
            let reply = cluster.begin_delete_volume(&volume);
            self.acked.retain(|(v, _), _| v != name);
            self.durable.retain(|(v, _), _| v != name);
            self.deleting.push((name.clone(), reply));
        } else if !names.is_empty() && self.pending.len() < MAX_QD {
            let name = &names[rng.gen_range(0..names.len())];
            let volume = self.live[name].clone();
            let tag = self.next_tag;
            self.next_tag += 1;
            let (req, pending) = if roll < 70 {
                // Each chunk is written at most once: every write of it allocates.
                let chunks = META_VOLUME_BYTES / CHUNK;
                let chunk = rng.gen_range(0..chunks);
                let taken = |k: &(String, u64)| {
                    self.acked.contains_key(k)
                        || self.durable.contains_key(k)
                        || self.pending.values().any(|p| {
                            matches!(p, MetaPending::Write { volume, chunk, .. }
                                if (volume, chunk) == (&k.0, &k.1))
                        })
                };
                if taken(&(name.clone(), chunk)) {
                    return;
                }
                self.next_value += 1;
                let value = self.next_value;
                let fua = rng.gen_bool(0.2);
                (
                    Request {
                        kind: RequestKind::Write,
                        offset_bytes: chunk * CHUNK,
                        len_bytes: 4096,
                        fua,
                        buf: Some(IoBuf::owned(meta_block(value))),
                        mover: None,
                        tag,
                    },
                    MetaPending::Write {
                        volume: name.clone(),
                        chunk,
                        value,
                        fua,
                    },
                )
            } else {
                let covers = self.acked.iter().map(|(k, v)| (k.clone(), *v)).collect();
                (
                    Request::flush(tag),
                    MetaPending::Flush {
                        volume: name.clone(),
                        covers,
                    },
                )
            };
            cluster
                .submit(&volume, req, port)
                .unwrap_or_else(|(_, e)| panic!("submit refused: {e}"));
            self.pending.insert(tag, pending);
        }
    }

    /// Take in what the engine answered.
    fn reap(&mut self, cluster: &SimCluster, port: &Arc<Port>) {
        while let Some(c) = port.pop() {
            let p = self.pending.remove(&c.tag).expect("pending request");
            c.result.unwrap_or_else(|e| panic!("request failed: {e}"));
            match p {
                MetaPending::Write {
                    volume,
                    chunk,
                    value,
                    fua,
                } => {
                    if !self.live.contains_key(&volume) {
                        continue;
                    }
                    let into = if fua {
                        &mut self.durable
                    } else {
                        &mut self.acked
                    };
                    into.insert((volume, chunk), value);
                }
                MetaPending::Flush { covers, .. } => {
                    for (k, v) in covers {
                        if self.acked.remove(&k).is_some() {
                            self.durable.insert(k, v);
                        }
                    }
                }
            }
        }
        let mut creating = std::mem::take(&mut self.creating);
        creating.retain(|(name, reply)| match reply.result() {
            None => true,
            Some(r) => {
                r.unwrap_or_else(|e| panic!("create {name} failed: {e}"));
                self.live
                    .insert(name.clone(), cluster.volume(name).expect("created volume"));
                false
            }
        });
        self.creating = creating;
        let mut deleting = std::mem::take(&mut self.deleting);
        deleting.retain(|(name, reply)| match reply.result() {
            None => true,
            Some(r) => {
                r.unwrap_or_else(|e| panic!("delete {name} failed: {e}"));
                self.deleted.push(name.clone());
                false
            }
        });
        self.deleting = deleting;
    }

    /// After a restart: every acknowledged create, delete and flushed allocating write is
    /// there. `what` names the case in failures.
    fn verify(&self, cluster: &mut SimCluster, what: &str) {
        for name in self.live.keys() {
            assert!(
                cluster.volume(name).is_some(),
                "{what}: volume {name} was created (acknowledged) and is gone"
            );
        }
        for name in &self.deleted {
            assert!(
                cluster.volume(name).is_none(),
                "{what}: volume {name} was deleted (acknowledged) and is back"
            );
        }
        let port = Port::new(4, PortWaker::None);
        let mut durable: Vec<_> = self.durable.iter().collect();
        durable.sort();
        for ((name, chunk), value) in durable {
            let volume = cluster.volume(name).expect("checked above");
            let req = Request {
                kind: RequestKind::Read,
                offset_bytes: chunk * CHUNK,
                len_bytes: 4096,
                fua: false,
                buf: Some(IoBuf::owned(AlignedBuf::zeroed(4096))),
                mover: None,
                tag: 0,
            };
            cluster
                .submit(&volume, req, &port)
                .unwrap_or_else(|(_, e)| panic!("{e}"));
            cluster.run_until_idle(100_000);
            let c = port.pop().expect("read completed");
            c.result.unwrap();
            let got = decode_sector(&c.buf.unwrap().as_slice()[..SECTOR as usize], 0).unwrap();
            assert_eq!(
                got, *value,
                "{what}: volume {name} chunk {chunk}: flushed write {value} reads back as {got}"
            );
        }
    }
}

/// Run the metadata workload for `ops` steps on a fresh device; returns the cluster, the model
/// and the disk.
fn meta_workload(
    seed: u64,
    opts: SimOptions,
    ops: u32,
) -> (
    SimCluster,
    MetaModel,
    Arc<Mutex<SimDisk>>,
    ChaCha8Rng,
    Arc<Port>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5107);
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster = SimCluster::start(seed, opts, vec![(spec(), disk.clone())]).unwrap();
    let mut model = MetaModel::default();
    let port = Port::new(MAX_QD, PortWaker::None);
    for _ in 0..ops {
        model.issue(&mut rng, &mut cluster, &port);
        cluster.step();
        model.reap(&cluster, &port);
    }
    (cluster, model, disk, rng, port)
}

fn restart(
    seed: u64,
    opts: SimOptions,
    image: Vec<u8>,
    what: &str,
) -> (SimCluster, Arc<Mutex<SimDisk>>) {
    let disk = Arc::new(Mutex::new(SimDisk::from_image(image, true)));
    let cluster = SimCluster::start(seed, opts, vec![(spec(), disk.clone())])
        .unwrap_or_else(|e| panic!("{what}: restart failed: {e}"));
    (cluster, disk)
}

fn meta_opts(rng: &mut ChaCha8Rng) -> SimOptions {
    SimOptions {
        reactors: rng.gen_range(1..=3),
        queue_depth: rng.gen_range(2..=16),
        max_latency_ticks: rng.gen_range(1..=12),
    }
}

#[test]
fn acknowledged_creates_deletes_and_allocations_survive_crashes() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    for seed in 0..seeds {
        let opts = meta_opts(&mut ChaCha8Rng::seed_from_u64(seed));
        let ops = ChaCha8Rng::seed_from_u64(seed ^ 1).gen_range(50..1500);
        let (cluster, model, disk, _, _) = meta_workload(seed, opts, ops);
        // Power cut at this random point, with creates, deletes, writes and flushes in flight.
        let image = cluster
            .crash(&[(spec(), disk)], seed * 13)
            .into_iter()
            .next()
            .unwrap();
        let what = format!("seed {seed} after {ops} steps");
        let (mut cluster, _) = restart(seed + 500, opts, image, &what);
        model.verify(&mut cluster, &what);
    }
}

#[test]
fn a_corrupt_slot_loses_no_acknowledged_change() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
        / 2;
    for seed in 0..seeds.max(8) {
        let opts = meta_opts(&mut ChaCha8Rng::seed_from_u64(seed));
        let ops = ChaCha8Rng::seed_from_u64(seed ^ 2).gen_range(50..800);
        let (mut cluster, mut model, disk, mut rng, port) = meta_workload(seed, opts, ops);
        // Let everything finish, then end with one more acknowledged change: a delete, a
        // create or an allocating write and its flush.
        cluster.run_until_idle(1_000_000);
        model.reap(&cluster, &port);
        let last = seed % 3;
        let names: Vec<String> = {
            let mut n: Vec<String> = model.live.keys().cloned().collect();
            n.sort();
            n
        };
        if last == 0 && !names.is_empty() {
            let volume = model.live.remove(&names[0]).unwrap();
            let reply = cluster.begin_delete_volume(&volume);
            model.acked.retain(|(v, _), _| *v != names[0]);
            model.durable.retain(|(v, _), _| *v != names[0]);
            model.deleting.push((names[0].clone(), reply));
        } else if last == 1 || names.is_empty() {
            model.next_id += 1;
            let name = format!("v{}", model.next_id);
            let (_, reply) = cluster
                .begin_create_volume(
                    DeviceId(0),
                    VolumeId(model.next_id),
                    &name,
                    META_VOLUME_BYTES,
                )
                .unwrap();
            model.creating.push((name, reply));
        } else {
            // An allocating write to the first unwritten chunk found, then a flush.
            let free = names.iter().find_map(|n| {
                (0..META_VOLUME_BYTES / CHUNK)
                    .find(|c| {
                        let k = (n.clone(), *c);
                        !model.acked.contains_key(&k) && !model.durable.contains_key(&k)
                    })
                    .map(|c| (n.clone(), c))
            });
            if let Some((name, chunk)) = free {
                let volume = model.live[&name].clone();
                model.next_value += 1;
                let value = model.next_value;
                let tag = model.next_tag;
                model.next_tag += 2;
                let write = Request {
                    kind: RequestKind::Write,
                    offset_bytes: chunk * CHUNK,
                    len_bytes: 4096,
                    fua: false,
                    buf: Some(IoBuf::owned(meta_block(value))),
                    mover: None,
                    tag,
                };
                cluster.submit(&volume, write, &port).unwrap();
                cluster.run_until_idle(100_000);
                model.pending.insert(
                    tag,
                    MetaPending::Write {
                        volume: name.clone(),
                        chunk,
                        value,
                        fua: false,
                    },
                );
                model.reap(&cluster, &port);
                let flush = Request::flush(tag + 1);
                let covers = model.acked.iter().map(|(k, v)| (k.clone(), *v)).collect();
                cluster.submit(&volume, flush, &port).unwrap();
                model.pending.insert(
                    tag + 1,
                    MetaPending::Flush {
                        volume: name,
                        covers,
                    },
                );
            }
        }
        cluster.run_until_idle(1_000_000);
        model.reap(&cluster, &port);
        assert!(model.pending.is_empty() && model.creating.is_empty() && model.deleting.is_empty());
        let label = cluster.device(DeviceId(0)).unwrap().label.clone();
        // Everything is acknowledged: nothing the power cut drops was promised.
        let image = cluster
            .crash(&[(spec(), disk)], seed)
            .into_iter()
            .next()
            .unwrap();
        let corrupt = |slot: u64, rng: &mut ChaCha8Rng| {
            let mut bad = image.clone();
            let at = label.slot_offset_bytes(slot) + [12, 16, 32, 33][rng.gen_range(0..4)];
            bad[at as usize] ^= 1 << rng.gen_range(0..8);
            (
                bad,
                format!("seed {seed}: slot {slot} corrupt at byte {at}"),
            )
        };
        for slot in 0..2u64 {
            let (bad, what) = corrupt(slot, &mut rng);
            let (mut cluster, _) = restart(seed + 700, opts, bad, &what);
            model.verify(&mut cluster, &what);
            let warning = cluster
                .device(DeviceId(0))
                .unwrap()
                .health
                .metadata_warning()
                .unwrap_or_else(|| panic!("{what}: no metadata warning in the device's health"));
            assert!(
                warning.contains(&format!("metadata slot {slot} (")),
                "{what}: {warning}"
            );
        }
        // The next metadata round rewrites both slots and clears the warning.
        let (bad, what) = corrupt(seed % 2, &mut rng);
        let (mut cluster, disk) = restart(seed + 800, opts, bad, &what);
        let id = VolumeId(model.next_id + 100);
        cluster
            .create_volume(DeviceId(0), id, "repair", META_VOLUME_BYTES)
            .unwrap();
        let dev = cluster.device(DeviceId(0)).unwrap();
        assert_eq!(dev.health.metadata_warning(), None, "{what}");
        let image = cluster.crash(&[(spec(), disk)], seed).remove(0);
        let (mut cluster, _) = restart(seed + 900, opts, image, &what);
        let dev = cluster.device(DeviceId(0)).unwrap();
        assert_eq!(
            dev.health.metadata_warning(),
            None,
            "{what}: both slots are valid again after the repairing round"
        );
        assert!(cluster.volume("repair").is_some(), "{what}");
        model.verify(&mut cluster, &what);
    }
}

#[test]
fn a_failed_write_leaves_no_chunk_allocated() {
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster =
        SimCluster::start(3, SimOptions::default(), vec![(spec(), disk.clone())]).unwrap();
    let vol = cluster
        .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
        .unwrap();
    let dev = cluster.device(DeviceId(0)).unwrap();
    let port = Port::new(8, PortWaker::None);
    let submit_write = |cluster: &mut SimCluster, offset: u64, tag: u64| {
        let req = Request {
            kind: RequestKind::Write,
            offset_bytes: offset,
            len_bytes: 4096,
            fua: false,
            buf: Some(IoBuf::owned(meta_block(tag))),
            mover: None,
            tag,
        };
        cluster
            .submit(&vol, req, &port)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
    };
    let results = |cluster: &mut SimCluster| {
        cluster.run_until_idle(100_000);
        let mut r = HashMap::new();
        while let Some(c) = port.pop() {
            r.insert(c.tag, c.result);
        }
        r
    };
    // Writes fail; zeroing a new chunk still works, so the allocation gets as far as the write.
    let data = dev.label.data_offset_bytes;
    disk.lock().unwrap().inject_write_eio(data..DEVICE_BYTES);
    submit_write(&mut cluster, 3 * CHUNK, 1);
    assert_eq!(results(&mut cluster)[&1], Err(ringblock_engine::Errno::EIO));
    assert_eq!(vol.allocated_chunks(), 0, "the failed write mapped a chunk");
    assert_eq!(dev.used_chunks(), 0, "the failed write kept a chunk");
    // Two writes to one new chunk at once: the second waits for the first, then allocates on
    // its own (and fails on its own).
    submit_write(&mut cluster, 5 * CHUNK, 2);
    submit_write(&mut cluster, 5 * CHUNK + 8192, 3);
    let r = results(&mut cluster);
    assert_eq!(
        (r[&2], r[&3]),
        (
            Err(ringblock_engine::Errno::EIO),
            Err(ringblock_engine::Errno::EIO)
        )
    );
    assert_eq!((vol.allocated_chunks(), dev.used_chunks()), (0, 0));
    // Now only the first 4 KiB of every chunk fails: the write that allocates fails, the one
    // waiting behind it succeeds in a chunk of its own, and only its data is there.
    disk.lock().unwrap().clear_eio();
    for c in 0..u64::from(dev.total_chunks()) {
        let at = data + c * CHUNK;
        disk.lock().unwrap().inject_write_eio(at..at + 4096);
    }
    submit_write(&mut cluster, 7 * CHUNK, 4);
    submit_write(&mut cluster, 7 * CHUNK + 8192, 5);
    let r = results(&mut cluster);
    assert_eq!((r[&4], r[&5]), (Err(ringblock_engine::Errno::EIO), Ok(())));
    assert_eq!((vol.allocated_chunks(), dev.used_chunks()), (1, 1));
    assert!(
        dev.health
            .write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
    for (offset, want) in [(7 * CHUNK, 0), (7 * CHUNK + 8192, 5)] {
        let req = Request {
            kind: RequestKind::Read,
            offset_bytes: offset,
            len_bytes: 4096,
            fua: false,
            buf: Some(IoBuf::owned(AlignedBuf::zeroed(4096))),
            mover: None,
            tag: 100,
        };
        cluster.submit(&vol, req, &port).unwrap();
        cluster.run_until_idle(100_000);
        let c = port.pop().unwrap();
        c.result.unwrap();
        let got = decode_sector(&c.buf.unwrap().as_slice()[..SECTOR as usize], 0).unwrap();
        assert_eq!(got, want, "offset {offset}");
    }
}

#[test]
fn a_failed_second_slot_write_is_retried_safely() {
    use ringblock_engine::meta::MetaSnapshot;
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster =
        SimCluster::start(4, SimOptions::default(), vec![(spec(), disk.clone())]).unwrap();
    cluster
        .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
        .unwrap();
    let dev = cluster.device(DeviceId(0)).unwrap();
    let label = dev.label.clone();
    let read_slot = |disk: &Mutex<SimDisk>, slot: u64| {
        let mut b = vec![0u8; label.slot_bytes as usize];
        disk.lock()
            .unwrap()
            .read(label.slot_offset_bytes(slot), &mut b);
        MetaSnapshot::decode(&b)
    };
    let gens = |disk: &Mutex<SimDisk>| {
        [0, 1].map(|s| read_slot(disk, s).map(|m| m.generation).unwrap_or(0))
    };
    // The slot a round writes second is the newest one.
    let g = gens(&disk);
    let second = u64::from(g[1] > g[0]);
    let range = label.slot_offset_bytes(second)..label.slot_offset_bytes(second) + 4096;
    disk.lock().unwrap().inject_write_eio(range);
    assert!(cluster
        .create_volume(DeviceId(0), VolumeId(2), "b", VOLUME_BYTES)
        .is_err());
    assert!(dev
        .health
        .metadata_failing
        .load(std::sync::atomic::Ordering::Relaxed));
    disk.lock().unwrap().clear_eio();
    cluster
        .create_volume(DeviceId(0), VolumeId(3), "c", VOLUME_BYTES)
        .unwrap();
    assert!(!dev
        .health
        .metadata_failing
        .load(std::sync::atomic::Ordering::Relaxed));
    // Both slots hold the last round, with adjacent generations above everything before.
    let image = cluster.crash(&[(spec(), disk)], 4).remove(0);
    let disk = Mutex::new(SimDisk::from_image(image.clone(), true));
    let (s0, s1) = (read_slot(&disk, 0).unwrap(), read_slot(&disk, 1).unwrap());
    assert_eq!(s0.generation.abs_diff(s1.generation), 1);
    assert_eq!(s0.volumes, s1.volumes);
    assert!(s0.generation.min(s1.generation) > g[0].max(g[1]) + 1);
    for slot in 0..2u64 {
        let mut bad = image.clone();
        bad[(label.slot_offset_bytes(slot) + 32) as usize] ^= 1;
        let (cluster, _) = restart(5, SimOptions::default(), bad, "after a failed round");
        assert!(cluster.volume("a").is_some() && cluster.volume("c").is_some());
    }
}
