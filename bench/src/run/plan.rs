//! Plan: the run's settings from the preset and the options, the targets and their points,
//! and the printed estimate (`--plan` stops here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use crate::host;
use crate::matrix::{Point, Preset};
use crate::targets::{self, Kind, TargetSpec};

use super::engine_step::ENGINE_WORKLOAD;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The quick preset (the default): headline points, short runtimes, one repeat; about
    /// two minutes on a 2-core machine (the replication step included).
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// The full preset: the main matrix on every target (numjobs 1, and one per core on the
    /// 4k QD32 and 1 MiB points), three repeats; about 17 minutes on a 2-core machine (the
    /// replication step included).
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
    /// nbdkit-file, nbd-server, ringblock-PROFILE for each --profiles entry, and
    /// `replication` (the replication step: no, sync and async replica side by side, resync).
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
    /// MiB written while the replica is suspended, for the resync (default: 256 quick, 1024
    /// full).
    #[arg(long)]
    pub repl_resync_mib: Option<u64>,
    /// Print the plan (targets, points, estimated time) and exit.
    #[arg(long)]
    pub plan: bool,
}

/// Settings in force, recorded in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub preset: Preset,
    pub repeat: usize,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub size_mib: u64,
    pub region_bytes: u64,
    pub profile_region_bytes: u64,
    pub verify_s: f64,
    pub idle_s: f64,
    pub engine_rounds: usize,
    pub rate_iops: u32,
    pub rb_cores: String,
    pub rb_poll_idle_us: Option<u64>,
    pub profiles: Vec<String>,
    pub ringblock: Option<PathBuf>,
    /// The replication step runs, and what its resync writes.
    pub replication: bool,
    pub repl_resync_mib: u64,
}

/// What a run will do, decided before anything starts.
pub struct Plan {
    pub preset: Preset,
    pub settings: Settings,
    /// Every target to run with its points (the engine's are run by the engine step).
    pub targets: Vec<(TargetSpec, Vec<Point>)>,
    /// raw and engine both run: raw's 4k random read QD32 is measured in the engine step,
    /// alternated with the engine, rather than on its own.
    pub paired: bool,
    /// With two targets or more at a fixed rate, those points run in a step of their own, the
    /// targets side by side.
    pub rate_side_by_side: bool,
    pub cpus: Vec<usize>,
    pub out_dir: PathBuf,
    pub runtime: Duration,
    pub ramp: Duration,
    pub verify: Duration,
    pub idle: Duration,
    pub started: SystemTime,
    pub t_start: Instant,
}

impl Plan {
    pub fn has(&self, kind: fn(&Kind) -> bool) -> bool {
        self.targets.iter().any(|(s, _)| kind(&s.kind))
    }

    /// Runs of the engine step per repeat (raw fio and the engine, when paired).
    fn engine_runs(&self) -> usize {
        self.settings.engine_rounds * if self.paired { 2 } else { 1 }
    }

    /// Print the targets, their points and the estimated time.
    pub fn print(&self) {
        let s = &self.settings;
        let n_points: usize = self
            .targets
            .iter()
            .map(|(t, p)| match t.kind {
                Kind::Engine => self.engine_runs(),
                _ => p.len(),
            })
            .sum();
        let mut est = estimate_s(
            n_points * s.repeat,
            self.targets.len() * s.repeat,
            self.runtime,
            self.ramp,
        );
        if self.has(|k| matches!(k, Kind::Engine)) {
            // The engine step's warm-up is at least 0.25 s, and its first repeat starts with
            // one unmeasured run of the engine and a round of raw fio (two runs).
            let warm_up_runs = if self.paired { 3 } else { 1 };
            est += (self.engine_runs() * s.repeat) as f64 * (0.25 - s.ramp_s).max(0.0)
                + warm_up_runs as f64 * (s.runtime_s + s.ramp_s.max(0.25));
        }
        if s.replication {
            // 3 set-ups x 2 points x 2 rounds per repeat, their starts and prefills, and two
            // resyncs per repeat (the write and the copy, ~0.5 s per 100 MiB each here).
            est += estimate_s(12 * s.repeat, 3 + s.repeat, self.runtime, self.ramp)
                + (s.repl_resync_mib as f64 / 100.0) * 2.0 * s.repeat as f64
                + 3.0 * (s.region_bytes >> 20) as f64 / 200.0;
        }
        eprintln!(
            "ringblock-bench run ({:?}): {} targets, {} points x {} repeat(s), {:.1} s \
             each: about {:.0} s",
            self.preset,
            self.targets.len(),
            n_points,
            s.repeat,
            s.runtime_s + s.ramp_s,
            est
        );
        for (t, pts) in &self.targets {
            if matches!(t.kind, Kind::Engine) {
                eprintln!(
                    "  {:<18} {:>2} runs    {} round(s) per repeat{}",
                    t.id,
                    self.engine_runs(),
                    s.engine_rounds,
                    if self.paired {
                        ", each raw fio then the engine (order alternating), back to back"
                    } else {
                        " (raw fio is not in this run: no ratio)"
                    }
                );
            } else {
                eprintln!("  {:<18} {:>2} points  {}", t.id, pts.len(), t.note);
            }
        }
        if s.replication {
            eprintln!(
                "  {:<18} {:>2} points  no, sync and async replica side by side (4k random write \
                 QD1, QD32; 2 rounds), and a resync of {} MiB with zero-copy sends on and off",
                REPLICATION, 12, s.repl_resync_mib
            );
        }
    }
}

