//! The engine on real io_uring: an O_DIRECT file, a loop device (when losetup works here), RAM,
//! bbram and null devices. Random pattern writes, read back, restart the engine, read again.

// The workspace's one skip switch (`RINGBLOCK_TESTS_REQUIRED`), shared with the root tests.
#[path = "../../tests/support/required.rs"]
mod required;

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::client::BlockingClient;
use ringblock_engine::{
    DeviceConfig, DeviceKind, Engine, EngineConfig, Errno, FaultConfig, FormatPolicy,
};

const CHUNK: u64 = 64 * 1024;

fn device(name: &str, kind: DeviceKind, path: Option<&Path>, size: Option<u64>) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        kind,
        path: path.map(Path::to_path_buf),
        size_bytes: size,
        profile: None,
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
        emulate_profile_latency: false,
        fault: None,
    }
}

fn config(devices: Vec<DeviceConfig>) -> EngineConfig {
    // Two reactors where the machine has two cores, so chunk ownership, cross-reactor parts
    // and flush rounds on a home reactor are exercised (the default would be one here).
    let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    EngineConfig {
        cores: if two { vec![0, 1] } else { vec![] },
        devices,
        poll_idle_us: Some(20),
        queue_depth: Some(64),
        zero_copy_sends: None,
        state_dir: None,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// Random writes of 4k..256k (crossing chunks), some FUA, with a flush; returns the model.
fn write_random(
    client: &mut BlockingClient,
    volume_bytes: u64,
    seed: u64,
    count: usize,
) -> HashMap<u64, Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new(); // 4k block -> contents
    for i in 0..count {
        let blocks = rng.gen_range(1..=64u64);
        let start = rng.gen_range(0..volume_bytes / 4096 - blocks);
        let data = pattern(seed * 1_000_003 + i as u64, (blocks * 4096) as usize);
        client
            .write(start * 4096, &data, rng.gen_bool(0.1))
            .unwrap();
        for b in 0..blocks {
            model.insert(
                start + b,
                data[(b * 4096) as usize..((b + 1) * 4096) as usize].to_vec(),
            );
        }
    }
    client.flush().unwrap();
    model
}

fn check(client: &mut BlockingClient, model: &HashMap<u64, Vec<u8>>, volume_bytes: u64) {
    // Read the whole volume in 192 KiB pieces (each crosses chunk boundaries).
    let piece = 192 * 1024u64;
    let mut off = 0;
    while off < volume_bytes {
        let len = piece.min(volume_bytes - off);
        let got = client.read(off, len as usize).unwrap();
        for (i, block) in got.chunks(4096).enumerate() {
            let b = off / 4096 + i as u64;
            match model.get(&b) {
                Some(want) => assert!(block == want.as_slice(), "block {b} differs"),
                None => assert!(
                    block.iter().all(|&x| x == 0),
                    "unwritten block {b} is not zero"
                ),
            }
        }
        off += len;
    }
}

fn roundtrip_with_restart(cfg: EngineConfig, volume_bytes: u64) {
    let device_name = cfg.devices[0].name.clone();
    let engine = Engine::start(&cfg).unwrap();
    engine
        .create_volume(&device_name, "v", volume_bytes)
        .unwrap();
    let mut client = BlockingClient::new(engine.open("v").unwrap(), 1);
    let model = write_random(&mut client, volume_bytes, 42, 200);
    check(&mut client, &model, volume_bytes);
    let allocated = engine.volume("v").unwrap().allocated_chunks();
    assert!(allocated > 0 && allocated <= volume_bytes / CHUNK);
    drop(client);
    engine.shutdown().unwrap();

    let engine = Engine::start(&cfg).unwrap();
    let v = engine.volume("v").expect("volume found after restart");
    assert_eq!(v.size_bytes(), volume_bytes);
    assert_eq!(v.allocated_chunks(), allocated);
    let mut client = BlockingClient::new(engine.open("v").unwrap(), 1);
    check(&mut client, &model, volume_bytes);
    // Trim a whole chunk and part of one; both read back as zeros after a restart.
    client.trim(0, CHUNK).unwrap();
    client.write_zeroes(CHUNK + 4096, 8192).unwrap();
    client.flush().unwrap();
    drop(client);
    engine.shutdown().unwrap();
    let engine = Engine::start(&cfg).unwrap();
    let mut client = BlockingClient::new(engine.open("v").unwrap(), 1);
    let mut model = model;
    for b in 0..CHUNK / 4096 {
        model.remove(&b);
    }
    model.remove(&(CHUNK / 4096 + 1));
    model.remove(&(CHUNK / 4096 + 2));
    check(&mut client, &model, volume_bytes);
}

#[test]
fn file_device_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    roundtrip_with_restart(
        config(vec![device(
            "d0",
            DeviceKind::File,
            Some(&path),
            Some(64 << 20),
        )]),
        32 << 20,
    );
}

