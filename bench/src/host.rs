//! Host checks: what the machine is and does while the bench runs. CPU sets and pinning,
//! process and thread CPU time, steal and device time, the idle policy and what a wake-up
//! costs, the CPU that takes a device's interrupts, tool versions, file allocation, clock
//! formatting; and the host record of `summary.json` built from them.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// CPUs this process may run on, in increasing order.
pub fn available_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling process.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        set
    };
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: the index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("this process may run on no CPU");
    }
    Ok(cpus)
}

/// Pin the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        bail!("cpu {cpu} is out of range");
    }
    // SAFETY: cpu_set_t is plain data; pid 0 = the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to cpu {cpu}"));
    }
    Ok(())
}

/// User and system CPU time of the whole process (`RUSAGE_SELF`) or the calling thread
/// (`RUSAGE_THREAD`).
pub fn cpu_times(who: libc::c_int) -> Result<(Duration, Duration)> {
    // SAFETY: rusage is plain data that getrusage fills.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut ru) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrusage");
        }
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok((tv(ru.ru_utime), tv(ru.ru_stime)))
}

/// CPU time of the calling thread (user + system).
pub fn thread_cpu() -> Duration {
    cpu_times(libc::RUSAGE_THREAD).map_or(Duration::ZERO, |(u, s)| u + s)
}

/// System-wide CPU time from `/proc/stat` (clock ticks, all CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub busy: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    /// Time the hypervisor ran something else while a virtual CPU wanted to run.
    pub steal: u64,
}

impl CpuStat {
    fn total(&self) -> u64 {
        self.busy + self.idle + self.iowait + self.irq + self.steal
    }
}

fn parse_cpu_stat(text: &str) -> Option<CpuStat> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    Some(CpuStat {
        busy: at(0) + at(1) + at(2),
        idle: at(3),
        iowait: at(4),
        irq: at(5) + at(6),
        steal: at(7),
    })
}

/// Completed reads and milliseconds spent on them, of one block device (`/proc/diskstats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStat {
    pub reads: u64,
    pub read_ms: u64,
}

fn parse_disk_stat(text: &str, major: u64, minor: u64) -> Option<DiskStat> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 7 || f[0].parse::<u64>().ok()? != major || f[1].parse::<u64>().ok()? != minor {
            return None;
        }
        Some(DiskStat {
            reads: f[3].parse().ok()?,
            read_ms: f[6].parse().ok()?,
        })
    })
}

/// Machine-level counters around a run: CPU steal and the block device under a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostSnapshot {
    cpu: Option<CpuStat>,
    disk: Option<DiskStat>,
}

/// What the machine did between two [`HostSnapshot`]s (every process, not only ours).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct HostDelta {
    /// Percent of all CPUs' time stolen by the hypervisor.
    pub steal_pct: Option<f64>,
    /// Percent of all CPUs' time busy (user + system + irq).
    pub busy_pct: Option<f64>,
    /// Reads the block device holding the file completed.
    pub device_reads: Option<u64>,
    /// Mean time a read spent in the block layer and device (queue included), in µs.
    pub device_us_per_read: Option<f64>,
}

/// Take a [`HostSnapshot`]; `file` picks the block device (its `st_dev`).
pub fn host_snapshot(file: &Path) -> HostSnapshot {
    let cpu = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| parse_cpu_stat(&t));
    let disk = std::fs::metadata(file).ok().and_then(|m| {
        let dev = m.dev();
        let text = std::fs::read_to_string("/proc/diskstats").ok()?;
        parse_disk_stat(
            &text,
            u64::from(libc::major(dev)),
            u64::from(libc::minor(dev)),
        )
    });
    HostSnapshot { cpu, disk }
}

impl HostSnapshot {
    pub fn since(&self, earlier: &HostSnapshot) -> HostDelta {
        let mut d = HostDelta::default();
        if let (Some(a), Some(b)) = (earlier.cpu, self.cpu) {
            let total = b.total().saturating_sub(a.total()) as f64;
            if total > 0.0 {
                d.steal_pct = Some(b.steal.saturating_sub(a.steal) as f64 / total * 100.0);
                let busy = (b.busy + b.irq).saturating_sub(a.busy + a.irq) as f64;
                d.busy_pct = Some(busy / total * 100.0);
            }
        }
        if let (Some(a), Some(b)) = (earlier.disk, self.disk) {
            let reads = b.reads.saturating_sub(a.reads);
            d.device_reads = Some(reads);
            if reads > 0 {
                d.device_us_per_read =
                    Some(b.read_ms.saturating_sub(a.read_ms) as f64 * 1000.0 / reads as f64);
            }
        }
        d
    }
}

