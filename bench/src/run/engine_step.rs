//! The engine step: the engine in process and raw fio on the same region of the same file,
//! 4k random read QD32, in rounds alternated back to back, both pinned to one CPU.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::engine_bench;
use crate::fio::FioJob;
use crate::interrupt;
use crate::matrix::{Client, Point};
use crate::results::Sample;
use crate::targets::{self, Kind, Running};

use super::plan::Plan;
use super::prepare::Ctx;
use super::steps::{fio_job, record_window, run_fio, steady_window, write_raw, Measured};

/// The fio patterns the engine's raw reference runs, named: fio's default (each read
/// submitted as it is issued) and batched, a quarter of the queue depth (8 of 32) per submit and
/// per reap, as the engine's reactor does. On a virtio disk that batches its interrupts either
/// can be the faster one (docs/performance.md), so the raw device's
/// limit is the better of the two.
fn raw_fio_patterns(job: FioJob) -> [(&'static str, FioJob); 2] {
    let batched = job
        .clone()
        .extra("--iodepth_batch_submit=8")
        .extra("--iodepth_batch_complete_min=8");
    [("default", job), ("batched", batched)]
}

/// Pin a fio job to `cpu`.
fn pinned(job: FioJob, cpu: usize) -> FioJob {
    job.extra(format!("--cpus_allowed={cpu}"))
}

/// The engine's point and the raw fio point it is judged against: 4k random read QD32.
pub const ENGINE_WORKLOAD: &str = "randread-4k-qd32";

/// The engine in process on the backing file, 4k random read QD32 (one reactor, the task
/// driver: one thread does everything, like fio). One round of the engine step.
fn run_engine(ctx: &Ctx, ramp: Duration, seed: u64, raw_rel: &str) -> Result<Sample> {
    let prep = ctx.prep.as_ref().context("no backing file")?;
    let w = engine_bench::Workload {
        block_bytes: 4096,
        iodepth: 32,
        runtime: ctx.runtime,
        ramp,
        seed,
        poll_idle_us: ctx.env.rb_poll_idle_us,
    };
    let window = steady_window(ctx, None, ramp);
    let run = engine_bench::run(prep, ctx.engine_cpu.0, &w)?;
    write_raw(ctx, raw_rel, &(serde_json::to_string_pretty(&run)? + "\n"))?;
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

/// Raw fio io_uring on the backing file, 4k random read QD32: one round of the engine step.
/// fio runs in both [`raw_fio_patterns`]; the round's raw figure is the better of
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
    let job = pinned(job, ctx.engine_cpu.0);
    let mut best: Option<Sample> = None;
    for (variant, job) in raw_fio_patterns(job) {
        let rel = raw_rel.replace(".json", &format!("-{variant}.json"));
        let window = steady_window(ctx, None, ramp);
        let mut sample = run_fio(ctx, &job, &rel, 0)?;
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

/// The engine target in one repeat: its rounds, with raw fio's when raw is in the run. A
/// failed step fails this repeat of the engine (and of raw's paired point), not the run.
pub fn run(ctx: &Ctx, plan: &Plan, m: &mut Measured, ti: usize, rep: usize) -> Result<()> {
    let spec = &plan.targets[ti].0;
    let engine_key = format!("{ENGINE_WORKLOAD}|fio|x1");
    let raw = if plan.paired {
        let raw_spec = plan
            .targets
            .iter()
            .map(|(s, _)| s)
            .find(|s| matches!(s.kind, Kind::Raw))
            .expect("paired");
        Some(targets::start(raw_spec, &ctx.env, Duration::from_secs(1))?)
    } else {
        None
    };
    match engine_step(ctx, raw.as_ref(), rep, plan.settings.engine_rounds) {
        Ok((raw_samples, engine_samples)) => {
            let mut push = |target: &str, key: &str, v: Vec<Sample>| {
                if let Some(p) = m
                    .points
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
            for p in m.points.iter_mut().filter(|p| {
                p.target == spec.id
                    || (p.key == engine_key && raw.as_ref().is_some_and(|r| r.spec.id == p.target))
            }) {
                p.failures.push(format!("repeat {rep}: {e:#}"));
            }
        }
    }
    Ok(())
}
