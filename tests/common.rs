//! Helpers shared by the end-to-end tests: start the real `ringblock` binary and stop it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ringblock");

/// A daemon started for one test; killed (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub stdout_lines: Vec<String>,
    rx: mpsc::Receiver<String>,
}

impl Daemon {
    /// Start `ringblock serve ARGS` and wait (bounded) for its "ready" line.
    pub fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ringblock");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            stdout_lines: Vec::new(),
            rx,
        };
        loop {
            match d.rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let ready = line == "ringblock: ready";
                    d.stdout_lines.push(line);
                    if ready {
                        return d;
                    }
                }
                Err(_) => panic!(
                    "daemon did not become ready; output so far: {:?}",
                    d.stdout_lines
                ),
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM and wait for a clean exit; returns the remaining output.
    pub fn stop(mut self) -> Vec<String> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}");
        let mut rest = std::mem::take(&mut self.stdout_lines);
        rest.extend(self.rx.try_iter());
        rest
    }

    /// SIGKILL: a crash of the daemon.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `ringblock ARGS` to completion: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run ringblock");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// CPU time (user + system) of a process, in clock ticks, from /proc.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The NBD endpoints a daemon printed at start: (`ADDR:PORT`, Unix socket path).
pub fn nbd_endpoints(d: &Daemon) -> (Option<String>, Option<String>) {
    let mut tcp = None;
    let mut unix = None;
    for line in &d.stdout_lines {
        if let Some(rest) = line.strip_prefix("ringblock: nbd listening on ") {
            let addr = rest.split(' ').next().unwrap_or_default();
            if let Some(path) = addr.strip_prefix("nbd+unix:///?socket=") {
                unix = Some(path.to_string());
            } else if tcp.is_none() {
                tcp = Some(addr.to_string());
            }
        }
    }
    (tcp, unix)
}

/// What an external tool printed.
#[derive(Debug)]
pub struct ToolOutput {
    /// Exit code; 124 (or -1 when killed by a signal) if the time limit was hit.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Run an external program with a time limit (coreutils `timeout`, SIGKILL 5 s later) and
/// `/usr/bin` first in `PATH` (so `nbdsh` finds the system python with the `nbd` module).
pub fn run_tool(limit_s: u64, program: &str, args: &[&str], envs: &[(&str, &str)]) -> ToolOutput {
    let path = format!(
        "/usr/bin:/bin:/usr/sbin:/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .args(["-k", "5", &limit_s.to_string(), program])
        .args(args)
        .env("PATH", path)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run timeout(1)");
    ToolOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// Whether `program` is on the system `PATH`.
pub fn have_tool(program: &str) -> bool {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).exists())
}