/// Bytes the file system has allocated for `path` (less than its length when it has holes).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    let m = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(m.blocks() * 512)
}

/// The running kernel's release, e.g. `6.12.0-1-amd64`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// How idle CPUs wait, which sets the cost of every wake-up across CPUs (on a VM, a halted
/// vCPU needs an IPI from the hypervisor): the cpuidle driver, and the guest halt-poll window
/// when the haltpoll driver is in use. E.g. `cpuidle haltpoll, guest halt polling 0 ns (off)`.
pub fn idle_policy() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    describe_idle_policy(
        read("/sys/devices/system/cpu/cpuidle/current_driver").as_deref(),
        read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_deref(),
    )
}

fn describe_idle_policy(driver: Option<&str>, halt_poll_ns: Option<&str>) -> String {
    let driver = driver.filter(|d| !d.is_empty() && *d != "none");
    let Some(driver) = driver else {
        return "cpuidle: no driver".into();
    };
    match (driver, halt_poll_ns.and_then(|n| n.parse::<u64>().ok())) {
        ("haltpoll", Some(0)) => "cpuidle haltpoll, guest halt polling 0 ns (off)".into(),
        ("haltpoll", Some(ns)) => format!("cpuidle haltpoll, guest halt polling {ns} ns"),
        (d, _) => format!("cpuidle {d}"),
    }
}

/// What one sleep-and-wake round trip costs between two threads, each blocking in `read` until
/// the other writes: the pattern of an event-loop server and its client, one receive each way.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct WakeCost {
    /// CPU time of both threads together, per round trip (ns).
    pub cpu_ns: f64,
    /// Wall time per round trip (ns).
    pub wall_ns: f64,
}

/// Measure [`WakeCost`] with one thread pinned to `cpu_a` and one to `cpu_b`, passing a byte back
/// and forth over a Unix socket pair `round_trips` times. On a VM whose idle vCPUs halt at once,
/// across CPUs this is many times the cost on one CPU, and it sets the CPU per IO of every
/// server that sleeps between requests: the bench's host line reports it.
pub fn wake_cost(cpu_a: usize, cpu_b: usize, round_trips: u32) -> Result<WakeCost> {
    if round_trips == 0 {
        bail!("no round trips to time");
    }
    let (mut a, mut b) = UnixStream::pair().context("socketpair")?;
    let echo = std::thread::spawn(move || -> Result<Duration> {
        pin_current_thread(cpu_b)?;
        let start = thread_cpu();
        let mut byte = [0u8; 1];
        for _ in 0..round_trips {
            b.read_exact(&mut byte)?;
            b.write_all(&byte)?;
        }
        Ok(thread_cpu().saturating_sub(start))
    });
    let ping = std::thread::spawn(move || -> Result<(Duration, Duration)> {
        pin_current_thread(cpu_a)?;
        // Let the echo thread reach its first read and sleep.
        std::thread::sleep(Duration::from_millis(10));
        let (cpu0, wall0) = (thread_cpu(), std::time::Instant::now());
        let mut byte = [0u8; 1];
        for _ in 0..round_trips {
            a.write_all(&byte)?;
            a.read_exact(&mut byte)?;
        }
        Ok((thread_cpu().saturating_sub(cpu0), wall0.elapsed()))
    });
    let (ping_cpu, wall) = ping
        .join()
        .map_err(|_| anyhow::anyhow!("a wake-cost thread panicked"))??;
    let echo_cpu = echo
        .join()
        .map_err(|_| anyhow::anyhow!("a wake-cost thread panicked"))??;
    let n = f64::from(round_trips);
    Ok(WakeCost {
        cpu_ns: (ping_cpu + echo_cpu).as_nanos() as f64 / n,
        wall_ns: wall.as_nanos() as f64 / n,
    })
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for `t`: sortable, and safe in a directory name.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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

pub fn tool_version(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("Using configuration"))
        .map(str::to_string)
}

/// Round trips per wake-cost measurement: about 0.1 s across CPUs even where a round trip costs
/// 50 µs, and enough that the mean is steady.
const WAKE_COST_ROUND_TRIPS: u32 = 2000;

