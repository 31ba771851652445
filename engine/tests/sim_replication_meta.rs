//! A replicated volume's record (generation history, a replica's dirty regions) goes through
//! the device's metadata rounds like the chunk maps: after a power cut at a random point,
//! every region marked dirty before an acknowledged flush is still dirty (unless it was
//! resynced since), nothing is dirty that was never marked, and the generation history is the
//! one of the last acknowledged flush or a newer one. `RINGBLOCK_SIM_SEEDS=N` runs more seeds.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::profile;
use ringblock_engine::replication::{
    GenerationHistory, GenerationId, NodeId, RegionIndex, Role, VolumeReplication,
};
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::{
    DeviceId, DeviceSpec, FormatPolicy, Port, PortWaker, Request, Volume, VolumeId,
};

const CHUNK: u64 = 16 * 1024;
const DEVICE_BYTES: u64 = 3 << 20;
const VOLUME_BYTES: u64 = 1 << 20;
/// 16 KiB regions: 64 of them in the volume.
const REGION_SHIFT: u8 = 14;
const REGIONS: u64 = VOLUME_BYTES >> REGION_SHIFT;

fn spec() -> DeviceSpec {
    DeviceSpec {
        id: DeviceId(0),
        name: "sim0".into(),
        kind: "sim".into(),
        size_bytes: DEVICE_BYTES,
        persistent: true,
        profile: profile::builtin("flash").unwrap(),
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
    }
}

fn node(n: u128) -> NodeId {
    NodeId::new(n).unwrap()
}

/// What was done to the replication state, with logical times.
#[derive(Default)]
struct Model {
    time: u64,
    /// (time, region) each time a region was marked dirty for node 1.
    marks: Vec<(u64, u64)>,
    /// (time, region) each time a region was resynced (cleared).
    clears: Vec<(u64, u64)>,
    /// (time, history, node 1's since) after each generation change, the first at time 0.
    histories: Vec<(u64, GenerationHistory, Option<GenerationId>)>,
    /// Flushes in flight: tag -> submit time.
    flushes: HashMap<u64, u64>,
    /// The latest submit time of an acknowledged flush.
    acked: u64,
}

impl Model {
    fn step(
        &mut self,
        rng: &mut ChaCha8Rng,
        cluster: &mut SimCluster,
        vol: &Arc<Volume>,
        port: &Arc<Port>,
    ) {
        self.time += 1;
        let t = self.time;
        let rep = vol.replication().expect("replicated");
        match rng.gen_range(0..100) {
            0..=39 => {
                let offset = rng.gen_range(0..VOLUME_BYTES);
                let len = rng.gen_range(1..=(3 * CHUNK)).min(VOLUME_BYTES - offset);
                let first = offset >> REGION_SHIFT;
                let last = (offset + len - 1) >> REGION_SHIFT;
                self.marks.extend((first..=last).map(|r| (t, r)));
                if rep.mark_dirty(&[node(1)], offset, len) {
                    vol.replication_changed();
                }
            }
            40..=59 => {
                let r = rng.gen_range(0..REGIONS);
                self.clears.push((t, r));
                if rep.resynced(node(1), RegionIndex(r)) {
                    vol.replication_changed();
                }
            }
            60..=64 => {
                let replica = rep.replica(node(1)).expect("node 1");
                if replica.since().is_none() {
                    replica.set_since(rep.history().current());
                }
                rep.start_generation();
                self.histories.push((t, rep.history(), replica.since()));
                vol.replication_changed();
            }
            65..=79 if self.flushes.len() < 4 => {
                cluster
                    .submit(vol, Request::flush(t), port)
                    .unwrap_or_else(|(_, e)| panic!("flush refused: {e}"));
                self.flushes.insert(t, t);
            }
            _ => {}
        }
    }

    fn reap(&mut self, port: &Arc<Port>) {
        while let Some(c) = port.pop() {
            let submitted = self.flushes.remove(&c.tag).expect("a pending flush");
            c.result.unwrap_or_else(|e| panic!("flush failed: {e}"));
            self.acked = self.acked.max(submitted);
        }
    }

