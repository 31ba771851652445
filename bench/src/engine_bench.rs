//! The `engine` target: the engine in process on a file, driven directly (no transport) by a
//! read loop hosted as a task on its one reactor, as transports run (one thread does
//! everything, like fio).
//!
//! Layout: the engine owns one `file` device; one volume spans all its data chunks and is
//! filled with sequential 1 MiB writes, so every chunk is mapped and the whole data region
//! `[data_offset_bytes, data_offset_bytes + region_bytes)` of the file holds data. Raw fio reads
//! that same region of the same file, so both read the same bytes through the same file system.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    AlignedBuf, Completion, DeviceConfig, DeviceKind, Engine, EngineConfig, FormatPolicy, IoBuf,
    Port, PortWaker, ReactorId, ReactorSnapshot, Request, RequestKind, VolumeHandle,
};
use serde::Serialize;

use crate::fio::Percentiles;
use crate::host;

pub const DEVICE_NAME: &str = "bench";
pub const VOLUME_NAME: &str = "bench";
const FILL_BLOCK_BYTES: usize = 1 << 20;
const FILL_DEPTH: usize = 4;

/// The benchmark file once prepared.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub device_path: PathBuf,
    pub device_size_bytes: u64,
    pub chunk_size_bytes: u64,
    /// Where the data region starts in the file.
    pub data_offset_bytes: u64,
    /// Length of the data region = the volume's size; every byte of it was written.
    pub region_bytes: u64,
}

fn engine_config(
    path: &Path,
    size_bytes: u64,
    cores: &[usize],
    poll_idle_us: Option<u64>,
) -> EngineConfig {
    EngineConfig {
        cores: cores.to_vec(),
        devices: vec![DeviceConfig {
            name: DEVICE_NAME.into(),
            kind: DeviceKind::File,
            path: Some(path.to_path_buf()),
            size_bytes: Some(size_bytes),
            profile: None,
            chunk_size_bytes: ringblock_engine::device::DEFAULT_CHUNK_SIZE_BYTES,
            format: FormatPolicy::IfBlank,
            emulate_profile_latency: false,
            fault: None,
        }],
        poll_idle_us,
        queue_depth: None,
        zero_copy_sends: None,
        state_dir: None,
    }
}

/// Format a new device file, create the volume over every data chunk and write every chunk of
/// it (the file then has no holes, which would read without device IO).
pub fn prepare(path: &Path, size_bytes: u64) -> Result<Prepared> {
    let engine = Engine::start(&engine_config(path, size_bytes, &[], None))
        .with_context(|| format!("starting the engine on {}", path.display()))?;
    let dev = engine.devices()[0].clone();
    let chunks = u64::from(dev.total_chunks());
    let region_bytes = chunks * dev.chunk_size_bytes();
    let volume = engine.create_volume(DEVICE_NAME, VOLUME_NAME, region_bytes)?;
    tracing::info!(
        mib = region_bytes >> 20,
        "filling the volume with sequential 1 MiB writes"
    );
    fill(&engine.open(VOLUME_NAME)?, region_bytes)?;
    ensure!(
        volume.allocated_chunks() == chunks,
        "after the fill {} of {chunks} chunks are mapped",
        volume.allocated_chunks()
    );
    let prepared = Prepared {
        device_path: path.to_path_buf(),
        device_size_bytes: dev.size_bytes,
        chunk_size_bytes: dev.chunk_size_bytes(),
        data_offset_bytes: dev.label.data_offset_bytes,
        region_bytes,
    };
    drop(volume);
    engine
        .shutdown()
        .context("flushing the engine after the fill")?;
    let allocated_bytes = host::allocated_bytes(path)?;
    ensure!(
        allocated_bytes >= region_bytes,
        "{} has only {allocated_bytes} bytes allocated for a {region_bytes}-byte data region: \
         reads would hit holes",
        path.display()
    );
    Ok(prepared)
}

