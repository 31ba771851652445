//! The `replication` step of `run`: a primary without a replica, with a sync replica and with
//! an async replica, started side by side on loopback and prefilled; per repeat fio's nbd
//! engine runs 4k random writes at QD1 and QD32 on each in turn, twice (in one order, then the
//! reverse, as the fixed-rate step does), so ratios pair the same repeat and round. Then two
//! resyncs per repeat, each on a fresh primary and sync replica: the replica suspended,
//! `resync_bytes` written, resumed, and the primary's `last_resync` read until it ends; once
//! with zero-copy sends on (the default) and once with `zero_copy_sends = false`, with the
//! primary's send counters over each.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::fio::FioJob;
use crate::interrupt;
use crate::matrix::{self, Client, Point};
use crate::procs::CpuWindow;
use crate::results::{Goal, HeadlineRow, Metric, PointResult, Ratio, Sample};
use crate::run::steps::{fio_sample, record, record_window};

use super::cluster::{Replica, SendTotals, Setup, SetupSpec};
use super::{ReplicationResult, ResyncResult, SendsResult, SetupResult};

/// What the step needs from the run.
pub struct ReplSettings<'a> {
    pub ringblock: &'a Path,
    pub run_dir: &'a Path,
    pub out_dir: &'a Path,
    pub runtime: Duration,
    pub ramp: Duration,
    pub repeat: usize,
    /// Bytes the points touch (and the prefill writes).
    pub region_bytes: u64,
    /// Bytes written while the replica is suspended.
    pub resync_bytes: u64,
    pub primary_cores: String,
    pub replica_cores: String,
}

/// The points: 4k random write at QD1 and QD32, fio's nbd engine.
pub fn points() -> [Point; 2] {
    ["randwrite-4k-qd1", "randwrite-4k-qd32"].map(|id| Point {
        workload: matrix::workload(id).expect("known workload"),
        client: Client::Fio,
        jobs: 1,
        rate_iops: None,
    })
}

const SETUPS: [Replica; 3] = [Replica::None, Replica::Sync, Replica::Async];
/// Bound on a start (the replica's first sync included) and on a resync.
const START_LIMIT: Duration = Duration::from_secs(120);
const RESYNC_LIMIT: Duration = Duration::from_secs(600);

/// A set-up of the points (`zero_copy_sends` the daemon's default, the volume the region).
fn spec(s: &ReplSettings, replica: Replica) -> SetupSpec {
    SetupSpec {
        id: format!("repl-{}", replica.name()),
        replica,
        volume_bytes: s.region_bytes,
        zero_copy_sends: None,
        replica_profile: None,
        primary_cores: s.primary_cores.clone(),
        replica_cores: s.replica_cores.clone(),
    }
}

/// A fresh sync set-up for one resync: zero-copy sends on (`None`, the default) or off.
fn resync_spec(s: &ReplSettings, zero_copy_sends: Option<bool>) -> SetupSpec {
    SetupSpec {
        id: match zero_copy_sends {
            Some(false) => "repl-resync-zc-off".into(),
            _ => "repl-resync-zc-on".into(),
        },
        volume_bytes: s.resync_bytes,
        zero_copy_sends,
        ..spec(s, Replica::Sync)
    }
}

/// The whole step. An error (Ctrl-C too) ends it; what was measured is returned with it.
pub fn run(s: &ReplSettings) -> (ReplicationResult, Result<()>) {
    let mut res = ReplicationResult {
        setups: Vec::new(),
        goals: Vec::new(),
        resyncs: Vec::new(),
        sends: Vec::new(),
        failures: Vec::new(),
    };
    let outcome = measure(s, &mut res);
    res.goals = goals(&res);
    (res, outcome)
}

