//! The activity log's write-ahead rule: a write of a replicated volume reaches the local
//! device only once its regions are in a persisted metadata round. A primary that loses power
//! at any point after such a write started finds the region dirty for its replica at restart
//! whenever the write's data is on its disk, even though the replica never got it.
//! `RINGBLOCK_SIM_SEEDS=N` runs more seeds.

use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::profile;
use ringblock_engine::replication::{
    NodeId, RegionIndex, ReplicaLink, ReplicaSet, Role, VolumeReplication,
};
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::{
    AlignedBuf, DeviceId, DeviceSpec, FormatPolicy, IoBuf, Port, PortWaker, ReactorId, Request,
    RequestKind, Volume, VolumeId,
};

const CHUNK: u64 = 64 << 10;
const DEVICE_BYTES: u64 = 8 << 20;
const VOLUME_BYTES: u64 = 2 << 20;
/// 16 KiB regions.
const REGION_SHIFT: u8 = 14;
const LEN: usize = 8192;

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

fn request(kind: RequestKind, offset: u64, fill: Option<u8>, tag: u64) -> Request {
    let buf = match kind {
        RequestKind::Flush => None,
        _ => {
            let mut b = AlignedBuf::zeroed(LEN);
            b.as_mut_slice().fill(fill.unwrap_or(0));
            Some(IoBuf::owned(b))
        }
    };
    Request {
        kind,
        offset_bytes: offset,
        len_bytes: buf.as_ref().map_or(0, |_| LEN as u64),
        fua: false,
        buf,
        mover: None,
        tag,
    }
}

fn run(c: &mut SimCluster, vol: &Arc<Volume>, req: Request) -> Option<IoBuf> {
    let port = Port::new(2, PortWaker::None);
    c.submit(vol, req, &port)
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    c.run_until_idle(1_000_000);
    let done = port.pop().expect("completed");
    done.result.unwrap();
    done.buf
}

#[test]
fn a_write_on_disk_before_a_power_cut_is_in_the_loaded_dirty_regions() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut on_disk = 0;
    for seed in 0..seeds {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa11);
        let opts = SimOptions {
            reactors: rng.gen_range(1..=3),
            queue_depth: rng.gen_range(2..=16),
            max_latency_ticks: rng.gen_range(1..=8),
        };
        let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
        let mut c = SimCluster::start(seed, opts, vec![(spec(), disk.clone())]).unwrap();
        let vol = c
            .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
            .unwrap();
        let region = rng.gen_range(0..VOLUME_BYTES >> REGION_SHIFT);
        let offset = region << REGION_SHIFT;
        // The chunk is mapped and zeroed durably before the volume is replicated, so that
        // after the cut the region reads back whatever its data blocks hold.
        run(&mut c, &vol, request(RequestKind::Write, offset, None, 1));
        let node = NodeId::new(9).unwrap();
        let rep = Arc::new(
            VolumeReplication::new(Role::Primary, vol.max_size_bytes(), REGION_SHIFT, &[node])
                .unwrap(),
        );
        rep.replicas()[0].set_full_sync(false);
        vol.set_replication(Some(rep.clone()));
        run(&mut c, &vol, request(RequestKind::Flush, 0, None, 2));
        // An up-to-date link whose ops the test keeps: the replica never gets the write.
        let link = ReplicaLink::new(rep, 0, ReactorId(0)).unwrap();
        link.set_up_to_date();
        vol.attach_replicas(Some(Arc::new(ReplicaSet::new(vec![link.clone()]).unwrap())))
            .unwrap();
        let port = Port::new(2, PortWaker::None);
        c.submit(
            &vol,
            request(RequestKind::Write, offset, Some(0xA5), 3),
            &port,
        )
        .unwrap_or_else(|(_, e)| panic!("{e}"));
        let steps = rng.gen_range(0..200);
        for _ in 0..steps {
            c.step();
        }
        let held = std::iter::from_fn(|| link.pop()).collect::<Vec<_>>();
        let image = c
            .crash(&[(spec(), disk)], seed * 13 + 5)
            .into_iter()
            .next()
            .unwrap();
        drop(held);
        let disk = Arc::new(Mutex::new(SimDisk::from_image(image, true)));
        let mut c = SimCluster::start(seed + 500, opts, vec![(spec(), disk)]).unwrap();
        let vol = c.volume("a").expect("volume a survives");
        let rep = vol.replication().expect("the replication record survives");
        let data = run(&mut c, &vol, request(RequestKind::Read, offset, None, 4)).unwrap();
        if data.as_slice().iter().any(|&b| b != 0) {
            on_disk += 1;
            assert!(
                rep.replicas()[0].dirty.is_dirty(RegionIndex(region)),
                "seed {seed}, cut after {steps} steps: region {region} holds the write, which \
                 the replica never got, and is clean"
            );
        }
    }
    assert!(on_disk > 0, "no cut left the write on the disk");
}