/// Sequential 1 MiB writes over the whole volume, a few in flight.
fn fill(handle: &VolumeHandle, region_bytes: u64) -> Result<()> {
    let port = Port::new(FILL_DEPTH, PortWaker::Thread(std::thread::current()));
    let blocks = region_bytes / FILL_BLOCK_BYTES as u64;
    ensure!(
        region_bytes.is_multiple_of(FILL_BLOCK_BYTES as u64),
        "region is not a whole number of MiB"
    );
    let mut free: Vec<AlignedBuf> = (0..FILL_DEPTH)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(FILL_BLOCK_BYTES);
            for (j, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = (j as u8) ^ (i as u8).wrapping_mul(37) ^ 0x5a;
            }
            b
        })
        .collect();
    let (mut next, mut done, mut in_flight) = (0u64, 0u64, 0usize);
    while done < blocks {
        while next < blocks && in_flight < FILL_DEPTH {
            let buf = free.pop().expect("one buffer per in-flight write");
            let req = Request {
                kind: RequestKind::Write,
                offset_bytes: next * FILL_BLOCK_BYTES as u64,
                len_bytes: FILL_BLOCK_BYTES as u64,
                fua: false,
                buf: Some(IoBuf::owned(buf)),
                mover: None,
                tag: next,
            };
            handle
                .submit(req, &port)
                .map_err(|(_, e)| anyhow::anyhow!("fill write refused: {e}"))?;
            next += 1;
            in_flight += 1;
        }
        match port.pop() {
            Some(c) => {
                c.result
                    .map_err(|e| anyhow::anyhow!("fill write at block {} failed: {e}", c.tag))?;
                free.push(
                    c.buf
                        .and_then(IoBuf::into_owned)
                        .context("write buffer not returned")?,
                );
                in_flight -= 1;
                done += 1;
            }
            None => std::thread::park_timeout(Duration::from_millis(10)),
        }
    }
    Ok(())
}

/// The random-read workload.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub block_bytes: usize,
    pub iodepth: usize,
    pub runtime: Duration,
    pub ramp: Duration,
    pub seed: u64,
    /// Reactors' busy-poll window before parking; `None`: the engine's default (the
    /// device profile's `poll_idle_us`).
    pub poll_idle_us: Option<u64>,
}

/// What one reactor did during the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct ReactorDelta {
    pub id: u32,
    pub core: Option<usize>,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub parks: u64,
    pub messages: u64,
    pub completions: u64,
}

/// One measured engine run.
#[derive(Clone, Debug, Serialize)]
pub struct EngineRun {
    /// The CPU of its one reactor.
    pub reactor_cpu: usize,
    pub reactors: u32,
    pub ios: u64,
    pub secs: f64,
    pub iops: f64,
    pub bw_bytes_per_s: f64,
    /// Submit-to-completion latency as the driver sees it.
    pub lat: Percentiles,
    pub lat_mean_ns: f64,
    pub lat_max_ns: u64,
    /// Whole process (reactors + driver), percent of one CPU.
    pub usr_cpu_pct: f64,
    pub sys_cpu_pct: f64,
    pub cpu_us_per_io: f64,
    pub reactor_deltas: Vec<ReactorDelta>,
    /// The machine during the window: steal, device time per read.
    pub host: host::HostDelta,
}

/// Counters taken when the measured window opens and closes.
struct Mark {
    at: Instant,
    /// Process CPU time, (user, system).
    cpu: (Duration, Duration),
    reactors: Vec<ReactorSnapshot>,
    host: host::HostSnapshot,
}

fn mark(engine: &Engine, file: &Path) -> Result<Mark> {
    Ok(Mark {
        at: Instant::now(),
        cpu: host::cpu_times(libc::RUSAGE_SELF)?,
        reactors: engine.reactor_stats(),
        host: host::host_snapshot(file),
    })
}

fn reactor_deltas(a: &[ReactorSnapshot], b: &[ReactorSnapshot]) -> Vec<ReactorDelta> {
    a.iter()
        .zip(b)
        .map(|(a, b)| ReactorDelta {
            id: b.id,
            core: b.core,
            busy_ns: b.busy_ns - a.busy_ns,
            idle_ns: b.idle_ns - a.idle_ns,
            parks: b.parks - a.parks,
            messages: b.messages - a.messages,
            completions: b.completions - a.completions,
        })
        .collect()
}

