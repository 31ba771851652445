//! A faulty device on the simulator, over many seeds: the same `fault` and `delay` decorators
//! as on a reactor, over a simulated disk with a volatile write cache, fail every Nth write
//! (N chosen by the seed; chunk zeroing and metadata writes count too) and add latency spikes.
//! Random reads, writes (some FUA), trims, write-zeroes and flushes run on two volumes; then a
//! power cut and a restart. Checked:
//! - every failed request fails with EIO, and some do;
//! - a read returns the last acknowledged data, or what a failed write since may have left;
//! - after the power cut, every write acknowledged before a completed FLUSH (or with FUA) reads
//!   back unless a later write replaced it, and nothing reads back that was never written.
//!
//! `RINGBLOCK_SIM_SEEDS=N` runs more seeds.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::profile;
use ringblock_engine::sim_check::{decode_sector, fill_sector, SectorLog};
use ringblock_engine::sim_cluster::{SimCluster, SimOptions, SimWrappers};
use ringblock_engine::{
    AlignedBuf, DeviceId, DeviceSpec, Errno, FaultConfig, FormatPolicy, IoBuf, Port, PortWaker,
    Request, RequestKind, Volume, VolumeId,
};

const SECTOR: u64 = 512;
const CHUNK: u64 = 16 * 1024;
const DEVICE_BYTES: u64 = 3 << 20;
const VOLUME_BYTES: u64 = 512 * 1024;
const MAX_QD: usize = 8;