    /// Check the state a restart loaded against what was acknowledged.
    fn verify(&self, rep: &VolumeReplication, what: &str) {
        let dirty: BTreeSet<u64> = rep
            .replica(node(1))
            .unwrap()
            .dirty
            .iter_dirty()
            .map(|r| r.0)
            .collect();
        let cleared_after = |r: u64, t: u64| self.clears.iter().any(|&(ct, cr)| cr == r && ct > t);
        for &(t, r) in &self.marks {
            if t <= self.acked && !cleared_after(r, t) {
                assert!(
                    dirty.contains(&r),
                    "{what}: region {r} marked at {t} (flush acked at {}) is clean",
                    self.acked
                );
            }
        }
        let ever: BTreeSet<u64> = self.marks.iter().map(|&(_, r)| r).collect();
        assert!(
            dirty.is_subset(&ever),
            "{what}: dirty regions {:?} were never marked",
            dirty.difference(&ever).collect::<Vec<_>>()
        );
        assert_eq!(
            rep.replica(node(2)).unwrap().dirty.dirty_regions(),
            0,
            "{what}"
        );
        // The history of the last acknowledged flush, or a newer one; with its `since`.
        let history = rep.history();
        let since = rep.replica(node(1)).unwrap().since();
        let floor = self
            .histories
            .iter()
            .rposition(|(t, _, _)| *t <= self.acked)
            .unwrap();
        assert!(
            self.histories[floor..].iter().any(|(_, h, s)| *h == history && *s == since),
            "{what}: loaded history {:?} (since {since:?}) is not one of those from the last acknowledged flush on",
            history.ids()
        );
    }
}

#[test]
fn acknowledged_replication_records_survive_power_cuts() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    for seed in 0..seeds {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4e91);
        let opts = SimOptions {
            reactors: rng.gen_range(1..=3),
            queue_depth: rng.gen_range(2..=16),
            max_latency_ticks: rng.gen_range(1..=12),
        };
        let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
        let mut cluster = SimCluster::start(seed, opts, vec![(spec(), disk.clone())]).unwrap();
        let vol = cluster
            .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
            .unwrap();
        let rep = VolumeReplication::new(
            Role::Primary,
            vol.max_size_bytes(),
            REGION_SHIFT,
            &[node(1), node(2)],
        )
        .unwrap();
        let mut model = Model {
            histories: vec![(0, rep.history(), None)],
            ..Model::default()
        };
        vol.set_replication(Some(Arc::new(rep)));
        let port = Port::new(8, PortWaker::None);
        cluster
            .submit(&vol, Request::flush(0), &port)
            .unwrap_or_else(|(_, e)| panic!("{e}"));
        cluster.run_until_idle(1_000_000);
        port.pop().expect("first flush").result.unwrap();
        let ops = rng.gen_range(50..1200);
        for _ in 0..ops {
            model.step(&mut rng, &mut cluster, &vol, &port);
            cluster.step();
            model.reap(&port);
        }
        let what = format!(
            "seed {seed} after {ops} steps (acked up to {})",
            model.acked
        );
        // Power cut with rounds in flight.
        let image = cluster
            .crash(&[(spec(), disk)], seed * 7 + 1)
            .into_iter()
            .next()
            .unwrap();
        let disk = Arc::new(Mutex::new(SimDisk::from_image(image, true)));
        let cluster = SimCluster::start(seed + 1000, opts, vec![(spec(), disk)])
            .unwrap_or_else(|e| panic!("{what}: restart failed: {e}"));
        let vol = cluster.volume("a").expect("volume a survives");
        let rep = vol
            .replication()
            .unwrap_or_else(|| panic!("{what}: replication record lost"));
        assert_eq!(rep.role(), Role::Primary);
        model.verify(&rep, &what);
    }
}