/// Start the engine with one reactor on `cpu`, run the workload on the prepared volume as a
/// task on that reactor, stop it.
pub fn run(prep: &Prepared, cpu: usize, w: &Workload) -> Result<EngineRun> {
    let engine = Engine::start(&engine_config(
        &prep.device_path,
        prep.device_size_bytes,
        &[cpu],
        w.poll_idle_us,
    ))
    .context("starting the engine")?;
    let handle = engine.open(VOLUME_NAME)?;
    ensure!(
        handle.volume().allocated_chunks() * prep.chunk_size_bytes == prep.region_bytes,
        "the volume is not fully written any more"
    );
    let file = prep.device_path.as_path();
    let measure_from = Instant::now() + w.ramp;
    let deadline = measure_from + w.runtime;
    let lp = ReadLoop::new(
        prep.region_bytes,
        w.block_bytes,
        w.iodepth,
        w.seed,
        measure_from,
        deadline,
    )?;
    let (tx, rx) = mpsc::channel();
    let task = ReadTask::new(handle.clone(), lp, w.block_bytes, tx);
    engine.spawn_task(Some(ReactorId(0)), Box::new(task));
    // The task keeps its own clock; this thread only marks the window's edges.
    let mut marks: Vec<Mark> = Vec::new();
    for edge in [measure_from, deadline] {
        std::thread::sleep(edge.saturating_duration_since(Instant::now()));
        marks.push(mark(&engine, file)?);
    }
    let lp = rx
        .recv_timeout(STUCK_AFTER)
        .context("the read task did not finish")??;
    let reactors = engine.reactor_count();
    drop(handle);
    engine.shutdown().context("stopping the engine")?;
    ensure!(marks.len() == 2, "the measured window was not marked");
    let (a, b) = (&marks[0], &marks[1]);
    let secs = w.runtime.as_secs_f64();
    let mark_secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let iops = lp.ios as f64 / secs;
    let usr = b.cpu.0.saturating_sub(a.cpu.0);
    let sys_time = b.cpu.1.saturating_sub(a.cpu.1);
    let hist = &lp.hist;
    Ok(EngineRun {
        reactor_cpu: cpu,
        reactors,
        ios: lp.ios,
        secs,
        iops,
        bw_bytes_per_s: iops * w.block_bytes as f64,
        lat: Percentiles {
            p50_ns: hist.value_at_quantile(0.5),
            p99_ns: hist.value_at_quantile(0.99),
            p99_9_ns: hist.value_at_quantile(0.999),
            p99_99_ns: hist.value_at_quantile(0.9999),
        },
        lat_mean_ns: hist.mean(),
        lat_max_ns: hist.max(),
        usr_cpu_pct: usr.as_secs_f64() / mark_secs * 100.0,
        sys_cpu_pct: sys_time.as_secs_f64() / mark_secs * 100.0,
        cpu_us_per_io: (usr + sys_time).as_secs_f64() / mark_secs * secs * 1e6
            / lp.ios.max(1) as f64,
        reactor_deltas: reactor_deltas(&a.reactors, &b.reactors),
        host: b.host.since(&a.host),
    })
}

/// Longest a request may take before a driver gives up (a stuck engine must not hang).
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// The request stream and its bookkeeping, independent of who runs it.
pub struct ReadLoop {
    block_bytes: u64,
    blocks: u64,
    rng: SmallRng,
    started: Vec<Instant>,
    pub measure_from: Instant,
    pub deadline: Instant,
    in_flight: usize,
    stop: bool,
    /// Completions inside `[measure_from, deadline)`.
    pub ios: u64,
    /// Submit-to-completion latency of those completions, in ns.
    pub hist: Histogram<u64>,
}

impl ReadLoop {
    pub fn new(
        region_bytes: u64,
        block_bytes: usize,
        iodepth: usize,
        seed: u64,
        measure_from: Instant,
        deadline: Instant,
    ) -> Result<Self> {
        let block_bytes = block_bytes as u64;
        let blocks = region_bytes / block_bytes;
        ensure!(iodepth > 0 && blocks > 0, "nothing to drive");
        Ok(Self {
            block_bytes,
            blocks,
            rng: SmallRng::seed_from_u64(seed),
            started: vec![Instant::now(); iodepth],
            measure_from,
            deadline,
            in_flight: 0,
            stop: false,
            ios: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        })
    }

    pub fn iodepth(&self) -> usize {
        self.started.len()
    }

