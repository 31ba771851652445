//! What a `run` measures: workloads, the points of the matrix (workload x client x jobs x
//! rate) and the `quick` and `full` presets that choose them per target.

use serde::{Deserialize, Serialize};

/// The access pattern of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    RandRead,
    RandWrite,
    /// 70 % reads, 30 % writes, random.
    RandMix70,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    /// fio's `--rw`.
    pub fn fio_rw(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandMix70 => "randrw",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }
    pub fn read_percent(self) -> u8 {
        match self {
            Pattern::RandRead | Pattern::SeqRead => 100,
            Pattern::RandWrite | Pattern::SeqWrite => 0,
            Pattern::RandMix70 => 70,
        }
    }
    pub fn random(self) -> bool {
        !matches!(self, Pattern::SeqRead | Pattern::SeqWrite)
    }
}

/// One workload of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Stable name, used in keys, file names and `--compare`.
    pub id: &'static str,
    pub label: &'static str,
    pub pattern: Pattern,
    pub block_bytes: u64,
    /// Requests in flight per job (fio) or per connection (lean client).
    pub qd: u32,
}

const fn w(
    id: &'static str,
    label: &'static str,
    pattern: Pattern,
    block_bytes: u64,
    qd: u32,
) -> Workload {
    Workload {
        id,
        label,
        pattern,
        block_bytes,
        qd,
    }
}

/// Every workload, in report order.
pub const WORKLOADS: [Workload; 9] = [
    w(
        "randread-4k-qd1",
        "4k random read QD1",
        Pattern::RandRead,
        4096,
        1,
    ),
    w(
        "randread-4k-qd32",
        "4k random read QD32",
        Pattern::RandRead,
        4096,
        32,
    ),
    w(
        "randwrite-4k-qd1",
        "4k random write QD1",
        Pattern::RandWrite,
        4096,
        1,
    ),
    w(
        "randwrite-4k-qd32",
        "4k random write QD32",
        Pattern::RandWrite,
        4096,
        32,
    ),
    w(
        "randrw70-4k-qd32",
        "4k random 70/30 read/write QD32",
        Pattern::RandMix70,
        4096,
        32,
    ),
    w(
        "read-128k-qd8",
        "128k sequential read QD8",
        Pattern::SeqRead,
        128 << 10,
        8,
    ),
    w(
        "write-128k-qd8",
        "128k sequential write QD8",
        Pattern::SeqWrite,
        128 << 10,
        8,
    ),
    w(
        "read-1m-qd8",
        "1 MiB sequential read QD8",
        Pattern::SeqRead,
        1 << 20,
        8,
    ),
    w(
        "write-1m-qd8",
        "1 MiB sequential write QD8",
        Pattern::SeqWrite,
        1 << 20,
        8,
    ),
];

pub fn workload(id: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.id == id)
}

/// Who generates the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    /// fio: `io_uring` on the raw file, its `nbd` engine (libnbd) on NBD targets.
    Fio,
    /// Our pipelined NBD client (`nbd_load`).
    Lean,
    /// The engine's own in-process driver (the `engine` subcommand's task driver).
    Engine,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Fio => "fio",
            Client::Lean => "lean",
            Client::Engine => "engine",
        }
    }
}

/// One measurement point on one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Point {
    pub workload: &'static Workload,
    pub client: Client,
    /// fio `numjobs` (one connection each on NBD), or the lean client's connections.
    pub jobs: u32,
    /// Fixed request rate (total over all jobs), or as fast as possible.
    pub rate_iops: Option<u32>,
}

impl Point {
    /// The point's identity within a target: `workload|client|xJOBS[|rate=N]`.
    pub fn key(&self) -> String {
        let mut k = format!("{}|{}|x{}", self.workload.id, self.client.name(), self.jobs);
        if let Some(r) = self.rate_iops {
            k.push_str(&format!("|rate={r}"));
        }
        k
    }

    pub fn label(&self) -> String {
        let mut l = format!(
            "{}, {} x{}",
            self.workload.label,
            self.client.name(),
            self.jobs
        );
        if let Some(r) = self.rate_iops {
            l.push_str(&format!(" at {r} IOPS"));
        }
        l
    }
}

/// How much of the matrix a target gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// raw fio io_uring on the backing file: fio only.
    Raw,
    /// ringblock (RAM, Unix socket) and the peers of the headline: the most points.
    Headline,
    /// The other NBD targets: the main points, for ratios.
    Secondary,
    /// ringblock on a device emulated as a firmware profile.
    Profile,
}

