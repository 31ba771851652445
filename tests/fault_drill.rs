//! Fault drills against the real daemon with file-backed devices:
//!
//! - kill -9 at a random request count while two NBD connections run a seeded mix of WRITE,
//!   WRITE+FUA, FLUSH, TRIM, WRITE_ZEROES and READ; after each restart every block must hold
//!   its last durable value or a value written after it (a write-log verifier like crucible's
//!   crutest);
//! - damaged device files (truncated, label zeroed or corrupt, newest metadata slot corrupt,
//!   deleted while running): the daemon either starts with every flushed byte intact, the deleted volume still
//!   deleted and a warning logged, or refuses with an error naming the device. Never zeros
//!   where flushed data was, never a reformat, never a rollback.
//!
//! The NBD client here is written from the protocol document, not with the server's codec or
//! the transports client built on it, so a codec bug cannot hide itself: keep it independent.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_auth, run, write_file, BIN};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The unit the verifier tracks; every request is aligned to it.
const BLOCK_BYTES: u64 = 4096;
/// The engine's default chunk size: whole-chunk trims unmap chunks.
const CHUNK_BYTES: u64 = MIB;
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A small deterministic generator (splitmix64): the drills are seeded and printable.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// `RINGBLOCK_DRILL_SEED` if set, else a fresh seed; printed so a failure can be repeated.
fn drill_seed() -> u64 {
    match std::env::var("RINGBLOCK_DRILL_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("RINGBLOCK_DRILL_SEED={s:?} is not a u64")),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Rng::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon: started with stdout and stderr captured, so a start may also end in a refusal.

/// A `ringblock serve` process; killed when dropped (also when a test fails).
struct Proc {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// How a start ended.
enum Started {
    Ready(Proc),
    /// The process exited before it was ready.
    Exited {
        code: Option<i32>,
        stderr: String,
    },
}

fn collect_lines(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    })
}

impl Proc {
    /// `ringblock serve --config CONFIG --listen 127.0.0.1:0`, waiting (bounded) until it
    /// says it is ready or exits.
    fn start(config: &Path) -> Started {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringblock");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect_lines(child.stdout.take().unwrap(), stdout.clone()),
            collect_lines(child.stderr.take().unwrap(), stderr.clone()),
        ];
        let mut p = Proc {
            child,
            stdout,
            stderr,
            readers,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if p.stdout_has(|l| l == "ringblock: ready") {
                return Started::Ready(p);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                p.join_readers();
                return Started::Exited {
                    code: status.code(),
                    stderr: p.stderr_text(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "daemon neither ready nor exited within {START_TIMEOUT:?}; stdout {:?}, stderr:\n{}",
                p.stdout.lock().unwrap(),
                p.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start and insist that it becomes ready.
    fn start_ready(config: &Path) -> Proc {
        match Proc::start(config) {
            Started::Ready(p) => p,
            Started::Exited { code, stderr } => {
                panic!("daemon exited ({code:?}) instead of starting:\n{stderr}")
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stdout_has(&self, f: impl Fn(&str) -> bool) -> bool {
        self.stdout.lock().unwrap().iter().any(|l| f(l))
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// The NBD TCP address it printed.
    fn nbd_addr(&self) -> String {
        let lines = self.stdout.lock().unwrap();
        lines
            .iter()
            .find_map(|l| l.strip_prefix("ringblock: nbd listening on "))
            .and_then(|rest| rest.split(' ').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no NBD address in {lines:?}"))
    }

    /// The web UI address it printed.
    fn web_addr(&self) -> String {
        let lines = self.stdout.lock().unwrap();
        lines
            .iter()
            .find_map(|l| l.strip_prefix("ringblock: web UI on http://"))
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no web UI address in {lines:?}"))
    }

    /// Wait (bounded) for the process to exit; None if it did not.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.join_readers();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and a bounded wait; returns the exit status (the caller judges it) and stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = self.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "daemon did not exit within {EXIT_TIMEOUT:?} of SIGTERM:\n{}",
                self.stderr_text()
            )
        });
        (status, self.stderr_text())
    }

    /// SIGTERM, and insist on a clean stop.
    fn stop_clean(self) {
        let stdout = self.stdout.clone();
        let (status, stderr) = self.terminate();
        assert!(status.success(), "daemon exited with {status}:\n{stderr}");
        assert!(
            stdout
                .lock()
                .unwrap()
                .iter()
                .any(|l| l == "ringblock: stopped cleanly"),
            "no clean stop: {:?}\n{stderr}",
            stdout.lock().unwrap()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A small NBD client: fixed newstyle handshake, NBD_OPT_GO with INFO_BLOCK_SIZE, simple replies.
// Deliberately its own framing (not `ringblock_transports::nbd::client`): it checks the server
// against the spec, not against our codec.

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

struct NbdClient {
    s: TcpStream,
    size_bytes: u64,
    transmission_flags: u16,
    min_block_bytes: u32,
    max_block_bytes: u32,
    next_cookie: u64,
}

/// One simple reply: the request's cookie, its error (0 = ok) and read data.
struct NbdReply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl NbdClient {
    /// Handshake to `export`; an error says what the server answered.
    fn connect(addr: &str, export: &str) -> Result<NbdClient, String> {
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let io = |e: std::io::Error| format!("handshake with {addr}: {e}");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).map_err(io)?;
        if &greeting[..8] != NBDMAGIC || &greeting[8..16] != IHAVEOPT {
            return Err(format!("not a newstyle NBD server: {greeting:?}"));
        }
        let server_flags = be_u16(&greeting[16..]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err("server is not fixed newstyle".into());
        }
        let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.write_all(&client_flags.to_be_bytes()).map_err(io)?;

        // NBD_OPT_GO: name, then the one information request we need.
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut opt = IHAVEOPT.to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).map_err(io)?;

        let (mut size_bytes, mut transmission_flags) = (None, 0);
        let (mut min_block_bytes, mut max_block_bytes) = (1, 32 << 20);
        for _ in 0..16 {
            let mut head = [0u8; 20];
            s.read_exact(&mut head).map_err(io)?;
            if be_u64(&head) != OPTION_REPLY_MAGIC {
                return Err(format!("bad option reply magic: {head:?}"));
            }
            let reply_type = be_u32(&head[12..]);
            let len = be_u32(&head[16..]) as usize;
            if len > 64 << 10 {
                return Err(format!("option reply of {len} bytes"));
            }
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).map_err(io)?;
            if reply_type & REP_FLAG_ERROR != 0 {
                return Err(format!(
                    "NBD_OPT_GO {export:?} refused ({reply_type:#x}): {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            match reply_type {
                REP_INFO if body.len() >= 12 && be_u16(&body) == INFO_EXPORT => {
                    size_bytes = Some(be_u64(&body[2..]));
                    transmission_flags = be_u16(&body[10..]);
                }
                REP_INFO if body.len() >= 14 && be_u16(&body) == INFO_BLOCK_SIZE => {
                    min_block_bytes = be_u32(&body[2..]);
                    max_block_bytes = be_u32(&body[10..]);
                }
                REP_INFO => {}
                REP_ACK => {
                    let size_bytes =
                        size_bytes.ok_or("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")?;
                    return Ok(NbdClient {
                        s,
                        size_bytes,
                        transmission_flags,
                        min_block_bytes,
                        max_block_bytes,
                        next_cookie: 1,
                    });
                }
                other => return Err(format!("unexpected option reply {other:#x}")),
            }
        }
        Err("no acknowledgement of NBD_OPT_GO".into())
    }

    /// Send one request; returns its cookie.
    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(len as u32).to_be_bytes());
        req.extend_from_slice(payload);
        self.s.write_all(&req)?;
        Ok(cookie)
    }

    /// Receive the next reply; `read_len(cookie)` is how much data a successful reply to that
    /// cookie carries (0 for anything but a read).
    fn recv(&mut self, read_len: impl FnOnce(u64) -> usize) -> std::io::Result<NbdReply> {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head)?;
        assert_eq!(
            be_u32(&head),
            SIMPLE_REPLY_MAGIC,
            "not a simple reply: {head:?}"
        );
        let error = be_u32(&head[4..]);
        let cookie = be_u64(&head[8..]);
        let mut data = Vec::new();
        if error == 0 {
            data.resize(read_len(cookie), 0);
            self.s.read_exact(&mut data)?;
        }
        Ok(NbdReply {
            cookie,
            error,
            data,
        })
    }

    /// One request and its reply, or what went wrong on the connection.
    fn try_call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<NbdReply, String> {
        let cookie = self
            .send(kind, flags, offset, len, payload)
            .map_err(|e| format!("NBD send: {e}"))?;
        let want = if kind == CMD_READ { len as usize } else { 0 };
        let r = self.recv(|_| want).map_err(|e| format!("NBD reply: {e}"))?;
        assert_eq!(r.cookie, cookie, "reply to another request");
        Ok(r)
    }

    fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u64, payload: &[u8]) -> NbdReply {
        self.try_call(kind, flags, offset, len, payload)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(CMD_WRITE, 0, offset, data.len() as u64, data)
            .error
    }

    /// The data, or the error number or connection failure.
    fn try_read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let r = self.try_call(CMD_READ, 0, offset, len, &[])?;
        match r.error {
            0 => Ok(r.data),
            e => Err(format!("read of {len} bytes at {offset}: error {e}")),
        }
    }

    fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        self.try_read(offset, len).unwrap_or_else(|e| panic!("{e}"))
    }

    fn flush(&mut self) -> u32 {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).error
    }

    fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}

// ---------------------------------------------------------------------------------------------
// The kill -9 drill.
//
// Every 4 KiB block written carries 256 copies of a 16-byte stamp (the write's unique value and
// the block's index), so a block is either all zeros, exactly one write's data for exactly this
// block, or detectably stale, misplaced or torn.
//
// Time is a global counter of events: a request is stamped when it is about to be sent (never
// later than it really was) and when its reply has been read (never earlier than the server
// completed it), so the rules below only ever err on the lenient side.
//
// - A write (TRIM and WRITE_ZEROES write zeros: the engine documents that trimmed ranges read
//   as zeros) is durable when it was acknowledged with FUA, or acknowledged before a FLUSH that
//   later completed was sent (on either connection: the export advertises MULTI_CONN).
// - After a crash, a block may hold the value of write X unless some durable write Y of that
//   block was sent after X was acknowledged (Y certainly replaced X, and survives).
// - A read R may return X unless some write Y of that block, sent after X was acknowledged,
//   was itself acknowledged before R was sent.

const STAMP_MAGIC: u64 = 0x5249_4e47_424c_4b21; // "RINGBLK!"
/// The value of a block of zeros (never written, trimmed or zeroed).
const ZEROS: u64 = 0;

fn block_data(value: u64, block: u64) -> [u8; BLOCK_BYTES as usize] {
    let mut b = [0u8; BLOCK_BYTES as usize];
    for stamp in b.chunks_exact_mut(16) {
        stamp[..8].copy_from_slice(&value.to_le_bytes());
        stamp[8..].copy_from_slice(&(block ^ STAMP_MAGIC).to_le_bytes());
    }
    b
}

/// The distinct values in a block's stamps, in order, or what is wrong with it (a stamp that
/// belongs to another block, or is neither zeros nor a stamp).
fn block_values(data: &[u8], block: u64) -> Result<Vec<u64>, String> {
    let mut values: Vec<u64> = Vec::new();
    for (i, stamp) in data.chunks_exact(16).enumerate() {
        let value = u64::from_le_bytes(stamp[..8].try_into().unwrap());
        let owner = u64::from_le_bytes(stamp[8..].try_into().unwrap()) ^ STAMP_MAGIC;
        let value = if stamp.iter().all(|&b| b == 0) {
            ZEROS
        } else if value != ZEROS && owner == block {
            value
        } else if value != ZEROS && owner < WORKING_BLOCKS {
            return Err(format!(
                "misplaced: bytes {} of value {value} written for block {owner}",
                i * 16
            ));
        } else {
            return Err(format!("garbage at byte {}: {stamp:02x?}", i * 16));
        };
        if values.last() != Some(&value) && !values.contains(&value) {
            values.push(value);
        }
    }
    Ok(values)
}

/// The one value a block holds, or what is wrong with it (torn, misplaced, garbage).
fn decode_block(data: &[u8], block: u64) -> Result<u64, String> {
    match block_values(data, block)?.as_slice() {
        [one] => Ok(*one),
        several => Err(format!("torn: a mix of values {several:?}")),
    }
}

/// `values` with `v` added unless it is there already.
fn distinct(mut values: Vec<u64>, v: u64) -> Vec<u64> {
    if !values.contains(&v) {
        values.push(v);
    }
    values
}

/// One modifying request as the model knows it.
#[derive(Clone, Copy, Debug)]
struct WriteRec {
    sent: u64,
    acked: Option<u64>,
    fua: bool,
}

/// One value a block was given, in send order.
#[derive(Clone, Copy, Debug)]
struct Version {
    value: u64,
    write: usize,
}

struct Model {
    clock: u64,
    /// Index 0 is the baseline: what the blocks held when this cycle began, durable.
    writes: Vec<WriteRec>,
    history: Vec<Vec<Version>>,
    /// The latest send stamp of a completed FLUSH.
    flush_sent_max: u64,
    next_value: u64,
    /// Requests sent this cycle, and the count at which the daemon is killed.
    sent: u64,
    kill_at: u64,
    killed: bool,
    /// This cycle's mix: how often a request is a FLUSH, and a modifying one carries FUA.
    flush_percent: u64,
    fua_percent: u64,
    acked_in_cycle: u64,
    checked_reads: u64,
    /// Reads of a block that returned a mix of racing writes' values.
    mixed_reads: u64,
}

impl Model {
    fn new(blocks: u64) -> Model {
        Model {
            clock: 1,
            writes: vec![WriteRec {
                sent: 0,
                acked: Some(0),
                fua: true,
            }],
            history: (0..blocks)
                .map(|_| {
                    vec![Version {
                        value: ZEROS,
                        write: 0,
                    }]
                })
                .collect(),
            flush_sent_max: 0,
            next_value: 1,
            sent: 0,
            kill_at: u64::MAX,
            killed: false,
            flush_percent: 12,
            fua_percent: 30,
            acked_in_cycle: 0,
            checked_reads: 0,
            mixed_reads: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn durable(&self, w: usize) -> bool {
        let rec = &self.writes[w];
        rec.acked
            .is_some_and(|a| rec.fua || a < self.flush_sent_max)
    }

    /// A write of `blocks` starting at `first` with `value` (ZEROS for trim/zeroes) is about to
    /// be sent; returns its index.
    fn record_write(&mut self, first: u64, blocks: u64, value: u64, fua: bool) -> usize {
        let sent = self.tick();
        let w = self.writes.len();
        self.writes.push(WriteRec {
            sent,
            acked: None,
            fua,
        });
        for b in first..first + blocks {
            self.history[b as usize].push(Version { value, write: w });
        }
        w
    }

    /// Values block `block` may hold after a crash.
    fn crash_allowed(&self, block: u64) -> Vec<u64> {
        self.allowed_since_settled(block, |w| self.durable(w))
    }

    /// Values a read sent at `read_sent` may return for `block` (checked when its reply is in).
    fn read_allowed(&self, block: u64, read_sent: u64) -> Vec<u64> {
        self.allowed_since_settled(block, |w| {
            self.writes[w].acked.is_some_and(|a| a < read_sent)
        })
    }

    /// The values of `block` not ruled out by its newest settled write: one that `settled`
    /// says is in place. Every write acknowledged before that write was sent is overwritten;
    /// the rest (it, later ones, and those still in flight) may be what the block holds.
    fn allowed_since_settled(&self, block: u64, settled: impl Fn(usize) -> bool) -> Vec<u64> {
        let h = &self.history[block as usize];
        let newest_settled_sent = h
            .iter()
            .filter(|v| settled(v.write))
            .map(|v| self.writes[v.write].sent)
            .max()
            .unwrap_or(0);
        h.iter()
            .filter(|v| {
                self.writes[v.write]
                    .acked
                    .is_none_or(|a| a >= newest_settled_sent)
            })
            .map(|v| v.value)
            .fold(Vec::new(), distinct)
    }

    fn describe(&self, block: u64) -> String {
        let h = &self.history[block as usize];
        let mut s = format!(
            "history of block {block} (flushes completed up to send stamp {}):",
            self.flush_sent_max
        );
        for v in h.iter().rev().take(12) {
            let w = &self.writes[v.write];
            s.push_str(&format!(
                "\n  value {:>8} sent {:>7} acked {:>9} fua {} durable {}",
                v.value,
                w.sent,
                w.acked.map_or("in flight".into(), |a| a.to_string()),
                w.fua,
                self.durable(v.write)
            ));
        }
        s
    }

    /// Acknowledged modifying requests that were durable when the daemon died.
    fn durable_writes(&self) -> usize {
        (1..self.writes.len()).filter(|&w| self.durable(w)).count()
    }

    /// Make `observed` the durable baseline of a new cycle.
    fn rebase(&mut self, observed: &[u64]) {
        self.writes.truncate(1);
        for (h, &value) in self.history.iter_mut().zip(observed) {
            h.clear();
            h.push(Version { value, write: 0 });
        }
        self.flush_sent_max = 0;
        self.sent = 0;
        self.kill_at = u64::MAX;
        self.killed = false;
        self.acked_in_cycle = 0;
        self.checked_reads = 0;
        self.mixed_reads = 0;
    }
}

/// A request in flight on one connection.
#[derive(Debug)]
enum Pending {
    Read { first: u64, blocks: u64, sent: u64 },
    Write { write: usize },
    Flush { sent: u64 },
}

/// A request ready to go on the wire, already recorded in the model.
struct Planned {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u64,
    payload: Vec<u8>,
    pending: Pending,
}

/// Blocks the drill works on: 8 MiB, so overwrites, whole-chunk trims and chunk allocations
/// all happen often.
const WORKING_BLOCKS: u64 = 8 * MIB / BLOCK_BYTES;
const BLOCKS_PER_CHUNK: u64 = CHUNK_BYTES / BLOCK_BYTES;

impl Model {
    /// Pick the next request of the mix (20% READ, `flush_percent` FLUSH, 10% TRIM, 10%
    /// WRITE_ZEROES, the rest WRITE; `fua_percent` of the modifying ones with FUA) and stamp it
    /// as sent.
    fn plan(&mut self, rng: &mut Rng) -> Planned {
        let f = self.flush_percent;
        let kind = match rng.below(100) {
            r if r < 20 => CMD_READ,
            r if r < 20 + f => CMD_FLUSH,
            r if r < 30 + f => CMD_TRIM,
            r if r < 40 + f => CMD_WRITE_ZEROES,
            _ => CMD_WRITE,
        };
        let fua_flag = if rng.chance(self.fua_percent) {
            CMD_FLAG_FUA
        } else {
            0
        };
        // Mostly small ranges, some across a chunk boundary; trims and zeroes sometimes whole
        // chunks (a whole-chunk trim unmaps the chunk).
        let ranged_zeros = kind == CMD_TRIM || kind == CMD_WRITE_ZEROES;
        let (first, blocks) = if ranged_zeros && rng.chance(40) {
            let chunk = rng.below(WORKING_BLOCKS / BLOCKS_PER_CHUNK);
            (chunk * BLOCKS_PER_CHUNK, BLOCKS_PER_CHUNK)
        } else {
            let blocks = 1 + rng.below(32);
            (rng.below(WORKING_BLOCKS - blocks + 1), blocks)
        };
        let range = |kind, flags, payload, pending| Planned {
            kind,
            flags,
            offset: first * BLOCK_BYTES,
            len: blocks * BLOCK_BYTES,
            payload,
            pending,
        };
        let fua = fua_flag != 0;
        match kind {
            CMD_READ => {
                let sent = self.tick();
                let pending = Pending::Read {
                    first,
                    blocks,
                    sent,
                };
                range(CMD_READ, 0, Vec::new(), pending)
            }
            CMD_WRITE => {
                let value = self.next_value;
                self.next_value += 1;
                let write = self.record_write(first, blocks, value, fua);
                let mut data = Vec::with_capacity((blocks * BLOCK_BYTES) as usize);
                for b in first..first + blocks {
                    data.extend_from_slice(&block_data(value, b));
                }
                range(CMD_WRITE, fua_flag, data, Pending::Write { write })
            }
            CMD_FLUSH => {
                let sent = self.tick();
                Planned {
                    kind: CMD_FLUSH,
                    flags: 0,
                    offset: 0,
                    len: 0,
                    payload: Vec::new(),
                    pending: Pending::Flush { sent },
                }
            }
            CMD_TRIM => {
                let write = self.record_write(first, blocks, ZEROS, fua);
                range(CMD_TRIM, fua_flag, Vec::new(), Pending::Write { write })
            }
            _ => {
                let write = self.record_write(first, blocks, ZEROS, fua);
                let no_hole = if rng.chance(50) { CMD_FLAG_NO_HOLE } else { 0 };
                let flags = fua_flag | no_hole;
                range(
                    CMD_WRITE_ZEROES,
                    flags,
                    Vec::new(),
                    Pending::Write { write },
                )
            }
        }
    }

    /// The reply to `pending` came in (acknowledged at `acked`): update the model, check reads.
    fn complete(&mut self, pending: Pending, acked: u64, data: &[u8], ctx: &str) {
        self.acked_in_cycle += 1;
        match pending {
            Pending::Write { write } => self.writes[write].acked = Some(acked),
            Pending::Flush { sent } => self.flush_sent_max = self.flush_sent_max.max(sent),
            Pending::Read {
                first,
                blocks,
                sent,
            } => {
                for (i, data) in data.chunks_exact(BLOCK_BYTES as usize).enumerate() {
                    let block = first + i as u64;
                    let allowed = self.read_allowed(block, sent);
                    // A read racing writes of the same block may see a mix of their values
                    // (nothing promises atomicity between concurrent requests); anything
                    // else is wrong.
                    let got = block_values(data, block);
                    let ok = got
                        .as_ref()
                        .is_ok_and(|vs| vs.iter().all(|v| allowed.contains(v)));
                    assert!(
                        ok,
                        "read of block {block} returned {got:?}, allowed values {allowed:?}, \
                         {ctx}\n{}",
                        self.describe(block)
                    );
                    if got.is_ok_and(|vs| vs.len() > 1) {
                        self.mixed_reads += 1;
                    }
                }
                self.checked_reads += blocks;
            }
        }
    }
}

struct DrillShared {
    model: Mutex<Model>,
    pid: i32,
    seed: u64,
    cycle: usize,
}

impl DrillShared {
    fn context(&self, m: &Model) -> String {
        format!(
            "seed {} cycle {} (request {} of {})",
            self.seed, self.cycle, m.sent, m.kill_at
        )
    }
}

/// One connection's share of a cycle: keep up to `depth` requests in flight until the model's
/// request budget is spent (the request that spends it also kills the daemon), then take
/// replies until the connection dies.
fn run_connection(mut c: NbdClient, shared: Arc<DrillShared>, mut rng: Rng, depth: usize) {
    let mut in_flight: HashMap<u64, Pending> = HashMap::new();
    loop {
        while in_flight.len() < depth {
            let mut m = shared.model.lock().unwrap();
            if m.sent >= m.kill_at {
                break;
            }
            m.sent += 1;
            let kill_now = m.sent == m.kill_at;
            m.killed |= kill_now;
            let req = m.plan(&mut rng);
            drop(m);
            // Stamped by `plan`, so the stamp is never later than the send.
            match c.send(req.kind, req.flags, req.offset, req.len, &req.payload) {
                Ok(cookie) => {
                    in_flight.insert(cookie, req.pending);
                }
                Err(e) => {
                    let m = shared.model.lock().unwrap();
                    assert!(
                        m.killed,
                        "send failed before the kill, {}: {e}",
                        shared.context(&m)
                    );
                    return;
                }
            }
            if kill_now {
                // The crash, with requests in flight on both connections.
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(shared.pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("SIGKILL the daemon");
            }
        }
        if in_flight.is_empty() {
            return;
        }
        let reply = c.recv(|cookie| match in_flight.get(&cookie) {
            Some(Pending::Read { blocks, .. }) => (blocks * BLOCK_BYTES) as usize,
            _ => 0,
        });
        let mut m = shared.model.lock().unwrap();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                let ctx = shared.context(&m);
                assert!(m.killed, "connection lost before the kill, {ctx}: {e}");
                return;
            }
        };
        let acked = m.tick();
        let ctx = shared.context(&m);
        let pending = in_flight
            .remove(&reply.cookie)
            .unwrap_or_else(|| panic!("reply to unknown cookie {}, {ctx}", reply.cookie));
        assert_eq!(
            reply.error, 0,
            "{pending:?} failed with error {}, {ctx}",
            reply.error
        );
        m.complete(pending, acked, &reply.data, &ctx);
    }
}

/// After a restart: read every block of the working set and check it against the model, then
/// make what was read the new baseline (flushed, so it is durable). Returns the acknowledged
/// durable writes it checked.
fn verify_after_crash(c: &mut NbdClient, model: &mut Model, seed: u64, cycle: usize) -> usize {
    let per_read = 256;
    let mut observed = Vec::with_capacity(WORKING_BLOCKS as usize);
    let mut lost = Vec::new();
    for first in (0..WORKING_BLOCKS).step_by(per_read) {
        let data = c.read(first * BLOCK_BYTES, per_read as u64 * BLOCK_BYTES);
        for (i, block_bytes) in data.chunks_exact(BLOCK_BYTES as usize).enumerate() {
            let block = first + i as u64;
            let allowed = model.crash_allowed(block);
            match decode_block(block_bytes, block) {
                Ok(v) if allowed.contains(&v) => observed.push(v),
                got => {
                    lost.push(format!(
                        "block {block}: holds {got:?}, allowed {allowed:?}\n{}",
                        model.describe(block)
                    ));
                    observed.push(got.unwrap_or(u64::MAX));
                }
            }
        }
    }
    assert!(
        lost.is_empty(),
        "seed {seed} cycle {cycle}: {} block(s) lost acknowledged flushed data or hold data \
         never written there (repeat with RINGBLOCK_DRILL_SEED={seed}):\n{}",
        lost.len(),
        lost.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    let checked = model.durable_writes();
    model.rebase(&observed);
    assert_eq!(c.flush(), 0, "flush after verification");
    checked
}

/// The kill drill's daemon: one volume on a 256 MiB file device, no web UI, and state (if the
/// daemon keeps any) in the test's own directory.
fn drill_config(dir: &Path) -> PathBuf {
    PathBuf::from(write_file(
        dir,
        "drill.toml",
        &format!(
            "[[device]]\nname = \"disk0\"\nkind = \"file\"\npath = \"{}/disk0.img\"\n\
             size_bytes = 268435456\n\
             [[volume]]\nname = \"vol\"\ndevice = \"disk0\"\nsize_bytes = 67108864\n\
             [web]\nenabled = false\nstate_dir = \"{}/state\"\n",
            dir.display(),
            dir.display()
        ),
    ))
}

/// What one cycle did.
#[derive(Default)]
struct CycleStats {
    /// Acknowledged durable writes verified after the restart that began the cycle.
    durable_checked: usize,
    acked: u64,
    read_blocks: u64,
    mixed_reads: u64,
}

/// One cycle: start the daemon, verify the blocks against the model after the previous crash,
/// then (unless `last`) run the mix on two connections until the kill, and reap the daemon.
fn run_cycle(
    cfg: &Path,
    model: Model,
    rng: &mut Rng,
    seed: u64,
    cycle: usize,
    last: bool,
) -> (Model, CycleStats) {
    let mut model = model;
    let mut stats = CycleStats::default();
    let mut daemon = Proc::start_ready(cfg);
    let addr = daemon.nbd_addr();
    let mut c = NbdClient::connect(&addr, "vol").unwrap_or_else(|e| panic!("{e}"));
    check_export(&c);
    stats.durable_checked = verify_after_crash(&mut c, &mut model, seed, cycle);
    c.disconnect();
    if last {
        daemon.stop_clean();
        return (model, stats);
    }

    // Some cycles flush rarely, so the crash finds many unflushed writes, chunk allocations
    // and unmaps.
    model.kill_at = 40 + rng.below(1600);
    model.flush_percent = [1, 4, 12][rng.below(3) as usize];
    model.fua_percent = [5, 30][rng.below(2) as usize];
    let depth = [1usize, 2, 4, 8][rng.below(4) as usize];
    let shared = Arc::new(DrillShared {
        model: Mutex::new(model),
        pid: daemon.pid(),
        seed,
        cycle,
    });
    let connections: Vec<_> = (0..2)
        .map(|_| {
            let c = NbdClient::connect(&addr, "vol").unwrap_or_else(|e| panic!("{e}"));
            let (shared, rng) = (shared.clone(), Rng::new(rng.next()));
            std::thread::spawn(move || run_connection(c, shared, rng, depth))
        })
        .collect();
    for t in connections {
        if let Err(panic) = t.join() {
            std::panic::resume_unwind(panic);
        }
    }
    let status = daemon
        .wait_exit(EXIT_TIMEOUT)
        .expect("the daemon dies of SIGKILL");
    assert!(!status.success(), "daemon was killed: {status}");
    let model = Arc::try_unwrap(shared)
        .ok()
        .expect("the connections are done")
        .model
        .into_inner()
        .unwrap();
    assert!(model.killed, "cycle {cycle} never reached its kill point");
    println!(
        "cycle {cycle}: depth {depth}, {}% flush, {}% FUA, killed at request {} with {} in \
         flight, {} durable writes",
        model.flush_percent,
        model.fua_percent,
        model.kill_at,
        model.sent - model.acked_in_cycle,
        model.durable_writes()
    );
    stats.acked = model.acked_in_cycle;
    stats.read_blocks = model.checked_reads;
    stats.mixed_reads = model.mixed_reads;
    (model, stats)
}

/// The export offers what the drill sends, and 4 KiB blocks are whole numbers of its minimum
/// block size.
fn check_export(c: &NbdClient) {
    let f = c.transmission_flags;
    for (flag, name) in [
        (TFLAG_SEND_FLUSH, "SEND_FLUSH"),
        (TFLAG_SEND_FUA, "SEND_FUA"),
        (TFLAG_SEND_TRIM, "SEND_TRIM"),
        (TFLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (TFLAG_CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ] {
        assert_ne!(f & flag, 0, "export does not advertise {name}: {f:#x}");
    }
    assert_eq!(f & TFLAG_READ_ONLY, 0);
    assert!(c.size_bytes >= WORKING_BLOCKS * BLOCK_BYTES);
    assert!(
        c.min_block_bytes > 0 && BLOCK_BYTES.is_multiple_of(u64::from(c.min_block_bytes)),
        "minimum block {} does not divide 4096",
        c.min_block_bytes
    );
    assert!(u64::from(c.max_block_bytes) >= CHUNK_BYTES);
}

/// kill -9 cycles under a seeded mix of WRITE, WRITE+FUA, FLUSH, TRIM, WRITE_ZEROES and READ on
/// two connections at once, pipelined: no acknowledged flushed write is ever lost, and no block
/// ever holds data that was not written to it.
#[test]
fn kill_9_under_mixed_io_loses_no_flushed_write() {
    const CYCLES: usize = 24;
    let seed = drill_seed();
    println!("fault drill seed {seed} (set RINGBLOCK_DRILL_SEED={seed} to repeat)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = drill_config(dir.path());
    let mut rng = Rng::new(seed);
    let mut model = Model::new(WORKING_BLOCKS);
    let mut total = CycleStats::default();
    // Cycle CYCLES only verifies the last crash and stops cleanly.
    for cycle in 0..=CYCLES {
        let (m, stats) = run_cycle(&cfg, model, &mut rng, seed, cycle, cycle == CYCLES);
        model = m;
        total.durable_checked += stats.durable_checked;
        total.acked += stats.acked;
        total.read_blocks += stats.read_blocks;
        total.mixed_reads += stats.mixed_reads;
    }
    println!(
        "{CYCLES} kill -9 cycles, {} requests acknowledged, {} blocks read back checked ({} a \
         mix of racing writes)",
        total.acked, total.read_blocks, total.mixed_reads
    );
    println!(
        "{} acknowledged flushed writes checked, 0 lost",
        total.durable_checked
    );
    assert!(total.durable_checked > 0, "the drill checked nothing");
}

// ---------------------------------------------------------------------------------------------
// Damaged device files.

const DAMAGE_DEVICE_BYTES: u64 = 128 * MIB;
const DATA_VOLUME_BYTES: u64 = 120 * MIB;
/// One flushed region per MiB of the data volume, so the data reaches the device's last chunks.
const DATA_REGIONS: u64 = 120;
const REGION_BYTES: u64 = 32 * KIB;
const LABEL_MAGIC: &[u8; 8] = b"RBLABEL1";
const SLOT_MAGIC: &[u8; 8] = b"RBMETA01";
const LABEL_BYTES: u64 = 4096;

/// A device image holding known flushed data in volume `data`, and the trace of a volume
/// `scratch` that was created and deleted through the web API; the daemon is stopped.
struct Bed {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    img: PathBuf,
    token: String,
    /// (offset in `data`, bytes) written and flushed.
    written: Vec<(u64, Vec<u8>)>,
}

fn region_data(region: u64) -> Vec<u8> {
    let mut rng = Rng::new(0xda7a_0000 + region);
    (0..REGION_BYTES / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect()
}

impl Bed {
    fn prepare() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk0.img");
        let state = dir.path().join("state");
        let cfg = PathBuf::from(write_file(
            dir.path(),
            "damage.toml",
            &format!(
                "[[device]]\nname = \"disk0\"\nkind = \"file\"\npath = \"{}\"\n\
                 size_bytes = {DAMAGE_DEVICE_BYTES}\n\
                 [[volume]]\nname = \"data\"\ndevice = \"disk0\"\nsize_bytes = {DATA_VOLUME_BYTES}\n\
                 [web]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n",
                img.display(),
                state.display()
            ),
        ));
        // A token of our own before the first start: the daemon then never prints one.
        let (code, out, err) = run(&["token", "reset", "--state-dir", state.to_str().unwrap()]);
        assert_eq!(code, 0, "token reset: {err}");
        let token = out.trim().to_string();

        let daemon = Proc::start_ready(&cfg);
        let web = daemon.web_addr();
        let mut c =
            NbdClient::connect(&daemon.nbd_addr(), "data").unwrap_or_else(|e| panic!("{e}"));
        let mut written = Vec::new();
        for region in 0..DATA_REGIONS {
            let offset = region * MIB + (region * 37 % 224) * BLOCK_BYTES;
            let data = region_data(region);
            assert_eq!(c.write(offset, &data), 0, "write at {offset}");
            written.push((offset, data));
        }
        assert_eq!(c.flush(), 0);
        c.disconnect();

        let body = format!(
            "{{\"name\": \"scratch\", \"device\": \"disk0\", \"size_bytes\": {}}}",
            4 * MIB
        );
        let r = http_auth(
            &web,
            &token,
            "POST",
            "/api/volumes",
            &[],
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 201, "create scratch: {r:?}");
        let r = http_auth(&web, &token, "DELETE", "/api/volumes/scratch", &[], None);
        assert_eq!(r.status, 204, "delete scratch: {r:?}");
        let r = http_auth(&web, &token, "GET", "/api/volumes/scratch", &[], None);
        assert_eq!(r.status, 404, "scratch is deleted: {r:?}");
        daemon.stop_clean();
        Bed {
            _dir: dir,
            cfg,
            img,
            token,
            written,
        }
    }

    /// Its length and the bytes of its label and metadata area, if the file exists.
    fn image_state(&self) -> Option<(u64, Vec<u8>)> {
        let f = std::fs::File::open(&self.img).ok()?;
        let len = f.metadata().unwrap().len();
        let mut head = Vec::new();
        f.take(MIB).read_to_end(&mut head).unwrap();
        Some((len, head))
    }

    /// Everything wrong with a daemon that started on the damaged image: flushed data that
    /// does not read back, the deleted volume back, no warning.
    fn problems_of_started(&self, daemon: &Proc) -> Vec<String> {
        let mut problems = Vec::new();
        match NbdClient::connect(&daemon.nbd_addr(), "data") {
            Err(e) => problems.push(format!("volume data with flushed data is gone: {e}")),
            Ok(mut c) => {
                let (mut wrong, mut zeros) = (0, 0);
                for (offset, data) in &self.written {
                    match c.try_read(*offset, data.len() as u64) {
                        Ok(got) if got == *data => {}
                        Ok(got) => {
                            wrong += 1;
                            if got.iter().all(|&b| b == 0) {
                                zeros += 1;
                            }
                        }
                        Err(e) => {
                            problems.push(format!("flushed data does not read back: {e}"));
                            break;
                        }
                    }
                }
                if wrong > 0 {
                    problems.push(format!(
                        "{wrong} of {} flushed regions read back wrong ({zeros} of them all zeros)",
                        self.written.len()
                    ));
                }
                c.disconnect();
            }
        }
        let r = http_auth(
            &daemon.web_addr(),
            &self.token,
            "GET",
            "/api/volumes/scratch",
            &[],
            None,
        );
        if r.status != 404 {
            problems.push(format!(
                "the deleted volume scratch is back (GET /api/volumes/scratch: HTTP {} {})",
                r.status, r.body
            ));
        }
        if !daemon.stderr_text().lines().any(|l| l.contains("WARN")) {
            problems.push("it logged no warning about the damage".into());
        }
        problems
    }

    /// Start on the damaged image: it must either refuse, naming the device, and leave the
    /// image as it was, or start with all flushed data, without the deleted volume, and warn.
    fn expect_refusal_or_recovery(&self, case: &str) {
        let before = self.image_state();
        match Proc::start(&self.cfg) {
            Started::Exited { code, stderr } => {
                println!("{case}: the daemon refused to start (exit {code:?}):\n{stderr}");
                assert!(
                    code.is_some_and(|c| c != 0),
                    "{case}: exit {code:?} without starting"
                );
                assert!(!stderr.contains("panicked"), "{case}: panic:\n{stderr}");
                assert!(
                    stderr.contains("disk0") || stderr.contains(&*self.img.to_string_lossy()),
                    "{case}: the error does not name the device:\n{stderr}"
                );
                let after = self.image_state();
                assert!(
                    after == before,
                    "{case}: refused to start but changed the image (length {:?} -> {:?})",
                    before.map(|b| b.0),
                    after.map(|a| a.0)
                );
            }
            Started::Ready(daemon) => {
                let problems = self.problems_of_started(&daemon);
                let stderr = daemon.stderr_text();
                let _ = daemon.terminate();
                println!("{case}: the daemon started; its log:\n{stderr}");
                assert!(
                    problems.is_empty(),
                    "{case}: the daemon started on the damaged image and\n- {}\nits log:\n{stderr}",
                    problems.join("\n- ")
                );
            }
        }
    }
}

fn truncate_image(bed: &Bed, len: u64) {
    let f = open_image(&bed.img);
    f.set_len(len).unwrap();
    f.sync_all().unwrap();
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

#[test]
fn damaged_image_truncated_to_100_mib() {
    let bed = Bed::prepare();
    truncate_image(&bed, 100 * MIB);
    bed.expect_refusal_or_recovery("image truncated to 100 MiB");
}

#[test]
fn damaged_image_truncated_to_0() {
    let bed = Bed::prepare();
    truncate_image(&bed, 0);
    bed.expect_refusal_or_recovery("image truncated to 0 bytes");
}

#[test]
fn damaged_image_truncated_to_30_kib() {
    let bed = Bed::prepare();
    truncate_image(&bed, 30 * KIB);
    bed.expect_refusal_or_recovery("image truncated to 30 KiB");
}

#[test]
fn damaged_image_label_zeroed() {
    use std::os::unix::fs::FileExt;
    let bed = Bed::prepare();
    // dd if=/dev/zero of=img bs=4096 count=1 conv=notrunc
    let f = open_image(&bed.img);
    f.write_all_at(&[0u8; LABEL_BYTES as usize], 0).unwrap();
    f.sync_all().unwrap();
    bed.expect_refusal_or_recovery("label zeroed");
}

/// One byte of the label flipped (its checksum catches it): nothing to format over.
#[test]
fn damaged_image_label_corrupt() {
    use std::os::unix::fs::FileExt;
    let bed = Bed::prepare();
    let f = open_image(&bed.img);
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, 20).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], 20).unwrap();
    f.sync_all().unwrap();
    bed.expect_refusal_or_recovery("label corrupt");
}

/// One byte of the newest metadata slot flipped (covered by its checksum): the older slot
/// may be a generation from before the acknowledged DELETE of `scratch`.
#[test]
fn damaged_image_newest_slot_corrupt() {
    use std::os::unix::fs::FileExt;
    let bed = Bed::prepare();
    let f = open_image(&bed.img);
    // Layout (engine/src/meta.rs): label at 0 (slot_bytes at 40..48), slot 0 at 4096, slot 1
    // at 4096 + slot_bytes; a slot has its generation at 16..24, payload length at 24..32 and
    // the payload from 32, all little-endian; a crc32c covers 16..32 + payload length.
    let mut label = [0u8; 64];
    f.read_exact_at(&mut label, 0).unwrap();
    assert_eq!(&label[..8], LABEL_MAGIC, "label of a fresh image");
    let slot_bytes = le_u64(&label[40..]);
    let mut slots = Vec::new();
    for i in 0..2 {
        let offset = LABEL_BYTES + i * slot_bytes;
        let mut slot = vec![0u8; slot_bytes as usize];
        f.read_exact_at(&mut slot, offset).unwrap();
        if &slot[..8] == SLOT_MAGIC {
            slots.push((le_u64(&slot[16..]), offset, slot));
        }
    }
    slots.sort_by_key(|s| s.0);
    let (generation, offset, slot) = slots.pop().expect("a valid metadata slot");
    let payload_bytes = le_u64(&slot[24..]);
    if let Some((older, _, older_slot)) = slots.first() {
        let has_scratch = older_slot.windows(7).any(|w| w == b"scratch");
        println!(
            "newest slot generation {generation}; older slot generation {older} {} the deleted volume",
            if has_scratch { "still lists" } else { "does not list" }
        );
    }
    let at = offset + 32 + payload_bytes / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    f.sync_all().unwrap();
    bed.expect_refusal_or_recovery("newest metadata slot corrupt");
}

/// The image unlinked while the daemon runs: device health must stop saying "ok", and the next
/// start must refuse instead of formatting a new blank file.
#[test]
fn damaged_image_deleted_while_running() {
    let bed = Bed::prepare();
    let daemon = Proc::start_ready(&bed.cfg);
    let web = daemon.web_addr();
    let device_json = || {
        let r = http_auth(&web, &bed.token, "GET", "/api/devices", &[], None);
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
            .as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == "disk0").cloned())
            .unwrap_or_else(|| panic!("no disk0 in {}", r.body))
    };
    let healthy = device_json();
    assert_eq!(healthy["health"]["status"], "ok", "{healthy}");

    std::fs::remove_file(&bed.img).unwrap();
    // A write and a flush after the unlink; how they fail (if they do) is the daemon's choice.
    match NbdClient::connect(&daemon.nbd_addr(), "data") {
        Ok(mut c) => {
            let data = region_data(999);
            let write = c.try_call(CMD_WRITE, 0, 0, data.len() as u64, &data);
            let flush = c.try_call(CMD_FLUSH, 0, 0, 0, &[]);
            println!(
                "after the unlink: write {:?}, flush {:?}",
                write.map(|r| r.error),
                flush.map(|r| r.error)
            );
            c.disconnect();
        }
        Err(e) => println!("after the unlink: NBD refused: {e}"),
    }

    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let d = device_json();
        if d["health"]["status"] != "ok" || Instant::now() >= deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("device before the unlink: {healthy}\ndevice after the unlink and a flush: {after}");
    if after["health"]["status"] == "ok" {
        problems.push(format!(
            "device health still says ok 20 s after its file was deleted and a flush: {}",
            after["health"]
        ));
    }
    let (status, stderr) = daemon.terminate();
    println!("stopped with {status}; its log:\n{stderr}");

    match Proc::start(&bed.cfg) {
        Started::Exited { code, stderr } => {
            println!("restart refused (exit {code:?}):\n{stderr}");
            if code.is_none_or(|c| c == 0) {
                problems.push(format!("restart exited with {code:?} without starting"));
            }
            if !(stderr.contains("disk0") || stderr.contains(&*bed.img.to_string_lossy())) {
                problems.push(format!(
                    "the restart error does not name the device: {stderr}"
                ));
            }
        }
        Started::Ready(daemon) => {
            let stderr = daemon.stderr_text();
            let _ = daemon.terminate();
            problems.push(format!(
                "the daemon started again without its device file; its log:\n{stderr}"
            ));
        }
    }
    if let Some((len, head)) = bed.image_state() {
        if head.starts_with(LABEL_MAGIC) {
            problems.push(format!(
                "a new, formatted {len}-byte image was created in place of the deleted one"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "device file deleted while running:\n- {}",
        problems.join("\n- ")
    );
}

/// The image, open for reading and writing, to damage it.
fn open_image(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}
