//! `ringblock-bench run`: ringblock against its peers and the raw device, in one run.
//!
//! 1. Prepares a ringblock-formatted backing file (a volume filling every chunk, written once)
//!    and a plain file of the same data region size for the file-serving peers.
//! 2. Per repeat, per target (order reversed every other repeat, so drift does not favour one):
//!    start it, prefill memory-backed ones, run the lean client's verify pass (first repeat),
//!    measure idle CPU where asked, run its points (fio and the lean client), stop it.
//! 3. Summarises (medians, spreads, ratios paired by repeat, the headline) into
//!    `summary.json`, `report.md` and SVG plots under the results folder, with every raw fio
//!    JSON and lean-client result beside them.
//!
//! Everything started is stopped by its guard, also on error and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::engine_bench::{self, DriverKind, Placement, Prepared};
use crate::fio::{FioJob, JobReport};
use crate::interrupt;
use crate::matrix::{Client, Point, Preset, Tier};
use crate::nbd_load::{self, LoadConfig};
use crate::procs::{CpuWindow, WindowCpu};
use crate::results::{
    IdleResult, PointResult, RunSummary, Sample, TargetStatus, VerifyResult, SCHEMA,
};
use crate::run_report;
use crate::stats::Spread;
use crate::sys;
use crate::targets::{self, Env, Kind, Running, TargetSpec, EXPORT};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The quick preset (the default): headline points, short runtimes, one repeat; under
    /// two minutes on a 2-core machine.
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// The full preset: the main matrix on every target (numjobs 1, and one per core on the
    /// 4k QD32 and 1 MiB points), three repeats; under 15 minutes on a 2-core machine.
    #[arg(long, conflicts_with = "complete")]
    pub full: bool,
    /// Every workload x {numjobs 1, one per core} x both clients on every target, three
    /// repeats (about an hour).
    #[arg(long, conflicts_with = "quick")]
    pub complete: bool,
    /// Repeats of every point (default: 1 quick, 3 full).
    #[arg(long)]
    pub repeat: Option<usize>,
    /// Measured seconds per point (fractions allowed).
    #[arg(long)]
    pub runtime_s: Option<f64>,
    /// Warm-up seconds per point, not measured.
    #[arg(long)]
    pub ramp_s: Option<f64>,
    /// Size of the backing file in MiB (every export is its data region).
    #[arg(long)]
    pub size_mib: Option<u64>,
    /// Targets to run, comma separated (default: all). Known: raw, engine, ringblock,
    /// nbdkit-memory, qemu-nbd, ringblock-tcp, nbdkit-memory-tcp, ringblock-file,
    /// nbdkit-file, nbd-server, and ringblock-PROFILE for each --profiles entry.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Targets to leave out.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Firmware profiles to emulate (a ringblock target each); `none` for none.
    #[arg(long, value_delimiter = ',', default_value = "nvme,flash,bbram")]
    pub profiles: Vec<String>,
    /// The fixed rate of the CPU-per-IO points.
    #[arg(long, default_value_t = 20_000)]
    pub rate_iops: u32,
    /// ringblock's reactor cores (`ringblock serve --cores`).
    #[arg(long, default_value = "0")]
    pub rb_cores: String,
    /// ringblock's `poll_idle_us` (busy-poll window of an idle reactor before it parks), for
    /// the daemon and the engine step; default: the device profile's.
    #[arg(long)]
    pub rb_poll_idle_us: Option<u64>,
    /// The ringblock binary (default: next to this one).
    #[arg(long)]
    pub ringblock: Option<PathBuf>,
    /// Results folder (default: bench-results/<UTC timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An earlier run's summary.json: print the change.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Rounds of raw fio and the engine per repeat of the engine step (alternated, back to
    /// back; default: 3 quick, 2 full).
    #[arg(long)]
    pub engine_rounds: Option<usize>,
    /// Seconds of the lean client's verify pass per NBD target.
    #[arg(long)]
    pub verify_s: Option<f64>,
    /// Seconds over which idle CPU is measured.
    #[arg(long)]
    pub idle_s: Option<f64>,
    /// Where the backing files go (must allow O_DIRECT; default: inside the results folder).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the backing files and server logs.
    #[arg(long)]
    pub keep_files: bool,
    /// Print the plan (targets, points, estimated time) and exit.
    #[arg(long)]
    pub plan: bool,
}

/// Settings in force, recorded in the summary.
#[derive(Clone, Debug, Serialize)]
struct Settings {
    preset: Preset,
    repeat: usize,
    runtime_s: f64,
    ramp_s: f64,
    size_mib: u64,
    region_bytes: u64,
    profile_region_bytes: u64,
    verify_s: f64,
    idle_s: f64,
    engine_rounds: usize,
    rate_iops: u32,
    rb_cores: String,
    rb_poll_idle_us: Option<u64>,
    profiles: Vec<String>,
    ringblock: Option<PathBuf>,
}

/// The `ringblock` binary: `--ringblock`, else next to this executable. Under `cargo run`
/// (which builds only the bench) a missing one is built first, with the same profile and
/// target directory.
fn find_ringblock(given: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(p) = given {
        ensure!(p.is_file(), "--ringblock {}: no such file", p.display());
        return Ok(Some(p.to_path_buf()));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("executable has no directory")?;
    // Tests run from target/<profile>/deps/; the binaries are one level up.
    let find = || {
        [dir, dir.parent().unwrap_or(dir)]
            .iter()
            .map(|d| d.join("ringblock"))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(Some(p));
    }
    if let (Some(cargo), Some(manifest_dir), Some(target_dir)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
        dir.parent(),
    ) {
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "ringblock", "--target-dir"])
            .arg(target_dir)
            .current_dir(manifest_dir);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        eprintln!("building the ringblock daemon next to the bench: {cmd:?}");
        match cmd.status() {
            Ok(s) if s.success() => return Ok(find()),
            Ok(s) => eprintln!("building ringblock failed ({s}): its targets are skipped"),
            Err(e) => eprintln!("cannot run cargo ({e}): ringblock's targets are skipped"),
        }
    }
    Ok(None)
}

fn no_web_flag(ringblock: &Path) -> bool {
    Command::new(ringblock)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--no-web"))
}

fn tool_version(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("Using configuration"))
        .map(str::to_string)
}

