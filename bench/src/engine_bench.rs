//! The engine on a file, driven directly (no transport) by the lean drivers of
//! [`crate::driver`].
//!
//! Layout: the engine owns one `file` device; one volume spans all its data chunks and is
//! filled with sequential 1 MiB writes, so every chunk is mapped and the whole data region
//! `[data_offset_bytes, data_offset_bytes + region_bytes)` of the file holds data. Raw fio reads
//! that same region of the same file, so both read the same bytes through the same file system.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ringblock_engine::{
    AlignedBuf, DeviceConfig, DeviceKind, Engine, EngineConfig, FormatPolicy, IoBuf, Port,
    PortWaker, ReactorId, ReactorSnapshot, Request, RequestKind, VolumeHandle,
};
use serde::Serialize;

use crate::driver::{drive_on_thread, Buffers, ReadLoop, ReadTask, STUCK_AFTER};
use crate::fio::{FioJob, Percentiles};
use crate::sys;

pub const DEVICE_NAME: &str = "bench";
pub const VOLUME_NAME: &str = "bench";
const FILL_BLOCK_BYTES: usize = 1 << 20;
const FILL_DEPTH: usize = 4;

/// The fio patterns the engine's raw reference runs, named: fio's default (each read
/// submitted as it is issued) and batched, a quarter of the queue depth (8 of 32) per submit and
/// per reap, as the engine's reactor does. On a virtio disk that batches its interrupts either
/// can be the faster one (docs/performance.md), so the raw device's
/// limit is the better of the two.
pub fn raw_fio_patterns(job: FioJob) -> [(&'static str, FioJob); 2] {
    let batched = job
        .clone()
        .extra("--iodepth_batch_submit=8")
        .extra("--iodepth_batch_complete_min=8");
    [("default", job), ("batched", batched)]
}

/// The CPU an engine-vs-raw comparison runs on (raw fio and the engine's reactor both), and
/// why: the one taking the backing device's completion interrupts when it can be told, else
/// the last CPU (where the engine puts its one reactor on small machines).
pub fn comparison_cpu(device_path: &Path, cpus: &[usize]) -> (usize, String) {
    use ringblock_engine::irq;
    let found = irq::device_irq_cpu(device_path);
    let cpu = irq::lone_reactor_core(found.as_ref().map(|(c, _)| *c), cpus).unwrap_or(0);
    let why = match found {
        Some((c, name)) if c == cpu => {
            format!("cpu {cpu}, which takes the device's interrupts ({name})")
        }
        _ => format!("cpu {cpu}, the last (the device's interrupt CPU is unknown)"),
    };
    (cpu, why)
}

/// Pin a fio job to `cpu`.
pub fn pinned(job: FioJob, cpu: usize) -> FioJob {
    job.extra(format!("--cpus_allowed={cpu}"))
}

/// The benchmark file once prepared.
#[derive(Clone, Debug, Serialize)]
pub struct Prepared {
    pub device_path: PathBuf,
    pub device_size_bytes: u64,
    pub chunk_size_bytes: u64,
    /// Where the data region starts in the file.
    pub data_offset_bytes: u64,
    /// Length of the data region = the volume's size; every byte of it was written.
    pub region_bytes: u64,
    /// Bytes the file system allocated for the file (holes would read without device IO).
    pub allocated_bytes: u64,
    /// False when an already written volume was reused.
    pub filled: bool,
    pub fill_secs: f64,
    pub fill_mib_per_s: f64,
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
        state_dir: None,
    }
}

