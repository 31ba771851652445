//! What a `run` measured, summarised: samples per point and repeat, their medians and spreads,
//! ratios between targets (paired by repeat), and the headline checks. Serialised as the
//! run's `summary.json`; the Markdown report and the plots are made from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use serde::{Deserialize, Serialize};

use crate::fio::Percentiles;
use crate::stats::{paired_ratios, ratio, Spread};

/// Schema name of `summary.json` (`--compare` checks it).
pub const SCHEMA: &str = "ringblock-bench-run/1";

/// One measurement of one point in one repeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub repeat: usize,
    pub iops: f64,
    pub mib_s: f64,
    /// Submit-to-completion latency (fio `lat`; for mixed workloads the read side).
    pub lat: Option<Percentiles>,
    /// The server's CPU use during the steady middle of the run, in cores.
    pub server_cpu_cores: Option<f64>,
    /// Server CPU per IO in µs (= CPU seconds per million IOs).
    pub server_cpu_us_per_io: Option<f64>,
    /// The client's own CPU per IO in µs (fio's usr+sys; the lean client's thread).
    pub client_cpu_us_per_io: Option<f64>,
    pub errors: u64,
    /// The raw output of this run, relative to the results folder.
    pub raw: Option<String>,
    /// CPU of every other user-space process on the machine (not the bench, not what it
    /// started) over the steady middle of the run, in cores: over ~0.25 the point was disturbed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub others_cpu_cores: Option<f64>,
    /// The busiest of those other processes, e.g. `rustc 0.92` (cores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others_top: Vec<String>,
    /// Percent of the machine's CPU time the hypervisor took meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_pct: Option<f64>,
    /// The round within the repeat, for points measured in rounds (the engine step alternates
    /// raw fio and the engine, back to back, several times per repeat). Ratios pair samples of
    /// the same repeat and round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<usize>,
}

/// Medians and spreads of a point over the repeats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub iops: Spread,
    pub mib_s: Spread,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub p99_9_us: Option<Spread>,
    pub p99_99_us: Option<Spread>,
    pub server_cpu_us_per_io: Option<Spread>,
    pub server_cpu_cores: Option<Spread>,
    pub client_cpu_us_per_io: Option<Spread>,
}

impl Summary {
    pub fn of(samples: &[Sample]) -> Option<Summary> {
        let col = |f: &dyn Fn(&Sample) -> Option<f64>| {
            Spread::of(&samples.iter().filter_map(f).collect::<Vec<f64>>())
        };
        let lat = |f: fn(&Percentiles) -> u64| {
            col(&move |s: &Sample| s.lat.as_ref().map(|l| f(l) as f64 / 1000.0))
        };
        Some(Summary {
            iops: col(&|s| Some(s.iops))?,
            mib_s: col(&|s| Some(s.mib_s))?,
            p50_us: lat(|l| l.p50_ns),
            p99_us: lat(|l| l.p99_ns),
            p99_9_us: lat(|l| l.p99_9_ns),
            p99_99_us: lat(|l| l.p99_99_ns),
            server_cpu_us_per_io: col(&|s| s.server_cpu_us_per_io),
            server_cpu_cores: col(&|s| s.server_cpu_cores),
            client_cpu_us_per_io: col(&|s| s.client_cpu_us_per_io),
        })
    }
}

/// Every repeat of one point on one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointResult {
    pub target: String,
    /// `workload|client|xJOBS[|rate=N]` (see [`crate::matrix::Point::key`]).
    pub key: String,
    pub workload: String,
    pub client: String,
    pub jobs: u32,
    pub rate_iops: Option<u32>,
    pub samples: Vec<Sample>,
    /// Repeats that failed, with the reason.
    pub failures: Vec<String>,
    pub summary: Option<Summary>,
}

impl PointResult {
    pub fn summarise(&mut self) {
        self.summary = Summary::of(&self.samples);
    }
}