    /// A read of a random block into `buf`, tagged `tag`, counted as in flight from `now`.
    pub fn request(&mut self, tag: usize, buf: IoBuf, now: Instant) -> Request {
        self.started[tag] = now;
        self.in_flight += 1;
        Request {
            kind: RequestKind::Read,
            offset_bytes: self.rng.gen_range(0..self.blocks) * self.block_bytes,
            len_bytes: self.block_bytes,
            fua: false,
            buf: Some(buf),
            mover: None,
            tag: tag as u64,
        }
    }

    /// Account a completion seen at `now`; returns its tag and buffer to go again, or `None`
    /// once the run is over.
    pub fn complete(&mut self, c: Completion, now: Instant) -> Result<Option<(usize, IoBuf)>> {
        self.in_flight -= 1;
        if let Err(e) = c.result {
            bail!("read failed: {e}");
        }
        let buf = c.buf.context("read buffer not returned")?;
        let tag = c.tag as usize;
        if now >= self.measure_from && now < self.deadline {
            let ns = now.duration_since(self.started[tag]).as_nanos() as u64;
            self.hist.record(ns.max(1))?;
            self.ios += 1;
        }
        if self.stop || now >= self.deadline {
            return Ok(None);
        }
        Ok(Some((tag, buf)))
    }

    /// Submit nothing more.
    pub fn stop(&mut self) {
        self.stop = true;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Past the deadline (or stopped) and drained.
    pub fn done(&self, now: Instant) -> bool {
        (self.stop || now >= self.deadline) && self.in_flight == 0
    }

    /// Longest wait of a request in flight.
    pub fn oldest_wait(&self, now: Instant) -> Duration {
        if self.in_flight == 0 {
            return Duration::ZERO;
        }
        self.started
            .iter()
            .map(|s| now.saturating_duration_since(*s))
            .max()
            .unwrap_or_default()
    }
}

/// The read loop as a reactor task. Its result goes to `done` when it finishes.
pub struct ReadTask {
    handle: VolumeHandle,
    lp: Option<ReadLoop>,
    block_bytes: usize,
    port: Option<Arc<Port>>,
    done: mpsc::Sender<Result<ReadLoop>>,
    finished: bool,
}

impl ReadTask {
    pub fn new(
        handle: VolumeHandle,
        lp: ReadLoop,
        block_bytes: usize,
        done: mpsc::Sender<Result<ReadLoop>>,
    ) -> Self {
        Self {
            handle,
            lp: Some(lp),
            block_bytes,
            port: None,
            done,
            finished: false,
        }
    }

    fn finish(&mut self, r: Result<ReadLoop>) {
        let _ = self.done.send(r);
        self.finished = true;
    }

