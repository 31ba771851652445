//! Requests whose data a [`DataMover`] brings or takes instead of a buffer: on RAM (moved in
//! place), bbram, RAM behind the `delay` and `fault` wrappers, an O_DIRECT file and null (all
//! through a bounce buffer), on real io_uring; and on the simulated disk, with a property test
//! that mixes moved and buffered requests against a model.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::client::{BlockingClient, VecMover};
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::profile;
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::{
    AlignedBuf, DataMover, DeviceConfig, DeviceId, DeviceKind, DeviceSpec, Engine, EngineConfig,
    Errno, FaultConfig, FormatPolicy, IoBuf, Port, PortWaker, Request, RequestKind, VolumeId,
};

const CHUNK: u64 = 64 * 1024;
const VOLUME_BYTES: u64 = 8 << 20;

fn device(name: &str, kind: DeviceKind, path: Option<&Path>) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        kind,
        path: path.map(Path::to_path_buf),
        size_bytes: Some(16 << 20),
        profile: None,
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
        emulate_profile_latency: false,
        fault: None,
    }
}

fn start(d: DeviceConfig) -> (Engine, BlockingClient) {
    // Two reactors where the machine has two cores: parts of one request move on both.
    let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let cfg = EngineConfig {
        cores: if two { vec![0, 1] } else { vec![] },
        devices: vec![d.clone()],
        poll_idle_us: Some(20),
        queue_depth: Some(64),
        zero_copy_sends: None,
        state_dir: None,
    };
    let engine = Engine::start(&cfg).unwrap();
    engine.create_volume(&d.name, "v", VOLUME_BYTES).unwrap();
    let client = BlockingClient::new(engine.open("v").unwrap(), 1);
    (engine, client)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// The calls of one request cover `[0, len)` exactly, split at chunk boundaries of `offset`.
fn assert_parts(calls: &[(u64, usize)], offset: u64, len: u64) {
    let mut want = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let end = ((pos / CHUNK + 1) * CHUNK).min(offset + len);
        want.push((pos - offset, (end - pos) as usize));
        pos = end;
    }
    // Unmapped reads come in pieces of at most 64 KiB: merge touching calls within a part.
    let mut merged: Vec<(u64, usize)> = Vec::new();
    for &(o, l) in calls {
        match merged.last_mut() {
            Some((mo, ml)) if *mo + *ml as u64 == o && !(offset + o).is_multiple_of(CHUNK) => {
                *ml += l
            }
            _ => merged.push((o, l)),
        }
    }
    assert_eq!(merged, want, "mover calls {calls:?}");
}

/// The path the parts of mover requests on mapped chunks take on a device.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MovedPath {
    /// Straight between the mover and the device's memory.
    InPlace,
    /// Through a bounce buffer and a device op.
    Bounced,
}

