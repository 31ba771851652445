//! Steps: per repeat, every target in turn (the order reversed every other repeat, so drift
//! favours none): start it, prefill memory-backed ones, verify and measure idle CPU (first
//! repeat), run its points, stop it; the engine's rounds (see `engine_step`); then the
//! fixed-rate points with their targets side by side.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::fio::{FioJob, JobReport};
use crate::interrupt;
use crate::matrix::{Client, Point, Preset, Tier};
use crate::nbd_load::{self, LoadConfig};
use crate::procs::{CpuWindow, WindowCpu};
use crate::results::{PointResult, Sample, TargetStatus, VerifyResult};
use crate::targets::{self, Kind, Running, EXPORT};

use super::engine_step::{self, ENGINE_WORKLOAD};
use super::plan::Plan;
use super::prepare::Ctx;

/// What the steps measured: the run's one result model, filled as it goes.
pub struct Measured {
    pub statuses: Vec<TargetStatus>,
    /// Every planned point of every target, its samples and failures.
    pub points: Vec<PointResult>,
    pub verifies: Vec<VerifyResult>,
    /// Idle CPU per target, percent of a core per repeat measured.
    pub idles: Vec<(String, Vec<f64>)>,
    /// The replication step's results, when it ran.
    pub replication: Option<crate::repl::ReplicationResult>,
}

impl Measured {
    /// Every planned point, empty (raw's engine-step point is listed with raw's points).
    pub fn new(plan: &Plan, statuses: Vec<TargetStatus>) -> Measured {
        let rr = crate::matrix::workload(ENGINE_WORKLOAD).expect("known");
        let one = |client| Point {
            workload: rr,
            client,
            jobs: 1,
            rate_iops: None,
        };
        let mut points = Vec::new();
        for (s, pts) in &plan.targets {
            let pts: Vec<Point> = match s.kind {
                Kind::Engine => vec![one(Client::Engine)],
                Kind::Raw if plan.paired => std::iter::once(one(Client::Fio))
                    .chain(pts.iter().copied())
                    .collect(),
                _ => pts.clone(),
            };
            points.extend(pts.into_iter().map(|p| PointResult {
                target: s.id.clone(),
                key: p.key(),
                workload: p.workload.id.into(),
                client: p.client.name().into(),
                jobs: p.jobs,
                rate_iops: p.rate_iops,
                samples: Vec::new(),
                failures: Vec::new(),
                summary: None,
            }));
        }
        Measured {
            statuses,
            points,
            verifies: Vec::new(),
            idles: Vec::new(),
            replication: None,
        }
    }

    /// Mark target `ti` failed (the first reason stays).
    fn fail(&mut self, ti: usize, why: String) {
        let st = &mut self.statuses[ti];
        if st.reason.is_none() {
            st.status = "failed".into();
            st.reason = Some(why);
        }
    }
}

/// Every repeat of every step. An error (Ctrl-C too) ends the steps; what was measured stays.
pub fn run(ctx: &Ctx, plan: &Plan, m: &mut Measured) -> Result<()> {
    let repeat = plan.settings.repeat;
    for rep in 1..=repeat {
        let mut order: Vec<usize> = (0..plan.targets.len()).collect();
        if rep % 2 == 0 {
            order.reverse();
        }
        for &ti in &order {
            interrupt::check()?;
            let spec = &plan.targets[ti].0;
            if m.statuses[ti].status == "skipped" {
                continue;
            }
            eprintln!("[repeat {rep}/{repeat}] {} ...", spec.id);
            if matches!(spec.kind, Kind::Engine) {
                engine_step::run(ctx, plan, m, ti, rep)?;
            } else {
                target_step(ctx, plan, m, ti, rep)?;
            }
        }
        if plan.rate_side_by_side {
            rate_step(ctx, plan, m, rep)?;
        }
    }
    if plan.settings.replication {
        replication_step(ctx, plan, m)?;
    }
    Ok(())
}