#[test]
fn bbram_device_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bbram.img");
    roundtrip_with_restart(
        config(vec![device(
            "nv0",
            DeviceKind::Bbram,
            Some(&path),
            Some(32 << 20),
        )]),
        16 << 20,
    );
}

#[test]
fn loop_device_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("loop.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&img)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        Ok(o) => {
            return required::skip(
                "loop_device_survives_restart",
                &format!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
        }
        Err(e) => {
            return required::skip(
                "loop_device_survives_restart",
                &format!("cannot run losetup: {e}"),
            );
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(dev.clone());
    let mut d = device("loop", DeviceKind::Blockdev, Some(Path::new(&dev)), None);
    d.format = FormatPolicy::IfBlank;
    roundtrip_with_restart(config(vec![d]), 32 << 20);
}

#[test]
fn ram_device_is_thin_and_reads_zeros() {
    let engine = Engine::start(&config(vec![device(
        "r",
        DeviceKind::Ram,
        None,
        Some(64 << 20),
    )]))
    .unwrap();
    engine.create_volume("r", "v", 32 << 20).unwrap();
    let mut c = BlockingClient::new(engine.open("v").unwrap(), 1);
    assert!(c.read(5 << 20, 8192).unwrap().iter().all(|&b| b == 0));
    assert_eq!(engine.volume("v").unwrap().allocated_chunks(), 0);
    c.write(5 << 20, &[9u8; 4096], false).unwrap();
    assert_eq!(engine.volume("v").unwrap().allocated_chunks(), 1);
    assert_eq!(c.read(5 << 20, 4096).unwrap(), vec![9u8; 4096]);
    let runs = engine.volume("v").unwrap().allocation_runs(0, 32 << 20, 16);
    assert_eq!(
        runs,
        vec![
            (5 << 20, false),
            (CHUNK, true),
            ((32 << 20) - (5 << 20) - CHUNK, false)
        ]
    );
    // Out of range and misaligned requests are refused, nothing else is disturbed.
    assert_eq!(c.read(32 << 20, 4096), Err(Errno::EINVAL));
    assert_eq!(
        c.write((32 << 20) - 4096, &[1u8; 8192], false),
        Err(Errno::ENOSPC)
    );
    assert_eq!(c.write(100, &[1u8; 512], false), Err(Errno::EINVAL));
    assert_eq!(c.read(5 << 20, 4096).unwrap(), vec![9u8; 4096]);
    drop(c);
    engine.shutdown().unwrap();
}

#[test]
fn null_device_discards() {
    let engine = Engine::start(&config(vec![device(
        "n",
        DeviceKind::Null,
        None,
        Some(64 << 20),
    )]))
    .unwrap();
    engine.create_volume("n", "v", 16 << 20).unwrap();
    let mut c = BlockingClient::new(engine.open("v").unwrap(), 1);
    c.write(0, &[5u8; 4096], false).unwrap();
    assert!(c.read(0, 4096).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn fault_device_fails_chosen_range_and_counts_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.img");
    let mut d = device("f", DeviceKind::File, Some(&path), Some(16 << 20));
    d.fault = Some(FaultConfig {
        fail_every_nth_write: 3,
        ..Default::default()
    });
    let engine = Engine::start(&config(vec![d])).unwrap();
    engine.create_volume("f", "v", 8 << 20).unwrap();
    let mut c = BlockingClient::new(engine.open("v").unwrap(), 1);
    let results: Vec<_> = (0..6)
        .map(|i| c.write(i * 4096, &[1u8; 4096], false))
        .collect();
    assert!(results.contains(&Err(Errno::EIO)), "{results:?}");
    assert!(results.iter().filter(|r| r.is_ok()).count() >= 2);
    assert!(
        engine.devices()[0]
            .health
            .write_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn volume_lifecycle_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    let cfg = config(vec![device(
        "d0",
        DeviceKind::File,
        Some(&path),
        Some(64 << 20),
    )]);
    let engine = Engine::start(&cfg).unwrap();
    engine.create_volume("d0", "a", 8 << 20).unwrap();
    let e = engine
        .create_volume("d0", "a", 8 << 20)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists"), "{e}");
    let e = engine
        .create_volume("d0", "big", 1 << 40)
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than device"), "{e}");
    let e = engine
        .create_volume("d0", "bad name!", 8 << 20)
        .unwrap_err()
        .to_string();
    assert!(e.contains("volume name"), "{e}");
    let e = engine
        .create_volume("nodev", "x", 8 << 20)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no device"), "{e}");
    engine.grow_volume("a", 16 << 20).unwrap();
    assert!(engine
        .grow_volume("a", 4 << 20)
        .unwrap_err()
        .to_string()
        .contains("shrinking"));
    let handle = engine.open("a").unwrap();
    let e = engine.delete_volume("a").unwrap_err().to_string();
    assert!(e.contains("in use"), "{e}");
    drop(handle);
    engine.create_volume("d0", "b", 8 << 20).unwrap();
    engine.delete_volume("a").unwrap();
    engine.shutdown().unwrap();
    let engine = Engine::start(&cfg).unwrap();
    assert!(engine.volume("a").is_none());
    assert_eq!(engine.volume("b").unwrap().size_bytes(), 8 << 20);
}

#[test]
fn concurrent_clients_on_many_threads() {
    let engine = Engine::start(&config(vec![device(
        "r",
        DeviceKind::Ram,
        None,
        Some(64 << 20),
    )]))
    .unwrap();
    engine.create_volume("r", "v", 32 << 20).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let handle = engine.open("v").unwrap();
            s.spawn(move || {
                let mut c = BlockingClient::new(handle, 1);
                let base = t * (8 << 20);
                for i in 0..200u64 {
                    let data = pattern(t * 1000 + i, 8192);
                    let off = base + (i * 37 % 1000) * 8192;
                    c.write(off, &data, false).unwrap();
                    assert_eq!(c.read(off, 8192).unwrap(), data);
                }
            });
        }
    });
}