/// Which quantity a comparison divides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Iops,
    MibS,
    ServerCpuUsPerIo,
    /// Latency percentiles (submit to completion), µs.
    P50Us,
    P99Us,
}

impl Metric {
    pub fn of(self, s: &Sample) -> Option<f64> {
        match self {
            Metric::Iops => Some(s.iops),
            Metric::MibS => Some(s.mib_s),
            Metric::ServerCpuUsPerIo => s.server_cpu_us_per_io,
            Metric::P50Us => s.lat.map(|l| l.p50_ns as f64 / 1000.0),
            Metric::P99Us => s.lat.map(|l| l.p99_ns as f64 / 1000.0),
        }
    }
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::MibS => "MiB/s",
            Metric::ServerCpuUsPerIo => "server CPU µs/IO",
            Metric::P50Us => "p50 latency",
            Metric::P99Us => "p99 latency",
        }
    }
}

/// `num ÷ den` of one metric, paired by repeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub num_median: Option<f64>,
    pub den_median: Option<f64>,
    /// Paired per repeat: median, min, max.
    pub paired: Option<Spread>,
    /// median(num) / median(den).
    pub of_medians: Option<f64>,
}

impl Ratio {
    /// Pairs are samples of the same repeat and round: a point measured in rounds pairs only
    /// with another measured in the same rounds (else the ratio is of the medians).
    pub fn between(num: &[Sample], den: &[Sample], metric: Metric) -> Ratio {
        let by_repeat = |v: &[Sample]| -> BTreeMap<(usize, Option<usize>), f64> {
            v.iter()
                .filter_map(|s| metric.of(s).map(|x| ((s.repeat, s.round), x)))
                .collect()
        };
        let (n, d) = (by_repeat(num), by_repeat(den));
        let (mut pn, mut pd) = (Vec::new(), Vec::new());
        for (r, x) in &n {
            if let Some(y) = d.get(r) {
                pn.push(*x);
                pd.push(*y);
            }
        }
        let med = |m: &BTreeMap<(usize, Option<usize>), f64>| {
            Spread::of(&m.values().copied().collect::<Vec<_>>()).map(|s| s.median)
        };
        let (num_median, den_median) = (med(&n), med(&d));
        Ratio {
            num_median,
            den_median,
            paired: Spread::of(&paired_ratios(&pn, &pd)),
            of_medians: num_median.zip(den_median).and_then(|(a, b)| ratio(a, b)),
        }
    }

    /// The ratio to judge: the paired median, else the ratio of medians.
    pub fn value(&self) -> Option<f64> {
        self.paired.map(|p| p.median).or(self.of_medians)
    }
}

/// How a headline ratio is judged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op", content = "value")]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
    /// Shown, not judged.
    None,
}

impl Goal {
    pub fn met(self, x: f64) -> Option<bool> {
        match self {
            Goal::AtLeast(g) => Some(x >= g),
            Goal::AtMost(g) => Some(x <= g),
            Goal::None => None,
        }
    }
    pub fn text(self) -> String {
        match self {
            Goal::AtLeast(g) => format!("≥ {g}"),
            Goal::AtMost(g) => format!("≤ {g}"),
            Goal::None => "—".into(),
        }
    }
}

/// One line of the headline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadlineRow {
    /// Stable id (`--compare`).
    pub id: String,
    pub what: String,
    pub metric: Metric,
    pub num_target: String,
    pub den_target: String,
    pub ratio: Option<Ratio>,
    pub goal: Goal,
    /// Aim beyond the goal, shown.
    pub aim: Option<f64>,
    /// "met", "NOT met", "info", or why it was not measured.
    pub status: String,
}

/// A plain value in the headline (idle CPU).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdleResult {
    pub target: String,
    pub window_s: f64,
    /// Percent of one core, per repeat measured.
    pub cpu_pct: Spread,
}

/// The lean client's verify pass on one target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerifyResult {
    pub target: String,
    pub ok: bool,
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub verify_failures: u64,
    pub detail: String,
}