/// The replication step (`crate::repl::step`), all its repeats, after the targets'.
fn replication_step(ctx: &Ctx, plan: &Plan, m: &mut Measured) -> Result<()> {
    interrupt::check()?;
    let s = &plan.settings;
    let Some(bin) = ctx.env.ringblock.as_deref() else {
        eprintln!("[replication] skipped: no ringblock binary");
        return Ok(());
    };
    // The replica on another CPU than the primary's reactor when there is one.
    let replica_cores = plan
        .cpus
        .iter()
        .rev()
        .map(|c| c.to_string())
        .find(|c| *c != s.rb_cores)
        .unwrap_or_else(|| s.rb_cores.clone());
    let settings = crate::repl::step::ReplSettings {
        ringblock: bin,
        run_dir: &ctx.env.run_dir,
        out_dir: &ctx.out_dir,
        runtime: ctx.runtime,
        ramp: ctx.ramp,
        repeat: s.repeat,
        region_bytes: s.region_bytes,
        resync_bytes: s.repl_resync_mib << 20,
        primary_cores: s.rb_cores.clone(),
        replica_cores,
    };
    let (mut res, outcome) = crate::repl::step::run(&settings);
    for sr in &mut res.setups {
        for p in &mut sr.points {
            p.summarise();
        }
    }
    m.replication = Some(res);
    outcome
}

/// One target in one repeat: start, prefill, first-repeat checks, its points, stop.
fn target_step(ctx: &Ctx, plan: &Plan, m: &mut Measured, ti: usize, rep: usize) -> Result<()> {
    let (spec, pts) = &plan.targets[ti];
    let mut running = match targets::start(spec, &ctx.env, Duration::from_secs(15)) {
        Ok(r) => r,
        Err(e) => {
            interrupt::check()?;
            eprintln!("  {} failed to start: {e:#}", spec.id);
            m.fail(ti, format!("repeat {rep}: {e:#}"));
            return Ok(());
        }
    };
    if m.statuses[ti].command.is_none() && !running.command.is_empty() {
        m.statuses[ti].command = Some(running.command.clone());
    }
    if spec.needs_prefill() {
        if let Err(e) = prefill(ctx, &running) {
            interrupt::check()?;
            eprintln!("  prefill failed: {e:#}");
            m.statuses[ti].status = "failed".into();
            m.statuses[ti].reason = Some(format!("prefill: {e:#}"));
            return Ok(());
        }
    }
    if rep == 1 {
        first_repeat_checks(ctx, plan, m, &running);
    }
    for p in pts {
        if plan.rate_side_by_side && p.rate_iops.is_some() {
            continue;
        }
        interrupt::check()?;
        let res = run_point(ctx, &running, p, rep, None);
        interrupt::check()?;
        record(&mut m.points, &spec.id, p, rep, res);
        if let Some(s) = running.server.as_mut() {
            if !s.alive() {
                let why = format!("{} died:\n{}", spec.id, s.log_tail(15));
                eprintln!("  {why}");
                m.statuses[ti].reason.get_or_insert(why);
                break;
            }
        }
    }
    if let Some(mut s) = running.server.take() {
        if let Err(e) = s.stop() {
            eprintln!("  stopping: {e:#}");
        }
    }
    Ok(())
}

/// The lean client's verify pass on an NBD target, and idle CPU on ringblock (on every
/// headline target outside the quick preset).
fn first_repeat_checks(ctx: &Ctx, plan: &Plan, m: &mut Measured, running: &Running) {
    let spec = &running.spec;
    if spec.is_nbd() {
        let v = verify(ctx, running);
        eprintln!(
            "  verify: {} ({})",
            if v.ok { "ok" } else { "FAILED" },
            v.detail
        );
        m.verifies.push(v);
    }
    let idle_here =
        spec.id == "ringblock" || (plan.preset != Preset::Quick && spec.tier == Tier::Headline);
    if idle_here {
        if let Some(pct) = idle_cpu_pct(ctx, running) {
            eprintln!("  idle CPU: {pct:.2} % of a core");
            match m.idles.iter_mut().find(|(t, _)| t == &spec.id) {
                Some((_, v)) => v.push(pct),
                None => m.idles.push((spec.id.clone(), vec![pct])),
            }
        }
    }
}

