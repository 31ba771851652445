//! Server processes the bench starts, and their CPU time.
//!
//! Every server runs in a process group of its own (`setpgid`), so the terminal's Ctrl-C does
//! not reach it and one `kill(-pgid)` reaches it and every child it forks (nbd-server forks one
//! per connection). A [`Server`] is a guard: dropping it stops the group (SIGTERM, then SIGKILL
//! after a grace period) and reaps the leader, on success, on error and on Ctrl-C alike.
//! Servers that daemonize (nbd-server) are adopted: the bench is a child subreaper, so the
//! daemon becomes its child once the launcher exits, and its pid comes from a pid file.
//!
//! CPU time is read per thread from `/proc/PID/task/TID/schedstat` (nanoseconds) of every
//! process in the group when the same threads live through the window, else from
//! `/proc/PID/stat` (utime + stime, and cutime + cstime for children already reaped; clock
//! ticks, 10 ms steps), which also counts threads and children that exited.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::interrupt;

/// How long a server gets to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// One line of `/proc/PID/stat`, the fields we use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// Clock ticks.
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

/// Parse `/proc/PID/stat`. The command name is in parentheses and may hold spaces and
/// parentheses itself, so fields are counted after the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let num = |n: usize| rest.get(n - 3).and_then(|x| x.parse::<i64>().ok());
    Some(ProcStat {
        pid,
        state: rest.first()?.chars().next()?,
        ppid: num(4)? as i32,
        pgrp: num(5)? as i32,
        utime: num(14)? as u64,
        stime: num(15)? as u64,
        cutime: num(16)? as u64,
        cstime: num(17)? as u64,
    })
}

impl ProcStat {
    /// Running or sleeping: neither a zombie nor dead.
    pub fn live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// `/proc/PID/stat` of `pid`, if it exists and parses.
fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The command name in a `/proc/PID/stat` line (between the first `(` and the last `)`).
fn stat_comm(text: &str) -> &str {
    match (text.find('('), text.rfind(')')) {
        (Some(a), Some(b)) if a < b => &text[a + 1..b],
        _ => "?",
    }
}

/// Every process on the machine (that /proc lets us read), with its command name.
fn all_processes_named() -> Vec<(ProcStat, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_proc_stat(&t).map(|s| (s, stat_comm(&t).to_string())))
        .collect()
}

/// Every process on the machine (that /proc lets us read).
fn all_processes() -> Vec<ProcStat> {
    all_processes_named().into_iter().map(|(s, _)| s).collect()
}

/// Every process of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<ProcStat> {
    all_processes()
        .into_iter()
        .filter(|s| s.pgrp == pgid)
        .collect()
}

/// The live children of `pid`.
pub fn children_of(pid: i32) -> Vec<ProcStat> {
    all_processes()
        .into_iter()
        .filter(|s| s.ppid == pid && s.live())
        .collect()
}

