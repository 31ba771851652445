//! Running fio and reading its JSON output.
//!
//! [`FioJob`] builds a command line (one job, or `numjobs` clones reported as one group),
//! [`FioJob::run_raw`] runs it with `--output-format=json`, and [`parse`] turns fio's JSON into a
//! [`FioReport`]: per direction IOPS, bandwidth and latency percentiles, plus the job's CPU use.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The percentiles every bench reports, as fio's `--percentile_list` wants them.
pub const PERCENTILE_LIST: &str = "50:99:99.9:99.99";

/// One fio job description. Build with [`FioJob::new`] and the setters; nothing runs until
/// [`FioJob::run_raw`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FioJob {
    pub name: String,
    /// `--filename`; `None` for engines that take a target another way (e.g. nbd's `--uri`).
    pub filename: Option<PathBuf>,
    pub ioengine: String,
    /// fio's `--rw`: read, write, randread, randwrite, randrw, rw ...
    pub rw: String,
    pub bs_bytes: u64,
    pub iodepth: u32,
    pub numjobs: u32,
    /// Time-based run length in ms; `None` runs until `size_bytes` has been transferred once.
    pub runtime_ms: Option<u64>,
    /// Warm-up excluded from the results (`--ramp_time`), in ms.
    pub ramp_ms: Option<u64>,
    /// Region length per job (`--size`).
    pub size_bytes: Option<u64>,
    /// Region start (`--offset`).
    pub offset_bytes: Option<u64>,
    /// `--direct=1` (O_DIRECT).
    pub direct: bool,
    /// Anything else, passed verbatim after the options above (e.g. `--rwmixread=70`).
    pub extra: Vec<String>,
}