/// A plain file of `bytes` holding non-zero data (no holes), for the file-serving peers.
fn write_peer_file(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    let mut left = bytes;
    let mut i = 0u64;
    while left > 0 {
        block[..8].copy_from_slice(&i.to_le_bytes());
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
        i += 1;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

/// What one run of the whole thing needs in hand.
struct Ctx {
    env: Env,
    prep: Option<Prepared>,
    out_dir: PathBuf,
    runtime: Duration,
    ramp: Duration,
    verify: Duration,
    idle: Duration,
    cpus: Vec<usize>,
    /// Where the engine step runs raw fio and the engine's reactor, and why there.
    engine_cpu: (usize, String),
}

/// The fio job of `point` on `target`.
fn fio_job(ctx: &Ctx, r: &Running, point: &Point, repeat: usize) -> Result<FioJob> {
    let w = point.workload;
    let jobs = point.jobs.max(1);
    let mut job = FioJob::new(format!("{}-{}", r.spec.id, w.id))
        .rw(w.pattern.fio_rw())
        .bs_bytes(w.block_bytes)
        .iodepth(w.qd)
        .numjobs(jobs)
        .runtime(Some(ctx.runtime))
        .ramp(Some(ctx.ramp));
    // Each job gets its own slice of the region.
    let slice = (r.region_bytes / u64::from(jobs)) / w.block_bytes * w.block_bytes;
    ensure!(slice >= w.block_bytes, "region too small for {jobs} jobs");
    job = job.size_bytes(slice);
    if jobs > 1 {
        job = job.extra(format!("--offset_increment={slice}"));
    }
    match &r.spec.kind {
        Kind::Raw => {
            let prep = ctx.prep.as_ref().context("no backing file")?;
            job = job
                .ioengine("io_uring")
                .filename(&prep.device_path)
                .offset_bytes(prep.data_offset_bytes)
                .direct(true);
        }
        _ => {
            let uri = r.fio_uri.as_ref().context("no NBD URI")?;
            job = job
                .ioengine("nbd")
                .direct(false)
                .extra(format!("--uri={uri}"));
        }
    }
    if w.pattern.random() {
        job = job
            .extra("--norandommap")
            .extra(format!("--randseed={}", 0x5eed + repeat));
    }
    if w.pattern.read_percent() != 100 && w.pattern.read_percent() != 0 {
        job = job.extra(format!("--rwmixread={}", w.pattern.read_percent()));
    }
    if let Some(rate) = point.rate_iops {
        job = job.extra(format!("--rate_iops={}", (rate / jobs).max(1)));
    }
    Ok(job)
}

fn fio_sample(job: &JobReport, repeat: usize) -> Sample {
    let dir = if job.read.total_ios > 0 || job.write.total_ios == 0 {
        &job.read
    } else {
        &job.write
    };
    Sample {
        repeat,
        iops: job.read.iops + job.write.iops,
        mib_s: (job.read.bw_bytes_per_s + job.write.bw_bytes_per_s) as f64 / (1 << 20) as f64,
        lat: dir.lat.or(dir.clat),
        client_cpu_us_per_io: job.cpu_us_per_io(),
        errors: u64::from(job.error != 0),
        ..Sample::default()
    }
}

/// A sample from the lean client's result (its percentiles are in µs, ours in ns).
fn lean_sample(res: &nbd_load::LoadResult, repeat: usize) -> Sample {
    let ns = |us: f64| (us * 1000.0).round() as u64;
    Sample {
        repeat,
        iops: res.iops,
        mib_s: res.mib_s,
        lat: (res.ops > 0).then(|| crate::fio::Percentiles {
            p50_ns: ns(res.lat_p50_us),
            p99_ns: ns(res.lat_p99_us),
            p99_9_ns: ns(res.lat_p999_us),
            p99_99_ns: ns(res.lat_p9999_us),
        }),
        client_cpu_us_per_io: (res.ops > 0).then(|| res.client_cpu_s * 1e6 / res.ops as f64),
        errors: res.errors,
        ..Sample::default()
    }
}

fn lean_config(ctx: &Ctx, r: &Running, point: &Point, repeat: usize) -> Result<LoadConfig> {
    let w = point.workload;
    let mut cfg = LoadConfig::new(
        r.endpoint.clone().context("no endpoint")?,
        EXPORT,
        ctx.runtime,
    );
    cfg.connections = point.jobs.max(1) as usize;
    cfg.queue_depth = w.qd as usize;
    cfg.block_bytes = w.block_bytes as usize;
    cfg.read_percent = w.pattern.read_percent();
    cfg.random = w.pattern.random();
    cfg.range_bytes = Some(r.region_bytes);
    cfg.seed = 0x5eed + repeat as u64;
    cfg.rate_iops = point.rate_iops.map(f64::from);
    cfg.ramp = ctx.ramp;
    cfg.cancel = Some(interrupt::flag());
    Ok(cfg)
}

/// Run one point once; raw output goes under `raw/`.
/// File a point's sample (or failure) and print it.
fn record(points: &mut [PointResult], target: &str, p: &Point, rep: usize, res: Result<Sample>) {
    let key = p.key();
    let pr = points
        .iter_mut()
        .find(|x| x.target == target && x.key == key)
        .expect("planned point");
    match res {
        Ok(s) => {
            eprintln!(
                "  {:<44} {:>9.0} IOPS {:>8.1} MiB/s{}",
                p.label(),
                s.iops,
                s.mib_s,
                s.server_cpu_us_per_io
                    .map_or(String::new(), |c| format!("  server {c:.2} µs/IO"))
            );
            pr.samples.push(s);
        }
        Err(e) => {
            eprintln!("  {} failed: {e:#}", p.label());
            pr.failures.push(format!("repeat {rep}: {e:#}"));
        }
    }
}

/// The fixed-rate points (server CPU per IO) of every target that has them, with those
/// targets running side by side and taking turns, point by point, twice: in one order, then
/// in the reverse (and the first order reversed every other repeat). Measured minutes apart, as the rest of the matrix is, two servers' CPU per
/// IO also differed by the host's drift: on a 2-vCPU VM one server's repeats swung by 30 %
/// between runs while another's did not.
fn rate_step(
    ctx: &Ctx,
    plan: &[(TargetSpec, Vec<Point>)],
    statuses: &[TargetStatus],
    rep: usize,
    repeat: usize,
    points: &mut [PointResult],
) -> Result<()> {
    let mut order: Vec<usize> = (0..plan.len())
        .filter(|&i| statuses[i].status == "ran" && plan[i].1.iter().any(|p| p.rate_iops.is_some()))
        .collect();
    if rep.is_multiple_of(2) {
        order.reverse();
    }
    eprintln!("[repeat {rep}/{repeat}] fixed-rate points, targets side by side ...");
    let mut running: Vec<(usize, Running)> = Vec::new();
    let fail_all = |points: &mut [PointResult], ti: usize, why: String| {
        for p in points
            .iter_mut()
            .filter(|p| p.target == plan[ti].0.id && p.rate_iops.is_some())
        {
            p.failures.push(format!("repeat {rep}: {why}"));
        }
    };
    for &ti in &order {
        interrupt::check()?;
        let spec = &plan[ti].0;
        let started = targets::start(spec, &ctx.env, Duration::from_secs(15)).and_then(|r| {
            if spec.needs_prefill() {
                prefill(ctx, &r).context("prefill")?;
            }
            Ok(r)
        });
        match started {
            Ok(r) => running.push((ti, r)),
            Err(e) => {
                interrupt::check()?;
                eprintln!("  {} failed to start: {e:#}", spec.id);
                fail_all(points, ti, format!("{e:#}"));
            }
        }
    }
    let mut rated: Vec<Point> = Vec::new();
    for &(ti, _) in &running {
        for p in plan[ti].1.iter().filter(|p| p.rate_iops.is_some()) {
            if !rated.contains(p) {
                rated.push(*p);
            }
        }
    }
    // Two rounds, the second in reverse order: each target takes each place once per repeat
    // (an A/A test of one server in two slots read 1.054: the slot alone moves CPU per IO).
    for p in &rated {
        for round in 1..=2 {
            let turns: Vec<usize> = if round == 1 {
                (0..running.len()).collect()
            } else {
                (0..running.len()).rev().collect()
            };
            for i in turns {
                let (ti, r) = &mut running[i];
                if !plan[*ti].1.contains(p) || r.server.as_mut().is_some_and(|s| !s.alive()) {
                    continue;
                }
                interrupt::check()?;
                eprintln!("  {} (round {round}/2):", r.spec.id);
                let res = run_point(ctx, r, p, rep, Some(round)).map(|mut s| {
                    s.round = Some(round);
                    s
                });
                interrupt::check()?;
                record(points, &r.spec.id, p, rep, res);
            }
        }
    }
    for (ti, mut r) in running {
        if let Some(mut s) = r.server.take() {
            if !s.alive() {
                let why = format!("{} died:\n{}", plan[ti].0.id, s.log_tail(15));
                eprintln!("  {why}");
                fail_all(points, ti, why);
            }
            if let Err(e) = s.stop() {
                eprintln!("  stopping: {e:#}");
            }
        }
    }
    Ok(())
}

/// One run of `point` on `r`; `round` when the point is measured several times per repeat
/// (recorded in the sample, so ratios pair the same round).
fn run_point(
    ctx: &Ctx,
    r: &Running,
    point: &Point,
    repeat: usize,
    round: Option<usize>,
) -> Result<Sample> {
    let raw_rel = format!(
        "raw/{}/{}-{}-x{}{}-r{repeat}{}.json",
        r.spec.id,
        point.workload.id,
        point.client.name(),
        point.jobs,
        point
            .rate_iops
            .map_or(String::new(), |x| format!("-rate{x}")),
        round.map_or(String::new(), |k| format!("-round{k}"))
    );
    let raw_path = ctx.out_dir.join(&raw_rel);
    std::fs::create_dir_all(raw_path.parent().expect("has a parent"))?;
    // The server's CPU over the steady middle of the run.
    let t0 = Instant::now();
    let edge = Duration::from_millis(250);
    let window = CpuWindow::start(
        r.server.as_ref().map(|s| s.pid),
        t0 + ctx.ramp.max(edge),
        t0 + ctx.ramp + ctx.runtime.saturating_sub(edge),
    );
    let mut sample = match point.client {
        Client::Fio => {
            let job = fio_job(ctx, r, point, repeat)?;
            let (text, report) = job.run_raw()?;
            std::fs::write(&raw_path, &text)?;
            let j = report.job()?;
            ensure!(j.error == 0, "fio reported error {}", j.error);
            fio_sample(j, repeat)
        }
        Client::Lean => {
            let cfg = lean_config(ctx, r, point, repeat)?;
            let res = nbd_load::run(&cfg)?;
            std::fs::write(&raw_path, serde_json::to_string_pretty(&res)? + "\n")?;
            ensure!(res.errors == 0, "{} requests failed", res.errors);
            lean_sample(&res, repeat)
        }
        Client::Engine => bail!("engine points run through run_engine"),
    };
    sample.raw = Some(raw_rel);
    record_window(&mut sample, window.finish());
    Ok(sample)
}

/// Put what a [`CpuWindow`] saw into `sample`.
fn record_window(sample: &mut Sample, seen: Option<WindowCpu>) {
    let Some(w) = seen else { return };
    if let Some(cores) = w.server_cores {
        sample.server_cpu_cores = Some(cores);
        if sample.iops > 0.0 {
            sample.server_cpu_us_per_io = Some(cores / sample.iops * 1e6);
        }
    }
    sample.others_cpu_cores = Some(w.others_cores);
    sample.others_top = w
        .others_top
        .iter()
        .map(|(name, cores)| format!("{name} {cores:.2}"))
        .collect();
    sample.steal_pct = w.steal_pct;
}

/// The engine's point and the raw fio point it is judged against: 4k random read QD32.
const ENGINE_WORKLOAD: &str = "randread-4k-qd32";

/// The engine in process on the backing file, 4k random read QD32 (one reactor, the task
/// driver: one thread does everything, like fio). One round of the engine step.
fn run_engine(ctx: &Ctx, ramp: Duration, seed: u64, raw_rel: &str) -> Result<Sample> {
    let prep = ctx.prep.as_ref().context("no backing file")?;
    let placement = Placement::on(DriverKind::Task, &[ctx.engine_cpu.0], &ctx.cpus);
    let w = engine_bench::Workload {
        block_bytes: 4096,
        iodepth: 32,
        runtime: ctx.runtime,
        ramp,
        spin: Duration::from_micros(50),
        seed,
        poll_idle_us: ctx.env.rb_poll_idle_us,
        buffers: crate::driver::Buffers::Owned,
    };
    let t0 = Instant::now();
    let window = steady_window(ctx, t0, ramp);
    let run = engine_bench::run(prep, &placement, &w)?;
    let raw_path = ctx.out_dir.join(raw_rel);
    std::fs::create_dir_all(raw_path.parent().expect("has a parent"))?;
    std::fs::write(&raw_path, serde_json::to_string_pretty(&run)? + "\n")?;
    let mut sample = Sample {
        iops: run.iops,
        mib_s: run.bw_bytes_per_s / (1 << 20) as f64,
        lat: Some(run.lat),
        client_cpu_us_per_io: Some(run.cpu_us_per_io),
        raw: Some(raw_rel.to_string()),
        ..Sample::default()
    };
    record_window(&mut sample, window.finish());
    Ok(sample)
}

/// A window over the steady middle of a run of `ctx.runtime` after `ramp`, from `t0`.
fn steady_window(ctx: &Ctx, t0: Instant, ramp: Duration) -> CpuWindow {
    let edge = Duration::from_millis(250);
    CpuWindow::start(
        None,
        t0 + ramp.max(edge),
        t0 + ramp + ctx.runtime.saturating_sub(edge),
    )
}

/// Raw fio io_uring on the backing file, 4k random read QD32: one round of the engine step.
/// fio runs in both [`engine_bench::raw_fio_patterns`]; the round's raw figure is the better of
/// the two (its `raw` file names which).
fn run_raw_round(
    ctx: &Ctx,
    raw: &Running,
    ramp: Duration,
    seed: u64,
    raw_rel: &str,
) -> Result<Sample> {
    let point = Point {
        workload: crate::matrix::workload(ENGINE_WORKLOAD).expect("known"),
        client: Client::Fio,
        jobs: 1,
        rate_iops: None,
    };
    // fio_job's --randseed is 0x5eed + its `repeat` argument.
    let job = fio_job(ctx, raw, &point, seed.saturating_sub(0x5eed) as usize)?.ramp(Some(ramp));
    let job = engine_bench::pinned(job, ctx.engine_cpu.0);
    let mut best: Option<Sample> = None;
    for (variant, job) in engine_bench::raw_fio_patterns(job) {
        let rel = raw_rel.replace(".json", &format!("-{variant}.json"));
        let window = steady_window(ctx, Instant::now(), ramp);
        let (text, report) = job.run_raw()?;
        let raw_path = ctx.out_dir.join(&rel);
        std::fs::create_dir_all(raw_path.parent().expect("has a parent"))?;
        std::fs::write(&raw_path, &text)?;
        let j = report.job()?;
        ensure!(j.error == 0, "fio reported error {}", j.error);
        let mut sample = Sample {
            raw: Some(rel),
            ..fio_sample(j, 0)
        };
        record_window(&mut sample, window.finish());
        eprintln!("    raw fio ({variant}): {:.0} IOPS", sample.iops);
        if best.as_ref().is_none_or(|b| sample.iops > b.iops) {
            best = Some(sample);
        }
        interrupt::check()?;
    }
    Ok(best.expect("two fio runs"))
}

/// The engine step of one repeat: `rounds` rounds of raw fio and the engine back to back on the
/// same region of the same file, the same runtime and warm-up (at least 0.25 s, so neither
/// counts its start), the order swapped every round so drift favours neither. Returns the
/// (raw, engine) samples, one per round each (raw: none when raw fio is not in the run).
fn engine_step(
    ctx: &Ctx,
    raw: Option<&Running>,
    repeat: usize,
    rounds: usize,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let ramp = ctx.ramp.max(Duration::from_millis(250));
    let (mut raws, mut engines) = (Vec::new(), Vec::new());
    if repeat == 1 {
        // First runs on a fresh file are slow (virtual disk and host cache still warming up):
        // the engine's first run once read 45k IOPS against 60k for every run after
        // it, so the first pair read 0.74. One unmeasured run of each goes first.
        let warm =
            |dir: &str, who: &str| format!("raw/{dir}/{ENGINE_WORKLOAD}-{who}-x1-warm-up.json");
        run_engine(ctx, ramp, 0x5eed, &warm("engine", "engine"))?;
        if let Some(r) = raw {
            run_raw_round(ctx, r, ramp, 0x5eed, &warm("raw", "fio"))?;
        }
        eprintln!("  warm-up runs done (not counted)");
    }
    for k in 1..=rounds {
        interrupt::check()?;
        let seed = 0x5eed + ((repeat - 1) * rounds + k) as u64;
        let suffix = format!("r{repeat}-round{k}.json");
        let engine_first = k % 2 == 0;
        for engine_now in [engine_first, !engine_first] {
            if engine_now {
                let rel = format!("raw/engine/{ENGINE_WORKLOAD}-engine-x1-{suffix}");
                let s = run_engine(ctx, ramp, seed, &rel)?;
                eprintln!("  round {k}/{rounds} engine: {:.0} IOPS", s.iops);
                engines.push(Sample {
                    repeat,
                    round: Some(k),
                    ..s
                });
            } else if let Some(r) = raw {
                let rel = format!("raw/raw/{ENGINE_WORKLOAD}-fio-x1-{suffix}");
                let s = run_raw_round(ctx, r, ramp, seed, &rel)?;
                eprintln!("  round {k}/{rounds} raw fio (best): {:.0} IOPS", s.iops);
                raws.push(Sample {
                    repeat,
                    round: Some(k),
                    ..s
                });
            }
            interrupt::check()?;
        }
    }
    Ok((raws, engines))
}

/// Write the whole region once with 1 MiB sequential writes (fio nbd), so reads hit data.
fn prefill(ctx: &Ctx, r: &Running) -> Result<()> {
    let uri = r.fio_uri.as_ref().context("no NBD URI")?;
    let job = FioJob::new(format!("{}-prefill", r.spec.id))
        .ioengine("nbd")
        .rw("write")
        .bs_bytes(1 << 20)
        .iodepth(8)
        .runtime(None)
        .size_bytes(r.region_bytes)
        .direct(false)
        .extra(format!("--uri={uri}"));
    let (text, report) = job.run_raw()?;
    let j = report.job()?;
    ensure!(j.error == 0, "prefill: fio error {}", j.error);
    let dir = ctx.out_dir.join("raw").join(&r.spec.id);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("prefill.json"), text)?;
    Ok(())
}

/// The lean client's verify mode: random 4 KiB reads and writes (50/50) on two connections,
/// every read checked against what this pass wrote.
fn verify(ctx: &Ctx, r: &Running) -> VerifyResult {
    let mut cfg = match r.endpoint.clone() {
        Some(ep) => LoadConfig::new(ep, EXPORT, ctx.verify),
        None => {
            return VerifyResult {
                target: r.spec.id.clone(),
                ok: false,
                ops: 0,
                reads: 0,
                writes: 0,
                errors: 0,
                verify_failures: 0,
                detail: "no endpoint".into(),
            }
        }
    };
    cfg.connections = 2;
    cfg.queue_depth = 16;
    cfg.read_percent = 50;
    cfg.verify = true;
    // A small range so blocks are written, then read back, many times.
    cfg.range_bytes = Some(r.region_bytes.min(16 << 20));
    cfg.seed = 0xfeed;
    cfg.cancel = Some(interrupt::flag());
    match nbd_load::run(&cfg) {
        Ok(res) => VerifyResult {
            target: r.spec.id.clone(),
            ok: res.errors == 0 && res.verify_failures == 0 && res.reads > 0 && res.writes > 0,
            ops: res.ops,
            reads: res.reads,
            writes: res.writes,
            errors: res.errors,
            verify_failures: res.verify_failures,
            detail: format!(
                "{} reads checked against {} writes over {} MiB, {:.1} s",
                res.reads,
                res.writes,
                cfg.range_bytes.unwrap_or(0) >> 20,
                res.elapsed_s
            ),
        },
        Err(e) => VerifyResult {
            target: r.spec.id.clone(),
            ok: false,
            ops: 0,
            reads: 0,
            writes: 0,
            errors: 0,
            verify_failures: 0,
            detail: format!("{e:#}"),
        },
    }
}

/// Percent of one core an idle server uses over `ctx.idle`, after a second to settle.
fn idle_cpu_pct(ctx: &Ctx, r: &Running) -> Option<f64> {
    let s = r.server.as_ref()?;
    let settle = Instant::now() + Duration::from_secs(1);
    let w = CpuWindow::start(Some(s.pid), settle, settle + ctx.idle);
    w.finish()
        .and_then(|w| w.server_cores)
        .map(|cores| cores * 100.0)
}

/// Estimated seconds of a plan (for the printed plan; not a promise).
fn estimate_s(n_points: usize, n_starts: usize, runtime: Duration, ramp: Duration) -> f64 {
    n_points as f64 * ((runtime + ramp).as_secs_f64() + 0.2) + n_starts as f64 * 1.5
}

pub fn run(args: &RunArgs) -> Result<()> {
    interrupt::install()?;
    let started = SystemTime::now();
    let t_start = Instant::now();
    let preset = if args.complete {
        Preset::Complete
    } else if args.full {
        Preset::Full
    } else {
        Preset::Quick
    };
    let d = preset.defaults();
    let repeat = args.repeat.unwrap_or(d.repeat);
    ensure!(repeat >= 1, "--repeat must be at least 1");
    let runtime_s = args.runtime_s.unwrap_or(d.runtime_s);
    ensure!(runtime_s >= 0.2, "--runtime-s must be at least 0.2");
    let ramp_s = args.ramp_s.unwrap_or(d.ramp_s).max(0.0);
    let size_mib = args.size_mib.unwrap_or(d.size_mib);
    ensure!(size_mib >= 96, "--size-mib must be at least 96");
    let cpus = sys::available_cpus()?;
    let profiles: Vec<String> = args
        .profiles
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty() && p != "none")
        .collect();
    let all = targets::all_targets(&profiles);
    let mut wanted: Vec<String> = if args.targets.is_empty() || args.targets == ["all"] {
        let mut v = targets::default_target_ids(preset == Preset::Complete);
        v.extend(profiles.iter().map(|p| format!("ringblock-{p}")));
        v
    } else {
        args.targets.clone()
    };
    for t in &wanted {
        ensure!(
            all.iter().any(|s| &s.id == t),
            "unknown target {t:?} (known: {})",
            all.iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    wanted.retain(|t| !args.skip.contains(t));
    let specs: Vec<TargetSpec> = all.into_iter().filter(|s| wanted.contains(&s.id)).collect();
    ensure!(!specs.is_empty(), "no target left to run");

    let ringblock = find_ringblock(args.ringblock.as_deref())?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(sys::utc_stamp(started)));
    let runtime = Duration::from_secs_f64(runtime_s);
    let ramp = Duration::from_secs_f64(ramp_s);
    let rate = args.rate_iops.max(1);
    let n_cpus = cpus.len() as u32;

    let engine_rounds = args.engine_rounds.unwrap_or(d.engine_rounds);
    ensure!(engine_rounds >= 1, "--engine-rounds must be at least 1");
    // With both raw and engine in the run, raw's 4k random read QD32 is measured in the engine
    // step, alternated with the engine, rather than on its own.
    let has = |k: fn(&Kind) -> bool| specs.iter().any(|s| k(&s.kind));
    let paired = has(|k| matches!(k, Kind::Raw)) && has(|k| matches!(k, Kind::Engine));
    let engine_key = format!("{ENGINE_WORKLOAD}|fio|x1");

    // The plan.
    let plan: Vec<(TargetSpec, Vec<Point>)> = specs
        .iter()
        .map(|s| {
            let pts = match s.kind {
                Kind::Engine => Vec::new(),
                Kind::Raw if paired => preset
                    .points(s.tier, n_cpus, rate)
                    .into_iter()
                    .filter(|p| p.key() != engine_key)
                    .collect(),
                _ => preset.points(s.tier, n_cpus, rate),
            };
            (s.clone(), pts)
        })
        .collect();
    let engine_runs = engine_rounds * if paired { 2 } else { 1 };
    let n_points: usize = plan
        .iter()
        .map(|(s, p)| {
            if matches!(s.kind, Kind::Engine) {
                engine_runs
            } else {
                p.len()
            }
        })
        .sum();
    let est = estimate_s(n_points * repeat, specs.len() * repeat, runtime, ramp)
        + if has(|k| matches!(k, Kind::Engine)) {
            // The engine step's warm-up is at least 0.25 s, and its first repeat starts with
            // one unmeasured run of the engine and a round of raw fio (two runs).
            let warm_up_runs = if paired { 3 } else { 1 };
            (engine_runs * repeat) as f64 * (0.25 - ramp_s).max(0.0)
                + warm_up_runs as f64 * (runtime_s + ramp_s.max(0.25))
        } else {
            0.0
        };
    eprintln!(
        "ringblock-bench run ({preset:?}): {} targets, {} points x {repeat} repeat(s), {:.1} s \
         each: about {:.0} s",
        specs.len(),
        n_points,
        runtime_s + ramp_s,
        est
    );
    for (s, pts) in &plan {
        if matches!(s.kind, Kind::Engine) {
            eprintln!(
                "  {:<18} {:>2} runs    {engine_rounds} round(s) per repeat{}",
                s.id,
                engine_runs,
                if paired {
                    ", each raw fio then the engine (order alternating), back to back"
                } else {
                    " (raw fio is not in this run: no ratio)"
                }
            );
        } else {
            eprintln!("  {:<18} {:>2} points  {}", s.id, pts.len(), s.note);
        }
    }
    if args.plan {
        return Ok(());
    }
    ensure!(
        targets::which("fio").is_some(),
        "fio is not installed: the matrix runs fio (apt-get install fio)"
    );
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let fio_version = crate::fio::version()?;
    // What a sleep and wake-up costs here, measured before anything starts: it sets the CPU
    // per IO of every server that sleeps between requests (the fixed-rate points).
    let wake_cost = measure_wake_cost(&cpus);

    // Files: the ringblock-formatted backing file (raw, engine, ringblock-file) and a plain
    // one for the file-serving peers.
    let data_dir = args.data_dir.clone().unwrap_or_else(|| out_dir.clone());
    std::fs::create_dir_all(&data_dir)?;
    let data_tmp = tempfile::Builder::new()
        .prefix(".ringblock-bench-data-")
        .tempdir_in(&data_dir)
        .with_context(|| format!("creating a data directory in {}", data_dir.display()))?;
    let run_tmp = tempfile::Builder::new()
        .prefix("rbb-")
        .tempdir()
        .context("creating a run directory for sockets and logs")?;
    // A second Ctrl-C exits at once, past the guards: it removes these itself.
    let device_file = data_tmp.path().join("device.img");
    let peer_file = data_tmp.path().join("peer.img");
    for p in [&device_file, &peer_file] {
        interrupt::register_path(p);
    }
    interrupt::register_path(data_tmp.path());
    interrupt::register_path(run_tmp.path());
    let needs_device = specs.iter().any(|s| {
        matches!(
            s.kind,
            Kind::Raw
                | Kind::Engine
                | Kind::Ringblock {
                    device: targets::RbDevice::File,
                    ..
                }
        )
    });
    let needs_peer_file = specs
        .iter()
        .any(|s| matches!(s.kind, Kind::NbdkitFile | Kind::QemuNbd | Kind::NbdServer));
    let prep = if needs_device {
        eprintln!(
            "preparing {} ({size_mib} MiB): format, one volume over every chunk, fill ...",
            device_file.display()
        );
        Some(engine_bench::prepare(&device_file, size_mib << 20)?)
    } else {
        None
    };
    let region_bytes = prep.as_ref().map_or(size_mib << 20, |p| p.region_bytes);
    let prep_path = prep.as_ref().map(|p| p.device_path.clone());
    if needs_peer_file {
        write_peer_file(&peer_file, region_bytes)?;
    }
    let profile_region_bytes = region_bytes.min(if preset == Preset::Quick {
        64 << 20
    } else {
        256 << 20
    });
    let env = Env {
        ringblock_no_web: ringblock.as_deref().is_some_and(no_web_flag),
        ringblock: ringblock.clone(),
        rb_cores: args.rb_cores.clone(),
        rb_poll_idle_us: args.rb_poll_idle_us,
        run_dir: run_tmp.path().to_path_buf(),
        device_file: device_file.clone(),
        device_file_bytes: prep.as_ref().map_or(0, |p| p.device_size_bytes),
        region_bytes,
        peer_file,
        profile_region_bytes,
    };
    let ctx = Ctx {
        env,
        prep,
        out_dir: out_dir.clone(),
        runtime,
        ramp,
        verify: Duration::from_secs_f64(args.verify_s.unwrap_or(d.verify_s).max(0.1)),
        idle: Duration::from_secs_f64(args.idle_s.unwrap_or(d.idle_s).max(0.5)),
        engine_cpu: match &prep_path {
            Some(p) => engine_bench::comparison_cpu(p, &cpus),
            None => (cpus.last().copied().unwrap_or(0), String::new()),
        },
        cpus: cpus.clone(),
    };

    // Who can run.
    let mut statuses: Vec<TargetStatus> = specs
        .iter()
        .map(|s| {
            let reason = targets::unavailable(s, &ctx.env);
            TargetStatus {
                id: s.id.clone(),
                label: s.label.clone(),
                note: s.note.clone(),
                status: if reason.is_some() { "skipped" } else { "ran" }.into(),
                reason,
                command: None,
            }
        })
        .collect();
    for st in statuses.iter().filter(|s| s.status == "skipped") {
        eprintln!("skipping {}: {}", st.id, st.reason.as_deref().unwrap_or(""));
    }
    let mut points: Vec<PointResult> = Vec::new();
    for (s, pts) in &plan {
        let rr = crate::matrix::workload(ENGINE_WORKLOAD).expect("known");
        let one = |client| Point {
            workload: rr,
            client,
            jobs: 1,
            rate_iops: None,
        };
        let pts: Vec<(String, Point)> = match s.kind {
            Kind::Engine => vec![(s.id.clone(), one(Client::Engine))],
            // Measured in the engine step, listed with raw's points.
            Kind::Raw if paired => std::iter::once(one(Client::Fio))
                .chain(pts.iter().copied())
                .map(|p| (s.id.clone(), p))
                .collect(),
            _ => pts.iter().map(|p| (s.id.clone(), *p)).collect(),
        };
        for (target, p) in pts {
            points.push(PointResult {
                target,
                key: p.key(),
                workload: p.workload.id.into(),
                client: p.client.name().into(),
                jobs: p.jobs,
                rate_iops: p.rate_iops,
                samples: Vec::new(),
                failures: Vec::new(),
                summary: None,
            });
        }
    }
    let mut verifies: Vec<VerifyResult> = Vec::new();
    let mut idles: Vec<(String, Vec<f64>)> = Vec::new();
    // With two targets or more at a fixed rate, those points run in a step of their own, the
    // targets side by side (see `rate_step`).
    let rate_side_by_side = plan
        .iter()
        .filter(|(_, pts)| pts.iter().any(|p| p.rate_iops.is_some()))
        .count()
        >= 2;

    let outcome = (|| -> Result<()> {
        for rep in 1..=repeat {
            let mut order: Vec<usize> = (0..plan.len()).collect();
            if rep % 2 == 0 {
                order.reverse();
            }
            for &ti in &order {
                interrupt::check()?;
                let (spec, pts) = &plan[ti];
                if statuses[ti].status == "skipped" {
                    continue;
                }
                eprintln!("[repeat {rep}/{repeat}] {} ...", spec.id);
                if matches!(spec.kind, Kind::Engine) {
                    let raw = if paired {
                        let raw_spec = specs
                            .iter()
                            .find(|s| matches!(s.kind, Kind::Raw))
                            .expect("paired");
                        Some(targets::start(raw_spec, &ctx.env, Duration::from_secs(1))?)
                    } else {
                        None
                    };
                    match engine_step(&ctx, raw.as_ref(), rep, engine_rounds) {
                        Ok((raw_samples, engine_samples)) => {
                            let mut push = |target: &str, key: &str, v: Vec<Sample>| {
                                if let Some(p) = points
                                    .iter_mut()
                                    .find(|p| p.target == target && p.key == key)
                                {
                                    p.samples.extend(v);
                                }
                            };
                            push(
                                &spec.id,
                                &format!("{ENGINE_WORKLOAD}|engine|x1"),
                                engine_samples,
                            );
                            if let Some(r) = &raw {
                                push(&r.spec.id, &engine_key, raw_samples);
                            }
                        }
                        Err(e) => {
                            interrupt::check()?;
                            eprintln!("  engine step failed: {e:#}");
                            for p in points.iter_mut().filter(|p| {
                                p.target == spec.id
                                    || (paired
                                        && p.key == engine_key
                                        && raw.as_ref().is_some_and(|r| r.spec.id == p.target))
                            }) {
                                p.failures.push(format!("repeat {rep}: {e:#}"));
                            }
                        }
                    }
                    continue;
                }
                let mut running = match targets::start(spec, &ctx.env, Duration::from_secs(15)) {
                    Ok(r) => r,
                    Err(e) => {
                        interrupt::check()?;
                        eprintln!("  {} failed to start: {e:#}", spec.id);
                        let st = &mut statuses[ti];
                        if st.reason.is_none() {
                            st.status = "failed".into();
                            st.reason = Some(format!("repeat {rep}: {e:#}"));
                        }
                        continue;
                    }
                };
                if statuses[ti].command.is_none() && !running.command.is_empty() {
                    statuses[ti].command = Some(running.command.clone());
                }
                if spec.needs_prefill() {
                    if let Err(e) = prefill(&ctx, &running) {
                        interrupt::check()?;
                        eprintln!("  prefill failed: {e:#}");
                        statuses[ti].status = "failed".into();
                        statuses[ti].reason = Some(format!("prefill: {e:#}"));
                        continue;
                    }
                }
                if rep == 1 && spec.is_nbd() {
                    let v = verify(&ctx, &running);
                    eprintln!(
                        "  verify: {} ({})",
                        if v.ok { "ok" } else { "FAILED" },
                        v.detail
                    );
                    verifies.push(v);
                }
                let idle_here = rep == 1
                    && (spec.id == "ringblock"
                        || (preset != Preset::Quick && spec.tier == Tier::Headline));
                if idle_here {
                    if let Some(pct) = idle_cpu_pct(&ctx, &running) {
                        eprintln!("  idle CPU: {pct:.2} % of a core");
                        match idles.iter_mut().find(|(t, _)| t == &spec.id) {
                            Some((_, v)) => v.push(pct),
                            None => idles.push((spec.id.clone(), vec![pct])),
                        }
                    }
                }
                for p in pts {
                    if rate_side_by_side && p.rate_iops.is_some() {
                        continue;
                    }
                    interrupt::check()?;
                    let res = run_point(&ctx, &running, p, rep, None);
                    interrupt::check()?;
                    record(&mut points, &spec.id, p, rep, res);
                    if let Some(s) = running.server.as_mut() {
                        if !s.alive() {
                            let why = format!("{} died:\n{}", spec.id, s.log_tail(15));
                            eprintln!("  {why}");
                            statuses[ti].reason.get_or_insert(why);
                            break;
                        }
                    }
                }
                if let Some(mut s) = running.server.take() {
                    if let Err(e) = s.stop() {
                        eprintln!("  stopping: {e:#}");
                    }
                }
            }
            if rate_side_by_side {
                rate_step(&ctx, &plan, &statuses, rep, repeat, &mut points)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = &outcome {
        if interrupt::requested() {
            eprintln!("{e:#}; writing what was measured so far");
        } else {
            return Err(outcome.unwrap_err());
        }
    }

    // Summaries.
    for p in &mut points {
        p.summarise();
    }
    for st in &mut statuses {
        if st.status == "ran"
            && !points
                .iter()
                .any(|p| p.target == st.id && !p.samples.is_empty())
        {
            if interrupt::requested() && st.reason.is_none() {
                st.status = "interrupted".into();
                st.reason =
                    Some("the run was interrupted (Ctrl-C) before a point of it finished".into());
            } else {
                st.status = "failed".into();
                st.reason
                    .get_or_insert_with(|| "no point produced a sample".into());
            }
        }
    }
    let settings = Settings {
        preset,
        repeat,
        runtime_s,
        ramp_s,
        size_mib,
        region_bytes,
        profile_region_bytes,
        verify_s: ctx.verify.as_secs_f64(),
        idle_s: ctx.idle.as_secs_f64(),
        engine_rounds,
        rate_iops: rate,
        rb_cores: args.rb_cores.clone(),
        rb_poll_idle_us: args.rb_poll_idle_us,
        profiles: profiles.clone(),
        ringblock: ringblock.clone(),
    };
    let host = serde_json::json!({
        "cpus": cpus,
        "engine_step_cpu": ctx.engine_cpu.0,
        "engine_step_cpu_why": ctx.engine_cpu.1,
        "kernel": sys::kernel_release(),
        "idle": sys::idle_policy(),
        "wake_cost": wake_cost,
        "fio": fio_version,
        "nbdkit": tool_version("nbdkit", &["--version"]),
        "qemu-nbd": tool_version("qemu-nbd", &["--version"]),
        "nbd-server": tool_version("nbd-server", &["-V"]),
        "load_average": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
    });
    let mut summary = RunSummary {
        schema: SCHEMA.into(),
        started_utc: sys::utc_stamp(started),
        elapsed_s: t_start.elapsed().as_secs_f64(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        preset: format!("{preset:?}").to_lowercase(),
        settings: serde_json::to_value(&settings)?,
        host,
        targets: statuses,
        points,
        verify: verifies,
        idle: idles
            .into_iter()
            .filter_map(|(target, v)| {
                Some(IdleResult {
                    target,
                    window_s: ctx.idle.as_secs_f64(),
                    cpu_pct: Spread::of(&v)?,
                })
            })
            .collect(),
        headline: Vec::new(),
        plots: Vec::new(),
    };
    summary.headline = crate::results::headline(&summary, rate);
    summary.plots = run_report::write_plots(&summary, &out_dir)?;
    let md = run_report::markdown(&summary);
    std::fs::write(out_dir.join("report.md"), &md)?;
    crate::report::write_json(&out_dir, "summary.json", &summary)?;
    if args.keep_files {
        interrupt::unregister_paths();
        let logs = out_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        for e in std::fs::read_dir(run_tmp.path())?.flatten() {
            let _ = std::fs::copy(e.path(), logs.join(e.file_name()));
        }
        let kept = data_tmp.keep();
        eprintln!("kept backing files in {}", kept.display());
    }
    println!("{}", run_report::headline_markdown(&summary));
    eprintln!(
        "wrote {} (report.md, summary.json, {} plots, raw/) in {:.0} s",
        out_dir.display(),
        summary.plots.len(),
        summary.elapsed_s
    );
    if let Some(old) = &args.compare {
        let text = crate::compare::compare_files(old, &out_dir.join("summary.json"))?;
        std::fs::write(out_dir.join("compare.md"), &text)?;
        println!("{text}");
    }
    if interrupt::requested() {
        bail!("interrupted: the report holds what was measured before Ctrl-C");
    }
    Ok(())
}

/// Round trips per wake-cost measurement: about 0.1 s across CPUs even where a round trip costs
/// 50 µs, and enough that the mean is steady.
const WAKE_COST_ROUND_TRIPS: u32 = 2000;

/// The sleep-and-wake cost on one CPU and across the first and last CPUs, as the host record
/// keeps it (`null` where it could not be measured).
fn measure_wake_cost(cpus: &[usize]) -> serde_json::Value {
    let (first, last) = (cpus[0], cpus[cpus.len() - 1]);
    let one = |a, b| match sys::wake_cost(a, b, WAKE_COST_ROUND_TRIPS) {
        Ok(w) => serde_json::json!(w),
        Err(e) => {
            eprintln!("could not time a wake-up on cpus {a} and {b}: {e:#}");
            serde_json::Value::Null
        }
    };
    serde_json::json!({
        "cpus": [first, last],
        "across_cpus": if first != last { one(first, last) } else { serde_json::Value::Null },
        "same_cpu": one(first, first),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_files_hold_data_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("peer.img");
        write_peer_file(&p, (3 << 20) + 4096).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), (3 << 20) + 4096);
        assert!(data.chunks(4096).all(|c| c.iter().any(|&b| b != 0)));
        assert_ne!(
            data[..4096],
            data[1 << 20..(1 << 20) + 4096],
            "blocks differ"
        );
    }

    const RANDRW: &str = include_str!("../tests/data/fio-randrw.json");
    const NBD_RATE: &str = include_str!("../tests/data/fio-nbd-rate.json");

    #[test]
    fn fio_samples_sum_directions_and_take_read_latency() {
        let r = crate::fio::parse(RANDRW).unwrap();
        let j = r.job().unwrap();
        let s = fio_sample(j, 2);
        assert_eq!(s.repeat, 2);
        assert!((s.iops - (j.read.iops + j.write.iops)).abs() < 1e-9);
        let mib = (j.read.bw_bytes_per_s + j.write.bw_bytes_per_s) as f64 / 1048576.0;
        assert!((s.mib_s - mib).abs() < 1e-9);
        assert_eq!(s.lat, j.read.lat, "mixed: the read side's total latency");
        assert_eq!(s.errors, 0);
        // Two grouped jobs: fio's CPU % is per job and job_runtime their sum (2001 ms), so
        // CPU per IO is all the jobs' CPU over all their IOs.
        let cpu = (j.usr_cpu_pct + j.sys_cpu_pct) / 100.0 * 2.001 * 1e6
            / (j.read.total_ios + j.write.total_ios) as f64;
        assert!((s.client_cpu_us_per_io.unwrap() - cpu).abs() < 1e-9);
    }

    #[test]
    fn fio_samples_of_the_nbd_engine_at_a_fixed_rate() {
        // Real fio 3.33 output: --ioengine=nbd --rate_iops=20000 for 1.5 s.
        let r = crate::fio::parse(NBD_RATE).unwrap();
        let s = fio_sample(r.job().unwrap(), 1);
        assert!((s.iops - 19_986.675_55).abs() < 1e-6);
        assert_eq!(s.lat.unwrap().p50_ns, 27_008, "lat, not clat (22912)");
        assert_eq!(s.lat.unwrap().p99_99_ns, 1_630_208);
        // (28.87 + 39.8) % of 1.5 s over 30000 IOs.
        let cpu = s.client_cpu_us_per_io.unwrap();
        assert!(
            (cpu - 0.686_666_67 * 1.5e6 / 30_000.0).abs() < 1e-3,
            "{cpu}"
        );
        assert!(
            s.server_cpu_us_per_io.is_none(),
            "the server's CPU is measured apart"
        );
    }

    #[test]
    fn lean_samples_convert_microseconds() {
        let res = nbd_load::LoadResult {
            ops: 1000,
            reads: 1000,
            writes: 0,
            errors: 0,
            verify_failures: 0,
            elapsed_s: 0.5,
            iops: 2000.0,
            mib_s: 7.8125,
            lat_p50_us: 12.5,
            lat_p99_us: 40.0,
            lat_p999_us: 90.25,
            lat_p9999_us: 1500.0,
            client_cpu_s: 0.002,
        };
        let s = lean_sample(&res, 3);
        assert_eq!(s.repeat, 3);
        assert_eq!(
            s.lat.unwrap(),
            crate::fio::Percentiles {
                p50_ns: 12_500,
                p99_ns: 40_000,
                p99_9_ns: 90_250,
                p99_99_ns: 1_500_000,
            }
        );
        assert!((s.client_cpu_us_per_io.unwrap() - 2.0).abs() < 1e-9);
        let none = lean_sample(&nbd_load::LoadResult { ops: 0, ..res }, 1);
        assert!(none.lat.is_none() && none.client_cpu_us_per_io.is_none());
    }

    #[test]
    fn estimates_grow_with_points() {
        let r = Duration::from_secs(1);
        assert!(estimate_s(10, 2, r, Duration::ZERO) < estimate_s(20, 2, r, Duration::ZERO));
    }
}