/// A target's fate in the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub id: String,
    pub label: String,
    pub note: String,
    /// "ran", "skipped", "failed" or "interrupted".
    pub status: String,
    pub reason: Option<String>,
    pub command: Option<String>,
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub schema: String,
    pub started_utc: String,
    pub elapsed_s: f64,
    pub command: String,
    pub preset: String,
    pub settings: serde_json::Value,
    pub host: serde_json::Value,
    pub targets: Vec<TargetStatus>,
    pub points: Vec<PointResult>,
    pub verify: Vec<VerifyResult>,
    pub idle: Vec<IdleResult>,
    pub headline: Vec<HeadlineRow>,
    /// Plots written, relative to the results folder.
    pub plots: Vec<String>,
    /// The replication step (absent from runs without it and from older summaries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::repl::ReplicationResult>,
}

impl RunSummary {
    pub fn point(&self, target: &str, key: &str) -> Option<&PointResult> {
        self.points
            .iter()
            .find(|p| p.target == target && p.key == key)
    }

    pub fn target(&self, id: &str) -> Option<&TargetStatus> {
        self.targets.iter().find(|t| t.id == id)
    }

    /// `num ÷ den` at `key` (same key on both), or `None` when either has no sample.
    pub fn ratio(&self, num: (&str, &str), den: (&str, &str), metric: Metric) -> Option<Ratio> {
        let a = self.point(num.0, num.1)?;
        let b = self.point(den.0, den.1)?;
        if a.samples.is_empty() || b.samples.is_empty() {
            return None;
        }
        Some(Ratio::between(&a.samples, &b.samples, metric))
    }

    /// Why `id` has nothing to compare, for a headline row.
    fn why_missing(&self, id: &str, key: &str) -> String {
        match self.target(id) {
            None => format!("{id} not in this run"),
            Some(t) if t.status != "ran" => format!(
                "{id} {}: {}",
                t.status,
                t.reason.clone().unwrap_or_default()
            ),
            Some(_) => match self.point(id, key) {
                None => format!("{id}: point {key} not in this preset"),
                Some(p) if !p.failures.is_empty() => {
                    format!("{id}: {}", p.failures.join("; "))
                }
                Some(_) => format!("{id}: no sample"),
            },
        }
    }
}