impl FioJob {
    /// A job with fio's usual bench defaults: io_uring, 4 KiB random read, QD1, one job,
    /// O_DIRECT, 10 s.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            filename: None,
            ioengine: "io_uring".into(),
            rw: "randread".into(),
            bs_bytes: 4096,
            iodepth: 1,
            numjobs: 1,
            runtime_ms: Some(10_000),
            ramp_ms: None,
            size_bytes: None,
            offset_bytes: None,
            direct: true,
            extra: Vec::new(),
        }
    }

    pub fn filename(mut self, path: impl Into<PathBuf>) -> Self {
        self.filename = Some(path.into());
        self
    }
    pub fn ioengine(mut self, engine: impl Into<String>) -> Self {
        self.ioengine = engine.into();
        self
    }
    pub fn rw(mut self, rw: impl Into<String>) -> Self {
        self.rw = rw.into();
        self
    }
    pub fn bs_bytes(mut self, bs: u64) -> Self {
        self.bs_bytes = bs;
        self
    }
    pub fn iodepth(mut self, depth: u32) -> Self {
        self.iodepth = depth;
        self
    }
    pub fn numjobs(mut self, jobs: u32) -> Self {
        self.numjobs = jobs;
        self
    }
    /// Time-based run length (fio takes milliseconds); `None`: size-based.
    pub fn runtime(mut self, t: Option<std::time::Duration>) -> Self {
        self.runtime_ms = t.map(|d| d.as_millis() as u64);
        self
    }
    /// Warm-up excluded from the results; `None` or zero: none.
    pub fn ramp(mut self, t: Option<std::time::Duration>) -> Self {
        self.ramp_ms = t.map(|d| d.as_millis() as u64).filter(|&ms| ms > 0);
        self
    }
    pub fn size_bytes(mut self, size: u64) -> Self {
        self.size_bytes = Some(size);
        self
    }
    pub fn offset_bytes(mut self, offset: u64) -> Self {
        self.offset_bytes = Some(offset);
        self
    }
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
    pub fn extra(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// fio's arguments (without the program name). Always JSON output with our percentiles;
    /// several jobs are reported as one group so `jobs[0]` is their sum.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--name={}", self.name),
            format!("--ioengine={}", self.ioengine),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs_bytes),
            format!("--iodepth={}", self.iodepth),
            format!("--numjobs={}", self.numjobs),
            format!("--direct={}", u8::from(self.direct)),
        ];
        if let Some(f) = &self.filename {
            a.push(format!("--filename={}", f.display()));
        }
        if let Some(s) = self.size_bytes {
            a.push(format!("--size={s}"));
        }
        if let Some(o) = self.offset_bytes {
            a.push(format!("--offset={o}"));
        }
        // Whole seconds as fio's plain number, anything else in ms.
        let time = |ms: u64| {
            if ms.is_multiple_of(1000) {
                format!("{}", ms / 1000)
            } else {
                format!("{ms}ms")
            }
        };
        if let Some(r) = self.runtime_ms {
            a.push(format!("--runtime={}", time(r)));
            a.push("--time_based".into());
        }
        if let Some(r) = self.ramp_ms {
            a.push(format!("--ramp_time={}", time(r)));
        }
        if self.numjobs > 1 {
            a.push("--group_reporting".into());
        }
        // Total latency (submission to completion) as well as completion latency, so fio's
        // numbers compare with a client that times a request from submit to completion.
        a.push("--lat_percentiles=1".into());
        a.push(format!("--percentile_list={PERCENTILE_LIST}"));
        a.push("--output-format=json".into());
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The command line, for logs and reports.
    pub fn command_line(&self) -> String {
        std::iter::once("fio".to_string())
            .chain(self.args())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run fio; fio's JSON output as printed, and parsed. On Ctrl-C (see
    /// [`crate::interrupt`]) fio is stopped rather than waited for.
    pub fn run_raw(&self) -> Result<(String, FioReport)> {
        tracing::debug!(cmd = %self.command_line(), "running fio");
        let mut child = Command::new("fio")
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run fio (is it installed and on PATH?)")?;
        // Drain both pipes on threads so fio never blocks on a full pipe while we poll.
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out_t = drain(Box::new(child.stdout.take().context("fio stdout")?));
        let err_t = drain(Box::new(child.stderr.take().context("fio stderr")?));
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if crate::interrupt::requested() {
                crate::procs::stop_child_and_workers(&mut child, std::time::Duration::from_secs(2));
                bail!("interrupted: fio stopped");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let out = std::process::Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "fio failed ({}): {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout.trim()
            );
        }
        let report = parse(&stdout)
            .with_context(|| format!("reading the output of {}", self.command_line()))?;
        let json = json_start(&stdout).map_or(&stdout[..], |i| &stdout[i..]);
        Ok((json.to_string(), report))
    }
}

/// The installed fio's version string, e.g. `fio-3.33`.
pub fn version() -> Result<String> {
    let out = Command::new("fio")
        .arg("--version")
        .output()
        .context("cannot run fio (is it installed and on PATH?)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Latency percentiles in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p99_9_ns: u64,
    pub p99_99_ns: u64,
}

impl Percentiles {
    /// From fio's `"percentile": {"50.000000": ns, ...}` map; `None` if one is missing.
    fn from_fio(map: &BTreeMap<String, u64>) -> Option<Self> {
        let get = |want: f64| {
            map.iter()
                .find(|(k, _)| k.parse::<f64>().is_ok_and(|p| (p - want).abs() < 1e-6))
                .map(|(_, v)| *v)
        };
        Some(Self {
            p50_ns: get(50.0)?,
            p99_ns: get(99.0)?,
            p99_9_ns: get(99.9)?,
            p99_99_ns: get(99.99)?,
        })
    }
}

/// What one direction (read or write) of a job did, read straight from fio's JSON.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Direction {
    pub iops: f64,
    #[serde(rename = "bw_bytes")]
    pub bw_bytes_per_s: u64,
    #[serde(default)]
    pub total_ios: u64,
    /// Completion latency percentiles (absent when the direction did no IO).
    #[serde(rename = "clat_ns", default, deserialize_with = "percentiles")]
    pub clat: Option<Percentiles>,
    /// Total latency percentiles, submission to completion (needs `--lat_percentiles=1`).
    #[serde(rename = "lat_ns", default, deserialize_with = "percentiles")]
    pub lat: Option<Percentiles>,
}