fn preset_of(args: &RunArgs) -> Preset {
    if args.complete {
        Preset::Complete
    } else if args.full {
        Preset::Full
    } else {
        Preset::Quick
    }
}

/// The replication step's name in `--targets` and `--skip`.
pub const REPLICATION: &str = "replication";

/// The targets `--targets` and `--skip` choose, checked against the known ones, and whether
/// the replication step runs.
fn chosen_targets(
    args: &RunArgs,
    preset: Preset,
    profiles: &[String],
) -> Result<(Vec<TargetSpec>, bool)> {
    let all = targets::all_targets(profiles);
    let mut wanted: Vec<String> = if args.targets.is_empty() || args.targets == ["all"] {
        let mut v = targets::default_target_ids(preset == Preset::Complete);
        v.extend(profiles.iter().map(|p| format!("ringblock-{p}")));
        v.push(REPLICATION.into());
        v
    } else {
        args.targets.clone()
    };
    for t in &wanted {
        ensure!(
            t == REPLICATION || all.iter().any(|s| &s.id == t),
            "unknown target {t:?} (known: {})",
            all.iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    wanted.retain(|t| !args.skip.contains(t));
    let replication = wanted.iter().any(|t| t == REPLICATION);
    let specs: Vec<TargetSpec> = all.into_iter().filter(|s| wanted.contains(&s.id)).collect();
    ensure!(!specs.is_empty() || replication, "no target left to run");
    Ok((specs, replication))
}

/// The settings in force, from the preset and the options (the regions are set once the
/// backing file is prepared).
fn settings(args: &RunArgs, preset: Preset, profiles: Vec<String>) -> Result<Settings> {
    let d = preset.defaults();
    let repeat = args.repeat.unwrap_or(d.repeat);
    ensure!(repeat >= 1, "--repeat must be at least 1");
    let runtime_s = args.runtime_s.unwrap_or(d.runtime_s);
    ensure!(runtime_s >= 0.2, "--runtime-s must be at least 0.2");
    let size_mib = args.size_mib.unwrap_or(d.size_mib);
    ensure!(size_mib >= 96, "--size-mib must be at least 96");
    let engine_rounds = args.engine_rounds.unwrap_or(d.engine_rounds);
    ensure!(engine_rounds >= 1, "--engine-rounds must be at least 1");
    Ok(Settings {
        preset,
        repeat,
        runtime_s,
        ramp_s: args.ramp_s.unwrap_or(d.ramp_s).max(0.0),
        size_mib,
        region_bytes: size_mib << 20,
        profile_region_bytes: 0,
        verify_s: args.verify_s.unwrap_or(d.verify_s).max(0.1),
        idle_s: args.idle_s.unwrap_or(d.idle_s).max(0.5),
        engine_rounds,
        rate_iops: args.rate_iops.max(1),
        rb_cores: args.rb_cores.clone(),
        rb_poll_idle_us: args.rb_poll_idle_us,
        profiles,
        ringblock: find_ringblock(args.ringblock.as_deref())?,
        replication: false,
        repl_resync_mib: args.repl_resync_mib.unwrap_or(if preset == Preset::Quick {
            256
        } else {
            1024
        }),
    })
}

/// Decide what the run does.
pub fn plan(args: &RunArgs) -> Result<Plan> {
    let started = SystemTime::now();
    let t_start = Instant::now();
    let preset = preset_of(args);
    let cpus = host::available_cpus()?;
    let profiles: Vec<String> = args
        .profiles
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty() && p != "none")
        .collect();
    let (specs, replication) = chosen_targets(args, preset, &profiles)?;
    let mut settings = settings(args, preset, profiles)?;
    settings.replication = replication;
    let has = |k: fn(&Kind) -> bool| specs.iter().any(|s| k(&s.kind));
    let paired = has(|k| matches!(k, Kind::Raw)) && has(|k| matches!(k, Kind::Engine));
    let engine_key = format!("{ENGINE_WORKLOAD}|fio|x1");
    let (n_cpus, rate) = (cpus.len() as u32, settings.rate_iops);
    let targets: Vec<(TargetSpec, Vec<Point>)> = specs
        .into_iter()
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
            (s, pts)
        })
        .collect();
    let rate_side_by_side = targets
        .iter()
        .filter(|(_, pts)| pts.iter().any(|p| p.rate_iops.is_some()))
        .count()
        >= 2;
    Ok(Plan {
        preset,
        paired,
        rate_side_by_side,
        out_dir: args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("bench-results").join(host::utc_stamp(started))),
        runtime: Duration::from_secs_f64(settings.runtime_s),
        ramp: Duration::from_secs_f64(settings.ramp_s),
        verify: Duration::from_secs_f64(settings.verify_s),
        idle: Duration::from_secs_f64(settings.idle_s),
        settings,
        targets,
        cpus,
        started,
        t_start,
    })
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

/// Estimated seconds of a plan (for the printed plan; not a promise).
fn estimate_s(n_points: usize, n_starts: usize, runtime: Duration, ramp: Duration) -> f64 {
    n_points as f64 * ((runtime + ramp).as_secs_f64() + 0.2) + n_starts as f64 * 1.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_grow_with_points() {
        let r = Duration::from_secs(1);
        assert!(estimate_s(10, 2, r, Duration::ZERO) < estimate_s(20, 2, r, Duration::ZERO));
    }
}