    fn step(&mut self, ctx: &mut TaskCtx<'_>, lp: &mut ReadLoop) -> Result<usize> {
        let port = match &self.port {
            Some(p) => p.clone(),
            None => {
                let port = Port::new(lp.iodepth(), ctx.port_waker());
                self.port = Some(port.clone());
                for tag in 0..lp.iodepth() {
                    let buf = IoBuf::owned(AlignedBuf::zeroed(self.block_bytes));
                    let req = lp.request(tag, buf, Instant::now());
                    ctx.submit(&self.handle, req, &port)
                        .map_err(|(_, e)| anyhow::anyhow!("read refused: {e}"))?;
                }
                port
            }
        };
        let mut work = 0;
        // Bounded: the port holds at most `iodepth` completions.
        while let Some(c) = port.pop() {
            let now = Instant::now();
            work += 1;
            if let Some((tag, buf)) = lp.complete(c, now)? {
                let req = lp.request(tag, buf, now);
                ctx.submit(&self.handle, req, &port)
                    .map_err(|(_, e)| anyhow::anyhow!("read refused: {e}"))?;
            }
        }
        let now = Instant::now();
        ensure!(
            lp.oldest_wait(now) < STUCK_AFTER,
            "no completion for {STUCK_AFTER:?} with {} reads in flight",
            lp.in_flight()
        );
        Ok(work)
    }
}

impl ReactorTask for ReadTask {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let Some(mut lp) = self.lp.take() else {
            return 0;
        };
        match self.step(ctx, &mut lp) {
            Ok(work) => {
                if lp.done(Instant::now()) {
                    self.finish(Ok(lp));
                } else {
                    self.lp = Some(lp);
                }
                work
            }
            Err(e) if lp.in_flight() == 0 => {
                self.finish(Err(e));
                1
            }
            Err(e) => {
                // Stop submitting, drain what is in flight, then report the error.
                tracing::error!("read task: {e:#}");
                lp.stop();
                self.lp = Some(lp);
                1
            }
        }
    }

    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        tracing::error!(
            tag = c.tag,
            "read task got a ring completion it never asked for"
        );
    }

    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {
        if let Some(lp) = self.lp.as_mut() {
            lp.stop();
        }
    }

    fn has_ready(&self) -> bool {
        self.port.as_ref().is_some_and(|p| !p.is_empty())
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringblock_engine::Errno;

    fn loop_for(ms_from: u64, ms_to: u64) -> (ReadLoop, Instant) {
        let t0 = Instant::now();
        let lp = ReadLoop::new(
            1 << 20,
            4096,
            2,
            7,
            t0 + Duration::from_millis(ms_from),
            t0 + Duration::from_millis(ms_to),
        )
        .unwrap();
        (lp, t0)
    }

    fn completion(req: Request, result: Result<(), Errno>) -> Completion {
        Completion {
            tag: req.tag,
            result,
            buf: req.buf,
        }
    }

    #[test]
    fn counts_only_the_window_and_stops_at_the_deadline() {
        let (mut lp, t0) = loop_for(10, 20);
        let buf = || IoBuf::owned(AlignedBuf::zeroed(4096));
        let r0 = lp.request(0, buf(), t0);
        let r1 = lp.request(1, buf(), t0);
        assert!(r0.offset_bytes.is_multiple_of(4096) && r0.offset_bytes < 1 << 20);
        assert_eq!(r1.tag, 1);
        assert_eq!(lp.in_flight(), 2);
        // Before the window: not counted, goes again.
        let again = lp.complete(completion(r0, Ok(())), t0 + Duration::from_millis(5));
        let (tag, b) = again.unwrap().unwrap();
        assert_eq!((tag, lp.ios), (0, 0));
        let r0 = lp.request(tag, b, t0 + Duration::from_millis(5));
        // Inside the window: counted with its latency.
        let again = lp.complete(completion(r1, Ok(())), t0 + Duration::from_millis(12));
        assert!(again.unwrap().is_some());
        assert_eq!(lp.ios, 1);
        assert!(lp.hist.max() >= 12_000_000);
        // After the deadline: counted no more, not resubmitted; done once drained.
        let after = t0 + Duration::from_millis(25);
        assert!(lp
            .complete(completion(r0, Ok(())), after)
            .unwrap()
            .is_none());
        assert_eq!(lp.ios, 1);
        // Tag 1 was handed back above and (in this test) not resubmitted.
        assert_eq!(lp.in_flight(), 0);
        assert!(lp.done(after));
    }

    #[test]
    fn errors_and_missing_buffers_fail_the_run() {
        let (mut lp, t0) = loop_for(0, 10);
        let r = lp.request(0, IoBuf::owned(AlignedBuf::zeroed(4096)), t0);
        assert!(lp.complete(completion(r, Err(Errno::EIO)), t0).is_err());
        let r = lp.request(1, IoBuf::owned(AlignedBuf::zeroed(4096)), t0);
        let c = Completion {
            tag: r.tag,
            result: Ok(()),
            buf: None,
        };
        assert!(lp.complete(c, t0).is_err());
        assert!(lp.done(t0 + Duration::from_millis(11)));
    }

    /// A short end-to-end run on a small file: fill, then drive reads for a moment.
    #[test]
    fn prepares_and_drives_a_small_volume() {
        let dir = tempfile::tempdir_in(".").unwrap();
        let path = dir.path().join("dev.img");
        let prep = prepare(&path, 32 << 20).unwrap();
        assert!(prep.data_offset_bytes > 0);
        assert_eq!(prep.region_bytes % prep.chunk_size_bytes, 0);
        assert!(prep.region_bytes + prep.data_offset_bytes <= prep.device_size_bytes);
        let w = Workload {
            block_bytes: 4096,
            iodepth: 8,
            runtime: Duration::from_millis(200),
            ramp: Duration::from_millis(50),
            seed: 1,
            poll_idle_us: None,
        };
        let run = run(&prep, 0, &w).unwrap();
        assert!(run.ios > 0);
        assert!(run.lat.p50_ns > 0 && run.lat.p50_ns <= run.lat.p99_99_ns);
        assert_eq!(run.reactors, 1);
    }
}
