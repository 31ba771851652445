//! `ringblock-bench engine`: the engine's 4 KiB random read at QD32 on a file against raw fio
//! (io_uring, O_DIRECT) on the same region of the same file, in one run, repeated, as ratios.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::driver::Buffers;
use crate::engine_bench::{self, DriverKind, EngineRun, Placement, Prepared, Workload};
use crate::fio::{FioJob, JobReport};
use crate::report::{self, Row, Sample};
use crate::sys;

/// The ratio engine/raw the issue asks for.
pub const TARGET_RATIO: f64 = 0.95;

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Device file for the engine and for raw fio. Default: a temporary file under the
    /// current directory, removed at the end. An existing file is reused if it holds a
    /// ringblock label with a fully written `bench` volume, else it must be blank.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Size of the device file.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Measured seconds per run (after the ramp).
    #[arg(long, default_value_t = 10)]
    pub runtime_s: u64,
    /// Warm-up seconds per run, not measured.
    #[arg(long, default_value_t = 1)]
    pub ramp_s: u64,
    /// Rounds of (raw fio with its default and with batched submission, then each engine
    /// placement).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Reactor CPUs of one engine placement, e.g. `0` or `0,1` or `0-3`; repeat the option
    /// to compare placements. Default: one reactor (a driver thread on another CPU), and a
    /// reactor on every CPU (the engine's default).
    #[arg(long, action = clap::ArgAction::Append)]
    pub cores: Vec<String>,
    /// Drivers to run on each placement: `thread` (its own thread, submitting through the
    /// reactors' inboxes) and/or `task` (hosted on reactor 0, as transports are).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "thread,task")]
    pub driver: Vec<DriverKind>,
    /// Read buffers: plain owned memory, or leases from the reactor's registered pool.
    #[arg(long, value_enum, default_value = "owned")]
    pub buffers: Buffers,
    #[arg(long, default_value_t = 32)]
    pub iodepth: usize,
    #[arg(long, default_value_t = 4096)]
    pub bs: usize,
    /// Microseconds a driver thread spins on its completion port before parking.
    #[arg(long, default_value_t = 50)]
    pub spin_us: u64,
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Reactors' busy-poll window before parking (engine setting `poll_idle_us`). Default:
    /// the engine's (the device profile's).
    #[arg(long)]
    pub poll_idle_us: Option<u64>,
    /// Results directory. Default: bench-results/<UTC timestamp>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep a temporary device file (its path is printed).
    #[arg(long)]
    pub keep_file: bool,
    /// Run only the engine (no ratio): for profiling the engine's path.
    #[arg(long)]
    pub skip_raw: bool,
}

/// Placements from the `--cores` groups and `--driver` kinds (default groups:
/// [`Placement::defaults`] around `home`).
fn placements(
    groups: &[Vec<usize>],
    drivers: &[DriverKind],
    cpus: &[usize],
    home: usize,
) -> Result<Vec<Placement>> {
    ensure!(!drivers.is_empty(), "--driver needs at least one kind");
    if groups.is_empty() {
        return Ok(Placement::defaults(drivers, cpus, home));
    }
    for g in groups {
        ensure!(!g.is_empty(), "--cores needs at least one CPU");
        for c in g {
            ensure!(cpus.contains(c), "cpu {c} is not available (have {cpus:?})");
        }
    }
    Ok(drivers
        .iter()
        .flat_map(|&d| groups.iter().map(move |g| Placement::on(d, g, cpus)))
        .collect())
}

/// Parse one `--cores` group: `a,b,c`, ranges `a-b`, or both.
pub fn parse_core_group(s: &str) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
            ensure!(a <= b, "bad range {part}");
            v.extend(a..=b);
        } else {
            v.push(part.parse().with_context(|| format!("bad cpu {part:?}"))?);
        }
    }
    Ok(v)
}

#[derive(Serialize)]
struct Host {
    cpus: Vec<usize>,
    /// Where raw fio (and the one-reactor placements) ran, and why there.
    comparison_cpu: usize,
    comparison_cpu_why: String,
    kernel: String,
    fio_version: String,
}

/// One raw fio run and what the machine did meanwhile.
#[derive(Serialize)]
struct FioRun {
    job: JobReport,
    host: sys::HostDelta,
}

#[derive(Serialize)]
struct PlacementRuns {
    placement: Placement,
    runs: Vec<EngineRun>,
}

#[derive(Serialize)]
struct EngineReport {
    bench: &'static str,
    started_utc: String,
    host: Host,
    workload: Workload,
    prepared: Prepared,
    fio_command: String,
    fio_batched_command: String,
    raw_fio: Vec<FioRun>,
    raw_fio_batched: Vec<FioRun>,
    engine: Vec<PlacementRuns>,
    summary: Vec<Row>,
    target_ratio: f64,
    /// Whether some placement's paired-ratio median reached the target.
    meets_target: bool,
    markdown: String,
}