/// A run preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Under 2 minutes: the headline points, short runtimes, one repeat.
    Quick,
    /// The main matrix on the main targets (numjobs 1, and one per core on the 4k QD32 and
    /// 1 MiB points), three repeats; under 15 minutes on a 2-core machine.
    Full,
    /// Every workload x {numjobs 1, one per core} x both clients on every target, three
    /// repeats: about an hour.
    Complete,
}

/// Defaults a preset sets (each can be overridden on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PresetDefaults {
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub repeat: usize,
    pub size_mib: u64,
    pub verify_s: f64,
    pub idle_s: f64,
    /// Rounds of raw fio and the engine, alternated, per repeat of the engine step.
    pub engine_rounds: usize,
}

impl Preset {
    pub fn defaults(self) -> PresetDefaults {
        match self {
            Preset::Quick => PresetDefaults {
                runtime_s: 1.5,
                ramp_s: 0.0,
                repeat: 1,
                size_mib: 256,
                verify_s: 0.5,
                idle_s: 2.0,
                engine_rounds: 3,
            },
            Preset::Full | Preset::Complete => PresetDefaults {
                runtime_s: 2.0,
                ramp_s: 0.25,
                repeat: 3,
                size_mib: 1024,
                verify_s: 2.0,
                idle_s: 5.0,
                engine_rounds: 2,
            },
        }
    }

    /// The points of `tier` on a machine with `cpus` CPUs, at fixed rate `rate_iops`.
    pub fn points(self, tier: Tier, cpus: u32, rate_iops: u32) -> Vec<Point> {
        let per_core = cpus.max(1);
        let mut v = match self {
            Preset::Quick => quick_points(tier),
            Preset::Full => full_points(tier, per_core),
            Preset::Complete => complete_points(tier, per_core),
        };
        // The fixed-rate points: the headline targets, and every NBD target in `--complete`.
        let rated = match self {
            Preset::Quick | Preset::Full => tier == Tier::Headline,
            Preset::Complete => !matches!(tier, Tier::Raw | Tier::Profile),
        };
        if rated {
            for client in [Client::Fio, Client::Lean] {
                v.push(Point {
                    rate_iops: Some(rate_iops),
                    ..point("randread-4k-qd32", client, 1)
                });
            }
        }
        v
    }
}

fn point(id: &str, client: Client, jobs: u32) -> Point {
    Point {
        workload: workload(id).expect("known workload"),
        client,
        jobs,
        rate_iops: None,
    }
}

fn lean_points(ids: &[&str]) -> Vec<Point> {
    ids.iter().map(|id| point(id, Client::Lean, 1)).collect()
}

/// fio at one job on `ids`, and at one job per core on `per_core_ids`.
fn fio_points(ids: &[&str], per_core_ids: &[&str], per_core: u32) -> Vec<Point> {
    let mut v: Vec<Point> = ids.iter().map(|id| point(id, Client::Fio, 1)).collect();
    if per_core > 1 {
        v.extend(
            per_core_ids
                .iter()
                .map(|id| point(id, Client::Fio, per_core)),
        );
    }
    v
}

/// The lean client on 4k random read QD32 over 1, 2 and 4 connections.
fn lean_connections() -> Vec<Point> {
    [1, 2, 4]
        .map(|c| point("randread-4k-qd32", Client::Lean, c))
        .to_vec()
}

fn quick_points(tier: Tier) -> Vec<Point> {
    match tier {
        Tier::Raw => fio_points(&["randread-4k-qd32", "read-1m-qd8"], &[], 1),
        Tier::Headline => {
            let mut v = fio_points(&["randread-4k-qd32"], &[], 1);
            v.extend(lean_connections());
            v.push(point("randread-4k-qd1", Client::Fio, 1));
            v.push(point("randwrite-4k-qd32", Client::Lean, 1));
            v.push(point("read-1m-qd8", Client::Fio, 1));
            v
        }
        Tier::Secondary => {
            let mut v = fio_points(&["randread-4k-qd32"], &[], 1);
            v.extend(lean_points(&["randread-4k-qd32"]));
            v
        }
        Tier::Profile => lean_points(&["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32"]),
    }
}