#[test]
fn registered_pool_buffers_roundtrip_on_a_file() {
    use ringblock_engine::{chunk_owner, ChunkIndex, Port, PortWaker, Request, RequestKind};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    let engine = Engine::start(&config(vec![device(
        "d0",
        DeviceKind::File,
        Some(&path),
        Some(64 << 20),
    )]))
    .unwrap();
    engine.create_volume("d0", "v", 16 << 20).unwrap();
    let handle = engine.open("v").unwrap();
    let port = Port::new(1, PortWaker::Thread(std::thread::current()));
    let wait = || loop {
        if let Some(c) = port.pop() {
            return c;
        }
        std::thread::park();
    };
    for chunk in 0..8u64 {
        let owner = chunk_owner(
            handle.volume().id,
            ChunkIndex(chunk),
            engine.reactor_count(),
        );
        let pool = engine.buffer_pool(owner).unwrap();
        let before = pool.available();
        let data = pattern(chunk, 16384);
        let mut wbuf = pool.take(16384).unwrap();
        wbuf.as_mut_slice().copy_from_slice(&data);
        let off = chunk * CHUNK + 8192;
        handle
            .submit(
                Request {
                    kind: RequestKind::Write,
                    offset_bytes: off,
                    len_bytes: 16384,
                    fua: false,
                    buf: Some(wbuf),
                    mover: None,
                    tag: 1,
                },
                &port,
            )
            .unwrap();
        assert_eq!(wait().result, Ok(()));
        let rbuf = pool.take(16384).unwrap();
        handle
            .submit(
                Request {
                    kind: RequestKind::Read,
                    offset_bytes: off,
                    len_bytes: 16384,
                    fua: false,
                    buf: Some(rbuf),
                    mover: None,
                    tag: 2,
                },
                &port,
            )
            .unwrap();
        let c = wait();
        assert_eq!(c.result, Ok(()));
        assert_eq!(c.buf.as_ref().unwrap().as_slice(), &data[..]);
        drop(c);
        assert_eq!(pool.available(), before, "leases return to the pool");
    }
}