/// The sleep-and-wake cost on one CPU and across the first and last CPUs, as the host record
/// keeps it (`null` where it could not be measured).
pub fn measure_wake_cost(cpus: &[usize]) -> serde_json::Value {
    let (first, last) = (cpus[0], cpus[cpus.len() - 1]);
    let one = |a, b| match wake_cost(a, b, WAKE_COST_ROUND_TRIPS) {
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

/// The host record of `summary.json`: CPUs, kernel, idle policy, wake-up cost, the engine
/// step's CPU, the peers' versions and the load average.
pub fn record(
    cpus: &[usize],
    engine_cpu: &(usize, String),
    wake_cost: serde_json::Value,
    fio_version: String,
) -> serde_json::Value {
    serde_json::json!({
        "cpus": cpus,
        "engine_step_cpu": engine_cpu.0,
        "engine_step_cpu_why": engine_cpu.1,
        "kernel": kernel_release(),
        "idle": idle_policy(),
        "wake_cost": wake_cost,
        "fio": fio_version,
        "nbdkit": tool_version("nbdkit", &["--version"]),
        "qemu-nbd": tool_version("qemu-nbd", &["--version"]),
        "nbd-server": tool_version("nbd-server", &["-V"]),
        "load_average": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_cost_times_round_trips_on_one_cpu_and_across() {
        let cpus = available_cpus().unwrap();
        let pairs = [(cpus[0], cpus[0]), (cpus[0], *cpus.last().unwrap())];
        for (a, b) in pairs {
            let w = wake_cost(a, b, 200).unwrap();
            // Both threads slept and woke 200 times: some CPU and wall time went by.
            assert!(w.cpu_ns > 0.0 && w.cpu_ns.is_finite(), "{w:?}");
            assert!(w.wall_ns > 0.0 && w.wall_ns.is_finite(), "{w:?}");
        }
        assert!(wake_cost(cpus[0], cpus[0], 0).is_err());
    }

    #[test]
    fn idle_policy_names_the_halt_poll_window() {
        assert_eq!(
            describe_idle_policy(Some("haltpoll"), Some("0")),
            "cpuidle haltpoll, guest halt polling 0 ns (off)"
        );
        assert_eq!(
            describe_idle_policy(Some("haltpoll"), Some("200000")),
            "cpuidle haltpoll, guest halt polling 200000 ns"
        );
        assert_eq!(
            describe_idle_policy(Some("intel_idle"), None),
            "cpuidle intel_idle"
        );
        assert_eq!(describe_idle_policy(None, None), "cpuidle: no driver");
        assert_eq!(
            describe_idle_policy(Some("none"), None),
            "cpuidle: no driver"
        );
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723); // 2000-02-29 01:02:03
        assert_eq!(utc_stamp(t), "20000229T010203Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_426_218); // fio sample's timestamp
        assert_eq!(utc_stamp(t), "20261123T093018Z");
    }

    #[test]
    fn host_counters() {
        let stat = "cpu  10 1 5 100 7 2 1 4 0 0\ncpu0 5 0 2 50 3 1 0 2 0 0\n";
        let c = parse_cpu_stat(stat).unwrap();
        assert_eq!(
            (c.busy, c.idle, c.iowait, c.irq, c.steal),
            (16, 100, 7, 3, 4)
        );
        let disk = "   8       0 sda 100 0 800 40 5 0 40 3 0 0 0\n 254       0 vda 2000 3 16000 500 0 0 0 0\n";
        assert_eq!(
            parse_disk_stat(disk, 254, 0),
            Some(DiskStat {
                reads: 2000,
                read_ms: 500
            })
        );
        assert_eq!(parse_disk_stat(disk, 1, 1), None);
        let a = HostSnapshot {
            cpu: Some(c),
            disk: Some(DiskStat {
                reads: 1000,
                read_ms: 100,
            }),
        };
        let b = HostSnapshot {
            cpu: Some(CpuStat {
                busy: 66,
                idle: 140,
                iowait: 7,
                irq: 3,
                steal: 14,
            }),
            disk: Some(DiskStat {
                reads: 3000,
                read_ms: 300,
            }),
        };
        let d = b.since(&a);
        // 100 ticks passed: 50 busy, 40 idle, 10 steal.
        assert_eq!(d.steal_pct, Some(10.0));
        assert_eq!(d.busy_pct, Some(50.0));
        assert_eq!(d.device_reads, Some(2000));
        assert_eq!(d.device_us_per_read, Some(100.0));
        // The real machine's counters parse.
        let live = host_snapshot(Path::new("/"));
        assert!(live.cpu.is_some());
    }

    #[test]
    fn cpus_and_cpu_time() {
        let cpus = available_cpus().unwrap();
        assert!(!cpus.is_empty());
        let (u0, s0) = cpu_times(libc::RUSAGE_SELF).unwrap();
        let t0 = thread_cpu();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let (u1, s1) = cpu_times(libc::RUSAGE_SELF).unwrap();
        assert!(u1 + s1 >= u0 + s0);
        assert!(thread_cpu() >= t0);
    }
}