/// What one headline row compares: `num ÷ den`, each a (target, point key).
struct Comparison {
    kind: &'static str,
    what: String,
    metric: Metric,
    num: (&'static str, String),
    den: (&'static str, String),
    goal: Goal,
    aim: Option<f64>,
}

/// ringblock ÷ `peer`, both at point `key`.
fn vs_peer(
    kind: &'static str,
    what: String,
    metric: Metric,
    peer: &'static str,
    key: String,
    goal: Goal,
) -> Comparison {
    Comparison {
        kind,
        what,
        metric,
        num: ("ringblock", key.clone()),
        den: (peer, key),
        goal,
        aim: None,
    }
}

fn comparisons(rate_iops: u32) -> Vec<Comparison> {
    let rr = "randread-4k-qd32";
    let mut v = Vec::new();
    for (peer, name) in [("nbdkit-memory", "nbdkit memory"), ("qemu-nbd", "qemu-nbd")] {
        for c in [1, 2, 4] {
            let s = if c == 1 { "" } else { "s" };
            let what =
                format!("ringblock ÷ {name}: 4k random read QD32, lean client, {c} connection{s}");
            let key = format!("{rr}|lean|x{c}");
            v.push(Comparison {
                aim: Some(2.0),
                ..vs_peer("lean", what, Metric::Iops, peer, key, Goal::AtLeast(1.5))
            });
        }
        let what = format!("ringblock ÷ {name}: 4k random read QD32, fio nbd engine");
        v.push(vs_peer(
            "fio",
            what,
            Metric::Iops,
            peer,
            format!("{rr}|fio|x1"),
            Goal::AtLeast(1.0),
        ));
    }
    for (peer, name, goal) in [
        ("nbdkit-memory", "nbdkit memory", Goal::AtMost(0.5)),
        ("qemu-nbd", "qemu-nbd", Goal::None),
    ] {
        for client in ["fio", "lean"] {
            let what =
                format!("server CPU per IO at {rate_iops} IOPS, ringblock ÷ {name} ({client})");
            let key = format!("{rr}|{client}|x1|rate={rate_iops}");
            v.push(vs_peer(
                "cpu",
                what,
                Metric::ServerCpuUsPerIo,
                peer,
                key,
                goal,
            ));
        }
    }
    v.push(Comparison {
        kind: "engine",
        what:
            "ringblock engine (local, 1 reactor) ÷ raw fio io_uring (the better of fio's default \
               and batched submission), both pinned to the CPU of the device's interrupts: 4k \
               random read QD32, rounds alternated"
                .into(),
        metric: Metric::Iops,
        num: ("engine", format!("{rr}|engine|x1")),
        den: ("raw", format!("{rr}|fio|x1")),
        goal: Goal::AtLeast(0.95),
        aim: None,
    });
    let what = "ringblock ÷ nbdkit memory: 1 MiB sequential read QD8 (fio)".into();
    let key = "read-1m-qd8|fio|x1".to_string();
    v.push(vs_peer(
        "seq",
        what,
        Metric::MibS,
        "nbdkit-memory",
        key,
        Goal::AtLeast(1.0),
    ));
    v.push(Comparison {
        kind: "file",
        what: "ringblock over NBD on the file ÷ raw fio io_uring: 4k random read QD32 (fio)".into(),
        metric: Metric::Iops,
        num: ("ringblock-file", format!("{rr}|fio|x1")),
        den: ("raw", format!("{rr}|fio|x1")),
        goal: Goal::None,
        aim: None,
    });
    v
}

/// The headline rows of `s` (its points must be summarised).
pub fn headline(s: &RunSummary, rate_iops: u32) -> Vec<HeadlineRow> {
    comparisons(rate_iops)
        .into_iter()
        .map(|c| {
            let ((num_t, num_k), (den_t, den_k)) = (&c.num, &c.den);
            let ratio = s.ratio((num_t, num_k), (den_t, den_k), c.metric);
            let status = match ratio.as_ref().and_then(Ratio::value) {
                Some(x) => match c.goal.met(x) {
                    Some(true) => "met".to_string(),
                    Some(false) => "NOT met".to_string(),
                    None => "info".to_string(),
                },
                None => {
                    let mut why = Vec::new();
                    for (t, k) in [&c.num, &c.den] {
                        if s.point(t, k).is_none_or(|p| p.samples.is_empty()) {
                            why.push(s.why_missing(t, k));
                        }
                    }
                    if why.is_empty() {
                        why.push(format!("no {} to divide", c.metric.unit()));
                    }
                    format!("not measured ({})", why.join("; "))
                }
            };
            HeadlineRow {
                id: format!("{}:{num_t}/{den_t}:{num_k}", c.kind),
                num_target: num_t.to_string(),
                den_target: den_t.to_string(),
                what: c.what,
                metric: c.metric,
                ratio,
                goal: c.goal,
                aim: c.aim,
                status,
            }
        })
        .collect()
}

/// Write `value` as pretty JSON to `dir/name`, creating `dir`. Returns the file's path.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn sample(repeat: usize, iops: f64, cpu: Option<f64>) -> Sample {
        Sample {
            repeat,
            iops,
            mib_s: iops * 4096.0 / 1048576.0,
            lat: Some(Percentiles {
                p50_ns: 100_000,
                p99_ns: 300_000,
                p99_9_ns: 900_000,
                p99_99_ns: 2_000_000,
            }),
            server_cpu_cores: cpu.map(|c| c * iops / 1e6),
            server_cpu_us_per_io: cpu,
            client_cpu_us_per_io: Some(3.0),
            errors: 0,
            raw: None,
            others_cpu_cores: None,
            others_top: Vec::new(),
            steal_pct: None,
            round: None,
        }
    }