fn full_points(tier: Tier, per_core: u32) -> Vec<Point> {
    let all_ids: Vec<&str> = WORKLOADS.iter().map(|w| w.id).collect();
    match tier {
        Tier::Raw => fio_points(
            &all_ids,
            &[
                "randread-4k-qd32",
                "randwrite-4k-qd32",
                "read-1m-qd8",
                "write-1m-qd8",
            ],
            per_core,
        ),
        Tier::Headline => {
            let mut v = fio_points(
                &all_ids,
                &["randread-4k-qd32", "randwrite-4k-qd32", "read-1m-qd8"],
                per_core,
            );
            v.extend(lean_connections());
            v.extend(lean_points(&[
                "randread-4k-qd1",
                "randwrite-4k-qd32",
                "randrw70-4k-qd32",
                "read-1m-qd8",
            ]));
            v
        }
        Tier::Secondary => {
            let mut v = fio_points(&["randread-4k-qd32", "read-1m-qd8"], &[], per_core);
            v.extend(lean_points(&["randread-4k-qd32"]));
            v
        }
        Tier::Profile => lean_points(&[
            "randread-4k-qd1",
            "randread-4k-qd32",
            "randwrite-4k-qd32",
            "read-1m-qd8",
        ]),
    }
}

/// Every workload with fio (and the lean client, on NBD targets) at 1 and one job per core.
fn complete_points(tier: Tier, per_core: u32) -> Vec<Point> {
    let mut v = Vec::new();
    if tier == Tier::Profile {
        let ids: Vec<&str> = WORKLOADS.iter().map(|w| w.id).collect();
        return lean_points(&ids);
    }
    let mut jobs = vec![1];
    if per_core > 1 {
        jobs.push(per_core);
    }
    for wl in &WORKLOADS {
        for &j in &jobs {
            v.push(point(wl.id, Client::Fio, j));
            if tier != Tier::Raw {
                v.push(point(wl.id, Client::Lean, j));
            }
        }
    }
    if tier != Tier::Raw && !jobs.contains(&4) {
        v.push(point("randread-4k-qd32", Client::Lean, 4));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_unique_and_known() {
        for (i, a) in WORKLOADS.iter().enumerate() {
            assert!(WORKLOADS[i + 1..].iter().all(|b| b.id != a.id));
            assert_eq!(workload(a.id), Some(a));
        }
        assert_eq!(workload("nope"), None);
        assert_eq!(
            workload("randrw70-4k-qd32").unwrap().pattern.read_percent(),
            70
        );
        assert!(!workload("read-1m-qd8").unwrap().pattern.random());
        assert_eq!(Pattern::RandMix70.fio_rw(), "randrw");
    }

    #[test]
    fn presets_cover_the_matrix() {
        let complete_raw = Preset::Complete.points(Tier::Raw, 2, 20_000);
        assert_eq!(
            complete_raw.len(),
            WORKLOADS.len() * 2,
            "numjobs 1 and one per core"
        );
        assert!(complete_raw.iter().all(|p| p.client == Client::Fio));
        let one_cpu = Preset::Complete.points(Tier::Raw, 1, 20_000);
        assert_eq!(one_cpu.len(), WORKLOADS.len());
        let complete = Preset::Complete.points(Tier::Secondary, 2, 20_000);
        assert_eq!(
            complete.len(),
            WORKLOADS.len() * 4 + 3,
            "both clients, x1 x2, x4, rates"
        );
        let full_raw = Preset::Full.points(Tier::Raw, 2, 20_000);
        assert_eq!(full_raw.len(), WORKLOADS.len() + 4);
        let quick = Preset::Quick.points(Tier::Headline, 2, 20_000);
        let keys: Vec<String> = quick.iter().map(Point::key).collect();
        for want in [
            "randread-4k-qd32|fio|x1",
            "randread-4k-qd32|lean|x1",
            "randread-4k-qd32|lean|x2",
            "randread-4k-qd32|lean|x4",
            "randread-4k-qd32|fio|x1|rate=20000",
            "randread-4k-qd32|lean|x1|rate=20000",
        ] {
            assert!(keys.iter().any(|k| k == want), "{want} missing: {keys:?}");
        }
        for preset in [Preset::Quick, Preset::Full, Preset::Complete] {
            for tier in [Tier::Raw, Tier::Headline, Tier::Secondary, Tier::Profile] {
                let pts = preset.points(tier, 2, 1000);
                let mut keys: Vec<String> = pts.iter().map(Point::key).collect();
                let n = keys.len();
                keys.sort();
                keys.dedup();
                assert_eq!(keys.len(), n, "{preset:?} {tier:?} repeats a point");
                if tier == Tier::Raw {
                    assert!(pts.iter().all(|p| p.client == Client::Fio));
                }
            }
        }
    }
}