enum Pending {
    Read {
        vol: u32,
        offset: u64,
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
    sectors: HashMap<(u32, u64), SectorLog>,
    failed: u64,
    flushed: u64,
}

fn spec() -> DeviceSpec {
    let mut p = profile::builtin("flash").unwrap();
    p.logical_block_size_bytes = SECTOR as u32;
    // A few ticks each (10 µs a tick), so flush rounds finish within a run.
    p.read_latency_us = 30;
    p.write_latency_us = 50;
    p.flush_latency_us = 300;
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

fn overlaps(pending: &HashMap<u64, Pending>, vol: u32, offset: u64, len: u64) -> bool {
    pending.values().any(|p| match *p {
        Pending::Write {
            vol: v,
            offset: o,
            len: l,
            ..
        } => v == vol && offset < o + l && o < offset + len,
        Pending::Read { vol: v, offset: o } => v == vol && offset < o + CHUNK && o < offset + len,
        Pending::Flush { .. } => false,
    })
}

fn request(
    kind: RequestKind,
    offset: u64,
    len: u64,
    fua: bool,
    buf: Option<AlignedBuf>,
) -> Request {
    Request {
        kind,
        offset_bytes: offset,
        len_bytes: len,
        fua,
        buf: buf.map(IoBuf::owned),
        mover: None,
        tag: 0,
    }
}

impl Workload {
    fn log(&mut self, vol: u32, s: u64) -> &mut SectorLog {
        self.sectors
            .entry((vol, s))
            .or_insert_with(|| SectorLog::new(0))
    }

    /// Issue one random request if the queue has room.
    fn issue(&mut self, cluster: &mut SimCluster, vols: &[Arc<Volume>], port: &Arc<Port>) {
        if self.pending.len() >= MAX_QD {
            return;
        }
        let vol = &vols[self.rng.gen_range(0..vols.len())];
        let vid = vol.id.0;
        let sectors = VOLUME_BYTES / SECTOR;
        let len_sectors = self.rng.gen_range(1..=(2 * CHUNK / SECTOR));
        let start = self.rng.gen_range(0..=sectors - len_sectors);
        let (offset, len) = (start * SECTOR, len_sectors * SECTOR);
        let roll = self.rng.gen_range(0..100);
        let (mut req, pending) = if roll < 10 {
            let snaps = self.sectors.iter().map(|(k, l)| (*k, l.acked)).collect();
            let req = request(RequestKind::Flush, 0, 0, false, None);
            (req, Pending::Flush { snaps })
        } else if roll < 30 {
            // A read covers at most one chunk's worth (see `overlaps`).
            let len = len.min(CHUNK);
            if overlaps(&self.pending, vid, offset, len) {
                return;
            }
            let buf = AlignedBuf::zeroed(len as usize);
            let req = request(RequestKind::Read, offset, len, false, Some(buf));
            (req, Pending::Read { vol: vid, offset })
        } else {
            if overlaps(&self.pending, vid, offset, len) {
                return;
            }
            let kind = match roll {
                30..=35 => RequestKind::Trim,
                36..=41 => RequestKind::WriteZeroes,
                _ => RequestKind::Write,
            };
            let fua = kind == RequestKind::Write && self.rng.gen_bool(0.15);
            let value = if kind == RequestKind::Write {
                self.next_value += 1;
                self.next_value
            } else {
                0
            };
            let buf = (kind == RequestKind::Write).then(|| {
                let mut data = AlignedBuf::zeroed(len as usize);
                for (i, sec) in data.as_mut_slice().chunks_mut(SECTOR as usize).enumerate() {
                    fill_sector(sec, value, start + i as u64);
                }
                data
            });
            for s in start..start + len_sectors {
                self.log(vid, s).push(value);
            }
            let req = request(kind, offset, len, fua, buf);
            let p = Pending::Write {
                vol: vid,
                offset,
                len,
                fua,
            };
            (req, p)
        };
        req.tag = self.next_tag;
        self.next_tag += 1;
        self.pending.insert(req.tag, pending);
        if let Err((_, e)) = cluster.submit(vol, req, port) {
            panic!("submit refused: {e}");
        }
    }

    fn reap(&mut self, port: &Arc<Port>) {
        while let Some(c) = port.pop() {
            let p = self.pending.remove(&c.tag).expect("a pending request");
            if let Err(e) = c.result {
                assert_eq!(e, Errno::EIO, "a device error reaches the requester as EIO");
                self.failed += 1;
                // A failed write's values stay possible; a failed flush settles nothing.
                continue;
            }
            match p {
                Pending::Read { vol, offset } => {
                    let buf = c.buf.expect("a read returns its buffer");
                    for (i, sec) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
                        let s = offset / SECTOR + i as u64;
                        let got = decode_sector(sec, s).unwrap_or_else(|e| panic!("{e}"));
                        let log = self.log(vol, s);
                        assert!(
                            log.readable().contains(&got),
                            "volume {vol} sector {s}: read {got}, possible {:?}",
                            log.readable()
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
                        let log = self.log(vol, s);
                        log.ack_newest();
                        if fua {
                            let acked = log.acked;
                            log.durable_from(acked);
                        }
                    }
                }
                Pending::Flush { snaps } => {
                    self.flushed += 1;
                    for (k, acked) in snaps {
                        self.sectors
                            .get_mut(&k)
                            .expect("logged")
                            .durable_from(acked);
                    }
                }
            }
        }
    }

    /// After a restart: every sector holds a value it may hold; that value is durable now.
    fn verify(&mut self, cluster: &mut SimCluster, vols: &[Arc<Volume>], seed: u64) {
        let port = Port::new(1, PortWaker::None);
        for vol in vols {
            for offset in (0..VOLUME_BYTES).step_by(CHUNK as usize) {
                let buf = AlignedBuf::zeroed(CHUNK as usize);
                let req = request(RequestKind::Read, offset, CHUNK, false, Some(buf));
                cluster
                    .submit(vol, req, &port)
                    .unwrap_or_else(|(_, e)| panic!("{e}"));
                cluster.run_until_idle(100_000);
                let c = port.pop().expect("the read completed");
                assert_eq!(c.result, Ok(()), "seed {seed}: reads do not fail");
                let buf = c.buf.expect("a read returns its buffer");
                for (i, sec) in buf.as_slice().chunks(SECTOR as usize).enumerate() {
                    let s = offset / SECTOR + i as u64;
                    let got = decode_sector(sec, s).unwrap_or_else(|e| panic!("{e}"));
                    let log = self.log(vol.id.0, s);
                    assert!(
                        log.vals.contains(&got),
                        "seed {seed} volume {} sector {s}: read {got} after the power cut, \
                         allowed {:?} (the first is durable)",
                        vol.name,
                        log.vals
                    );
                    *log = SectorLog::new(got);
                }
            }
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
    let spikes = rng.gen_bool(0.5);
    let wrappers = [(
        DeviceId(0),
        SimWrappers {
            emulate_profile_latency: rng.gen_bool(0.5),
            fault: Some(FaultConfig {
                fail_every_nth_write: rng.gen_range(3..=9),
                spike_every_nth: if spikes { rng.gen_range(2..=5) } else { 0 },
                spike_us: rng.gen_range(10..=300),
                ..Default::default()
            }),
        },
    )];
    // The volumes are made on a healthy device; the faults start with the first restart.
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster = SimCluster::start(seed, opts, vec![(spec(), disk.clone())]).unwrap();
    for (id, name) in [(1, "a"), (2, "b")] {
        cluster
            .create_volume(DeviceId(0), VolumeId(id), name, VOLUME_BYTES)
            .unwrap();
    }
    let mut w = Workload {
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0xFA17),
        next_value: 0,
        next_tag: 0,
        pending: HashMap::new(),
        sectors: HashMap::new(),
        failed: 0,
        flushed: 0,
    };
    let port = Port::new(MAX_QD, PortWaker::None);
    let mut disk = disk;
    for cycle in 0..=3u64 {
        // Power cut, then a restart under the faults; what was never acknowledged may or may
        // not be there.
        let images = cluster.crash(&[(spec(), disk.clone())], seed * 7 + cycle);
        disk = Arc::new(Mutex::new(SimDisk::from_image(
            images.into_iter().next().unwrap(),
            true,
        )));
        cluster = SimCluster::start_wrapped(
            seed + 1000 * (cycle + 1),
            opts,
            vec![(spec(), disk.clone())],
            &wrappers,
        )
        .unwrap_or_else(|e| panic!("seed {seed}: restart failed: {e}"));
        let vols = [
            cluster.volume("a").expect("volume a survives"),
            cluster.volume("b").expect("volume b survives"),
        ];
        while port.pop().is_some() {}
        w.pending.clear();
        w.verify(&mut cluster, &vols, seed);
        if cycle == 3 {
            break;
        }
        let failed_before = w.failed;
        for _ in 0..w.rng.gen_range(300..1000) {
            w.issue(&mut cluster, &vols, &port);
            cluster.step();
            w.reap(&port);
        }
        // Half the cycles end with the device settled, half with requests in flight.
        if w.rng.gen_bool(0.5) {
            for _ in 0..1_000_000 {
                if w.pending.is_empty() {
                    break;
                }
                cluster.step();
                w.reap(&port);
            }
            assert!(w.pending.is_empty(), "seed {seed}: requests never finished");
        }
        if w.failed > failed_before {
            let health = &cluster.device(DeviceId(0)).unwrap().health;
            let errors = health.write_errors.load(Ordering::Relaxed)
                + health.flush_errors.load(Ordering::Relaxed);
            assert!(
                errors > 0,
                "seed {seed} cycle {cycle}: the device counts its errors"
            );
        }
    }
    assert!(w.failed > 0, "seed {seed}: no request failed");
    assert!(w.flushed > 0, "seed {seed}: no flush completed");
}

#[test]
fn a_faulty_device_fails_requests_with_eio_and_keeps_flushed_writes() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48);
    for seed in 0..seeds {
        run_seed(seed);
    }
}