/// Writes and reads through movers and buffers agree, across chunks, mapped and unmapped, and
/// every part on a mapped chunk took `path` (counted in the volume's stats).
fn moved_roundtrip(d: DeviceConfig, stores: bool, path: MovedPath) {
    let (engine, mut c) = start(d);
    let volume = engine.volume("v").unwrap();
    // Unmapped: a moved read gets zeros (over what the mover held before).
    let m = VecMover::new(vec![0xee; 200 << 10]);
    c.read_moved(CHUNK / 2, 200 << 10, m.clone()).unwrap();
    assert!(
        m.data().iter().all(|&b| b == 0),
        "unmapped read is not zeros"
    );
    assert_parts(&m.calls(), CHUNK / 2, 200 << 10);

    // A moved write over three chunks, read back with a buffer and with a mover.
    let offset = 3 * CHUNK - 8192;
    let data = pattern(1, (2 * CHUNK + 16384) as usize);
    let m = VecMover::new(data.clone());
    c.write_moved(offset, data.len() as u64, false, m.clone())
        .unwrap();
    assert_parts(&m.calls(), offset, data.len() as u64);
    let want = if stores {
        data.clone()
    } else {
        vec![0; data.len()]
    };
    assert!(
        c.read(offset, data.len()).unwrap() == want,
        "buffered read-back"
    );
    let m = VecMover::new(vec![0; data.len()]);
    c.read_moved(offset, data.len() as u64, m.clone()).unwrap();
    assert!(m.data() == want, "moved read-back");
    assert_parts(&m.calls(), offset, data.len() as u64);

    // A buffered write read back through a mover, half mapped and half not, FUA.
    let off2 = 6 * CHUNK - 4096;
    let data2 = pattern(2, 4096);
    c.write(off2, &data2, true).unwrap();
    let m = VecMover::new(vec![0xaa; 8192]);
    c.read_moved(off2, 8192, m.clone()).unwrap();
    let mut want2 = if stores { data2 } else { vec![0; 4096] };
    want2.extend_from_slice(&[0; 4096]);
    assert_eq!(m.data(), want2);
    let m = VecMover::new(pattern(3, 4096));
    c.write_moved(off2 + 4096, 4096, true, m).unwrap();
    c.flush().unwrap();

    // A mover error fails the request with its errno; other parts of the volume are unharmed.
    let m = VecMover::failing_at(vec![0; 3 * CHUNK as usize], CHUNK + 5, Errno(libc::EFAULT));
    assert_eq!(
        c.read_moved(offset, 3 * CHUNK, m.clone()),
        Err(Errno(libc::EFAULT))
    );
    assert_parts(&m.calls(), offset, 3 * CHUNK); // the other parts still ran
    let m = VecMover::failing_at(vec![1; 8192], 4096, Errno(libc::EFAULT));
    assert_eq!(
        c.write_moved(offset, 8192, false, m),
        Err(Errno(libc::EFAULT))
    );
    assert!(
        c.read(offset + 8192, 4096).unwrap() == want[8192..12288],
        "neighbour unharmed"
    );

    // Refused before any IO: both a buffer and a mover, a mover on a flush, a short length.
    let both = Request {
        kind: RequestKind::Read,
        offset_bytes: 0,
        len_bytes: 4096,
        fua: false,
        buf: Some(IoBuf::owned(AlignedBuf::zeroed(4096))),
        mover: Some(VecMover::new(vec![0; 4096])),
        tag: 0,
    };
    assert_eq!(c.submit(both).err().map(|e| e.1), Some(Errno::EINVAL));
    let flush = Request {
        kind: RequestKind::Flush,
        offset_bytes: 0,
        len_bytes: 0,
        fua: false,
        buf: None,
        mover: Some(VecMover::new(Vec::new())),
        tag: 0,
    };
    assert_eq!(c.submit(flush).err().map(|e| e.1), Some(Errno::EINVAL));
    let m = VecMover::new(vec![0; 4096]);
    assert_eq!(c.read_moved(100, 4096, m.clone()), Err(Errno::EINVAL));
    assert!(m.calls().is_empty());

    let in_place = volume.stats.moved_parts_in_place.load(Ordering::Relaxed);
    let bounced = volume.stats.moved_parts_bounced.load(Ordering::Relaxed);
    let (taken, other) = match path {
        MovedPath::InPlace => (in_place, bounced),
        MovedPath::Bounced => (bounced, in_place),
    };
    assert!(
        taken > 0 && other == 0,
        "parts moved in place {in_place}, bounced {bounced}: all must be {path:?}"
    );
    drop(c);
    engine.shutdown().unwrap();
}

#[test]
fn moved_on_ram_in_place() {
    moved_roundtrip(device("r", DeviceKind::Ram, None), true, MovedPath::InPlace);
}

#[test]
fn moved_on_bbram() {
    let dir = tempfile::tempdir().unwrap();
    moved_roundtrip(
        device("b", DeviceKind::Bbram, Some(&dir.path().join("b.img"))),
        true,
        MovedPath::InPlace,
    );
}

#[test]
fn moved_on_file_through_bounce_buffers() {
    let dir = tempfile::tempdir().unwrap();
    moved_roundtrip(
        device("f", DeviceKind::File, Some(&dir.path().join("f.img"))),
        true,
        MovedPath::Bounced,
    );
}

#[test]
fn moved_on_wrapped_ram_through_bounce_buffers() {
    let mut d = device("d", DeviceKind::Ram, None);
    d.emulate_profile_latency = true;
    moved_roundtrip(d, true, MovedPath::Bounced);
    let mut d = device("s", DeviceKind::Ram, None);
    d.fault = Some(FaultConfig {
        spike_every_nth: 3,
        spike_us: 10,
        ..Default::default()
    });
    moved_roundtrip(d, true, MovedPath::Bounced);
}

#[test]
fn moved_on_null_reads_zeros() {
    moved_roundtrip(
        device("n", DeviceKind::Null, None),
        false,
        MovedPath::Bounced,
    );
}