/// Format the device file (if blank), create the volume over every data chunk and write every
/// chunk of it. An existing labelled file with a fully written volume is reused as it is.
pub fn prepare(path: &Path, size_bytes: u64) -> Result<Prepared> {
    let engine = Engine::start(&engine_config(path, size_bytes, &[], None))
        .with_context(|| format!("starting the engine on {}", path.display()))?;
    let dev = engine.devices()[0].clone();
    let region_bytes = u64::from(dev.total_chunks()) * dev.chunk_size_bytes();
    let volume = match engine.volume(VOLUME_NAME) {
        Some(v) => v,
        None => engine.create_volume(DEVICE_NAME, VOLUME_NAME, region_bytes)?,
    };
    ensure!(
        volume.size_bytes() == region_bytes,
        "volume {VOLUME_NAME} on {} is {} bytes, expected {region_bytes}: use a fresh file",
        path.display(),
        volume.size_bytes()
    );
    let t0 = Instant::now();
    let chunks = u64::from(dev.total_chunks());
    let filled = volume.allocated_chunks() < chunks;
    if filled {
        tracing::info!(
            mib = region_bytes >> 20,
            "filling the volume with sequential 1 MiB writes"
        );
        fill(&engine.open(VOLUME_NAME)?, region_bytes)?;
    }
    let fill_secs = t0.elapsed().as_secs_f64();
    ensure!(
        volume.allocated_chunks() == chunks,
        "after the fill {} of {chunks} chunks are mapped",
        volume.allocated_chunks()
    );
    let data_offset_bytes = dev.label.data_offset_bytes;
    let chunk_size_bytes = dev.chunk_size_bytes();
    let device_size_bytes = dev.size_bytes;
    drop(volume);
    engine
        .shutdown()
        .context("flushing the engine after the fill")?;
    let allocated_bytes = sys::allocated_bytes(path)?;
    ensure!(
        allocated_bytes >= region_bytes,
        "{} has only {allocated_bytes} bytes allocated for a {region_bytes}-byte data region: \
         reads would hit holes",
        path.display()
    );
    Ok(Prepared {
        device_path: path.to_path_buf(),
        device_size_bytes,
        chunk_size_bytes,
        data_offset_bytes,
        region_bytes,
        allocated_bytes,
        filled,
        fill_secs,
        fill_mib_per_s: (region_bytes as f64 / (1 << 20) as f64) / fill_secs.max(1e-9),
    })
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

/// Who drives the reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A thread of its own, handing requests to the reactors' inboxes.
    Thread,
    /// A task on the first reactor, as transports run (one thread in all with one reactor).
    Task,
}

/// Where the engine's reactors and the driver run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub label: String,
    pub driver: DriverKind,
    /// CPU ids for reactors (empty: every core, the engine's default).
    pub reactor_cores: Vec<usize>,
    /// CPU the driver thread is pinned to, if any.
    pub driver_core: Option<usize>,
}

impl Placement {
    /// Reactors on `cores` (empty: every CPU); a thread driver is pinned to the first CPU they
    /// leave free, if any.
    pub fn on(driver: DriverKind, cores: &[usize], cpus: &[usize]) -> Placement {
        let used: &[usize] = if cores.is_empty() { cpus } else { cores };
        let reactors = if cores.is_empty() {
            "the engine's default cores".to_string()
        } else {
            format!(
                "{} reactor{} (cpu {})",
                cores.len(),
                if cores.len() == 1 { "" } else { "s" },
                join(cores)
            )
        };
        let (label, driver_core) = match driver {
            DriverKind::Thread => {
                let core = cpus.iter().copied().find(|c| !used.contains(c));
                let at = core.map_or("unpinned".to_string(), |c| format!("cpu {c}"));
                (format!("engine: thread driver ({at}), {reactors}"), core)
            }
            DriverKind::Task => (format!("engine: task on reactor 0, {reactors}"), None),
        };
        Placement {
            label,
            driver,
            reactor_cores: cores.to_vec(),
            driver_core,
        }
    }

    /// For each driver kind: one reactor on `home` (a thread driver on another CPU), and the
    /// engine's default cores unless that is the same thing: on machines with two CPUs or fewer
    /// the engine runs one reactor, on the CPU [`comparison_cpu`] picks as `home` (the device's
    /// interrupt CPU, else the last).
    pub fn defaults(drivers: &[DriverKind], cpus: &[usize], home: usize) -> Vec<Placement> {
        let default_is_home = cpus.len() <= 2;
        let mut v = Vec::new();
        for &d in drivers {
            v.push(Placement::on(d, &[home], cpus));
            if !default_is_home {
                v.push(Placement::on(d, &[], cpus));
            }
        }
        v
    }
}