    pub fn point(target: &str, key: &str, samples: Vec<Sample>) -> PointResult {
        let mut p = PointResult {
            target: target.into(),
            key: key.into(),
            workload: key.split('|').next().unwrap().into(),
            client: key.split('|').nth(1).unwrap().into(),
            jobs: 1,
            rate_iops: None,
            samples,
            failures: Vec::new(),
            summary: None,
        };
        p.summarise();
        p
    }

    pub fn status(id: &str, status: &str) -> TargetStatus {
        TargetStatus {
            id: id.into(),
            label: id.into(),
            note: String::new(),
            status: status.into(),
            reason: (status != "ran").then(|| "`x` is not installed".into()),
            command: None,
        }
    }

    pub fn summary(points: Vec<PointResult>, targets: Vec<TargetStatus>) -> RunSummary {
        RunSummary {
            schema: SCHEMA.into(),
            started_utc: "20260101T000000Z".into(),
            elapsed_s: 1.0,
            command: "ringblock-bench run --quick".into(),
            preset: "quick".into(),
            settings: serde_json::json!({"rate_iops": 20000}),
            host: serde_json::json!({"cpus": [0, 1]}),
            targets,
            points,
            verify: Vec::new(),
            idle: Vec::new(),
            headline: Vec::new(),
            plots: Vec::new(),
            replication: None,
        }
    }

    #[test]
    fn summaries_take_medians_and_latency_in_us() {
        let p = point(
            "ringblock",
            "randread-4k-qd32|lean|x1",
            vec![
                sample(1, 200_000.0, Some(2.0)),
                sample(2, 220_000.0, Some(1.0)),
                sample(3, 180_000.0, None),
            ],
        );
        let s = p.summary.unwrap();
        assert_eq!(s.iops.median, 200_000.0);
        assert_eq!((s.iops.min, s.iops.max), (180_000.0, 220_000.0));
        assert!((s.iops.spread_pct - 20.0).abs() < 1e-9);
        assert_eq!(s.p50_us.unwrap().median, 100.0);
        assert_eq!(s.p99_99_us.unwrap().median, 2000.0);
        let cpu = s.server_cpu_us_per_io.unwrap();
        assert_eq!((cpu.n, cpu.median), (2, 1.5));
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn ratios_pair_by_repeat() {
        let num = [
            sample(1, 200.0, Some(1.0)),
            sample(2, 300.0, Some(1.0)),
            sample(3, 250.0, None),
        ];
        let den = [
            sample(2, 100.0, Some(4.0)),
            sample(1, 100.0, Some(2.0)),
            sample(4, 1.0, None),
        ];
        let r = Ratio::between(&num, &den, Metric::Iops);
        let p = r.paired.unwrap();
        // Pairs: repeat 1 → 2.0, repeat 2 → 3.0; repeats 3 and 4 have no partner.
        assert_eq!((p.n, p.min, p.max, p.median), (2, 2.0, 3.0, 2.5));
        assert_eq!(r.num_median, Some(250.0));
        assert_eq!(r.den_median, Some(100.0));
        assert_eq!(r.of_medians, Some(2.5));
        let c = Ratio::between(&num, &den, Metric::ServerCpuUsPerIo);
        assert_eq!(c.paired.unwrap().median, 0.375, "(0.5 + 0.25) / 2");
        assert_eq!(c.value(), Some(0.375));
        let none = Ratio::between(&num, &[], Metric::Iops);
        assert_eq!((none.paired, none.value()), (None, None));
    }

    #[test]
    fn rounds_pair_with_rounds_only() {
        let round = |repeat, round, iops| Sample {
            round: Some(round),
            ..sample(repeat, iops, None)
        };
        // The engine step: raw and engine alternated in three rounds of one repeat.
        let engine = [round(1, 1, 90.0), round(1, 2, 120.0), round(1, 3, 100.0)];
        let raw = [round(1, 1, 100.0), round(1, 2, 100.0), round(1, 3, 125.0)];
        let r = Ratio::between(&engine, &raw, Metric::Iops);
        let p = r.paired.unwrap();
        assert_eq!((p.n, p.min, p.max, p.median), (3, 0.8, 1.2, 0.9));
        assert_eq!(r.value(), Some(0.9), "the median of the paired rounds");
        assert_eq!((r.num_median, r.den_median), (Some(100.0), Some(100.0)));
        // A point measured once per repeat does not pair with one round of it: the ratio is
        // of the medians.
        let file = [sample(1, 50.0, None)];
        let r = Ratio::between(&file, &raw, Metric::Iops);
        assert_eq!(r.paired, None);
        assert_eq!(r.value(), Some(0.5));
        // Summaries take every round.
        let s = Summary::of(&raw).unwrap();
        assert_eq!((s.iops.n, s.iops.median, s.iops.max), (3, 100.0, 125.0));
        // Old summaries (no round field) still parse.
        let old: Sample = serde_json::from_str(
            r#"{"repeat":1,"iops":1.0,"mib_s":0.0,"lat":null,"server_cpu_cores":null,
               "server_cpu_us_per_io":null,"client_cpu_us_per_io":null,"errors":0,"raw":null}"#,
        )
        .unwrap();
        assert_eq!(old.round, None);
    }