#[test]
fn device_errors_fail_moved_requests_without_calling_the_mover() {
    let mut d = device("e", DeviceKind::Ram, None);
    // The whole data area: the first write's chunk initialisation already fails.
    d.fault = Some(FaultConfig {
        eio_ranges: vec![[0, 16 << 20]],
        ..Default::default()
    });
    let (engine, mut c) = start(d);
    let m = VecMover::new(vec![1; 8192]);
    assert_eq!(c.write_moved(0, 8192, false, m.clone()), Err(Errno::EIO));
    assert!(m.calls().is_empty(), "{:?}", m.calls());
    drop(c);
    engine.shutdown().unwrap();
}

// ---- on the simulated disk -------------------------------------------------------------------

const SIM_CHUNK: u64 = 16 * 1024;
const SIM_VOLUME_BYTES: u64 = 512 * 1024;

fn sim_spec() -> DeviceSpec {
    DeviceSpec {
        id: DeviceId(0),
        name: "sim0".into(),
        kind: "sim".into(),
        size_bytes: 2 << 20,
        persistent: true,
        profile: profile::builtin("flash").unwrap(),
        chunk_size_bytes: SIM_CHUNK,
        format: FormatPolicy::IfBlank,
    }
}

#[derive(Clone, Debug)]
struct Op {
    write: bool,
    moved: bool,
    block: u64,
    blocks: u64,
    seed: u64,
}

fn op() -> impl Strategy<Value = Op> {
    (
        any::<bool>(),
        any::<bool>(),
        0..SIM_VOLUME_BYTES / 4096,
        1u64..=12,
        any::<u64>(),
    )
        .prop_map(|(write, moved, block, blocks, seed)| Op {
            write,
            moved,
            block: block.min(SIM_VOLUME_BYTES / 4096 - blocks),
            blocks,
            seed,
        })
}

/// Run one request to completion on the simulator.
fn sim_run(cluster: &mut SimCluster, req: Request) -> Result<Option<IoBuf>, Errno> {
    let vol = cluster.volume("v").unwrap();
    let port = Port::new(1, PortWaker::None);
    cluster.submit(&vol, req, &port).map_err(|(_, e)| e)?;
    cluster.run_until_idle(100_000);
    let c = port.pop().expect("completed");
    c.result.map(|()| c.buf)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Moved and buffered reads and writes (crossing chunks, on 2 reactors, with completions
    /// reordered by the simulator) read back exactly what a byte model holds.
    #[test]
    fn moved_and_buffered_agree_with_a_model(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..40)) {
        let disk = Arc::new(Mutex::new(SimDisk::new(2 << 20, true)));
        let mut cluster = SimCluster::start(seed, SimOptions::default(), vec![(sim_spec(), disk)]).unwrap();
        cluster.create_volume(DeviceId(0), VolumeId(1), "v", SIM_VOLUME_BYTES).unwrap();
        let mut model = vec![0u8; SIM_VOLUME_BYTES as usize];
        for op in ops {
            let offset = op.block * 4096;
            let len = op.blocks * 4096;
            let range = offset as usize..(offset + len) as usize;
            let (buf, mover, data) = if op.write {
                let data = pattern(op.seed, len as usize);
                if op.moved {
                    (None, Some(VecMover::new(data.clone())), data)
                } else {
                    (Some(IoBuf::owned(AlignedBuf::from_slice(&data))), None, data)
                }
            } else if op.moved {
                (None, Some(VecMover::new(vec![0x5a; len as usize])), Vec::new())
            } else {
                (Some(IoBuf::owned(AlignedBuf::zeroed(len as usize))), None, Vec::new())
            };
            let req = Request {
                kind: if op.write { RequestKind::Write } else { RequestKind::Read },
                offset_bytes: offset,
                len_bytes: len,
                fua: false,
                buf,
                mover: mover.clone().map(|m| m as Arc<dyn DataMover>),
                tag: 0,
            };
            let got = sim_run(&mut cluster, req).unwrap();
            if op.write {
                model[range].copy_from_slice(&data);
            } else {
                let read = match (&mover, got) {
                    (Some(m), None) => m.data(),
                    (None, Some(b)) => b.as_slice().to_vec(),
                    _ => panic!("a read returns its buffer, a moved one none"),
                };
                prop_assert!(read == model[range], "read at {offset} len {len} differs");
            }
        }
    }
}