fn join(xs: &[usize]) -> String {
    xs.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The random-read workload.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub block_bytes: usize,
    pub iodepth: usize,
    pub runtime: Duration,
    pub ramp: Duration,
    /// How long a thread driver spins on its port before parking.
    pub spin: Duration,
    pub seed: u64,
    /// Reactors' busy-poll window before parking; `None`: the engine's default (the
    /// device profile's `poll_idle_us`).
    pub poll_idle_us: Option<u64>,
    pub buffers: Buffers,
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
    pub placement: Placement,
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
    /// Times a thread driver found its port empty after spinning and parked.
    pub driver_parks: Option<u64>,
    pub reactor_deltas: Vec<ReactorDelta>,
    /// Scheduler counters of every thread during the window: run-queue waits show a thread
    /// that wanted a CPU and did not get one.
    pub threads: Vec<sys::ThreadSched>,
    /// The machine during the window: steal, device time per read.
    pub host: sys::HostDelta,
}

/// Counters taken when the measured window opens and closes.
struct Mark {
    at: Instant,
    cpu: sys::CpuTimes,
    reactors: Vec<ReactorSnapshot>,
    threads: Vec<sys::ThreadSched>,
    host: sys::HostSnapshot,
}

fn mark(engine: &Engine, file: &Path) -> Result<Mark> {
    Ok(Mark {
        at: Instant::now(),
        cpu: sys::cpu_times()?,
        reactors: engine.reactor_stats(),
        threads: sys::thread_sched(),
        host: sys::host_snapshot(file),
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

/// Start the engine with `placement`, run the workload on the prepared volume, stop it.
pub fn run(prep: &Prepared, placement: &Placement, w: &Workload) -> Result<EngineRun> {
    let engine = Engine::start(&engine_config(
        &prep.device_path,
        prep.device_size_bytes,
        &placement.reactor_cores,
        w.poll_idle_us,
    ))
    .context("starting the engine")?;
    let handle = engine.open(VOLUME_NAME)?;
    ensure!(
        handle.volume().allocated_chunks() * prep.chunk_size_bytes == prep.region_bytes,
        "the volume is not fully written any more"
    );
    let file = prep.device_path.as_path();
    let t0 = Instant::now();
    let measure_from = t0 + w.ramp;
    let deadline = measure_from + w.runtime;
    let lp = ReadLoop::new(
        prep.region_bytes,
        w.block_bytes,
        w.iodepth,
        w.seed,
        measure_from,
        deadline,
    )?;
    let mut marks: Vec<Mark> = Vec::new();
    let (lp, driver_parks) = match placement.driver {
        DriverKind::Thread => {
            let pool = match w.buffers {
                Buffers::Registered => engine.buffer_pool(ReactorId(0)),
                Buffers::Owned => None,
            };
            let driver_core = placement.driver_core;
            let (engine, handle) = (&engine, &handle);
            let (lp, parks) = std::thread::scope(|s| {
                s.spawn(|| -> Result<(ReadLoop, u64, Vec<Mark>)> {
                    if let Some(cpu) = driver_core {
                        sys::pin_current_thread(cpu)?;
                    }
                    let mut lp = lp;
                    let mut marks = Vec::new();
                    let d = drive_on_thread(
                        handle,
                        &mut lp,
                        pool.as_ref(),
                        w.block_bytes,
                        w.spin,
                        || {
                            marks.push(mark(engine, file)?);
                            Ok(())
                        },
                    )?;
                    Ok((lp, d.parks, marks))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("driver thread panicked"))?
                .map(|(lp, parks, m)| {
                    marks = m;
                    (lp, parks)
                })
            })?;
            (lp, Some(parks))
        }
        DriverKind::Task => {
            let (tx, rx) = std::sync::mpsc::channel();
            let task = ReadTask::new(handle.clone(), lp, w.buffers, w.block_bytes, tx);
            engine.spawn_task(Some(ReactorId(0)), Box::new(task));
            // The task keeps its own clock; this thread only marks the window's edges.
            for edge in [measure_from, deadline] {
                std::thread::sleep(edge.saturating_duration_since(Instant::now()));
                marks.push(mark(&engine, file)?);
            }
            let lp = rx
                .recv_timeout(STUCK_AFTER)
                .context("the read task did not finish")??;
            (lp, None)
        }
    };
    let reactors = engine.reactor_count();
    drop(handle);
    engine.shutdown().context("stopping the engine")?;
    ensure!(marks.len() == 2, "the measured window was not marked");
    let (a, b) = (&marks[0], &marks[1]);
    let secs = w.runtime.as_secs_f64();
    let mark_secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let iops = lp.ios as f64 / secs;
    let (usr, sys_time) = b.cpu.since(&a.cpu);
    let hist = &lp.hist;
    Ok(EngineRun {
        placement: placement.clone(),
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
        driver_parks,
        reactor_deltas: reactor_deltas(&a.reactors, &b.reactors),
        threads: sys::thread_sched_deltas(&a.threads, &b.threads),
        host: b.host.since(&a.host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_leave_the_driver_a_free_core() {
        let p = Placement::on(DriverKind::Thread, &[0], &[0, 1]);
        assert_eq!(p.driver_core, Some(1));
        assert!(
            p.label.contains("thread driver (cpu 1), 1 reactor (cpu 0)"),
            "{}",
            p.label
        );
        let p = Placement::on(DriverKind::Thread, &[0, 1], &[0, 1]);
        assert_eq!(p.driver_core, None);
        let p = Placement::on(DriverKind::Thread, &[], &[0, 1]);
        assert_eq!(p.driver_core, None, "every cpu has a reactor");
        let p = Placement::on(DriverKind::Task, &[0], &[0, 1]);
        assert_eq!(p.driver_core, None);
        // On two CPUs the engine's default is one reactor on `home`: not run twice.
        let d = Placement::defaults(&[DriverKind::Thread, DriverKind::Task], &[0, 1], 0);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].reactor_cores, vec![0]);
        assert_eq!(d[0].driver_core, Some(1));
        assert_eq!(d[1].driver, DriverKind::Task);
        assert_eq!(d[1].reactor_cores, vec![0]);
        let d = Placement::defaults(&[DriverKind::Thread, DriverKind::Task], &[0, 1, 2, 3], 3);
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].reactor_cores, vec![3]);
        assert!(d[1].reactor_cores.is_empty());
        assert_eq!(Placement::defaults(&[DriverKind::Thread], &[3], 3).len(), 1);
    }

    /// A short end-to-end run on a small file: fill, then drive reads for a moment with each
    /// driver and each kind of buffer.
    #[test]
    fn prepares_and_drives_a_small_volume() {
        let dir = tempfile::tempdir_in(".").unwrap();
        let path = dir.path().join("dev.img");
        let prep = prepare(&path, 32 << 20).unwrap();
        assert!(prep.data_offset_bytes > 0);
        assert_eq!(prep.region_bytes % prep.chunk_size_bytes, 0);
        assert!(prep.region_bytes + prep.data_offset_bytes <= prep.device_size_bytes);
        // Prepared twice: the written volume is found again, not refilled or reformatted.
        let again = prepare(&path, 32 << 20).unwrap();
        assert!(prep.filled && !again.filled);
        assert_eq!(again.data_offset_bytes, prep.data_offset_bytes);
        for (driver, buffers) in [
            (DriverKind::Thread, Buffers::Owned),
            (DriverKind::Task, Buffers::Registered),
        ] {
            let w = Workload {
                block_bytes: 4096,
                iodepth: 8,
                runtime: Duration::from_millis(200),
                ramp: Duration::from_millis(50),
                spin: Duration::from_micros(20),
                seed: 1,
                poll_idle_us: None,
                buffers,
            };
            let run = run(&prep, &Placement::on(driver, &[0], &[0]), &w).unwrap();
            assert!(run.ios > 0, "{driver:?}");
            assert!(run.lat.p50_ns > 0 && run.lat.p50_ns <= run.lat.p99_99_ns);
            assert_eq!(run.reactors, 1);
            assert_eq!(run.driver_parks.is_some(), driver == DriverKind::Thread);
        }
    }
}