fn measure(s: &ReplSettings, res: &mut ReplicationResult) -> Result<()> {
    let mut setups: Vec<Setup> = Vec::new();
    for r in SETUPS {
        interrupt::check()?;
        eprintln!(
            "[replication] starting the primary with replica: {} ...",
            r.name()
        );
        let setup = Setup::start(s.ringblock, s.run_dir, spec(s, r), START_LIMIT)
            .and_then(|st| prefill(s, &st).map(|()| st));
        match setup {
            Ok(st) => {
                res.setups.push(setup_result(&st));
                setups.push(st);
            }
            Err(e) => {
                interrupt::check()?;
                res.failures
                    .push(format!("replica {}: start or prefill: {e:#}", r.name()));
            }
        }
    }
    let outcome = repeats(s, &mut setups, res);
    for st in setups {
        st.stop();
    }
    outcome
}

fn repeats(s: &ReplSettings, setups: &mut [Setup], res: &mut ReplicationResult) -> Result<()> {
    for rep in 1..=s.repeat {
        for p in &points() {
            for round in 1..=2 {
                let mut order: Vec<usize> = (0..setups.len()).collect();
                if (round == 2) != rep.is_multiple_of(2) {
                    order.reverse();
                }
                for i in order {
                    interrupt::check()?;
                    measure_point(s, &mut setups[i], res, p, rep, round)?;
                }
            }
        }
        // Each resync on a fresh set-up, so both copy exactly what was written while
        // suspended (a set-up that served the points would also resync every region written
        // since its last flush); the order alternates per repeat.
        let mut modes = [None, Some(false)];
        if rep.is_multiple_of(2) {
            modes.reverse();
        }
        for zc in modes {
            interrupt::check()?;
            let on = zc != Some(false);
            eprintln!(
                "[replication] resync, zero-copy sends {} (repeat {rep}) ...",
                if on { "on" } else { "off" }
            );
            let r = Setup::start(s.ringblock, s.run_dir, resync_spec(s, zc), START_LIMIT).and_then(
                |st| {
                    let r = resync(s, &st, rep);
                    st.stop();
                    r
                },
            );
            match r {
                Ok(r) => res.resyncs.push(r),
                Err(e) => {
                    interrupt::check()?;
                    res.failures.push(format!(
                        "repeat {rep}: resync with zero-copy sends {}: {e:#}",
                        if on { "on" } else { "off" }
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What the primary says of its replica's mode, and what its log says of it.
fn setup_result(st: &Setup) -> SetupResult {
    let reported_mode = st
        .replica
        .as_ref()
        .and_then(|_| st.peer().ok())
        .map(|p| p.mode);
    let log = std::fs::read_to_string(st.primary.dir.join("daemon.log")).unwrap_or_default();
    let mode_note = log
        .lines()
        .find(|l| l.contains("asynchronous") || l.contains("async"))
        .map(|l| strip_ansi(l).trim().chars().take(240).collect());
    SetupResult {
        id: st.spec.replica.name().into(),
        reported_mode,
        mode_note,
        primary_command: st.primary.command.clone(),
        points: points()
            .iter()
            .map(|p| PointResult {
                target: format!("repl-{}", st.spec.replica.name()),
                key: p.key(),
                workload: p.workload.id.into(),
                client: p.client.name().into(),
                jobs: 1,
                rate_iops: None,
                samples: Vec::new(),
                failures: Vec::new(),
                summary: None,
            })
            .collect(),
    }
}

/// `text` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Write the points' region once with 1 MiB sequential writes (allocates the volume's chunks
/// on both copies, so every set-up's points overwrite).
fn prefill(s: &ReplSettings, st: &Setup) -> Result<()> {
    let job = FioJob::new(format!("{}-prefill", st.spec.id))
        .ioengine("nbd")
        .rw("write")
        .bs_bytes(1 << 20)
        .iodepth(8)
        .runtime(None)
        .size_bytes(s.region_bytes)
        .direct(false)
        .extra(format!("--uri={}", st.fio_uri()));
    let rel = format!("raw/{}/prefill.json", st.spec.id);
    fio_to(s, &job, &rel, 0).map(drop)
}

fn fio_to(s: &ReplSettings, job: &FioJob, rel: &str, repeat: usize) -> Result<Sample> {
    let (text, report) = job.run_raw()?;
    let path = s.out_dir.join(rel);
    std::fs::create_dir_all(path.parent().context("a raw file's folder")?)?;
    std::fs::write(&path, &text)?;
    let j = report.job()?;
    ensure!(j.error == 0, "fio reported error {}", j.error);
    Ok(Sample {
        raw: Some(rel.to_string()),
        ..fio_sample(j, repeat)
    })
}

fn measure_point(
    s: &ReplSettings,
    st: &mut Setup,
    res: &mut ReplicationResult,
    p: &Point,
    rep: usize,
    round: usize,
) -> Result<()> {
    let id = st.spec.replica.name();
    let Some(sr) = res.setups.iter_mut().find(|x| x.id == id) else {
        return Ok(());
    };
    if let Some(why) = st.died() {
        if let Some(pr) = sr.points.iter_mut().find(|x| x.key == p.key()) {
            pr.failures.push(format!("repeat {rep}: {why}"));
        }
        return Ok(());
    }
    let w = p.workload;
    let job = FioJob::new(format!("repl-{id}-{}", w.id))
        .ioengine("nbd")
        .rw(w.pattern.fio_rw())
        .bs_bytes(w.block_bytes)
        .iodepth(w.qd)
        .runtime(Some(s.runtime))
        .ramp(Some(s.ramp))
        .size_bytes(s.region_bytes)
        .direct(false)
        .extra(format!("--uri={}", st.fio_uri()))
        .extra("--norandommap")
        .extra(format!("--randseed={}", 0x5eed + rep));
    let rel = format!("raw/repl-{id}/{}-r{rep}-round{round}.json", w.id);
    let counted = rep == 1 && round == 1 && w.qd > 1 && st.replica.is_some();
    let before = counted.then(|| st.primary.metrics().map(|m| SendTotals::parse(&m)));
    eprintln!("  replica {id} (round {round}/2):");
    let window = steady_window_of(s, st.primary.server.pid);
    let sample = fio_to(s, &job, &rel, rep).map(|mut x| {
        x.round = Some(round);
        record_window(&mut x, window.finish());
        x
    });
    if let Some(Ok(before)) = before {
        if let Ok(after) = st.primary.metrics() {
            res.sends.push(SendsResult {
                setup: id.into(),
                what: format!("{} (fio, {:.1} s)", w.label, s.runtime.as_secs_f64()),
                sends: SendTotals::parse(&after).since(&before),
            });
        }
    }
    let sr = res.setups.iter_mut().find(|x| x.id == id).expect("found");
    record(&mut sr.points, &format!("repl-{id}"), p, rep, sample);
    Ok(())
}

/// The primary's CPU over the steady middle of a point (as the other steps measure it).
fn steady_window_of(s: &ReplSettings, pid: i32) -> CpuWindow {
    let (t0, edge) = (Instant::now(), Duration::from_millis(250));
    CpuWindow::start(
        Some(pid),
        t0 + s.ramp.max(edge),
        t0 + s.ramp + s.runtime.saturating_sub(edge),
    )
}

/// Suspend the replica, write `resync_bytes` (1 MiB sequential, QD8), resume, and wait for the
/// resync that the resume starts to end.
fn resync(s: &ReplSettings, st: &Setup, rep: usize) -> Result<ResyncResult> {
    st.suspend()?;
    st.wait_peer("suspended", Instant::now() + START_LIMIT)?;
    let job = FioJob::new(format!("{}-resync-write", st.spec.id))
        .ioengine("nbd")
        .rw("write")
        .bs_bytes(1 << 20)
        .iodepth(8)
        .runtime(None)
        .size_bytes(s.resync_bytes)
        .direct(false)
        .extra(format!("--uri={}", st.fio_uri()));
    fio_to(
        s,
        &job,
        &format!("raw/{}/resync-write-r{rep}.json", st.spec.id),
        rep,
    )?;
    let before = SendTotals::parse(&st.primary.metrics()?);
    let resumed_ms = ringblock_engine::replication::status::unix_ms();
    st.resume()?;
    let until = Instant::now() + RESYNC_LIMIT;
    let last = loop {
        interrupt::check()?;
        let p = st.peer()?;
        if let Some(r) = p
            .last_resync
            .filter(|r| r.started_unix_ms + 1000 >= resumed_ms)
        {
            if r.finished_unix_ms.is_some() && p.state == "up-to-date" {
                break r;
            }
        }
        ensure!(
            Instant::now() < until,
            "the resync did not end within {RESYNC_LIMIT:?} (state {})",
            p.state
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let sends = SendTotals::parse(&st.primary.metrics()?).since(&before);
    let ms = last
        .finished_unix_ms
        .unwrap_or(last.started_unix_ms)
        .saturating_sub(last.started_unix_ms)
        .max(1);
    let seconds = ms as f64 / 1000.0;
    let r = ResyncResult {
        repeat: rep,
        zero_copy_sends: st.spec.zero_copy_sends != Some(false),
        written_bytes: s.resync_bytes,
        total_bytes: last.total_bytes,
        done_bytes: last.done_bytes,
        seconds,
        mib_s: last.done_bytes as f64 / (1 << 20) as f64 / seconds,
        reported_mib_s: last.rate_bytes_per_s / (1 << 20) as f64,
        sends,
    };
    eprintln!(
        "  resync of {} MiB in {:.2} s: {:.0} MiB/s (zero-copy sends {}, {} of them copied by the kernel)",
        r.done_bytes >> 20,
        r.seconds,
        r.mib_s,
        r.sends.zero_copy,
        r.sends.kernel_copied
    );
    Ok(r)
}

/// The ratios against the set-up without a replica, and their goals.
fn goals(res: &ReplicationResult) -> Vec<HeadlineRow> {
    let pts = points();
    let (qd1, qd32) = (pts[0].key(), pts[1].key());
    let samples = |setup: &str, key: &str| -> Option<&[Sample]> {
        res.setups
            .iter()
            .find(|s| s.id == setup)?
            .points
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.samples.as_slice())
            .filter(|v| !v.is_empty())
    };
    let rows: [(&str, &str, &str, Metric, Goal); 5] = [
        (
            "repl-sync-qd1-p50",
            "sync",
            &qd1,
            Metric::P50Us,
            Goal::AtMost(1.3),
        ),
        (
            "repl-sync-qd32-iops",
            "sync",
            &qd32,
            Metric::Iops,
            Goal::AtLeast(0.7),
        ),
        (
            "repl-async-qd1-iops",
            "async",
            &qd1,
            Metric::Iops,
            Goal::AtLeast(0.95),
        ),
        (
            "repl-async-qd32-iops",
            "async",
            &qd32,
            Metric::Iops,
            Goal::AtLeast(0.95),
        ),
        ("repl-sync-qd1-p99", "sync", &qd1, Metric::P99Us, Goal::None),
    ];
    rows.into_iter()
        .map(|(id, setup, key, metric, goal)| {
            let ratio = samples(setup, key)
                .zip(samples("none", key))
                .map(|(n, d)| Ratio::between(n, d, metric));
            let status = match ratio.as_ref().and_then(Ratio::value) {
                None => "not measured".to_string(),
                Some(x) => match goal.met(x) {
                    Some(true) => "pass".into(),
                    Some(false) => "miss".into(),
                    None => "—".into(),
                },
            };
            let what = format!(
                "{} replica ÷ none, {} {}",
                setup,
                if key == qd1 {
                    "4k random write QD1"
                } else {
                    "4k random write QD32"
                },
                metric.unit()
            );
            HeadlineRow {
                id: id.into(),
                what,
                metric,
                num_target: format!("repl-{setup}"),
                den_target: "repl-none".into(),
                ratio,
                goal,
                aim: None,
                status,
            }
        })
        .collect()
}