/// The fio job of `point` on `target`.
pub fn fio_job(ctx: &Ctx, r: &Running, point: &Point, repeat: usize) -> Result<FioJob> {
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

pub fn fio_sample(job: &JobReport, repeat: usize) -> Sample {
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

/// File a point's sample (or failure) and print it.
pub fn record(
    points: &mut [PointResult],
    target: &str,
    p: &Point,
    rep: usize,
    res: Result<Sample>,
) {
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
/// in the reverse (and the first order reversed every other repeat). Measured minutes
/// apart, as the rest of the matrix is, two servers' CPU per IO also differed by the host's drift: on a 2-vCPU VM one server's repeats swung by 30 %
/// between runs while another's did not.
fn rate_step(ctx: &Ctx, plan: &Plan, m: &mut Measured, rep: usize) -> Result<()> {
    let (statuses, points) = (&m.statuses, &mut m.points);
    let repeat = plan.settings.repeat;
    let plan = &plan.targets;
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
    // The server's CPU over the steady middle of the run.
    let window = steady_window(ctx, r.server.as_ref().map(|s| s.pid), ctx.ramp);
    let mut sample = match point.client {
        Client::Fio => run_fio(ctx, &fio_job(ctx, r, point, repeat)?, &raw_rel, repeat)?,
        Client::Lean => {
            let cfg = lean_config(ctx, r, point, repeat)?;
            let res = nbd_load::run(&cfg)?;
            write_raw(ctx, &raw_rel, &(serde_json::to_string_pretty(&res)? + "\n"))?;
            ensure!(res.errors == 0, "{} requests failed", res.errors);
            Sample {
                raw: Some(raw_rel),
                ..lean_sample(&res, repeat)
            }
        }
        Client::Engine => bail!("engine points run through run_engine"),
    };
    record_window(&mut sample, window.finish());
    Ok(sample)
}

/// A window over the steady middle of a run of `ctx.runtime` after `ramp`, starting now: from
/// the end of the warm-up (at least 0.25 s in) to 0.25 s before the end.
pub fn steady_window(ctx: &Ctx, server_group: Option<i32>, ramp: Duration) -> CpuWindow {
    let (t0, edge) = (Instant::now(), Duration::from_millis(250));
    CpuWindow::start(
        server_group,
        t0 + ramp.max(edge),
        t0 + ramp + ctx.runtime.saturating_sub(edge),
    )
}

/// Keep a run's raw output at `rel` under the results folder.
pub fn write_raw(ctx: &Ctx, rel: &str, text: &str) -> Result<()> {
    let path = ctx.out_dir.join(rel);
    std::fs::create_dir_all(path.parent().context("a raw file's folder")?)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Run fio's `job` and keep its JSON at `rel`: its sample, an error when fio reports one.
pub fn run_fio(ctx: &Ctx, job: &FioJob, rel: &str, repeat: usize) -> Result<Sample> {
    let (text, report) = job.run_raw()?;
    write_raw(ctx, rel, &text)?;
    let j = report.job()?;
    ensure!(j.error == 0, "fio reported error {}", j.error);
    Ok(Sample {
        raw: Some(rel.to_string()),
        ..fio_sample(j, repeat)
    })
}

/// Put what a [`CpuWindow`] saw into `sample`.
pub fn record_window(sample: &mut Sample, seen: Option<WindowCpu>) {
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
    run_fio(ctx, &job, &format!("raw/{}/prefill.json", r.spec.id), 0).map(drop)
}

/// The lean client's verify mode: random 4 KiB reads and writes (50/50) on two connections,
/// every read checked against what this pass wrote.
fn verify(ctx: &Ctx, r: &Running) -> VerifyResult {
    let failed = |detail: String| VerifyResult {
        target: r.spec.id.clone(),
        ok: false,
        ops: 0,
        reads: 0,
        writes: 0,
        errors: 0,
        verify_failures: 0,
        detail,
    };
    let Some(ep) = r.endpoint.clone() else {
        return failed("no endpoint".into());
    };
    let mut cfg = LoadConfig::new(ep, EXPORT, ctx.verify);
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
            ok: res.errors == 0 && res.verify_failures == 0 && res.reads > 0 && res.writes > 0,
            ops: res.ops,
            reads: res.reads,
            writes: res.writes,
            errors: res.errors,
            verify_failures: res.verify_failures,
            ..failed(format!(
                "{} reads checked against {} writes over {} MiB, {:.1} s",
                res.reads,
                res.writes,
                cfg.range_bytes.unwrap_or(0) >> 20,
                res.elapsed_s
            ))
        },
        Err(e) => failed(format!("{e:#}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    const RANDRW: &str = include_str!("../../tests/data/fio-randrw.json");
    const NBD_RATE: &str = include_str!("../../tests/data/fio-nbd-rate.json");

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
}