/// fio's `{"mean": .., "percentile": {"50.000000": ns, ..}}` as our percentiles.
fn percentiles<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Percentiles>, D::Error> {
    #[derive(Deserialize)]
    struct Latency {
        #[serde(default)]
        percentile: Option<BTreeMap<String, u64>>,
    }
    let l: Option<Latency> = Option::deserialize(d)?;
    Ok(l.and_then(|l| l.percentile)
        .as_ref()
        .and_then(Percentiles::from_fio))
}

/// One job (or one group of jobs) of a fio run.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct JobReport {
    #[serde(rename = "jobname")]
    pub name: String,
    #[serde(default)]
    pub error: i64,
    #[serde(rename = "job_runtime", default)]
    pub runtime_ms: u64,
    pub read: Direction,
    pub write: Direction,
    /// CPU use of the job's threads, in percent of one CPU.
    #[serde(rename = "usr_cpu")]
    pub usr_cpu_pct: f64,
    #[serde(rename = "sys_cpu")]
    pub sys_cpu_pct: f64,
}

impl JobReport {
    /// CPU time per IO in microseconds (user + system), over both directions.
    pub fn cpu_us_per_io(&self) -> Option<f64> {
        let ios = self.read.total_ios + self.write.total_ios;
        let secs = self.runtime_ms as f64 / 1000.0;
        (ios > 0).then(|| (self.usr_cpu_pct + self.sys_cpu_pct) / 100.0 * secs * 1e6 / ios as f64)
    }
}

/// A parsed fio JSON report (as much of it as the bench reads).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct FioReport {
    #[serde(rename = "fio version", default)]
    pub fio_version: String,
    pub jobs: Vec<JobReport>,
}

impl FioReport {
    /// The first job (with `--group_reporting`, the whole group).
    pub fn job(&self) -> Result<&JobReport> {
        self.jobs.first().context("fio reported no job")
    }
}

/// Where fio's JSON starts in its output (it prints notes such as `fio: connected to NBD
/// server` before it).
fn json_start(text: &str) -> Option<usize> {
    if text.starts_with('{') {
        Some(0)
    } else {
        text.find("\n{").map(|i| i + 1)
    }
}