    #[test]
    fn headline_judges_goals_and_says_why_not_measured() {
        let rr = "randread-4k-qd32|lean|x1";
        let rate = "randread-4k-qd32|fio|x1|rate=20000";
        let s = summary(
            vec![
                point("ringblock", rr, vec![sample(1, 200_000.0, None)]),
                point("nbdkit-memory", rr, vec![sample(1, 100_000.0, None)]),
                point("ringblock", rate, vec![sample(1, 20_000.0, Some(3.0))]),
                point("nbdkit-memory", rate, vec![sample(1, 20_000.0, Some(4.0))]),
            ],
            vec![
                status("ringblock", "ran"),
                status("nbdkit-memory", "ran"),
                status("qemu-nbd", "skipped"),
            ],
        );
        let h = headline(&s, 20_000);
        let find = |what: &str| h.iter().find(|r| r.what.contains(what)).unwrap();
        let lean1 = find("nbdkit memory: 4k random read QD32, lean client, 1 connection");
        assert_eq!(lean1.status, "met");
        assert_eq!(lean1.ratio.as_ref().unwrap().value(), Some(2.0));
        let cpu = find("at 20000 IOPS, ringblock ÷ nbdkit memory (fio)");
        assert_eq!(cpu.status, "NOT met", "0.75 > 0.5");
        let q = find("qemu-nbd: 4k random read QD32, lean client, 1 connection");
        assert!(q.status.starts_with("not measured"), "{}", q.status);
        assert!(q.status.contains("qemu-nbd skipped"), "{}", q.status);
        let two = find("nbdkit memory: 4k random read QD32, lean client, 2 connections");
        assert!(two.status.contains("not in this preset"), "{}", two.status);
        let engine = h.iter().find(|r| r.num_target == "engine").unwrap();
        assert!(engine.status.contains("engine not in this run"));
        assert_eq!(Goal::AtMost(0.5).met(0.5), Some(true));
        assert_eq!(Goal::None.met(1.0), None);
        // Ids are unique (compare matches them).
        let mut ids: Vec<&str> = h.iter().map(|r| r.id.as_str()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn summary_round_trips_through_json() {
        let s = summary(
            vec![point(
                "ringblock",
                "randread-4k-qd32|lean|x1",
                vec![sample(1, 1.0, None)],
            )],
            vec![status("ringblock", "ran")],
        );
        let text = serde_json::to_string(&s).unwrap();
        let back: RunSummary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn writes_json_into_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        let p = write_json(&out, "x.json", &serde_json::json!({"k": 1})).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        assert_eq!(back["k"], 1);
    }
}