/// Stop a child that forks workers into sessions of their own (fio: its job processes do not
/// share its process group, and outlive a parent killed with SIGKILL until their runtime
/// ends). SIGTERM first, which such a parent passes on to its workers; after `grace`, SIGKILL
/// to the parent and to the workers it had. Reaps the child.
pub fn stop_child_and_workers(child: &mut Child, grace: Duration) {
    let pid = child.id() as i32;
    let workers: Vec<i32> = children_of(pid).iter().map(|s| s.pid).collect();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let until = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let until = Instant::now() + grace;
    loop {
        // SAFETY: getpid has no memory effects.
        let me = unsafe { libc::getpid() };
        // Still the same process: alive, and a child of our child or re-parented since (to
        // init, or to us as a subreaper).
        let live: Vec<i32> = workers
            .iter()
            .copied()
            .filter(|&w| read_stat(w).is_some_and(|s| s.live() && [pid, 1, me].contains(&s.ppid)))
            .collect();
        if live.is_empty() {
            return;
        }
        let force = Instant::now() >= until;
        for w in live {
            // SAFETY: a worker of our child, checked above to be alive.
            unsafe { libc::kill(w, if force { libc::SIGKILL } else { libc::SIGTERM }) };
        }
        if force {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds (user + system) of a process group: its live members and the children they
/// have reaped.
pub fn group_cpu_s(members: &[ProcStat]) -> f64 {
    let ticks: u64 = members
        .iter()
        .map(|s| s.utime + s.stime + s.cutime + s.cstime)
        .sum();
    ticks as f64 / clock_ticks_per_s()
}

/// Make this process a child subreaper: orphaned descendants (a daemonized server) are
/// re-parented to it, so it can reap them.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// A started server (a process group), stopped when dropped.
pub struct Server {
    pub name: String,
    /// The group leader's pid (= the process group id).
    pub pid: i32,
    child: Option<Child>,
    pub log_path: PathBuf,
    stopped: bool,
}

fn log_files(log_path: &Path) -> Result<(Stdio, Stdio)> {
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    Ok((log.try_clone()?.into(), log.into()))
}

impl Server {
    /// Start `cmd` in a process group of its own, output to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Result<Server> {
        use std::os::unix::process::CommandExt;
        let (out, err) = log_files(log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id() as i32;
        interrupt::register_group(pid);
        Ok(Server {
            name: name.to_string(),
            pid,
            child: Some(child),
            log_path: log_path.to_path_buf(),
            stopped: false,
        })
    }

    /// Run `launcher`, a server that daemonizes (forks, calls setsid, the launcher exits) and
    /// writes its pid to `pid_file`; adopt the daemon. Call [`become_subreaper`] first so the
    /// daemon can be reaped.
    pub fn adopt_daemon(
        name: &str,
        mut launcher: Command,
        pid_file: &Path,
        log_path: &Path,
    ) -> Result<Server> {
        let _ = std::fs::remove_file(pid_file);
        let (out, err) = log_files(log_path)?;
        let status = launcher
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .with_context(|| format!("starting {name}: {launcher:?}"))?;
        if !status.success() {
            bail!(
                "{name} exited with {status} at start: {}",
                tail(log_path, 10)
            );
        }
        let until = Instant::now() + Duration::from_secs(5);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
                .filter(|&p| p > 0)
            {
                break pid;
            }
            if Instant::now() > until {
                bail!(
                    "{name} wrote no pid to {} within 5 s: {}",
                    pid_file.display(),
                    tail(log_path, 10)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stat = read_stat(pid).with_context(|| format!("{name} (pid {pid}) is not running"))?;
        if stat.pgrp != pid {
            bail!("{name} (pid {pid}) is not a process group leader; refusing to signal its group");
        }
        interrupt::register_group(pid);
        Ok(Server {
            name: name.to_string(),
            pid,
            child: None,
            log_path: log_path.to_path_buf(),
            stopped: false,
        })
    }

    /// Whether the leader still runs (not exited, not a zombie).
    pub fn alive(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        if let Some(c) = &mut self.child {
            return matches!(c.try_wait(), Ok(None));
        }
        read_stat(self.pid).is_some_and(|s| s.live())
    }

    /// The last `lines` lines of the server's output.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    fn leader_exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => {
                let mut status = 0;
                // SAFETY: waitpid on a specific pid; the daemon is our child (subreaper) or
                // waitpid fails with ECHILD and /proc tells.
                let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
                r == self.pid || !read_stat(self.pid).is_some_and(|s| s.live())
            }
        }
    }

    /// Members of the group still running; zombies among them that are our children (we are
    /// their subreaper) are reaped on the way.
    fn live_members_reaping_zombies(&self) -> usize {
        // SAFETY: getpid has no memory effects.
        let me = unsafe { libc::getpid() };
        let mut live = 0;
        for m in group_members(self.pid) {
            if m.live() {
                live += 1;
            } else if m.ppid == me && m.pid != self.pid {
                let mut status = 0;
                // SAFETY: waitpid on a specific zombie child that std::process does not own.
                unsafe { libc::waitpid(m.pid, &mut status, libc::WNOHANG) };
            }
        }
        live
    }

    /// SIGTERM to the group, wait up to [`GRACE`], then SIGKILL; reap the leader. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        // SAFETY: signalling our own process group (negative pid).
        unsafe { libc::kill(-self.pid, libc::SIGTERM) };
        let until = Instant::now() + GRACE;
        let mut clean = true;
        loop {
            let gone = self.leader_exited() && self.live_members_reaping_zombies() == 0;
            if gone {
                break;
            }
            if Instant::now() > until {
                clean = false;
                // SAFETY: as above.
                unsafe { libc::kill(-self.pid, libc::SIGKILL) };
                if let Some(c) = &mut self.child {
                    let _ = c.wait();
                } else {
                    let mut status = 0;
                    // SAFETY: blocking waitpid on a specific pid after SIGKILL.
                    unsafe { libc::waitpid(self.pid, &mut status, 0) };
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        interrupt::unregister_group(self.pid);
        if !clean {
            bail!(
                "{} (pid {}) ignored SIGTERM for {:?}: killed",
                self.name,
                self.pid,
                GRACE
            );
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("ringblock-bench: {e:#}");
        }
    }
}

/// The last `lines` lines of a text file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Run time in ns of one thread (`/proc/PID/task/TID/schedstat`, first field: time spent on
/// a CPU, user and system).
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The CPU time of a process group at one instant, two ways: clock ticks of every member
/// (`/proc/PID/stat`, which also holds exited threads and reaped children, but in 10 ms steps),
/// and nanoseconds per live thread (`schedstat`, exact, but blind to threads that exit).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupCpu {
    /// CPU seconds from the members' stat (utime + stime + cutime + cstime).
    pub ticks_s: f64,
    /// (tid, run ns) of every live thread of every member, sorted by tid.
    pub threads_ns: Vec<(i32, u64)>,
}

impl GroupCpu {
    pub fn read(pgid: i32) -> GroupCpu {
        let members = group_members(pgid);
        let mut threads_ns = Vec::new();
        for m in members.iter().filter(|m| m.live()) {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", m.pid)) else {
                continue;
            };
            for e in dir.flatten() {
                let Some(tid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                if let Some(ns) = std::fs::read_to_string(e.path().join("schedstat"))
                    .ok()
                    .and_then(|t| parse_schedstat(&t))
                {
                    threads_ns.push((tid, ns));
                }
            }
        }
        threads_ns.sort_unstable();
        GroupCpu {
            ticks_s: group_cpu_s(&members),
            threads_ns,
        }
    }

    /// CPU seconds from `earlier` to `self`: exact when the same threads lived at both
    /// instants (the steady middle of a run), else from the ticks (a thread came or went).
    pub fn since(&self, earlier: &GroupCpu) -> f64 {
        let same_threads = !self.threads_ns.is_empty()
            && self.threads_ns.len() == earlier.threads_ns.len()
            && self
                .threads_ns
                .iter()
                .zip(&earlier.threads_ns)
                .all(|(a, b)| a.0 == b.0);
        if same_threads {
            let ns: u64 = self
                .threads_ns
                .iter()
                .zip(&earlier.threads_ns)
                .map(|(a, b)| a.1.saturating_sub(b.1))
                .sum();
            ns as f64 / 1e9
        } else {
            (self.ticks_s - earlier.ticks_s).max(0.0)
        }
    }
}

/// CPU clock ticks of every user-space process that is not ours at one instant: not this
/// process, not one it started (directly or not, also re-parented to us as a subreaper) and
/// not in `our_group` (a server's process group); kernel threads left out. What other work on
/// the machine took while a point ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OthersCpu {
    /// (pid, utime + stime ticks, command name), sorted by pid.
    ticks: Vec<(i32, u64, String)>,
}

impl OthersCpu {
    pub fn read(our_group: Option<i32>) -> OthersCpu {
        // SAFETY: getpid has no memory effects.
        let me = unsafe { libc::getpid() };
        Self::of(&all_processes_named(), me, our_group)
    }

    fn of(procs: &[(ProcStat, String)], me: i32, our_group: Option<i32>) -> OthersCpu {
        let parent: std::collections::HashMap<i32, i32> =
            procs.iter().map(|(p, _)| (p.pid, p.ppid)).collect();
        let ours = |mut pid: i32| {
            for _ in 0..64 {
                if pid == me {
                    return true;
                }
                match parent.get(&pid) {
                    Some(&pp) if pp > 1 => pid = pp,
                    _ => return false,
                }
            }
            false
        };
        let mut ticks: Vec<(i32, u64, String)> = procs
            .iter()
            // Kernel threads are children of kthreadd (pid 2).
            .filter(|(p, _)| p.pid != 2 && p.ppid != 2)
            .filter(|(p, _)| Some(p.pgrp) != our_group && !ours(p.pid))
            .map(|(p, name)| (p.pid, p.utime + p.stime, name.clone()))
            .collect();
        ticks.sort_unstable();
        OthersCpu { ticks }
    }

    /// CPU seconds each process alive at both instants used in between, by command name
    /// (largest first), and their total.
    pub fn since(&self, earlier: &OthersCpu) -> (f64, Vec<(String, f64)>) {
        let before: std::collections::HashMap<i32, u64> =
            earlier.ticks.iter().map(|(p, t, _)| (*p, *t)).collect();
        let mut by_name: std::collections::BTreeMap<&str, u64> = Default::default();
        for (pid, t, name) in &self.ticks {
            if let Some(b) = before.get(pid) {
                *by_name.entry(name).or_default() += t.saturating_sub(*b);
            }
        }
        let hz = clock_ticks_per_s();
        let total = by_name.values().sum::<u64>() as f64 / hz;
        let mut v: Vec<(String, f64)> = by_name
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .map(|(n, t)| (n.to_string(), t as f64 / hz))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        (total, v)
    }
}

/// What a [`CpuWindow`] saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowCpu {
    /// The server's process group, in cores (CPU seconds per second).
    pub server_cores: Option<f64>,
    /// Every other user-space process on the machine (see [`OthersCpu`]), in cores.
    pub others_cores: f64,
    /// The busiest of them by command name, in cores (at most three, each over 0.05).
    pub others_top: Vec<(String, f64)>,
    /// Percent of the machine's CPU time the hypervisor took.
    pub steal_pct: Option<f64>,
}

/// Samples CPU use over the steady middle of a run from a helper thread: it sleeps until
/// `from`, reads the counters, sleeps until `to`, reads them again; immune to start-up and
/// tear-down. The server's process group (if any), the rest of the machine's processes and
/// the hypervisor's steal.
pub struct CpuWindow {
    handle: std::thread::JoinHandle<Option<WindowCpu>>,
}

impl CpuWindow {
    pub fn start(server_group: Option<i32>, from: Instant, to: Instant) -> CpuWindow {
        let handle = std::thread::spawn(move || {
            sleep_until(from);
            let t0 = Instant::now();
            let host_a = crate::host::host_snapshot(Path::new("/"));
            let a = server_group.map(GroupCpu::read);
            let others_a = OthersCpu::read(server_group);
            sleep_until(to);
            let secs = t0.elapsed().as_secs_f64();
            let b = server_group.map(GroupCpu::read);
            let others_b = OthersCpu::read(server_group);
            let host = crate::host::host_snapshot(Path::new("/")).since(&host_a);
            let (others, by_name) = others_b.since(&others_a);
            (secs > 0.05 && !interrupt::requested()).then(|| WindowCpu {
                server_cores: a.zip(b).map(|(a, b)| b.since(&a) / secs),
                others_cores: others / secs,
                others_top: by_name
                    .into_iter()
                    .map(|(n, c)| (n, c / secs))
                    .filter(|(_, c)| *c > 0.05)
                    .take(3)
                    .collect(),
                steal_pct: host.steal_pct,
            })
        });
        CpuWindow { handle }
    }

    /// What the window saw, or `None` when it was too short or the run was interrupted.
    pub fn finish(self) -> Option<WindowCpu> {
        self.handle.join().ok().flatten()
    }
}

fn sleep_until(t: Instant) {
    while !interrupt::requested() {
        let now = Instant::now();
        if now >= t {
            return;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let line = "4242 (nbd (server) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 120 30 7 20 0 1 0 123 4096 10 18446744073709551615";
        let s = parse_proc_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                utime: 250,
                stime: 120,
                cutime: 30,
                cstime: 7,
            }
        );
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("1 (x) S 0 1"), None);
    }

    #[test]
    fn group_cpu_sums_members_and_reaped_children() {
        let a = ProcStat {
            utime: 100,
            stime: 50,
            cutime: 10,
            cstime: 5,
            ..Default::default()
        };
        let b = ProcStat {
            utime: 30,
            stime: 5,
            ..Default::default()
        };
        let secs = group_cpu_s(&[a, b]);
        assert!((secs - 200.0 / clock_ticks_per_s()).abs() < 1e-9);
    }

    #[test]
    fn group_cpu_is_exact_while_the_threads_stay_and_ticks_otherwise() {
        assert_eq!(
            parse_schedstat("151122009 165928684 621\n"),
            Some(151_122_009)
        );
        assert_eq!(parse_schedstat(""), None);
        let a = GroupCpu {
            ticks_s: 1.00,
            threads_ns: vec![(10, 1_000_000_000), (11, 500_000_000)],
        };
        let b = GroupCpu {
            ticks_s: 1.30,
            threads_ns: vec![(10, 1_123_456_789), (11, 600_000_000)],
        };
        assert!(
            (b.since(&a) - 0.223_456_789).abs() < 1e-12,
            "{}",
            b.since(&a)
        );
        // A thread left (or came): its time is only in the ticks.
        let c = GroupCpu {
            ticks_s: 1.30,
            threads_ns: vec![(10, 1_123_456_789)],
        };
        assert!((c.since(&a) - 0.30).abs() < 1e-12);
        let d = GroupCpu {
            ticks_s: 1.30,
            threads_ns: vec![(10, 1_123_456_789), (12, 1)],
        };
        assert!((d.since(&a) - 0.30).abs() < 1e-12);
        assert_eq!(GroupCpu::default().since(&GroupCpu::default()), 0.0);
    }

    #[test]
    fn cpu_window_measures_a_busy_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        // Busy for the whole window: about one core.
        cmd.args(["-c", "while :; do :; done"]);
        let mut s = Server::spawn("spinner", cmd, &dir.path().join("log")).unwrap();
        let now = Instant::now();
        let w = CpuWindow::start(
            Some(s.pid),
            now + Duration::from_millis(100),
            now + Duration::from_millis(600),
        );
        let seen = w.finish().unwrap();
        s.stop().unwrap();
        // No speed is asserted: a shared machine may give it much less than a core.
        let cores = seen.server_cores.unwrap();
        assert!(cores > 0.0 && cores < 1.2, "{cores}");
        // The spinner is ours: not counted with the other processes (which may be anything).
        assert!(seen.others_cores >= 0.0);
    }

    #[test]
    fn others_are_processes_we_did_not_start() {
        let p = |pid, ppid, pgrp, ticks| {
            (
                ProcStat {
                    pid,
                    ppid,
                    pgrp,
                    utime: ticks,
                    ..Default::default()
                },
                format!("p{pid}"),
            )
        };
        let me = 100;
        let at = |t: u64| {
            OthersCpu::of(
                &[
                    p(1, 0, 1, 5 * t),        // init: not ours
                    p(2, 0, 0, 7 * t),        // kthreadd
                    p(3, 2, 0, 9 * t),        // a kernel thread
                    p(50, 1, 50, 11 * t),     // someone's compiler: not ours
                    p(100, 50, 50, 13 * t),   // the bench itself
                    p(101, 100, 50, 17 * t),  // fio
                    p(102, 101, 102, 19 * t), // fio's job, a session of its own
                    p(200, 1, 200, 23 * t),   // a daemonized server (our group)
                ],
                me,
                Some(200),
            )
        };
        let (a, b) = (at(1), at(2));
        assert_eq!(
            a.ticks,
            vec![(1, 5, "p1".to_string()), (50, 11, "p50".to_string())]
        );
        let hz = clock_ticks_per_s();
        let (total, top) = b.since(&a);
        assert!((total - 16.0 / hz).abs() < 1e-12);
        assert_eq!(top[0].0, "p50", "largest first");
        assert!((top[0].1 - 11.0 / hz).abs() < 1e-12);
        // A process that is gone, or new, is not counted.
        let c = OthersCpu {
            ticks: vec![(50, 30, "p50".into()), (60, 1000, "new".into())],
        };
        assert!((c.since(&a).0 - 19.0 / hz).abs() < 1e-12);
        assert_eq!(c.since(&a).1.len(), 1);
    }

    #[test]
    fn stops_workers_in_sessions_of_their_own() {
        // Like fio: the worker is in a session of its own and ignores its parent's death.
        let mut child = Command::new("sh")
            .args(["-c", "setsid sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let until = Instant::now() + Duration::from_secs(5);
        let workers = loop {
            let w = children_of(pid);
            if !w.is_empty() || Instant::now() > until {
                break w;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(workers.len(), 1);
        let w = workers[0].pid;
        let until = Instant::now() + Duration::from_secs(5);
        while group_members(w).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10)); // until setsid took effect
        }
        stop_child_and_workers(&mut child, Duration::from_millis(500));
        let gone = |p: i32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|t| parse_proc_stat(&t))
                .is_none_or(|s| s.state == 'Z' || s.state == 'X')
        };
        let until = Instant::now() + Duration::from_secs(5);
        while !gone(w) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone(w), "the worker {w} outlived its parent");
    }

    #[test]
    fn starts_and_stops_a_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        // A child of the leader, in the same group, must go too.
        cmd.args(["-c", "sleep 30 & while true; do sleep 1; done"]);
        let mut s = Server::spawn("sleeper", cmd, &dir.path().join("log")).unwrap();
        let pgid = s.pid;
        assert!(s.alive());
        let until = Instant::now() + Duration::from_secs(5);
        while group_members(pgid).len() < 2 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(group_members(pgid).len() >= 2);
        assert!(group_cpu_s(&group_members(pgid)) >= 0.0);
        s.stop().unwrap();
        assert!(!s.alive());
        assert!(group_members(pgid).iter().all(|m| m.state == 'Z'));
        drop(s);
    }
}