/// Parse fio's `--output-format=json` output. Text before the JSON (fio sometimes prints
/// notes on stdout) is skipped.
pub fn parse(text: &str) -> Result<FioReport> {
    let start = json_start(text).context("no JSON object in fio's output")?;
    serde_json::from_str(&text[start..]).context("fio JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDREAD: &str = include_str!("../tests/data/fio-randread.json");
    const RANDRW: &str = include_str!("../tests/data/fio-randrw.json");

    #[test]
    fn parses_a_randread_report() {
        let r = parse(RANDREAD).unwrap();
        assert_eq!(r.fio_version, "fio-3.33");
        let j = r.job().unwrap();
        assert_eq!(j.name, "randread");
        assert_eq!(j.error, 0);
        assert_eq!(j.runtime_ms, 1000);
        assert!((j.read.iops - 60404.595405).abs() < 1e-6);
        assert_eq!(j.read.bw_bytes_per_s, 247_417_222);
        assert_eq!(j.read.total_ios, 60465);
        assert_eq!(
            j.read.clat,
            Some(Percentiles {
                p50_ns: 296_960,
                p99_ns: 2_375_680,
                p99_9_ns: 32_899_072,
                p99_99_ns: 33_816_576,
            })
        );
        assert_eq!(j.read.lat.unwrap().p50_ns, 305_152);
        assert_eq!(j.write.total_ios, 0);
        assert_eq!(
            j.write.clat, None,
            "no write percentiles for a read-only job"
        );
        assert!((j.usr_cpu_pct - 4.8).abs() < 1e-9);
        assert!((j.sys_cpu_pct - 61.0).abs() < 1e-9);
        // 65.8 % of 1 s over 60465 IOs.
        let per_io = j.cpu_us_per_io().unwrap();
        assert!((per_io - 0.658e6 / 60465.0).abs() < 1e-6, "{per_io}");
    }

    #[test]
    fn parses_both_directions_of_a_grouped_mixed_report() {
        let r = parse(RANDRW).unwrap();
        assert_eq!(r.jobs.len(), 1, "group_reporting sums the clones");
        let j = r.job().unwrap();
        assert_eq!(j.name, "mixed");
        assert_eq!(j.read.total_ios, 39590);
        assert_eq!(j.write.total_ios, 16975);
        assert_eq!(j.write.bw_bytes_per_s, 69_390_818);
        assert_eq!(j.write.clat.unwrap().p99_ns, 2_473_984);
        assert_eq!(j.write.lat.unwrap().p99_9_ns, 29_753_344);
    }

    #[test]
    fn skips_notes_before_the_json() {
        let text = format!("note: both iodepth >= 1 and synchronous I/O engine\n{RANDREAD}");
        assert_eq!(parse(&text).unwrap(), parse(RANDREAD).unwrap());
        assert!(parse("fio: no such file").is_err());
        assert!(parse("{\"jobs\": [").is_err());
    }

    #[test]
    fn percentile_keys_are_matched_numerically() {
        let map: BTreeMap<String, u64> = [("50.000000", 1), ("99.000000", 2), ("99.900000", 3)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(Percentiles::from_fio(&map), None, "99.99 is missing");
        let mut map = map;
        map.insert("99.990000".into(), 4);
        assert_eq!(
            Percentiles::from_fio(&map),
            Some(Percentiles {
                p50_ns: 1,
                p99_ns: 2,
                p99_9_ns: 3,
                p99_99_ns: 4
            })
        );
    }

    #[test]
    fn builds_the_command_line() {
        let job = FioJob::new("raw")
            .filename("/data/dev.img")
            .iodepth(32)
            .runtime(Some(std::time::Duration::from_secs(5)))
            .ramp(Some(std::time::Duration::from_secs(1)))
            .offset_bytes(1 << 20)
            .size_bytes(1 << 30)
            .extra("--norandommap");
        let a = job.args();
        for want in [
            "--name=raw",
            "--ioengine=io_uring",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--numjobs=1",
            "--direct=1",
            "--filename=/data/dev.img",
            "--offset=1048576",
            "--size=1073741824",
            "--runtime=5",
            "--time_based",
            "--ramp_time=1",
            "--percentile_list=50:99:99.9:99.99",
            "--output-format=json",
            "--norandommap",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x == "--group_reporting"));
        let grouped = FioJob::new("g")
            .numjobs(4)
            .runtime(None)
            .direct(false)
            .args();
        assert!(grouped.iter().any(|x| x == "--group_reporting"));
        assert!(grouped.iter().any(|x| x == "--direct=0"));
        assert!(!grouped.iter().any(|x| x.starts_with("--runtime")));
        assert!(!grouped.iter().any(|x| x.starts_with("--filename")));
        assert!(job.command_line().starts_with("fio --name=raw "));
        let short = FioJob::new("s")
            .runtime(Some(std::time::Duration::from_millis(1500)))
            .ramp(Some(std::time::Duration::from_millis(250)))
            .args();
        assert!(short.iter().any(|x| x == "--runtime=1500ms"));
        assert!(short.iter().any(|x| x == "--ramp_time=250ms"));
        let no_ramp = FioJob::new("s")
            .ramp(Some(std::time::Duration::ZERO))
            .args();
        assert!(!no_ramp.iter().any(|x| x.starts_with("--ramp_time")));
    }
}