fn raw_sample(r: &FioRun) -> Result<Sample> {
    let j = &r.job;
    let lat = j
        .read
        .lat
        .or(j.read.clat)
        .context("fio reported no read latency percentiles")?;
    Ok(Sample {
        iops: j.read.iops,
        lat,
        cpu_us_per_io: j.cpu_us_per_io(),
        steal_pct: r.host.steal_pct,
        device_us_per_read: r.host.device_us_per_read,
    })
}

fn engine_sample(r: &EngineRun) -> Sample {
    Sample {
        iops: r.iops,
        lat: r.lat,
        cpu_us_per_io: Some(r.cpu_us_per_io),
        steal_pct: r.host.steal_pct,
        device_us_per_read: r.host.device_us_per_read,
    }
}

/// Run the comparison.
pub fn run(args: &EngineArgs) -> Result<()> {
    ensure!(args.repeat >= 1, "--repeat must be at least 1");
    ensure!(args.runtime_s >= 1, "--runtime-s must be at least 1");
    ensure!(
        args.bs >= 512 && args.bs.is_multiple_of(512),
        "--bs must be a multiple of 512"
    );
    ensure!(
        (1..=1024).contains(&args.iodepth),
        "--iodepth must be 1..=1024"
    );
    let core_groups = args
        .cores
        .iter()
        .map(|g| parse_core_group(g))
        .collect::<Result<Vec<_>>>()?;
    let started = SystemTime::now();
    let cpus = sys::available_cpus()?;
    // Checked before the (slow) preparation; the default placements need its device.
    placements(
        &core_groups,
        &args.driver,
        &cpus,
        cpus.first().copied().unwrap_or(0),
    )?;
    let fio_version = crate::fio::version()?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(sys::utc_stamp(started)));

    // The device file: given, or a temporary one on the current directory's file system
    // (not /tmp, which may be tmpfs without O_DIRECT).
    let temp_dir = match &args.file {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix(".ringblock-bench-")
                .tempdir_in(std::env::current_dir()?)
                .context("creating a temporary directory under the current directory")?,
        ),
    };
    let path = match (&args.file, &temp_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(t)) => t.path().join("device.img"),
        (None, None) => unreachable!("a temporary directory exists without --file"),
    };
    let size_bytes = args.size_mib << 20;
    eprintln!(
        "preparing {} ({} MiB): format, one volume over every chunk, fill ...",
        path.display(),
        args.size_mib
    );
    let prep = engine_bench::prepare(&path, size_bytes)?;
    eprintln!(
        "prepared: data region {} MiB at offset {} ({})",
        prep.region_bytes >> 20,
        prep.data_offset_bytes,
        if prep.filled {
            format!(
                "filled in {:.1} s, {:.0} MiB/s",
                prep.fill_secs, prep.fill_mib_per_s
            )
        } else {
            "already written, reused".to_string()
        }
    );

    let (cpu, cpu_why) = engine_bench::comparison_cpu(&prep.device_path, &cpus);
    let placements = placements(&core_groups, &args.driver, &cpus, cpu)?;
    eprintln!("raw fio runs on {cpu_why}");
    let fio_job = FioJob::new("raw-randread")
        .filename(&prep.device_path)
        .ioengine("io_uring")
        .rw("randread")
        .bs_bytes(args.bs as u64)
        .iodepth(args.iodepth as u32)
        .numjobs(1)
        .runtime_s(Some(args.runtime_s))
        .ramp_s(Some(args.ramp_s))
        .offset_bytes(prep.data_offset_bytes)
        .size_bytes(prep.region_bytes)
        .direct(true)
        // Uniform random with replacement, like the engine drivers.
        .extra("--norandommap");
    let fio_patterns = engine_bench::raw_fio_patterns(engine_bench::pinned(fio_job, cpu));
    let workload = Workload {
        block_bytes: args.bs,
        iodepth: args.iodepth,
        runtime: Duration::from_secs(args.runtime_s),
        ramp: Duration::from_secs(args.ramp_s),
        spin: Duration::from_micros(args.spin_us),
        seed: args.seed,
        poll_idle_us: args.poll_idle_us,
        buffers: args.buffers,
    };

    let mut raw_runs = Vec::new();
    let mut raw_batched_runs = Vec::new();
    let mut engine_runs: Vec<PlacementRuns> = placements
        .iter()
        .map(|p| PlacementRuns {
            placement: p.clone(),
            runs: Vec::new(),
        })
        .collect();
    for round in 1..=args.repeat {
        if !args.skip_raw {
            for ((variant, job), runs) in fio_patterns
                .iter()
                .zip([&mut raw_runs, &mut raw_batched_runs])
            {
                eprintln!("round {round}/{}: raw fio ({variant}) ...", args.repeat);
                let before = sys::host_snapshot(&prep.device_path);
                let report = job.run()?;
                let host = sys::host_snapshot(&prep.device_path).since(&before);
                let job = report.job()?.clone();
                ensure!(job.error == 0, "fio reported error {}", job.error);
                eprintln!("  raw fio ({variant}): {:.0} IOPS", job.read.iops);
                runs.push(FioRun { job, host });
            }
        }
        for pr in &mut engine_runs {
            eprintln!("round {round}/{}: {} ...", args.repeat, pr.placement.label);
            let w = Workload {
                seed: workload.seed.wrapping_add(round as u64),
                ..workload.clone()
            };
            let r = engine_bench::run(&prep, &pr.placement, &w)?;
            eprintln!(
                "  engine: {:.0} IOPS, p50 {:.0} µs",
                r.iops,
                r.lat.p50_ns as f64 / 1e3
            );
            pr.runs.push(r);
        }
    }

    let raw_samples = raw_runs
        .iter()
        .map(raw_sample)
        .collect::<Result<Vec<_>>>()?;
    let batched_samples = raw_batched_runs
        .iter()
        .map(raw_sample)
        .collect::<Result<Vec<_>>>()?;
    // The engine is judged against the raw device's limit: per round, the better fio pattern.
    let best_samples: Vec<Sample> = raw_samples
        .iter()
        .zip(&batched_samples)
        .map(|(a, b)| if b.iops > a.iops { *b } else { *a })
        .collect();
    let mut rows: Vec<Row> = [
        (
            "raw fio io_uring O_DIRECT (default submission)",
            &raw_samples,
        ),
        ("raw fio io_uring O_DIRECT (batched 8/8)", &batched_samples),
        ("raw fio: the better of the two, per round", &best_samples),
    ]
    .into_iter()
    .filter_map(|(label, samples)| Row::new(label, samples, None))
    .collect();
    let baseline = (!best_samples.is_empty()).then_some(best_samples.as_slice());
    for pr in &engine_runs {
        let s: Vec<Sample> = pr.runs.iter().map(engine_sample).collect();
        rows.push(Row::new(&pr.placement.label, &s, baseline).context("no engine runs")?);
    }
    let meets_target = rows
        .iter()
        .filter_map(|r| r.paired_ratio)
        .any(|p| p.median >= TARGET_RATIO);
    let mut md = format!(
        "### engine vs raw fio: {} B random read, QD{}, {} s x {} rounds, {} buffers ({}, {})\n\n",
        args.bs,
        args.iodepth,
        args.runtime_s,
        args.repeat,
        match args.buffers {
            Buffers::Owned => "owned",
            Buffers::Registered => "registered",
        },
        fio_version,
        sys::kernel_release()
    );
    md.push_str(&format!(
        "Raw fio runs on {cpu_why}; so does the engine's reactor where one placement puts it \
         there.\n\n"
    ));
    md.push_str(&report::markdown_table(&rows));
    md.push_str(&format!(
        "\nLatency: submit to completion (fio `lat`, engine driver clock). CPU: the whole \
         process. steal: CPU time the hypervisor took (whole machine). dev µs/rd: mean time a \
         read spent in the block layer and device (/proc/diskstats).\n\
         Target engine/raw >= {TARGET_RATIO}: {}\n",
        match (args.skip_raw, meets_target) {
            (true, _) => "not measured (--skip-raw)",
            (false, true) => "met",
            (false, false) => "NOT met",
        }
    ));
    println!("{md}");

    let rep = EngineReport {
        bench: "engine-randread",
        started_utc: sys::utc_stamp(started),
        host: Host {
            cpus,
            comparison_cpu: cpu,
            comparison_cpu_why: cpu_why,
            kernel: sys::kernel_release(),
            fio_version,
        },
        workload,
        prepared: prep,
        fio_command: fio_patterns[0].1.command_line(),
        fio_batched_command: fio_patterns[1].1.command_line(),
        raw_fio: raw_runs,
        raw_fio_batched: raw_batched_runs,
        engine: engine_runs,
        summary: rows,
        target_ratio: TARGET_RATIO,
        meets_target,
        markdown: md.clone(),
    };
    let json = report::write_json(&out_dir, "engine.json", &rep)?;
    std::fs::write(out_dir.join("engine.md"), &md)
        .with_context(|| format!("writing {}", out_dir.join("engine.md").display()))?;
    eprintln!("wrote {} and engine.md", json.display());
    if let Some(t) = temp_dir {
        if args.keep_file {
            let dir = t.keep();
            eprintln!("kept device file {}", dir.join("device.img").display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_groups_parse_lists_and_ranges() {
        assert_eq!(parse_core_group("0").unwrap(), vec![0]);
        assert_eq!(parse_core_group("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_core_group("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_core_group("x").is_err());
        assert!(parse_core_group("3-1").is_err());
    }

    #[test]
    fn placements_check_cpus() {
        let cpus = [0, 1];
        let both = [DriverKind::Thread, DriverKind::Task];
        // On two CPUs the engine's default placement is the one on `home`.
        assert_eq!(placements(&[], &both, &cpus, 1).unwrap().len(), 2);
        let p = placements(&[vec![1]], &[DriverKind::Thread], &cpus, 0).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].driver_core, Some(0));
        assert_eq!(
            placements(&[vec![0], vec![0, 1]], &both, &cpus, 0)
                .unwrap()
                .len(),
            4
        );
        assert!(placements(&[vec![7]], &both, &cpus, 0).is_err());
        assert!(placements(&[vec![]], &both, &cpus, 0).is_err());
        assert!(placements(&[], &[], &cpus, 0).is_err());
    }
}
