//! Helpers shared by the end-to-end tests: start the real `ringblock` binary and stop it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ringblock_transports::nbd::client::{Client, Options};

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
        Self::start_with_stderr(args, Stdio::inherit())
    }

    /// [`Daemon::start`] with the log (stderr) going to `stderr`, e.g. a file to read back.
    pub fn start_with_stderr(args: &[&str], stderr: Stdio) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args).stderr(stderr);
        Self::start_command(cmd)
    }

    /// Run `cmd` (a `ringblock serve`, perhaps under a wrapper such as `unshare`) with its
    /// stdout read here, and wait (bounded) for its "ready" line.
    pub fn start_command(mut cmd: Command) -> Daemon {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn ringblock");
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
        // Read to EOF (the reader thread ends when the pipe closes), bounded in time.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(_) => break,
            }
        }
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

// ---------------------------------------------------------------------------------------------
// Web UI/API helpers (tests/web_*.rs).

impl Daemon {
    /// SIGTERM, wait for a successful exit, and return all the remaining output: unlike
    /// `stop`, it reads stdout to its end (the reader thread may not have passed on the last
    /// lines when the process exits), then checks that the daemon said it stopped cleanly.
    pub fn stop_clean(mut self) -> Vec<String> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}");
        let mut rest = std::mem::take(&mut self.stdout_lines);
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while let Ok(line) = self
            .rx
            .recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
        {
            rest.push(line);
        }
        assert!(
            rest.iter().any(|l| l == "ringblock: stopped cleanly"),
            "{rest:?}"
        );
        rest
    }
}

/// A daemon with NBD and the web UI on free loopback ports, its state (API token) under
/// `state_dir`, optionally a config file; returns it with the web address and the token it
/// printed at this first start.
pub fn start_with_web(config: Option<&str>, state_dir: &Path) -> (Daemon, String, String) {
    let state = state_dir.to_str().unwrap();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "127.0.0.1:0",
        "--state-dir",
        state,
    ];
    if let Some(cfg) = config {
        args.extend(["--config", cfg]);
    }
    let d = Daemon::start(&args);
    let (addr, token) = web_endpoint(&d);
    let token = token.unwrap_or_else(|| panic!("no token at first start: {:?}", d.stdout_lines));
    (d, addr, token)
}

/// The web UI address (`127.0.0.1:PORT`) and, at a first start, the API token the daemon made:
/// shown on a terminal, else (as here: stdout is a pipe) written to a 0600 file whose path
/// it prints.
pub fn web_endpoint(d: &Daemon) -> (String, Option<String>) {
    for line in &d.stdout_lines {
        if let Some(rest) = line.strip_prefix("ringblock: web UI on http://") {
            let addr = rest.split('/').next().unwrap_or_default().to_string();
            let shown = rest
                .split_once("(shown once): ")
                .map(|(_, t)| t.trim().to_string());
            let in_file = rest
                .split_once("API token (first start) in ")
                .and_then(|(_, p)| p.split_once(" (mode 0600"))
                .map(|(path, _)| {
                    std::fs::read_to_string(path)
                        .unwrap_or_else(|e| panic!("reading the first token from {path}: {e}"))
                        .trim()
                        .to_string()
                });
            return (addr, shown.or(in_file));
        }
    }
    panic!("no web UI line in {:?}", d.stdout_lines)
}

/// An HTTP response read to its end.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): HTTP {} {:?}", self.status, self.body))
    }

    /// The `error` of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" in {:?}", self.body))
            .to_string()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), bounded in time. `Host`
/// defaults to `addr`; pass a `("Host", …)` header to override it. A body is sent with
/// `Content-Type: application/json` unless a content type is given.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("host") {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    if body.is_some() && !has("content-type") {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    // The server may answer (e.g. 413) before reading a large body: a failed write is fine.
    let _ = s.write_all(&bytes);
    // Read to the end of the body: Content-Length bytes if given (some servers keep the
    // connection open regardless of `Connection: close`), else to EOF.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| raw.len() >= end + 4 + n) {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_http_response(&raw)
}

/// `http` with `Authorization: Bearer TOKEN` added.
pub fn http_auth(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let auth = format!("Bearer {token}");
    let mut h = headers.to_vec();
    h.push(("Authorization", &auth));
    http(addr, method, path, &h, body)
}

pub fn parse_http_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..eol]).to_string();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
            if size == 0 || rest.len() < eol + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[(eol + 4 + size).min(rest.len())..];
        }
        body = out;
    }
    HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Poll `f` every 100 ms until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The project's NBD client over TCP (fixed newstyle, `OPT_GO`, simple replies), for tests
/// that hold a volume open and send a few requests.
pub fn nbd_connect(addr: &str, export: &str) -> Client<std::net::TcpStream> {
    let opts = Options {
        io_timeout: Some(Duration::from_secs(30)),
        ..Options::default()
    };
    Client::connect_tcp(addr, export, opts)
        .unwrap_or_else(|e| panic!("NBD connect to {addr}, export {export:?}: {e}"))
}

/// `len` bytes of a seeded xorshift pattern: data no two seeds or offsets share, to write and
/// read back.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Write `config` as `dir/NAME` and start a daemon on it, serving NBD on a free TCP port of
/// 127.0.0.1 and on `dir/nbd.sock`; returns it with both endpoints.
pub fn start_on_tcp_and_unix(dir: &Path, name: &str, config: &str) -> (Daemon, String, String) {
    let cfg = write_file(dir, name, config);
    let sock = dir.join("nbd.sock");
    let daemon = Daemon::start(&[
        "--config",
        &cfg,
        "--listen",
        "127.0.0.1:0",
        "--unix",
        sock.to_str().unwrap(),
    ]);
    let (tcp, unix) = nbd_endpoints(&daemon);
    let tcp = tcp.unwrap_or_else(|| panic!("no TCP address in {:?}", daemon.stdout_lines));
    let unix = unix.unwrap_or_else(|| panic!("no Unix socket in {:?}", daemon.stdout_lines));
    assert_eq!(unix, sock.to_str().unwrap());
    (daemon, tcp, unix)
}
