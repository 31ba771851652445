//! Reads served in place by a task (`TaskCtx::read_in_place`), on real reactors: only inside one
//! chunk the task's reactor owns, only from memory (or unwritten chunks), with the same bytes
//! and errors as a submitted request, and counted in the volume's statistics.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use ringblock_engine::client::BlockingClient;
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    chunk_owner, ChunkIndex, DeviceConfig, DeviceKind, Engine, EngineConfig, Errno, FormatPolicy,
    ReactorId, VolumeHandle,
};

const CHUNK: u64 = 64 * 1024;
const VOLUME_BYTES: u64 = 16 * CHUNK;

fn device(name: &str, kind: DeviceKind, path: Option<std::path::PathBuf>) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        kind,
        path,
        size_bytes: Some(64 << 20),
        profile: None,
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
        emulate_profile_latency: false,
        fault: None,
    }
}

/// What one probe gave: the bytes, an error, or "not here" (None).
type Outcome = Option<Result<Vec<u8>, Errno>>;

/// Runs every probe once on its reactor, then reports.
struct Prober {
    handle: VolumeHandle,
    probes: Vec<(u64, u64)>,
    done: mpsc::Sender<(ReactorId, Vec<Outcome>)>,
    finished: bool,
}

impl ReactorTask for Prober {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.finished {
            return 0;
        }
        let mut out = Vec::new();
        for &(offset, len) in &self.probes {
            let mut got = Vec::new();
            let r = ctx.read_in_place(&self.handle, offset, len, &mut |piece| {
                got.extend_from_slice(piece)
            });
            if r.is_none() {
                assert!(got.is_empty(), "a refused read must not touch the sink");
            }
            out.push(r.map(|r| r.map(|()| got)));
        }
        let _ = self.done.send((ctx.reactor(), out));
        self.finished = true;
        1
    }
    fn on_ring(&mut self, _: &mut TaskCtx<'_>, _: RingCompletion) {}
    fn stop(&mut self, _: &mut TaskCtx<'_>) {}
    fn has_ready(&self) -> bool {
        false
    }
    fn finished(&self) -> bool {
        self.finished
    }
}

fn byte(offset: u64) -> u8 {
    (offset / 4096 % 251) as u8 + 1
}

#[test]
fn reads_in_place_only_where_the_reactor_owns_memory() {
    let dir = tempfile::tempdir().unwrap();
    let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let engine = Engine::start(&EngineConfig {
        cores: if two { vec![0, 1] } else { vec![] },
        devices: vec![
            device("ram", DeviceKind::Ram, None),
            device("file", DeviceKind::File, Some(dir.path().join("f.img"))),
        ],
        poll_idle_us: Some(20),
        queue_depth: Some(64),
        zero_copy_sends: None,
        state_dir: None,
    })
    .unwrap();
    let reactors = engine.reactor_count();
    for (dev, name) in [("ram", "m"), ("file", "f")] {
        engine.create_volume(dev, name, VOLUME_BYTES).unwrap();
        // Chunks 0..8 written (4 KiB pages of distinct bytes), 8..16 never.
        let mut c = BlockingClient::new(engine.open(name).unwrap(), 1);
        for page in 0..(8 * CHUNK / 4096) {
            let off = page * 4096;
            c.write(off, &[byte(off); 4096], false).unwrap();
        }
    }
    let probes: Vec<(u64, u64)> = (0..16)
        .flat_map(|c| [(c * CHUNK, 4096), (c * CHUNK + 8192, 2 * 4096)])
        .chain([
            (CHUNK - 4096, 8192),     // across two chunks
            (4096 + 100, 4096),       // misaligned
            (VOLUME_BYTES, 4096),     // past the end
            (VOLUME_BYTES - 4096, 0), // empty
        ])
        .collect();
    for name in ["m", "f"] {
        let volume = engine.volume(name).unwrap();
        let reads_before = volume.stats.reads.load(Ordering::Relaxed);
        let mut served = 0;
        for r in 0..reactors {
            let (tx, rx) = mpsc::channel();
            engine.spawn_task(
                Some(ReactorId(r)),
                Box::new(Prober {
                    handle: engine.open(name).unwrap(),
                    probes: probes.clone(),
                    done: tx,
                    finished: false,
                }),
            );
            let (on, outcomes) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(on, ReactorId(r));
            for (&(offset, len), outcome) in probes.iter().zip(outcomes) {
                let chunk = ChunkIndex(offset / CHUNK);
                let owned = chunk_owner(volume.id, chunk, reactors) == on;
                let one_chunk = len > 0 && offset / CHUNK == (offset + len - 1) / CHUNK;
                let what = format!("{name} offset {offset} len {len} on reactor {r}");
                if !(owned && one_chunk) {
                    assert!(outcome.is_none(), "{what}: not this reactor's to serve");
                    continue;
                }
                let block = u64::from(volume.device.profile.logical_block_size_bytes);
                if offset % block != 0 || offset + len > VOLUME_BYTES {
                    assert_eq!(outcome, Some(Err(Errno::EINVAL)), "{what}");
                    continue;
                }
                let written = chunk.0 < 8;
                if name == "f" && written {
                    assert!(outcome.is_none(), "{what}: a file is read through the ring");
                    continue;
                }
                let want: Vec<u8> = (0..len)
                    .map(|i| if written { byte(offset + i) } else { 0 })
                    .collect();
                assert!(outcome == Some(Ok(want)), "{what}: wrong bytes or an error");
                served += 1;
            }
        }
        assert!(served > 0, "{name}: some probes must be served in place");
        let reads = volume.stats.reads.load(Ordering::Relaxed) - reads_before;
        assert_eq!(
            reads, served,
            "{name}: every read served in place is counted"
        );
    }
    engine.shutdown().unwrap();
}
